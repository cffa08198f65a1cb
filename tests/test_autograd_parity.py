"""User-written networks against PyTorch: a ResNet basic block with a strided 1x1-projection
shortcut, an Inception block (four branches concatenated on channels), BatchNorm2d,
AdaptiveAvgPool2d and a Linear head. Logits, loss, every parameter gradient and the BatchNorm
running statistics after an SGD step must equal torch's, on every host backend (the CUDA
backend runs the same network in tests/cuda/test_cuda_autograd.py)."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = {np.float64: 1e-9, np.float32: 2e-4}


class Basic(fc.Module):
    def __init__(self, cin, cout, stride, dtype):
        super().__init__()
        self.conv1 = fc.Conv2d(cin, cout, 3, stride, 1, bias=False, dtype=dtype)
        self.bn1 = fc.BatchNorm2d(cout, dtype=dtype)
        self.conv2 = fc.Conv2d(cout, cout, 3, 1, 1, bias=False, dtype=dtype)
        self.bn2 = fc.BatchNorm2d(cout, dtype=dtype)
        self.shortcut = fc.Sequential(
            fc.Conv2d(cin, cout, 1, stride, bias=False, dtype=dtype),
            fc.BatchNorm2d(cout, dtype=dtype),
        )

    def forward(self, x):
        y = fc.relu(self.bn1(self.conv1(x)))
        return fc.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class Inception(fc.Module):
    def __init__(self, cin, dtype):
        super().__init__()
        c = dict(dtype=dtype)
        self.b1 = fc.Conv2d(cin, 4, 1, **c)
        self.b2 = fc.Sequential(
            fc.Conv2d(cin, 3, 1, **c), fc.ReLU(), fc.Conv2d(3, 4, 3, padding=1, **c)
        )
        self.b3 = fc.Sequential(
            fc.Conv2d(cin, 2, 1, **c), fc.ReLU(), fc.Conv2d(2, 3, 5, padding=2, **c)
        )
        self.b4 = fc.Sequential(fc.MaxPool2d(3, 1, 1), fc.Conv2d(cin, 2, 1, **c))

    def forward(self, x):
        return fc.relu(fc.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class Net(fc.Module):
    def __init__(self, dtype):
        super().__init__()
        self.stem = fc.Sequential(
            fc.Conv2d(3, 6, 3, padding=1, dtype=dtype), fc.BatchNorm2d(6, dtype=dtype), fc.ReLU()
        )
        self.block = Basic(6, 8, 2, dtype)
        self.inception = Inception(8, dtype)
        self.pool = fc.AdaptiveAvgPool2d(1)
        self.head = fc.Linear(13, 5, dtype=dtype)

    def forward(self, x):
        x = self.inception(self.block(self.stem(x)))
        return self.head(fc.flatten(self.pool(x)))


class TBasic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TInception(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b1 = nn.Conv2d(cin, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(cin, 3, 1), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1))
        self.b3 = nn.Sequential(nn.Conv2d(cin, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 5, padding=2))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 2, 1))

    def forward(self, x):
        return torch.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))


class TNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = TBasic(6, 8, 2)
        self.inception = TInception(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(13, 5)

    def forward(self, x):
        x = self.inception(self.block(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def twins(dtype):
    net, tnet = Net(dtype), TNet().to(torch.float64 if dtype == np.float64 else torch.float32)
    sd = net.state_dict()
    assert list(sd) == list(tnet.state_dict())  # same keys, same order
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return net, tnet


def run_step(net, tnet, x, y, backend):
    """One SGD step on both; returns (fastconv logits, loss, torch logits, loss)."""
    opt = fc.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9)
    with fc.using(backend=backend):
        out = net(x)
        loss = fc.CrossEntropyLoss(label_smoothing=0.1)(out, y)
        loss.backward()
    tout = tnet(torch.from_numpy(x))
    tloss = nn.CrossEntropyLoss(label_smoothing=0.1)(tout, torch.from_numpy(y))
    tloss.backward()
    return opt, topt, out, loss, tout, tloss


def check_against_torch(net, tnet, out, loss, tout, tloss, dtype, to_host=np.asarray):
    tol = TOL[dtype]
    np.testing.assert_allclose(to_host(out.numpy()), tout.detach().numpy(), rtol=tol, atol=tol)
    assert abs(float(loss) - tloss.item()) < tol
    tp = dict(tnet.named_parameters())
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        np.testing.assert_allclose(
            np.asarray(fc.Tensor(p.grad).numpy()),
            tp[name].grad.numpy(),
            rtol=tol,
            atol=tol,
            err_msg=name,
        )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_resnet_inception_net_matches_torch(backend, dtype):
    net, tnet = twins(dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 10, 10)).astype(dtype)
    y = rng.integers(0, 5, 4)
    opt, topt, out, loss, tout, tloss = run_step(net, tnet, x, y, backend)
    assert out.shape == (4, 5) and out.dtype == dtype
    check_against_torch(net, tnet, out, loss, tout, tloss, dtype)
    with fc.using(backend=backend):
        opt.step()
    topt.step()
    tsd = tnet.state_dict()
    for k, v in net.state_dict().items():  # parameters after the step and running statistics
        np.testing.assert_allclose(v, tsd[k].numpy(), rtol=TOL[dtype], atol=TOL[dtype], err_msg=k)
    assert int(net.state_dict()["block.bn1.num_batches_tracked"]) == 1
    # evaluation mode uses the running statistics on both sides
    net.eval(), tnet.eval()
    with fc.no_grad(), fc.using(backend=backend):
        ev = net(x)
    with torch.no_grad():
        tev = tnet(torch.from_numpy(x))
    np.testing.assert_allclose(ev.numpy(), tev.numpy(), rtol=TOL[dtype], atol=TOL[dtype])


def test_two_steps_accumulate_like_torch():
    """Gradients accumulate over two backward calls without zero_grad, as in torch."""
    net, tnet = twins(np.float64)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8))
    y = rng.integers(0, 5, 2)
    for _ in range(2):
        fc.CrossEntropyLoss()(net(x), y).backward()
        nn.CrossEntropyLoss()(tnet(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    tp = dict(tnet.named_parameters())
    for name, p in net.named_parameters():
        np.testing.assert_allclose(p.grad, tp[name].grad.numpy(), rtol=1e-9, atol=1e-9)


def test_frozen_stem_gets_no_gradient_and_others_match():
    """Fine-tuning: requires_grad_(False) on the stem; the rest still matches torch."""
    net, tnet = twins(np.float64)
    net.stem.requires_grad_(False)
    for p in tnet.stem.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 3, 8, 8))
    y = rng.integers(0, 5, 3)
    fc.CrossEntropyLoss()(net(x), y).backward()
    nn.CrossEntropyLoss()(tnet(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    tp = dict(tnet.named_parameters())
    for name, p in net.named_parameters():
        if name.startswith("stem."):
            assert p.grad is None, name
        else:
            np.testing.assert_allclose(p.grad, tp[name].grad.numpy(), rtol=1e-9, atol=1e-9)
