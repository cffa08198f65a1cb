"""The public ops: arrays in -> arrays out (the kernel API); Tensors in -> Tensor out, recorded.

Every op runs through the registry (``fastconv.ops``): check the arguments (``shapes``), choose
the backend and algorithm (``dispatch``), run that backend's forward. Given NumPy or device
arrays, an op returns arrays and records nothing; given a ``Tensor`` (any input), it returns a
Tensor and, when an input requires a gradient, records the op on the tape, so
``loss.backward()`` reaches it. The explicit ``*_backward`` functions are the kernels' API:
they run the same backward the tape runs, from the arrays given.

Notation: x (N, C, H, W), weight (K, C/groups, KH, KW), y (N, K, OH, OW). Semantics, layouts and
output sizes follow ``torch.nn.functional``. float32 and float64 in, same dtype out.

NaN and inf propagate as in PyTorch: no op checks for them (a NaN anywhere in a window or a
receptive field makes that output NaN; max pooling treats NaN as the largest value).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _warm, dispatch, ops, shapes
from .tensor import Tensor

Array = Any  # np.ndarray or a CUDA device array
IntPair = int | tuple[int, int]
Input = Any  # an array or a Tensor


def _on_device(*arrays: Any) -> bool:
    return ops._on_device([a.data if isinstance(a, Tensor) else a for a in arrays])


def _has_tensor(*args: Any) -> bool:
    return any(isinstance(a, Tensor) for a in args)


def _backward(name: str, backend: str, on_device: bool, grad_y, ctx_of, needs, geom=None):
    """Run op ``name``'s backward kernel on the backend chosen for these arrays;
    ``ctx_of(m, be)`` builds the context its forward would have kept."""
    be = dispatch.choose(name, geom, backend, "auto", on_device).backend
    m, k = ops.kernel(name, be)
    try:
        return k.backward(m, grad_y, ctx_of(m, be), needs)
    except AttributeError as e:
        raise ops.missing(e, m, be) from None


# --------------------------------------------------------------------------- convolution


def conv2d(
    x: Input,
    weight: Input,
    bias: Input | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Any:
    """2-D convolution (cross-correlation, as in PyTorch).

    Args:
        x: input batch. weight: filters. bias: one value per output channel, or None.
        stride, dilation: int or (h, w), positive. padding: int, (h, w), 'same' (stride 1 only)
            or 'valid'; zero padding. groups: number of channel groups (C for depthwise).
        backend: "auto" | "reference" | "cpu" | "cuda". algorithm: "auto" | "im2col" | "direct".

    Shape:
        x (N, C, H, W), weight (K, C/groups, KH, KW), bias (K,) -> y (N, K, OH, OW) with
        OH = floor((H + 2*ph - dh*(KH-1) - 1) / sh) + 1 (likewise OW).
    """
    return ops.apply(
        "conv2d", (x, weight, bias), (stride, padding, dilation, groups), backend, algorithm
    )


def conv2d_relu(
    x: Input,
    weight: Input,
    bias: Input | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Any:
    """relu(conv2d(...)) as one op: bias and ReLU applied in the kernels' last pass.

    Shape: as ``conv2d``.
    """
    return ops.apply(
        "conv2d_relu", (x, weight, bias), (stride, padding, dilation, groups), backend, algorithm
    )


def conv2d_relu_maxpool(
    x: Input,
    weight: Input,
    bias: Input | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    pool: IntPair = 2,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Any:
    """max_pool2d(relu(conv2d(...)), pool) as one op: max pooling with stride = window, no
    padding, floor mode, in the same last pass, so the full-size output is never written.
    Its gradient runs from the pooled gradient and each window's argmax straight into the
    convolution's (record it with Tensors; there is no array-level backward).

    Shape: x (N, C, H, W) -> (N, K, OH // kh, OW // kw).
    """
    return ops.apply(
        "conv2d_relu_maxpool",
        (x, weight, bias),
        (stride, padding, dilation, groups, pool),
        backend,
        algorithm,
    )


def _conv_ctx(
    op, x, weight, stride, padding, dilation, groups, algorithm, x_shape=None, w_shape=None
):
    """The checked geometry and the context of a conv2d forward call, for its backward."""
    if x is not None:
        x = shapes.check_array(op, "x", x, 4, "(N, C, H, W)")
        x_shape = x.shape
    if weight is not None:
        weight = shapes.check_array(op, "weight", weight, 4, "(K, C/groups, KH, KW)")
        w_shape = weight.shape
    g = shapes.conv2d_geometry(op, x_shape, w_shape, stride, padding, dilation, groups)
    a = ops.ConvAttrs(g, (stride, padding, dilation, groups), requested=algorithm)
    return x, weight, g, a


def _conv_backward(op, grad_y, x, weight, a, backend, needs):
    shapes.check_same_dtype(
        op, grad_y=grad_y, **({"x": x} if x is not None else {"weight": weight})
    )
    arrays = {k: v for k, v in (("grad_y", grad_y), ("x", x), ("weight", weight)) if v is not None}
    shapes.check_same_place(op, **arrays)
    on_device = _on_device(*arrays.values())
    be = dispatch.choose(op, a.g, backend, "auto", on_device).backend
    m, k = ops.kernel("conv2d", be)
    return k.backward(m, grad_y, ops.ConvCtx(x, weight, a._replace(backend=be)), needs)


def conv2d_backward(
    grad_y: Array,
    x: Array,
    weight: Array,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``conv2d`` with respect to x, weight and bias.

    ``output_mask`` (as in PyTorch's convolution_backward) skips the gradients not needed;
    those come back as None.

    Shape:
        grad_y (N, K, OH, OW), x (N, C, H, W), weight (K, C/groups, KH, KW)
        -> grad_x (N, C, H, W), grad_weight (K, C/groups, KH, KW), grad_bias (K,).
    """
    op = "conv2d_backward"
    x, weight, g, a = _conv_ctx(op, x, weight, stride, padding, dilation, groups, algorithm)
    shapes.check_same_dtype(op, x=x, weight=weight)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    mask = tuple(bool(m) for m in output_mask)
    return _conv_backward(op, grad_y, x, weight, a, backend, mask)


def conv2d_backward_input(
    grad_y: Array,
    x_shape: tuple[int, int, int, int],
    weight: Array,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Array:
    """grad_x of ``conv2d`` from the input's shape alone (like ``torch.nn.grad.conv2d_input``).

    Shape: grad_y (N, K, OH, OW), weight (K, C/groups, KH, KW) -> grad_x ``x_shape``.
    """
    op = "conv2d_backward_input"
    x_shape = shapes.shape_tuple(op, "x_shape", x_shape)
    _, weight, g, a = _conv_ctx(
        op, None, weight, stride, padding, dilation, groups, algorithm, x_shape=x_shape
    )
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    return _conv_backward(op, grad_y, None, weight, a, backend, (True, False, False))[0]


def conv2d_backward_weight(
    grad_y: Array,
    x: Array,
    weight_shape: tuple[int, int, int, int],
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Array:
    """grad_weight of ``conv2d`` from the weight's shape alone (``torch.nn.grad.conv2d_weight``).

    Shape: grad_y (N, K, OH, OW), x (N, C, H, W) -> grad_weight ``weight_shape``.
    """
    op = "conv2d_backward_weight"
    weight_shape = shapes.shape_tuple(op, "weight_shape", weight_shape)
    x, _, g, a = _conv_ctx(
        op, x, None, stride, padding, dilation, groups, algorithm, w_shape=weight_shape
    )
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    return _conv_backward(op, grad_y, x, None, a, backend, (False, True, False))[1]


def conv_transpose2d(
    x: Input,
    weight: Input,
    bias: Input | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Any:
    """Transposed convolution (PyTorch's argument order): the backward-data pass of ``conv2d``.

    Shape:
        x (N, C_in, H, W), weight (C_in, C_out/groups, KH, KW), bias (C_out,)
        -> y (N, C_out, OH, OW)
        with OH = (H-1)*sh - 2*ph + dh*(KH-1) + oph + 1 (likewise OW).
    """
    params = (stride, padding, output_padding, groups, dilation, algorithm)
    return ops.apply("conv_transpose2d", (x, weight, bias), params, backend)


def conv_transpose2d_backward(
    grad_y: Array,
    x: Array,
    weight: Array,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> tuple[Array, Array, Array]:
    """Gradients of ``conv_transpose2d``: (grad_x, grad_weight, grad_bias).

    y = conv2d_backward_input(x, w), a linear map whose adjoint is conv2d itself, so
    grad_x = conv2d(grad_y, w), and grad_w = conv2d_backward_weight with the roles of the
    forward conv's input (grad_y here) and output gradient (x here).
    """
    op = "conv_transpose2d_backward"
    params = (stride, padding, output_padding, groups, dilation, algorithm)
    (x, weight, _), a = ops.OPS["conv_transpose2d"].check(x, weight, None, *params, False)
    grad_y = shapes.check_grad(op, grad_y, a.g.x_shape, "conv_transpose2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x)
    a = a._replace(has_bias=True)
    return _backward(
        "conv_transpose2d",
        backend,
        _on_device(grad_y, x),
        grad_y,
        lambda m, be: ops.ConvTCtx(x, weight, a, be),
        (True, True, True),
        a.g,
    )


def conv1d(
    x: Input,
    weight: Input,
    bias: Input | None = None,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Any:
    """1-D convolution, computed as ``conv2d`` on a height-1 image (same semantics as PyTorch).

    Shape:
        x (N, C, L), weight (K, C/groups, KL), bias (K,) -> y (N, K, OL),
        OL = floor((L + 2*p - d*(KL-1) - 1) / s) + 1.
    """
    x4, w4, s, p, d = _conv1d_args("conv1d", x, weight, stride, padding, dilation)
    shapes.conv2d_geometry("conv1d", x4.shape, w4.shape, s, p, d, groups)  # errors named conv1d
    y = conv2d(x4, w4, bias, s, p, d, groups, backend=backend, algorithm=algorithm)
    return y.reshape(y.shape[0], y.shape[1], y.shape[3])


def conv1d_backward(
    grad_y: Array,
    x: Array,
    weight: Array,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
    output_mask: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``conv1d``: (grad_x, grad_weight, grad_bias), via ``conv2d_backward``.

    Shape: grad_y (N, K, OL), x (N, C, L), weight (K, C/groups, KL) -> x's, weight's, (K,).
    """
    op = "conv1d_backward"
    x4, w4, s, p, d = _conv1d_args(op, x, weight, stride, padding, dilation)
    g = shapes.conv2d_geometry(op, x4.shape, w4.shape, s, p, d, groups)
    grad_y = shapes.check_array(op, "grad_y", grad_y, 3, "(N, K, OL)")
    expected = (g.N, g.K, g.OW)
    if tuple(int(v) for v in grad_y.shape) != expected:
        raise ValueError(
            f"{op}: grad_y must have the conv1d output shape {expected}; "
            f"got grad_y.shape={tuple(grad_y.shape)}"
        )
    gy4 = grad_y.reshape(g.N, g.K, 1, g.OW)
    gx, gw, gb = conv2d_backward(
        gy4, x4, w4, s, p, d, groups, backend=backend, algorithm=algorithm, output_mask=output_mask
    )
    if gx is not None:
        gx = gx.reshape(x.shape)
    if gw is not None:
        gw = gw.reshape(weight.shape)
    return gx, gw, gb


def _conv1d_args(op, x, weight, stride, padding, dilation):
    xa = x.data if isinstance(x, Tensor) else x
    wa = weight.data if isinstance(weight, Tensor) else weight
    shapes.check_array(op, "x", xa, 3, "(N, C, L)")
    shapes.check_array(op, "weight", wa, 3, "(K, C/groups, KL)")
    (s,) = _single(op, "stride", stride, 1)
    (d,) = _single(op, "dilation", dilation, 1)
    p = padding if isinstance(padding, str) else (0, _single(op, "padding", padding, 0)[0])
    x4 = x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])
    w4 = weight.reshape(weight.shape[0], weight.shape[1], 1, weight.shape[2])
    return x4, w4, (1, s), p, (1, d)


def _single(op: str, name: str, value: Any, minimum: int) -> tuple[int]:
    return (shapes.single(op, name, value, minimum=minimum),)


# --------------------------------------------------------------------------- pooling


def max_pool2d(
    x: Input,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    backend: str = "auto",
) -> Any:
    """2-D max pooling; padding counts as -inf; NaN wins over every number (as in PyTorch).

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), OH = floor((H + 2*ph - KH) / sh) + 1
    (ceil in ``ceil_mode``). stride defaults to kernel_size; padding <= kernel_size / 2.
    """
    return ops.apply("max_pool2d", (x,), (kernel_size, stride, padding, ceil_mode, True), backend)


def _pool_backward(name, grad_y, x, kernel_size, stride, padding, ceil_mode, cip, backend):
    op = name + "_backward"
    (x,), a = ops.OPS[name].check(x, kernel_size, stride, padding, ceil_mode, cip, False)
    grad_y = shapes.check_grad(op, grad_y, a.g.y_shape, name)
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x)
    ctx = ops.PoolCtx(x, a)
    return _backward(name, backend, _on_device(grad_y, x), grad_y, lambda m, be: ctx, (True,))[0]


def max_pool2d_backward(
    grad_y: Array,
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    backend: str = "auto",
) -> Array:
    """Gradient of ``max_pool2d``: each window's gradient goes to its first maximum (row-major).

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    return _pool_backward(
        "max_pool2d", grad_y, x, kernel_size, stride, padding, ceil_mode, True, backend
    )


def avg_pool2d(
    x: Input,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    backend: str = "auto",
) -> Any:
    """2-D average pooling with zero padding; the divisor follows PyTorch's ``count_include_pad``.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), as ``max_pool2d``.
    """
    params = (kernel_size, stride, padding, ceil_mode, count_include_pad)
    return ops.apply("avg_pool2d", (x,), params, backend)


def avg_pool2d_backward(
    grad_y: Array,
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    backend: str = "auto",
) -> Array:
    """Gradient of ``avg_pool2d``: every input in a window receives grad_y / divisor.

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    return _pool_backward(
        "avg_pool2d",
        grad_y,
        x,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        backend,
    )


def adaptive_avg_pool2d(x: Input, output_size: Any, *, backend: str = "auto") -> Any:
    """Average pooling to a fixed output size, PyTorch's windows: output row i averages input
    rows floor(i*H/OH) to ceil((i+1)*H/OH) - 1 (likewise columns); windows may overlap.
    ``output_size``: int, (OH, OW), or None in a place to keep that input size.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW).
    """
    return ops.apply("adaptive_avg_pool2d", (x,), (output_size,), backend)


def adaptive_avg_pool2d_backward(
    grad_y: Array, x: Array, output_size: Any, *, backend: str = "auto"
) -> Array:
    """Gradient of ``adaptive_avg_pool2d``: each window member gets grad / window size.

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    op = "adaptive_avg_pool2d_backward"
    (x,), a = ops.OPS["adaptive_avg_pool2d"].check(x, output_size, False)
    xs = tuple(int(s) for s in x.shape)
    grad_y = shapes.check_grad(op, grad_y, (*xs[:2], *a.output_size), "adaptive_avg_pool2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x)
    return _backward(
        "adaptive_avg_pool2d", backend, _on_device(grad_y, x), grad_y, lambda m, be: xs, (True,)
    )[0]


# --------------------------------------------------------------------------- activations


def relu(x: Input, *, backend: str = "auto") -> Any:
    """max(x, 0), elementwise. Shape: any -> same."""
    return ops.apply("relu", (x,), (), backend)


def _unary_backward(name, grad_y, x, backend, ctx_of, xname="x"):
    op = name + "_backward"
    grad_y, x = shapes.check_elementwise(op, grad_y=grad_y, **{xname: x})
    return _backward(name, backend, _on_device(grad_y, x), grad_y, ctx_of(x), (True,))[0]


def relu_backward(grad_y: Array, x: Array, *, backend: str = "auto") -> Array:
    """grad_y where x > 0, else 0 (0 at x == 0, as PyTorch). Shape: grad_y, x (same) -> grad_x."""
    return _unary_backward("relu", grad_y, x, backend, lambda x: lambda m, be: x)


def leaky_relu(x: Input, negative_slope: float = 0.01, *, backend: str = "auto") -> Any:
    """x where x > 0, else negative_slope * x. Shape: any -> same."""
    return ops.apply("leaky_relu", (x,), (negative_slope,), backend)


def leaky_relu_backward(
    grad_y: Array, x: Array, negative_slope: float = 0.01, *, backend: str = "auto"
) -> Array:
    """grad_y where x > 0, else negative_slope * grad_y. Shape: grad_y, x (same) -> grad_x."""
    slope = shapes.check_number("leaky_relu_backward", "negative_slope", negative_slope)
    return _unary_backward("leaky_relu", grad_y, x, backend, lambda x: lambda m, be: (x, slope))


def elu(x: Input, alpha: float = 1.0, *, backend: str = "auto") -> Any:
    """x where x > 0, else alpha * (exp(x) - 1). Shape: any -> same."""
    return ops.apply("elu", (x,), (alpha,), backend)


def elu_backward(grad_y: Array, x: Array, alpha: float = 1.0, *, backend: str = "auto") -> Array:
    """grad_y where x > 0, else grad_y * alpha * exp(x). Shape: grad_y, x (same) -> grad_x."""
    alpha = shapes.check_number("elu_backward", "alpha", alpha)
    return _unary_backward("elu", grad_y, x, backend, lambda x: lambda m, be: (x, alpha))


def sigmoid(x: Input, *, backend: str = "auto") -> Any:
    """1 / (1 + exp(-x)), overflow-free for large |x|. Shape: any -> same."""
    return ops.apply("sigmoid", (x,), (), backend)


def sigmoid_backward(grad_y: Array, y: Array, *, backend: str = "auto") -> Array:
    """grad_y * y * (1 - y), from the forward OUTPUT y. Shape: grad_y, y (same) -> grad_x."""
    return _unary_backward("sigmoid", grad_y, y, backend, lambda y: lambda m, be: y, "y")


def tanh(x: Input, *, backend: str = "auto") -> Any:
    """tanh(x), elementwise. Shape: any -> same."""
    return ops.apply("tanh", (x,), (), backend)


def tanh_backward(grad_y: Array, y: Array, *, backend: str = "auto") -> Array:
    """grad_y * (1 - y^2), from the forward OUTPUT y. Shape: grad_y, y (same) -> grad_x."""
    return _unary_backward("tanh", grad_y, y, backend, lambda y: lambda m, be: y, "y")


def softmax(x: Input, dim: int, *, backend: str = "auto") -> Any:
    """exp(x) / sum(exp(x)) along ``dim`` (max-shifted: no overflow). Shape: any -> same."""
    return ops.apply("softmax", (x,), (dim,), backend)


def softmax_backward(grad_y: Array, y: Array, dim: int, *, backend: str = "auto") -> Array:
    """y * (grad_y - sum(grad_y * y, dim)), from the forward OUTPUT y."""
    op = "softmax_backward"
    d = shapes.check_dim(op, dim, len(shapes.check_float(op, "y", y).shape))
    return _unary_backward("softmax", grad_y, y, backend, lambda y: lambda m, be: (y, d), "y")


def log_softmax(x: Input, dim: int, *, backend: str = "auto") -> Any:
    """x - logsumexp(x) along ``dim``. Shape: any -> same."""
    return ops.apply("log_softmax", (x,), (dim,), backend)


def log_softmax_backward(grad_y: Array, y: Array, dim: int, *, backend: str = "auto") -> Array:
    """grad_y - exp(y) * sum(grad_y, dim), from the forward OUTPUT y."""
    op = "log_softmax_backward"
    d = shapes.check_dim(op, dim, len(shapes.check_float(op, "y", y).shape))
    return _unary_backward("log_softmax", grad_y, y, backend, lambda y: lambda m, be: (y, d), "y")


# --------------------------------------------------------------------------- linear


def linear(x: Input, weight: Input, bias: Input | None = None, *, backend: str = "auto") -> Any:
    """Affine map y = x @ weight.T + bias (PyTorch's layout).

    Shape:
        x (N, in_features), weight (out_features, in_features), bias (out_features,)
        -> y (N, out_features).
    """
    return ops.apply("linear", (x, weight, bias), (), backend)


def linear_relu(
    x: Input, weight: Input, bias: Input | None = None, *, backend: str = "auto"
) -> Any:
    """relu(linear(...)) as one op: bias and ReLU in the GEMM's epilogue. Shape: as ``linear``."""
    return ops.apply("linear_relu", (x, weight, bias), (), backend)


def linear_backward(
    grad_y: Array,
    x: Array,
    weight: Array,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    backend: str = "auto",
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``linear``: (grad_x, grad_weight, grad_bias); None where output_mask is False.

    Shape:
        grad_y (N, out), x (N, in), weight (out, in) -> grad_x (N, in), grad_weight (out, in),
        grad_bias (out,).
    """
    op = "linear_backward"
    grad_y, x, weight = shapes.check_linear_grad(op, grad_y, x, weight)
    mask = tuple(bool(m) for m in output_mask)
    ctx = ops.LinearCtx(x, weight)
    return _backward("linear", backend, _on_device(grad_y, x), grad_y, lambda m, be: ctx, mask)


# --------------------------------------------------------------------------- losses


def _loss(name: str, args: tuple, params: tuple, backend: str):
    """Arrays: (loss as a Python float, gradient w.r.t. the first input), as the kernels give
    them. Tensors: the loss as a 0-d Tensor of the input's dtype, recorded."""
    if _has_tensor(*args):
        return ops.apply(name, args, params, backend)
    op = ops.OPS[name]
    arrays, a = op.check(*args, *params, False)
    be, a = ops.choose(op, arrays, a, backend, "auto")
    m = ops.backend_module(name, be)
    try:
        return ops.LOSS_FORWARD[name](m, *arrays, a)[0]
    except AttributeError as e:
        raise ops.missing(e, m, be) from None


def cross_entropy(
    logits: Input, labels: Input, *, label_smoothing: float = 0.0, backend: str = "auto"
) -> Any:
    """Mean softmax cross-entropy through a numerically stable log-softmax, with PyTorch's
    ``label_smoothing`` (the target is (1 - eps) onehot + eps / classes).

    Arrays in: ``(loss, grad_logits)``, loss a Python float and grad_logits
    (softmax(z) - target) / N. Tensors in: the loss as a 0-d Tensor (``float(loss)``,
    ``loss.backward()``).

    Shape: logits (N, classes), labels (N,) integer class indices.
    """
    return _loss("cross_entropy", (logits, labels), (label_smoothing,), backend)


def nll_loss(logp: Input, labels: Input, *, backend: str = "auto") -> Any:
    """Mean negative log-likelihood -mean_n logp[n, labels[n]] (after ``log_softmax``).

    Arrays in: ``(loss, grad_logp)``; Tensors in: a 0-d Tensor.
    Shape: logp (N, classes), labels (N,) integer class indices.
    """
    return _loss("nll_loss", (logp, labels), (), backend)


def mse_loss(pred: Input, target: Input, *, backend: str = "auto") -> Any:
    """Mean squared error mean((pred - target)^2).

    Arrays in: ``(loss, 2 (pred - target) / numel)``; Tensors in: a 0-d Tensor.
    Shape: pred, target (any, same).
    """
    return _loss("mse_loss", (pred, target), (), backend)


# --------------------------------------------------------------------------- dropout, batch norm


def dropout(x: Input, keep_mask: Array, scale: float, *, backend: str = "auto") -> Any:
    """Inverted dropout with a given mask: y = x * keep_mask * scale.

    The backward pass is the same call on grad_y. Callers draw the mask (keep probability
    1 - p) and pass scale = 1 / (1 - p), so the expected activation is unchanged.

    Shape: x (any), keep_mask (x's shape; bool or x's dtype) -> y (x's shape).
    """
    return ops.apply("dropout", (x, keep_mask), (scale,), backend)


def batch_norm2d(
    x: Input,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Input | None = None,
    bias: Input | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Any:
    """Batch normalisation per channel (PyTorch's semantics).

    In training the batch statistics (biased variance) normalise x and the running statistics,
    if given, are updated IN PLACE with the unbiased variance: r = (1 - momentum) r + momentum
    * batch. In evaluation the running statistics normalise x.

    Arrays in: ``(y, save_mean, save_invstd)`` (the last two feed ``batch_norm2d_backward``).
    Tensors in: y as a Tensor, recorded (its backward uses the batch statistics).

    Shape:
        x (N, C, H, W), running_mean/running_var/weight/bias (C,) -> y (N, C, H, W),
        save_mean (C,), save_invstd (C,).
    """
    params = (running_mean, running_var, training, momentum, eps)
    if _has_tensor(x, weight, bias):
        return ops.apply("batch_norm2d", (x, weight, bias), params, backend)
    op = ops.OPS["batch_norm2d"]
    arrays, a = op.check(x, weight, bias, *params, False)
    be, a = ops.choose(op, arrays, a, backend, "auto")
    return ops.batch_norm_forward(ops.backend_module(op.name, be), *arrays, a)[0]


def batch_norm2d_relu(
    x: Input,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Input | None = None,
    bias: Input | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    residual: Input | None = None,
    backend: str = "auto",
) -> Any:
    """relu(batch_norm2d(...) + residual) as one op (no residual: relu(batch_norm2d(...))):
    the add and the ReLU applied in the normalising pass, the ReLU's gradient mask read by the
    backward's passes. What ``Sequential`` runs for BatchNorm2d followed by ReLU, and what the
    zoo's ResNet blocks (their bn2 + shortcut + ReLU), VGG and Inception units call.

    Arrays in: ``(y, save_mean, save_invstd)``; the gradients are
    ``batch_norm2d_backward(..., relu_output=y)`` (the residual's: ``relu_backward(grad_y,
    y)``). Tensors in: y as a Tensor, recorded (gradients for x, weight, bias and residual).

    Shape: as ``batch_norm2d``; residual as x.
    """
    params = (running_mean, running_var, training, momentum, eps)
    if _has_tensor(x, weight, bias, residual):
        return ops.apply("batch_norm2d_relu", (x, weight, bias, residual), params, backend)
    op = ops.OPS["batch_norm2d_relu"]
    arrays, a = op.check(x, weight, bias, residual, *params, False)
    be, a = ops.choose(op, arrays, a, backend, "auto")
    y, ctx = ops.batch_norm_relu_forward(ops.backend_module(op.name, be), *arrays, a)
    return y, ctx.mean, ctx.invstd


def batch_norm2d_backward(
    grad_y: Array,
    x: Array,
    weight: Array | None,
    save_mean: Array,
    save_invstd: Array,
    training: bool = True,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    relu_output: Array | None = None,
    backend: str = "auto",
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``batch_norm2d``: (grad_x, grad_weight, grad_bias); None where masked.

    ``training`` must match the forward call: in training the batch statistics depend on x,
    which adds two terms to grad_x. ``relu_output``: the y of ``batch_norm2d_relu``, whose
    gradients these then are (grad_y counts only where y > 0).

    Shape: grad_y, x (N, C, H, W); weight/save_mean/save_invstd (C,) -> (N, C, H, W), (C,), (C,).
    """
    op = "batch_norm2d_backward"
    x = shapes.check_array(op, "x", x, 4, "(N, C, H, W)")
    grad_y = shapes.check_grad(op, grad_y, shapes._shape_of(x), "batch_norm2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x)
    vec = shapes.check_channel_vectors(
        op, x, weight=weight, save_mean=save_mean, save_invstd=save_invstd
    )
    if save_mean is None or save_invstd is None:
        raise ValueError(f"{op}: save_mean and save_invstd (from batch_norm2d) are required")
    mask = tuple(bool(m) for m in output_mask)
    name = "batch_norm2d"
    y = None
    if relu_output is not None:
        name = "batch_norm2d_relu"
        y = shapes.check_like_x(op, "relu_output", relu_output, x)
    ctx = ops.BNCtx(
        x, vec["weight"], vec["save_mean"], vec["save_invstd"], bool(training), None, y
    )
    out = _backward(name, backend, _on_device(grad_y, x), grad_y, lambda m, be: ctx, mask)
    return tuple(out[:3])


def batch_norm1d(
    x: Input,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Input | None = None,
    bias: Input | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> Any:
    """Batch normalisation of (N, C) or (N, C, L) inputs per channel (``F.batch_norm`` on 2-D
    and 3-D inputs): ``batch_norm2d`` on the (N, C, 1, L) view, so the same kernels run.

    Returns as ``batch_norm2d`` (arrays: (y, save_mean, save_invstd); Tensors: y).
    Shape: x (N, C) or (N, C, L) -> same.
    """
    op = "batch_norm1d"
    xa = x.data if isinstance(x, Tensor) else x
    shape = tuple(int(s) for s in shapes.check_float(op, "x", xa).shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"{op}: x must be 2-D (N, C) or 3-D (N, C, L); got x.shape={shape}")
    x4 = x.reshape(shape[0], shape[1], 1, shape[2] if len(shape) == 3 else 1)
    out = batch_norm2d(
        x4, running_mean, running_var, weight, bias, training, momentum, eps, backend=backend
    )
    if isinstance(out, tuple):
        return (out[0].reshape(shape), *out[1:])
    return out.reshape(shape)


# --------------------------------------------------------------------------- tensor ops


def add(a: Input, b: Input, *, backend: str = "auto") -> Any:
    """a + b with NumPy broadcasting. Shape: broadcast(a, b)."""
    return ops.apply("add", (a, b), (), backend)


def sub(a: Input, b: Input, *, backend: str = "auto") -> Any:
    """a - b with NumPy broadcasting."""
    return ops.apply("sub", (a, b), (), backend)


def mul(a: Input, b: Input, *, backend: str = "auto") -> Any:
    """a * b with NumPy broadcasting."""
    return ops.apply("mul", (a, b), (), backend)


def div(a: Input, b: Input, *, backend: str = "auto") -> Any:
    """a / b with NumPy broadcasting."""
    return ops.apply("div", (a, b), (), backend)


def matmul(a: Input, b: Input, *, backend: str = "auto") -> Any:
    """Matrix product of 2-D operands. Shape: (n, k) @ (k, m) -> (n, m)."""
    return ops.apply("matmul", (a, b), (), backend)


def sum(x: Input, axis: Any = None, keepdims: bool = False, *, backend: str = "auto") -> Any:  # noqa: A001
    """Sum over ``axis`` (None: every axis)."""
    return ops.apply("sum", (x,), (axis, keepdims), backend)


def mean(x: Input, axis: Any = None, keepdims: bool = False, *, backend: str = "auto") -> Any:
    """Mean over ``axis`` (None: every axis)."""
    return ops.apply("mean", (x,), (axis, keepdims), backend)


def reshape(x: Input, shape: Any) -> Any:
    """The same elements in a new shape (one -1 allowed); a view where possible."""
    return ops.apply("reshape", (x,), (shape,))


def transpose(x: Input) -> Any:
    """The transpose of a 2-D input (a contiguous copy)."""
    return ops.apply("transpose", (x,), ())


def getitem(x: Input, index: Any) -> Any:
    """Basic indexing (ints, slices, ..., None), e.g. channel slicing ``x[:, 2:5]``; the
    gradient goes back to the selected elements."""
    return ops.apply("getitem", (x,), (index,))


def to(x: Input, target: Any) -> Any:
    """x on "cpu" | "cuda" or cast to float32 | float64 (the gradient moves back)."""
    if isinstance(target, str):
        device, dtype = target, None
        if device not in ("cpu", "cuda"):
            raise ValueError(f"to: device must be 'cpu' or 'cuda'; got {device!r}")
    else:
        device, dtype = None, target
    xa = x.data if isinstance(x, Tensor) else x
    same_place = device is None or (device == "cuda") == _on_device(xa)
    if same_place and (dtype is None or np.dtype(dtype) == np.dtype(xa.dtype)):
        return x
    return ops.apply("to", (x,), (device, dtype))


def cat(tensors: Any, dim: int = 0, *, backend: str = "auto") -> Any:
    """Concatenate along ``dim`` (e.g. an Inception block's branches on channels, dim=1).

    Shape: equal except along ``dim`` -> the sizes along ``dim`` added.
    """
    tensors = tuple(tensors)
    return ops.apply("cat", tensors, (dim,), backend)


def flatten(x: Input, start_dim: int = 1, end_dim: int = -1) -> Any:
    """Merge axes start_dim..end_dim into one (a view where possible). The default keeps the
    batch axis, as ``nn.Flatten``; ``Tensor.flatten`` starts at 0, as PyTorch's.

    Shape: x (N, d1, d2, ...) -> (N, d1*d2*...) by default.
    """
    xa = x.data if isinstance(x, Tensor) else x
    if not (isinstance(xa, np.ndarray) or shapes.is_device_array(xa)):
        raise TypeError(
            f"flatten: x must be a NumPy array, a CUDA device array or a Tensor; "
            f"got {type(x).__name__}"
        )
    shape = tuple(int(s) for s in xa.shape)
    if len(shape) < 1:
        raise ValueError(f"flatten: x must have at least one axis; got x.shape={shape}")
    s = shapes.check_dim("flatten", start_dim, len(shape))
    e = shapes.check_dim("flatten", end_dim, len(shape))
    if s > e:
        raise ValueError(f"flatten: start_dim={start_dim} comes after end_dim={end_dim}")
    new = shape[:s] + (math.prod(shape[s : e + 1]),) + shape[e + 1 :]
    if isinstance(x, Tensor):
        return ops.view(x, new)
    return xa.reshape(new)


# --------------------------------------------------------------------------- optimizer updates
# In place on the parameters and their state; never recorded (they run under no_grad).


def _run(op: str, backend: str, fn: str, *arrays: Any):
    """The callable implementing ``fn`` for these arrays: the backend module's op (the oracle
    through its in-place adapter in ``ops.UPDATES``)."""
    if _warm.route(backend, arrays):  # warm start: the oracle, the worker compiles the kernel
        ref = ops.update_kernel(fn, "reference")

        def update(*args):
            _warm.offer("update", fn, args)
            return ref(*args)

        return update
    be = dispatch.choose(op, None, backend, "auto", _on_device(*arrays)).backend
    return ops.update_kernel(fn, be)


def _sgd_numbers(op, lr, momentum, dampening, weight_decay, nesterov):
    """SGD's hyperparameters checked: (lr, momentum, dampening, weight_decay) as floats."""
    lr = shapes.check_number(op, "lr", lr, lo=0.0)
    momentum = shapes.check_number(op, "momentum", momentum, lo=0.0)
    dampening = shapes.check_number(op, "dampening", dampening)
    weight_decay = shapes.check_number(op, "weight_decay", weight_decay, lo=0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{op}: nesterov needs momentum > 0 and dampening == 0; "
            f"got momentum={momentum}, dampening={dampening}"
        )
    return lr, momentum, dampening, weight_decay


def sgd_update(
    p: Array,
    grad: Array,
    buf: Array | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first: bool = True,
    *,
    backend: str = "auto",
) -> None:
    """One SGD step with PyTorch's rule, IN PLACE on p and buf (``torch.optim.SGD``).

    g = grad + weight_decay * p; with momentum, buf = g on the first step, else
    buf = momentum * buf + (1 - dampening) * g; g = g + momentum * buf (nesterov) or buf;
    p -= lr * g. ``buf`` may be None when momentum == 0.

    Shape: p, grad, buf (any, same).
    """
    op = "sgd_update"
    lr, momentum, dampening, weight_decay = _sgd_numbers(
        op, lr, momentum, dampening, weight_decay, nesterov
    )
    if momentum != 0 and buf is None:
        raise ValueError(f"{op}: momentum={momentum} needs a momentum buffer (buf is None)")
    grad = shapes.check_update(op, p, grad, buf=buf if momentum != 0 else None)
    impl = _run(op, backend, "sgd_update", p, grad)
    impl(p, grad, buf, lr, momentum, dampening, weight_decay, bool(nesterov), bool(first))
    return None


def sgd_update_many(
    params: list,
    grads: list,
    bufs: list | None,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    first: bool | list = True,
    *,
    backend: str = "auto",
) -> None:
    """``sgd_update`` on every (p, grad, buf) triple, IN PLACE: what ``optim.SGD.step`` calls.

    The numbers are checked once for all; on the CPU each triple costs a few microseconds (a
    lean check and one kernel call) instead of a full ``sgd_update`` call's ~20 us, which was
    ~10 % of LeNet-5's batch-64 step. ``bufs`` may be None when momentum == 0; ``first`` is one
    bool for all or one per triple. Results are those of ``sgd_update`` on each triple.
    """
    op = "sgd_update_many"
    n = len(params)
    firsts = [bool(first)] * n if isinstance(first, (bool, np.bool_)) else [bool(f) for f in first]
    if len(grads) != n or len(firsts) != n or (bufs is not None and len(bufs) != n):
        raise ValueError(
            f"{op}: params, grads, bufs and first must have one entry per parameter; got "
            f"{n}, {len(grads)}, {'None' if bufs is None else len(bufs)} and {len(firsts)}"
        )
    lr, momentum, dampening, weight_decay = _sgd_numbers(
        op, lr, momentum, dampening, weight_decay, nesterov
    )
    if momentum != 0 and (bufs is None or any(b is None for b in bufs)):
        raise ValueError(f"{op}: momentum={momentum} needs a momentum buffer for every parameter")
    if n == 0:
        return None
    used = bufs if momentum != 0 else [None] * n
    if _warm.route(backend, params):  # warm start: the oracle, the worker compiles the kernel
        args = (params, grads, used, lr, momentum, dampening, weight_decay, bool(nesterov), firsts)
        _warm.offer("update", op, args)
        be = "reference"
    else:
        be = dispatch.choose(op, None, backend, "auto", _on_device(*params, *grads)).backend
    impl = ops.update_kernel(op, be)
    if impl is None:  # the oracle, or a backend without the fused loop: one call per triple
        for p, g, b, f in zip(params, grads, used, firsts, strict=True):
            sgd_update(p, g, b, lr, momentum, dampening, weight_decay, nesterov, f, backend=be)
        return None
    grads = [
        g if shapes.fit_for_update(p, g, b) else shapes.check_update(op, p, g, buf=b)
        for p, g, b in zip(params, grads, used, strict=True)
    ]
    impl(params, grads, used, lr, momentum, dampening, weight_decay, bool(nesterov), firsts)
    return None


def adam_update(
    p: Array,
    grad: Array,
    m: Array,
    v: Array,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int = 1,
    *,
    backend: str = "auto",
) -> None:
    """One Adam step with PyTorch's rule (L2 weight decay, bias correction), IN PLACE on p, m, v.

    ``step`` counts from 1 (the number of updates including this one).

    Shape: p, grad, m, v (any, same).
    """
    op = "adam_update"
    lr = shapes.check_number(op, "lr", lr, lo=0.0)
    beta1 = shapes.check_number(op, "beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = shapes.check_number(op, "beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    eps = shapes.check_number(op, "eps", eps, lo=0.0)
    weight_decay = shapes.check_number(op, "weight_decay", weight_decay, lo=0.0)
    step = shapes.check_step(op, step)
    if m is None or v is None:
        raise ValueError(f"{op}: the moment buffers m and v are required")
    grad = shapes.check_update(op, p, grad, m=m, v=v)
    impl = _run(op, backend, "adam_update", p, grad)
    impl(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step)
    return None


def rmsprop_update(
    p: Array,
    grad: Array,
    square_avg: Array,
    grad_avg: Array | None,
    buf: Array | None,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    backend: str = "auto",
) -> None:
    """One RMSprop step with PyTorch's rule, IN PLACE on p, square_avg, grad_avg and buf
    (``torch.optim.RMSprop``).

    g = grad + weight_decay * p; s = alpha s + (1-alpha) g^2; centred: gbar = alpha gbar +
    (1-alpha) g and avg = sqrt(s - gbar^2) + eps, else avg = sqrt(s) + eps; with momentum
    buf = momentum buf + g / avg and p -= lr buf, else p -= lr g / avg. ``grad_avg`` may be
    None unless centered, ``buf`` None unless momentum > 0.

    Shape: p, grad, square_avg, grad_avg, buf (any, same).
    """
    op = "rmsprop_update"
    lr = shapes.check_number(op, "lr", lr, lo=0.0)
    alpha = shapes.check_number(op, "alpha", alpha, lo=0.0, hi=1.0)
    eps = shapes.check_number(op, "eps", eps, lo=0.0)
    weight_decay = shapes.check_number(op, "weight_decay", weight_decay, lo=0.0)
    momentum = shapes.check_number(op, "momentum", momentum, lo=0.0)
    centered = bool(centered)
    if square_avg is None:
        raise ValueError(f"{op}: the square average buffer square_avg is required")
    if centered and grad_avg is None:
        raise ValueError(f"{op}: centered=True needs a gradient average buffer (grad_avg is None)")
    if momentum > 0 and buf is None:
        raise ValueError(f"{op}: momentum={momentum} needs a momentum buffer (buf is None)")
    grad_avg = grad_avg if centered else None
    buf = buf if momentum > 0 else None
    grad = shapes.check_update(op, p, grad, square_avg=square_avg, grad_avg=grad_avg, buf=buf)
    impl = _run(op, backend, "rmsprop_update", p, grad)
    impl(p, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered)
    return None


def adagrad_update(
    p: Array,
    grad: Array,
    state_sum: Array,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    step: int = 1,
    *,
    backend: str = "auto",
) -> None:
    """One Adagrad step with PyTorch's rule, IN PLACE on p and state_sum
    (``torch.optim.Adagrad``).

    g = grad + weight_decay * p; clr = lr / (1 + (step - 1) lr_decay); sum += g^2;
    p -= clr g / (sqrt(sum) + eps). ``step`` counts from 1 (this update included).

    Shape: p, grad, state_sum (any, same).
    """
    op = "adagrad_update"
    lr = shapes.check_number(op, "lr", lr, lo=0.0)
    lr_decay = shapes.check_number(op, "lr_decay", lr_decay, lo=0.0)
    weight_decay = shapes.check_number(op, "weight_decay", weight_decay, lo=0.0)
    eps = shapes.check_number(op, "eps", eps, lo=0.0)
    step = shapes.check_step(op, step)
    if state_sum is None:
        raise ValueError(f"{op}: the accumulator state_sum is required")
    grad = shapes.check_update(op, p, grad, state_sum=state_sum)
    impl = _run(op, backend, "adagrad_update", p, grad)
    impl(p, grad, state_sum, lr, lr_decay, weight_decay, eps, step)
    return None
