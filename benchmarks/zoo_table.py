"""Every zoo model trained on real MNIST by fastconv and by PyTorch CPU, side by side: test
accuracy after every epoch and seconds per epoch, same network, same initial weights, same
recipe, same data pipeline.

For each model the two sides run in fresh processes of their own, one after the other, the
order alternating from model to model:

- fastconv: ``fastconv train --model NAME --seed S --no-progress --metrics-json F`` (plus
  ``--epochs E`` where the run is shortened), run in-process through ``fastconv.cli.main``: the
  command's own defaults (``fastconv.models.defaults``, ``--recipe fast99`` for fast99) set
  the optimizer, learning rate and schedule, batch size, augmentation and label smoothing,
  and ``fastconv.training.fit`` trains. Numba threads: ``NUMBA_NUM_THREADS``.
- PyTorch (imported first in its process, ``torch.set_num_threads``): the equal torch module
  (``benchmarks.compare.torch_model`` / ``torch_zoo_twin``; the twins of resnet20 and
  inception_mini are written here, as tests/test_zoo.py's), loaded with the initial weights
  of ``fastconv.models.get(NAME, rng=S)`` (what ``fastconv train`` builds), trained by a loop
  that is ``fit``'s step for step: the same resolved recipe (the parent resolves it with
  ``fastconv.cli.apply_recipe`` and checks it against the ``args`` fastconv's metrics record),
  ``torch.optim.SGD``/``Adam`` with the same hyper-parameters, the learning rate set to
  ``lr * lr_decay ** epoch`` at each epoch's start or ``OneCycleLR`` stepped per batch,
  ``CrossEntropyLoss(label_smoothing)``, and the data drawn by fastconv's own NumPy functions
  from a generator seeded exactly as ``fit`` seeds its own (``fastconv.init.spawn(seed)``):
  the same permutation every epoch, the same ``random_shift`` draws, ``normalize`` per batch.
  Only the Dropout masks differ (each library draws its own).

Timed per epoch, on both sides, as ``fit`` times it: from the epoch's first batch gather to
its last optimizer (and scheduler) step, including augmentation, normalisation and the
per-step loss/accuracy bookkeeping. Not timed: process start, imports, loading MNIST, the
untimed warm-up on a throw-away copy of the model (``--warmup-steps`` full batches, an
evaluation of 3000 test images, three batches of the run's short last-batch size:
``warmup_plan``; fastconv: Numba compile or cache load and autotuning, PyTorch: its first-call
costs; fastconv then waits for its parallel kernel builds, ``fc.wait_for_kernels``, where the
library has it), and the test evaluation after every epoch
(eval mode, batch 1000, all 10,000 test images), which is reported apart as the rest of the
wall time.

Before training, both sides write the evaluation-mode logits of their initial model on the
first 100 test images; the parent compares them (the twin equals fastconv's network and
weights). Never asserts on speed or accuracy; a failed side is recorded with its output tail.

    FASTCONV_DATA=../shared/data/mnist .venv/bin/python benchmarks/zoo_table.py \\
        --out benchmarks/results/zoo_mnist.md       # + zoo_mnist.json beside it
    ... --models lenet5,resnet8 --epochs-override resnet8=2     # a subset, shortened
    ... --render benchmarks/results/zoo_mnist.json              # the markdown again
"""

from __future__ import annotations

import sys

if len(sys.argv) > 2 and sys.argv[1:3] == ["--child", "torch"]:
    import torch  # noqa: F401  (first: PyTorch's OpenMP runtime with its own settings)

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = (
    "lenet5",
    "mnist_cnn",
    "nielsen",
    "fast99",
    "resnet8",
    "resnet20",
    "inception_mini",
    "vgg_mini",
)
PROBE = 100  # test images whose initial logits both sides write
EVAL_BATCH = 1000  # fit's evaluation batch
RESULT = "ZOO_RESULT "  # the child's last stdout line: RESULT + JSON

# The resolved train settings both sides use (argparse dests of ``fastconv train``).
RECIPE_KEYS = (
    "model",
    "optimizer",
    "lr",
    "momentum",
    "nesterov",
    "betas",
    "weight_decay",
    "lr_decay",
    "schedule",
    "max_lr",
    "pct_start",
    "div_factor",
    "final_div_factor",
    "no_cycle_momentum",
    "warmup_epochs",
    "label_smoothing",
    "batch_size",
    "epochs",
    "augment",
    "seed",
)


