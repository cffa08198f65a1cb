"""First run: how long a fresh process takes to finish its first LeNet-5 training step.

Each measurement is a new Python process, timed from just before it is started to the end of
its first train step (batch 64, random data): interpreter start, imports, model set-up, and
whatever compiling the step needs. Three kinds, in alternating rounds:

- fastconv, cold: empty caches, as on a fresh install: a new temporary ``NUMBA_CACHE_DIR``
  (Numba's compiled kernels) and ``FASTCONV_CACHE_DIR`` (the autotuner's choices); with
  warm start (the default: the first steps on the NumPy oracle while the kernels compile in
  the background) and without it (``FASTCONV_WARM_START=0``: the first step waits for them);
- fastconv, warm: a second process on the caches the cold one left behind;
- PyTorch (when installed): the equal model, loss and optimizer, in a process of its own.

    python benchmarks/first_run.py                  # 3 rounds, table on stdout
    python benchmarks/first_run.py --rounds 5 --out benchmarks/results/first_run.md

Each process runs ``--steps`` steps (default 200) and reports the end of step 1 and of the
last step: how much a fast first step costs (or saves) later.

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


def _fastconv_step(name: str = "lenet5", batch: int = BATCH):
    """One SGD step of zoo model ``name`` in fastconv; returns a callable running it (kept
    small: the only place that knows fastconv's training API)."""
    import numpy as np

    import fastconv as fc

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    model = fc.models.MODELS[name](rng=0)
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


def child(kind: str, steps: int, name: str = "lenet5", batch: int = BATCH) -> None:
    t0 = time.perf_counter()
    warm = None
    if kind == "torch":
        step = _torch_step()
    else:
        step = _fastconv_step(name, batch)
        try:  # as ``fit`` and the CLI do: a notice on stderr when compiling takes a while
            from fastconv import _jit_notice

            _jit_notice.arm()
        except ImportError:
            pass
        try:
            from fastconv import _warm as warm
        except ImportError:  # a version without warm start
            pass
    t1 = time.perf_counter()
    step()
    t2 = time.perf_counter()
    end1 = time.time()
    kernels = None  # seconds from t0 to the end of the first step run on the kernels
    if warm is None or warm.state() != "warming":
        kernels = t2 - t0
    step()  # the second step, for scale
    t3 = time.perf_counter()
    for _ in range(2, steps):
        was = warm is not None and warm.state() == "warming"
        step()
        if kernels is None and not was:
            kernels = time.perf_counter() - t0
    endn = time.time()
    print(
        json.dumps(
            {
                "end": end1,
                "endn": endn,
                "setup": t1 - t0,
                "step1": t2 - t1,
                "step2": t3 - t2,
                "kernels": kernels,
                "t0_offset": time.time() - (time.perf_counter() - t0),
            }
        ),
        flush=True,
    )
    if kind != "torch":  # the next process must not compete with this one's compilers
        import fastconv as fc

        fc.wait_for_kernels(timeout=600)


# --------------------------------------------------------------------------- the parent


def run_child(kind: str, env: dict, steps: int, name: str = "lenet5", batch: int = BATCH) -> dict:
    start = time.time()
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--model", name,
         "--batch", str(batch)],  # fmt: skip
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["total"] = r["end"] - start
    r["total_n"] = r["endn"] - start
    if r.get("kernels") is not None:  # from the child's t0 to the parent's start
        r["kernels"] += r["t0_offset"] - start
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


def _med(rs: list[dict], key: str, scale: float = 1.0) -> str:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return f"{scale * statistics.median(vals):.2f}" if vals else "-"


ROWS = (
    ("fastconv, cold, warm start (the default)", "cold"),
    ("fastconv, cold, `FASTCONV_WARM_START=0`", "cold_off"),
    ("fastconv, warm caches (a second process)", "warm"),
    ("PyTorch (its own process)", "torch"),
)


