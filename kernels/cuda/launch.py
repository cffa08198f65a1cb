"""Launch arithmetic for every CUDA kernel, in one place: grids, tiles, splits, cached launchers.

Notation: x (N, C, H, W), w (K, CG, KH, KW), y (N, K, OH, OW), G groups, CG = C/G, KG = K/G.

Every kernel in this package is launched on a 1-D grid of 1-D blocks and decodes its block
index itself, so no launch ever meets the 65535 limit of gridDim.y / gridDim.z. The tile sizes
live here as module constants, each with the limit it must respect; the functions below pick
per-call tiles within those limits from the shapes alone, never from the device, so a given
call runs the same reduction order (and gives the same bits) on every GPU and on the simulator.

This module imports nothing from numba: it is plain host arithmetic and is tested without CUDA.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

# --------------------------------------------------------------------------- module constants
# Two tile sets, the same kernels: "default" for GPUs, "small" for the Numba CUDA simulator,
# which runs every CUDA thread as a Python thread (a 256-thread block costs seconds there).
# Small tiles also make the tiny test shapes span several tiles, splits and bands, so the
# simulator exercises every boundary path. FASTCONV_CUDA_TILES=small|default overrides the
# choice (e.g. to run the small set on a GPU); it is read once, at import.


def _simulated() -> bool:
    try:
        return int(os.environ.get("NUMBA_ENABLE_CUDASIM", "0") or 0) != 0
    except ValueError:
        return False


_SIMULATED = _simulated()


def _tile_set() -> str:
    choice = os.environ.get("FASTCONV_CUDA_TILES", "").strip().lower()
    if choice in ("small", "default"):
        return choice
    return "small" if _SIMULATED else "default"


TILE_SET = _tile_set()
_SMALL = TILE_SET == "small"

MAX_THREADS = 1024  # CUDA's limit on threads per block
WARP = 32
ELEMENTWISE_THREADS = 32 if _SMALL else 256  # one element per thread; a multiple of WARP
REDUCE_THREADS = 8 if _SMALL else 128  # tree reductions: a power of two <= MAX_THREADS

# Direct convolution (direct.py). Shared memory per block is (SMEM_X + SMEM_W) * itemsize,
# 24 KiB for float64 with the default set: below the 48 KiB static limit.
DIRECT_THREADS = 64 if _SMALL else 256  # threads per block: one pixel each; <= MAX_THREADS
TILE_W_MAX = 8 if _SMALL else 32  # widest pixel tile (a warp's worth of neighbouring columns)
KB = 4 if _SMALL else 8  # register blocking: channels per thread (local accumulator length)
SMEM_X = 512 if _SMALL else 2048  # staged input / grad_y patch (elements); >= DIRECT_THREADS*KB,
#                                   as the backward-filter lane sums reuse it
SMEM_W = 256 if _SMALL else 1024  # staged filter (or grad_y) tile, KB-padded; >= KB
FILTER_LANES_MAX = 4 if _SMALL else 32  # backward-filter: threads sharing one tap
SPLIT_TARGET_BLOCKS = 8 if _SMALL else 512  # split reductions aim for about this many blocks

# Tiled GEMM (gemm.py): a BM x BN tile of C per block, BK-deep slices of A and B in shared
# memory, each thread a TM x TN register tile. Threads = (BM/TM) * (BN/TN) <= MAX_THREADS.
GEMM_CONFIGS = (
    {"square": (16, 16, 4, 2, 2), "wide": (8, 32, 4, 2, 2)}  # 64 threads each
    if _SMALL
    else {"square": (64, 64, 8, 4, 4), "wide": (16, 128, 8, 2, 4)}  # 256 threads each
)
GEMM_WIDE_MAX_M = 8 if _SMALL else 16  # M at or below this uses "wide" (few output rows)
SPLITK_MIN_CHUNK = 16 if _SMALL else 256  # smallest split-K slice; a multiple of every BK

assert SMEM_X >= DIRECT_THREADS * KB and SMEM_W >= KB and DIRECT_THREADS <= MAX_THREADS
assert REDUCE_THREADS & (REDUCE_THREADS - 1) == 0 and ELEMENTWISE_THREADS % WARP == 0
for _BM, _BN, _BK, _TM, _TN in GEMM_CONFIGS.values():
    assert _BM % _TM == 0 and _BN % _TN == 0 and (_BM // _TM) * (_BN // _TN) <= MAX_THREADS
    assert SPLITK_MIN_CHUNK % _BK == 0


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- cached launchers

_launchers: dict[tuple[Any, int, int], Any] = {}


def launch(kernel: Any, blocks: int, threads: int, *args: Any) -> None:
    """Launch ``kernel`` on ``blocks`` 1-D blocks of ``threads`` threads (default stream).

    The configured launcher ``kernel[blocks, threads]`` is cached per (kernel, blocks, threads),
    so the steady state of a training loop reuses the same objects every step.
    """
    assert 1 <= threads <= MAX_THREADS and blocks >= 1, (blocks, threads)
    if _SIMULATED:  # the simulator's kernel[...] configures and returns the kernel itself
        kernel[blocks, threads](*args)
        return
    key = (kernel, blocks, threads)
    fn = _launchers.get(key)
    if fn is None:
        fn = _launchers[key] = kernel[blocks, threads]
    fn(*args)


def grid_1d(n: int) -> tuple[int, int]:
    """(blocks, threads) covering n elements, one per thread; small arrays get one block of
    just enough warps."""
    threads = min(ELEMENTWISE_THREADS, max(WARP, ceil_div(n, WARP) * WARP))
    return max(1, ceil_div(n, threads)), threads


# --------------------------------------------------------------------------- direct convolution


class DirectTiles(NamedTuple):
    """Tiling of one direct-convolution launch (see direct.py for what each kernel does).

    TH x TW pixels per block (one thread each, lanes extra threads per tap in the filter
    kernel); cb channels per thread (register blocking) and CC channels staged per step;
    kernel taps staged in bands of KHB x KWB; S batch splits (filter gradient only).
    """

    TH: int
    TW: int
    cb: int
    CC: int
    KHB: int
    KWB: int
    S: int = 1
    lanes: int = 1


def _spatial_tile(OH: int, OW: int, limit: int) -> tuple[int, int]:
    """A TH x TW tile (TH*TW <= limit) covering OH x OW with little waste."""
    TW = min(OW, TILE_W_MAX, limit)
    TH = max(1, min(OH, limit // TW))
    n = ceil_div(OH, TH)  # same number of row tiles, spread evenly
    return ceil_div(OH, n), TW


def _patch(T: int, kb: int, s: int, d: int) -> int:
    """Input extent read by T outputs at stride s through kb taps at dilation d."""
    return (T - 1) * s + (kb - 1) * d + 1


def _fit(TH, TW, KHB, KWB, patch_fn):
    """Shrink bands, then the tile, until the patch fits SMEM_X and a KB-padded band of
    filter taps fits SMEM_W."""
    while patch_fn(TH, TW, KHB, KWB) > SMEM_X:
        if KHB > 1 or KWB > 1:
            if KHB >= KWB:
                KHB = ceil_div(KHB, 2)
            else:
                KWB = ceil_div(KWB, 2)
        elif TH >= TW and TH > 1:
            TH = ceil_div(TH, 2)
        else:
            TW = ceil_div(TW, 2)
    while KB * KHB * KWB > SMEM_W:
        if KHB >= KWB:
            KHB = ceil_div(KHB, 2)
        else:
            KWB = ceil_div(KWB, 2)
    return TH, TW, KHB, KWB


def direct_forward_tiles(g: Any) -> DirectTiles:
    """Tiles for direct.conv2d_forward: output pixels x cb output channels per block."""
    TH, TW = _spatial_tile(g.OH, g.OW, DIRECT_THREADS)
    cb = min(KB, g.KG)

    def patch(th, tw, khb, kwb):
        return _patch(th, khb, g.sh, g.dh) * _patch(tw, kwb, g.sw, g.dw)

    TH, TW, KHB, KWB = _fit(TH, TW, g.KH, g.KW, patch)
    CC = max(1, min(g.CG, SMEM_X // patch(TH, TW, KHB, KWB), SMEM_W // (KB * KHB * KWB)))
    return DirectTiles(TH, TW, cb, CC, KHB, KWB)


def direct_backward_data_tiles(g: Any) -> DirectTiles:
    """Tiles for direct.conv2d_backward_data: input pixels x cb input channels per block."""
    TH, TW = _spatial_tile(g.H, g.W, DIRECT_THREADS)
    cb = min(KB, g.CG)

    def patch(th, tw, khb, kwb):  # upper bound on the grad_y rows/cols a tile gathers from
        return ((th - 1 + (khb - 1) * g.dh) // g.sh + 1) * ((tw - 1 + (kwb - 1) * g.dw) // g.sw + 1)

    TH, TW, KHB, KWB = _fit(TH, TW, g.KH, g.KW, patch)
    CC = max(1, min(g.KG, SMEM_X // patch(TH, TW, KHB, KWB), SMEM_W // (KB * KHB * KWB)))
    return DirectTiles(TH, TW, cb, CC, KHB, KWB)


def direct_backward_filter_tiles(g: Any) -> DirectTiles:
    """Tiles for direct.conv2d_backward_filter: one input channel, cb output channels and a
    KHB x KWB band of taps per block, ``lanes`` threads per tap, S splits of the batch."""
    TH, TW = _spatial_tile(g.OH, g.OW, DIRECT_THREADS // 4)
    cb = min(KB, g.KG)

    def patch(th, tw, khb, kwb):
        return _patch(th, khb, g.sh, g.dh) * _patch(tw, kwb, g.sw, g.dw)

    TH, TW, KHB, KWB = _fit(TH, TW, g.KH, g.KW, patch)
    while KB * TH * TW > SMEM_W:  # the staged (KB-padded) grad_y tile uses the SMEM_W buffer
        if TH > 1:
            TH = ceil_div(TH, 2)
        else:
            TW = ceil_div(TW, 2)
    taps = KHB * KWB
    while taps > DIRECT_THREADS:  # one thread per tap at least
        if KHB >= KWB:
            KHB = ceil_div(KHB, 2)
        else:
            KWB = ceil_div(KWB, 2)
        taps = KHB * KWB
    lanes = 1
    while lanes * 2 <= FILTER_LANES_MAX and taps * lanes * 2 <= DIRECT_THREADS:
        lanes *= 2
    lanes = min(lanes, TH * TW)
    base = g.G * ceil_div(g.KG, cb) * g.CG * ceil_div(g.KH, KHB) * ceil_div(g.KW, KWB)
    S = max(1, min(g.N, ceil_div(SPLIT_TARGET_BLOCKS, base)))
    return DirectTiles(TH, TW, cb, 1, KHB, KWB, S, lanes)


# --------------------------------------------------------------------------- GEMM


class GemmPlan(NamedTuple):
    """One batched GEMM launch: config name, blocks, threads and the split-K factor."""

    config: str
    blocks: int
    threads: int
    S: int
    ksplit: int


def gemm_plan(M: int, Nn: int, Kd: int, batch: int, allow_split: bool = True) -> GemmPlan:
    """Pick the tile config, grid and split-K for C (batch, M, Nn) = A (M, Kd) @ B (Kd, Nn).

    Split-K (partial products summed afterwards in a fixed order) only when the output tiles
    alone give too few blocks and the reduction is deep, as in the filter gradients.
    """
    config = "wide" if M <= GEMM_WIDE_MAX_M else "square"
    BM, BN, BK, TM, TN = GEMM_CONFIGS[config]
    threads = (BM // TM) * (BN // TN)
    tiles = ceil_div(M, BM) * ceil_div(Nn, BN) * batch
    S = 1
    if allow_split and tiles < SPLIT_TARGET_BLOCKS // 2 and Kd >= 2 * SPLITK_MIN_CHUNK:
        S = min(ceil_div(SPLIT_TARGET_BLOCKS // 2, tiles), Kd // SPLITK_MIN_CHUNK)
    ksplit = ceil_div(ceil_div(Kd, S), BK) * BK
    S = ceil_div(Kd, ksplit)
    return GemmPlan(config, tiles * S, threads, S, ksplit)


# --------------------------------------------------------------------------- strided views and sums
# (extra.py) Broadcast, reduction and scatter kernels decode a flat index into at most MAX_DIMS
# coordinates from a small int64 "meta" array of shapes and element strides (rows MAX_DIMS
# long, shapes left-padded with 1). A sum over R terms per output runs serially in one thread
# when R <= REDUCE_SERIAL_MAX or when there are at least REDUCE_SERIAL_OUTPUTS outputs (enough
# threads already); otherwise one block of REDUCE_THREADS per output. The choice depends on
# the shapes alone, so a given call always adds in the same order.

MAX_DIMS = 6  # axes a broadcast / strided kernel decodes; meta rows are this long
REDUCE_SERIAL_MAX = 4 if _SMALL else 64  # terms one thread sums alone, however few outputs
REDUCE_SERIAL_OUTPUTS = 64 if _SMALL else 32768  # outputs that keep the GPU busy one thread each


def reduce_grid(n_out: int, n_red: int) -> tuple[bool, int, int]:
    """(one block per output?, blocks, threads) for a sum of ``n_red`` terms into each of
    ``n_out`` outputs (extra.sum_blocks when True, else extra.sum_serial)."""
    if n_red > REDUCE_SERIAL_MAX and n_out < REDUCE_SERIAL_OUTPUTS:
        return True, max(1, n_out), REDUCE_THREADS
    return (False, *grid_1d(n_out))
