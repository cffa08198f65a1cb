"""CUDA ops of kernels/cuda/extra.py against the oracle: ELU, softmax / log-softmax along any
axis, adaptive average pooling, cross-entropy with label smoothing, NLL, cat / split, and the
tensor arithmetic the tape runs on device arrays (broadcast binary ops, scale, sum_to, sum_axes,
matmul, index_backward, contiguous), which are checked against NumPy itself.

The ops are compared with the ``fastconv.reference`` function of the same name; where the oracle
has none (yet), with a float64 NumPy expression written here (``_oracle``). Each op runs with
NumPy inputs (NumPy out) and with device inputs (device arrays out).
"""

import inspect

import numpy as np
import pytest

from fastconv import reference
from tests.cuda.common import is_numba_device, to_device
from tests.helpers import DTYPES, assert_close, to_host

pytestmark = pytest.mark.cuda


def _ops():
    from fastconv.kernels.cuda import ops

    return ops


def _rng(seed=0):
    return np.random.default_rng(seed)


def _oracle(name, fallback):
    """reference.<name> when the oracle has it, else the float64 NumPy ``fallback``."""
    return getattr(reference, name, None) or fallback


def _to_dev(a):
    """A device copy of ``a``, 0-d kept 0-d (common.to_device makes it 1-D)."""
    if a.ndim == 0:
        from numba import cuda

        return cuda.to_device(a)
    return to_device(a)[0]


def _both(fn, *arrays, **kw):
    """fn on NumPy inputs and on device inputs (the NumPy arguments copied to the device);
    checks where each result lives."""
    host = fn(*arrays, **kw)
    dev = fn(*(_to_dev(a) if isinstance(a, np.ndarray) else a for a in arrays), **kw)
    for h, d in zip(
        host if isinstance(host, (tuple, list)) else [host],
        dev if isinstance(dev, (tuple, list)) else [dev],
    ):
        assert isinstance(h, np.ndarray) and is_numba_device(d)
    return host, dev


def _close_both(fn, expected, *arrays, **kw):
    host, dev = _both(fn, *arrays, **kw)
    assert_close(host, expected, what=f"{fn.__name__} (host)")
    assert_close(dev, expected, what=f"{fn.__name__} (device)")


# --------------------------------------------------------------------------- ELU


def _elu64(x, alpha):
    x64 = x.astype(np.float64)
    return np.where(x64 > 0, x64, alpha * np.expm1(np.minimum(x64, 0))).astype(x.dtype)


def _elu_backward64(gy, x, alpha):
    x64 = x.astype(np.float64)
    d = np.where(x64 > 0, 1.0, alpha * np.exp(np.minimum(x64, 0)))
    return (gy.astype(np.float64) * d).astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elu(dtype):
    ops = _ops()
    x = (_rng(1).standard_normal((2, 3, 5)) * 2).astype(dtype)
    x[0, 0, :2] = 0.0  # the kink: x == 0 takes the exp branch
    x[0, 1, 0] = -1e-7  # expm1, not exp - 1
    gy = _rng(2).standard_normal(x.shape).astype(dtype)
    fwd = _oracle("elu", _elu64)
    bwd = _oracle("elu_backward", _elu_backward64)
    _close_both(ops.elu, fwd(x, 0.7), x, 0.7)
    _close_both(ops.elu_backward, bwd(gy, x, 0.7), gy, x, 0.7)
    y = ops.elu(np.array([np.nan, -800.0, 800.0]), 1.0)
    assert np.isnan(y[0]) and y[1] == -1.0 and y[2] == 800.0


# --------------------------------------------------------------------------- softmax


def _softmax64(x, dim):
    z = x.astype(np.float64)
    e = np.exp(z - z.max(axis=dim, keepdims=True))
    return (e / e.sum(axis=dim, keepdims=True)).astype(x.dtype)


def _log_softmax64(x, dim):
    z = x.astype(np.float64)
    m = z.max(axis=dim, keepdims=True)
    return (z - m - np.log(np.exp(z - m).sum(axis=dim, keepdims=True))).astype(x.dtype)


