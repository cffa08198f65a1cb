"""Every differentiable op on the tape, checked two ways on the Tensor path:

1. ``fc.gradcheck`` (float64 central differences) on the oracle backend and on the CPU
   kernels, on named edge cases and on small random shapes from hypothesis;
2. the CPU kernels in float32 (forward and every gradient) against the float64 oracle, with
   the float32 tolerance of ``tests.helpers.TOL``.

Ops with kinks (ReLU, max pooling and the fused ops containing them) get inputs away from 0
and without ties inside a pooling window, so finite differences are valid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import fastconv as fc
from fastconv import functional as F
from fastconv import reference as R
from tests.helpers import assert_close
from tests.strategies import conv_configs

BACKENDS = ("reference", "cpu")
RANDOM = settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
MARGIN = 1e-3  # distance from a kink (and between tied maxima) that finite differences respect


# --------------------------------------------------------------------------- inputs


def normal(rng, *shape):
    return rng.standard_normal(shape)


def distinct(rng, *shape, step=0.1):
    """Values k * step for distinct half-integers k, shuffled: no zeros, no ties, gaps of
    ``step`` (ReLU and max pooling are differentiable at every element)."""
    n = int(np.prod(shape, dtype=np.int64))
    return ((rng.permutation(n) - n // 2 + 0.5) * step).reshape(shape)


def away_from_zero(rng, *shape):
    """Normal values pushed at least 0.1 away from 0 (a safe denominator)."""
    x = rng.standard_normal(shape)
    return np.where(x < 0, x - 0.1, x + 0.1)


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def cast(a, like):
    """A float constant of ``like``'s dtype (a fresh copy each call)."""
    return np.array(a, dtype=like.dtype)


def redraw(rng, make, ok, tries=200):
    """``make(rng)`` again until ``ok(arrays)``: random inputs kept clear of kinks."""
    for _ in range(tries):
        arrays = make(rng)
        if ok(arrays):
            return arrays
    raise AssertionError("no kink-free input found")


def clear_of_relu(z) -> bool:
    """No pre-activation near 0, except exact zeros (outputs that see only zero padding and
    no bias: constant, so both gradients are 0)."""
    z = np.abs(z)
    return bool(np.all((z > MARGIN) | (z == 0)))


def clear_of_pool_ties(z, kh, kw) -> bool:
    """Every pooled window (stride = window, floor mode) whose maximum is positive has one
    clear winner."""
    N, C, H, W = z.shape
    for i in range(0, H - kh + 1, kh):
        for j in range(0, W - kw + 1, kw):
            win = np.sort(z[:, :, i : i + kh, j : j + kw].reshape(N, C, -1), axis=-1)
            top = win[..., -1]
            second = win[..., -2] if win.shape[-1] > 1 else np.full_like(top, -np.inf)
            if np.any((top > 0) & (top - second <= MARGIN)):
                return False
    return True


# --------------------------------------------------------------------------- the checks


def run_gradcheck(fn: Callable, arrays: list, backend: str) -> None:
    inputs = [fc.Tensor(np.array(a, dtype=np.float64), requires_grad=True) for a in arrays]
    with fc.using(backend=backend):
        assert fc.gradcheck(fn, inputs)


def forward_backward(fn: Callable, arrays: list, dtype, backend: str, seed: int = 7):
    """(output, gradients) of the Tensor path, backward from a fixed random direction."""
    inputs = [fc.Tensor(np.array(a, dtype=dtype), requires_grad=True) for a in arrays]
    with fc.using(backend=backend):
        y = fn(*inputs)
        assert isinstance(y, fc.Tensor) and y.dtype == np.dtype(dtype)
        v = np.asarray(np.random.default_rng(seed).standard_normal(y.shape), dtype=dtype)
        y.backward(v)
    return y.numpy(), [t.grad for t in inputs]


def check_float32(fn: Callable, arrays: list) -> None:
    """CPU kernels in float32 against the oracle in float64: forward, then every gradient."""
    y_ref, g_ref = forward_backward(fn, arrays, np.float64, "reference")
    y, g = forward_backward(fn, arrays, np.float32, "cpu")
    assert_close(y, y_ref, np.float32, "forward")
    for i, (a, e) in enumerate(zip(g, g_ref)):
        assert (a is None) == (e is None), f"gradient {i}: None on one side only"
        if e is not None:
            assert_close(a, e, np.float32, f"gradient {i}")


