"""Hand-written batched GEMM: shared-memory tiles, register blocking, deterministic split-K.

Notation: C (Z, M, Nn) = op(A[z % BA]) @ op(B[z % BB]), op = transpose when ``ta`` / ``tb``:
A is (BA, M, Kd) or, transposed, (BA, Kd, M); B is (BB, Kd, Nn) or (BB, Nn, Kd). Broadcasting
the batch index (z % BA) lets one launch run every (image, group) pair of a convolution with
the filters of that group. In convolution terms (see im2col.py and ops.py):
    forward   y[n, g]     (KG, P) = w[g] (KG, R) @ cols[n, g] (R, P)       Z = N*G, BA = G
    grad_w    part[n, g]  (KG, R) = gy[n, g] (KG, P) @ cols[n, g]^T (P, R) Z = N*G, then summed
                                                                           over n in order
    grad_cols gcols[n, g] (R, P)  = w[g]^T (R, KG) @ gy[n, g] (KG, P)      Z = N*G, BA = G
with R = CG*KH*KW, P = OH*OW. Linear layers are the Z = 1 case.

Tiling (launch.GEMM_CONFIGS): a block computes a BM x BN tile of C, staging BK-deep slices of
A (as [k, m]) and B (as [k, n]) in shared memory; each thread keeps a TM x TN tile of C in a
local array (register blocking), at rows tr + a*(BM/TM) and columns tc + b*(BN/TN), so that
neighbouring threads read neighbouring shared-memory words and write neighbouring C columns.

Split-K: when the tiles alone give too few blocks and the reduction is deep (a Linear
layer's weight gradient: a small C, a reduction over the batch), the reduction is cut into
S slices of ``ksplit``; slice s writes part[s*batch + z] and ``splitk_reduce`` adds the
slices in the order s = 0, 1, ..., S-1. Each C element is thus a fixed sequence of
additions: no atomics, bit-identical run to run.

The epilogue fuses a bias (bias_mode 1: per row, bias[(z % BA)*M + i], a conv's output channel;
bias_mode 2: per column, bias[j], a Linear layer's output) and an optional ReLU.
"""

from numba import cuda

from .launch import GEMM_CONFIGS


def _make_gemm(BM: int, BN: int, BK: int, TM: int, TN: int):
    """A GEMM kernel for one tile configuration (tile sizes are compile-time constants)."""
    TROWS = BM // TM
    TCOLS = BN // TN
    NT = TROWS * TCOLS
    SA = BK * BM
    SB = BK * BN
    TMN = TM * TN

    @cuda.jit(cache=True)
    def gemm(A, B, C, bias, bias_mode, relu, ta, tb, BA, BB, S, ksplit):
        """One thread: a TM x TN register tile of C[z] inside the block's BM x BN tile, summed
        over reduction slice s = z // batch (k in [s*ksplit, min(Kd, (s+1)*ksplit))).

        Grid: ceil(Nn/BN) * ceil(M/BM) * Z blocks; block: (BM/TM)*(BN/TN) threads.
        """
        Z = C.shape[0]
        M = C.shape[1]
        Nn = C.shape[2]
        Kd = A.shape[1] if ta else A.shape[2]
        As = cuda.shared.array(SA, C.dtype)
        Bs = cuda.shared.array(SB, C.dtype)
        acc = cuda.local.array(TMN, C.dtype)
        af = cuda.local.array(TM, C.dtype)
        bf = cuda.local.array(TN, C.dtype)
        t = cuda.threadIdx.x
        tr = t // TCOLS
        tc = t % TCOLS
        n_ct = (Nn + BN - 1) // BN
        n_rt = (M + BM - 1) // BM
        bid = cuda.blockIdx.x
        col0 = (bid % n_ct) * BN
        row0 = ((bid // n_ct) % n_rt) * BM
        z = bid // (n_ct * n_rt)
        batch = Z // S
        s = z // batch
        bz = z % batch
        za = bz % BA
        zb = bz % BB
        kbeg = s * ksplit
        kend = min(Kd, kbeg + ksplit)
        for e in range(TMN):
            acc[e] = 0
        for k0 in range(kbeg, kend, BK):
            for e in range(t, SA, NT):
                if ta:  # A[za, k, m]: consecutive threads read consecutive m
                    m = e % BM
                    kk = e // BM
                else:  # A[za, m, k]: consecutive threads read consecutive k
                    kk = e % BK
                    m = e // BK
                gm = row0 + m
                gk = k0 + kk
                if gm < M and gk < kend:
                    As[kk * BM + m] = A[za, gk, gm] if ta else A[za, gm, gk]
                else:
                    As[kk * BM + m] = 0
            for e in range(t, SB, NT):
                if tb:  # B[zb, n, k]
                    kk = e % BK
                    nn = e // BK
                else:  # B[zb, k, n]
                    nn = e % BN
                    kk = e // BN
                gn = col0 + nn
                gk = k0 + kk
                if gn < Nn and gk < kend:
                    Bs[kk * BN + nn] = B[zb, gn, gk] if tb else B[zb, gk, gn]
                else:
                    Bs[kk * BN + nn] = 0
            cuda.syncthreads()
            for kk in range(BK):
                for a in range(TM):
                    af[a] = As[kk * BM + tr + a * TROWS]
                for b in range(TN):
                    bf[b] = Bs[kk * BN + tc + b * TCOLS]
                for a in range(TM):
                    for b in range(TN):
                        acc[a * TN + b] += af[a] * bf[b]
            cuda.syncthreads()
        for a in range(TM):
            i = row0 + tr + a * TROWS
            for b in range(TN):
                jj = col0 + tc + b * TCOLS
                if i < M and jj < Nn:
                    v = acc[a * TN + b]
                    if bias_mode == 1:
                        v += bias[za * M + i]
                    elif bias_mode == 2:
                        v += bias[jj]
                    if relu and v < 0:
                        C[z, i, jj] = 0
                    else:
                        C[z, i, jj] = v

    return gemm


KERNELS = {name: _make_gemm(*cfg) for name, cfg in GEMM_CONFIGS.items()}


@cuda.jit(cache=True)
def splitk_reduce(part, C, bias, bias_mode, relu, BA, S):
    """One thread: C[z, i, j] = sum over s = 0..S-1 (in that order) of part[s*batch + z, i, j],
    then the bias / ReLU epilogue of the GEMM."""
    Zb, M, Nn = C.shape
    e = cuda.grid(1)
    if e < Zb * M * Nn:
        z = e // (M * Nn)
        i = (e // Nn) % M
        jj = e % Nn
        v = part[z, i, jj]
        for s in range(1, S):
            v += part[s * Zb + z, i, jj]
        if bias_mode == 1:
            v += bias[(z % BA) * M + i]
        elif bias_mode == 2:
            v += bias[jj]
        if relu and v < 0:
            C[z, i, jj] = 0
        else:
            C[z, i, jj] = v
