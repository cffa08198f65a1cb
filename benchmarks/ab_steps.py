"""A/B of whole training steps between two checkouts, in alternating fresh processes.

Each round starts one process per side and network configuration; the process builds the zoo
model, warms up (compilation, autotuning, allocator), then times ``--steps`` SGD steps and
prints the median. Sides take turns within every round, so a drift of the shared machine's
speed hits both. Works on the API before and after the autograd tape (old: ``model.backward``;
new: ``loss.backward()``). Also reports the tape's own cost: microseconds per recorded op.
Never asserts.

    python benchmarks/ab_steps.py --base /tmp/base --rounds 5 [--out benchmarks/results/ab.md]

``--configs``: comma-separated NAME:BATCH or NAME:BATCH:OPTIMIZER (sgd, the default: SGD with
momentum 0.9; adam: Adam at lr 1e-3).

``--base``: a checkout of the other commit (``git worktree add /tmp/base d570b64``), importable
with ``PYTHONPATH=<base>`` (a ``fastconv/kernels`` link to ``kernels`` is made if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
CONFIGS = [(m, b) for m in ("lenet5", "mnist_cnn", "nielsen") for b in (1, 64, 256)]

CHILD = r"""
import json, os, sys, time
os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start
import numpy as np
import fastconv as fc
name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = fc.models.get(name, rng=0)
if sys.argv[4] == "adam":
    opt = fc.optim.Adam(model.parameters(), lr=1e-3)
else:
    opt = fc.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = fc.CrossEntropyLoss()
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
y = rng.integers(0, 10, batch)
new = hasattr(fc, "Tensor")


def step():
    out = model(x)
    loss = loss_fn(out, y)
    opt.zero_grad()
    if new:
        loss.backward()
    else:
        model.backward_params(loss_fn.backward())
    opt.step()
for _ in range(10):
    step()
getattr(fc, "wait_for_kernels", lambda: True)()  # never time a serial build (empty cache)
times = []
for _ in range(steps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
print(json.dumps({"median_ms": 1e3 * float(np.median(times))}))
"""

TAPE = r"""
import json, time
import numpy as np
import fastconv as fc
a = fc.Tensor(np.ones(4, np.float32), requires_grad=True)
b = np.ones(4, np.float32)
n = 20000
for rec in (True, False):
    t = time.perf_counter()
    if rec:
        for _ in range(n):
            fc.add(a, b)
    else:
        for _ in range(n):
            fc.add(a.data, b)
    dt = (time.perf_counter() - t) / n
    if rec:
        rec_us = 1e6 * dt
    else:
        arr_us = 1e6 * dt
y = a
t = time.perf_counter()
for _ in range(2000):
    y = y + b
mid = time.perf_counter()
y.sum().backward()
bwd_us = 1e6 * (time.perf_counter() - mid) / 2000
out = {"recorded_add_us": rec_us, "array_add_us": arr_us, "backward_per_node_us": bwd_us}
print(json.dumps(out))
"""


def run(pythonpath: Path, code: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run(  # run from the checkout: "-c" puts the working directory first
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=pythonpath,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
        if "amx_tile" in flags:
            isa += " + AMX"
        return f"{name} ({isa}), {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--configs", default=",".join(f"{m}:{b}" for m, b in CONFIGS))
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    link = a.base / "fastconv" / "kernels"
    if not link.exists():
        link.symlink_to(a.base / "kernels")
    configs = [tuple((c + ":sgd").split(":")[:3]) for c in a.configs.split(",")]
    sides = {"this": HERE, "base": a.base}
    res: dict = {(c, s): [] for c in configs for s in sides}
    for r in range(a.rounds):
        for c in configs:
            order = list(sides.items()) if r % 2 == 0 else list(sides.items())[::-1]
            for s, path in order:
                res[(c, s)].append(run(path, CHILD, [c[0], c[1], str(a.steps), c[2]])["median_ms"])
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    tape = run(HERE, TAPE, [])
    lines = [
        f"Train-step A/B, {cpu_model()}, "
        f"NUMBA threads {os.environ.get('NUMBA_NUM_THREADS', 'all')},"
        f" {a.rounds} alternating rounds x {a.steps} steps (median of each process; the table"
        " gives the median over rounds and the range).",
        "",
        "| network | batch | optimizer | this (ms) | base (ms) | this / base |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for c in configs:
        t, b = res[(c, "this")], res[(c, "base")]
        ratios = [x / y for x, y in zip(t, b)]
        lines.append(
            f"| {c[0]} | {c[1]} | {c[2]} | {statistics.median(t):.3f} "
            f"({min(t):.3f}-{max(t):.3f}) | "
            f"{statistics.median(b):.3f} ({min(b):.3f}-{max(b):.3f}) | "
            f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |"
        )
    lines += [
        "",
        f"Tape cost (one process): a recorded `fc.add` {tape['recorded_add_us']:.2f} us vs "
        f"{tape['array_add_us']:.2f} us on arrays (recording: "
        f"{tape['recorded_add_us'] - tape['array_add_us']:.2f} us per op); backward "
        f"{tape['backward_per_node_us']:.2f} us per node of a 2000-add chain.",
    ]
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
