"""Weight initialisers (PyTorch's formulas) and the seeding rules.

Every random draw in fastconv takes an explicit ``rng``: an ``int`` seed, a
``numpy.random.Generator``, or None. None means the generator set by ``manual_seed`` if one
was set, else a fresh OS-seeded one; that is the only global state.

The initialisers fill a host array in place and return it, like ``torch.nn.init``'s ``*_``
functions. Fans follow PyTorch: for a weight (out, in, *kernel), fan_in = in * prod(kernel)
and fan_out = out * prod(kernel).
"""

from __future__ import annotations

import math

import numpy as np

_default_rng: np.random.Generator | None = None

RngLike = int | np.random.Generator | None


def manual_seed(seed: int) -> np.random.Generator:
    """Seed the generator used wherever ``rng=None`` is passed; returns that generator."""
    global _default_rng
    _default_rng = np.random.default_rng(seed)
    return _default_rng


def get_rng(rng: RngLike = None) -> np.random.Generator:
    """An int seeds a new generator, a Generator is used as is, None is the default one."""
    if rng is None:
        return _default_rng if _default_rng is not None else np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be an int seed, a numpy.random.Generator or None; got {rng!r}")


def spawn(rng: RngLike = None) -> np.random.Generator:
    """An independent child generator (e.g. a Dropout layer's own mask stream)."""
    return np.random.default_rng(get_rng(rng).integers(2**63))


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """PyTorch's recommended gain for a nonlinearity."""
    linear = (
        "linear",
        "conv1d",
        "conv2d",
        "conv3d",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "sigmoid",
    )
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def fan_in_and_fan_out(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight of this shape, as PyTorch computes them."""
    if len(shape) < 2:
        raise ValueError(f"fan in/out need a weight with at least 2 dimensions; got shape {shape}")
    receptive = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return int(shape[1]) * receptive, int(shape[0]) * receptive


def _fan(shape: tuple[int, ...], mode: str) -> int:
    fan_in, fan_out = fan_in_and_fan_out(shape)
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    raise ValueError(f"mode must be 'fan_in' or 'fan_out'; got {mode!r}")


def uniform_(array: np.ndarray, low: float = 0.0, high: float = 1.0, rng: RngLike = None):
    array[...] = get_rng(rng).uniform(low, high, array.shape)
    return array


def normal_(array: np.ndarray, mean: float = 0.0, std: float = 1.0, rng: RngLike = None):
    array[...] = get_rng(rng).normal(mean, std, array.shape)
    return array


def zeros_(array: np.ndarray) -> np.ndarray:
    array[...] = 0
    return array


def ones_(array: np.ndarray) -> np.ndarray:
    array[...] = 1
    return array


def kaiming_uniform_(
    array,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    rng: RngLike = None,
):
    """He init, uniform: U(-b, b), b = gain * sqrt(3 / fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(array.shape, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(array, -bound, bound, rng)


def kaiming_normal_(
    array,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    rng: RngLike = None,
):
    """He init, normal: N(0, std^2), std = gain / sqrt(fan)."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(array.shape, mode))
    return normal_(array, 0.0, std, rng)


def xavier_uniform_(array, gain: float = 1.0, rng: RngLike = None):
    """Glorot init, uniform: U(-b, b), b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(array.shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(array, -bound, bound, rng)


def xavier_normal_(array, gain: float = 1.0, rng: RngLike = None):
    """Glorot init, normal: std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fan_in_and_fan_out(array.shape)
    return normal_(array, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), rng)


def lecun_uniform_(array, rng: RngLike = None):
    """LeCun init, uniform: variance 1 / fan_in, i.e. U(-b, b), b = sqrt(3 / fan_in)."""
    bound = math.sqrt(3.0 / _fan(array.shape, "fan_in"))
    return uniform_(array, -bound, bound, rng)


def lecun_normal_(array, rng: RngLike = None):
    """LeCun init, normal: std = 1 / sqrt(fan_in)."""
    return normal_(array, 0.0, 1.0 / math.sqrt(_fan(array.shape, "fan_in")), rng)


def torch_default_(
    weight: np.ndarray, bias: np.ndarray | None, fan_in: int | None = None, rng: RngLike = None
) -> None:
    """PyTorch's default for Linear and Conv layers: weight kaiming_uniform_(a=sqrt(5)), i.e.
    U(+-1/sqrt(fan_in)), and bias U(+-1/sqrt(fan_in)). Weight drawn first, then bias."""
    rng = get_rng(rng)
    kaiming_uniform_(weight, a=math.sqrt(5), rng=rng)
    if bias is not None:
        fan_in = fan_in_and_fan_out(weight.shape)[0] if fan_in is None else fan_in
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, rng)
