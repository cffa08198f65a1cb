"""ONNX in and out: ``export`` a Module to an ONNX file, ``load`` an ONNX file as a Module.

Needs the ``onnx`` package (``pip install 'fastconv[onnx]'``), imported by these functions only:
``import fastconv`` imports neither this module nor ``onnx``; ``fc.onnx`` loads it on first use.

Export traces the tape: the model runs once, in eval mode, on the example input with every
parameter requiring a gradient, and the recorded graph is walked from the output. Each tape op
becomes ONNX nodes (table ``EXPORTERS``): fused ops split again (``conv2d_relu_maxpool`` ->
Conv, Relu, MaxPool), BatchNorm in eval mode becomes BatchNormalization with the running
statistics. Initializers keep the state-dict names (``layer1.0.conv1.weight``); the batch axis
is dynamic (``N``) unless ``dynamic_batch=False``.

Load builds an ``OnnxModel``: its forward walks the nodes in order, calling
``fastconv.functional`` (so it runs on the CPU or CUDA backend, records on the tape, trains).
Float initializers become Parameters, BatchNormalization's mean and variance buffers. Their
state-dict key is the ONNX name with every character other than letters, digits, ``_`` and ``.``
replaced by ``_`` (``layer1.0.conv1.weight`` stays, ``onnx::Conv_17`` becomes
``onnx__Conv_17``); the dots nest, as in PyTorch, and a key that would clash gets a trailing
``_``. Shape/Gather/Unsqueeze/Concat/... chains that compute a reshape's target run on NumPy
integers from the actual input shape ("shape lane"); they may never feed float data.
Everything else (table ``IMPORTERS``) is an error naming the node, its op type and the
supported set, raised by ``load`` before anything runs. Files are untrusted: external-data
paths that leave the model's folder are refused, and every error names the file.

A dynamic batch axis is honoured; other dynamic input dimensions must be fixed with
``load(path, input_shape=...)``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _device
from . import functional as F
from .nn import Module, Parameter
from .tensor import Tensor, _topological, enable_grad

EXPORT_OPSETS = range(13, 22)  # what export writes (13: Softmax on one axis, Unsqueeze inputs)
IMPORT_OPSETS = range(9, 23)  # what load reads (the default domain's version)
DEFAULT_OPSET = 17


class OnnxError(ValueError):
    """A model that cannot be exported or loaded exactly; the message names the file (load),
    the node, the op and the rule."""


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "fastconv.onnx needs the onnx package: pip install 'fastconv[onnx]'"
        ) from e
    return onnx


_FLOAT_TYPES = {1: np.float32, 11: np.float64}  # TensorProto.FLOAT, DOUBLE


# =========================================================================== export


class _Exporter:
    """Builds the ONNX graph from the tape of one traced forward pass."""

    def __init__(self, onnx, model: Module, inputs: list[Tensor], dynamic: bool) -> None:
        self.onnx, self.h = onnx, onnx.helper
        self.nodes: list = []
        self.inits: dict[str, np.ndarray] = {}
        self.names: dict[int, str] = {}  # id(Tensor or array) -> value name
        self.batched: set[int] = set()  # ids of Tensors whose axis 0 is the batch
        self.taken: set[str] = set()
        self.counter = 0
        self.dynamic = dynamic
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.buffers = {id(b): n for n, b in model.named_buffers()}
        self.taken.update(self.params.values())  # constants never take a state-dict name
        self.taken.update(self.buffers.values())
        self.inputs = inputs
        self.module_of: dict[int, str] = {}
        self.keep: list = []  # what ids refer to stays alive while exporting

    # ---- names
    def fresh(self, base: str) -> str:
        base = base or "value"
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def const(self, value: Any, base: str = "const") -> str:
        """An initializer holding ``value`` (not a parameter)."""
        key = id(value)
        if not isinstance(value, (int, float)) and key in self.names:
            return self.names[key]
        arr = np.array(_device.to_host(value))
        name = self.fresh(base)
        self.inits[name] = arr
        if not isinstance(value, (int, float)):
            self.names[key] = name
            self.keep.append(value)
        return name

    def ints(self, values: Sequence[int], base: str = "shape") -> str:
        name = self.fresh(base)
        self.inits[name] = np.asarray(list(values), np.int64)
        return name

    def value(self, t: Any, like: Any = None) -> str:
        """The ONNX name of an op input (emitted already, a parameter, a constant or "")."""
        if t is None:
            return ""
        if isinstance(t, (int, float, np.number)) and not isinstance(t, bool):
            dt = np.dtype(like.dtype) if like is not None else np.dtype(np.float32)
            return self.const(np.asarray(t, dt))
        key = id(t)
        if key in self.names:
            return self.names[key]
        if isinstance(t, Tensor):
            if t._node is not None:  # pragma: no cover - emission order guarantees this
                raise OnnxError("export: internal error: an op's input was not emitted first")
            if key in self.params:
                name = self.params[key]
                self.taken.add(name)
                self.inits[name] = np.array(t.numpy())
                self.names[key] = name
                return name
            return self.const(t.data)
        if key in self.buffers:
            name = self.buffers[key]
            if name not in self.inits:
                self.taken.add(name)
                self.inits[name] = np.array(_device.to_host(t))
            self.names[key] = name
            self.keep.append(t)
            return name
        return self.const(t)

    def out(self, t: Tensor, op: str) -> str:
        key = id(t)
        if key not in self.names:
            base = self.module_of.get(key)
            self.names[key] = self.fresh(f"{base}/{op}" if base else op)
        return self.names[key]

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(f"{op}_{len(self.nodes)}")
        while inputs and inputs[-1] == "":  # trailing optional inputs left out
            inputs = inputs[:-1]
        name = self.fresh(f"{out}:node")
        self.nodes.append(self.h.make_node(op, inputs, [out], name=name, **attrs))
        return out

    # ---- batch axis bookkeeping
    def is_batched(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.batched

    def need(self, ok: bool, op: str, why: str) -> None:
        if self.dynamic and not ok:
            raise OnnxError(
                f"export: {op} {why}, so the graph is not valid for other batch sizes; "
                "export with dynamic_batch=False"
            )

    # ---- the walk
    def run(self, outputs: list[Tensor], out_names: list[str]) -> None:
        for t in self.inputs:
            self.batched.add(id(t))
        for t, name in zip(outputs, out_names):
            if id(t) in self.names:  # an input or an earlier output returned as is
                self.node("Identity", [self.names[id(t)]], name)
                continue
            if t._node is None:
                self.node("Identity", [self.value(t)], name)
                continue
            self.names[id(t)] = name
            self.taken.add(name)
        done: set[int] = set()
        for root in outputs:
            if root._node is None:
                continue
            nodes = list(reversed(_topological(root._node)))  # inputs first
            made_by = {id(root._node): root}
            for n in nodes:
                for t in n.inputs:
                    if isinstance(t, Tensor) and t._node is not None:
                        made_by[id(t._node)] = t
            for n in nodes:
                if id(n) in done:
                    continue
                done.add(id(n))
                t = made_by[id(n)]
                fn = EXPORTERS.get(n.name)
                if fn is None:
                    raise OnnxError(
                        f"export: the op {n.name!r} has no ONNX form; exportable ops: "
                        f"{', '.join(sorted(EXPORTERS))}"
                    )
                if any(self.is_batched(i) for i in n.inputs):
                    self.batched.add(id(t))
                fn(self, n, t)


def _conv_attrs(g) -> dict:
    """ONNX Conv attributes of a fastconv ConvGeom (the bottom/right padding that reaches the
    same output size: may be less than the top/left one in floor mode, never negative)."""
    pb = max((g.OH - 1) * g.sh + g.dh * (g.KH - 1) + 1 - g.H - g.ph, 0)
    pr = max((g.OW - 1) * g.sw + g.dw * (g.KW - 1) + 1 - g.W - g.pw, 0)
    return dict(
        kernel_shape=[g.KH, g.KW],
        strides=[g.sh, g.sw],
        pads=[g.ph, g.pw, pb, pr],
        dilations=[g.dh, g.dw],
        group=g.G,
    )


def _ex_conv(ex: _Exporter, n, t) -> None:
    x, w, b = n.inputs
    a = n.ctx.a
    ex.need(not ex.is_batched(w) and not ex.is_batched(b), n.name, "computes its weights from x")
    ins = [ex.value(x), ex.value(w), ex.value(b)]
    fused = n.name != "conv2d"
    y = ex.node("Conv", ins, None if fused else ex.out(t, "Conv"), **_conv_attrs(a.g))
    if n.name == "conv2d_relu":
        ex.node("Relu", [y], ex.out(t, "Relu"))
    elif n.name == "conv2d_relu_maxpool":
        r = ex.node("Relu", [y])
        pg = a.pg
        ex.node(
            "MaxPool",
            [r],
            ex.out(t, "MaxPool"),
            kernel_shape=[pg.KH, pg.KW],
            strides=[pg.sh, pg.sw],
            pads=[0, 0, 0, 0],
        )


def _ex_conv_transpose(ex: _Exporter, n, t) -> None:
    x, w, b = n.inputs
    g = n.ctx.a.g  # the forward conv's geometry: its x is our output, its y our input
    oph = g.H - ((g.OH - 1) * g.sh - 2 * g.ph + g.dh * (g.KH - 1) + 1)
    opw = g.W - ((g.OW - 1) * g.sw - 2 * g.pw + g.dw * (g.KW - 1) + 1)
    ex.node(
        "ConvTranspose",
        [ex.value(x), ex.value(w), ex.value(b)],
        ex.out(t, "ConvTranspose"),
        kernel_shape=[g.KH, g.KW],
        strides=[g.sh, g.sw],
        pads=[g.ph, g.pw, g.ph, g.pw],
        dilations=[g.dh, g.dw],
        group=g.G,
        output_padding=[oph, opw],
    )


def _ex_pool(op: str):
    def emit(ex: _Exporter, n, t) -> None:
        a = n.ctx.a
        g = a.g
        attrs = dict(
            kernel_shape=[g.KH, g.KW],
            strides=[g.sh, g.sw],
            pads=[g.ph, g.pw, g.ph, g.pw],
            ceil_mode=int(bool(a.args[3])),
        )
        if op == "AveragePool":
            attrs["count_include_pad"] = int(bool(a.count_include_pad))
        ex.node(op, [ex.value(n.inputs[0])], ex.out(t, op), **attrs)

    return emit


def _ex_adaptive(ex: _Exporter, n, t) -> None:
    _, _, H, W = n.ctx
    OH, OW = t.shape[2:]
    x = ex.value(n.inputs[0])
    if (OH, OW) == (1, 1):
        ex.node("GlobalAveragePool", [x], ex.out(t, "GlobalAveragePool"))
        return
    if H % OH or W % OW:
        raise OnnxError(
            f"export: adaptive_avg_pool2d from {H}x{W} to {OH}x{OW} has windows of unequal "
            "sizes, which no ONNX pooling op computes; use an output size that divides the input"
        )
    k = [H // OH, W // OW]
    ex.node("AveragePool", [x], ex.out(t, "AveragePool"), kernel_shape=k, strides=k)


def _ex_unary(op: str, attr: str | None = None):
    def emit(ex: _Exporter, n, t) -> None:
        attrs = {}
        if attr == "alpha":  # leaky_relu / elu keep (x, value)
            attrs["alpha"] = float(n.ctx[1])
        elif attr == "axis":  # softmax / log_softmax keep (y, dim)
            dim = int(n.ctx[1])
            ex.need(not ex.is_batched(n.inputs[0]) or dim != 0, n.name, "runs along the batch axis")
            attrs["axis"] = dim
        ex.node(op, [ex.value(n.inputs[0])], ex.out(t, op), **attrs)

    return emit


def _ex_linear(ex: _Exporter, n, t) -> None:
    x, w, b = n.inputs
    ex.need(not ex.is_batched(w) and not ex.is_batched(b), n.name, "computes its weights from x")
    ins = [ex.value(x), ex.value(w), ex.value(b)]
    if n.name == "linear":
        ex.node("Gemm", ins, ex.out(t, "Gemm"), transB=1)
    else:
        ex.node("Relu", [ex.node("Gemm", ins, transB=1)], ex.out(t, "Relu"))


def _ex_batch_norm(ex: _Exporter, n, t) -> None:
    x, w, b = n.inputs[:3]
    residual = n.inputs[3] if len(n.inputs) > 3 else None  # batch_norm2d_relu's shortcut
    ctx = n.ctx
    a = ctx.a
    if ctx.training or a is None or a.running_mean is None:
        raise OnnxError(
            "export: batch_norm2d normalised by batch statistics (a BatchNorm without running "
            "statistics, or a module left in training mode); ONNX BatchNormalization needs "
            "running statistics"
        )
    xa = n.inputs[0]
    C = xa.shape[1]
    dt = np.dtype(xa.dtype)
    scale = ex.value(w) if w is not None else ex.const(np.ones(C, dt), "bn_scale")
    bias = ex.value(b) if b is not None else ex.const(np.zeros(C, dt), "bn_bias")
    ins = [ex.value(x), scale, bias, ex.value(a.running_mean), ex.value(a.running_var)]
    fused = n.name == "batch_norm2d_relu"
    y = ex.node(
        "BatchNormalization",
        ins,
        None if fused else ex.out(t, "BatchNormalization"),
        epsilon=float(a.eps),
        momentum=float(1.0 - a.momentum),
    )
    if fused and residual is not None:
        y = ex.node("Add", [y, ex.value(residual)])
    if fused:
        ex.node("Relu", [y], ex.out(t, "Relu"))


def _ex_binary(op: str):
    def emit(ex: _Exporter, n, t) -> None:
        a, b = n.inputs
        for v in (a, b):  # a constant operand must not vary along the batch axis
            if not ex.is_batched(v) and not isinstance(v, (int, float)):
                shape = tuple(v.shape)
                ex.need(
                    len(shape) < t.ndim or shape[0] == 1 or not any(map(ex.is_batched, (a, b))),
                    n.name,
                    f"broadcasts an operand of shape {shape} along the batch axis",
                )
        like = t.data
        ex.node(op, [ex.value(a, like), ex.value(b, like)], ex.out(t, op))

    return emit


def _ex_matmul(ex: _Exporter, n, t) -> None:
    a, b = n.inputs
    ex.need(not ex.is_batched(b), "matmul", "multiplies by a matrix made from x")
    ex.node("MatMul", [ex.value(a), ex.value(b)], ex.out(t, "MatMul"))


def _ex_transpose(ex: _Exporter, n, t) -> None:
    ex.need(not ex.is_batched(n.inputs[0]), "transpose", "moves the batch axis")
    ex.node("Transpose", [ex.value(n.inputs[0])], ex.out(t, "Transpose"), perm=[1, 0])


def _ex_reshape(ex: _Exporter, n, t) -> None:
    x = n.inputs[0]
    src, dst = tuple(x.shape), tuple(t.shape)
    name = ex.value(x)
    if not ex.is_batched(x) or not ex.dynamic:
        target = list(dst)
    elif len(src) >= 2 and len(dst) == 2 and dst[0] == src[0]:
        ex.node("Flatten", [name], ex.out(t, "Flatten"), axis=1)
        return
    elif dst and dst[0] == src[0]:
        target = [0, *dst[1:]]  # 0: keep the input's (batch) size
    else:
        ex.need(
            bool(dst) and dst[0] % max(src[0], 1) == 0 and -1 not in dst,
            "reshape",
            f"from {src} to {dst} moves the batch axis",
        )
        target = [-1, *dst[1:]]
    ex.node("Reshape", [name, ex.ints(target)], ex.out(t, "Reshape"))


def _uniform(v: Any) -> bool:
    """A constant with one value everywhere (the blocks ``_pad`` concatenates)."""
    if isinstance(v, Tensor) and v._node is None and not v.requires_grad:
        a = np.asarray(v.numpy())
        return a.size > 0 and bool(np.all((a == a.flat[0]) | (np.isnan(a) & np.isnan(a.flat[0]))))
    return False


def _ex_cat(ex: _Exporter, n, t) -> None:
    dim = n.ctx.dim
    ins = list(n.inputs)
    ex.need(dim != 0 or not ex.is_batched(t), "cat", "concatenates along the batch axis")
    batched = [i for i in ins if ex.is_batched(i)]
    if (
        len(batched) == 1
        and t.ndim == 4
        and dim in (2, 3)
        and all(_uniform(i) for i in ins if i is not batched[0])
    ):  # a constant border: ONNX Pad (valid for any batch size)
        k = next(j for j, i in enumerate(ins) if i is batched[0])
        before = sum(i.shape[dim] for i in ins[:k])
        after = sum(i.shape[dim] for i in ins[k + 1 :])
        value = next((i for i in ins if i is not batched[0]), None)
        pads = [0] * 8
        pads[dim], pads[4 + dim] = before, after
        fill = float(np.asarray(value.numpy()).flat[0])
        v = ex.const(np.asarray(fill, t.dtype), "pad_value")
        ex.node("Pad", [ex.value(batched[0]), ex.ints(pads, "pads"), v], ex.out(t, "Pad"))
        return
    for i in ins:  # a constant's axis 0 would be the example's batch size
        ex.need(ex.is_batched(i) or not ex.is_batched(t), "cat", "joins x with a constant")
    ex.node("Concat", [ex.value(i) for i in ins], ex.out(t, "Concat"), axis=int(dim))


def _ex_getitem(ex: _Exporter, n, t) -> None:
    x = n.inputs[0]
    index = n.ctx.index
    items = index if isinstance(index, tuple) else (index,)
    if items and items[-1] is Ellipsis:
        items = items[:-1]
    if not all(isinstance(s, slice) for s in items) or len(items) > x.ndim:
        raise OnnxError(
            f"export: getitem with index {index!r}: only slices (x[:, a:b]) have an ONNX form"
        )
    starts, ends, axes, steps = [], [], [], []
    for ax, s in enumerate(items):
        start, stop, step = s.indices(x.shape[ax])
        if (start, stop, step) == (0, x.shape[ax], 1):
            continue
        ex.need(ax != 0 or not ex.is_batched(x), "getitem", "slices the batch axis")
        starts.append(start)
        ends.append(stop)
        axes.append(ax)
        steps.append(step)
    if not axes:
        ex.node("Identity", [ex.value(x)], ex.out(t, "Identity"))
        return
    ins = [ex.value(x), ex.ints(starts), ex.ints(ends), ex.ints(axes), ex.ints(steps)]
    ex.node("Slice", ins, ex.out(t, "Slice"))


EXPORTERS: dict[str, Callable] = {
    "conv2d": _ex_conv,
    "conv2d_relu": _ex_conv,
    "conv2d_relu_maxpool": _ex_conv,
    "conv_transpose2d": _ex_conv_transpose,
    "max_pool2d": _ex_pool("MaxPool"),
    "avg_pool2d": _ex_pool("AveragePool"),
    "adaptive_avg_pool2d": _ex_adaptive,
    "relu": _ex_unary("Relu"),
    "leaky_relu": _ex_unary("LeakyRelu", "alpha"),
    "elu": _ex_unary("Elu", "alpha"),
    "sigmoid": _ex_unary("Sigmoid"),
    "tanh": _ex_unary("Tanh"),
    "softmax": _ex_unary("Softmax", "axis"),
    "log_softmax": _ex_unary("LogSoftmax", "axis"),
    "linear": _ex_linear,
    "linear_relu": _ex_linear,
    "batch_norm2d": _ex_batch_norm,
    "batch_norm2d_relu": _ex_batch_norm,
    "add": _ex_binary("Add"),
    "sub": _ex_binary("Sub"),
    "mul": _ex_binary("Mul"),
    "div": _ex_binary("Div"),
    "matmul": _ex_matmul,
    "transpose": _ex_transpose,
    "reshape": _ex_reshape,
    "cat": _ex_cat,
    "getitem": _ex_getitem,
}


def _trace(model: Module, xs: list[Tensor]) -> tuple[Any, dict[int, str], list]:
    """Run ``model`` once in eval mode with every parameter requiring a gradient (so every op
    is recorded); (output, id(output Tensor) -> module name, Tensors to keep alive)."""
    modes = {id(m): m.training for m in model.modules()}
    params = model.parameters()
    grads = [(p, p.requires_grad) for p in params]
    module_of: dict[int, str] = {}
    keep: list = []

    def hook(name):
        def record(module, inputs, out):
            if isinstance(out, Tensor) and id(out) not in module_of:
                module_of[id(out)] = name or "model"
                keep.append(out)

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()]
    try:
        model.eval()
        for p in params:
            p.requires_grad = True
        with enable_grad():
            out = model(*xs)
    finally:
        for h in handles:
            h.remove()
        for p, rg in grads:
            p.requires_grad = rg
        for m in model.modules():
            m.__dict__["training"] = modes.get(id(m), m.training)
    return out, module_of, keep


def export(
    model: Module,
    example_input: Any,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
) -> None:
    """Write ``model`` as an ONNX file, traced on ``example_input``.

    Args:
        model: any fastconv Module built from exportable ops (``EXPORTERS``): the zoo, user
            Modules with residual adds and concatenations, a model from ``load``. It runs
            once in eval mode (BatchNorm uses its running statistics, Dropout is the
            identity); its modes and ``requires_grad`` flags are restored afterwards.
        example_input: an array or Tensor (or a tuple of them, one per model input); use a
            batch of 2 or more so reshapes that keep the batch axis are told apart.
        path: the file to write. opset: the ONNX opset (13 to 21).
        input_names, output_names: graph names (default "input"/"output", numbered if many).
        dynamic_batch: axis 0 of inputs and outputs is the symbolic ``N``; ops that would tie
            the graph to the example's batch size are an error.

    Initializers carry the state-dict names of the parameters and BatchNorm buffers.
    """
    onnx = _onnx()
    h = onnx.helper
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in EXPORT_OPSETS:
        raise OnnxError(
            f"export: opset must be an int from {EXPORT_OPSETS.start} to "
            f"{EXPORT_OPSETS.stop - 1}; got opset={opset!r}"
        )
    if not isinstance(model, Module):
        raise TypeError(f"export: model must be a fastconv Module; got {type(model).__name__}")
    given = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    device = model.device
    xs = []
    for v in given:
        data = v.data if isinstance(v, Tensor) else v
        if not _is_float(data):
            raise TypeError("export: example inputs must be float32 or float64 arrays or Tensors")
        if device == "cuda":
            data = _device.to_device(np.asarray(_device.to_host(data)), "export")
        xs.append(Tensor(data, requires_grad=True))
    out, module_of, keep = _trace(model, xs)
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not outs or not all(isinstance(o, Tensor) for o in outs):
        raise OnnxError("export: the model must return a Tensor or a tuple of Tensors")
    in_names = _graph_names(input_names, "input", len(xs))
    out_names = _graph_names(output_names, "output", len(outs))
    if len(set(in_names) | set(out_names)) != len(in_names) + len(out_names):
        raise OnnxError("export: input and output names must all differ")

    ex = _Exporter(onnx, model, xs, dynamic_batch)
    ex.module_of = module_of
    ex.keep.extend(keep)
    for x, name in zip(xs, in_names):
        ex.names[id(x)] = name
        ex.taken.add(name)
    ex.taken.update(out_names)
    ex.run(outs, out_names)

    def info(name, t, batched):
        dims: list = list(t.shape)
        if dynamic_batch and batched and dims:
            dims[0] = "N"
        elem = h.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
        return h.make_tensor_value_info(name, elem, dims)

    graph = h.make_graph(
        ex.nodes,
        type(model).__name__,
        [info(n, x, True) for x, n in zip(xs, in_names)],
        [info(n, o, ex.is_batched(o) or id(o) in map(id, xs)) for o, n in zip(outs, out_names)],
        initializer=[onnx.numpy_helper.from_array(a, name) for name, a in ex.inits.items()],
    )
    opsets = [h.make_opsetid("", opset)]
    proto = h.make_model(
        graph,
        opset_imports=opsets,
        producer_name="fastconv",
        ir_version=h.find_min_ir_version_for(opsets),
    )
    try:
        onnx.checker.check_model(proto)
    except Exception as e:  # pragma: no cover - a bug in an exporter above
        raise OnnxError(f"export: the graph built does not pass onnx.checker: {e}") from e
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    onnx.save_model(proto, tmp)
    os.replace(tmp, path)


def _is_float(data: Any) -> bool:
    try:
        return np.dtype(data.dtype) in (np.float32, np.float64)
    except (AttributeError, TypeError):
        return False


def _graph_names(given: Sequence[str] | None, base: str, n: int) -> list[str]:
    if given is None:
        return [base] if n == 1 else [f"{base}_{i}" for i in range(n)]
    names = [str(s) for s in given]
    if len(names) != n:
        raise OnnxError(f"export: {n} {base} name(s) needed; got {names}")
    return names


# =========================================================================== load


class _Holder(Module):
    """A node of the parameter tree of an OnnxModel (no forward of its own)."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("this Module only holds parameters of an OnnxModel")


