"""The NumPy oracle: obviously correct convolution and pooling, computed in float64.

Every kernel in fastconv is tested against these functions; they are never on a hot path.
Clarity beats speed here: each op is a short loop over kernel offsets (or pooling windows) with
one einsum or reduction inside, written straight from the definition. Results are computed in
float64 and returned in the input dtype.

Notation: x (N, C, H, W), weight (K, C/G, KH, KW), y (N, K, OH, OW); G groups, CG = C/G and
KG = K/G channels per group.

Definition (per group g, output channel k of that group):
    y[n, k, oh, ow] = b[k]
        + sum_{c, kh, kw} w[k, c, kh, kw] * xpad[n, c, oh*sh + kh*dh, ow*sw + kw*dw]
where xpad is x with ph zero rows on top and pw zero columns on the left (and zeros beyond).
"""

from __future__ import annotations

import numpy as np

from . import shapes


def _padded(x: np.ndarray, g: shapes.ConvGeom) -> np.ndarray:
    """x in float64 inside a zero frame large enough for every window the geometry reads."""
    hp = max(g.ph + g.H, (g.OH - 1) * g.sh + (g.KH - 1) * g.dh + 1)
    wp = max(g.pw + g.W, (g.OW - 1) * g.sw + (g.KW - 1) * g.dw + 1)
    xp = np.zeros((g.N, g.C, hp, wp))
    xp[:, :, g.ph : g.ph + g.H, g.pw : g.pw + g.W] = x
    return xp


def _window(g: shapes.ConvGeom, kh: int, kw: int) -> tuple[slice, slice]:
    """Rows/columns of the padded input that kernel tap (kh, kw) meets, one per output pixel."""
    r0, c0 = kh * g.dh, kw * g.dw
    return (
        slice(r0, r0 + (g.OH - 1) * g.sh + 1, g.sh),
        slice(c0, c0 + (g.OW - 1) * g.sw + 1, g.sw),
    )


# einsum's path for two operands, given (no path search per call): NumPy then contracts them by
# one BLAS matrix product (tensordot) instead of its own loops; the sum is the same definition.
_BLAS = ["einsum_path", (0, 1)]


def _groups(g: shapes.ConvGeom):
    for gi in range(g.G):
        yield slice(gi * g.CG, (gi + 1) * g.CG), slice(gi * g.KG, (gi + 1) * g.KG)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> np.ndarray:
    """Oracle for ``fastconv.conv2d``.

    Shape: x (N, C, H, W), weight (K, C/G, KH, KW), bias (K,) -> y (N, K, OH, OW).
    """
    x, weight, bias, g = shapes.check_conv2d(
        "reference.conv2d", x, weight, bias, stride, padding, dilation, groups
    )
    xp, w = _padded(x, g), weight.astype(np.float64)
    y = np.zeros(g.y_shape)
    for cs, ks in _groups(g):
        for kh in range(g.KH):
            for kw in range(g.KW):
                rows, cols = _window(g, kh, kw)
                patch = xp[:, cs, rows, cols]  # (N, CG, OH, OW)
                y[:, ks] += np.einsum("nchw,kc->nkhw", patch, w[ks, :, kh, kw], optimize=_BLAS)
    if bias is not None:
        y += bias.astype(np.float64)[None, :, None, None]
    return y.astype(x.dtype)


