"""The CPU backend: the op signatures every backend module shares, on top of the @njit kernels.

Each function takes arrays already validated (C-contiguous, native float32/float64, same dtype)
and a geometry from ``fastconv.shapes``; it returns new arrays in the input dtype.

Notation: x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), P = OH*OW, CG = C/G, KG = K/G.
"""

import contextlib
import threading

import numba
import numpy as np

from . import direct, im2col, pool

ALGORITHMS = ("im2col", "direct")
_local = threading.local()
# Below this much work (multiply-adds or elements touched) a call runs on one thread: waking
# the OpenMP pool costs 10-50 us a parallel region, more than such a call takes alone
# (batch-1 inference is all small calls).
SERIAL_BELOW = 1 << 16


@contextlib.contextmanager
def threads_for(work):
    """Run the enclosed kernels on one thread when ``work`` is small."""
    n = numba.get_num_threads()
    if work >= SERIAL_BELOW or n == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


def workspace(name, shape, dtype):
    """A scratch array reused across calls (per thread, per name and dtype), never returned.

    Fresh multi-megabyte buffers cost a page fault per 4 KiB on every call; at MNIST scale
    that was a third of the im2col path's time.
    """
    pool_ = _local.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    buf = pool_.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype)
        pool_[(name, np.dtype(dtype))] = buf
    return buf[:size].reshape(shape)


GEMM_CHUNK = 4096  # reduction block for the long, thin grad_w GEMM


def _matmul_nt(a, b, out):
    """out = a @ b.T for a (M, L), b (N, L) with a long reduction L, in blocks of GEMM_CHUNK.

    This orientation and blocking were measured faster with OpenBLAS on the grad_w shapes
    (e.g. 2.3x on LeNet-5 conv1: M=25, N=6, L=50176); the block order is fixed, so the result
    is deterministic.
    """
    L = a.shape[1]
    if L <= 2 * GEMM_CHUNK:
        np.matmul(a, b.T, out=out)
        return
    part = np.empty_like(out)
    np.matmul(a[:, :GEMM_CHUNK], b[:, :GEMM_CHUNK].T, out=out)
    for i in range(GEMM_CHUNK, L, GEMM_CHUNK):
        np.matmul(a[:, i : i + GEMM_CHUNK], b[:, i : i + GEMM_CHUNK].T, out=part)
        out += part


def _im2col(x, g, saved=None):
    """cols (C*KH*KW, N*P) of x: from ``saved`` when the forward pass kept them for this very x,
    else built into the shared workspace (or into ``saved``'s own buffer, to be kept)."""
    shape = (g.C * g.KH * g.KW, g.N * g.OH * g.OW)
    if saved is not None and saved.get("x") is x and saved.get("g") == g:
        return saved["cols"]
    if saved is None:
        cols = workspace("cols", shape, x.dtype)
    else:  # the caller keeps these until its backward pass: a buffer of its own, reused
        cols = saved.get("cols")
        if cols is None or cols.shape != shape or cols.dtype != x.dtype:
            cols = np.empty(shape, x.dtype)
        saved.update(x=x, g=g, cols=cols)
    im2col.im2col(x, cols, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)
    return cols


