"""The functional API: validate (shapes) -> choose (dispatch) -> run (backend ops module).

Notation: x (N, C, H, W), weight (K, C/groups, KH, KW), y (N, K, OH, OW). Semantics, layouts and
output sizes follow ``torch.nn.functional``. float32 and float64 in, same dtype out.

NaN and inf propagate as in PyTorch: no op checks for them (a NaN anywhere in a window or a
receptive field makes that output NaN; max pooling treats NaN as the largest value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dispatch, reference, shapes

Array = Any  # np.ndarray or a CUDA device array
IntPair = int | tuple[int, int]


def _on_device(*arrays: Any) -> bool:
    return any(shapes.is_device_array(a) for a in arrays if a is not None)


def _host(op: str, backend: str, *arrays: Any) -> None:
    if backend == "reference" and _on_device(*arrays):
        raise ValueError(f"{op}: backend='reference' needs host (NumPy) arrays")


# --------------------------------------------------------------------------- convolution


def conv2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: IntPair = 1,
    padding: IntPair | str = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Array:
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
    op = "conv2d"
    x, weight, bias, g = shapes.check_conv2d(op, x, weight, bias, stride, padding, dilation, groups)
    be, algo = dispatch.choose(op, g, backend, algorithm, _on_device(x, weight, bias))
    if be == "reference":
        return reference.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return dispatch.backend_ops(op, be).conv2d(x, weight, bias, g, algo)


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
    x, weight, _, g = shapes.check_conv2d(op, x, weight, None, stride, padding, dilation, groups)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x, weight=weight)
    be, algo = dispatch.choose(op, g, backend, algorithm, _on_device(grad_y, x, weight))
    mask = tuple(bool(m) for m in output_mask)
    if be == "reference":
        out = reference.conv2d_backward(grad_y, x, weight, stride, padding, dilation, groups)
        return tuple(o if m else None for o, m in zip(out, mask))
    return dispatch.backend_ops(op, be).conv2d_backward(grad_y, x, weight, g, algo, mask)


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
    weight = shapes.check_array(op, "weight", weight, 4, "(K, C/groups, KH, KW)")
    g = shapes.conv2d_geometry(op, x_shape, weight.shape, stride, padding, dilation, groups)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    shapes.check_same_dtype(op, grad_y=grad_y, weight=weight)
    shapes.check_same_place(op, grad_y=grad_y, weight=weight)
    be, algo = dispatch.choose(op, g, backend, algorithm, _on_device(grad_y, weight))
    if be == "reference":
        x0 = np.zeros(x_shape, grad_y.dtype)
        return reference.conv2d_backward(grad_y, x0, weight, stride, padding, dilation, groups)[0]
    ops = dispatch.backend_ops(op, be)
    return ops.conv2d_backward(grad_y, None, weight, g, algo, (True, False, False))[0]


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
    x = shapes.check_array(op, "x", x, 4, "(N, C, H, W)")
    g = shapes.conv2d_geometry(op, x.shape, weight_shape, stride, padding, dilation, groups)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "conv2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x)
    be, algo = dispatch.choose(op, g, backend, algorithm, _on_device(grad_y, x))
    if be == "reference":
        w0 = np.zeros(weight_shape, x.dtype)
        return reference.conv2d_backward(grad_y, x, w0, stride, padding, dilation, groups)[1]
    ops = dispatch.backend_ops(op, be)
    return ops.conv2d_backward(grad_y, x, None, g, algo, (False, True, False))[1]


def conv_transpose2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    output_padding: IntPair = 0,
    groups: int = 1,
    dilation: IntPair = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Array:
    """Transposed convolution (PyTorch's argument order): the backward-data pass of ``conv2d``.

    Shape:
        x (N, C_in, H, W), weight (C_in, C_out/groups, KH, KW), bias (C_out,) -> y (N, C_out, OH, OW)
        with OH = (H-1)*sh - 2*ph + dh*(KH-1) + oph + 1 (likewise OW).
    """
    op = "conv_transpose2d"
    x = shapes.check_array(op, "x", x, 4, "(N, C_in, H, W)")
    weight = shapes.check_array(op, "weight", weight, 4, "(C_in, C_out/groups, KH, KW)")
    shapes.check_same_dtype(op, x=x, weight=weight)
    g = shapes.conv_transpose2d_geometry(
        op, x.shape, weight.shape, stride, padding, output_padding, dilation, groups
    )
    if bias is not None:
        bias = shapes.check_array(op, "bias", bias, 1, "(C_out,)")
        shapes.check_same_dtype(op, x=x, bias=bias)
        if tuple(bias.shape) != (g.C,):
            raise ValueError(f"{op}: bias must have shape ({g.C},); got bias.shape={bias.shape}")
    y = conv2d_backward_input(
        x, g.x_shape, weight, (g.sh, g.sw), (g.ph, g.pw), (g.dh, g.dw), g.G,
        backend=backend, algorithm=algorithm,
    )
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


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
    x = shapes.check_array(op, "x", x, 4, "(N, C_in, H, W)")
    weight = shapes.check_array(op, "weight", weight, 4, "(C_in, C_out/groups, KH, KW)")
    g = shapes.conv_transpose2d_geometry(
        op, x.shape, weight.shape, stride, padding, output_padding, dilation, groups
    )
    grad_y = shapes.check_grad(op, grad_y, g.x_shape, "conv_transpose2d")
    conv = dict(stride=(g.sh, g.sw), padding=(g.ph, g.pw), dilation=(g.dh, g.dw), groups=g.G,
                backend=backend, algorithm=algorithm)
    gx = conv2d(grad_y, weight, None, **conv)
    gw = conv2d_backward_weight(x, grad_y, g.w_shape, **conv)
    gb = grad_y.sum(axis=(0, 2, 3))
    return gx, gw, gb


# --------------------------------------------------------------------------- pooling


def _pool(op, fn, x, grad_y, kernel_size, stride, padding, ceil_mode, count_include_pad, backend):
    x, g = shapes.check_pool2d(op, x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    arrays = (x,)
    if grad_y is not None:
        grad_y = shapes.check_grad(op, grad_y, g.y_shape, op.replace("_backward", ""))
        shapes.check_same_dtype(op, grad_y=grad_y, x=x)
        shapes.check_same_place(op, grad_y=grad_y, x=x)
        arrays = (grad_y, x)
    be, _ = dispatch.choose(op, g, backend, "auto", _on_device(*arrays))
    if be == "reference":
        extra = {} if fn.startswith("max") else {"count_include_pad": count_include_pad}
        return getattr(reference, fn)(*arrays, kernel_size, stride, padding, ceil_mode, **extra)
    return getattr(dispatch.backend_ops(op, be), fn)(*arrays, g)


def max_pool2d(
    x: Array, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    *, ceil_mode: bool = False, backend: str = "auto",
) -> Array:
    """2-D max pooling; padding counts as -inf; NaN wins over every number (as in PyTorch).

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), OH = floor((H + 2*ph - KH) / sh) + 1
    (ceil in ``ceil_mode``). stride defaults to kernel_size; padding <= kernel_size / 2.
    """
    return _pool("max_pool2d", "max_pool2d", x, None, kernel_size, stride, padding,
                 ceil_mode, True, backend)


def max_pool2d_backward(
    grad_y: Array, x: Array, kernel_size: IntPair, stride: IntPair | None = None,
    padding: IntPair = 0, *, ceil_mode: bool = False, backend: str = "auto",
) -> Array:
    """Gradient of ``max_pool2d``: each window's gradient goes to its first maximum (row-major).

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    return _pool("max_pool2d_backward", "max_pool2d_backward", x, grad_y, kernel_size, stride,
                 padding, ceil_mode, True, backend)


def avg_pool2d(
    x: Array, kernel_size: IntPair, stride: IntPair | None = None, padding: IntPair = 0,
    *, ceil_mode: bool = False, count_include_pad: bool = True, backend: str = "auto",
) -> Array:
    """2-D average pooling with zero padding; the divisor follows PyTorch's ``count_include_pad``.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), as ``max_pool2d``.
    """
    return _pool("avg_pool2d", "avg_pool2d", x, None, kernel_size, stride, padding,
                 ceil_mode, count_include_pad, backend)


def avg_pool2d_backward(
    grad_y: Array, x: Array, kernel_size: IntPair, stride: IntPair | None = None,
    padding: IntPair = 0, *, ceil_mode: bool = False, count_include_pad: bool = True,
    backend: str = "auto",
) -> Array:
    """Gradient of ``avg_pool2d``: every input in a window receives grad_y / divisor.

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    return _pool("avg_pool2d_backward", "avg_pool2d_backward", x, grad_y, kernel_size, stride,
                 padding, ceil_mode, count_include_pad, backend)