def check_all(fn: Callable, arrays: list) -> None:
    for backend in BACKENDS:
        run_gradcheck(fn, arrays, backend)
    check_float32(fn, arrays)


# --------------------------------------------------------------------------- named cases


class Case(NamedTuple):
    name: str
    make: Callable[[np.random.Generator], tuple[Callable, list]]  # rng -> (fn, arrays)


CASES: list[Case] = []


def case(name: str):
    def register(make):
        CASES.append(Case(name, make))
        return make

    return register


def conv_case(name, x_shape, w_shape, bias=True, op=F.conv2d, pool=None, **kw):
    """A conv2d-family case; fused ReLU/pooling variants get kink-free inputs."""

    def fn(x, w, b=None):
        if pool is not None:
            return op(x, w, b, pool=pool, **kw)
        return op(x, w, b, **kw)

    def make(rng):
        def draw(rng):
            out = [normal(rng, *x_shape), normal(rng, *w_shape)]
            return out + [normal(rng, w_shape[0])] if bias else out

        if op is F.conv2d:
            return fn, draw(rng)

        def ok(arrays):
            z = R.conv2d(*arrays[:2], arrays[2] if bias else None, **kw)
            if not clear_of_relu(z):
                return False
            return pool is None or clear_of_pool_ties(np.maximum(z, 0), *_pair(pool))

        return fn, redraw(rng, draw, ok)

    case(name)(make)


# convolution
conv_case("conv2d", (2, 2, 4, 5), (3, 2, 3, 3))
conv_case("conv2d-stride2", (1, 2, 5, 5), (3, 2, 3, 3), stride=2, padding=1)
conv_case("conv2d-stride-gt-kernel", (1, 2, 7, 5), (2, 2, 2, 2), stride=3)
conv_case("conv2d-same", (1, 2, 4, 5), (2, 2, 3, 3), padding="same")
conv_case("conv2d-same-even-kernel", (1, 2, 4, 5), (2, 2, 2, 4), padding="same")
conv_case("conv2d-valid", (1, 1, 4, 4), (2, 1, 3, 2), padding="valid")
conv_case("conv2d-dilation2", (1, 2, 6, 6), (2, 2, 2, 3), dilation=2, padding=(1, 0))
conv_case("conv2d-groups2", (1, 4, 4, 4), (4, 2, 3, 3), groups=2, padding=1)
conv_case("conv2d-depthwise", (1, 3, 4, 4), (3, 1, 3, 3), groups=3, padding=1)
conv_case("conv2d-depthwise-x2", (2, 2, 3, 4), (4, 1, 2, 2), groups=2)
conv_case("conv2d-1x1", (2, 3, 3, 3), (4, 3, 1, 1))
conv_case("conv2d-no-bias", (2, 2, 4, 4), (3, 2, 3, 3), bias=False, padding=1)
conv_case("conv2d-rect-stride", (1, 2, 5, 6), (2, 2, 3, 2), stride=(2, 1), padding=(0, 1))
conv_case("conv2d_relu", (2, 2, 4, 4), (3, 2, 3, 3), op=F.conv2d_relu, padding=1)
conv_case(
    "conv2d_relu-stride2-groups2", (1, 4, 5, 5), (4, 2, 3, 3), op=F.conv2d_relu, stride=2, groups=2
)
conv_case("conv2d_relu-no-bias", (1, 2, 4, 4), (2, 2, 3, 3), bias=False, op=F.conv2d_relu)
conv_case("conv2d_relu_maxpool-2", (2, 2, 5, 5), (3, 2, 2, 2), op=F.conv2d_relu_maxpool, pool=2)
conv_case(
    "conv2d_relu_maxpool-2x3",
    (1, 2, 6, 7),
    (2, 2, 3, 3),
    op=F.conv2d_relu_maxpool,
    pool=(2, 3),
    padding=1,
)
conv_case(
    "conv2d_relu_maxpool-no-bias",
    (1, 2, 5, 5),
    (2, 2, 2, 2),
    bias=False,
    op=F.conv2d_relu_maxpool,
    pool=2,
)


