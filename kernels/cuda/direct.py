"""Direct convolution on the GPU, shared-memory tiled: forward, backward-data, backward-filter.

Notation: x (N, C, H, W), w (K, CG, KH, KW) with CG = C/G, y / gy (N, K, OH, OW), KG = K/G,
G groups. Input position of output (oh, ow) and tap (kh, kw):
    ih = oh*sh - ph + kh*dh,   iw = ow*sw - pw + kw*dw,
and every input position outside [0, H) x [0, W) reads as zero (ph/pw are the top/left padding;
the bottom/right padding is implicit in OH/OW).

Tiling (launch.direct_*_tiles picks the sizes): a block owns a TH x TW tile of pixels, one
thread per pixel, and KB channels per thread held in a local accumulator (register blocking:
each value read from shared memory feeds KB multiply-adds). Per step it stages in shared memory
CC channels of the input patch the tile reads and the matching KB-padded filter taps; kernels
larger than the shared buffers are staged in KHB x KWB bands of taps, so every geometry fits.

Backward, derived once from  y[n,k,oh,ow] = sum_{c,kh,kw} w[k,c,kh,kw] * x[n, g*CG+c, ih, iw]:
  grad_x[n, g*CG+c, ih, iw] = sum_{k in group g} sum_{kh,kw} w[k,c,kh,kw] * gy[n, k, oh, ow]
      over the (kh, kw) with oh = (ih + ph - kh*dh) / sh and ow = (iw + pw - kw*dw) / sw
      integral and inside [0, OH) x [0, OW): the transposed convolution (a correlation of the
      stride-dilated gy with the flipped kernel), written as a gather so that each grad_x
      element is owned by one thread.
  grad_w[k, c, kh, kw] = sum_{n, oh, ow} gy[n,k,oh,ow] * x[n, g*CG+c, ih, iw]
      the correlation of x with gy (gy acting as the kernel). The reduction over n is split
      into S contiguous ranges of images; each split's sum is formed in a fixed order (lanes
      of a block are added lane 0, 1, ... by one thread) and the splits are then added in
      order s = 0, 1, ... by elementwise.sum_splits.
No kernel uses atomics: the same inputs give bit-identical results on every run.
"""

from numba import cuda

from .launch import KB, SMEM_W, SMEM_X


