"""The layers' other math: CPU kernels (kernels/cpu/nn.py via fastconv.functional) against the
oracle (fastconv.reference), the oracle against finite differences, and every validation rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fastconv.kernels.cpu import nn as K
from hypothesis import given
from hypothesis import strategies as st

import fastconv as fc
from fastconv import functional as F
from fastconv import reference as R
from tests.helpers import DTYPES, assert_close, check_op, numerical_grad

SHAPES = [(1,), (7,), (3, 5), (2, 3, 4, 5)]


def rnd(shape, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# --------------------------------------------------------------------------- kernels vs oracle


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_matches_oracle(dtype, shape):
    x = rnd(shape, dtype)
    check_op(
        F.relu, R.relu, (x,), lambda g, x: F.relu_backward(g, x), lambda g, x: R.relu_backward(g, x)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slope", [0.01, 0.2, -0.5])
def test_leaky_relu_matches_oracle(dtype, slope):
    x = rnd((4, 6), dtype)
    check_op(
        lambda x: F.leaky_relu(x, slope),
        lambda x: R.leaky_relu(x, slope),
        (x,),
        lambda g, x: F.leaky_relu_backward(g, x, slope),
        lambda g, x: R.leaky_relu_backward(g, x, slope),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_sigmoid_tanh_match_oracle(dtype, shape):
    x = rnd(shape, dtype, scale=3.0)
    for f, fb, r, rb in (
        (F.sigmoid, F.sigmoid_backward, R.sigmoid, R.sigmoid_backward),
        (F.tanh, F.tanh_backward, R.tanh, R.tanh_backward),
    ):
        y = r(x)
        check_op(f, r, (x,))
        g = rnd(shape, dtype, seed=1)
        assert_close(fb(g, y), rb(g, y), dtype, f.__name__ + " backward")


def test_sigmoid_does_not_overflow():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    with np.errstate(over="raise"):
        y = F.sigmoid(x)
    np.testing.assert_allclose(y, [0, 1.9287e-22, 0.5, 1, 1], rtol=1e-4, atol=0)


def test_relu_gradient_is_zero_at_zero():
    x = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(F.relu_backward(np.ones(3), x), [0, 0, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,f,o", [(1, 1, 1), (1, 40, 12), (5, 7, 3), (16, 64, 10)])
def test_linear_matches_oracle(dtype, bias, n, f, o):
    x, w = rnd((n, f), dtype), rnd((o, f), dtype, 1)
    b = rnd((o,), dtype, 2) if bias else None
    check_op(
        lambda x, w: F.linear(x, w, b),
        lambda x, w: R.linear(x, w, b),
        (x, w),
        lambda g, x, w: F.linear_backward(g, x, w),
        lambda g, x, w: R.linear_backward(g, x, w),
    )


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,f,o", [(1, 3, 2), (6, 17, 9), (40, 33, 70)])
def test_linear_relu_matches_oracle(monkeypatch, native, dtype, bias, n, f, o):
    """linear_relu: bias and ReLU in the GEMM's epilogue (native: one compiled call
    around BLAS; else NumPy), with NaN kept and -inf clamped as np.maximum does."""
    if not native:
        monkeypatch.setattr(K, "_native", lambda: False)
    x, w = rnd((n, f), dtype), rnd((o, f), dtype, 1)
    b = rnd((o,), dtype, 2) if bias else None
    if bias:
        b[0], b[-1] = -np.inf, np.nan
    got = F.linear_relu(x, w, b)
    expect = np.maximum(R.linear(x, w, b), 0)
    assert got.dtype == dtype
    assert_close(got, expect, dtype, "relu(linear)")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expect))
    assert_close(F.linear(x, w, b), R.linear(x, w, b), dtype, "linear")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_few_rows_matches_oracle(monkeypatch, dtype, n):
    """A few rows through many weights: the loops split over output features (LINEAR_WIDE
    lowered so that a small layer takes them), forward with bias and ReLU, every mask."""
    monkeypatch.setattr(K, "LINEAR_WIDE", 0)
    x, w, b = rnd((n, 37), dtype), rnd((11, 37), dtype, 1), rnd((11,), dtype, 2)
    assert K._few(n, w)
    assert_close(F.linear(x, w, b), R.linear(x, w, b), dtype, "linear")
    relu = F.linear_relu(x, w, b)
    assert_close(relu, np.maximum(R.linear(x, w, b), 0), dtype, "relu(linear)")
    _check_linear_backward_every_mask(rnd((n, 11), dtype, 3), x, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_few_rows_backward_across_blocks(monkeypatch, dtype, n):
    """The few-rows gw is written block by block (GW_BLOCK features): rows longer than one
    block, with a partial last block, against the oracle for every mask; NaN and inf in x
    reach gw as the oracle has them."""
    monkeypatch.setattr(K, "LINEAR_WIDE", 0)
    f = 2 * K.GW_BLOCK + 37
    x, w, g = rnd((n, f), dtype), rnd((5, f), dtype, 1), rnd((n, 5), dtype, 2)
    assert K._few(n, w)
    _check_linear_backward_every_mask(g, x, w, dtype)
    x[0, K.GW_BLOCK], x[-1, -1] = np.nan, np.inf
    gw, gw_ref = F.linear_backward(g, x, w)[1], R.linear_backward(g, x, w)[1]
    finite = np.isfinite(gw_ref)
    assert not finite.all()
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(gw_ref))
    np.testing.assert_array_equal(gw[np.isinf(gw_ref)], gw_ref[np.isinf(gw_ref)])
    assert_close(gw[finite], gw_ref[finite], dtype, "finite gw entries")


@given(
    n=st.integers(1, 3),
    f=st.integers(1, 40),
    o=st.integers(1, 20),
    dtype=st.sampled_from(DTYPES),
    relu=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_few_rows_random(n, f, o, dtype, relu, seed):
    """Random small layers through the few-rows loops (LINEAR_WIDE lowered), both directions."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((n, f)).astype(dtype), rng.standard_normal((o, f)).astype(dtype)
    b, g = rng.standard_normal(o).astype(dtype), rng.standard_normal((n, o)).astype(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "LINEAR_WIDE", 0)
        y = F.linear_relu(x, w, b) if relu else F.linear(x, w, b)
        got = F.linear_backward(g, x, w)
    z = R.linear(x, w, b)
    assert_close(y, np.maximum(z, 0) if relu else z, dtype, "forward")
    for a, e in zip(got, R.linear_backward(g, x, w)):
        assert_close(a, e, dtype)