def _convt(name, x_shape, w_shape, bias=True, **kw):
    def fn(x, w, b=None):
        return F.conv_transpose2d(x, w, b, **kw)

    def make(rng):
        out = [normal(rng, *x_shape), normal(rng, *w_shape)]
        if bias:
            out.append(normal(rng, w_shape[1] * kw.get("groups", 1)))
        return fn, out

    case(name)(make)


_convt("conv_transpose2d", (2, 2, 3, 3), (2, 3, 3, 3))
_convt(
    "conv_transpose2d-stride2-outpad",
    (1, 2, 3, 2),
    (2, 2, 3, 3),
    stride=2,
    padding=1,
    output_padding=1,
)
_convt("conv_transpose2d-groups2", (1, 4, 3, 3), (4, 1, 2, 2), groups=2)
_convt("conv_transpose2d-dilation2-no-bias", (1, 2, 3, 3), (2, 2, 2, 2), bias=False, dilation=2)


def _conv1d(name, x_shape, w_shape, bias=True, **kw):
    def fn(x, w, b=None):
        return F.conv1d(x, w, b, **kw)

    def make(rng):
        out = [normal(rng, *x_shape), normal(rng, *w_shape)]
        return fn, out + [normal(rng, w_shape[0])] if bias else out

    case(name)(make)


_conv1d("conv1d", (2, 2, 6), (3, 2, 3))
_conv1d("conv1d-stride2-pad1", (1, 2, 7), (2, 2, 3), stride=2, padding=1)
_conv1d("conv1d-same-dilation2", (1, 2, 6), (2, 2, 3), padding="same", dilation=2)
_conv1d("conv1d-groups2-no-bias", (1, 4, 5), (2, 2, 2), bias=False, groups=2)


# pooling
def _pool(name, fn, shape, kink=True):
    case(name)(lambda rng: (fn, [(distinct if kink else normal)(rng, *shape)]))


_pool("max_pool2d", lambda x: F.max_pool2d(x, 2), (2, 2, 4, 5))
_pool("max_pool2d-pad-overlap", lambda x: F.max_pool2d(x, 3, 2, 1), (1, 2, 5, 5))
_pool("max_pool2d-ceil", lambda x: F.max_pool2d(x, 2, 2, ceil_mode=True), (1, 2, 5, 5))
_pool("max_pool2d-rect", lambda x: F.max_pool2d(x, (2, 3), (1, 2)), (1, 1, 4, 7))
_pool(
    "max_pool2d-overlap-ceil-pad", lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), (1, 1, 6, 6)
)
_pool("avg_pool2d", lambda x: F.avg_pool2d(x, 2), (2, 2, 4, 4), kink=False)
for _cip in (True, False):
    _pool(
        f"avg_pool2d-pad1-count_include_pad={_cip}",
        lambda x, cip=_cip: F.avg_pool2d(x, 3, 2, 1, count_include_pad=cip),
        (1, 2, 5, 5),
        kink=False,
    )
    _pool(
        f"avg_pool2d-ceil-count_include_pad={_cip}",
        lambda x, cip=_cip: F.avg_pool2d(x, 2, 2, 1, ceil_mode=True, count_include_pad=cip),
        (1, 1, 5, 6),
        kink=False,
    )
_pool("adaptive_avg_pool2d-to-1", lambda x: F.adaptive_avg_pool2d(x, 1), (2, 2, 3, 4), kink=False)
_pool(
    "adaptive_avg_pool2d-3-from-5", lambda x: F.adaptive_avg_pool2d(x, 3), (1, 2, 5, 5), kink=False
)
_pool(
    "adaptive_avg_pool2d-larger",
    lambda x: F.adaptive_avg_pool2d(x, (6, 7)),
    (1, 1, 4, 5),
    kink=False,
)
_pool(
    "adaptive_avg_pool2d-none",
    lambda x: F.adaptive_avg_pool2d(x, (None, 2)),
    (1, 2, 3, 5),
    kink=False,
)


# activations
def _unary(name, fn, shape=(2, 3, 2, 2), kink=True):
    case(name)(lambda rng: (fn, [(distinct if kink else normal)(rng, *shape)]))


