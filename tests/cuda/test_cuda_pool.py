"""CUDA max / average pooling, forward and backward, against the oracle."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference
from tests.cuda.common import few, is_numba_device, tiny_pool_configs, to_device
from tests.helpers import DTYPES, assert_close

pytestmark = pytest.mark.cuda


def _check_max(cfg, x):
    kw = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
    )
    y = fc.max_pool2d(x, **kw, backend="cuda")
    assert_close(y, reference.max_pool2d(x, **kw), what="max forward")
    gy = np.random.default_rng(1).standard_normal(np.shape(y)).astype(x.dtype)
    assert_close(
        fc.max_pool2d_backward(gy, x, **kw, backend="cuda"),
        reference.max_pool2d_backward(gy, x, **kw),
        what="max backward",
    )


def _check_avg(cfg, x, count_include_pad):
    kw = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
        count_include_pad=count_include_pad,
    )
    y = fc.avg_pool2d(x, **kw, backend="cuda")
    assert_close(y, reference.avg_pool2d(x, **kw), what="avg forward")
    gy = np.random.default_rng(2).standard_normal(np.shape(y)).astype(x.dtype)
    assert_close(
        fc.avg_pool2d_backward(gy, x, **kw, backend="cuda"),
        reference.avg_pool2d_backward(gy, x, **kw),
        what="avg backward",
    )


@few(16)
@given(
    cfg=tiny_pool_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_max_pool_random(cfg, dtype, seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["x_shape"])
    if ties:  # few distinct values: many windows with several maxima (first one wins)
        x = np.round(x)
    _check_max(cfg, x.astype(dtype))


@few(16)
@given(
    cfg=tiny_pool_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    count_include_pad=st.booleans(),
)
def test_avg_pool_random(cfg, dtype, seed, count_include_pad):
    x = np.random.default_rng(seed).standard_normal(cfg["x_shape"]).astype(dtype)
    _check_avg(cfg, x, count_include_pad)


NAMED = {
    "lenet_2x2": dict(
        x_shape=(2, 2, 6, 6), kernel_size=(2, 2), stride=None, padding=(0, 0), ceil_mode=False
    ),
    "overlap_3x3_s2_pad": dict(
        x_shape=(1, 2, 5, 6), kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False
    ),
    "ceil_mode_edge": dict(
        x_shape=(1, 1, 5, 5), kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), ceil_mode=True
    ),
    "stride_gt_kernel": dict(
        x_shape=(1, 1, 7, 7), kernel_size=(2, 1), stride=(3, 3), padding=(1, 0), ceil_mode=True
    ),
    "1x1": dict(
        x_shape=(2, 1, 3, 4), kernel_size=(1, 1), stride=None, padding=(0, 0), ceil_mode=False
    ),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_pool_named(name):
    cfg = NAMED[name]
    x = np.random.default_rng(len(name)).standard_normal(cfg["x_shape"])
    _check_max(cfg, x)
    _check_avg(cfg, x, True)
    _check_avg(cfg, x, False)


def test_max_pool_ties_go_to_first_maximum():
    x = np.zeros((1, 1, 4, 4))
    gy = np.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    gx = fc.max_pool2d_backward(gy, x, 2, backend="cuda")
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, ::2, ::2] = gy[0, 0]
    np.testing.assert_array_equal(gx, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool_nan_wins(dtype):
    x = np.arange(16.0).reshape(1, 1, 4, 4).astype(dtype)
    x[0, 0, 1, 0] = np.nan
    x[0, 0, 3, 3] = np.nan
    y = fc.max_pool2d(x, 2, backend="cuda")
    assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 0, 1, 1])
    assert y[0, 0, 0, 1] == 7 and y[0, 0, 1, 0] == 13
    gx = fc.max_pool2d_backward(np.ones((1, 1, 2, 2), dtype), x, 2, backend="cuda")
    np.testing.assert_array_equal(gx, reference.max_pool2d_backward(np.ones((1, 1, 2, 2)), x, 2))


def test_pool_device_arrays():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    (xd,) = to_device(x)
    y = fc.max_pool2d(xd, 2)
    assert is_numba_device(y)
    assert_close(y, reference.max_pool2d(x, 2))
    gx = fc.avg_pool2d_backward(y, xd, 2)
    assert is_numba_device(gx)
    assert_close(gx, reference.avg_pool2d_backward(y.copy_to_host(), x, 2))
