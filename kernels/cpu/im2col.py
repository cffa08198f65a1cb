"""im2col / col2im for the GEMM formulation of convolution.

Notation: x (N, C, H, W), weight (K, C/G, KH, KW), y (N, K, OH, OW), P = OH*OW.
cols has shape (C*KH*KW, N*P): row r = (c*KH + kh)*KW + kw, column j = n*P + oh*OW + ow, so the
rows of group g form the contiguous block [g*CG*KH*KW, (g+1)*CG*KH*KW) and

    y_g = weight_g.reshape(KG, CG*KH*KW) @ cols_g      # (KG, CG*KH*KW) @ (CG*KH*KW, N*P)

is one BLAS call per group. Padding is never materialised: entries that fall in the padding are
written as zeros here and skipped in col2im.
"""

import numpy as np
from numba import njit, prange

from ._common import valid_range


@njit(parallel=True, cache=True)
def im2col(x, cols, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), filled in place. One thread fills whole rows."""
    N, C, H, W = x.shape
    P = OH * OW
    for r in prange(C * KH * KW):
        c = r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
        for n in range(N):
            for oh in range(OH):
                j0 = n * P + oh * OW
                ih = oh * sh - ph + kh * dh
                if ih < 0 or ih >= H:
                    for ow in range(OW):
                        cols[r, j0 + ow] = 0
                    continue
                for ow in range(ow_lo):
                    cols[r, j0 + ow] = 0
                for ow in range(ow_lo, ow_hi):
                    cols[r, j0 + ow] = x[n, c, ih, ow * sw - pw + kw * dw]
                for ow in range(ow_hi, OW):
                    cols[r, j0 + ow] = 0


@njit(parallel=True, cache=True)
def col2im(cols, N, C, H, W, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """cols (C*KH*KW, N*OH*OW) -> x-shaped (N, C, H, W), summing overlapping taps.

    One thread owns one (n, c) plane, so the sum is race-free and its order fixed (deterministic).
    """
    P = OH * OW
    out = np.zeros((N, C, H, W), dtype=cols.dtype)
    for nc in prange(N * C):
        n = nc // C
        c = nc % C
        for kh in range(KH):
            oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
            for kw in range(KW):
                r = (c * KH + kh) * KW + kw
                ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                for oh in range(oh_lo, oh_hi):
                    ih = oh * sh - ph + kh * dh
                    j0 = n * P + oh * OW
                    for ow in range(ow_lo, ow_hi):
                        out[n, c, ih, ow * sw - pw + kw * dw] += cols[r, j0 + ow]
    return out


@njit(parallel=True, cache=True)
def kn_to_nk(a, b, N, K, P):
    """(K, N*P) -> (N, K, P) plus bias b (K,): the GEMM result back into NCHW order."""
    out = np.empty((N, K, P), dtype=a.dtype)
    for nk in prange(N * K):
        n = nk // K
        k = nk % K
        bk = b[k]
        for p in range(P):
            out[n, k, p] = a[k, n * P + p] + bk
    return out


@njit(parallel=True, cache=True)
def nk_to_kn_sum(a, out, gb):
    """(N, K, P) -> out (K, N*P) in place, and gb[k] = sum of a[:, k, :] (fixed order).

    grad_y into the GEMM layout of cols; the bias gradient comes free with the same pass.
    """
    N, K, P = a.shape
    for k in prange(K):
        acc = 0.0
        for n in range(N):
            for p in range(P):
                v = a[n, k, p]
                out[k, n * P + p] = v
                acc += v
        gb[k] = acc
