"""A whole training step on the GPU: device parameters, forward, loss, backward, optimizer step,
compared with the same step on the CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import _device, reference
from tests.cuda.common import is_numba_device
from tests.helpers import DTYPES, assert_close

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
        loss = loss_fn(logits, y)
        loss.backward()
        losses.append(float(loss))
        optimizer.step()
    return losses, logits


def _count_host_copies(monkeypatch, device_array_type):
    """A list that collects the shape of every device-to-host copy from now on."""
    copies = []
    original = device_array_type.copy_to_host

    def counting(self, *args, **kwargs):
        copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(device_array_type, "copy_to_host", counting)
    return copies


@pytest.mark.parametrize("opt", ["sgd", "adam", "rmsprop", "adagrad"])
def test_training_step_on_device_matches_cpu(opt):
    dtype = np.float64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 1, 8, 8)).astype(dtype)
    y = np.array([0, 2])

    def make(device):
        model = _tiny_lenet(dtype)
        if device == "cuda":
            model.to("cuda")
        params = model.parameters()
        if opt == "sgd":
            optimizer = fc.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
        elif opt == "adam":
            optimizer = fc.optim.Adam(params, lr=1e-2)
        elif opt == "rmsprop":
            optimizer = fc.optim.RMSprop(
                params, lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3
            )
        else:
            optimizer = fc.optim.AdaGrad(
                params, lr=0.1, lr_decay=0.01, weight_decay=1e-3, initial_accumulator_value=0.1
            )
        return model, optimizer

    cpu_model, cpu_opt = make("cpu")
    gpu_model, gpu_opt = make("cuda")
    assert all(is_numba_device(p.data) for p in gpu_model.parameters())
    from numba import cuda

    x_dev = cuda.to_device(x)  # the batch is uploaded once; labels go in as NumPy
    cpu_losses, _ = _steps(cpu_model, cpu_opt, x, y, 2)
    gpu_losses, logits = _steps(gpu_model, gpu_opt, x_dev, y, 2)
    assert is_numba_device(logits.data)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-10)
    assert all(is_numba_device(p.data) for p in gpu_model.parameters())
    cpu_state, gpu_state = cpu_model.state_dict(), gpu_model.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for k in cpu_state:
        assert_close(gpu_state[k], cpu_state[k], what=k)
    for i, (cs, gs) in enumerate(zip(cpu_opt.state, gpu_opt.state)):
        assert cs.keys() == gs.keys()
        for k, v in cs.items():
            if isinstance(v, np.ndarray):
                assert is_numba_device(gs[k]), (i, k)
                assert_close(gs[k], v, what=f"state {i} {k}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_device_add_accumulates_in_place_without_host_copies(dtype, monkeypatch):
    from numba import cuda

    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 3, 4)).astype(dtype), rng.standard_normal((2, 3, 4))
    a_dev, b_dev = cuda.to_device(a), cuda.to_device(b.astype(dtype))
    expected = a.astype(np.float64) + b.astype(dtype).astype(np.float64)
    copies = _count_host_copies(monkeypatch, type(a_dev))
    out = _device.add(a_dev, b_dev)
    assert out is a_dev and copies == []
    assert_close(a_dev, expected, dtype, "device += device")
    copies.clear()  # assert_close itself copied a_dev back
    # a host summand is copied to the GPU, never the other way
    _device.add(a_dev, b.astype(dtype))
    assert copies == []
    assert_close(a_dev, expected + b.astype(dtype), dtype, "device += host")


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_gradients_accumulate_on_device_like_the_oracle(dtype, monkeypatch):
    """Two forward/backward rounds without zero_grad(): .grad holds the sum of both rounds'
    gradients, added up on the GPU."""
    from numba import cuda

    rng = np.random.default_rng(5)
    layer = fc.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=dtype)
    w = layer.weight.data.copy()
    layer.to("cuda")
    xs = [rng.standard_normal((2, 2, 4, 4)).astype(dtype) for _ in range(2)]
    gys = [rng.standard_normal((2, 3, 4, 4)).astype(dtype) for _ in range(2)]
    gw_ref, gb_ref = 0.0, 0.0
    for x, gy in zip(xs, gys):
        ref = reference.conv2d_backward(
            gy.astype(np.float64), x.astype(np.float64), w.astype(np.float64), padding=1
        )
        gw_ref, gb_ref = gw_ref + ref[1], gb_ref + ref[2]
    x_devs, gy_devs = [cuda.to_device(x) for x in xs], [cuda.to_device(gy) for gy in gys]
    copies = _count_host_copies(monkeypatch, type(x_devs[0]))
    for x_dev, gy_dev in zip(x_devs, gy_devs):
        layer(x_dev).backward(gy_dev)
    assert copies == []
    assert is_numba_device(layer.weight.grad) and is_numba_device(layer.bias.grad)
    assert_close(layer.weight.grad, gw_ref, dtype, "weight.grad")
    assert_close(layer.bias.grad, gb_ref, dtype, "bias.grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_accumulation_on_device_matches_cpu(dtype, monkeypatch):
    """Two backward calls without zero_grad() through the whole model: same .grad as the CPU."""
    from numba import cuda

    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((2, 1, 8, 8)).astype(dtype) for _ in range(2)]
    ys = [np.array([0, 2]), np.array([1, 1])]
    grads = {}
    for device in ("cpu", "cuda"):
        model = _tiny_lenet(dtype)
        if device == "cuda":
            model.to("cuda")
        loss_fn = fc.CrossEntropyLoss()
        for x, y in zip(xs, ys):
            loss = loss_fn(model(cuda.to_device(x) if device == "cuda" else x), y)
            with monkeypatch.context() as mp:
                copies = _count_host_copies(mp, type(cuda.to_device(x)))
                loss.backward()
            assert copies == [], copies  # backward, accumulation included, stays on the GPU
        grads[device] = {n: p.grad for n, p in model.named_parameters()}
    assert grads["cpu"].keys() == grads["cuda"].keys()
    for name, g in grads["cpu"].items():
        assert is_numba_device(grads["cuda"][name]), name
        assert_close(grads["cuda"][name], g, dtype, f"{name}.grad")


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
    copies = _count_host_copies(monkeypatch, type(x))
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
