"""The comparison runner: ``python -m benchmarks.compare [--quick] ...``, also ``fastconv bench``
from a source checkout (the runner is not part of the installed library).

fastconv (each CPU algorithm) beside PyTorch CPU (same thread count, when installed) and the NumPy
oracle, on synthetic MNIST-shaped data (no download, no GPU):

- per-layer convolution forward and forward+backward on the MNIST-scale shapes (batch 64);
- pooling forward and forward+backward;
- whole-network train step (forward, loss, backward, SGD step) and inference for lenet5,
  mnist_cnn and nielsen at batch 1, 64 and 256, resnet8 and vgg_mini (BatchNorm, 3x3 layers of
  16-128 channels) at batch 128;
- time to the first train step in a fresh process with a warm JIT cache.

Each figure is the median of repeated calls after warm-up; first calls (JIT compile or cache
load) are reported apart, and the cold compile (fresh process, empty Numba cache) apart again.
Ratios are against PyTorch measured in the same run. PyTorch runs in a process of its own,
started by this one: PyTorch and Numba load the same OpenMP runtime, which takes its settings
from whichever library loads it first, so in one process one of the two would run with the
other's settings (PyTorch's LeNet-5 step was ~2x slower after fastconv's import). Writes a
markdown table and a bar chart (with the ``plot`` extra) under ``--out-dir``. Benchmarks never
assert.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# name -> conv2d arguments; x (N, C, H, W), w (K, C, KH, KW).
CONV_LAYERS = {
    "lenet5.conv1": dict(x=(64, 1, 28, 28), w=(6, 1, 5, 5), padding=2),
    "lenet5.conv2": dict(x=(64, 6, 14, 14), w=(16, 6, 5, 5), padding=0),
    "mnist_cnn.conv2": dict(x=(64, 32, 26, 26), w=(64, 32, 3, 3), padding=0),
    "nielsen.conv2": dict(x=(64, 20, 12, 12), w=(40, 20, 5, 5), padding=0),
}
POOL_LAYERS = {
    "lenet5.pool1": dict(x=(64, 6, 28, 28), kernel_size=2),
    "mnist_cnn.pool": dict(x=(64, 64, 24, 24), kernel_size=2),
}
NETWORKS = ("lenet5", "mnist_cnn", "nielsen", "resnet8", "vgg_mini")
BATCHES = (1, 64, 256)
NETWORK_BATCHES = {"resnet8": (128,), "vgg_mini": (128,)}  # default batches where not BATCHES


# --------------------------------------------------------------------------- timing


_WARM_START_GIVEN = os.environ.get("FASTCONV_WARM_START")  # the user's own, for the probes
os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def threads() -> int:
    """Threads every library gets: FASTCONV_THREADS, else NUMBA_NUM_THREADS, else all cores."""
    env = os.environ.get("FASTCONV_THREADS") or os.environ.get("NUMBA_NUM_THREADS")
    return int(env) if env else (os.cpu_count() or 1)


def bench(
    fn: Callable[[], Any], min_time: float = 0.3, min_reps: int = 3, max_reps: int = 200
) -> float:
    """Median seconds per call after two warm-up calls (and, with an empty Numba cache, once
    the kernels' parallel builds are in: ``fc.wait_for_kernels``)."""
    fn()
    fn()
    kernels_ready()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels_ready() -> None:
    """Wait for fastconv's parallel kernel builds where this process uses fastconv (a no-op
    in a checkout without tiered kernels, and for PyTorch)."""
    fc = sys.modules.get("fastconv")
    wait = getattr(fc, "wait_for_kernels", None)
    if wait is not None:
        wait()


def first_call(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sgemm_ceiling() -> float:
    """Best float32 GEMM rate NumPy's BLAS reaches here (GFLOP/s), over a few square sizes."""
    best = 0.0
    rng = np.random.default_rng(0)
    for n in (256, 512, 1024, 1536):
        a = rng.standard_normal((n, n), np.float32)
        b = rng.standard_normal((n, n), np.float32)
        t = bench(lambda a=a, b=b: a @ b, min_time=0.3)
        best = max(best, 2 * n**3 / t / 1e9)
    return best


def isa() -> str:
    """The vector instruction sets of this CPU that matter here, and the width the direct
    convolution's register tiles use."""
    try:
        flags = next(
            ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")
        ).split()
    except (OSError, StopIteration):
        flags = []
    name = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "amx_tile" in flags:
        name += " + AMX"
    try:
        from fastconv.kernels.cpu.microkernel import VBYTES

        name += f"; direct-convolution tiles on {8 * VBYTES}-bit vectors"
    except ImportError:
        pass
    return name


def machine_info() -> dict:
    import numba

    import fastconv

    cpu = platform.processor() or "?"
    try:  # the model name, and the family / model numbers (a VM may name only "AMD EPYC")
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip() and fields:
                break  # the first processor's block only
            fields.setdefault(key.strip(), value.strip())
        if fields.get("model name"):
            cpu = fields["model name"]
            if "cpu family" in fields and "model" in fields:
                cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    except OSError:
        pass
    info = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu,
        "isa": isa(),
        "cores": os.cpu_count(),
        "threads": threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "fastconv": fastconv.__version__,
    }
    try:
        info["torch"] = (
            importlib.metadata.version("torch") if torch_available() else "not installed"
        )
    except importlib.metadata.PackageNotFoundError:
        info["torch"] = "not installed"
    return info


def _torch():
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads())
    return torch