def table(
    results: dict[str, list[dict]], rounds: int, steps: int, torch_ok: bool,
    name: str = "lenet5", batch: int = BATCH,
) -> str:  # fmt: skip
    model, isa = cpu_info()
    extra = "" if (name, batch) == ("lenet5", BATCH) else f" --model {name} --batch {batch}"
    lines = [
        f"# First run: a fresh process to the end of its first {name} train step",
        "",
        f"`python benchmarks/first_run.py --rounds {rounds} --steps {steps}{extra}` at "
        f"{git_commit()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        f"Batch {batch}, random data, "
        "SGD with momentum; each run a new process, timed from its start; kinds alternate "
        f"within each round. Median and spread (min - max) of {rounds} rounds, in seconds. "
        "Cold: empty Numba and autotune caches. With warm start, a cold process runs its "
        "first steps on the NumPy oracle while a background process compiles the kernels "
        "(fastconv/_warm.py); 'kernels from' is when its first step on the compiled kernels "
        f"ended. 'step {steps}': the end of the {steps}th step, for what the first seconds "
        "cost later.",
        "",
        f"- CPU: {model} ({os.cpu_count()} logical cores), ISA: {isa}",
        f"- Versions: {versions(torch_ok)}",
        "",
        f"| process | to end of step 1 (median) | spread | import + model | step 1 | step 2 (ms) "
        f"| kernels from | to end of step {steps} | compile notice |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for label, kind in ROWS:
        rs = results.get(kind) or []
        if not rs:
            continue
        med, spread = _fmt([r["total"] for r in rs]).split(" | ")
        notice = sum(r["notice"] for r in rs)
        lines.append(
            f"| {label} | {med} | {spread} | {_med(rs, 'setup')} | {_med(rs, 'step1')} "
            f"| {_med(rs, 'step2', 1e3)} | {_med(rs, 'kernels') if kind != 'torch' else '-'} "
            f"| {_med(rs, 'total_n')} | {notice}/{len(rs)} |"
        )
    if torch_ok:
        tt = statistics.median(r["total"] for r in results["torch"])
        tn = statistics.median(r["total_n"] for r in results["torch"])
        parts = [
            f"{kind} {statistics.median(r['total'] for r in results[kind]) / tt:.2f}x"
            for _, kind in ROWS[:3]
        ]
        parts_n = [
            f"{kind} {statistics.median(r['total_n'] for r in results[kind]) / tn:.2f}x"
            for _, kind in ROWS[:3]
        ]
        lines += [
            "",
            f"Ratios to PyTorch, to the end of step 1: {', '.join(parts)}; to the end of step "
            f"{steps}: {', '.join(parts_n)}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200, help="steps per process (default 200)")
    ap.add_argument("--model", default="lenet5", help="zoo model (default lenet5; PyTorch's "
                    "twin runs for lenet5 only)")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error(f"--steps must be >= 2; got {args.steps}")
    if args.child:
        child(args.child, args.steps, args.model, args.batch)
        return 0
    from fastconv import models  # the parent only checks the name (no kernel runs here)

    if args.model not in models.MODELS:
        ap.error(f"--model: one of {sorted(models.MODELS)}; got {args.model!r}")
    import importlib.util

    torch_ok = not args.no_torch and importlib.util.find_spec("torch") is not None
    torch_ok = torch_ok and (args.model, args.batch) == ("lenet5", BATCH)  # its twin is LeNet-5's
    results: dict[str, list[dict]] = {kind: [] for _, kind in ROWS}
    for i in range(args.rounds):
        with (
            tempfile.TemporaryDirectory() as numba_dir,
            tempfile.TemporaryDirectory() as fc_dir,
            tempfile.TemporaryDirectory() as numba_off,
            tempfile.TemporaryDirectory() as fc_off,
        ):
            env = dict(os.environ, NUMBA_CACHE_DIR=numba_dir, FASTCONV_CACHE_DIR=fc_dir)
            env.pop("FASTCONV_WARM_START", None)  # the default
            env_off = dict(
                env, NUMBA_CACHE_DIR=numba_off, FASTCONV_CACHE_DIR=fc_off, FASTCONV_WARM_START="0"
            )
            kinds = ["cold", "cold_off", "torch"] if torch_ok else ["cold", "cold_off"]
            kinds = kinds[i % len(kinds) :] + kinds[: i % len(kinds)]
            kinds.append("warm")  # the warm run needs the cold one's caches
            for kind in kinds:
                r = run_child(
                    "torch" if kind == "torch" else "fastconv",
                    env_off if kind == "cold_off" else env,
                    args.steps,
                    args.model,
                    args.batch,
                )
                results[kind].append(r)
                print(
                    f"round {i + 1}/{args.rounds} {kind:8s}: {r['total']:6.2f} s to the end of "
                    f"step 1, {r['total_n']:6.2f} s to step {args.steps}",
                    file=sys.stderr,
                    flush=True,
                )
    md = table(results, args.rounds, args.steps, torch_ok, args.model, args.batch)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(md)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
