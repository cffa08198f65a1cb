"""The op registry: every differentiable op declared once.

An op is its name, its argument check (``fastconv.shapes``) and, per backend, a pair
``(forward, backward)`` with one signature for every op and backend:

    forward(m, *arrays, a)      -> (out, ctx)      a: the op's checked attributes (NamedTuple)
    backward(m, grad, ctx, needs) -> one gradient (or None) per array input

``m`` is the backend module (``fastconv.reference``, ``fastconv.kernels.cpu.ops`` or
``fastconv.kernels.cuda.ops``, loaded on first use), ``ctx`` a small NamedTuple holding what
the backward needs, ``needs[i]`` whether input i wants a gradient. The CPU and CUDA modules
share their function signatures, so one adapter serves both; the oracle gets the same
signature through thin adapters of its own. ``KERNELS`` at the end of this file is the one
table from (op, backend) to that pair.

``apply`` runs an op: arrays in -> array out, nothing recorded; Tensors in -> Tensor out,
recorded on the tape (``fastconv.tensor``) when an input requires a gradient.

Fused runs are ops of their own (``conv2d_relu``, ``conv2d_relu_maxpool``, ``linear_relu``):
same results as the unfused chain, fewer passes over memory; ``Sequential`` plans them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import _device, _warm, dispatch, reference, shapes
from .tensor import Node, Tensor, is_grad_enabled

Array = Any


class OpDef(NamedTuple):
    name: str
    check: Callable[..., tuple[tuple, Any]]  # (*arrays, *params) -> (checked arrays, attrs)
    tuned: str | None = None  # the autotune op name of conv ops (algorithm chosen per call)
    views: bool = False  # reshape-like: the same on every backend, only placement matters


class Kernel(NamedTuple):
    forward: Callable
    backward: Callable


OPS: dict[str, OpDef] = {}


def declare(name: str, check: Callable, tuned: str | None = None, views: bool = False) -> None:
    OPS[name] = OpDef(name, check, tuned, views)


def backend_module(op: str, be: str) -> Any:
    return reference if be == "reference" else dispatch.backend_ops(op, be)


def _is_reference(m: Any) -> bool:
    return m is reference


def missing(e: AttributeError, m: Any, be: str) -> Exception:
    """A clear error when a backend module lacks a function an adapter calls (the adapters
    call them by name; a backend may not have every op yet), else ``e`` itself."""
    if getattr(e, "obj", None) is m:
        return NotImplementedError(f"{e.name}: the {be!r} backend does not implement {e.name} yet")
    return e


def _on_device(arrays) -> bool:
    for a in arrays:
        if a is not None and type(a) is not np.ndarray and shapes.is_device_array(a):
            return True
    return False


def _unwrap(args) -> tuple[list, bool, tuple | None]:
    """(arrays, whether any input is a Tensor, which inputs want a gradient or None when
    nothing is recorded)."""
    arrays, needs, tensors = [], [], False
    for a in args:
        if isinstance(a, Tensor):
            tensors = True
            needs.append(a.requires_grad)
            a = a.data
        else:
            needs.append(False)
        arrays.append(a)
    if tensors and any(needs) and is_grad_enabled():
        return arrays, True, tuple(needs)
    return arrays, tensors, None


def choose(op: OpDef, arrays, a, backend: str, algorithm: str, run=None):
    """(backend, attributes with the algorithm filled in) for one call. Conv ops time their
    candidates on this very call when nothing is remembered (``fastconv.autotune``)."""
    on_device = _on_device(arrays)
    if op.views and backend == "auto":
        return ("cuda" if on_device else "cpu"), a
    if op.tuned is None:  # conv_transpose2d's heuristic needs its geometry; others have none
        geom = getattr(a, "g", None)
        return dispatch.choose(op.name, geom, backend, "auto", on_device).backend, a
    x = arrays[0]
    candidates = None
    if run is not None:
        candidates = lambda algo: lambda: run(a._replace(algorithm=algo))  # noqa: E731
    c = dispatch.choose(
        op.tuned, a.g, backend, algorithm, on_device, x.dtype, candidates, variant=a.variant
    )
    return c.backend, a._replace(algorithm=c.algorithm, requested=algorithm, backend=c.backend)


def apply(name: str, args: tuple, params: tuple = (), backend: str = "auto", algorithm="auto"):
    """Run op ``name`` on ``args`` (arrays or Tensors; None for an absent optional input)."""
    op = OPS[name]
    arrays, tensors, needs = _unwrap(args)
    arrays, a = op.check(*arrays, *params, needs is not None)
    if not op.views and (name, "reference") in KERNELS and _warm.route(backend, arrays):
        # warm start: the oracle runs this call while a worker compiles its kernels
        _warm.offer("op", name, arrays, (a._replace(requested=algorithm) if op.tuned else a, needs))
        be = "reference"
        if op.tuned is not None:
            a = a._replace(algorithm="reference", requested=algorithm, backend="reference")
    elif op.tuned is None:
        be, a = choose(op, arrays, a, backend, algorithm)
    else:  # the candidates run the very call (fusions included), on the CPU
        cpu = KERNELS[(name, "cpu")]
        # (keep=False: a candidate, maybe timed or compiled on another thread, never takes
        # the buffers the tape hands from step to step)
        run = lambda at: cpu.forward(  # noqa: E731
            backend_module(name, "cpu"), *arrays, at._replace(keep=False)
        )
        be, a = choose(op, arrays, a, backend, algorithm, run)
    m, (fwd, bwd) = kernel(name, be)
    try:
        out, ctx = fwd(m, *arrays, a)
    except AttributeError as e:
        raise missing(e, m, be) from None
    if not tensors:
        return out
    if needs is None:
        return Tensor._make(out, None)
    node = Node(name, functools.partial(bwd, m), ctx, args, needs, RELEASE.get(name))
    return Tensor._make(out, node)


def view(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """x reshaped to a shape already known to fit (flatten's own), recorded as "reshape"
    without the registry's checks."""
    out = x.data.reshape(shape)
    if not (x.requires_grad and is_grad_enabled()):
        return Tensor._make(out, None)
    return Tensor._make(out, Node("reshape", _reshape_back, x.shape, (x,), (True,)))


def kernel(name: str, be: str) -> tuple[Any, Kernel]:
    """(backend module, kernel pair) of op ``name`` on backend ``be`` (the explicit
    ``*_backward`` functions of ``fastconv.functional`` call backward directly)."""
    k = KERNELS.get((name, be))
    if k is None:
        raise NotImplementedError(f"{name}: the {be!r} backend has no kernel for it yet")
    return backend_module(name, be), k


def _mask(out, needs):
    return tuple(o if n else None for o, n in zip(out, needs))


# =========================================================================== convolution


class ConvAttrs(NamedTuple):
    g: shapes.ConvGeom
    args: tuple  # (stride, padding, dilation, groups) as given: the oracle's arguments
    algorithm: str = "auto"
    keep: bool = False  # the forward may keep work (im2col columns) for the backward
    pg: Any = None  # fused max pooling's PoolGeom
    variant: str = ""  # the autotune key's fusion part
    requested: str = "auto"  # the algorithm the caller asked for (the backward's too)
    backend: str = "cpu"


class ConvCtx(NamedTuple):
    x: Array
    w: Array
    a: ConvAttrs
    y: Array = None  # the output, for a fused ReLU's gradient
    scratch: dict | None = None  # what the backend kept (columns, argmax); its own business


def _check_conv(x, w, b, stride, padding, dilation, groups, keep, op="conv2d"):
    x, w, b, g = shapes.check_conv2d(op, x, w, b, stride, padding, dilation, groups)
    return (x, w, b), ConvAttrs(g, (stride, padding, dilation, groups), keep=keep)


def _check_conv_relu(x, w, b, stride, padding, dilation, groups, keep):
    arrays, a = _check_conv(x, w, b, stride, padding, dilation, groups, keep, "conv2d_relu")
    return arrays, a._replace(variant="+relu")


def _check_conv_pool(x, w, b, stride, padding, dilation, groups, pool, keep):
    op = "conv2d_relu_maxpool"
    arrays, a = _check_conv(x, w, b, stride, padding, dilation, groups, keep, op)
    g = a.g
    kh, kw = shapes.pair(op, "pool", pool, minimum=1)
    if kh > g.OH or kw > g.OW:
        raise ValueError(
            f"{op}: the pooling window pool={(kh, kw)} is larger than the convolution output "
            f"({g.OH}x{g.OW}); x.shape={g.x_shape}"
        )
    pg = shapes.pool2d_geometry(op, g.y_shape, (kh, kw))
    # the fused op always keeps the argmax: its backward needs it
    return arrays, a._replace(pg=pg, keep=True, variant=f"+relu+pool{kh}x{kw}")


def _bwd_algorithm(m, gy, ctx, needs, variant, run):
    """The backward pass's own algorithm: the caller's explicit one, else tuned or the
    heuristic (``dispatch``), timed on this very call when nothing is remembered."""
    a = ctx.a
    c = dispatch.choose(
        "conv2d_backward",
        a.g,
        a.backend,
        a.requested,
        a.backend == "cuda",
        gy.dtype,
        lambda algo: lambda: run(algo),
        variant=f"{tuple(bool(n) for n in needs)}{variant}",
        pairs=bool(needs[0]) and (bool(needs[1]) or bool(needs[2])),
    )
    return c.algorithm


# What the kernels kept for a backward (im2col columns, argmax codes), handed back once that
# backward has run and the context is freed, for the next forward of the same geometry: a
# training step then writes into the last step's buffers instead of fresh ones. One per key.
_spare: dict[tuple, dict] = {}


def _scratch(a: Any, x: Array, kind: str) -> dict | None:
    if not a.keep:
        return None
    return _spare.pop((kind, a.g, getattr(a, "pg", None), x.dtype.str), None) or {}


def release_scratch(kind: str):
    def release(ctx):
        if ctx.scratch:
            _spare[(kind, ctx.a.g, getattr(ctx.a, "pg", None), ctx.x.dtype.str)] = ctx.scratch

    return release


def conv2d_forward(m, x, w, b, a):
    scratch = _scratch(a, x, "conv")
    y = m.conv2d(x, w, b, a.g, a.algorithm, scratch)
    return y, ConvCtx(x, w, a, None, scratch)


def conv2d_backward(m, gy, ctx, needs):
    # grad_x = conv_transpose(grad_y, w); grad_w = conv(x, grad_y) per tap; grad_b = sum grad_y
    def run(algo, scratch=ctx.scratch):
        return m.conv2d_backward(gy, ctx.x, ctx.w, ctx.a.g, algo, needs, scratch)

    algo = _bwd_algorithm(m, gy, ctx, needs, "", lambda al: run(al, None))
    return run(algo)


def conv2d_relu_forward(m, x, w, b, a):
    scratch = _scratch(a, x, "conv")
    y = m.conv2d_bias_relu(x, w, b, a.g, a.algorithm, scratch)
    return y, ConvCtx(x, w, a, y, scratch)


def conv2d_relu_backward(m, gy, ctx, needs):
    # relu(z)' = 1 where z > 0, and z > 0 exactly where y = relu(z) > 0
    return conv2d_backward(m, m.relu_backward(gy, ctx.y), ctx, needs)


def conv2d_pool_forward(m, x, w, b, a):
    scratch = _scratch(a, x, "conv")
    y = m.conv2d_pool(x, w, b, a.g, a.pg, True, a.algorithm, scratch)
    return y, ConvCtx(x, w, a, y, scratch)


def conv2d_pool_backward(m, gy, ctx, needs):
    # each window's gradient to its argmax (if > 0), then through the convolution
    a = ctx.a

    def run(algo, scratch=ctx.scratch):
        return m.conv2d_pool_backward(gy, ctx.x, ctx.w, a.g, a.pg, True, algo, needs, scratch)

    def candidate(al):  # on private copies of what the forward kept (see apply)
        y, code = ctx.scratch["pool"]
        return run(al, {"pool": (y.copy(), code.copy())})

    algo = _bwd_algorithm(m, gy, ctx, needs, a.variant, candidate)
    return run(algo)


def ref_conv2d_forward(m, x, w, b, a):
    return m.conv2d(x, w, b, *a.args), ConvCtx(x, w, a)


def ref_conv2d_backward(m, gy, ctx, needs):
    g = ctx.a.g  # the explicit backward-input/-weight calls come without x or w
    x = np.zeros(g.x_shape, gy.dtype) if ctx.x is None else ctx.x
    w = np.zeros(g.w_shape, gy.dtype) if ctx.w is None else ctx.w
    return _mask(m.conv2d_backward(gy, x, w, *ctx.a.args), needs)


def ref_conv2d_relu_forward(m, x, w, b, a):
    y = np.maximum(m.conv2d(x, w, b, *a.args), 0)
    return y, ConvCtx(x, w, a, y)


def ref_conv2d_relu_backward(m, gy, ctx, needs):
    return ref_conv2d_backward(m, m.relu_backward(gy, ctx.y), ctx, needs)


def ref_conv2d_pool_forward(m, x, w, b, a):
    z = np.maximum(m.conv2d(x, w, b, *a.args), 0)
    y = m.max_pool2d(z, (a.pg.KH, a.pg.KW))
    return y, ConvCtx(x, w, a, z)


def ref_conv2d_pool_backward(m, gy, ctx, needs):
    z = ctx.y
    gz = m.max_pool2d_backward(gy, z, (ctx.a.pg.KH, ctx.a.pg.KW))
    return ref_conv2d_backward(m, m.relu_backward(gz, z), ctx, needs)


declare("conv2d", _check_conv, tuned="conv2d")
declare("conv2d_relu", _check_conv_relu, tuned="conv2d")
declare("conv2d_relu_maxpool", _check_conv_pool, tuned="conv2d")


class ConvTAttrs(NamedTuple):
    g: shapes.ConvGeom  # the geometry of the conv2d this op is the backward-data pass of
    conv: dict  # conv2d's keyword arguments
    has_bias: bool


def _check_conv_transpose(
    x, w, b, stride, padding, output_padding, groups, dilation, algorithm, keep
):
    op = "conv_transpose2d"
    x = shapes.check_array(op, "x", x, 4, "(N, C_in, H, W)")
    w = shapes.check_array(op, "weight", w, 4, "(C_in, C_out/groups, KH, KW)")
    shapes.check_same_dtype(op, x=x, weight=w)
    shapes.check_same_place(op, x=x, weight=w)
    g = shapes.conv_transpose2d_geometry(
        op, x.shape, w.shape, stride, padding, output_padding, dilation, groups
    )
    if b is not None:
        b = shapes.check_array(op, "bias", b, 1, "(C_out,)")
        shapes.check_same_dtype(op, x=x, bias=b)
        shapes.check_same_place(op, x=x, bias=b)
        if tuple(b.shape) != (g.C,):
            raise ValueError(f"{op}: bias must have shape ({g.C},); got bias.shape={b.shape}")
    conv = dict(
        stride=(g.sh, g.sw),
        padding=(g.ph, g.pw),
        dilation=(g.dh, g.dw),
        groups=g.G,
        algorithm=algorithm,
    )
    return (x, w, b), ConvTAttrs(g, conv, b is not None)


class ConvTCtx(NamedTuple):
    x: Array
    w: Array
    a: ConvTAttrs
    backend: str


def _conv_transpose_forward(be):
    def forward(m, x, w, b, a):
        from . import functional as F

        y = F.conv2d_backward_input(x, a.g.x_shape, w, **a.conv, backend=be)
        if b is not None:
            if _on_device([y]):  # device arrays have no +=: the backend adds it in place
                m.add_bias_(y, b)
            else:
                y += b.reshape(1, -1, 1, 1)
        return y, ConvTCtx(x, w, a, be)

    return forward


def conv_transpose_backward(m, gy, ctx, needs):
    # y = conv2d_backward_input(x, w) is linear in x with adjoint conv2d: grad_x = conv2d(gy,
    # w); grad_w = conv2d_backward_weight with the roles of input (gy) and output grad (x)
    from . import functional as F

    a, be = ctx.a, ctx.backend
    gx = F.conv2d(gy, ctx.w, None, **a.conv, backend=be) if needs[0] else None
    gw = (
        F.conv2d_backward_weight(ctx.x, gy, a.g.w_shape, **a.conv, backend=be) if needs[1] else None
    )
    gb = _sum_except(gy, 1) if needs[2] and a.has_bias else None
    return gx, gw, gb


declare("conv_transpose2d", _check_conv_transpose)


# =========================================================================== pooling


class PoolAttrs(NamedTuple):
    g: shapes.PoolGeom
    args: tuple  # (kernel_size, stride, padding, ceil_mode) as given
    count_include_pad: bool
    keep: bool


class PoolCtx(NamedTuple):
    x: Array
    a: PoolAttrs
    scratch: dict | None = None


def _check_pool(op):
    def check(x, kernel_size, stride, padding, ceil_mode, count_include_pad, keep):
        x, g = shapes.check_pool2d(
            op, x, kernel_size, stride, padding, ceil_mode, count_include_pad
        )
        return (x,), PoolAttrs(
            g, (kernel_size, stride, padding, ceil_mode), count_include_pad, keep
        )

    return check


def max_pool_forward(m, x, a):
    scratch = _scratch(a, x, "pool")
    return m.max_pool2d(x, a.g, scratch), PoolCtx(x, a, scratch)


def max_pool_backward(m, gy, ctx, needs):
    return (m.max_pool2d_backward(gy, ctx.x, ctx.a.g, ctx.scratch),)


def avg_pool_forward(m, x, a):
    return m.avg_pool2d(x, a.g), PoolCtx(x, a)


def avg_pool_backward(m, gy, ctx, needs):
    return (m.avg_pool2d_backward(gy, ctx.x, ctx.a.g),)


def ref_max_pool_forward(m, x, a):
    return m.max_pool2d(x, *a.args), PoolCtx(x, a)


def ref_max_pool_backward(m, gy, ctx, needs):
    return (m.max_pool2d_backward(gy, ctx.x, *ctx.a.args),)


def ref_avg_pool_forward(m, x, a):
    return m.avg_pool2d(x, *a.args, count_include_pad=a.count_include_pad), PoolCtx(x, a)


def ref_avg_pool_backward(m, gy, ctx, needs):
    args = ctx.a.args
    return (m.avg_pool2d_backward(gy, ctx.x, *args, count_include_pad=ctx.a.count_include_pad),)


declare("max_pool2d", _check_pool("max_pool2d"))
declare("avg_pool2d", _check_pool("avg_pool2d"))


class AdaptiveAttrs(NamedTuple):
    output_size: tuple[int, int]


def _check_adaptive(x, output_size, keep):
    op = "adaptive_avg_pool2d"
    x = shapes.check_array(op, "x", x, 4, "(N, C, H, W)")
    shapes._check_nonempty(op, "x", shapes._shape_of(x))
    H, W = shapes._shape_of(x)[2:]
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        size = tuple(H if s is None else s for s in output_size)
        size = (size[0], W if output_size[1] is None else size[1])
    else:
        size = output_size
    return (x,), AdaptiveAttrs(shapes.pair(op, "output_size", size, minimum=1))


def adaptive_forward(m, x, a):
    return m.adaptive_avg_pool2d(x, a.output_size), tuple(int(s) for s in x.shape)


def adaptive_backward(m, gy, x_shape, needs):
    # each output is a window mean: every member of the window gets grad / window size
    return (m.adaptive_avg_pool2d_backward(gy, x_shape),)


declare("adaptive_avg_pool2d", _check_adaptive)


# =========================================================================== activations


class Slope(NamedTuple):
    value: float = 0.0


def _check_unary(op, param=None, lo=None):
    def check(x, *rest):
        *params, keep = rest
        (x,) = shapes.check_elementwise(op, x=x)
        if param is None:
            return (x,), Slope()
        return (x,), Slope(shapes.check_number(op, param, params[0], lo=lo))

    return check


def relu_forward(m, x, a):
    y = m.relu(x)
    return y, y  # y > 0 exactly where x > 0


def relu_backward(m, gy, y, needs):
    return (m.relu_backward(gy, y),)


def leaky_relu_forward(m, x, a):
    return m.leaky_relu(x, a.value), (x, a.value)


def leaky_relu_backward(m, gy, ctx, needs):
    return (m.leaky_relu_backward(gy, ctx[0], ctx[1]),)


def elu_forward(m, x, a):
    return m.elu(x, a.value), (x, a.value)


def elu_backward(m, gy, ctx, needs):
    # x > 0: 1; else d/dx alpha (e^x - 1) = alpha e^x
    return (m.elu_backward(gy, ctx[0], ctx[1]),)


def sigmoid_forward(m, x, a):
    y = m.sigmoid(x)
    return y, y


def sigmoid_backward(m, gy, y, needs):
    return (m.sigmoid_backward(gy, y),)  # y (1 - y)


def tanh_forward(m, x, a):
    y = m.tanh(x)
    return y, y


def tanh_backward(m, gy, y, needs):
    return (m.tanh_backward(gy, y),)  # 1 - y^2


declare("relu", _check_unary("relu"))
declare("leaky_relu", _check_unary("leaky_relu", "negative_slope"))
declare("elu", _check_unary("elu", "alpha"))
declare("sigmoid", _check_unary("sigmoid"))
declare("tanh", _check_unary("tanh"))


class Dim(NamedTuple):
    dim: int


def _check_softmax(op):
    def check(x, dim, keep):
        x = shapes.check_float(op, "x", x)
        return (x,), Dim(shapes.check_dim(op, dim, len(x.shape)))

    return check


def softmax_forward(m, x, a):
    y = m.softmax(x, a.dim)
    return y, (y, a.dim)


def softmax_backward(m, gy, ctx, needs):
    # J = diag(y) - y y^T along dim: gx = y * (gy - sum(gy * y))
    return (m.softmax_backward(gy, ctx[0], ctx[1]),)


def log_softmax_forward(m, x, a):
    y = m.log_softmax(x, a.dim)
    return y, (y, a.dim)


def log_softmax_backward(m, gy, ctx, needs):
    # y = x - logsumexp(x): gx = gy - softmax(x) * sum(gy), softmax(x) = exp(y)
    return (m.log_softmax_backward(gy, ctx[0], ctx[1]),)


declare("softmax", _check_softmax("softmax"))
declare("log_softmax", _check_softmax("log_softmax"))


# =========================================================================== linear


class LinearCtx(NamedTuple):
    x: Array
    w: Array
    y: Array = None


def _check_linear(op):
    def check(x, w, b, keep):
        return shapes.check_linear(op, x, w, b), None

    return check


def linear_forward(m, x, w, b, a):
    return m.linear(x, w, b), LinearCtx(x, w)


def linear_backward(m, gy, ctx, needs):
    # y = x w^T + b: grad_x = gy w, grad_w = gy^T x, grad_b = sum_n gy
    return m.linear_backward(gy, ctx.x, ctx.w, needs)


def linear_relu_forward(m, x, w, b, a):
    y = m.linear(x, w, b, True)  # bias and ReLU in the GEMM's epilogue
    return y, LinearCtx(x, w, y)


def linear_relu_backward(m, gy, ctx, needs):
    return m.linear_backward(m.relu_backward(gy, ctx.y), ctx.x, ctx.w, needs)


def ref_linear_forward(m, x, w, b, a):
    return m.linear(x, w, b), LinearCtx(x, w)


def ref_linear_backward(m, gy, ctx, needs):
    return _mask(m.linear_backward(gy, ctx.x, ctx.w), needs)


def ref_linear_relu_forward(m, x, w, b, a):
    y = np.maximum(m.linear(x, w, b), 0)
    return y, LinearCtx(x, w, y)


def ref_linear_relu_backward(m, gy, ctx, needs):
    return ref_linear_backward(m, m.relu_backward(gy, ctx.y), ctx, needs)


declare("linear", _check_linear("linear"))
declare("linear_relu", _check_linear("linear_relu"))


# =========================================================================== dropout, batch norm


class DropoutAttrs(NamedTuple):
    scale: float


def _check_dropout(x, keep_mask, scale, keep):
    op = "dropout"
    (x,) = shapes.check_elementwise(op, x=x)
    keep_mask = shapes.check_keep_mask(op, keep_mask, x)
    return (x, keep_mask), DropoutAttrs(shapes.check_number(op, "scale", scale, lo=0.0))


def dropout_forward(m, x, mask, a):
    return m.dropout(x, mask, a.scale), (mask, a.scale)


def dropout_backward(m, gy, ctx, needs):
    return m.dropout(gy, ctx[0], ctx[1]), None  # the same mask and scale


declare("dropout", _check_dropout)


class BNAttrs(NamedTuple):
    running_mean: Array
    running_var: Array
    training: bool
    momentum: float
    eps: float


class BNCtx(NamedTuple):
    x: Array
    w: Array
    mean: Array
    invstd: Array
    training: bool
    a: BNAttrs | None = None  # running statistics and eps, for an exporter reading the tape
    y: Array = None  # batch_norm2d_relu's output: its ReLU's gradient mask


def _check_batch_norm(
    x, w, b, running_mean, running_var, training, momentum, eps, keep, op="batch_norm2d"
):
    x = shapes.check_batch_norm2d(op, x, training, running_mean, running_var)
    vec = shapes.check_channel_vectors(
        op, x, running_mean=running_mean, running_var=running_var, weight=w, bias=b
    )
    momentum = shapes.check_number(op, "momentum", momentum, lo=0.0, hi=1.0)
    eps = shapes.check_number(op, "eps", eps, lo=0.0, lo_open=True)
    if training:
        for name, given in (("running_mean", running_mean), ("running_var", running_var)):
            if isinstance(given, np.ndarray) and vec[name] is not given:
                # check_array had to copy it, so the in-place update would be lost
                raise ValueError(
                    f"{op}: {name} is updated in place and must be a C-contiguous, "
                    f"native-byte-order array"
                )
    a = BNAttrs(vec["running_mean"], vec["running_var"], bool(training), momentum, eps)
    return (x, vec["weight"], vec["bias"]), a


def batch_norm_forward(m, x, w, b, a):
    y, mean, invstd = m.batch_norm2d(
        x, w, b, a.running_mean, a.running_var, a.training, a.momentum, a.eps
    )
    return (y, mean, invstd), BNCtx(x, w, mean, invstd, a.training, a)


def batch_norm_backward(m, gy, ctx, needs):
    # training: y = w (x - mean) invstd + b with mean, invstd functions of x (two more terms)
    return m.batch_norm2d_backward(gy, ctx.x, ctx.w, ctx.mean, ctx.invstd, ctx.training, needs)


def _bn_tensor_forward(fwd):
    """The op's output is y alone; the statistics stay in the context."""

    def forward(m, x, w, b, a):
        (y, _, _), ctx = fwd(m, x, w, b, a)
        return y, ctx

    return forward


def ref_batch_norm_backward(m, gy, ctx, needs):
    return _mask(
        m.batch_norm2d_backward(gy, ctx.x, ctx.w, ctx.mean, ctx.invstd, ctx.training), needs
    )


declare("batch_norm2d", _check_batch_norm)


# relu(batch_norm2d(x)) as one op: the ReLU in the normalising pass, its gradient mask read
# by the backward's passes (two passes over memory fewer each way than the pair of ops)


def _check_batch_norm_relu(
    x, w, b, residual, running_mean, running_var, training, momentum, eps, keep
):
    op = "batch_norm2d_relu"
    args = (x, w, b, running_mean, running_var, training, momentum, eps, keep)
    (x, w, b), a = _check_batch_norm(*args, op=op)
    if residual is not None:
        residual = shapes.check_like_x(op, "residual", residual, x)
    return (x, w, b, residual), a


def batch_norm_relu_forward(m, x, w, b, r, a):
    y, mean, invstd = m.batch_norm2d(
        x, w, b, a.running_mean, a.running_var, a.training, a.momentum, a.eps, True, r
    )
    return y, BNCtx(x, w, mean, invstd, a.training, a, y)


def batch_norm_relu_backward(m, gy, ctx, needs):
    """(gx, gw, gb, g_residual): the residual's gradient is grad_y through the ReLU."""
    res = len(needs) > 3 and bool(needs[3])
    out = m.batch_norm2d_backward(
        gy, ctx.x, ctx.w, ctx.mean, ctx.invstd, ctx.training, tuple(needs[:3]), ctx.y, res
    )
    return tuple(out) if res else (*out, None)


def ref_batch_norm_relu_forward(m, x, w, b, r, a):
    """The oracle's ops one after the other: batch_norm2d, + residual, relu."""
    z, mean, invstd = m.batch_norm2d(
        x, w, b, a.running_mean, a.running_var, a.training, a.momentum, a.eps
    )
    if r is not None:
        z = (z.astype(np.float64) + r).astype(x.dtype)
    y = m.relu(z)
    return y, BNCtx(x, w, mean, invstd, a.training, a, y)


def ref_batch_norm_relu_backward(m, gy, ctx, needs):
    gz = m.relu_backward(gy, ctx.y)  # y > 0 exactly where z > 0
    res = len(needs) > 3 and bool(needs[3])
    return (*ref_batch_norm_backward(m, gz, ctx, tuple(needs[:3])), gz if res else None)


declare("batch_norm2d_relu", _check_batch_norm_relu)


# =========================================================================== losses


class LossAttrs(NamedTuple):
    label_smoothing: float = 0.0


def _check_cross_entropy(logits, labels, label_smoothing, keep):
    op = "cross_entropy"
    logits, labels = shapes.check_labels(op, logits, labels)
    ls = shapes.check_number(op, "label_smoothing", label_smoothing, lo=0.0, hi=1.0)
    return (logits, labels), LossAttrs(ls)


def _check_nll(logp, labels, keep):
    return shapes.check_labels("nll_loss", logp, labels), LossAttrs()


def _check_mse(pred, target, keep):
    return tuple(shapes.check_elementwise("mse_loss", pred=pred, target=target)), LossAttrs()


def _scalar(loss: float, like: Array) -> np.ndarray:
    """The loss as a 0-d host array of the input's dtype (its one device-to-host copy)."""
    return np.array(loss, dtype=np.dtype(like.dtype))


def _scaled(m, grad, gy):
    """grad * gy for the scalar gradient gy of a loss: a new array, so the context's own
    gradient never becomes a leaf's .grad (retain_graph would hand it out again)."""
    s = float(np.asarray(_device.to_host(gy)).reshape(()))
    if _on_device([grad]):
        return m.scale(grad, s)
    return grad * grad.dtype.type(s)


def cross_entropy_forward(m, logits, labels, a):
    loss, grad = m.cross_entropy(logits, labels, a.label_smoothing)
    return (loss, grad), grad


def nll_forward(m, logp, labels, a):
    loss, grad = m.nll_loss(logp, labels)
    return (loss, grad), grad


def mse_forward(m, pred, target, a):
    loss, grad = m.mse_loss(pred, target)
    return (loss, grad), grad


def loss_backward(m, gy, grad, needs):
    # the kernels return d loss / d input with the forward pass (one pass for both)
    return _scaled(m, grad, gy), None


def mse_backward(m, gy, grad, needs):
    g = _scaled(m, grad, gy)
    gt = None
    if needs[1]:  # d/d target = -d/d pred
        gt = m.scale(g, -1.0) if _on_device([g]) else -g
    return g, gt


def _loss_tensor_forward(fwd):
    def forward(m, a0, a1, a):
        (loss, grad), ctx = fwd(m, a0, a1, a)
        return _scalar(loss, a0), ctx

    return forward


# the kernels' own forward: (loss as a float, gradient) for the array API
LOSS_FORWARD = {
    "cross_entropy": cross_entropy_forward,
    "nll_loss": nll_forward,
    "mse_loss": mse_forward,
}

declare("cross_entropy", _check_cross_entropy)
declare("nll_loss", _check_nll)
declare("mse_loss", _check_mse)


# =========================================================================== tensor ops


def _sum_except(a, axis):
    """Sum over every axis but ``axis`` (bias gradients)."""
    if _on_device([a]):
        shape = [1] * len(a.shape)
        shape[axis] = int(a.shape[axis])
        return (
            dispatch.backend_ops("sum_to", "cuda")
            .sum_to(a, tuple(shape))
            .reshape(int(a.shape[axis]))
        )
    return a.sum(axis=tuple(i for i in range(a.ndim) if i != axis))


def _host_sum_to(a, shape):
    """Sum a broadcast result back to ``shape`` (the gradient of broadcasting)."""
    shape = tuple(shape)
    if tuple(a.shape) == shape:
        return a
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and a.shape[lead + i] != 1
    )
    out = a.sum(axis=axes, keepdims=True)
    return out.reshape(shape)


