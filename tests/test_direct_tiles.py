"""Every register tile of the direct convolution (microkernel.COMBOS x form A / B, the grad_w
tiles, the grad_w dot tiles of microkernel.DOT_COMBOS, and the scatter-form grad_x tiles)
against the oracle, each forced in turn:
the plans' cost models alone would only ever exercise the shapes they prefer."""

import numpy as np
import pytest
from fastconv.kernels.cpu import direct, pool
from fastconv.kernels.cpu.microkernel import COMBOS
from hypothesis import assume, given
from hypothesis import strategies as st

from fastconv import reference
from fastconv.shapes import conv2d_geometry, pool2d_geometry
from tests.helpers import DTYPES, assert_close
from tests.strategies import conv_configs

# (x shape, w shape, stride, padding, dilation, groups): odd sizes so every tile has a ragged
# last block; 40 and 70 output channels span 1-5 vectors of lanes.
CASES = [
    ((3, 2, 11, 9), (5, 2, 3, 3), 1, 1, 1, 1),
    ((2, 4, 10, 13), (40, 2, 3, 2), 1, (2, 0), (1, 2), 2),
    ((2, 3, 12, 12), (70, 3, 5, 5), 1, 2, 1, 1),
    ((2, 6, 9, 10), (12, 2, 3, 3), 2, 1, 2, 3),
]
TILES = range(len(COMBOS))  # every tile this CPU's code has (4, or 6 with AVX-512)
FORMS = [(False, c) for c in TILES] + [(True, c) for c in TILES]


def _form_id(f):
    mr, nv = COMBOS[f[1]]
    return f"{'B' if f[0] else 'A'}{mr}x{nv}"


def _geom(xs, ws, s, p, d, G):
    return conv2d_geometry("conv2d", xs, ws, s, p, d, G)


def pool_geometry(y_shape, window):
    return pool2d_geometry("max_pool2d", y_shape, window)


def _chunks(n):
    return np.array([0, n // 2, n] if n > 1 else [0, n], np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS, ids=_form_id)
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
    code, pool = np.empty(0, np.int32), (0, 0)
    tables = direct._tables(pl)
    direct.conv2d_tiled(
        x, wp, b, y, code, True, pool, g.OH, g.OW, _chunks(g.N), g.ph, g.pw, pl.form_b, *tables
    )
    ref = reference.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=G)
    assert_close(y, np.maximum(ref, 0), dtype, "tiled forward + ReLU")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS, ids=_form_id)
