"""The tape on the GPU: device Tensors through every recorded op, and a user network moved with
``model.to("cuda")`` against PyTorch.

The network is the ResNet basic block + Inception block + BatchNorm2d + AdaptiveAvgPool2d +
Linear model of tests/test_autograd_parity.py: logits, loss, every parameter gradient (left on
the device) and the parameters and BatchNorm running statistics after an SGD step equal torch's.
Each Tensor op runs on device Tensors and, as the oracle, on host Tensors with the "reference"
backend (float64 NumPy); forward values and every input's gradient must agree. Shapes are tiny:
the simulator runs one Python thread per CUDA thread.
"""

import numpy as np
import pytest

import fastconv as fc
from fastconv import functional as F
from tests.cuda.common import is_numba_device, to_device
from tests.helpers import DTYPES, assert_close
from tests.test_autograd_parity import TOL, check_against_torch, twins

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.cuda


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize("dtype", DTYPES)
def test_resnet_inception_net_on_device_matches_torch(dtype):
    net, tnet = twins(dtype)
    net.to("cuda")
    assert all(is_numba_device(p.data) for p in net.parameters())
    assert is_numba_device(net.stem[1].running_mean)
    rng = _rng(0)
    x = rng.standard_normal((2, 3, 4, 4)).astype(dtype)
    y = rng.integers(0, 5, 2)
    opt = fc.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9)
    (xd,) = to_device(x)
    out = net(xd)
    assert out.device == "cuda" and is_numba_device(out.data)
    assert out.shape == (2, 5) and out.dtype == dtype
    loss = fc.CrossEntropyLoss(label_smoothing=0.1)(out, y)  # NumPy labels follow the logits
    loss.backward()
    tout = net_t = tnet(torch.from_numpy(x))
    tloss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(net_t, torch.from_numpy(y))
    tloss.backward()
    for name, p in net.named_parameters():  # the gradients stay on the GPU
        assert is_numba_device(p.grad), name
    check_against_torch(net, tnet, out, loss, tout, tloss, dtype)
    opt.step()
    topt.step()
    assert all(is_numba_device(p.data) for p in net.parameters())
    tsd = tnet.state_dict()
    for k, v in net.state_dict().items():  # parameters after the step and running statistics
        np.testing.assert_allclose(v, tsd[k].numpy(), rtol=TOL[dtype], atol=TOL[dtype], err_msg=k)
    assert int(net.state_dict()["block.bn1.num_batches_tracked"]) == 1
    if dtype == np.float64:  # evaluation mode uses the (device) running statistics
        net.eval(), tnet.eval()
        with fc.no_grad():
            ev = net(xd)
        assert not ev.requires_grad and is_numba_device(ev.data)
        with torch.no_grad():
            tev = tnet(torch.from_numpy(x))
        np.testing.assert_allclose(ev.numpy(), tev.numpy(), rtol=TOL[dtype], atol=TOL[dtype])


# --------------------------------------------------------------------------- tensor ops


def _same_on_device_and_oracle(fn, arrays, dtype, seed=0, grad=True):
    """``fn(*tensors)`` on device Tensors (backend "auto" -> cuda) against the same call on host
    Tensors with the oracle; then one backward with the same output gradient on both: the
    gradient of every input (a device array) must match the oracle's."""
    from numba import cuda

    arrays = [np.asarray(a, dtype) for a in arrays]
    host = [fc.Tensor(a, requires_grad=True) for a in arrays]
    dev = [fc.Tensor(d, requires_grad=True) for d in to_device(*arrays)]
    with fc.using(backend="reference"):
        expected = fn(*host)
    out = fn(*dev)
    assert out.requires_grad and out.grad_fn == expected.grad_fn
    if out.ndim > 0:
        assert out.device == "cuda", out.grad_fn
    assert_close(out.data, expected.data, dtype, f"{out.grad_fn} forward")
    if not grad:
        return out
    gy = _rng(seed + 1).standard_normal(expected.shape).astype(dtype)
    with fc.using(backend="reference"):
        expected.backward(gy)
    out.backward(cuda.to_device(gy) if out.device == "cuda" else gy)  # 0-d stays 0-d
    for i, (d, h) in enumerate(zip(dev, host)):
        assert is_numba_device(d.grad), (out.grad_fn, i)
        assert_close(d.grad, h.grad, dtype, f"{out.grad_fn} grad of input {i}")
    return out


def _randn(*shape, seed=0):
    return _rng(seed).standard_normal(shape)