# --------------------------------------------------------------------------- recipes


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def parse_overrides(items: list[str]) -> dict[str, int]:
    """``["nielsen=3", "resnet8=1"]`` -> {"nielsen": 3, "resnet8": 1} (zoo names only)."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MODELS:
            raise ValueError(f"--epochs-override wants NAME=EPOCHS with NAME in {MODELS}: {item!r}")
        try:
            epochs = int(value)
        except ValueError:
            raise ValueError(f"--epochs-override {item!r}: EPOCHS must be an int") from None
        if epochs < 1:
            raise ValueError(f"--epochs-override {item!r}: EPOCHS must be >= 1")
        out[name] = epochs
    return out


def train_argv(
    name: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    data_dir: str | None = None,
    train_limit: int | None = None,
) -> list[str]:
    """The ``fastconv train`` arguments of one run: the model's defaults, the seed, no progress
    bars; ``--epochs`` only where the run is shortened (or lengthened)."""
    argv = ["train", "--model", name, "--seed", str(seed), "--no-progress"]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if train_limit:
        argv += ["--train-limit", str(train_limit)]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    return argv


def resolve_recipe(argv: list[str]) -> dict:
    """The settings ``fastconv train`` runs with for ``argv`` (its parser, then
    ``cli.apply_recipe``: the model's defaults for everything not given), lr resolved."""
    from fastconv import cli

    args = cli._parser().parse_args(argv)
    cli.apply_recipe(args, argv)
    r = {k: getattr(args, k, None) for k in RECIPE_KEYS}
    if r["lr"] is None:
        r["lr"] = cli.DEFAULT_LR[r["optimizer"]]
    if r["betas"] is not None:
        r["betas"] = [float(b) for b in r["betas"]]
    return r


def same_recipe(ours: dict, ran: dict) -> list[str]:
    """The recipe keys where ``ran`` (fastconv's recorded ``args``) differs from ``ours``."""
    bad = []
    for k in RECIPE_KEYS:
        a, b = ours.get(k), ran.get(k)
        if k == "lr" and b is None:
            continue  # the CLI records --lr None when the optimizer's default applied
        if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
            a, b = list(a) if a is not None else None, list(b) if b is not None else None
        if a != b:
            bad.append(f"{k}: {a!r} here, {b!r} in fastconv's run")
    return bad


def describe_recipe(r: dict) -> str:
    """One line: optimizer and its settings, schedule, batch, augmentation, smoothing."""
    if r["optimizer"] == "adam":
        opt = f"Adam lr {r['lr']:g}, betas {tuple(r['betas'] or (0.9, 0.999))}"
    elif r["optimizer"] == "sgd":
        opt = f"SGD lr {r['lr']:g}, momentum {r['momentum']:g}" + (
            ", Nesterov" if r["nesterov"] else ""
        )
    else:
        opt = f"{r['optimizer']} lr {r['lr']:g}"
    if r["weight_decay"]:
        opt += f", weight decay {r['weight_decay']:g}"
    if r["schedule"] == "onecycle":
        cyc = "" if not r["no_cycle_momentum"] else ", momentum not cycled"
        sched = (
            f"one-cycle per batch (max lr {r['max_lr'] or r['lr']:g}, pct_start "
            f"{r['pct_start'] if r['pct_start'] is not None else 0.3:g}, div "
            f"{r['div_factor'] if r['div_factor'] is not None else 25:g}, final div "
            f"{r['final_div_factor'] if r['final_div_factor'] is not None else 1e4:g}{cyc})"
        )
    elif r["schedule"] in (None, "none"):
        sched = "constant lr" if r["lr_decay"] == 1.0 else f"lr x {r['lr_decay']:g} per epoch"
    else:
        sched = f"schedule {r['schedule']}"
    extra = f", label smoothing {r['label_smoothing']:g}" if r["label_smoothing"] else ""
    aug = r["augment"] if r["augment"] not in (None, "none") else "no augmentation"
    if aug == "shift":
        aug = "random shift +-2 px"
    return f"{opt}; {sched}; batch {r['batch_size']}; {aug}{extra}"


# --------------------------------------------------------------------------- torch twins


def torch_twin(name: str, model):
    """The torch module equal to zoo model ``name`` (1 channel, 10 classes) with ``model``'s
    weights: ``benchmarks.compare``'s for the Sequential nets, resnet8 and vgg_mini; written
    here (as tests/test_zoo.py's twins) for resnet20 and inception_mini."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import compare

    if name in ("resnet8", "vgg_mini"):
        return compare.torch_zoo_twin(name, model)
    if name == "resnet20":
        tm = _torch_resnet(3)
    elif name == "inception_mini":
        tm = _torch_inception_mini()
    else:
        return compare.torch_model(model)
    import torch

    tm.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return tm


def _torch_resnet(n: int):
    import torch
    from torch import nn

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

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            c = 16
            for stage, width in enumerate((16, 32, 64)):
                blocks = []
                for i in range(n):
                    blocks.append(Block(c, width, 2 if stage > 0 and i == 0 else 1))
                    c = width
                self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet()


def _torch_inception_mini():
    import torch
    from torch import nn

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, k, padding=0):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, padding=padding, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)))

    class Inception(nn.Module):
        def __init__(self, cin, c1, c3r, c3, c5r, c5, cp):
            super().__init__()
            self.branch1 = BasicConv2d(cin, c1, 1)
            self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, 1), BasicConv2d(c3r, c3, 3, 1))
            self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, 1), BasicConv2d(c5r, c5, 5, 2))
            self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), BasicConv2d(cin, cp, 1))

        def forward(self, x):
            b = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
            return torch.cat(b, 1)

    class InceptionMini(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = BasicConv2d(1, 32, 3, 1)
            self.maxpool1 = nn.MaxPool2d(2)
            self.inception3a = Inception(32, 16, 16, 24, 4, 8, 8)
            self.inception3b = Inception(56, 32, 32, 48, 8, 16, 16)
            self.maxpool2 = nn.MaxPool2d(2)
            self.inception4a = Inception(112, 48, 32, 64, 8, 16, 16)
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(144, 10)

        def forward(self, x):
            x = self.maxpool1(self.conv1(x))
            x = self.maxpool2(self.inception3b(self.inception3a(x)))
            x = self.inception4a(x)
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return InceptionMini()


def fastconv_model(name: str, seed: int):
    """The model ``fastconv train --model name --seed seed`` builds for MNIST."""
    from fastconv import models

    kw = {"in_channels": 1, "num_classes": 10} if name in models.CONFIGURABLE else {}
    return models.get(name, rng=seed, **kw)


# --------------------------------------------------------------------------- the torch side


def torch_optimizer(torch, r: dict, params):
    if r["optimizer"] == "sgd":
        return torch.optim.SGD(
            params,
            lr=r["lr"],
            momentum=r["momentum"],
            weight_decay=r["weight_decay"],
            nesterov=bool(r["nesterov"]),
        )
    if r["optimizer"] == "adam":
        betas = tuple(r["betas"] or (0.9, 0.999))
        return torch.optim.Adam(params, lr=r["lr"], betas=betas, weight_decay=r["weight_decay"])
    raise NotImplementedError(f"zoo_table: no torch twin of optimizer {r['optimizer']!r}")


def torch_scheduler(torch, r: dict, opt, epochs: int, steps: int):
    """``cli._make_scheduler``'s schedule in torch (the zoo's recipes use none or onecycle)."""
    if r.get("warmup_epochs"):
        raise NotImplementedError("zoo_table: --warmup-epochs has no torch twin here")
    if r["schedule"] in (None, "none"):
        return None
    if r["schedule"] != "onecycle":
        raise NotImplementedError(f"zoo_table: no torch twin of schedule {r['schedule']!r}")

    def arg(k, default):
        return default if r.get(k) is None else r[k]

    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=arg("max_lr", r["lr"]),
        epochs=epochs,
        steps_per_epoch=steps,
        pct_start=arg("pct_start", 0.3),
        div_factor=arg("div_factor", 25.0),
        final_div_factor=arg("final_div_factor", 1e4),
        cycle_momentum=not r.get("no_cycle_momentum") and r["optimizer"] != "adagrad",
    )


def torch_evaluate(torch, model, x, y, mean, std) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode, batch 1000: ``training.evaluate``'s."""
    from fastconv import training

    model.eval()
    loss_fn = torch.nn.CrossEntropyLoss()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            xb = torch.from_numpy(training.normalize(x[i : i + EVAL_BATCH], mean, std))
            yb = np.ascontiguousarray(y[i : i + EVAL_BATCH], dtype=np.int64)
            logits = model(xb)
            total += float(loss_fn(logits, torch.from_numpy(yb))) * len(yb)
            correct += int((logits.argmax(1).numpy() == yb).sum())
    model.train()
    return total / len(x), correct / len(x)