def _softmax_backward64(gy, y, dim):
    g, y64 = gy.astype(np.float64), y.astype(np.float64)
    return (y64 * (g - (g * y64).sum(axis=dim, keepdims=True))).astype(y.dtype)


def _log_softmax_backward64(gy, y, dim):
    g, y64 = gy.astype(np.float64), y.astype(np.float64)
    return (g - np.exp(y64) * g.sum(axis=dim, keepdims=True)).astype(y.dtype)


SOFTMAX = {
    "softmax": (_softmax64, _softmax_backward64),
    "log_softmax": (_log_softmax64, _log_softmax_backward64),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SOFTMAX))
@pytest.mark.parametrize("dim", [0, 1, 3])
def test_softmax_4d(name, dim, dtype):
    ops = _ops()
    fwd = _oracle(name, SOFTMAX[name][0])
    bwd = _oracle(f"{name}_backward", SOFTMAX[name][1])
    x = (_rng(3 + dim).standard_normal((2, 3, 2, 4)) * 4).astype(dtype)
    x[0, 0, 0, 0] = 60.0  # the max shift keeps exp finite
    gy = _rng(7).standard_normal(x.shape).astype(dtype)
    y = fwd(x, dim)
    _close_both(getattr(ops, name), y, x, dim)
    _close_both(getattr(ops, f"{name}_backward"), bwd(gy, y, dim), gy, y, dim)


@pytest.mark.parametrize("name", sorted(SOFTMAX))
def test_softmax_1d_and_nan(name):
    ops = _ops()
    fwd = _oracle(name, SOFTMAX[name][0])
    x = np.array([1.0, -2.0, 0.5, 3.0])
    assert_close(getattr(ops, name)(x, 0), fwd(x, 0))
    x2 = np.array([[1.0, np.nan, 2.0], [0.0, 1.0, 2.0]])
    y = getattr(ops, name)(x2, 1)
    assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1]))
    assert_close(y[1], fwd(x2[1:], 1)[0])


# --------------------------------------------------------------------------- adaptive pooling