def torch_available() -> bool:
    """Whether PyTorch is installed, without importing it into this process."""
    return importlib.util.find_spec("torch") is not None


# --------------------------------------------------------------------------- cases


def conv_case(name: str, batch: int | None = None, dtype=np.float32, seed: int = 0):
    """Synthetic data for one layer: (x, w, b, gy, padding, forward FLOPs)."""
    from fastconv import shapes

    spec = CONV_LAYERS[name]
    xs = spec["x"] if batch is None else (batch, *spec["x"][1:])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = (rng.standard_normal(spec["w"]) * 0.1).astype(dtype)
    b = rng.standard_normal(spec["w"][0]).astype(dtype)
    g = shapes.conv2d_geometry("bench", x.shape, w.shape, 1, spec["padding"])
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    return x, w, b, gy, spec["padding"], g.flops()


def _conv_fns(x, w, b, gy, kw: dict, on_tape: bool) -> tuple:
    """(forward fn, forward+backward fn) calling conv2d with ``kw``. A function of its own so
    that each pair closes over its own ``kw``: closures made in a loop would all see the
    loop's last value (the ``reference`` rows once timed the CPU direct kernel that way).
    ``on_tape``: forward+backward as a layer runs them, recorded on the tape (the op's
    context keeps the forward's columns for the backward); else the two array calls."""
    import fastconv as fc

    def fwd():
        return fc.conv2d(x, w, b, **kw)

    def fwdbwd():
        if not on_tape:
            return fc.conv2d(x, w, b, **kw), fc.conv2d_backward(gy, x, w, **kw)
        xt, wt, bt = (fc.Tensor(a, requires_grad=True) for a in (x, w, b))
        fc.conv2d(xt, wt, bt, **kw).backward(gy)
        return xt.grad, wt.grad, bt.grad

    return fwd, fwdbwd


def conv_impls(x, w, b, gy, padding, include_reference: bool) -> dict:
    """name -> (forward fn, forward+backward fn) for every implementation available."""
    impls: dict[str, tuple] = {}
    if include_reference:
        ref = dict(padding=padding, backend="reference")
        impls["reference"] = _conv_fns(x, w, b, gy, ref, on_tape=False)
    for algo in ("im2col", "direct"):
        cpu = dict(padding=padding, backend="cpu", algorithm=algo)
        impls[f"cpu-{algo}"] = _conv_fns(x, w, b, gy, cpu, on_tape=True)
    return impls


