"""GPU benchmark: fastconv's CUDA kernels beside PyTorch + cuDNN, on the same GPU, in one run.

    python -m benchmarks.gpu_bench [--out-dir benchmarks/results] [--reps 30]
    python -m benchmarks.gpu_bench --smoke      # code-path check, also on the simulator

Measures, on synthetic MNIST-shaped float32 data that already lives on the GPU:

- per-layer convolution forward and forward+backward (batch 64) for the MNIST-scale shapes
  (LeNet-5 conv1 and conv2, mnist_cnn conv2, Nielsen conv2), each fastconv algorithm;
- LeNet-5 training throughput (forward, loss, backward, SGD step; images/s) at batch 64 and 256;
- the cost of one kernel launch on its own (an empty kernel), so that launch-bound layers can be
  told apart from slow kernels: for every fastconv figure the table gives the wall time per call
  (host, synchronised), the GPU time between CUDA events, and the number of kernel launches the
  call makes.

First calls (compilation, or loading Numba's on-disk cache) are timed apart from the steady
state (median of ``--reps`` calls after warm-up). PyTorch runs with cudnn.benchmark on, timed
the same way. Ratios are against PyTorch in the same run; benchmarks never assert. Output:
a markdown table and a JSON file under ``--out-dir`` named after the device and the date, with
the device, driver, versions and tile set beside the figures.

Without a CUDA GPU (or under the simulator) it prints why and exits 0 without measuring,
unless ``--smoke`` asks for a one-repetition run on tiny shapes that only checks the code paths.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

try:  # PyTorch before fastconv: PyTorch's CPU build shares Numba's OpenMP runtime, which takes
    # the settings of whichever library loads it first (see benchmarks/compare.py); this way PyTorch
    # keeps its own defaults, as its users have them.
    import torch  # noqa: F401
except ImportError:
    pass

# name -> (x (N, C, H, W), w (K, C, KH, KW), padding), batch 64 as in benchmarks/compare.py
CONV_LAYERS = {
    "lenet5.conv1": ((64, 1, 28, 28), (6, 1, 5, 5), 2),
    "lenet5.conv2": ((64, 6, 14, 14), (16, 6, 5, 5), 0),
    "mnist_cnn.conv2": ((64, 32, 26, 26), (64, 32, 3, 3), 0),
    "nielsen.conv2": ((64, 20, 12, 12), (40, 20, 5, 5), 0),
}
TRAIN_BATCHES = (64, 256)
ALGORITHMS = ("direct", "im2col")


# --------------------------------------------------------------------------- environment


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def gpu_status() -> tuple[bool, str]:
    """(real GPU usable, why not). Imports numba.cuda."""
    try:
        from numba import config, cuda
    except Exception as e:
        return False, f"numba.cuda cannot be imported ({e})"
    if config.ENABLE_CUDASIM:
        return False, "NUMBA_ENABLE_CUDASIM is set: the simulator has no meaningful timings"
    try:
        if not cuda.is_available():
            return False, "no CUDA GPU (numba.cuda.is_available() is False)"
    except Exception as e:
        return False, f"CUDA could not be initialised ({e})"
    return True, ""


def environment(smoke: bool) -> dict:
    import numba
    from fastconv.kernels.cuda import launch
    from numba import config, cuda

    import fastconv

    info: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastconv": fastconv.__version__,
        "tile_set": launch.TILE_SET,
        "simulator": bool(config.ENABLE_CUDASIM),
        "smoke": smoke,
    }
    try:
        import numba_cuda

        info["numba_cuda"] = getattr(numba_cuda, "__version__", "?")
    except ImportError:
        info["numba_cuda"] = "not installed"
    if not config.ENABLE_CUDASIM:
        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        info["device"] = name
        info["compute_capability"] = ".".join(map(str, dev.compute_capability))
        info["multiprocessors"] = int(dev.MULTIPROCESSOR_COUNT)
        try:
            info["cuda_driver"] = ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))
        except Exception:
            info["cuda_driver"] = "?"
        try:
            info["cuda_runtime"] = ".".join(map(str, cuda.runtime.get_version()))
        except Exception:
            info["cuda_runtime"] = "?"
    else:
        info["device"] = "Numba CUDA simulator"
    torch = _torch()
    if torch is None:
        info["torch"] = "not installed"
    else:
        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["cudnn"] = str(torch.backends.cudnn.version())
            info["torch_device"] = torch.cuda.get_device_name(0)
    return info


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


# --------------------------------------------------------------------------- timing


class LaunchCounter:
    """Counts fastconv kernel launches (wraps kernels.cuda.launch.launch)."""

    def __init__(self) -> None:
        from fastconv.kernels.cuda import launch

        self.mod = launch
        self.original = launch.launch
        self.count = 0

    def __enter__(self) -> LaunchCounter:
        def counting(*args: Any) -> None:
            self.count += 1
            self.original(*args)

        self.mod.launch = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mod.launch = self.original


def launches_per_call(fn: Callable[[], Any]) -> int:
    with LaunchCounter() as c:
        fn()
    return c.count


def time_numba(fn: Callable[[], Any], reps: int, smoke: bool) -> dict:
    """First call, then median wall time (synchronised) and median CUDA-event time."""
    from numba import cuda

    t0 = time.perf_counter()
    fn()
    cuda.synchronize()
    first = time.perf_counter() - t0
    if smoke:
        return {"first_s": first, "wall_s": first, "gpu_s": None}
    for _ in range(3):
        fn()
    cuda.synchronize()
    walls, gpus = [], []
    for _ in range(reps):
        start, end = cuda.event(), cuda.event()
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        walls.append(time.perf_counter() - t0)
        gpus.append(cuda.event_elapsed_time(start, end) / 1e3)
    return {"first_s": first, "wall_s": statistics.median(walls), "gpu_s": statistics.median(gpus)}


def time_torch(torch: Any, fn: Callable[[], Any], reps: int, smoke: bool) -> dict:
    on_gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    if smoke:
        return {"first_s": first, "wall_s": first, "gpu_s": None}
    for _ in range(3):
        fn()
    sync()
    walls, gpus = [], []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        walls.append(time.perf_counter() - t0)
        gpus.append(start.elapsed_time(end) / 1e3)
    return {"first_s": first, "wall_s": statistics.median(walls), "gpu_s": statistics.median(gpus)}


def launch_overhead(reps: int, smoke: bool) -> dict:
    """Host cost of one launch of an empty kernel with a conv-like argument list, queued
    back to back (submission cost) and one at a time (launch + completion latency)."""
    from fastconv.kernels.cuda import launch
    from numba import cuda

    @cuda.jit
    def empty(a, b, c, n0, n1, n2, n3, n4, n5, n6, n7):
        """One thread: nothing (measures the launch itself)."""

    a = cuda.device_array(1, np.float32)
    args = (a, a, a, 1, 1, 1, 1, 1, 1, 1, 1)
    launch.launch(empty, 1, 32, *args)  # compile
    cuda.synchronize()
    n = 20 if smoke else max(200, reps * 20)
    t0 = time.perf_counter()
    for _ in range(n):
        launch.launch(empty, 1, 32, *args)
    cuda.synchronize()
    queued = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(n // 4):
        launch.launch(empty, 1, 32, *args)
        cuda.synchronize()
    latency = (time.perf_counter() - t0) / (n // 4)
    return {"queued_s": queued, "synchronised_s": latency, "launches": n}


# --------------------------------------------------------------------------- cases


def _shape(shape: tuple[int, ...], smoke: bool) -> tuple[int, ...]:
    """Tiny stand-ins for --smoke: batch 2, spatial size at most 8."""
    if not smoke:
        return shape
    if len(shape) == 4:
        return (min(shape[0], 2), min(shape[1], 3), min(shape[2], 8), min(shape[3], 8))
    return shape


def conv_layers(reps: int, smoke: bool, torch: Any) -> list[dict]:
    from numba import cuda

    import fastconv as fc

    rows = []
    rng = np.random.default_rng(0)
    for name, (xs, ws, pad) in CONV_LAYERS.items():
        xs = _shape(xs, smoke)
        ws = (min(ws[0], 4), xs[1], min(ws[2], 3), min(ws[3], 3)) if smoke else ws
        pad = min(pad, 1) if smoke else pad
        x = rng.standard_normal(xs).astype(np.float32)
        w = (rng.standard_normal(ws) * 0.1).astype(np.float32)
        b = rng.standard_normal(ws[0]).astype(np.float32)
        y_shape = fc.conv2d(x, w, b, padding=pad, backend="reference").shape
        gy = rng.standard_normal(y_shape).astype(np.float32)
        xd, wd, bd, gyd = (cuda.to_device(a) for a in (x, w, b, gy))
        flops = 2 * np.prod(y_shape) * ws[1] * ws[2] * ws[3]
        for algo in ALGORITHMS:

            def fwd(algo=algo):
                return fc.conv2d(xd, wd, bd, padding=pad, algorithm=algo)

            def fwd_bwd(algo=algo):
                fc.conv2d(xd, wd, bd, padding=pad, algorithm=algo)
                return fc.conv2d_backward(gyd, xd, wd, padding=pad, algorithm=algo)

            for mode, fn, f in (("forward", fwd, flops), ("forward+backward", fwd_bwd, 3 * flops)):
                r = time_numba(fn, reps, smoke)
                r.update(
                    layer=name,
                    library=f"fastconv cuda {algo}",
                    mode=mode,
                    launches=launches_per_call(fn),
                    flops=int(f),
                )
                rows.append(r)
        if torch is not None:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            tx = torch.tensor(x, device=dev, requires_grad=True)
            tw = torch.tensor(w, device=dev, requires_grad=True)
            tb = torch.tensor(b, device=dev, requires_grad=True)
            tgy = torch.tensor(gy, device=dev)
            F = torch.nn.functional

            def t_fwd():
                with torch.no_grad():
                    return F.conv2d(tx, tw, tb, padding=pad)

            def t_fwd_bwd():
                y = F.conv2d(tx, tw, tb, padding=pad)
                return torch.autograd.grad(y, (tx, tw, tb), tgy)

            label = "pytorch cudnn" if dev == "cuda" else "pytorch cpu"
            for mode, fn, f in (
                ("forward", t_fwd, flops),
                ("forward+backward", t_fwd_bwd, 3 * flops),
            ):
                r = time_torch(torch, fn, reps, smoke)
                r.update(layer=name, library=label, mode=mode, launches=None, flops=int(f))
                rows.append(r)
    return rows


def _torch_lenet(torch: Any, fc_model: Any, dev: str) -> Any:
    """The equal torch.nn.Sequential with the same weights, on ``dev``."""
    from benchmarks.compare import torch_model

    return torch_model(fc_model).to(dev)


def training(reps: int, smoke: bool, torch: Any) -> list[dict]:
    """LeNet-5 train steps (forward, loss, backward, SGD momentum step) on device data."""
    from numba import cuda

    import fastconv as fc

    rows = []
    rng = np.random.default_rng(1)
    for batch in (2,) if smoke else TRAIN_BATCHES:
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, batch)
        model = fc.models.lenet5(rng=0)
        if smoke:  # the simulator cannot run 28x28 LeNet in reasonable time
            model = fc.Sequential(
                fc.Conv2d(1, 2, 3, padding=1, rng=0),
                fc.ReLU(),
                fc.MaxPool2d(2),
                fc.Flatten(),
                fc.Linear(2 * 4 * 4, 10, rng=0),
            )
            x = x[:, :, :8, :8].copy()
        model.to("cuda")
        opt = fc.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = fc.CrossEntropyLoss()
        xd, yd = cuda.to_device(x), cuda.to_device(y)

        def step():
            opt.zero_grad()
            loss = loss_fn(model(xd), yd)  # the loss value: the step's one device-to-host copy
            loss.backward()
            opt.step()
            return loss

        r = time_numba(step, reps, smoke)
        r.update(batch=batch, library="fastconv cuda", launches=launches_per_call(step))
        r["images_per_s"] = batch / r["wall_s"]
        rows.append(r)
        if torch is not None and not smoke:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            tmodel = _torch_lenet(torch, fc.models.lenet5(rng=0), dev)
            topt = torch.optim.SGD(tmodel.parameters(), lr=0.01, momentum=0.9)
            tx = torch.tensor(x, device=dev)
            ty = torch.tensor(y, device=dev)
            tloss = torch.nn.CrossEntropyLoss()

            def t_step():
                topt.zero_grad()
                loss = tloss(tmodel(tx), ty)
                loss.backward()
                topt.step()
                return loss.item()

            r = time_torch(torch, t_step, reps, smoke)
            r.update(
                batch=batch,
                library="pytorch cudnn" if dev == "cuda" else "pytorch cpu",
                launches=None,
            )
            r["images_per_s"] = batch / r["wall_s"]
            rows.append(r)
    return rows


# --------------------------------------------------------------------------- report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.3f}"


def report(
    info: dict, overhead: dict, compile_s: float, layers: list[dict], train: list[dict]
) -> str:
    lines = [
        f"# fastconv CUDA benchmark — {info.get('device')} — {info['date']}",
        "",
        "Environment: " + ", ".join(f"{k}={v}" for k, v in info.items() if k != "date"),
        "",
        f"Kernel compile / cache load (ops.warmup, float32): {compile_s:.2f} s",
        f"Empty-kernel launch: {overhead['queued_s'] * 1e6:.1f} us per launch queued back to "
        f"back, {overhead['synchronised_s'] * 1e6:.1f} us launch+sync",
        "",
        "## Per-layer convolution (float32, device-resident data)",
        "",
        "wall = host time per synchronised call; gpu = time between CUDA events; launches = "
        "kernels per call (x the launch cost above = the launch-bound floor); ratio = wall / "
        "PyTorch wall, same layer and mode.",
        "",
        "| layer | mode | library | wall ms | gpu ms | launches | GFLOP/s | vs PyTorch | "
        "first call s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    peer = {
        (r["layer"], r["mode"]): r["wall_s"] for r in layers if r["library"].startswith("pytorch")
    }
    for r in layers:
        ref = peer.get((r["layer"], r["mode"]))
        ratio = f"{r['wall_s'] / ref:.2f}x" if ref else "-"
        gflops = r["flops"] / r["wall_s"] / 1e9 if r["wall_s"] else 0.0
        lines.append(
            f"| {r['layer']} | {r['mode']} | {r['library']} | {_ms(r['wall_s'])} | "
            f"{_ms(r['gpu_s'])} | {r['launches'] if r['launches'] is not None else '-'} | "
            f"{gflops:.1f} | {ratio} | {r['first_s']:.3f} |"
        )
    lines += [
        "",
        "## LeNet-5 training throughput (forward, loss, backward, SGD momentum step)",
        "",
        "| batch | library | images/s | wall ms/step | gpu ms/step | launches/step | vs PyTorch |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    tpeer = {r["batch"]: r["images_per_s"] for r in train if r["library"].startswith("pytorch")}
    for r in train:
        ref = tpeer.get(r["batch"])
        ratio = f"{r['images_per_s'] / ref:.2f}x" if ref else "-"
        lines.append(
            f"| {r['batch']} | {r['library']} | {r['images_per_s']:.0f} | {_ms(r['wall_s'])} | "
            f"{_ms(r['gpu_s'])} | {r['launches'] if r['launches'] is not None else '-'} | "
            f"{ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--reps", type=int, default=30, help="timed calls per figure (median)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="one call per case on tiny shapes (runs on the simulator; no figures)",
    )
    args = p.parse_args(argv)

    ok, why = gpu_status()
    if not ok and not args.smoke:
        print(f"gpu_bench: skipped, no GPU to measure: {why}")
        return 0
    from fastconv.kernels.cuda import ops

    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    info = environment(args.smoke)
    print("gpu_bench:", json.dumps(info))
    compile_s = ops.warmup((np.float32,))
    overhead = launch_overhead(args.reps, args.smoke)
    layers = conv_layers(args.reps, args.smoke, torch)
    train = training(args.reps, args.smoke, torch)
    text = report(info, overhead, compile_s, layers, train)
    print(text)
    if args.smoke:
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(info.get("device", "gpu"))).strip("-").lower()
    stem = out / f"gpu_{slug}_{info['date'][:10]}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "environment": info,
                "compile_s": compile_s,
                "launch_overhead": overhead,
                "conv_layers": layers,
                "training": train,
            },
            indent=2,
            default=float,
        )
        + "\n"
    )
    print(f"gpu_bench: wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
