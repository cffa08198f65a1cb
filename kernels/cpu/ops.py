"""The CPU backend: the op signatures every backend module shares, on top of the @njit kernels.

Each function takes arrays already validated (C-contiguous, native float32/float64, same dtype)
and a geometry from ``fastconv.shapes``; it returns new arrays in the input dtype.

Notation: x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), P = OH*OW, CG = C/G, KG = K/G.

Threads: the im2col path cuts the batch into chunks and runs each chunk from im2col to the last
transpose on one thread, with single-threaded BLAS: all chunks in one Numba ``prange`` loop that
calls BLAS from inside (``im2col_gemm``, when ``blas.available()``), else chunk by chunk on
fastconv's Python thread pool (``threads.for_each``).
The direct convolution (register tiles, microkernel.py) runs chunks of images, and pooling runs
planes, as Numba ``prange`` loops on Numba's own threads.
"""

import functools
import math
import threading

import numpy as np

from . import blas, direct, im2col, im2col_gemm, nn, pool, threads
from ._common import grad_w_from_parts, sum_parts
from .threads import blas_single, chunks, for_each, threads_for

ALGORITHMS = ("im2col", "direct")
_local = threading.local()
# im2col columns per batch chunk: about this many bytes, so that a chunk's columns, GEMM
# output and gradients stay in the core's L2 cache while one thread works through them.
CHUNK_BYTES = 1 << 20
MIN_CHUNKS = 4  # cut even small batches this fine, so that the threads share the work
# The forward pass keeps its columns for the backward pass (``saved``) only up to this size.
# Larger ones cost more to write out and read back from memory than to rebuild chunk by chunk
# into a cache-sized workspace (mnist_cnn batch 256 train step: 1.44x vs 1.35x PyTorch without
# and with keeping, median of 4 runs; at batch 64 the two were level within run-to-run noise).
KEEP_COLS_MAX_BYTES = CHUNK_BYTES