BINARY_SHAPES = [
    ((2, 3, 4), (2, 3, 4)),  # same shape
    ((2, 3, 4), (3, 1)),  # trailing broadcast, fewer axes
    ((1, 3, 1), (2, 1, 4)),  # both sides broadcast
    ((2, 1, 3, 1), (4, 3, 1)),  # 4-D against 3-D
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes", BINARY_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_binary_broadcast(op, shapes, dtype):
    a = _randn(*shapes[0], seed=1)
    b = _randn(*shapes[1], seed=2)
    if op == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)  # away from zero
    sym = {"add": "__add__", "sub": "__sub__", "mul": "__mul__", "div": "__truediv__"}[op]
    _same_on_device_and_oracle(lambda x, y: getattr(x, sym)(y), (a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_python_numbers_with_device_tensors(dtype):
    """A number on either side of a device Tensor: it goes to the device with the Tensor."""
    x = _randn(2, 3, seed=3) + 3.0
    _same_on_device_and_oracle(lambda t: (2.0 - t) * 0.5 / (1.5 + t) - (-t) / 3, (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_and_transpose(dtype):
    a, b = _randn(3, 4, seed=4), _randn(4, 5, seed=5)
    _same_on_device_and_oracle(lambda x, y: x @ y, (a, b), dtype)
    _same_on_device_and_oracle(lambda x, y: (x.T @ y.T).T, (_randn(4, 3), _randn(5, 4)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "reduce,axis,keepdims",
    [
        ("sum", None, False),
        ("mean", None, False),
        ("sum", (0, 2), False),
        ("mean", 1, True),
        ("sum", -1, True),
        ("mean", (0, 3), False),
    ],
)
def test_sum_mean(reduce, axis, keepdims, dtype):
    x = _randn(2, 3, 2, 3, seed=6)
    _same_on_device_and_oracle(
        lambda t: getattr(t, reduce)(axis=axis, keepdims=keepdims), (x,), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_reshape_flatten_getitem(dtype):
    x = _randn(2, 5, 3, 2, seed=7)
    _same_on_device_and_oracle(lambda t: t.reshape(2, -1, 3) * 2.0, (x,), dtype)
    _same_on_device_and_oracle(lambda t: F.flatten(t), (x,), dtype)
    # a channel slice (an Inception branch's view), a strided slice, an integer index
    _same_on_device_and_oracle(lambda t: t[:, 1:4], (x,), dtype)
    _same_on_device_and_oracle(lambda t: t[:, ::2, 1:], (x,), dtype)
    _same_on_device_and_oracle(lambda t: t[1, 2], (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cat(dtype):
    a, b, c = _randn(2, 1, 3, 2, seed=8), _randn(2, 3, 3, 2, seed=9), _randn(2, 2, 3, 2, seed=10)
    _same_on_device_and_oracle(lambda x, y, z: fc.cat([x, y, z], 1), (a, b, c), dtype)
    _same_on_device_and_oracle(lambda x, y: fc.cat([x, y], 0), (_randn(1, 4), _randn(3, 4)), dtype)
    # the same Tensor twice: both gradients add up in one .grad
    _same_on_device_and_oracle(lambda x: fc.cat([x, x * 3.0], -1), (_randn(2, 3),), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, -1, 0])
def test_softmax_log_softmax(dim, dtype):
    x = _randn(3, 4, 2, seed=11) * 3
    _same_on_device_and_oracle(lambda t: t.softmax(dim), (x,), dtype)
    _same_on_device_and_oracle(lambda t: F.log_softmax(t, dim), (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_elu(alpha, dtype):
    x = _randn(2, 3, 4, seed=12) * 2
    x[0, 0, :2] = 0.0  # the kink
    _same_on_device_and_oracle(lambda t: F.elu(t, alpha), (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, (2, 3), (3, 2), (None, 2)])
def test_adaptive_avg_pool2d(size, dtype):
    x = _randn(2, 2, 5, 7, seed=13)  # uneven, overlapping windows
    _same_on_device_and_oracle(lambda t: F.adaptive_avg_pool2d(t, size), (x,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy(smoothing, dtype):
    z = _randn(4, 5, seed=14) * 3
    labels = np.array([0, 4, 2, 2])
    for lab in (labels, to_device(labels)[0]):  # device labels, or NumPy labels via the module

        def fn(t, lab=lab):
            if t.device == "cpu" or is_numba_device(lab):
                return F.cross_entropy(
                    t, labels if t.device == "cpu" else lab, label_smoothing=smoothing
                )
            return fc.CrossEntropyLoss(label_smoothing=smoothing)(t, lab)

        _same_on_device_and_oracle(fn, (z,), dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nll_after_log_softmax(dtype):
    z = _randn(3, 4, seed=15) * 2
    labels = np.array([3, 0, 1])
    _same_on_device_and_oracle(lambda t: fc.NLLLoss()(F.log_softmax(t, 1), labels), (z,), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_loss_both_gradients(dtype):
    p, t = _randn(2, 3, 2, seed=16), _randn(2, 3, 2, seed=17)
    _same_on_device_and_oracle(lambda a, b: F.mse_loss(a, b), (p, t), dtype)
    _same_on_device_and_oracle(lambda a, b: fc.MSELoss()(a * b, b), (p, t), dtype, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_sums_gradients_of_a_shared_input(dtype):
    """One input used by several ops: its gradients meet and are added on the device."""
    x, w = _randn(3, 4, seed=18), _randn(4, 2, seed=19)

    def fn(a, b):
        h = F.elu(a @ b, 0.5)
        return (h * a[:, :2] + a.mean(axis=1, keepdims=True)).softmax(1).sum(axis=0)

    _same_on_device_and_oracle(fn, (x, w), dtype)


# --------------------------------------------------------------------------- devices


def test_host_device_mismatch_is_a_clear_type_error():
    h = fc.Tensor(_randn(2, 3), requires_grad=True)
    (dd,) = to_device(_randn(2, 3, seed=1))
    d = fc.Tensor(dd, requires_grad=True)
    for name, call in (
        ("add", lambda: h + d),
        ("sub", lambda: d - h),
        ("mul", lambda: h * d),
        ("div", lambda: d / h),
        ("matmul", lambda: h @ d.T),
        ("cat", lambda: fc.cat([h, d], 0)),
        ("mse_loss", lambda: F.mse_loss(d, h)),
    ):
        with pytest.raises(TypeError, match=rf"^{name}: .*host.*device"):
            call()
    # a device layer given a host batch
    x = fc.Tensor(_randn(2, 2, 3, 3).astype(np.float32))
    for name, layer in (
        ("conv2d", fc.Conv2d(2, 2, 3)),
        ("batch_norm2d", fc.BatchNorm2d(2)),
        ("linear", fc.Linear(9, 2)),
    ):
        layer.to("cuda")
        with pytest.raises(TypeError, match=rf"^{name}: .*x on host, .* on device"):
            layer(x.reshape(4, 9) if name == "linear" else x)


def test_to_cuda_and_back_carries_the_gradient():
    x = _randn(2, 3, seed=20)
    w = _randn(2, 3, seed=21)
    t = fc.Tensor(x, requires_grad=True)
    u = t.to("cuda")
    assert u.device == "cuda" and is_numba_device(u.data) and u.grad_fn == "to"
    assert t.to("cpu") is t and u.to("cuda") is u  # nothing to move: the same Tensor
    back = (u * u).to("cpu")
    assert back.device == "cpu" and isinstance(back.data, np.ndarray)
    (back * w).sum().backward()
    assert isinstance(t.grad, np.ndarray)
    assert_close(t.grad, 2 * x * w)
    # Tensor(x).to("cuda").to("cpu") is x again, and the identity's gradient comes back
    s = fc.Tensor(x, requires_grad=True)
    r = s.to("cuda").to("cpu")
    assert_close(r.numpy(), x)
    r.backward(w)
    assert isinstance(s.grad, np.ndarray)
    assert_close(s.grad, w)
    # a 0-d Tensor keeps its shape on the device; its gradient is 0-d again
    c = fc.Tensor(np.array(1.5), requires_grad=True)
    cd = c.to("cuda")
    assert cd.shape == () and is_numba_device(cd.data)
    (cd * u.detach()).sum().backward()
    assert c.grad.shape == () and float(c.grad) == pytest.approx(float(np.sum(x)))


def test_device_leaf_to_host_gradient_lands_on_the_device():
    (xd,) = to_device(_randn(3, 2, seed=22))
    t = fc.Tensor(xd, requires_grad=True)
    t.to("cpu").sum().backward()
    assert is_numba_device(t.grad)
    assert_close(t.grad, np.ones((3, 2)))
    t.to(np.float32).sum().backward()  # a cast on the device: the gradient comes back float64
    assert is_numba_device(t.grad) and t.grad.dtype == np.float64
    assert_close(t.grad, np.full((3, 2), 2.0))