class BinaryAttrs(NamedTuple):
    op: str


class BinaryCtx(NamedTuple):
    a: Array
    b: Array
    a_shape: tuple
    b_shape: tuple


def _check_binary(op):
    def check(a, b, keep):
        a, b = shapes.check_binary(op, a, b)
        return (a, b), BinaryAttrs(op)

    return check


def _shape(a):
    return tuple(int(s) for s in a.shape)


def host_binary_forward(m, a, b, at):
    fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[at.op]
    if _is_reference(m):
        out = fn(a.astype(np.float64), b.astype(np.float64)).astype(a.dtype)
    else:
        out = fn(a, b)
    return out, BinaryCtx(a if at.op != "add" else None, b, _shape(a), _shape(b))


def cuda_binary_forward(m, a, b, at):
    return m.binary(at.op, a, b), BinaryCtx(a, b, _shape(a), _shape(b))


def _binary_backward(op_name):
    # add: (g, g); sub: (g, -g); mul: (g b, g a); div: (g / b, -g a / b^2); each then summed
    # over the axes its operand was broadcast along
    def backward(m, g, ctx, needs):
        dev = _on_device([g])

        def bin_(op, x, y):
            if dev:
                return m.binary(op, x, y)
            return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](
                x, y
            )

        def sum_to(x, shape):
            if dev:
                return x if _shape(x) == shape else m.sum_to(x, shape)
            return _host_sum_to(x, shape)

        def neg(x):
            return m.scale(x, -1.0) if dev else -x

        ga = gb = None
        if op_name == "add":
            ga = sum_to(g, ctx.a_shape) if needs[0] else None
            gb = sum_to(g, ctx.b_shape) if needs[1] else None
        elif op_name == "sub":
            ga = sum_to(g, ctx.a_shape) if needs[0] else None
            gb = sum_to(neg(g), ctx.b_shape) if needs[1] else None
        elif op_name == "mul":
            ga = sum_to(bin_("mul", g, ctx.b), ctx.a_shape) if needs[0] else None
            gb = sum_to(bin_("mul", g, ctx.a), ctx.b_shape) if needs[1] else None
        else:
            if needs[0]:
                ga = sum_to(bin_("div", g, ctx.b), ctx.a_shape)
            if needs[1]:
                q = bin_("div", bin_("mul", g, ctx.a), bin_("mul", ctx.b, ctx.b))
                gb = sum_to(neg(q), ctx.b_shape)
        return ga, gb

    return backward


