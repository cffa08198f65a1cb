"""Direct convolution: forward, backward-data and backward-filter with no im2col buffer.

Notation: x (N, C, H, W), weight (K, CG, KH, KW) with CG = C/G, y (N, K, OH, OW), KG = K/G,
P = OH*OW, R = CG*KH*KW taps. Input position of output (oh, ow), tap (kh, kw):
ih = oh*sh - ph + kh*dh, iw = ow*sw - pw + kw*dw.

Backward, derived once from  y[n,k,oh,ow] = sum_{c,kh,kw} w[k,c,kh,kw] * x[n, g*CG+c, ih, iw]:
  grad_x[n, g*CG+c, ih, iw] = sum_{k in group g; kh, kw, oh, ow hitting (ih, iw)}
                                  w[k,c,kh,kw] * gy[n,k,oh,ow]
      i.e. the transposed convolution of gy with w. At stride 1, oh = ih + ph - kh*dh; with
      kh' = KH-1-kh this is oh = ih - q + kh'*dh, q = dh*(KH-1) - ph: a plain convolution of
      gy (padding q, dilation d) with the flipped kernel, channel axes swapped, which
      ``backward_data`` can run on the forward tiles. Or read the sum per tap: for each
      (kh, kw), grad_x[n, c, oh + kh*dh - ph, ow + kw*dw - pw] += sum_k w[k,c,kh,kw] *
      gy[n,k,oh,ow], an (input channels x grad_y positions) product over k added at the
      tap's offset of the padded grad_x (``conv2d_data_scatter``), which never runs a tap over
      gy's zero border. The cost model picks one of the two. Other strides: a scatter from
      gy, one thread per (n, c) plane (``conv2d_backward_data``).
  grad_w[k, c, kh, kw] = sum_{n, oh, ow} gy[n,k,oh,ow] * x[n, g*CG+c, ih, iw]
      i.e. the correlation of x with gy (gy acting as the kernel, dilation and stride swapped).
Every output element is summed in a fixed order (grad_w: per chunk of images, chunks added in
order by the caller): deterministic, whatever the thread count.
"""

import functools
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from ._common import FASTMATH, U, grad_w_from_parts, valid_range
from .im2col import pool_planes
from .microkernel import (
    COMBOS,
    DOT_COMBOS,
    VBYTES,
    dot_tile,
    dot_tile_shape,
    lanes,
    tile,
    tile_rows,
    tile_vectors,
)
from .pool import grad_plane, max_pool2d_backward_coded
from .tiers import parallel_njit


@parallel_njit(fastmath=FASTMATH)
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


# --------------------------------------------------------------------------- tiled direct path
# The loops above keep every partial sum in memory. The path below runs the same sums through
# microkernel.tile, whose partial sums live in SIMD registers: per image (and group) the input
# is copied once into a zero-bordered buffer (padding becomes ordinary zeros, so no tap needs a
# bounds test), then tiles of MR x NV registers sweep the output. Two ways to lay the output
# across the vector lanes (the plan picks the one that computes fewer wasted lanes):
#   form A: lanes = output channels (KG rounded up to whole vectors), rows = output pixels at
#           any stride / dilation; result (pixels, channels), transposed into y by the epilogue.
#   form B: lanes = consecutive positions oh*Wp + ow of the padded width (stride 1 only; the
#           columns ow >= OW are computed and dropped), rows = output channels.
# grad_w uses form A's layout with the roles turned: rows = taps, steps = output pixels,
# lanes = output channels of grad_y transposed to (pixels, channels).
# grad_x at stride 1 is the forward pass of grad_y padded by q = dh*(KH-1) - ph with the kernel
# flipped and its channel axes swapped (module docstring), so it can reuse the forward tiles;
# or a scatter: per tap, rows = input channels, lanes = grad_y positions at the padded width,
# steps = output channels, each tile added into the padded grad_x at the tap's offset.


_NO_CODE = np.empty(0, np.int32)  # no pooling: no argmax codes


class TiledPlan(NamedTuple):
    """Tables and sizes of one tiled convolution (see ``plan``)."""

    form_b: bool
    combo: int  # index into microkernel.COMBOS
    mr: int  # rows per tile
    rows: int  # rows padded to a multiple of mr: pixels (A) or output channels (B)
    L: int  # lanes per row of the result: KG padded (A) or OH*Wp padded (B)
    step: int  # lanes per tile: NV*VL
    Hp: int  # padded input height / width (row pitch)
    Wp: int
    arow: np.ndarray  # int64 tables, see microkernel.tile
    aoff: np.ndarray
    boff: np.ndarray
    cost: float = 0.0  # ``_cost`` of the chosen layout (plan only)


def _padded_size(g):
    """Rows / columns of the zero-bordered input copy: every tap of every output in bounds."""
    return (g.OH - 1) * g.sh + (g.KH - 1) * g.dh + 1, (g.OW - 1) * g.sw + (g.KW - 1) * g.dw + 1


def _taps(g, Hp, Wp):
    """Offset of tap t = (c*KH + kh)*KW + kw (weight order) inside one group's padded input."""
    c, kh, kw = np.meshgrid(np.arange(g.CG), np.arange(g.KH), np.arange(g.KW), indexing="ij")
    return (((c * Hp + kh * g.dh) * Wp + kw * g.dw).ravel()).astype(np.int64)


