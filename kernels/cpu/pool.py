"""Max and average pooling, forward and backward.

Notation: x (N, C, H, W), y (N, C, OH, OW); window (oh, ow) covers input rows
[oh*sh - ph, oh*sh - ph + KH) and columns [ow*sw - pw, ow*sw - pw + KW), clipped to the input.
One thread owns one (n, c) plane in every kernel, so backward scatters are race-free and
deterministic.

Max pooling: NaN counts as larger than any number (PyTorch propagates NaN); the backward pass
sends each window's gradient to its FIRST maximum in row-major window order.
Average pooling divisor (PyTorch's): with count_include_pad, the window clipped to the padded
input (h1 = min(h0 + KH, H + ph)); without, the number of real input pixels in the window.
"""

import numpy as np
from numba import njit, prange

from ._common import FASTMATH, U, first_max, pick, select
from .tiers import parallel_njit


@njit(inline="always", cache=True)
def _window(o, s, p, k, size):
    """(start clipped to input, end clipped to input, padded extent for the divisor)."""
    lo = o * s - p
    hi_pad = min(lo + k, size + p)
    extent = hi_pad - lo
    return max(lo, 0), min(hi_pad, size), extent


@njit(inline="always", cache=True)
def _take(v, i, best, bi):
    """One step of the first-maximum scan: (best, bi) after meeting value v at index i. v != v:
    a NaN beats numbers.

    For the unrolled 2x2 loops, which LLVM vectorises in this form (selects on vectors). A
    scalar loop takes ``_take_jumpless``: there this form compiles to jumps on AVX2, and on
    real data the comparison is a coin flip.
    """
    t = (v > best) | ((v != v) & (best == best))
    return (v if t else best), (i if t else bi)


@njit(inline="always", cache=True)
def _take_jumpless(v, i, best, bi):
    """``_take`` without jumps (``first_max``, ``pick``), for the loops LLVM does not vectorise
    (general windows): 3x3 stride-2 max pooling of (128, 64, 24, 24), AVX2, 2 threads: 24 ms on
    random data (10 ms on constant data, whose branches are always predicted) -> 11 ms either
    way. The same results. In the vectorised 2x2 loops this form was 5x slower than ``_take``.
    """
    m, t = first_max(v, best)
    return m, pick(t, i, bi)


@njit(inline="always", cache=True)
def _argmax(xf, base, W, r0, r1, c0, c1):
    """Flat index of the row-major first maximum of plane ``base`` in [r0, r1) x [c0, c1)
    (the first NaN if any), and its value."""
    bi = base + U(r0 * W + c0)
    best = xf[bi]
    for r in range(r0, r1):
        row = base + U(r * W)
        for q in range(c0, c1):
            best, bi = _take_jumpless(xf[row + U(q)], row + U(q), best, bi)
    return best, bi


# Planes per work item of the general max pooling (one scratch allocation each).
POOL_PLANES_PER_ITEM = 16


