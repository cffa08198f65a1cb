"""The configurable zoo models (resnet8, resnet20, inception_mini, vgg_mini) against torch twins
written here layer for layer: same module names, so state dicts move both ways unchanged; logits,
loss, every parameter gradient, the parameters and BatchNorm running statistics after one SGD
step, and evaluation-mode logits equal torch's in float64, on 28 px 1-channel and 32 px 3-channel
inputs. Plus parameter counts, initialisation and ``fastconv train`` for each."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli, models

torch = pytest.importorskip("torch")
nn = torch.nn

TOL = 1e-9  # float64


# --------------------------------------------------------------------------- torch twins


class TBasicBlock(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TResNet(nn.Module):
    def __init__(self, n, cin, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c = 16
        for stage, width in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(TBasicBlock(c, width, 2 if stage > 0 and i == 0 else 1))
                c = width
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TBasicConv2d(nn.Module):
    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class TInceptionBlock(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
        super().__init__()
        self.branch1 = TBasicConv2d(cin, c1, 1)
        self.branch2 = nn.Sequential(TBasicConv2d(cin, c3r, 1), TBasicConv2d(c3r, c3, 3, 1))
        self.branch3 = nn.Sequential(TBasicConv2d(cin, c5r, 1), TBasicConv2d(c5r, c5, 5, 2))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), TBasicConv2d(cin, cp, 1))

    def forward(self, x):
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, 1)


class TInceptionMini(nn.Module):
    def __init__(self, cin, num_classes):
        super().__init__()
        self.conv1 = TBasicConv2d(cin, 32, 3, 1)
        self.maxpool1 = nn.MaxPool2d(2)
        self.inception3a = TInceptionBlock(32, 16, 16, 24, 4, 8, 8)
        self.inception3b = TInceptionBlock(56, 32, 32, 48, 8, 16, 16)
        self.maxpool2 = nn.MaxPool2d(2)
        self.inception4a = TInceptionBlock(112, 48, 32, 64, 8, 16, 16)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(144, num_classes)

    def forward(self, x):
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TVGGMini(nn.Module):
    def __init__(self, cin, num_classes):
        super().__init__()
        layers, c = [], cin
        for v in (32, 32, "M", 64, 64, "M", 128, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


TWINS = {
    "resnet8": lambda c, k: TResNet(1, c, k),
    "resnet20": lambda c, k: TResNet(3, c, k),
    "inception_mini": TInceptionMini,
    "vgg_mini": TVGGMini,
}

# (name, in_channels, size, num_classes); resnet20 is resnet8 with more blocks: one config
CONFIGS = [
    (name, c, s, k)
    for name in ("resnet8", "inception_mini", "vgg_mini")
    for c, s, k in ((1, 28, 10), (3, 32, 7))
] + [("resnet20", 3, 32, 7)]


def _from_torch(sd):
    return {k: v.detach().numpy() for k, v in sd.items()}


def _to_torch(sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name,cin,size,k", CONFIGS)
def test_zoo_model_matches_torch_twin(name, cin, size, k):
    net = models.get(name, in_channels=cin, num_classes=k, rng=0, dtype=np.float64)
    torch.manual_seed(0)
    tnet = TWINS[name](cin, k).double()
    sd = net.state_dict()
    assert list(sd) == list(tnet.state_dict())  # same keys, same order
    tnet.load_state_dict(_to_torch(sd))  # fastconv -> torch
    for key, v in _from_torch(tnet.state_dict()).items():
        np.testing.assert_array_equal(v, sd[key], err_msg=key)

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, cin, size, size))
    y = rng.integers(0, k, 2)
    out = net(x)
    loss = fc.CrossEntropyLoss()(out, y)
    loss.backward()
    tout = tnet(torch.from_numpy(x))
    tloss = nn.CrossEntropyLoss()(tout, torch.from_numpy(y))
    tloss.backward()
    assert out.shape == (2, k) and out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=TOL, atol=TOL)
    assert abs(float(loss) - tloss.item()) < TOL
    tp = dict(tnet.named_parameters())
    assert [n for n, _ in net.named_parameters()] == list(tp)
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        np.testing.assert_allclose(p.grad, tp[pname].grad.numpy(), rtol=1e-8, atol=TOL)

    # one SGD step: parameters, running statistics and counters agree
    opt = fc.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.step()
    topt.step()
    after, tafter = net.state_dict(), _from_torch(tnet.state_dict())
    for key, v in after.items():
        np.testing.assert_allclose(v, tafter[key], rtol=1e-8, atol=TOL, err_msg=key)
    counters = [int(v) for key, v in after.items() if key.endswith("num_batches_tracked")]
    assert counters and set(counters) == {1}
    assert any(key.endswith("running_mean") and np.any(v != 0) for key, v in after.items())

    # torch -> fastconv: a fresh model takes torch's state and gives torch's eval logits
    back = models.get(name, in_channels=cin, num_classes=k, rng=5, dtype=np.float64)
    back.load_state_dict(tnet.state_dict())
    back.eval(), tnet.eval()
    with fc.no_grad():
        ev = back(x)
    with torch.no_grad():
        tev = tnet(torch.from_numpy(x))
    np.testing.assert_allclose(ev.numpy(), tev.numpy(), rtol=1e-8, atol=TOL)


# --------------------------------------------------------------------------- sizes and init

PARAMS = {
    "resnet8": (77754, 78042),
    "resnet20": (272186, 272474),
    "inception_mini": (63522, 64098),
    "vgg_mini": (156970, 157546),
}


@pytest.mark.parametrize("name", models.CONFIGURABLE)
def test_parameter_counts_match_docstrings_and_shapes(name):
    for cin, count in zip((1, 3), PARAMS[name]):
        model = models.get(name, in_channels=cin, rng=0)
        assert sum(p.data.size for p in model.parameters()) == count
        assert f"{count:,}" in models.MODELS[name].__doc__
    model = models.get(name, in_channels=3, num_classes=7, rng=0)
    model.eval()
    for size in (28, 32):
        with fc.no_grad():
            out = model(np.zeros((1, 3, size, size), np.float32))
        assert out.shape == (1, 7) and out.dtype == np.float32


def test_convolutions_start_from_kaiming_normal_and_models_are_seeded():
    a, b = models.resnet8(rng=3), models.resnet8(rng=3)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data)
    w = a.layer3[0].conv2.weight.data  # (64, 64, 3, 3): fan_out = 64 * 9
    assert abs(w.mean()) < 0.01
    assert w.std() == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.03)
    assert a.layer3[0].downsample is not None and a.layer1[0].downsample is None
    np.testing.assert_array_equal(a.bn1.weight.data, 1.0)
    bound = 1.0 / math.sqrt(64)  # Linear: PyTorch's default U(+-1/sqrt(in_features))
    assert np.abs(a.fc.weight.data).max() <= bound
    m = models.vgg_mini(rng=0, dtype=np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ResNet: n must be a positive int"):
        models.ResNet(0)
    with pytest.raises(ValueError, match="in_channels"):
        models.resnet8(in_channels=0)


# --------------------------------------------------------------------------- the command


@pytest.fixture
def tiny_mnist(monkeypatch):
    """MNIST-shaped uint8 images, few enough for a one-epoch run of each model."""
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")  # no background compiles of the other algorithm
    rng = np.random.default_rng(0)
    data = (
        rng.integers(0, 256, (64, 1, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 64),
        rng.integers(0, 256, (32, 1, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, 32),
    )
    monkeypatch.setattr(cli, "_load_data", lambda args: data)
    return data


@pytest.mark.parametrize("name", models.CONFIGURABLE)
def test_fastconv_train_runs_each_model(name, tiny_mnist, tmp_path, capsys):
    weights = tmp_path / "w.npz"
    argv = ["train", "--model", name, "--epochs", "1", "--batch-size", "32", "--no-progress"]
    assert cli.main([*argv, "--save", str(weights)]) == 0
    out = capsys.readouterr().out
    assert f"fastconv train: {name}" in out and "test accuracy" in out
    # the saved weights (BatchNorm running statistics included) load back for evaluation
    assert cli.main(["evaluate", "--load", str(weights)]) == 0
    assert f"{name} on mnist test set: accuracy" in capsys.readouterr().out
