"""The CUDA backend: the op signatures every backend module shares, on top of the @cuda.jit kernels.

Same contract as ``kernels/cpu/ops.py`` and ``kernels/cpu/nn.py``: arrays arrive validated by
``fastconv.functional`` (float32/float64, one dtype, shapes checked) with a geometry from
``fastconv.shapes``; results come back in the input dtype.

Where the data lives decides where the results go: NumPy inputs are copied to the GPU and the
results returned as NumPy arrays; device inputs (numba device arrays, or anything exposing
``__cuda_array_interface__`` such as CuPy arrays and PyTorch tensors) are used in place,
zero-copy (a contiguous device copy is made only for non-contiguous ones), and the results are
numba device arrays. The only device-to-host transfer of a training step is the loss value of
``cross_entropy`` / ``mse_loss`` (``cross_entropy_device`` keeps even that on the GPU).

Notation: x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), G groups, CG = C/G,
KG = K/G, P = OH*OW, R = CG*KH*KW, Rt = C*KH*KW.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from . import direct, im2col, pool
from . import elementwise as ew
from . import gemm as gm
from . import launch as L
from ._compat import as_device

ALGORITHMS = ("im2col", "direct")

__all__ = [
    "adagrad_update",
    "adam_update",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm2d",
    "batch_norm2d_backward",
    "bias_relu",
    "binary",
    "cat",
    "contiguous",
    "conv2d",
    "conv2d_backward",
    "conv2d_bias_relu",
    "conv2d_pool",
    "conv2d_pool_backward",
    "cross_entropy",
    "cross_entropy_device",
    "dropout",
    "elu",
    "elu_backward",
    "index_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "linear",
    "linear_backward",
    "log_softmax",
    "log_softmax_backward",
    "matmul",
    "max_pool2d",
    "max_pool2d_backward",
    "mse_loss",
    "nll_loss",
    "relu",
    "relu_backward",
    "rmsprop_update",
    "scale",
    "sgd_update",
    "sigmoid",
    "sigmoid_backward",
    "softmax",
    "softmax_backward",
    "split",
    "sum_axes",
    "sum_to",
    "tanh",
    "tanh_backward",
    "transpose2d",
]

# --------------------------------------------------------------------------- placement


def _dev(a: Any) -> Any:
    """``a`` as a C-contiguous numba device array (host arrays copied in; device zero-copy)."""
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a))
    d = as_device(a)
    if d.is_c_contiguous():
        return d
    out = cuda.device_array(tuple(d.shape), d.dtype)
    if len(d.shape) not in ew.COPY:
        raise ValueError(f"cannot make a contiguous copy of a {len(d.shape)}-D device array")
    L.launch(ew.COPY[len(d.shape)], *L.grid_1d(out.size), d, out)
    return out


def _inputs(*arrays: Any) -> tuple[bool, list]:
    """(host, device arrays): host is True when any input was a NumPy array."""
    host = any(isinstance(a, np.ndarray) for a in arrays)
    return host, [_dev(a) for a in arrays]


def _out(host: bool, *arrays: Any) -> Any:
    """Results where the inputs came from: copied back for host calls."""
    res = tuple(a.copy_to_host() if host and a is not None else a for a in arrays)
    return res[0] if len(res) == 1 else res


def _empty(shape: tuple[int, ...], dtype: Any) -> Any:
    return cuda.device_array(tuple(int(s) for s in shape), np.dtype(dtype))


_dummies: dict[np.dtype, Any] = {}


def _dummy(dtype: Any) -> Any:
    """A 1-element device array standing in for an absent bias (kernels need an array)."""
    dtype = np.dtype(dtype)
    if dtype not in _dummies:
        _dummies[dtype] = cuda.to_device(np.zeros(1, dtype))
    return _dummies[dtype]


def _flat(a: Any) -> Any:
    return a.reshape(int(np.prod(a.shape)))


def to_device(a: np.ndarray) -> Any:
    """Copy a host array to the GPU (contiguous). Device arrays pass through zero-copy."""
    return _dev(a)


def synchronize() -> None:
    """Wait for every launched kernel (timing; the ops themselves never need it)."""
    cuda.synchronize()


# --------------------------------------------------------------------------- GEMM


def _gemm(A, B, C, *, ta=False, tb=False, bias=None, bias_mode=0, relu=False):
    """C (Z, M, Nn) = op(A[z % BA]) @ op(B[z % BB]) (+ bias, ReLU); see gemm.py."""
    Z, M, Nn = (int(s) for s in C.shape)
    Kd = int(A.shape[1] if ta else A.shape[2])
    BA, BB = int(A.shape[0]), int(B.shape[0])
    plan = L.gemm_plan(M, Nn, Kd, Z)
    kernel = gm.KERNELS[plan.config]
    b = _dummy(C.dtype) if bias is None else bias
    mode = 0 if bias is None else bias_mode
    if plan.S == 1:
        L.launch(
            kernel,
            plan.blocks,
            plan.threads,
            A,
            B,
            C,
            b,
            mode,
            bool(relu),
            bool(ta),
            bool(tb),
            BA,
            BB,
            1,
            plan.ksplit,
        )
        return
    part = _empty((plan.S * Z, M, Nn), C.dtype)
    L.launch(
        kernel,
        plan.blocks,
        plan.threads,
        A,
        B,
        part,
        b,
        0,
        False,
        bool(ta),
        bool(tb),
        BA,
        BB,
        plan.S,
        plan.ksplit,
    )
    L.launch(gm.splitk_reduce, *L.grid_1d(Z * M * Nn), part, C, b, mode, bool(relu), BA, plan.S)


# --------------------------------------------------------------------------- convolution


def _sum_channels(a3: Any, out: Any, scale: float = 1.0) -> None:
    """out[b] = scale * sum over a3[:, b, :] (deterministic block reduction)."""
    L.launch(ew.sum_axes02, int(a3.shape[1]), L.REDUCE_THREADS, a3, out, scale)


def _cols(x, x_id, g, saved):
    """The (N, Rt, P) column matrix of x (flat): the forward pass's, when ``saved`` holds it for
    this very input object, else built (and left in ``saved`` when one is given)."""
    if saved is not None and saved.get("x") is x_id and saved.get("g") == g:
        cols = saved.get("cuda_cols")
        if cols is not None and cols.dtype == x.dtype:
            return cols
    cols = _empty((g.N * g.C * g.KH * g.KW * g.OH * g.OW,), x.dtype)
    L.launch(
        im2col.im2col,
        *L.grid_1d(cols.size),
        x,
        cols,
        g.KH,
        g.KW,
        g.OH,
        g.OW,
        g.sh,
        g.sw,
        g.ph,
        g.pw,
        g.dh,
        g.dw,
    )
    if saved is not None:
        saved.clear()
        saved.update(x=x_id, g=g, cuda_cols=cols)
    return cols


def _conv_forward(x, x_id, w, b, g, algorithm, relu, saved=None):
    y = _empty(g.y_shape, x.dtype)
    bias = _dummy(x.dtype) if b is None else b
    if algorithm == "direct":
        if saved is not None:
            saved.clear()
        t = L.direct_forward_tiles(g)
        tiles = L.ceil_div(g.OH, t.TH) * L.ceil_div(g.OW, t.TW)
        blocks = g.G * L.ceil_div(g.KG, t.cb) * g.N * tiles
        L.launch(
            direct.conv2d_forward,
            blocks,
            t.TH * t.TW,
            x,
            w,
            bias,
            y,
            b is not None,
            bool(relu),
            g.sh,
            g.sw,
            g.ph,
            g.pw,
            g.dh,
            g.dw,
            g.G,
            t.TH,
            t.TW,
            t.cb,
            t.CC,
            t.KHB,
            t.KWB,
        )
        return y
    P, R, NG = g.OH * g.OW, g.CG * g.KH * g.KW, g.N * g.G
    cols = _cols(x, x_id, g, saved)
    # y[n, g] (KG, P) = w[g] (KG, R) @ cols[n, g] (R, P), all N*G pairs in one launch
    _gemm(
        w.reshape(g.G, g.KG, R),
        cols.reshape(NG, R, P),
        y.reshape(NG, g.KG, P),
        bias=b,
        bias_mode=1,
        relu=relu,
    )
    return y


def conv2d(x, w, b, g, algorithm, saved=None):
    """Forward convolution. b may be None. Returns y (N, K, OH, OW).

    ``saved``: an optional dict the caller keeps until ``conv2d_backward`` of the same x; the
    im2col path leaves its column matrix there so the backward pass does not rebuild it.
    """
    host, (xd, w, b) = _inputs(x, w, b)
    return _out(host, _conv_forward(xd, x, w, b, g, algorithm, False, saved))


def conv2d_bias_relu(x, w, b, g, algorithm, saved=None):
    """relu(conv2d(x, w, b)) in one pass: bias and ReLU fused into the kernels' epilogue."""
    host, (xd, w, b) = _inputs(x, w, b)
    return _out(host, _conv_forward(xd, x, w, b, g, algorithm, True, saved))


