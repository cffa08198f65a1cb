"""The functional API: validate (shapes) -> choose (dispatch) -> run (backend ops module).

Notation: x (N, C, H, W), weight (K, C/groups, KH, KW), y (N, K, OH, OW). Semantics, layouts and
output sizes follow ``torch.nn.functional``. float32 and float64 in, same dtype out.

NaN and inf propagate as in PyTorch: no op checks for them (a NaN anywhere in a window or a
receptive field makes that output NaN; max pooling treats NaN as the largest value).
"""

from __future__ import annotations

import math
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
    saved: dict | None = None,
    activation: str | None = None,
    pool: IntPair | None = None,
) -> Array:
    """2-D convolution (cross-correlation, as in PyTorch).

    Args:
        x: input batch. weight: filters. bias: one value per output channel, or None.
        stride, dilation: int or (h, w), positive. padding: int, (h, w), 'same' (stride 1 only)
            or 'valid'; zero padding. groups: number of channel groups (C for depthwise).
        backend: "auto" | "reference" | "cpu" | "cuda". algorithm: "auto" | "im2col" | "direct".
        saved: optional dict the caller keeps until ``conv2d_backward`` (layers do). The
            im2col path leaves its column matrix there, and the backward pass given the same
            dict and the very same ``x`` object reuses it instead of rebuilding it. The
            gradients are then those of the forward call's input, even if ``x`` was changed
            in place meanwhile.
        activation: None, or "relu" for relu(conv2d(...)) with bias and ReLU applied in the
            kernels' last pass (``Sequential`` uses it for a Conv2d followed by a ReLU). The
            gradient through the ReLU is ``relu_backward(grad_y, y)``: y > 0 exactly where
            the pre-activation is.
        pool: None, or a window size k (int or (kh, kw)) for
            ``max_pool2d(activation(conv2d(...)), k)``: max pooling with stride k, no padding,
            floor mode, fused into the same last pass, so the full-size output is never written
            (``Sequential`` uses it for Conv2d, ReLU, MaxPool2d(k)). Its gradient comes from
            ``conv2d_backward(..., activation=..., pool=k, saved=saved)`` with the dict given here.

    Shape:
        x (N, C, H, W), weight (K, C/groups, KH, KW), bias (K,) -> y (N, K, OH, OW) with
        OH = floor((H + 2*ph - dh*(KH-1) - 1) / sh) + 1 (likewise OW); with ``pool``
        (N, K, OH // kh, OW // kw).
    """
    op = "conv2d"
    x, weight, bias, g = shapes.check_conv2d(op, x, weight, bias, stride, padding, dilation, groups)
    relu, pg = _fused(op, g, activation, pool)
    fn = "conv2d" if not relu else "conv2d_bias_relu"

    def run(be, algo, keep=None):
        ops = dispatch.backend_ops(op, be)
        if pg is not None:
            return ops.conv2d_pool(x, weight, bias, g, pg, relu, algo, keep)
        return getattr(ops, fn)(x, weight, bias, g, algo, keep)

    be, algo = dispatch.choose(  # each candidate timed on this very call (fusions included)
        op,
        g,
        backend,
        algorithm,
        _on_device(x, weight, bias),
        x.dtype,
        lambda a: _timed_call(run, a, None if saved is None else {}),
        variant=_variant(relu, pg),
    )
    if be == "reference":
        y = reference.conv2d(x, weight, bias, stride, padding, dilation, groups)
        y = y if activation is None else np.maximum(y, 0)
        if saved is not None:
            saved.clear()  # no stale record of another call
        if pg is None:
            return y
        if saved is not None:
            saved["pool"] = y
        y = reference.max_pool2d(y, (pg.KH, pg.KW))
    else:
        y = run(be, algo, saved)
    if saved is not None and pg is not None:  # what conv2d_backward checks
        saved["fused"] = (x, g, relu, pg, be)
    return y


def _timed_call(run: Any, algorithm: str, scratch: dict | None):
    """The autotuner's candidate: ``run`` on the CPU with one algorithm. ``scratch`` stands in
    for the caller's saved dict and lives across the timed calls, so buffers kept there are
    reused after the warm-up call, as they are from one training step to the next."""
    return lambda: run("cpu", algorithm, scratch)


