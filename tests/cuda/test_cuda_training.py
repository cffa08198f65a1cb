"""A whole training step on the GPU: device parameters, forward, loss, backward, optimizer step,
compared with the same step on the CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from tests.cuda.common import is_numba_device
from tests.helpers import assert_close

pytestmark = pytest.mark.cuda


def _tiny_lenet(dtype):
    """LeNet-5's structure at a size the simulator runs in seconds (8x8 inputs)."""
    rng = np.random.default_rng(0)
    return fc.Sequential(
        fc.Conv2d(1, 3, 3, padding=1, rng=rng, dtype=dtype),  # (N, 3, 8, 8)
        fc.ReLU(),
        fc.MaxPool2d(2),  # (N, 3, 4, 4)
        fc.Conv2d(3, 4, 3, rng=rng, dtype=dtype, algorithm="direct"),  # (N, 4, 2, 2)
        fc.ReLU(),
        fc.AvgPool2d(2),  # (N, 4, 1, 1)
        fc.Flatten(),
        fc.Linear(4, 5, rng=rng, dtype=dtype),
        fc.Tanh(),
        fc.Linear(5, 3, rng=rng, dtype=dtype),
    )


def _steps(model, optimizer, x, y, n):
    loss_fn = fc.CrossEntropyLoss()
    losses = []
    for _ in range(n):
        optimizer.zero_grad()
        logits = model(x)
        losses.append(loss_fn(logits, y))
        model.backward(loss_fn.backward())
        optimizer.step()
    return losses, logits


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_step_on_device_matches_cpu(opt):
    dtype = np.float64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 8, 8)).astype(dtype)
    y = np.array([0, 2])

    def make(device):
        model = _tiny_lenet(dtype)
        if device == "cuda":
            model.to("cuda")
        if opt == "sgd":
            optimizer = fc.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        else:
            optimizer = fc.optim.Adam(model.parameters(), lr=1e-2)
        return model, optimizer

    cpu_model, cpu_opt = make("cpu")
    gpu_model, gpu_opt = make("cuda")
    assert all(is_numba_device(p.data) for p in gpu_model.parameters())
    from numba import cuda

    x_dev = cuda.to_device(x)  # the batch is uploaded once; labels go in as NumPy
    cpu_losses, _ = _steps(cpu_model, cpu_opt, x, y, 2)
    gpu_losses, logits = _steps(gpu_model, gpu_opt, x_dev, y, 2)
    assert is_numba_device(logits)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-10)
    assert all(is_numba_device(p.data) for p in gpu_model.parameters())
    cpu_state, gpu_state = cpu_model.state_dict(), gpu_model.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for k in cpu_state:
        assert_close(gpu_state[k], cpu_state[k], what=k)


def test_step_has_one_device_to_host_copy(monkeypatch):
    """After the first step, a step's only device-to-host transfer is the loss value."""
    from numba import cuda

    dtype = np.float32
    model = _tiny_lenet(dtype)
    model.to("cuda")
    optimizer = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = cuda.to_device(np.random.default_rng(2).standard_normal((2, 1, 8, 8)).astype(dtype))
    y = cuda.to_device(np.array([1, 0]))
    _steps(model, optimizer, x, y, 1)
    device_array_type = type(x)
    copies = []
    original = device_array_type.copy_to_host

    def counting(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(device_array_type, "copy_to_host", counting)
    losses, _ = _steps(model, optimizer, x, y, 1)
    assert np.isfinite(losses[0])
    assert copies == [(1,)], copies


def test_fit_on_device_matches_cpu():
    """training.fit (shuffling, batching, evaluation) with device parameters: same history."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 2, 1])
    hist = {}
    for device in ("cpu", "cuda"):
        model = _tiny_lenet(np.float64)
        if device == "cuda":
            model.to("cuda")
        opt = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        hist[device] = fc.training.fit(
            model, opt, (x, y), (x, y), epochs=1, batch_size=2, rng=0, progress=False, log=None
        )
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(hist["cuda"][key], hist["cpu"][key], rtol=1e-9)


MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "mnist")


@pytest.mark.hardware
@pytest.mark.skipif(not os.path.isdir(MNIST), reason="no MNIST files at ../shared/data/mnist")
def test_cli_train_backend_cuda(tmp_path):
    """`fastconv train --backend cuda` end to end on real MNIST (a short run)."""
    out = tmp_path / "metrics.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastconv",
            "train",
            "--backend",
            "cuda",
            "--epochs",
            "1",
            "--train-limit",
            "2048",
            "--data-dir",
            MNIST,
            "--no-progress",
            "--metrics-json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    metrics = json.loads(out.read_text())
    assert metrics, metrics