def conv2d_pool(x, w, b, g, pg, relu, algorithm, saved=None):
    """max_pool2d(relu(conv2d(x, w, b))) (no ReLU when ``relu`` is False) with the
    non-overlapping windows of ``pg``: the fused conv + bias + ReLU kernels, then the pooling
    kernel. The full-size output stays on the device, kept in ``saved`` (required by the
    backward), whose pooling kernel finds each window's maximum again."""
    host, (xd, w, b) = _inputs(x, w, b)
    z = _conv_forward(xd, x, w, b, g, algorithm, relu, saved)
    y = _empty((g.N, g.K, pg.OH, pg.OW), z.dtype)
    L.launch(pool.max_pool2d_forward, *L.grid_1d(y.size), z, y, pg.KH, pg.KW, pg.sh, pg.sw, 0, 0)
    if saved is not None:
        saved["pool"] = z
    return _out(host, y)


def conv2d_pool_backward(gy, x, w, g, pg, relu, algorithm, mask=(True, True, True), saved=None):
    """Gradients of ``conv2d_pool`` from gy (N, K, PH, PW) and its forward call's ``saved``."""
    z = saved["pool"]
    _, (gyd,) = _inputs(gy)
    gz = _empty(g.y_shape, z.dtype)
    L.launch(
        pool.max_pool2d_backward, *L.grid_1d(gz.size), gyd, z, gz, pg.KH, pg.KW, pg.sh, pg.sw, 0, 0
    )
    if relu:
        gz = relu_backward(gz, z)
    if isinstance(x, np.ndarray):  # a host call: grad_y comes back to the host first
        gz = gz.copy_to_host()
    return conv2d_backward(gz, x, w, g, algorithm, mask, saved)


