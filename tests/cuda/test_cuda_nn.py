"""CUDA training ops against the oracle: activations, Linear (tiled GEMM), losses, dropout,
optimizer updates, and the GEMM kernel itself (transposes, batch broadcast, split-K, epilogue)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastconv import functional as F
from fastconv import reference
from tests.cuda.common import few, is_numba_device, to_device
from tests.helpers import DTYPES, assert_close, to_host

pytestmark = pytest.mark.cuda


def _ops():
    from fastconv.kernels.cuda import ops

    return ops


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- activations

UNARY = {
    "relu": (reference.relu, "relu_backward", reference.relu_backward, "x"),
    "sigmoid": (reference.sigmoid, "sigmoid_backward", reference.sigmoid_backward, "y"),
    "tanh": (reference.tanh, "tanh_backward", reference.tanh_backward, "y"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_activation(name, dtype):
    fwd_ref, bwd_name, bwd_ref, uses = UNARY[name]
    x = (_rng(1).standard_normal((2, 3, 4, 5)) * 3).astype(dtype)
    x[0, 0, 0, :2] = 0.0  # the kink of relu
    gy = _rng(2).standard_normal(x.shape).astype(dtype)
    y = getattr(F, name)(x, backend="cuda")
    assert_close(y, fwd_ref(x), what=name)
    arg = x if uses == "x" else fwd_ref(x)
    assert_close(getattr(F, bwd_name)(gy, arg, backend="cuda"), bwd_ref(gy, arg), what=bwd_name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leaky_relu(dtype):
    x = _rng(3).standard_normal((3, 7)).astype(dtype)
    gy = _rng(4).standard_normal(x.shape).astype(dtype)
    assert_close(F.leaky_relu(x, 0.2, backend="cuda"), reference.leaky_relu(x, 0.2))
    assert_close(
        F.leaky_relu_backward(gy, x, 0.2, backend="cuda"), reference.leaky_relu_backward(gy, x, 0.2)
    )


def test_sigmoid_extremes():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    y = F.sigmoid(x, backend="cuda")
    assert np.all(np.isfinite(y))
    with np.errstate(over="ignore"):
        assert_close(y, reference.sigmoid(x))


def test_relu_nan_propagates():
    y = F.relu(np.array([np.nan, -1.0, 2.0]), backend="cuda")
    assert np.isnan(y[0]) and y[1] == 0 and y[2] == 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout(dtype):
    x = _rng(5).standard_normal((4, 6)).astype(dtype)
    keep = _rng(6).random(x.shape) > 0.3
    for mask in (keep, keep.astype(dtype)):
        assert_close(
            F.dropout(x, mask, 1 / 0.7, backend="cuda"), reference.dropout(x, mask, 1 / 0.7)
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu_fused(dtype):
    ops = _ops()
    x = _rng(7).standard_normal((2, 3, 2, 2)).astype(dtype)
    b = _rng(8).standard_normal(3).astype(dtype)
    expected = reference.relu(x + b[None, :, None, None])
    assert_close(ops.bias_relu(x, b), expected)
    x2 = _rng(9).standard_normal((4, 5)).astype(dtype)
    b2 = _rng(10).standard_normal(5).astype(dtype)
    assert_close(ops.bias_relu(x2, b2, relu=False), x2 + b2)


def test_add_and_zeros():
    ops = _ops()
    a, b = _rng(11).standard_normal((3, 4)), _rng(12).standard_normal((3, 4))
    (ad,) = to_device(a)
    ops.add_(ad, b)
    assert_close(ad, a + b)
    z = ops.zeros((2, 3), np.float32)
    assert is_numba_device(z) and np.all(to_host(z) == 0) and z.dtype == np.float32


# --------------------------------------------------------------------------- linear / GEMM


@few(10)
@given(
    n=st.integers(1, 12),
    f=st.integers(1, 30),
    o=st.integers(1, 12),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_random(n, f, o, dtype, bias, seed):
    rng = _rng(seed)
    x = rng.standard_normal((n, f)).astype(dtype)
    w = rng.standard_normal((o, f)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    assert_close(F.linear(x, w, b, backend="cuda"), reference.linear(x, w, b), what="linear")
    relu = F.linear_relu(x, w, b, backend="cuda")  # ReLU in the GEMM epilogue
    assert_close(relu, np.maximum(reference.linear(x, w, b), 0), what="relu(linear)")
    gy = rng.standard_normal((n, o)).astype(dtype)
    got = F.linear_backward(gy, x, w, backend="cuda")
    for a, e, what in zip(got, reference.linear_backward(gy, x, w), ("gx", "gw", "gb")):
        assert_close(a, e, what=what)


def test_linear_backward_mask_and_device():
    x, w = _rng(13).standard_normal((5, 7)), _rng(14).standard_normal((3, 7))
    gy = _rng(15).standard_normal((5, 3))
    xd, wd, gyd = to_device(x, w, gy)
    gx, gw, gb = F.linear_backward(gyd, xd, wd, output_mask=(False, True, False))
    assert gx is None and gb is None and is_numba_device(gw)
    assert_close(gw, reference.linear_backward(gy, x, w)[1])


@few(12)
@given(
    batch=st.integers(1, 3),
    bcast=st.sampled_from(["none", "a", "b"]),
    m=st.integers(1, 24),
    nn=st.integers(1, 40),
    k=st.integers(1, 48),
    ta=st.booleans(),
    tb=st.booleans(),
    bias_mode=st.sampled_from([0, 1, 2]),
    relu=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_gemm_kernel(batch, bcast, m, nn, k, ta, tb, bias_mode, relu, dtype, seed):
    """C[z] = op(A[z % BA]) @ op(B[z % BB]) (+ bias, ReLU), with split-K when deep."""
    ops = _ops()
    rng = _rng(seed)
    BA = 1 if bcast == "a" else batch
    BB = 1 if bcast == "b" else batch
    A = rng.standard_normal((BA, k, m) if ta else (BA, m, k)).astype(dtype)
    B = rng.standard_normal((BB, nn, k) if tb else (BB, k, nn)).astype(dtype)
    bias = rng.standard_normal(BA * m if bias_mode == 1 else nn).astype(dtype)
    Ad, Bd, biasd = to_device(A, B, bias)
    C = ops._empty((batch, m, nn), dtype)
    ops._gemm(
        Ad, Bd, C, ta=ta, tb=tb, bias=biasd if bias_mode else None, bias_mode=bias_mode, relu=relu
    )
    expected = np.empty((batch, m, nn))
    for z in range(batch):
        a = A[z % BA].T if ta else A[z % BA]
        b = B[z % BB].T if tb else B[z % BB]
        expected[z] = a.astype(np.float64) @ b
        if bias_mode == 1:
            expected[z] += bias[(z % BA) * m : (z % BA + 1) * m, None]
        elif bias_mode == 2:
            expected[z] += bias[None, :]
    if relu:
        expected = np.maximum(expected, 0)
    assert_close(C, expected.astype(dtype))


def test_gemm_split_k_is_used_and_exact():
    """A deep, narrow product (a filter gradient's shape) takes the split-K path."""
    from fastconv.kernels.cuda import launch

    ops = _ops()
    k = 4 * launch.SPLITK_MIN_CHUNK + 3
    plan = launch.gemm_plan(3, 5, k, 1)
    assert plan.S > 1
    rng = _rng(16)
    A, B = rng.standard_normal((1, 3, k)), rng.standard_normal((1, 5, k))
    Ad, Bd = to_device(A, B)
    C = ops._empty((1, 3, 5), np.float64)
    ops._gemm(Ad, Bd, C, tb=True)
    assert_close(C, A @ B.transpose(0, 2, 1))


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy(dtype):
    z = (_rng(17).standard_normal((6, 10)) * 5).astype(dtype)
    z[0, 3] = 80.0  # large logits must not overflow
    labels = _rng(18).integers(0, 10, 6)
    loss, grad = F.cross_entropy(z, labels, backend="cuda")
    loss_ref, grad_ref = reference.cross_entropy(z, labels)
    assert isinstance(loss, float)
    assert abs(loss - loss_ref) <= 1e-10 * max(1.0, abs(loss_ref))
    assert_close(grad, grad_ref)


def test_cross_entropy_device_scalar():
    ops = _ops()
    z = _rng(19).standard_normal((5, 4))
    labels = np.array([0, 3, 1, 2, 3])
    zd, ld = to_device(z, labels)
    loss_d, grad = ops.cross_entropy_device(zd, ld)
    assert is_numba_device(loss_d) and is_numba_device(grad)
    loss_ref, grad_ref = reference.cross_entropy(z, labels)
    assert abs(float(to_host(loss_d)[0]) - loss_ref) < 1e-12
    assert_close(grad, grad_ref)


def test_cross_entropy_bad_device_label_gives_nan():
    ops = _ops()
    zd, ld = to_device(np.zeros((2, 3)), np.array([1, 7]))
    loss, grad = ops.cross_entropy(zd, ld)
    assert np.isnan(loss) and np.all(np.isnan(to_host(grad)[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_loss(dtype):
    p = _rng(20).standard_normal((3, 4)).astype(dtype)
    t = _rng(21).standard_normal((3, 4)).astype(dtype)
    loss, grad = F.mse_loss(p, t, backend="cuda")
    loss_ref, grad_ref = reference.mse_loss(p, t)
    assert abs(loss - loss_ref) <= 1e-10 * max(1.0, abs(loss_ref))
    assert_close(grad, grad_ref)


# --------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "momentum,dampening,weight_decay,nesterov,first",
    [
        (0.0, 0.0, 0.0, False, True),
        (0.0, 0.0, 1e-2, False, True),
        (0.9, 0.0, 0.0, False, True),
        (0.9, 0.1, 1e-3, False, False),
        (0.9, 0.0, 1e-3, True, False),
    ],
)
def test_sgd_update(dtype, momentum, dampening, weight_decay, nesterov, first):
    rng = _rng(22)
    p, g, buf = (rng.standard_normal((3, 2, 2)).astype(dtype) for _ in range(3))
    p_ref, buf_ref = reference.sgd_update(
        p, g, buf, 0.1, momentum, dampening, weight_decay, nesterov, first
    )
    pd, gd, bd = to_device(p, g, buf)
    F.sgd_update(
        pd, gd, bd if momentum else None, 0.1, momentum, dampening, weight_decay, nesterov, first
    )
    assert_close(pd, p_ref, what="p")
    if momentum:
        assert_close(bd, buf_ref, what="buf")
    # host arrays are updated in place too
    ph, bh = p.copy(), buf.copy()
    F.sgd_update(
        ph,
        g,
        bh if momentum else None,
        0.1,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        first,
        backend="cuda",
    )
    assert_close(ph, p_ref, what="host p")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay,step", [(0.0, 1), (1e-2, 7)])
def test_adam_update(dtype, weight_decay, step):
    rng = _rng(23)
    p, g = (rng.standard_normal(11).astype(dtype) for _ in range(2))
    m = rng.standard_normal(11).astype(dtype)
    v = np.abs(rng.standard_normal(11)).astype(dtype)
    args = (1e-3, 0.9, 0.999, 1e-8, weight_decay, step)
    p_ref, m_ref, v_ref = reference.adam_update(p, g, m, v, *args)
    pd, gd, md, vd = to_device(p, g, m, v)
    F.adam_update(pd, gd, md, vd, *args)
    for got, exp, what in ((pd, p_ref, "p"), (md, m_ref, "m"), (vd, v_ref, "v")):
        assert_close(got, exp, what=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "weight_decay,momentum,centered",
    [(0.0, 0.0, False), (1e-2, 0.9, False), (0.0, 0.0, True), (1e-2, 0.5, True)],
)
def test_rmsprop_update(dtype, weight_decay, momentum, centered):
    rng = _rng(24)
    p, g, buf = (rng.standard_normal(11).astype(dtype) for _ in range(3))
    # a reachable state: square_avg >= grad_avg^2
    ga = (rng.standard_normal(11) * 0.5).astype(dtype)
    sq = (ga.astype(np.float64) ** 2 + np.abs(rng.standard_normal(11))).astype(dtype)
    args = (1e-2, 0.9, 1e-8, weight_decay, momentum, centered)
    p_ref, sq_ref, ga_ref, buf_ref = reference.rmsprop_update(p, g, sq, ga, buf, *args)
    pd, gd, sqd, gad, bd = to_device(p, g, sq, ga, buf)
    F.rmsprop_update(pd, gd, sqd, gad if centered else None, bd if momentum else None, *args)
    assert is_numba_device(pd)
    assert_close(pd, p_ref, what="p")
    assert_close(sqd, sq_ref, what="square_avg")
    if centered:
        assert_close(gad, ga_ref, what="grad_avg")
    if momentum:
        assert_close(bd, buf_ref, what="buf")
    # host arrays are updated in place too
    ph, sqh, gah, bh = p.copy(), sq.copy(), ga.copy(), buf.copy()
    F.rmsprop_update(
        ph, g, sqh, gah if centered else None, bh if momentum else None, *args, backend="cuda"
    )
    assert_close(ph, p_ref, what="host p")
    assert_close(sqh, sq_ref, what="host square_avg")
    if centered:
        assert_close(gah, ga_ref, what="host grad_avg")
    if momentum:
        assert_close(bh, buf_ref, what="host buf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr_decay,weight_decay,step", [(0.0, 0.0, 1), (0.1, 1e-2, 4)])
def test_adagrad_update(dtype, lr_decay, weight_decay, step):
    rng = _rng(25)
    p, g = (rng.standard_normal(11).astype(dtype) for _ in range(2))
    s = np.abs(rng.standard_normal(11)).astype(dtype)
    args = (0.1, lr_decay, weight_decay, 1e-10, step)
    p_ref, s_ref = reference.adagrad_update(p, g, s, *args)
    pd, gd, sd = to_device(p, g, s)
    F.adagrad_update(pd, gd, sd, *args)
    assert is_numba_device(pd)
    assert_close(pd, p_ref, what="p")
    assert_close(sd, s_ref, what="state_sum")
    ph, sh = p.copy(), s.copy()
    F.adagrad_update(ph, g, sh, *args, backend="cuda")
    assert_close(ph, p_ref, what="host p")
    assert_close(sh, s_ref, what="host state_sum")


# --------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm2d(dtype, training, affine):
    rng = _rng(30)
    x = (rng.standard_normal((3, 2, 3, 2)) * 2 + 1).astype(dtype)
    w = rng.standard_normal(2).astype(dtype) if affine else None
    b = rng.standard_normal(2).astype(dtype) if affine else None
    rm, rv = rng.standard_normal(2).astype(dtype), (rng.random(2) + 0.5).astype(dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    y_ref, mean_ref, invstd_ref = reference.batch_norm2d(
        x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5
    )
    xd, rmd, rvd = to_device(x, rm, rv)
    wd, bd = to_device(w, b)
    y, mean, invstd = F.batch_norm2d(xd, rmd, rvd, wd, bd, training, 0.1, 1e-5)
    assert is_numba_device(y)
    for got, exp, what in (
        (y, y_ref, "y"),
        (mean, mean_ref, "mean"),
        (invstd, invstd_ref, "invstd"),
        (rmd, rm_ref, "running_mean"),
        (rvd, rv_ref, "running_var"),
    ):
        assert_close(got, exp, what=what)
    gy = rng.standard_normal(x.shape).astype(dtype)
    got = F.batch_norm2d_backward(
        gy, x, w, to_host(mean), to_host(invstd), training, backend="cuda"
    )
    exp = reference.batch_norm2d_backward(gy, x, w, to_host(mean), to_host(invstd), training)
    for a, e, what in zip(got, exp, ("gx", "gw", "gb")):
        assert_close(a, e, what=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm2d_relu(dtype, training, affine, residual):
    """The fused op on the device against the oracle's batch_norm2d (+ residual) then relu,
    its gradients (relu_output) against relu_backward then batch_norm2d_backward, and the
    residual's gradient on the tape against relu_backward."""
    rng = _rng(32)
    x = (rng.standard_normal((3, 2, 3, 2)) * 2 + 0.3).astype(dtype)
    w = rng.standard_normal(2).astype(dtype) if affine else None
    b = rng.standard_normal(2).astype(dtype) if affine else None
    r = rng.standard_normal(x.shape).astype(dtype) if residual else None
    rm, rv = rng.standard_normal(2).astype(dtype), (rng.random(2) + 0.5).astype(dtype)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    z_ref, mean_ref, invstd_ref = reference.batch_norm2d(
        x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5
    )
    y_ref = reference.relu(z_ref if r is None else (z_ref.astype(np.float64) + r).astype(dtype))
    assert (y_ref == 0).any() and (y_ref > 0).any()
    xd, rmd, rvd = to_device(x, rm, rv)
    wd, bd = to_device(w, b)
    rd = None if r is None else to_device(r)[0]
    y, mean, invstd = F.batch_norm2d_relu(
        xd, rmd, rvd, wd, bd, training, 0.1, 1e-5, residual=rd
    )
    assert is_numba_device(y)
    for got, exp, what in (
        (y, y_ref, "y"),
        (mean, mean_ref, "mean"),
        (invstd, invstd_ref, "invstd"),
        (rmd, rm_ref, "running_mean"),
        (rvd, rv_ref, "running_var"),
    ):
        assert_close(got, exp, what=what)
    gy = rng.standard_normal(x.shape).astype(dtype)
    got = F.batch_norm2d_backward(
        gy, x, w, to_host(mean), to_host(invstd), training, relu_output=to_host(y),
        backend="cuda",
    )  # fmt: skip
    exp = reference.batch_norm2d_backward(
        reference.relu_backward(gy, y_ref), x, w, to_host(mean), to_host(invstd), training
    )
    for a, e, what in zip(got, exp, ("gx", "gw", "gb")):
        assert_close(a, e, what=what)
    if residual:  # the residual's gradient, through the tape on the device
        from fastconv import Tensor

        rt = Tensor(to_device(r)[0], requires_grad=True)
        out = F.batch_norm2d_relu(
            Tensor(xd), None, None, None, None, True, residual=rt, backend="cuda"
        )
        out.backward(to_device(gy)[0])
        assert_close(rt.grad, reference.relu_backward(gy, to_host(out.data)), what="g_residual")


def test_batch_norm2d_host_running_stats_update_in_place():
    x = _rng(31).standard_normal((2, 3, 2, 2))
    rm, rv = np.zeros(3), np.ones(3)
    rm_ref, rv_ref = rm.copy(), rv.copy()
    reference.batch_norm2d(x, None, None, rm_ref, rv_ref, True, 0.1, 1e-5)
    F.batch_norm2d(x, rm, rv, None, None, True, backend="cuda")
    assert_close(rm, rm_ref)
    assert_close(rv, rv_ref)
