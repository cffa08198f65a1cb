"""Softmax family, ELU, adaptive average pooling, NLL, label-smoothed cross-entropy and cat/split:
the CPU kernels (kernels/cpu/extra.py and nn.cross_entropy, reached through kernels/cpu/ops)
against the oracle (fastconv.reference), the oracle against finite differences and torch."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from fastconv.kernels.cpu import extra as X
from fastconv.kernels.cpu import ops as K
from hypothesis import given, settings
from hypothesis import strategies as st

from fastconv import reference as R
from tests.helpers import DTYPES, assert_close, check_op, numerical_grad

RANDOM = settings(max_examples=30, deadline=None)
LOSS_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


def rnd(shape, dtype=np.float64, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def labels_for(n, classes, seed=3):
    return np.random.default_rng(seed).integers(0, classes, n)


@st.composite
def shape_and_dim(draw, max_ndim=4, max_size=5):
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_ndim)))
    return shape, draw(st.integers(0, len(shape) - 1))


def on_threads(n, f):
    """f() with Numba's thread count set to n (restored after)."""
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        return f()
    finally:
        numba.set_num_threads(old)


# --------------------------------------------------------------------------- ELU


def check_elu(x, alpha):
    check_op(
        lambda x: K.elu(x, alpha),
        lambda x: R.elu(x, alpha),
        (x,),
        lambda g, x: K.elu_backward(g, x, alpha),
        lambda g, x: R.elu_backward(g, x, alpha),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5)])
def test_elu_matches_oracle(dtype, alpha, shape):
    check_elu(rnd(shape, dtype, scale=3.0), alpha)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elu_blocked_path_matches_oracle(dtype):
    x = rnd(1 << 20 | 5, dtype, scale=3.0)  # above POOL_BELOW: blocks on the thread pool
    check_elu(x, 0.7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elu_edges(dtype):
    x = np.array([0.0, -0.0, 1e-8, -1e-8, 800.0, -800.0, np.nan], dtype)
    with np.errstate(over="raise", invalid="raise"):
        y = K.elu(x, 0.5)
        g = K.elu_backward(np.ones_like(x), x, 0.5)
    assert y[0] == 0 and y[4] == 800 and y[5] == -0.5 and np.isnan(y[6])
    assert y[3] == pytest.approx(-0.5e-8, rel=1e-6)  # expm1: no cancellation near 0
    assert g[0] == 0.5 and g[2] == 1 and g[4] == 1 and g[5] == 0  # x == 0: the alpha branch
    assert y.dtype == g.dtype == dtype
    assert_close(y[:6], R.elu(x[:6], 0.5), dtype, "elu")
    assert np.isnan(R.elu(x, 0.5)[6])


# --------------------------------------------------------------------------- softmax family


def check_softmax(x, dim):
    for name in ("softmax", "log_softmax"):
        f, fb = getattr(K, name), getattr(K, name + "_backward")
        r, rb = getattr(R, name), getattr(R, name + "_backward")
        check_op(
            lambda x: f(x, dim),
            lambda x: r(x, dim),
            (x,),
            lambda g, x: fb(g, f(x, dim), dim),
            lambda g, x: rb(g, r(x, dim), dim),
        )


@RANDOM
@given(sd=shape_and_dim(), dtype=st.sampled_from(DTYPES))
def test_softmax_random_shapes_match_oracle(sd, dtype):
    shape, dim = sd
    check_softmax(rnd(shape, dtype, scale=3.0), dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_softmax_each_dim_of_4d_input(dtype, dim):
    check_softmax(rnd((2, 3, 4, 5), dtype, scale=3.0), dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 10), 1), ((1, 1), 1), ((64, 10), 1), ((5,), 0)])
def test_softmax_rows(dtype, shape, dim):
    x = rnd(shape, dtype, scale=3.0)
    check_softmax(x, dim)
    np.testing.assert_allclose(K.softmax(x, dim).sum(dim), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_slices_in_several_blocks(dtype):
    # B = 300 > SOFTMAX_B_BLOCK: each row is two tasks, the second partial
    assert X.SOFTMAX_B_BLOCK < 300
    check_softmax(rnd((2, 3, 300), dtype, scale=3.0), 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((300, 4, 60), 1), ((1000, 70), 1), ((70, 1000), 0)])
def test_softmax_parallel_path_matches_oracle_on_any_thread_count(dtype, shape, dim):
    x = rnd(shape, dtype, scale=3.0)
    assert x.size >= X.PARALLEL_ABOVE
    check_softmax(x, dim)
    g = rnd(shape, dtype, seed=1)
    for name in ("softmax", "log_softmax"):
        f, fb = getattr(K, name), getattr(K, name + "_backward")

        def run(f=f, fb=fb):
            y = f(x, dim)
            return y, fb(g, y, dim)

        one, two = on_threads(1, run), run()
        for a, b in zip(one, two):
            np.testing.assert_array_equal(a, b)  # the same bits on 1 and 2 threads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((3, 4), 1), ((4, 3), 0), ((2, 3, 4), 1)])
