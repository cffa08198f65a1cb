"""CPU pooling kernels against the oracle: random configurations and named edge cases."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference
from tests.helpers import DTYPES, assert_close, check_op
from tests.strategies import pool_configs


@pytest.fixture(autouse=True, scope="module")
def always_parallel():
    """Small calls run on one thread (threads.SERIAL_BELOW, POOL_BELOW); the configurations
    here are small, so make every call take the multi-threaded path, the one where a race
    would show, and cut batches into chunks of up to 2 images (N=3: a full and a partial one)."""
    from fastconv.kernels.cpu import ops, threads

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threads, "SERIAL_BELOW", 0)
        mp.setattr(threads, "POOL_BELOW", 0)
        mp.setattr(ops, "MIN_CHUNKS", 2)
        yield


def _check(kind, cfg, dtype, seed=0, x=None, **extra):
    rng = np.random.default_rng(seed)
    if x is None:
        x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    p = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg.get("ceil_mode", False),
        **extra,
    )
    fwd, bwd = getattr(fc, f"{kind}_pool2d"), getattr(fc, f"{kind}_pool2d_backward")
    rfwd, rbwd = getattr(reference, f"{kind}_pool2d"), getattr(reference, f"{kind}_pool2d_backward")
    check_op(
        lambda x: fwd(x, **p, backend="cpu"),
        lambda x: rfwd(x, **p),
        (x,),
        grads=lambda gy, x: bwd(gy, x, **p, backend="cpu"),
        expected_grads=lambda gy, x: rbwd(gy, x, **p),
    )


@given(cfg=pool_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_max_pool_random(cfg, dtype, seed):
    _check("max", cfg, dtype, seed)


@given(
    cfg=pool_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    count_include_pad=st.booleans(),
)
def test_avg_pool_random(cfg, dtype, seed, count_include_pad):
    _check("avg", cfg, dtype, seed, count_include_pad=count_include_pad)


@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_pool_2x2_random(n, c, h, w, dtype, seed):
    """The unrolled 2x2 / stride 2 kernels (odd sizes leave a row or column past the last
    window) against the oracle, max pooling with some NaN and ties in the input."""
    x = np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(dtype)
    x.flat[::7] = 0.5  # ties
    x.flat[3::11] = np.nan
    cfg = dict(x_shape=x.shape, kernel_size=2, stride=None, padding=0)
    _check("max", cfg, dtype, x=x)
    _check("avg", cfg, dtype, x=np.nan_to_num(x), count_include_pad=False)


NAMED = {
    "lenet_2x2": dict(x_shape=(2, 6, 28, 28), kernel_size=2, stride=None, padding=0),
    "batch1_odd": dict(x_shape=(1, 3, 7, 5), kernel_size=2, stride=None, padding=0),
    "overlap_3s2p1": dict(x_shape=(2, 2, 9, 9), kernel_size=3, stride=2, padding=1),
    "non_square": dict(x_shape=(1, 2, 8, 9), kernel_size=(2, 3), stride=(1, 2), padding=(1, 1)),
    "stride_gt_kernel": dict(x_shape=(1, 1, 10, 10), kernel_size=2, stride=3, padding=0),
    "1x1": dict(x_shape=(2, 2, 4, 4), kernel_size=1, stride=1, padding=0),
    "ceil_mode": dict(x_shape=(1, 2, 7, 7), kernel_size=3, stride=2, padding=1, ceil_mode=True),
    "whole_input": dict(x_shape=(2, 3, 5, 4), kernel_size=(5, 4), stride=1, padding=0),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_named(kind, name, dtype):
    _check(kind, NAMED[name], dtype)
    if kind == "avg":
        _check(kind, NAMED[name], dtype, count_include_pad=False)


def test_max_pool_ties_go_to_first_maximum():
    x = np.zeros((1, 1, 4, 4))  # every window is all ties
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    gx = fc.max_pool2d_backward(gy, x, 2, backend="cpu")
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, ::2, ::2] = gy[0, 0]  # top-left of each window
    np.testing.assert_array_equal(gx, expected)
    np.testing.assert_array_equal(reference.max_pool2d_backward(gy, x, 2), expected)


def test_max_pool_overlapping_windows_accumulate():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0  # the centre is the maximum of all four 2x2 windows
    gx = fc.max_pool2d_backward(np.ones((1, 1, 2, 2)), x, 2, stride=1, backend="cpu")
    assert gx[0, 0, 1, 1] == 4.0 and gx.sum() == 4.0


def test_max_pool_nan_wins_and_all_minus_inf():
    x = np.full((1, 1, 2, 4), -np.inf)
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 0, 1] = 3.0
    for fwd, bwd in (
        (fc.max_pool2d, fc.max_pool2d_backward),
        (reference.max_pool2d, reference.max_pool2d_backward),
    ):
        kw = {"backend": "cpu"} if fwd is fc.max_pool2d else {}
        y = fwd(x, 2, **kw)
        assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 0, 1] == -np.inf
        gx = bwd(np.ones((1, 1, 1, 2)), x, 2, **kw)
        assert gx[0, 0, 1, 0] == 1.0  # the NaN gets the gradient, not the 3.0
        assert gx[0, 0, 0, 2] == 1.0  # all -inf: the first element of the window
        assert gx.sum() == 2.0


def test_max_pool_padding_never_wins():
    x = -np.ones((1, 1, 3, 3))  # all negative: the -inf padding must not be picked
    y = fc.max_pool2d(x, 3, stride=1, padding=1, backend="cpu")
    np.testing.assert_array_equal(y, -np.ones((1, 1, 3, 3)))


def test_avg_pool_divisor_matches_pytorch_rule():
    x = np.ones((1, 1, 3, 3))
    inc = fc.avg_pool2d(x, 2, stride=2, padding=1, backend="cpu")
    exc = fc.avg_pool2d(x, 2, stride=2, padding=1, count_include_pad=False, backend="cpu")
    np.testing.assert_allclose(inc[0, 0], [[0.25, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(exc[0, 0], np.ones((2, 2)))


def test_pool_non_contiguous_input():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 8, 3)).transpose(0, 3, 1, 2)
    assert_close(fc.max_pool2d(x, 2, backend="cpu"), reference.max_pool2d(x, 2))
    assert_close(fc.avg_pool2d(x, 3, 1, 1, backend="cpu"), reference.avg_pool2d(x, 3, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["overlap_3s2p1", "ceil_mode", "lenet_2x2"])
def test_max_pool_saved_argmax_matches_oracle(name, dtype):
    """Recorded on the tape, the forward pass keeps each window's argmax in the op's context;
    the backward pass then only scatters. Used only for the very same x object; the gradients
    stay the oracle's."""
    cfg = NAMED[name]
    p = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg.get("ceil_mode", False),
    )
    rng = np.random.default_rng(5)
    x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    x[0, 0, :2, :2] = 1.0  # a tie: the first maximum must win here too
    xt = fc.Tensor(x, requires_grad=True)
    y = fc.max_pool2d(xt, **p, backend="cpu")
    assert_close(y.numpy(), reference.max_pool2d(x, **p), dtype)
    node = y._node
    assert node.ctx.scratch["x"] is x
    gy = rng.standard_normal(y.shape).astype(dtype)
    for _ in range(2):  # twice: the kept argmax is reused, not consumed
        xt.grad = None
        y.backward(gy, retain_graph=True)
        assert_close(xt.grad, reference.max_pool2d_backward(gy, x, **p), dtype)
    # the recorded backward given another input: searched afresh
    x2 = rng.standard_normal(x.shape).astype(dtype)
    (gx2,) = node.backward(gy, node.ctx._replace(x=x2), node.needs)
    assert_close(gx2, reference.max_pool2d_backward(gy, x2, **p), dtype)