def torch_fit(torch, model, r: dict, train, test, *, epochs: int, log=None) -> dict:
    """``fastconv.training.fit``'s loop, step for step, on a torch model: same generator
    (``init.spawn(seed)``), permutation, augmentation draws, normalisation, lr schedule and
    per-step bookkeeping; the evaluation after each epoch is outside the timed part."""
    from fastconv import init, training

    mean, std = training.STATS["digits"]
    x_train, y_train = train
    augment = None if r["augment"] in (None, "none") else r["augment"]
    gen = init.spawn(r["seed"])
    if augment == "expand":
        x_train, y_train = training.expand_shifted(x_train, y_train)
    n, bs = len(x_train), r["batch_size"]
    steps = -(-n // bs)
    opt = torch_optimizer(torch, r, model.parameters())
    sched = torch_scheduler(torch, r, opt, epochs, steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"] or 0.0)
    base_lr = r["lr"]
    hist: dict[str, list] = {
        k: []
        for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "lr")
    }
    hist["eval_seconds"] = []
    model.train()
    for epoch in range(epochs):
        if sched is None:
            for g in opt.param_groups:
                g["lr"] = base_lr * r["lr_decay"] ** epoch
        hist["lr"].append(opt.param_groups[0]["lr"])
        order = gen.permutation(n)
        seen, correct, loss_sum = 0, 0, 0.0
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * bs : (step + 1) * bs]
            xb = x_train[idx]
            if augment == "shift":
                xb = training.random_shift(xb, gen, 2)
            elif augment == "crop-flip":
                xb = training.random_crop_flip(xb, gen, 4)
            opt.zero_grad()
            xb = training.normalize(xb, mean, std, np.float32)
            yb = np.ascontiguousarray(y_train[idx], dtype=np.int64)
            logits = model(torch.from_numpy(xb))
            loss = loss_fn(logits, torch.from_numpy(yb))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"torch: the training loss is {loss_value} at epoch {epoch + 1}, step "
                    f"{step + 1} of {steps}"
                )
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            seen += len(idx)
            loss_sum += loss_value * len(idx)
            correct += int((logits.detach().argmax(1).numpy() == yb).sum())
        seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        tl, ta = (
            torch_evaluate(torch, model, test[0], test[1], mean, std)
            if test is not None
            else (float("nan"), float("nan"))
        )
        hist["eval_seconds"].append(time.perf_counter() - t1)
        hist["train_loss"].append(loss_sum / seen)
        hist["train_accuracy"].append(correct / seen)
        hist["seconds"].append(seconds)
        hist["test_loss"].append(tl)
        hist["test_accuracy"].append(ta)
        if log:
            log(
                f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f} "
                f"acc {correct / seen:.4f} | test loss {tl:.4f} acc {ta:.4f} | "
                f"{seconds:.1f} s, {seen / seconds:.0f} img/s"
            )
    return hist


def warmup_plan(x, y, xt, yt, batch_size: int, steps: int) -> list:
    """The untimed warm-up, as (train subset, test subset or None, epochs) runs: ``steps``
    full batches and an evaluation of 3000 test images (three calls at batch 1000), then, when
    the run's last batch is short, three epochs of one batch of that size. Three calls per
    shape: fastconv's autotuning runs the heuristic's choice at a shape's first call, compiles
    the other candidate at the second and times both at the third (fastconv/autotune.py)."""
    out = [((x[: steps * batch_size], y[: steps * batch_size]), (xt[:3000], yt[:3000]), 1)]
    last = len(x) % batch_size
    if last:
        out.append(((x[:last], y[:last]), None, 3))
    return out


