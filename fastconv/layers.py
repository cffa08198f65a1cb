"""Layers: state (parameters, buffers, caches) around one call into ``fastconv.functional``.

Protocol (DESIGN.md section 2)::

    y = layer(x)                  # forward; caches what backward needs
    grad_x = layer.backward(grad_y)   # accumulates into each Parameter's .grad
    layer.parameters(), layer.zero_grad(), layer.train(), layer.eval(), layer.to("cpu" | "cuda")
    layer.state_dict(), layer.load_state_dict(d)    # PyTorch's keys

Parameters are initialised in ``reset_parameters()`` with PyTorch's default init, so a
fastconv model and the equal ``torch.nn`` model start from the same distribution, and a
state_dict moves between them unchanged (``torch_model.load_state_dict({k: torch.from_numpy(v)})``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from . import _device, shapes
from . import functional as F
from . import init as _init

Array = Any


class Parameter:
    """A trainable array and its accumulated gradient (None until the first backward)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: Array) -> None:
        self.data = data
        self.grad: Array | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.data.dtype)

    def __repr__(self) -> str:
        where = "cuda" if _device.is_device(self.data) else "cpu"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={where!r})"


def _to_numpy(v: Any) -> np.ndarray:
    """Arrays from a state_dict: NumPy arrays, device arrays or torch tensors."""
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu().numpy()
    return np.asarray(_device.to_host(v))


