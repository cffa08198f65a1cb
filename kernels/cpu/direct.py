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

from ._common import FASTMATH, U, valid_range


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_forward(x, w, b, OH, OW, sh, sw, ph, pw, dh, dw, G):
    """y (N, K, OH, OW) from x, w and bias b (K,); one thread per (n, k) output plane."""
    N, C, H, W = x.shape
    K, CG, KH, KW = w.shape
    KG = K // G
    y = np.empty((N, K, OH, OW), dtype=x.dtype)
    xf = x.ravel()
    yf = y.ravel()
    P = OH * OW
    for nk in prange(N * K):
        n = nk // K
        k = nk % K
        c0 = (k // KG) * CG
        yb = U(nk * P)
        b0 = b[k]
        for p in range(P):
            yf[yb + U(p)] = b0
        for c in range(CG):
            xb = (n * C + c0 + c) * H
            for kh in range(KH):
                oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
                for kw in range(KW):
                    ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                    wv = w[k, c, kh, kw]
                    for oh in range(oh_lo, oh_hi):
                        dst = yb + U(oh * OW + ow_lo)
                        src = U((xb + oh * sh - ph + kh * dh) * W + ow_lo * sw - pw + kw * dw)
                        if sw == 1:
                            for i in range(ow_hi - ow_lo):
                                yf[dst + U(i)] += wv * xf[src + U(i)]
                        else:
                            for i in range(ow_hi - ow_lo):
                                yf[dst + U(i)] += wv * xf[src + U(i * sw)]
    return y


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_backward_data(gy, w, H, W, sh, sw, ph, pw, dh, dw, G):
    """grad_x (N, C, H, W); one thread per (n, c) input plane, scattering from gy."""
    N, K, OH, OW = gy.shape
    _, CG, KH, KW = w.shape
    KG = K // G
    C = CG * G
    gx = np.zeros((N, C, H, W), dtype=gy.dtype)
    gxf = gx.ravel()
    gyf = gy.ravel()
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        g = c // CG
        cl = c - g * CG
        for k in range(g * KG, (g + 1) * KG):
            gb = (n * K + k) * OH
            for kh in range(KH):
                oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
                for kw in range(KW):
                    ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                    wv = w[k, cl, kh, kw]
                    for oh in range(oh_lo, oh_hi):
                        src = U((gb + oh) * OW + ow_lo)
                        dst = U((nc * H + oh * sh - ph + kh * dh) * W + ow_lo * sw - pw + kw * dw)
                        if sw == 1:
                            for i in range(ow_hi - ow_lo):
                                gxf[dst + U(i)] += wv * gyf[src + U(i)]
                        else:
                            for i in range(ow_hi - ow_lo):
                                gxf[dst + U(i * sw)] += wv * gyf[src + U(i)]
    return gx


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def conv2d_backward_filter(gy, x, KH, KW, sh, sw, ph, pw, dh, dw, G):
    """grad_w (K, CG, KH, KW); one thread per (k, c) filter slice, reducing over n, oh, ow."""
    N, K, OH, OW = gy.shape
    _, C, H, W = x.shape
    CG = C // G
    KG = K // G
    gw = np.zeros((K, CG, KH, KW), dtype=gy.dtype)
    xf = x.ravel()
    gyf = gy.ravel()
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
                        src_y = U(((n * K + k) * OH + oh) * OW + ow_lo)
                        src_x = U(
                            ((n * C + c) * H + oh * sh - ph + kh * dh) * W
                            + ow_lo * sw
                            - pw
                            + kw * dw
                        )
                        if sw == 1:
                            for i in range(ow_hi - ow_lo):
                                acc += gyf[src_y + U(i)] * xf[src_x + U(i)]
                        else:
                            for i in range(ow_hi - ow_lo):
                                acc += gyf[src_y + U(i)] * xf[src_x + U(i * sw)]
                gw[k, cl, kh, kw] = acc
    return gw