for _name in ("add", "sub", "mul", "div"):
    declare(_name, _check_binary(_name))


class MatmulCtx(NamedTuple):
    a: Array
    b: Array


def _check_matmul(a, b, keep):
    return shapes.check_matmul("matmul", a, b), None


def matmul_forward(m, a, b, at):
    if _is_reference(m):
        out = (a.astype(np.float64) @ b.astype(np.float64)).astype(a.dtype)
    elif _on_device([a]):
        out = m.matmul(a, b)
    else:
        out = a @ b
    return out, MatmulCtx(a, b)


def matmul_backward(m, g, ctx, needs):
    # C = A B: grad_A = G B^T, grad_B = A^T G
    if _on_device([g]):
        ga = m.matmul(g, m.transpose2d(ctx.b)) if needs[0] else None
        gb = m.matmul(m.transpose2d(ctx.a), g) if needs[1] else None
        return ga, gb
    ga = g @ ctx.b.T if needs[0] else None
    gb = ctx.a.T @ g if needs[1] else None
    return ga, gb


declare("matmul", _check_matmul)


class ReduceAttrs(NamedTuple):
    axes: tuple[int, ...]
    keepdims: bool
    mean: bool


def _check_reduce(op):
    def check(x, axis, keepdims, keep):
        x = shapes.check_float(op, "x", x)
        axes = shapes.check_axes(op, axis, len(x.shape))
        return (x,), ReduceAttrs(axes, bool(keepdims), op == "mean")

    return check