def _check_dtype(name: str, dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in shapes.FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype must be float32 or float64; got {dt}")
    return dt


def _positive_int(op: str, name: str, v: Any) -> int:
    if not shapes._is_int(v):
        raise TypeError(f"{op}: {name} must be an int; got {v!r}")
    if v < 1:
        raise ValueError(f"{op}: {name} must be positive; got {name}={v!r}")
    return int(v)


class Layer:
    """Base class: parameter/buffer bookkeeping, modes, devices and state dicts.

    Subclasses list their parameter and buffer attribute names in ``_params`` / ``_buffers``
    (PyTorch's state_dict order) and implement ``forward`` and ``backward``.
    """

    _params: tuple[str, ...] = ()
    _buffers: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.training = True
        self._cache: Any = None

    # ---- protocol
    def forward(self, x: Array) -> Array:
        raise NotImplementedError

    def backward(self, grad_y: Array) -> Array:
        raise NotImplementedError

    def backward_params(self, grad_y: Array) -> None:
        """Like ``backward`` when the input gradient is not wanted (the network's input is
        data): only the parameter gradients are accumulated. Layers that can skip the input
        gradient's work (Conv2d, Linear, Sequential) override this."""
        self.backward(grad_y)

    def __call__(self, x: Array) -> Array:
        return self.forward(x)

    def reset_parameters(self, rng: _init.RngLike = None) -> None:
        """Re-draw the parameters with the layer's default initialisation."""

    def children(self) -> list[tuple[str, Layer]]:
        return []

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        for name in self._params:
            p = getattr(self, name)
            if p is not None:
                yield prefix + name, p
        for cname, child in self.children():
            yield from child.named_parameters(f"{prefix}{cname}.")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for name in self._buffers:
            b = getattr(self, name)
            if b is not None:
                yield prefix + name, b
        for cname, child in self.children():
            yield from child.named_buffers(f"{prefix}{cname}.")

    def named_generators(self, prefix: str = "") -> Iterator[tuple[str, np.random.Generator]]:
        """Random generators the layer draws from while training (Dropout), for checkpoints."""
        rng = getattr(self, "rng", None)
        if isinstance(rng, np.random.Generator):
            yield prefix + "rng", rng
        for cname, child in self.children():
            yield from child.named_generators(f"{prefix}{cname}.")

    def zero_grad(self) -> None:
        """Drop accumulated gradients (set to None, as PyTorch's default set_to_none=True)."""
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Layer:
        self.training = bool(mode)
        for _, child in self.children():
            child.train(mode)
        return self

    def eval(self) -> Layer:
        return self.train(False)

    # ---- placement and dtype
    def to(self, target: Any) -> Layer:
        """Move parameters and buffers: "cpu" | "cuda", or cast them: np.float32 | np.float64."""
        if isinstance(target, str):
            if target not in _device.DEVICES:
                raise ValueError(
                    f"{type(self).__name__}.to: device must be 'cpu' or 'cuda'; got {target!r}"
                )
            move = (
                (lambda a: _device.to_device(a, f"{type(self).__name__}.to"))
                if target == "cuda"
                else _device.to_host
            )
        else:
            dt = _check_dtype(f"{type(self).__name__}.to", target)

            def move(a):
                if _device.is_device(a):
                    return _device.to_device(_device.to_host(a).astype(dt))
                return a.astype(dt)

        self._apply(move)
        if not isinstance(target, str):
            for layer in self.modules():
                if hasattr(layer, "dtype"):
                    layer.dtype = dt
        return self

    def modules(self) -> Iterator[Layer]:
        """This layer and every layer inside it, depth first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    def _apply(self, fn) -> None:
        for name in self._params:
            p = getattr(self, name)
            if p is not None:
                p.data = fn(p.data)
                p.grad = None if p.grad is None else fn(p.grad)
        for name in self._buffers:
            b = getattr(self, name)
            if b is not None:
                setattr(self, name, fn(b))
        self._cache = None
        for _, child in self.children():
            child._apply(fn)

    @property
    def device(self) -> str:
        for p in self.parameters():
            return "cuda" if _device.is_device(p.data) else "cpu"
        return "cpu"

    # ---- state dicts
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of parameters and buffers under PyTorch's key names."""
        out: dict[str, np.ndarray] = {}
        self._state_into(out, "")
        return out

    def _state_into(self, out: dict, prefix: str) -> None:
        for name in self._params:
            p = getattr(self, name)
            if p is not None:
                out[prefix + name] = np.array(_device.to_host(p.data))
        for name in self._buffers:
            b = getattr(self, name)
            if b is not None:
                out[prefix + name] = np.array(_device.to_host(b))
        for key, v in self._extra_state().items():
            out[prefix + key] = v
        for cname, child in self.children():
            child._state_into(out, f"{prefix}{cname}.")

    def _extra_state(self) -> dict[str, np.ndarray]:
        return {}

    def _load_extra_state(self, d: dict[str, np.ndarray]) -> None:
        pass

    def _slots(self, prefix: str = "") -> Iterator[tuple[str, Layer, str, str]]:
        """(key, owner, attribute, kind) for every entry of the state_dict."""
        for name in self._params:
            if getattr(self, name) is not None:
                yield prefix + name, self, name, "param"
        for name in self._buffers:
            if getattr(self, name) is not None:
                yield prefix + name, self, name, "buffer"
        for key in self._extra_state():
            yield prefix + key, self, key, "extra"
        for cname, child in self.children():
            yield from child._slots(f"{prefix}{cname}.")

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy values in (NumPy arrays or torch tensors), cast to each entry's dtype and placed
        on the layer's device. ``strict``: the key sets must match exactly."""
        who = f"{type(self).__name__}.load_state_dict"
        slots = list(self._slots())
        keys = {k for k, *_ in slots}
        missing = sorted(keys - set(state))
        unexpected = sorted(set(state) - keys)
        if strict and (missing or unexpected):
            raise KeyError(f"{who}: missing keys {missing}, unexpected keys {unexpected}")
        for key, owner, attr, kind in slots:
            if key not in state:
                continue
            value = _to_numpy(state[key])
            if kind == "extra":
                owner._load_extra_state({attr: value})
                continue
            cur = getattr(owner, attr).data if kind == "param" else getattr(owner, attr)
            if tuple(value.shape) != tuple(cur.shape):
                raise ValueError(
                    f"{who}: {key} has shape {tuple(value.shape)} in the state dict "
                    f"but {tuple(cur.shape)} in the model"
                )
            value = _device.like(cur, np.ascontiguousarray(value, dtype=np.dtype(cur.dtype)))
            if kind == "param":
                getattr(owner, attr).data = value
            else:
                setattr(owner, attr, value)

    # ---- helpers for subclasses
    def _saved(self) -> Any:
        if self._cache is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called before forward "
                f"(or after .to(), which drops the cache)"
            )
        return self._cache

    def _accumulate(self, p: Parameter | None, g: Array | None) -> None:
        if p is None or g is None:
            return
        p.grad = g if p.grad is None else _device.add(p.grad, g)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def _args_repr(pos: list[str], **kw: tuple[Any, Any]) -> str:
    """Positional args, then keyword args whose value differs from the default."""
    parts = list(pos)
    for k, (v, default) in kw.items():
        if v != default:
            parts.append(f"{k}={v!r}")
    return ", ".join(parts)