def torch_conv_impls(x, w, b, gy, padding) -> dict:
    """{"torch": (forward fn, forward+backward fn)} (run in the peer process)."""
    torch = _torch()
    tx, tw, tb = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
    tgy = torch.from_numpy(gy)

    def t_fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, padding=padding)

    def t_fwdbwd():
        tx.grad = tw.grad = tb.grad = None
        torch.nn.functional.conv2d(tx, tw, tb, padding=padding).backward(tgy)

    return {"torch": (t_fwd, t_fwdbwd)}


def pool_impls(x, kernel_size) -> dict:
    import fastconv as fc

    impls: dict[str, tuple] = {}
    for kind in ("max", "avg"):
        fwd = getattr(fc, f"{kind}_pool2d")
        bwd = getattr(fc, f"{kind}_pool2d_backward")

        def f(fwd=fwd):
            return fwd(x, kernel_size, backend="cpu")

        def fb(fwd=fwd, bwd=bwd):
            y = fwd(x, kernel_size, backend="cpu")
            return bwd(y, x, kernel_size, backend="cpu")

        impls[f"{kind}/cpu"] = (f, fb)
    return impls


def torch_pool_impls(x, kernel_size) -> dict:
    """{"max/torch" | "avg/torch": (forward fn, forward+backward fn)} (peer process)."""
    torch = _torch()
    impls: dict[str, tuple] = {}
    tx = torch.from_numpy(x).requires_grad_(True)
    for kind in ("max", "avg"):
        tf = getattr(torch.nn.functional, f"{kind}_pool2d")

        def f(tf=tf):
            with torch.no_grad():
                return tf(tx, kernel_size)

        def fb(tf=tf):
            tx.grad = None
            y = tf(tx, kernel_size)
            y.backward(y.detach())

        impls[f"{kind}/torch"] = (f, fb)
    return impls


def torch_model(model):
    """The equal ``torch.nn.Sequential`` of a fastconv Sequential, with the same weights (the
    zoo's resnet8 and vgg_mini: their twins, ``torch_zoo_twin``)."""
    torch = _torch()
    from fastconv import layers as L
    from fastconv import models

    if isinstance(model, models.ResNet):
        return torch_zoo_twin("resnet8", model)
    if isinstance(model, models.VGG):
        return torch_zoo_twin("vgg_mini", model)

    nn = torch.nn
    mods = []
    for layer in model:
        if isinstance(layer, L.Conv2d):
            mods.append(
                nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    layer.groups,
                    bias=layer.bias is not None,
                )
            )
        elif isinstance(layer, L.MaxPool2d):
            mods.append(
                nn.MaxPool2d(
                    layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode
                )
            )
        elif isinstance(layer, L.AvgPool2d):
            mods.append(
                nn.AvgPool2d(
                    layer.kernel_size,
                    layer.stride,
                    layer.padding,
                    ceil_mode=layer.ceil_mode,
                    count_include_pad=layer.count_include_pad,
                )
            )
        elif isinstance(layer, L.Linear):
            mods.append(
                nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            )
        elif isinstance(layer, L.ReLU):
            mods.append(nn.ReLU())
        elif isinstance(layer, L.Flatten):
            mods.append(nn.Flatten())
        elif isinstance(layer, L.Dropout):
            mods.append(nn.Dropout(layer.p))
        else:
            raise TypeError(f"bench: no torch equivalent for {type(layer).__name__}")
    tm = nn.Sequential(*mods)
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return tm


