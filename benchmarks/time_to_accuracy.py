"""Time to 99 % MNIST test accuracy: fastconv's fast99 recipe beside PyTorch CPU on the very
same model and recipe, each seed on each side in a fresh process of its own, sides alternating.

Both sides get the same network (``fc.models.fast99``: conv 24@5x5, ReLU, maxpool 2, conv
32@5x5, ReLU, maxpool 2, FC 10; torch's twin loads fastconv's initial weights), the same data
order (``np.random.default_rng(seed).permutation``), the same optimizer and per-batch
OneCycleLR, batch size, label smoothing and number of steps. What is timed, on both sides:

- the timed part starts with the uint8 training set in memory and ends after the last
  optimizer/scheduler step: it includes turning the whole training set into normalised
  float32 once (``training.normalize``, NumPy on both sides), the per-batch gathers, forward,
  loss, backward, optimizer and scheduler steps;
- not timed, reported apart: process start and imports, loading the data, building the model,
  and a warm-up (fastconv: Numba compile or cache load and autotuning; torch: allocator and
  kernel selection) of a few steps on a throw-away copy at the run's batch shapes; then the
  test accuracy (eval mode, batch 1000) after training.

Also: the per-step ratio (one train step at batch 256 on the fast99 net, median of timed steps
per process, processes alternating) and, with ``--torch-search``, a few PyTorch recipe variants
(batch size, steps, learning rate) to find PyTorch's best on this machine. Never asserts.

    FASTCONV_DATA=../shared/data/mnist python benchmarks/time_to_accuracy.py --seeds 5 \\
        --out benchmarks/results/time_to_accuracy.md
"""

from __future__ import annotations

import sys

if "--child" in sys.argv and "torch" in sys.argv:
    import torch  # noqa: F401  (first: PyTorch's OpenMP runtime with its own defaults)

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- recipes


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def base_recipe() -> dict:
    """fastconv's fast99 recipe (the defaults of ``fastconv train --recipe fast99``)."""
    from fastconv.cli import RECIPES

    r = dict(RECIPES["fast99"])
    return {
        "model": r["model"],
        "optimizer": r["optimizer"],
        "max_lr": r["max_lr"],
        "betas": list(r.get("betas") or (0.9, 0.999)),
        "momentum": r.get("momentum", 0.9),
        "nesterov": r.get("nesterov", False),
        "pct_start": r["pct_start"],
        "div_factor": r["div_factor"],
        "final_div_factor": r["final_div_factor"],
        "batch_size": r["batch_size"],
        "epochs": r["epochs"],
        "label_smoothing": r["label_smoothing"],
        "steps": None,  # None: whole epochs; else this many steps (the cycle's length)
    }


