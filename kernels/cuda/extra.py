"""Kernels for the ops beyond a LeNet step: ELU, softmax / log-softmax along any axis, adaptive
average pooling, the NLL loss, concatenation and splitting, and the tensor arithmetic an
autograd tape needs on device arrays (broadcast binary ops, scaling, sums over axes, scatter
into a strided view).

Notation: N batch, C channels, H x W input pixels, OH x OW output pixels; L classes. Ops along
one axis see their array as (A, C, B): A the product of the axes before it, C its length, B the
product of the axes after it. Broadcast and strided kernels see flat contiguous arrays and a
small int64 ``meta`` array: row r holds MAX_DIMS shapes or element strides (launch.py), shapes
left-padded with 1 and strides with 0.

Reductions are deterministic and use no atomics: softmax sums and losses run serially in one
thread per row; ``sum_serial`` adds an output's terms in row-major order in one thread,
``sum_blocks`` gives each output one block whose threads add fixed strided subsets in order
and then combine them in a fixed binary tree. Sums and transcendental functions run in
float64 and are rounded once on the store, as the float64 oracle does.
"""

import math

from numba import cuda, float64

from .elementwise import _block_sum
from .launch import MAX_DIMS, REDUCE_THREADS


@cuda.jit(device=True, inline=True)
def _offset(e, meta, shape_row, stride_row):
    """The element offset of flat row-major index ``e`` over the shape in meta[shape_row],
    through the strides in meta[stride_row]."""
    off = 0
    for k in range(MAX_DIMS - 1, -1, -1):
        s = meta[shape_row, k]
        off += (e % s) * meta[stride_row, k]
        e //= s
    return off


# --------------------------------------------------------------------------- ELU


@cuda.jit(cache=True)
def elu_forward(x, y, alpha):
    """One thread: y[e] = x[e] if x[e] > 0 else alpha * expm1(x[e]) (NaN propagates)."""
    e = cuda.grid(1)
    if e < x.size:
        v = float(x[e])
        if v > 0:
            y[e] = v
        else:
            y[e] = alpha * math.expm1(v)


@cuda.jit(cache=True)
def elu_backward(gy, x, gx, alpha):
    """One thread: gx[e] = gy[e] if x[e] > 0 else gy[e] * alpha * exp(x[e])."""
    e = cuda.grid(1)
    if e < x.size:
        v = float(x[e])
        if v > 0:
            gx[e] = gy[e]
        else:
            gx[e] = float(gy[e]) * alpha * math.exp(v)


# --------------------------------------------------------------------------- softmax


@cuda.jit(cache=True)
def softmax_forward(x, y, log):
    """One thread per row (a, b) of x (A, C, B): the max-shifted softmax over c, or its log
    when ``log``: y = x - m - log(sum_c exp(x - m)). A NaN anywhere in the row makes the whole
    row NaN (it reaches the sum)."""
    A, C, B = x.shape
    e = cuda.grid(1)
    if e < A * B:
        a = e // B
        b = e % B
        m = float(x[a, 0, b])
        for c in range(1, C):
            v = float(x[a, c, b])
            if v > m:
                m = v
        s = 0.0
        for c in range(C):
            s += math.exp(float(x[a, c, b]) - m)
        if log:
            shift = m + math.log(s)
            for c in range(C):
                y[a, c, b] = float(x[a, c, b]) - shift
        else:
            for c in range(C):
                y[a, c, b] = math.exp(float(x[a, c, b]) - m) / s


@cuda.jit(cache=True)
def softmax_backward(gy, y, gx, log):
    """One thread per row (a, b) of (A, C, B), from the forward output y:
    softmax: gx = y * (gy - sum_c gy * y); log-softmax: gx = gy - exp(y) * sum_c gy."""
    A, C, B = y.shape
    e = cuda.grid(1)
    if e < A * B:
        a = e // B
        b = e % B
        s = 0.0
        for c in range(C):
            if log:
                s += float(gy[a, c, b])
            else:
                s += float(gy[a, c, b]) * float(y[a, c, b])
        for c in range(C):
            if log:
                gx[a, c, b] = float(gy[a, c, b]) - math.exp(float(y[a, c, b])) * s
            else:
                gx[a, c, b] = float(y[a, c, b]) * (float(gy[a, c, b]) - s)


# --------------------------------------------------------------------------- adaptive pooling
# PyTorch's windows: output row i averages input rows floor(i H / OH) .. ceil((i + 1) H / OH) - 1
# (likewise columns); neighbouring windows overlap when H is not a multiple of OH.