def _check_linear_backward_every_mask(g, x, w, dtype=np.float64):
    """linear_backward for each of the 8 output masks: None where not asked, else the oracle's."""
    ref = R.linear_backward(g, x, w)
    for mask in itertools.product([False, True], repeat=3):
        got = F.linear_backward(g, x, w, output_mask=mask)
        for a, e, m in zip(got, ref, mask):
            assert (a is None) == (not m)
            if m:
                assert_close(a, e, dtype)


def test_linear_backward_native_matches_oracle_for_every_mask():
    _check_linear_backward_every_mask(rnd((7, 3), seed=2), rnd((7, 5)), rnd((3, 5), seed=1))


def test_linear_relu_errors_name_the_fused_op():
    """The fused op checks its arguments as linear does, under its own name."""
    with pytest.raises(ValueError, match=r"linear_relu: x has 3 features but weight expects 5"):
        F.linear_relu(rnd((2, 3)), rnd((4, 5)))
    with pytest.raises(ValueError, match=r"linear_relu: bias must have shape \(4,\)"):
        F.linear_relu(rnd((2, 3)), rnd((4, 3)), rnd((5,)))


def test_linear_backward_mask_skips_outputs():
    x, w, g = rnd((3, 4)), rnd((2, 4), seed=1), rnd((3, 2), seed=2)
    gx, gw, gb = F.linear_backward(g, x, w, output_mask=(False, True, False))
    assert gx is None and gb is None
    assert_close(gw, R.linear_backward(g, x, w)[1])
    assert K.linear_backward(g, x, w, (True, False, False))[1:] == (None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(1, 2), (8, 10), (33, 5)])
def test_cross_entropy_matches_oracle(dtype, n, c):
    z = rnd((n, c), dtype, scale=4.0)
    labels = np.random.default_rng(3).integers(0, c, n)
    loss, grad = F.cross_entropy(z, labels)
    loss_ref, grad_ref = R.cross_entropy(z, labels)
    assert isinstance(loss, float)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert loss == pytest.approx(loss_ref, rel=rtol, abs=rtol)
    assert_close(grad, grad_ref, dtype, "grad_logits")


def test_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, 0.0, -1e4], [0.0, 3e4, 0.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = F.cross_entropy(z, np.array([0, 0]))
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(3e4 / 2, rel=1e-6)


def test_cross_entropy_accepts_int32_and_uint8_labels():
    z = rnd((4, 3))
    ref = R.cross_entropy(z, np.array([0, 2, 1, 2]))[0]
    for dt in (np.int32, np.uint8, np.int64):
        assert F.cross_entropy(z, np.array([0, 2, 1, 2], dt))[0] == pytest.approx(ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_matches_oracle(dtype):
    p, t = rnd((4, 5), dtype), rnd((4, 5), dtype, 1)
    loss, grad = F.mse_loss(p, t)
    loss_ref, grad_ref = R.mse_loss(p, t)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    assert_close(grad, grad_ref, dtype)
    assert p.dtype == dtype  # inputs untouched
    np.testing.assert_array_equal(p, rnd((4, 5), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", ["bool", "same"])
def test_dropout_matches_oracle(dtype, mask_dtype):
    x = rnd((3, 4, 5), dtype)
    keep = np.random.default_rng(1).random(x.shape) > 0.3
    keep = keep if mask_dtype == "bool" else keep.astype(dtype)
    check_op(lambda x: F.dropout(x, keep, 1 / 0.7), lambda x: R.dropout(x, keep, 1 / 0.7), (x,))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 3), (5, 1, 2, 2)])
def test_batch_norm2d_matches_oracle(dtype, training, affine, shape):
    C = shape[1]
    x = rnd(shape, dtype, scale=2.0) + 1.5
    w = rnd((C,), dtype, 1) if affine else None
    b = rnd((C,), dtype, 2) if affine else None
    rm, rv = rnd((C,), dtype, 3), np.abs(rnd((C,), dtype, 4)) + 0.5
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = F.batch_norm2d(x, rm, rv, w, b, training, 0.1, 1e-5)
    y_ref, mean_ref, invstd_ref = R.batch_norm2d(x, w, b, rm2, rv2, training, 0.1, 1e-5)
    assert_close(y, y_ref, dtype, "y")
    assert_close(mean, mean_ref, dtype, "save_mean")
    assert_close(invstd, invstd_ref, dtype, "save_invstd")
    assert_close(rm, rm2, dtype, "running_mean")
    assert_close(rv, rv2, dtype, "running_var")
    g = rnd(shape, dtype, 5)
    got = F.batch_norm2d_backward(g, x, w, mean, invstd, training)
    ref = R.batch_norm2d_backward(g, x, w, mean_ref, invstd_ref, training)
    for i, (a, e) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, e, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 3), (5, 1, 2, 2), (3, 4, 7, 1)])
