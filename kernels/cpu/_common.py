"""Tiny helpers shared by the CPU kernels."""

import numpy as np
from numba import njit
from numba import uint64 as U
from numba.core import types
from numba.extending import intrinsic

# Indexing note: Numba wraps negative signed indices (a[-1]), which costs a compare-and-select
# per access and stops LLVM from vectorising the inner loops. The hot loops therefore index flat
# (ravelled) arrays with offsets cast to uint64 via U(...), never mixing uint64 with int64 in
# arithmetic (Numba would promote the mix to float64). Measured 3-4x on im2col alone.
__all__ = [
    "FASTMATH",
    "U",
    "first_max",
    "grad_w_from_parts",
    "pick",
    "select",
    "sum_parts",
    "valid_range",
]

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


@intrinsic
def select(typingctx, c, a, b):
    """``a if c else b`` as one LLVM ``select`` (c a bool, a and b of one type), never a branch
    in Numba's IR. Where c is one float comparison, x86 compiles it without a jump (maxss,
    cmpss + blend); a condition made of several comparisons may still become a jump for a
    float select on AVX2 (scalar selects of floats have no cmov), so ``first_max`` keeps to
    the one-comparison form."""
    if not isinstance(c, types.Boolean) or a != b:
        return None

    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])

    return a(c, a, b), codegen


@njit(inline="always", cache=True)
def first_max(v, best):
    """One step of a first-maximum scan met with value v: (new best, whether v was taken). A
    NaN beats numbers and the first NaN stays (``v > best``, or v NaN and best not).

    Without a jump: on real data the comparison is a coin flip, and the branches Numba's
    ``x if t else y`` became on AVX2 (no masked scalar moves, unlike AVX-512) were mispredicted
    half the time: LeNet-5's fused conv + ReLU + 2x2 pooling spent 3x its convolution there.
    The value is three selects on one comparison each; the caller picks the index with
    ``pick``."""
    t = (v > best) | ((v != v) & (best == best))
    m = select(v > best, v, best)
    m = select(v != v, v, m)
    return select(best != best, best, m), t


@njit(inline="always", cache=True)
def pick(t, a, b):
    """``a if t else b`` for integers by bit masks (t a bool; a, b one integer type): no jump,
    no cmov the compiler may turn back into one, and no 64-bit multiply (AVX2 has none, so it
    would keep a loop from being vectorised)."""
    mask = type(b)(0) - type(b)(t)  # all ones when t
    return b ^ ((a ^ b) & mask)


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