_unary("relu", F.relu)
_unary("leaky_relu", lambda x: F.leaky_relu(x, 0.2))
_unary("elu", F.elu)
_unary("elu-alpha0.5", lambda x: F.elu(x, 0.5), (3, 5))
_unary("sigmoid", F.sigmoid, kink=False)
_unary("tanh", F.tanh, kink=False)
for _dim in (0, 1, -1):
    _unary(f"softmax-dim{_dim}", lambda x, d=_dim: F.softmax(x, d), kink=False)
    _unary(f"log_softmax-dim{_dim}", lambda x, d=_dim: F.log_softmax(x, d), kink=False)
_unary("Tensor.relu", lambda x: x.relu())
_unary("Tensor.softmax", lambda x: x.softmax(2), kink=False)
_unary("Tensor.log_softmax", lambda x: x.log_softmax(1), kink=False)


# linear
@case("linear")
def _(rng):
    return F.linear, [normal(rng, 3, 4), normal(rng, 2, 4), normal(rng, 2)]


@case("linear-no-bias")
def _(rng):
    return F.linear, [normal(rng, 3, 4), normal(rng, 5, 4)]


@case("linear_relu")
def _(rng):
    def ok(a):
        return clear_of_relu(R.linear(*a))

    return F.linear_relu, redraw(
        rng, lambda r: [normal(r, 4, 3), normal(r, 3, 3), normal(r, 3)], ok
    )


@case("linear_relu-no-bias")
def _(rng):
    return F.linear_relu, redraw(
        rng, lambda r: [normal(r, 2, 5), normal(r, 3, 5)], lambda a: clear_of_relu(a[0] @ a[1].T)
    )


# dropout
@case("dropout-bool-mask")
def _(rng):
    mask = rng.random((2, 3, 4)) > 0.4
    return (lambda x: F.dropout(x, mask, 1 / 0.6)), [normal(rng, 2, 3, 4)]


@case("dropout-float-mask")
def _(rng):
    mask = (rng.random((3, 5)) > 0.5).astype(np.float64)
    return (lambda x: F.dropout(x, cast(mask, x), 2.0)), [normal(rng, 3, 5)]


# batch norm
def _bn(name, fn, x_shape, training, affine):
    C = x_shape[1]

    def make(rng):
        mean, var = normal(rng, C) * 0.1, rng.random(C) + 0.5

        def f(x, w=None, b=None):
            return fn(x, cast(mean, x), cast(var, x), w, b, training, 0.1, 1e-5)

        arrays = [normal(rng, *x_shape)]
        if affine:
            arrays += [normal(rng, C), normal(rng, C)]
        return f, arrays

    case(name)(make)


for _training in (True, False):
    for _affine in (True, False):
        tag = f"{'train' if _training else 'eval'}-{'affine' if _affine else 'plain'}"
        _bn(f"batch_norm2d-{tag}", F.batch_norm2d, (2, 3, 2, 3), _training, _affine)
        _bn(f"batch_norm1d-NC-{tag}", F.batch_norm1d, (4, 3), _training, _affine)
        _bn(f"batch_norm1d-NCL-{tag}", F.batch_norm1d, (2, 2, 3), _training, _affine)


@case("batch_norm2d-train-no-running-stats")
def _(rng):
    return (lambda x, w, b: F.batch_norm2d(x, None, None, w, b, True)), [
        normal(rng, 3, 2, 2, 2),
        normal(rng, 2),
        normal(rng, 2),
    ]


@case("batch_norm2d-weight-only")
def _(rng):
    return (lambda x, w: F.batch_norm2d(x, None, None, w, None, True)), [
        normal(rng, 2, 2, 2, 2),
        normal(rng, 2),
    ]