def conv2d_backward(gy, x, w, g, algorithm, mask=(True, True, True), saved=None):
    """(grad_x, grad_w, grad_b), each None where mask says it is not needed. x (or w) may be
    None when only grad_x (or grad_w) is asked for; ``saved`` is the forward pass's dict."""
    need_x, need_w, need_b = mask
    x_id = x
    host, (gy, x, w) = _inputs(gy, x, w)
    dt = gy.dtype
    gx = gw = gb = None
    P, R, NG = g.OH * g.OW, g.CG * g.KH * g.KW, g.N * g.G
    if need_b:
        gb = _empty((g.K,), dt)
        _sum_channels(gy.reshape(g.N, g.K, P), gb)
    if algorithm == "direct":
        if need_x:
            t = L.direct_backward_data_tiles(g)
            tiles = L.ceil_div(g.H, t.TH) * L.ceil_div(g.W, t.TW)
            blocks = g.G * L.ceil_div(g.CG, t.cb) * g.N * tiles
            gx = _empty(g.x_shape, dt)
            L.launch(
                direct.conv2d_backward_data,
                blocks,
                t.TH * t.TW,
                gy,
                w,
                gx,
                g.sh,
                g.sw,
                g.ph,
                g.pw,
                g.dh,
                g.dw,
                g.G,
                t.TH,
                t.TW,
                t.cb,
                t.CC,
                t.KHB,
                t.KWB,
            )
        if need_w:
            t = L.direct_backward_filter_tiles(g)
            bands = L.ceil_div(g.KH, t.KHB) * L.ceil_div(g.KW, t.KWB)
            blocks = g.G * L.ceil_div(g.KG, t.cb) * g.CG * bands * t.S
            part = _empty((t.S,) + g.w_shape, dt)
            L.launch(
                direct.conv2d_backward_filter,
                blocks,
                t.KHB * t.KWB * t.lanes,
                gy,
                x,
                part,
                g.sh,
                g.sw,
                g.ph,
                g.pw,
                g.dh,
                g.dw,
                g.G,
                t.TH,
                t.TW,
                t.cb,
                t.KHB,
                t.KWB,
                t.S,
                t.lanes,
            )
            gw = part.reshape(g.w_shape) if t.S == 1 else _sum_leading(part, t.S, g.w_shape)
        return _out(host, gx, gw, gb)
    gy3 = gy.reshape(NG, g.KG, P)
    if need_w:
        cols = _cols(x, x_id, g, saved)
        part = _empty((NG, g.KG, R), dt)
        # part[n, g] (KG, R) = gy[n, g] (KG, P) @ cols[n, g]^T (P, R); gw = sum over n, in order
        _gemm(gy3, cols.reshape(NG, R, P), part, tb=True)
        gw = part.reshape(g.w_shape) if g.N == 1 else _sum_leading(part, g.N, g.w_shape)
    if need_x:
        gcols = _empty((NG, R, P), dt)
        # gcols[n, g] (R, P) = w[g]^T (R, KG) @ gy[n, g] (KG, P)
        _gemm(w.reshape(g.G, g.KG, R), gy3, gcols, ta=True)
        gx = _empty(g.x_shape, dt)
        L.launch(
            im2col.col2im,
            *L.grid_1d(gx.size),
            gcols.reshape(NG * R * P),
            gx,
            g.KH,
            g.KW,
            g.OH,
            g.OW,
            g.sh,
            g.sw,
            g.ph,
            g.pw,
            g.dh,
            g.dw,
        )
    return _out(host, gx, gw, gb)