@parallel_njit()
def max_pool2d_forward(x, idx, KH, KW, OH, OW, sh, sw, ph, pw):
    """y (N, C, OH, OW); when ``idx`` has y's size, each window's argmax (flat index into x)
    is written there too, for a backward pass that then need not search again.

    Separable: first each input row's first maximum over every window's columns (value and
    column), then each window's first maximum over its rows of those. The row-major first
    maximum of a window is the first maximum of the first row holding the window's maximum
    (a NaN beats numbers; ties keep the earlier), so this is the direct scan's result, bit for
    bit, with KH + KW comparisons an output instead of KH * KW, in loops over outputs without
    jumps (``_take_jumpless``). 3x3 stride-1 pooling, AVX2, 2 threads, random data: (128, 32,
    14, 14) 16.5 -> 9.5 ms, (128, 112, 7, 7) 14.3 -> 11.0 ms against one jumpless scan per
    window; 3x3 stride 2 of (128, 64, 24, 24) level (11 ms)."""
    N, C, H, W = x.shape
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    keep = idx.size == y.size
    xf = x.ravel()
    yf = y.ravel()
    planes = N * C
    items = -(-planes // POOL_PLANES_PER_ITEM)
    # the output columns whose windows lie inside the row: ow*sw - pw >= 0, ow*sw - pw + KW <= W
    q0 = min(OW, -(-pw // sw))
    q1 = max(q0, min(OW, (W - KW + pw) // sw + 1))
    for item in prange(items):
        hv = np.empty(H * OW, x.dtype)  # row r's maximum over window ow's columns
        hc = np.empty(H * OW, np.int64)  # ... and its column
        vi = np.empty(OW, np.int64)  # a row of windows' argmax (row * W + column)
        p0 = item * POOL_PLANES_PER_ITEM
        for nc in range(p0, min(planes, p0 + POOL_PLANES_PER_ITEM)):
            base = U(nc * H * W)
            for r in range(H):
                row, o = base + U(r * W), U(r * OW)
                for ow in range(OW):  # edge windows, clipped (and the interior's first column)
                    if ow >= q0 and ow < q1:
                        c = ow * sw - pw
                        hv[o + U(ow)] = xf[row + U(c)]
                        hc[o + U(ow)] = c
                        continue
                    c0, c1, _ = _window(ow, sw, pw, KW, W)
                    best, bc = xf[row + U(c0)], c0
                    for c in range(c0 + 1, c1):
                        best, bc = _take_jumpless(xf[row + U(c)], c, best, bc)
                    hv[o + U(ow)] = best
                    hc[o + U(ow)] = bc
                for j in range(1, KW):  # interior windows: column j of every window at once
                    for ow in range(q0, q1):
                        c = ow * sw - pw + j
                        best, bc = _take_jumpless(xf[row + U(c)], c, hv[o + U(ow)], hc[o + U(ow)])
                        hv[o + U(ow)] = best
                        hc[o + U(ow)] = bc
            for oh in range(OH):  # each window's first maximum over its rows' maxima
                r0, r1, _ = _window(oh, sh, ph, KH, H)
                d, a = U((nc * OH + oh) * OW), U(r0 * OW)
                for ow in range(OW):
                    yf[d + U(ow)] = hv[a + U(ow)]
                    vi[ow] = r0 * W + hc[a + U(ow)]
                for r in range(r0 + 1, r1):
                    a = U(r * OW)
                    for ow in range(OW):
                        v, i = hv[a + U(ow)], r * W + hc[a + U(ow)]
                        best, bi = _take_jumpless(v, i, yf[d + U(ow)], vi[ow])
                        yf[d + U(ow)] = best
                        vi[ow] = bi
                if keep:
                    for ow in range(OW):
                        idx[d + U(ow)] = base + U(vi[ow])
    return y


@njit(inline="always", cache=True)
def _row_first(xf, base, dv, dc, lo, hi, off):
    """For f in [lo, hi): the first maximum of x[f + off] and x[f + off + 1] (plane ``base``)
    into (dv, dc)[f], dc the in-plane index."""
    for f in range(lo, hi):
        m, t = first_max(xf[U(base + f + off + 1)], xf[U(base + f + off)])
        dv[U(f)] = m
        dc[U(f)] = select(t, np.int32(f + off + 1), np.int32(f + off))


@njit(inline="always", cache=True)
def _row_step(xf, base, av, ac, dv, dc, lo, hi, off):
    """For f in [lo, hi): the first maximum of (av, ac)[f] (met first) and x[f + off] (plane
    ``base``, met second) into (dv, dc)[f]: other arrays than the ones read (``_plane_same``)."""
    for f in range(lo, hi):
        m, t = first_max(xf[U(base + f + off)], av[U(f)])
        dv[U(f)] = m
        dc[U(f)] = select(t, np.int32(f + off), ac[U(f)])


@njit(inline="always", cache=True)
def _col_first(hv, hc, dv, dc, lo, hi, off, W):
    """For f in [lo, hi): the first maximum of (hv, hc)[f + off] and (hv, hc)[f + off + W]
    (the next row) into (dv, dc)[f]."""
    for f in range(lo, hi):
        m, t = first_max(hv[U(f + off + W)], hv[U(f + off)])
        dv[U(f)] = m
        dc[U(f)] = select(t, hc[U(f + off + W)], hc[U(f + off)])


@njit(inline="always", cache=True)
def _col_step(hv, hc, av, ac, dv, dc, lo, hi, off):
    """For f in [lo, hi): the first maximum of (av, ac)[f] (met first) and (hv, hc)[f + off]
    (met second) into (dv, dc)[f]."""
    for f in range(lo, hi):
        m, t = first_max(hv[U(f + off)], av[U(f)])
        dv[U(f)] = m
        dc[U(f)] = select(t, hc[U(f + off)], ac[U(f)])


@parallel_njit()
def max_pool2d_forward_same(x, idx, KH, KW, ph, pw):
    """``max_pool2d_forward`` for "same" windows: stride 1, odd KH, KW >= 3 and padding
    (KH - 1) / 2, (KW - 1) / 2, so y has x's shape (Inception's 3x3 pooling branch).

    The same separable scan, with each pass over a whole plane at once: row r's window
    maxima sit at r*W + ow, so column j of every interior window is one run of the flat plane
    (a pass over H*W elements, vectorised), and so is row i of every interior window in the
    second pass; the windows the edges clip are redone afterwards by the clipped scan. The
    passes read one pair of buffers and write another: a select stored back where it was
    loaded from became a masked store (vmaskmov), microcoded on AMD Zen. The same results as
    ``max_pool2d_forward``, bit for bit, argmax included; 3x3 pooling of (128, 32, 14, 14),
    AVX2 (Zen 1), 2 threads: 4.4 -> 1.4 ms."""
    N, C, H, W = x.shape
    y = np.empty_like(x)
    keep = idx.size == y.size
    xf, yf = x.ravel(), y.ravel()
    P = H * W
    planes = N * C
    items = -(-planes // POOL_PLANES_PER_ITEM)
    c0, c1 = pw, max(pw, W - pw)  # columns of windows inside the row (none: c1 == c0)
    r0, r1 = ph, max(ph, H - ph)  # rows of windows inside the plane
    for item in prange(items):
        hv = np.empty(P, x.dtype)  # each row's maximum over each window's columns
        hc = np.empty(P, np.int32)  # ... its in-plane index
        tv = np.empty(P, x.dtype)  # scratch of the ping-pong passes
        tc = np.empty(P, np.int32)
        cv = np.empty(P, x.dtype)  # each window's maximum
        ci = np.empty(P, np.int32)
        p0 = item * POOL_PLANES_PER_ITEM
        for nc in range(p0, min(planes, p0 + POOL_PLANES_PER_ITEM)):
            base = nc * P
            # rows: window (r, ow) covers columns ow - pw .. ow + pw; run the flat plane from
            # (0, c0) to (H-1, c1-1) (the reads stay in the plane), then redo the edges
            lo, hi = c0, (H - 1) * W + c1
            if c1 > c0:
                for j in range(1, KW):  # the last step lands in (hv, hc)
                    into_h = (KW - 1 - j) % 2 == 0
                    if j == 1:
                        if into_h:
                            _row_first(xf, base, hv, hc, lo, hi, -pw)
                        else:
                            _row_first(xf, base, tv, tc, lo, hi, -pw)
                    elif into_h:
                        _row_step(xf, base, tv, tc, hv, hc, lo, hi, j - pw)
                    else:
                        _row_step(xf, base, hv, hc, tv, tc, lo, hi, j - pw)
            for r in range(H):
                row = U(base + r * W)
                for ow in range(W):
                    if ow >= c0 and ow < c1:
                        continue
                    a, b = max(ow - pw, 0), min(ow + pw + 1, W)
                    best, bc = xf[row + U(a)], a
                    for c in range(a + 1, b):
                        best, bc = _take_jumpless(xf[row + U(c)], c, best, bc)
                    hv[U(r * W + ow)] = best
                    hc[U(r * W + ow)] = np.int32(r * W + bc)
            # columns: window (oh, ow) covers rows oh - ph .. oh + ph of (hv, hc)
            lo, hi = r0 * W, r1 * W
            if r1 > r0:
                for i in range(1, KH):  # the last step lands in (cv, ci)
                    into_c = (KH - 1 - i) % 2 == 0
                    if i == 1:
                        if into_c:
                            _col_first(hv, hc, cv, ci, lo, hi, -ph * W, W)
                        else:
                            _col_first(hv, hc, tv, tc, lo, hi, -ph * W, W)
                    elif into_c:
                        _col_step(hv, hc, tv, tc, cv, ci, lo, hi, (i - ph) * W)
                    else:
                        _col_step(hv, hc, cv, ci, tv, tc, lo, hi, (i - ph) * W)
            for oh in range(H):
                if oh >= r0 and oh < r1:
                    continue
                a, b = max(oh - ph, 0), min(oh + ph + 1, H)
                for ow in range(W):
                    best, bi = hv[U(a * W + ow)], np.int64(hc[U(a * W + ow)])
                    for r in range(a + 1, b):
                        i = np.int64(hc[U(r * W + ow)])
                        best, bi = _take_jumpless(hv[U(r * W + ow)], i, best, bi)
                    cv[U(oh * W + ow)] = best
                    ci[U(oh * W + ow)] = np.int32(bi)
            for f in range(P):
                yf[U(base + f)] = cv[U(f)]
            if keep:
                for f in range(P):
                    idx[U(base + f)] = U(base) + U(ci[U(f)])
    return y


@njit(inline="always", cache=True)
def _argmax_2x2(xf, r0, r1, c):
    """The first maximum of the 2x2 window at rows r0, r1 (flat row starts) and column c, in
    row-major order (``_take``): (value, flat index)."""
    best, bi = xf[r0 + c], r0 + c
    best, bi = _take(xf[r0 + c + U(1)], r0 + c + U(1), best, bi)
    best, bi = _take(xf[r1 + c], r1 + c, best, bi)
    return _take(xf[r1 + c + U(1)], r1 + c + U(1), best, bi)


@njit(inline="always", cache=True)
def _zero_past_windows(gxf, nc, H, W, OH, OW):
    """Zeros in plane nc of a 2x2-pooling gradient where no window reaches (floor mode: the
    last column and row of an odd width / height)."""
    base = nc * H * W
    for r in range(2 * OH):
        for q in range(2 * OW, W):
            gxf[U(base + r * W + q)] = 0
    for r in range(2 * OH, H):
        for q in range(W):
            gxf[U(base + r * W + q)] = 0


@parallel_njit()
def max_pool2d_forward_2x2(x, idx):
    """The common 2x2 / stride 2 / no padding case (floor mode), unrolled: the general loop's
    window bookkeeping cost 6x this on LeNet-5's pool1. Same results, same first-maximum rule;
    argmax indices go to ``idx`` when it has y's size."""
    N, C, H, W = x.shape
    OH, OW = H // 2, W // 2
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    keep = idx.size == y.size
    xf = x.ravel()
    yf = y.ravel()
    for nc in prange(N * C):
        for oh in range(OH):
            r0 = U(nc * H * W + 2 * oh * W)
            r1 = r0 + U(W)
            o0 = U((nc * OH + oh) * OW)
            for ow in range(OW):
                best, bi = _argmax_2x2(xf, r0, r1, U(2 * ow))
                yf[o0 + U(ow)] = best
                if keep:
                    idx[o0 + U(ow)] = bi
    return y


@parallel_njit()
def max_pool2d_backward_2x2(gy, x):
    """grad_x of the 2x2 / stride 2 / no padding case (floor mode) from x alone: the windows do
    not overlap, so each window writes its own four elements (zeros, then its gradient at its
    first maximum, found as max_pool2d_forward_2x2 finds it; zeros past the last window), with
    no zeroing pass over gx (LeNet-5's pool1 at batch 64, one thread: 0.56 ms; the general
    loop and its scatter, 1.4 ms)."""
    N, C, H, W = x.shape
    OH, OW = H // 2, W // 2
    gx = np.empty_like(x)
    xf, gxf, gyf = x.ravel(), gx.ravel(), gy.ravel()
    zero = gx.dtype.type(0)
    for nc in prange(N * C):
        for oh in range(OH):
            r0 = U(nc * H * W + 2 * oh * W)
            r1 = r0 + U(W)
            o0 = U((nc * OH + oh) * OW)
            for ow in range(OW):
                c = U(2 * ow)
                _, bi = _argmax_2x2(xf, r0, r1, c)
                gxf[r0 + c] = zero  # (four selected stores instead ran 2.7x slower)
                gxf[r0 + c + U(1)] = zero
                gxf[r1 + c] = zero
                gxf[r1 + c + U(1)] = zero
                gxf[bi] = gyf[o0 + U(ow)]
        _zero_past_windows(gxf, nc, H, W, OH, OW)
    return gx


@parallel_njit()
def avg_pool2d_forward_2x2(x):
    """Average pooling, 2x2 / stride 2 / no padding (floor mode): the general loop's sum and
    divisor in the same order and precision, without its window bookkeeping (5x slower)."""
    N, C, H, W = x.shape
    OH, OW = H // 2, W // 2
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    xf, yf = x.ravel(), y.ravel()
    for nc in prange(N * C):
        for oh in range(OH):
            r0 = U(nc * H * W + 2 * oh * W)
            r1 = r0 + U(W)
            o0 = U((nc * OH + oh) * OW)
            for ow in range(OW):
                c = U(2 * ow)
                acc = 0.0
                acc += xf[r0 + c]
                acc += xf[r0 + c + U(1)]
                acc += xf[r1 + c]
                acc += xf[r1 + c + U(1)]
                yf[o0 + U(ow)] = acc / 4
    return y


@parallel_njit()
def avg_pool2d_backward_2x2(gy, H, W):
    """grad_x of ``avg_pool2d_forward_2x2``: each element written once (a quarter of its
    window's gradient, zeros past the last window), no zeroing pass."""
    N, C, OH, OW = gy.shape
    gx = np.empty((N, C, H, W), dtype=gy.dtype)
    gxf, gyf = gx.ravel(), gy.ravel()
    for nc in prange(N * C):
        for oh in range(OH):
            r0 = U(nc * H * W + 2 * oh * W)
            r1 = r0 + U(W)
            o0 = U((nc * OH + oh) * OW)
            for ow in range(OW):
                c = U(2 * ow)
                g = gyf[o0 + U(ow)] / 4
                gxf[r0 + c] = g
                gxf[r0 + c + U(1)] = g
                gxf[r1 + c] = g
                gxf[r1 + c + U(1)] = g
        _zero_past_windows(gxf, nc, H, W, OH, OW)
    return gx


@parallel_njit()
def max_pool2d_backward_indexed(gy, idx, N, C, H, W):
    """grad_x from the argmax indices the forward pass kept; one thread per (n, c) plane, whose
    windows' indices all point into that plane (race-free, fixed order)."""
    OH, OW = gy.shape[2], gy.shape[3]
    gx = np.zeros((N, C, H, W), dtype=gy.dtype)
    gxf = gx.ravel()
    gyf = gy.ravel()
    for nc in prange(N * C):
        for j in range(OH * OW):
            o = U(nc * OH * OW + j)
            gxf[idx[o]] += gyf[o]
    return gx


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def max_pool2d_backward_bias(gy, y, relu):
    """grad_b (C,) of a convolution whose output was max-pooled (conv2d_pool), straight from
    the pooled gradient gy (N, C, PH, PW): each window passes its gradient to exactly one
    element (where the maximum y > 0 with ``relu``), so the sum over the full-size gradient is
    the sum over windows. Summed in a fixed order (deterministic)."""
    N, C, PH, PW = gy.shape
    gyf, yf = gy.ravel(), y.ravel()
    gb = np.zeros(C, gy.dtype)
    for c in range(C):
        acc = gyf[0] * 0
        for n in range(N):
            o = U((n * C + c) * PH * PW)
            for e in range(PH * PW):
                v = gyf[o + U(e)]
                if relu:
                    v = v if yf[o + U(e)] > 0 else 0
                acc += v
        gb[c] = acc
    return gb


@njit(nogil=True, cache=True)
def grad_plane(gyf, yf, code, off, relu, PKH, PKW, plane, OH, OW, dst, d0, rp):
    """Plane ``plane`` (= n*K + k) of grad_y into dst[d0 + oh*rp + ow] (row pitch rp; other
    columns untouched): copied, or with PKH > 0 rebuilt from the gradient of the max-pooled
    output (conv2d_pool): each window's value at its argmax (off[code] = its offset at pitch
    rp), where y > 0 with ``relu``, zeros elsewhere: max_pool2d_backward_coded, one plane."""
    if PKH == 0:
        for oh in range(OH):
            s0, d = U((plane * OH + oh) * OW), d0 + U(oh * rp)
            for ow in range(OW):
                dst[d + U(ow)] = gyf[s0 + U(ow)]
        return
    PH, PW = OH // PKH, OW // PKW
    for oh in range(OH):
        d = d0 + U(oh * rp)
        for ow in range(OW):
            dst[d + U(ow)] = 0
    for ph in range(PH):
        o0, d = U((plane * PH + ph) * PW), d0 + U(ph * PKH * rp)
        for pw in range(PW):
            v = gyf[o0 + U(pw)]
            if relu:
                v = v if yf[o0 + U(pw)] > 0 else 0
            dst[d + U(pw * PKW) + off[code[o0 + U(pw)]]] = v


@parallel_njit()
def max_pool2d_backward_coded(gy, y, code, OH, OW, KH, KW, relu):
    """grad (N, C, OH, OW) of max pooling over non-overlapping KH x KW windows (stride = window,
    floor mode), from each window's argmax ``code`` (row-major position in the window, as
    im2col.kn_to_nk_pool writes it); with ``relu``, ReLU's backward too: a window passes its
    gradient only where its maximum y > 0 (ReLU's output there; not for NaN). Rows and columns
    past the last window get 0. One thread per (n, c) plane (``grad_plane``)."""
    N, C, PH, PW = gy.shape
    gx = np.empty((N, C, OH, OW), dtype=gy.dtype)
    gxf, gyf, yf = gx.ravel(), gy.ravel(), y.ravel()
    # Branch-free, with each code's offset looked up: a division by KW per window and a
    # mispredicted branch per ReLU test made this 2.5x slower (LeNet-5 pool1, batch 64).
    off = np.empty(KH * KW, np.uint64)
    for c in range(KH * KW):
        off[c] = U((c // KW) * OW + c % KW)
    for nc in prange(N * C):
        grad_plane(gyf, yf, code, off, relu, KH, KW, nc, OH, OW, gxf, U(nc * OH * OW), OW)
    return gx


@parallel_njit()
def max_pool2d_backward(gy, x, KH, KW, sh, sw, ph, pw):
    N, C, H, W = x.shape
    OH, OW = gy.shape[2], gy.shape[3]
    gx = np.zeros_like(x)
    xf = x.ravel()
    gxf = gx.ravel()
    gyf = gy.ravel()
    for nc in prange(N * C):
        base = U(nc * H * W)
        for oh in range(OH):
            r0, r1, _ = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, _ = _window(ow, sw, pw, KW, W)
                _, bi = _argmax(xf, base, W, r0, r1, c0, c1)
                gxf[bi] += gyf[U((nc * OH + oh) * OW + ow)]
    return gx


@parallel_njit()
def avg_pool2d_forward(x, KH, KW, OH, OW, sh, sw, ph, pw, count_include_pad):
    N, C, H, W = x.shape
    y = np.empty((N, C, OH, OW), dtype=x.dtype)
    xf = x.ravel()
    yf = y.ravel()
    for nc in prange(N * C):
        base = U(nc * H * W)
        for oh in range(OH):
            r0, r1, eh = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, ew = _window(ow, sw, pw, KW, W)
                div = eh * ew if count_include_pad else (r1 - r0) * (c1 - c0)
                acc = 0.0
                for r in range(r0, r1):
                    row = base + U(r * W)
                    for q in range(c0, c1):
                        acc += xf[row + U(q)]
                yf[U((nc * OH + oh) * OW + ow)] = acc / div
    return y


@parallel_njit()
def avg_pool2d_backward(gy, H, W, KH, KW, sh, sw, ph, pw, count_include_pad):
    N, C, OH, OW = gy.shape
    gx = np.zeros((N, C, H, W), dtype=gy.dtype)
    gxf = gx.ravel()
    gyf = gy.ravel()
    for nc in prange(N * C):
        base = U(nc * H * W)
        for oh in range(OH):
            r0, r1, eh = _window(oh, sh, ph, KH, H)
            for ow in range(OW):
                c0, c1, ew = _window(ow, sw, pw, KW, W)
                div = eh * ew if count_include_pad else (r1 - r0) * (c1 - c0)
                g = gyf[U((nc * OH + oh) * OW + ow)] / div
                for r in range(r0, r1):
                    row = base + U(r * W)
                    for q in range(c0, c1):
                        gxf[row + U(q)] += g
    return gx