def torch_zoo_twin(name: str, model):
    """The torch twin of a zoo model that is not a plain Sequential (resnet8, vgg_mini at their
    defaults: 1 input channel, 10 classes), written layer for layer with the zoo's module
    names (tests/test_zoo.py checks the same twins' parity), with the same weights."""
    torch = _torch()
    nn = torch.nn

    class Block(nn.Module):
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

    class ResNet8(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = nn.Sequential(Block(16, 16, 1))
            self.layer2 = nn.Sequential(Block(16, 32, 2))
            self.layer3 = nn.Sequential(Block(32, 64, 2))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class VGGMini(nn.Module):
        def __init__(self):
            super().__init__()
            layers, c = [], 1
            for v in (32, 32, "M", 64, 64, "M", 128, "M"):
                if v == "M":
                    layers.append(nn.MaxPool2d(2))
                else:
                    conv = nn.Conv2d(c, v, 3, padding=1, bias=False)
                    layers += [conv, nn.BatchNorm2d(v), nn.ReLU()]
                    c = v
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    tm = {"resnet8": ResNet8, "vgg_mini": VGGMini}[name]()
    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return tm


def _network_data(batch: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    return x, rng.integers(0, 10, batch)


def network_impls(name: str, batch: int) -> dict:
    """{"fastconv": (train step fn, inference fn)} on one network."""
    from fastconv import losses, models, optim

    x, labels = _network_data(batch)
    model = models.get(name, rng=0)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = losses.CrossEntropyLoss()

    def step():
        model.train()
        opt.zero_grad()
        loss_fn(model(x), labels).backward()  # the data needs no gradient: none is computed
        opt.step()

    def infer():
        model.eval()
        return model(x)

    return {"fastconv": (step, infer)}


def torch_network_impls(name: str, batch: int) -> dict:
    """{"torch": (train step fn, inference fn)}: the same network, weights and data, in
    PyTorch (peer process)."""
    from fastconv import models

    torch = _torch()
    x, labels = _network_data(batch)
    tm = torch_model(models.get(name, rng=0))
    topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
    tx, ty = torch.from_numpy(x), torch.from_numpy(labels)

    def t_step():
        tm.train()
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(tx), ty).backward()
        topt.step()

    def t_infer():
        tm.eval()
        with torch.no_grad():
            return tm(tx)

    return {"torch": (t_step, t_infer)}


FIRST_STEP_CODE = """
import time
t0 = time.perf_counter()
import numpy as np
{imports}
x = np.random.default_rng(0).standard_normal((64, 1, 28, 28)).astype(np.float32)
y = np.random.default_rng(1).integers(0, 10, 64)
{step}
print(time.perf_counter() - t0)
"""
FC_FIRST = (
    "import fastconv as fc\nfrom fastconv import losses, models, optim",
    "m = models.lenet5(rng=0); o = optim.SGD(m.parameters(), lr=0.01, momentum=0.9)\n"
    "L = losses.CrossEntropyLoss(); L(m(x), y).backward(); o.step()",
)
TORCH_FIRST = (
    "import torch",
    "torch.set_num_threads({threads})\n"
    "m = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(),"
    " torch.nn.MaxPool2d(2), torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2),"
    " torch.nn.Flatten(), torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84),"
    " torch.nn.ReLU(), torch.nn.Linear(84, 10))\n"
    "o = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)\n"
    "torch.nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y)).backward()\n"
    "o.step()",
)


def _subprocess_seconds(imports: str, step: str, env: dict | None = None) -> float | None:
    """Seconds the probe prints. It runs in a session of its own, and whatever it left behind
    is killed once it has exited: a cold fastconv process leaves its background compilers
    (warm start, JIT tiers) finishing their kernels for the cache, and those took a core from
    the sections timed after this one (every network ran up to 3x slower, PyTorch too)."""
    code = FIRST_STEP_CODE.format(imports=imports, step=step.format(threads=threads()))
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or dict(os.environ),
        start_new_session=True,
    )
    stdout, stderr = proc.communicate()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left
    if proc.returncode != 0:
        print(f"bench: subprocess failed: {stderr[-500:]}", file=sys.stderr)
        return None
    return float(stdout.strip().splitlines()[-1])