def _sum_leading(part, S, shape):
    """sum over the S leading blocks of part (split partial sums), in the order 0, 1, ..."""
    E = int(np.prod(shape))
    out = _empty(shape, part.dtype)
    L.launch(ew.sum_splits, *L.grid_1d(E), part.reshape(S, E), out.reshape(E))
    return out


# --------------------------------------------------------------------------- pooling


def max_pool2d(x, g, saved=None):
    """``saved`` (the CPU backend keeps argmax indices there) is accepted and not used: the
    backward kernel finds each window's maximum again, which costs little on a GPU."""
    host, (x,) = _inputs(x)
    y = _empty(g.y_shape, x.dtype)
    L.launch(pool.max_pool2d_forward, *L.grid_1d(y.size), x, y, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw)
    return _out(host, y)


def max_pool2d_backward(gy, x, g, saved=None):
    host, (gy, x) = _inputs(gy, x)
    gx = _empty(g.x_shape, x.dtype)
    L.launch(
        pool.max_pool2d_backward, *L.grid_1d(gx.size), gy, x, gx, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw
    )
    return _out(host, gx)


def avg_pool2d(x, g):
    host, (x,) = _inputs(x)
    y = _empty(g.y_shape, x.dtype)
    L.launch(
        pool.avg_pool2d_forward,
        *L.grid_1d(y.size),
        x,
        y,
        g.KH,
        g.KW,
        g.sh,
        g.sw,
        g.ph,
        g.pw,
        bool(g.count_include_pad),
    )
    return _out(host, y)


def avg_pool2d_backward(gy, x, g):
    host, (gy,) = _inputs(gy)
    gx = _empty(g.x_shape, gy.dtype)
    L.launch(
        pool.avg_pool2d_backward,
        *L.grid_1d(gx.size),
        gy,
        gx,
        g.KH,
        g.KW,
        g.sh,
        g.sw,
        g.ph,
        g.pw,
        bool(g.count_include_pad),
    )
    return _out(host, gx)


# --------------------------------------------------------------------------- activations


def _unary(kernel, x, *scalars):
    host, (x,) = _inputs(x)
    y = _empty(x.shape, x.dtype)
    L.launch(kernel, *L.grid_1d(y.size), _flat(x), _flat(y), *scalars)
    return _out(host, y)


def _binary(kernel, a, b, *scalars):
    host, (a, b) = _inputs(a, b)
    out = _empty(a.shape, a.dtype)
    L.launch(kernel, *L.grid_1d(out.size), _flat(a), _flat(b), _flat(out), *scalars)
    return _out(host, out)


def relu(x):
    """max(x, 0). Shape: any -> same."""
    return _unary(ew.relu_forward, x)


def relu_backward(gy, x):
    """gy where x > 0, else 0."""
    return _binary(ew.relu_backward, gy, x)