def conv2d_backward(grad_y, x, weight, stride=1, padding=0, dilation=1, groups=1):
    """Oracle for ``fastconv.conv2d_backward``: (grad_x, grad_weight, grad_bias).

    Differentiating the definition above term by term: each product w[k,c,kh,kw] * xpad[...]
    sends grad_y[n,k,oh,ow] * w[...] to that xpad position and grad_y * xpad[...] to w[...].
    """
    x, weight, _, g = shapes.check_conv2d(
        "reference.conv2d_backward", x, weight, None, stride, padding, dilation, groups
    )
    grad_y = shapes.check_grad("reference.conv2d_backward", grad_y, g.y_shape, "conv2d")
    xp, w, gy = _padded(x, g), weight.astype(np.float64), grad_y.astype(np.float64)
    gxp, gw = np.zeros_like(xp), np.zeros(g.w_shape)
    for cs, ks in _groups(g):
        for kh in range(g.KH):
            for kw in range(g.KW):
                rows, cols = _window(g, kh, kw)
                gxp[:, cs, rows, cols] += np.einsum(
                    "nkhw,kc->nchw", gy[:, ks], w[ks, :, kh, kw], optimize=_BLAS
                )
                gw[ks, :, kh, kw] += np.einsum(
                    "nkhw,nchw->kc", gy[:, ks], xp[:, cs, rows, cols], optimize=_BLAS
                )
    gx = gxp[:, :, g.ph : g.ph + g.H, g.pw : g.pw + g.W]
    gb = gy.sum(axis=(0, 2, 3))
    return gx.astype(x.dtype), gw.astype(x.dtype), gb.astype(x.dtype)


# --------------------------------------------------------------------------- pooling


def _pool_windows(g: shapes.PoolGeom):
    """For each output pixel: (oh, ow, input rows, input cols, divisor-with-padding).

    Windows are clipped to the real input; the divisor follows PyTorch's avg_pool2d (padding
    counts, positions past the right/bottom padding in ceil mode do not).
    """
    for oh in range(g.OH):
        for ow in range(g.OW):
            h0, w0 = oh * g.sh - g.ph, ow * g.sw - g.pw
            h1, w1 = min(h0 + g.KH, g.H + g.ph), min(w0 + g.KW, g.W + g.pw)
            padded_count = (h1 - h0) * (w1 - w0)
            rows = slice(max(h0, 0), min(h1, g.H))
            cols = slice(max(w0, 0), min(w1, g.W))
            yield oh, ow, rows, cols, padded_count


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False) -> np.ndarray:
    """Oracle for ``fastconv.max_pool2d`` (NaN counts as the largest value, as in PyTorch)."""
    x, g = shapes.check_pool2d("reference.max_pool2d", x, kernel_size, stride, padding, ceil_mode)
    x64, y = x.astype(np.float64), np.empty(g.y_shape)
    for oh, ow, rows, cols, _ in _pool_windows(g):
        win = x64[:, :, rows, cols].reshape(g.N, g.C, -1)
        y[:, :, oh, ow] = np.take_along_axis(win, win.argmax(-1)[..., None], -1)[..., 0]
    return y.astype(x.dtype)


def max_pool2d_backward(grad_y, x, kernel_size, stride=None, padding=0, ceil_mode=False):
    """Oracle for ``fastconv.max_pool2d_backward``: each window's gradient goes to its first
    maximum in row-major order (``argmax`` returns the first one; a NaN wins over numbers)."""
    op = "reference.max_pool2d_backward"
    x, g = shapes.check_pool2d(op, x, kernel_size, stride, padding, ceil_mode)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "max_pool2d")
    x64, gy, gx = x.astype(np.float64), grad_y.astype(np.float64), np.zeros(g.x_shape)
    n_idx, c_idx = np.meshgrid(np.arange(g.N), np.arange(g.C), indexing="ij")
    for oh, ow, rows, cols, _ in _pool_windows(g):
        win = x64[:, :, rows, cols]
        first = win.reshape(g.N, g.C, -1).argmax(-1)  # (N, C)
        r, c = rows.start + first // win.shape[3], cols.start + first % win.shape[3]
        np.add.at(gx, (n_idx, c_idx, r, c), gy[:, :, oh, ow])
    return gx.astype(x.dtype)


def avg_pool2d(
    x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
) -> np.ndarray:
    """Oracle for ``fastconv.avg_pool2d`` (zero padding; divisor as in PyTorch)."""
    x, g = shapes.check_pool2d(
        "reference.avg_pool2d", x, kernel_size, stride, padding, ceil_mode, count_include_pad
    )
    x64, y = x.astype(np.float64), np.empty(g.y_shape)
    for oh, ow, rows, cols, padded_count in _pool_windows(g):
        win = x64[:, :, rows, cols]
        div = padded_count if g.count_include_pad else win.shape[2] * win.shape[3]
        y[:, :, oh, ow] = win.sum(axis=(2, 3)) / div
    return y.astype(x.dtype)


