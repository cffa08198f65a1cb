"""Every validation rule raises a clear error (op name, rule, actual values) before any kernel."""

import re

import numpy as np
import pytest

import fastconv as fc

X = np.zeros((2, 3, 8, 8), np.float32)
W = np.zeros((4, 3, 3, 3), np.float32)

CONV_CASES = [
    # (kwargs overriding x / weight / bias / params, exception, pattern)
    (
        dict(x=np.zeros((3, 8, 8), np.float32)),
        ValueError,
        r"conv2d: x must be 4-D \(N, C, H, W\); got 3-D x.shape=\(3, 8, 8\)",
    ),
    (dict(weight=np.zeros((4, 3, 3), np.float32)), ValueError, r"conv2d: weight must be 4-D"),
    (
        dict(weight=np.zeros((4, 4, 3, 3), np.float32)),
        ValueError,
        r"conv2d: x has 3 channels but weight expects 4 .*x.shape=\(2, 3, 8, 8\), "
        r"weight.shape=\(4, 4, 3, 3\)",
    ),
    (
        dict(groups=2, weight=np.zeros((4, 1, 3, 3), np.float32)),
        ValueError,
        r"conv2d: groups=2 must divide the 3 input channels",
    ),
    (
        dict(groups=3, weight=np.zeros((4, 1, 3, 3), np.float32)),
        ValueError,
        r"conv2d: groups=3 must divide the 4 output channels",
    ),
    (dict(groups=0), ValueError, r"conv2d: groups must be positive; got groups=0"),
    (dict(groups=1.5), TypeError, r"conv2d: groups must be an int"),
    (
        dict(weight=np.zeros((4, 3, 9, 3), np.float32)),
        ValueError,
        r"conv2d: the dilated kernel \(9x3\) is larger than the padded input \(8x8\)",
    ),
    (dict(dilation=4), ValueError, r"conv2d: the dilated kernel \(9x9\) is larger"),
    (dict(stride=0), ValueError, r"conv2d: stride must be positive; got stride=0"),
    (dict(stride=(1, -1)), ValueError, r"conv2d: stride must be positive"),
    (dict(dilation=0), ValueError, r"conv2d: dilation must be positive"),
    (dict(padding=-1), ValueError, r"conv2d: padding must be >= 0; got padding=-1"),
    (dict(padding=(1, 2, 3)), TypeError, r"conv2d: padding must be an int or a pair of ints"),
    (
        dict(padding="full"),
        ValueError,
        r"conv2d: padding must be an int, a pair, 'same' or 'valid'",
    ),
    (dict(padding="same", stride=2), ValueError, r"conv2d: padding='same' needs stride 1"),
    (
        dict(x=X.astype(np.int32)),
        TypeError,
        r"conv2d: x must be float32 or float64; got dtype int32",
    ),
    (
        dict(x=X.astype(np.float16), weight=W.astype(np.float16)),
        TypeError,
        r"x must be float32 or float64; got dtype float16",
    ),
    (
        dict(weight=W.astype(np.float64)),
        TypeError,
        r"conv2d: all inputs must have the same dtype; got x.dtype=float32, weight.dtype=float64",
    ),
    (dict(bias=np.zeros(4, np.float64)), TypeError, r"bias.dtype=float64"),
    (
        dict(bias=np.zeros(5, np.float32)),
        ValueError,
        r"conv2d: bias must have shape \(4,\) .*got bias.shape=\(5,\)",
    ),
    (
        dict(x=np.zeros((0, 3, 8, 8), np.float32)),
        ValueError,
        r"conv2d: empty batch \(N=0\) is not supported; x.shape=\(0, 3, 8, 8\)",
    ),
    (dict(x=np.zeros((2, 3, 0, 8), np.float32)), ValueError, r"conv2d: x has a zero-sized"),
    (
        dict(x=[[1.0]]),
        TypeError,
        r"conv2d: x must be a NumPy array or a CUDA device array; got list",
    ),
]

# The fused op's own rules (its pooling window); named after the fused op.
FUSED_POOL_CASES = [
    (dict(pool=0), ValueError, r"conv2d_relu_maxpool: pool must be positive; got pool=0"),
    (dict(pool=(2, 2, 2)), TypeError, r"conv2d_relu_maxpool: pool must be an int or a pair"),
    (
        dict(pool=9),
        ValueError,
        r"conv2d_relu_maxpool: the pooling window pool=\(9, 9\) is larger than the convolution "
        r"output \(6x6\); x.shape=\(2, 3, 8, 8\)",
    ),
]


@pytest.mark.parametrize("case,exc,pattern", CONV_CASES)
def test_conv2d_errors(case, exc, pattern):
    args = dict(x=X, weight=W, bias=None)
    args.update(case)
    with pytest.raises(exc, match=pattern):
        fc.conv2d(**args)


@pytest.mark.parametrize("case,exc,pattern", FUSED_POOL_CASES)
def test_conv2d_relu_maxpool_errors(case, exc, pattern):
    args = dict(x=X, weight=W, bias=None)
    args.update(case)
    with pytest.raises(exc, match=pattern):
        fc.conv2d_relu_maxpool(**args)