def reduce_forward(m, x, a):
    shape = _shape(x)
    count = math.prod(shape[i] for i in a.axes) if a.axes else 1
    if _on_device([x]):
        out = m.sum_axes(x, a.axes, a.keepdims)
        if a.mean:
            out = m.scale(out, 1.0 / count)
    elif _is_reference(m):
        out = x.astype(np.float64).sum(axis=a.axes, keepdims=a.keepdims)
        out = np.asarray(out / count if a.mean else out, dtype=x.dtype)
    else:
        out = np.asarray(
            x.mean(axis=a.axes, keepdims=a.keepdims)
            if a.mean
            else x.sum(axis=a.axes, keepdims=a.keepdims)
        )
    return out, (shape, a, count)


def reduce_backward(m, g, ctx, needs):
    # every summed element gets the output's gradient (divided by the count for a mean)
    shape, a, count = ctx
    kept = tuple(1 if i in a.axes else s for i, s in enumerate(shape))
    if _on_device([g]):
        g = g.reshape(kept) if _shape(g) != kept else g
        zeros = dispatch.backend_ops("zeros", "cuda").zeros(shape, np.dtype(g.dtype))
        out = m.binary("add", zeros, g)
        return (m.scale(out, 1.0 / count) if a.mean else out,)
    g = np.asarray(g).reshape(kept)
    if a.mean:
        g = g * g.dtype.type(1.0 / count)
    return (np.array(np.broadcast_to(g, shape)),)  # a copy: 0-d stays 0-d