def _norm(v: Any) -> Any:
    """Collapse (a, a) to a for repr."""
    if isinstance(v, tuple) and len(v) == 2 and v[0] == v[1]:
        return v[0]
    return v


# --------------------------------------------------------------------------- convolution


class _ConvBase(Layer):
    _params = ("weight", "bias")

    def _setup(
        self, op, in_channels, out_channels, groups, bias, padding_mode, dtype, backend, algorithm
    ):
        self.in_channels = _positive_int(op, "in_channels", in_channels)
        self.out_channels = _positive_int(op, "out_channels", out_channels)
        self.groups = _positive_int(op, "groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{op}: groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        if padding_mode != "zeros":
            raise ValueError(f"{op}: only padding_mode='zeros' is supported; got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.dtype = _check_dtype(op, dtype)
        self.backend, self.algorithm = backend, algorithm
        self.has_bias = bool(bias)
        # The forward pass's im2col matrix, kept for the backward pass while training.
        self._cols: dict = {}
        self._fused: dict = {}  # conv2d's activation and pool of the last forward call, if pooled

    def _make(self, w_shape, bias_len, rng):
        self.weight = Parameter(np.empty(w_shape, self.dtype))
        self.bias = Parameter(np.empty(bias_len, self.dtype)) if self.has_bias else None
        self.reset_parameters(rng)

    def reset_parameters(self, rng: _init.RngLike = None) -> None:
        """PyTorch's default: weight and bias U(+-1/sqrt(fan_in))."""
        w = np.empty(self.weight.shape, self.dtype)
        b = None if self.bias is None else np.empty(self.bias.shape, self.dtype)
        _init.torch_default_(w, b, rng=rng)
        self.weight.data = _device.like(self.weight.data, w)
        if b is not None:
            self.bias.data = _device.like(self.bias.data, b)

    def _kw(self):
        return dict(backend=self.backend, algorithm=self.algorithm)


class Conv2d(_ConvBase):
    """2-D convolution layer (``torch.nn.Conv2d``), math in ``functional.conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding ('same' | 'valid' | int | pair),
        dilation, groups, bias, padding_mode (only 'zeros'): as in PyTorch.
        dtype: float32 (default) or float64. rng: seed or Generator for the initial weights.
        backend, algorithm: passed to ``functional.conv2d``.

    Shape:
        x (N, in_channels, H, W) -> y (N, out_channels, OH, OW); weight
        (out_channels, in_channels/groups, KH, KW), bias (out_channels,).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        dtype: Any = np.float32,
        rng: _init.RngLike = None,
        backend: str = "auto",
        algorithm: str = "auto",
    ):
        super().__init__()
        op = "Conv2d"
        self._setup(
            op, in_channels, out_channels, groups, bias, padding_mode, dtype, backend, algorithm
        )
        self.kernel_size = shapes.pair(op, "kernel_size", kernel_size, minimum=1)
        self.stride = shapes.pair(op, "stride", stride, minimum=1)
        self.dilation = shapes.pair(op, "dilation", dilation, minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"{op}: padding must be an int, a pair, 'same' or 'valid'; got {padding!r}"
                )
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{op}: padding='same' needs stride 1; got stride={stride!r}")
            self.padding = padding
        else:
            self.padding = shapes.pair(op, "padding", padding, minimum=0)
        w_shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._make(w_shape, self.out_channels, rng)

    def _conv(self):
        return (self.stride, self.padding, self.dilation, self.groups)

    def forward(
        self,
        x: Array,
        *,
        activation: str | None = None,
        pool: int | tuple[int, int] | None = None,
    ) -> Array:
        """``activation="relu"``: relu of the output, fused into the convolution's last pass
        (``Sequential`` asks for it when a ReLU layer follows; the ReLU's backward does the
        rest, from the output). ``pool=k``: then k x k max pooling (stride k) in the same pass
        (``Sequential``: Conv2d, ReLU, MaxPool2d(k)); this layer's backward then takes the
        gradient of the pooled output."""
        b = None if self.bias is None else self.bias.data
        saved = self._cols if self.training or pool is not None else None
        y = F.conv2d(
            x,
            self.weight.data,
            b,
            *self._conv(),
            **self._kw(),
            saved=saved,
            activation=activation,
            pool=pool,
        )
        self._cache = x
        self._fused = {} if pool is None else {"activation": activation, "pool": pool}
        return y

    def backward(self, grad_y: Array, *, input_grad: bool = True) -> Array | None:
        x = self._saved()
        gx, gw, gb = F.conv2d_backward(
            grad_y,
            x,
            self.weight.data,
            *self._conv(),
            **self._kw(),
            output_mask=(input_grad, True, self.bias is not None),
            saved=self._cols,
            **self._fused,
        )
        self._accumulate(self.weight, gw)
        self._accumulate(self.bias, gb)
        return gx

    def backward_params(self, grad_y: Array) -> None:
        self.backward(grad_y, input_grad=False)

    def extra_repr(self) -> str:
        return _args_repr(
            [
                str(self.in_channels),
                str(self.out_channels),
                f"kernel_size={_norm(self.kernel_size)}",
            ],
            stride=(_norm(self.stride), 1),
            padding=(_norm(self.padding), 0),
            dilation=(_norm(self.dilation), 1),
            groups=(self.groups, 1),
            bias=(self.bias is not None, True),
            dtype=(self.dtype.name, "float32"),
        )


class ConvTranspose2d(_ConvBase):
    """Transposed 2-D convolution (``torch.nn.ConvTranspose2d``): the backward-data pass of a
    convolution, math in ``functional.conv_transpose2d``.

    Shape:
        x (N, in_channels, H, W) -> y (N, out_channels, OH, OW),
        OH = (H-1)*sh - 2*ph + dh*(KH-1) + output_padding_h + 1; weight
        (in_channels, out_channels/groups, KH, KW), bias (out_channels,).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        output_padding: int | tuple[int, int] = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: int | tuple[int, int] = 1,
        padding_mode: str = "zeros",
        *,
        dtype: Any = np.float32,
        rng: _init.RngLike = None,
        backend: str = "auto",
        algorithm: str = "auto",
    ):
        super().__init__()
        op = "ConvTranspose2d"
        self._setup(
            op, in_channels, out_channels, groups, bias, padding_mode, dtype, backend, algorithm
        )
        self.kernel_size = shapes.pair(op, "kernel_size", kernel_size, minimum=1)
        self.stride = shapes.pair(op, "stride", stride, minimum=1)
        self.padding = shapes.pair(op, "padding", padding, minimum=0)
        self.output_padding = shapes.pair(op, "output_padding", output_padding, minimum=0)
        self.dilation = shapes.pair(op, "dilation", dilation, minimum=1)
        if self.output_padding[0] >= max(self.stride[0], self.dilation[0]) or self.output_padding[
            1
        ] >= max(self.stride[1], self.dilation[1]):
            raise ValueError(
                f"{op}: output_padding must be smaller than stride or dilation; "
                f"got output_padding={output_padding!r}, stride={stride!r}"
            )
        w_shape = (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        self._make(w_shape, self.out_channels, rng)

    def _conv(self):
        return (self.stride, self.padding, self.output_padding, self.groups, self.dilation)

    def forward(self, x: Array) -> Array:
        b = None if self.bias is None else self.bias.data
        y = F.conv_transpose2d(x, self.weight.data, b, *self._conv(), **self._kw())
        self._cache = x
        return y

    def backward(self, grad_y: Array) -> Array:
        x = self._saved()
        gx, gw, gb = F.conv_transpose2d_backward(
            grad_y, x, self.weight.data, *self._conv(), **self._kw()
        )
        self._accumulate(self.weight, gw)
        if self.bias is not None:
            self._accumulate(self.bias, gb)
        return gx

    def extra_repr(self) -> str:
        return _args_repr(
            [
                str(self.in_channels),
                str(self.out_channels),
                f"kernel_size={_norm(self.kernel_size)}",
            ],
            stride=(_norm(self.stride), 1),
            padding=(_norm(self.padding), 0),
            output_padding=(_norm(self.output_padding), 0),
            groups=(self.groups, 1),
            bias=(self.bias is not None, True),
            dilation=(_norm(self.dilation), 1),
            dtype=(self.dtype.name, "float32"),
        )


def _single(op: str, name: str, v: Any, minimum: int) -> int:
    return shapes.single(op, name, v, minimum=minimum)


class Conv1d(_ConvBase):
    """1-D convolution layer (``torch.nn.Conv1d``), math in ``functional.conv1d`` (conv2d, H=1).

    Shape:
        x (N, in_channels, L) -> y (N, out_channels, OL); weight
        (out_channels, in_channels/groups, KL), bias (out_channels,).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int | str = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        dtype: Any = np.float32,
        rng: _init.RngLike = None,
        backend: str = "auto",
        algorithm: str = "auto",
    ):
        super().__init__()
        op = "Conv1d"
        self._setup(
            op, in_channels, out_channels, groups, bias, padding_mode, dtype, backend, algorithm
        )
        self.kernel_size = _single(op, "kernel_size", kernel_size, 1)
        self.stride = _single(op, "stride", stride, 1)
        self.dilation = _single(op, "dilation", dilation, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"{op}: padding must be an int, 'same' or 'valid'; got {padding!r}"
                )
            if padding == "same" and self.stride != 1:
                raise ValueError(f"{op}: padding='same' needs stride 1; got stride={stride!r}")
            self.padding = padding
        else:
            self.padding = _single(op, "padding", padding, 0)
        w_shape = (self.out_channels, self.in_channels // self.groups, self.kernel_size)
        self._make(w_shape, self.out_channels, rng)

    def _conv(self):
        return (self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Array) -> Array:
        b = None if self.bias is None else self.bias.data
        y = F.conv1d(x, self.weight.data, b, *self._conv(), **self._kw())
        self._cache = x
        return y

    def backward(self, grad_y: Array) -> Array:
        x = self._saved()
        gx, gw, gb = F.conv1d_backward(
            grad_y,
            x,
            self.weight.data,
            *self._conv(),
            **self._kw(),
            output_mask=(True, True, self.bias is not None),
        )
        self._accumulate(self.weight, gw)
        self._accumulate(self.bias, gb)
        return gx

    def extra_repr(self) -> str:
        return _args_repr(
            [str(self.in_channels), str(self.out_channels), f"kernel_size={self.kernel_size}"],
            stride=(self.stride, 1),
            padding=(self.padding, 0),
            dilation=(self.dilation, 1),
            groups=(self.groups, 1),
            bias=(self.bias is not None, True),
            dtype=(self.dtype.name, "float32"),
        )


# --------------------------------------------------------------------------- pooling


class _Pool(Layer):
    def __init__(self, op, kernel_size, stride, padding, ceil_mode, backend):
        super().__init__()
        self.kernel_size = shapes.pair(op, "kernel_size", kernel_size, minimum=1)
        self.stride = (
            self.kernel_size if stride is None else shapes.pair(op, "stride", stride, minimum=1)
        )
        self.padding = shapes.pair(op, "padding", padding, minimum=0)
        if 2 * self.padding[0] > self.kernel_size[0] or 2 * self.padding[1] > self.kernel_size[1]:
            raise ValueError(
                f"{op}: padding must be at most half the kernel size; got "
                f"padding={padding!r}, kernel_size={kernel_size!r}"
            )
        self.ceil_mode = bool(ceil_mode)
        self.backend = backend
        self._argmax: dict = {}  # max pooling: each window's argmax, forward to backward

    def _base_repr(self, **extra) -> str:
        return _args_repr(
            [f"kernel_size={_norm(self.kernel_size)}"],
            stride=(_norm(self.stride), _norm(self.kernel_size)),
            padding=(_norm(self.padding), 0),
            ceil_mode=(self.ceil_mode, False),
            **extra,
        )


class MaxPool2d(_Pool):
    """2-D max pooling (``torch.nn.MaxPool2d``); stride defaults to kernel_size.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), OH = floor((H + 2*ph - KH) / sh) + 1.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        ceil_mode: bool = False,
        *,
        backend: str = "auto",
    ):
        super().__init__("MaxPool2d", kernel_size, stride, padding, ceil_mode, backend)

    def forward(self, x: Array) -> Array:
        y = F.max_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            backend=self.backend,
            saved=self._argmax if self.training else None,
        )
        self._cache = x
        return y

    def backward(self, grad_y: Array) -> Array:
        return F.max_pool2d_backward(
            grad_y,
            self._saved(),
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            backend=self.backend,
            saved=self._argmax,
        )

    def extra_repr(self) -> str:
        return self._base_repr()