def first_step_seconds() -> dict:
    """Fresh-process times to the first LeNet-5 train step at batch 64 (imports included):
    fastconv with a warm JIT cache, fastconv with an empty cache (as a user's process runs
    it: with warm start, whose first steps run on the oracle while the kernels compile; and
    with FASTCONV_WARM_START=0, the cold compile itself), and torch. The timed sections run
    with warm start off; these probes do not inherit that."""
    res = {}
    default = dict(os.environ)  # what a user's process gets: warm start as the user set it
    if _WARM_START_GIVEN is None:
        default.pop("FASTCONV_WARM_START", None)
    else:
        default["FASTCONV_WARM_START"] = _WARM_START_GIVEN
    _subprocess_seconds(*FC_FIRST, env=default)  # make sure the cache is warm
    res["fastconv (warm JIT cache)"] = _subprocess_seconds(*FC_FIRST, env=default)
    kinds = [("fastconv (cold: empty JIT cache, warm start: the default)", "")]
    kinds += [("fastconv (cold: empty JIT cache, FASTCONV_WARM_START=0)", "0")]
    for what, warm in kinds if _WARM_START_GIVEN is None else kinds[:1]:
        with tempfile.TemporaryDirectory() as d:
            env = dict(default, NUMBA_CACHE_DIR=d, FASTCONV_CACHE_DIR=d)
            if warm:
                env["FASTCONV_WARM_START"] = warm
            res[what] = _subprocess_seconds(*FC_FIRST, env=env)
    if torch_available():
        res["torch"] = _subprocess_seconds(*TORCH_FIRST)
    return res


# --------------------------------------------------------------------------- sections


def _ratio_rows(measured: list[tuple[str, float, float]], peer: str) -> dict[str, float | None]:
    peer_t = next((t for impl, _, t in measured if impl == peer), None)
    return {impl: (peer_t / t if peer_t else None) for impl, _, t in measured}


# Seconds of repeated calls per round (each figure is a median over rounds of medians).
def _conv_time(quick: bool) -> float:
    return 0.1 if quick else 0.25


def _pool_time(quick: bool) -> float:
    return 0.1 if quick else 0.15


def _net_time(quick: bool) -> float:
    return 0.15 if quick else 0.3


def pool_case(name: str, seed: int = 0):
    spec = POOL_LAYERS[name]
    x = np.random.default_rng(seed).standard_normal(spec["x"]).astype(np.float32)
    return x, spec["kernel_size"]


ROUNDS = 3  # fastconv and PyTorch are timed in turns this many times; medians are reported


def _rounds(quick: bool) -> int:
    return 1 if quick else ROUNDS


def _alternate(fc_fns: dict, peer_fn, rounds: int, min_time: float, max_reps: int = 200):
    """{impl: median seconds}: each fastconv impl, then the peer (``peer_fn()`` -> seconds or
    None), in turns, ``rounds`` times; drifts of a shared machine hit both sides alike."""
    times: dict[str, list[float]] = {k: [] for k in fc_fns}
    peer: list[float] = []
    for _ in range(rounds):
        for impl, fn in fc_fns.items():
            mt = min(min_time, 0.1) if impl == "reference" else min_time
            times[impl].append(bench(fn, min_time=mt, max_reps=max_reps))
        t = peer_fn()
        if t is not None:
            peer.append(t)
    out = {k: statistics.median(v) for k, v in times.items()}
    if peer:
        out["torch"] = statistics.median(peer)
    return out