declare("sum", _check_reduce("sum"))
declare("mean", _check_reduce("mean"))


def _check_reshape(x, shape, keep):
    x = shapes.check_any_array("reshape", "x", x)
    return (x,), shapes.check_reshape("reshape", _shape(x), shape)


def reshape_forward(m, x, shape):
    return x.reshape(shape), _shape(x)


def reshape_backward(m, g, x_shape, needs):
    return (g.reshape(x_shape),)


def _reshape_back(g, x_shape, needs):
    return (g.reshape(x_shape),)


declare("reshape", _check_reshape, views=True)


def _check_transpose(x, keep):
    x = shapes.check_array("transpose", "x", x, 2, "(rows, columns)")
    return (x,), None


def transpose_forward(m, x, a):
    if _on_device([x]):
        return m.transpose2d(x), None
    return np.ascontiguousarray(x.T), None


def transpose_backward(m, g, ctx, needs):
    return transpose_forward(m, g, None)[0], None


declare("transpose", _check_transpose, views=True)


class IndexAttrs(NamedTuple):
    index: Any


def _check_getitem(x, index, keep):
    x = shapes.check_any_array("getitem", "x", x)
    return (x,), IndexAttrs(shapes.check_basic_index("getitem", index, _shape(x)))


class IndexCtx(NamedTuple):
    shape: tuple
    index: Any