def _variant(relu: bool, pg: Any, mask: tuple | None = None) -> str:
    """The part of an autotune key beyond (op, geometry, dtype, threads): the fusions and
    which gradients are asked for, since each changes what the candidates do."""
    out = "" if mask is None else str(mask)
    if relu:
        out += "+relu"
    return out if pg is None else f"{out}+pool{pg.KH}x{pg.KW}"


def _fused(op: str, g: shapes.ConvGeom, activation: Any, pool: Any):
    """(relu, pooling geometry or None) of conv2d's ``activation`` and ``pool`` arguments."""
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu'; got {activation!r}")
    if pool is None:
        return activation == "relu", None
    kh, kw = shapes.pair(op, "pool", pool, minimum=1)
    if kh > g.OH or kw > g.OW:
        raise ValueError(
            f"{op}: the pooling window pool={(kh, kw)} is larger than the convolution output "
            f"({g.OH}x{g.OW}); x.shape={(g.N, g.C, g.H, g.W)}"
        )
    return activation == "relu", shapes.pool2d_geometry(op, g.y_shape, (kh, kw))


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
    saved: dict | None = None,
    activation: str | None = None,
    pool: IntPair | None = None,
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``conv2d`` with respect to x, weight and bias.

    ``output_mask`` (as in PyTorch's convolution_backward) skips the gradients not needed;
    those come back as None. ``saved``: the dict given to the forward ``conv2d`` call, if any.
    With ``pool`` (and ``activation``) as in that forward call, grad_y is the gradient of its
    pooled output, and ``saved`` is required: it holds what the forward pass kept (the pooled
    output and each window's argmax on the CPU). Without ``pool``, ``activation`` must be None
    (the gradient through a fused ReLU alone is ``relu_backward(grad_y, y)``).

    Shape:
        grad_y (N, K, OH, OW) (with ``pool``: (N, K, OH // kh, OW // kw)),
        x (N, C, H, W), weight (K, C/groups, KH, KW)
        -> grad_x (N, C, H, W), grad_weight (K, C/groups, KH, KW), grad_bias (K,).
    """
    op = "conv2d_backward"
    x, weight, _, g = shapes.check_conv2d(op, x, weight, None, stride, padding, dilation, groups)
    relu, pg = _fused(op, g, activation, pool)
    if pg is None and relu:
        raise ValueError(
            f"{op}: activation='relu' needs pool (for a fused ReLU alone, take "
            "relu_backward(grad_y, y) first); got pool=None"
        )
    y_shape = g.y_shape if pg is None else (g.N, g.K, pg.OH, pg.OW)
    grad_y = shapes.check_grad(op, grad_y, y_shape, "conv2d")
    shapes.check_same_dtype(op, grad_y=grad_y, x=x)
    shapes.check_same_place(op, grad_y=grad_y, x=x, weight=weight)
    mask = tuple(bool(m) for m in output_mask)
    if pg is not None:
        fused = None if saved is None else saved.get("fused")
        if fused is None or fused[0] is not x or fused[1:4] != (g, relu, pg):
            raise ValueError(
                f"{op}: pool={pool!r}, activation={activation!r} needs the saved dict of the "
                "forward conv2d call on this same x with the same arguments (it keeps the "
                f"pooled output and argmax); got saved={'None' if saved is None else 'a dict'}"
                f"{'' if saved is None else ' without a matching forward call'}"
            )

    def run(be, algo, keep=None):
        ops = dispatch.backend_ops(op, be)
        if pg is not None:
            return ops.conv2d_pool_backward(grad_y, x, weight, g, pg, relu, algo, mask, keep)
        return ops.conv2d_backward(grad_y, x, weight, g, algo, mask, keep)

    def candidate(a):  # timed for the autotuner: this very call, fused pooling included
        # (no kept columns: the im2col path rebuilds them, as after a direct forward)
        return _timed_call(run, a, None if pg is None else {"pool": saved["pool"]})

    be, algo = dispatch.choose(
        op,
        g,
        backend,
        algorithm,
        _on_device(grad_y, x, weight),
        x.dtype,
        candidate,
        variant=_variant(relu, pg, mask),
    )
    if pg is not None and saved["fused"][4] != be:
        raise ValueError(
            f"{op}: the forward call ran on backend {saved['fused'][4]!r}, its saved dict "
            f"cannot serve backend {be!r}"
        )
    if be == "reference":
        if pg is not None:
            z = saved["pool"]
            grad_y = reference.max_pool2d_backward(grad_y, z, (pg.KH, pg.KW))
            grad_y = np.where(z > 0, grad_y, 0) if relu else grad_y
        out = reference.conv2d_backward(grad_y, x, weight, stride, padding, dilation, groups)
        return tuple(o if m else None for o, m in zip(out, mask))
    return run(be, algo, saved)


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

    def run(be, algo):
        ops = dispatch.backend_ops(op, be)
        return ops.conv2d_backward(grad_y, None, weight, g, algo, (True, False, False))[0]

    be, algo = dispatch.choose(
        op,
        g,
        backend,
        algorithm,
        _on_device(grad_y, weight),
        grad_y.dtype,
        lambda a: lambda: run("cpu", a),
    )
    if be == "reference":
        x0 = np.zeros(x_shape, grad_y.dtype)
        return reference.conv2d_backward(grad_y, x0, weight, stride, padding, dilation, groups)[0]
    return run(be, algo)


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

    def run(be, algo):
        ops = dispatch.backend_ops(op, be)
        return ops.conv2d_backward(grad_y, x, None, g, algo, (False, True, False))[1]

    be, algo = dispatch.choose(
        op, g, backend, algorithm, _on_device(grad_y, x), x.dtype, lambda a: lambda: run("cpu", a)
    )
    if be == "reference":
        w0 = np.zeros(weight_shape, x.dtype)
        return reference.conv2d_backward(grad_y, x, w0, stride, padding, dilation, groups)[1]
    return run(be, algo)


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
        x (N, C_in, H, W), weight (C_in, C_out/groups, KH, KW), bias (C_out,)
        -> y (N, C_out, OH, OW)
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
        x,
        g.x_shape,
        weight,
        (g.sh, g.sw),
        (g.ph, g.pw),
        (g.dh, g.dw),
        g.G,
        backend=backend,
        algorithm=algorithm,
    )
    if bias is not None:
        if _on_device(y):  # device arrays have no +=: the backend adds the bias in place
            dispatch.backend_ops(op, "cuda").add_bias_(y, bias)
        else:
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
    conv = dict(
        stride=(g.sh, g.sw),
        padding=(g.ph, g.pw),
        dilation=(g.dh, g.dw),
        groups=g.G,
        backend=backend,
        algorithm=algorithm,
    )
    gx = conv2d(grad_y, weight, None, **conv)
    gw = conv2d_backward_weight(x, grad_y, g.w_shape, **conv)
    gb = grad_y.sum(axis=(0, 2, 3))
    return gx, gw, gb


# --------------------------------------------------------------------------- pooling


def _pool(
    op,
    fn,
    x,
    grad_y,
    kernel_size,
    stride,
    padding,
    ceil_mode,
    count_include_pad,
    backend,
    saved=None,
):
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
    if saved is not None:  # max pooling only
        return getattr(dispatch.backend_ops(op, be), fn)(*arrays, g, saved)
    return getattr(dispatch.backend_ops(op, be), fn)(*arrays, g)


def max_pool2d(
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    backend: str = "auto",
    saved: dict | None = None,
) -> Array:
    """2-D max pooling; padding counts as -inf; NaN wins over every number (as in PyTorch).

    ``saved``: optional dict the caller keeps until ``max_pool2d_backward`` (layers do); the
    CPU backend leaves each window's argmax there, and the backward pass given the same dict
    and the very same ``x`` object scatters with it instead of searching the windows again.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), OH = floor((H + 2*ph - KH) / sh) + 1
    (ceil in ``ceil_mode``). stride defaults to kernel_size; padding <= kernel_size / 2.
    """
    return _pool(
        "max_pool2d",
        "max_pool2d",
        x,
        None,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        True,
        backend,
        saved,
    )


def max_pool2d_backward(
    grad_y: Array,
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    backend: str = "auto",
    saved: dict | None = None,
) -> Array:
    """Gradient of ``max_pool2d``: each window's gradient goes to its first maximum (row-major).
    ``saved``: the dict given to the forward ``max_pool2d`` call, if any.

    Shape: grad_y (N, C, OH, OW), x (N, C, H, W) -> grad_x (N, C, H, W).
    """
    return _pool(
        "max_pool2d_backward",
        "max_pool2d_backward",
        x,
        grad_y,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        True,
        backend,
        saved,
    )


def avg_pool2d(
    x: Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    *,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    backend: str = "auto",
) -> Array:
    """2-D average pooling with zero padding; the divisor follows PyTorch's ``count_include_pad``.

    Shape: x (N, C, H, W) -> y (N, C, OH, OW), as ``max_pool2d``.
    """
    return _pool(
        "avg_pool2d",
        "avg_pool2d",
        x,
        None,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        backend,
    )


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
    return _pool(
        "avg_pool2d_backward",
        "avg_pool2d_backward",
        x,
        grad_y,
        kernel_size,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        backend,
    )


# ---- layers' other math
# Activations, linear, losses, dropout, batch norm, 1-D convolution and optimizer updates. Same
# pattern as above: validate (shapes) -> choose (dispatch; these ops have no algorithm choice)
# -> run the backend module's op of the same name. Optimizer updates work in place.


def _run(op: str, backend: str, fn: str, *arrays: Any):
    """The callable implementing ``fn`` for these arrays: the oracle or a backend module's op."""
    be = dispatch.choose(op, None, backend, "auto", _on_device(*arrays)).backend
    if be == "reference":
        return getattr(reference, fn)
    impl = getattr(dispatch.backend_ops(op, be), fn, None)
    if impl is None:
        raise NotImplementedError(f"{op}: the {be!r} backend does not implement {fn} yet")
    return impl


def relu(x: Array, *, backend: str = "auto") -> Array:
    """max(x, 0), elementwise. Shape: any -> same."""
    (x,) = shapes.check_elementwise("relu", x=x)
    return _run("relu", backend, "relu", x)(x)


def relu_backward(grad_y: Array, x: Array, *, backend: str = "auto") -> Array:
    """grad_y where x > 0, else 0 (0 at x == 0, as PyTorch). Shape: grad_y, x (same) -> grad_x."""
    grad_y, x = shapes.check_elementwise("relu_backward", grad_y=grad_y, x=x)
    return _run("relu_backward", backend, "relu_backward", grad_y, x)(grad_y, x)


def leaky_relu(x: Array, negative_slope: float = 0.01, *, backend: str = "auto") -> Array:
    """x where x > 0, else negative_slope * x. Shape: any -> same."""
    (x,) = shapes.check_elementwise("leaky_relu", x=x)
    slope = shapes.check_number("leaky_relu", "negative_slope", negative_slope)
    impl = _run("leaky_relu", backend, "leaky_relu", x)
    return impl(x, slope)


def leaky_relu_backward(
    grad_y: Array, x: Array, negative_slope: float = 0.01, *, backend: str = "auto"
) -> Array:
    """grad_y where x > 0, else negative_slope * grad_y. Shape: grad_y, x (same) -> grad_x."""
    op = "leaky_relu_backward"
    grad_y, x = shapes.check_elementwise(op, grad_y=grad_y, x=x)
    slope = shapes.check_number(op, "negative_slope", negative_slope)
    return _run(op, backend, "leaky_relu_backward", grad_y, x)(grad_y, x, slope)


def sigmoid(x: Array, *, backend: str = "auto") -> Array:
    """1 / (1 + exp(-x)), overflow-free for large |x|. Shape: any -> same."""
    (x,) = shapes.check_elementwise("sigmoid", x=x)
    return _run("sigmoid", backend, "sigmoid", x)(x)


def sigmoid_backward(grad_y: Array, y: Array, *, backend: str = "auto") -> Array:
    """grad_y * y * (1 - y), from the forward OUTPUT y. Shape: grad_y, y (same) -> grad_x."""
    grad_y, y = shapes.check_elementwise("sigmoid_backward", grad_y=grad_y, y=y)
    return _run("sigmoid_backward", backend, "sigmoid_backward", grad_y, y)(grad_y, y)


def tanh(x: Array, *, backend: str = "auto") -> Array:
    """tanh(x), elementwise. Shape: any -> same."""
    (x,) = shapes.check_elementwise("tanh", x=x)
    return _run("tanh", backend, "tanh", x)(x)


def tanh_backward(grad_y: Array, y: Array, *, backend: str = "auto") -> Array:
    """grad_y * (1 - y^2), from the forward OUTPUT y. Shape: grad_y, y (same) -> grad_x."""
    grad_y, y = shapes.check_elementwise("tanh_backward", grad_y=grad_y, y=y)
    return _run("tanh_backward", backend, "tanh_backward", grad_y, y)(grad_y, y)


def linear(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    activation: str | None = None,
    backend: str = "auto",
) -> Array:
    """Affine map y = x @ weight.T + bias (PyTorch's layout).

    activation: None, or "relu" for relu(linear(...)) with bias and ReLU applied in the GEMM's
    epilogue (``Sequential`` uses it for a Linear followed by a ReLU). The gradient through
    the ReLU is ``relu_backward(grad_y, y)``: y > 0 exactly where the pre-activation is.

    Shape:
        x (N, in_features), weight (out_features, in_features), bias (out_features,)
        -> y (N, out_features).
    """
    op = "linear"
    if activation not in (None, "relu"):
        raise ValueError(f"{op}: activation must be None or 'relu'; got {activation!r}")
    x, weight, bias = shapes.check_linear(op, x, weight, bias)
    impl = _run(op, backend, "linear", x, weight, bias)
    relu = activation == "relu"
    if impl is reference.linear:
        y = impl(x, weight, bias)
        return np.maximum(y, 0) if relu else y
    return impl(x, weight, bias, relu) if relu else impl(x, weight, bias)


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
    impl = _run(op, backend, "linear_backward", grad_y, x, weight)
    if impl is reference.linear_backward:
        return tuple(o if m else None for o, m in zip(impl(grad_y, x, weight), mask, strict=True))
    return impl(grad_y, x, weight, mask)


def cross_entropy(logits: Array, labels: Array, *, backend: str = "auto") -> tuple[float, Array]:
    """Mean softmax cross-entropy and its gradient, through a numerically stable log-softmax.

    Returns ``(loss, grad_logits)``: loss = mean_n(logsumexp(z_n) - z_n[label_n]) as a Python
    float, grad_logits = (softmax(z) - onehot(labels)) / N.

    Shape: logits (N, classes), labels (N,) integer class indices -> (float, (N, classes)).
    """
    logits, labels = shapes.check_labels("cross_entropy", logits, labels)
    return _run("cross_entropy", backend, "cross_entropy", logits, labels)(logits, labels)


def mse_loss(pred: Array, target: Array, *, backend: str = "auto") -> tuple[float, Array]:
    """Mean squared error and its gradient: (mean((pred - target)^2), 2 (pred - target) / numel).

    Shape: pred, target (any, same) -> (float, grad_pred like pred).
    """
    pred, target = shapes.check_elementwise("mse_loss", pred=pred, target=target)
    return _run("mse_loss", backend, "mse_loss", pred, target)(pred, target)


def dropout(x: Array, keep_mask: Array, scale: float, *, backend: str = "auto") -> Array:
    """Inverted dropout with a given mask: y = x * keep_mask * scale.

    The backward pass is the same call on grad_y. Callers draw the mask (keep probability
    1 - p) and pass scale = 1 / (1 - p), so the expected activation is unchanged.

    Shape: x (any), keep_mask (x's shape; bool or x's dtype) -> y (x's shape).
    """
    op = "dropout"
    (x,) = shapes.check_elementwise(op, x=x)
    keep_mask = shapes.check_keep_mask(op, keep_mask, x)
    scale = shapes.check_number(op, "scale", scale, lo=0.0)
    return _run(op, backend, "dropout", x, keep_mask)(x, keep_mask, scale)


def batch_norm2d(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None = None,
    bias: Array | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> tuple[Array, Array, Array]:
    """Batch normalisation per channel (PyTorch's semantics).

    In training the batch statistics (biased variance) normalise x and the running statistics,
    if given, are updated IN PLACE with the unbiased variance: r = (1 - momentum) r + momentum
    * batch. In evaluation the running statistics normalise x.

    Returns ``(y, save_mean, save_invstd)``; the last two feed ``batch_norm2d_backward``.

    Shape:
        x (N, C, H, W), running_mean/running_var/weight/bias (C,) -> y (N, C, H, W),
        save_mean (C,), save_invstd (C,).
    """
    op = "batch_norm2d"
    x = shapes.check_batch_norm2d(op, x, training, running_mean, running_var)
    vec = shapes.check_channel_vectors(
        op, x, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias
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
    impl = _run(op, backend, "batch_norm2d", x, vec["weight"], vec["running_mean"])
    return impl(
        x,
        vec["weight"],
        vec["bias"],
        vec["running_mean"],
        vec["running_var"],
        bool(training),
        momentum,
        eps,
    )


def batch_norm2d_backward(
    grad_y: Array,
    x: Array,
    weight: Array | None,
    save_mean: Array,
    save_invstd: Array,
    training: bool = True,
    *,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    backend: str = "auto",
) -> tuple[Array | None, Array | None, Array | None]:
    """Gradients of ``batch_norm2d``: (grad_x, grad_weight, grad_bias); None where masked.

    ``training`` must match the forward call: in training the batch statistics depend on x,
    which adds two terms to grad_x.

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
    impl = _run(op, backend, "batch_norm2d_backward", grad_y, x)
    return impl(
        grad_y, x, vec["weight"], vec["save_mean"], vec["save_invstd"], bool(training), mask
    )


def flatten(x: Array) -> Array:
    """Keep the batch dimension, merge the rest (a view where possible).

    Shape: x (N, d1, d2, ...) -> (N, d1*d2*...).
    """
    if not (isinstance(x, np.ndarray) or shapes.is_device_array(x)):
        raise TypeError(
            f"flatten: x must be a NumPy array or a CUDA device array; got {type(x).__name__}"
        )
    if len(x.shape) < 1:
        raise ValueError(f"flatten: x must have a batch dimension; got x.shape={tuple(x.shape)}")
    return x.reshape(int(x.shape[0]), math.prod(int(s) for s in x.shape[1:]))


def _conv1d_args(op, x, weight, stride, padding, dilation):
    x = shapes.check_array(op, "x", x, 3, "(N, C, L)")
    weight = shapes.check_array(op, "weight", weight, 3, "(K, C/groups, KL)")
    (s,) = _single(op, "stride", stride, 1)
    (d,) = _single(op, "dilation", dilation, 1)
    p = padding if isinstance(padding, str) else (0, _single(op, "padding", padding, 0)[0])
    x4 = x.reshape(x.shape[0], x.shape[1], 1, x.shape[2])
    w4 = weight.reshape(weight.shape[0], weight.shape[1], 1, weight.shape[2])
    return x4, w4, (1, s), p, (1, d)


def _single(op: str, name: str, value: Any, minimum: int) -> tuple[int]:
    return (shapes.single(op, name, value, minimum=minimum),)


def conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: int = 1,
    padding: int | str = 0,
    dilation: int = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
    algorithm: str = "auto",
) -> Array:
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
    args = (lr, momentum, dampening, weight_decay, bool(nesterov), bool(first))
    if impl is reference.sgd_update:
        new_p, new_buf = impl(p, grad, p if buf is None else buf, *args)
        p[...] = new_p
        if momentum != 0:
            buf[...] = new_buf
        return None
    impl(p, grad, buf, *args)
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
    be = dispatch.choose(op, None, backend, "auto", _on_device(*params, *grads)).backend
    impl = None if be == "reference" else getattr(dispatch.backend_ops(op, be), op, None)
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
    args = (lr, beta1, beta2, eps, weight_decay, step)
    if impl is reference.adam_update:
        p[...], m[...], v[...] = impl(p, grad, m, v, *args)
        return None
    impl(p, grad, m, v, *args)
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
    args = (lr, alpha, eps, weight_decay, momentum, centered)
    if impl is reference.rmsprop_update:
        new_p, new_s, new_ga, new_buf = impl(p, grad, square_avg, grad_avg, buf, *args)
        p[...], square_avg[...] = new_p, new_s
        if centered:
            grad_avg[...] = new_ga
        if momentum > 0:
            buf[...] = new_buf
        return None
    impl(p, grad, square_avg, grad_avg, buf, *args)
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
    args = (lr, lr_decay, weight_decay, eps, step)
    if impl is reference.adagrad_update:
        p[...], state_sum[...] = impl(p, grad, state_sum, *args)
        return None
    impl(p, grad, state_sum, *args)
    return None