for _training, _residual in ((True, True), (False, False)):

    @case(f"batch_norm2d_relu-{'train' if _training else 'eval'}-residual={_residual}")
    def _(rng, training=_training, residual=_residual):
        shape, C = (2, 3, 2, 3), 3
        mean, var = normal(rng, C), rng.random(C) + 0.5

        def fn(x, w, b, r=None):
            rm, rv = cast(mean, x), cast(var, x)
            return F.batch_norm2d_relu(x, rm, rv, w, b, training, residual=r)

        def draw(rng):
            out = [normal(rng, *shape), normal(rng, C), normal(rng, C)]
            return out + ([normal(rng, *shape)] if residual else [])

        def ok(a):
            z = R.batch_norm2d(a[0], a[1], a[2], mean.copy(), var.copy(), training)[0]
            return clear_of_relu(z + a[3] if residual else z)

        return fn, redraw(rng, draw, ok)


# losses
for _ls in (0.0, 0.1):

    @case(f"cross_entropy-label_smoothing={_ls}")
    def _(rng, ls=_ls):
        labels = rng.integers(0, 4, 5)
        return (lambda z: F.cross_entropy(z, labels, label_smoothing=ls)), [normal(rng, 5, 4)]


@case("nll_loss")
def _(rng):
    labels = rng.integers(0, 3, 4)
    return (lambda z: F.nll_loss(z, labels)), [normal(rng, 4, 3)]


@case("nll_loss-after-log_softmax")
def _(rng):
    labels = rng.integers(0, 5, 3)
    return (lambda z: F.nll_loss(F.log_softmax(z, 1), labels)), [normal(rng, 3, 5)]


@case("mse_loss-pred-and-target")
def _(rng):
    return F.mse_loss, [normal(rng, 3, 4), normal(rng, 3, 4)]


@case("mse_loss-scaled-upstream")
def _(rng):
    return (lambda p, t: F.mse_loss(p, t) * 3.0), [normal(rng, 2, 2, 3), normal(rng, 2, 2, 3)]


# arithmetic with broadcasting
_BINARY = {"add": F.add, "sub": F.sub, "mul": F.mul, "div": F.div}
for _op, _f in _BINARY.items():
    for _sa, _sb in (
        ((2, 3, 4, 5), (3, 1, 1)),
        ((3, 1, 1), (2, 3, 4, 5)),
        ((2, 3, 4, 5), (1,)),
        ((1, 3, 1, 5), (2, 1, 4, 1)),
        ((), (2, 3)),
    ):

        @case(f"{_op}-{_sa}-{_sb}")
        def _(rng, f=_f, sa=_sa, sb=_sb):
            return f, [normal(rng, *sa), away_from_zero(rng, *sb)]

    @case(f"{_op}-scalar-right")
    def _(rng, f=_f):
        return (lambda x: f(x, 2.5)), [away_from_zero(rng, 2, 3)]

    @case(f"{_op}-scalar-left")
    def _(rng, f=_f):
        return (lambda x: f(-1.5, x)), [away_from_zero(rng, 2, 3)]


@case("operators")
def _(rng):
    def fn(a, b):
        return (2.0 - a) * b / (b * b + 1.0) + (-a) / 3.0 - 1.0 + a

    return fn, [normal(rng, 2, 3), normal(rng, 3)]


@case("matmul")
def _(rng):
    return F.matmul, [normal(rng, 3, 4), normal(rng, 4, 2)]


@case("matmul-operator-and-T")
def _(rng):
    return (lambda a, b: a @ b.T), [normal(rng, 2, 3), normal(rng, 4, 3)]


# reductions and shape ops
_X4 = (2, 3, 2, 3)
for _red in ("sum", "mean"):
    for _axis, _keep in (
        (None, False),
        (None, True),
        (1, False),
        (-1, True),
        ((0, 2), False),
        ((1, 3), True),
    ):
        _unary(
            f"{_red}-axis={_axis}-keepdims={_keep}",
            lambda x, r=_red, a=_axis, k=_keep: getattr(F, r)(x, a, k),
            _X4,
            kink=False,
        )
