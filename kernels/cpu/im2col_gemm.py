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

Pointwise convolutions (1x1 kernel, stride 1, no padding: Inception's branches) need no
columns: an image's x (C, P) already is its cols, and its y (K, P) is already in NCHW order.
``conv2d_pointwise`` and ``conv2d_pointwise_backward`` run one GEMM per image and group
straight on x, y, grad_y and grad_x, without the im2col copy, the transposes or col2im.
"""

import numpy as np
from numba import njit, prange

from ._common import U
from .blas import gemm, gemm_beta
from .im2col import bias_relu_row, col2im, im2col, kn_to_nk, kn_to_nk_pool, nk_to_kn_sum
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


@njit(nogil=True, cache=True)
def _bias_relu(yf, o, K, P, b, relu):
    """y (K, P) at flat offset o += b per row (then ReLU, with ``relu``), in place; the same
    rounding and NaN rule as kn_to_nk."""
    for k in range(K):
        r = U(o + k * P)
        bias_relu_row(yf, r, yf, r, P, b[k], relu)


@parallel_njit()
def conv2d_pointwise(x, w, b, y, bounds, G, bias, relu):
    """y = conv2d(x, w) (+ b with ``bias``, ReLU with ``relu``) for a 1x1 kernel, stride 1, no
    padding: per image and group, y[n]_g (KG, P) = w_g (KG, CG) @ x[n]_g (CG, P)."""
    N, C, H, W = x.shape
    K, CG = w.shape[0], w.shape[1]
    KG, P = K // G, H * W
    wf, xf, yf = w.ravel(), x.ravel(), y.ravel()
    for i in prange(bounds.size - 1):
        for n in range(bounds[i], bounds[i + 1]):
            for g in range(G):
                gemm(
                    False, False, KG, P, CG, wf, g * KG * CG, CG, xf, (n * C + g * CG) * P, P,
                    yf, (n * K + g * KG) * P, P,
                )  # fmt: skip
            if bias or relu:
                _bias_relu(yf, n * K * P, K, P, b, relu)


@parallel_njit()
def conv2d_pointwise_backward(gy, x, w, gx, gw_parts, bounds, G, need_x, need_w):
    """The pointwise convolution's gradients per chunk of images: grad_x of its images, and
    its part of grad_w, gw_parts[i]_g (CG, KG) = sum over its images n (in order) of
    x[n]_g (CG, P) @ gy[n]_g^T (P, KG). x is used only with ``need_w``, w only with
    ``need_x``. grad_b is the caller's (a per-channel sum of gy)."""
    N, K, OH, OW = gy.shape
    CG = w.shape[1]
    KG, P, C = K // G, OH * OW, CG * G
    wf, gyf, xf, gxf = w.ravel(), gy.ravel(), x.ravel(), gx.ravel()
    for i in prange(bounds.size - 1):
        n0, n1 = bounds[i], bounds[i + 1]
        pf = gw_parts[i].ravel() if need_w else gw_parts.ravel()
        for n in range(n0, n1):  # both gradients of an image while its gy is in cache
            for g in range(G):
                gyo = (n * K + g * KG) * P
                if need_w:
                    gemm_beta(
                        False, True, CG, KG, P, xf, (n * C + g * CG) * P, P, gyf, gyo, P,
                        0.0 if n == n0 else 1.0, pf, g * CG * KG, KG,
                    )  # fmt: skip
                if need_x:
                    gemm(
                        True, False, CG, P, KG, wf, g * KG * CG, CG, gyf, gyo, P, gxf,
                        (n * C + g * CG) * P, P,
                    )  # fmt: skip