def leaky_relu(x, slope):
    return _unary(ew.leaky_relu_forward, x, float(slope))


def leaky_relu_backward(gy, x, slope):
    return _binary(ew.leaky_relu_backward, gy, x, float(slope))


def sigmoid(x):
    return _unary(ew.sigmoid_forward, x)


def sigmoid_backward(gy, y):
    """From the forward output y: gy * y * (1 - y)."""
    return _binary(ew.sigmoid_backward, gy, y)


def tanh(x):
    return _unary(ew.tanh_forward, x)


def tanh_backward(gy, y):
    """From the forward output y: gy * (1 - y^2)."""
    return _binary(ew.tanh_backward, gy, y)


def dropout(x, keep_mask, scale):
    """y = x * keep_mask * scale; the backward pass is the same call on grad_y."""
    host, (x, m) = _inputs(x, keep_mask)
    y = _empty(x.shape, x.dtype)
    L.launch(ew.dropout, *L.grid_1d(y.size), _flat(x), _flat(m), _flat(y), float(scale))
    return _out(host, y)


def bias_relu(x, b, relu=True):
    """x + b[channel] (NCHW or (N, F)), then ReLU when ``relu``; one fused pass."""
    host, (x, b) = _inputs(x, b)
    y = _empty(x.shape, x.dtype)
    P = int(np.prod(x.shape[2:])) if len(x.shape) > 2 else 1
    L.launch(ew.bias_act, *L.grid_1d(y.size), _flat(x), b, _flat(y), P, bool(relu))
    return _out(host, y)


def add_bias_(y, b):
    """y += b[channel], IN PLACE on a device array y (NCHW); used by conv_transpose2d."""
    d, bd = as_device(y), _dev(b)
    P = int(np.prod(d.shape[2:])) if len(d.shape) > 2 else 1
    L.launch(ew.bias_act, *L.grid_1d(d.size), _flat(d), bd, _flat(d), P, False)
    return y


def add_(a, b):
    """a += b, IN PLACE on a device array a (gradient accumulation)."""
    d = as_device(a)
    _, (bd,) = _inputs(b)
    L.launch(ew.add_inplace, *L.grid_1d(d.size), _flat(d), _flat(bd))
    return a


def zeros(shape: tuple[int, ...], dtype: Any) -> Any:
    """A zero-filled device array."""
    out = _empty(shape, dtype)
    L.launch(ew.fill, *L.grid_1d(out.size), _flat(out), 0.0)
    return out


# --------------------------------------------------------------------------- linear


def linear(x, w, b, relu=False):
    """y = x @ w.T + b, then max(y, 0) with ``relu`` (both fused in the GEMM epilogue).
    Shape: x (N, F), w (O, F) -> (N, O)."""
    host, (x, w, b) = _inputs(x, w, b)
    (N, F), O = x.shape, int(w.shape[0])
    y = _empty((N, O), x.dtype)
    # (N, F) @ (F, O): B = w read transposed
    _gemm(
        x.reshape(1, N, F),
        w.reshape(1, O, F),
        y.reshape(1, N, O),
        tb=True,
        bias=b,
        bias_mode=2,
        relu=relu,
    )
    return _out(host, y)


def linear_backward(gy, x, w, mask):
    """(gx, gw, gb) of ``linear``, None where ``mask`` says not needed.

    gx = gy @ w  (N, O) @ (O, F);  gw = gy^T @ x  (O, N) @ (N, F);  gb = gy summed over N.
    """
    need_x, need_w, need_b = mask
    host, (gy, x, w) = _inputs(gy, x, w)
    N, O = (int(s) for s in gy.shape)
    gx = gw = gb = None
    if need_x:
        F = int(w.shape[1])
        gx = _empty((N, F), gy.dtype)
        _gemm(gy.reshape(1, N, O), w.reshape(1, O, F), gx.reshape(1, N, F))
    if need_w:
        F = int(x.shape[1])
        gw = _empty((O, F), gy.dtype)
        _gemm(gy.reshape(1, N, O), x.reshape(1, N, F), gw.reshape(1, O, F), ta=True)
    if need_b:
        gb = _empty((O,), gy.dtype)
        _sum_channels(gy.reshape(N, O, 1), gb)
    return _out(host, gx, gw, gb)


# --------------------------------------------------------------------------- losses


