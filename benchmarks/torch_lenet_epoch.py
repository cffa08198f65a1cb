"""One training epoch of LeNet-5 on MNIST: PyTorch (CPU) and fastconv side by side, same run.

Same network, data order, normalisation, batch size and optimizer (SGD, lr 0.05, momentum 0.9)
for both; each gets a short warm-up (compilation, allocator) that is not timed. Reports
seconds per epoch and images per second, plus the machine and thread counts. Never asserts.
PyTorch's epoch runs in a child process that imports torch first: the two libraries share one
OpenMP runtime per process, set up by whichever loads it first (see benchmarks/compare.py).

    FASTCONV_DATA=../shared/data/mnist python benchmarks/torch_lenet_epoch.py [--batch-size 64]
"""

from __future__ import annotations

import sys

if "--torch-only" in sys.argv:
    import torch  # noqa: F401  (before fastconv: PyTorch's OpenMP runtime with its defaults)

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import fastconv as fc
from fastconv import training

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the checkout
from benchmarks.compare import torch_model  # noqa: E402


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def epoch_torch(x, y, order, batch_size, warmup):
    import torch

    model = torch_model(fc.models.lenet5(rng=0))  # the equal network, same initial weights
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(idx):
        xb = torch.from_numpy(training.normalize(x[idx]))
        yb = torch.from_numpy(y[idx])
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(warmup):
        step(order[i * batch_size : (i + 1) * batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        step(order[i : i + batch_size])
    return time.perf_counter() - t0


def epoch_fastconv(x, y, order, batch_size, warmup):
    model = fc.models.lenet5(rng=0)
    opt = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = fc.CrossEntropyLoss()

    def step(idx):
        logits = model(training.normalize(x[idx]))
        loss = loss_fn(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    for i in range(warmup):
        step(order[i * batch_size : (i + 1) * batch_size])
    t0 = time.perf_counter()
    for i in range(0, len(order), batch_size):
        step(order[i : i + batch_size])
    return time.perf_counter() - t0


def main() -> None:
    import numba

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before the epoch")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    x, y, _, _ = fc.datasets.load_mnist()
    order = np.random.default_rng(0).permutation(len(x))
    if args.torch_only:  # the child process
        import torch

        t = epoch_torch(x, y, order, args.batch_size, args.warmup)
        print(json.dumps([t, torch.__version__, torch.get_num_threads()]))
        return
    child = subprocess.run(
        [sys.executable, __file__, "--torch-only", "--batch-size", str(args.batch_size)]
        + ["--warmup", str(args.warmup)],
        capture_output=True,
        text=True,
        check=True,
    )
    t_torch, torch_version, torch_threads = json.loads(child.stdout.strip().splitlines()[-1])
    t_fc = epoch_fastconv(x, y, order, args.batch_size, args.warmup)
    res = {
        "batch_size": args.batch_size,
        "images": len(x),
        "torch_seconds_per_epoch": round(t_torch, 2),
        "fastconv_seconds_per_epoch": round(t_fc, 2),
        "torch_images_per_second": round(len(x) / t_torch, 1),
        "fastconv_images_per_second": round(len(x) / t_fc, 1),
        "fastconv_over_torch_time": round(t_fc / t_torch, 2),
        "torch": torch_version,
        "torch_threads": torch_threads,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
