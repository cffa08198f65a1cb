"""Direct convolution: forward, backward-data and backward-filter with no im2col buffer.

Notation: x (N, C, H, W), weight (K, CG, KH, KW) with CG = C/G, y (N, K, OH, OW), KG = K/G.
Input position of output (oh, ow), tap (kh, kw): ih = oh*sh - ph + kh*dh, iw = ow*sw - pw + kw*dw.
Taps in the zero padding are skipped via ``valid_range`` instead of testing every element.

Backward, derived once from  y[n,k,oh,ow] = sum_{c,kh,kw} w[k,c,kh,kw] * x[n, g*CG+c, ih, iw]:
  grad_x[n, g*CG+c, ih, iw] = sum_{k in group g; kh, kw, oh, ow hitting (ih, iw)}
                                  w[k,c,kh,kw] * gy[n,k,oh,ow]
      i.e. the transposed convolution of gy with w (a full correlation of the stride-dilated gy
      with the flipped kernel); written here as a scatter from gy, one thread per (n, c) plane.
  grad_w[k, c, kh, kw] = sum_{n, oh, ow} gy[n,k,oh,ow] * x[n, g*CG+c, ih, iw]
      i.e. the correlation of x with gy (gy acting as the kernel, dilation and stride swapped).
Every output element is owned by one thread and summed in a fixed order: deterministic.
"""

import numpy as np
from numba import njit, prange

from ._common import FASTMATH, valid_range


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_forward(x, w, b, OH, OW, sh, sw, ph, pw, dh, dw, G):
    """y (N, K, OH, OW) from x, w and bias b (K,); one thread per (n, k) output plane."""
    N, C, H, W = x.shape
    K, CG, KH, KW = w.shape
    KG = K // G
    y = np.empty((N, K, OH, OW), dtype=x.dtype)
    for nk in prange(N * K):
        n = nk // K
        k = nk % K
        c0 = (k // KG) * CG
        b0 = b[k]
        for oh in range(OH):
            for ow in range(OW):
                y[n, k, oh, ow] = b0
        for c in range(CG):
            for kh in range(KH):
                oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
                for kw in range(KW):
                    ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                    wv = w[k, c, kh, kw]
                    for oh in range(oh_lo, oh_hi):
                        ih = oh * sh - ph + kh * dh
                        for ow in range(ow_lo, ow_hi):
                            y[n, k, oh, ow] += wv * x[n, c0 + c, ih, ow * sw - pw + kw * dw]
    return y


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_backward_data(gy, w, H, W, sh, sw, ph, pw, dh, dw, G):
    """grad_x (N, C, H, W); one thread per (n, c) input plane, scattering from gy."""
    N, K, OH, OW = gy.shape
    _, CG, KH, KW = w.shape
    KG = K // G
    C = CG * G
    gx = np.zeros((N, C, H, W), dtype=gy.dtype)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        g = c // CG
        cl = c - g * CG
        for k in range(g * KG, (g + 1) * KG):
            for kh in range(KH):
                oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
                for kw in range(KW):
                    ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                    wv = w[k, cl, kh, kw]
                    for oh in range(oh_lo, oh_hi):
                        ih = oh * sh - ph + kh * dh
                        for ow in range(ow_lo, ow_hi):
                            gx[n, c, ih, ow * sw - pw + kw * dw] += wv * gy[n, k, oh, ow]
    return gx


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_backward_filter(gy, x, KH, KW, sh, sw, ph, pw, dh, dw, G):
    """grad_w (K, CG, KH, KW); one thread per (k, c) filter slice, reducing over n, oh, ow."""
    N, K, OH, OW = gy.shape
    _, C, H, W = x.shape
    CG = C // G
    KG = K // G
    gw = np.zeros((K, CG, KH, KW), dtype=gy.dtype)
    for kc in prange(K * CG):
        k = kc // CG
        cl = kc % CG
        c = (k // KG) * CG + cl
        for kh in range(KH):
            oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
            for kw in range(KW):
                ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                acc = gw[k, cl, kh, kw]
                for n in range(N):
                    for oh in range(oh_lo, oh_hi):
                        ih = oh * sh - ph + kh * dh
                        for ow in range(ow_lo, ow_hi):
                            acc += gy[n, k, oh, ow] * x[n, c, ih, ow * sw - pw + kw * dw]
                gw[k, cl, kh, kw] = acc
    return gw
