"""Modules: state (parameters, buffers, sub-modules) around calls into ``fastconv.functional``.

PyTorch's habits: attributes that are Modules or Parameters register themselves; a subclass
writes ``forward`` only; ``model(x)`` records on the tape, ``loss.backward()`` fills every
``p.grad``::

    class Block(fc.Module):
        def __init__(self, c):
            super().__init__()
            self.conv, self.bn = fc.Conv2d(c, c, 3, padding=1, bias=False), fc.BatchNorm2d(c)

        def forward(self, x):
            return fc.relu(self.bn(self.conv(x)) + x)

State-dict keys are PyTorch's nested names (``block.conv1.weight``, buffers included), so a
state dict moves to and from the equal ``torch.nn`` module unchanged. Parameters start from
PyTorch's default initialisation (``reset_parameters``).

Fusion is planned in the open: ``Sequential`` maps runs of layer kinds to fused ops (table
``FUSIONS``) when it is built or changed, and calls the fused op with the first layer's own
parameters; no layer touches another's state. A user Module fuses by calling the fused op
(``fc.conv2d_relu_maxpool``, ``fc.conv2d_relu``, ``fc.linear_relu``, ``fc.batch_norm2d_relu``;
``bn_relu(bn, x)`` for a BatchNorm2d module) itself.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from . import _device, shapes
from . import functional as F
from . import init as _init
from .tensor import Tensor

Array = Any


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable (``requires_grad`` by default)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device!r})"


def _to_numpy(v: Any) -> np.ndarray:
    """Arrays from a state_dict: NumPy arrays, device arrays, Tensors or torch tensors."""
    if isinstance(v, Tensor):
        v = v.data
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


def _as_input(x: Any) -> Any:
    """``model(x)`` takes plain arrays: they become Tensors that need no gradient."""
    if type(x) is np.ndarray or (not isinstance(x, Tensor) and shapes.is_device_array(x)):
        return Tensor._make(x, None)
    return x


class Module:
    """Base class of every layer and model: registration, modes, devices, state dicts, hooks."""

    training: bool

    def __init__(self) -> None:
        d = self.__dict__
        d["_parameters"] = OrderedDict()
        d["_buffers"] = OrderedDict()
        d["_modules"] = OrderedDict()
        d["_forward_hooks"] = OrderedDict()
        d["training"] = True

    # ---- registration
    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if "_parameters" not in d:
            raise AttributeError(
                f"cannot assign {name!r} before Module.__init__() (call super().__init__() first)"
            )
        params, buffers, modules = d["_parameters"], d["_buffers"], d["_modules"]
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            d.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            d.pop(name, None)
            modules[name] = value
            self._changed()
        elif name in params:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}.{name} is a Parameter: assign a Parameter or None; "
                    f"got {type(value).__name__}"
                )
            params[name] = None
        elif name in buffers:
            buffers[name] = value
        elif name in modules:
            if value is not None:
                raise TypeError(
                    f"{type(self).__name__}.{name} is a Module: assign a Module or None; "
                    f"got {type(value).__name__}"
                )
            modules[name] = None
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        d = self.__dict__
        for kind in ("_parameters", "_buffers", "_modules"):
            store = d.get(kind)
            if store is not None and name in store:
                return store[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        for kind in ("_parameters", "_buffers", "_modules"):
            if name in self.__dict__[kind]:
                del self.__dict__[kind][name]
                return
        object.__delattr__(self, name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name} must be a Parameter or None")
        self.__dict__.pop(name, None)
        self._parameters[name] = param

    def register_buffer(self, name: str, array: Any) -> None:
        """A state array that is not trained (running statistics): in the state dict, moved
        by ``to()``."""
        self.__dict__.pop(name, None)
        self._buffers[name] = array

    def _changed(self) -> None:
        """Called after a sub-module is assigned (Sequential replans its fusions)."""

    def register_module(self, name: str, module: Module | None) -> None:
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"register_module: {name} must be a Module or None")
        self.__dict__.pop(name, None)
        self._modules[name] = module

    add_module = register_module

    # ---- the call
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1:  # the common case, without a generator
            args = (_as_input(args[0]),)
        else:
            args = tuple(_as_input(a) for a in args)
        out = self.forward(*args, **kwargs)
        if self._forward_hooks:
            for hook in list(self._forward_hooks.values()):
                res = hook(self, args, out)
                if res is not None:
                    out = res
        return out

    def register_forward_hook(self, hook: Callable) -> _HookHandle:
        """``hook(module, inputs, output)`` runs after every forward; a non-None result
        replaces the output. Returns a handle whose ``remove()`` unregisters it. While a
        module has hooks, ``Sequential`` does not fuse it with its neighbours."""
        key = object()
        self._forward_hooks[key] = hook
        return _HookHandle(self._forward_hooks, key)

    # ---- traversal
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module ("") and every module inside it, depth first, each once (the first
        time it is reached). An explicit stack: nested generators cost a frame per level for
        every module yielded (``eval()`` on every inference call took ~40 us for LeNet-5)."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            p, m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield p, m
            kids = [(f"{p}.{n}" if p else n, c) for n, c in m._modules.items() if c is not None]
            stack.extend(reversed(kids))

    def modules(self) -> Iterator[Module]:
        seen: set[int] = set()
        stack = [self]
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield m
            stack.extend(reversed([c for c in m._modules.values() if c is not None]))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen: set[int] = set()
        for mname, m in self.named_modules(prefix):
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mname}.{name}" if mname else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for mname, m in self.named_modules(prefix):
            for name, b in m._buffers.items():
                if b is not None:
                    yield (f"{mname}.{name}" if mname else name), b

    def buffers(self) -> list[Array]:
        return [b for _, b in self.named_buffers()]

    def named_generators(self, prefix: str = "") -> Iterator[tuple[str, np.random.Generator]]:
        """Random generators the modules draw from while training (Dropout), for checkpoints."""
        for mname, m in self.named_modules(prefix):
            rng = m.__dict__.get("rng")
            if isinstance(rng, np.random.Generator):
                yield (f"{mname}.rng" if mname else "rng"), rng

    def apply(self, fn: Callable[[Module], Any]) -> Module:
        """``fn`` on every sub-module (children first), then on this one (as PyTorch)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ---- modes and gradients
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.__dict__["training"] = bool(mode)
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop accumulated gradients (None, PyTorch's default; or zeros)."""
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad = _device.zeros_like(p.grad)

    def requires_grad_(self, requires_grad: bool = True) -> Module:
        """Freeze (False) or unfreeze every parameter: frozen ones get no gradient, and the
        kernels skip their gradient's work."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    # ---- placement and dtype
    def to(self, target: Any) -> Module:
        """Move parameters and buffers to "cpu" | "cuda", or cast them to float32 | float64."""
        who = f"{type(self).__name__}.to"
        if isinstance(target, str):
            if target not in _device.DEVICES:
                raise ValueError(f"{who}: device must be 'cpu' or 'cuda'; got {target!r}")
            cast = False

            def move(a):
                if np.dtype(a.dtype).kind != "f":  # counters stay on the host
                    return a
                return _device.to_device(a, who) if target == "cuda" else _device.to_host(a)

        else:
            dt = _check_dtype(who, target)
            cast = True

            def move(a):
                if np.dtype(a.dtype).kind != "f":  # integer buffers keep their dtype
                    return a
                if _device.is_device(a):
                    return _device.to_device(_device.to_host(a).astype(dt))
                return a.astype(dt)

        for m in self.modules():
            for p in m._parameters.values():
                if p is not None:
                    p.data = move(p.data)
                    p.grad = None if p.grad is None else move(p.grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = move(b)
            if cast and "dtype" in m.__dict__:
                m.__dict__["dtype"] = dt
        return self

    def cpu(self) -> Module:
        return self.to("cpu")

    def cuda(self) -> Module:
        return self.to("cuda")

    @property
    def device(self) -> str:
        for p in self.parameters():
            return p.device
        return "cpu"

    # ---- state dicts
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of parameters and buffers under PyTorch's key names."""
        out: dict[str, np.ndarray] = {}
        for key, owner, name, kind in self._slots():
            v = owner._parameters[name].data if kind == "param" else owner._buffers[name]
            out[key] = np.array(_device.to_host(v))
        return out

    def _slots(self) -> Iterator[tuple[str, Module, str, str]]:
        """(key, owner, attribute, kind) for every entry of the state_dict, PyTorch's order."""
        for mname, m in self.named_modules():
            pre = f"{mname}." if mname else ""
            for name, p in m._parameters.items():
                if p is not None:
                    yield pre + name, m, name, "param"
            for name, b in m._buffers.items():
                if b is not None:
                    yield pre + name, m, name, "buffer"

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Copy values in (NumPy arrays, Tensors or torch tensors), cast to each entry's dtype
        and placed on the module's device. ``strict``: the key sets must match exactly."""
        who = f"{type(self).__name__}.load_state_dict"
        slots = list(self._slots())
        keys = {k for k, *_ in slots}
        missing = sorted(keys - set(state))
        unexpected = sorted(set(state) - keys)
        if strict and (missing or unexpected):
            raise KeyError(f"{who}: missing keys {missing}, unexpected keys {unexpected}")
        staged = []
        for key, owner, name, kind in slots:  # check everything before changing anything
            if key not in state:
                continue
            value = _to_numpy(state[key])
            cur = owner._parameters[name].data if kind == "param" else owner._buffers[name]
            if tuple(value.shape) != tuple(cur.shape):
                raise ValueError(
                    f"{who}: {key} has shape {tuple(value.shape)} in the state dict "
                    f"but {tuple(cur.shape)} in the model"
                )
            # reshape: ascontiguousarray makes a 0-d array (num_batches_tracked) 1-d
            value = np.ascontiguousarray(value, dtype=np.dtype(cur.dtype)).reshape(value.shape)
            staged.append((owner, name, kind, _device.like(cur, value)))
        for owner, name, kind, value in staged:
            if kind == "param":
                owner._parameters[name].data = value
            else:
                owner._buffers[name] = value

    # ---- printing
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"({name}): " + _indent(repr(m)) for name, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not lines:
            return head + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _indent(s: str) -> str:
    return s.replace("\n", "\n  ")


class _HookHandle:
    def __init__(self, hooks: dict, key: object) -> None:
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


# the old name of the base class
Layer = Module


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


class _ConvBase(Module):
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

    def forward(self, x: Any) -> Any:
        return F.conv2d(x, self.weight, self.bias, *self._conv(), **self._kw())

    def forward_fused(self, x: Any, pool: tuple[int, int] | None = None) -> Any:
        """relu(self(x)), max-pooled with window ``pool`` (stride = window) when given, as one
        fused op on this layer's own parameters (what ``Sequential`` calls)."""
        if pool is None:
            return F.conv2d_relu(x, self.weight, self.bias, *self._conv(), **self._kw())
        return F.conv2d_relu_maxpool(
            x, self.weight, self.bias, *self._conv(), pool=pool, **self._kw()
        )

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
        op_h, op_w = self.output_padding
        if op_h >= max(self.stride[0], self.dilation[0]) or op_w >= max(
            self.stride[1], self.dilation[1]
        ):
            raise ValueError(
                f"{op}: output_padding must be smaller than stride or dilation; "
                f"got output_padding={output_padding!r}, stride={stride!r}"
            )
        w_shape = (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        self._make(w_shape, self.out_channels, rng)

    def forward(self, x: Any) -> Any:
        conv = (self.stride, self.padding, self.output_padding, self.groups, self.dilation)
        return F.conv_transpose2d(x, self.weight, self.bias, *conv, **self._kw())

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

    def forward(self, x: Any) -> Any:
        conv = (self.stride, self.padding, self.dilation, self.groups)
        return F.conv1d(x, self.weight, self.bias, *conv, **self._kw())

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


class _Pool(Module):
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

    def forward(self, x: Any) -> Any:
        return F.max_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            backend=self.backend,
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

    def forward(self, x: Any) -> Any:
        return F.avg_pool2d(
            x,
            self.kernel_size,
            self.stride,
            self.padding,
            ceil_mode=self.ceil_mode,
            count_include_pad=self.count_include_pad,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return self._base_repr(count_include_pad=(self.count_include_pad, True))


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size (``torch.nn.AdaptiveAvgPool2d``); (1, 1) is
    global average pooling.

    Shape: x (N, C, H, W) -> y (N, C, *output_size).
    """

    def __init__(self, output_size: Any, *, backend: str = "auto") -> None:
        super().__init__()
        self.output_size = output_size
        self.backend = backend

    def forward(self, x: Any) -> Any:
        return F.adaptive_avg_pool2d(x, self.output_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size!r}"


# --------------------------------------------------------------------------- activations


class ReLU(Module):
    """max(x, 0). Shape: any -> same."""

    def forward(self, x: Any) -> Any:
        return F.relu(x)


class LeakyReLU(Module):
    """x for x > 0, else negative_slope * x. Shape: any -> same."""

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = shapes.check_number("LeakyReLU", "negative_slope", negative_slope)

    def forward(self, x: Any) -> Any:
        return F.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return _args_repr([], negative_slope=(self.negative_slope, 0.01))


class ELU(Module):
    """x for x > 0, else alpha * (exp(x) - 1) (``torch.nn.ELU``). Shape: any -> same."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = shapes.check_number("ELU", "alpha", alpha)

    def forward(self, x: Any) -> Any:
        return F.elu(x, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Sigmoid(Module):
    """1 / (1 + exp(-x)). Shape: any -> same."""

    def forward(self, x: Any) -> Any:
        return F.sigmoid(x)


class Tanh(Module):
    """tanh(x). Shape: any -> same."""

    def forward(self, x: Any) -> Any:
        return F.tanh(x)


class Softmax(Module):
    """Softmax along ``dim`` (``torch.nn.Softmax``). Shape: any -> same."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Any) -> Any:
        return F.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """Log-softmax along ``dim`` (``torch.nn.LogSoftmax``). Shape: any -> same."""

    def forward(self, x: Any) -> Any:
        return F.log_softmax(x, self.dim)


class Identity(Module):
    """Returns its input (a placeholder, e.g. for a replaced head)."""

    def forward(self, x: Any) -> Any:
        return x


# --------------------------------------------------------------------------- dense layers


class Linear(Module):
    """Fully connected layer y = x @ weight.T + bias (``torch.nn.Linear``).

    Shape:
        x (N, in_features) -> y (N, out_features); weight (out_features, in_features),
        bias (out_features,).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: Any = np.float32,
        rng: _init.RngLike = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("Linear", "in_features", in_features)
        self.out_features = _positive_int("Linear", "out_features", out_features)
        self.dtype = _check_dtype("Linear", dtype)
        self.backend = backend
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

    def forward(self, x: Any) -> Any:
        return F.linear(x, self.weight, self.bias, backend=self.backend)

    def forward_fused(self, x: Any) -> Any:
        """relu(self(x)) as one op (bias and ReLU in the GEMM's epilogue)."""
        return F.linear_relu(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return _args_repr(
            [f"in_features={self.in_features}", f"out_features={self.out_features}"],
            bias=(self.bias is not None, True),
            dtype=(self.dtype.name, "float32"),
        )


class Flatten(Module):
    """Merge dimensions start_dim..end_dim (``torch.nn.Flatten``; default: all but the batch).

    Shape: (N, d1, d2, ...) -> (N, d1*d2*...).
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Any) -> Any:
        return F.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return _args_repr([], start_dim=(self.start_dim, 1), end_dim=(self.end_dim, -1))


def _keep_mask(rng: np.random.Generator, shape: tuple[int, ...], p: float) -> np.ndarray:
    """Bernoulli(1 - p) keep decisions: element i is kept when the i-th 32-bit word of
    ``rng``'s raw output is >= ceil(p * 2^32), so P(keep) = 1 - p to 2^-32. Two words from
    each 64-bit draw: half the generator's work of a float32 uniform per element (which also
    draws 32 bits, keeps 24 and converts), 1.4 vs 2.6 ms for mnist_cnn's (64, 9216) mask."""
    n = int(np.prod(shape, dtype=np.int64))
    t = math.ceil(p * 2.0**32)
    if t >= 2**32:  # p = 1 (or within 2^-32 of it): nothing is kept
        return np.zeros(shape, np.bool_)
    words = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    return (words >= np.uint32(t)).reshape(shape)


class Dropout(Module):
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

    def forward(self, x: Any) -> Any:
        if not self.training or self.p == 0.0:
            return x
        data = x.data if isinstance(x, Tensor) else x
        keep = _keep_mask(self.rng, tuple(data.shape), self.p)
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        return F.dropout(x, _device.like(data, keep), scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------- batch norm


class _BatchNorm(Module):
    _op = "BatchNorm"

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
        op = self._op
        self.num_features = _positive_int(op, "num_features", num_features)
        self.eps = shapes.check_number(op, "eps", eps, lo=0.0, lo_open=True)
        self.momentum = shapes.check_number(op, "momentum", momentum, lo=0.0, hi=1.0)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = _check_dtype(op, dtype)
        C = self.num_features
        self.weight = Parameter(np.ones(C, self.dtype)) if affine else None
        self.bias = Parameter(np.zeros(C, self.dtype)) if affine else None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, None)
        self.reset_parameters()

    def reset_parameters(self, rng: _init.RngLike = None) -> None:
        """weight 1, bias 0, running mean 0, running variance 1 (PyTorch's init)."""
        C = self.num_features
        if self.affine:
            self.weight.data = _device.like(self.weight.data, np.ones(C, self.dtype))
            self.bias.data = _device.like(self.bias.data, np.zeros(C, self.dtype))
        if self.track_running_stats:
            where = self.weight.data if self.affine else np.zeros(0)
            self.running_mean = _device.like(where, np.zeros(C, self.dtype))
            self.running_var = _device.like(where, np.ones(C, self.dtype))
            self.num_batches_tracked = np.array(0, dtype=np.int64)

    def _normalize(self, fn: Callable, x: Any) -> Any:
        use_batch = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked = np.array(int(self.num_batches_tracked) + 1, np.int64)
        track = self.track_running_stats
        return fn(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            training=use_batch,
            momentum=self.momentum,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return _args_repr(
            [str(self.num_features)],
            eps=(self.eps, 1e-5),
            momentum=(self.momentum, 0.1),
            affine=(self.affine, True),
            track_running_stats=(self.track_running_stats, True),
            dtype=(self.dtype.name, "float32"),
        )


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, H, W) per channel (``torch.nn.BatchNorm2d``).

    Training normalises with batch statistics and updates the running ones (momentum rule of
    PyTorch, unbiased variance); evaluation uses the running statistics.

    Shape: x (N, num_features, H, W) -> same; weight, bias, running_mean, running_var (C,).
    """

    _op = "BatchNorm2d"

    def forward(self, x: Any) -> Any:
        out = self._normalize(F.batch_norm2d, x)
        return out[0] if isinstance(out, tuple) else out

    def forward_fused(self, x: Any, residual: Any = None) -> Any:
        """relu(self(x) + residual) (no residual: relu(self(x))) as one op
        (``F.batch_norm2d_relu``: what ``Sequential`` and the ResNet blocks call)."""
        fn = F.batch_norm2d_relu
        if residual is not None:
            fn = functools.partial(F.batch_norm2d_relu, residual=residual)
        out = self._normalize(fn, x)
        return out[0] if isinstance(out, tuple) else out


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs per channel (``torch.nn.BatchNorm1d``).

    Shape: x (N, num_features) or (N, num_features, L) -> same.
    """

    _op = "BatchNorm1d"

    def forward(self, x: Any) -> Any:
        out = self._normalize(F.batch_norm1d, x)
        return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------- containers


def _plain(m: Module, cls: type) -> bool:
    """``m`` is a ``cls`` whose forward is ``cls.forward`` (a subclass that overrides forward
    is not fused) and that has no forward hooks (they need the unfused output)."""
    return isinstance(m, cls) and type(m).forward is cls.forward and not m._forward_hooks


def _pool_window(conv: Conv2d, pool: Module) -> tuple[int, int] | None:
    """The window of a MaxPool2d the fused op can stand in for (stride = window, no padding,
    floor mode, same backend), else None."""
    if not _plain(pool, MaxPool2d) or pool.stride != pool.kernel_size:
        return None
    if pool.padding != (0, 0) or pool.ceil_mode or pool.backend not in ("auto", conv.backend):
        return None
    return pool.kernel_size


# Runs of layer kinds -> the fused op standing in for them, longest first. Each entry:
# (kinds, extra test on the run, the call on the run's first layer).
FUSIONS: tuple[tuple[tuple[type, ...], Callable, Callable], ...] = (
    (
        (Conv2d, ReLU, MaxPool2d),
        lambda run: _pool_window(run[0], run[2]) is not None,
        lambda run, x: run[0].forward_fused(x, _pool_window(run[0], run[2])),
    ),
    ((Conv2d, ReLU), lambda run: True, lambda run, x: run[0].forward_fused(x)),
    ((Linear, ReLU), lambda run: True, lambda run, x: run[0].forward_fused(x)),
    ((BatchNorm2d, ReLU), lambda run: True, lambda run, x: run[0].forward_fused(x)),
)


def bn_relu(bn: Module, x: Any, residual: Any = None) -> Any:
    """relu(bn(x) + residual) (no residual: relu(bn(x))): one fused op where ``bn`` is a plain
    BatchNorm2d (no forward hooks, forward not overridden), else the separate ops. For
    Modules whose forward writes BN (+ a shortcut) then ReLU."""
    if _plain(bn, BatchNorm2d):
        return bn.forward_fused(x, residual)
    y = bn(x)
    return F.relu(y if residual is None else y + residual)


def plan_fusions(layers: list[Module]) -> list[tuple[int, int, Callable | None]]:
    """[(first, end, fused call or None)]: how ``Sequential`` runs ``layers``."""
    plan, i = [], 0
    while i < len(layers):
        for kinds, ok, call in FUSIONS:
            run = layers[i : i + len(kinds)]
            if len(run) == len(kinds) and all(_plain(m, k) for m, k in zip(run, kinds)):
                if ok(run):
                    plan.append((i, i + len(kinds), call))
                    i += len(kinds)
                    break
        else:
            plan.append((i, i + 1, None))
            i += 1
    return plan


class _ModuleSequence(Module):
    """Modules held in order under the keys "0", "1", ... (the containers' common part)."""

    def _check(self, module: Any, what: str) -> Module:
        if not isinstance(module, Module):
            raise TypeError(
                f"{type(self).__name__}{what} not a fastconv Module; got {type(module).__name__}"
            )
        return module

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(list(self._modules.values()))

    def __getitem__(self, i: int | slice) -> Any:
        """A module, or for a slice a container of the same kind sharing the modules."""
        layers = list(self._modules.values())
        if isinstance(i, slice):
            out = type(self)()
            out.extend(layers[i])
            return out.train(self.training)
        return layers[i]

    def __setitem__(self, i: int, module: Module) -> None:
        self._modules[list(self._modules)[i]] = self._check(module, "[...]:")
        self._changed()

    def append(self, module: Module) -> Any:
        self._modules[str(len(self._modules))] = self._check(module, ".append:")
        self._changed()
        return self

    def extend(self, modules: Iterable[Module]) -> Any:
        for m in modules:
            self._modules[str(len(self._modules))] = self._check(m, ".extend:")
        self._changed()
        return self

    def insert(self, index: int, module: Module) -> Any:
        layers = list(self._modules.values())
        layers.insert(index, self._check(module, ".insert:"))
        self._modules.clear()
        for i, m in enumerate(layers):
            self._modules[str(i)] = m
        self._changed()
        return self


class Sequential(_ModuleSequence):
    """Modules applied in order (``torch.nn.Sequential``; state-dict keys "<index>.<name>", or
    the names of an OrderedDict given instead).

    Runs listed in ``FUSIONS`` (Conv2d, ReLU, MaxPool2d(k) with stride k; Conv2d, ReLU;
    Linear, ReLU) run as one fused op: same results, fewer passes over memory. The plan is
    made when the Sequential is built or changed (append, insert, item assignment) and
    re-checked for hooks on every call. Supports ``len``, indexing (a slice gives a
    Sequential sharing the modules) and iteration.
    """

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            items = list(modules[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(modules)]
        for name, m in items:
            self._modules[name] = self._check(m, f": item {name} is")
        self._changed()

    def _changed(self) -> None:
        layers = list(self._modules.values())
        self.__dict__["_plan"] = [
            (tuple(layers[first:end]), call) for first, end, call in plan_fusions(layers)
        ]

    def forward(self, x: Any) -> Any:
        for run, call in self._plan:
            if call is not None and all(not m._forward_hooks for m in run):
                x = call(run, x)
            else:
                for m in run:
                    x = m(x)
        return x


class ModuleList(_ModuleSequence):
    """A list of Modules, registered (``torch.nn.ModuleList``: keys "<index>.<name>")."""

    def __init__(self, modules: Iterable[Module] = ()) -> None:
        super().__init__()
        self.extend(modules)


__all__ = [
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "ConvTranspose2d",
    "Dropout",
    "ELU",
    "FUSIONS",
    "Flatten",
    "Identity",
    "Layer",
    "LeakyReLU",
    "Linear",
    "LogSoftmax",
    "MaxPool2d",
    "Module",
    "ModuleList",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "bn_relu",
    "plan_fusions",
]