class AvgPool2d(_Pool):
    """2-D average pooling (``torch.nn.AvgPool2d``); the divisor follows count_include_pad.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), as MaxPool2d.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        ceil_mode: bool = False,
        count_include_pad: bool = True,
        *,
        backend: str = "auto",
    ):
        super().__init__("AvgPool2d", kernel_size, stride, padding, ceil_mode, backend)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x: Array) -> Array:
        y = F.avg_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            backend=self.backend,
        )
        self._cache = x
        return y

    def backward(self, grad_y: Array) -> Array:
        return F.avg_pool2d_backward(
            grad_y,
            self._saved(),
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return self._base_repr(count_include_pad=(self.count_include_pad, True))


# --------------------------------------------------------------------------- activations


class ReLU(Layer):
    """max(x, 0). Shape: any -> same.

    Keeps its output, not its input, for backward: y > 0 exactly where x > 0, and a Conv2d
    before it in a Sequential can then hand over relu(conv) computed in one fused pass.
    """

    def forward(self, x: Array) -> Array:
        y = F.relu(x)
        self._cache = y
        return y

    def backward(self, grad_y: Array) -> Array:
        return F.relu_backward(grad_y, self._saved())


class LeakyReLU(Layer):
    """x for x > 0, else negative_slope * x. Shape: any -> same."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = shapes.check_number("LeakyReLU", "negative_slope", negative_slope)

    def forward(self, x: Array) -> Array:
        self._cache = x
        return F.leaky_relu(x, self.negative_slope)

    def backward(self, grad_y: Array) -> Array:
        return F.leaky_relu_backward(grad_y, self._saved(), self.negative_slope)

    def extra_repr(self) -> str:
        return _args_repr([], negative_slope=(self.negative_slope, 0.01))


