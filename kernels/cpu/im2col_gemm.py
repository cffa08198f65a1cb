"""The im2col convolution, all batch chunks in one ``prange`` loop: each chunk runs im2col, the
GEMMs (blas.gemm, straight into NumPy's BLAS) and the last transpose in a single native call on
one of Numba's threads. Used when ``blas.available()``; ops.py otherwise runs the same steps
chunk by chunk from Python threads.

Notation (im2col.py): x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), P = OH*OW,
R = CG*KH*KW, KG = K/G; chunk i covers images [bounds[i], bounds[i+1]), nb images, NP = nb*P.
Per group g:  y_g (KG, NP) = w_g (KG, R) @ cols_g (R, NP);
              grad_w_g^T (R, KG) = cols_g (R, NP) @ gy_g^T (NP, KG);
              gcols_g (R, NP) = w_g^T (R, KG) @ gy_g (KG, NP), then col2im.
grad_w and grad_b are written per chunk and summed by the caller in chunk order, so the bits
do not depend on the thread count. The caller validated every shape (BLAS does not check).
"""

import numpy as np
from numba import njit, prange

from .blas import gemm
from .im2col import col2im, im2col, kn_to_nk, kn_to_nk_pool, nk_to_kn_sum
from .tiers import parallel_njit


@njit(nogil=True, cache=True)
def _chunk_cols(x, kept, n0, n1, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, build):
    """Chunk [n0, n1)'s columns (C*KH*KW, nb*P): its part of ``kept`` (all chunks' columns one
    after the other) when kept is not empty, else a new array; filled by im2col if ``build``."""
    C = x.shape[1]
    rows, NP = C * KH * KW, (n1 - n0) * OH * OW
    if kept.size > 0:
        cols = kept[n0 * rows * OH * OW : n1 * rows * OH * OW].reshape(rows, NP)
    else:
        cols = np.empty((rows, NP), x.dtype)
    if build:
        im2col(x[n0:n1], cols, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw)
    return cols


@parallel_njit()
def conv2d(x, w, b, y, kept, code, bounds, OH, OW, sh, sw, ph, pw, dh, dw, G, relu, PKH, PKW):
    """y = conv2d(x, w) + b (ReLU with ``relu``), or, when PKH > 0, its PKH x PKW max pooling
    with argmax codes (im2col.kn_to_nk_pool). ``kept``: where to leave the columns for the
    backward pass (empty: not kept)."""
    K, CG, KH, KW = w.shape
    KG, R, P = K // G, CG * KH * KW, OH * OW
    wf = w.ravel()
    for i in prange(bounds.size - 1):
        n0, n1 = bounds[i], bounds[i + 1]
        nb = n1 - n0
        NP = nb * P
        cols = _chunk_cols(x, kept, n0, n1, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, True)
        ym = np.empty((K, NP), x.dtype)
        cf, yf = cols.ravel(), ym.ravel()
        for g in range(G):
            gemm(
                False, False, KG, NP, R, wf, g * KG * R, R, cf, g * R * NP, NP, yf, g * KG * NP, NP
            )
        if PKH == 0:
            kn_to_nk(ym, b, y[n0:n1].reshape(nb, K, P), relu)
        else:
            kn_to_nk_pool(ym, b, NP, P, y[n0:n1], code, n0, OH, OW, PKH, PKW, relu)


@parallel_njit()
def conv2d_backward(
    gy, x, w, gx, gw_parts, gb_parts, kept, bounds, sh, sw, ph, pw, dh, dw, G, need_x, need_w
):
    """Per chunk: grad_b part, grad_w part (gw_parts[i]: (G, R, KG)) and grad_x of its images.
    x is used only with ``need_w``; ``kept``: the forward pass's columns (empty: rebuild)."""
    N, K, OH, OW = gy.shape
    _, CG, KH, KW = w.shape
    KG, R, P = K // G, CG * KH * KW, OH * OW
    wf = w.ravel()
    for i in prange(bounds.size - 1):
        n0, n1 = bounds[i], bounds[i + 1]
        nb = n1 - n0
        NP = nb * P
        gym = np.empty((K, NP), gy.dtype)  # (nb, K, P) -> (K, nb*P), and the bias part
        nk_to_kn_sum(gy[n0:n1].reshape(nb, K, P), gym, gb_parts[i])
        gf = gym.ravel()
        if need_w:
            cols = _chunk_cols(
                x, kept, n0, n1, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw, kept.size == 0
            )
            cf, pf = cols.ravel(), gw_parts[i].ravel()
            for g in range(G):
                gemm(
                    False,
                    True,
                    R,
                    KG,
                    NP,
                    cf,
                    g * R * NP,
                    NP,
                    gf,
                    g * KG * NP,
                    NP,
                    pf,
                    g * R * KG,
                    KG,
                )
        if need_x:
            gcols = np.empty((G * R, NP), gy.dtype)
            cf = gcols.ravel()
            for g in range(G):
                gemm(
                    True,
                    False,
                    R,
                    NP,
                    KG,
                    wf,
                    g * KG * R,
                    R,
                    gf,
                    g * KG * NP,
                    NP,
                    cf,
                    g * R * NP,
                    NP,
                )
            col2im(gcols, gx[n0:n1], KH, KW, OH, OW, sh, sw, ph, pw, dh, dw)