def child_torch(spec: dict) -> dict:
    import torch

    import fastconv as fc

    threads = spec["threads"]
    torch.set_num_threads(threads)
    torch.manual_seed(spec["seed"])  # Dropout masks
    r = spec["recipe"]
    x, y, xt, yt = fc.datasets.load_mnist(spec["data_dir"])
    if spec["train_limit"]:
        x, y = x[: spec["train_limit"]], y[: spec["train_limit"]]
    mean, std = fc.training.STATS["digits"]

    def log(s):
        print(s, flush=True)

    model = torch_twin(spec["model"], fastconv_model(spec["model"], spec["seed"]))
    model.eval()
    with torch.no_grad():
        probe = model(torch.from_numpy(fc.training.normalize(xt[:PROBE], mean, std))).numpy()
    np.save(spec["probe_path"], probe)
    model.train()

    t = time.perf_counter()
    junk = torch_twin(spec["model"], fastconv_model(spec["model"], spec["seed"] + 10_000))
    # no lr schedule in the warm-up (fastconv's warm-up has none; a one-cycle schedule of a
    # few steps is degenerate in torch)
    wr = dict(r, seed=r["seed"] + 10_000, schedule="none", lr_decay=1.0)
    for (xw, yw), test, epochs in warmup_plan(x, y, xt, yt, r["batch_size"], spec["warmup_steps"]):
        torch_fit(torch, junk, wr, (xw, yw), test, epochs=epochs)
    warm = time.perf_counter() - t
    del junk
    log(f"torch warm-up: {warm:.1f} s; training {spec['model']}, {spec['epochs']} epochs")

    t = time.perf_counter()
    hist = torch_fit(torch, model, r, (x, y), (xt, yt), epochs=spec["epochs"], log=log)
    total = time.perf_counter() - t
    return {
        "history": hist,
        "warmup_seconds": warm,
        "total_seconds": total,
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
        "malloc": os.environ.get("FASTCONV_MALLOC", "fastconv's (mallopt)") or "?",
        "fastconv_path": str(Path(fc.__file__).parent),
    }


# --------------------------------------------------------------------------- the fastconv side


def child_fastconv(spec: dict) -> dict:
    import numba

    import fastconv as fc
    from fastconv import autotune, cli, training
    from fastconv.tensor import no_grad

    r = spec["recipe"]
    x, y, xt, yt = fc.datasets.load_mnist(spec["data_dir"])
    if spec["train_limit"]:
        x, y = x[: spec["train_limit"]], y[: spec["train_limit"]]
    mean, std = training.STATS["digits"]

    model = fastconv_model(spec["model"], spec["seed"])
    model.eval()
    with no_grad():
        probe = model(training.normalize(xt[:PROBE], mean, std)).numpy()
    np.save(spec["probe_path"], np.asarray(probe))
    del model

    t = time.perf_counter()  # warm-up: a throw-away copy through fit, the recipe's optimizer
    junk = fastconv_model(spec["model"], spec["seed"] + 10_000)
    wargs = cli._parser().parse_args(spec["argv"])
    cli.apply_recipe(wargs, spec["argv"])
    opt = cli._make_optimizer(wargs, junk.parameters(), r["lr"])
    aug = None if r["augment"] in (None, "none") else r["augment"]
    for (xw, yw), test, epochs in warmup_plan(x, y, xt, yt, r["batch_size"], spec["warmup_steps"]):
        training.fit(
            junk,
            opt,
            (xw, yw),
            test,
            epochs=epochs,
            batch_size=r["batch_size"],
            rng=r["seed"] + 10_000,
            augment=aug,
            loss_fn=cli._make_loss(wargs),
            progress=False,
            log=None,
        )
    wait = getattr(fc, "wait_for_kernels", None)  # parallel builds done: no serial twin timed
    if wait is not None:
        wait()
    warm = time.perf_counter() - t
    del junk
    print(f"fastconv warm-up: {warm:.1f} s", flush=True)

    metrics_path = spec["probe_path"].replace(".npy", "_metrics.json")
    t = time.perf_counter()
    rc = cli.main([*spec["argv"], "--metrics-json", metrics_path])
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"fastconv train exited with status {rc}")
    m = json.loads(Path(metrics_path).read_text())
    hist = m["history"]
    return {
        "history": {
            k: hist[k]
            for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "lr")
        },
        "warmup_seconds": warm,
        "total_seconds": m["total_seconds"],
        "cli_wall_seconds": wall,
        "args": {k: m["args"].get(k) for k in RECIPE_KEYS},
        "defaults_filled": m["args"].get("defaults"),
        "threads": numba.get_num_threads(),
        "threading_layer": m["environment"].get("numba_threading_layer"),
        "version": fc.__version__,
        "fastconv_path": str(Path(fc.__file__).parent),
        "kernel_digest": autotune.kernel_digest(),
        # convolution keys of the training steps this process ran on the heuristic's
        # algorithm (nothing tuned in the cache yet: see fastconv/autotune.py)
        "heuristic_keys": sorted(k for k in autotune._deferred if _key_batch(k) == r["batch_size"]),
    }


def _key_batch(key: str) -> int | None:
    """The batch size N of an autotune key ``op|(N, C, H, W, ...)|dtype|tT``."""
    try:
        return int(key.split("|")[1].strip("()").split(",")[0])
    except (IndexError, ValueError):
        return None


def child(side: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = (child_torch if side == "torch" else child_fastconv)(spec)
    print(RESULT + json.dumps(res), flush=True)


# --------------------------------------------------------------------------- the parent


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def cpu_info() -> dict:
    """Model name, family / model numbers (they tell apart CPUs sold under one name: "AMD
    EPYC" is Zen 1 as family 23 model 1, Zen 4 as family 25), cores and the ISA flags."""
    name, flags, ids = platform.processor() or "?", [], {}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and name in ("?", platform.processor()):
                name = value
            elif key in ("cpu family", "model") and value.isdigit():
                ids.setdefault("family" if key == "cpu family" else "model_number", int(value))
            elif key == "flags":
                flags = value.split()
                break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    return {
        "model": name,
        **ids,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in wanted},
    }


