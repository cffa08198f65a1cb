"""The oracle itself: gradients by central finite differences (float64), values by definition,
and (when PyTorch is installed) agreement with torch.nn.functional."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

from fastconv import reference
from tests.helpers import assert_close, numerical_grad
from tests.strategies import conv_configs, pool_configs


def _conv_params(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


FD = settings(
    max_examples=30, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow]
)


@FD
@given(cfg=conv_configs(max_batch=2))
def test_conv2d_gradients_by_finite_differences(cfg):
    assume(np.prod(cfg["x_shape"]) <= 300 and np.prod(cfg["w_shape"]) <= 100)
    rng = np.random.default_rng(0)
    p = _conv_params(cfg)
    x = rng.standard_normal(cfg["x_shape"])
    w = rng.standard_normal(cfg["w_shape"])
    b = rng.standard_normal(cfg["w_shape"][0])
    gy = rng.standard_normal(reference.conv2d(x, w, b, **p).shape)

    def loss():
        return float(np.sum(reference.conv2d(x, w, b, **p) * gy))

    gx, gw, gb = reference.conv2d_backward(gy, x, w, **p)
    np.testing.assert_allclose(gx, numerical_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, numerical_grad(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gb, numerical_grad(loss, b), rtol=1e-6, atol=1e-7)


@FD
@given(cfg=pool_configs(max_batch=2))
def test_pool_gradients_by_finite_differences(cfg):
    assume(np.prod(cfg["x_shape"]) <= 150)
    rng = np.random.default_rng(1)
    # Distinct, well-separated values: max pooling is differentiable away from ties.
    x = rng.permutation(np.prod(cfg["x_shape"])).reshape(cfg["x_shape"]) * 0.01
    p = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
    )
    for kind, extra in (
        ("max", {}),
        ("avg", {"count_include_pad": True}),
        ("avg", {"count_include_pad": False}),
    ):
        fwd = getattr(reference, f"{kind}_pool2d")
        bwd = getattr(reference, f"{kind}_pool2d_backward")
        gy = rng.standard_normal(fwd(x, **p, **extra).shape)

        def loss(fwd=fwd, gy=gy, extra=extra):
            return float(np.sum(fwd(x, **p, **extra) * gy))

        np.testing.assert_allclose(
            bwd(gy, x, **p, **extra), numerical_grad(loss, x, eps=1e-4), rtol=1e-6, atol=1e-7
        )


def test_conv2d_by_definition():
    """One output element written out by hand: stride 2, padding 1, dilation 2, groups 2."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 4, 7, 7)), rng.standard_normal((2, 2, 2, 2))
    y = reference.conv2d(x, w, stride=2, padding=1, dilation=2, groups=2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    oh, ow, k = 1, 2, 1  # k=1 is group 1: input channels 2, 3
    expected = sum(
        w[k, c, i, j] * xp[0, 2 + c, oh * 2 + i * 2, ow * 2 + j * 2]
        for c in range(2)
        for i in range(2)
        for j in range(2)
    )
    assert y.shape == (1, 2, 4, 4)  # (7 + 2 - 2*1 - 1) // 2 + 1
    np.testing.assert_allclose(y[0, k, oh, ow], expected, rtol=1e-12)


def test_oracle_keeps_dtype_and_computes_in_float64():
    x = np.full((1, 1, 4, 4), 1e8, np.float32)
    w = np.ones((1, 1, 2, 2), np.float32)
    y = reference.conv2d(x, w)
    assert y.dtype == np.float32
    assert y[0, 0, 0, 0] == np.float32(4e8)


# ------------------------------------------------------------------ agreement with PyTorch


@settings(max_examples=60)
@given(cfg=conv_configs())
def test_conv2d_matches_torch(cfg):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    p = _conv_params(cfg)
    x, w = rng.standard_normal(cfg["x_shape"]), rng.standard_normal(cfg["w_shape"])
    b = rng.standard_normal(cfg["w_shape"][0])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.conv2d(tx, tw, tb, **p)
    y = reference.conv2d(x, w, b, **p)
    assert_close(y, ty.detach().numpy())
    gy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(gy))
    for mine, theirs in zip(reference.conv2d_backward(gy, x, w, **p), (tx, tw, tb)):
        assert_close(mine, theirs.grad.numpy())


@settings(max_examples=60)
@given(cfg=pool_configs())
def test_pooling_matches_torch(cfg):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(4)
    x = rng.standard_normal(cfg["x_shape"])
    p = dict(
        kernel_size=cfg["kernel_size"],
        stride=cfg["stride"],
        padding=cfg["padding"],
        ceil_mode=cfg["ceil_mode"],
    )
    for cip in (True, False):
        tx = torch.tensor(x, requires_grad=True)
        ty = F.avg_pool2d(tx, **p, count_include_pad=cip)
        assert_close(reference.avg_pool2d(x, **p, count_include_pad=cip), ty.detach().numpy())
        gy = rng.standard_normal(tuple(ty.shape))
        ty.backward(torch.tensor(gy))
        assert_close(
            reference.avg_pool2d_backward(gy, x, **p, count_include_pad=cip), tx.grad.numpy()
        )
    tx = torch.tensor(x, requires_grad=True)
    ty = F.max_pool2d(tx, **p)
    assert_close(reference.max_pool2d(x, **p), ty.detach().numpy())
    gy = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(gy))
    assert_close(reference.max_pool2d_backward(gy, x, **p), tx.grad.numpy())
