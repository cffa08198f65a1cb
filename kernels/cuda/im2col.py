"""im2col / col2im for the GEMM formulation of convolution, on the GPU.

Notation: x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), G groups, CG = C/G,
KG = K/G, P = OH*OW, R = CG*KH*KW, Rt = C*KH*KW = G*R. Row r = (c*KH + kh)*KW + kw of a column
matrix holds tap (kh, kw) of channel c; input position ih = oh*sh - ph + kh*dh (likewise iw),
zero outside [0, H) x [0, W).

Layout: cols[n, r, p], shape (N, Rt, P), i.e. (N*G, R, P) with the rows of group g of image n
contiguous. Every GEMM of the convolution is then one batched launch over the N*G (image,
group) pairs, reading and writing NCHW directly (no transposes; see ops.py):
    forward   y[n, g]     (KG, P) = w[g] (KG, R) @ cols[n, g] (R, P)
    grad_w    part[n, g]  (KG, R) = gy[n, g] (KG, P) @ cols[n, g]^T (P, R), summed over n
    grad_x    gcols[n, g] (R, P)  = w[g]^T (R, KG) @ gy[n, g] (KG, P), then col2im
Both kernels are pure gathers: one thread per output element, nothing written twice.
"""

from numba import cuda


@cuda.jit(cache=True)
def im2col(x, cols, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """One thread: one element cols[n, r, p] (flat), the input value tap r meets at output
    pixel p of image n (zero in the padding)."""
    N, C, H, W = x.shape
    P = OH * OW
    RT = C * KH * KW
    e = cuda.grid(1)
    if e < N * RT * P:
        p = e % P
        r = (e // P) % RT
        n = e // (P * RT)
        c = r // (KH * KW)
        kh = (r // KW) % KH
        kw = r % KW
        ih = (p // OW) * sh - ph + kh * dh
        iw = (p % OW) * sw - pw + kw * dw
        if ih >= 0 and ih < H and iw >= 0 and iw < W:
            cols[e] = x[n, c, ih, iw]
        else:
            cols[e] = 0


@cuda.jit(cache=True)
def col2im(cols, gx, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """One thread: gx[n, c, ih, iw] = the sum, over taps (kh, kw) in row-major order whose
    output pixel (oh, ow) exists, of cols[n, (c*KH + kh)*KW + kw, oh*OW + ow] (flat)."""
    N, C, H, W = gx.shape
    P = OH * OW
    e = cuda.grid(1)
    if e < N * C * H * W:
        iw = e % W
        ih = (e // W) % H
        c = (e // (W * H)) % C
        n = e // (W * H * C)
        acc = cuda.local.array(1, gx.dtype)  # a typed zero accumulator (a register)
        acc[0] = 0
        for kh in range(KH):
            num_h = ih + ph - kh * dh
            if num_h >= 0 and num_h % sh == 0 and num_h // sh < OH:
                row = ((n * C + c) * KH + kh) * KW * P + (num_h // sh) * OW
                for kw in range(KW):
                    num_w = iw + pw - kw * dw
                    if num_w >= 0 and num_w % sw == 0 and num_w // sw < OW:
                        acc[0] += cols[row + kw * P + num_w // sw]
        gx[n, c, ih, iw] = acc[0]