def machine_text(cpu: dict) -> str:
    """One run's machine, as the report's Machine line gives it."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
    ids = (
        f" (family {cpu['family']} model {cpu['model_number']})"
        if "family" in cpu and "model_number" in cpu
        else ""
    )
    return f"{cpu['model']}{ids}, {cpu['cores']} cores; ISA flags: {flags}"


def row_runs(data: dict) -> dict[str, int]:
    """Model -> the number (from 1) of the run its row came from: the last run that finished
    that model (a merge replaces the rows of the models it runs again, once each has run;
    ``done``: the models a run has finished, absent in runs recorded before it was kept)."""
    return {m: i + 1 for i, r in enumerate(data["runs"]) for m in r.get("done", r["models"])}


MERGE_SAME = ("threads", "seed", "train_limit", "warmup_steps", "torch_malloc")


def merge(old: dict, data: dict, out_json: object = "the results file") -> dict:
    """``data`` (this run: its rows so far, its run record last in ``runs``) merged into
    ``old`` (an earlier report's JSON). A model this run has finished replaces its old row,
    which is kept apart in ``superseded_rows``; a model it has not finished yet (still
    running, or stopped) keeps its old row, so a report written between models, or after a
    stopped run, loses nothing. Runs made with other settings are refused."""
    diff = [k for k in MERGE_SAME if old.get(k) != data[k]]
    if diff:
        raise SystemExit(f"--merge: {out_json} was run with other {', '.join(diff)}")
    done = {r["model"] for r in data["rows"]}
    this_run = data["runs"][-1]
    rank = {m: i for i, m in enumerate(MODELS)}
    return dict(
        data,
        rows=sorted(
            [r for r in old["rows"] if r["model"] not in done] + data["rows"],
            key=lambda r: rank[r["model"]],
        ),
        superseded_rows=old.get("superseded_rows", [])
        + [dict(r, superseded_at=this_run["started"]) for r in old["rows"] if r["model"] in done],
        runs=old.get("runs", []) + [this_run],
        notes=data["notes"] or old.get("notes", ""),
        shortened_note=data["shortened_note"] or old.get("shortened_note", ""),
    )


def versions() -> dict:
    v = {"python": platform.python_version()}
    for name in ("numpy", "numba", "torch", "fastconv"):
        try:
            v[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v[name] = "not installed"
    return v


def git_state() -> dict:
    """HEAD of the checkout fastconv is imported from, and what differs from it in the library
    (tracked files changed; untracked files apart: the ``fastconv/kernels`` link of a worktree
    made as benchmarks/ab_steps.py makes one is not a change)."""

    import fastconv

    src = Path(fastconv.__file__).resolve().parent.parent  # the checkout fastconv comes from

    def git(*a):
        try:
            out = subprocess.run(["git", *a], cwd=src, capture_output=True, text=True, timeout=30)
            return out.stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    lines = git("status", "--porcelain", "--", "fastconv", "kernels", "benchmarks/compare.py")
    lines = [ln for ln in lines.splitlines() if ln.strip()]
    return {
        "commit": git("rev-parse", "--short=7", "HEAD"),
        "subject": git("log", "-1", "--format=%s")[:120],
        "checkout": str(src),
        "library_changes": [ln[3:] for ln in lines if not ln.startswith("??")],
        "library_untracked": [ln[3:] for ln in lines if ln.startswith("??")],
    }


def spawn(side: str, spec: dict, threads: int, timeout: float, log) -> dict:
    """Run one side in a fresh process; stream its lines; its result, or the failure."""
    with tempfile.TemporaryDirectory(prefix="zoo_table_") as tmp:
        spec = dict(spec, probe_path=str(Path(tmp) / f"{side}_probe.npy"))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        if side == "fastconv" and spec.get("fastconv_autotune"):
            env["FASTCONV_AUTOTUNE"] = spec["fastconv_autotune"]
        if side == "torch" and spec.get("torch_malloc") == "system":
            env["FASTCONV_MALLOC"] = "system"  # glibc's own malloc settings, as plain PyTorch
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, spec_path.name]
        before, t0 = loadavg(), time.time()
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        tail: list[str] = []
        result = None
        deadline = time.time() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(RESULT):
                result = json.loads(line[len(RESULT) :])
                continue
            tail = (tail + [line])[-40:]
            log(f"  [{spec['model']} {side}] {line}")
            if time.time() > deadline:
                proc.kill()
                break
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.time() - t0
        out = {"side": side, "load_before": before, "load_after": loadavg(), "wall_seconds": wall}
        if result is None or rc not in (0, None):
            out.update(error=f"exit status {rc}", output_tail=tail)
            if result is not None:
                out.update(result)
            return out
        out.update(result)
        probe = spec["probe_path"]
        out["probe"] = np.load(probe).tolist() if os.path.exists(probe) else None
        return out


def run_model(name: str, order: list[str], args, overrides: dict, log) -> dict:
    from fastconv import models

    default_epochs = resolve_recipe(train_argv(name))["epochs"]
    epochs = overrides.get(name)
    argv = train_argv(
        name, seed=args.seed, epochs=epochs, data_dir=args.data_dir, train_limit=args.train_limit
    )
    recipe = resolve_recipe(argv)
    spec = {
        "model": name,
        "argv": argv,
        "recipe": recipe,
        "epochs": recipe["epochs"],
        "seed": args.seed,
        "threads": args.threads,
        "data_dir": args.data_dir,
        "train_limit": args.train_limit,
        "warmup_steps": args.warmup_steps,
        "torch_malloc": args.torch_malloc,
        "fastconv_autotune": args.fastconv_autotune,
    }
    shown = ["fastconv", *[a for a in argv if a != "--data-dir" and a != args.data_dir]]
    log(
        f"{name}: {describe_recipe(recipe)}; {recipe['epochs']} epochs "
        f"(default {default_epochs}); sides {' then '.join(order)}; load {loadavg()}"
    )
    row = {
        "model": name,
        "parameters": int(sum(p.data.size for p in fastconv_model(name, 0).parameters())),
        "recipe": recipe,
        "recipe_text": describe_recipe(recipe),
        "default_epochs": default_epochs,
        "epochs": recipe["epochs"],
        "shortened": recipe["epochs"] < default_epochs,
        "fastconv_command": shlex.join(shown),
        "order": order,
        "defaults_source": "cli.RECIPES['fast99'] (--recipe fast99)"
        if not models.defaults(name)
        else "fastconv.models.defaults",
    }
    for side in order:
        res = spawn(side, spec, args.threads, args.timeout, log)
        row[side] = res
        if "error" in res:
            log(f"{name} {side}: FAILED ({res['error']})")
            continue
        h = res["history"]
        log(
            f"{name} {side}: test acc {100 * h['test_accuracy'][-1]:.2f} % after "
            f"{len(h['seconds'])} epochs, {np.mean(h['seconds']):.1f} s/epoch, warm-up "
            f"{res['warmup_seconds']:.1f} s, load {res['load_before']} -> {res['load_after']}"
        )
    f, t = row.get("fastconv", {}), row.get("torch", {})
    if f.get("probe") is not None and t.get("probe") is not None:
        d = np.abs(np.array(f["probe"]) - np.array(t["probe"]))
        row["initial_logits_max_abs_diff"] = float(d.max())
    for s in (f, t):
        s.pop("probe", None)
    if "args" in f:
        row["recipe_mismatch"] = same_recipe(recipe, f["args"])
        if row["recipe_mismatch"]:
            log(f"{name}: RECIPE MISMATCH: {row['recipe_mismatch']}")
    return row


# --------------------------------------------------------------------------- the report


def _acc(side: dict, i: int = -1) -> str:
    return f"{100 * side['history']['test_accuracy'][i]:.2f}"


def _secs(v: list[float]) -> str:
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{np.median(v):.1f} ({min(v):.1f}-{max(v):.1f})"


def _ok(side: dict | None) -> bool:
    return bool(side) and "error" not in side and bool(side.get("history"))


def markdown(data: dict) -> str:
    env, rows, runs = data["environment"], data["rows"], data["runs"]
    commits = sorted({r["environment"]["git"]["commit"] for r in runs})
    machines = [machine_text(r["environment"]["cpu"]) for r in runs]
    if len(set(machines)) > 1:  # merged runs from other machines: say which row ran where
        which = row_runs(data)
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(machines):
            groups.setdefault(m, []).append(i + 1)
        machine_line = (
            "- Machines (the runs differ: compare times within a row, never across rows of "
            "other machines; the results table names each row's run): "
            + "; ".join(
                f"run{'s' if len(ns) > 1 else ''} {', '.join(map(str, ns))}: {m}"
                for m, ns in groups.items()
            )
            + "."
        )
    else:
        which, machine_line = None, f"- Machine: {machines[0]}."
    v = env["versions"]
    g = env["git"]
    if len(commits) > 1:
        g = dict(g, commit=" and ".join(commits) + " (the runs differ)")
    changes = (
        "uncommitted library changes at run time: " + ", ".join(g["library_changes"])
        if g["library_changes"]
        else "no uncommitted changes under fastconv/ or kernels/ at run time"
    )
    paths = sorted(
        {
            r[s]["fastconv_path"]
            for r in rows
            for s in ("fastconv", "torch")
            if r.get(s, {}).get("fastconv_path")
        }
    )
    digests = sorted(
        {r["fastconv"]["kernel_digest"] for r in rows if r.get("fastconv", {}).get("kernel_digest")}
    )
    if paths:
        changes += f"; fastconv imported from {', '.join(paths)}"
    if digests:
        changes += f" (CPU kernel digest {', '.join(digests)})"
    lines = [
        "# The model zoo on MNIST: fastconv and PyTorch CPU, same model, weights and recipe",
        "",
        "Written by `benchmarks/zoo_table.py` (its docstring says exactly what each side runs "
        "and what is timed); raw per-epoch numbers in `zoo_mnist.json` beside this file.",
        "",
        f"- Date: {runs[0]['started']} to {runs[-1]['finished']} (UTC); wall time "
        + " + ".join(f"{r['wall_seconds'] / 60:.1f}" for r in runs)
        + " min"
        + (f" ({len(runs)} runs, merged)" if len(runs) > 1 else "")
        + ".",
        f"- Code: commit {g['commit']} ({g['subject']}); {changes}.",
        machine_line,
        f"- Versions: Python {v['python']}, NumPy {v['numpy']}, Numba {v['numba']}, "
        f"PyTorch {v['torch']}, fastconv {v['fastconv']}.",
        f"- Threads: fastconv NUMBA_NUM_THREADS={data['threads']}, PyTorch "
        f"torch.set_num_threads({data['threads']}); "
        + (
            "the PyTorch process runs with glibc's default malloc settings (FASTCONV_MALLOC="
            "system: importing fastconv for its data functions does not apply its mallopt)."
            if data.get("torch_malloc") == "system"
            else "the PyTorch process imports fastconv, whose import applies its mallopt."
        )
        + (
            f" fastconv's autotuning: FASTCONV_AUTOTUNE={data['fastconv_autotune']}."
            if data.get("fastconv_autotune")
            else " fastconv's autotuning: the library's default (deferred; cache "
            "~/.cache/fastconv as left by earlier runs on this machine)."
        ),
        "- Data: real MNIST (60,000 training"
        + (f", limited to the first {data['train_limit']}" if data.get("train_limit") else "")
        + " / 10,000 test images), seed "
        f"{data['seed']}; test accuracy in eval mode after every epoch on all 10,000 test "
        "images (not part of seconds/epoch).",
        *[
            "- Command"
            + (f" (run {i + 1}: {', '.join(r['models'])})" if len(runs) > 1 else "")
            + f": `{r['command']}`"
            + (
                ""
                if r.get("complete", True)
                else " (incomplete: stopped or still running; finished: "
                + (", ".join(r.get("done", [])) or "none")
                + ")"
            )
            for i, r in enumerate(runs)
        ],
        "",
        "## Results",
        "",
        "| model | params | epochs (default) | fastconv test acc % | PyTorch test acc % | "
        "fastconv s/epoch median (min-max) | PyTorch s/epoch median (min-max) | "
        "PyTorch / fastconv median time |" + (" run |" if which else ""),
        "|---|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if which else ""),
    ]
    for row in rows:
        f, t = row.get("fastconv"), row.get("torch")
        ep = f"{row['epochs']} ({row['default_epochs']})" + (
            " **shortened**" if row["shortened"] else ""
        )
        cells = [row["model"], f"{row['parameters']:,}", ep]
        for s in (f, t):
            if _ok(s):
                a = s["history"]["test_accuracy"]
                best = max(a)
                cells.append(
                    f"**{_acc(s)}**" + (f" (best {100 * best:.2f})" if best > a[-1] else "")
                )
            else:
                cells.append("failed")
        for s in (f, t):
            cells.append(_secs(s["history"]["seconds"]) if _ok(s) else "-")
        if _ok(f) and _ok(t):
            ratio = np.median(t["history"]["seconds"]) / np.median(f["history"]["seconds"])
            cells.append(f"{ratio:.2f}x")
        else:
            cells.append("-")
        if which:
            cells.append(str(which.get(row["model"], "?")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "s/epoch: training only (warm-up and evaluation apart); the median over the epochs "
        "run (other work on a shared machine only ever adds time, and now and then it did: "
        "see the per-epoch figures and load averages below), min-max in brackets. "
        "PyTorch / fastconv above 1 means fastconv trained faster.",
        "",
    ]
    short = [r for r in rows if r["shortened"]]
    if short:
        lines += [
            "**Shortened rows:** "
            + ", ".join(
                f"{r['model']} ({r['epochs']} of {r['default_epochs']} epochs)" for r in short
            )
            + ". "
            + data.get("shortened_note", "")
            + " Each shortened run takes the first epochs of its recipe's schedule (the same "
            "per-epoch learning-rate decay; the one-cycle schedule spans the epochs run), so "
            "its accuracy is not what the full recipe reaches.",
            "",
        ]
    lines += ["## Recipes (resolved by `fastconv train`, used on both sides)", ""]
    lines += [
        "| model | recipe | fastconv command (plus --data-dir, --metrics-json) |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['recipe_text']} | `{row['fastconv_command']}` |")
    lines += ["", "## Per epoch", ""]
    lines += [
        "| model | side | test accuracy % per epoch | seconds per epoch | warm-up s | "
        "eval + rest s | load avg before -> after |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        for side in row["order"]:
            s = row.get(side) or {}
            name = "fastconv" if side == "fastconv" else "PyTorch"
            if not _ok(s):
                lines.append(
                    f"| {row['model']} | {name} | failed: {s.get('error', '?')} | | | | "
                    f"{s.get('load_before', '?')} -> {s.get('load_after', '?')} |"
                )
                continue
            h = s["history"]
            accs = ", ".join(f"{100 * a:.2f}" for a in h["test_accuracy"])
            secs = ", ".join(f"{x:.1f}" for x in h["seconds"])
            rest = s["total_seconds"] - sum(h["seconds"])
            lines.append(
                f"| {row['model']} | {name} | {accs} | {secs} | {s['warmup_seconds']:.1f} | "
                f"{rest:.1f} | {s['load_before']} -> {s['load_after']} |"
            )
    lines += [
        "",
        "warm-up s: the untimed warm-up (fastconv: Numba compile/cache load and autotuning). "
        "eval + rest s: the run's wall time outside the timed epochs (the evaluations after "
        "each epoch, and on fastconv's side the CLI's per-epoch bookkeeping).",
        "",
        "## Checks",
        "",
    ]
    for row in rows:
        notes = []
        d = row.get("initial_logits_max_abs_diff")
        if d is not None:
            notes.append(f"initial eval-mode logits on {PROBE} test images: max |diff| {d:.2e}")
        mism = row.get("recipe_mismatch")
        if mism is not None:
            notes.append(
                "recipe as recorded by fastconv's run: "
                + ("same" if not mism else "DIFFERENT: " + "; ".join(mism))
            )
        f = row.get("fastconv") or {}
        if f.get("heuristic_keys"):
            notes.append(
                f"fastconv ran {len(f['heuristic_keys'])} convolution ops of its training "
                "steps on the heuristic's algorithm choice (none tuned in the autotune cache "
                "yet; the warm-up measured them for later processes)"
            )
        for side in row["order"]:
            s = row.get(side) or {}
            if "error" in s:
                notes.append(
                    f"{side} FAILED: {s['error']}; last output: "
                    + " / ".join(s.get("output_tail", [])[-5:])
                )
        lines.append(f"- {row['model']}: " + "; ".join(notes) + ".")
    if data.get("superseded_rows"):
        lines += [
            "",
            "## Superseded runs",
            "",
            "Rows that were run again later (`--merge`); not in the tables above.",
            "",
            "| model | side | epochs | test accuracy % per epoch | seconds per epoch | "
            "load avg before -> after |",
            "|---|---|---:|---|---|---|",
        ]
        for row in data["superseded_rows"]:
            for side in row["order"]:
                s = row.get(side) or {}
                if not _ok(s):
                    continue
                h = s["history"]
                lines.append(
                    f"| {row['model']} | {'PyTorch' if side == 'torch' else side} | "
                    f"{row['epochs']} | "
                    + ", ".join(f"{100 * a:.2f}" for a in h["test_accuracy"])
                    + " | "
                    + ", ".join(f"{x:.1f}" for x in h["seconds"])
                    + f" | {s['load_before']} -> {s['load_after']} |"
                )
    if data.get("notes"):
        lines += ["", "## Notes", "", data["notes"].strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2])
        sys.stdout.flush()
        sys.stderr.flush()
        # NumPy's OpenBLAS (0.3.x) can deadlock joining its worker threads at exit
        # (benchmarks/time_to_accuracy.py); the result is out.
        os._exit(0)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    p.add_argument(
        "--epochs-override",
        action="append",
        default=[],
        metavar="NAME=E",
        help="train NAME for E epochs instead of its default (both sides)",
    )
    p.add_argument(
        "--out",
        default="benchmarks/results/zoo_mnist.md",
        help="markdown report; the raw JSON goes beside it (.json)",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("FASTCONV_DATA"),
        help="MNIST folder (default $FASTCONV_DATA)",
    )
    p.add_argument("--threads", type=int, default=2, help="threads on each side (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--warmup-steps", type=int, default=3, help="untimed warm-up batches per side (default 3)"
    )
    p.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="first N training images only (quick checks of the script)",
    )
    p.add_argument(
        "--torch-malloc",
        choices=("system", "fastconv"),
        default="system",
        help="PyTorch process: glibc's malloc settings (default) or fastconv's",
    )
    p.add_argument(
        "--fastconv-autotune",
        choices=("eager", "0"),
        default=None,
        help="FASTCONV_AUTOTUNE for the fastconv process (default: unset, the library's "
        "deferred tuning: shapes with no tuned choice cached run the heuristic's algorithm in "
        "that process)",
    )
    p.add_argument(
        "--first",
        choices=("fastconv", "torch"),
        default="fastconv",
        help="side that goes first for the first model (then alternating)",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other models' rows of an existing JSON at --out",
    )
    p.add_argument("--note", default="", help="text for the report's Notes section")
    p.add_argument("--shortened-note", default="", help="why rows are shortened (report)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per side")
    p.add_argument("--render", metavar="JSON", help="only write the markdown of this JSON")
    args = p.parse_args(argv)
    out_md = Path(args.out)
    out_json = out_md.with_suffix(".json")
    if args.render:
        data = json.loads(Path(args.render).read_text())
        if args.note:
            data["notes"] = args.note
        if args.shortened_note:
            data["shortened_note"] = args.shortened_note
        Path(args.render).write_text(json.dumps(data, indent=1) + "\n")
        out_md.write_text(markdown(data))
        print(f"wrote {out_md}")
        return 0
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {MODELS}")
    try:
        overrides = parse_overrides(args.epochs_override)
    except ValueError as e:
        p.error(str(e))
    if args.data_dir:
        args.data_dir = str(Path(args.data_dir).resolve())

    def log(s: str) -> None:
        print(s, flush=True)

    shown = ["python", "benchmarks/zoo_table.py", *argv]
    data_env = os.environ.get("FASTCONV_DATA")
    command = (f"FASTCONV_DATA={data_env} " if data_env else "") + shlex.join(shown)
    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.time()
    env = {"cpu": cpu_info(), "versions": versions(), "git": git_state()}
    log(
        f"zoo table: {', '.join(names)}; threads {args.threads}; load {loadavg()}; "
        f"{env['cpu']['model']}; commit {env['git']['commit']}"
    )
    rows: list[dict] = []
    old = json.loads(out_json.read_text()) if args.merge and out_json.exists() else None
    this_run = {"models": names, "command": command, "environment": env}

    def write(final: bool) -> dict:
        """The JSON and markdown of what has run so far (after every model)."""
        this_run.update(
            started=started.strftime("%Y-%m-%d %H:%M"),
            finished=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            wall_seconds=time.time() - t0,
            complete=final,
            done=[r["model"] for r in rows],
        )
        data = {
            "threads": args.threads,
            "seed": args.seed,
            "train_limit": args.train_limit,
            "warmup_steps": args.warmup_steps,
            "torch_malloc": args.torch_malloc,
            "fastconv_autotune": args.fastconv_autotune,
            "environment": env,
            "runs": [this_run],
            "rows": list(rows),
            "notes": args.note,
            "shortened_note": args.shortened_note,
        }
        if old is not None:
            data = merge(old, data, out_json)
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(data, indent=1) + "\n")
        out_md.write_text(markdown(data))
        return data

    sides = ["fastconv", "torch"] if args.first == "fastconv" else ["torch", "fastconv"]
    for i, name in enumerate(names):
        order = sides if i % 2 == 0 else sides[::-1]
        rows.append(run_model(name, order, args, overrides, log))
        write(final=False)
        log(f"-- {name} done; {(time.time() - t0) / 60:.1f} min so far")
    data = write(final=True)
    print(markdown(data))
    log(f"wrote {out_md} and {out_json} ({(time.time() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
