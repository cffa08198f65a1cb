"""CUDA convolution kernels (direct and im2col + GEMM) against the oracle.

Random tiny configurations from hypothesis plus named edge cases; forward, the three gradients,
the output masks, the fused bias + ReLU epilogue, device-array inputs and bit-for-bit
determinism of the backward pass.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import reference, shapes
from tests.cuda.common import (
    Foreign,
    conv_params,
    few,
    is_numba_device,
    tiny_conv_configs,
    to_device,
)
from tests.helpers import DTYPES, assert_close, check_op, to_host

ALGOS = ("direct", "im2col")
pytestmark = pytest.mark.cuda


def _arrays(cfg, dtype, seed, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["x_shape"]).astype(dtype)
    w = rng.standard_normal(cfg["w_shape"]).astype(dtype)
    b = rng.standard_normal(cfg["w_shape"][0]).astype(dtype) if bias else None
    return x, w, b


def _check(cfg, dtype, algorithm, seed=0, bias=True):
    x, w, b = _arrays(cfg, dtype, seed, bias)
    p = conv_params(cfg)
    check_op(
        lambda x, w, b: fc.conv2d(x, w, b, **p, backend="cuda", algorithm=algorithm),
        lambda x, w, b: reference.conv2d(x, w, b, **p),
        (x, w, b),
        grads=lambda gy, x, w, b: fc.conv2d_backward(
            gy, x, w, **p, backend="cuda", algorithm=algorithm
        ),
        expected_grads=lambda gy, x, w, b: reference.conv2d_backward(gy, x, w, **p),
    )


@pytest.mark.parametrize("algorithm", ALGOS)
@few(14)
@given(
    cfg=tiny_conv_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    bias=st.booleans(),
)
def test_conv2d_random(algorithm, cfg, dtype, seed, bias):
    _check(cfg, dtype, algorithm, seed, bias)


def _cfg(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1):
    return dict(
        x_shape=x_shape,
        w_shape=w_shape,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
    )


NAMED = {
    "batch1_odd": _cfg((1, 2, 5, 3), (3, 2, 3, 3), padding=1),
    "1x1": _cfg((2, 3, 3, 4), (2, 3, 1, 1)),
    "stride_gt_kernel": _cfg((1, 2, 7, 6), (2, 2, 2, 2), stride=(3, 4), padding=1),
    "dilation": _cfg((1, 1, 6, 7), (2, 1, 3, 2), padding=2, dilation=(2, 3)),
    "depthwise": _cfg((1, 3, 5, 5), (3, 1, 3, 3), padding=1, groups=3),
    "depthwise_multiplier": _cfg((1, 2, 5, 4), (4, 1, 3, 3), stride=2, padding=1, groups=2),
    "groups": _cfg((1, 4, 4, 4), (6, 2, 3, 3), padding=1, groups=2),
    "same_even_kernel": _cfg((1, 2, 5, 4), (2, 2, 4, 2), padding="same"),
    "same_dilated_even": _cfg((1, 1, 5, 6), (2, 1, 2, 3), padding="same", dilation=2),
    "valid_exact": _cfg((1, 2, 3, 3), (3, 2, 3, 3), padding="valid"),
    # more channels than one register block / staging step holds (KB, CC), several k tiles
    "many_channels": _cfg((1, 10, 3, 3), (9, 10, 2, 2), padding=1),
}
# Tiling paths of the direct kernels (the im2col path has no such tiles).
DIRECT_ONLY = {
    # wider and taller than one pixel tile: several spatial tiles per image
    "multi_tile": _cfg((1, 1, 9, 17), (2, 1, 3, 3), padding=1),
    # a kernel bigger than the shared-memory filter tile: staged in bands of taps
    "banded_kernel": _cfg((1, 1, 9, 8), (1, 1, 9, 8), padding=(4, 3)),
    # a patch bigger than the shared-memory input tile: smaller pixel tiles
    "big_dilation": _cfg((1, 1, 13, 12), (1, 1, 3, 3), padding=1, dilation=(6, 5)),
}


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("name", sorted(NAMED))
def test_conv2d_named(name, algorithm):
    _check(NAMED[name], np.float64, algorithm, seed=len(name))


@pytest.mark.parametrize("name", sorted(DIRECT_ONLY))
def test_conv2d_direct_tiling(name):
    from fastconv.kernels.cuda import launch

    cfg = DIRECT_ONLY[name]
    p = conv_params(cfg)
    g = shapes.conv2d_geometry(
        "t", cfg["x_shape"], cfg["w_shape"], p["stride"], p["padding"], p["dilation"], p["groups"]
    )
    tiles = [
        launch.direct_forward_tiles(g),
        launch.direct_backward_data_tiles(g),
        launch.direct_backward_filter_tiles(g),
    ]
    if name == "banded_kernel" and launch.TILE_SET == "small":
        assert all((t.KHB, t.KWB) != (g.KH, g.KW) for t in tiles)
    _check(cfg, np.float64, "direct", seed=len(name))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_conv2d_float32_named(algorithm):
    _check(NAMED["groups"], np.float32, algorithm, seed=3)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_lenet_conv1_shape(algorithm):
    """LeNet-5 conv1 geometry (1 -> 6, 5x5, padding 2) on a cropped 8x8 image."""
    _check(_cfg((1, 1, 8, 8), (6, 1, 5, 5), padding=2), np.float32, algorithm, seed=5)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_backward_masks(algorithm):
    """conv2d_backward_input / _weight (x or w absent) and output_mask."""
    cfg = NAMED["groups"]
    x, w, _ = _arrays(cfg, np.float64, 1)
    p = conv_params(cfg)
    gy = np.random.default_rng(2).standard_normal(reference.conv2d(x, w, None, **p).shape)
    gx_ref, gw_ref, gb_ref = reference.conv2d_backward(gy, x, w, **p)
    gx = fc.conv2d_backward_input(gy, x.shape, w, **p, backend="cuda", algorithm=algorithm)
    gw = fc.conv2d_backward_weight(gy, x, w.shape, **p, backend="cuda", algorithm=algorithm)
    assert_close(gx, gx_ref, what="grad_x")
    assert_close(gw, gw_ref, what="grad_w")
    got = fc.conv2d_backward(
        gy, x, w, **p, backend="cuda", algorithm=algorithm, output_mask=(False, False, True)
    )
    assert got[0] is None and got[1] is None
    assert_close(got[2], gb_ref, what="grad_b")


def test_saved_columns_are_reused():
    """The forward pass leaves its column matrix in ``saved``; backward reuses it."""
    from fastconv.kernels.cuda import ops

    cfg = NAMED["groups"]
    x, w, b = _arrays(cfg, np.float64, 8)
    p = conv_params(cfg)
    g = shapes.conv2d_geometry(
        "t", x.shape, w.shape, p["stride"], p["padding"], p["dilation"], p["groups"]
    )
    xd, wd, bd = to_device(x, w, b)
    saved = {}
    y = ops.conv2d(xd, wd, bd, g, "im2col", saved)
    cols = saved["cuda_cols"]
    gy = np.random.default_rng(9).standard_normal(g.y_shape)
    (gyd,) = to_device(gy)
    got = ops.conv2d_backward(gyd, xd, wd, g, "im2col", (True, True, True), saved)
    assert saved["cuda_cols"] is cols
    assert_close(y, reference.conv2d(x, w, b, **p))
    for a, e in zip(got, reference.conv2d_backward(gy, x, w, **p)):
        assert_close(a, e)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_bias_relu(algorithm, dtype):
    from fastconv.kernels.cuda import ops

    cfg = NAMED["batch1_odd"]
    x, w, b = _arrays(cfg, dtype, 7)
    p = conv_params(cfg)
    g = shapes.conv2d_geometry(
        "t", x.shape, w.shape, p["stride"], p["padding"], p["dilation"], p["groups"]
    )
    y = ops.conv2d_bias_relu(x, w, b, g, algorithm)
    assert_close(y, reference.relu(reference.conv2d(x, w, b, **p)))


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [True, False])
def test_fused_pool(algorithm, dtype, relu):
    """Fused conv + bias (+ ReLU) + max-pool against the oracle's three ops, gradients from the
    pooled gradient. With ReLU: the op ``fc.conv2d_relu_maxpool``, its gradients from the tape;
    without: the kernels' ``conv2d_pool`` / ``conv2d_pool_backward`` and their saved dict.
    Host arrays in, host arrays out; on device arrays, the output and gradients stay there."""
    from fastconv.kernels.cuda import ops

    cfg = NAMED["batch1_odd"]  # 5x3 output: floor mode drops the last row and column
    x, w, b = _arrays(cfg, dtype, 8)
    p = conv_params(cfg)
    g = shapes.conv2d_geometry(
        "t", x.shape, w.shape, p["stride"], p["padding"], p["dilation"], p["groups"]
    )
    pg = shapes.pool2d_geometry("t", g.y_shape, (2, 2))
    z = reference.conv2d(x, w, b, **p)
    z = np.maximum(z, 0) if relu else z
    gy = np.random.default_rng(1).standard_normal((1, 3, 2, 1)).astype(dtype)
    gz = reference.max_pool2d_backward(gy, z, 2)
    expected = reference.conv2d_backward(np.where(z > 0, gz, 0) if relu else gz, x, w, **p)
    for xs in ((x, w, b), to_device(x, w, b)):
        on_device = xs[0] is not x
        gyd = to_device(gy)[0] if on_device else gy
        if relu:
            ts = [fc.Tensor(a, requires_grad=True) for a in xs]
            y = fc.conv2d_relu_maxpool(*ts, **p, pool=2, backend="cuda", algorithm=algorithm)
            assert y.grad_fn == "conv2d_relu_maxpool"
            y.backward(gyd)
            y, got = y.data, [t.grad for t in ts]
        else:
            saved = {}
            y = ops.conv2d_pool(*xs, g, pg, False, algorithm, saved)
            got = ops.conv2d_pool_backward(
                gyd, xs[0], xs[1], g, pg, False, algorithm, (True, True, True), saved
            )
        assert is_numba_device(y) == on_device
        assert_close(y, reference.max_pool2d(z, 2))
        assert all(is_numba_device(a) for a in got) == on_device
        for a, e in zip(got, expected):
            assert_close(a, e, dtype)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_device_arrays_in_device_arrays_out(algorithm):
    """Device inputs stay on the device (numba device arrays out), auto picks cuda."""
    cfg = NAMED["depthwise_multiplier"]
    x, w, b = _arrays(cfg, np.float32, 4)
    p = conv_params(cfg)
    xd, wd, bd = to_device(x, w, b)
    y = fc.conv2d(xd, wd, bd, **p, algorithm=algorithm)  # backend="auto"
    assert is_numba_device(y)
    assert_close(y, reference.conv2d(x, w, b, **p))
    gy = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    (gyd,) = to_device(gy)
    got = fc.conv2d_backward(gyd, xd, wd, **p, algorithm=algorithm)
    assert all(is_numba_device(a) for a in got)
    for a, e in zip(got, reference.conv2d_backward(gy, x, w, **p)):
        assert_close(a, e)


def test_foreign_cuda_array_interface_zero_copy():
    """Objects exposing only __cuda_array_interface__ (CuPy, PyTorch) are used in place."""
    from fastconv.kernels.cuda import ops

    cfg = NAMED["batch1_odd"]
    x, w, b = _arrays(cfg, np.float64, 9)
    xd, wd, bd = to_device(x, w, b)
    fx, fw, fb = Foreign(xd), Foreign(wd), Foreign(bd)
    y = fc.conv2d(fx, fw, fb, padding=1, backend="cuda", algorithm="direct")
    assert_close(y, reference.conv2d(x, w, b, padding=1))
    # zero-copy: a write through the foreign object is seen by the backend
    d = ops.to_device(fx)
    assert d.__cuda_array_interface__["data"][0] == fx.__cuda_array_interface__["data"][0]


@pytest.mark.parametrize("algorithm", ALGOS)
def test_non_contiguous_device_inputs(algorithm):
    cfg = NAMED["1x1"]
    x, w, b = _arrays(cfg, np.float64, 11)
    big = np.zeros(x.shape[:3] + (2 * x.shape[3],))
    big[..., ::2] = x
    (bigd,) = to_device(big)
    xd = bigd[..., ::2]  # a strided view on the device
    assert not xd.is_c_contiguous()
    wd, bd = to_device(w, b)
    y = fc.conv2d(xd, wd, bd, backend="cuda", algorithm=algorithm)
    assert_close(y, reference.conv2d(x, w, b))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_backward_is_bitwise_deterministic(algorithm):
    """Same inputs, same bits: no atomics, fixed reduction order (split reductions included)."""
    cfg = _cfg((3, 2, 5, 5), (3, 2, 3, 3), padding=1)  # split reductions on the simulator
    x, w, _ = _arrays(cfg, np.float32, 13)
    gy = np.random.default_rng(14).standard_normal((3, 3, 5, 5)).astype(np.float32)
    xd, wd, gyd = to_device(x, w, gy)
    runs = [
        [to_host(a) for a in fc.conv2d_backward(gyd, xd, wd, padding=1, algorithm=algorithm)]
        for _ in range(2)
    ]
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("algorithm", ALGOS)
def test_conv_transpose2d_device_bias(algorithm):
    x = np.random.default_rng(3).standard_normal((1, 2, 3, 3))
    w = np.random.default_rng(4).standard_normal((2, 3, 2, 2))
    b = np.random.default_rng(5).standard_normal(3)
    expected = fc.conv_transpose2d(x, w, b, stride=2, backend="reference")
    xd, wd, bd = to_device(x, w, b)
    y = fc.conv_transpose2d(xd, wd, bd, stride=2, algorithm=algorithm)
    assert is_numba_device(y)
    assert_close(y, expected)


@pytest.mark.hardware
@pytest.mark.parametrize("algorithm", ALGOS)
def test_backward_deterministic_mnist_scale(algorithm):
    """Real thread scheduling, MNIST-scale shapes: still bit-identical run after run."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6, 14, 14)).astype(np.float32)
    w = rng.standard_normal((16, 6, 5, 5)).astype(np.float32)
    gy = rng.standard_normal((64, 16, 10, 10)).astype(np.float32)
    xd, wd, gyd = to_device(x, w, gy)
    first = [to_host(a) for a in fc.conv2d_backward(gyd, xd, wd, algorithm=algorithm)]
    for _ in range(5):
        again = [to_host(a) for a in fc.conv2d_backward(gyd, xd, wd, algorithm=algorithm)]
        for a, b in zip(first, again):
            assert a.tobytes() == b.tobytes()