def test_softmax_large_logits_do_not_overflow(dtype, shape, dim):
    x = rnd(shape, dtype, scale=1e4)
    x.flat[0] = 3e4
    with np.errstate(over="raise", invalid="raise", divide="ignore"):
        y, ly = K.softmax(x, dim), K.log_softmax(x, dim)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ly))
    assert_close(y, R.softmax(x, dim), dtype)
    assert_close(ly, R.log_softmax(x, dim), dtype)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim,at", [((3, 5), 1, (1, 2)), ((2, 4, 3), 1, (1, 2, 0))])
def test_softmax_nan_makes_its_slice_nan(name, shape, dim, at):
    x = rnd(shape)
    x[at] = np.nan
    y = getattr(K, name)(x, dim)
    expected = np.isnan(x).any(axis=dim, keepdims=True) & np.ones(shape, bool)
    np.testing.assert_array_equal(np.isnan(y), expected)
    np.testing.assert_array_equal(np.isnan(getattr(R, name)(x, dim)), expected)
    assert expected.sum() == shape[dim]  # only the slice through the NaN


def test_softmax_empty_input():
    for name in ("softmax", "log_softmax"):
        assert getattr(K, name)(np.ones((3, 0)), 1).shape == (3, 0)


# --------------------------------------------------------------------------- adaptive pooling


def check_adaptive(x, out):
    check_op(
        lambda x: K.adaptive_avg_pool2d(x, out),
        lambda x: R.adaptive_avg_pool2d(x, out),
        (x,),
        lambda g, x: K.adaptive_avg_pool2d_backward(g, x.shape),
        lambda g, x: R.adaptive_avg_pool2d_backward(g, x.shape),
    )


@RANDOM
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    out=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    dtype=st.sampled_from(DTYPES),
)
def test_adaptive_avg_pool_random_shapes_match_oracle(n, c, hw, out, dtype):
    check_adaptive(rnd((n, c, *hw), dtype), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hw,out",
    [
        ((6, 6), (1, 1)),  # global average pooling (its own kernel)
        ((1, 1), (1, 1)),
        ((7, 7), (3, 3)),  # non-divisible: overlapping windows
        ((5, 5), (4, 4)),
        ((7, 5), (3, 4)),
        ((3, 2), (5, 7)),  # larger than the input: windows repeat
        ((1, 1), (4, 4)),
        ((8, 6), (4, 3)),  # divisible: plain avg_pool2d
        ((4, 4), (4, 4)),  # identity
    ],
)
def test_adaptive_avg_pool_named_cases(dtype, hw, out):
    check_adaptive(rnd((1, 3, *hw), dtype), out)