def test_conv2d_backward_errors():
    gy = np.zeros((2, 4, 6, 6), np.float32)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "conv2d_backward: grad_y must have the conv2d output shape (2, 4, 6, 6); "
            "got grad_y.shape=(2, 4, 5, 5)"
        ),
    ):
        fc.conv2d_backward(np.zeros((2, 4, 5, 5), np.float32), X, W)
    with pytest.raises(TypeError, match="conv2d_backward: all inputs must have the same dtype"):
        fc.conv2d_backward(gy.astype(np.float64), X, W)
    with pytest.raises(TypeError, match="x_shape must be a tuple of 4 ints"):
        fc.conv2d_backward_input(gy, (2, 3, 8), W)
    with pytest.raises(TypeError, match="weight_shape must be a tuple of 4 ints"):
        fc.conv2d_backward_weight(gy, X, None)


def test_conv_transpose2d_errors():
    x = np.zeros((1, 4, 5, 5))
    w = np.zeros((4, 2, 3, 3))
    with pytest.raises(ValueError, match="output_padding must be smaller than stride"):
        fc.conv_transpose2d(x, w, stride=1, output_padding=1)
    with pytest.raises(ValueError, match=r"x has 4 channels but weight.shape\[0\] is 3"):
        fc.conv_transpose2d(x, np.zeros((3, 2, 3, 3)))
    with pytest.raises(ValueError, match="padding must be an int or a pair"):
        fc.conv_transpose2d(x, w, padding="same")
    with pytest.raises(ValueError, match=r"the output would be empty"):
        fc.conv_transpose2d(np.zeros((1, 4, 1, 1)), w, padding=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        fc.conv_transpose2d(x, w, np.zeros(4))


POOL_CASES = [
    (dict(kernel_size=0), ValueError, r"max_pool2d: kernel_size must be positive"),
    (dict(kernel_size=(2, 2, 2)), TypeError, r"kernel_size must be an int or a pair of ints"),
    (dict(stride=0), ValueError, r"max_pool2d: stride must be positive"),
    (dict(padding=-1), ValueError, r"max_pool2d: padding must be >= 0"),
    (
        dict(kernel_size=2, padding=2),
        ValueError,
        r"max_pool2d: padding must be at most half the kernel size; got padding=\(2, 2\), "
        r"kernel_size=\(2, 2\)",
    ),
    (
        dict(kernel_size=9),
        ValueError,
        r"max_pool2d: kernel_size \(9, 9\) is larger than the padded",
    ),
    (dict(padding="same"), ValueError, r"max_pool2d: padding must be an int or a pair"),
    (dict(x=np.zeros((8, 8), np.float32)), ValueError, r"max_pool2d: x must be 4-D"),
    (
        dict(x=np.zeros((2, 3, 8, 8), np.uint8)),
        TypeError,
        r"must be float32 or float64; got dtype uint8",
    ),
    (dict(x=np.zeros((0, 3, 8, 8))), ValueError, r"empty batch"),
]


@pytest.mark.parametrize("case,exc,pattern", POOL_CASES)
def test_pool_errors(case, exc, pattern):
    args = dict(x=X, kernel_size=2)
    args.update(case)
    with pytest.raises(exc, match=pattern):
        fc.max_pool2d(**args)
    with pytest.raises(exc, match=pattern.replace("max_pool2d", "avg_pool2d")):
        fc.avg_pool2d(**args)


def test_pool_backward_errors():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "max_pool2d_backward: grad_y must have the max_pool2d output shape (2, 3, 4, 4)"
        ),
    ):
        fc.max_pool2d_backward(np.zeros((2, 3, 3, 3), np.float32), X, 2)
    with pytest.raises(TypeError, match="avg_pool2d_backward: all inputs must have the same dtype"):
        fc.avg_pool2d_backward(np.zeros((2, 3, 4, 4)), X, 2)


def test_bad_backend_and_algorithm():
    with pytest.raises(ValueError, match=r"conv2d: backend must be one of .*got 'gpu'"):
        fc.conv2d(X, W, backend="gpu")
    with pytest.raises(ValueError, match=r"conv2d: algorithm must be one of .*got 'fft'"):
        fc.conv2d(X, W, algorithm="fft")
    with pytest.raises(ValueError, match=r"max_pool2d: backend must be one of"):
        fc.max_pool2d(X, 2, backend="tpu")


def test_conv2d_relu_maxpool_backward_errors():
    """The fused op's backward runs on the tape only: it needs a recorded forward call, a
    gradient of the pooled output's shape and dtype, and runs once per recorded call; each
    says so before any kernel runs."""
    x = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
    w = np.ones((3, 1, 3, 3))
    gy = np.ones((2, 3, 2, 2))
    y = fc.conv2d_relu_maxpool(fc.Tensor(x), fc.Tensor(w), None, pool=2)  # nothing recorded
    with pytest.raises(RuntimeError, match=r"does not require a gradient and has no recorded op"):
        y.backward(gy)
    wt = fc.Tensor(w, requires_grad=True)
    y = fc.conv2d_relu_maxpool(fc.Tensor(x), wt, None, pool=2)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "backward: grad must match the Tensor: shape (2, 3, 2, 2), dtype float64; "
            "got shape (2, 3, 4, 4), dtype float64"
        ),
    ):
        y.backward(np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 2, 2\), dtype float32"):
        y.backward(gy.astype(np.float32))
    y.backward(gy)
    with pytest.raises(RuntimeError, match=r"through conv2d_relu_maxpool was already freed"):
        y.backward(gy)