def _pixels(g, Wp):
    """Offset of output pixel p = oh*OW + ow's first tap inside the padded input."""
    oh, ow = np.meshgrid(np.arange(g.OH), np.arange(g.OW), indexing="ij")
    return ((oh * g.sh * Wp + ow * g.sw).ravel()).astype(np.int64)


def _round(n, m):
    return -(-n // m) * m


def _tiles_for(n):
    """(combo index, MR, NV) of the tiles to weigh for n rows: the four with the most rows for
    their NV, and each of microkernel's extra tiles where it pads n to fewer rows than all
    four (their one purpose: LeNet-5's 6 channels run as 6 rows, not 7). Where the extra tiles
    pad no less, the larger tiles were as fast or faster when timed (fast99's 24 -> 32 grad_x:
    (12, 1) 4.7 ms, (6, 3) 5.5 ms; mnist_cnn's 32 -> 64 forward: (12, 1) 7.0 ms, (8, 2) 7.2)."""
    base = min(_round(n, mr) for mr, _ in COMBOS[:4])
    return [
        (c, mr, nv) for c, (mr, nv) in enumerate(COMBOS) if c < 4 or _round(n, mr) < base
    ]  # fmt: skip


def _tile_of(combo):
    """(combo, MR, NV): one tile, forced (tests)."""
    return (combo, *COMBOS[combo])


def _cost(tiles, T, mr, nv, outputs, transposed):
    """Estimated cycles: per tile T steps of MR*NV vector FMAs + storing the accumulators, plus
    the epilogue (form A's transposing copy costs about a cycle an output, form B's a tenth).
    Checked against measured single-thread times of the six MNIST-scale layers (ranking)."""
    return tiles * (T * mr * nv + 2 * mr * nv + 10) + outputs * (1.0 if transposed else 0.1)


@functools.lru_cache(maxsize=256)
def plan(g, itemsize, choice=None):
    """The tiled forward pass of geometry g (ConvGeom): form A or B and the tile (MR, NV) by
    the lowest ``_cost``; ``choice`` = (form_b, combo index) forces one (tests)."""
    VL = lanes(itemsize)
    Hp, Wp = _padded_size(g)
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    options = []
    for form_b in (False, True) if g.sh == 1 and g.sw == 1 else (False,):
        if choice is not None and choice[0] != form_b:
            continue
        cands = _tiles_for(g.KG if form_b else P) if choice is None else [_tile_of(choice[1])]
        for combo, mr, nv in cands:
            if form_b:  # rows: output channels; lanes: OH*Wp positions
                rows, L = _round(g.KG, mr), _round(g.OH * Wp, nv * VL)
            else:  # rows: output pixels; lanes: output channels
                rows, L = _round(P, mr), _round(g.KG, nv * VL)
            tiles = rows // mr * (L // (nv * VL))
            cost = _cost(tiles, R, mr, nv, P * g.KG, not form_b)
            options.append((cost, form_b, combo, mr, rows, L, nv * VL))
    cost, form_b, combo, mr, rows, L, step = min(options)
    taps = _taps(g, Hp, Wp)
    if form_b:  # a = weights (rows, R); b = padded input at tap offsets
        arow, aoff, boff = np.arange(mr, dtype=np.int64) * R, np.arange(R, dtype=np.int64), taps
    else:  # a = padded input at pixel offsets; b = weights (R, L)
        arow = np.zeros(rows + mr, np.int64)  # + MR: pooled segments' tiles off the grid
        arow[:P] = _pixels(g, Wp)
        aoff, boff = taps, np.arange(R, dtype=np.int64) * L
    return TiledPlan(form_b, combo, mr, rows, L, step, Hp, Wp, arow, aoff, boff, cost)


def pack_weights(w, g, p):
    """w (K, CG, KH, KW) -> (G, R, L) for form A (taps x output channels), (G, rows, R) for
    form B; the padding entries are zero."""
    R = g.CG * g.KH * g.KW
    wg = w.reshape(g.G, g.KG, R)
    if p.form_b and p.rows == g.KG and w.flags.c_contiguous and w.flags.writeable:
        # no padding rows: w itself (writeable: the type the kernel is compiled for)
        return wg
    if not p.form_b and p.L == g.KG:  # no padding lanes: one transposing copy
        return np.ascontiguousarray(wg.transpose(0, 2, 1))
    if p.form_b:
        out = np.zeros((g.G, p.rows, R), w.dtype)
        out[:, : g.KG] = wg
    else:
        out = np.zeros((g.G, R, p.L), w.dtype)
        out[:, :, : g.KG] = wg.transpose(0, 2, 1)
    return out


@njit(cache=True)
def _check_tile(combo, mr, step, isz):
    """The tile shape this compiled code has (COMBOS as it was compiled) must be the plan's: a
    stale on-disk cache with other shapes would write past the buffers, so refuse instead."""
    if mr != tile_rows(combo) or step != tile_vectors(combo) * (VBYTES // isz):
        raise RuntimeError("direct convolution: compiled tile shapes differ from the plan's")


@njit(nogil=True, cache=True)
def _pad_copy(x, n, xp, Hp, Wp, ph, pw):
    """Image n of x into the zero-bordered xp (C, Hp, Wp) (rows / columns past Hp / Wp are
    never read by any tap and are left out)."""
    _, C, H, W = x.shape
    xf, pf = x.ravel(), xp.ravel()
    h1, w1 = min(H, Hp - ph), min(W, Wp - pw)
    for c in range(C):
        for ih in range(h1):
            src = U(((n * C + c) * H + ih) * W)
            dst = U((c * Hp + ih + ph) * Wp + pw)
            for iw in range(w1):
                pf[dst + U(iw)] = xf[src + U(iw)]


@njit(cache=True)
def _segment(s, S, n):
    """[lo, hi) of n blocks: segment s of S nearly equal segments (empty when n < S)."""
    return s * n // S, (s + 1) * n // S


@parallel_njit()
def conv2d_tiled(
    x, wp, b, y, code, relu, pool, OH, OW, bounds, ph, pw, form_b, arow, aoff, boff, combo, mr,
    rows, L, step, Hp, Wp, splits=1,
):  # fmt: skip
    """y = conv(x) + b (ReLU with ``relu``) by the plan's tiles (``plan``, wp from
    ``pack_weights``); y (N, K, OH, OW), or with ``pool`` = (PKH, PKW) != (0, 0) that output
    max-pooled (im2col.pool_planes: y (N, K, OH // PKH, OW // PKW), each window's argmax in
    ``code``), with no full-size output written. Each work item = (chunk of images [bounds[i],
    bounds[i+1]), segment s < ``splits`` of the tile rows) runs on one thread, with its own
    padded copy and result buffer; segments cut one image's work across threads (batch 1).
    Every output comes from one tile whatever the segments: the same bits for any ``splits``.
    Form A's pooled segments hold whole pooled rows (their tiles may start off the MR grid:
    ``plan`` pads arow by MR)."""
    N, C, H, W = x.shape
    K = y.shape[1]
    G = wp.shape[0]
    CG, KG, P = C // G, K // G, OH * OW
    PKH, PKW = pool
    PH, PW = (OH // PKH, OW // PKW) if PKH > 0 else (OH, OW)
    R = aoff.size
    isz = x.itemsize
    plane = Hp * Wp
    yf, wf = y.ravel(), wp.ravel()
    pa, po, pb = arow.ctypes.data, aoff.ctypes.data, boff.ctypes.data
    _check_tile(combo, mr, step, isz)
    S = max(splits, 1)
    for item in prange((bounds.size - 1) * S):
        i, s = item // S, item % S
        if PKH > 0 and not form_b:  # pixels of whole pooled rows [ph0, ph1)
            ph0, ph1 = _segment(s, S, PH)
            r_lo, r_hi = ph0 * PKH * OW, (ph1 * PKH * OW if s < S - 1 else P)
        else:  # whole tiles: rows [r_lo, r_hi)
            b0, b1 = _segment(s, S, rows // mr)
            r_lo, r_hi = b0 * mr, b1 * mr
            ph0, ph1 = 0, PH
        if r_lo >= r_hi:
            continue
        xp = np.zeros(C * plane + (L if form_b else 0), x.dtype)  # + tail read by form B
        tmp = np.empty((rows if form_b else mr) * L, x.dtype)
        z = np.empty(KG * P if PKH > 0 and not form_b else 0, x.dtype)  # form A before pooling
        pt, px = tmp.ctypes.data, xp.ctypes.data
        k_lo, k_hi = (r_lo, min(r_hi, KG)) if form_b else (0, KG)  # form B: channels owned
        p_end = min(r_hi, P)
        for n in range(bounds[i], bounds[i + 1]):
            _pad_copy(x, n, xp[: C * plane].reshape(C, Hp, Wp), Hp, Wp, ph, pw)
            for g in range(G):
                xg = px + U(g * CG * plane * isz)
                wg = wf.ctypes.data + U(g * wp.shape[1] * wp.shape[2] * isz)
                o = U((n * K + g * KG) * PH * PW)  # y's (n, g*KG) plane
                for r0 in range(r_lo, r_hi, mr):
                    for j in range(0, L, step):
                        if form_b:  # a = weight rows r0.., b = input from lane j on
                            a0, c0 = wg + U(r0 * R * isz), pt + U((r0 * L + j) * isz)
                            tile(combo, x.dtype, a0, pa, po, xg + U(j * isz), pb, R, c0, L, False)
                        else:  # a = input at pixel offsets arow[r0..], b = weights (R, L)
                            a0, c0 = pa + U(r0 * 8), pt + U(j * isz)
                            tile(combo, x.dtype, xg, a0, po, wg + U(j * isz), pb, R, c0, L, False)
                    if not form_b and PKH > 0:  # these mr pixels (mr, L) -> z (KG, P)
                        for k in range(KG):
                            for r in range(min(mr, p_end - r0)):
                                z[U(k * P + r0 + r)] = tmp[U(r * L + k)]
                    elif not form_b:  # these mr pixels (mr, L), still in L1, into y
                        for k in range(KG):
                            bk = b[g * KG + k]
                            for r in range(min(mr, p_end - r0)):
                                v = tmp[U(r * L + k)] + bk
                                if relu and v < 0:
                                    v = 0  # NaN stays NaN, as in np.maximum
                                yf[o + U(k * P + r0 + r)] = v
                if PKH > 0 and form_b:  # bias, ReLU and pooling of the channels owned
                    pool_planes(
                        tmp, k_lo * L, L, Wp, b, g * KG + k_lo, k_hi - k_lo, yf,
                        o + U(k_lo * PH * PW), code, o + U(k_lo * PH * PW), PH, PW, PKH, PKW, relu,
                    )  # fmt: skip
                elif PKH > 0:  # form A: the pooled rows [ph0, ph1) of every channel, from z
                    for k in range(KG):
                        d = o + U(k * PH * PW + ph0 * PW)
                        pool_planes(
                            z, k * P + ph0 * PKH * OW, P, OW, b, g * KG + k, np.int64(1), yf, d,
                            code, d, ph1 - ph0, PW, PKH, PKW, relu,
                        )  # fmt: skip  (np.int64(1): a literal 1 compiles pool_planes again)
                elif form_b:  # (rows, OH*Wp lanes) -> y, columns ow >= OW dropped
                    for k in range(k_lo, k_hi):
                        bk = b[g * KG + k]
                        for oh in range(OH):
                            src, dst = U(k * L + oh * Wp), o + U(k * P + oh * OW)
                            for ow in range(OW):
                                v = tmp[src + U(ow)] + bk
                                if relu and v < 0:
                                    v = 0
                                yf[dst + U(ow)] = v


@functools.lru_cache(maxsize=256)
def filter_plan(g, itemsize, combo=None):
    """Tables of the tiled grad_w: rows = taps (R, padded), steps = output pixels, lanes =
    output channels (KG padded): tile result (rows, L) = grad_w_g^T. The tile by ``_cost``
    unless ``combo`` (an index into COMBOS) is given (tests)."""
    VL = lanes(itemsize)
    Hp, Wp = _padded_size(g)
    R, P = g.CG * g.KH * g.KW, g.OH * g.OW
    options = []
    for c, mr, v in _tiles_for(R) if combo is None else [_tile_of(combo)]:
        rows, L = _round(R, mr), _round(g.KG, v * VL)
        cost = _cost(rows // mr * (L // (v * VL)), P, mr, v, P * g.KG, True)
        options.append((cost, c, mr, rows, L, v * VL))
    _, combo, mr, rows, L, step = min(options)
    arow = np.zeros(rows, np.int64)
    arow[:R] = _taps(g, Hp, Wp)
    boff = np.arange(P, dtype=np.int64) * L
    return TiledPlan(False, combo, mr, rows, L, step, Hp, Wp, arow, _pixels(g, Wp), boff)


@parallel_njit()
def conv2d_filter_tiled(
    x, gy, y, code, relu, pool, OH, OW, parts, bounds, ph, pw, arow, aoff, boff, combo, mr,
    rows, L, step, Hp, Wp, splits=1,
):  # fmt: skip
    """parts[i] (G, rows, L): chunk i's grad_w^T (taps x output channels), summed over its
    images in order; the caller adds the parts in chunk order (``filter_plan``). gy (N, K, OH,
    OW), or with ``pool`` = (PKH, PKW) != (0, 0) the gradient of conv2d_pool's output, with its
    y and argmax ``code``: each plane is rebuilt in a buffer of its own (``pool.grad_plane``).
    Work item (i, s): chunk i's tiles of segment s < ``splits`` of the (row block, lane block)
    grid, disjoint entries of parts[i] each summed in image order: the same bits for any
    ``splits``."""
    N, C, H, W = x.shape
    K = gy.shape[1]
    PKH, PKW = pool
    G = parts.shape[1]
    CG, KG, P = C // G, K // G, OH * OW
    isz = x.itemsize
    plane = Hp * Wp
    gyf, yf, pf = gy.ravel(), y.ravel(), parts.ravel()
    pa, po, pb = arow.ctypes.data, aoff.ctypes.data, boff.ctypes.data
    off = _window_offsets(PKH, PKW, OW)
    _check_tile(combo, mr, step, isz)
    S, nr = max(splits, 1), rows // mr
    for item in prange((bounds.size - 1) * S):
        i = item // S
        t0, t1 = _segment(item % S, S, nr * (L // step))  # tiles t0..t1-1, lane block major
        if t0 >= t1:
            continue
        k_lo, k_hi = t0 // nr * step, min((t1 - 1) // nr * step + step, KG)  # channels read
        xp = np.zeros(C * plane, x.dtype)
        gt = np.zeros(P * L, x.dtype)  # grad_y of one image and group, (P, L); pad lanes 0
        gk = np.empty(P if PKH > 0 else 0, x.dtype)  # one plane rebuilt from the pooled one
        px, pg = xp.ctypes.data, gt.ctypes.data
        n0 = bounds[i]
        for n in range(n0, bounds[i + 1]):
            _pad_copy(x, n, xp.reshape(C, Hp, Wp), Hp, Wp, ph, pw)
            for g in range(G):
                for k in range(k_lo, k_hi):
                    nk = n * K + g * KG + k
                    src, plane_k = U(nk * P), gyf
                    if PKH > 0:
                        grad_plane(gyf, yf, code, off, relu, PKH, PKW, nk, OH, OW, gk, U(0), OW)
                        src, plane_k = U(0), gk
                    for p in range(P):
                        gt[U(p * L + k)] = plane_k[src + U(p)]
                xg = px + U(g * CG * plane * isz)
                part = pf.ctypes.data + U(((i * G + g) * rows * L) * isz)
                for t in range(t0, t1):
                    r0, j = t % nr * mr, t // nr * step
                    c0, bj = part + U((r0 * L + j) * isz), pg + U(j * isz)
                    tile(combo, x.dtype, xg, pa + U(r0 * 8), po, bj, pb, P, c0, L, n > n0)


@njit(cache=True)
def _window_offsets(PKH, PKW, rp):
    """Offset of each argmax code (row-major position in a PKH x PKW window) at row pitch rp."""
    off = np.empty(max(PKH * PKW, 1), np.uint64)
    for c in range(PKH * PKW):
        off[c] = U((c // PKW) * rp + c % PKW)
    return off


# grad_w with few output channels per group (LeNet-5 conv1: 6): the tiles above would leave most
# lanes of each vector idle. The "dot" form puts output pixels across the lanes instead:
#   grad_w[g*KG + k, t] = sum_j  xp[taps[t] + j] * gyp[k, j],   j = oh*Wp + ow < OH*Wp,
# a dot product of two contiguous runs (microkernel.dot_tile: MR taps x NK channels a tile),
# where gyp is one group's grad_y with its rows widened to the padded width Wp (zeros at
# ow >= OW, and past OH*Wp up to whole vectors). Stride 1 only (j steps one input column a lane).
# Those zero lanes meet input values of other columns: 0 * inf would be NaN where the true sum
# is finite, so a chunk whose input holds a non-finite value is flagged, and the caller redoes
# the whole gradient on the tiles.
class DotPlan(NamedTuple):
    combo: int  # index into microkernel.DOT_COMBOS
    mr: int  # taps per tile
    nk: int  # output channels per tile
    rows: int  # taps R padded to a multiple of mr
    cols: int  # KG padded to a multiple of nk
    S: int  # vector steps per dot product: OH*Wp rounded up to whole vectors
    Hp: int
    Wp: int
    arow: np.ndarray  # tap offsets (rows entries; the padding rows read offset 0)


def _dot_cost(R, KG, S, mr, nk):
    """Estimated cycles of one image and group: a step issues MR*NK multiply-adds and MR + NK
    vector loads (about one load a cycle), then each accumulator's lanes are added up."""
    tiles = _round(R, mr) // mr * (_round(KG, nk) // nk)
    return tiles * (S * max(mr * nk, mr + nk) + 8 * mr * nk)


@functools.lru_cache(maxsize=256)
def dot_plan(g, itemsize, nk=None):
    """The dot form of grad_w for geometry g (stride 1), NK by the lowest ``_dot_cost`` unless
    given (tests)."""
    VL = lanes(itemsize)
    Hp, Wp = _padded_size(g)
    R, S = g.CG * g.KH * g.KW, -(-g.OH * Wp // VL)
    options = []
    for c, (mr, k) in enumerate(DOT_COMBOS):
        if nk is None or nk == k:
            options.append((_dot_cost(R, g.KG, S, mr, k), c, mr, k))
    _, combo, mr, k = min(options)
    arow = np.zeros(_round(R, mr), np.int64)
    arow[:R] = _taps(g, Hp, Wp)
    return DotPlan(combo, mr, k, arow.size, _round(g.KG, k), S, Hp, Wp, arow)


@functools.lru_cache(maxsize=256)
def use_dot(g, itemsize):
    """grad_w in the dot form? Stride 1, and its estimated cost below the tiles' one."""
    if g.sh != 1 or g.sw != 1:
        return False
    d, p = dot_plan(g, itemsize), filter_plan(g, itemsize)
    P, R = g.OH * g.OW, g.CG * g.KH * g.KW
    tile = _cost(
        p.rows // p.mr * (p.L // p.step), P, p.mr, p.step // lanes(itemsize), P * g.KG, True
    )
    # + widening grad_y's rows: a quarter cycle an element (a copy at memory speed)
    return _dot_cost(R, g.KG, d.S, d.mr, d.nk) + g.KG * g.OH * d.Wp / 4 < tile


@njit(cache=True)
def _check_dot(combo, mr, nk):
    if (mr, nk) != dot_tile_shape(combo):
        raise RuntimeError("direct convolution: compiled dot tile shapes differ from the plan's")


@parallel_njit(fastmath=FASTMATH)
def conv2d_filter_dot(
    x, gy, y, code, relu, pool, OH, OW, parts, bad, bounds, ph, pw, arow, combo, mr, nk, S, Hp, Wp,
    splits=1,
):  # fmt: skip
    """parts[i] (G, rows, cols): chunk i's grad_w^T (taps x output channels), summed over its
    images in order; bad[i] = True where chunk i's input holds inf or NaN (its part is then
    not valid). Tables from ``dot_plan``. gy (N, K, OH, OW), or with ``pool`` = (PKH, PKW) !=
    (0, 0) the gradient of conv2d_pool's output, with its y and argmax ``code``
    (``pool.grad_plane``: the full-size gradient is never written). Work item (i, s): chunk
    i's tiles of segment s < ``splits`` of the (tap block, channel block) grid (disjoint
    entries: the same bits for any ``splits``); segment 0 checks the input."""
    N, C, H, W = x.shape
    K = gy.shape[1]
    PKH, PKW = pool
    G, rows, cols = parts.shape[1], parts.shape[2], parts.shape[3]
    CG, KG = C // G, K // G
    isz = x.itemsize
    plane, J = Hp * Wp, S * (VBYTES // isz)
    gyf, yf, pf = gy.ravel(), y.ravel(), parts.ravel()
    off = _window_offsets(PKH, PKW, Wp)  # argmax code -> offset in the window, pitch Wp
    _check_dot(combo, mr, nk)
    SP, nr = max(splits, 1), rows // mr
    for item in prange((bounds.size - 1) * SP):
        i, s = item // SP, item % SP
        t0, t1 = _segment(s, SP, nr * (cols // nk))  # tiles t0..t1-1, channel block major
        if t0 >= t1 and s > 0:
            continue
        k_lo, k_hi = t0 // nr * nk, min((t1 - 1) // nr * nk + nk, KG)  # channels read
        xp = np.zeros(C * plane + Wp + J, x.dtype)  # + tail: lanes past the last tap's row
        gp = np.zeros(cols * J, x.dtype)  # one group's grad_y, rows widened to Wp
        px, pgp, pa = xp.ctypes.data, gp.ctypes.data, arow.ctypes.data
        check = xp[0]
        n0 = bounds[i]
        for n in range(n0, bounds[i + 1]):
            _pad_copy(x, n, xp[: C * plane].reshape(C, Hp, Wp), Hp, Wp, ph, pw)
            if s == 0:
                for e in range(C * plane):
                    check += xp[U(e)] * 0  # NaN once any input is inf or NaN
            for g in range(G):
                for k in range(k_lo, k_hi):
                    plane_k = n * K + g * KG + k
                    grad_plane(
                        gyf, yf, code, off, relu, PKH, PKW, plane_k, OH, OW, gp, U(k * J), Wp
                    )
                xg = px + U(g * CG * plane * isz)
                part = pf.ctypes.data + U(((i * G + g) * rows * cols) * isz)
                for t in range(t0, t1):
                    r0, k0 = t % nr * mr, t // nr * nk
                    b0 = pgp + U(k0 * J * isz)
                    c0 = part + U((r0 * cols + k0) * isz)
                    dot_tile(combo, x.dtype, xg, pa + U(r0 * 8), b0, J, S, c0, cols, n > n0)
        if s == 0:
            bad[i] = check != check


class ScatterPlan(NamedTuple):
    """Tables of the scatter-form grad_x (see ``scatter_plan``)."""

    combo: int
    mr: int
    rows: int  # input channels of a group, padded to a multiple of mr
    L: int  # lanes of one grad_y plane: OH*Wp padded to whole tiles
    step: int
    Hp: int  # height / width of one phase of the padded input (the row pitch of both
    Wp: int  # buffers); at stride 1 the padded input's size
    plane: int  # one grad_x channel in the padded buffer (its sh*sw phases), with room for
    # the last tap's lanes
    taps: np.ndarray  # int64 offset of tap (kh, kw) in a padded channel
    arow: np.ndarray  # int64: row r of a tap's weight block starts at r*KG
    aoff: np.ndarray  # int64: output channel k of grad_y
    boff: np.ndarray  # int64: k's grad_y plane, k*L
    cost: float


@functools.lru_cache(maxsize=256)
def scatter_plan(g, itemsize, combo=None):
    """grad_x as a scatter (``conv2d_data_scatter``): per tap (kh, kw), tile rows = input
    channels, lanes = grad_y positions oh*Wp + ow, steps = the group's KG output channels;
    each tile adds its result into the padded grad_x at the tap's offset. Only the lanes with
    ow >= OW are wasted: the flipped forward instead runs every tap over grad_y's zero border
    too (LeNet-5's conv2: 2x the useful multiply-adds). The tile by ``_cost`` unless ``combo``
    (an index into COMBOS) is given (tests).

    Stride s > 1: padded position (oh*sh + kh*dh, ow*sw + kw*dw) lies in phase
    ((kh*dh) % sh, (kw*dw) % sw) of the padded grad_x, split into sh*sw phase planes of
    Hp x Wp (Hp = OH + (KH-1)*dh // sh), at (oh + kh*dh // sh, ow + kw*dw // sw): within one
    phase every tap is a shift again, so the same tiles run at any stride."""
    VL = lanes(itemsize)
    sh, sw = g.sh, g.sw
    Hp, Wp = g.OH + (g.KH - 1) * g.dh // sh, g.OW + (g.KW - 1) * g.dw // sw
    T = g.KH * g.KW
    options = []
    for c, mr, v in _tiles_for(g.CG) if combo is None else [_tile_of(combo)]:
        rows, L = _round(g.CG, mr), _round(g.OH * Wp, v * VL)
        tiles = T * (rows // mr) * (L // (v * VL))
        # + zeroing and cropping the padded grad_x, copying grad_y in (~a tenth of a cycle each)
        cost = _cost(tiles, g.KG, mr, v, 0, False) + (rows * sh * sw * Hp * Wp + g.KG * L) / 10
        options.append((cost * g.G, c, mr, rows, L, v * VL))
    cost, combo, mr, rows, L, step = min(options)
    kh, kw = np.meshgrid(np.arange(g.KH) * g.dh, np.arange(g.KW) * g.dw, indexing="ij")
    phase = (kh % sh) * sw + kw % sw
    taps = ((phase * Hp + kh // sh) * Wp + kw // sw).ravel().astype(np.int64)
    plane = max(int(taps.max()) + L, sh * sw * Hp * Wp)
    arow = np.arange(rows, dtype=np.int64) * g.KG
    aoff = np.arange(g.KG, dtype=np.int64)
    return ScatterPlan(
        combo, mr, rows, L, step, Hp, Wp, plane, taps, arow, aoff, aoff * L, cost
    )  # fmt: skip


def pack_scatter_weights(w, g, p):
    """w (K, CG, KH, KW) -> (G, KH*KW, rows, KG): per group and tap, input channels x output
    channels; the padding rows are zero."""
    wg = w.reshape(g.G, g.KG, g.CG, g.KH * g.KW).transpose(0, 3, 2, 1)  # (G, T, CG, KG)
    out = np.zeros((g.G, g.KH * g.KW, p.rows, g.KG), w.dtype)
    out[:, :, : g.CG] = wg
    return out


@parallel_njit()
def conv2d_data_scatter(
    gy, y, code, relu, pool, OH, OW, wp, gx, bounds, ph, pw, taps, arow, aoff, boff, combo, mr,
    rows, L, step, Hp, Wp, plane, sh=1, sw=1, splits=1,
):  # fmt: skip
    """gx (N, C, H, W) = grad_x at stride (sh, sw) from gy (N, K, OH, OW) and wp from
    ``pack_scatter_weights``, tables from ``scatter_plan``. Per image: grad_y copied into a
    buffer with rows at pitch Wp (zeros at ow >= OW and past OH*Wp), every (tap, row block,
    lane block) tile added into a zeroed padded grad_x (sh*sw phase planes a channel), which
    is then cropped into gx (input rows or columns no tap reaches get 0). Each
    chunk of images [bounds[i], bounds[i+1]) runs on one thread. With ``pool`` = (PKH, PKW)
    != (0, 0), gy is the gradient of conv2d_pool's output (y, argmax ``code``), rebuilt plane
    by plane into that buffer (``pool.grad_plane``). Work item (i, s): chunk i's row blocks
    (input channels) of segment s < ``splits``; every element is summed in tap order whatever
    the segments."""
    K = gy.shape[1]
    PKH, PKW = pool
    _, C, H, W = gx.shape
    G, T = wp.shape[0], wp.shape[1]
    CG, KG = C // G, K // G
    isz = gy.itemsize
    gyf, yf, gxf, wf = gy.ravel(), y.ravel(), gx.ravel(), wp.ravel()
    pa, po, pb = arow.ctypes.data, aoff.ctypes.data, boff.ctypes.data
    off = _window_offsets(PKH, PKW, Wp)
    _check_tile(combo, mr, step, isz)
    S = max(splits, 1)
    for item in prange((bounds.size - 1) * S):
        i = item // S
        b0, b1 = _segment(item % S, S, rows // mr)
        r_lo, r_hi = b0 * mr, b1 * mr  # the input channels (rows) of this item
        if r_lo >= r_hi:
            continue
        gyp = np.zeros(K * L, gy.dtype)
        gxp = np.empty(G * rows * plane, gy.dtype)
        py, px = gyp.ctypes.data, gxp.ctypes.data
        for n in range(bounds[i], bounds[i + 1]):
            for k in range(K):  # grad_y rows at pitch Wp (the zeros in between stay zero)
                grad_plane(gyf, yf, code, off, relu, PKH, PKW, n * K + k, OH, OW, gyp, U(k * L), Wp)
            for g in range(G):
                gxp[(g * rows + r_lo) * plane : (g * rows + r_hi) * plane] = 0
            for g in range(G):
                bg = py + U(g * KG * L * isz)
                for t in range(T):
                    a0 = wf.ctypes.data + U((g * T + t) * rows * KG * isz)
                    c0 = px + U((g * rows * plane + taps[t]) * isz)
                    for r0 in range(r_lo, r_hi, mr):
                        for j in range(0, L, step):
                            cj, bj = c0 + U((r0 * plane + j) * isz), bg + U(j * isz)
                            tile(
                                combo, gy.dtype, a0, pa + U(r0 * 8), po, bj, pb, KG, cj, plane, True
                            )
                for c in range(r_lo, min(r_hi, CG)):  # crop: padded (ih+ph, iw+pw) -> gx (ih, iw)
                    base = (g * rows + c) * plane
                    for ih in range(H):
                        dst = U(((n * C + g * CG + c) * H + ih) * W)
                        if sh == 1 and sw == 1:
                            src = U(base + (ih + ph) * Wp + pw)
                            for iw in range(W):
                                gxf[dst + U(iw)] = gxp[src + U(iw)]
                            continue
                        r = ih + ph
                        if r >= Hp * sh:  # below every tap's reach
                            for iw in range(W):
                                gxf[dst + U(iw)] = 0
                            continue
                        row = base + (r % sh * sw * Hp + r // sh) * Wp
                        for ph_w in range(sw):  # columns iw = j*sw + ph_w - pw: phase ph_w
                            src = U(row + ph_w * Hp * Wp)
                            j0 = max(0, -((ph_w - pw) // sw))
                            j1 = min(Wp, (W - 1 - ph_w + pw) // sw + 1)
                            for j in range(j0, j1):
                                gxf[dst + U(j * sw + ph_w - pw)] = gxp[src + U(j)]
                        for iw in range(max(0, Wp * sw - pw), W):  # right of every tap
                            gxf[dst + U(iw)] = 0


# --------------------------------------------------------------------------- entry points


def _tables(p):
    """The plan's arguments common to both tiled kernels, in their order."""
    return p.arow, p.aoff, p.boff, p.combo, p.mr, p.rows, p.L, p.step, p.Hp, p.Wp


def forward(x, w, b, g, relu, bounds, pg=None, code=_NO_CODE, splits=1):
    """y (N, K, OH, OW) = conv(x, w) + b (ReLU with ``relu``); chunks of images ``bounds``,
    each cut into ``splits`` segments of its tiles (work items for more threads than chunks).
    With pg (a pooling geometry of non-overlapping windows): y max-pooled, (N, K, PH, PW), each
    window's argmax in ``code`` (N*K*PH*PW int32)."""
    p = plan(g, x.itemsize)
    pool = (0, 0) if pg is None else (pg.KH, pg.KW)
    y = np.empty(g.y_shape if pg is None else (g.N, g.K, pg.OH, pg.OW), x.dtype)
    wp = pack_weights(w, g, p)
    conv2d_tiled(
        x, wp, b, y, code, relu, pool, g.OH, g.OW, bounds, g.ph, g.pw, p.form_b, *_tables(p),
        splits,
    )  # fmt: skip
    return y


@functools.lru_cache(maxsize=256)
def transposed_geometry(g):
    """grad_x's geometry as a forward convolution of grad_y (stride 1), or None where that
    form does not apply (stride > 1, or padding beyond the kernel's reach: q < 0)."""
    qh, qw = g.dh * (g.KH - 1) - g.ph, g.dw * (g.KW - 1) - g.pw
    if g.sh != 1 or g.sw != 1 or qh < 0 or qw < 0:
        return None
    return g._replace(C=g.K, H=g.OH, W=g.OW, K=g.C, OH=g.H, OW=g.W, ph=qh, pw=qw)


@functools.lru_cache(maxsize=256)
def use_scatter(g, itemsize):
    """grad_x in the scatter form rather than the flipped forward? Stride 1, and its estimated
    cost below the flipped forward's (or that form does not apply: padding beyond the kernel's
    reach). At stride > 1 there is no flipped forward: ``backward_data`` takes the scatter."""
    if g.sh != 1 or g.sw != 1:
        return False
    gt = transposed_geometry(g)
    return gt is None or scatter_plan(g, itemsize).cost < plan(gt, itemsize).cost


def _pooled_args(gy, pooled):
    """(y, code, relu, (PKH, PKW)) for the kernels that rebuild grad_y planes from conv2d_pool's
    gradient: pooled = (y, argmax codes, relu, pooling geometry), or None for a plain gy."""
    if pooled is None:
        return gy, _NO_CODE, False, (0, 0)
    y, code, relu, pg = pooled
    return y, code, relu, (pg.KH, pg.KW)


def backward_data(gy, w, g, bounds, form=None, pooled=None, splits=1):
    """grad_x (N, C, H, W) of the convolution with weight w: the scatter form or the flipped
    forward by the cost model (``form`` = "scatter" / "forward" forces one: tests; "forward"
    at stride > 1 runs ``conv2d_backward_data``, the untiled loops). pooled = (y, code, relu,
    pg): gy is the gradient of conv2d_pool's output (the scatter form rebuilds its planes, the
    others get it unpooled).
    ``splits``: segments per chunk of images (``forward``)."""
    strided = g.sh != 1 or g.sw != 1
    if form == "scatter" or (form is None and (strided or use_scatter(g, gy.itemsize))):
        p = scatter_plan(g, gy.itemsize)
        gx = np.empty((g.N, g.C, g.H, g.W), gy.dtype)
        conv2d_data_scatter(
            gy, *_pooled_args(gy, pooled), g.OH, g.OW, pack_scatter_weights(w, g, p), gx,
            bounds, g.ph, g.pw, p.taps, p.arow, p.aoff, p.boff, p.combo, p.mr, p.rows, p.L,
            p.step, p.Hp, p.Wp, p.plane, g.sh, g.sw, splits,
        )  # fmt: skip
        return gx
    if pooled is not None:
        y, code, relu, pg = pooled
        gy = max_pool2d_backward_coded(gy, y, code, g.OH, g.OW, pg.KH, pg.KW, relu)
    gt = transposed_geometry(g)
    if gt is None:
        return conv2d_backward_data(gy, w, g.H, g.W, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.G)
    # wt[g*CG + c, k, kh', kw'] = w[g*KG + k, c, KH-1-kh', KW-1-kw']
    wt = w.reshape(g.G, g.KG, g.CG, g.KH, g.KW)[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4)
    wt = np.ascontiguousarray(wt).reshape(g.C, g.KG, g.KH, g.KW)
    return forward(gy, wt, np.zeros(g.C, gy.dtype), gt, False, bounds, splits=splits)


def backward_filter(gy, x, g, bounds, pooled=None, splits=1):
    """grad_w (K, CG, KH, KW): per chunk of images a (G, taps, KG) part, added in chunk order;
    in the dot form where ``use_dot`` says so and the input is finite, else on the tiles.
    pooled = (y, code, relu, pg): gy is the gradient of conv2d_pool's output (y, argmax codes).
    ``splits``: segments of the tiles per chunk (``forward``); the sums do not depend on it."""
    R = g.CG * g.KH * g.KW
    if use_dot(g, x.itemsize):
        d = dot_plan(g, x.itemsize)
        parts = np.empty((bounds.size - 1, g.G, d.rows, d.cols), x.dtype)
        bad = np.zeros(bounds.size - 1, np.bool_)
        conv2d_filter_dot(
            x, gy, *_pooled_args(gy, pooled), g.OH, g.OW, parts, bad, bounds, g.ph, g.pw,
            d.arow, d.combo, d.mr, d.nk, d.S, d.Hp, d.Wp, splits,
        )  # fmt: skip
        if not bad.any():
            return grad_w_from_parts(parts[:, :, :R, : g.KG], g)
    p = filter_plan(g, x.itemsize)
    parts = np.empty((bounds.size - 1, g.G, p.rows, p.L), x.dtype)
    conv2d_filter_tiled(
        x, gy, *_pooled_args(gy, pooled), g.OH, g.OW, parts, bounds, g.ph, g.pw, *_tables(p),
        splits,
    )  # fmt: skip
    return grad_w_from_parts(parts[:, :, :R, : g.KG], g)