def getitem_forward(m, x, a):
    out = x[a.index]
    if _on_device([x]):
        out = m.contiguous(out)
    else:  # an int on every axis gives a NumPy scalar: keep it 0-d
        out = np.asarray(out)
        out = np.ascontiguousarray(out) if out.ndim else out.copy()
    return out, IndexCtx(_shape(x), a.index)


def getitem_backward(m, g, ctx, needs):
    # the selected elements get the gradient, the rest zero
    if _on_device([g]):
        return (m.index_backward(g, ctx.shape, ctx.index),)
    out = np.zeros(ctx.shape, g.dtype)
    out[ctx.index] = g
    return (out,)


declare("getitem", _check_getitem, views=True)


class CatAttrs(NamedTuple):
    dim: int
    sizes: tuple[int, ...]


def _check_cat(*rest):
    *arrays, dim, keep = rest
    arrays, dim = shapes.check_cat("cat", arrays, dim)
    return tuple(arrays), CatAttrs(dim, tuple(int(a.shape[dim]) for a in arrays))


declare("cat", _check_cat)


def cat_forward(m, *arrays_and_attrs):
    *arrays, a = arrays_and_attrs
    return m.cat(arrays, a.dim), a


def cat_backward(m, g, a, needs):
    # the gradient of a concatenation: the matching pieces of g
    return tuple(m.split(g, a.sizes, a.dim))