def run_conv(quick: bool, log, peer: Peer | None = None) -> list[dict]:
    rows = []
    for name in CONV_LAYERS:
        x, w, b, gy, padding, flops = conv_case(name)
        impls = conv_impls(x, w, b, gy, padding, include_reference=not quick)
        for pass_, idx, mult in (("fwd", 0, 1), ("fwd+bwd", 1, 3)):
            firsts = {impl: first_call(fns[idx]) for impl, fns in impls.items()}
            req = dict(section="conv", name=name, pass_=pass_)
            if peer is not None:
                firsts["torch"] = peer.first(req)
            t = _alternate(
                {impl: fns[idx] for impl, fns in impls.items()},
                (lambda: peer.time(req, _conv_time(quick))) if peer else (lambda: None),
                _rounds(quick),
                _conv_time(quick),
            )
            measured = [(impl, firsts.get(impl) or 0.0, tt) for impl, tt in t.items()]
            for impl, _, tt in measured:
                log(f"  {name:16s} {pass_:8s} {impl:11s} {tt * 1e3:8.2f} ms")
            ratios = _ratio_rows(measured, "torch")
            for impl, first, tt in measured:
                rows.append(
                    dict(
                        case=name,
                        pass_=pass_,
                        impl=impl,
                        first_ms=first * 1e3,
                        ms=tt * 1e3,
                        gflops=mult * flops / tt / 1e9,
                        vs_torch=ratios[impl] if impl != "torch" else None,
                    )
                )
    return rows


def run_pool(quick: bool, log, peer: Peer | None = None) -> list[dict]:
    rows = []
    for name in POOL_LAYERS:
        impls = pool_impls(*pool_case(name))
        for pass_, idx in (("fwd", 0), ("fwd+bwd", 1)):
            measured = []
            for kind in ("max", "avg"):
                req = dict(section="pool", name=name, pass_=pass_, kind=kind)
                t = _alternate(
                    {f"{kind}/cpu": impls[f"{kind}/cpu"][idx]},
                    (lambda: peer.time(req, _pool_time(quick))) if peer else (lambda: None),
                    _rounds(quick),
                    _pool_time(quick),
                )
                measured += [
                    (f"{kind}/torch" if impl == "torch" else impl, 0.0, tt)
                    for impl, tt in t.items()
                ]
            for impl, _, tt in measured:
                log(f"  {name:16s} {pass_:8s} {impl:11s} {tt * 1e3:8.3f} ms")
            for impl, _, tt in measured:
                kind = impl.split("/")[0]
                peer_t = next((u for i, _, u in measured if i == f"{kind}/torch"), None)
                rows.append(
                    dict(
                        case=name,
                        pass_=pass_,
                        impl=impl,
                        ms=tt * 1e3,
                        vs_torch=(peer_t / tt) if peer_t and not impl.endswith("torch") else None,
                    )
                )
    return rows


def run_networks(
    quick: bool, log, networks=NETWORKS, batches=None, peer: Peer | None = None
) -> list[dict]:
    """``batches``: for every network, else each network's defaults (NETWORK_BATCHES)."""
    rows = []
    for name in networks:
        for batch in batches or NETWORK_BATCHES.get(name, BATCHES):
            impls = network_impls(name, batch)
            for pass_, idx in (("train step", 0), ("inference", 1)):
                req = dict(section="networks", name=name, batch=batch, pass_=pass_)
                t = _alternate(
                    {impl: fns[idx] for impl, fns in impls.items()},
                    (lambda: peer.time(req, _net_time(quick), 100)) if peer else (lambda: None),
                    _rounds(quick),
                    _net_time(quick),
                    max_reps=100,
                )
                measured = [(impl, 0.0, tt) for impl, tt in t.items()]
                for impl, _, tt in measured:
                    log(f"  {name:10s} b={batch:<4d} {pass_:10s} {impl:9s} {tt * 1e3:8.2f} ms")
                ratios = _ratio_rows(measured, "torch")
                for impl, _, tt in measured:
                    rows.append(
                        dict(
                            case=name,
                            batch=batch,
                            pass_=pass_,
                            impl=impl,
                            ms=tt * 1e3,
                            img_s=batch / tt,
                            vs_torch=ratios[impl] if impl != "torch" else None,
                        )
                    )
    return rows


# --------------------------------------------------------------------------- the peer process