@cuda.jit(cache=True)
def adaptive_avg_pool2d_forward(x, y):
    """One thread per output (n, c, i, j): the mean of x[n, c] over window (i, j)."""
    N, C, H, W = x.shape
    OH, OW = y.shape[2], y.shape[3]
    e = cuda.grid(1)
    if e < N * C * OH * OW:
        j = e % OW
        i = (e // OW) % OH
        c = (e // (OW * OH)) % C
        n = e // (OW * OH * C)
        h0 = (i * H) // OH
        h1 = ((i + 1) * H + OH - 1) // OH
        w0 = (j * W) // OW
        w1 = ((j + 1) * W + OW - 1) // OW
        s = 0.0
        for h in range(h0, h1):
            for w in range(w0, w1):
                s += float(x[n, c, h, w])
        y[n, c, i, j] = s / ((h1 - h0) * (w1 - w0))


@cuda.jit(cache=True)
def adaptive_avg_pool2d_backward(gy, gx):
    """One thread per input (n, c, h, w): gx = sum of gy[n, c, i, j] / |window (i, j)| over
    the windows that contain (h, w), gathered in order (overlapping windows need no atomics).
    Row h lies in windows i = floor(h OH / H) .. ceil((h + 1) OH / H) - 1."""
    N, C, H, W = gx.shape
    OH, OW = gy.shape[2], gy.shape[3]
    e = cuda.grid(1)
    if e < N * C * H * W:
        w = e % W
        h = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        s = 0.0
        for i in range((h * OH) // H, ((h + 1) * OH + H - 1) // H):
            kh = ((i + 1) * H + OH - 1) // OH - (i * H) // OH
            for j in range((w * OW) // W, ((w + 1) * OW + W - 1) // W):
                kw = ((j + 1) * W + OW - 1) // OW - (j * W) // OW
                s += float(gy[n, c, i, j]) / (kh * kw)
        gx[n, c, h, w] = s


# --------------------------------------------------------------------------- loss


@cuda.jit(cache=True)
def nll_rows(logp, labels, grad, losses, inv_n):
    """One thread per row n: losses[n] = -logp[n, label], grad[n] = -onehot(label) * inv_n.
    A label outside [0, L) gives a NaN loss and a NaN gradient row (no out-of-range read)."""
    N, L = logp.shape
    n = cuda.grid(1)
    if n < N:
        lab = labels[n]
        bad = lab < 0 or lab >= L
        for j in range(L):
            if bad:
                grad[n, j] = math.nan
            elif j == lab:
                grad[n, j] = -inv_n
            else:
                grad[n, j] = 0
        if bad:
            losses[n] = math.nan
        else:
            losses[n] = -float(logp[n, lab])


# --------------------------------------------------------------------------- cat / split


@cuda.jit(cache=True)
def cat_into(src, dst, offset):
    """One thread per element (a, c, b) of src (A, C_i, B): dst[a, offset + c, b] = src[a, c, b]
    (dst (A, sum C_i, B))."""
    A, Ci, B = src.shape
    e = cuda.grid(1)
    if e < A * Ci * B:
        b = e % B
        c = (e // B) % Ci
        a = e // (B * Ci)
        dst[a, offset + c, b] = src[a, c, b]


@cuda.jit(cache=True)
def split_from(src, dst, offset):
    """One thread per element (a, c, b) of dst (A, C_i, B): dst[a, c, b] = src[a, offset + c, b]
    (src (A, sum C_i, B))."""
    A, Ci, B = dst.shape
    e = cuda.grid(1)
    if e < A * Ci * B:
        b = e % B
        c = (e // B) % Ci
        a = e // (B * Ci)
        dst[a, c, b] = src[a, offset + c, b]


# --------------------------------------------------------------------------- tensor arithmetic
# Binary op codes (host side: extra_ops.BINARY_OPS).
ADD, SUB, MUL, DIV = 0, 1, 2, 3


@cuda.jit(cache=True)
def binary_broadcast(a, b, out, meta, op):
    """One thread: out[e] = a[ia] op b[ib] (op: ADD, SUB, MUL, DIV), where e's coordinates in
    out's shape (meta row 0) meet a's and b's broadcast strides (rows 1 and 2; 0 on an axis
    the input broadcasts along)."""
    e = cuda.grid(1)
    if e < out.size:
        u = a[_offset(e, meta, 0, 1)]
        v = b[_offset(e, meta, 0, 2)]
        if op == ADD:
            out[e] = u + v
        elif op == SUB:
            out[e] = u - v
        elif op == MUL:
            out[e] = u * v
        else:
            out[e] = u / v


@cuda.jit(cache=True)
def scale(a, out, s):
    """One thread: out[e] = a[e] * s (s a float64; rounded once on the store)."""
    e = cuda.grid(1)
    if e < a.size:
        out[e] = a[e] * s


@cuda.jit(cache=True)
def sum_serial(a, out, meta):
    """One thread per output o: out[o] = the sum, in row-major order and in float64, of a's
    terms at offset(o over rows 0, 1) + offset(r over rows 2, 3) for r = 0, 1, ... (rows 0/1:
    the kept axes' shape and strides, 1 / 0 on reduced axes; rows 2/3: the reduced axes')."""
    e = cuda.grid(1)
    if e < out.size:
        R = 1
        for k in range(MAX_DIMS):
            R *= meta[2, k]
        base = _offset(e, meta, 0, 1)
        s = 0.0
        for r in range(R):
            s += a[base + _offset(r, meta, 2, 3)]
        out[e] = s


@cuda.jit(cache=True)
def sum_blocks(a, out, meta):
    """One block per output o (meta as in sum_serial): thread t adds terms t, t + T, ... in order
    (T = REDUCE_THREADS, float64); the T partial sums meet in a fixed binary tree and thread 0
    stores out[o]. Launch with exactly REDUCE_THREADS threads."""
    buf = cuda.shared.array(REDUCE_THREADS, float64)
    o = cuda.blockIdx.x
    t = cuda.threadIdx.x
    s = 0.0
    if o < out.size:
        R = 1
        for k in range(MAX_DIMS):
            R *= meta[2, k]
        base = _offset(o, meta, 0, 1)
        for r in range(t, R, REDUCE_THREADS):
            s += a[base + _offset(r, meta, 2, 3)]
    total = _block_sum(buf, t, s)
    if t == 0 and o < out.size:
        out[o] = total


@cuda.jit(cache=True)
def scatter_strided(src, dst, meta, base):
    """One thread per element e of src (flat, shape in meta row 0): dst[base + offset(e)] =
    src[e], through dst's strides in meta row 1 (a basic-index view of dst: distinct e reach
    distinct positions, so no two threads write one element)."""
    e = cuda.grid(1)
    if e < src.size:
        dst[base + _offset(e, meta, 0, 1)] = src[e]