def _windows(size, out):
    return [slice(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive64(x, output_size):
    N, C, H, W = x.shape
    OH, OW = output_size
    y = np.empty((N, C, OH, OW))
    for i, r in enumerate(_windows(H, OH)):
        for j, c in enumerate(_windows(W, OW)):
            y[:, :, i, j] = x.astype(np.float64)[:, :, r, c].mean(axis=(2, 3))
    return y.astype(x.dtype)


def _adaptive_backward64(gy, x_shape):
    N, C, H, W = x_shape
    OH, OW = gy.shape[2:]
    gx = np.zeros(x_shape)
    for i, r in enumerate(_windows(H, OH)):
        for j, c in enumerate(_windows(W, OW)):
            n = (r.stop - r.start) * (c.stop - c.start)
            gx[:, :, r, c] += (gy.astype(np.float64)[:, :, i, j] / n)[:, :, None, None]
    return gx.astype(gy.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "x_shape, out",
    [
        ((2, 3, 5, 5), (3, 3)),
        ((1, 2, 6, 5), (1, 1)),
        ((1, 2, 5, 7), (3, 2)),
        ((1, 1, 3, 2), (5, 4)),
    ],
)
def test_adaptive_avg_pool2d(x_shape, out, dtype):
    """5 -> 3 (overlapping windows), to (1, 1) (global), uneven, and upsampling (windows repeat)."""
    ops = _ops()
    fwd = _oracle("adaptive_avg_pool2d", _adaptive64)
    bwd = _oracle("adaptive_avg_pool2d_backward", _adaptive_backward64)
    x = _rng(8).standard_normal(x_shape).astype(dtype)
    gy = _rng(9).standard_normal(x_shape[:2] + out).astype(dtype)
    _close_both(ops.adaptive_avg_pool2d, fwd(x, out), x, out)
    _close_both(ops.adaptive_avg_pool2d_backward, bwd(gy, x_shape), gy, x_shape)
    # the kernels are each other's adjoints: <gy, pool(x)> == <pool_backward(gy), x>
    y64 = to_host(ops.adaptive_avg_pool2d(x, out)).astype(np.float64)
    gx64 = to_host(ops.adaptive_avg_pool2d_backward(gy, x_shape)).astype(np.float64)
    lhs, rhs = np.sum(gy * y64), np.sum(gx64 * x)
    assert abs(lhs - rhs) <= (1e-12 if dtype == np.float64 else 1e-5) * max(1.0, abs(lhs))


def test_adaptive_avg_pool2d_int_size():
    ops = _ops()
    x = _rng(10).standard_normal((1, 2, 4, 4))
    assert_close(ops.adaptive_avg_pool2d(x, 2), _adaptive64(x, (2, 2)))


# --------------------------------------------------------------------------- losses


def _cross_entropy64(z, labels, label_smoothing=0.0):
    z64 = z.astype(np.float64)
    n, L = z64.shape
    m = z64.max(1, keepdims=True)
    logp = z64 - m - np.log(np.exp(z64 - m).sum(1, keepdims=True))
    eps = label_smoothing
    loss = float(np.mean((1 - eps) * -logp[np.arange(n), labels] + eps * -logp.mean(1)))
    grad = np.exp(logp) - eps / L
    grad[np.arange(n), labels] -= 1 - eps
    return loss, (grad / n).astype(z.dtype)


def _ce_oracle():
    ref = reference.cross_entropy
    if "label_smoothing" in inspect.signature(ref).parameters:
        return ref
    return _cross_entropy64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_label_smoothing(eps, dtype):
    ops = _ops()
    z = (_rng(11).standard_normal((5, 7)) * 4).astype(dtype)
    z[1, 2] = 90.0
    labels = np.array([0, 2, 6, 3, 2])
    loss_ref, grad_ref = _ce_oracle()(z, labels, label_smoothing=eps)
    assert_close(_cross_entropy64(z, labels, eps)[1], grad_ref)  # the two oracles agree
    loss, grad = ops.cross_entropy(z, labels, eps)
    assert isinstance(loss, float) and isinstance(grad, np.ndarray)
    assert abs(loss - loss_ref) <= 1e-10 * max(1.0, abs(loss_ref))
    assert_close(grad, grad_ref)
    zd, ld = to_device(z, labels)
    loss_d, grad_d = ops.cross_entropy_device(zd, ld, label_smoothing=eps)
    assert is_numba_device(loss_d) and is_numba_device(grad_d) and loss_d.shape == (1,)
    assert abs(float(to_host(loss_d)[0]) - loss_ref) <= 1e-10 * max(1.0, abs(loss_ref))
    assert_close(grad_d, grad_ref)


def test_cross_entropy_default_is_unsmoothed_bit_for_bit():
    ops = _ops()
    z = _rng(12).standard_normal((4, 6))
    labels = np.array([5, 0, 1, 1])
    a, ga = ops.cross_entropy(z, labels)
    b, gb = ops.cross_entropy(z, labels, 0.0)
    assert a == b and ga.tobytes() == gb.tobytes()
    # an infinitely negative logit (a mask) keeps the unsmoothed loss finite
    z[0, 3] = -np.inf
    loss, grad = ops.cross_entropy(z, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


def _nll64(logp, labels):
    n = logp.shape[0]
    loss = float(-np.mean(logp.astype(np.float64)[np.arange(n), labels]))
    grad = np.zeros(logp.shape)
    grad[np.arange(n), labels] = -1.0 / n
    return loss, grad.astype(logp.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_loss(dtype):
    ops = _ops()
    logp = _log_softmax64(_rng(13).standard_normal((6, 4)), 1).astype(dtype)
    labels = np.array([0, 3, 1, 1, 2, 3])
    loss_ref, grad_ref = _oracle("nll_loss", _nll64)(logp, labels)
    for args in ((logp, labels), tuple(to_device(logp, labels))):
        loss, grad = ops.nll_loss(*args)
        assert isinstance(loss, float)
        assert abs(loss - loss_ref) <= 1e-10 * max(1.0, abs(loss_ref))
        assert_close(grad, grad_ref)
    assert is_numba_device(grad)


def test_nll_loss_bad_device_label_gives_nan():
    ops = _ops()
    loss, grad = ops.nll_loss(*to_device(np.zeros((2, 3)), np.array([1, -1])))
    assert np.isnan(loss) and np.all(np.isnan(to_host(grad)[1]))
    assert_close(to_host(grad)[0], [0.0, -0.5, 0.0])


# --------------------------------------------------------------------------- cat / split


def _split64(gy, sizes, dim):
    return np.split(gy, np.cumsum(sizes)[:-1], axis=dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_cat_split(dim, dtype):
    ops = _ops()
    rng = _rng(14)
    sizes = [2, 0, 3, 1]
    parts = []
    for c in sizes:
        shape = [2, 3, 4]
        shape[dim] = c
        parts.append(rng.standard_normal(shape).astype(dtype))
    ref_cat = _oracle("cat", lambda a, d: np.concatenate(a, axis=d))
    y = ops.cat(parts, dim)
    assert_close(y, ref_cat(parts, dim))
    yd = ops.cat(to_device(*parts), dim)
    assert is_numba_device(yd)
    assert_close(yd, ref_cat(parts, dim))
    ref_split = _oracle("split", _split64)(y, sizes, dim)
    for got in (ops.split(y, sizes, dim), ops.split(yd, sizes, dim)):
        assert len(got) == len(sizes)
        for g, r in zip(got, ref_split):
            assert_close(g, r)
    assert all(is_numba_device(p) for p in ops.split(yd, sizes, dim))


def test_split_sizes_must_add_up():
    with pytest.raises(ValueError, match="split: sizes"):
        _ops().split(np.zeros((2, 5)), [2, 2], 1)


# --------------------------------------------------------------------------- binary / scale

NP_OPS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "sa, sb",
    [
        ((1, 3, 1, 1), (2, 3, 2, 3)),  # a bias against an activation
        ((2, 3, 2, 3), (1,)),  # scalar-like
        ((3, 1), (1, 4)),  # both broadcast
        ((4,), (2, 3, 4)),  # fewer dimensions
        ((2, 1, 2, 1, 2, 3), (2, 1, 3)),  # six dimensions
        ((2, 3), (2, 3)),  # none
        ((), (2, 3)),  # a 0-d operand
    ],
)
def test_binary_broadcasts_like_numpy(sa, sb, dtype):
    ops = _ops()
    rng = _rng(15)
    a = rng.standard_normal(sa).astype(dtype)
    b = (rng.random(sb) + 0.5).astype(dtype)  # away from 0 for "div"
    for op, f in NP_OPS.items():
        expected = f(a.astype(np.float64), b.astype(np.float64)).astype(dtype)
        assert_close(ops.binary(op, a, b), expected, what=f"{op} host")
        assert_close(ops.binary(op, b, a), f(b.astype(np.float64), a), dtype, f"{op} swapped")
    ad, bd = to_device(a, b)
    out = ops.binary("mul", ad, bd)
    assert is_numba_device(out)
    assert_close(out, (a.astype(np.float64) * b).astype(dtype))


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")  # simulator
def test_binary_rejects_unknown_op_and_divides_like_ieee():
    ops = _ops()
    with pytest.raises(ValueError, match="binary: op must be"):
        ops.binary("pow", np.ones(2), np.ones(2))
    assert ops.binary("add", np.full((), 2.0), np.ones(())).shape == ()
    y = ops.binary("div", np.array([1.0, -1.0, 0.0]), np.array([0.0]))
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale(dtype):
    x = _rng(16).standard_normal((3, 5)).astype(dtype)
    _close_both(_ops().scale, (x.astype(np.float64) * -0.3).astype(dtype), x, -0.3)


# --------------------------------------------------------------------------- sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 1, 1),  # a bias gradient (one block per output)
        (3, 1, 1),  # fewer dimensions
        (2, 3, 4, 1),  # five terms each, 24 outputs (blocks)
        (1,),  # everything into one
        (),  # a 0-d result
        (2, 3, 4, 5),  # nothing to reduce
        (2, 1, 4, 5),  # three terms each, 40 outputs (one thread each)
    ],
)
def test_sum_to(shape, dtype):
    ops = _ops()
    a = _rng(17).standard_normal((2, 3, 4, 5)).astype(dtype)
    lead = a.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + k for k, n in enumerate(shape) if n == 1 and a.shape[lead + k] != 1
    )
    expected = a.astype(np.float64).sum(axis=axes, keepdims=True).reshape(shape).astype(dtype)
    _close_both(ops.sum_to, expected, a, shape)


def test_sum_to_many_outputs_and_is_deterministic():
    """Many outputs (one thread each) and few outputs of many terms (block tree sums): both
    give the same bits on every call."""
    ops = _ops()
    a = _rng(18).standard_normal((9, 80)).astype(np.float32)
    for shape in ((1, 80), (9, 1)):
        first = ops.sum_to(a, shape)
        assert_close(
            first,
            a.astype(np.float64)
            .sum(axis=0 if shape[0] == 1 else 1, keepdims=True)
            .astype(np.float32),
        )
        assert ops.sum_to(a, shape).tobytes() == first.tobytes()
    with pytest.raises(ValueError, match="sum_to: shape"):
        ops.sum_to(a, (2, 80))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "axes, keepdims",
    [(None, False), (None, True), (0, False), ((1, 3), True), (-1, False), ((0, 2), False)],
)
def test_sum_axes(axes, keepdims, dtype):
    ops = _ops()
    a = _rng(19).standard_normal((2, 3, 2, 4)).astype(dtype)
    expected = np.asarray(a.astype(np.float64).sum(axis=axes, keepdims=keepdims)).astype(dtype)
    _close_both(ops.sum_axes, expected, a, axes, keepdims)


