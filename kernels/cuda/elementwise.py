"""Elementwise, reduction, loss and optimizer kernels a training step needs, on the GPU.

Notation: N batch, C (or K) channels, H x W (or OH x OW) pixels, P = H*W; L classes. The
elementwise kernels see their arrays flattened to 1-D (contiguous), one element per thread.

Reductions are deterministic: ``sum_axes02`` gives each output one block whose threads add
fixed strided subsets in order and then combine them in a fixed binary tree; ``sum_splits``
adds split partial sums in the order s = 0, 1, ...; no kernel uses atomics.

Scalars (learning rates, slopes, scales) arrive as Python floats, so the update arithmetic runs
in float64 and is rounded once on the store, as the float64 oracle does.
"""

import math

from numba import cuda

from .launch import REDUCE_THREADS

# --------------------------------------------------------------------------- activations


@cuda.jit(cache=True)
def relu_forward(x, y):
    """One thread: y[e] = max(x[e], 0) (NaN propagates)."""
    e = cuda.grid(1)
    if e < x.size:
        v = x[e]
        if v < 0:
            y[e] = 0
        else:
            y[e] = v


@cuda.jit(cache=True)
def relu_backward(gy, x, gx):
    """One thread: gx[e] = gy[e] where x[e] > 0, else 0."""
    e = cuda.grid(1)
    if e < x.size:
        if x[e] > 0:
            gx[e] = gy[e]
        else:
            gx[e] = 0


@cuda.jit(cache=True)
def leaky_relu_forward(x, y, slope):
    """One thread: y[e] = x[e] if x[e] > 0 else slope * x[e]."""
    e = cuda.grid(1)
    if e < x.size:
        v = x[e]
        if v > 0:
            y[e] = v
        else:
            y[e] = slope * v


@cuda.jit(cache=True)
def leaky_relu_backward(gy, x, gx, slope):
    """One thread: gx[e] = gy[e] if x[e] > 0 else slope * gy[e]."""
    e = cuda.grid(1)
    if e < x.size:
        if x[e] > 0:
            gx[e] = gy[e]
        else:
            gx[e] = slope * gy[e]


@cuda.jit(cache=True)
def sigmoid_forward(x, y):
    """One thread: y[e] = 1 / (1 + exp(-x[e])), through exp(-|x|) so nothing overflows."""
    e = cuda.grid(1)
    if e < x.size:
        v = x[e]
        q = math.exp(-abs(v))
        if v >= 0:
            y[e] = 1.0 / (1.0 + q)
        else:
            y[e] = q / (1.0 + q)


@cuda.jit(cache=True)
def sigmoid_backward(gy, y, gx):
    """One thread: gx[e] = gy[e] * y[e] * (1 - y[e]) from the forward output y."""
    e = cuda.grid(1)
    if e < y.size:
        v = y[e]
        gx[e] = gy[e] * v * (1.0 - v)


@cuda.jit(cache=True)
def tanh_forward(x, y):
    """One thread: y[e] = tanh(x[e])."""
    e = cuda.grid(1)
    if e < x.size:
        y[e] = math.tanh(x[e])


@cuda.jit(cache=True)
def tanh_backward(gy, y, gx):
    """One thread: gx[e] = gy[e] * (1 - y[e]^2) from the forward output y."""
    e = cuda.grid(1)
    if e < y.size:
        v = y[e]
        gx[e] = gy[e] * (1.0 - v * v)


@cuda.jit(cache=True)
def dropout(x, mask, y, scale):
    """One thread: y[e] = x[e] * mask[e] * scale (mask: the kept positions, 0/1 or bool)."""
    e = cuda.grid(1)
    if e < x.size:
        y[e] = x[e] * mask[e] * scale