def test_adaptive_avg_pool_windows_by_hand():
    # 5 -> 4 along rows: windows [0,2) [1,3) [2,4) [3,5); one column
    x = np.arange(5.0).reshape(1, 1, 5, 1)
    np.testing.assert_array_equal(K.adaptive_avg_pool2d(x, (4, 1)).ravel(), [0.5, 1.5, 2.5, 3.5])
    gx = K.adaptive_avg_pool2d_backward(np.ones((1, 1, 4, 1)), x.shape)
    np.testing.assert_array_equal(gx.ravel(), [0.5, 1.0, 1.0, 1.0, 0.5])  # overlaps add up
    # 2 -> 3: windows [0,1) [0,2) [1,2)
    x = np.array([[[[2.0, 4.0]]]])
    np.testing.assert_array_equal(K.adaptive_avg_pool2d(x, (1, 3)).ravel(), [2.0, 3.0, 4.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out", [(1, 1), (3, 3)])
def test_adaptive_avg_pool_parallel_path_on_any_thread_count(dtype, out):
    x = rnd((8, 32, 17, 16), dtype)
    assert x.size >= X.PARALLEL_ABOVE
    check_adaptive(x, out)
    g = rnd((8, 32, *out), dtype, seed=1)

    def run():
        return K.adaptive_avg_pool2d(x, out), K.adaptive_avg_pool2d_backward(g, x.shape)

    for a, b in zip(on_threads(1, run), run()):
        np.testing.assert_array_equal(a, b)


def test_global_avg_pool_equals_general_rule():
    x = rnd((2, 3, 5, 7))
    via_general = np.empty((2, 3, 1, 1))
    X._adaptive_avg_ser(x, via_general)
    assert_close(K.adaptive_avg_pool2d(x, (1, 1)), via_general)
    assert_close(K.adaptive_avg_pool2d(x, (1, 1))[..., 0, 0], x.mean(axis=(2, 3)))


# --------------------------------------------------------------------------- losses


def check_loss(actual, expected, dtype):
    (loss, grad), (loss_ref, grad_ref) = actual, expected
    assert isinstance(loss, float)
    rtol = LOSS_RTOL[np.dtype(dtype)]
    assert loss == pytest.approx(loss_ref, rel=rtol, abs=rtol)
    assert_close(grad, grad_ref, dtype, "grad")


@RANDOM
@given(
    n=st.integers(1, 20),
    classes=st.integers(1, 12),
    eps=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
    dtype=st.sampled_from(DTYPES),
)
def test_cross_entropy_random_matches_oracle(n, classes, eps, dtype):
    z, labels = rnd((n, classes), dtype, scale=4.0), labels_for(n, classes)
    check_loss(K.cross_entropy(z, labels, eps), R.cross_entropy(z, labels, eps), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("n,classes", [(1, 10), (64, 10), (7, 2)])
def test_cross_entropy_label_smoothing_matches_oracle(dtype, eps, n, classes):
    z, labels = rnd((n, classes), dtype, scale=4.0), labels_for(n, classes)
    check_loss(K.cross_entropy(z, labels, eps), R.cross_entropy(z, labels, eps), dtype)


def test_cross_entropy_default_is_no_smoothing_bit_for_bit():
    z, labels = rnd((9, 7), np.float32, scale=4.0), labels_for(9, 7)
    loss, grad = K.cross_entropy(z, labels)
    loss0, grad0 = K.cross_entropy(z, labels, 0.0)
    assert loss == loss0
    np.testing.assert_array_equal(grad, grad0)
    loss_s = K.cross_entropy(z, labels, 0.1)[0]
    assert loss_s != loss


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_large_logits_do_not_overflow(eps):
    z = np.array([[1e4, 0.0, -1e4], [0.0, 3e4, 0.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, grad = K.cross_entropy(z, np.array([0, 0]), eps)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    check_loss((loss, grad), R.cross_entropy(z, np.array([0, 0]), eps), np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,classes", [(1, 1), (1, 10), (64, 10), (5, 3)])
def test_nll_loss_matches_oracle(dtype, n, classes):
    logp, labels = rnd((n, classes), dtype), labels_for(n, classes)
    check_loss(K.nll_loss(logp, labels), R.nll_loss(logp, labels), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_of_log_softmax_is_cross_entropy(dtype):
    z, labels = rnd((6, 5), dtype, scale=3.0), labels_for(6, 5)
    y = K.log_softmax(z, 1)
    loss, g_logp = K.nll_loss(y, labels)
    ce, g_z = K.cross_entropy(z, labels)
    assert loss == pytest.approx(ce, rel=LOSS_RTOL[np.dtype(dtype)])
    assert_close(K.log_softmax_backward(g_logp, y, 1), g_z, dtype, "chain rule")


# --------------------------------------------------------------------------- cat / split


@st.composite
def cat_case(draw):
    shape, dim = draw(shape_and_dim(max_size=4))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    return [shape[:dim] + (s,) + shape[dim + 1 :] for s in sizes], dim


@RANDOM
@given(case=cat_case(), dtype=st.sampled_from(DTYPES))
def test_cat_and_split_random(case, dtype):
    shapes, dim = case
    arrays = [rnd(s, dtype, seed=i) for i, s in enumerate(shapes)]
    y = K.cat(arrays, dim)
    assert_close(y, R.cat(arrays, dim), dtype, "cat")
    sizes = [s[dim] for s in shapes]
    pieces = K.split(y, sizes, dim)
    assert len(pieces) == len(arrays)
    for p, r, a in zip(pieces, R.split(y, sizes, dim), arrays):
        assert_close(p, r, dtype, "split")
        np.testing.assert_array_equal(p, a)
        assert p.flags.c_contiguous and not np.shares_memory(p, y)


def test_cat_tuple_and_split_along_first_axis_copies():
    a, b = rnd((2, 3)), rnd((1, 3), seed=1)
    y = K.cat((a, b), 0)
    np.testing.assert_array_equal(y, np.vstack([a, b]))
    pieces = K.split(y, [2, 1], 0)
    pieces[0][0, 0] = 99.0  # a contiguous slice, yet a copy: y is untouched
    assert y[0, 0] == a[0, 0]


# --------------------------------------------------------------------------- the oracle itself


def fd_check(loss, x, analytic):
    np.testing.assert_allclose(analytic, numerical_grad(loss, x), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_oracle_softmax_gradients_by_finite_differences(name, dim):
    f, fb = getattr(R, name), getattr(R, name + "_backward")
    x, g = rnd((2, 3, 4), scale=2.0), rnd((2, 3, 4), seed=1)
    fd_check(lambda: float((f(x, dim) * g).sum()), x, fb(g, f(x, dim), dim))


def test_oracle_elu_gradient_by_finite_differences():
    x = rnd((4, 5), scale=2.0)
    x[np.abs(x) < 1e-3] = 0.5  # away from the kink at 0
    g = rnd((4, 5), seed=1)
    fd_check(lambda: float((R.elu(x, 0.7) * g).sum()), x, R.elu_backward(g, x, 0.7))


@pytest.mark.parametrize("hw,out", [((5, 7), (3, 4)), ((3, 2), (4, 5)), ((4, 4), (1, 1))])
def test_oracle_adaptive_avg_pool_gradient_by_finite_differences(hw, out):
    x = rnd((2, 2, *hw))
    g = rnd((2, 2, *out), seed=1)
    loss = lambda: float((R.adaptive_avg_pool2d(x, out) * g).sum())  # noqa: E731
    fd_check(loss, x, R.adaptive_avg_pool2d_backward(g, x.shape))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_oracle_losses_gradients_by_finite_differences(eps):
    z, labels = rnd((4, 5), scale=2.0), np.array([0, 4, 2, 2])
    fd_check(lambda: R.cross_entropy(z, labels, eps)[0], z, R.cross_entropy(z, labels, eps)[1])
    fd_check(lambda: R.nll_loss(z, labels)[0], z, R.nll_loss(z, labels)[1])


def test_oracle_split_is_the_gradient_of_cat():
    a, b, g = rnd((2, 3)), rnd((2, 2), seed=1), rnd((2, 5), seed=2)
    ga, gb = R.split(g, [3, 2], 1)
    fd_check(lambda: float((R.cat([a, b], 1) * g).sum()), a, ga)
    fd_check(lambda: float((R.cat([a, b], 1) * g).sum()), b, gb)


def test_oracle_matches_torch():
    torch = pytest.importorskip("torch")
    tf = torch.nn.functional
    x = rnd((2, 3, 5, 7), scale=3.0)
    tx = torch.from_numpy(x)
    for alpha in (1.0, 0.3):
        assert_close(R.elu(x, alpha), tf.elu(tx, alpha).numpy(), what="elu")
    for dim in range(4):
        assert_close(R.softmax(x, dim), tf.softmax(tx, dim).numpy(), what="softmax")
        assert_close(R.log_softmax(x, dim), tf.log_softmax(tx, dim).numpy(), what="log_softmax")
    for out in [(1, 1), (3, 4), (2, 5), (6, 9), (5, 7)]:
        assert_close(
            R.adaptive_avg_pool2d(x, out), tf.adaptive_avg_pool2d(tx, out).numpy(), what=str(out)
        )


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_oracle_losses_match_torch(eps):
    torch = pytest.importorskip("torch")
    z, labels = rnd((6, 5), scale=3.0), labels_for(6, 5)
    tz = torch.from_numpy(z).requires_grad_()
    tl = torch.nn.functional.cross_entropy(tz, torch.from_numpy(labels), label_smoothing=eps)
    tl.backward()
    loss, grad = R.cross_entropy(z, labels, eps)
    assert loss == pytest.approx(tl.item(), rel=1e-12)
    assert_close(grad, tz.grad.numpy(), what="grad_logits")
    tp = torch.from_numpy(z).requires_grad_()
    tn = torch.nn.functional.nll_loss(tp, torch.from_numpy(labels))
    tn.backward()
    loss, grad = R.nll_loss(z, labels)
    assert loss == pytest.approx(tn.item(), rel=1e-12)
    assert_close(grad, tp.grad.numpy(), what="grad_logp")


def test_oracle_backward_matches_torch_autograd():
    torch = pytest.importorskip("torch")
    x, g = rnd((2, 3, 5, 7), scale=2.0), rnd((2, 3, 5, 7), seed=1)
    for name, r, rb in (
        ("softmax", R.softmax, R.softmax_backward),
        ("log_softmax", R.log_softmax, R.log_softmax_backward),
    ):
        tx = torch.from_numpy(x).requires_grad_()
        getattr(torch.nn.functional, name)(tx, 2).backward(torch.from_numpy(g))
        assert_close(rb(g, r(x, 2), 2), tx.grad.numpy(), what=name)
    tx = torch.from_numpy(x).requires_grad_()
    gy = rnd((2, 3, 3, 4), seed=2)
    torch.nn.functional.adaptive_avg_pool2d(tx, (3, 4)).backward(torch.from_numpy(gy))
    assert_close(R.adaptive_avg_pool2d_backward(gy, x.shape), tx.grad.numpy(), what="adaptive")


# --------------------------------------------------------------------------- exports


def test_cpu_ops_export_the_new_kernels():
    for name in X.__all__:
        assert getattr(K, name) is getattr(X, name)
    assert "cross_entropy" not in X.__all__  # one definition, in nn.py
    assert K.cross_entropy.__module__.endswith("nn")
