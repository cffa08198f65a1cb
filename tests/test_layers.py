"""Layers: backward against finite differences (float64), convolutional layers against the
oracle, PyTorch state-dict compatibility, modes, devices, repr and constructor errors."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import reference as R
from tests.helpers import assert_close, numerical_grad

F64 = np.float64


def rnd(shape, seed=0, scale=1.0):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def check_layer_gradients(layer, x, *, rtol=1e-6, atol=1e-8):
    """The tape's gradients of sum(layer(x) * g) against central differences, for x and every
    param."""
    xt = fc.Tensor(x, requires_grad=True)
    y = layer(xt)
    g = rnd(y.shape, seed=99)
    layer.zero_grad()
    y.backward(g)
    gx = xt.grad

    def loss():
        with fc.no_grad():
            return float((layer(x) * g).sum())

    np.testing.assert_allclose(gx, numerical_grad(loss, x), rtol=rtol, atol=atol, err_msg="x")
    for name, p in layer.named_parameters():
        np.testing.assert_allclose(
            p.grad, numerical_grad(loss, p.data), rtol=rtol, atol=atol, err_msg=name
        )


def ops_run(y):
    """Names of the ops that made ``y``, first to last, along the data path (first inputs)."""
    names, node = [], y._node
    while node is not None:
        names.append(node.name)
        t = node.inputs[0]
        node = t._node if isinstance(t, fc.Tensor) else None
    return names[::-1]


def layer_by_layer(layers, x, gy, input_grad=True):
    """Each layer called on its own, on a leaf of its own (no fusion), and each gradient
    handed back by hand from the last layer to the first: (outputs, gradients at each layer's
    input), both first to last (the first input's is None without ``input_grad``)."""
    ins, outs, h = [], [], x
    for i, layer in enumerate(layers):
        t = fc.Tensor(h, requires_grad=i > 0 or input_grad)
        out = layer(t)
        assert len(ops_run(out)) == 1
        ins.append(t)
        outs.append(out)
        h = out.numpy()
    g, grads = gy, []
    for t, out in zip(reversed(ins), reversed(outs)):
        out.backward(g)
        g = t.grad
        grads.append(g)
    return [o.numpy() for o in outs], grads[::-1]


LAYERS = [
    ("conv2d", lambda: fc.Conv2d(2, 3, 3, stride=2, padding=1, dtype=F64, rng=0), (2, 2, 5, 6)),
    (
        "conv2d_groups",
        lambda: fc.Conv2d(4, 4, (3, 2), groups=2, dilation=(1, 2), dtype=F64, rng=0),
        (1, 4, 5, 6),
    ),
    (
        "conv2d_same_nobias",
        lambda: fc.Conv2d(2, 2, 4, padding="same", bias=False, dtype=F64, rng=0),
        (2, 2, 5, 5),
    ),
    (
        "conv_transpose2d",
        lambda: fc.ConvTranspose2d(
            2, 3, 3, stride=2, padding=1, output_padding=1, dtype=F64, rng=0
        ),
        (2, 2, 3, 4),
    ),
    ("conv1d", lambda: fc.Conv1d(2, 3, 3, stride=2, padding=1, dtype=F64, rng=0), (2, 2, 9)),
    ("maxpool", lambda: fc.MaxPool2d(2), (2, 3, 4, 6)),
    ("maxpool_pad", lambda: fc.MaxPool2d(3, stride=2, padding=1), (1, 2, 5, 5)),
    (
        "avgpool",
        lambda: fc.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        (1, 2, 5, 5),
    ),
    ("relu", lambda: fc.ReLU(), (3, 7)),
    ("leaky_relu", lambda: fc.LeakyReLU(0.2), (3, 7)),
    ("sigmoid", lambda: fc.Sigmoid(), (3, 7)),
    ("tanh", lambda: fc.Tanh(), (2, 3, 4)),
    ("linear", lambda: fc.Linear(5, 4, dtype=F64, rng=0), (3, 5)),
    ("linear_nobias", lambda: fc.Linear(5, 4, bias=False, dtype=F64, rng=0), (3, 5)),
    ("flatten", lambda: fc.Flatten(), (2, 3, 2, 2)),
    ("batchnorm_train", lambda: fc.BatchNorm2d(3, dtype=F64), (4, 3, 2, 3)),
    ("batchnorm_noaffine", lambda: fc.BatchNorm2d(3, affine=False, dtype=F64), (4, 3, 2, 3)),
]


@pytest.mark.parametrize("name,make,shape", LAYERS, ids=[n for n, *_ in LAYERS])
def test_layer_backward_matches_finite_differences(name, make, shape):
    layer = make()
    x = rnd(shape, seed=1)
    if "pool" in name or "relu" in name:
        # distinct values, away from kinks and ties, so the function is smooth at x
        x = np.random.default_rng(1).permutation(np.prod(shape)).reshape(shape) * 0.1 - 1.05
    if name.startswith("batchnorm"):
        layer.train()
        # the running stats change on every forward call but do not enter the training output
    check_layer_gradients(layer, x)


def test_batchnorm_eval_backward_matches_finite_differences():
    bn = fc.BatchNorm2d(2, dtype=F64)
    bn.running_mean[:] = [0.5, -1.0]
    bn.running_var[:] = [2.0, 0.5]
    bn.weight.data[:] = [1.5, -0.5]
    bn.eval()
    check_layer_gradients(bn, rnd((2, 2, 3, 3), seed=3))


def test_dropout_backward_uses_the_forward_mask():
    d = fc.Dropout(0.4, rng=0)
    x = rnd((50, 40), seed=1)
    xt = fc.Tensor(x, requires_grad=True)
    y = d(xt)
    g = rnd(x.shape, seed=2)
    y.backward(g)
    gx = xt.grad
    y = y.numpy()
    keep = y != 0
    np.testing.assert_allclose(gx, np.where(keep, g / 0.6, 0.0))
    np.testing.assert_allclose(y, np.where(keep, x / 0.6, 0.0))
    assert 0.5 < keep.mean() < 0.7


def test_dropout_modes_and_extremes():
    x = rnd((10, 10), seed=1)
    d = fc.Dropout(0.5, rng=0).eval()
    xt = fc.Tensor(x, requires_grad=True)
    assert d(x).data is x and d(xt) is xt  # the identity: nothing recorded
    d(xt).backward(x)
    np.testing.assert_array_equal(xt.grad, x)  # the gradient passes through unchanged
    assert np.all(fc.Dropout(1.0, rng=0)(x).numpy() == 0)
    np.testing.assert_array_equal(fc.Dropout(0.0, rng=0)(x), x)


def test_dropout_mask_is_bernoulli_of_the_raw_words():
    """Each element is kept when its 32-bit word of the generator's raw stream is at least
    ceil(p * 2^32): the definition checked word for word, the keep rate 1 - p within 5 sigma,
    p = 1 keeping nothing and odd sizes taking half a 64-bit draw."""
    from fastconv.nn import _keep_mask

    for p, shape in ((0.5, (64, 9216)), (0.25, (3, 5, 7)), (0.1, (100_001,)), (0.9, (2, 999))):
        rng = np.random.default_rng(7)
        twin = np.random.default_rng(7)
        keep = _keep_mask(rng, shape, p)
        n = int(np.prod(shape))
        words = twin.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
        np.testing.assert_array_equal(keep.ravel(), words >= np.ceil(p * 2.0**32))
        assert keep.shape == shape and keep.dtype == np.bool_
        assert abs(keep.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)
        assert rng.bit_generator.state == twin.bit_generator.state  # the same draws consumed
    assert not _keep_mask(np.random.default_rng(0), (4, 4), 1.0).any()
    assert _keep_mask(np.random.default_rng(0), (0, 3), 0.5).shape == (0, 3)


def test_dropout_is_reproducible_with_a_seed():
    x = np.ones((8, 8))
    a, b, c = fc.Dropout(0.5, rng=3), fc.Dropout(0.5, rng=3), fc.Dropout(0.5, rng=4)
    np.testing.assert_array_equal(a(x), b(x))
    assert not np.array_equal(a(x), c(x))


# --------------------------------------------------------------------------- against the oracle


def test_conv2d_layer_matches_oracle():
    layer = fc.Conv2d(
        4, 6, 3, stride=(1, 2), padding=(2, 1), dilation=2, groups=2, dtype=F64, rng=0
    )
    x = rnd((2, 4, 7, 8))
    xt = fc.Tensor(x, requires_grad=True)
    y = layer(xt)
    w, b = layer.weight.data, layer.bias.data
    assert_close(y.numpy(), R.conv2d(x, w, b, (1, 2), (2, 1), 2, 2))
    g = rnd(y.shape, seed=1)
    y.backward(g)
    gx_r, gw_r, gb_r = R.conv2d_backward(g, x, w, (1, 2), (2, 1), 2, 2)
    assert_close(xt.grad, gx_r)
    assert_close(layer.weight.grad, gw_r)
    assert_close(layer.bias.grad, gb_r)


def test_conv_transpose2d_layer_matches_oracle():
    # ConvTranspose2d's forward is conv2d's backward-data with the same weight.
    layer = fc.ConvTranspose2d(
        3, 4, 3, stride=2, padding=1, output_padding=1, dtype=F64, rng=0, bias=False
    )
    x = rnd((2, 3, 4, 5))
    xt = fc.Tensor(x, requires_grad=True)
    y = layer(xt)
    assert y.shape == (2, 4, 8, 10)
    x_ref = np.zeros(y.shape)
    expected = R.conv2d_backward(x, x_ref, layer.weight.data, 2, 1)[0]
    assert_close(y.numpy(), expected)
    g = rnd(y.shape, seed=1)
    y.backward(g)
    assert_close(xt.grad, R.conv2d(g, layer.weight.data, None, 2, 1))


def test_conv1d_layer_matches_oracle():
    layer = fc.Conv1d(3, 4, 5, padding="same", dtype=F64, rng=0)
    x = rnd((2, 3, 12))
    y = layer(x)
    ref = R.conv2d(x[:, :, None], layer.weight.data[:, :, None], layer.bias.data, 1, (0, 2))
    assert_close(y, ref[:, :, 0])


def test_linear_layer_matches_oracle_float32():
    layer = fc.Linear(20, 7, rng=0)
    x = rnd((5, 20)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    assert_close(y, R.linear(x, layer.weight.data, layer.bias.data))


# --------------------------------------------------------------------------- PyTorch compatibility


def _torch_pair():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    ours = fc.Sequential(
        fc.Conv2d(1, 4, 3, padding=1, rng=0),
        fc.BatchNorm2d(4),
        fc.ReLU(),
        fc.MaxPool2d(2),
        fc.Conv2d(4, 6, 3, stride=2, bias=False, rng=1),
        fc.LeakyReLU(0.1),
        fc.AvgPool2d(2, padding=1),
        fc.Flatten(),
        fc.Dropout(0.5, rng=0),
        fc.Linear(6 * 2 * 2, 5, rng=2),
        fc.Tanh(),
        fc.Linear(5, 3, rng=3),
        fc.Sigmoid(),
    )
    theirs = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2, padding=1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(24, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
        nn.Sigmoid(),
    )
    return torch, ours, theirs


def test_state_dict_loads_into_torch_sequential_and_back():
    torch, ours, theirs = _torch_pair()
    sd = ours.state_dict()
    assert list(sd) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    ours.eval()
    theirs.eval()
    x = rnd((3, 1, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-6)
    # and back: torch's (re-initialised) weights into ours
    torch.manual_seed(0)
    theirs2 = _torch_pair()[2]
    ours.load_state_dict(theirs2.state_dict())
    for k, v in theirs2.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.numpy())


def test_training_step_gradients_match_torch():
    torch, ours, theirs = _torch_pair()
    ours[8].p = 0.0  # dropout off: the masks come from different generators
    theirs[8].p = 0.0
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    x = rnd((4, 1, 16, 16)).astype(np.float32)
    g = rnd((4, 3), seed=1).astype(np.float32)
    ours.train()
    y = ours(x)
    y.backward(g)
    y = y.numpy()
    xt = torch.from_numpy(x)
    yt = theirs(xt)
    (yt * torch.from_numpy(g)).sum().backward()
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    for (name, p), (tname, tp) in zip(
        ours.named_parameters(), theirs.named_parameters(), strict=True
    ):
        assert name == tname
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # running statistics updated the same way
    np.testing.assert_allclose(ours[1].running_var, theirs[1].running_var.numpy(), rtol=1e-5)
    assert ours.state_dict()["1.num_batches_tracked"] == 1


def test_default_init_matches_torch_distribution():
    # PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    conv = fc.Conv2d(16, 32, 3, rng=0)
    bound = 1 / np.sqrt(16 * 9)
    assert np.abs(conv.weight.data).max() <= bound
    assert np.abs(conv.weight.data).max() > 0.95 * bound
    assert np.abs(conv.bias.data).max() <= bound
    lin = fc.Linear(100, 50, rng=0)
    assert np.abs(lin.weight.data).max() <= 0.1 and lin.weight.data.std() > 0.05
    tconv = fc.ConvTranspose2d(8, 4, 3, rng=0)  # fan_in = weight.shape[1] * KH * KW, as torch
    assert np.abs(tconv.weight.data).max() <= 1 / np.sqrt(4 * 9)
    assert (
        fc.Conv2d(2, 2, 3, rng=5).weight.data.tolist()
        == fc.Conv2d(2, 2, 3, rng=5).weight.data.tolist()
    )


def test_reset_parameters_redraws():
    lin = fc.Linear(4, 4, rng=0)
    before = lin.weight.data.copy()
    lin.reset_parameters(rng=1)
    assert not np.array_equal(before, lin.weight.data)
    lin.reset_parameters(rng=0)
    np.testing.assert_array_equal(before, lin.weight.data)


# --------------------------------------------------------------------------- protocol


def test_sequential_container_protocol():
    seq = fc.Sequential(fc.Linear(3, 4, rng=0), fc.ReLU(), fc.Linear(4, 2, rng=1))
    assert len(seq) == 3
    assert isinstance(seq[1], fc.ReLU)
    assert [type(layer).__name__ for layer in seq] == ["Linear", "ReLU", "Linear"]
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(seq.parameters()) == 4
    assert isinstance(seq[1:], fc.Sequential) and len(seq[1:]) == 2
    seq.append(fc.Sigmoid())
    assert len(seq) == 4
    y = seq(rnd((5, 3)).astype(np.float32))
    assert y.shape == (5, 2)


def test_gradients_accumulate_until_zero_grad():
    lin = fc.Linear(3, 2, dtype=F64, rng=0)
    x, g = rnd((4, 3)), rnd((4, 2), seed=1)
    lin(x).backward(g)
    first = lin.weight.grad.copy()
    lin(x).backward(g)
    np.testing.assert_allclose(lin.weight.grad, 2 * first)
    lin.zero_grad()
    assert lin.weight.grad is None and lin.bias.grad is None


def test_train_eval_propagates():
    seq = fc.Sequential(fc.Dropout(0.5, rng=0), fc.Sequential(fc.BatchNorm2d(2)))
    seq.eval()
    assert not seq[0].training and not seq[1][0].training
    seq.train()
    assert seq[1][0].training


def test_batchnorm_eval_uses_running_stats():
    bn = fc.BatchNorm2d(2, dtype=F64)
    x = rnd((8, 2, 4, 4), scale=3.0) + 2
    for _ in range(50):
        bn(x)
    bn.eval()
    y = bn(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=0.05)
    assert bn.num_batches_tracked == 50


def test_backward_without_a_recorded_forward_is_a_clear_error():
    """Layers keep no state for backward: it runs from a recorded forward call, once."""
    lin = fc.Linear(2, 2)
    with fc.no_grad():
        y = lin(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"does not require a gradient and has no recorded op"):
        y.backward(np.ones((1, 2), np.float32))
    y = lin(np.ones((1, 2), np.float32))
    y.backward(np.ones((1, 2), np.float32))
    with pytest.raises(RuntimeError, match=r"graph through linear was already freed .*forward"):
        y.backward(np.ones((1, 2), np.float32))


def test_to_dtype_and_to_cpu():
    seq = fc.Sequential(fc.Conv2d(1, 2, 3, rng=0), fc.BatchNorm2d(2))
    seq.to(np.float64)
    assert all(p.dtype == np.float64 for p in seq.parameters())
    assert seq[1].running_mean.dtype == np.float64 and seq[0].dtype == np.float64
    assert seq(rnd((1, 1, 5, 5))).dtype == np.float64
    assert seq.to("cpu") is seq and seq.device == "cpu"
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda'"):
        seq.to("gpu")
    with pytest.raises(TypeError, match=r"dtype must be float32 or float64"):
        seq.to(np.int32)


def test_to_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    from fastconv import dispatch

    monkeypatch.setattr(dispatch, "cuda_status", lambda: (False, "no GPU here"))
    with pytest.raises(RuntimeError, match=r"Linear.to\('cuda'\): no usable GPU: no GPU here"):
        fc.Linear(2, 2).to("cuda")


def test_load_state_dict_errors():
    lin = fc.Linear(3, 2)
    with pytest.raises(KeyError, match=r"missing keys \['bias'\], unexpected keys \['b'\]"):
        lin.load_state_dict({"weight": np.zeros((2, 3)), "b": np.zeros(2)})
    with pytest.raises(
        ValueError,
        match=r"weight has shape \(3, 2\) in the state dict but "
        r"\(2, 3\) in the model",
    ):
        lin.load_state_dict({"weight": np.zeros((3, 2)), "bias": np.zeros(2)})
    lin.load_state_dict({"weight": np.ones((2, 3))}, strict=False)
    assert lin.weight.data.dtype == np.float32 and lin.weight.data.sum() == 6


def test_repr_shows_non_default_arguments_only():
    assert repr(fc.Conv2d(1, 6, 5)) == "Conv2d(1, 6, kernel_size=5)"
    assert (
        repr(fc.Conv2d(1, 6, 5, padding=2, bias=False))
        == "Conv2d(1, 6, kernel_size=5, padding=2, bias=False)"
    )
    assert (
        repr(fc.Conv2d(2, 4, (3, 1), stride=(2, 1), groups=2))
        == "Conv2d(2, 4, kernel_size=(3, 1), stride=(2, 1), groups=2)"
    )
    assert repr(fc.MaxPool2d(2)) == "MaxPool2d(kernel_size=2)"
    assert repr(fc.MaxPool2d(3, stride=2)) == "MaxPool2d(kernel_size=3, stride=2)"
    assert (
        repr(fc.AvgPool2d(2, count_include_pad=False))
        == "AvgPool2d(kernel_size=2, count_include_pad=False)"
    )
    assert repr(fc.Linear(4, 3)) == "Linear(in_features=4, out_features=3)"
    assert (
        repr(fc.Linear(4, 3, dtype=np.float64))
        == "Linear(in_features=4, out_features=3, dtype='float64')"
    )
    assert repr(fc.ReLU()) == "ReLU()"
    assert repr(fc.LeakyReLU()) == "LeakyReLU()"
    assert repr(fc.LeakyReLU(0.2)) == "LeakyReLU(negative_slope=0.2)"
    assert repr(fc.Dropout(0.25)) == "Dropout(p=0.25)"
    assert repr(fc.BatchNorm2d(8)) == "BatchNorm2d(8)"
    assert repr(fc.BatchNorm2d(8, momentum=0.01)) == "BatchNorm2d(8, momentum=0.01)"
    assert (
        repr(fc.ConvTranspose2d(2, 3, 4, stride=2))
        == "ConvTranspose2d(2, 3, kernel_size=4, stride=2)"
    )
    assert repr(fc.Conv1d(2, 3, 5)) == "Conv1d(2, 3, kernel_size=5)"
    assert repr(fc.Sequential(fc.ReLU())) == "Sequential(\n  (0): ReLU()\n)"
    assert (
        repr(fc.Sequential(fc.Linear(2, 2), fc.Sequential(fc.ReLU())))
        == "Sequential(\n  (0): Linear(in_features=2, out_features=2)\n  (1): Sequential(\n"
        "    (0): ReLU()\n  )\n)"
    )


def test_parameter_repr():
    assert repr(fc.Linear(2, 3).weight) == "Parameter(shape=(3, 2), dtype=float32, device='cpu')"


@pytest.mark.parametrize(
    "make,exc,msg",
    [
        (lambda: fc.Conv2d(3, 4, 3, groups=2), ValueError, r"Conv2d: groups=2 must divide"),
        (lambda: fc.Conv2d(0, 4, 3), ValueError, r"Conv2d: in_channels must be positive"),
        (lambda: fc.Conv2d(1.5, 4, 3), TypeError, r"Conv2d: in_channels must be an int"),
        (lambda: fc.Conv2d(1, 4, 0), ValueError, r"Conv2d: kernel_size must be positive"),
        (lambda: fc.Conv2d(1, 4, 3, padding="full"), ValueError, r"Conv2d: padding must be"),
        (
            lambda: fc.Conv2d(1, 4, 3, padding="same", stride=2),
            ValueError,
            r"Conv2d: padding='same' needs stride 1",
        ),
        (
            lambda: fc.Conv2d(1, 4, 3, padding_mode="reflect"),
            ValueError,
            r"only padding_mode='zeros'",
        ),
        (lambda: fc.Conv2d(1, 4, 3, dtype=np.float16), TypeError, r"float32 or float64"),
        (
            lambda: fc.ConvTranspose2d(1, 4, 3, stride=2, output_padding=2),
            ValueError,
            r"ConvTranspose2d: output_padding must be smaller than stride",
        ),
        (
            lambda: fc.Conv1d(1, 4, 3, padding="same", stride=2),
            ValueError,
            r"Conv1d: padding='same' needs stride 1",
        ),
        (lambda: fc.Conv1d(1, 4, 3, padding="circular"), ValueError, r"Conv1d: padding must be"),
        (
            lambda: fc.Conv1d(1, 4, (3, 3)),
            TypeError,
            r"Conv1d: kernel_size must be an int or a "
            r"1-tuple",
        ),
        (
            lambda: fc.MaxPool2d(2, padding=2),
            ValueError,
            r"MaxPool2d: padding must be at most half the kernel size",
        ),
        (lambda: fc.Linear(0, 3), ValueError, r"Linear: in_features must be positive"),
        (lambda: fc.Dropout(1.5), ValueError, r"Dropout: p must be in \[0, 1\]"),
        (lambda: fc.Dropout(0.5, rng="seed"), TypeError, r"rng must be an int seed"),
        (lambda: fc.BatchNorm2d(4, eps=0), ValueError, r"BatchNorm2d: eps must be in \(0, inf\]"),
        (
            lambda: fc.Sequential(fc.ReLU(), "relu"),
            TypeError,
            r"Sequential: item 1 is not a fastconv Module",
        ),
    ],
)
def test_constructor_errors(make, exc, msg):
    with pytest.raises(exc, match=msg):
        make()


def test_sequential_append_rejects_non_layers():
    with pytest.raises(TypeError, match=r"Sequential.append: not a fastconv Module"):
        fc.Sequential().append(lambda x: x)


def test_forward_errors_come_from_functional():
    with pytest.raises(ValueError, match=r"conv2d: x has 2 channels but weight expects 1"):
        fc.Conv2d(1, 2, 3)(np.ones((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"linear: x has 3 features but weight expects 4"):
        fc.Linear(4, 2)(np.ones((1, 3), np.float32))


def test_backward_params_matches_full_backward():
    """An input that requires no gradient (training on data) skips the first layer's input
    gradient only: every parameter gradient is the same as with the full backward pass."""
    from fastconv import models

    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28))
    grads = []
    for full in (True, False):
        m = models.lenet5(rng=0, dtype=np.float64)
        xt = fc.Tensor(x, requires_grad=full)
        y = m(xt)
        gy = np.random.default_rng(1).standard_normal(y.shape)
        y.backward(gy)
        assert (xt.grad is None) != full
        grads.append([p.grad.copy() for p in m.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_conv_layer_reuses_forward_columns_and_stays_exact():
    """A recorded forward call keeps the im2col matrix in its context for the backward; the
    gradients are still the oracle's, and a forward under no_grad (inference) records and
    keeps nothing."""
    from fastconv import Conv2d

    rng = np.random.default_rng(2)
    layer = Conv2d(3, 4, 3, padding=1, dtype=np.float64, rng=0, algorithm="im2col")
    x = rng.standard_normal((2, 3, 7, 7))
    xt = fc.Tensor(x, requires_grad=True)
    y = layer(xt)
    kept = y._node.ctx.scratch
    assert kept.get("x") is x
    layer.eval()
    x2 = rng.standard_normal((2, 3, 7, 7))
    with fc.no_grad():
        y2 = layer(x2)
    assert y2.grad_fn is None
    assert kept.get("x") is x  # the inference forward did not replace it
    layer.train()
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    rgx, rgw, rgb = fc.reference.conv2d_backward(gy, x, layer.weight.data, padding=1)
    np.testing.assert_allclose(xt.grad, rgx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, rgw, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, rgb, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["im2col", "direct"])
def test_sequential_fuses_conv_relu_with_the_same_result(algorithm):
    """Sequential runs Conv2d + ReLU as one fused conv + bias + ReLU: the output and every
    gradient are bit-identical to running the two layers one after the other, and the oracle's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 9, 9))
    gy = rng.standard_normal((3, 4, 7, 7))

    def make():
        return fc.Sequential(
            fc.Conv2d(2, 4, 3, dtype=np.float64, rng=0, algorithm=algorithm), fc.ReLU()
        )

    fused, plain = make(), make()
    xt = fc.Tensor(x, requires_grad=True)
    y = fused(xt)
    assert ops_run(y) == ["conv2d_relu"]
    y.backward(gy)
    gx, y = xt.grad, y.numpy()
    outs, gins = layer_by_layer(plain, x, gy)  # each layer called on its own: no fusion
    np.testing.assert_array_equal(y, outs[-1])
    np.testing.assert_array_equal(gx, gins[0])
    for a, b in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad)
    w, b = fused[0].weight.data, fused[0].bias.data
    z = R.conv2d(x, w, b)
    assert_close(y, np.maximum(z, 0))
    rgx, rgw, rgb = R.conv2d_backward(np.where(z > 0, gy, 0), x, w)
    assert_close(gx, rgx)
    assert_close(fused[0].weight.grad, rgw)
    assert_close(fused[0].bias.grad, rgb)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sequential_fuses_linear_relu_with_the_same_result(dtype):
    """Sequential runs Linear + ReLU as one GEMM with bias and ReLU in its epilogue: the output
    and every gradient are bit-identical to the layers called one after the other, and match
    the oracle."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 12)).astype(dtype)
    gy = rng.standard_normal((6, 4)).astype(dtype)

    def make():
        return fc.Sequential(
            fc.Linear(12, 9, dtype=dtype, rng=0),
            fc.ReLU(),
            fc.Linear(9, 4, dtype=dtype, rng=1),
            fc.ReLU(),
        )

    fused, plain = make(), make()
    xt = fc.Tensor(x, requires_grad=True)
    y = fused(xt)
    assert ops_run(y) == ["linear_relu", "linear_relu"]
    y.backward(gy)
    gx, y = xt.grad, y.numpy()
    outs, gins = layer_by_layer(plain, x, gy)  # each layer called on its own: no fusion
    np.testing.assert_array_equal(y, outs[-1])
    np.testing.assert_array_equal(gx, gins[0])
    for a, b in zip(fused.parameters(), plain.parameters()):
        np.testing.assert_array_equal(a.grad, b.grad)
    w0, b0 = fused[0].weight.data, fused[0].bias.data
    w1, b1 = fused[2].weight.data, fused[2].bias.data
    z0 = R.linear(x, w0, b0)
    z1 = R.linear(np.maximum(z0, 0), w1, b1)
    assert_close(y, np.maximum(z1, 0), dtype)
    g1 = np.where(z1 > 0, gy, 0)
    gh, gw1, gb1 = R.linear_backward(g1, np.maximum(z0, 0), w1)
    rgx, gw0, gb0 = R.linear_backward(np.where(z0 > 0, gh, 0), x, w0)
    for got, exp in ((gx, rgx), (fused[0].weight.grad, gw0), (fused[0].bias.grad, gb0)):
        assert_close(got, exp, dtype)
    assert_close(fused[2].weight.grad, gw1, dtype)
    assert_close(fused[2].bias.grad, gb1, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("algorithm", ["im2col", "direct"])
@pytest.mark.parametrize("input_grad", [True, False])
def test_sequential_fuses_conv_relu_maxpool_with_the_same_result(algorithm, input_grad, dtype):
    """Conv2d, ReLU, MaxPool2d(2) run as one fused conv + bias + ReLU + max-pool: the output and
    every gradient are bit-identical to the three layers called one after the other (odd 7x7
    conv output: floor mode drops the last row and column), and match the oracle. One
    exception: the direct path sums the fused conv's bias gradient over the pooled gradient
    (a quarter of the terms, the same nonzero values, another order): equal within rounding."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 2, 9, 9)).astype(dtype)
    gy = rng.standard_normal((5, 10)).astype(dtype)

    def make():
        return fc.Sequential(
            fc.Conv2d(2, 4, 3, dtype=dtype, rng=0, algorithm=algorithm),
            fc.ReLU(),
            fc.MaxPool2d(2),
            fc.Flatten(),
            fc.Linear(36, 10, dtype=dtype, rng=1),
        )

    fused, plain = make(), make()
    xt = fc.Tensor(x, requires_grad=input_grad)
    y = fused(xt)
    assert ops_run(y) == ["conv2d_relu_maxpool", "reshape", "linear"]
    y.backward(gy)
    gx, y = xt.grad, y.numpy()
    # each layer called on its own: no fusion
    outs, gins = layer_by_layer(plain, x, gy, input_grad=input_grad)
    h, g, gx_plain = outs[2], gins[3], gins[0]  # the pooled output and its gradient
    np.testing.assert_array_equal(y, outs[-1])
    assert (gx is None) == (not input_grad)
    assert (gx_plain is None) == (not input_grad)
    if input_grad:
        np.testing.assert_array_equal(gx, gx_plain)
    for i, (a, b) in enumerate(zip(fused.parameters(), plain.parameters())):
        if algorithm == "direct" and i == 1:  # the conv bias: summed over the pooled gradient
            assert_close(a.grad, b.grad, dtype)
        else:
            np.testing.assert_array_equal(a.grad, b.grad)
    w, b = fused[0].weight.data, fused[0].bias.data
    z = np.maximum(R.conv2d(x, w, b), 0)
    assert_close(h, R.max_pool2d(z, 2), dtype)
    gz = R.max_pool2d_backward(g, z, 2)
    rgx, rgw, rgb = R.conv2d_backward(np.where(z > 0, gz, 0), x, w)
    if input_grad:
        assert_close(gx, rgx, dtype)
    assert_close(fused[0].weight.grad, rgw, dtype)
    assert_close(fused[0].bias.grad, rgb, dtype)


@pytest.mark.parametrize(
    "pool",
    [
        fc.MaxPool2d(2, stride=1),
        fc.MaxPool2d(2, padding=1),
        fc.MaxPool2d(2, ceil_mode=True),
        fc.MaxPool2d(2, backend="reference"),
        fc.AvgPool2d(2),
    ],
)
def test_sequential_does_not_fuse_other_pools(pool):
    """Pools the fused kernel does not cover run as layers of their own (conv + ReLU fused)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 1, 8, 8))
    model = fc.Sequential(fc.Conv2d(1, 3, 3, dtype=np.float64, rng=0), fc.ReLU(), pool)
    xt = fc.Tensor(x, requires_grad=True)
    y = model(xt)
    pool_op = "max_pool2d" if isinstance(pool, fc.MaxPool2d) else "avg_pool2d"
    assert ops_run(y) == ["conv2d_relu", pool_op]
    z = np.maximum(R.conv2d(x, model[0].weight.data, model[0].bias.data), 0)
    zt = fc.Tensor(z, requires_grad=True)
    expected = pool(zt)
    assert_close(y.numpy(), expected.numpy())
    gy = rng.standard_normal(y.shape)
    y.backward(gy)
    expected.backward(gy)
    gz = zt.grad
    rgx, rgw, _ = R.conv2d_backward(np.where(z > 0, gz, 0), x, model[0].weight.data)
    assert_close(xt.grad, rgx)
    assert_close(model[0].weight.grad, rgw)


def test_sequential_fused_run_in_eval_mode_and_layer_caches():
    """The fused run also serves inference (eval mode); the ReLU and MaxPool2d it stands in
    for hold no input afterwards (layers keep no state for backward: the tape does)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 1, 10, 10))
    model = fc.Sequential(fc.Conv2d(1, 3, 3, dtype=np.float64, rng=0), fc.ReLU(), fc.MaxPool2d(2))
    model.eval()
    xt = fc.Tensor(x, requires_grad=True)
    y = model(xt)
    assert ops_run(y) == ["conv2d_relu_maxpool"]
    z = np.maximum(R.conv2d(x, model[0].weight.data, model[0].bias.data), 0)
    assert_close(y.numpy(), R.max_pool2d(z, 2))
    for layer in (model[1], model[2]):
        assert not [k for k, v in vars(layer).items() if isinstance(v, (np.ndarray, fc.Tensor))]
    y.backward(np.ones(y.shape))  # the model's own backward still works
    gx = xt.grad
    assert gx.shape == x.shape