@pytest.mark.parametrize("window", [(2, 2), (3, 2)])
def test_forward_tile_pooled_matches_oracle(case, form, window, dtype):
    """Bias, ReLU and max pooling in the tiles' epilogue; the argmax codes must point at each
    window's maximum (row-major position in the window)."""
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    if form[0] and (g.sh, g.sw) != (1, 1):
        pytest.skip("form B is for stride 1 only (the plan never offers it otherwise)")
    rng = np.random.default_rng(14)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    pl = direct.plan.__wrapped__(g, x.itemsize, form)
    pg = pool_geometry(g.y_shape, window)
    code = np.full(g.N * g.K * pg.OH * pg.OW, -1, np.int32)
    y = np.empty((g.N, g.K, pg.OH, pg.OW), dtype)
    wp = direct.pack_weights(w, g, pl)
    tables = direct._tables(pl)
    direct.conv2d_tiled(
        x, wp, b, y, code, True, window, g.OH, g.OW, _chunks(g.N), g.ph, g.pw, form[0], *tables
    )
    z = np.maximum(reference.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=G), 0)
    assert_close(y, reference.max_pool2d(z, window), dtype, "tiled forward + ReLU + pool")
    kh, kw = window
    n, k, i, j = np.indices(y.shape)
    c = code.reshape(y.shape)
    assert ((c >= 0) & (c < kh * kw)).all()
    at = z[n, k, i * kh + c // kw, j * kw + c % kw]  # the element each code points at
    assert_close(at, reference.max_pool2d(z, window), dtype, "value at the argmax")


ROUTES = [(False, c) for c in TILES] + [(True, nk) for nk in (1, 2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"dot-nk{r[1]}" if r[0] else "tile-{}x{}".format(*COMBOS[r[1]]))
def test_filter_tile_matches_oracle(case, route, dtype, monkeypatch):
    """grad_w on the tiles (each tile forced) and on the dot tiles (NK forced)."""
    dot, n = route
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    if dot and (g.sh, g.sw) != (1, 1):
        pytest.skip("the dot form is for stride 1 only (use_dot never offers it otherwise)")
    rng = np.random.default_rng(11 if dot else 8)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    name = "dot_plan" if dot else "filter_plan"
    plan = getattr(direct, name).__wrapped__  # uncached, NK / NV forced
    monkeypatch.setattr(direct, name, lambda g_, isz: plan(g_, isz, n))
    monkeypatch.setattr(direct, "use_dot", lambda g_, isz: dot)
    gw = direct.backward_filter(gy, x, g, _chunks(g.N))
    ref = reference.conv2d_backward(gy, x, w, stride=s, padding=p, dilation=d, groups=G)[1]
    assert_close(gw, ref, dtype, "dot grad_w" if dot else "tiled grad_w")


# grad_x cases at stride 1: groups, dilation, padding beyond the kernel's reach (where the
# flipped forward does not apply), a kernel as large as the input
DATA_CASES = [c for c in CASES if c[2] == 1] + [
    ((2, 3, 8, 7), (5, 3, 3, 3), 1, (4, 3), 1, 1),
    ((3, 4, 6, 6), (8, 1, 6, 6), 1, 0, 1, 4),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DATA_CASES)
@pytest.mark.parametrize("combo", TILES, ids=lambda c: "{}x{}".format(*COMBOS[c]))
def test_scatter_data_tile_matches_oracle(case, combo, dtype, monkeypatch):
    """grad_x in the scatter form (tiles adding into the padded grad_x), each tile forced."""
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    rng = np.random.default_rng(16)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    plan = direct.scatter_plan.__wrapped__
    monkeypatch.setattr(direct, "scatter_plan", lambda g_, isz: plan(g_, isz, combo))
    gx = direct.backward_data(gy, w, g, _chunks(g.N), form="scatter")
    ref = reference.conv2d_backward(gy, x, w, stride=s, padding=p, dilation=d, groups=G)[0]
    assert_close(gx, ref, dtype, "scatter grad_x")
    if direct.transposed_geometry(g) is not None:  # the other form, for the same gradient
        other = direct.backward_data(gy, w, g, _chunks(g.N), form="forward")
        assert_close(other, ref, dtype, "flipped-forward grad_x")


@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_data_forms_random(cfg, dtype, seed):
    """Random stride-1 geometries (groups, dilation, 'same' / 'valid' / any padding): grad_x
    in the scatter form and, where it applies, the flipped forward, against the oracle."""
    g = conv2d_geometry("conv2d", cfg["x_shape"], cfg["w_shape"], cfg["stride"],
                        cfg["padding"], cfg["dilation"], cfg["groups"])  # fmt: skip
    assume((g.sh, g.sw) == (1, 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    w = rng.standard_normal(cfg["w_shape"]).astype(dtype)
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    p = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    ref = reference.conv2d_backward(gy, x, w, **p)[0]
    forms = ("scatter", "forward") if direct.transposed_geometry(g) is not None else ("scatter",)
    for form in forms:
        gx = direct.backward_data(gy, w, g, _chunks(g.N), form)
        assert_close(gx, ref, dtype, f"grad_x ({form})")


def test_extra_tiles_only_where_they_pad_fewer_rows():
    """The tiles beyond the first four (AVX-512: (6, 3), (8, 2)) are weighed only where they
    pad the rows less than every one of the four; then LeNet-5's 6 output channels (form B
    forward) and 6 input channels (scatter grad_x) run as 6 rows, never 7."""
    base = min(direct._round(n, mr) for mr, _ in COMBOS[:4] for n in [6])
    for n in (6, 16, 24, 150, 576, 784, 1, 5):
        offered = direct._tiles_for(n)
        assert [c for c, _, _ in offered][:4] == [0, 1, 2, 3]
        least = min(direct._round(n, mr) for mr, _ in COMBOS[:4])
        for c, mr, nv in offered[4:]:
            assert (mr, nv) == COMBOS[c] and direct._round(n, mr) < least
        for c in range(4, len(COMBOS)):
            if direct._round(n, COMBOS[c][0]) < least:
                assert c in [o[0] for o in offered]
    stem = _geom((64, 1, 28, 28), (6, 1, 5, 5), 1, 2, 1, 1)
    conv2 = _geom((64, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1)
    p, s = direct.plan(stem, 4), direct.scatter_plan(conv2, 4)
    assert p.rows >= 6 and s.rows >= 6 and p.rows % p.mr == 0 and s.rows % s.mr == 0
    if any(mr == 6 for mr, _ in COMBOS):  # AVX-512 (AVX2's 3-row tiles fit 6 already)
        assert p.form_b and p.rows == 6 and s.rows == 6
    else:
        assert base == 6


def test_scatter_is_chosen_where_the_flipped_forward_wastes_most():
    """The cost model's picks on the MNIST-scale layers (checked against single-thread times:
    LeNet-5 conv2 1120 -> 724 us, Nielsen conv2 5546 -> 3203 us; a 'same'-padded 3x3 layer
    908 us flipped vs 1324 us scatter), and the form without a flipped forward."""
    lenet_c2 = _geom((64, 6, 14, 14), (16, 6, 5, 5), 1, 0, 1, 1)
    same_3x3 = _geom((64, 16, 14, 14), (16, 16, 3, 3), 1, 1, 1, 1)
    beyond = _geom((2, 3, 8, 7), (5, 3, 3, 3), 1, (4, 3), 1, 1)
    strided = _geom((2, 3, 9, 9), (4, 3, 3, 3), 2, 1, 1, 1)
    assert direct.use_scatter(lenet_c2, 4) and not direct.use_scatter(same_3x3, 4)
    assert direct.transposed_geometry(beyond) is None and direct.use_scatter(beyond, 4)
    assert not direct.use_scatter(strided, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dot", [True, False], ids=["dot", "tiles"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("window", [(2, 2), (3, 2)])
def test_gradients_from_pooled_gradient_match_oracle(dot, relu, window, dtype, monkeypatch):
    """grad_w, grad_b and grad_x straight from conv2d_pool's gradient (argmax codes, ReLU
    mask): the dot form, the grad_w tiles and the scatter grad_x rebuild each plane in their
    own buffers; the flipped-forward grad_x runs on the unpooled gradient."""
    case = CASES[0]
    xs, ws, s, p, d, G = case
    g = _geom(*case)
    rng = np.random.default_rng(15)
    x, w = rng.standard_normal(xs).astype(dtype), rng.standard_normal(ws).astype(dtype)
    b = rng.standard_normal(ws[0]).astype(dtype)
    pg = pool_geometry(g.y_shape, window)
    code = np.empty(g.N * g.K * pg.OH * pg.OW, np.int32)
    y = direct.forward(x, w, b, g, relu, _chunks(g.N), pg, code)
    gy = rng.standard_normal(y.shape).astype(dtype)
    monkeypatch.setattr(direct, "use_dot", lambda g_, isz: dot)
    gw = direct.backward_filter(gy, x, g, _chunks(g.N), (y, code, relu, pg))
    gb = pool.max_pool2d_backward_bias(gy, y, relu)
    z = reference.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=G)
    z = np.maximum(z, 0) if relu else z
    gz = reference.max_pool2d_backward(gy, z, window)
    gz = np.where(z > 0, gz, 0) if relu else gz
    ref = reference.conv2d_backward(gz, x, w, stride=s, padding=p, dilation=d, groups=G)
    assert_close(gw, ref[1], dtype, "grad_w from the pooled gradient")
    assert_close(gb, ref[2], dtype, "grad_b from the pooled gradient")
    for form in ("scatter", "forward"):
        gx = direct.backward_data(gy, w, g, _chunks(g.N), form, (y, code, relu, pg))
        assert_close(gx, ref[0], dtype, f"grad_x ({form}) from the pooled gradient")


def test_filter_dot_redone_on_tiles_when_input_not_finite(monkeypatch):
    """x[0, 0, 1, 0] = inf: the dot form's zero lanes of row 0 meet it through tap (0, 1), whose
    true gradient is finite. The chunk is flagged and the tiles give the oracle's answer."""
    x = np.random.default_rng(12).standard_normal((2, 1, 6, 6))
    x[0, 0, 1, 0] = np.inf
    w = np.ones((2, 1, 3, 3))
    g = _geom(x.shape, w.shape, 1, 0, 1, 1)
    gy = np.random.default_rng(13).standard_normal(g.y_shape)
    d = direct.dot_plan(g, 8)
    parts = np.empty((2, 1, d.rows, d.cols))
    bad = np.zeros(2, np.bool_)
    chunks = np.array([0, 1, 2], np.int64)
    no_pool = (gy, np.empty(0, np.int32), False, (0, 0), g.OH, g.OW)
    direct.conv2d_filter_dot(
        x,
        gy,
        *no_pool,
        parts,
        bad,
        chunks,
        g.ph,
        g.pw,
        d.arow,
        d.combo,
        d.mr,
        d.nk,
        d.S,
        d.Hp,
        d.Wp,
    )
    assert bad.tolist() == [True, False]
    assert np.isnan(parts[0, 0, 1, :2]).all()  # tap (0, 1): 0 * inf in a zero lane
    monkeypatch.setattr(direct, "use_dot", lambda g_, isz: True)
    gw = direct.backward_filter(gy, x, g, chunks)
    ref = reference.conv2d_backward(gy, x, w)[1]
    assert (np.isfinite(gw) == np.isfinite(ref)).all() and np.isfinite(gw[:, 0, 0, 1]).all()
    fin = np.isfinite(ref)
    assert_close(gw[fin], ref[fin], np.float64, "grad_w where finite")


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
