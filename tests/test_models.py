"""Model zoo: architectures, parameter counts, PyTorch equivalence, seeding."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import models


def torch_models():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    return {
        "lenet5": nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        ),
        "nielsen": nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 40, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(640, 1000),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(1000, 1000),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(1000, 10),
        ),
        "mnist_cnn": nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
            nn.Flatten(),
            nn.Linear(9216, 128),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(128, 10),
        ),
    }


PARAMS = {"lenet5": 61706, "nielsen": 1672570, "mnist_cnn": 1199882}


@pytest.mark.parametrize("name", sorted(PARAMS))  # the Sequential models; the rest: test_zoo.py
def test_model_shapes_and_parameter_counts(name):
    model = models.get(name, rng=0)
    assert isinstance(model, fc.Sequential)
    assert sum(p.data.size for p in model.parameters()) == PARAMS[name]
    y = model(np.zeros((2, 1, 28, 28), np.float32))
    assert y.shape == (2, 10) and y.dtype == np.float32


@pytest.mark.parametrize("name", sorted(PARAMS))  # the Sequential models; the rest: test_zoo.py
def test_model_equals_torch_sequential(name):
    torch = pytest.importorskip("torch")
    ours, theirs = models.get(name, rng=0), torch_models()[name]
    sd = ours.state_dict()
    assert list(sd) == list(theirs.state_dict())
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=1e-4, atol=1e-5)
    ours.load_state_dict(theirs.state_dict())  # and back


def test_models_are_seeded_and_float64_capable():
    a, b, c = models.lenet5(rng=1), models.lenet5(rng=1), models.lenet5(rng=2)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data)
    assert not np.array_equal(a[0].weight.data, c[0].weight.data)
    m = models.nielsen(rng=0, dtype=np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert [n for n, _ in m.named_generators()] == ["9.rng", "12.rng"]


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; choose one of"):
        models.get("vgg")