# The checkout's root, so that the peer finds this module from any working directory.
CHECKOUT = Path(__file__).resolve().parent.parent
PEER_CODE = f"""
import sys
import torch  # first: PyTorch's OpenMP runtime loads with its own defaults
sys.path.insert(0, {str(CHECKOUT)!r})
from benchmarks import compare
compare.peer_main()
"""


class Peer:
    """PyTorch in a process of its own, timing the cases it is asked for (JSON lines on its
    stdin and stdout), so that its runs can alternate with fastconv's."""

    def __init__(self, log) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )

    def _ask(self, req: dict):
        if self.proc is None:
            return None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            return json.loads(line)
        except (OSError, ValueError) as e:
            self.log(f"bench: the PyTorch process failed ({e}); no more PyTorch figures")
            self.close()
            return None

    def first(self, req: dict) -> float | None:
        return self._ask(dict(req, what="first"))

    def time(self, req: dict, min_time: float, max_reps: int = 200) -> float | None:
        return self._ask(dict(req, what="time", min_time=min_time, max_reps=max_reps))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
            self.proc = None


def peer_main() -> None:
    """The peer process: one JSON request per stdin line, one JSON number per stdout line."""
    cache: dict[str, tuple] = {}
    for line in sys.stdin:
        req = json.loads(line)
        sec = req["section"]
        if sec == "conv":
            key = f"conv|{req['name']}"
            if key not in cache:
                x, w, b, gy, padding, _ = conv_case(req["name"])
                cache[key] = torch_conv_impls(x, w, b, gy, padding)["torch"]
            fns = cache[key]
        elif sec == "pool":
            key = f"pool|{req['name']}|{req['kind']}"
            if key not in cache:
                cache[key] = torch_pool_impls(*pool_case(req["name"]))[f"{req['kind']}/torch"]
            fns = cache[key]
        else:
            key = f"net|{req['name']}|{req['batch']}"
            if key not in cache:
                cache[key] = torch_network_impls(req["name"], req["batch"])["torch"]
            fns = cache[key]
        fn = fns[0 if req["pass_"] in ("fwd", "train step") else 1]
        if req["what"] == "first":
            out = first_call(fn)
        else:
            out = bench(fn, min_time=req["min_time"], max_reps=req["max_reps"])
        print(json.dumps(out), flush=True)


# --------------------------------------------------------------------------- report


def _vs(r) -> str:
    return f"{r['vs_torch']:.2f}x" if r.get("vs_torch") is not None else "-"


def markdown(info: dict, ceiling: float, conv: list, pool: list, nets: list, first: dict) -> str:
    out = [
        f"Machine: {info['cpu']} ({info.get('isa', '?')}), {info['cores']} cores; "
        f"{info['threads']} threads for every "
        f"library (Numba, OpenBLAS, PyTorch). Versions: fastconv {info['fastconv']}, numpy "
        f"{info['numpy']}, numba {info['numba']}, torch {info['torch']}, Python "
        f"{info['python']}. Date: {info['date']}.",
        "",
        f"Measured sgemm ceiling (NumPy BLAS, float32, best of 256..1536 square): "
        f"**{ceiling:.0f} GFLOP/s**. `vs torch` > 1 means fastconv is faster than PyTorch CPU "
        "in the same run. Times are medians after warm-up; float32 throughout.",
        "",
    ]
    if nets:
        out += [
            "### Whole network (SGD momentum step: forward, loss, backward, update)",
            "",
            "| network | batch | pass | impl | ms | img/s | vs torch |",
            "|---|---:|---|---|---:|---:|---:|",
        ]
        out += [
            f"| {r['case']} | {r['batch']} | {r['pass_']} | {r['impl']} | {r['ms']:.2f} | "
            f"{r['img_s']:.0f} | {_vs(r)} |"
            for r in nets
        ]
        out.append("")
    if first:
        out += [
            "### Time to the first LeNet-5 train step (batch 64) in a fresh process",
            "",
            "| what | seconds (imports included) |",
            "|---|---:|",
        ]
        out += [
            f"| {k} | {v:.2f} |" if v is not None else f"| {k} | failed |" for k, v in first.items()
        ]
        out.append("")
    if conv:
        out += [
            "### Per-layer convolution, batch 64",
            "",
            "fwd+bwd counts 3x the forward FLOPs (forward, grad input, grad weight). "
            "`first call` is the first call in this process (JIT cache load or compile).",
            "",
            "| layer | pass | impl | ms | GFLOP/s | % sgemm | vs torch | first call ms |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {r['case']} | {r['pass_']} | {r['impl']} | {r['ms']:.2f} | "
            f"{r['gflops']:.1f} | {100 * r['gflops'] / ceiling:.0f} % | {_vs(r)} | "
            f"{r['first_ms']:.0f} |"
            for r in conv
        ]
        out.append("")
    if pool:
        out += [
            "### Pooling (2x2, stride 2), batch 64",
            "",
            "| layer | pass | impl | ms | vs torch |",
            "|---|---|---|---:|---:|",
        ]
        out += [
            f"| {r['case']} | {r['pass_']} | {r['impl']} | {r['ms']:.3f} | {_vs(r)} |" for r in pool
        ]
        out.append("")
    return "\n".join(out)