def workspace(name, shape, dtype):
    """A scratch array reused across calls (per thread, per name and dtype), never returned.

    Fresh multi-megabyte buffers cost a page fault per 4 KiB on every call; at MNIST scale
    that was a third of the im2col path's time.
    """
    pool_ = _local.__dict__.setdefault("buffers", {})
    size = math.prod(shape)
    buf = pool_.get((name, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype)
        pool_[(name, np.dtype(dtype))] = buf
    return buf[:size].reshape(shape)


def batch_chunks(g, itemsize):
    """The batch cut into [(n0, n1)) chunks of at most about CHUNK_BYTES of im2col columns,
    their number a multiple of MIN_CHUNKS where the batch allows (so 1, 2 or 4 threads share
    them evenly: with 5 chunks on 2 threads, one thread would work 20 % longer).

    A function of the geometry and dtype only, never of the thread count: partial sums are
    added per chunk in chunk order, so results do not depend on how many threads ran.
    """
    per_image = g.C * g.KH * g.KW * g.OH * g.OW * itemsize
    most = max(1, CHUNK_BYTES // max(per_image, 1))  # images per chunk, at most
    count = MIN_CHUNKS * -(-g.N // (MIN_CHUNKS * most))
    return chunks(g.N, -(-g.N // count))


def _cols(x, g, n0, n1, kept):
    """cols (C*KH*KW, nb*P) of x[n0:n1]: the part of ``kept`` (a flat buffer holding every
    chunk's columns, one after the other) when given, else built into this thread's workspace."""
    if kept is None:
        cols = workspace("cols", (g.C * g.KH * g.KW, (n1 - n0) * g.OH * g.OW), x.dtype)
    else:
        cols = _kept_part(kept, g, n0, n1)
    im2col.im2col(x[n0:n1], cols, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw)
    return cols


def _kept_cols(x, g, saved):
    """The flat buffer in ``saved`` holding the forward pass's columns of this very x, or None."""
    if saved is not None and saved.get("x") is x and saved.get("g") == g:
        return saved["cols"]
    return None


def conv2d(x, w, b, g, algorithm, saved=None):
    """Forward convolution. b may be None. Returns y (N, K, OH, OW).

    ``saved``: an optional dict the caller keeps until ``conv2d_backward`` of the same x; the
    im2col path leaves its column matrices there so the backward pass does not rebuild them.
    Each batch chunk runs on one thread from im2col to the bias (threads.py).
    """
    return _conv2d(x, w, b, g, algorithm, saved, False)


def conv2d_bias_relu(x, w, b, g, algorithm, saved=None):
    """relu(conv2d(x, w, b)): the im2col path applies bias and ReLU in the pass that moves the
    GEMM result into NCHW order, so the ReLU costs no pass of its own."""
    return _conv2d(x, w, b, g, algorithm, saved, True)


def conv2d_pool(x, w, b, g, pg, relu, algorithm, saved=None):
    """max_pool2d(relu(conv2d(x, w, b))) (without the ReLU when ``relu`` is False), pooled with
    the non-overlapping windows of ``pg`` (stride = window, no padding, floor mode). Returns the
    pooled y (N, K, PH, PW).

    The im2col path pools in the pass that moves the GEMM result into NCHW order, so the
    full-size output is never written. ``saved`` (required by the backward) receives the
    pooled output and each window's argmax.
    """
    return _conv2d(x, w, b, g, algorithm, saved, relu, pg)


def conv2d_pool_backward(gy, x, w, g, pg, relu, algorithm, mask=(True, True, True), saved=None):
    """Gradients of ``conv2d_pool`` from gy (N, K, PH, PW) and the ``saved`` dict of its
    forward call: each window's gradient goes to its argmax (where the maximum is > 0 when
    ``relu``), then through the convolution as in ``conv2d_backward``."""
    if "+" in algorithm:  # grad_x by one algorithm, grad_w and grad_b by the other
        return _split_backward(conv2d_pool_backward, algorithm, mask, saved, gy, x, w, g, pg, relu)
    y, code = saved["pool"]
    need_x, need_w, need_b = mask
    if algorithm == "direct":  # grad_b from the pooled gradient; grad_w without the full size
        gb = pool.max_pool2d_backward_bias(gy, y, relu) if need_b else None
        gx = gw = None
        bounds = _direct_bounds(g, gy.itemsize)
        pooled = (y, code, relu, pg)  # the kernels rebuild grad_y plane by plane from it
        with threads_for(g.flops() // 2 * (int(need_x) + int(need_w))):
            s = _splits(bounds)
            if need_w:
                gw = direct.backward_filter(gy, x, g, bounds, pooled, splits=s)
            if need_x:
                gx = direct.backward_data(gy, w, g, bounds, pooled=pooled, splits=s)
        return gx, gw, gb
    gz = _unpool(gy, y, code, g, pg, relu)
    return conv2d_backward(gz, x, w, g, algorithm, mask, saved)


def _split_backward(backward, algorithm, mask, saved, *args):
    """(grad_x, grad_w, grad_b) of ``backward(*args, ...)`` with ``algorithm`` "A+B": grad_x
    by A, then grad_w and grad_b by B (each gradient is what its own algorithm alone gives). The
    autotuner times these pairs beside the two algorithms: per shape either can be the faster
    for either gradient (resnet8's 16 -> 32 stride-2 layer at batch 128 on AVX2: grad_x 4.5 ms
    by im2col, 5.2 by direct; grad_w 4.6 by im2col, 3.4 by direct)."""
    ax, aw = algorithm.split("+")
    need_x, need_w, need_b = mask
    gx = backward(*args, ax, (True, False, False), saved)[0] if need_x else None
    gw = gb = None
    if need_w or need_b:
        _, gw, gb = backward(*args, aw, (False, need_w, need_b), saved)
    return gx, gw, gb


def _unpool(gy, y, code, g, pg, relu):
    """The full-size gradient of conv2d_pool's convolution output from the pooled one."""
    with threads_for(g.N * g.K * g.OH * g.OW // POOL_ELEMENTS_PER_MAC):
        return pool.max_pool2d_backward_coded(gy, y, code, g.OH, g.OW, pg.KH, pg.KW, relu)


def _conv2d(x, w, b, g, algorithm, saved, relu, pg=None):
    bias = np.zeros(g.K, x.dtype) if b is None else b
    previous = {}
    if saved is not None:
        previous = dict(saved)  # last step's buffers: reused below when they fit
        saved.clear()
    code = None  # each pooling window's argmax (its position in the window)
    if pg is not None:
        code = previous.get("pool", (None, None))[1]
        if code is None or code.size != g.N * g.K * pg.OH * pg.OW:
            code = np.empty(g.N * g.K * pg.OH * pg.OW, np.int32)
    if algorithm == "direct":
        y = _direct_forward(x, w, bias, g, relu, pg, code)
    elif pg is None and _pointwise(g):  # no columns to build or keep: x is its own
        y = np.empty(g.y_shape, x.dtype)
        with blas_single(), threads_for(g.flops() // 2):
            im2col_gemm.conv2d_pointwise(
                x, w, bias, y, _bounds(batch_chunks(g, x.itemsize)), g.G, b is not None, relu
            )
    else:
        kept = None
        size = g.C * g.KH * g.KW * g.N * g.OH * g.OW
        if saved is not None and size * x.itemsize <= KEEP_COLS_MAX_BYTES:
            # a buffer of the caller's own for all columns, reused across steps
            kept = previous.get("cols")
            if kept is None or kept.size != size or kept.dtype != x.dtype:
                kept = np.empty(size, x.dtype)
            saved.update(x=x, g=g, cols=kept)
        y = _im2col_forward(x, w, bias, g, relu, pg, code, kept)
    if pg is not None and saved is not None:
        saved["pool"] = (y, code)
    return y


def _direct_forward(x, w, bias, g, relu, pg, code):
    """Bias, ReLU and pooling in the tiles' epilogue (direct.conv2d_tiled)."""
    with threads_for(g.flops() // 2):  # one parallel loop over chunks of images
        bounds = _direct_bounds(g, x.itemsize)
        s = _splits(bounds)
        if pg is None:
            return direct.forward(x, w, bias, g, relu, bounds, splits=s)
        return direct.forward(x, w, bias, g, relu, bounds, pg, code, splits=s)


def _im2col_forward(x, w, bias, g, relu, pg, code, kept):
    """Per batch chunk: im2col (into ``kept`` when given), GEMM, then the epilogue (bias, ReLU,
    pooling) into y; all chunks in one native loop when BLAS is callable from Numba."""
    work = g.flops() // 2
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    y = np.empty(g.y_shape if pg is None else (g.N, g.K, pg.OH, pg.OW), x.dtype)
    parts = batch_chunks(g, x.itemsize)
    if _native():
        with blas_single(), threads_for(work):
            im2col_gemm.conv2d(
                x,
                w,
                bias,
                y,
                np.empty(0, x.dtype) if kept is None else kept,
                np.empty(0, np.int32) if code is None else code,
                _bounds(parts),
                g.OH,
                g.OW,
                *_steps(g),
                relu,
                0 if pg is None else pg.KH,
                0 if pg is None else pg.KW,
            )
        return y
    wm = w.reshape(g.G, g.KG, R)

    def run(i):
        n0, n1 = parts[i]
        cols = _cols(x, g, n0, n1, kept)  # (C*KH*KW, nb*P)
        ym = workspace("ym", (g.K, (n1 - n0) * P), x.dtype)
        for gi in range(g.G):  # (KG, R) @ (R, nb*P) per group
            rows = slice(gi * g.KG, (gi + 1) * g.KG)
            np.matmul(wm[gi], cols[gi * R : (gi + 1) * R], out=ym[rows])
        if pg is None:  # + bias (+ ReLU)
            im2col.kn_to_nk(ym, bias, y[n0:n1].reshape(n1 - n0, g.K, P), relu)
        else:  # + bias (+ ReLU), then max pooling
            nbp = (n1 - n0) * P
            im2col.kn_to_nk_pool(
                ym, bias, nbp, P, y[n0:n1], code, n0, g.OH, g.OW, pg.KH, pg.KW, relu
            )

    for_each(run, len(parts), work)
    return y


def conv2d_backward(gy, x, w, g, algorithm, mask=(True, True, True), saved=None):
    """(grad_x, grad_w, grad_b), each None where mask says it is not needed. x may be None
    when only grad_x is asked for; ``saved`` is the dict given to the forward pass, if any.

    Per batch chunk, on one thread: grad_x of the chunk, and the chunk's share of grad_w and
    grad_b, which are then added in chunk order (deterministic for any thread count).
    """
    if "+" in algorithm:  # grad_x by one algorithm, grad_w and grad_b by the other
        return _split_backward(conv2d_backward, algorithm, mask, saved, gy, x, w, g)
    need_x, need_w, need_b = mask
    work = g.flops() // 2 * (int(need_x) + int(need_w))
    if algorithm == "direct":  # parallel loops over chunks of images
        gb = nn.channel_sums(gy) if need_b else None
        gx = gw = None
        bounds = _direct_bounds(g, gy.itemsize)
        with threads_for(work):
            s = _splits(bounds)
            if need_x:
                gx = direct.backward_data(gy, w, g, bounds, splits=s)
            if need_w:
                gw = direct.backward_filter(gy, x, g, bounds, splits=s)
        return gx, gw, gb
    parts = batch_chunks(g, gy.itemsize)
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    if _pointwise(g):  # GEMMs straight on x, grad_y and grad_x, per image
        return _pointwise_backward(gy, x, w, g, mask, parts, work)
    gx = np.empty(g.x_shape, gy.dtype) if need_x else None
    gw_parts = np.empty((len(parts), g.G, R, g.KG), gy.dtype) if need_w else None
    gb_parts = np.empty((len(parts), g.K), gy.dtype)
    kept = _kept_cols(x, g, saved) if need_w else None
    if _native():  # every chunk in one native prange loop
        with blas_single(), threads_for(work):
            im2col_gemm.conv2d_backward(
                gy,
                np.empty((0, g.C, g.H, g.W), gy.dtype) if x is None else x,
                np.empty(g.w_shape, gy.dtype) if w is None else w,  # (w used only for grad_x)
                np.empty((0, g.C, g.H, g.W), gy.dtype) if gx is None else gx,
                np.empty((0, 0, 0, 0), gy.dtype) if gw_parts is None else gw_parts,
                gb_parts,
                np.empty(0, gy.dtype) if kept is None else kept,
                _bounds(parts),
                *_steps(g),
                need_x,
                need_w,
            )
        return _gradients(gx, gw_parts, gb_parts, g, need_b)
    wm = w.reshape(g.G, g.KG, R) if need_x else None

    def run(i):
        n0, n1 = parts[i]
        nb = n1 - n0
        gym = workspace("gym", (g.K, nb * P), gy.dtype)
        # (nb, K, P) -> (K, nb*P), and this chunk's bias gradient in the same pass
        im2col.nk_to_kn_sum(gy[n0:n1].reshape(nb, g.K, P), gym, gb_parts[i])
        if need_w:
            cols = _cols(x, g, n0, n1, None) if kept is None else _kept_part(kept, g, n0, n1)
            for gi in range(g.G):  # grad_w_g^T = cols_g @ gy_g^T: (R, nb*P) @ (nb*P, KG)
                ks, rs = slice(gi * g.KG, (gi + 1) * g.KG), slice(gi * R, (gi + 1) * R)
                np.matmul(cols[rs], gym[ks].T, out=gw_parts[i, gi])
        if need_x:
            gcols = workspace("gcols", (g.C * g.KH * g.KW, nb * P), gy.dtype)
            for gi in range(g.G):  # (R, KG) @ (KG, nb*P)
                ks, rs = slice(gi * g.KG, (gi + 1) * g.KG), slice(gi * R, (gi + 1) * R)
                np.matmul(wm[gi].T, gym[ks], out=gcols[rs])
            im2col.col2im(
                gcols, gx[n0:n1], g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw
            )

    for_each(run, len(parts), work)
    return _gradients(gx, gw_parts, gb_parts, g, need_b)


def _pointwise(g):
    """A 1x1 convolution with stride 1 and no padding, on the native BLAS path: its im2col
    columns would be a copy of x (im2col_gemm.conv2d_pointwise)."""
    return (
        (g.KH, g.KW, g.sh, g.sw, g.ph, g.pw) == (1, 1, 1, 1, 0, 0)
        and (g.OH, g.OW) == (g.H, g.W)
        and _native()
    )


def _pointwise_backward(gy, x, w, g, mask, parts, work):
    need_x, need_w, need_b = mask
    gx = np.empty(g.x_shape, gy.dtype) if need_x else None
    gw_parts = np.empty((len(parts), g.G, g.CG, g.KG), gy.dtype) if need_w else None
    with blas_single(), threads_for(work):
        im2col_gemm.conv2d_pointwise_backward(
            gy,
            x if need_w else np.empty((0, g.C, g.H, g.W), gy.dtype),
            w if need_x else np.empty(g.w_shape, gy.dtype),
            np.empty((0, g.C, g.H, g.W), gy.dtype) if gx is None else gx,
            np.empty((0, 0, 0, 0), gy.dtype) if gw_parts is None else gw_parts,
            _bounds(parts),
            g.G,
            need_x,
            need_w,
        )
    gw = grad_w_from_parts(gw_parts, g) if need_w else None
    return gx, gw, (nn.channel_sums(gy) if need_b else None)


def _gradients(gx, gw_parts, gb_parts, g, need_b):
    """(grad_x, grad_w, grad_b) from the per-chunk parts, added in chunk order."""
    gw = None
    if gw_parts is not None:
        gw = grad_w_from_parts(gw_parts, g)
    return gx, gw, (sum_parts(gb_parts) if need_b else None)


def _steps(g):
    """(sh, sw, ph, pw, dh, dw, G): the im2col_gemm kernels' geometry arguments, in order."""
    return g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.G


def _native():
    """Run the im2col chunks as one prange loop calling BLAS from Numba (im2col_gemm.py)?"""
    return blas.available() and not threads.forked


def _direct_bounds(g, itemsize):
    """The direct path's chunks of images: those of the im2col path (a function of the
    geometry only, so grad_w's per-chunk parts add up the same on any thread count). One
    array per geometry (and chunking constants), shared by every call: the kernels only
    read it."""
    return _bounds_of(g, itemsize, CHUNK_BYTES, MIN_CHUNKS)


@functools.lru_cache(maxsize=256)
def _bounds_of(g, itemsize, chunk_bytes, min_chunks):
    return _bounds(batch_chunks(g, itemsize))


def _splits(bounds):
    """Segments per chunk of images for the direct kernels, so that every thread gets work
    when there are fewer chunks than threads (batch 1: one image's tiles cut across threads),
    or when the chunks do not share out evenly. The kernels give the same bits for any value
    (each output or partial sum is made by one tile), so it may follow the thread count; it is
    read inside ``threads_for``, which leaves small calls on one thread (then 1)."""
    chunks, n = bounds.size - 1, threads.num_threads()
    if n <= 1 or chunks % n == 0 or chunks >= 4 * n:
        return 1
    return max(2, -(-n // chunks))


def _bounds(parts):
    """[(n0, n1)) chunks as the int64 array of their n0's, then the last n1."""
    return np.array([p[0] for p in parts] + [parts[-1][1]], np.int64)


def _kept_part(kept, g, n0, n1):
    """Chunk [n0, n1)'s columns (C*KH*KW, nb*P) inside the flat buffer of all chunks."""
    shape = (g.C * g.KH * g.KW, (n1 - n0) * g.OH * g.OW)
    per = shape[0] * g.OH * g.OW
    return kept[n0 * per : n1 * per].reshape(shape)


_NO_INDEX = np.empty(0, np.uint64)
# Pooling touches each element once or twice: its parallel loops only pay for waking Numba's
# threads on much larger inputs than a convolution's (LeNet-5's 2x2 max-pool backward ran
# 0.25 -> 0.14 ms single-threaded at batch 64). Elements are counted as this many "work"
# units of threads_for.
POOL_ELEMENTS_PER_MAC = 16


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
    with threads_for(x.size // POOL_ELEMENTS_PER_MAC):
        if _is_2x2(g):
            return pool.max_pool2d_forward_2x2(x, idx)
        if _is_same(g):
            return pool.max_pool2d_forward_same(x, idx, g.KH, g.KW, g.ph, g.pw)
        return pool.max_pool2d_forward(x, idx, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw)


def _is_same(g):
    """"Same" max pooling (``pool.max_pool2d_forward_same``): stride 1, odd windows of 3 or
    more, padding half the window (then y has x's shape)."""
    odd = g.KH % 2 == 1 and g.KW % 2 == 1 and g.KH >= 3 and g.KW >= 3
    half = (g.ph, g.pw) == ((g.KH - 1) // 2, (g.KW - 1) // 2)
    small = g.H * g.W < 2**31  # in-plane indices in int32
    return odd and half and small and (g.sh, g.sw) == (1, 1) and (g.OH, g.OW) == (g.H, g.W)


def _is_2x2(g):
    """The common case the unrolled kernels serve: 2x2 windows, stride 2, no padding, floor
    mode (then the divisor of average pooling is 4 with or without count_include_pad)."""
    window = (g.KH, g.KW, g.sh, g.sw, g.ph, g.pw) == (2, 2, 2, 2, 0, 0)
    return window and (g.OH, g.OW) == (g.H // 2, g.W // 2)


def max_pool2d_backward(gy, x, g, saved=None):
    with threads_for(x.size // POOL_ELEMENTS_PER_MAC):
        if saved is not None and saved.get("x") is x and saved.get("g") == g:
            return pool.max_pool2d_backward_indexed(gy, saved["idx"], g.N, g.C, g.H, g.W)
        if _is_2x2(g):
            return pool.max_pool2d_backward_2x2(gy, x)
        return pool.max_pool2d_backward(gy, x, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw)


def avg_pool2d(x, g):
    with threads_for(x.size // POOL_ELEMENTS_PER_MAC):
        if _is_2x2(g):
            return pool.avg_pool2d_forward_2x2(x)
        return pool.avg_pool2d_forward(
            x, g.KH, g.KW, g.OH, g.OW, g.sh, g.sw, g.ph, g.pw, g.count_include_pad
        )


def avg_pool2d_backward(gy, x, g):
    with threads_for(x.size // POOL_ELEMENTS_PER_MAC):
        if _is_2x2(g):
            return pool.avg_pool2d_backward_2x2(gy, g.H, g.W)
        return pool.avg_pool2d_backward(
            gy, g.H, g.W, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.count_include_pad
        )


from .extra import *  # noqa: E402,F401,F403 — softmax family, ELU, adaptive pooling, cat, NLL
from .nn import *  # noqa: E402,F401,F403 — activations, linear, losses, optimizer updates
