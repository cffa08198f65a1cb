"""``fc.summary(model, input_shape)``: a Keras-style table of a model's layers.

One forward pass on zeros, in evaluation mode and under ``no_grad`` (so BatchNorm running
statistics, its batch counter and Dropout's generators are left exactly as they were; each
module's train/eval mode is restored afterwards), with a forward hook on every leaf module and on
every module that owns parameters directly. Each call of a hooked module is one row, in call
order: its dotted name and class, output shape, parameter count and multiply-accumulates.

Conventions:

- Parameters: a module's own parameters, on the row of its first call (a module called twice
  shows 0 on its second row), so the column adds up to the total unless a module never runs.
  Totals count every parameter of the model once; trainable ones have ``requires_grad``.
- MACs, for the whole given batch (``input_shape`` without a batch axis means one image):
  Conv2d/Conv1d: output elements * in_channels/groups * KH * KW; ConvTranspose2d: input
  elements * out_channels/groups * KH * KW; Linear: output elements * in_features. Biases,
  BatchNorm, pooling, activations, flatten and concatenation count 0 (the usual convention of
  FLOP counts in papers, e.g. He et al. 2016: BatchNorm folds into the convolution before it at
  inference, and the others are not multiply-adds).
- Ops a ``forward`` calls functionally (``fc.relu``, ``fc.cat``, a residual ``+``) belong to no
  module and have no row.

Hooks stop ``Sequential`` from fusing conv + ReLU + pool runs for this pass, so every layer shows
its own output; the numbers do not depend on fusion.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from . import _device
from .nn import Conv1d, Conv2d, ConvTranspose2d, Linear, Module
from .tensor import Tensor, no_grad


class Row(NamedTuple):
    """One call of a hooked module."""

    name: str  # dotted name in the model ("layer1.0.conv1"); the class name for the root
    kind: str  # class name
    output_shape: Any  # tuple, or a list of tuples for a module returning several arrays
    params: int
    macs: int


class Totals(NamedTuple):
    params: int
    trainable: int
    non_trainable: int
    buffers: int  # values in floating-point buffers (BatchNorm running statistics)
    macs: int
    input_shape: tuple[int, ...]
    output_shape: Any
    dtype: str


def _shape(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_shape(a) for a in v]
    data = v.data if isinstance(v, Tensor) else v
    return tuple(int(s) for s in getattr(data, "shape", ()))


def _numel(shape: Any) -> int:
    return math.prod(shape) if isinstance(shape, tuple) else 0


def macs(module: Module, input_shape: tuple[int, ...], output_shape: Any) -> int:
    """Multiply-accumulates of one call (module docstring); 0 for layers without any."""
    if isinstance(module, (Conv2d, Conv1d)):
        k = math.prod(np.atleast_1d(module.kernel_size))
        return _numel(output_shape) * (module.in_channels // module.groups) * int(k)
    if isinstance(module, ConvTranspose2d):
        k = math.prod(module.kernel_size)
        return _numel(input_shape) * (module.out_channels // module.groups) * k
    if isinstance(module, Linear):
        return _numel(output_shape) * module.in_features
    return 0


def collect(
    model: Module, input_shape: tuple[int, ...], dtype: Any = np.float32
) -> tuple[list[Row], Totals]:
    """The rows and totals that ``summary`` prints. ``input_shape``: (C, H, W) for one image,
    or with the batch axis, (N, C, H, W); any shape the model takes."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    rows: list[Row] = []
    seen: set[int] = set()

    def hook_for(name: str):
        def hook(m: Module, inputs: tuple, out: Any) -> None:
            own = 0 if id(m) in seen else sum(p.data.size for p in _own_params(m))
            seen.add(id(m))
            in_shape = _shape(inputs[0]) if inputs else ()
            out_shape = _shape(out)
            rows.append(Row(name, type(m).__name__, out_shape, own, macs(m, in_shape, out_shape)))

        return hook

    handles = []
    for name, m in model.named_modules():
        leaf = next(m.named_children(), None) is None
        if leaf or _own_params(m):
            handles.append(m.register_forward_hook(hook_for(name or type(m).__name__)))
    modes = [(m, m.training) for m in model.modules()]
    x = np.zeros(shape, np.dtype(dtype))
    if model.device == "cuda":
        x = _device.to_device(x)
    try:
        model.eval()
        with no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.__dict__["training"] = mode
    params = model.parameters()
    total = sum(p.data.size for p in params)
    trainable = sum(p.data.size for p in params if p.requires_grad)
    buffers = sum(int(np.prod(b.shape)) for b in model.buffers() if np.dtype(b.dtype).kind == "f")
    totals = Totals(
        total,
        trainable,
        total - trainable,
        buffers,
        sum(r.macs for r in rows),
        shape,
        _shape(out),
        np.dtype(dtype).name,
    )
    return rows, totals


def _own_params(m: Module) -> list:
    return [p for p in m._parameters.values() if p is not None]


def _fmt_shape(s: Any) -> str:
    if isinstance(s, list):
        return ", ".join(_fmt_shape(a) for a in s)
    return "(" + ", ".join(str(d) for d in s) + ")"


def _human(n: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def format_table(model: Module, rows: list[Row], totals: Totals) -> str:
    """The Keras-style text of ``collect``'s result."""
    head = ("Layer (type)", "Output shape", "Params", "MACs")
    body = [
        (f"{r.name} ({r.kind})", _fmt_shape(r.output_shape), f"{r.params:,}", f"{r.macs:,}")
        for r in rows
    ]
    w = [max(len(row[i]) for row in [head, *body]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return (
            f"{cells[0]:<{w[0]}}  {cells[1]:<{w[1]}}  {cells[2]:>{w[2]}}  {cells[3]:>{w[3]}}"
        ).rstrip()

    width = sum(w) + 6
    out = [
        f"Model: {type(model).__name__} (input {_fmt_shape(totals.input_shape)}, {totals.dtype})",
        "=" * width,
        line(head),
        "=" * width,
        *(line(b) for b in body),
        "=" * width,
        f"Total params: {totals.params:,}",
        f"Trainable params: {totals.trainable:,}",
        f"Non-trainable params: {totals.non_trainable:,}",
    ]
    if totals.buffers:
        out.append(f"Buffers (running statistics): {totals.buffers:,}")
    out += [
        f"Total MACs: {totals.macs:,} ({_human(totals.macs)}) for batch {totals.input_shape[0]}",
        f"Output shape: {_fmt_shape(totals.output_shape)}",
        "=" * width,
    ]
    return "\n".join(out)


def summary(
    model: Module,
    input_shape: tuple[int, ...],
    dtype: Any = np.float32,
    *,
    print_fn: Any = None,
) -> str:
    """A Keras-style table of ``model`` on inputs of ``input_shape`` ((C, H, W) for one image,
    or (N, C, H, W)): each layer's dotted name and class, output shape, parameters and
    multiply-accumulates, then total, trainable and non-trainable parameters and total MACs
    (conventions in this module's docstring). Runs one forward pass on zeros in evaluation mode
    under ``no_grad``; the model's state and modes are unchanged afterwards. Returns the table;
    ``print_fn`` (e.g. ``print``) is also called with it.

    >>> print(fc.summary(fc.models.lenet5(), (1, 28, 28)))  # doctest: +SKIP
    """
    rows, totals = collect(model, input_shape, dtype)
    text = format_table(model, rows, totals)
    if print_fn is not None:
        print_fn(text)
    return text


__all__ = ["Row", "Totals", "collect", "format_table", "macs", "summary"]