_unary("Tensor.sum-mean", lambda x: x.sum(0) * x.mean(axis=(1, 2), keepdims=False).sum(), (2, 3, 2))
_unary("reshape", lambda x: F.reshape(x, (3, -1)), _X4, kink=False)
_unary("Tensor.view", lambda x: x.view(6, 6) * 2.0, _X4, kink=False)
_unary("flatten-start1", lambda x: F.flatten(x, 1), _X4, kink=False)
_unary("flatten-start2", lambda x: F.flatten(x, 2), _X4, kink=False)
_unary("flatten-1-to-2", lambda x: F.flatten(x, 1, 2), _X4, kink=False)
_unary("Tensor.flatten", lambda x: x.flatten(), _X4, kink=False)
_unary("transpose", F.transpose, (3, 4), kink=False)
_unary("getitem-channel-slice", lambda x: x[:, 1:3], (2, 4, 2, 2), kink=False)
_unary("getitem-int", lambda x: x[1], (3, 2, 2), kink=False)
_unary("getitem-int-inner", lambda x: x[:, -1], (3, 2, 2), kink=False)
_unary("getitem-step", lambda x: x[::2, 1::2], (5, 4), kink=False)
_unary("getitem-ellipsis", lambda x: x[..., 1], (2, 3, 3), kink=False)
_unary("getitem-none", lambda x: x[None, :, 0], (3, 2), kink=False)
_unary("getitem-overlapping-sum", lambda x: x[:, :2] + x[:, 1:], (2, 3), kink=False)


@case("cat-dim0-three")
def _(rng):
    return (lambda a, b, c: F.cat([a, b, c], 0)), [
        normal(rng, 1, 3),
        normal(rng, 2, 3),
        normal(rng, 3, 3),
    ]


@case("cat-dim1-three")
def _(rng):
    return (lambda a, b, c: F.cat((a, b, c), 1)), [
        normal(rng, 2, 1, 2, 2),
        normal(rng, 2, 3, 2, 2),
        normal(rng, 2, 2, 2, 2),
    ]


@case("cat-same-tensor-twice")
def _(rng):
    return (lambda a, b: F.cat([a, b, a], -1)), [normal(rng, 2, 2), normal(rng, 2, 1)]


def _ids(cases):
    return [c.name for c in cases]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=_ids(CASES))
def test_gradcheck(c: Case, backend: str) -> None:
    fn, arrays = c.make(np.random.default_rng(0))
    run_gradcheck(fn, arrays, backend)


@pytest.mark.parametrize("c", CASES, ids=_ids(CASES))
def test_cpu_float32_matches_oracle(c: Case) -> None:
    fn, arrays = c.make(np.random.default_rng(0))
    check_float32(fn, arrays)


def test_every_recorded_op_has_a_case() -> None:
    """Every op of the registry that records on the tape is covered above (``to`` below)."""
    covered = set()
    for c in CASES:
        fn, arrays = c.make(np.random.default_rng(0))
        inputs = [fc.Tensor(a, requires_grad=True) for a in arrays]
        with fc.using(backend="reference"):
            seen, stack = set(), [fn(*inputs)._node]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            covered.add(node.name)
            stack += [t._node for t in node.inputs if isinstance(t, fc.Tensor)]
    assert set(fc.ops.OPS) - covered == {"to"}


# --------------------------------------------------------------------------- `to`


def test_to_float64_and_back_values_and_grads() -> None:
    x32 = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    x = fc.Tensor(x32, requires_grad=True)
    y = x.to(np.float64)
    assert y.dtype == np.float64 and y.grad_fn == "to"
    np.testing.assert_array_equal(y.numpy(), x32.astype(np.float64))
    z = y.to(np.float32)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z.numpy(), x32)
    (z * z).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, 2 * x32, rtol=1e-6)


def test_to_float32_gradient_comes_back_as_float64() -> None:
    x64 = np.random.default_rng(2).standard_normal(4)
    x = fc.Tensor(x64, requires_grad=True)
    y = x.to(np.float32)
    assert y.dtype == np.float32
    v = np.arange(4, dtype=np.float32)
    (y * fc.Tensor(v)).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_array_equal(x.grad, v.astype(np.float64))


def test_to_same_dtype_or_device_returns_self() -> None:
    x = fc.Tensor(np.ones(3), requires_grad=True)
    assert x.to(np.float64) is x
    assert x.to("cpu") is x


# --------------------------------------------------------------------------- random shapes