_SAFE = re.compile(r"[^0-9A-Za-z_.]")


class _Ctx:
    """What one node's builder may look at while ``load`` compiles the graph."""

    def __init__(self, path: str, opset: int, static: dict[str, tuple]) -> None:
        self.path, self.opset, self.static = path, opset, static

    def fail(self, node, why: str) -> OnnxError:
        return OnnxError(f"{self.path}: node {node.name or '(unnamed)'!r} ({node.op_type}): {why}")


class OnnxModel(Module):
    """A Module running an ONNX graph on fastconv's ops (built by ``load``).

    Parameters (float initializers) and buffers (BatchNormalization statistics) carry the
    sanitised ONNX names as state-dict keys; ``train()`` makes BatchNormalization use batch
    statistics (updating the running ones) and Dropout drop, as in PyTorch.

    Shape: the graph's inputs (axis 0 may be any batch size if the file says so) -> its
    outputs (one Tensor, or a tuple for several).
    """

    def __init__(self, source: str) -> None:
        super().__init__()
        d = self.__dict__
        d["source"] = source
        d["_steps"] = []  # (run, input names, output names)
        d["_slots_of"] = {}  # onnx name -> (owner module, attribute, kind)
        d["_consts"] = {}  # onnx name -> host array (float data constants, int shape values)
        d["_graph_inputs"] = []  # (name, shape with None for a dynamic batch, dtype)
        d["_graph_outputs"] = []
        d["rng"] = np.random.default_rng()

    # ---- state
    def _add_state(self, onnx_name: str, array: np.ndarray, kind: str) -> None:
        parts = [p for p in _SAFE.sub("_", onnx_name).split(".") if p] or ["param"]
        owner: Module = self
        for p in parts[:-1]:
            child = owner._modules.get(p)
            if child is None:
                if p in owner._parameters or p in owner._buffers or p in owner.__dict__:
                    owner = None
                    break
                child = _Holder()
                owner.register_module(p, child)
            owner = child
        leaf = parts[-1]
        if owner is None or self._taken(owner, leaf):
            owner, leaf = self, "_".join(parts)
            while self._taken(self, leaf):
                leaf += "_"
        if kind == "param":
            owner.register_parameter(leaf, Parameter(array))
        else:
            owner.register_buffer(leaf, array)
        self._slots_of[onnx_name] = (owner, leaf, kind)

    @staticmethod
    def _taken(m: Module, name: str) -> bool:
        return (
            name in m._parameters
            or name in m._buffers
            or name in m._modules
            or name in m.__dict__
            or hasattr(type(m), name)
        )

    def _get(self, name: str, env: dict, like: Any) -> Any:
        if name == "":
            return None
        if name in env:
            return env[name]
        slot = self._slots_of.get(name)
        if slot is not None:
            owner, attr, kind = slot
            return owner._parameters[attr] if kind == "param" else owner._buffers[attr]
        v = self._consts[name]
        if v.dtype.kind == "f":  # a float constant: on the input's device, in its dtype
            v = Tensor._make(_device.like(like, v.astype(np.dtype(like.dtype))), None)
        env[name] = v
        return v

    # ---- the call
    def forward(self, *xs: Any) -> Any:
        ins = self._graph_inputs
        if len(xs) != len(ins):
            raise ValueError(f"{self.source}: the model takes {len(ins)} input(s); got {len(xs)}")
        env: dict[str, Any] = {}
        for x, (name, shape, _) in zip(xs, ins):
            x = x if isinstance(x, Tensor) else Tensor(x)
            got = x.shape
            if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
                want = ", ".join("N" if s is None else str(s) for s in shape)
                raise ValueError(
                    f"{self.source}: input {name!r} must have shape ({want}); got {got}"
                )
            if x.dtype not in (np.float32, np.float64):
                raise TypeError(
                    f"{self.source}: input {name!r} must be float32 or float64; got {x.dtype}"
                )
            env[name] = x
        like = xs[0].data if isinstance(xs[0], Tensor) else xs[0]
        for run, in_names, out_names in self._steps:
            args = [self._get(n, env, like) for n in in_names]
            outs = run(self, args)
            for n, v in zip(out_names, outs):
                if n:
                    env[n] = v
        res = [self._get(n, env, like) for n in self._graph_outputs]
        return res[0] if len(res) == 1 else tuple(res)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, nodes={len(self._steps)}"


