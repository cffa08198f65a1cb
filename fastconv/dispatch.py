"""Backend and algorithm choice: one pure function, plus overrides and lazy GPU loading around it.

``select`` decides from plain values (op name, geometry, where the arrays live, what was asked
for, the overrides) and never runs a kernel or touches CUDA, so it is tested on its own.

Precedence for ``backend="auto"``: a ``using(backend=...)`` context, else ``FASTCONV_BACKEND``,
else "cuda" when the inputs are device arrays and "cpu" when they are NumPy arrays.
An explicit ``backend=`` argument always wins over both overrides.

CPU ``algorithm="auto"``: explicit argument > ``using(algorithm=...)`` > the measured choice
remembered by ``fastconv.autotune`` (passed in as ``tuned``) > the heuristic below. When nothing
is remembered and tuning is on, ``select`` says so (algorithm "auto") and the caller measures.

The heuristic (used with ``FASTCONV_AUTOTUNE=0``, and for the CUDA backend): the general rule
is that im2col turns the convolution into one GEMM per group, which wins once the GEMM is big
enough to use the machine; the direct kernels win where it is not (depthwise/grouped
convolutions with few channels per group, tiny reductions) and need no (C*KH*KW, N*OH*OW)
buffer: ``direct`` if C/G * KH * KW < DIRECT_MAX_REDUCTION or K/G < DIRECT_MAX_KG, else
``im2col``. On the CPU the direct path runs on register tiles and was measured faster than
im2col for every forward convolution tried (the MNIST-scale layers, 64 -> 128 channels, stride 2)
and for every backward pass at stride 1. At stride 2 its backward-data runs on the scatter tiles
over phase planes: resnet8's 3x3 stride-2 layers' whole backward (grad_x + grad_w) ran 8.3 / 7.2
ms direct vs 9.7 / 7.8 ms im2col on one thread, its 1x1 stride-2 projection 3.6 vs 2.7 ms; too
close to call without measuring, so the heuristic keeps the general rule there and autotune
(on by default) measures. So the CPU takes ``direct`` for ``conv2d`` and for the conv2d
backward ops at stride 1, and the general rule otherwise. Except pointwise convolutions (1x1,
stride 1, no padding: Inception's branches), where the general rule alone decides for every op:
their im2col path is one GEMM per image straight on x (no columns to build), 1.05-4.1x faster
than the register tiles per shape and pass (1.75-2.0x over all ten) on inception_mini's 1x1
shapes at batch 128, forward and backward (AVX-512 Zen 4, 2 threads).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _env, autotune

BACKENDS = ("auto", "reference", "cpu", "cuda")
ALGORITHMS = ("auto", "im2col", "direct")
# A backward pass's tuned choice may also be a pair: grad_x by the first, grad_w by the second.
PAIRS = ("im2col+direct", "direct+im2col")
CONV_OPS = (
    "conv2d",
    "conv2d_backward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
)
DIRECT_MAX_REDUCTION = 8  # C/G*KH*KW below this: the GEMM is too thin to pay for im2col
DIRECT_MAX_KG = 4  # K/G below this: too few GEMM rows (depthwise and friends)

_override: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "fastconv_override", default=None
)


class Choice(NamedTuple):
    backend: str  # "reference" | "cpu" | "cuda"
    algorithm: str  # "im2col" | "direct" for conv ops (or one of PAIRS, tuned backward
    # passes); "direct" for pooling; "reference";
    # "auto" only when tuning is on and nothing is remembered: the caller measures the candidates


TILED_OPS = ("conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight")


def gemm_rule(geom: Any) -> str:
    """The general rule (module docstring): im2col unless the GEMM would be too thin."""
    if (
        geom.C // geom.G * geom.KH * geom.KW < DIRECT_MAX_REDUCTION
        or geom.K // geom.G < DIRECT_MAX_KG
    ):
        return "direct"
    return "im2col"


def cpu_conv_algorithm(geom: Any, op: str = "conv2d") -> str:
    """The documented CPU heuristic (module docstring)."""
    if (geom.KH, geom.KW, geom.sh, geom.sw, geom.ph, geom.pw) == (1, 1, 1, 1, 0, 0):
        return gemm_rule(geom)  # pointwise: im2col is a GEMM straight on x
    if op == "conv2d" or (op in TILED_OPS and (geom.sh, geom.sw) == (1, 1)):
        return "direct"
    return gemm_rule(geom)


def select(
    op: str,
    geom: Any,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
    on_device: bool = False,
    env_backend: str | None = None,
    context: dict | None = None,
    tuned: str | None = None,
    autotune: bool = False,
) -> Choice:
    """Choose (backend, algorithm) for one call. Pure: no I/O, no kernel, no CUDA.

    Args:
        op: the public op name ("conv2d", "max_pool2d", ...), used in error texts.
        geom: the ConvGeom/PoolGeom from ``fastconv.shapes``.
        backend, algorithm: what the caller asked for.
        on_device: whether the inputs are CUDA device arrays.
        env_backend: the value of ``FASTCONV_BACKEND`` (None or "" when unset).
        context: the active ``using(...)`` overrides.
        tuned: the algorithm remembered for this call's key by ``fastconv.autotune``, if any.
        autotune: whether measuring is allowed (``FASTCONV_AUTOTUNE`` is not "0").
    """
    context = context or {}
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{op}: algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
    if backend == "auto":
        if context.get("backend", "auto") != "auto":
            backend = context["backend"]
        elif env_backend:
            if env_backend not in BACKENDS:
                raise ValueError(
                    f"{op}: FASTCONV_BACKEND must be one of {BACKENDS}; got {env_backend!r}"
                )
            backend = env_backend
    if backend == "auto":
        backend = "cuda" if on_device else "cpu"
    if on_device and backend != "cuda":
        raise ValueError(
            f"{op}: backend={backend!r} needs host (NumPy) arrays but the inputs are CUDA device "
            f"arrays; use backend='cuda' or copy them to the host first (.copy_to_host())"
        )
    if backend == "reference":
        return Choice("reference", "reference")
    if op not in CONV_OPS:
        if algorithm not in ("auto", "direct"):
            raise ValueError(f"{op}: pooling has only the 'direct' algorithm; got {algorithm!r}")
        return Choice(backend, "direct")
    if algorithm == "auto":
        algorithm = context.get("algorithm", "auto")
    if algorithm != "auto":
        return Choice(backend, algorithm)
    if autotune and backend == "cpu":
        if tuned in ("im2col", "direct"):
            return Choice(backend, tuned)
        return Choice(backend, "auto")
    if backend == "cpu":
        return Choice(backend, cpu_conv_algorithm(geom, op))
    return Choice(backend, gemm_rule(geom))


@contextlib.contextmanager
def using(backend: str = "auto", algorithm: str = "auto"):
    """Override what "auto" means inside a ``with`` block (thread- and task-local)."""
    if backend not in BACKENDS:
        raise ValueError(f"using: backend must be one of {BACKENDS}; got {backend!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"using: algorithm must be one of {ALGORITHMS}; got {algorithm!r}")
    token = _override.set({"backend": backend, "algorithm": algorithm})
    try:
        yield
    finally:
        _override.reset(token)


def choose(
    op: str,
    geom: Any,
    backend: str,
    algorithm: str,
    on_device: bool,
    dtype: Any = None,
    candidates: Callable[[str], Callable[[], Any]] | None = None,
    variant: str = "",
    pairs: bool = False,
) -> Choice:
    """``select`` with the live environment, context and autotune cache filled in.

    For CPU convolutions with ``algorithm="auto"`` and nothing remembered, ``candidates(algo)``
    gives a zero-argument call running that algorithm on this call's inputs; they are timed once
    and the winner is remembered (``fastconv.autotune``) under the op, ``variant`` (e.g. which
    gradients are asked for), geometry, dtype and thread count. With ``pairs`` (a backward
    pass asked for grad_x and grad_w) the candidates include ``PAIRS``: grad_x by one
    algorithm, grad_w and grad_b by the other (``kernels/cpu/ops.py``).
    """
    tune = candidates is not None and op in CONV_OPS and autotune.enabled()
    k = autotune.key(op + variant, geom, dtype) if tune else None
    c = select(
        op,
        geom,
        backend=backend,
        algorithm=algorithm,
        on_device=on_device,
        env_backend=_env.get("FASTCONV_BACKEND") or None,
        context=_override.get() or {},
        tuned=autotune.lookup(k) if tune else None,
        autotune=tune,
    )
    if c.algorithm == "auto":
        cands = {a: candidates(a) for a in ("im2col", "direct") + (PAIRS if pairs else ())}
        best = autotune.choose(k, cands, default=cpu_conv_algorithm(geom, op))
        return Choice(c.backend, best)
    return c


# --------------------------------------------------------------------------- backend modules

_cuda_ops = None


def cuda_status() -> tuple[bool, str]:
    """(usable, reason). Imports numba.cuda only when called; never called on the CPU path."""
    try:
        from numba import cuda
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"numba.cuda cannot be imported ({e}); install the 'cuda' extra"
    try:
        import importlib.util

        if importlib.util.find_spec("fastconv.kernels.cuda.ops") is None:
            return False, "this build of fastconv has no CUDA backend yet"
    except ModuleNotFoundError:
        return False, "this build of fastconv has no CUDA backend yet"
    try:
        if not cuda.is_available():
            return False, "no usable CUDA GPU was found (numba.cuda.is_available() is False)"
    except Exception as e:  # pragma: no cover
        return False, f"CUDA could not be initialised ({e})"
    return True, "ok"


_cpu_ops = None


def backend_ops(op: str, backend: str):
    """The module implementing ``backend``'s op signatures (CUDA imported lazily)."""
    global _cuda_ops, _cpu_ops
    if backend == "cpu":
        if _cpu_ops is None:
            from .kernels.cpu import ops

            _cpu_ops = ops
        return _cpu_ops
    if backend == "cuda":
        if _cuda_ops is None:
            ok, why = cuda_status()
            if not ok:
                raise RuntimeError(f"{op}: backend='cuda' is not available: {why}")
            from .kernels.cuda import ops

            _cuda_ops = ops
        return _cuda_ops
    raise AssertionError(f"no ops module for backend {backend!r}")  # select() never returns it