def test_sum_axes_rejects_bad_axis():
    with pytest.raises(ValueError, match="sum_axes: axis 3"):
        _ops().sum_axes(np.zeros((2, 2)), 3)


# --------------------------------------------------------------------------- matmul / index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k, n", [(5, 7, 3), (1, 4, 1), (12, 3, 9)])
def test_matmul(m, k, n, dtype):
    rng = _rng(20)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    _close_both(_ops().matmul, (a.astype(np.float64) @ b).astype(dtype), a, b)


INDICES = [
    (slice(1, None, 2), 0),
    (Ellipsis, slice(None, None, -1)),
    (None, 1, Ellipsis, slice(0, 3)),
    (-1, -2, 1),
    (slice(None), None, slice(3, 0, -2), 2),
    2,
    (slice(5, 9),),  # an empty view
]


@pytest.mark.parametrize("index", INDICES, ids=[str(i) for i in range(len(INDICES))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_index_backward(index, dtype):
    shape = (3, 4, 5)
    view_shape = np.zeros(shape)[index].shape
    gy = _rng(21).standard_normal(view_shape).astype(dtype)
    expected = np.zeros(shape, dtype)
    expected[index] = gy
    host, dev = _both(_ops().index_backward, gy, shape, index)
    assert to_host(host).tobytes() == expected.tobytes()  # a copy: exact
    assert to_host(dev).tobytes() == expected.tobytes()


def test_index_backward_rejects_advanced_indices_and_wrong_shapes():
    ops = _ops()
    with pytest.raises(TypeError, match="basic"):
        ops.index_backward(np.zeros(2), (4,), (np.array([0, 1]),))
    with pytest.raises(ValueError, match="indexed shape"):
        ops.index_backward(np.zeros(3), (4,), slice(0, 2))


def test_contiguous():
    ops = _ops()
    a = _rng(22).standard_normal((3, 6))
    (d,) = to_device(a)
    assert ops.contiguous(d) is d
    c = ops.contiguous(d[:, ::2])
    assert is_numba_device(c) and c.is_c_contiguous()
    assert_close(c, a[:, ::2])
    h = ops.contiguous(a.T)
    assert isinstance(h, np.ndarray) and h.flags.c_contiguous
    assert_close(h, a.T)