class ToAttrs(NamedTuple):
    device: str
    dtype: Any


def _check_to(x, device, dtype, keep):
    x = shapes.check_any_array("to", "x", x)
    if device is not None and device not in _device.DEVICES:
        raise ValueError(f"to: device must be 'cpu' or 'cuda'; got {device!r}")
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in shapes.FLOAT_DTYPES:
            raise TypeError(f"to: dtype must be float32 or float64; got {dtype}")
    return (x,), ToAttrs(device, dtype)


declare("to", _check_to)


def to_forward(m, x, a):
    src = (_on_device([x]), np.dtype(x.dtype))
    y = _move(x, a.device, a.dtype)
    return y, src


def to_backward(m, g, src, needs):
    on_dev, dt = src
    return (_move(g, "cuda" if on_dev else "cpu", dt),)


def _move(x, device, dtype):
    if device is not None:
        x = _device.to_device(x, "to") if device == "cuda" else _device.to_host(x)
    if dtype is not None and np.dtype(x.dtype) != np.dtype(dtype):
        if _on_device([x]):
            x = _device.to_device(_device.to_host(x).astype(dtype))
        else:
            x = x.astype(dtype)
    return x


# =========================================================================== THE TABLE
# (op, backend) -> (forward, backward). CPU and CUDA share the adapters: their modules have
# the same signatures. The oracle's adapters translate to fastconv.reference's arguments.


def _both(name, fwd, bwd, ref=None):
    ref = ref or (fwd, bwd)
    return {
        (name, "reference"): Kernel(*ref),
        (name, "cpu"): Kernel(fwd, bwd),
        (name, "cuda"): Kernel(fwd, bwd),
    }


