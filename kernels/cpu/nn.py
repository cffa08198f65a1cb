"""CPU backend for the layers' other math: activations, linear, losses, dropout, batch norm and
optimizer updates.

Same contract as ``ops.py``: inputs are validated by ``fastconv.functional`` (C-contiguous,
native float32/float64, same dtype, shapes checked); results come back in the input dtype. The
CUDA backend (``kernels/cuda/ops.py``) implements the same names with the same signatures.

These ops are memory-bound one-pass loops, NumPy ufuncs or fused compiled loops; only the
GEMMs in ``linear`` do real arithmetic, and those go to BLAS.

Notation: x / y (any shape) for elementwise ops; linear x (N, F), w (O, F), b (O,), y (N, O);
batch norm x (N, C, H, W) with per-channel statistics over M = N*H*W values.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import blas, threads
from ._common import FASTMATH, U
from .blas import gemm
from .threads import chunks, for_each
from .tiers import parallel_njit

__all__ = [
    "adagrad_update",
    "adam_update",
    "batch_norm2d",
    "batch_norm2d_backward",
    "cross_entropy",
    "dropout",
    "leaky_relu",
    "leaky_relu_backward",
    "linear",
    "linear_backward",
    "mse_loss",
    "relu",
    "relu_backward",
    "rmsprop_update",
    "sgd_update",
    "sgd_update_many",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
]

# --------------------------------------------------------------------------- activations


def relu(x):
    return np.maximum(x, 0)


ELEMENTWISE_BLOCK = 1 << 16  # elements per block of a threaded elementwise op


def relu_backward(gy, x):
    # Derivative 0 at x == 0, as in PyTorch (threshold_backward). One fused pass: the NumPy
    # np.where(x > 0, gy, 0) spelling went through float64 and cost 25x as much. Blocks of
    # the flat arrays on fastconv's threads.
    gx = np.empty_like(gy)
    gxf, gyf, xf = gx.reshape(-1), gy.reshape(-1), x.reshape(-1)
    if gxf.size < threads.POOL_BELOW:
        _relu_backward(gyf, xf, gxf)
        return gx
    blocks = chunks(gxf.size, ELEMENTWISE_BLOCK)

    def run(i):
        a, b = blocks[i]
        _relu_backward(gyf[a:b], xf[a:b], gxf[a:b])

    for_each(run, len(blocks), gxf.size)
    return gx


@njit(nogil=True, cache=True)
def _relu_backward(gy, x, gx):
    # gy loaded unconditionally: "gy[i] if x[i] > 0" compiled to a masked load (vmaskmov),
    # microcoded on AMD Zen (1 M float32: 0.56 -> 0.19 ns an element on Zen 1)
    for i in range(gx.size):
        g = gy[i]
        gx[i] = g if x[i] > 0 else 0


def leaky_relu(x, slope):
    return np.where(x > 0, x, x * x.dtype.type(slope))


def leaky_relu_backward(gy, x, slope):
    return np.where(x > 0, gy, gy * gy.dtype.type(slope))


def sigmoid(x):
    # exp of -|x| never overflows: sigmoid(x) = 1/(1+e^-x) for x >= 0, e^x/(1+e^x) below.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def sigmoid_backward(gy, y):
    return gy * y * (1 - y)


def tanh(x):
    return np.tanh(x)


def tanh_backward(gy, y):
    return gy * (1 - y * y)


# --------------------------------------------------------------------------- linear


# BLAS runs single-threaded here (threads.blas_single): a multi-threaded BLAS call leaves
# OpenBLAS's workers spinning for a while afterwards, and on a small machine they took the core
# the next convolution's threads needed (mnist_cnn batch-64 step: 65.5 ms with multi-threaded
# BLAS in Linear, 46.7 ms without). Where BLAS is callable from Numba (blas.py), a whole linear
# call is one native call: the forward's blocks, or the backward's two GEMMs, share one prange
# loop, with bias, ReLU and grad_b in the same pass. As NumPy calls on the Python thread pool,
# LeNet-5's three Linear layers took ~0.9 ms of its 4.6 ms batch-64 step.
# Multiply-adds from which the forward GEMM is cut in LINEAR_BLOCKS blocks, of output features
# where BLAS is called from Numba (each block packs only its part of the weights: LeNet-5's
# 400 -> 120 at batch 64, 0.10 -> 0.055 ms; mnist_cnn's 9216 -> 128, 2.45 -> 1.33 ms, where 4
# blocks of rows took 2.45 ms, each packing all the weights), else of rows (NumPy calls on the
# thread pool). A fixed count: the result does not depend on the thread count.
LINEAR_SPLIT_ABOVE = 1 << 20
LINEAR_BLOCKS = 2
# Fewer rows than LINEAR_FEW and at least LINEAR_WIDE weights: compiled loops split over the
# output features instead of BLAS. Such a layer reads more weights than it does arithmetic, and as a
# BLAS GEMM with one row on one thread (mnist_cnn's 9216 -> 128 at batch 1: 4.7 MB of
# weights) it took 0.89 ms forward and 0.65 ms backward.
LINEAR_FEW = 4
LINEAR_WIDE = 1 << 18
GW_BLOCK = 2048  # features of one gw row per block in _linear_grads_few (8 KB of float32)


def linear(x, w, b, relu=False):
    """y = x @ w.T + b, then max(y, 0) with ``relu``. Shape: x (N, F), w (O, F), b (O,) or
    None -> y (N, O).

    Large products run as LINEAR_BLOCKS fixed blocks (each output element is still one dot
    product over F, so the blocks do not change it); small ones as one GEMM."""
    N, O = x.shape[0], w.shape[0]
    split = x.size * O >= LINEAR_SPLIT_ABOVE
    y = np.empty((N, O), x.dtype)
    bias = np.zeros(0, x.dtype) if b is None else b  # size 0: no bias (compiled paths)
    if _few(N, w):
        _linear_few(x, w, bias, y, relu)
        return y
    if _native():
        with threads.blas_single():
            if split:
                _linear_blocks(x, w, bias, y, LINEAR_BLOCKS, relu)
            else:
                _linear_cols(x, w, bias, y, 0, O, relu)
        return y
    split = split and N >= LINEAR_BLOCKS
    rows = chunks(N, -(-N // LINEAR_BLOCKS)) if split else [(0, N)]

    def run(i):
        n0, n1 = rows[i]
        np.matmul(x[n0:n1], w.T, out=y[n0:n1])  # (nb, F) @ (F, O)

    for_each(run, len(rows), x.size * O)
    if b is not None:
        y += b
    return np.maximum(y, 0, out=y) if relu else y


def _native():
    return blas.available() and not threads.forked


def _few(N, w):
    """A few rows through many weights: the ``_linear_few`` loops (not in a fork()ed child,
    where the OpenMP loops cannot run)."""
    return N < LINEAR_FEW and w.size >= LINEAR_WIDE and not threads.forked


@parallel_njit(fastmath=FASTMATH)
def _linear_few(x, w, b, y, relu):
    """y = x @ w.T (+ b) (ReLU) for a few rows: one thread per block of output features, each
    output one dot product over F (vectorised; its order fixed by the compiled loop). Flat
    arrays and unsigned offsets, as in the convolution kernels (_common.py)."""
    N, F = x.shape
    O = w.shape[0]
    xf, wf, yf = x.ravel(), w.ravel(), y.ravel()
    zero = y.dtype.type(0)
    for o in prange(O):
        wo = U(o * F)
        for n in range(N):
            xn = U(n * F)
            acc = zero
            for f in range(F):
                acc += xf[xn + U(f)] * wf[wo + U(f)]
            v = acc + b[o] if b.size else acc
            yf[U(n * O + o)] = zero if relu and not (v > 0 or v != v) else v


@parallel_njit(fastmath=FASTMATH)
def _linear_grads_few(gy, x, w, gx, gw, gb):
    """``linear_backward`` for a few rows: gw and gb one output feature per iteration, then gx
    in LINEAR_FEW blocks of input features, each streaming long runs of every weight row
    (runs of 256 cost a TLB miss per row each: 4x slower). An output of size 0 is not wanted.
    Each gw row is written in one pass: per block of GW_BLOCK features (in L1) the first row's
    products, then the other rows added in order (the sum 0 + g0*x0 + g1*x1 + ... as before,
    without a zeroing pass and one pass per row over a gw that is larger than the caches:
    mnist_cnn's 9216 -> 128 layer is 4.7 MB)."""
    N, O = gy.shape
    F = w.shape[1]
    gyf, xf, wf = gy.ravel(), x.ravel(), w.ravel()
    zero = gy.dtype.type(0)
    for o in prange(O):
        if gw.size:
            gwf = gw.ravel()
            wo = U(o * F)
            for f0 in range(0, F, GW_BLOCK):
                f1 = min(F, f0 + GW_BLOCK)
                if N == 0:  # (callers reject an empty batch; no row to read here)
                    for f in range(f0, f1):
                        gwf[wo + U(f)] = zero
                    continue
                g = gyf[U(o)]
                for f in range(f0, f1):
                    gwf[wo + U(f)] = g * xf[U(f)]
                for n in range(1, N):
                    g, xn = gyf[U(n * O + o)], U(n * F)
                    for f in range(f0, f1):
                        gwf[wo + U(f)] += g * xf[xn + U(f)]
        if gb.size:
            acc = zero
            for n in range(N):
                acc += gyf[U(n * O + o)]
            gb[o] = acc
    if gx.size:
        gxf = gx.ravel()
        size = -(-F // LINEAR_FEW)
        for i in prange(LINEAR_FEW):
            f0, f1 = min(F, i * size), min(F, i * size + size)
            for n in range(N):
                xn = U(n * F)
                for f in range(f0, f1):
                    gxf[xn + U(f)] = zero
                for o in range(O):
                    g, wo = gyf[U(n * O + o)], U(o * F)
                    for f in range(f0, f1):
                        gxf[xn + U(f)] += g * wf[wo + U(f)]


@njit(nogil=True, cache=True)
def _linear_cols(x, w, b, y, o0, o1, relu):
    """y[:, o0:o1] = x @ w[o0:o1].T (+ b) (ReLU): one GEMM, then bias and ReLU in one pass."""
    N, F = x.shape
    O = w.shape[0]
    if o1 <= o0:
        return
    gemm(False, True, N, o1 - o0, F, x.ravel(), 0, F, w.ravel(), o0 * F, F, y.ravel(), o0, O)
    if b.size == 0 and not relu:
        return
    zero = y.dtype.type(0)
    for n in range(N):
        for o in range(o0, o1):
            v = y[n, o] + b[o] if b.size else y[n, o]
            y[n, o] = zero if relu and not (v > 0 or v != v) else v  # NaN stays, as np.maximum


@parallel_njit()
def _linear_blocks(x, w, b, y, blocks, relu):
    O = w.shape[0]
    size = -(-O // blocks)
    for i in prange(blocks):
        _linear_cols(x, w, b, y, min(O, i * size), min(O, i * size + size), relu)


def linear_backward(gy, x, w, mask):
    """(gx, gw, gb) of ``linear``; an entry is None where ``mask`` (3 bools) says it is not needed.

    gx = gy @ w  (N, O) @ (O, F);  gw = gy.T @ x  (O, N) @ (N, F);  gb = gy summed over N.
    """
    need_x, need_w, need_b = mask
    N, O = gy.shape
    F = w.shape[1]
    few = _few(N, w)
    if few or _native():  # outputs not wanted have size 0
        gx = np.empty((N, F) if need_x else (0, 0), gy.dtype)
        gw = np.empty((O, F) if need_w else (0, 0), gy.dtype)
        gb = np.empty(O if need_b else 0, gy.dtype)
        if few:
            _linear_grads_few(gy, x, w, gx, gw, gb)
        else:
            with threads.blas_single():
                if need_x and need_w and N * O * F * 2 >= threads.POOL_BELOW:
                    _linear_grads_2(gy, x, w, gx, gw, gb)  # the two GEMMs on two threads
                else:
                    _linear_grads_1(gy, x, w, gx, gw, gb)
        return (gx if need_x else None), (gw if need_w else None), (gb if need_b else None)
    out = {}
    tasks = [k for k, need in (("x", need_x), ("w", need_w)) if need]

    def run(i):
        if tasks[i] == "x":
            out["x"] = gy @ w
        elif gy.shape[0] == 1:  # one sample: an outer product. OpenBLAS's K=1 GEMM path
            out["w"] = np.multiply(gy.T, x)  # ran 7-12x slower (9216 -> 128 layer: 1.36 ms)
        else:
            out["w"] = gy.T @ x

    for_each(run, len(tasks), N * O * F * len(tasks))
    gx, gw = out.get("x"), out.get("w")
    gb = gy.sum(axis=0) if need_b else None
    return gx, gw, gb


@njit(nogil=True, cache=True)
def _linear_grad(task, gy, x, w, gx, gw, gb):
    """task 0: gx = gy @ w; task 1: gw = gy.T @ x and gb = gy summed over N (in n order).
    An output of size 0 is not wanted."""
    N, O = gy.shape
    F = w.shape[1]
    if task == 0 and gx.size:
        gemm(False, False, N, F, O, gy.ravel(), 0, O, w.ravel(), 0, F, gx.ravel(), 0, F)
    if task == 1 and gw.size:
        if N == 1:  # an outer product: OpenBLAS's K=1 GEMM path ran 7-12x slower
            for o in range(O):
                for f in range(F):
                    gw[o, f] = gy[0, o] * x[0, f]
        else:
            gemm(True, False, O, F, N, gy.ravel(), 0, O, x.ravel(), 0, F, gw.ravel(), 0, F)
    if task == 1 and gb.size:
        gb[:] = 0
        for n in range(N):
            for o in range(O):
                gb[o] += gy[n, o]


@njit(nogil=True, cache=True)
def _linear_grads_1(gy, x, w, gx, gw, gb):
    for task in range(2):
        _linear_grad(task, gy, x, w, gx, gw, gb)


@parallel_njit()
def _linear_grads_2(gy, x, w, gx, gw, gb):
    for task in prange(2):
        _linear_grad(task, gy, x, w, gx, gw, gb)


# --------------------------------------------------------------------------- losses


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy: (loss as a Python float, grad_logits).

    Log-softmax through the max shift, so large logits never overflow exp. The loss is
    accumulated in float64 whatever the input dtype (a mean over the batch; cheap). One pass
    per row in a compiled loop: as NumPy expressions this was ~10 array operations and ~30 us
    for LeNet-5's (64, 10) logits.
    label_smoothing eps: the target is (1 - eps) onehot(label) + eps / L (PyTorch's rule); the
    eps = 0 path does the same operations as without smoothing (exact zeros added).
    Shape: logits (N, L), labels (N,) ints in [0, L) -> (float, (N, L)).
    """
    grad = np.empty_like(logits)
    n = logits.shape[0]
    loss = _cross_entropy(logits, labels, grad, logits.dtype.type(1.0 / n), float(label_smoothing))
    return float(loss), grad


@njit(nogil=True, cache=True)
def _cross_entropy(z, labels, grad, inv_n, eps):
    """grad[n] = (softmax(z[n]) - (1 - eps) onehot(labels[n]) - eps / L) * inv_n; returns the
    mean loss (float64): log(sum_j exp(z[n,j] - m)) - (1 - eps) (z[n,label] - m)
    - eps mean_j(z[n,j] - m), m = max_j z[n,j]."""
    N, L = z.shape
    keep, spread = z.dtype.type(1.0 - eps), z.dtype.type(eps / L)
    total = 0.0
    for n in range(N):
        m = z[n, 0]
        for j in range(1, L):
            if z[n, j] > m or z[n, j] != z[n, j]:  # NaN wins, as in np.max
                m = z[n, j]
        s = z.dtype.type(0)
        for j in range(L):
            e = np.exp(z[n, j] - m)
            grad[n, j] = e
            s += e
        lab = labels[n]
        total += np.log(np.float64(s)) - (1.0 - eps) * np.float64(z[n, lab] - m)
        if eps != 0.0:  # the smoothing term: -eps * mean_j log p[n, j], less its log(s) part
            shifted = 0.0
            for j in range(L):
                shifted += np.float64(z[n, j] - m)
            total -= eps * shifted / L
        for j in range(L):
            p = grad[n, j] / s - spread
            grad[n, j] = (p - keep if j == lab else p) * inv_n
    return total / N


def mse_loss(pred, target):
    """Mean squared error: (loss as a Python float, grad_pred = 2 (pred - target) / numel)."""
    d = pred - target
    loss = float(np.mean(np.square(d, dtype=np.float64)))
    d *= d.dtype.type(2.0 / d.size)
    return loss, d


def dropout(x, keep_mask, scale):
    """y = x * keep_mask * scale (inverted dropout); the backward pass is the same call on grad_y.

    keep_mask: bool, or x's dtype with values 0/1, of x's shape.
    """
    y = np.multiply(x, keep_mask, dtype=x.dtype)
    y *= x.dtype.type(scale)  # in place: no second temporary, the same bits
    return y


# --------------------------------------------------------------------------- batch norm


def batch_norm2d(
    x, w, b, running_mean, running_var, training, momentum, eps, relu=False, residual=None
):
    """Batch normalisation over (N, H, W) per channel: (y, save_mean, save_invstd); with
    ``relu``, y = max(batch_norm(x) (+ ``residual``), 0) from the same pass (each sum rounded
    to x's dtype as the separate ops round it; NaN stays NaN, as np.maximum).

    Training: normalise with the batch statistics (biased variance) and update the running
    statistics IN PLACE with the unbiased variance, as PyTorch does:
    running = (1 - momentum) * running + momentum * batch. Evaluation: use the running ones.
    w, b may be None (affine=False). Statistics are summed in float64, two passes per channel
    (mean, then squared deviations), one compiled loop per channel (``_bn_stats``); as NumPy
    expressions on a float64 copy this was as slow as resnet8's convolutions.
    Shape: x (N, C, H, W), w/b/running_* (C,) -> y (N, C, H, W), save_mean/save_invstd (C,).
    """
    N, C, H, W = x.shape
    x = np.ascontiguousarray(x)
    if training:
        m = N * H * W
        mean, var = np.empty(C), np.empty(C)
        with threads.threads_for(2 * x.size):
            _bn_stats(x, mean, var)
        if running_mean is not None:
            running_mean *= 1 - momentum
            running_mean += momentum * mean
            running_var *= 1 - momentum
            running_var += momentum * var * (m / max(m - 1, 1))
    else:
        mean = running_mean.astype(np.float64)
        var = running_var.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if w is None else invstd * w
    shift = -mean * scale if b is None else b - mean * scale
    y = np.empty_like(x)
    with threads.threads_for(x.size):
        r = x[:0] if residual is None else np.ascontiguousarray(residual)  # no images: none
        _bn_apply(x, scale.astype(x.dtype), shift.astype(x.dtype), y, bool(relu), r)
    return y, mean.astype(x.dtype), invstd.astype(x.dtype)


def channel_sums(x):
    """x (N, C, H, W) summed over (N, H, W) per channel, in x's dtype: the bias gradient of a
    convolution. Summed in float64 (then rounded once), one thread a channel, each channel in a
    fixed order (the same bits on any thread count). NumPy's ``sum(axis=(0, 2, 3))`` ran at ~3 G
    elements/s on one thread (mnist_cnn's conv1 at batch 64: 0.43 -> 0.16 ms here); below
    ``threads.SERIAL_BELOW`` elements NumPy's own sum stays (9 us against 26 at batch 1)."""
    if x.size < threads.SERIAL_BELOW:
        return x.sum(axis=(0, 2, 3))
    out = np.empty(x.shape[1], np.float64)
    with threads.threads_for(x.size):
        _channel_sums(np.ascontiguousarray(x), out)
    return out.astype(x.dtype)


@njit(inline="always", cache=True)
def _channel_sum(xf, N, C, HW, c):
    """Channel c of the flat (N, C, HW) xf summed in float64, in (n, i) order (inlined: the
    caller's fastmath flags vectorise it)."""
    s = 0.0
    for n in range(N):
        o = U((n * C + c) * HW)
        for i in range(HW):
            s += np.float64(xf[o + U(i)])
    return s


@parallel_njit(fastmath=FASTMATH)
def _channel_sums(x, out):
    N, C, H, W = x.shape
    xf = x.ravel()
    for c in prange(C):
        out[c] = _channel_sum(xf, N, C, H * W, c)


@parallel_njit(fastmath=FASTMATH)
def _bn_stats(x, mean, var):
    """mean[c], var[c] (biased) of channel c over (N, H, W), in float64; one thread a channel
    (each sum in a fixed order: the same bits on any thread count)."""
    N, C, H, W = x.shape
    HW = H * W
    xf = x.ravel()
    for c in prange(C):
        mu = _channel_sum(xf, N, C, HW, c) / (N * HW)
        q = 0.0
        for n in range(N):
            o = U((n * C + c) * HW)
            for i in range(HW):
                d = np.float64(xf[o + U(i)]) - mu
                q += d * d
        mean[c] = mu
        var[c] = q / (N * HW)


@parallel_njit()
def _bn_apply(x, scale, shift, y, relu, r):
    """y = x * scale[c] + shift[c] (rounded after the product and after the sum, as NumPy),
    + r where r has images, then max(y, 0) with ``relu`` (NaN stays NaN)."""
    N, C, H, W = x.shape
    HW = H * W
    xf, yf, rf = x.ravel(), y.ravel(), r.ravel()
    add = r.shape[0] > 0
    for nc in prange(N * C):
        a, b = scale[nc % C], shift[nc % C]
        o = U(nc * HW)
        if add:
            for i in range(HW):
                v = xf[o + U(i)] * a + b
                v = v + rf[o + U(i)]
                yf[o + U(i)] = 0 if relu and v < 0 else v
        elif relu:
            for i in range(HW):
                v = xf[o + U(i)] * a + b
                yf[o + U(i)] = 0 if v < 0 else v
        else:
            for i in range(HW):
                yf[o + U(i)] = xf[o + U(i)] * a + b


def batch_norm2d_backward(
    gy, x, w, save_mean, save_invstd, training, mask, y=None, residual_grad=False
):
    """(gx, gw, gb) of ``batch_norm2d``; entries are None where ``mask`` says not needed.
    With ``y`` (the output of ``batch_norm2d(..., relu=True)``) the gradients are those of
    the fused op: grad_y reaches the normalisation only where y > 0 (ReLU's derivative, 0 at
    0 as in PyTorch), in the same passes; with ``residual_grad`` as well, a fourth result,
    the residual's gradient (grad_y where y > 0, else 0), is written by the same pass.

    With xhat = (x - mean) * invstd and y = w * xhat + b, per channel over its M values:
    gb = sum gy, gw = sum gy * xhat, and in training (mean and invstd depend on x)
    gx = w * invstd * (gy - gb/M - xhat * gw/M); in evaluation gx = w * invstd * gy.
    Sums in float64, one compiled loop per channel (``_bn_backward``).
    Shape: gy, x (N, C, H, W), w/save_* (C,) -> gx (N, C, H, W), gw (C,), gb (C,).
    """
    need_x, need_w, need_b = mask
    N, C, H, W = x.shape
    gy, x = np.ascontiguousarray(gy), np.ascontiguousarray(x)
    mean = save_mean.astype(np.float64)
    invstd = save_invstd.astype(np.float64)
    wk = invstd if w is None else invstd * w.astype(np.float64)
    gx = np.empty_like(x) if need_x else np.empty((0, C, H, W), x.dtype)
    gw, gb = np.empty(C), np.empty(C)
    mask_y = x[:0] if y is None else np.ascontiguousarray(y)  # no images: no ReLU mask
    gr = np.empty_like(x) if y is not None and residual_grad else x[:0]
    with threads.threads_for(4 * x.size):
        _bn_backward(gy, x, mean, invstd, wk, bool(training), gx, gw, gb, mask_y, gr)
    out = (
        gx if need_x else None,
        gw.astype(x.dtype) if need_w else None,
        gb.astype(x.dtype) if need_b else None,
    )
    return out + (gr if gr.shape[0] else None,) if residual_grad else out


@parallel_njit(fastmath=FASTMATH)
def _bn_backward(gy, x, mean, invstd, wk, training, gx, gw, gb, y, gr):
    """gb[c] = sum gy, gw[c] = sum gy * xhat (float64), and gx unless it has no images; one
    thread a channel (fixed summation order). With a y of images (the fused ReLU's output),
    gy counts only where y > 0, and a gr of images gets that masked gy (the residual's
    gradient)."""
    N, C, H, W = x.shape
    HW, M = H * W, N * H * W
    xf, gf, of, yf, rf = x.ravel(), gy.ravel(), gx.ravel(), y.ravel(), gr.ravel()
    relu, res = y.shape[0] > 0, gr.shape[0] > 0
    for c in prange(C):
        mu, iv = mean[c], invstd[c]
        sb = 0.0
        sw = 0.0
        for n in range(N):
            o = U((n * C + c) * HW)
            if res:
                for i in range(HW):  # (loads unconditional: no masked loads, _relu_backward)
                    gi = gf[o + U(i)]
                    gi = gi if yf[o + U(i)] > 0 else 0
                    rf[o + U(i)] = gi
                    g = np.float64(gi)
                    sb += g
                    sw += g * (np.float64(xf[o + U(i)]) - mu)
            elif relu:
                for i in range(HW):
                    g = np.float64(gf[o + U(i)])
                    g = g if yf[o + U(i)] > 0 else 0.0
                    sb += g
                    sw += g * (np.float64(xf[o + U(i)]) - mu)
            else:
                for i in range(HW):
                    g = np.float64(gf[o + U(i)])
                    sb += g
                    sw += g * (np.float64(xf[o + U(i)]) - mu)
        sw *= iv
        gb[c], gw[c] = sb, sw
        if gx.shape[0] == 0:
            continue
        k = wk[c]
        a = sb / M if training else 0.0
        q = sw / M * iv if training else 0.0  # xhat * gw / M = (x - mu) * q
        for n in range(N):
            o = U((n * C + c) * HW)
            if relu:
                for i in range(HW):
                    d = np.float64(xf[o + U(i)]) - mu
                    g = np.float64(gf[o + U(i)])
                    g = g if yf[o + U(i)] > 0 else 0.0
                    of[o + U(i)] = k * (g - a - d * q)
            else:
                for i in range(HW):
                    d = np.float64(xf[o + U(i)]) - mu
                    of[o + U(i)] = k * (np.float64(gf[o + U(i)]) - a - d * q)


# --------------------------------------------------------------------------- optimizer updates
# One fused pass over each parameter and its state (NumPy's spelling of Adam made ten passes
# and five temporaries), in the parameter's dtype, each operation rounded as NumPy rounds it
# (the scalars are cast to the dtype first, as PyTorch does). Parameters of OPT_PARALLEL_MIN
# elements or more are cut into spans of OPT_SPAN elements, updated by a ``prange`` over the
# spans: an update is a few streams through memory, which one core does not saturate, and
# Numba's threads are the ones the step's other kernels ran on (fastconv's Python threads
# measured slower here: they competed with those threads still spinning after the backward
# pass). Each span runs the serial kernel, so the split never changes a bit.

OPT_SPAN = 1 << 16  # elements per work item of a parallel update
OPT_PARALLEL_MIN = 1 << 17  # elements: smaller parameters update on the calling thread


def _update(serial, spans, arrays, scalars) -> None:
    """``serial(*arrays, *scalars)`` over the flat, equally long ``arrays``, or its ``prange``
    twin ``spans`` (the same call span by span) when they are long."""
    if arrays[0].size < OPT_PARALLEL_MIN:
        serial(*arrays, *scalars)
    else:
        spans(*arrays, *scalars)


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One PyTorch SGD step, IN PLACE on p (and on buf when momentum != 0).

    g = grad + weight_decay * p; with momentum: buf = g on the first step, else
    buf = momentum * buf + (1 - dampening) * g, and g = g + momentum * buf (nesterov) or buf;
    then p -= lr * g. ``buf`` may be None when momentum == 0. Returns None.
    One pass over the arrays, in p's dtype (the scalars are cast to it first, as PyTorch does).
    """
    sgd_update_many([p], [grad], [buf], lr, momentum, dampening, weight_decay, nesterov, [first])


def sgd_update_many(ps, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, firsts):
    """``sgd_update`` on each (p, grad, buf) triple; the scalars are cast once per dtype."""
    cast = {}
    use_buf = momentum != 0
    for p, g, b, first in zip(ps, grads, bufs, firsts):
        t = p.dtype.type
        s = cast.get(t)
        if s is None:
            s = cast[t] = (t(lr), t(momentum), t(1 - dampening), t(weight_decay))
        arrays = (_flat(p), _flat(g), _flat(p if b is None else b))
        _update(_sgd_update, _sgd_update_spans, arrays, (*s, bool(nesterov), bool(first), use_buf))


def _flat(a):
    """A 1-D view of a C-contiguous array (one compiled update for every parameter shape:
    three fewer compiles on a fresh install); other arrays as they are."""
    return a.reshape(-1) if a.flags.c_contiguous else a


@njit(inline="always", cache=True)
def _decayed(grad, p, i, weight_decay):
    """grad[i] + weight_decay * p[i] (grad[i] when weight_decay is 0)."""
    g = grad[i]
    if weight_decay != 0:
        g = g + weight_decay * p[i]
    return g


@njit(nogil=True, cache=True)
def _sgd_update(p, grad, buf, lr, momentum, keep, weight_decay, nesterov, first, use_buf):
    pf, gf, bf = p.ravel(), grad.ravel(), buf.ravel()
    for i in range(pf.size):
        g = _decayed(gf, pf, i, weight_decay)
        if use_buf:
            bi = bf[i]  # unconditional: "g if first else ... bf[i]" became a masked load
            b = g if first else momentum * bi + keep * g
            bf[i] = b
            g = g + momentum * b if nesterov else b
        pf[i] = pf[i] - lr * g


@parallel_njit(nogil=True)
def _sgd_update_spans(p, grad, buf, lr, momentum, keep, weight_decay, nesterov, first, use_buf):
    n = p.size
    for i in prange((n + OPT_SPAN - 1) // OPT_SPAN):
        a, b = i * OPT_SPAN, min(n, (i + 1) * OPT_SPAN)
        _sgd_update(
            p[a:b], grad[a:b], buf[a:b], lr, momentum, keep, weight_decay, nesterov, first, use_buf
        )


def adam_update(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """One PyTorch Adam step (L2 weight decay, bias correction), IN PLACE on p, m and v.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)   (step >= 1).
    Returns None.
    """
    t = p.dtype.type
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    scalars = (t(beta1), t(1 - beta1), t(beta2), t(1 - beta2), t(np.sqrt(bc2)), t(eps))
    scalars += (t(lr / bc1), t(weight_decay))
    _update(_adam_update, _adam_update_spans, (_flat(p), _flat(grad), _flat(m), _flat(v)), scalars)


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division: vectorised
def _adam_update(p, grad, m, v, b1, c1, b2, c2, root_bc2, eps, step_size, weight_decay):
    # m = m b1 + c1 g; v = v b2 + c2 (g g); p -= step_size (m / (sqrt(v) / root_bc2 + eps))
    for i in range(p.size):
        g = _decayed(grad, p, i, weight_decay)
        mi = m[i] * b1 + c1 * g
        vi = v[i] * b2 + c2 * (g * g)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step_size * (mi / (np.sqrt(vi) / root_bc2 + eps))


@parallel_njit(nogil=True)
def _adam_update_spans(p, grad, m, v, b1, c1, b2, c2, root_bc2, eps, step_size, weight_decay):
    n = p.size
    for i in prange((n + OPT_SPAN - 1) // OPT_SPAN):
        a, b = i * OPT_SPAN, min(n, (i + 1) * OPT_SPAN)
        _adam_update(
            p[a:b], grad[a:b], m[a:b], v[a:b], b1, c1, b2, c2, root_bc2, eps, step_size,
            weight_decay,
        )  # fmt: skip


def rmsprop_update(
    p, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered
):
    """One PyTorch RMSprop step, IN PLACE on p and square_avg (and grad_avg when centered, buf
    when momentum > 0; either may be None when unused).

    s = alpha s + (1-alpha) g^2; avg = sqrt(s - gbar^2) + eps with gbar = alpha gbar +
    (1-alpha) g when centered, else sqrt(s) + eps; with momentum buf = momentum buf + g / avg
    and p -= lr buf, else p -= lr g / avg. Returns None.
    """
    t = p.dtype.type
    pf = _flat(p)
    arrays = (pf, _flat(grad), _flat(square_avg))
    arrays += (pf if grad_avg is None else _flat(grad_avg), pf if buf is None else _flat(buf))
    scalars = (t(alpha), t(1 - alpha), t(eps), t(lr), t(weight_decay), t(momentum))
    scalars += (bool(centered), momentum > 0)
    _update(_rmsprop_update, _rmsprop_update_spans, arrays, scalars)


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division: vectorised
def _rmsprop_update(
    p, grad, s, gbar, buf, alpha, c, eps, lr, weight_decay, momentum, centered, use_buf
):
    # s = s alpha + (c g) g; avg = sqrt(s - gbar gbar) + eps (gbar = gbar alpha + c g) when
    # centered, else sqrt(s) + eps; buf = buf momentum + g / avg, p -= lr buf; or
    # p -= lr (g / avg). One loop per case: with the cases' branches inside, the loads of
    # gbar and buf became masked loads (vmaskmov), microcoded on AMD Zen.
    if centered and use_buf:
        for i in range(p.size):
            g = _decayed(grad, p, i, weight_decay)
            si, ga = s[i] * alpha + c * g * g, gbar[i] * alpha + c * g
            s[i], gbar[i] = si, ga
            b = buf[i] * momentum + g / (np.sqrt(si - ga * ga) + eps)
            buf[i] = b
            p[i] = p[i] - lr * b
    elif centered:
        for i in range(p.size):
            g = _decayed(grad, p, i, weight_decay)
            si, ga = s[i] * alpha + c * g * g, gbar[i] * alpha + c * g
            s[i], gbar[i] = si, ga
            p[i] = p[i] - lr * (g / (np.sqrt(si - ga * ga) + eps))
    elif use_buf:
        for i in range(p.size):
            g = _decayed(grad, p, i, weight_decay)
            si = s[i] * alpha + c * g * g
            s[i] = si
            b = buf[i] * momentum + g / (np.sqrt(si) + eps)
            buf[i] = b
            p[i] = p[i] - lr * b
    else:
        for i in range(p.size):
            g = _decayed(grad, p, i, weight_decay)
            si = s[i] * alpha + c * g * g
            s[i] = si
            p[i] = p[i] - lr * (g / (np.sqrt(si) + eps))


@parallel_njit(nogil=True)
def _rmsprop_update_spans(
    p, grad, s, gbar, buf, alpha, c, eps, lr, weight_decay, momentum, centered, use_buf
):
    n = p.size
    for i in prange((n + OPT_SPAN - 1) // OPT_SPAN):
        a, b = i * OPT_SPAN, min(n, (i + 1) * OPT_SPAN)
        _rmsprop_update(
            p[a:b], grad[a:b], s[a:b], gbar[a:b], buf[a:b], alpha, c, eps, lr, weight_decay,
            momentum, centered, use_buf,
        )  # fmt: skip


def adagrad_update(p, grad, state_sum, lr, lr_decay, weight_decay, eps, step):
    """One PyTorch Adagrad step, IN PLACE on p and state_sum (step >= 1).

    clr = lr / (1 + (step-1) lr_decay); sum += g^2; p -= clr g / (sqrt(sum) + eps).
    Returns None.
    """
    t = p.dtype.type
    clr = lr / (1 + (step - 1) * lr_decay)
    arrays = (_flat(p), _flat(grad), _flat(state_sum))
    _update(_adagrad_update, _adagrad_update_spans, arrays, (t(clr), t(weight_decay), t(eps)))


@njit(nogil=True, cache=True, error_model="numpy")  # IEEE division: vectorised
def _adagrad_update(p, grad, state_sum, clr, weight_decay, eps):
    for i in range(p.size):
        g = _decayed(grad, p, i, weight_decay)
        si = state_sum[i] + g * g
        state_sum[i] = si
        p[i] = p[i] - clr * (g / (np.sqrt(si) + eps))


@parallel_njit(nogil=True)
def _adagrad_update_spans(p, grad, state_sum, clr, weight_decay, eps):
    n = p.size
    for i in prange((n + OPT_SPAN - 1) // OPT_SPAN):
        a, b = i * OPT_SPAN, min(n, (i + 1) * OPT_SPAN)
        _adagrad_update(p[a:b], grad[a:b], state_sum[a:b], clr, weight_decay, eps)
