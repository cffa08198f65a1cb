"""Every CPU convolution algorithm against the oracle: random configurations and named edges."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import dispatch, reference, shapes
from tests.helpers import DTYPES, assert_close, check_op
from tests.strategies import arrays, conv_configs

ALGOS = ("im2col", "direct")


@pytest.fixture(autouse=True, scope="module", params=["native-gemm", "python-threads"])
def always_parallel(request):
    """Small calls run on one thread (threads.SERIAL_BELOW, POOL_BELOW); the configurations
    here are small, so make every call take the multi-threaded path, the one where a race
    would show, and cut batches into chunks of up to 2 images (N=3: a full and a partial one).
    Every test runs twice: im2col chunks in one prange loop calling BLAS from Numba (where
    NumPy's BLAS allows it), and the Python-thread path used otherwise."""
    from fastconv.kernels.cpu import blas, ops, threads

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threads, "SERIAL_BELOW", 0)
        mp.setattr(threads, "POOL_BELOW", 0)
        mp.setattr(ops, "MIN_CHUNKS", 2)
        if request.param == "python-threads":
            mp.setattr(blas, "_found", False)
        elif not blas.available():
            pytest.skip("NumPy's BLAS has no 64-bit-integer CBLAS entry point here")
        yield


def _params(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def _check(cfg, dtype, algorithm, seed=0, with_bias=True):
    rng = np.random.default_rng(seed)
    x, w, b = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    b = b if with_bias else None
    p = _params(cfg)
    check_op(
        lambda x, w, b: fc.conv2d(x, w, b, **p, backend="cpu", algorithm=algorithm),
        lambda x, w, b: reference.conv2d(x, w, b, **p),
        (x, w, b),
        grads=lambda gy, x, w, b: fc.conv2d_backward(
            gy, x, w, **p, backend="cpu", algorithm=algorithm
        ),
        expected_grads=lambda gy, x, w, b: reference.conv2d_backward(gy, x, w, **p),
    )


@pytest.mark.parametrize("algorithm", ALGOS)
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_conv2d_random(algorithm, cfg, dtype, seed):
    _check(cfg, dtype, algorithm, seed)


def tape_grads(op, gy, *arrays, **kw):
    """Gradients of ``op`` through the tape: the inputs wrapped as Tensors that require a
    gradient (None stays None), one ``backward(gy)``, then each input's ``.grad``."""
    ts = [None if a is None else fc.Tensor(a, requires_grad=True) for a in arrays]
    y = op(*ts, **kw)
    assert isinstance(y, fc.Tensor) and y.grad_fn == op.__name__
    y.backward(gy)
    return tuple(None if t is None else t.grad for t in ts)


@pytest.mark.parametrize("algorithm", ALGOS)
@given(cfg=conv_configs(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_conv2d_fused_relu_random(algorithm, cfg, dtype, seed):
    """conv2d_relu: the fused epilogue equals relu of the oracle's convolution, and the
    gradient through it (on the tape; and explicitly: relu_backward from the output, then
    conv2d_backward) the oracle's."""
    rng = np.random.default_rng(seed)
    x, w, b = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    p = _params(cfg)
    kw = dict(**p, backend="cpu", algorithm=algorithm)

    def fused_grads(gy, x, w, b):
        y = fc.conv2d_relu(x, w, b, **kw)
        gz = fc.relu_backward(gy, y)
        explicit = fc.conv2d_backward(gz, x, w, **kw)
        return tape_grads(fc.conv2d_relu, gy, x, w, b, **kw) + explicit

    def expected_grads(gy, x, w, b):
        z = reference.conv2d(x, w, b, **p)
        return reference.conv2d_backward(np.where(z > 0, gy, 0), x, w, **p) * 2

    check_op(
        lambda x, w, b: fc.conv2d_relu(x, w, b, **kw),
        lambda x, w, b: np.maximum(reference.conv2d(x, w, b, **p), 0),
        (x, w, b),
        grads=fused_grads,
        expected_grads=expected_grads,
    )


@pytest.mark.parametrize("algorithm", ALGOS)
def test_conv2d_fused_relu_keeps_nan(algorithm):
    x = np.ones((1, 1, 5, 5))
    x[0, 0, 0, 0] = np.nan  # only output (0, 0)'s window covers it
    w = -np.ones((2, 1, 3, 3))
    y = fc.conv2d_relu(x, w, np.zeros(2), backend="cpu", algorithm=algorithm)
    assert np.isnan(y[0, :, 0, 0]).all()
    y[0, :, 0, 0] = 0
    assert (y == 0).all()  # -9 everywhere else, cut to 0


def _pool_oracle(x, w, b, p, k):
    """(pooled output, full activation output) of the oracle's conv + ReLU + max pooling."""
    z = np.maximum(reference.conv2d(x, w, b, **p), 0)
    return reference.max_pool2d(z, k), z


def _check_pool(x, w, b, p, k, algorithm, backend="cpu"):
    kw = dict(**p, pool=k, backend=backend, algorithm=algorithm)

    def expected_grads(gy, x, w, b):
        _, z = _pool_oracle(x, w, b, p, k)
        gz = reference.max_pool2d_backward(gy, z, k)
        return reference.conv2d_backward(np.where(z > 0, gz, 0), x, w, **p)

    check_op(
        lambda x, w, b: fc.conv2d_relu_maxpool(x, w, b, **kw),
        lambda x, w, b: _pool_oracle(x, w, b, p, k)[0],
        (x, w, b),
        grads=lambda gy, x, w, b: tape_grads(fc.conv2d_relu_maxpool, gy, x, w, b, **kw),
        expected_grads=expected_grads,
    )


@pytest.mark.parametrize("algorithm", ALGOS)
@given(
    cfg=conv_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_conv2d_fused_pool_random(algorithm, cfg, dtype, seed, k):
    """conv2d_relu_maxpool(pool=k): the fused conv + bias + ReLU + max-pool equals the oracle's
    three ops, and its backward on the tape (from the pooled gradient and what the op's
    context kept: the pooled output and each window's argmax) their gradients."""
    rng = np.random.default_rng(seed)
    x, w, b = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    p = _params(cfg)
    g = shapes.conv2d_geometry("test", x.shape, w.shape, **p)
    k = (min(k[0], g.OH), min(k[1], g.OW))
    _check_pool(x, w, b, p, k, algorithm)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_fused_pool_lenet_shapes(algorithm, dtype):
    """LeNet-5's two conv + ReLU + 2x2 pool stages, batch 5 (chunks of 2, 2 and 1 images)."""
    rng = np.random.default_rng(3)
    for xs, ws, pad in [((5, 1, 28, 28), (6, 1, 5, 5), 2), ((5, 6, 14, 14), (16, 6, 5, 5), 0)]:
        x, w, b = arrays(rng, dtype, xs, ws, (ws[0],))
        _check_pool(x, w, b, {"padding": pad}, 2, algorithm)


def _remember_pair(mp, pair, tmp):
    """Make the autotuner remember ``pair`` (grad_x by one algorithm, grad_w and grad_b by
    the other) for every backward pass asked for grad_x and grad_w, as a cache entry would:
    the tape's ``algorithm="auto"`` then runs the pair."""
    from fastconv import autotune

    mp.setenv("FASTCONV_CACHE_DIR", str(tmp))
    mp.setenv("FASTCONV_AUTOTUNE", "1")
    real = autotune.lookup
    mp.setattr(autotune, "lookup", lambda k: pair if "conv2d_backward(True, True" in k else real(k))


@pytest.mark.parametrize("pair", dispatch.PAIRS)
@given(
    cfg=conv_configs(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
)
def test_backward_pairs_on_the_tape(pair, cfg, dtype, seed, k, tmp_path_factory):
    """A tuned pair of algorithms (dispatch.PAIRS) on the tape: conv2d's and the fused
    conv + ReLU + max-pool's gradients the oracle's, with grad_x from one algorithm and
    grad_w, grad_b from the other."""
    from fastconv.kernels.cpu import ops as cpu_ops

    rng = np.random.default_rng(seed)
    x, w, b = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    p = _params(cfg)
    g = shapes.conv2d_geometry("test", x.shape, w.shape, **p)
    k = (min(k[0], g.OH), min(k[1], g.OW))
    ran = []
    real_split = cpu_ops._split_backward

    def spy(backward, algorithm, *args):
        ran.append(algorithm)
        return real_split(backward, algorithm, *args)

    with pytest.MonkeyPatch.context() as mp:
        _remember_pair(mp, pair, tmp_path_factory.mktemp("tune"))
        mp.setattr(cpu_ops, "_split_backward", spy)
        kw = dict(**p, backend="cpu", algorithm="auto")
        check_op(
            lambda x, w, b: fc.conv2d(x, w, b, **kw),
            lambda x, w, b: reference.conv2d(x, w, b, **p),
            (x, w, b),
            grads=lambda gy, x, w, b: tape_grads(fc.conv2d, gy, x, w, b, **kw),
            expected_grads=lambda gy, x, w, b: reference.conv2d_backward(gy, x, w, **p),
        )
        _check_pool(x, w, b, p, k, "auto")
    assert ran == [pair, pair]  # each backward ran the pair


@pytest.mark.parametrize("algorithm", ALGOS)
def test_conv2d_fused_pool_ties_and_nan(algorithm):
    """Windows whose pre-activations are all negative pool to 0 and pass no gradient (ReLU's
    backward gives 0 where the output is 0); a NaN wins its window and passes no gradient."""
    x = -np.ones((1, 1, 4, 4))
    x[0, 0, 0, 0] = np.nan
    x[0, 0, 3, 3] = 2.0
    w = np.ones((1, 1, 1, 1))
    xt, wt, bt = (fc.Tensor(a, requires_grad=True) for a in (x, w, np.zeros(1)))
    y = fc.conv2d_relu_maxpool(xt, wt, bt, pool=2, backend="cpu", algorithm=algorithm)
    yv = y.numpy()
    assert np.isnan(yv[0, 0, 0, 0])
    np.testing.assert_array_equal(yv[0, 0].ravel()[1:], [0.0, 0.0, 2.0])
    y.backward(np.ones((1, 1, 2, 2)))
    expected = np.zeros((1, 1, 4, 4))
    expected[0, 0, 3, 3] = 1.0
    np.testing.assert_array_equal(xt.grad, expected)
    np.testing.assert_array_equal(bt.grad, [1.0])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 in grad_w, as NumPy
@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_fused_pool_special_values(algorithm, dtype):
    """2x2 windows of every mix of NaN, +-inf, signed zeros, ties and numbers (an identity 1x1
    convolution, so the pooled values are the input's): the fused op's output equals the
    oracle's relu + max_pool2d bit for bit (which NaN, which zero), and its gradient goes to
    the window's first maximum where that maximum is > 0."""
    rng = np.random.default_rng(11)
    special = np.array([np.nan, -np.inf, -1.5, -0.0, 0.0, 2.0, 2.0, np.inf])
    x = rng.choice(special, size=(2, 1, 6, 40)).astype(dtype)
    w = np.ones((1, 1, 1, 1), dtype)
    b = np.zeros(1, dtype)
    xt, wt, bt = (fc.Tensor(a, requires_grad=True) for a in (x, w, b))
    y = fc.conv2d_relu_maxpool(xt, wt, bt, pool=2, backend="cpu", algorithm=algorithm)
    z = reference.relu(x.astype(np.float64))
    want = reference.max_pool2d(z, 2)
    assert y.numpy().dtype == dtype
    np.testing.assert_array_equal(np.isnan(y.numpy()), np.isnan(want))
    same = ~np.isnan(want)
    np.testing.assert_array_equal(y.numpy()[same], want[same].astype(dtype))
    np.testing.assert_array_equal(np.signbit(y.numpy()[same]), np.signbit(want[same]))
    gy = rng.standard_normal(y.shape)
    y.backward(gy.astype(dtype))
    gz = reference.max_pool2d_backward(gy, z, 2)
    expected = np.where(z > 0, gz, 0.0)
    np.testing.assert_array_equal(xt.grad, expected.astype(dtype))


def test_conv2d_fused_pool_reference_backend():
    """The oracle backend runs the fused op as its three ops, its backward from the op's
    context included."""
    rng = np.random.default_rng(4)
    x, w, b = arrays(rng, np.float64, (2, 2, 7, 7), (3, 2, 3, 3), (3,))
    _check_pool(x, w, b, {"padding": 1}, 2, "auto", backend="reference")


NAMED = {
    "lenet_conv1": dict(
        x_shape=(2, 1, 28, 28), w_shape=(6, 1, 5, 5), stride=1, padding=2, dilation=1, groups=1
    ),
    "batch1_odd": dict(
        x_shape=(1, 3, 7, 5), w_shape=(5, 3, 3, 3), stride=1, padding=0, dilation=1, groups=1
    ),
    "1x1": dict(
        x_shape=(2, 4, 5, 6), w_shape=(3, 4, 1, 1), stride=1, padding=0, dilation=1, groups=1
    ),
    "1x1_groups": dict(  # pointwise, grouped (im2col_gemm.conv2d_pointwise's group offsets)
        x_shape=(5, 6, 3, 4), w_shape=(4, 3, 1, 1), stride=1, padding=0, dilation=1, groups=2
    ),
    "1x1_dilated": dict(  # dilation changes nothing for a 1x1 kernel: still pointwise
        x_shape=(3, 9, 4, 4), w_shape=(5, 9, 1, 1), stride=1, padding=0, dilation=2, groups=1
    ),
    "non_square": dict(
        x_shape=(2, 2, 9, 7),
        w_shape=(3, 2, 2, 5),
        stride=(1, 2),
        padding=(1, 2),
        dilation=1,
        groups=1,
    ),
    "stride_gt_kernel": dict(
        x_shape=(2, 2, 11, 10), w_shape=(3, 2, 2, 2), stride=(4, 3), padding=1, dilation=1, groups=1
    ),
    "dilation": dict(
        x_shape=(1, 2, 10, 12), w_shape=(2, 2, 3, 3), stride=1, padding=2, dilation=(2, 3), groups=1
    ),
    "depthwise": dict(
        x_shape=(2, 6, 8, 8), w_shape=(6, 1, 3, 3), stride=1, padding=1, dilation=1, groups=6
    ),
    "depthwise_multiplier": dict(
        x_shape=(1, 3, 6, 6), w_shape=(6, 1, 3, 3), stride=2, padding=1, dilation=1, groups=3
    ),
    "groups": dict(
        x_shape=(2, 6, 7, 7), w_shape=(4, 3, 3, 3), stride=1, padding=1, dilation=1, groups=2
    ),
    "same_even_kernel": dict(
        x_shape=(1, 2, 6, 7), w_shape=(3, 2, 4, 2), stride=1, padding="same", dilation=1, groups=1
    ),
    "same_dilated": dict(
        x_shape=(1, 2, 6, 7),
        w_shape=(3, 2, 3, 2),
        stride=1,
        padding="same",
        dilation=(2, 3),
        groups=1,
    ),
    "valid": dict(
        x_shape=(2, 3, 6, 6), w_shape=(2, 3, 3, 3), stride=1, padding="valid", dilation=1, groups=1
    ),
    "kernel_equals_padded_input": dict(
        x_shape=(1, 1, 3, 3), w_shape=(1, 1, 5, 5), stride=1, padding=1, dilation=1, groups=1
    ),
    "long_reduction": dict(  # N*OH*OW > 2 * ops.GEMM_CHUNK: the blocked grad_w GEMM
        x_shape=(12, 2, 28, 28), w_shape=(3, 2, 3, 3), stride=1, padding=1, dilation=1, groups=1
    ),
    "padding_larger_than_kernel": dict(
        x_shape=(1, 1, 4, 4), w_shape=(2, 1, 2, 2), stride=2, padding=3, dilation=1, groups=1
    ),
}


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(NAMED))
def test_conv2d_named(name, dtype, algorithm):
    _check(NAMED[name], dtype, algorithm)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_conv2d_no_bias(algorithm):
    _check(NAMED["groups"], np.float64, algorithm, with_bias=False)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_input_and_weight_alone(algorithm, dtype):
    cfg = NAMED["non_square"]
    p = _params(cfg)
    rng = np.random.default_rng(3)
    x, w = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"])
    gy = rng.standard_normal(reference.conv2d(x, w, **p).shape).astype(dtype)
    gx_ref, gw_ref, _ = reference.conv2d_backward(gy, x, w, **p)
    kw = dict(**p, backend="cpu", algorithm=algorithm)
    assert_close(fc.conv2d_backward_input(gy, x.shape, w, **kw), gx_ref, dtype)
    assert_close(fc.conv2d_backward_weight(gy, x, w.shape, **kw), gw_ref, dtype)
    gx, gw, gb = fc.conv2d_backward(gy, x, w, **kw, output_mask=(False, True, False))
    assert gx is None and gb is None
    assert_close(gw, gw_ref, dtype)


@pytest.mark.parametrize(
    "backend",
    [
        "cpu",
        "reference",
    ],
)
def test_conv_transpose2d_matches_torch_definition(backend):
    """conv_transpose2d is the adjoint of conv2d: <conv(a), b> == <a, conv_t(b)>, and its output
    size follows PyTorch's formula; its backward matches finite-free adjoint identities."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 4, 5, 6))  # (N, C_in, H, W) of the transposed conv
    w = rng.standard_normal((4, 3, 3, 2))  # (C_in, C_out/groups, KH, KW), groups=1
    b = rng.standard_normal(3)
    p = dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=1, dilation=(1, 2))
    y = fc.conv_transpose2d(x, w, b, **p, backend=backend)
    assert y.shape == (2, 3, (5 - 1) * 2 - 2 + 2 + 1 + 1, (6 - 1) * 3 - 0 + 2 * 1 + 2 + 1)
    z = rng.standard_normal(y.shape)
    conv = dict(stride=(2, 3), padding=(1, 0), dilation=(1, 2), groups=1)
    lhs = np.sum(reference.conv2d(z, w, **conv) * x)  # <conv(z), x>
    rhs = np.sum((y - b[None, :, None, None]) * z)  # <z, conv_t(x)>
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10)
    gy = rng.standard_normal(y.shape)
    gx, gw, gb = fc.conv_transpose2d_backward(gy, x, w, **p, backend=backend)
    assert_close(gx, reference.conv2d(gy, w, **conv))
    assert_close(gw, reference.conv2d_backward(x, gy, w, **conv)[1])
    assert_close(gb, gy.sum((0, 2, 3)))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_non_contiguous_and_byteswapped_inputs(algorithm):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 9, 16))[:, :, :, ::2]  # non-contiguous view
    w = rng.standard_normal((4, 3, 3, 3)).astype(">f8")  # big-endian
    y = fc.conv2d(x, w, padding=1, backend="cpu", algorithm=algorithm)
    assert y.dtype == np.float64 and y.dtype.isnative
    assert_close(y, reference.conv2d(np.ascontiguousarray(x), w.astype("<f8"), padding=1))
    xt = rng.standard_normal((2, 9, 8, 3)).transpose(0, 3, 1, 2)  # NHWC memory viewed as NCHW
    assert_close(fc.conv2d(xt, w, backend="cpu", algorithm=algorithm), reference.conv2d(xt, w))


@pytest.mark.parametrize("algorithm", ALGOS)
def test_nan_and_inf_propagate(algorithm):
    x = np.ones((1, 1, 5, 5))
    x[0, 0, 2, 2] = np.nan
    x[0, 0, 0, 0] = np.inf
    w = np.ones((1, 1, 3, 3))
    y = fc.conv2d(x, w, backend="cpu", algorithm=algorithm)
    y_ref = reference.conv2d(x, w)
    assert np.isnan(y).all() and np.isnan(y_ref).all()  # every 3x3 window sees the centre NaN
    y2 = fc.conv2d(x[:, :, :2, :], w[:, :, :2, :], backend="cpu", algorithm=algorithm)
    assert np.isinf(y2[0, 0, 0, 0]) and np.isfinite(y2[0, 0, 0, 1:]).all()


def test_inputs_are_not_modified():
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((3, 2, 3, 3))
    x0, w0 = x.copy(), w.copy()
    for algorithm in ALGOS:
        y = fc.conv2d(x, w, padding=1, backend="cpu", algorithm=algorithm)
        fc.conv2d_backward(np.ones_like(y), x, w, padding=1, backend="cpu", algorithm=algorithm)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_backward_is_deterministic(algorithm):
    rng = np.random.default_rng(7)
    x, w = (
        rng.standard_normal((4, 6, 12, 12)).astype(np.float32),
        rng.standard_normal((8, 6, 3, 3)).astype(np.float32),
    )
    gy = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    runs = [
        fc.conv2d_backward(gy, x, w, padding=1, backend="cpu", algorithm=algorithm)
        for _ in range(3)
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a, b)


def test_auto_matches_oracle():
    rng = np.random.default_rng(8)
    for cfg in NAMED.values():
        x, w = arrays(rng, np.float64, cfg["x_shape"], cfg["w_shape"])
        assert_close(fc.conv2d(x, w, **_params(cfg)), reference.conv2d(x, w, **_params(cfg)))


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_columns_reused_only_for_the_same_input(algorithm, dtype):
    """Recorded on the tape, the forward pass may leave its im2col matrix in the op's context
    for the backward pass; reused only for the very same x object, and the gradients stay the
    oracle's."""
    cfg = NAMED["groups"]
    p = _params(cfg)
    rng = np.random.default_rng(9)
    x, w, b = arrays(rng, dtype, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    kw = dict(**p, backend="cpu", algorithm=algorithm)
    ts = [fc.Tensor(a, requires_grad=True) for a in (x, w, b)]
    y = fc.conv2d(*ts, **kw)
    assert_close(y.numpy(), reference.conv2d(x, w, b, **p), dtype)
    node = y._node
    saved = node.ctx.scratch  # what the kernel kept for this call's backward
    if algorithm == "im2col":
        assert saved["x"] is x and "cols" in saved
    gy = rng.standard_normal(y.shape).astype(dtype)
    for _ in range(2):  # twice: the kept buffer is reused, not consumed
        for t in ts:
            t.grad = None
        y.backward(gy, retain_graph=True)
        for t, e in zip(ts, reference.conv2d_backward(gy, x, w, **p)):
            assert_close(t.grad, e, dtype)
    # the recorded backward given another input: must not use x's columns
    x2 = rng.standard_normal(x.shape).astype(dtype)
    got = node.backward(gy, node.ctx._replace(x=x2), node.needs)
    assert_close(got[1], reference.conv2d_backward(gy, x2, w, **p)[1], dtype)
    if algorithm == "im2col":  # x2's columns were built apart; x's stay kept for x
        assert saved["x"] is x
        got = node.backward(gy, node.ctx, node.needs)
        assert_close(got[1], reference.conv2d_backward(gy, x, w, **p)[1], dtype)


def test_serial_path_for_small_calls_matches():
    """With the default threshold this call runs on one thread; same answer as the oracle."""
    from fastconv.kernels.cpu import threads

    cfg = NAMED["batch1_odd"]
    g = fc.shapes.conv2d_geometry("t", cfg["x_shape"], cfg["w_shape"])
    assert g.flops() // 2 < 1 << 16
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threads, "SERIAL_BELOW", 1 << 16)
        mp.setattr(threads, "POOL_BELOW", 1 << 20)
        for algorithm in ALGOS:
            _check(cfg, np.float64, algorithm)


def test_columns_too_big_to_keep_are_rebuilt(monkeypatch):
    """Above ops.KEEP_COLS_MAX_BYTES the forward pass keeps no columns; the backward pass
    rebuilds them chunk by chunk and the gradients stay the oracle's."""
    from fastconv.kernels.cpu import ops

    monkeypatch.setattr(ops, "KEEP_COLS_MAX_BYTES", 0)
    cfg = NAMED["groups"]
    p = _params(cfg)
    rng = np.random.default_rng(10)
    x, w, b = arrays(rng, np.float64, cfg["x_shape"], cfg["w_shape"], (cfg["w_shape"][0],))
    ts = [fc.Tensor(a, requires_grad=True) for a in (x, w, b)]
    y = fc.conv2d(*ts, **p, backend="cpu", algorithm="im2col")
    assert "x" not in y._node.ctx.scratch
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    for t, e in zip(ts, reference.conv2d_backward(gy, x, w, **p)):
        assert_close(t.grad, e, np.float64)


def test_kept_columns_buffer_is_reused_across_steps():
    """Given the same dict again, the CPU kernel's next forward pass of the same shape writes
    its columns into the buffer it kept last time."""
    from fastconv.kernels.cpu import ops

    rng = np.random.default_rng(11)
    x, w = arrays(rng, np.float64, (2, 3, 6, 6), (4, 3, 3, 3))
    g = shapes.conv2d_geometry("test", x.shape, w.shape)
    saved = {}
    ops.conv2d(x, w, None, g, "im2col", saved)
    first = saved["cols"]
    x2 = rng.standard_normal(x.shape)
    y2 = ops.conv2d(x2, w, None, g, "im2col", saved)
    assert saved["cols"] is first and saved["x"] is x2
    assert_close(y2, reference.conv2d(x2, w))


def test_layer_reuses_its_kept_columns_across_steps():
    """A layer's next step of the same shape writes its columns into the same buffer once
    the last step's backward has run (fresh megabyte buffers cost a page fault per 4 KiB
    every step); while that graph is alive, its buffer is not touched."""
    rng = np.random.default_rng(11)
    conv = fc.Conv2d(3, 4, 3, dtype=np.float64, backend="cpu", algorithm="im2col")
    x = fc.Tensor(rng.standard_normal((2, 3, 6, 6)))
    y = conv(x)
    first = y._node.ctx.scratch["cols"]
    x2 = fc.Tensor(rng.standard_normal((2, 3, 6, 6)))
    assert conv(x2)._node.ctx.scratch["cols"] is not first  # y's graph still needs it
    y.sum().backward()  # the step ends: its buffers are handed back
    y3 = conv(x2)
    assert y3._node.ctx.scratch["cols"] is first
    y3.sum().backward()
    w = conv.weight.data
    gw = reference.conv2d_backward(np.ones(y.shape), x.data, w)[1]
    gw3 = reference.conv2d_backward(np.ones(y3.shape), x2.data, w)[1]
    assert_close(conv.weight.grad, gw + gw3, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_channel_sums_match_the_oracle(dtype):
    """The direct backward's grad_b (``channel_sums``: float64 sums per channel, on Numba's
    threads above SERIAL_BELOW elements) against the oracle's, on both sides of the threshold,
    with the same bits on one thread and on all; plus the conv2d backward that uses it."""
    import numba

    from fastconv.kernels.cpu import nn

    rng = np.random.default_rng(11)
    for shape in ((1, 3, 5, 7), (64, 32, 26, 26), (3, 17, 41, 43), (2, 1, 1, 70_000)):
        x = rng.standard_normal(shape).astype(dtype)
        got = nn.channel_sums(x)
        assert_close(got, x.astype(np.float64).sum(axis=(0, 2, 3)), dtype, "channel sums")
        n = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            one = nn.channel_sums(x)
        finally:
            numba.set_num_threads(n)
        np.testing.assert_array_equal(one, got)
    x = rng.standard_normal((16, 3, 20, 20)).astype(dtype)
    w = rng.standard_normal((8, 3, 3, 3)).astype(dtype)
    gy = rng.standard_normal((16, 8, 18, 18)).astype(dtype)
    _, _, gb = fc.conv2d_backward(gy, x, w, algorithm="direct")
    _, _, rb = reference.conv2d_backward(gy, x, w)
    assert_close(gb, rb, dtype, "grad_b")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_gemm_path_matches_the_oracle(dtype, monkeypatch):
    """1x1 convolutions at stride 1 without padding take the per-image GEMM kernels on the
    im2col path (no columns): forward with bias, without, with the fused ReLU (NaN kept),
    every gradient alone and together, several images per chunk (grad_w summed over them),
    groups; each against the oracle, and each call seen to run those kernels."""
    from fastconv.kernels.cpu import blas, im2col_gemm

    if not blas._found:
        pytest.skip("the pointwise kernels are the native-GEMM path's")
    seen = []
    for name in ("conv2d_pointwise", "conv2d_pointwise_backward"):
        kernel = getattr(im2col_gemm, name)
        monkeypatch.setattr(
            im2col_gemm, name, lambda *a, _k=kernel, _n=name: (seen.append(_n), _k(*a))[1]
        )
    rng = np.random.default_rng(7)
    kw = dict(backend="cpu", algorithm="im2col")
    cases = (((7, 12, 5, 3), (8, 12, 1, 1), 1), ((3, 8, 4, 4), (6, 4, 1, 1), 2))
    for x_shape, w_shape, groups in cases:
        x, w, b = arrays(rng, dtype, x_shape, w_shape, (w_shape[0],))
        p = dict(groups=groups)
        z = reference.conv2d(x, w, b, **p)
        assert_close(fc.conv2d(x, w, b, **p, **kw), z, dtype)
        assert_close(fc.conv2d(x, w, None, **p, **kw), reference.conv2d(x, w, None, **p), dtype)
        assert_close(fc.conv2d_relu(x, w, b, **p, **kw), np.maximum(z, 0), dtype)
        gy = rng.standard_normal(z.shape).astype(dtype)
        ref = reference.conv2d_backward(gy, x, w, **p)
        for mask in ((True, True, True), (True, False, False), (False, True, False),
                     (False, False, True), (False, True, True)):  # fmt: skip
            got = fc.conv2d_backward(gy, x, w, **p, **kw, output_mask=mask)
            for want, g, r in zip(mask, got, ref):
                assert (g is None) == (not want)
                if want:
                    assert_close(g, r, dtype)
    xn = np.ones((2, 3, 2, 2), dtype)
    xn[1, 0, 1, 1] = np.nan
    y = fc.conv2d_relu(xn, -np.ones((4, 3, 1, 1), dtype), np.zeros(4, dtype), **kw)
    assert np.isnan(y[1, :, 1, 1]).all()
    y[1, :, 1, 1] = 0
    assert (y == 0).all()
    assert "conv2d_pointwise" in seen and "conv2d_pointwise_backward" in seen


@pytest.mark.parametrize("algorithm", ALGOS)
@given(
    n=st.integers(1, 5),
    groups=st.sampled_from([1, 1, 2, 3]),
    cg=st.integers(1, 9),
    kg=st.integers(1, 9),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    dilation=st.integers(1, 2),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_pointwise_random(algorithm, n, groups, cg, kg, h, w, dilation, dtype, seed):
    """Random 1x1 convolutions at stride 1 without padding against the oracle, forward and
    every gradient: "im2col" runs them on the per-image GEMM kernels (native-GEMM param) or
    the im2col copy (Python-thread param), "direct" on the register tiles."""
    cfg = dict(
        x_shape=(n, groups * cg, h, w), w_shape=(groups * kg, cg, 1, 1), stride=1, padding=0,
        dilation=dilation, groups=groups,
    )  # fmt: skip
    _check(cfg, dtype, algorithm, seed)