@cuda.jit(cache=True)
def bias_act(x, b, y, P, relu):
    """One thread: y[e] = x[e] + b[k] for the channel k of flat NCHW index e (P = pixels per
    plane), then ReLU if asked. y may be x (in place)."""
    e = cuda.grid(1)
    if e < x.size:
        v = x[e] + b[(e // P) % b.size]
        if relu and v < 0:
            y[e] = 0
        else:
            y[e] = v


@cuda.jit(cache=True)
def add_inplace(a, b):
    """One thread: a[e] += b[e]."""
    e = cuda.grid(1)
    if e < a.size:
        a[e] += b[e]


@cuda.jit(cache=True)
def fill(a, value):
    """One thread: a[e] = value."""
    e = cuda.grid(1)
    if e < a.size:
        a[e] = value


# --------------------------------------------------------------------------- reductions


@cuda.jit(cache=True)
def sum_axes02(a, out, scale):
    """One block per b: out[b] = scale * sum_{i, j} a[i, b, j]. Thread t adds the flat
    (i, j) indices t, t + T, t + 2T, ... in order (T = REDUCE_THREADS); the T partial sums are
    then combined in a fixed binary tree. Launch with exactly REDUCE_THREADS threads."""
    A, B, Cc = a.shape
    buf = cuda.shared.array(REDUCE_THREADS, a.dtype)
    acc = cuda.local.array(1, a.dtype)
    b = cuda.blockIdx.x
    t = cuda.threadIdx.x
    acc[0] = 0
    if b < B:
        for e in range(t, A * Cc, REDUCE_THREADS):
            acc[0] += a[e // Cc, b, e % Cc]
    buf[t] = acc[0]
    cuda.syncthreads()
    half = REDUCE_THREADS // 2
    while half > 0:
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    if t == 0 and b < B:
        out[b] = buf[0] * scale


@cuda.jit(cache=True)
def sum_splits(part, out):
    """One thread: out[e] = part[0, e] + part[1, e] + ... + part[S-1, e], in that order."""
    S, E = part.shape
    e = cuda.grid(1)
    if e < E:
        v = part[0, e]
        for s in range(1, S):
            v += part[s, e]
        out[e] = v


# --------------------------------------------------------------------------- loss


@cuda.jit(cache=True)
def cross_entropy_rows(z, labels, grad, losses, inv_n, eps):
    """One thread per row n, in float64, with PyTorch's label smoothing eps:
    losses[n] = (1 - eps) (lse - z[n, label]) + eps mean_j(lse - z[n, j]), lse the
    logsumexp of z[n], and grad[n] = (softmax(z[n]) - (1 - eps) onehot(label) - eps / L) * inv_n
    (eps = 0: the plain loss, bit for bit). A label outside [0, L) gives a NaN loss and a NaN
    gradient row (no out-of-range read)."""
    N, L = z.shape
    n = cuda.grid(1)
    if n < N:
        lab = labels[n]
        if lab < 0 or lab >= L:
            losses[n] = math.nan
            for j in range(L):
                grad[n, j] = math.nan
            return
        m = float(z[n, 0])
        for j in range(1, L):
            v = float(z[n, j])
            if v > m:
                m = v
        s = 0.0
        zsum = 0.0
        for j in range(L):
            v = float(z[n, j])
            s += math.exp(v - m)
            zsum += v
        lse = m + math.log(s)
        if eps != 0.0:  # skipped at 0, where eps * zsum would turn an infinite logit into NaN
            losses[n] = (1.0 - eps) * (lse - float(z[n, lab])) + eps * (lse - zsum / L)
        else:
            losses[n] = lse - float(z[n, lab])
        for j in range(L):
            p = math.exp(float(z[n, j]) - lse)
            if eps != 0.0:
                p -= eps / L
            if j == lab:
                p -= 1.0 - eps
            grad[n, j] = p * inv_n


@cuda.jit(cache=True)
def mse_rows(pred, target, grad, sq, two_over_n):
    """One thread: d = pred[e] - target[e] in float64; sq[e] = d^2, grad[e] = d * 2/numel."""
    e = cuda.grid(1)
    if e < pred.size:
        d = float(pred[e]) - float(target[e])
        sq[e] = d * d
        grad[e] = d * two_over_n


# --------------------------------------------------------------------------- batch norm
# x viewed as (N, C, P) with per-channel statistics over M = N*P values, computed in float64
# (``st`` is a float64 (2, C) buffer: row 0 the mean, row 1 the inverse standard deviation).


@cuda.jit(device=True, inline=True)
def _block_sum(buf, t, v):
    """Fixed-order tree sum of one value per thread (REDUCE_THREADS threads); every thread
    gets the total. Two syncthreads per level; the buffer is free again on return."""
    buf[t] = v
    cuda.syncthreads()
    half = REDUCE_THREADS // 2
    while half > 0:
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()
    return total


@cuda.jit(cache=True)
def batch_norm_stats(x, st, rmean, rvar, has_running, momentum, eps):
    """One block per channel c: mean and biased variance of x[:, c, :] (two passes, fixed-order
    sums), st[0, c] = mean, st[1, c] = 1/sqrt(var + eps); with running statistics, thread 0
    updates them in place (unbiased variance, PyTorch's momentum rule)."""
    N, C, P = x.shape
    buf = cuda.shared.array(REDUCE_THREADS, st.dtype)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    M = N * P
    acc = 0.0
    for e in range(t, M, REDUCE_THREADS):
        acc += float(x[e // P, c, e % P])
    mean = _block_sum(buf, t, acc) / M
    acc = 0.0
    for e in range(t, M, REDUCE_THREADS):
        d = float(x[e // P, c, e % P]) - mean
        acc += d * d
    var = _block_sum(buf, t, acc) / M
    if t == 0:
        st[0, c] = mean
        st[1, c] = 1.0 / math.sqrt(var + eps)
        if has_running:
            rmean[c] = (1.0 - momentum) * rmean[c] + momentum * mean
            rvar[c] = (1.0 - momentum) * rvar[c] + momentum * var * M / max(M - 1, 1)


@cuda.jit(cache=True)
def batch_norm_running_stats(rmean, rvar, st, eps):
    """One thread per channel c: st[:, c] from the running statistics (evaluation)."""
    c = cuda.grid(1)
    if c < rmean.size:
        st[0, c] = float(rmean[c])
        st[1, c] = 1.0 / math.sqrt(float(rvar[c]) + eps)


@cuda.jit(cache=True)
def batch_norm_apply(x, st, w, b, has_w, has_b, r, has_r, relu, y):
    """One thread: y[n, c, p] = (x - mean[c]) * invstd[c] * w[c] + b[c] (float64 inside),
    + r[n, c, p] with ``has_r``, then max(y, 0) with ``relu`` (NaN stays NaN)."""
    N, C, P = x.shape
    e = cuda.grid(1)
    if e < N * C * P:
        p = e % P
        c = (e // P) % C
        n = e // (P * C)
        v = (float(x[n, c, p]) - st[0, c]) * st[1, c]
        if has_w:
            v *= w[c]
        if has_b:
            v += b[c]
        if has_r:
            v += r[n, c, p]
        if relu and v < 0:
            v = 0.0
        y[n, c, p] = v


@cuda.jit(cache=True)
def batch_norm_grad_sums(gy, x, mean, invstd, y, relu, sums):
    """One block per channel c: sums[0, c] = sum gy, sums[1, c] = sum gy * xhat with
    xhat = (x - mean[c]) * invstd[c], both in float64 and in a fixed order. With ``relu``,
    gy counts only where the fused op's output y > 0."""
    N, C, P = x.shape
    buf = cuda.shared.array(REDUCE_THREADS, sums.dtype)
    c = cuda.blockIdx.x
    t = cuda.threadIdx.x
    m = float(mean[c])
    s = float(invstd[c])
    a0 = 0.0
    a1 = 0.0
    for e in range(t, N * P, REDUCE_THREADS):
        g = float(gy[e // P, c, e % P])
        if relu and not y[e // P, c, e % P] > 0:
            g = 0.0
        a0 += g
        a1 += g * (float(x[e // P, c, e % P]) - m) * s
    t0 = _block_sum(buf, t, a0)
    t1 = _block_sum(buf, t, a1)
    if t == 0:
        sums[0, c] = t0
        sums[1, c] = t1


@cuda.jit(cache=True)
def batch_norm_grad_x(gy, x, mean, invstd, w, has_w, y, relu, sums, training, gx):
    """One thread: gx = w invstd (gy - sum(gy)/M - xhat sum(gy xhat)/M) in training,
    w invstd gy in evaluation (float64 inside); with ``relu``, gy is 0 where y <= 0."""
    N, C, P = x.shape
    e = cuda.grid(1)
    if e < N * C * P:
        p = e % P
        c = (e // P) % C
        n = e // (P * C)
        k = float(invstd[c])
        if has_w:
            k *= w[c]
        g = float(gy[n, c, p])
        if relu and not y[n, c, p] > 0:
            g = 0.0
        if training:
            M = N * P
            xhat = (float(x[n, c, p]) - float(mean[c])) * float(invstd[c])
            g = g - sums[0, c] / M - xhat * sums[1, c] / M
        gx[n, c, p] = k * g


# --------------------------------------------------------------------------- optimizers


@cuda.jit(cache=True)
def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov, first):
    """One thread: PyTorch's SGD step for element e, in place on p (and buf with momentum)."""
    e = cuda.grid(1)
    if e < p.size:
        gv = g[e] + weight_decay * p[e]
        if momentum != 0.0:
            if first:
                bv = gv
            else:
                bv = momentum * buf[e] + (1.0 - dampening) * gv
            buf[e] = bv
            if nesterov:
                gv = gv + momentum * bv
            else:
                gv = bv
        p[e] = p[e] - lr * gv


@cuda.jit(cache=True)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
    """One thread: PyTorch's Adam step (L2 weight decay; bc1 = 1 - beta1^t, bc2 = 1 - beta2^t)
    for element e, in place on p, m and v."""
    e = cuda.grid(1)
    if e < p.size:
        gv = g[e] + weight_decay * p[e]
        mv = beta1 * m[e] + (1.0 - beta1) * gv
        vv = beta2 * v[e] + (1.0 - beta2) * gv * gv
        m[e] = mv
        v[e] = vv
        p[e] = p[e] - lr * (mv / bc1) / (math.sqrt(vv / bc2) + eps)


@cuda.jit(cache=True)
def rmsprop_update(
    p, g, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered
):
    """One thread: PyTorch's RMSprop step for element e, in place on p and square_avg (grad_avg
    read and written only when centered, buf only when momentum > 0)."""
    e = cuda.grid(1)
    if e < p.size:
        gv = g[e] + weight_decay * p[e]
        sq = alpha * square_avg[e] + (1.0 - alpha) * gv * gv
        square_avg[e] = sq
        if centered:
            ga = alpha * grad_avg[e] + (1.0 - alpha) * gv
            grad_avg[e] = ga
            avg = math.sqrt(sq - ga * ga) + eps
        else:
            avg = math.sqrt(sq) + eps
        if momentum > 0.0:
            bv = momentum * buf[e] + gv / avg
            buf[e] = bv
            p[e] = p[e] - lr * bv
        else:
            p[e] = p[e] - lr * (gv / avg)


@cuda.jit(cache=True)
def adagrad_update(p, g, state_sum, clr, weight_decay, eps):
    """One thread: PyTorch's Adagrad step (clr = lr / (1 + (t-1) lr_decay)) for element e, in
    place on p and state_sum."""
    e = cuda.grid(1)
    if e < p.size:
        gv = g[e] + weight_decay * p[e]
        sv = state_sum[e] + gv * gv
        state_sum[e] = sv
        p[e] = p[e] - clr * (gv / (math.sqrt(sv) + eps))


# --------------------------------------------------------------------------- layout


@cuda.jit(cache=True)
def copy1(src, dst):
    """One thread: dst[i] = src[i] (src may be strided; dst contiguous)."""
    e = cuda.grid(1)
    if e < dst.size:
        dst[e] = src[e]


@cuda.jit(cache=True)
def copy2(src, dst):
    """One thread: dst[i, j] = src[i, j] for flat index e of dst."""
    e = cuda.grid(1)
    if e < dst.size:
        B = dst.shape[1]
        dst[e // B, e % B] = src[e // B, e % B]


@cuda.jit(cache=True)
def copy3(src, dst):
    """One thread: dst[i, j, k] = src[i, j, k] for flat index e of dst."""
    e = cuda.grid(1)
    if e < dst.size:
        B = dst.shape[1]
        Cc = dst.shape[2]
        i = e // (B * Cc)
        j = (e // Cc) % B
        k = e % Cc
        dst[i, j, k] = src[i, j, k]


@cuda.jit(cache=True)
def copy4(src, dst):
    """One thread: dst[n, c, h, w] = src[n, c, h, w] for flat index e of dst."""
    e = cuda.grid(1)
    if e < dst.size:
        C = dst.shape[1]
        H = dst.shape[2]
        W = dst.shape[3]
        w = e % W
        h = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        dst[n, c, h, w] = src[n, c, h, w]


COPY = {1: copy1, 2: copy2, 3: copy3, 4: copy4}