def conv2d(x, w, b, g, algorithm, saved=None):
    """Forward convolution (see ``_conv2d``)."""
    with threads_for(g.flops() // 2):
        return _conv2d(x, w, b, g, algorithm, saved)


def _conv2d(x, w, b, g, algorithm, saved=None):
    """Forward convolution. b may be None. Returns y (N, K, OH, OW).

    ``saved``: an optional dict the caller keeps until ``conv2d_backward`` of the same x; the
    im2col path leaves its column matrix there so the backward pass does not rebuild it.
    """
    bias = np.zeros(g.K, x.dtype) if b is None else b
    if algorithm == "direct":
        if saved is not None:
            saved.clear()
        return direct.conv2d_forward(
            x, w, bias, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.G
        )
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    cols = _im2col(x, g, saved)  # (C*KH*KW, N*P)
    wm = w.reshape(g.G, g.KG, R)
    if g.G == 1:
        ym = np.matmul(
            wm[0], cols, out=workspace("ym", (g.K, g.N * P), x.dtype)
        )  # (K, R) @ (R, N*P)
    else:
        ym = workspace("ym", (g.K, g.N * P), x.dtype)
        for gi in range(g.G):  # (KG, R) @ (R, N*P) per group
            np.matmul(wm[gi], cols[gi * R : (gi + 1) * R], out=ym[gi * g.KG : (gi + 1) * g.KG])
    y = im2col.kn_to_nk(ym, bias, g.N, g.K, P)  # (K, N*P) -> (N, K, P), + bias
    return y.reshape(g.y_shape)


def conv2d_backward(gy, x, w, g, algorithm, mask=(True, True, True), saved=None):
    """Gradients of the convolution (see ``_conv2d_backward``)."""
    with threads_for(g.flops() // 2):
        return _conv2d_backward(gy, x, w, g, algorithm, mask, saved)


def _conv2d_backward(gy, x, w, g, algorithm, mask=(True, True, True), saved=None):
    """(grad_x, grad_w, grad_b), each None where mask says it is not needed. x may be None
    when only grad_x is asked for; ``saved`` is the dict given to the forward pass, if any."""
    need_x, need_w, need_b = mask
    if algorithm == "direct":
        gb = gy.sum(axis=(0, 2, 3)) if need_b else None
        gx = gw = None
        if need_x:
            gx = direct.conv2d_backward_data(
                gy, w, g.H, g.W, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.G
            )
        if need_w:
            gw = direct.conv2d_backward_filter(
                gy, x, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.G
            )
        return gx, gw, gb
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    gym = workspace("gym", (g.K, g.N * P), gy.dtype)
    gb = np.empty(g.K, gy.dtype)
    im2col.nk_to_kn_sum(gy.reshape(g.N, g.K, P), gym, gb)  # (N, K, P) -> (K, N*P); sum
    gb = gb if need_b else None
    gx = gw = None
    if need_w:
        cols = _im2col(x, g, saved)  # (C*KH*KW, N*P)
        gwt = np.empty((g.G, R, g.KG), x.dtype)
        for gi in range(g.G):  # grad_w_g^T = cols_g @ gy_g^T: (R, N*P) @ (N*P, KG)
            ks, rs = slice(gi * g.KG, (gi + 1) * g.KG), slice(gi * R, (gi + 1) * R)
            _matmul_nt(cols[rs], gym[ks], gwt[gi])
        gw = np.ascontiguousarray(gwt.transpose(0, 2, 1)).reshape(g.w_shape)
    if need_x:
        wm = w.reshape(g.G, g.KG, R)
        gcols = workspace("gcols", (g.C * g.KH * g.KW, g.N * P), gy.dtype)
        for gi in range(g.G):  # (R, KG) @ (KG, N*P)
            ks, rs = slice(gi * g.KG, (gi + 1) * g.KG), slice(gi * R, (gi + 1) * R)
            np.matmul(wm[gi].T, gym[ks], out=gcols[rs])
        gx = im2col.col2im(
            gcols, g.N, g.C, g.H, g.W, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw
        )
    return gx, gw, gb


_NO_INDEX = np.empty(0, np.uint64)


def max_pool2d(x, g, saved=None):
    """Max pooling. ``saved``: an optional dict kept until ``max_pool2d_backward`` of the same
    x; the forward pass leaves each window's argmax there so the backward pass only scatters."""
    idx = _NO_INDEX
    if saved is not None:
        idx = saved.get("idx")
        if idx is None or idx.size != g.N * g.C * g.OH * g.OW:
            idx = np.empty(g.N * g.C * g.OH * g.OW, np.uint64)
        saved.clear()
        saved.update(x=x, g=g, idx=idx)
    with threads_for(x.size):
        if (g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.OH, g.OW) == (
            2,
            2,
            2,
            2,
            0,
            0,
            g.H // 2,
            g.W // 2,
        ):
            return pool.max_pool2d_forward_2x2(x, idx)
        return pool.max_pool2d_forward(x, idx, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw)


def max_pool2d_backward(gy, x, g, saved=None):
    with threads_for(x.size):
        if saved is not None and saved.get("x") is x and saved.get("g") == g:
            return pool.max_pool2d_backward_indexed(gy, saved["idx"], g.N, g.C, g.H, g.W)
        return pool.max_pool2d_backward(gy, x, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw)


def avg_pool2d(x, g):
    with threads_for(x.size):
        return pool.avg_pool2d_forward(
            x, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.count_include_pad
        )


def avg_pool2d_backward(gy, x, g):
    with threads_for(x.size):
        return pool.avg_pool2d_backward(
            gy, g.H, g.W, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.count_include_pad
        )


from .nn import *  # noqa: E402,F401,F403 — activations, linear, losses, optimizer updates