SPECIAL = [np.nan, -np.inf, -1.5, -0.0, 0.0, 2.0, np.inf]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_max_and_pick_follow_the_scan_rule(dtype):
    """The jump-free first-maximum step (kernels' ``first_max`` + ``pick``) against the rule
    written out in Python, on every pair of special values: v is taken when v > best, or v is
    NaN and best is not; the kept value is bit for bit the one taken (signed zeros, which NaN)."""
    from numba import njit, uint64

    from fastconv.kernels.cpu._common import first_max, pick

    @njit
    def step(v, best, i, bi):
        m, t = first_max(v, best)
        i32 = pick(t, np.int32(i), np.int32(bi))
        return m, t, pick(t, i, bi), pick(t, uint64(i), uint64(bi)), i32

    for v in SPECIAL:
        for best in SPECIAL:
            v_, b_ = dtype(v), dtype(best)
            taken = bool(v_ > b_ or (np.isnan(v_) and not np.isnan(b_)))
            m, t, i64, u64, i32 = step(v_, b_, 7, 3)
            want = v_ if taken else b_
            assert t == taken, (v, best)
            assert np.array(m, dtype).tobytes() == np.array(want, dtype).tobytes(), (v, best)
            assert (i64, u64, i32) == ((7, 7, 7) if taken else (3, 3, 3)), (v, best)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape, k, s, p, ceil",
    [
        ((2, 3, 14, 14), 3, 1, 1, False),  # inception_mini's pool branch
        ((1, 2, 9, 11), 3, 2, 1, True),  # clipped windows on every edge
        ((2, 1, 7, 5), (2, 3), (1, 2), (1, 0), False),
        ((1, 2, 4, 4), 4, 1, 2, True),  # windows wider than the interior
        # "same" windows (stride 1, padding half the window: max_pool2d_forward_same)
        ((2, 3, 7, 7), 3, 1, 1, False),  # inception_mini's second pool branch
        ((1, 2, 6, 9), 5, 1, 2, False),
        ((2, 1, 8, 5), (3, 5), 1, (1, 2), True),  # rectangular; a row narrower than 2 windows
        ((1, 2, 2, 2), 3, 1, 1, False),  # planes smaller than the window: only edges
        ((1, 2, 1, 6), 3, 1, 1, False),
        ((1, 1, 9, 2), (5, 3), 1, (2, 1), False),
    ],
)
def test_max_pool_general_windows_on_the_tape(dtype, shape, k, s, p, ceil):
    """The separable general-window kernel through the tape (the forward pass keeps each
    window's argmax, the backward pass scatters to it): values bit for bit the oracle's on
    inputs full of NaN, +-inf, signed zeros and ties, gradients at the first maximum."""
    rng = np.random.default_rng(5)
    special = np.array([np.nan, -np.inf, -1.0, -0.0, 0.0, 0.5, 0.5, 2.0, np.inf])
    x = rng.choice(special, size=shape).astype(dtype)
    x[0, 0] = rng.standard_normal(shape[2:])  # one plane of plain numbers
    xt = fc.Tensor(x, requires_grad=True)
    y = fc.max_pool2d(xt, k, s, p, ceil_mode=ceil, backend="cpu")
    want = reference.max_pool2d(x.astype(np.float64), k, s, p, ceil_mode=ceil)
    got = y.numpy()
    assert got.shape == want.shape and got.dtype == dtype
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    same = ~np.isnan(want)
    np.testing.assert_array_equal(got[same], want[same].astype(dtype))
    np.testing.assert_array_equal(np.signbit(got[same]), np.signbit(want[same]))
    gy = rng.standard_normal(want.shape)
    y.backward(gy.astype(dtype))
    expected = reference.max_pool2d_backward(gy, x.astype(np.float64), k, s, p, ceil_mode=ceil)
    np.testing.assert_allclose(xt.grad, expected, rtol=1e-6, atol=1e-6)


def test_same_windows_take_the_whole_plane_kernel():
    """Which max-pooling kernel a geometry gets (kernels/cpu/ops.py): "same" windows (stride
    1, odd window of 3 or more, padding half of it) the whole-plane one, others not."""
    from fastconv import shapes
    from fastconv.kernels.cpu import ops

    def same(shape, k, s, p, ceil=False):
        return ops._is_same(shapes.pool2d_geometry("t", shape, k, s, p, ceil))

    assert same((2, 3, 14, 14), 3, 1, 1) and same((1, 1, 1, 6), 3, 1, 1)
    assert same((1, 1, 9, 2), (5, 3), 1, (2, 1))
    assert not same((2, 3, 14, 14), 3, 1, 0)  # no padding: y is smaller
    assert not same((2, 3, 14, 14), 3, 2, 1)  # stride 2
    assert not same((2, 3, 14, 14), 2, 1, 1)  # even window
    assert not same((2, 3, 14, 14), 1, 1, 0)  # 1x1: the general kernel