class Sigmoid(Layer):
    """1 / (1 + exp(-x)); backward uses the cached output. Shape: any -> same."""

    def forward(self, x: Array) -> Array:
        y = F.sigmoid(x)
        self._cache = y
        return y

    def backward(self, grad_y: Array) -> Array:
        return F.sigmoid_backward(grad_y, self._saved())


class Tanh(Layer):
    """tanh(x); backward uses the cached output. Shape: any -> same."""

    def forward(self, x: Array) -> Array:
        y = F.tanh(x)
        self._cache = y
        return y

    def backward(self, grad_y: Array) -> Array:
        return F.tanh_backward(grad_y, self._saved())


# --------------------------------------------------------------------------- dense layers


class Linear(Layer):
    """Fully connected layer y = x @ weight.T + bias (``torch.nn.Linear``).

    Shape:
        x (N, in_features) -> y (N, out_features); weight (out_features, in_features),
        bias (out_features,).
    """

    _params = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Any = np.float32,
        rng: _init.RngLike = None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("Linear", "in_features", in_features)
        self.out_features = _positive_int("Linear", "out_features", out_features)
        self.dtype = _check_dtype("Linear", dtype)
        self.weight = Parameter(np.empty((self.out_features, self.in_features), self.dtype))
        self.bias = Parameter(np.empty(self.out_features, self.dtype)) if bias else None
        self.reset_parameters(rng)

    def reset_parameters(self, rng: _init.RngLike = None) -> None:
        """PyTorch's default: weight and bias U(+-1/sqrt(in_features))."""
        w = np.empty(self.weight.shape, self.dtype)
        b = None if self.bias is None else np.empty(self.bias.shape, self.dtype)
        _init.torch_default_(w, b, rng=rng)
        self.weight.data = _device.like(self.weight.data, w)
        if b is not None:
            self.bias.data = _device.like(self.bias.data, b)

    def forward(self, x: Array, *, activation: str | None = None) -> Array:
        """y = x @ weight.T + bias; ``activation="relu"``: relu(y) in the same pass (what
        ``Sequential`` asks for when a ReLU follows)."""
        b = None if self.bias is None else self.bias.data
        y = F.linear(x, self.weight.data, b, activation=activation)
        self._cache = x
        return y

    def backward(self, grad_y: Array, *, input_grad: bool = True) -> Array | None:
        gx, gw, gb = F.linear_backward(
            grad_y,
            self._saved(),
            self.weight.data,
            output_mask=(input_grad, True, self.bias is not None),
        )
        self._accumulate(self.weight, gw)
        self._accumulate(self.bias, gb)
        return gx

    def backward_params(self, grad_y: Array) -> None:
        self.backward(grad_y, input_grad=False)

    def extra_repr(self) -> str:
        return _args_repr(
            [str(self.in_features), str(self.out_features)],
            bias=(self.bias is not None, True),
            dtype=(self.dtype.name, "float32"),
        )


