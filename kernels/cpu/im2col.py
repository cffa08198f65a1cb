"""im2col / col2im for the GEMM formulation of convolution.

Notation: x (N, C, H, W), weight (K, C/G, KH, KW), y (N, K, OH, OW), P = OH*OW.
cols has shape (C*KH*KW, N*P): row r = (c*KH + kh)*KW + kw, column j = n*P + oh*OW + ow, so the
rows of group g form the contiguous block [g*CG*KH*KW, (g+1)*CG*KH*KW) and

    y_g = weight_g.reshape(KG, CG*KH*KW) @ cols_g      # (KG, CG*KH*KW) @ (CG*KH*KW, N*P)

is one BLAS call per group. Padding is never materialised: entries that fall in the padding are
written as zeros here and skipped in col2im.
"""

import numpy as np
from numba import njit

from ._common import FASTMATH, U, first_max, pick, select, valid_range
from .pool import _take_jumpless


@njit(nogil=True, cache=True)
def im2col(x, cols, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """x (N, C, H, W) -> cols (C*KH*KW, N*OH*OW), filled in place."""
    N, C, H, W = x.shape
    P = OH * OW
    NP = N * P
    xf = x.ravel()
    cf = cols.ravel()
    for r in range(C * KH * KW):
        c = r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
        oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
        for n in range(N):
            row = U(r * NP + n * P)  # start of this sample's block in row r
            for j in range(oh_lo * OW):  # output rows whose input row is in the top padding
                cf[row + U(j)] = 0
            for j in range(oh_hi * OW, P):  # ... bottom padding
                cf[row + U(j)] = 0
            for oh in range(oh_lo, oh_hi):
                dst = row + U(oh * OW)
                src = U(((n * C + c) * H + oh * sh - ph + kh * dh) * W + ow_lo * sw - pw + kw * dw)
                for ow in range(ow_lo):
                    cf[dst + U(ow)] = 0
                dst_in = dst + U(ow_lo)
                if sw == 1:
                    for i in range(ow_hi - ow_lo):
                        cf[dst_in + U(i)] = xf[src + U(i)]
                else:
                    for i in range(ow_hi - ow_lo):
                        cf[dst_in + U(i)] = xf[src + U(i * sw)]
                for ow in range(ow_hi, OW):
                    cf[dst + U(ow)] = 0


@njit(nogil=True, cache=True)
def col2im(cols, out, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """cols (C*KH*KW, N*OH*OW) -> out (N, C, H, W), overwritten with the sum of overlapping
    taps, each (n, c) plane summed in a fixed order (deterministic)."""
    N, C, H, W = out.shape
    P = OH * OW
    NP = N * P
    of = out.ravel()
    for i in range(of.size):
        of[i] = 0
    cf = cols.ravel()
    for nc in range(N * C):
        n = nc // C
        c = nc % C
        for kh in range(KH):
            oh_lo, oh_hi = valid_range(ph, kh * dh, sh, H, OH)
            for kw in range(KW):
                r = (c * KH + kh) * KW + kw
                ow_lo, ow_hi = valid_range(pw, kw * dw, sw, W, OW)
                for oh in range(oh_lo, oh_hi):
                    src = U(r * NP + n * P + oh * OW + ow_lo)
                    dst = U((nc * H + oh * sh - ph + kh * dh) * W + ow_lo * sw - pw + kw * dw)
                    if sw == 1:
                        for i in range(ow_hi - ow_lo):
                            of[dst + U(i)] += cf[src + U(i)]
                    else:
                        for i in range(ow_hi - ow_lo):
                            of[dst + U(i * sw)] += cf[src + U(i)]


@njit(inline="always", cache=True)
def bias_relu_row(af, src, of, dst, P, bk, relu):
    """of[dst + p] = af[src + p] + bk for p < P, then max(., 0) with ``relu`` (NaN stays NaN,
    as in np.maximum); af / of and src / dst may be the same (in place)."""
    if relu:
        for p in range(P):
            v = af[src + U(p)] + bk
            of[dst + U(p)] = 0 if v < 0 else v
    else:
        for p in range(P):
            of[dst + U(p)] = af[src + U(p)] + bk


@njit(nogil=True, cache=True)
def kn_to_nk(a, b, out, relu):
    """(K, N*P) -> out (N, K, P) plus bias b (K,): the GEMM result back into NCHW order; with
    ``relu``, max(., 0) in the same pass (the fused conv + bias + ReLU epilogue)."""
    N, K, P = out.shape
    af = a.ravel()
    of = out.ravel()
    for nk in range(N * K):
        n = nk // K
        k = nk % K
        bias_relu_row(af, U(k * N * P + n * P), of, U(nk * P), P, b[k], relu)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def nk_to_kn_sum(a, out, gb):
    """(N, K, P) -> out (K, N*P) in place, and gb[k] = sum of a[:, k, :] (fixed order).

    grad_y into the GEMM layout of cols; the bias gradient comes free with the same pass.
    FASTMATH lets the sum use SIMD lanes (without it this was the slowest step of the backward
    pass, 4x the copy); the lane order is fixed by the code, so the sum stays deterministic.
    """
    N, K, P = a.shape
    af = a.ravel()
    of = out.ravel()
    for k in range(K):
        acc = 0.0
        for n in range(N):
            src = U((n * K + k) * P)
            dst = U(k * N * P + n * P)
            for p in range(P):
                v = af[src + U(p)]
                of[dst + U(p)] = v
                acc += v
        gb[k] = acc


@njit(nogil=True, cache=True)
def kn_to_nk_pool(a, b, ks, ns, out, code, n0, OH, OW, KH, KW, relu):
    """(K, nb*P) -> out (nb, K, PH, PW): bias (and ReLU, with ``relu``) as in ``kn_to_nk``, then
    max pooling over non-overlapping KH x KW windows (stride = window, floor mode), in the same
    pass: the full-size output is never written (the fused conv + bias + ReLU + max-pool epilogue).

    a[k, n*P + p] sits at a.ravel()[k*ks + n*ns + p]: ks = nb*P, ns = P for the GEMM layout;
    ks = P, ns = K*P read an (nb, K, P) array instead. Each window's argmax, as its row-major
    position in the window, goes to code[((n0 + n)*K + k)*PH*PW + window] (``pool_planes``).
    """
    nb, K, PH, PW = out.shape
    af, of = a.ravel(), out.ravel()
    for n in range(nb):
        o = n * K * PH * PW
        pool_planes(
            af, n * ns, ks, OW, b, np.int64(0), K, of, o, code, n0 * K * PH * PW + o, PH, PW, KH,
            KW, relu,
        )  # np.int64: a literal 0 would compile pool_planes once more, for Literal[int](0)


@njit(nogil=True, cache=True)
def pool_planes(af, a0, ks, rs, b, k0, nk, of, o0, code, c0, PH, PW, KH, KW, relu):
    """Planes k < nk of a conv output, at af[a0 + k*ks + oh*rs + ow] (row pitch rs), plus
    b[k0 + k] (and ReLU, with ``relu``), max-pooled over non-overlapping KH x KW windows (stride
    = window, floor mode) into of[o0 + k*PH*PW + window]; each window's argmax, as its
    row-major position in the window, into code[c0 + k*PH*PW + window]. First maximum in
    row-major window order, a NaN wins (pool.py's rules: the result equals max_pool2d of the
    unfused output). 2x2 windows take an unrolled loop with no jumps (``first_max``, ``pick``:
    on AVX2 the branches it had cost LeNet-5 b64 0.9 ms a step in conv1 + pool alone).
    """
    zero = af.dtype.type(0)
    for kk in range(nk):
        bk = b[k0 + kk]
        src = U(a0 + kk * ks)
        dst = U(o0 + kk * PH * PW)
        cdst = U(c0 + kk * PH * PW)
        for ph in range(PH):
            r0 = src + U(ph * KH * rs)
            orow = U(ph * PW)
            if KH == 2 and KW == 2:
                r1 = r0 + U(rs)
                for pw in range(PW):
                    c = U(2 * pw)
                    v0 = af[r0 + c] + bk
                    v1 = af[r0 + c + U(1)] + bk
                    v2 = af[r1 + c] + bk
                    v3 = af[r1 + c + U(1)] + bk
                    if relu:  # NaN stays NaN, -0.0 stays -0.0
                        v0 = select(v0 < 0, zero, v0)
                        v1 = select(v1 < 0, zero, v1)
                        v2 = select(v2 < 0, zero, v2)
                        v3 = select(v3 < 0, zero, v3)
                    # first maximum of (v0, v1) and of (v2, v3), then of the two (row-major)
                    m01, t01 = first_max(v1, v0)
                    m23, t23 = first_max(v3, v2)
                    m, t = first_max(m23, m01)
                    of[dst + orow + U(pw)] = m
                    code[cdst + orow + U(pw)] = pick(t, 2 + np.int64(t23), np.int64(t01))
                continue
            for pw in range(PW):
                r = r0 + U(pw * KW)
                best = af[r] + bk
                if relu:
                    best = select(best < 0, zero, best)
                bi = 0
                for i in range(KH):
                    for j in range(KW):
                        v = af[r + U(i * rs + j)] + bk
                        if relu:
                            v = select(v < 0, zero, v)
                        best, bi = _take_jumpless(v, i * KW + j, best, bi)
                of[dst + orow + U(pw)] = best
                code[cdst + orow + U(pw)] = bi