def _attrs(onnx, node) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _check_external(onnx, model, path: str) -> None:
    """Load external data only from files inside the model's folder."""
    from onnx import external_data_helper as xd

    base = os.path.dirname(os.path.abspath(path))
    root = os.path.realpath(base)
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                tensors.append(a.t)
    for t in tensors:
        if not xd.uses_external_data(t):
            continue
        loc = xd.ExternalDataInfo(t).location
        target = os.path.realpath(os.path.join(base, loc))
        if os.path.isabs(loc) or os.path.commonpath([root, target]) != root:
            raise OnnxError(
                f"{path}: initializer {t.name!r} keeps its data in {loc!r}, outside the model's "
                "folder; refused"
            )
        if not os.path.isfile(target):
            raise OnnxError(f"{path}: initializer {t.name!r}: external data file {loc!r} missing")
        try:
            xd.load_external_data_for_tensor(t, base)
        except Exception as e:
            raise OnnxError(f"{path}: initializer {t.name!r}: bad external data: {e}") from e
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def _read(path: str):
    onnx = _onnx()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise OnnxError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    if not model.graph.node or not model.graph.output or not model.opset_import:
        raise OnnxError(f"{path}: not an ONNX model (no graph nodes, outputs or opset)")
    _opset(model, path)
    _check_external(onnx, model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise OnnxError(f"{path}: invalid ONNX model: {str(e).strip()}") from e
    return onnx, model


def _opset(model, path: str) -> int:
    version = None
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            version = int(o.version)
    if version is None or version not in IMPORT_OPSETS:
        raise OnnxError(
            f"{path}: opset {version} is not supported; fastconv reads opsets "
            f"{IMPORT_OPSETS.start} to {IMPORT_OPSETS.stop - 1} of the default domain"
        )
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            raise OnnxError(
                f"{path}: node {node.name!r} ({node.domain}::{node.op_type}): only the default "
                "ONNX domain is supported"
            )
    return version


def _input_specs(model, path: str, input_shape: Any) -> list[tuple[str, list, Any]]:
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    given = input_shape
    if given is not None and not isinstance(given, dict):
        if len(inputs) != 1:
            raise OnnxError(f"{path}: input_shape must be a dict by input name for this model")
        given = {inputs[0].name: given}
    specs = []
    for i in inputs:
        tt = i.type.tensor_type
        if tt.elem_type not in _FLOAT_TYPES:
            raise OnnxError(
                f"{path}: input {i.name!r} has element type {tt.elem_type}; fastconv runs "
                "float32 and float64 inputs"
            )
        if given is not None and i.name in given:
            shape = [None if s is None or s == -1 else int(s) for s in given[i.name]]
        elif not tt.HasField("shape"):
            raise OnnxError(
                f"{path}: input {i.name!r} has no shape; pass input_shape=(None, C, H, W)"
            )
        else:
            shape = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for ax, s in enumerate(shape):
            if s is None and ax > 0:
                raise OnnxError(
                    f"{path}: input {i.name!r} has a dynamic axis {ax} ({_dims(tt)}); fastconv "
                    "honours a dynamic batch axis only: fix the others with "
                    "load(path, input_shape=(None, C, H, W))"
                )
        specs.append((i.name, shape, _FLOAT_TYPES[tt.elem_type]))
    return specs


def _dims(tt) -> str:
    return "(" + ", ".join(d.dim_param or str(d.dim_value) for d in tt.shape.dim) + ")"


def _infer(onnx, model, specs, path: str) -> dict[str, tuple]:
    """Static shapes of every value (None for the batch or an unknown size), by ONNX's shape
    inference on the graph with the inputs fixed; an inconsistent graph fails here."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    fixed = {name: shape for name, shape, _ in specs}
    for i in m.graph.input:
        if i.name in fixed:
            dims = i.type.tensor_type.shape.dim
            del dims[:]
            for s in fixed[i.name]:
                d = dims.add()
                if s is None:
                    d.dim_param = "N"
                else:
                    d.dim_value = s
    try:
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    except Exception as e:
        raise OnnxError(f"{path}: the graph's shapes do not agree: {str(e).strip()}") from e
    out = {}
    for vi in [*m.graph.value_info, *m.graph.output, *m.graph.input]:
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim
            )
    return out


# inputs that are attributes in disguise (shapes, axes, ratios): constants, never Parameters
_ATTR_INPUTS = {
    "Pad": {1, 2, 3},
    "Reshape": {1},
    "Dropout": {1, 2},
    "Unsqueeze": {1},
    "Squeeze": {1},
    "Slice": {1, 2, 3, 4},
    "ReduceMean": {1},
    "ReduceSum": {1},
}
_BUFFER_INPUTS = {"BatchNormalization": {3, 4}}


def load(path: str | os.PathLike, *, input_shape: Any = None) -> OnnxModel:
    """An ``OnnxModel`` running the ONNX file at ``path`` on fastconv's ops.

    Args:
        path: an .onnx file (external data only from files in its folder).
        input_shape: the full input shape, e.g. ``(None, 3, 32, 32)`` (None: a dynamic batch),
            for files whose inputs have other dynamic axes; a dict by name for several inputs.

    Raises ``OnnxError`` naming the file (and the node, its op type and the supported set)
    for an unreadable or invalid file, an opset outside 9..22, an unsupported op or
    attribute, or a shape fastconv cannot honour: all before anything runs. The model starts
    in eval mode; ``.to("cuda")`` moves it, ``.train()`` fine-tunes it.
    """
    path = os.fspath(path)
    onnx, model = _read(path)
    opset = _opset(model, path)
    specs = _input_specs(model, path, input_shape)
    static = _infer(onnx, model, specs, path)
    g = model.graph
    m = OnnxModel(os.path.basename(path))
    m.__dict__["_graph_inputs"] = specs

    inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    aliased = set()  # Identity nodes of initializers (torch's exporter shares equal values so):
    for k, node in enumerate(g.node):  # each output becomes an initializer of its own
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0]:
            inits[node.output[0]] = inits[node.input[0]]
            aliased.add(k)
    role: dict[str, str] = {}  # initializer name -> "buffer" | "param" | "const"
    rank = {"buffer": 2, "param": 1, "const": 0}
    for node in (n for k, n in enumerate(g.node) if k not in aliased):
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if k in _BUFFER_INPUTS.get(node.op_type, ()):
                r = "buffer"
            elif k in _ATTR_INPUTS.get(node.op_type, ()) or inits[name].dtype.kind != "f":
                r = "const"
            else:
                r = "param"
            if rank[r] > rank[role.get(name, "const")] or name not in role:
                role[name] = r
    lanes: dict[str, str] = {name: "data" for name, _, _ in specs}
    for name, arr in inits.items():
        r = role.get(name, "const")
        if r == "const":
            m._consts[name] = np.array(arr)
        else:
            m._add_state(name, np.ascontiguousarray(np.array(arr)), r)
        lanes[name] = "data" if arr.dtype.kind == "f" else "shape"

    for name, arr in inits.items():
        static.setdefault(name, tuple(arr.shape))
    ctx = _Ctx(m.source, opset, static)
    for node in (n for k, n in enumerate(g.node) if k not in aliased):
        if node.op_type not in IMPORTERS:
            raise ctx.fail(
                node,
                f"op type {node.op_type!r} is not supported; supported: "
                f"{', '.join(sorted(IMPORTERS))}",
            )
        in_lanes = [lanes.get(n, "none") if n else "none" for n in node.input]
        for n, ln in zip(node.input, in_lanes):
            if n and ln == "none":
                raise ctx.fail(node, f"input {n!r} is not produced before this node")
        attrs = _attrs(onnx, node)
        if node.op_type == "Constant":
            arr = _constant_value(onnx, node, attrs, ctx)
            m._consts[node.output[0]] = arr
            lanes[node.output[0]] = "data" if arr.dtype.kind == "f" else "shape"
            continue
        run, out_lane = IMPORTERS[node.op_type](node, attrs, in_lanes, ctx)
        for k, name in enumerate(node.output):
            if name and k > 0 and _used(g, name):
                raise ctx.fail(node, f"its output {k} ({name!r}) is not supported")
            if name:
                lanes[name] = out_lane
        m._steps.append((run, list(node.input), [node.output[0]]))
    for o in g.output:
        if o.name in inits and o.name not in m._slots_of:
            m._consts.setdefault(o.name, np.array(inits[o.name]))
        if lanes.get(o.name) != "data":
            raise OnnxError(f"{m.source}: output {o.name!r} is not computed from float data")
        m._graph_outputs.append(o.name)
    m.eval()
    return m


def _used(g, name: str) -> bool:
    return any(name in n.input for n in g.node) or any(o.name == name for o in g.output)


def _constant_value(onnx, node, attrs, ctx) -> np.ndarray:
    if "value" in attrs:
        return np.array(onnx.numpy_helper.to_array(attrs["value"]))
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32)):
        if key in attrs:
            return np.asarray(attrs[key], dt)
    for key in ("value_int", "value_ints"):
        if key in attrs:
            return np.asarray(attrs[key], np.int64)
    raise ctx.fail(node, f"only tensor, float and int constants are supported; got {list(attrs)}")


# --------------------------------------------------------------------------- import: helpers


def _need_data(node, lanes, ctx, positions=None) -> None:
    """The float inputs of a data op must not come from the shape lane."""
    for k, ln in enumerate(lanes):
        if (positions is None or k in positions) and ln == "shape":
            raise ctx.fail(
                node,
                f"input {k} ({node.input[k]!r}) is computed from tensor shapes or integers; "
                "fastconv runs such chains only to compute static shapes",
            )


def _ints(v: Any) -> list[int]:
    return [int(s) for s in np.asarray(v).reshape(-1)]


def _same_pads(size: int, k: int, s: int, d: int, mode: str) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    small = total // 2
    return (small, total - small) if mode == "SAME_UPPER" else (total - small, small)


def _window(node, attrs, ctx, kernel=None, allow_dilation=True):
    """(kernel (kh, kw), strides, dilations, pads rule) of a Conv/pool node; pads_of(H, W)
    gives (top, bottom, left, right)."""
    k = attrs.get("kernel_shape", kernel)
    if k is not None and len(k) != 2:
        raise ctx.fail(node, f"only 2-D windows are supported; kernel_shape={list(k)}")
    strides = list(attrs.get("strides", [1, 1]))
    dil = list(attrs.get("dilations", [1, 1]))
    if len(strides) != 2 or len(dil) != 2:
        raise ctx.fail(node, "only 2-D windows are supported (strides/dilations of length 2)")
    if not allow_dilation and dil != [1, 1]:
        raise ctx.fail(node, f"dilations={dil} are not supported for pooling")
    auto = _text(attrs.get("auto_pad", "NOTSET"))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4 or min(pads) < 0:
        raise ctx.fail(node, f"pads must be 4 non-negative ints; got {pads}")
    if auto not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise ctx.fail(node, f"auto_pad={auto!r} is not supported")

    def pads_of(H: int, W: int, kh: int, kw: int) -> tuple[int, int, int, int]:
        if auto == "VALID":
            return 0, 0, 0, 0
        if auto.startswith("SAME"):
            t, b = _same_pads(H, kh, strides[0], dil[0], auto)
            left, r = _same_pads(W, kw, strides[1], dil[1], auto)
            return t, b, left, r
        return pads[0], pads[2], pads[1], pads[3]

    return k, tuple(strides), tuple(dil), pads_of


def _pad(x: Tensor, pads: tuple[int, int, int, int], value: float) -> Tensor:
    """x (N, C, H, W) with ``pads`` = (top, bottom, left, right) rows/columns of ``value``
    around it: a concatenation on the tape (its gradient drops the padding), on any backend."""
    top, bottom, left, right = pads
    N, C, H, W = x.shape
    dt = x.dtype

    def block(h, w):
        return Tensor._make(_device.like(x.data, np.full((N, C, h, w), value, dt)), None)

    if top or bottom:
        parts = ([block(top, W)] if top else []) + [x] + ([block(bottom, W)] if bottom else [])
        x = F.cat(parts, 2)
        H += top + bottom
    if left or right:
        parts = ([block(H, left)] if left else []) + [x] + ([block(H, right)] if right else [])
        x = F.cat(parts, 3)
    return x


def _split_pads(pads):
    """(symmetric (ph, pw), the rest (top, bottom, left, right)) of (top, bottom, left, right)."""
    t, b, left, r = pads
    ph, pw = min(t, b), min(left, r)
    return (ph, pw), (t - ph, b - ph, left - pw, r - pw)


def _rank(ctx, node, name) -> int | None:
    shape = ctx.static.get(name)
    return None if shape is None else len(shape)


# --------------------------------------------------------------------------- import: data ops


def _im_conv(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    if len(node.input) < 2:
        raise ctx.fail(node, "needs an input and a weight")
    w_rank = _rank(ctx, node, node.input[1])
    if w_rank is not None and w_rank != 4:
        raise ctx.fail(node, f"only 2-D convolution is supported (weight of rank {w_rank})")
    k, strides, dil, pads_of = _window(node, attrs, ctx)
    group = int(attrs.get("group", 1))
    xs, ws = ctx.static.get(node.input[0]), ctx.static.get(node.input[1])
    if xs and ws and len(xs) == 4 and xs[1] and ws[1] and xs[1] != ws[1] * group:
        raise ctx.fail(
            node,
            f"input has {xs[1]} channels; the weight {tuple(ws)} with group={group} wants "
            f"{ws[1] * group}",
        )

    def run(m, args):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        kh, kw = w.shape[2:]
        if k is not None and tuple(k) != (kh, kw):
            raise ctx.fail(node, f"kernel_shape={list(k)} differs from the weight's {(kh, kw)}")
        sym, extra = _split_pads(pads_of(x.shape[2], x.shape[3], kh, kw))
        if any(extra):
            x = _pad(x, extra, 0.0)
        return (F.conv2d(x, w, b, strides, sym, dil, group),)

    return run, "data"


def _im_conv_transpose(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    w_rank = _rank(ctx, node, node.input[1])
    if w_rank is not None and w_rank != 4:
        raise ctx.fail(node, f"only 2-D transposed convolution is supported (rank {w_rank})")
    k, strides, dil, pads_of = _window(node, attrs, ctx)
    group = int(attrs.get("group", 1))
    out_pad = tuple(int(v) for v in attrs.get("output_padding", [0, 0]))
    if len(out_pad) != 2 or not all(0 <= o < max(s, d) for o, s, d in zip(out_pad, strides, dil)):
        raise ctx.fail(
            node, f"output_padding={list(out_pad)} must be below the stride or the dilation"
        )
    out_shape = attrs.get("output_shape")
    auto = _text(attrs.get("auto_pad", "NOTSET"))

    def run(m, args):
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else None
        kh, kw = w.shape[2:]
        if k is not None and tuple(k) != (kh, kw):
            raise ctx.fail(node, f"kernel_shape={list(k)} differs from the weight's {(kh, kw)}")
        H, W = x.shape[2:]
        if out_shape is not None or auto.startswith("SAME"):
            full = (
                (H - 1) * strides[0] + dil[0] * (kh - 1) + 1 + out_pad[0],
                (W - 1) * strides[1] + dil[1] * (kw - 1) + 1 + out_pad[1],
            )
            want = (
                list(out_shape)[-2:] if out_shape is not None else [H * strides[0], W * strides[1]]
            )
            pads = []
            for f, o in zip(full, want):
                total = f - o
                if total < 0:
                    raise ctx.fail(node, f"output size {list(want)} is larger than {list(full)}")
                # the spec: SAME_UPPER puts the smaller half first, else the larger
                head = total // 2 if auto == "SAME_UPPER" else total - total // 2
                pads += [head, total - head]
            t, bt, left, r = pads
        else:
            t, bt, left, r = pads_of(H, W, kh, kw)
        if t == bt and left == r:
            y = F.conv_transpose2d(x, w, b, strides, (t, left), out_pad, group, dil)
            return (y,)
        # asymmetric: the full output, cropped (padding a transposed convolution crops it)
        y = F.conv_transpose2d(x, w, b, strides, 0, out_pad, group, dil)
        H2, W2 = y.shape[2:]
        return (y[:, :, t : H2 - bt, left : W2 - r],)

    return run, "data"


def _im_pool(op: str):
    def build(node, attrs, lanes, ctx):
        _need_data(node, lanes, ctx)
        if "kernel_shape" not in attrs:
            raise ctx.fail(node, "kernel_shape is required")
        k, strides, _, pads_of = _window(node, attrs, ctx, allow_dilation=False)
        ceil = bool(attrs.get("ceil_mode", 0))
        cip = bool(attrs.get("count_include_pad", 0))
        if op == "MaxPool" and int(attrs.get("storage_order", 0)) != 0:
            pass  # it orders the Indices output only, which is refused below
        kh, kw = k

        def run(m, args):
            x = args[0]
            pads = pads_of(x.shape[2], x.shape[3], kh, kw)
            t, b, left, r = pads
            if t == b and left == r and 2 * t <= kh and 2 * left <= kw:
                if op == "MaxPool":
                    return (F.max_pool2d(x, (kh, kw), strides, (t, left), ceil_mode=ceil),)
                y = F.avg_pool2d(
                    x, (kh, kw), strides, (t, left), ceil_mode=ceil, count_include_pad=cip
                )
                return (y,)
            if ceil:
                raise ctx.fail(node, f"ceil_mode with pads {list(pads)} (asymmetric or > kernel/2)")
            if op == "MaxPool":
                return (F.max_pool2d(_pad(x, pads, -np.inf), (kh, kw), strides),)
            y = F.avg_pool2d(_pad(x, pads, 0.0), (kh, kw), strides, count_include_pad=True)
            if cip:
                return (y,)
            # divide by the share of each window inside x: avg(x padded) / avg(ones padded)
            ones = Tensor._make(_device.like(x.data, np.ones((1, 1, *x.shape[2:]), x.dtype)), None)
            share = F.avg_pool2d(_pad(ones, pads, 0.0), (kh, kw), strides)
            return (y / share,)

        return run, "data"

    return build


def _im_global_pool(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    r = _rank(ctx, node, node.input[0])
    if r is not None and r != 4:
        raise ctx.fail(node, f"only 4-D inputs (N, C, H, W) are supported; rank {r}")
    return (lambda m, args: (F.adaptive_avg_pool2d(args[0], 1),)), "data"


def _im_unary(fn: Callable, default: float | None = None):
    def build(node, attrs, lanes, ctx):
        _need_data(node, lanes, ctx)
        if default is None:
            return (lambda m, args: (fn(args[0]),)), "data"
        alpha = float(attrs.get("alpha", default))
        return (lambda m, args: (fn(args[0], alpha),)), "data"

    return build


def _im_softmax(fn: Callable):
    def build(node, attrs, lanes, ctx):
        _need_data(node, lanes, ctx)
        old = ctx.opset < 13
        axis = int(attrs.get("axis", 1 if old else -1))

        def run(m, args):
            x = args[0]
            ax = axis + x.ndim if axis < 0 else axis
            if not old or ax == x.ndim - 1:
                return (fn(x, ax),)
            # before opset 13: softmax of the 2-D view (prod(shape[:axis]), prod(shape[axis:]))
            shape = x.shape
            y = fn(F.reshape(x, (math.prod(shape[:ax]), -1)), 1)
            return (F.reshape(y, shape),)

        return run, "data"

    return build


def _im_gemm(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    ta, tb = int(attrs.get("transA", 0)), int(attrs.get("transB", 0))

    def run(m, args):
        a, b = args[0], args[1]
        c = args[2] if len(args) > 2 else None
        if ta:
            a = F.transpose(a)
        if tb and alpha == 1.0 and (c is None or (c.ndim == 1 and beta == 1.0)):
            if c is None or c.shape[0] == b.shape[0]:
                return (F.linear(a, b, c),)
        y = F.matmul(a, F.transpose(b) if tb else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None and beta != 0.0:
            y = y + (c if beta == 1.0 else c * beta)
        return (y,)

    return run, "data"


def _im_matmul(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)

    def run(m, args):
        a, b = args
        if b.ndim != 2 or a.ndim < 2:
            raise ctx.fail(node, f"only (..., K) @ (K, M) is supported; got {a.shape} @ {b.shape}")
        if a.ndim == 2:
            return (F.matmul(a, b),)
        lead = a.shape[:-1]
        y = F.matmul(F.reshape(a, (-1, a.shape[-1])), b)
        return (F.reshape(y, (*lead, b.shape[1])),)

    return run, "data"


_NP_BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": lambda a, b: np.trunc(a / b).astype(a.dtype) if a.dtype.kind in "iu" else a / b,
}


def _im_binary(op: str):
    fn = {"Add": F.add, "Sub": F.sub, "Mul": F.mul, "Div": F.div}[op]

    def build(node, attrs, lanes, ctx):
        if all(ln == "shape" for ln in lanes):
            return (lambda m, args: (_NP_BINARY[op](*args),)), "shape"
        _need_data(node, lanes, ctx)
        return (lambda m, args: (fn(args[0], args[1]),)), "data"

    return build


def _im_concat(node, attrs, lanes, ctx):
    axis = int(attrs["axis"])
    if all(ln == "shape" for ln in lanes):
        return (lambda m, args: (np.concatenate([np.atleast_1d(a) for a in args], axis),)), "shape"
    _need_data(node, lanes, ctx)

    def run(m, args):
        ax = axis + args[0].ndim if axis < 0 else axis
        return (F.cat(list(args), ax),)

    return run, "data"


def _im_flatten(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    axis = int(attrs.get("axis", 1))

    def run(m, args):
        x = args[0]
        ax = axis + x.ndim if axis < 0 else axis
        return (F.reshape(x, (math.prod(x.shape[:ax]), math.prod(x.shape[ax:]))),)

    return run, "data"


def _shape_input(node, lanes, ctx, k: int, what: str) -> None:
    if len(lanes) > k and lanes[k] == "data":
        raise ctx.fail(node, f"its {what} (input {k}) is float data; fastconv needs it static")


def _im_reshape(node, attrs, lanes, ctx):
    _shape_input(node, lanes, ctx, 1, "target shape")
    allowzero = int(attrs.get("allowzero", 0))
    if lanes[0] == "shape":
        return (lambda m, args: (np.reshape(args[0], _ints(args[1])),)), "shape"

    def run(m, args):
        x, target = args[0], _ints(args[1])
        if not allowzero:
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return (F.reshape(x, tuple(target)),)

    return run, "data"


def _noop_perm(shape, perm) -> bool:
    """A transpose that moves only axes of size 1 keeps the memory order: a reshape."""
    moved = [p for p in perm if shape[p] != 1]
    return moved == sorted(moved)


def _im_transpose(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    perm = attrs.get("perm")
    shape = ctx.static.get(node.input[0])
    if perm is not None and shape is not None and None not in shape[1:]:
        p = list(perm)
        if not (len(shape) == 2 and p == [1, 0]) and not _noop_perm([2, *shape[1:]], p):
            raise ctx.fail(
                node,
                f"perm={p} on shape {shape} moves data; fastconv supports a 2-D transpose and "
                "transposes that only move axes of size 1",
            )

    def run(m, args):
        x = args[0]
        p = list(perm) if perm is not None else list(range(x.ndim))[::-1]
        if x.ndim == 2 and p == [1, 0]:
            return (F.transpose(x),)
        if not _noop_perm(x.shape, p):
            raise ctx.fail(node, f"perm={p} on shape {x.shape} moves data")
        return (F.reshape(x, tuple(x.shape[i] for i in p)),)

    return run, "data"


def _im_batch_norm(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx)
    if len(node.input) != 5:
        raise ctx.fail(node, "needs X, scale, B, mean and var")
    if int(attrs.get("training_mode", 0)):
        raise ctx.fail(node, "training_mode=1 is not supported (call .train() on the model)")
    if ctx.opset < 9 and int(attrs.get("spatial", 1)) != 1:  # pragma: no cover - opset >= 9
        raise ctx.fail(node, "spatial=0 is not supported")
    eps = float(attrs.get("epsilon", 1e-5))
    momentum = 1.0 - float(attrs.get("momentum", 0.9))

    def run(m, args):
        x, scale, bias, mean, var = args
        if isinstance(mean, Tensor) or isinstance(var, Tensor):
            raise ctx.fail(node, "mean and var must be initializers (running statistics)")
        fn = F.batch_norm2d if x.ndim == 4 else F.batch_norm1d
        return (fn(x, mean, var, scale, bias, m.training, momentum, eps),)

    return run, "data"


def _im_dropout(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx, positions={0})
    ratio_attr = float(attrs.get("ratio", 0.5))

    def run(m, args):
        x = args[0]
        if not m.training:
            return (x,)
        p = ratio_attr
        if len(args) > 1 and args[1] is not None:
            r = args[1]
            p = float(np.asarray(r.numpy() if isinstance(r, Tensor) else r).reshape(()))
        if p == 0.0:
            return (x,)
        keep = m.rng.random(x.shape, dtype=np.float32) >= np.float32(p)
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        return (F.dropout(x, _device.like(x.data, keep), scale),)

    return run, "data"


def _im_identity(node, attrs, lanes, ctx):
    return (lambda m, args: (args[0],)), lanes[0]


def _axes(attrs, args, k, ctx):
    if ctx.opset >= 13 and len(args) > k and args[k] is not None:
        return _ints(args[k])
    return list(attrs["axes"]) if "axes" in attrs else None


def _im_unsqueeze(node, attrs, lanes, ctx):
    _shape_input(node, lanes, ctx, 1, "axes")

    def new_shape(shape, axes):
        r = len(shape) + len(axes)
        axes = sorted(a + r if a < 0 else a for a in axes)
        out = list(shape)
        for a in axes:
            out.insert(a, 1)
        return tuple(out)

    if lanes[0] == "shape":
        return (
            lambda m, args: (
                np.reshape(args[0], new_shape(np.shape(args[0]), _axes(attrs, args, 1, ctx))),
            )
        ), "shape"
    return (
        lambda m, args: (F.reshape(args[0], new_shape(args[0].shape, _axes(attrs, args, 1, ctx))),)
    ), "data"


def _im_squeeze(node, attrs, lanes, ctx):
    _shape_input(node, lanes, ctx, 1, "axes")

    def new_shape(shape, axes):
        if axes is None:
            return tuple(s for s in shape if s != 1)
        axes = {a + len(shape) if a < 0 else a for a in axes}
        return tuple(s for i, s in enumerate(shape) if i not in axes)

    if lanes[0] == "shape":
        return (
            lambda m, args: (
                np.reshape(args[0], new_shape(np.shape(args[0]), _axes(attrs, args, 1, ctx))),
            )
        ), "shape"
    return (
        lambda m, args: (F.reshape(args[0], new_shape(args[0].shape, _axes(attrs, args, 1, ctx))),)
    ), "data"


def _im_slice(node, attrs, lanes, ctx):
    for k in range(1, len(lanes)):
        _shape_input(node, lanes, ctx, k, "slice bounds")

    def index(shape, args):
        if ctx.opset < 10:
            starts, ends = list(attrs["starts"]), list(attrs["ends"])
            axes = list(attrs.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        else:
            starts, ends = _ints(args[1]), _ints(args[2])
            axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else None
            steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else None
            axes = list(range(len(starts))) if axes is None else axes
            steps = [1] * len(starts) if steps is None else steps
        idx = [slice(None)] * len(shape)
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = a + len(shape) if a < 0 else a
            if st < 1:
                raise ctx.fail(node, f"step {st} is not supported (steps must be positive)")
            n = shape[a]
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            idx[a] = slice(s, e, st)
        return tuple(idx)

    if lanes[0] == "shape":
        return (lambda m, args: (np.asarray(args[0])[index(np.shape(args[0]), args)],)), "shape"
    return (lambda m, args: (args[0][index(args[0].shape, args)],)), "data"


def _im_reduce(fn: Callable, name: str):
    def build(node, attrs, lanes, ctx):
        _need_data(node, lanes, ctx, positions={0})
        _shape_input(node, lanes, ctx, 1, "axes")
        keep = bool(attrs.get("keepdims", 1))
        noop = bool(attrs.get("noop_with_empty_axes", 0))
        from_input = ctx.opset >= (18 if name == "ReduceMean" else 13)

        def run(m, args):
            x = args[0]
            if from_input:
                axes = _ints(args[1]) if len(args) > 1 and args[1] is not None else []
            else:
                axes = list(attrs.get("axes", []))
            if not axes:
                if noop:
                    return (x,)
                axes = list(range(x.ndim))
            return (fn(x, tuple(a + x.ndim if a < 0 else a for a in axes), keep),)

        return run, "data"

    return build


def _im_shape(node, attrs, lanes, ctx):
    start, end = attrs.get("start", 0), attrs.get("end")

    def run(m, args):
        shape = list(args[0].shape) if isinstance(args[0], Tensor) else list(np.shape(args[0]))
        return (np.asarray(shape[start:end], np.int64),)

    return run, "shape"


def _im_gather(node, attrs, lanes, ctx):
    if lanes[0] != "shape":
        raise ctx.fail(
            node, "Gather on float data is not supported (only on shapes and integer constants)"
        )
    axis = int(attrs.get("axis", 0))
    return (
        lambda m, args: (np.take(np.asarray(args[0]), np.asarray(args[1]), axis=axis),)
    ), "shape"


def _im_cast(node, attrs, lanes, ctx):
    onnx = _onnx()
    to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    if lanes[0] == "shape":
        if to.kind not in "iu":
            raise ctx.fail(node, f"casts shape values to {to}: shapes may not feed float data")
        return (lambda m, args: (np.asarray(args[0]).astype(to),)), "shape"

    def run(m, args):
        x = args[0]
        if x.dtype != to:
            raise ctx.fail(node, f"casts {x.dtype} data to {to}; only a same-type Cast runs")
        return (x,)

    return run, "data"


def _im_pad(node, attrs, lanes, ctx):
    _need_data(node, lanes, ctx, positions={0})
    mode = _text(attrs.get("mode", "constant"))
    if mode != "constant":
        raise ctx.fail(node, f"mode={mode!r} is not supported (only 'constant')")
    for k in (1, 3):
        _shape_input(node, lanes, ctx, k, "pads/axes")

    def run(m, args):
        x = args[0]
        if ctx.opset < 11:
            pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        else:
            pads = _ints(args[1])
            v = args[2] if len(args) > 2 else None
            value = (
                0.0
                if v is None
                else float(
                    np.asarray(_device.to_host(v.data if isinstance(v, Tensor) else v)).reshape(())
                )
            )
            if len(args) > 3 and args[3] is not None:  # axes (opset 18)
                axes = [a + x.ndim if a < 0 else a for a in _ints(args[3])]
                full = [0] * (2 * x.ndim)
                for j, a in enumerate(axes):
                    full[a], full[x.ndim + a] = pads[j], pads[len(axes) + j]
                pads = full
        r = x.ndim
        if r != 4 or any(pads[a] or pads[r + a] for a in (0, 1)) or min(pads) < 0:
            raise ctx.fail(node, f"pads {pads} on rank {r}: only H and W of (N, C, H, W), >= 0")
        return (_pad(x, (pads[2], pads[6], pads[3], pads[7]), value),)

    return run, "data"


IMPORTERS: dict[str, Callable] = {
    "Pad": _im_pad,
    "Conv": _im_conv,
    "ConvTranspose": _im_conv_transpose,
    "MaxPool": _im_pool("MaxPool"),
    "AveragePool": _im_pool("AveragePool"),
    "GlobalAveragePool": _im_global_pool,
    "Relu": _im_unary(F.relu),
    "LeakyRelu": _im_unary(F.leaky_relu, 0.01),
    "Elu": _im_unary(F.elu, 1.0),
    "Sigmoid": _im_unary(F.sigmoid),
    "Tanh": _im_unary(F.tanh),
    "Gemm": _im_gemm,
    "MatMul": _im_matmul,
    "Add": _im_binary("Add"),
    "Sub": _im_binary("Sub"),
    "Mul": _im_binary("Mul"),
    "Div": _im_binary("Div"),
    "Concat": _im_concat,
    "Flatten": _im_flatten,
    "Reshape": _im_reshape,
    "Transpose": _im_transpose,
    "BatchNormalization": _im_batch_norm,
    "Dropout": _im_dropout,
    "Softmax": _im_softmax(F.softmax),
    "LogSoftmax": _im_softmax(F.log_softmax),
    "Identity": _im_identity,
    "Constant": None,  # folded by load itself
    "Shape": _im_shape,
    "Gather": _im_gather,
    "Unsqueeze": _im_unsqueeze,
    "Squeeze": _im_squeeze,
    "Slice": _im_slice,
    "Cast": _im_cast,
    "ReduceMean": _im_reduce(F.mean, "ReduceMean"),
    "ReduceSum": _im_reduce(F.sum, "ReduceSum"),
}


__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "EXPORT_OPSETS",
    "IMPORTERS",
    "IMPORT_OPSETS",
    "OnnxError",
    "OnnxModel",
    "export",
    "load",
]