def cross_entropy_device(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy with the loss left on the GPU: (loss (1,) float64 device
    array, grad_logits). No host round trip at all.

    With label smoothing eps (PyTorch's): loss_n = (1 - eps) (-log p[label]) + eps
    mean_j(-log p_j) and grad = (softmax - (1 - eps) onehot - eps / L) / N."""
    _, (z, lab) = _inputs(logits, labels)
    N, Lc = (int(s) for s in z.shape)
    grad = _empty((N, Lc), z.dtype)
    losses = _empty((N,), np.float64)
    eps = float(label_smoothing)
    L.launch(ew.cross_entropy_rows, *L.grid_1d(N), z, lab, grad, losses, 1.0 / N, eps)
    loss = _empty((1,), np.float64)
    _sum_channels(losses.reshape(N, 1, 1), loss, 1.0 / N)
    return loss, grad


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy: (loss as a Python float, grad_logits), with PyTorch's
    label smoothing (see ``cross_entropy_device``).

    The loss float is the one device-to-host copy (8 bytes); see ``cross_entropy_device``.
    Shape: logits (N, L), labels (N,) ints in [0, L) -> (float, (N, L)).
    """
    host = isinstance(logits, np.ndarray)
    loss, grad = cross_entropy_device(logits, labels, label_smoothing)
    return float(loss.copy_to_host()[0]), _out(host, grad)


def mse_loss(pred, target):
    """Mean squared error: (loss as a Python float, grad_pred = 2 (pred - target) / numel)."""
    host, (p, t) = _inputs(pred, target)
    n = int(p.size)
    grad = _empty(p.shape, p.dtype)
    sq = _empty((n,), np.float64)
    L.launch(ew.mse_rows, *L.grid_1d(n), _flat(p), _flat(t), _flat(grad), sq, 2.0 / n)
    loss = _empty((1,), np.float64)
    _sum_channels(sq.reshape(n, 1, 1), loss, 1.0 / n)
    return float(loss.copy_to_host()[0]), _out(host, grad)


# --------------------------------------------------------------------------- batch norm


def batch_norm2d(
    x, w, b, running_mean, running_var, training, momentum, eps, relu=False, residual=None
):
    """Batch normalisation over (N, H, W) per channel: (y, save_mean, save_invstd); with
    ``relu``, y = max(batch_norm(x) (+ ``residual``), 0) from the same kernel.

    Training normalises with the batch statistics (biased variance) and updates the running
    statistics IN PLACE (unbiased variance, PyTorch's momentum rule); evaluation uses them.
    Statistics in float64 with fixed-order block sums. w, b may be None.
    Shape: x (N, C, H, W), w/b/running_* (C,) -> y (N, C, H, W), save_mean/save_invstd (C,).
    """
    host, (xd, wd, bd, rm, rv, rd) = _inputs(x, w, b, running_mean, running_var, residual)
    N, C = int(xd.shape[0]), int(xd.shape[1])
    P = int(np.prod(xd.shape[2:]))
    x3 = xd.reshape(N, C, P)
    st = _empty((2, C), np.float64)
    dummy = _dummy(xd.dtype)
    if training:
        has_running = rm is not None
        L.launch(
            ew.batch_norm_stats,
            C,
            L.REDUCE_THREADS,
            x3,
            st,
            rm if has_running else dummy,
            rv if has_running else dummy,
            has_running,
            float(momentum),
            float(eps),
        )
        if has_running:
            _inplace((running_mean, running_var), (rm, rv))
    else:
        L.launch(ew.batch_norm_running_stats, *L.grid_1d(C), rm, rv, st, float(eps))
    y = _empty(xd.shape, xd.dtype)
    L.launch(
        ew.batch_norm_apply,
        *L.grid_1d(y.size),
        x3,
        st,
        dummy if wd is None else wd,
        dummy if bd is None else bd,
        wd is not None,
        bd is not None,
        x3 if rd is None else rd.reshape(N, C, P),  # x3 stands in, never read
        rd is not None,
        bool(relu),
        y.reshape(N, C, P),
    )
    save = _empty((2, C), xd.dtype)
    L.launch(ew.copy2, *L.grid_1d(2 * C), st, save)
    return _out(host, y, save[0], save[1])


def batch_norm2d_backward(
    gy, x, w, save_mean, save_invstd, training, mask, y=None, residual_grad=False
):
    """(gx, gw, gb) of ``batch_norm2d``; entries are None where ``mask`` says not needed.
    With ``y`` (the output of ``batch_norm2d(..., relu=True)``) those of the fused op: grad_y
    counts only where y > 0; with ``residual_grad`` a fourth result, the residual's gradient
    (grad_y where y > 0; ``relu_backward``'s kernel).

    With xhat = (x - mean) * invstd, per channel over its M values: gb = sum gy,
    gw = sum gy * xhat, and gx = w invstd (gy - gb/M - xhat gw/M) in training (the batch
    statistics depend on x), w invstd gy in evaluation.
    """
    need_x, need_w, need_b = mask
    host, (gyd, xd, wd, md, sd, yd) = _inputs(gy, x, w, save_mean, save_invstd, y)
    N, C = int(xd.shape[0]), int(xd.shape[1])
    P = int(np.prod(xd.shape[2:]))
    gy3, x3 = gyd.reshape(N, C, P), xd.reshape(N, C, P)
    relu = yd is not None
    y3 = yd.reshape(N, C, P) if relu else x3  # x3 stands in, never read, without the ReLU
    sums = _empty((2, C), np.float64)
    L.launch(ew.batch_norm_grad_sums, C, L.REDUCE_THREADS, gy3, x3, md, sd, y3, relu, sums)
    gx = gw = gb = None
    if need_x:
        gx = _empty(xd.shape, xd.dtype)
        L.launch(
            ew.batch_norm_grad_x,
            *L.grid_1d(gx.size),
            gy3,
            x3,
            md,
            sd,
            _dummy(xd.dtype) if wd is None else wd,
            wd is not None,
            y3,
            relu,
            sums,
            bool(training),
            gx.reshape(N, C, P),
        )
    if need_w or need_b:
        out = _empty((2, C), xd.dtype)
        L.launch(ew.copy2, *L.grid_1d(2 * C), sums, out)
        gb = out[0] if need_b else None
        gw = out[1] if need_w else None
    if residual_grad:
        gr = relu_backward(gyd, yd) if relu else None
        return _out(host, gx, gw, gb, gr)
    return _out(host, gx, gw, gb)


# --------------------------------------------------------------------------- optimizers


def _inplace(host_arrays, dev_arrays):
    """Copy in-place results back into the caller's NumPy arrays."""
    for h, d in zip(host_arrays, dev_arrays):
        if isinstance(h, np.ndarray):
            d.copy_to_host(h)


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One PyTorch SGD step, IN PLACE on p (and buf when momentum != 0). Returns None."""
    _, (pd, gd, bd) = _inputs(p, grad, buf)
    if bd is None:
        bd = pd  # never read or written when momentum == 0
    L.launch(
        ew.sgd_update,
        *L.grid_1d(pd.size),
        _flat(pd),
        _flat(gd),
        _flat(bd),
        float(lr),
        float(momentum),
        float(dampening),
        float(weight_decay),
        bool(nesterov),
        bool(first),
    )
    _inplace((p, buf), (pd, bd))


def adam_update(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One PyTorch Adam step, IN PLACE on p, m and v (step >= 1). Returns None."""
    _, (pd, gd, md, vd) = _inputs(p, grad, m, v)
    bc1, bc2 = 1.0 - float(beta1) ** int(step), 1.0 - float(beta2) ** int(step)
    L.launch(
        ew.adam_update,
        *L.grid_1d(pd.size),
        _flat(pd),
        _flat(gd),
        _flat(md),
        _flat(vd),
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bc1,
        bc2,
    )
    _inplace((p, m, v), (pd, md, vd))


def rmsprop_update(
    p, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered
):
    """One PyTorch RMSprop step, IN PLACE on p and square_avg (and grad_avg when centered, buf
    when momentum > 0; either may be None when unused). Returns None."""
    _, (pd, gd, sd, ad, bd) = _inputs(p, grad, square_avg, grad_avg, buf)
    # p stands in for an absent buffer: the kernel never touches it then
    ad = pd if ad is None else ad
    bd = pd if bd is None else bd
    L.launch(
        ew.rmsprop_update,
        *L.grid_1d(pd.size),
        _flat(pd),
        _flat(gd),
        _flat(sd),
        _flat(ad),
        _flat(bd),
        float(lr),
        float(alpha),
        float(eps),
        float(weight_decay),
        float(momentum),
        bool(centered),
    )
    _inplace((p, square_avg, grad_avg, buf), (pd, sd, ad, bd))


def adagrad_update(p, grad, state_sum, lr, lr_decay, weight_decay, eps, step):
    """One PyTorch Adagrad step, IN PLACE on p and state_sum (step >= 1). Returns None."""
    _, (pd, gd, sd) = _inputs(p, grad, state_sum)
    clr = float(lr) / (1.0 + (int(step) - 1) * float(lr_decay))
    L.launch(
        ew.adagrad_update,
        *L.grid_1d(pd.size),
        _flat(pd),
        _flat(gd),
        _flat(sd),
        clr,
        float(weight_decay),
        float(eps),
    )
    _inplace((p, state_sum), (pd, sd))


# --------------------------------------------------------------------------- compilation


def warmup(dtypes: tuple[Any, ...] = (np.float32,)) -> float:
    """Compile (or load from Numba's on-disk cache) every kernel for ``dtypes`` by running each
    op once on tiny device arrays, so a benchmark or a training loop's first step does not pay
    for it. Returns the seconds it took (the cold-start cost when nothing was cached).

    The kernels are compiled lazily per argument types rather than with eager signatures at
    import, so importing this module stays cheap and the CPU path never compiles CUDA code.
    """
    import time

    from fastconv import shapes

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for dtype in dtypes:

        def arr(*shape):
            return _dev(rng.standard_normal(shape).astype(dtype))

        x, w, b = arr(2, 2, 5, 5), arr(4, 2, 3, 3), arr(4)
        g = shapes.conv2d_geometry("warmup", x.shape, w.shape, 1, 1, 1, 1)
        for algorithm in ALGORITHMS:
            y = conv2d(x, w, b, g, algorithm)
            conv2d_bias_relu(x, w, b, g, algorithm)
            conv2d_backward(y, x, w, g, algorithm)
        wide = shapes.conv2d_geometry("warmup", x.shape, (20, 2, 1, 1), 1, 0, 1, 1)
        conv2d(x, arr(20, 2, 1, 1), None, wide, "im2col")  # the other GEMM tile config
        pg = shapes.pool2d_geometry("warmup", x.shape, 2)
        for fwd, bwd in ((max_pool2d, max_pool2d_backward), (avg_pool2d, avg_pool2d_backward)):
            bwd(fwd(x, pg), x, pg)
        relu_backward(relu(x), x)
        leaky_relu_backward(leaky_relu(x, 0.1), x, 0.1)
        sigmoid_backward(x, sigmoid(x))
        tanh_backward(x, tanh(x))
        dropout(x, _dev(np.ones(x.shape, bool)), 2.0)
        h, lw, lb = arr(3, 6), arr(5, 6), arr(5)
        linear_backward(linear(h, lw, lb), h, lw, (True, True, True))
        cross_entropy_device(arr(3, 5), _dev(np.array([0, 1, 4])))
        mse_loss(h, h)
        rm, rv = _dev(np.zeros(2, dtype)), _dev(np.ones(2, dtype))
        _, mean, invstd = batch_norm2d(x, None, None, rm, rv, True, 0.1, 1e-5)
        batch_norm2d_backward(x, x, None, mean, invstd, True, (True, True, True))
        p, gr, m, v = arr(7), arr(7), _dev(np.zeros(7, dtype)), _dev(np.zeros(7, dtype))
        sgd_update(p, gr, m, 0.1, 0.9, 0.0, 0.0, False, False)
        adam_update(p, gr, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
        rmsprop_update(p, gr, v, None, m, 1e-2, 0.99, 1e-8, 0.0, 0.9, False)
        adagrad_update(p, gr, v, 1e-2, 0.0, 0.0, 1e-10, 1)
    cuda.synchronize()
    return time.perf_counter() - t0


# last: extra_ops builds on the helpers above
from .extra_ops import (  # noqa: E402
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    binary,
    cat,
    contiguous,
    elu,
    elu_backward,
    index_backward,
    log_softmax,
    log_softmax_backward,
    matmul,
    nll_loss,
    scale,
    softmax,
    softmax_backward,
    split,
    sum_axes,
    sum_to,
    transpose2d,
)