def bar_chart(nets: list, path: Path) -> bool:
    """fastconv/torch throughput ratio per network and batch (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in nets if r["impl"] == "fastconv" and r["vs_torch"] is not None]
    if not rows:
        return False
    labels = [f"{r['case']}\nb={r['batch']}\n{r['pass_']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    ax.bar(range(len(rows)), [r["vs_torch"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speed vs PyTorch CPU (x, higher is better)")
    ax.set_title("fastconv / PyTorch CPU, same run, same threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def default_out_dir() -> Path:
    here = Path.cwd() / "benchmarks" / "results"
    return here if here.is_dir() else Path.cwd() / "fastconv-bench-results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fastconv bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, batch 64 only, no oracle, no fresh-process probes",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=["conv", "pool", "networks", "first-step"],
        help="run only these sections (default: all)",
    )
    ap.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    ap.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=None,
        help=f"network batch sizes (default {' '.join(map(str, BATCHES))}; "
        + ", ".join(f"{k} {' '.join(map(str, v))}" for k, v in NETWORK_BATCHES.items())
        + ")",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where cpu.md and cpu.png go (default benchmarks/results if present)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    sections = set(args.only or ["conv", "pool", "networks", "first-step"])
    if args.quick:
        sections.discard("first-step")
    batches = args.batches or ([64] if args.quick else None)  # None: NETWORK_BATCHES

    n = threads()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(n))
    if not torch_available():
        print(
            "torch is not installed: PyTorch columns are left out (pip install torch)",
            file=sys.stderr,
        )

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    log(f"machine: {info}")
    ceiling = sgemm_ceiling()
    log(f"sgemm ceiling {ceiling:.1f} GFLOP/s")
    first = first_step_seconds() if "first-step" in sections else {}
    peer = Peer(log) if torch_available() else None
    try:
        nets = (
            run_networks(args.quick, log, args.networks, batches, peer)
            if "networks" in sections
            else []
        )
        conv = run_conv(args.quick, log, peer) if "conv" in sections else []
        pool = run_pool(args.quick, log, peer) if "pool" in sections else []
    finally:
        if peer is not None:
            peer.close()
    table = markdown(info, ceiling, conv, pool, nets, first)
    print(table)
    if not args.no_write:
        out_dir = args.out_dir or default_out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        cmd = "fastconv bench " + " ".join(argv if argv is not None else sys.argv[1:])
        (out_dir / "cpu.md").write_text(f"# CPU benchmark\n\nCommand: `{cmd.strip()}`\n\n{table}")
        log(f"wrote {out_dir / 'cpu.md'}")
        if bar_chart(nets, out_dir / "cpu.png"):
            log(f"wrote {out_dir / 'cpu.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
