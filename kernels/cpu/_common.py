"""Tiny helpers shared by the CPU kernels."""

import numpy as np
from numba import njit
from numba import uint64 as U

# Indexing note: Numba wraps negative signed indices (a[-1]), which costs a compare-and-select
# per access and stops LLVM from vectorising the inner loops. The hot loops therefore index flat
# (ravelled) arrays with offsets cast to uint64 via U(...), never mixing uint64 with int64 in
# arithmetic (Numba would promote the mix to float64). Measured 3-4x on im2col alone.
__all__ = ["FASTMATH", "U", "grad_w_from_parts", "sum_parts", "valid_range"]

# Conv kernels may reassociate and contract (FMA): the loops are fixed, so results stay
# deterministic run to run, and NaN/inf still propagate (no 'nnan'/'ninf' flags).
FASTMATH = {"reassoc", "contract"}


@njit(inline="always", cache=True)
def valid_range(pad, offset, stride, size, out):
    """Output indices o in [lo, hi) whose input index i = o*stride - pad + offset lies in [0, size).

    Lets the inner loops run without a bounds test per element (zero padding = skipped terms).
    """
    a = pad - offset  # i >= 0  <=>  o*stride >= a
    lo = 0 if a <= 0 else (a + stride - 1) // stride
    b = size - 1 + pad - offset  # i <= size-1  <=>  o*stride <= b
    hi = 0 if b < 0 else b // stride + 1
    if hi > out:
        hi = out
    if lo > hi:
        lo = hi
    return lo, hi


def sum_parts(parts):
    """Sum over the first axis, one part after the other (fixed order: the same bits on any
    thread count)."""
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def grad_w_from_parts(parts, g):
    """grad_w (K, CG, KH, KW) from per-chunk parts (chunks, G, R, KG), added in chunk order."""
    return np.ascontiguousarray(sum_parts(parts).transpose(0, 2, 1)).reshape(g.w_shape)
