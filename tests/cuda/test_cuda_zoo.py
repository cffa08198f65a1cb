"""Every zoo model on the GPU (``model.to("cuda")``) against its torch twin, in float64: logits,
loss and every parameter gradient (left on the device), then the parameters and BatchNorm
running statistics after one SGD step.

Twins: tests/test_models.py (the MNIST ``Sequential``s), tests/test_zoo.py (the configurable
networks), and a layer-for-layer ``torch.nn.Sequential`` for any other ``Sequential`` in the
zoo. Batch 2 of 28 px images on a GPU. Dropout networks compare in evaluation mode (torch
draws other masks), the BatchNorm networks in training mode (batch statistics).

The simulator runs one Python thread per CUDA thread, and the tiled GEMM and the reductions
synchronise their blocks often, so there only LeNet-5 (batch 1, ~1.5 min on the shared 2-core
machine) runs by default. Measured there, forward + backward alone: nielsen > 6.5 min of CPU
(its 1000x1000 Linear layers) before it was stopped, resnet8 ~400 s even at 4 px and batch 2
(batch-norm statistics and split sums), mnist_cnn larger still. ``FASTCONV_CUDA_ZOO=all`` runs
every model on the simulator too (the configurable ones at 8 px, their smallest documented size).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastconv as fc
from fastconv import models
from tests.cuda.common import is_numba_device, to_device
from tests.cuda.conftest import on_simulator
from tests.test_models import torch_models

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.cuda
nn = torch.nn

TOL = 1e-9  # float64
ALL = os.environ.get("FASTCONV_CUDA_ZOO", "").strip().lower() == "all"
SIZE = 8 if on_simulator else 28  # the configurable networks' input size
BATCH = {"lenet5": 1} if on_simulator else {}  # default 2
SIMULATED = ("lenet5",)  # the models the simulator runs without FASTCONV_CUDA_ZOO=all


def _torch_sequential(net: fc.Sequential) -> nn.Sequential:
    """The equal ``torch.nn.Sequential`` of a zoo ``Sequential`` (same indices, so same keys)."""
    layers = []
    for m in net:
        kind = type(m).__name__
        if kind == "Conv2d":
            c_out, c_in = m.weight.shape[:2]
            layers.append(
                nn.Conv2d(c_in, c_out, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            )
        elif kind == "Linear":
            layers.append(nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None))
        elif kind == "MaxPool2d":
            layers.append(nn.MaxPool2d(m.kernel_size, m.stride, m.padding))
        elif kind == "ReLU":
            layers.append(nn.ReLU())
        elif kind == "Flatten":
            layers.append(nn.Flatten())
        elif kind == "Dropout":
            layers.append(nn.Dropout(m.p))
        else:  # pragma: no cover - a new layer kind in a zoo Sequential
            raise NotImplementedError(f"no torch twin for {kind}")
    return nn.Sequential(*layers)


def twins(name: str):
    """(fastconv model, torch twin with the same float64 weights, input shape, classes)."""
    from tests.test_zoo import TWINS

    if name in models.CONFIGURABLE:
        net = models.get(name, in_channels=1, num_classes=10, rng=0, dtype=np.float64)
        tnet, shape = TWINS[name](1, 10), (BATCH.get(name, 2), 1, SIZE, SIZE)
    else:
        net = models.get(name, rng=0, dtype=np.float64)
        tnet = torch_models().get(name) or _torch_sequential(net)
        shape = (BATCH.get(name, 2), 1, 28, 28)
    tnet = tnet.double()
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    return net, tnet, shape, 10


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_zoo_model_on_device_matches_torch(name):
    if on_simulator and name not in SIMULATED and not ALL:
        pytest.skip(f"{name}: too slow on the simulator (FASTCONV_CUDA_ZOO=all runs it)")
    net, tnet, shape, k = twins(name)
    if any(type(m).__name__ == "Dropout" for m in net.modules()):
        net.eval(), tnet.eval()  # torch draws other dropout masks
    net.to("cuda")
    assert all(is_numba_device(p.data) for p in net.parameters())
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    y = rng.integers(0, k, shape[0])
    (xd,) = to_device(x)
    out = net(xd)
    assert out.device == "cuda" and out.shape == (shape[0], k) and out.dtype == np.float64
    loss = fc.CrossEntropyLoss()(out, y)
    loss.backward()
    tout = tnet(torch.from_numpy(x))
    tloss = nn.CrossEntropyLoss()(tout, torch.from_numpy(y))
    tloss.backward()

    np.testing.assert_allclose(out.numpy(), tout.detach().numpy(), rtol=TOL, atol=TOL)
    assert abs(float(loss) - tloss.item()) < TOL
    tp = dict(tnet.named_parameters())
    assert [n for n, _ in net.named_parameters()] == list(tp)
    for pname, p in net.named_parameters():
        assert is_numba_device(p.grad), pname  # the gradients stay on the GPU
        got = np.asarray(fc.Tensor(p.grad).numpy())
        np.testing.assert_allclose(got, tp[pname].grad.numpy(), rtol=1e-8, atol=TOL, err_msg=pname)

    # one SGD step on the device: parameters and running statistics agree
    opt = fc.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt.step()
    topt.step()
    assert all(is_numba_device(p.data) for p in net.parameters())
    tsd = {key: v.detach().numpy() for key, v in tnet.state_dict().items()}
    for key, v in net.state_dict().items():
        np.testing.assert_allclose(v, tsd[key], rtol=1e-8, atol=TOL, err_msg=key)
