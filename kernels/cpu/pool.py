"""Max and average pooling, forward and backward.

Notation: x (N, C, H, W), y (N, C, OH, OW); window (oh, ow) covers input rows
[oh*sh - ph, oh*sh - ph + KH) and columns [ow*sw - pw, ow*sw - pw + KW), clipped to the input.
One thread owns one (n, c) plane in every kernel, so backward scatters are race-free and
deterministic.

Max pooling: NaN counts as larger than any number (PyTorch propagates NaN); the backward pass
sends each window's gradient to its FIRST maximum in row-major window order.
Average pooling divisor (PyTorch's): with count_include_pad, the window clipped to the padded
input (h1 = min(h0 + KH, H + ph)); without, the number of real input pixels in the window.
"""

import math

import numpy as np
from numba import njit, prange


@njit(inline="always", cache=True)
def _window(o, s, p, k, size):
    """(start clipped to input, end clipped to input, padded extent for the divisor)."""
    lo = o * s - p
    hi_pad = min(lo + k, size + p)
    extent = hi_pad - lo
    return max(lo, 0), min(hi_pad, size), extent


@njit(inline="always", cache=True)
def _argmax(x, n, c, r0, r1, c0, c1):
    """Row-major first maximum of x[n, c, r0:r1, c0:c1] (first NaN if any)."""
    best = x[n, c, r0, c0]
    br, bc = r0, c0
    for r in range(r0, r1):
        for q in range(c0, c1):
            v = x[n, c, r, q]
            if v > best or (math.isnan(v) and not math.isnan(best)):
                best = v
                br, bc = r, q
    return best, br, bc


@njit(parallel=True, cache=True)
def max_pool2d_forward(x, KH, KW, OH, OW, sh, sw, ph, pw):
    N, C, H, W = x.shape
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for oh in range(OH):
            r0, r1, _ = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, _ = _window(ow, sw, pw, KW, W)
                best, _, _ = _argmax(x, n, c, r0, r1, c0, c1)
                y[n, c, oh, ow] = best
    return y


@njit(parallel=True, cache=True)
def max_pool2d_backward(gy, x, KH, KW, sh, sw, ph, pw):
    N, C, H, W = x.shape
    OH, OW = gy.shape[2], gy.shape[3]
    gx = np.zeros_like(x)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for oh in range(OH):
            r0, r1, _ = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, _ = _window(ow, sw, pw, KW, W)
                _, br, bc = _argmax(x, n, c, r0, r1, c0, c1)
                gx[n, c, br, bc] += gy[n, c, oh, ow]
    return gx


@njit(parallel=True, cache=True)
def avg_pool2d_forward(x, KH, KW, OH, OW, sh, sw, ph, pw, count_include_pad):
    N, C, H, W = x.shape
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for oh in range(OH):
            r0, r1, eh = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, ew = _window(ow, sw, pw, KW, W)
                div = eh * ew if count_include_pad else (r1 - r0) * (c1 - c0)
                acc = 0.0
                for r in range(r0, r1):
                    for q in range(c0, c1):
                        acc += x[n, c, r, q]
                y[n, c, oh, ow] = acc / div
    return y


@njit(parallel=True, cache=True)
def avg_pool2d_backward(gy, H, W, KH, KW, sh, sw, ph, pw, count_include_pad):
    N, C, OH, OW = gy.shape
    gx = np.zeros((N, C, H, W), dtype=gy.dtype)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for oh in range(OH):
            r0, r1, eh = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, ew = _window(ow, sw, pw, KW, W)
                div = eh * ew if count_include_pad else (r1 - r0) * (c1 - c0)
                g = gy[n, c, oh, ow] / div
                for r in range(r0, r1):
                    for q in range(c0, c1):
                        gx[n, c, r, q] += g
    return gx
