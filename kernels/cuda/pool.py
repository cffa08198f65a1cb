"""Max and average pooling, forward and backward, on the GPU.

Notation: x (N, C, H, W), y / gy (N, C, OH, OW); window (oh, ow) covers input rows
[oh*sh - ph, oh*sh - ph + KH) and columns [ow*sw - pw, ow*sw - pw + KW), clipped to the input.

Max pooling: NaN counts as larger than any number (PyTorch propagates NaN); the backward pass
sends each window's gradient to its FIRST maximum in row-major window order.
Average pooling divisor (PyTorch's): with count_include_pad, the window clipped to the padded
input (h1 = min(h0 + KH, H + ph)); without, the number of real input pixels in the window.

Both backward kernels are gathers: the thread owning grad_x[n, c, ih, iw] visits the windows
that contain (ih, iw), oh in [ceil((ih + ph - KH + 1) / sh), floor((ih + ph) / sh)] and
likewise ow, in row-major order, so no two threads write one element and the order is fixed.
"""

import math

from numba import cuda


@cuda.jit(device=True, inline=True)
def _first_max(x, n, c, r0, r1, c0, c1):
    """Row-major position of the first maximum of x[n, c, r0:r1, c0:c1] (first NaN if any)."""
    best = x[n, c, r0, c0]
    br = r0
    bc = c0
    for r in range(r0, r1):
        for q in range(c0, c1):
            v = x[n, c, r, q]
            if v > best or (math.isnan(v) and not math.isnan(best)):
                best = v
                br = r
                bc = q
    return br, bc


@cuda.jit(cache=True)
def max_pool2d_forward(x, y, KH, KW, sh, sw, ph, pw):
    """One thread: y[n, c, oh, ow], the maximum of its (clipped) window."""
    N, C, H, W = x.shape
    OH = y.shape[2]
    OW = y.shape[3]
    e = cuda.grid(1)
    if e < N * C * OH * OW:
        ow = e % OW
        oh = (e // OW) % OH
        c = (e // (OW * OH)) % C
        n = e // (OW * OH * C)
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        br, bc = _first_max(x, n, c, max(h0, 0), min(h0 + KH, H), max(w0, 0), min(w0 + KW, W))
        y[n, c, oh, ow] = x[n, c, br, bc]


@cuda.jit(cache=True)
def max_pool2d_backward(gy, x, gx, KH, KW, sh, sw, ph, pw):
    """One thread: gx[n, c, ih, iw], the sum of gy over the windows whose first maximum is
    (ih, iw)."""
    N, C, H, W = x.shape
    OH = gy.shape[2]
    OW = gy.shape[3]
    e = cuda.grid(1)
    if e < N * C * H * W:
        iw = e % W
        ih = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        acc = cuda.local.array(1, gx.dtype)
        acc[0] = 0
        oh_lo = max(0, -((-(ih + ph - KH + 1)) // sh))
        oh_hi = min(OH - 1, (ih + ph) // sh)
        ow_lo = max(0, -((-(iw + pw - KW + 1)) // sw))
        ow_hi = min(OW - 1, (iw + pw) // sw)
        for oh in range(oh_lo, oh_hi + 1):
            h0 = oh * sh - ph
            for ow in range(ow_lo, ow_hi + 1):
                w0 = ow * sw - pw
                br, bc = _first_max(
                    x, n, c, max(h0, 0), min(h0 + KH, H), max(w0, 0), min(w0 + KW, W)
                )
                if br == ih and bc == iw:
                    acc[0] += gy[n, c, oh, ow]
        gx[n, c, ih, iw] = acc[0]


@cuda.jit(device=True, inline=True)
def _divisor(oh, ow, KH, KW, sh, sw, ph, pw, H, W, count_include_pad):
    h0 = oh * sh - ph
    w0 = ow * sw - pw
    h1 = min(h0 + KH, H + ph)
    w1 = min(w0 + KW, W + pw)
    if count_include_pad:
        return (h1 - h0) * (w1 - w0)
    return (min(h1, H) - max(h0, 0)) * (min(w1, W) - max(w0, 0))


@cuda.jit(cache=True)
def avg_pool2d_forward(x, y, KH, KW, sh, sw, ph, pw, count_include_pad):
    """One thread: y[n, c, oh, ow], the sum of its clipped window over the PyTorch divisor."""
    N, C, H, W = x.shape
    OH = y.shape[2]
    OW = y.shape[3]
    e = cuda.grid(1)
    if e < N * C * OH * OW:
        ow = e % OW
        oh = (e // OW) % OH
        c = (e // (OW * OH)) % C
        n = e // (OW * OH * C)
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        acc = cuda.local.array(1, y.dtype)
        acc[0] = 0
        for r in range(max(h0, 0), min(h0 + KH, H)):
            for q in range(max(w0, 0), min(w0 + KW, W)):
                acc[0] += x[n, c, r, q]
        y[n, c, oh, ow] = acc[0] / _divisor(oh, ow, KH, KW, sh, sw, ph, pw, H, W, count_include_pad)


@cuda.jit(cache=True)
def avg_pool2d_backward(gy, gx, KH, KW, sh, sw, ph, pw, count_include_pad):
    """One thread: gx[n, c, ih, iw], the sum of gy / divisor over the windows containing it."""
    N, C, H, W = gx.shape
    OH = gy.shape[2]
    OW = gy.shape[3]
    e = cuda.grid(1)
    if e < N * C * H * W:
        iw = e % W
        ih = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        acc = cuda.local.array(1, gx.dtype)
        acc[0] = 0
        oh_lo = max(0, -((-(ih + ph - KH + 1)) // sh))
        oh_hi = min(OH - 1, (ih + ph) // sh)
        ow_lo = max(0, -((-(iw + pw - KW + 1)) // sw))
        ow_hi = min(OW - 1, (iw + pw) // sw)
        for oh in range(oh_lo, oh_hi + 1):
            for ow in range(ow_lo, ow_hi + 1):
                acc[0] += gy[n, c, oh, ow] / _divisor(
                    oh, ow, KH, KW, sh, sw, ph, pw, H, W, count_include_pad
                )
        gx[n, c, ih, iw] = acc[0]
