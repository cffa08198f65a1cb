"""im2col / col2im and the layout permutes of the GEMM formulation of convolution, on the GPU.

Notation: x (N, C, H, W), w (K, CG, KH, KW), y / gy (N, K, OH, OW), G groups, CG = C/G,
KG = K/G, P = OH*OW, R = CG*KH*KW, Rt = C*KH*KW = G*R. Row r = (c*KH + kh)*KW + kw of a column
matrix holds tap (kh, kw) of channel c; input position ih = oh*sh - ph + kh*dh (likewise iw),
zero outside [0, H) x [0, W).

Two layouts of the same numbers (``nrp`` flag of im2col):
    NRP  cols[n, r, p]         (N, Rt, P)    forward: y[n, g] = w[g] @ cols[n, g] writes NCHW
                                                       directly, no permute afterwards
    RNP  cols[r, n*P + p]      (Rt, N*P)     backward: the reduction of grad_w runs over n*P
col2im reads the RNP layout. Every kernel is a pure gather: one thread per output element.
"""

from numba import cuda


@cuda.jit(cache=True)
def im2col(x, cols, nrp, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw):
    """One thread: one element of cols (flat), the input value tap r meets at output pixel p of
    image n (zero in the padding)."""
    N, C, H, W = x.shape
    P = OH * OW
    RT = C * KH * KW
    e = cuda.grid(1)
    if e < N * RT * P:
        p = e % P
        if nrp:
            r = (e // P) % RT
            n = e // (P * RT)
        else:
            n = (e // P) % N
            r = e // (P * N)
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
    output pixel (oh, ow) exists, of cols[(c*KH + kh)*KW + kw, n*P + oh*OW + ow] (RNP layout)."""
    N, C, H, W = gx.shape
    P = OH * OW
    NP = N * P
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
                j0 = n * P + (num_h // sh) * OW
                r0 = (c * KH + kh) * KW
                for kw in range(KW):
                    num_w = iw + pw - kw * dw
                    if num_w >= 0 and num_w % sw == 0 and num_w // sw < OW:
                        acc[0] += cols[(r0 + kw) * NP + j0 + num_w // sw]
        gx[n, c, ih, iw] = acc[0]


@cuda.jit(cache=True)
def nk_to_kn(a, out):
    """One thread: out[k, n*P + p] = a[n, k, p] (grad_y into the RNP layout, (K, N*P))."""
    N, K, P = a.shape
    e = cuda.grid(1)
    if e < N * K * P:
        p = e % P
        n = (e // P) % N
        k = e // (P * N)
        out[k, n * P + p] = a[n, k, p]