@RANDOM
@given(
    cfg=conv_configs(max_batch=2, max_cg=2, max_k=3, max_dilation=2, max_extra=2),
    bias=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_conv2d(cfg, bias, relu, seed) -> None:
    kw = {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
    op = F.conv2d_relu if relu else F.conv2d
    K = cfg["w_shape"][0]

    def draw(rng):
        out = [normal(rng, *cfg["x_shape"]), normal(rng, *cfg["w_shape"])]
        return out + [normal(rng, K)] if bias else out

    def ok(a):
        return not relu or clear_of_relu(R.conv2d(a[0], a[1], a[2] if bias else None, **kw))

    arrays = redraw(np.random.default_rng(seed), draw, ok)
    check_all(lambda x, w, b=None: op(x, w, b, **kw), arrays)


@RANDOM
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 2),
    k=st.integers(1, 3),
    pool=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_conv2d_relu_maxpool(n, c, k, pool, extra, bias, seed) -> None:
    x_shape = (n, c, k - 1 + pool[0] + extra[0], k - 1 + pool[1] + extra[1])
    w_shape = (2, c, k, k)

    def draw(rng):
        out = [normal(rng, *x_shape), normal(rng, *w_shape)]
        return out + [normal(rng, 2)] if bias else out

    def ok(a):
        z = R.conv2d(a[0], a[1], a[2] if bias else None)
        return clear_of_relu(z) and clear_of_pool_ties(np.maximum(z, 0), *pool)

    arrays = redraw(np.random.default_rng(seed), draw, ok)
    check_all(lambda x, w, b=None: F.conv2d_relu_maxpool(x, w, b, pool=pool), arrays)


@RANDOM
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 2),
    cout=st.integers(1, 2),
    hw=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_conv_transpose2d(n, cin, cout, hw, k, stride, bias, seed) -> None:
    rng = np.random.default_rng(seed)
    arrays = [normal(rng, n, cin, *hw), normal(rng, cin, cout, *k)]
    if bias:
        arrays.append(normal(rng, cout))
    check_all(lambda x, w, b=None: F.conv_transpose2d(x, w, b, stride), arrays)


@st.composite
def pool_configs(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    H = draw(st.integers(max(1, kh - 2 * ph), 5))
    W = draw(st.integers(max(1, kw - 2 * pw), 5))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ceil = draw(st.booleans())
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return (n, c, H, W), (kh, kw), stride, (ph, pw), ceil


@RANDOM
@given(
    cfg=pool_configs(),
    kind=st.sampled_from(["max", "avg", "avg-exclude-pad"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_pooling(cfg, kind, seed) -> None:
    shape, k, stride, pad, ceil = cfg
    rng = np.random.default_rng(seed)
    if kind == "max":
        fn = lambda x: F.max_pool2d(x, k, stride, pad, ceil_mode=ceil)  # noqa: E731
        arrays = [distinct(rng, *shape)]
    else:
        opts = {"ceil_mode": ceil, "count_include_pad": kind == "avg"}
        fn = lambda x: F.avg_pool2d(x, k, stride, pad, **opts)  # noqa: E731
        arrays = [normal(rng, *shape)]
    check_all(fn, arrays)


@RANDOM
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)),
    out=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_adaptive_avg_pool2d(shape, out, seed) -> None:
    arrays = [normal(np.random.default_rng(seed), *shape)]
    check_all(lambda x: F.adaptive_avg_pool2d(x, out), arrays)


_UNARY = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "elu": lambda x: F.elu(x, 0.7),
    "sigmoid": F.sigmoid,
    "tanh": F.tanh,
}


@RANDOM
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    name=st.sampled_from(sorted(_UNARY)),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_elementwise(shape, name, seed) -> None:
    check_all(_UNARY[name], [distinct(np.random.default_rng(seed), *shape, step=0.37)])


@RANDOM
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple),
    log=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_softmax(shape, log, data, seed) -> None:
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    fn = F.log_softmax if log else F.softmax
    check_all(lambda x: fn(x, dim), [normal(np.random.default_rng(seed), *shape)])