@cuda.jit(cache=True)
def conv2d_forward(x, w, b, y, has_bias, relu, sh, sw, ph, pw, dh, dw, G, TH, TW, cb, CC, KHB, KWB):
    """One thread: y[n, k0:k0+cb, oh, ow] for one output pixel and cb output channels of one
    group (bias and ReLU fused in the epilogue).

    Grid: G * ceil(KG/cb) channel tiles x N images x spatial tiles; block: TH*TW threads.
    """
    N, C, H, W = x.shape
    K, CG, KH, KW = w.shape
    OH = y.shape[2]
    OW = y.shape[3]
    KG = K // G
    xs = cuda.shared.array(SMEM_X, x.dtype)  # [cc, row, col] of the input patch
    ws = cuda.shared.array(SMEM_W, x.dtype)  # [cc, tap, kk] filter taps, KB-padded
    acc = cuda.local.array(KB, x.dtype)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_tw = (OW + TW - 1) // TW
    n_tiles = ((OH + TH - 1) // TH) * n_tw
    n_kt = (KG + cb - 1) // cb
    bid = cuda.blockIdx.x
    tile = bid % n_tiles
    n = (bid // n_tiles) % N
    kt = bid // (n_tiles * N)
    g = kt // n_kt
    k0 = g * KG + (kt % n_kt) * cb
    kn = min(cb, (g + 1) * KG - k0)
    cbase = g * CG
    oh0 = (tile // n_tw) * TH
    ow0 = (tile % n_tw) * TW
    i = t // TW
    j = t % TW
    for kk in range(KB):
        acc[kk] = 0
    for c0 in range(0, CG, CC):
        ccn = min(CC, CG - c0)
        for kh0 in range(0, KH, KHB):
            khn = min(KHB, KH - kh0)
            PR = (TH - 1) * sh + (khn - 1) * dh + 1
            r0 = oh0 * sh - ph + kh0 * dh
            for kw0 in range(0, KW, KWB):
                kwn = min(KWB, KW - kw0)
                PQ = (TW - 1) * sw + (kwn - 1) * dw + 1
                q0 = ow0 * sw - pw + kw0 * dw
                plane = PR * PQ
                for e in range(t, ccn * plane, nt):
                    cc = e // plane
                    ih = r0 + (e % plane) // PQ
                    iw = q0 + e % PQ
                    if ih >= 0 and ih < H and iw >= 0 and iw < W:
                        xs[e] = x[n, cbase + c0 + cc, ih, iw]
                    else:
                        xs[e] = 0
                taps = khn * kwn
                for e in range(t, ccn * taps * KB, nt):
                    kk = e % KB
                    tap = (e // KB) % taps
                    cc = e // (KB * taps)
                    if kk < kn:
                        ws[e] = w[k0 + kk, c0 + cc, kh0 + tap // kwn, kw0 + tap % kwn]
                    else:
                        ws[e] = 0
                cuda.syncthreads()
                if i < TH:
                    for cc in range(ccn):
                        for a in range(khn):
                            xrow = cc * plane + (i * sh + a * dh) * PQ + j * sw
                            wrow = (cc * taps + a * kwn) * KB
                            for bq in range(kwn):
                                xv = xs[xrow + bq * dw]
                                wb = wrow + bq * KB
                                for kk in range(KB):
                                    acc[kk] += ws[wb + kk] * xv
                cuda.syncthreads()
    oh = oh0 + i
    ow = ow0 + j
    if i < TH and oh < OH and ow < OW:
        for kk in range(KB):
            if kk < kn:
                v = acc[kk]
                if has_bias:
                    v += b[k0 + kk]
                if relu and v < 0:
                    y[n, k0 + kk, oh, ow] = 0
                else:
                    y[n, k0 + kk, oh, ow] = v


@cuda.jit(cache=True)
def conv2d_backward_data(gy, w, gx, sh, sw, ph, pw, dh, dw, G, TH, TW, cb, CC, KHB, KWB):
    """One thread: grad_x[n, c0:c0+cb, ih, iw] for one input pixel and cb input channels of
    one group, gathered from the gy entries its taps reach (module docstring).

    Grid: G * ceil(CG/cb) channel tiles x N images x spatial tiles of (H, W); block: TH*TW.
    """
    N, K, OH, OW = gy.shape
    CG = w.shape[1]
    KH = w.shape[2]
    KW = w.shape[3]
    H = gx.shape[2]
    W = gx.shape[3]
    KG = K // G
    gs = cuda.shared.array(SMEM_X, gy.dtype)  # [kc, oh - oh_lo, ow - ow_lo]
    ws = cuda.shared.array(SMEM_W, gy.dtype)  # [kc, tap, cc] KB-padded
    acc = cuda.local.array(KB, gy.dtype)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    n_tw = (W + TW - 1) // TW
    n_tiles = ((H + TH - 1) // TH) * n_tw
    n_ct = (CG + cb - 1) // cb
    bid = cuda.blockIdx.x
    tile = bid % n_tiles
    n = (bid // n_tiles) % N
    ct = bid // (n_tiles * N)
    g = ct // n_ct
    cl0 = (ct % n_ct) * cb
    cn = min(cb, CG - cl0)
    kbase = g * KG
    ih0 = (tile // n_tw) * TH
    iw0 = (tile % n_tw) * TW
    i = t // TW
    j = t % TW
    ih = ih0 + i
    iw = iw0 + j
    for cc in range(KB):
        acc[cc] = 0
    for k0 in range(0, KG, CC):
        kcn = min(CC, KG - k0)
        for kh0 in range(0, KH, KHB):
            khn = min(KHB, KH - kh0)
            oh_lo = -((-(ih0 + ph - (kh0 + khn - 1) * dh)) // sh)  # ceil division
            oh_hi = (ih0 + TH - 1 + ph - kh0 * dh) // sh
            PR = oh_hi - oh_lo + 1
            for kw0 in range(0, KW, KWB):
                kwn = min(KWB, KW - kw0)
                ow_lo = -((-(iw0 + pw - (kw0 + kwn - 1) * dw)) // sw)
                ow_hi = (iw0 + TW - 1 + pw - kw0 * dw) // sw
                PQ = ow_hi - ow_lo + 1
                if PR > 0 and PQ > 0:  # same for the whole block: no divergent syncthreads
                    plane = PR * PQ
                    for e in range(t, kcn * plane, nt):
                        kc = e // plane
                        oh = oh_lo + (e % plane) // PQ
                        ow = ow_lo + e % PQ
                        if oh >= 0 and oh < OH and ow >= 0 and ow < OW:
                            gs[e] = gy[n, kbase + k0 + kc, oh, ow]
                        else:
                            gs[e] = 0
                    taps = khn * kwn
                    for e in range(t, kcn * taps * KB, nt):
                        cc = e % KB
                        tap = (e // KB) % taps
                        kc = e // (KB * taps)
                        if cc < cn:
                            ws[e] = w[kbase + k0 + kc, cl0 + cc, kh0 + tap // kwn, kw0 + tap % kwn]
                        else:
                            ws[e] = 0
                    cuda.syncthreads()
                    if i < TH:
                        for kc in range(kcn):
                            for a in range(khn):
                                num_h = ih + ph - (kh0 + a) * dh
                                if num_h % sh == 0:
                                    grow = kc * plane + (num_h // sh - oh_lo) * PQ
                                    wrow = (kc * taps + a * kwn) * KB
                                    for bq in range(kwn):
                                        num_w = iw + pw - (kw0 + bq) * dw
                                        if num_w % sw == 0:
                                            gv = gs[grow + num_w // sw - ow_lo]
                                            wb = wrow + bq * KB
                                            for cc in range(KB):
                                                acc[cc] += ws[wb + cc] * gv
                    cuda.syncthreads()
    if i < TH and ih < H and iw < W:
        for cc in range(KB):
            if cc < cn:
                gx[n, g * CG + cl0 + cc, ih, iw] = acc[cc]


@cuda.jit(cache=True)
def conv2d_backward_filter(gy, x, part, sh, sw, ph, pw, dh, dw, G, TH, TW, cb, KHB, KWB, S, lanes):
    """One thread: for one tap (kh, kw) of a KHB x KWB band, input channel cl and cb output
    channels, the sum over the pixels p = lane, lane + lanes, ... of every output tile of the
    images in split s; lane 0 then adds the lanes in order and writes part[s, k, cl, kh, kw].

    Grid: G * ceil(KG/cb) x CG x bands x S; block: KHB*KWB*lanes threads.
    """
    N, K, OH, OW = gy.shape
    C = x.shape[1]
    H = x.shape[2]
    W = x.shape[3]
    KH = part.shape[3]
    KW = part.shape[4]
    CG = C // G
    KG = K // G
    xs = cuda.shared.array(SMEM_X, x.dtype)  # input patch [row, col]; lane sums at the end
    gs = cuda.shared.array(SMEM_W, x.dtype)  # gy tile [pixel, kk], KB-padded
    acc = cuda.local.array(KB, x.dtype)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    tap = t // lanes
    lane = t % lanes
    n_kt = (KG + cb - 1) // cb
    nbw = (KW + KWB - 1) // KWB
    nbands = ((KH + KHB - 1) // KHB) * nbw
    bid = cuda.blockIdx.x
    s = bid % S
    band = (bid // S) % nbands
    cl = (bid // (S * nbands)) % CG
    kt = bid // (S * nbands * CG)
    g = kt // n_kt
    k0 = g * KG + (kt % n_kt) * cb
    kn = min(cb, (g + 1) * KG - k0)
    c = g * CG + cl
    kh0 = (band // nbw) * KHB
    kw0 = (band % nbw) * KWB
    khn = min(KHB, KH - kh0)
    kwn = min(KWB, KW - kw0)
    a = tap // kwn
    bq = tap % kwn
    PR = (TH - 1) * sh + (khn - 1) * dh + 1
    PQ = (TW - 1) * sw + (kwn - 1) * dw + 1
    npix = TH * TW
    n_tw = (OW + TW - 1) // TW
    n_tiles = ((OH + TH - 1) // TH) * n_tw
    for kk in range(KB):
        acc[kk] = 0
    for n in range(s * N // S, (s + 1) * N // S):
        for tile in range(n_tiles):
            oh0 = (tile // n_tw) * TH
            ow0 = (tile % n_tw) * TW
            r0 = oh0 * sh - ph + kh0 * dh
            q0 = ow0 * sw - pw + kw0 * dw
            for e in range(t, PR * PQ, nt):
                ih = r0 + e // PQ
                iw = q0 + e % PQ
                if ih >= 0 and ih < H and iw >= 0 and iw < W:
                    xs[e] = x[n, c, ih, iw]
                else:
                    xs[e] = 0
            for e in range(t, npix * KB, nt):
                kk = e % KB
                oh = oh0 + (e // KB) // TW
                ow = ow0 + (e // KB) % TW
                if kk < kn and oh < OH and ow < OW:
                    gs[e] = gy[n, k0 + kk, oh, ow]
                else:
                    gs[e] = 0
            cuda.syncthreads()
            if tap < khn * kwn:
                for p in range(lane, npix, lanes):
                    xv = xs[((p // TW) * sh + a * dh) * PQ + (p % TW) * sw + bq * dw]
                    for kk in range(KB):
                        acc[kk] += gs[p * KB + kk] * xv
            cuda.syncthreads()
    for kk in range(KB):
        xs[t * KB + kk] = acc[kk]
    cuda.syncthreads()
    if lane == 0 and tap < khn * kwn:
        for kk in range(KB):
            if kk < kn:
                v = xs[t * KB + kk]
                for m in range(1, lanes):
                    v += xs[(t + m) * KB + kk]
                part[s, k0 + kk, cl, kh0 + a, kw0 + bq] = v