def test_batch_norm2d_relu_matches_oracle(dtype, training, affine, shape):
    """The fused op against the oracle's two ops: output, statistics, running statistics
    updated in place, and every gradient of the pair."""
    C = shape[1]
    x = rnd(shape, dtype, scale=2.0) + 0.5
    w = rnd((C,), dtype, 1) if affine else None
    b = rnd((C,), dtype, 2) if affine else None
    rm, rv = rnd((C,), dtype, 3), np.abs(rnd((C,), dtype, 4)) + 0.5
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = F.batch_norm2d_relu(x, rm, rv, w, b, training, 0.1, 1e-5)
    z_ref, mean_ref, invstd_ref = R.batch_norm2d(x, w, b, rm2, rv2, training, 0.1, 1e-5)
    y_ref = R.relu(z_ref)
    assert (y_ref == 0).any() and (y_ref > 0).any()  # both sides of the ReLU are exercised
    assert_close(y, y_ref, dtype, "y")
    assert_close(mean, mean_ref, dtype, "save_mean")
    assert_close(invstd, invstd_ref, dtype, "save_invstd")
    assert_close(rm, rm2, dtype, "running_mean")
    assert_close(rv, rv2, dtype, "running_var")
    g = rnd(shape, dtype, 5)
    got = F.batch_norm2d_backward(g, x, w, mean, invstd, training, relu_output=y)
    gz = R.relu_backward(g, y_ref)
    ref = R.batch_norm2d_backward(gz, x, w, mean_ref, invstd_ref, training)
    for i, (a, e) in enumerate(zip(got, ref, strict=True)):
        assert_close(a, e, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm2d_relu_is_the_pair_bit_for_bit(dtype):
    """On the CPU the fused op gives the very bits of batch_norm2d then relu (forward) and of
    relu_backward then batch_norm2d_backward (backward): fusing changes no result."""
    x = rnd((4, 3, 6, 5), dtype, 7, scale=2.0)
    w, b = rnd((3,), dtype, 8), rnd((3,), dtype, 9)
    for training in (True, False):
        rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
        y, mean, invstd = F.batch_norm2d_relu(x, rm.copy(), rv.copy(), w, b, training)
        z, mean2, invstd2 = F.batch_norm2d(x, rm.copy(), rv.copy(), w, b, training)
        np.testing.assert_array_equal(y, F.relu(z))
        g = rnd(x.shape, dtype, 10)
        fused = F.batch_norm2d_backward(g, x, w, mean, invstd, training, relu_output=y)
        pair = F.batch_norm2d_backward(F.relu_backward(g, z), x, w, mean2, invstd2, training)
        for a, e in zip(fused, pair, strict=True):
            np.testing.assert_array_equal(a, e)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm2d_relu_with_residual_is_the_ops_bit_for_bit(dtype, training):
    """relu(bn(x) + residual) as one op: on the CPU the very bits of batch_norm2d, add, relu
    (output, and every gradient on the tape, the residual's included), and the oracle's."""
    C = 3
    x0, r0 = rnd((4, C, 5, 6), dtype, 11, scale=2.0), rnd((4, C, 5, 6), dtype, 12)
    w0, b0 = rnd((C,), dtype, 13), rnd((C,), dtype, 14)
    g = rnd(x0.shape, dtype, 15)
    outs = []
    for fused in (True, False):
        x, r, w, b = (fc.Tensor(a.copy(), requires_grad=True) for a in (x0, r0, w0, b0))
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        if fused:
            y = F.batch_norm2d_relu(x, rm, rv, w, b, training, residual=r)
            assert y.grad_fn == "batch_norm2d_relu"
        else:
            y = F.relu(F.batch_norm2d(x, rm, rv, w, b, training) + r)
        y.backward(g)
        outs.append([y.numpy(), rm, rv, x.grad, r.grad, w.grad, b.grad])
    for a, e in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, e)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    z, mean, invstd = R.batch_norm2d(x0, w0, b0, rm, rv, training)
    y_ref = R.relu((z.astype(np.float64) + r0).astype(dtype))
    assert (y_ref == 0).any() and (y_ref > 0).any()
    assert_close(outs[0][0], y_ref, dtype, "y")
    gz = R.relu_backward(g, y_ref)
    gx, gw, gb = R.batch_norm2d_backward(gz, x0, w0, mean, invstd, training)
    for got, exp, what in zip(outs[0][3:], (gx, gz, gw, gb), ("gx", "g_residual", "gw", "gb")):
        assert_close(got, exp, dtype, what)