def total_steps(recipe: dict, n: int) -> int:
    per_epoch = -(-n // recipe["batch_size"])
    return int(recipe["steps"] or recipe["epochs"] * per_epoch)


def batches(order: np.ndarray, recipe: dict, steps: int) -> list[np.ndarray]:
    """The index batches of the run: epoch after epoch of ``order`` (the same permutation
    rolled by one batch per extra epoch, so both sides see the same data), cut at ``steps``."""
    b, n = recipe["batch_size"], len(order)
    out: list[np.ndarray] = []
    epoch = 0
    while len(out) < steps:
        o = np.roll(order, -epoch * b)
        out.extend(o[i : i + b] for i in range(0, n, b))
        epoch += 1
    return out[:steps]


# --------------------------------------------------------------------------- one side


def _fastconv_setup(recipe: dict, seed: int, n: int):
    import fastconv as fc
    from fastconv.optim import lr_scheduler as ls

    model = fc.models.get(recipe["model"], rng=seed)
    if recipe["optimizer"] == "adam":
        opt = fc.optim.Adam(model.parameters(), lr=recipe["max_lr"], betas=tuple(recipe["betas"]))
    else:
        opt = fc.optim.SGD(
            model.parameters(),
            lr=recipe["max_lr"],
            momentum=recipe["momentum"],
            nesterov=recipe["nesterov"],
        )
    sched = ls.OneCycleLR(
        opt,
        max_lr=recipe["max_lr"],
        total_steps=total_steps(recipe, n),
        pct_start=recipe["pct_start"],
        div_factor=recipe["div_factor"],
        final_div_factor=recipe["final_div_factor"],
    )
    loss_fn = fc.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    return model, opt, sched, loss_fn


def torch_twin(model):
    """The equal torch.nn.Sequential with the same weights (benchmarks.compare.torch_model)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.compare import torch_model

    return torch_model(model)


def _torch_setup(recipe: dict, seed: int, n: int):
    import torch

    import fastconv as fc

    model = torch_twin(fc.models.get(recipe["model"], rng=seed))  # fastconv's initial weights
    if recipe["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=recipe["max_lr"], betas=recipe["betas"])
    else:
        opt = torch.optim.SGD(
            model.parameters(),
            lr=recipe["max_lr"],
            momentum=recipe["momentum"],
            nesterov=recipe["nesterov"],
        )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe["max_lr"],
        total_steps=total_steps(recipe, n),
        pct_start=recipe["pct_start"],
        div_factor=recipe["div_factor"],
        final_div_factor=recipe["final_div_factor"],
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    return model, opt, sched, loss_fn


def run_fastconv(recipe: dict, seed: int, warmup: int, x, y, xt, yt) -> dict:
    import fastconv as fc
    from fastconv import training

    n = len(x)
    steps = total_steps(recipe, n)
    plan = batches(np.random.default_rng(seed).permutation(n), recipe, steps)

    def train(model, opt, sched, loss_fn, xf, plan):
        for idx in plan:
            loss = loss_fn(model(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    t = time.perf_counter()  # warm-up on a throw-away copy: full and last batch shapes
    w = _fastconv_setup(recipe, seed + 10_000, n)
    xw = training.normalize(x[: recipe["batch_size"]])
    shapes = [np.arange(len(b)) for b in plan[:warmup]] + [np.arange(len(plan[-1]))]
    train(*w, xw, shapes)
    training.evaluate(w[0], xt[:1000], yt[:1000])
    getattr(fc, "wait_for_kernels", lambda: True)()  # never time a serial build (empty cache)
    warm_s = time.perf_counter() - t

    model, opt, sched, loss_fn = _fastconv_setup(recipe, seed, n)
    t0 = time.perf_counter()
    xf = training.normalize(x)  # the whole training set, once: timed
    train(model, opt, sched, loss_fn, xf, plan)
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    _, acc = training.evaluate(model, xt, yt)
    import numba

    return {
        "train_s": train_s,
        "warmup_s": warm_s,
        "eval_s": time.perf_counter() - t,
        "accuracy": acc,
        "steps": steps,
        "threads": numba.get_num_threads(),
        "version": fc.__version__,
    }


def run_torch(recipe: dict, seed: int, warmup: int, x, y, xt, yt) -> dict:
    import torch

    from fastconv import training

    n = len(x)
    steps = total_steps(recipe, n)
    plan = [
        torch.from_numpy(b)
        for b in batches(np.random.default_rng(seed).permutation(n), recipe, steps)
    ]
    yy = torch.from_numpy(y.astype(np.int64))

    def train(model, opt, sched, loss_fn, xf, plan):
        for idx in plan:
            loss = loss_fn(model(xf[idx]), yy[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()

    def evaluate(model):
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(xt), 1000):
                xb = torch.from_numpy(training.normalize(xt[i : i + 1000]))
                correct += int((model(xb).argmax(1).numpy() == yt[i : i + 1000]).sum())
        model.train()
        return correct / len(xt)

    t = time.perf_counter()
    w = _torch_setup(recipe, seed + 10_000, n)
    xw = torch.from_numpy(training.normalize(x[: recipe["batch_size"]]))
    shapes = [torch.arange(len(b)) for b in plan[:warmup]] + [torch.arange(len(plan[-1]))]
    train(*w, xw, shapes)
    evaluate(w[0])
    warm_s = time.perf_counter() - t

    model, opt, sched, loss_fn = _torch_setup(recipe, seed, n)
    t0 = time.perf_counter()
    xf = torch.from_numpy(training.normalize(x))  # the whole training set, once: timed
    train(model, opt, sched, loss_fn, xf, plan)
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    acc = evaluate(model)
    return {
        "train_s": train_s,
        "warmup_s": warm_s,
        "eval_s": time.perf_counter() - t,
        "accuracy": acc,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
    }


def step_times(side: str, recipe: dict, steps: int) -> dict:
    """Median seconds of one train step (batch ``recipe['batch_size']``) after a warm-up."""
    import fastconv as fc
    from fastconv import training

    x, y, _, _ = fc.datasets.load_mnist()
    b = recipe["batch_size"]
    xb = training.normalize(x[:b])
    yb = y[:b].astype(np.int64)
    if side == "torch":
        import torch

        model, opt, sched, loss_fn = _torch_setup(recipe, 0, len(x))
        xb, yb = torch.from_numpy(xb), torch.from_numpy(yb)
    else:
        model, opt, sched, loss_fn = _fastconv_setup(recipe, 0, len(x))
    times = []
    for i in range(10 + steps):
        if i == 10 and side != "torch":
            getattr(fc, "wait_for_kernels", lambda: True)()  # never time a serial build
        t = time.perf_counter()
        loss = loss_fn(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 10:
            times.append(time.perf_counter() - t)
    return {"step_s": float(np.median(times))}


def child(args) -> None:
    recipe = json.loads(args.recipe)
    if args.mode == "steps":
        print(json.dumps(step_times(args.side, recipe, args.steps)), flush=True)
        return
    import fastconv as fc

    x, y, xt, yt = fc.datasets.load_mnist()
    if args.train_limit:
        x, y = x[: args.train_limit], y[: args.train_limit]
    run = run_torch if args.side == "torch" else run_fastconv
    print(json.dumps(run(recipe, args.seed, args.warmup, x, y, xt, yt)), flush=True)


# --------------------------------------------------------------------------- the parent


def spawn(side: str, recipe: dict, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--recipe", json.dumps(recipe)]
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if out.returncode:
        raise RuntimeError(f"{side} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.ab_steps import cpu_model as cm

    return cm()


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def describe(r: dict) -> str:
    opt = r["optimizer"]
    if opt == "adam":
        opt += f" betas {tuple(r['betas'])}"
    else:
        opt += f" momentum {r['momentum']}" + (" nesterov" if r["nesterov"] else "")
    length = f"{r['steps']} steps" if r["steps"] else f"{r['epochs']} epoch(s)"
    return (
        f"{r['model']}, {opt}, OneCycleLR max_lr {r['max_lr']} pct_start {r['pct_start']} "
        f"div {r['div_factor']} final_div {r['final_div_factor']}, batch {r['batch_size']}, "
        f"{length}, label smoothing {r['label_smoothing']}"
    )


def med(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a recipe value on both sides, e.g. --set max_lr=0.01",
    )
    p.add_argument(
        "--step-rounds",
        type=int,
        default=5,
        help="alternating process pairs for the per-step ratio (0: skip)",
    )
    p.add_argument("--step-batch", type=int, default=256, help="batch of the per-step ratio")
    p.add_argument("--step-count", type=int, default=30, help="timed steps per process")
    p.add_argument(
        "--torch-search",
        action="store_true",
        help="also run PyTorch recipe variants (seeds 0..N-1 each)",
    )
    p.add_argument("--search-seeds", type=int, default=3, help="seeds per variant (default 3)")
    p.add_argument("--fastconv-only", action="store_true", help="skip the PyTorch side")
    p.add_argument("--train-limit", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the markdown report here")
    p.add_argument("--child", choices=("fastconv", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="train", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30, help=argparse.SUPPRESS)
    args = p.parse_args(argv)  # fmt: skip
    if args.child:
        args.side = args.child
        child(args)
        sys.stderr.flush()
        # NumPy's OpenBLAS (0.3.x) can deadlock joining its worker threads at exit here
        # (blas_thread_shutdown_ waits on a server thread that never wakes); the result is out.
        os._exit(0)
    recipe = base_recipe()
    for kv in args.set:
        k, v = kv.split("=", 1)
        recipe[k] = json.loads(v)
    print(f"recipe: {describe(recipe)}; load {loadavg()}", flush=True)
    sides = ["fastconv"] if args.fastconv_only else ["fastconv", "torch"]
    rows, loads = [], [loadavg()]
    for seed in range(args.seeds):
        res = {}
        for side in sides if seed % 2 == 0 else sides[::-1]:  # alternate who goes first
            res[side] = spawn(side, recipe, seed=seed, warmup=args.warmup,
                              train_limit=args.train_limit)  # fmt: skip
            print(f"seed {seed} {side}: {json.dumps(res[side])}", flush=True)
        rows.append(res)
        loads.append(loadavg())
    steps = {s: [] for s in sides}
    for r in range(args.step_rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            rs = dict(recipe, batch_size=args.step_batch)
            t = spawn(side, rs, mode="steps", steps=args.step_count)["step_s"]
            steps[side].append(t)
            print(f"step round {r} {side}: {1e3 * t:.1f} ms", flush=True)
    loads.append(loadavg())
    search = []
    if args.torch_search:
        for label, over in TORCH_VARIANTS:
            r = dict(recipe, **over)
            res = [spawn("torch", r, seed=s, warmup=args.warmup) for s in range(args.search_seeds)]
            search.append((label, r, res))
            runs = ", ".join(f"{x['train_s']:.2f} s {100 * x['accuracy']:.2f} %" for x in res)
            print(f"torch variant {label}: {runs}", flush=True)
        loads.append(loadavg())
    text = report(recipe, rows, steps, search, loads, args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


# PyTorch recipe variants tried by --torch-search (label, overrides of the fast99 recipe).
TORCH_VARIANTS: list[tuple[str, dict]] = [
    ("batch 128, max_lr 0.01", {"batch_size": 128, "max_lr": 0.01}),
    ("batch 256, max_lr 0.02", {"batch_size": 256, "max_lr": 0.02}),
    ("batch 256, max_lr 0.02, 0.8 epoch", {"batch_size": 256, "max_lr": 0.02, "steps": 188}),
]


def report(recipe, rows, steps, search, loads, args) -> str:
    import numba

    sides = list(rows[0])
    v = {"numba": numba.__version__, "numpy": np.__version__}
    for name in ("torch", "fastconv"):
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    lines = [
        "# Time to 99 % MNIST test accuracy",
        "",
        f"{dt.date.today()}, {cpu_model()}, Python {platform.python_version()}, "
        + ", ".join(f"{k} {x}" for k, x in v.items())
        + "; threads: "
        + ", ".join(f"{s} {rows[0][s]['threads']}" for s in sides)
        + f". Load average (1, 5, 15 min) before, between seeds and after: {'; '.join(loads)}.",
        "",
        f"Recipe (both sides): {describe(recipe)}.",
        f"Command: `python benchmarks/time_to_accuracy.py --seeds {args.seeds}"
        + "".join(f" --set {s}" for s in args.set)
        + (" --torch-search" if args.torch_search else "")
        + "`",
        "",
        "| seed | "
        + " | ".join(f"{s} train s | {s} test acc % | {s} warm-up s" for s in sides)
        + (" | torch / fastconv time |" if len(sides) == 2 else ""),
        "|---" * (1 + 3 * len(sides) + (len(sides) == 2)) + "|",
    ]
    for seed, res in enumerate(rows):
        cells = [str(seed)]
        for s in sides:
            r = res[s]
            cells += [f"{r['train_s']:.2f}", f"{100 * r['accuracy']:.2f}", f"{r['warmup_s']:.1f}"]
        if len(sides) == 2:
            cells.append(f"{res['torch']['train_s'] / res['fastconv']['train_s']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["mean"]
    for s in sides:
        t = [r[s]["train_s"] for r in rows]
        a = [r[s]["accuracy"] for r in rows]
        cells += [f"{np.mean(t):.2f} (median {med(t)})", f"**{100 * np.mean(a):.2f}**", ""]
    if len(sides) == 2:
        ratio = [r["torch"]["train_s"] / r["fastconv"]["train_s"] for r in rows]
        cells.append(f"{statistics.median(ratio):.2f}x median")
    lines += ["| " + " | ".join(cells) + " |", ""]
    if any(steps.values()) and len(sides) == 2:
        f, t = (1e3 * np.array(steps[k]) for k in ("fastconv", "torch"))
        lines += [
            f"One train step of the fast99 net at batch {args.step_batch} (forward, loss, "
            f"backward, optimizer; median of {args.step_count} steps per process, "
            f"{args.step_rounds} alternating process pairs; median (range) over processes): "
            f"fastconv {np.median(f):.1f} ms ({f.min():.1f}-{f.max():.1f}), "
            f"PyTorch {np.median(t):.1f} ms ({t.min():.1f}-{t.max():.1f}): "
            f"**{np.median(t) / np.median(f):.2f}x**.",
            "",
        ]
    if search:
        lines += [
            "PyTorch recipe variants (seeds 0..N-1 each; train seconds / test accuracy %):",
            "",
            "| variant | mean train s | mean test acc % | per seed |",
            "|---|---|---|---|",
        ]
        for label, _, res in search:
            t = [x["train_s"] for x in res]
            a = [x["accuracy"] for x in res]
            per = ", ".join(f"{x['train_s']:.2f} / {100 * x['accuracy']:.2f}" for x in res)
            lines.append(f"| {label} | {np.mean(t):.2f} | {100 * np.mean(a):.2f} | {per} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