def avg_pool2d_backward(
    grad_y, x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
):
    """Oracle for ``fastconv.avg_pool2d_backward``: each input in a window gets grad_y / divisor."""
    op = "reference.avg_pool2d_backward"
    x, g = shapes.check_pool2d(op, x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    grad_y = shapes.check_grad(op, grad_y, g.y_shape, "avg_pool2d")
    gy, gx = grad_y.astype(np.float64), np.zeros(g.x_shape)
    for oh, ow, rows, cols, padded_count in _pool_windows(g):
        nr, nc = rows.stop - rows.start, cols.stop - cols.start
        div = padded_count if g.count_include_pad else nr * nc
        gx[:, :, rows, cols] += (gy[:, :, oh, ow] / div)[:, :, None, None]
    return gx.astype(x.dtype)


# --------------------------------------------------------------------------- layers' other math
# Oracles for the non-convolution ops a training step needs. Same rules: float64 inside, result
# in the input dtype, written from the definition.


def relu(x):
    return np.maximum(x.astype(np.float64), 0.0).astype(x.dtype)


def relu_backward(grad_y, x):
    """d relu / dx = 1 where x > 0, else 0 (0 at x == 0, as in PyTorch)."""
    return (grad_y.astype(np.float64) * (x > 0)).astype(x.dtype)


def leaky_relu(x, negative_slope=0.01):
    x64 = x.astype(np.float64)
    return np.where(x64 > 0, x64, negative_slope * x64).astype(x.dtype)


def leaky_relu_backward(grad_y, x, negative_slope=0.01):
    return (grad_y.astype(np.float64) * np.where(x > 0, 1.0, negative_slope)).astype(x.dtype)


def sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(x.dtype)


def sigmoid_backward(grad_y, y):
    """From the output y = sigmoid(x): dy/dx = y (1 - y)."""
    y64 = y.astype(np.float64)
    return (grad_y.astype(np.float64) * y64 * (1.0 - y64)).astype(y.dtype)


def tanh(x):
    return np.tanh(x.astype(np.float64)).astype(x.dtype)


def tanh_backward(grad_y, y):
    """From the output y = tanh(x): dy/dx = 1 - y^2."""
    y64 = y.astype(np.float64)
    return (grad_y.astype(np.float64) * (1.0 - y64 * y64)).astype(y.dtype)


def linear(x, weight, bias=None):
    """y = x @ weight.T + bias. Shape: x (N, F), weight (O, F), bias (O,) -> (N, O)."""
    y = x.astype(np.float64) @ weight.astype(np.float64).T
    if bias is not None:
        y += bias.astype(np.float64)
    return y.astype(x.dtype)


def linear_backward(grad_y, x, weight):
    """(grad_x, grad_weight, grad_bias) = (gy @ W, gy.T @ x, gy summed over the batch)."""
    gy, x64, w64 = grad_y.astype(np.float64), x.astype(np.float64), weight.astype(np.float64)
    return (gy @ w64).astype(x.dtype), (gy.T @ x64).astype(x.dtype), gy.sum(0).astype(x.dtype)


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Mean softmax cross-entropy and its gradient: (loss as float, grad_logits).

    With eps = label_smoothing the target is (1 - eps) onehot(label) + eps / L (PyTorch's rule):
    loss_n = (1 - eps) (-log p[n, label_n]) + eps mean_j(-log p[n, j]), log p = z - logsumexp(z);
    grad = (softmax(z) - (1 - eps) onehot(label) - eps / L) / N.
    Shape: logits (N, L), labels (N,) integers in [0, L).
    """
    z = logits.astype(np.float64)
    n, classes = z.shape
    eps = float(label_smoothing)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    logp = z - lse[:, None]
    nll = -logp[np.arange(n), labels]
    loss = float(np.mean((1.0 - eps) * nll + eps * -logp.mean(axis=1)))
    target = np.full_like(z, eps / classes)
    target[np.arange(n), labels] += 1.0 - eps
    grad = np.exp(logp) - target
    return loss, (grad / n).astype(logits.dtype)


def sgd_update(
    p, grad, buf, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first=True
):
    """PyTorch's SGD step on copies: returns (new p, new momentum buffer)."""
    g = grad.astype(np.float64) + weight_decay * p.astype(np.float64)
    b = buf.astype(np.float64)
    if momentum != 0.0:
        b = g.copy() if first else momentum * b + (1.0 - dampening) * g
        g = g + momentum * b if nesterov else b
    return (p.astype(np.float64) - lr * g).astype(p.dtype), b.astype(p.dtype)


def adam_update(p, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    """PyTorch's Adam step (L2 weight decay, bias-corrected) on copies: (p, m, v). step >= 1."""
    g = grad.astype(np.float64) + weight_decay * p.astype(np.float64)
    m = beta1 * m.astype(np.float64) + (1.0 - beta1) * g
    v = beta2 * v.astype(np.float64) + (1.0 - beta2) * g * g
    mhat, vhat = m / (1.0 - beta1**step), v / (1.0 - beta2**step)
    p = p.astype(np.float64) - lr * mhat / (np.sqrt(vhat) + eps)
    return p.astype(grad.dtype), m.astype(grad.dtype), v.astype(grad.dtype)


def rmsprop_update(
    p, grad, square_avg, grad_avg, buf, lr, alpha, eps, weight_decay, momentum, centered
):
    """PyTorch's RMSprop step on copies: (p, square_avg, grad_avg, buf).

    grad_avg is used only when centered and buf only when momentum > 0; an unused one may be
    None and comes back as None.
    """
    g = grad.astype(np.float64) + weight_decay * p.astype(np.float64)
    s = alpha * square_avg.astype(np.float64) + (1.0 - alpha) * g * g
    ga = b = None
    if centered:
        ga = alpha * grad_avg.astype(np.float64) + (1.0 - alpha) * g
        avg = np.sqrt(s - ga * ga) + eps
    else:
        avg = np.sqrt(s) + eps
    if momentum > 0:
        b = momentum * buf.astype(np.float64) + g / avg
        new_p = p.astype(np.float64) - lr * b
    else:
        new_p = p.astype(np.float64) - lr * g / avg

    def cast(a):
        return None if a is None else a.astype(p.dtype)

    return cast(new_p), cast(s), cast(ga), cast(b)


def adagrad_update(p, grad, state_sum, lr, lr_decay, weight_decay, eps, step):
    """PyTorch's Adagrad step on copies: (p, state_sum). step >= 1.

    clr = lr / (1 + (step - 1) lr_decay); sum += g^2; p -= clr g / (sqrt(sum) + eps).
    """
    g = grad.astype(np.float64) + weight_decay * p.astype(np.float64)
    s = state_sum.astype(np.float64) + g * g
    clr = lr / (1.0 + (step - 1) * lr_decay)
    new_p = p.astype(np.float64) - clr * g / (np.sqrt(s) + eps)
    return new_p.astype(p.dtype), s.astype(p.dtype)


def mse_loss(pred, target):
    """Mean squared error and its gradient: (loss as float, 2 (pred - target) / numel)."""
    d = pred.astype(np.float64) - target.astype(np.float64)
    return float(np.mean(d * d)), (2.0 * d / d.size).astype(pred.dtype)


def dropout(x, keep_mask, scale):
    """Inverted dropout with a given mask: x * keep_mask * scale."""
    return (x.astype(np.float64) * keep_mask.astype(np.float64) * scale).astype(x.dtype)


def batch_norm2d(x, weight, bias, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    """Batch norm over (N, H, W) per channel: (y, save_mean, save_invstd).

    Training normalises with the batch mean and biased variance and updates the running
    statistics in place (unbiased variance, PyTorch's momentum rule); evaluation uses them.
    weight/bias None means 1/0. Shape: x (N, C, H, W), vectors (C,).
    """
    x64 = x.astype(np.float64)
    C = x.shape[1]
    per_channel = x64.transpose(1, 0, 2, 3).reshape(C, -1)  # (C, N*H*W)
    if training:
        mean = per_channel.mean(axis=1)
        var = ((per_channel - mean[:, None]) ** 2).mean(axis=1)
        if running_mean is not None:
            m = per_channel.shape[1]
            running_mean[...] = (1 - momentum) * running_mean + momentum * mean
            running_var[...] = (1 - momentum) * running_var + momentum * var * m / (m - 1)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    w = np.ones(C) if weight is None else weight.astype(np.float64)
    b = np.zeros(C) if bias is None else bias.astype(np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x64 - mean[None, :, None, None]) * invstd[None, :, None, None]
    y = xhat * w[None, :, None, None] + b[None, :, None, None]
    return y.astype(x.dtype), mean.astype(x.dtype), invstd.astype(x.dtype)


def batch_norm2d_backward(
    grad_y, x, weight, save_mean, save_invstd, training=True, mask=(True, True, True)
):
    """Gradients of ``batch_norm2d``, by the chain rule through mean and variance step by step.

    y = w * xhat + b, xhat = (x - mu) * (var + eps)^-1/2, and in training mu and var are the
    batch statistics of x: d var / d x_i = 2 (x_i - mu) / M, d mu / d x_i = 1 / M.
    """
    gy, x64 = grad_y.astype(np.float64), x.astype(np.float64)
    C = x.shape[1]
    M = x.size // C
    ax = (0, 2, 3)

    def bc(v):
        return v[None, :, None, None]

    mu, invstd = save_mean.astype(np.float64), save_invstd.astype(np.float64)
    w = np.ones(C) if weight is None else weight.astype(np.float64)
    xc = x64 - bc(mu)
    xhat = xc * bc(invstd)
    gb, gw = gy.sum(axis=ax), (gy * xhat).sum(axis=ax)
    gxhat = gy * bc(w)
    gx = gxhat * bc(invstd)
    if training:
        gvar = (gxhat * xc).sum(axis=ax) * -0.5 * invstd**3
        gmu = -(gxhat * bc(invstd)).sum(axis=ax) + gvar * (-2.0 * xc).sum(axis=ax) / M
        gx = gx + bc(gvar) * 2.0 * xc / M + bc(gmu) / M
    out = (gx.astype(x.dtype), gw.astype(x.dtype), gb.astype(x.dtype))
    return tuple(o if m else None for o, m in zip(out, mask, strict=True))


# --------------------------------------------------------------------------- softmax family, ELU,
# adaptive pooling, NLL, cat. Notation: softmax over axis ``dim`` of x (any shape), seen as
# (A, C, B) with A = prod(shape[:dim]), C = shape[dim], B = prod(shape[dim+1:]); adaptive pooling
# x (N, C, H, W) -> y (N, C, OH, OW); losses logits / logp (N, L), labels (N,).


def elu(x, alpha=1.0):
    """y = x where x > 0, else alpha (exp(x) - 1) (expm1: exact near 0). Shape: any -> same."""
    x64 = x.astype(np.float64)
    # expm1 of min(x, 0): the positive side is not used, and would overflow for x > 709
    return np.where(x64 > 0, x64, alpha * np.expm1(np.minimum(x64, 0.0))).astype(x.dtype)


def elu_backward(grad_y, x, alpha=1.0):
    """d elu / dx = 1 where x > 0, else alpha exp(x) (x == 0 takes the second branch, as in
    PyTorch)."""
    x64 = x.astype(np.float64)
    d = np.where(x64 > 0, 1.0, alpha * np.exp(np.minimum(x64, 0.0)))
    return (grad_y.astype(np.float64) * d).astype(x.dtype)


def softmax(x, dim):
    """exp(x - max) / sum(exp(x - max)) along ``dim``; a NaN makes its whole slice NaN.

    Shape: any (dim < x.ndim) -> same.
    """
    z = x.astype(np.float64)
    e = np.exp(z - z.max(axis=dim, keepdims=True))
    return (e / e.sum(axis=dim, keepdims=True)).astype(x.dtype)


def softmax_backward(grad_y, y, dim):
    """From the output: dy_i/dx_j = y_i (delta_ij - y_j), so gx = y (gy - sum(gy y, dim))."""
    gy, y64 = grad_y.astype(np.float64), y.astype(np.float64)
    return (y64 * (gy - (gy * y64).sum(axis=dim, keepdims=True))).astype(y.dtype)


def log_softmax(x, dim):
    """x - logsumexp(x) along ``dim`` (through the max shift). Shape: any -> same."""
    z = x.astype(np.float64)
    m = z.max(axis=dim, keepdims=True)
    return (z - m - np.log(np.exp(z - m).sum(axis=dim, keepdims=True))).astype(x.dtype)


def log_softmax_backward(grad_y, y, dim):
    """From the output: dy_i/dx_j = delta_ij - softmax_j = delta_ij - exp(y_j), so
    gx = gy - exp(y) sum(gy, dim)."""
    gy, y64 = grad_y.astype(np.float64), y.astype(np.float64)
    return (gy - np.exp(y64) * gy.sum(axis=dim, keepdims=True)).astype(y.dtype)


def _adaptive_windows(size, out):
    """PyTorch's adaptive windows along one axis: [floor(i size / out), ceil((i+1) size / out))
    for i in range(out); neighbours may overlap, and with out > size windows repeat."""
    return [slice(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def adaptive_avg_pool2d(x, output_size):
    """Mean of each adaptive window. Shape: x (N, C, H, W), output_size (OH, OW) ->
    y (N, C, OH, OW)."""
    N, C, H, W = x.shape
    OH, OW = output_size
    x64, y = x.astype(np.float64), np.empty((N, C, OH, OW))
    for oh, rows in enumerate(_adaptive_windows(H, OH)):
        for ow, cols in enumerate(_adaptive_windows(W, OW)):
            y[:, :, oh, ow] = x64[:, :, rows, cols].mean(axis=(2, 3))
    return y.astype(x.dtype)


def adaptive_avg_pool2d_backward(grad_y, x_shape):
    """Each input in window (oh, ow) gets grad_y[..., oh, ow] / window size; overlapping
    windows add up. Shape: grad_y (N, C, OH, OW), x_shape (N, C, H, W) -> grad_x x_shape."""
    N, C, H, W = x_shape
    OH, OW = grad_y.shape[2:]
    gy, gx = grad_y.astype(np.float64), np.zeros((N, C, H, W))
    for oh, rows in enumerate(_adaptive_windows(H, OH)):
        for ow, cols in enumerate(_adaptive_windows(W, OW)):
            count = (rows.stop - rows.start) * (cols.stop - cols.start)
            gx[:, :, rows, cols] += (gy[:, :, oh, ow] / count)[:, :, None, None]
    return gx.astype(grad_y.dtype)


def nll_loss(logp, labels):
    """Mean negative log-likelihood of log-probabilities: (loss as float, grad_logp).

    loss = -mean_n logp[n, label_n]; grad = -onehot(label) / N.
    Shape: logp (N, L), labels (N,) integers in [0, L).
    """
    n = logp.shape[0]
    loss = float(-np.mean(logp.astype(np.float64)[np.arange(n), labels]))
    grad = np.zeros(logp.shape)
    grad[np.arange(n), labels] = -1.0 / n
    return loss, grad.astype(logp.dtype)


def cat(arrays, dim):
    """Concatenation along ``dim``. Shape: equal except along dim -> sum of the sizes there."""
    return np.concatenate(arrays, axis=dim)  # a copy: no arithmetic to do in float64


def split(grad_y, sizes, dim):
    """The backward of ``cat``: consecutive pieces of grad_y along ``dim`` with these sizes."""
    offsets = np.cumsum([0, *sizes])
    index = [slice(None)] * grad_y.ndim
    pieces = []
    for a, b in zip(offsets[:-1], offsets[1:]):
        index[dim] = slice(int(a), int(b))
        pieces.append(grad_y[tuple(index)].copy())
    return pieces
