"""Launch arithmetic (kernels/cuda/launch.py) for both tile sets: every tile it picks respects
the limits the kernels rely on. Pure host arithmetic: no kernel runs here."""

import importlib.util
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv import shapes

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "cuda", "launch.py")


def _load(tile_set, monkeypatch_env):
    monkeypatch_env.setenv("FASTCONV_CUDA_TILES", tile_set)
    spec = importlib.util.spec_from_file_location(f"_launch_{tile_set}", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.TILE_SET == tile_set
    return mod


@pytest.fixture(scope="module", params=["small", "default"])
def L(request):
    mp = pytest.MonkeyPatch()
    try:
        yield _load(request.param, mp)
    finally:
        mp.undo()


@st.composite
def geometries(draw):
    G = draw(st.sampled_from([1, 2, 4]))
    CG, KG = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    KH, KW = draw(st.integers(1, 15)), draw(st.integers(1, 15))
    dh, dw = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    sh, sw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    H = max(1, dh * (KH - 1) + 1 - 2 * ph) + draw(st.integers(0, 60))
    W = max(1, dw * (KW - 1) + 1 - 2 * pw) + draw(st.integers(0, 60))
    N = draw(st.integers(1, 300))
    return shapes.conv2d_geometry(
        "t", (N, G * CG, H, W), (G * KG, CG, KH, KW), (sh, sw), (ph, pw), (dh, dw), G
    )


def _patch(T, kb, s, d):
    return (T - 1) * s + (kb - 1) * d + 1


@settings(max_examples=300, deadline=None)
@given(g=geometries())
def test_direct_tiles_fit(L, g):
    t = L.direct_forward_tiles(g)
    assert 1 <= t.TH * t.TW <= L.DIRECT_THREADS and 1 <= t.cb <= L.KB
    assert t.CC * _patch(t.TH, t.KHB, g.sh, g.dh) * _patch(t.TW, t.KWB, g.sw, g.dw) <= L.SMEM_X
    assert t.CC * t.KHB * t.KWB * L.KB <= L.SMEM_W and 1 <= t.CC <= g.CG

    t = L.direct_backward_data_tiles(g)
    assert 1 <= t.TH * t.TW <= L.DIRECT_THREADS and 1 <= t.cb <= L.KB
    rows = (t.TH - 1 + (t.KHB - 1) * g.dh) // g.sh + 1
    cols = (t.TW - 1 + (t.KWB - 1) * g.dw) // g.sw + 1
    assert t.CC * rows * cols <= L.SMEM_X and 1 <= t.CC <= g.KG
    assert t.CC * t.KHB * t.KWB * L.KB <= L.SMEM_W

    t = L.direct_backward_filter_tiles(g)
    assert t.KHB * t.KWB * t.lanes <= L.DIRECT_THREADS and t.lanes <= t.TH * t.TW
    assert _patch(t.TH, t.KHB, g.sh, g.dh) * _patch(t.TW, t.KWB, g.sw, g.dw) <= L.SMEM_X
    assert L.KB * t.TH * t.TW <= L.SMEM_W
    assert 1 <= t.S <= g.N
    assert L.KB * t.KHB * t.KWB * t.lanes <= L.SMEM_X  # the lane sums reuse the patch buffer


@settings(max_examples=300, deadline=None)
@given(
    M=st.integers(1, 3000),
    Nn=st.integers(1, 3000),
    Kd=st.integers(1, 100_000),
    batch=st.integers(1, 5000),
)
def test_gemm_plan(L, M, Nn, Kd, batch):
    p = L.gemm_plan(M, Nn, Kd, batch)
    BM, BN, BK, TM, TN = L.GEMM_CONFIGS[p.config]
    assert p.threads == (BM // TM) * (BN // TN) <= L.MAX_THREADS
    assert p.ksplit % BK == 0 and p.S * p.ksplit >= Kd > (p.S - 1) * p.ksplit
    assert p.blocks == -(-M // BM) * -(-Nn // BN) * batch * p.S


def test_grid_1d(L):
    for n in (1, 31, 32, 33, 1000, 10**7):
        blocks, threads = L.grid_1d(n)
        assert threads % L.WARP == 0 and threads <= L.ELEMENTWISE_THREADS
        assert blocks * threads >= n > (blocks - 1) * threads
