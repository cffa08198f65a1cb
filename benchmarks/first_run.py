"""First run: how long a fresh process takes to finish its first LeNet-5 training step.

Each measurement is a new Python process, timed from just before it is started to the end of
its first train step (batch 64, random data): interpreter start, imports, model set-up, and
whatever compiling the step needs. Three kinds, in alternating rounds:

- fastconv, cold: empty caches, as on a fresh install: a new temporary ``NUMBA_CACHE_DIR``
  (Numba's compiled kernels) and ``FASTCONV_CACHE_DIR`` (the autotuner's choices);
- fastconv, warm: a second process on the caches the cold one left behind;
- PyTorch (when installed): the equal model, loss and optimizer, in a process of its own.

    python benchmarks/first_run.py                  # 3 rounds, table on stdout
    python benchmarks/first_run.py --rounds 5 --out benchmarks/results/first_run.md

Never asserts; prints medians and the spread (min - max) of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


# --------------------------------------------------------------------------- the child process


def _fastconv_step():
    """One LeNet-5 SGD step in fastconv; returns a callable running it (kept small: the only
    place that knows fastconv's training API)."""
    import numpy as np

    import fastconv as fc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, BATCH)
    model = fc.models.lenet5(rng=0)
    loss_fn = fc.CrossEntropyLoss()
    opt = fc.optim.SGD(model.parameters(), 0.05, momentum=0.9)

    def step():
        if hasattr(fc, "Tensor"):  # the autograd API
            loss = loss_fn(model(fc.Tensor(x)), labels)
            opt.zero_grad()
            loss.backward()
        else:  # the layer API
            loss = loss_fn(model(x), labels)
            opt.zero_grad()
            model.backward_params(loss_fn.backward())
        opt.step()
        return float(loss)

    return step


def _torch_step():
    import torch
    from torch import nn

    torch.manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28)
    labels = torch.randint(0, 10, (BATCH,))
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        loss = loss_fn(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    return step


def child(kind: str) -> None:
    t0 = time.perf_counter()
    if kind == "torch":
        step = _torch_step()
    else:
        step = _fastconv_step()
        try:  # as ``fit`` and the CLI do: a notice on stderr when compiling takes a while
            from fastconv import _jit_notice

            _jit_notice.arm()
        except ImportError:
            pass
    t1 = time.perf_counter()
    step()
    t2 = time.perf_counter()
    step()  # the second step, for scale
    t3 = time.perf_counter()
    print(
        json.dumps(
            {"end": time.time() - (t3 - t2), "setup": t1 - t0, "step1": t2 - t1, "step2": t3 - t2}
        ),
        flush=True,
    )


# --------------------------------------------------------------------------- the parent


def run_child(kind: str, env: dict) -> dict:
    start = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["total"] = r["end"] - start
    r["notice"] = "compiling kernels for this CPU" in out.stderr
    return r


def cpu_info() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [
        name
        for name, flag in (
            ("AVX2", "avx2"),
            ("AVX-512F", "avx512f"),
            ("AVX-512 VNNI", "avx512_vnni"),
            ("AVX-512 BF16", "avx512_bf16"),
            ("AMX", "amx_tile"),
        )
        if flag in flags
    ]
    return model, ", ".join(isa) or "none of AVX2 / AVX-512 / AMX"


def versions(torch_ok: bool) -> str:
    code = (
        "import json, numpy, numba, llvmlite, fastconv\n"
        "v = {'python': '%d.%d.%d' % __import__('sys').version_info[:3], "
        "'numpy': numpy.__version__, 'numba': numba.__version__, "
        "'llvmlite': llvmlite.__version__, 'fastconv': fastconv.__version__, "
        "'numba threads': numba.get_num_threads()}\n"
    )
    if torch_ok:
        code += "import torch\nv['torch'] = torch.__version__\n"
        code += "v['torch threads'] = torch.get_num_threads()\n"
    code += "print(json.dumps(v))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    v = json.loads(out.stdout) if out.returncode == 0 else {}
    return ", ".join(f"{k} {val}" for k, val in v.items())


def git_commit() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} | {min(values):.2f} - {max(values):.2f}"


def table(results: dict[str, list[dict]], rounds: int, torch_ok: bool) -> str:
    model, isa = cpu_info()
    rows = [
        ("fastconv, cold (empty Numba and autotune caches)", "cold"),
        ("fastconv, warm caches (a second process)", "warm"),
    ]
    if torch_ok:
        rows.append(("PyTorch (its own process)", "torch"))
    lines = [
        "# First run: a fresh process to the end of its first LeNet-5 train step",
        "",
        f"`python benchmarks/first_run.py --rounds {rounds}` at {git_commit()}, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Batch {BATCH}, random data, "
        "SGD with momentum; each run a new process, timed from its start to the end of its "
        "first step; kinds alternate within each round. Median and spread (min - max) of "
        f"{rounds} rounds, in seconds.",
        "",
        f"- CPU: {model} ({os.cpu_count()} logical cores), ISA: {isa}",
        f"- Versions: {versions(torch_ok)}",
        "",
        "| process | to end of step 1 (median) | spread | import + model | step 1 | step 2 (ms) "
        "| compile notice |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for label, kind in rows:
        rs = results[kind]
        total = [r["total"] for r in rs]
        med, spread = _fmt(total).split(" | ")
        notice = sum(r["notice"] for r in rs)
        lines.append(
            f"| {label} | {med} | {spread} | {statistics.median(r['setup'] for r in rs):.2f} "
            f"| {statistics.median(r['step1'] for r in rs):.2f} "
            f"| {1e3 * statistics.median(r['step2'] for r in rs):.1f} "
            f"| {notice}/{len(rs)} |"
        )
    if torch_ok:
        cold = statistics.median(r["total"] for r in results["cold"])
        warm = statistics.median(r["total"] for r in results["warm"])
        tt = statistics.median(r["total"] for r in results["torch"])
        lines += [
            "",
            f"Ratios to PyTorch's first step: cold {cold / tt:.2f}x, warm caches {warm / tt:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    import importlib.util

    torch_ok = not args.no_torch and importlib.util.find_spec("torch") is not None
    results: dict[str, list[dict]] = {"cold": [], "warm": [], "torch": []}
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory() as numba_dir, tempfile.TemporaryDirectory() as fc_dir:
            env = dict(os.environ, NUMBA_CACHE_DIR=numba_dir, FASTCONV_CACHE_DIR=fc_dir)
            kinds = ["cold", "torch", "warm"] if torch_ok else ["cold", "warm"]
            if i % 2 and torch_ok:
                kinds = ["torch", "cold", "warm"]  # the warm run needs the cold one's caches
            for kind in kinds:
                r = run_child("torch" if kind == "torch" else "fastconv", env)
                results[kind].append(r)
                print(
                    f"round {i + 1}/{args.rounds} {kind:5s}: {r['total']:6.2f} s to the end of "
                    f"step 1 (step 1 {r['step1']:.2f} s)",
                    file=sys.stderr,
                    flush=True,
                )
    md = table(results, args.rounds, torch_ok)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