class Flatten(Layer):
    """Merge every dimension after the batch one. Shape: (N, d1, d2, ...) -> (N, d1*d2*...)."""

    def forward(self, x: Array) -> Array:
        self._cache = tuple(x.shape)
        return F.flatten(x)

    def backward(self, grad_y: Array) -> Array:
        return grad_y.reshape(self._saved())


class Dropout(Layer):
    """Inverted dropout (``torch.nn.Dropout``): in training each value is zeroed with
    probability p and the rest scaled by 1/(1-p); in evaluation it is the identity.

    The mask comes from the layer's own generator (``rng``: seed or Generator), which
    checkpoints save so a resumed run draws the same masks.

    Shape: any -> same.
    """

    def __init__(self, p: float = 0.5, *, rng: _init.RngLike = None) -> None:
        super().__init__()
        self.p = shapes.check_number("Dropout", "p", p, lo=0.0, hi=1.0)
        self.rng = _init.spawn(rng) if not isinstance(rng, np.random.Generator) else rng

    def forward(self, x: Array) -> Array:
        if not self.training or self.p == 0.0:
            self._cache = "identity"
            return x
        keep = self.rng.random(tuple(x.shape), dtype=np.float32) >= np.float32(self.p)
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        keep = _device.like(x, keep)
        self._cache = (keep, scale)
        return F.dropout(x, keep, scale)

    def backward(self, grad_y: Array) -> Array:
        saved = self._saved()
        if isinstance(saved, str):
            return grad_y
        keep, scale = saved
        return F.dropout(grad_y, keep, scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BatchNorm2d(Layer):
    """Batch normalisation over (N, H, W) per channel (``torch.nn.BatchNorm2d``).

    Training normalises with batch statistics and updates the running ones (momentum rule of
    PyTorch, unbiased variance); evaluation uses the running statistics.

    Shape: x (N, num_features, H, W) -> same; weight, bias, running_mean, running_var (C,).
    """

    _params = ("weight", "bias")
    _buffers = ("running_mean", "running_var")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        dtype: Any = np.float32,
    ) -> None:
        super().__init__()
        op = "BatchNorm2d"
        self.num_features = _positive_int(op, "num_features", num_features)
        self.eps = shapes.check_number(op, "eps", eps, lo=0.0, lo_open=True)
        self.momentum = shapes.check_number(op, "momentum", momentum, lo=0.0, hi=1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _check_dtype(op, dtype)
        C = self.num_features
        self.weight = Parameter(np.ones(C, self.dtype)) if affine else None
        self.bias = Parameter(np.zeros(C, self.dtype)) if affine else None
        self.running_mean = np.zeros(C, self.dtype) if track_running_stats else None
        self.running_var = np.ones(C, self.dtype) if track_running_stats else None
        self.num_batches_tracked = 0
        self.reset_parameters()

    def reset_parameters(self, rng: _init.RngLike = None) -> None:
        """weight 1, bias 0, running mean 0, running variance 1 (PyTorch's init)."""
        C = self.num_features
        if self.affine:
            self.weight.data = _device.like(self.weight.data, np.ones(C, self.dtype))
            self.bias.data = _device.like(self.bias.data, np.zeros(C, self.dtype))
        if self.track_running_stats:
            self.running_mean = _device.like(self.running_mean, np.zeros(C, self.dtype))
            self.running_var = _device.like(self.running_var, np.ones(C, self.dtype))
            self.num_batches_tracked = 0

    def _extra_state(self) -> dict[str, np.ndarray]:
        if not self.track_running_stats:
            return {}
        return {"num_batches_tracked": np.array(self.num_batches_tracked, dtype=np.int64)}

    def _load_extra_state(self, d: dict[str, np.ndarray]) -> None:
        self.num_batches_tracked = int(d["num_batches_tracked"])

    def forward(self, x: Array) -> Array:
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1
        w = None if self.weight is None else self.weight.data
        b = None if self.bias is None else self.bias.data
        rm, rv = self.running_mean, self.running_var
        y, mean, invstd = F.batch_norm2d(
            x,
            rm if self.track_running_stats else None,
            rv if self.track_running_stats else None,
            w,
            b,
            training=use_batch,
            momentum=self.momentum,
            eps=self.eps,
        )
        self._cache = (x, mean, invstd, use_batch)
        return y

    def backward(self, grad_y: Array) -> Array:
        x, mean, invstd, use_batch = self._saved()
        w = None if self.weight is None else self.weight.data
        gx, gw, gb = F.batch_norm2d_backward(
            grad_y, x, w, mean, invstd, use_batch, output_mask=(True, self.affine, self.affine)
        )
        self._accumulate(self.weight, gw)
        self._accumulate(self.bias, gb)
        return gx

    def extra_repr(self) -> str:
        return _args_repr(
            [str(self.num_features)],
            eps=(self.eps, 1e-5),
            momentum=(self.momentum, 0.1),
            affine=(self.affine, True),
            track_running_stats=(self.track_running_stats, True),
            dtype=(self.dtype.name, "float32"),
        )


# --------------------------------------------------------------------------- containers


def _fusable_pool(conv: Conv2d, layer: Layer | None) -> tuple[int, int] | None:
    """The window of a MaxPool2d that conv2d's ``pool`` argument can stand in for (stride =
    window, no padding, floor mode, same backend), else None."""
    if type(layer) is not MaxPool2d or layer.stride != layer.kernel_size:
        return None
    if layer.padding != (0, 0) or layer.ceil_mode or layer.backend not in ("auto", conv.backend):
        return None
    return layer.kernel_size


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse.

    Supports ``len``, indexing (a slice gives a Sequential sharing the layers) and iteration.
    State-dict keys are "<index>.<name>", as ``torch.nn.Sequential``'s.
    """

    def __init__(self, *layers: Layer) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential: item {i} is not a fastconv Layer; got {type(layer).__name__}"
                )
        self.layers = list(layers)
        self._fused_runs: list[tuple[int, int]] = []  # (first, last) layer of each fused run

    def children(self) -> list[tuple[str, Layer]]:
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __getitem__(self, i: int | slice) -> Layer:
        if isinstance(i, slice):
            out = Sequential(*self.layers[i])
            out.training = self.training
            return out
        return self.layers[i]

    def append(self, layer: Layer) -> Sequential:
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.append: not a fastconv Layer; got {type(layer).__name__}")
        self.layers.append(layer)
        return self

    def forward(self, x: Array) -> Array:
        """Each layer in turn, except for fused runs (same results, fewer passes over memory):
        - Conv2d, ReLU, MaxPool2d(k) (stride k, no padding, floor mode) run as one conv + bias
          + ReLU + max-pool: the full-size output is never written, and the backward pass
          goes from the pooled gradient straight to the convolution's;
        - Conv2d, ReLU run as one conv + bias + ReLU, and Linear, ReLU as one GEMM + bias +
          ReLU (the ReLU layer keeps the output for its backward)."""
        layers = self.layers
        self._fused_runs = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            if type(layer) is Conv2d and i + 1 < len(layers) and type(layers[i + 1]) is ReLU:
                pool = _fusable_pool(layer, layers[i + 2] if i + 2 < len(layers) else None)
                if pool is not None:
                    x = layer.forward(x, activation="relu", pool=pool)
                    layers[i + 1]._cache = layers[i + 2]._cache = None  # their work is done
                    self._fused_runs.append((i, i + 2))
                    i += 3
                    continue
                x = layer.forward(x, activation="relu")
                layers[i + 1]._cache = x
                i += 2
                continue
            if type(layer) is Linear and i + 1 < len(layers) and type(layers[i + 1]) is ReLU:
                x = layer.forward(x, activation="relu")  # bias and ReLU in the GEMM's epilogue
                layers[i + 1]._cache = x
                i += 2
                continue
            x = layer(x)
            i += 1
        return x

    def backward(self, grad_y: Array, *, input_grad: bool = True) -> Array | None:
        """Backward through every layer (a fused run: through its Conv2d, which takes the
        run's output gradient); ``input_grad=False`` skips the first layer's input gradient
        (training on data needs none) and returns None."""
        skip = {j for a, b in self._fused_runs for j in range(a + 1, b + 1)}
        for i in range(len(self.layers) - 1, -1, -1):
            if i in skip:
                continue
            if i == 0 and not input_grad:
                self.layers[0].backward_params(grad_y)
                return None
            grad_y = self.layers[i].backward(grad_y)
        return grad_y if input_grad or not self.layers else None

    def backward_params(self, grad_y: Array) -> None:
        self.backward(grad_y, input_grad=False)

    def __repr__(self) -> str:
        if not self.layers:
            return "Sequential()"
        body = "\n".join(f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{body}\n)"


__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "Layer",
    "Linear",
    "MaxPool2d",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
]
