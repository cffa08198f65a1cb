"""Every register tile of the direct convolution (microkernel.COMBOS x form A / B, and the
grad_w tiles) against the oracle, each forced in turn: the plan's cost model alone would only
ever exercise the shapes it prefers."""

import numpy as np
import pytest
from fastconv.kernels.cpu import direct

from fastconv import reference
from fastconv.shapes import conv2d_geometry
from tests.helpers import DTYPES, assert_close

# (x shape, w shape, stride, padding, dilation, groups): odd sizes so every tile has a ragged
# last block; 40 and 70 output channels span 1-5 vectors of lanes.
CASES = [
    ((3, 2, 11, 9), (5, 2, 3, 3), 1, 1, 1, 1),
    ((2, 4, 10, 13), (40, 2, 3, 2), 1, (2, 0), (1, 2), 2),
    ((2, 3, 12, 12), (70, 3, 5, 5), 1, 2, 1, 1),
    ((2, 6, 9, 10), (12, 2, 3, 3), 2, 1, 2, 3),
]
FORMS = [(False, nv) for nv in (1, 2, 3, 4)] + [(True, nv) for nv in (1, 2, 3, 4)]


def _geom(xs, ws, s, p, d, G):
    return conv2d_geometry("conv2d", xs, ws, s, p, d, G)


def _chunks(n):
    return np.array([0, n // 2, n] if n > 1 else [0, n], np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{'B' if f[0] else 'A'}{f[1]}")
def test_forward_tile_matches_oracle(case, form, dtype):
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    if form[0] and (g.sh, g.sw) != (1, 1):
        pytest.skip("form B is for stride 1 only (the plan never offers it otherwise)")
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    pl = direct.plan(g, x.itemsize, form)
    y = np.empty(g.y_shape, dtype)
    wp = direct.pack_weights(w, g, pl)
    direct.conv2d_tiled(x, wp, b, y, True, _chunks(g.N), g.ph, g.pw, pl.form_b, *direct._tables(pl))
    ref = reference.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=G)
    assert_close(y, np.maximum(ref, 0), dtype, "tiled forward + ReLU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("nv", (1, 2, 3, 4))
def test_filter_tile_matches_oracle(case, nv, dtype, monkeypatch):
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    plan = direct.filter_plan.__wrapped__  # uncached, NV forced
    monkeypatch.setattr(direct, "filter_plan", lambda g_, isz: plan(g_, isz, nv))
    gw = direct.backward_filter(gy, x, g, _chunks(g.N))
    ref = reference.conv2d_backward(gy, x, w, stride=s, padding=p, dilation=d, groups=G)[1]
    assert_close(gw, ref, dtype, "tiled grad_w")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_data_matches_oracle(case, dtype):
    """Stride 1: the flipped-kernel forward; stride 2: the scatter loops."""
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    assert (direct.transposed_geometry(g) is None) == (s != 1)
    rng = np.random.default_rng(9)
    w = rng.standard_normal(ws).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    gx = direct.backward_data(gy, w, g, _chunks(g.N))
    x = np.zeros(xs, dtype)
    ref = reference.conv2d_backward(gy, x, w, stride=s, padding=p, dilation=d, groups=G)[0]
    assert_close(gx, ref, dtype, "direct grad_x")


def test_padding_beyond_kernel_reach_uses_scatter():
    """q = d*(KH-1) - p < 0: no flipped-kernel form; the scatter loops give grad_x."""
    case = ((2, 3, 6, 6), (4, 3, 3, 3), 1, 3, 1, 1)
    g = _geom(*case)
    assert direct.transposed_geometry(g) is None
    rng = np.random.default_rng(10)
    w = rng.standard_normal(case[1])
    gy = rng.standard_normal(g.y_shape)
    gx = direct.backward_data(gy, w, g, _chunks(g.N))
    ref = reference.conv2d_backward(gy, np.zeros(case[0]), w, padding=3)[0]
    assert_close(gx, ref, np.float64, "grad_x")