@RANDOM
@given(
    n=st.integers(1, 3),
    fin=st.integers(1, 4),
    fout=st.integers(1, 4),
    bias=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_linear(n, fin, fout, bias, relu, seed) -> None:
    def draw(rng):
        out = [normal(rng, n, fin), normal(rng, fout, fin)]
        return out + [normal(rng, fout)] if bias else out

    def ok(a):
        return not relu or clear_of_relu(R.linear(a[0], a[1], a[2] if bias else None))

    op = F.linear_relu if relu else F.linear
    check_all(lambda x, w, b=None: op(x, w, b), redraw(np.random.default_rng(seed), draw, ok))


@RANDOM
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    training=st.booleans(),
    affine=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_batch_norm2d(shape, training, affine, seed) -> None:
    if training and shape[0] * shape[2] * shape[3] == 1:
        shape = (2, *shape[1:])
    rng = np.random.default_rng(seed)
    C = shape[1]
    mean, var = normal(rng, C), rng.random(C) + 0.5

    def fn(x, w=None, b=None):
        return F.batch_norm2d(x, cast(mean, x), cast(var, x), w, b, training)

    arrays = [normal(rng, *shape)] + ([normal(rng, C), normal(rng, C)] if affine else [])
    check_all(fn, arrays)


@RANDOM
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    training=st.booleans(),
    affine=st.booleans(),
    residual=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_batch_norm2d_relu(shape, training, affine, residual, seed) -> None:
    """The fused op (with and without its residual input) on every backend by finite
    differences, inputs kept clear of ReLU's kink (training with one value a channel
    normalises it to exactly 0: the ReLU's gradient is 0 on both sides there, as is the
    oracle's)."""
    if training and shape[0] * shape[2] * shape[3] == 1:
        shape = (2, *shape[1:])
    rng = np.random.default_rng(seed)
    C = shape[1]
    mean, var = normal(rng, C), rng.random(C) + 0.5

    def split(a):  # (x, residual, weight, bias) from the positional arrays
        x, rest = a[0], list(a[1:])
        r = rest.pop(0) if residual else None
        return x, r, *(rest or (None, None))

    def fn(*a):
        x, r, w, b = split(a)
        return F.batch_norm2d_relu(x, cast(mean, x), cast(var, x), w, b, training, residual=r)

    def draw(rng):
        out = [normal(rng, *shape)] + ([normal(rng, *shape)] if residual else [])
        return out + ([normal(rng, C), normal(rng, C)] if affine else [])

    def ok(a):
        x, r, w, b = split(a)
        z = R.batch_norm2d(x, w, b, mean.copy(), var.copy(), training)[0]
        return clear_of_relu(z if r is None else z + r)

    check_all(fn, redraw(rng, draw, ok))


@RANDOM
@given(
    n=st.integers(1, 4),
    classes=st.integers(1, 5),
    kind=st.sampled_from(["ce", "ce-smooth", "nll", "mse"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_losses(n, classes, kind, seed) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    z = normal(rng, n, classes)
    if kind == "mse":
        check_all(F.mse_loss, [z, normal(rng, n, classes)])
    elif kind == "nll":
        check_all(lambda z: F.nll_loss(z, labels), [z])
    else:
        ls = 0.2 if kind == "ce-smooth" else 0.0
        check_all(lambda z: F.cross_entropy(z, labels, label_smoothing=ls), [z])


@RANDOM
@given(
    shapes_=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=3),
    op=st.sampled_from(sorted(_BINARY)),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_broadcasting(shapes_, op, seed) -> None:
    rng = np.random.default_rng(seed)
    sa, sb = shapes_.input_shapes
    check_all(_BINARY[op], [normal(rng, *sa), away_from_zero(rng, *sb)])


@RANDOM
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=4).map(tuple),
    mean=st.booleans(),
    keepdims=st.booleans(),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_reductions(shape, mean, keepdims, data, seed) -> None:
    nd = len(shape)
    axis: Any = data.draw(
        st.one_of(
            st.none(),
            st.integers(-nd, nd - 1),
            st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True).map(tuple),
        )
    )
    fn = F.mean if mean else F.sum
    check_all(lambda x: fn(x, axis, keepdims), [normal(np.random.default_rng(seed), *shape)])


@RANDOM
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3).map(tuple),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_cat(shape, sizes, data, seed) -> None:
    dim = data.draw(st.integers(0, len(shape) - 1))
    rng = np.random.default_rng(seed)
    arrays = [normal(rng, *shape[:dim], s, *shape[dim + 1 :]) for s in sizes]
    check_all(lambda *ts: F.cat(ts, dim), arrays)