_binary_cuda = {}
for _name in ("add", "sub", "mul", "div"):
    _binary_cuda.update(
        {
            (_name, "reference"): Kernel(host_binary_forward, _binary_backward(_name)),
            (_name, "cpu"): Kernel(host_binary_forward, _binary_backward(_name)),
            (_name, "cuda"): Kernel(cuda_binary_forward, _binary_backward(_name)),
        }
    )

# ops whose contexts hold kernel buffers worth reusing once their backward has run
RELEASE = {
    "conv2d": release_scratch("conv"),
    "conv2d_relu": release_scratch("conv"),
    "conv2d_relu_maxpool": release_scratch("conv"),
    "max_pool2d": release_scratch("pool"),
}

KERNELS: dict[tuple[str, str], Kernel] = {
    **_both(
        "conv2d",
        conv2d_forward,
        conv2d_backward,
        (ref_conv2d_forward, ref_conv2d_backward),
    ),
    **_both(
        "conv2d_relu",
        conv2d_relu_forward,
        conv2d_relu_backward,
        (ref_conv2d_relu_forward, ref_conv2d_relu_backward),
    ),
    **_both(
        "conv2d_relu_maxpool",
        conv2d_pool_forward,
        conv2d_pool_backward,
        (ref_conv2d_pool_forward, ref_conv2d_pool_backward),
    ),
    ("conv_transpose2d", "reference"): Kernel(
        _conv_transpose_forward("reference"), conv_transpose_backward
    ),
    ("conv_transpose2d", "cpu"): Kernel(_conv_transpose_forward("cpu"), conv_transpose_backward),
    ("conv_transpose2d", "cuda"): Kernel(_conv_transpose_forward("cuda"), conv_transpose_backward),
    **_both(
        "max_pool2d",
        max_pool_forward,
        max_pool_backward,
        (ref_max_pool_forward, ref_max_pool_backward),
    ),
    **_both(
        "avg_pool2d",
        avg_pool_forward,
        avg_pool_backward,
        (ref_avg_pool_forward, ref_avg_pool_backward),
    ),
    **_both("adaptive_avg_pool2d", adaptive_forward, adaptive_backward),
    **_both("relu", relu_forward, relu_backward),
    **_both("leaky_relu", leaky_relu_forward, leaky_relu_backward),
    **_both("elu", elu_forward, elu_backward),
    **_both("sigmoid", sigmoid_forward, sigmoid_backward),
    **_both("tanh", tanh_forward, tanh_backward),
    **_both("softmax", softmax_forward, softmax_backward),
    **_both("log_softmax", log_softmax_forward, log_softmax_backward),
    **_both("linear", linear_forward, linear_backward, (ref_linear_forward, ref_linear_backward)),
    **_both(
        "linear_relu",
        linear_relu_forward,
        linear_relu_backward,
        (ref_linear_relu_forward, ref_linear_relu_backward),
    ),
    **_both("dropout", dropout_forward, dropout_backward),
    **_both(
        "batch_norm2d",
        _bn_tensor_forward(batch_norm_forward),
        batch_norm_backward,
        (_bn_tensor_forward(batch_norm_forward), ref_batch_norm_backward),
    ),
    **_both(
        "batch_norm2d_relu",
        batch_norm_relu_forward,
        batch_norm_relu_backward,
        (ref_batch_norm_relu_forward, ref_batch_norm_relu_backward),
    ),
    **_both("cross_entropy", _loss_tensor_forward(cross_entropy_forward), loss_backward),
    **_both("nll_loss", _loss_tensor_forward(nll_forward), loss_backward),
    **_both("mse_loss", _loss_tensor_forward(mse_forward), mse_backward),
    **_binary_cuda,
    **_both("matmul", matmul_forward, matmul_backward),
    **_both("sum", reduce_forward, reduce_backward),
    **_both("mean", reduce_forward, reduce_backward),
    **_both("reshape", reshape_forward, reshape_backward),
    **_both("transpose", transpose_forward, transpose_backward),
    **_both("getitem", getitem_forward, getitem_backward),
    **_both("cat", cat_forward, cat_backward),
    **_both("to", to_forward, to_backward),
}


# =========================================================================== optimizer updates
# In place on the parameters and their state. The CPU and CUDA modules update in place; the
# oracle returns new arrays, which these adapters write back.


def _ref_sgd(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    args = (lr, momentum, dampening, weight_decay, nesterov, first)
    new_p, new_buf = reference.sgd_update(p, grad, p if buf is None else buf, *args)
    p[...] = new_p
    if momentum != 0:
        buf[...] = new_buf


def _ref_adam(p, grad, m, v, *args):
    p[...], m[...], v[...] = reference.adam_update(p, grad, m, v, *args)


def _ref_rmsprop(p, grad, square_avg, grad_avg, buf, *args):
    new_p, new_s, new_ga, new_buf = reference.rmsprop_update(
        p, grad, square_avg, grad_avg, buf, *args
    )
    p[...], square_avg[...] = new_p, new_s
    if grad_avg is not None:
        grad_avg[...] = new_ga
    if buf is not None:
        buf[...] = new_buf


def _ref_adagrad(p, grad, state_sum, *args):
    p[...], state_sum[...] = reference.adagrad_update(p, grad, state_sum, *args)


# update -> (the oracle's in-place adapter, the CPU/CUDA module's function); None: no such
# loop there (sgd_update_many then runs sgd_update per parameter)
UPDATES = {
    "sgd_update": (_ref_sgd, lambda m: m.sgd_update),
    "sgd_update_many": (None, lambda m: getattr(m, "sgd_update_many", None)),
    "adam_update": (_ref_adam, lambda m: m.adam_update),
    "rmsprop_update": (_ref_rmsprop, lambda m: m.rmsprop_update),
    "adagrad_update": (_ref_adagrad, lambda m: m.adagrad_update),
}


def update_kernel(fn: str, be: str):
    """The in-place update ``fn`` of backend ``be`` (None: the backend has no such loop)."""
    ref, of_module = UPDATES[fn]
    return ref if be == "reference" else of_module(dispatch.backend_ops(fn, be))
