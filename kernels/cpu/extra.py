"""CPU backend for the softmax family, ELU, adaptive average pooling, the NLL loss and cat/split.

Same contract as ``ops.py``: inputs are validated by ``fastconv.functional`` (C-contiguous,
native float32/float64, same dtype, labels int64, shapes checked); results are new arrays in the
input dtype. The CUDA backend implements the same names with the same signatures.

Notation: softmax along axis ``dim`` of x (any shape), seen as (A, C, B) with
A = prod(shape[:dim]), C = shape[dim], B = prod(shape[dim+1:]) (a free reshape); one slice is
x[a, :, b]. Adaptive pooling x (N, C, H, W) -> y (N, C, OH, OW): window (oh, ow) covers rows
[oh*H // OH, ceil((oh+1)*H / OH)) and the columns likewise (PyTorch's rule; windows may overlap,
and repeat when OH > H). Losses: logp (N, L), labels (N,).

Threads: the parallel loops run over independent pieces (softmax tasks, pooling planes), each
reduced by one thread in a fixed order, and the pieces depend on the shape only: the results do
not depend on the thread count. Below PARALLEL_ABOVE elements the serial twin of each kernel
runs: waking Numba's pool costs 10-50 us, more than a batch of MNIST logits takes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import threads
from ._common import FASTMATH, U, select
from .nn import ELEMENTWISE_BLOCK
from .threads import chunks, for_each
from .tiers import parallel_njit

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "cat",
    "elu",
    "elu_backward",
    "log_softmax",
    "log_softmax_backward",
    "nll_loss",
    "softmax",
    "softmax_backward",
    "split",
]

PARALLEL_ABOVE = threads.SERIAL_BELOW  # elements touched; smaller calls run the serial twin


def _parallel(size, pieces):
    """Run the prange twin? Not in a fork()ed child, where the OpenMP loops cannot run."""
    return (
        size >= PARALLEL_ABOVE and pieces > 1 and threads.num_threads() > 1 and not threads.forked
    )


# --------------------------------------------------------------------------- ELU


def elu(x, alpha):
    """y = x where x > 0, else alpha * expm1(x). Shape: any -> same."""
    y = np.empty_like(x)
    _elementwise(_elu, y, (x,), x.dtype.type(alpha))
    return y


def elu_backward(gy, x, alpha):
    """gx = gy where x > 0, else gy * alpha * exp(x) (the second branch at x == 0, as in
    PyTorch). Shape: any -> same."""
    gx = np.empty_like(gy)
    _elementwise(_elu_backward, gx, (gy, x), gy.dtype.type(alpha))
    return gx


def _elementwise(kernel, out, inputs, alpha):
    """kernel(*flat inputs, alpha, flat out), in blocks of the flat arrays on fastconv's threads
    when large (as ``nn.relu_backward``). One fused pass: as NumPy's np.where it would compute
    both branches, expm1 of every element included, into temporaries."""
    of, flat = out.reshape(-1), [a.reshape(-1) for a in inputs]
    if of.size < threads.POOL_BELOW:
        kernel(*flat, alpha, of)
        return
    blocks = chunks(of.size, ELEMENTWISE_BLOCK)

    def run(i):
        a, b = blocks[i]
        kernel(*[f[a:b] for f in flat], alpha, of[a:b])

    for_each(run, len(blocks), of.size)


@njit(nogil=True, cache=True)
def _elu(x, alpha, y):
    for i in range(y.size):
        v = x[i]
        y[i] = v if v > 0 else alpha * np.expm1(v)  # a NaN takes the second branch: stays NaN


@njit(nogil=True, cache=True)
def _elu_backward(gy, x, alpha, gx):
    for i in range(gx.size):
        v = x[i]
        gx[i] = gy[i] if v > 0 else gy[i] * alpha * np.exp(v)


# --------------------------------------------------------------------------- softmax family

# Slices b reduced side by side in one task when B > 1: the loops run over c outside and b
# inside, so x is read in rows of B (not with stride B), and the task's per-b maxima and sums
# (SOFTMAX_B_BLOCK of each) stay in L1.
SOFTMAX_B_BLOCK = 256
# Tasks per iteration of the parallel loops, which share one scratch allocation (rows of a few
# logits are tasks of a few hundred nanoseconds, about what an allocation costs).
TASK_GROUP = 16


def softmax(x, dim):
    """exp(x - max) / sum(exp(x - max)) along ``dim`` (max shift: no overflow; a NaN makes its
    slice NaN, as in PyTorch). Sums in float64. Shape: any -> same."""
    return _softmax_forward(x, dim, False)


def log_softmax(x, dim):
    """x - max - log(sum(exp(x - max))) along ``dim``. Shape: any -> same."""
    return _softmax_forward(x, dim, True)


def softmax_backward(gy, y, dim):
    """gx = y * (gy - sum(gy * y, dim)), from the forward output y. Shape: any -> same."""
    return _softmax_backward(gy, y, dim, False)


def log_softmax_backward(gy, y, dim):
    """gx = gy - exp(y) * sum(gy, dim), from the forward output y. Shape: any -> same."""
    return _softmax_backward(gy, y, dim, True)


def _acb(shape, dim):
    """(A, C, B) of the notation, and the number of tasks: one per row a when B == 1, else one
    per (a, block of SOFTMAX_B_BLOCK b's)."""
    A, C, B = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])
    return (A, C, B), A * -(-B // SOFTMAX_B_BLOCK)


def _softmax_forward(x, dim, log):
    y = np.empty_like(x)
    acb, tasks = _acb(x.shape, dim)
    if x.size == 0:
        return y
    if _parallel(x.size, tasks):
        _softmax_par(x.reshape(acb), y.reshape(acb), tasks, log)
    else:
        _softmax_range(x.reshape(acb), y.reshape(acb), 0, tasks, log)
    return y


def _softmax_backward(gy, y, dim, log):
    gx = np.empty_like(gy)
    acb, tasks = _acb(gy.shape, dim)
    if gy.size == 0:
        return gx
    if _parallel(gy.size, tasks):
        _softmax_grad_par(gy.reshape(acb), y.reshape(acb), gx.reshape(acb), tasks, log)
    else:
        _softmax_grad_range(gy.reshape(acb), y.reshape(acb), gx.reshape(acb), 0, tasks, log)
    return gx


@njit(inline="always", cache=True)
def _task(t, C, B):
    """Task t -> (first slice's flat offset, number of slices nb): row a = t // (tasks per
    row), slices b in [b0, b0 + nb); slice b's elements are at offset + c*B + (b - b0)."""
    per_row = -(-B // SOFTMAX_B_BLOCK)
    a, b0 = t // per_row, (t % per_row) * SOFTMAX_B_BLOCK
    return U(a * C * B + b0), min(B - b0, SOFTMAX_B_BLOCK)


@njit(inline="always", cache=True)
def _softmax_row(xf, yf, o, C, log):
    """One slice of C contiguous values (B == 1: a row of logits) on scalars."""
    mx = xf[o]
    for c in range(1, C):
        v = xf[o + U(c)]
        if v > mx or v != v:  # a NaN wins, as in np.max
            mx = v
    acc = 0.0
    for c in range(C):
        e = np.exp(xf[o + U(c)] - mx)
        yf[o + U(c)] = e
        acc += e
    if log:
        ls = xf.dtype.type(np.log(acc))
        for c in range(C):
            yf[o + U(c)] = xf[o + U(c)] - mx - ls
    else:
        inv = xf.dtype.type(1.0 / acc)
        for c in range(C):
            yf[o + U(c)] *= inv


@njit(inline="always", cache=True)
def _softmax_block(xf, yf, o, nb, C, B, log, m2, s):
    """nb slices side by side (rows of B apart), with maxima in m2 and float64 sums s (scratch
    of >= 2 nb and >= nb): per slice the same operations in the same order as
    ``_softmax_row``. The running maxima alternate between the two halves of m2: kept in
    place ("if v > m[j]: m[j] = v") they compiled to masked stores (vmaskmov), microcoded on
    AMD Zen."""
    for j in range(nb):
        m2[j] = xf[o + U(j)]
        s[j] = 0.0
    cur = 0
    for c in range(1, C):
        row = o + U(c * B)
        nxt = nb - cur
        for j in range(nb):
            v, b = xf[row + U(j)], m2[cur + j]
            m2[nxt + j] = select((v > b) | (v != v), v, b)
        cur = nxt
    m = m2[cur : cur + nb]
    for c in range(C):
        row = o + U(c * B)
        for j in range(nb):
            e = np.exp(xf[row + U(j)] - m[j])
            yf[row + U(j)] = e
            s[j] += e
    for j in range(nb):
        s[j] = np.log(s[j]) if log else 1.0 / s[j]
    for c in range(C):
        row = o + U(c * B)
        for j in range(nb):
            if log:
                yf[row + U(j)] = xf[row + U(j)] - m[j] - xf.dtype.type(s[j])
            else:
                yf[row + U(j)] *= xf.dtype.type(s[j])


@njit(nogil=True, cache=True)
def _softmax_range(x, y, t0, t1, log):
    """Softmax (or log-softmax) of tasks [t0, t1) of x (A, C, B) into y."""
    A, C, B = x.shape
    xf, yf = x.ravel(), y.ravel()
    nb = min(B, SOFTMAX_B_BLOCK)
    m, s = np.empty(2 * nb, x.dtype), np.empty(nb)  # scratch, shared by the tasks in turn
    for t in range(t0, t1):
        o, nb = _task(t, C, B)
        if B == 1:
            _softmax_row(xf, yf, o, C, log)
        else:
            _softmax_block(xf, yf, o, nb, C, B, log, m, s)


@parallel_njit()
def _softmax_par(x, y, tasks, log):
    for i in prange(-(-tasks // TASK_GROUP)):
        _softmax_range(x, y, i * TASK_GROUP, min(tasks, (i + 1) * TASK_GROUP), log)


@njit(inline="always", cache=True)
def _softmax_grad_row(gyf, yf, gxf, o, C, log):
    """The gradient of one slice of C contiguous values (B == 1) on scalars."""
    acc = 0.0
    for c in range(C):
        i = o + U(c)
        acc += gyf[i] if log else gyf[i] * yf[i]
    d = gyf.dtype.type(acc)
    for c in range(C):
        i = o + U(c)
        if log:
            gxf[i] = gyf[i] - np.exp(yf[i]) * d
        else:
            gxf[i] = yf[i] * (gyf[i] - d)


@njit(inline="always", cache=True)
def _softmax_grad_block(gyf, yf, gxf, o, nb, C, B, log, s):
    """The gradient of nb slices side by side: d = sum_c gy * y (softmax) or sum_c gy
    (log-softmax) in float64 (scratch s of >= nb), then gx = y * (gy - d) or
    gy - exp(y) * d; per slice the same operations as ``_softmax_grad_row``."""
    for j in range(nb):
        s[j] = 0.0
    for c in range(C):
        row = o + U(c * B)
        for j in range(nb):
            i = row + U(j)
            s[j] += gyf[i] if log else gyf[i] * yf[i]
    for c in range(C):
        row = o + U(c * B)
        for j in range(nb):
            i, d = row + U(j), gyf.dtype.type(s[j])
            if log:
                gxf[i] = gyf[i] - np.exp(yf[i]) * d
            else:
                gxf[i] = yf[i] * (gyf[i] - d)


@njit(nogil=True, cache=True)
def _softmax_grad_range(gy, y, gx, t0, t1, log):
    """The gradient for tasks [t0, t1) of gy, y (A, C, B) into gx."""
    A, C, B = gy.shape
    gyf, yf, gxf = gy.ravel(), y.ravel(), gx.ravel()
    s = np.empty(min(B, SOFTMAX_B_BLOCK))
    for t in range(t0, t1):
        o, nb = _task(t, C, B)
        if B == 1:
            _softmax_grad_row(gyf, yf, gxf, o, C, log)
        else:
            _softmax_grad_block(gyf, yf, gxf, o, nb, C, B, log, s)


@parallel_njit()
def _softmax_grad_par(gy, y, gx, tasks, log):
    for i in prange(-(-tasks // TASK_GROUP)):
        _softmax_grad_range(gy, y, gx, i * TASK_GROUP, min(tasks, (i + 1) * TASK_GROUP), log)


# --------------------------------------------------------------------------- adaptive pooling


def adaptive_avg_pool2d(x, output_size):
    """Mean of each adaptive window, summed in float64. Shape: x (N, C, H, W), output_size
    (OH, OW) -> y (N, C, OH, OW). Output (1, 1), global average pooling, has a kernel of its
    own: one vectorised sum per plane."""
    N, C, H, W = x.shape
    OH, OW = output_size
    par = _parallel(x.size, N * C)
    if (OH, OW) == (1, 1):
        y = np.empty((N, C, 1, 1), x.dtype)
        (_global_avg_par if par else _global_avg_ser)(x.reshape(N * C, H * W), y.reshape(-1))
        return y
    y = np.empty((N, C, OH, OW), x.dtype)
    (_adaptive_avg_par if par else _adaptive_avg_ser)(x, y)
    return y


def adaptive_avg_pool2d_backward(gy, x_shape):
    """Each input of window (oh, ow) gets gy[..., oh, ow] / window size; overlapping windows add
    up (one thread per plane: no races). Shape: gy (N, C, OH, OW), x_shape (N, C, H, W) ->
    gx x_shape."""
    N, C, H, W = x_shape
    gx = np.empty((N, C, H, W), gy.dtype)
    par = _parallel(gx.size, N * C)
    if gy.shape[2:] == (1, 1):
        (_global_avg_grad_par if par else _global_avg_grad_ser)(
            gy.reshape(-1), gx.reshape(N * C, -1)
        )
        return gx
    (_adaptive_avg_grad_par if par else _adaptive_avg_grad_ser)(gy, gx)
    return gx


@njit(inline="always", cache=True)
def _span(i, size, out):
    """Window i of ``out`` along an axis of ``size``: [floor(i size/out), ceil((i+1) size/out))."""
    return i * size // out, -(-(i + 1) * size // out)


@njit(inline="always", cache=True)
def _adaptive_avg_plane(xf, yf, p, H, W, OH, OW):
    base, out = U(p * H * W), U(p * OH * OW)
    for oh in range(OH):
        r0, r1 = _span(oh, H, OH)
        for ow in range(OW):
            c0, c1 = _span(ow, W, OW)
            acc = 0.0
            for r in range(r0, r1):
                row = base + U(r * W)
                for q in range(c0, c1):
                    acc += xf[row + U(q)]
            yf[out + U(oh * OW + ow)] = acc / ((r1 - r0) * (c1 - c0))


@njit(nogil=True, cache=True)
def _adaptive_avg_ser(x, y):
    N, C, H, W = x.shape
    xf, yf = x.ravel(), y.ravel()
    for p in range(N * C):
        _adaptive_avg_plane(xf, yf, p, H, W, y.shape[2], y.shape[3])


@parallel_njit()
def _adaptive_avg_par(x, y):
    N, C, H, W = x.shape
    xf, yf = x.ravel(), y.ravel()
    for p in prange(N * C):
        _adaptive_avg_plane(xf, yf, p, H, W, y.shape[2], y.shape[3])


@njit(inline="always", cache=True)
def _adaptive_avg_grad_plane(gyf, gxf, p, H, W, OH, OW):
    base, out = U(p * H * W), U(p * OH * OW)
    for i in range(H * W):
        gxf[base + U(i)] = 0
    for oh in range(OH):
        r0, r1 = _span(oh, H, OH)
        for ow in range(OW):
            c0, c1 = _span(ow, W, OW)
            g = gxf.dtype.type(gyf[out + U(oh * OW + ow)] / np.float64((r1 - r0) * (c1 - c0)))
            for r in range(r0, r1):
                row = base + U(r * W)
                for q in range(c0, c1):
                    gxf[row + U(q)] += g


@njit(nogil=True, cache=True)
def _adaptive_avg_grad_ser(gy, gx):
    N, C, H, W = gx.shape
    gyf, gxf = gy.ravel(), gx.ravel()
    for p in range(N * C):
        _adaptive_avg_grad_plane(gyf, gxf, p, H, W, gy.shape[2], gy.shape[3])


@parallel_njit()
def _adaptive_avg_grad_par(gy, gx):
    N, C, H, W = gx.shape
    gyf, gxf = gy.ravel(), gx.ravel()
    for p in prange(N * C):
        _adaptive_avg_grad_plane(gyf, gxf, p, H, W, gy.shape[2], gy.shape[3])


# Global average pooling: the plane sum may be reassociated (FASTMATH) so that it vectorises;
# the compiled order is fixed, so the result is still the same on every call and thread count.
@njit(inline="always", cache=True, fastmath=FASTMATH)
def _plane_mean(xp):
    acc = 0.0
    for i in range(xp.size):
        acc += xp[i]
    return acc / xp.size


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _global_avg_ser(x, y):
    for p in range(x.shape[0]):
        y[p] = _plane_mean(x[p])


@parallel_njit(fastmath=FASTMATH)
def _global_avg_par(x, y):
    for p in prange(x.shape[0]):
        y[p] = _plane_mean(x[p])


@njit(nogil=True, cache=True)
def _global_avg_grad_ser(gy, gx):
    for p in range(gx.shape[0]):
        gx[p, :] = gx.dtype.type(gy[p] / np.float64(gx.shape[1]))


@parallel_njit()
def _global_avg_grad_par(gy, gx):
    for p in prange(gx.shape[0]):
        gx[p, :] = gx.dtype.type(gy[p] / np.float64(gx.shape[1]))


# --------------------------------------------------------------------------- NLL loss


def nll_loss(logp, labels):
    """Mean negative log-likelihood: (loss as a Python float, grad_logp = -onehot(label) / N).
    The loss is summed in float64 whatever the dtype. One compiled pass: a few microseconds for
    (64, 10). Shape: logp (N, L), labels (N,) ints in [0, L) -> (float, (N, L))."""
    grad = np.zeros_like(logp)
    loss = _nll_loss(logp, labels, grad, logp.dtype.type(-1.0 / logp.shape[0]))
    return float(loss), grad


@njit(nogil=True, cache=True)
def _nll_loss(logp, labels, grad, neg_inv_n):
    N = logp.shape[0]
    total = 0.0
    for n in range(N):
        lab = labels[n]
        total += np.float64(logp[n, lab])
        grad[n, lab] = neg_inv_n
    return -total / N


# --------------------------------------------------------------------------- cat / split
# Plain NumPy is the kernel here: these are copies, and np.concatenate / ndarray.copy move whole
# contiguous runs with memcpy at memory speed; a compiled loop could only match them.


def cat(arrays, dim):
    """Concatenation along ``dim``. Shape: arrays equal except along dim -> their sum there."""
    return np.concatenate(arrays, axis=dim)


def split(gy, sizes, dim):
    """The backward of ``cat``: consecutive pieces of gy along ``dim`` with these sizes, each a
    new C-contiguous array (a copy even where the slice is contiguous: no piece aliases gy)."""
    pieces, start = [], 0
    index = [slice(None)] * gy.ndim
    for size in sizes:
        index[dim] = slice(start, start + size)
        pieces.append(gy[tuple(index)].copy())
        start += size
    return pieces