def test_batch_norm2d_relu_residual_errors():
    x = rnd((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: residual must have x's shape"):
        F.batch_norm2d_relu(x, None, None, training=True, residual=x[:, :2])
    with pytest.raises(TypeError, match=r"batch_norm2d_relu: .*residual"):
        F.batch_norm2d_relu(x, None, None, training=True, residual=x.astype(np.float32))


def test_batch_norm2d_relu_edge_values():
    """A channel of one repeated value normalises to exactly 0 in training: ReLU gives 0 and
    no gradient passes there (derivative 0 at 0, as PyTorch); NaN stays NaN."""
    x = rnd((2, 2, 3, 3))
    x[:, 0] = 4.0  # constant channel: xhat = 0, y = relu(b) = 0 with b = 0
    y, mean, invstd = F.batch_norm2d_relu(x, None, None, None, None, training=True)
    assert np.all(y[:, 0] == 0)
    g = rnd(x.shape, seed=3)
    gx, gw, gb = F.batch_norm2d_backward(g, x, None, mean, invstd, True, relu_output=y)
    assert gb[0] == 0 and gw[0] == 0 and np.all(gx[:, 0] == 0)
    ref = R.batch_norm2d_backward(R.relu_backward(g, y), x, None, mean, invstd, True)
    assert_close(gx, ref[0], np.float64, "gx")
    xn = x.copy()
    xn[0, 1, 0, 0] = np.nan
    rm, rv = np.zeros(2), np.ones(2)
    y, _, _ = F.batch_norm2d_relu(xn, rm, rv, None, None, training=False)
    assert np.isnan(y[0, 1, 0, 0]) and np.isfinite(np.delete(y.ravel(), 1 * 9)).all()


def test_batch_norm2d_relu_errors():
    x = rnd((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: .*weight"):
        F.batch_norm2d_relu(x, None, None, np.ones(4), None, training=True)
    with pytest.raises(ValueError, match=r"batch_norm2d_relu: .*momentum"):
        F.batch_norm2d_relu(x, None, None, None, None, True, momentum=2.0)
    _, m, s = F.batch_norm2d_relu(x, None, None, None, None, training=True)
    with pytest.raises(ValueError, match=r"batch_norm2d_backward: relu_output must have x's shape"):
        F.batch_norm2d_backward(x, x, None, m, s, True, relu_output=x[:1])
    with pytest.raises(TypeError, match=r"batch_norm2d_backward: .*relu_output"):
        F.batch_norm2d_backward(x, x, None, m, s, True, relu_output=x.astype(np.float32))


def test_batch_norm2d_updates_running_stats_like_torch():
    torch = pytest.importorskip("torch")
    x = rnd((4, 3, 5, 5), scale=2.0)
    rm, rv = np.zeros(3), np.ones(3)
    F.batch_norm2d(x, rm, rv, None, None, training=True, momentum=0.2)
    trm, trv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True, momentum=0.2)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


def test_batch_norm2d_backward_mask():
    x, g = rnd((2, 3, 2, 2)), rnd((2, 3, 2, 2), seed=1)
    _, m, s = F.batch_norm2d(x, None, None, None, None, training=True)
    out = F.batch_norm2d_backward(g, x, None, m, s, True, output_mask=(True, False, False))
    assert out[0] is not None and out[1] is None and out[2] is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov",
    [
        (0.0, 0.0, 0.0, False),
        (0.9, 0.0, 0.0, False),
        (0.9, 0.1, 1e-2, False),
        (0.9, 0.0, 1e-3, True),
        (0.0, 0.0, 0.1, False),
    ],
)
@pytest.mark.parametrize("first", [True, False])
def test_sgd_update_matches_oracle(dtype, momentum, dampening, weight_decay, nesterov, first):
    p, g, buf = rnd((3, 4), dtype), rnd((3, 4), dtype, 1), rnd((3, 4), dtype, 2)
    p_ref, buf_ref = R.sgd_update(
        p, g, buf, 0.1, momentum, dampening, weight_decay, nesterov, first
    )
    F.sgd_update(
        p, g, buf if momentum else None, 0.1, momentum, dampening, weight_decay, nesterov, first
    )
    assert_close(p, p_ref, dtype, "p")
    if momentum:
        assert_close(buf, buf_ref, dtype, "buf")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov",
    [(0.0, 0.0, 0.0, False), (0.9, 0.1, 1e-2, False), (0.9, 0.0, 1e-3, True)],
)
def test_sgd_update_many_matches_oracle_per_parameter(
    backend, momentum, dampening, weight_decay, nesterov
):
    # mixed shapes and dtypes, one first step among later ones, a non-contiguous grad
    shapes = [(3, 4), (7,), (2, 3, 2, 2), (1,)]
    dtypes = [np.float64, np.float32, np.float32, np.float64]
    ps = [rnd(s, d, i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    gs = [rnd(s, d, 10 + i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    gs[0] = rnd((4, 3), np.float64, 10).T  # (3, 4), Fortran order
    bufs = [rnd(s, d, 20 + i) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    first = [False, True, False, False]
    expect = [
        R.sgd_update(p, g, b, 0.1, momentum, dampening, weight_decay, nesterov, f)
        for p, g, b, f in zip(ps, gs, bufs, first)
    ]
    F.sgd_update_many(
        ps, gs, bufs if momentum else None, 0.1, momentum, dampening, weight_decay, nesterov,
        first, backend=backend,
    )  # fmt: skip
    for p, b, (p_ref, b_ref), d in zip(ps, bufs, expect, dtypes):
        assert_close(p, p_ref, d, "p")
        if momentum:
            assert_close(b, b_ref, d, "buf")


def test_sgd_update_many_errors():
    p, g = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match=r"sgd_update_many: params, grads, bufs and first must"):
        F.sgd_update_many([p, p], [g], None, 0.1)
    with pytest.raises(ValueError, match=r"sgd_update_many: momentum=0.9 needs a momentum buf"):
        F.sgd_update_many([p], [g], [None], 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"sgd_update_many: lr must be in \[0, inf\]"):
        F.sgd_update_many([p], [g], None, -1.0)
    with pytest.raises(ValueError, match=r"sgd_update_many: inputs must have the same shape"):
        F.sgd_update_many([p, p], [g, np.ones(4)], None, 0.1)
    with pytest.raises(ValueError, match=r"sgd_update_many: p is updated in place"):
        F.sgd_update_many([np.ones(6)[::2]], [g], None, 0.1)
    with pytest.raises(TypeError, match=r"sgd_update_many: p must be a NumPy array"):
        F.sgd_update_many([[1.0, 2.0, 3.0]], [g], None, 0.1)
    before = p.copy()
    with pytest.raises(TypeError, match=r"sgd_update_many: all inputs must have the same dtype"):
        F.sgd_update_many([p, np.ones(3, np.float32)], [g, g], None, 0.1)
    np.testing.assert_array_equal(p, before)  # checked before any parameter was updated
    F.sgd_update_many([], [], None, 0.1)  # nothing to do


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("step", [1, 2, 10])
def test_adam_update_matches_oracle(dtype, weight_decay, step):
    p, g = rnd((5,), dtype), rnd((5,), dtype, 1)
    m, v = rnd((5,), dtype, 2), np.abs(rnd((5,), dtype, 3))
    p_ref, m_ref, v_ref = R.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
    F.adam_update(p, g, m, v, 1e-2, 0.9, 0.999, 1e-8, weight_decay, step)
    assert_close(p, p_ref, dtype, "p")
    assert_close(m, m_ref, dtype, "m")
    assert_close(v, v_ref, dtype, "v")


RMSPROP_CONFIGS = [  # (weight_decay, momentum, centered)
    (0.0, 0.0, False),
    (1e-2, 0.0, False),
    (0.0, 0.9, False),
    (0.0, 0.0, True),
    (1e-2, 0.5, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay,momentum,centered", RMSPROP_CONFIGS)
def test_rmsprop_update_matches_oracle(dtype, weight_decay, momentum, centered):
    p, g, buf = rnd((3, 4), dtype), rnd((3, 4), dtype, 1), rnd((3, 4), dtype, 2)
    # a reachable state: square_avg >= grad_avg^2 (both start at 0 and are averaged alike)
    ga = rnd((3, 4), dtype, 3, scale=0.5)
    sq = (ga.astype(np.float64) ** 2 + np.abs(rnd((3, 4), seed=4))).astype(dtype)
    args = (1e-2, 0.9, 1e-8, weight_decay, momentum, centered)
    p_ref, sq_ref, ga_ref, buf_ref = R.rmsprop_update(p, g, sq, ga, buf, *args)
    F.rmsprop_update(p, g, sq, ga if centered else None, buf if momentum else None, *args)
    assert_close(p, p_ref, dtype, "p")
    assert_close(sq, sq_ref, dtype, "square_avg")
    if centered:
        assert_close(ga, ga_ref, dtype, "grad_avg")
    if momentum:
        assert_close(buf, buf_ref, dtype, "buf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr_decay,weight_decay,step", [(0.0, 0.0, 1), (0.1, 0.05, 3)])
def test_adagrad_update_matches_oracle(dtype, lr_decay, weight_decay, step):
    p, g, s = rnd((5,), dtype), rnd((5,), dtype, 1), np.abs(rnd((5,), dtype, 2))
    p_ref, s_ref = R.adagrad_update(p, g, s, 0.1, lr_decay, weight_decay, 1e-10, step)
    F.adagrad_update(p, g, s, 0.1, lr_decay, weight_decay, 1e-10, step)
    assert_close(p, p_ref, dtype, "p")
    assert_close(s, s_ref, dtype, "state_sum")


def test_backend_reference_runs_the_oracle_in_place_too():
    p, g, buf = rnd((4,)), rnd((4,), seed=1), rnd((4,), seed=2)
    p2, buf2 = p.copy(), buf.copy()
    F.sgd_update(p, g, buf, 0.1, 0.9, first=False, backend="reference")
    F.sgd_update(p2, g, buf2, 0.1, 0.9, first=False)
    assert_close(p, p2)
    assert_close(buf, buf2)
    m, v, m2, v2 = np.zeros(4), np.zeros(4), np.zeros(4), np.zeros(4)
    F.adam_update(p, g, m, v, 1e-3, backend="reference")
    F.adam_update(p2, g, m2, v2, 1e-3)
    assert_close(p, p2)
    sq, ga, b, sq2, ga2, b2 = (np.zeros(4) for _ in range(6))
    F.rmsprop_update(p, g, sq, ga, b, 1e-2, momentum=0.9, centered=True, backend="reference")
    F.rmsprop_update(p2, g, sq2, ga2, b2, 1e-2, momentum=0.9, centered=True)
    for got, exp in ((p, p2), (sq, sq2), (ga, ga2), (b, b2)):
        assert_close(got, exp)
    s, s2 = np.full(4, 0.1), np.full(4, 0.1)
    F.adagrad_update(p, g, s, 0.1, lr_decay=0.01, step=2, backend="reference")
    F.adagrad_update(p2, g, s2, 0.1, lr_decay=0.01, step=2)
    assert_close(p, p2)
    assert_close(s, s2)
    x = rnd((3, 4))
    assert_close(F.relu(x, backend="reference"), F.relu(x))
    got = F.linear_backward(
        x, rnd((3, 2)), rnd((4, 2)), output_mask=(True, False, True), backend="reference"
    )
    assert got[1] is None and got[0].shape == (3, 2)


def test_conv1d_matches_conv2d_oracle():
    x, w, b = rnd((2, 3, 11)), rnd((4, 3, 3), seed=1), rnd((4,), seed=2)
    y = F.conv1d(x, w, b, stride=2, padding=1, dilation=2)
    y_ref = R.conv2d(x[:, :, None], w[:, :, None], b, (1, 2), (0, 1), (1, 2))[:, :, 0]
    assert_close(y, y_ref)
    g = rnd(y.shape, seed=3)
    got = F.conv1d_backward(g, x, w, stride=2, padding=1, dilation=2)
    ref = R.conv2d_backward(g[:, :, None], x[:, :, None], w[:, :, None], (1, 2), (0, 1), (1, 2))
    assert_close(got[0], ref[0][:, :, 0])
    assert_close(got[1], ref[1][:, :, 0])
    assert_close(got[2], ref[2])


def test_flatten_keeps_the_batch_dimension():
    x = rnd((2, 3, 4, 5))
    assert F.flatten(x).shape == (2, 60)
    assert np.shares_memory(F.flatten(x), x)


# ------------------------------------------------------------- oracle vs finite differences


def _fd_check(f_scalar, x, analytic, rtol=1e-6, atol=1e-8):
    num = numerical_grad(f_scalar, x)
    np.testing.assert_allclose(analytic, num, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_oracle_activation_gradients_by_finite_differences(name):
    x = rnd((3, 4), scale=2.0)
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink
    g = rnd((3, 4), seed=1)
    f = getattr(R, name)
    if name in ("relu", "leaky_relu"):
        analytic = getattr(R, name + "_backward")(g, x)
    else:
        analytic = getattr(R, name + "_backward")(g, f(x))
    _fd_check(lambda: float((f(x) * g).sum()), x, analytic)


def test_oracle_linear_gradients_by_finite_differences():
    x, w, b, g = rnd((3, 4)), rnd((2, 4), seed=1), rnd((2,), seed=2), rnd((3, 2), seed=3)
    gx, gw, gb = R.linear_backward(g, x, w)

    def loss():
        return float((R.linear(x, w, b) * g).sum())

    _fd_check(loss, x, gx)
    _fd_check(loss, w, gw)
    _fd_check(loss, b, gb)


def test_oracle_cross_entropy_and_mse_gradients_by_finite_differences():
    z, labels = rnd((4, 5)), np.array([0, 4, 2, 2])
    _fd_check(lambda: R.cross_entropy(z, labels)[0], z, R.cross_entropy(z, labels)[1])
    p, t = rnd((3, 3)), rnd((3, 3), seed=1)
    _fd_check(lambda: R.mse_loss(p, t)[0], p, R.mse_loss(p, t)[1])


@pytest.mark.parametrize("training", [True, False])
def test_oracle_batch_norm_gradients_by_finite_differences(training):
    x, w, b = rnd((3, 2, 2, 3)), rnd((2,), seed=1), rnd((2,), seed=2)
    rm, rv = rnd((2,), seed=3), np.abs(rnd((2,), seed=4)) + 0.5
    g = rnd(x.shape, seed=5)

    def loss():
        return float((R.batch_norm2d(x, w, b, rm.copy(), rv.copy(), training)[0] * g).sum())

    _, mean, invstd = R.batch_norm2d(x, w, b, rm.copy(), rv.copy(), training)
    gx, gw, gb = R.batch_norm2d_backward(g, x, w, mean, invstd, training)
    _fd_check(loss, x, gx, rtol=1e-5, atol=1e-7)
    _fd_check(loss, w, gw, rtol=1e-5, atol=1e-7)
    _fd_check(loss, b, gb, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- validation errors


def test_elementwise_type_errors():
    with pytest.raises(TypeError, match=r"relu: x must be a NumPy array.*list"):
        F.relu([1.0, 2.0])
    with pytest.raises(TypeError, match=r"relu: x must be float32 or float64; got dtype int64"):
        F.relu(np.arange(3))
    with pytest.raises(TypeError, match=r"relu_backward: all inputs must have the same dtype"):
        F.relu_backward(np.ones(3, np.float32), np.ones(3))
    with pytest.raises(
        ValueError,
        match=r"tanh_backward: inputs must have the same shape; "
        r"got grad_y.shape=\(3,\), y.shape=\(4,\)",
    ):
        F.tanh_backward(np.ones(3), np.ones(4))
    with pytest.raises(TypeError, match=r"leaky_relu: negative_slope must be a number"):
        F.leaky_relu(np.ones(3), "0.1")
    with pytest.raises(ValueError, match=r"leaky_relu_backward: negative_slope must be in"):
        F.leaky_relu_backward(np.ones(3), np.ones(3), float("nan"))


def test_linear_errors():
    with pytest.raises(
        ValueError,
        match=r"linear: x has 5 features but weight expects 4; "
        r"x.shape=\(2, 5\), weight.shape=\(3, 4\)",
    ):
        F.linear(np.ones((2, 5)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"linear: x must be 2-D \(N, in_features\); got 3-D"):
        F.linear(np.ones((2, 5, 1)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(3,\)"):
        F.linear(np.ones((2, 4)), np.ones((3, 4)), np.ones(2))
    with pytest.raises(ValueError, match=r"linear: empty batch"):
        F.linear(np.ones((0, 4)), np.ones((3, 4)))
    with pytest.raises(
        ValueError,
        match=r"linear_backward: grad_y must have the linear output "
        r"shape \(2, 3\); got grad_y.shape=\(2, 4\)",
    ):
        F.linear_backward(np.ones((2, 4)), np.ones((2, 4)), np.ones((3, 4)))
    with pytest.raises(TypeError, match=r"linear_backward: all inputs must have the same dtype"):
        F.linear_backward(np.ones((2, 3), np.float32), np.ones((2, 4)), np.ones((3, 4)))


def test_cross_entropy_errors():
    z = np.ones((3, 4))
    with pytest.raises(TypeError, match=r"cross_entropy: labels must be integers"):
        F.cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match=r"cross_entropy: labels must be a NumPy array"):
        F.cross_entropy(z, [0, 1, 2])
    with pytest.raises(ValueError, match=r"cross_entropy: labels must have shape \(3,\)"):
        F.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(
        ValueError,
        match=r"cross_entropy: labels must be in \[0, 4\) for 4 "
        r"classes; got values from -1 to 2",
    ):
        F.cross_entropy(z, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=r"got values from 0 to 4"):
        F.cross_entropy(z, np.array([0, 4, 2]))
    with pytest.raises(ValueError, match=r"cross_entropy: logits must be 2-D"):
        F.cross_entropy(np.ones(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"cross_entropy: empty batch"):
        F.cross_entropy(np.ones((0, 3)), np.array([], np.int64))


def test_dropout_errors():
    x = np.ones((2, 3))
    with pytest.raises(TypeError, match=r"dropout: keep_mask must be bool or the dtype of x"):
        F.dropout(x, np.ones((2, 3), np.int64), 2.0)
    with pytest.raises(ValueError, match=r"dropout: keep_mask must have the shape of x"):
        F.dropout(x, np.ones((3, 2), bool), 2.0)
    with pytest.raises(TypeError, match=r"dropout: keep_mask must be a NumPy array"):
        F.dropout(x, [[True] * 3] * 2, 2.0)
    with pytest.raises(ValueError, match=r"dropout: scale must be in \[0, inf\]"):
        F.dropout(x, np.ones((2, 3), bool), -1.0)


def test_mse_errors():
    with pytest.raises(ValueError, match=r"mse_loss: inputs must have the same shape"):
        F.mse_loss(np.ones(3), np.ones(4))


def test_batch_norm_errors():
    x = np.ones((2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"batch_norm2d: running_mean must have shape \(3,\)"):
        F.batch_norm2d(x, np.zeros(2), np.ones(2), training=True)
    with pytest.raises(ValueError, match=r"both be given or both be None"):
        F.batch_norm2d(x, np.zeros(3), None, training=True)
    with pytest.raises(ValueError, match=r"evaluation mode needs running_mean"):
        F.batch_norm2d(x, None, None, training=False)
    with pytest.raises(ValueError, match=r"more than one value per channel"):
        F.batch_norm2d(np.ones((1, 3, 1, 1)), None, None, training=True)
    with pytest.raises(ValueError, match=r"batch_norm2d: momentum must be in \[0, 1\]"):
        F.batch_norm2d(x, None, None, training=True, momentum=1.5)
    with pytest.raises(ValueError, match=r"batch_norm2d: eps must be in \(0, inf\]"):
        F.batch_norm2d(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match=r"running_mean is updated in place"):
        F.batch_norm2d(x, np.zeros(6)[::2], np.ones(3), training=True)
    with pytest.raises(TypeError, match=r"batch_norm2d: all inputs must have the same dtype"):
        F.batch_norm2d(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True)
    with pytest.raises(
        ValueError,
        match=r"batch_norm2d_backward: grad_y must have the "
        r"batch_norm2d output shape",
    ):
        F.batch_norm2d_backward(np.ones((2, 3, 4, 3)), x, None, np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match=r"save_mean and save_invstd"):
        F.batch_norm2d_backward(x, x, None, None, np.ones(3))


def test_update_errors():
    p, g = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match=r"sgd_update: momentum=0.9 needs a momentum buffer"):
        F.sgd_update(p, g, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"sgd_update: nesterov needs momentum > 0"):
        F.sgd_update(p, g, np.zeros(3), 0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match=r"sgd_update: lr must be in \[0, inf\]; got lr=-1"):
        F.sgd_update(p, g, None, -1)
    with pytest.raises(ValueError, match=r"sgd_update: inputs must have the same shape"):
        F.sgd_update(p, np.ones(4), None, 0.1)
    with pytest.raises(ValueError, match=r"sgd_update: p is updated in place and must be"):
        F.sgd_update(np.ones(6)[::2], g, None, 0.1)
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"p is updated in place"):
        F.sgd_update(ro, g, None, 0.1)
    with pytest.raises(ValueError, match=r"adam_update: step must be an int >= 1"):
        F.adam_update(p, g, np.zeros(3), np.zeros(3), 0.1, step=0)
    with pytest.raises(ValueError, match=r"adam_update: beta1 must be in \[0, 1\)"):
        F.adam_update(p, g, np.zeros(3), np.zeros(3), 0.1, beta1=1.0)
    with pytest.raises(ValueError, match=r"adam_update: the moment buffers m and v"):
        F.adam_update(p, g, None, np.zeros(3), 0.1)
    with pytest.raises(ValueError, match=r"adam_update: m is updated in place"):
        F.adam_update(p, g, np.zeros(6)[::2], np.zeros(3), 0.1)
    z = np.zeros(3)
    with pytest.raises(ValueError, match=r"rmsprop_update: the square average buffer"):
        F.rmsprop_update(p, g, None, None, None, 0.1)
    with pytest.raises(ValueError, match=r"rmsprop_update: centered=True needs a gradient avera"):
        F.rmsprop_update(p, g, z, None, None, 0.1, centered=True)
    with pytest.raises(ValueError, match=r"rmsprop_update: momentum=0.9 needs a momentum buffer"):
        F.rmsprop_update(p, g, z, None, None, 0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"rmsprop_update: alpha must be in \[0, 1\]"):
        F.rmsprop_update(p, g, z, None, None, 0.1, alpha=1.5)
    with pytest.raises(ValueError, match=r"rmsprop_update: square_avg is updated in place"):
        F.rmsprop_update(p, g, np.zeros(6)[::2], None, None, 0.1)
    with pytest.raises(ValueError, match=r"rmsprop_update: inputs must have the same shape"):
        F.rmsprop_update(p, g, z, np.zeros(4), None, 0.1, centered=True)
    with pytest.raises(ValueError, match=r"adagrad_update: step must be an int >= 1"):
        F.adagrad_update(p, g, z, 0.1, step=0)
    with pytest.raises(ValueError, match=r"adagrad_update: lr_decay must be in \[0, inf\]"):
        F.adagrad_update(p, g, z, 0.1, lr_decay=-1)
    with pytest.raises(ValueError, match=r"adagrad_update: the accumulator state_sum"):
        F.adagrad_update(p, g, None, 0.1)
    with pytest.raises(ValueError, match=r"adagrad_update: state_sum is updated in place"):
        F.adagrad_update(p, g, np.zeros(6)[::2], 0.1)


def test_conv1d_errors():
    with pytest.raises(
        TypeError,
        match=r"conv1d: stride must be an int or a 1-tuple of ints; "
        r"got \(2, 2\)",
    ):
        F.conv1d(np.ones((1, 2, 8)), np.ones((1, 2, 3)), stride=(2, 2))
    with pytest.raises(ValueError, match=r"conv1d: dilation must be positive"):
        F.conv1d(np.ones((1, 2, 8)), np.ones((1, 2, 3)), dilation=(0,))
    assert F.conv1d(np.ones((1, 2, 8)), np.ones((1, 2, 3)), padding=(1,)).shape == (1, 1, 8)
    with pytest.raises(ValueError, match=r"conv1d: x must be 3-D \(N, C, L\)"):
        F.conv1d(np.ones((1, 2, 3, 4)), np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match=r"conv1d: x has 2 channels but weight expects 3"):
        F.conv1d(np.ones((1, 2, 8)), np.ones((1, 3, 3)))
    with pytest.raises(
        ValueError,
        match=r"conv1d_backward: grad_y must have the conv1d output "
        r"shape \(1, 1, 6\)",
    ):
        F.conv1d_backward(np.ones((1, 1, 5)), np.ones((1, 2, 8)), np.ones((1, 2, 3)))


def test_flatten_errors():
    with pytest.raises(TypeError, match=r"flatten: x must be a NumPy array"):
        F.flatten([1, 2])
    with pytest.raises(
        ValueError, match=r"flatten: x must have at least one axis; got x.shape=\(\)"
    ):
        F.flatten(np.array(1.0))


def test_device_only_ops_give_a_clear_error_when_a_backend_lacks_them(monkeypatch):
    import types

    from fastconv import dispatch

    monkeypatch.setattr(dispatch, "backend_ops", lambda op, be: types.SimpleNamespace())
    with pytest.raises(
        NotImplementedError,
        match=r"mse_loss: the 'cpu' backend does not "
        r"implement mse_loss",
    ):
        F.mse_loss(np.ones(2), np.ones(2))


def test_public_names_are_exported():
    for name in (
        "relu",
        "linear",
        "cross_entropy",
        "dropout",
        "batch_norm2d",
        "sgd_update",
        "sgd_update_many",
        "adam_update",
        "rmsprop_update",
        "adagrad_update",
        "conv1d",
    ):
        assert getattr(fc, name) is getattr(F, name)
    assert set(K.__all__) <= set(dir(__import__("fastconv.kernels.cpu.ops", fromlist=["x"])))
