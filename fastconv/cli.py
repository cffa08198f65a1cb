"""The ``fastconv`` command (also ``python -m fastconv``).

    fastconv train --model lenet5 --dataset mnist --epochs 10 --save lenet5.npz \\
        --metrics-json metrics.json
    fastconv evaluate --load lenet5.npz
    fastconv info
    fastconv summary --model resnet8 --in-channels 3 --size 32   # layers, shapes, params, MACs
    fastconv bench ...        # from a source checkout: benchmarks/compare.py's main(argv)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

DATASETS = {"mnist": "digits", "fashion": "fashion", "cifar10": "cifar10", "cifar100": "cifar100"}
CLASSES = {"mnist": 10, "fashion": 10, "cifar10": 10, "cifar100": 100}
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "rmsprop": 1e-3, "adagrad": 1e-2}
# --recipe NAME: train settings (argparse dests) it sets; flags given on the command line win.
# fast99: the least wall-clock to 99 % MNIST test accuracy found on a 2-core CPU
# (benchmarks/time_to_accuracy.py, results in benchmarks/results/time_to_accuracy.md).
RECIPES: dict[str, dict] = {
    "fast99": {
        "model": "fast99",
        "optimizer": "adam",
        "lr": 0.005,
        "betas": (0.9, 0.999),
        "schedule": "onecycle",
        "max_lr": 0.005,
        "pct_start": 0.25,
        "div_factor": 25.0,
        "final_div_factor": 1e4,
        "batch_size": 64,
        "epochs": 1,
        "label_smoothing": 0.1,
    },
}


def _parser() -> argparse.ArgumentParser:
    from . import models, optim

    p = argparse.ArgumentParser(
        prog="fastconv", description="Train and evaluate small CNNs on hand-written kernels."
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            choices=sorted(models.MODELS),
            default=None,
            help="network from the model zoo (default lenet5, or the saved one)",
        )
        sp.add_argument(
            "--dataset",
            choices=sorted(DATASETS),
            default=None,
            help="mnist (digits), fashion, cifar10 or cifar100 (default mnist, or the saved "
            "one); CIFAR needs a model taking in_channels (resnet8, resnet20, inception_mini, "
            "vgg_mini) and is normalised per channel with the training set's statistics",
        )
        sp.add_argument(
            "--data-dir",
            default=None,
            help="folder with the MNIST .gz files or the CIFAR .tar.gz / extracted folder "
            "(default $FASTCONV_DATA, then the cache)",
        )
        sp.add_argument("--batch-size", type=int, default=64)
        sp.add_argument(
            "--backend",
            choices=("auto", "cpu", "cuda", "reference"),
            default="auto",
            help="kernel backend; cuda moves the model to the GPU",
        )
        sp.add_argument(
            "--threads",
            type=int,
            default=None,
            help="Numba threads (default: Numba's, i.e. all cores)",
        )
        sp.add_argument("--metrics-json", default=None, help="write results as JSON here")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    t = sub.add_parser("train", help="train a model")
    common(t)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument(
        "--recipe",
        choices=sorted(set(RECIPES) | {m for m in models.MODELS if models.defaults(m)}),
        default=None,
        help="preset of model, optimizer, schedule, batch size and epochs (fast99: "
        + ", ".join(f"{k} {v}" for k, v in RECIPES["fast99"].items())
        + "; a zoo model's name: that model with its defaults); other flags override it. "
        "Without --recipe, the settings not given are --model's defaults "
        "(fastconv.models.defaults)",
    )
    t.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="sgd")
    t.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: sgd 0.05, adam/rmsprop 1e-3, adagrad 1e-2)",
    )
    t.add_argument("--momentum", type=float, default=0.9, help="SGD/RMSprop momentum")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument(
        "--lr-decay",
        type=float,
        default=1.0,
        help="multiply the learning rate by this after every epoch",
    )
    _schedule_arguments(t)
    t.add_argument(
        "--augment",
        choices=("none", "shift", "expand", "crop-flip"),
        default="none",
        help="shift: random +-2 px per image and epoch; expand: Nielsen's expanded "
        "data (each image plus four 1-px shifts); crop-flip (CIFAR): random crop of the "
        "4-px zero-padded image + horizontal flip",
    )
    f = t.add_argument_group("fine-tuning")
    f.add_argument(
        "--init",
        default=None,
        metavar="WEIGHTS",
        help="start from these weights (.npz from fastconv or a PyTorch state dict exported "
        "to .npz; .pt/.pth read with torch.load(weights_only=True) when torch is installed); "
        "keys must match the model exactly, except the head with --num-classes",
    )
    f.add_argument(
        "--freeze",
        default=None,
        metavar="PREFIX[,PREFIX]",
        help="freeze the parameters whose names start with a prefix (e.g. 0.,3. for lenet5's "
        "convolutions; conv1.,bn1.,layer1. for resnet8)",
    )
    f.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes of the head (must be the dataset's); with --init a head of another "
        "size in the file is replaced by a fresh Linear(in, K)",
    )
    t.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling, dropout")
    t.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="use only the first N training images (quick runs)",
    )
    t.add_argument("--save", default=None, help="write the trained weights (.npz)")
    t.add_argument(
        "--checkpoint", default=None, help="checkpoint file, written atomically after every epoch"
    )
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    t.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over MPI ranks (run under mpiexec -n N; needs the 'mpi' extra): "
        "--batch-size is the global batch; rank 0 prints and writes",
    )
    t.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="K",
        help="train K members (seeds seed..seed+K-1; with --distributed one per rank group) "
        "and evaluate their averaged softmax",
    )
    t.add_argument(
        "--plot-dir",
        default=None,
        help="write training curves, first-layer filters and feature maps (PNG; "
        "needs the 'plot' extra, matplotlib)",
    )

    e = sub.add_parser("evaluate", help="evaluate saved weights on the test set")
    common(e)
    e.add_argument(
        "--load",
        required=True,
        nargs="+",
        metavar="WEIGHTS",
        help="weights written by train --save (.npz); several: each member and their "
        "ensemble (averaged softmax) are evaluated",
    )

    x = sub.add_parser("export", help="write saved weights as an ONNX file (the 'onnx' extra)")
    x.add_argument("--load", required=True, help="weights written by train --save (.npz)")
    x.add_argument(
        "--model", choices=sorted(models.MODELS), default=None, help="default: the saved one"
    )
    x.add_argument("--onnx", required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 13 to 21 (default 17)")
    x.add_argument("--input-shape", default="1,28,28", help="C,H,W of one input (default 1,28,28)")

    sub.add_parser("info", help="versions, backends, GPU, threads")

    s = sub.add_parser(
        "summary", help="layer table of a zoo model: output shapes, parameters, multiply-adds"
    )
    s.add_argument("--model", choices=sorted(models.MODELS), default="lenet5")
    s.add_argument("--in-channels", type=int, default=1, help="input channels (default 1)")
    s.add_argument("--size", type=int, default=28, help="input height and width (default 28)")
    s.add_argument("--num-classes", type=int, default=10, help="outputs (default 10)")

    b = sub.add_parser("bench", help="the comparison runner (source checkout)", add_help=False)
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


# --------------------------------------------------------------------------- schedules


SCHEDULES = ("none", "step", "multistep", "exponential", "cosine", "onecycle")
# option (argparse dest) -> the schedules it applies to
_SCHEDULE_OPTIONS = {
    "step_size": ("step",),
    "gamma": ("step", "multistep", "exponential"),
    "milestones": ("multistep",),
    "eta_min": ("cosine",),
    "max_lr": ("onecycle",),
    "pct_start": ("onecycle",),
    "div_factor": ("onecycle",),
    "final_div_factor": ("onecycle",),
    "no_cycle_momentum": ("onecycle",),
}


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas; got {text!r}"
        ) from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ints separated by commas; got {text!r}"
        ) from None


def _pair(text: str) -> tuple[float, float]:
    v = _float_list(text)
    if len(v) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2; got {text!r}")
    return v[0], v[1]


def _schedule_arguments(t: argparse.ArgumentParser) -> None:
    g = t.add_argument_group(
        "learning-rate schedule and optimizer options",
        "fc.optim.lr_scheduler's classes: epoch schedules step after every epoch, onecycle "
        "after every batch; with --warmup-epochs the schedule starts after the warm-up and "
        "counts its epochs from there (SequentialLR)",
    )
    g.add_argument("--schedule", choices=SCHEDULES, default="none", help="lr schedule")
    g.add_argument("--step-size", type=int, default=None, help="step: decay every N epochs")
    g.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="step/multistep: decay factor (default 0.1); exponential: factor per epoch",
    )
    g.add_argument(
        "--milestones", type=_int_list, default=None, help="multistep: epochs E1,E2,... to decay"
    )
    g.add_argument("--eta-min", type=float, default=None, help="cosine: final lr (default 0)")
    g.add_argument(
        "--max-lr", type=float, default=None, help="onecycle: peak lr (default: the --lr)"
    )
    g.add_argument(
        "--pct-start", type=float, default=None, help="onecycle: rising share (default 0.3)"
    )
    g.add_argument(
        "--div-factor", type=float, default=None, help="onecycle: start = max/F (default 25)"
    )
    g.add_argument(
        "--final-div-factor",
        type=float,
        default=None,
        help="onecycle: end = start/F (default 1e4)",
    )
    g.add_argument(
        "--no-cycle-momentum",
        action="store_true",
        help="onecycle: keep momentum/beta1 fixed (cycled 0.95 -> 0.85 -> 0.95 by default)",
    )
    g.add_argument(
        "--warmup-epochs",
        type=int,
        default=0,
        help="linear lr warm-up over N epochs before the schedule (LinearLR)",
    )
    g.add_argument(
        "--warmup-start-factor",
        type=float,
        default=None,
        help="warm-up starts at this fraction of the lr (default 0.1)",
    )
    g.add_argument("--betas", type=_pair, default=None, help="adam: B1,B2 (default 0.9,0.999)")
    g.add_argument("--nesterov", action="store_true", help="sgd: Nesterov momentum")
    g.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="cross-entropy label smoothing EPS in [0, 1] (default 0)",
    )


# Settings that belong together: a flag of one given on the command line sets the whole group
# aside in the recipe (--optimizer adam drops an SGD recipe's lr and momentum; --schedule or
# --lr-decay replaces its learning-rate schedule).
_OPTIMIZER_SETTINGS = ("lr", "momentum", "nesterov", "betas", "max_lr")
_SCHEDULE_SETTINGS = (
    *_SCHEDULE_OPTIONS,
    "schedule",
    "lr_decay",
    "warmup_epochs",
    "warmup_start_factor",
)


def recipe(name: str, dataset: str | None = None) -> dict:
    """The settings of ``--recipe name``: ``RECIPES[name]``, or zoo model ``name`` with its
    defaults (``fastconv.models.defaults``, with their CIFAR changes on CIFAR)."""
    from . import models

    if name in RECIPES:
        return dict(RECIPES[name])
    return {"model": name, **models.defaults(name, dataset)}


def _model_defaults(model: str, dataset: str | None) -> dict:
    """A zoo model's defaults; a model without its own uses the named recipe that trains it."""
    from . import models

    own = models.defaults(model, dataset)
    if own:
        return own
    named = [r for r in RECIPES.values() if r.get("model") == model]
    return {k: v for k, v in named[0].items() if k != "model"} if named else {}


def apply_recipe(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Fill the train settings not given in ``argv``: first from ``--recipe``'s, then from the
    model's defaults (``fastconv.models.defaults``); argparse's defaults are left for what
    neither sets. Records what was filled in ``args.defaults``."""
    p = _parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        action.default = argparse.SUPPRESS  # parse again: only what argv names is left
    given = set(vars(p.parse_args(argv)))
    named = recipe(args.recipe, args.dataset) if args.recipe else {}
    model = args.model if "model" in given else named.get("model") or args.model or "lenet5"
    settings = {**_model_defaults(model, args.dataset), **named, "model": model}
    if "optimizer" in given and args.optimizer != settings.get("optimizer"):
        for dest in _OPTIMIZER_SETTINGS:
            settings.pop(dest, None)
    if given & {"schedule", "lr_decay", "warmup_epochs"}:
        for dest in _SCHEDULE_SETTINGS:
            settings.pop(dest, None)
    if "lr" in given:  # onecycle then peaks at the given lr
        settings.pop("max_lr", None)
    filled = {}
    for dest, value in settings.items():
        if dest not in given:
            setattr(args, dest, value)
            filled[dest] = value
    args.defaults = filled
    return args


def _make_optimizer(args, params, lr: float):
    from . import optim

    kw: dict = {"weight_decay": args.weight_decay}
    if args.optimizer in ("sgd", "rmsprop"):
        kw["momentum"] = args.momentum
    if getattr(args, "nesterov", False):
        kw["nesterov"] = True
    if getattr(args, "betas", None) is not None:
        kw["betas"] = tuple(args.betas)
    return optim.OPTIMIZERS[args.optimizer](params, lr=lr, **kw)


def _make_scheduler(args, opt, steps_per_epoch: int):
    """The scheduler the flags describe, or None; onecycle lasts epochs * steps_per_epoch."""
    from .optim import lr_scheduler as ls

    def arg(name, default):
        v = getattr(args, name, None)
        return default if v is None else v

    if args.schedule == "onecycle":
        return ls.OneCycleLR(
            opt,
            max_lr=arg("max_lr", opt.lr),
            epochs=args.epochs,
            steps_per_epoch=steps_per_epoch,
            pct_start=arg("pct_start", 0.3),
            div_factor=arg("div_factor", 25.0),
            final_div_factor=arg("final_div_factor", 1e4),
            # AdaGrad has no momentum to cycle
            cycle_momentum=not args.no_cycle_momentum and args.optimizer != "adagrad",
        )
    warm = args.warmup_epochs
    if warm:
        warmup = ls.LinearLR(opt, start_factor=arg("warmup_start_factor", 0.1), total_iters=warm)
    main = None
    if args.schedule == "step":
        main = ls.StepLR(opt, step_size=args.step_size, gamma=arg("gamma", 0.1))
    elif args.schedule == "multistep":
        main = ls.MultiStepLR(opt, milestones=args.milestones, gamma=arg("gamma", 0.1))
    elif args.schedule == "exponential":
        main = ls.ExponentialLR(opt, gamma=args.gamma)
    elif args.schedule == "cosine":
        main = ls.CosineAnnealingLR(opt, T_max=args.epochs - warm, eta_min=arg("eta_min", 0.0))
    if not warm:
        return main
    if main is None:
        return warmup
    return ls.SequentialLR(opt, [warmup, main], milestones=[warm])


def _make_loss(args):
    from .losses import CrossEntropyLoss

    return CrossEntropyLoss(label_smoothing=getattr(args, "label_smoothing", 0.0))


def _check_train_options(args) -> None:
    """Combinations of the schedule and optimizer flags; then the optimizer, schedule and loss
    are built once on a stand-in parameter, so that a bad value stops the command before any
    data is loaded, with the class's own message."""

    def bad(msg: str):
        raise SystemExit(f"fastconv: {msg}")

    def flag(dest: str) -> str:
        return "--" + dest.replace("_", "-")

    sched = args.schedule
    for dest, kinds in _SCHEDULE_OPTIONS.items():
        if getattr(args, dest) not in (None, False) and sched not in kinds:
            bad(f"{flag(dest)} applies to --schedule {'/'.join(kinds)}, not {sched}")
    need = {"step": "step_size", "multistep": "milestones", "exponential": "gamma"}
    if sched in need and getattr(args, need[sched]) is None:
        bad(f"--schedule {sched} needs {flag(need[sched])}")
    if args.warmup_epochs < 0:
        bad(f"--warmup-epochs must be >= 0; got {args.warmup_epochs}")
    if args.warmup_epochs:
        if sched == "onecycle":
            bad(
                "--warmup-epochs does not combine with --schedule onecycle (its rise is the "
                "warm-up: see --pct-start)"
            )
        if args.warmup_epochs >= args.epochs:
            bad(
                f"--warmup-epochs {args.warmup_epochs} leaves no epoch of --epochs "
                f"{args.epochs} for the schedule"
            )
    elif args.warmup_start_factor is not None:
        bad("--warmup-start-factor needs --warmup-epochs N")
    if (sched != "none" or args.warmup_epochs) and args.lr_decay != 1.0:
        bad(
            "--lr-decay and --schedule/--warmup-epochs both set the learning rate; use one "
            "(--lr-decay G is --schedule exponential --gamma G)"
        )
    if args.betas is not None and args.optimizer != "adam":
        bad(f"--betas applies to --optimizer adam, not {args.optimizer}")
    if args.nesterov and args.optimizer != "sgd":
        bad(f"--nesterov applies to --optimizer sgd, not {args.optimizer}")
    if args.nesterov and args.momentum <= 0:
        bad(f"--nesterov needs --momentum > 0; got --momentum {args.momentum}")
    extras = sched != "none" or args.warmup_epochs or args.label_smoothing
    extras = extras or args.betas is not None or args.nesterov
    if extras and (getattr(args, "distributed", False) or getattr(args, "ensemble", 1) != 1):
        bad(
            "--schedule, --warmup-epochs, --betas, --nesterov and --label-smoothing are not "
            "supported with --distributed or --ensemble yet"
        )
    import numpy as np

    from .nn import Parameter

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    try:
        opt = _make_optimizer(args, [Parameter(np.zeros(1))], lr)
        _make_scheduler(args, opt, 1)
        _make_loss(args)
    except (TypeError, ValueError) as e:
        bad(str(e))


# --------------------------------------------------------------------------- helpers


def _set_threads(n: int | None) -> None:
    if n is not None:
        import numba

        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _load_data(args) -> tuple:
    from . import datasets

    if args.dataset in datasets.CIFAR:
        return datasets.load_cifar(args.dataset, args.data_dir)
    kind = DATASETS[args.dataset]
    return datasets.load_mnist(args.data_dir, kind=kind)


def _stats(args, x_train) -> tuple:
    """(mean, std) of the inputs: MNIST's published numbers, or CIFAR's per channel computed
    from the training images in use."""
    from . import datasets, training

    if args.dataset in datasets.CIFAR:
        return datasets.channel_stats(x_train)
    return training.STATS[DATASETS[args.dataset]]


def _shape_meta(args, x_train) -> dict:
    """What the model must take and give for this data (saved with the weights)."""
    n = CLASSES[args.dataset]
    k = getattr(args, "num_classes", None)
    if k is not None and k != n:
        raise SystemExit(f"fastconv: --num-classes {k}: {args.dataset} has {n} classes")
    return {"in_channels": int(x_train.shape[1]), "num_classes": n, "size": int(x_train.shape[2])}


def _model_for(args, shape: dict, seed: int, *, pretrained: bool = True, log=print):
    """The zoo model ``args.model`` for inputs and classes ``shape`` (``_shape_meta``), then,
    when ``pretrained``, --init's weights (the head left fresh where --num-classes makes it
    another size than the file's) and --freeze."""
    from . import features, models

    cin, k, size = shape.get("in_channels", 1), shape.get("num_classes", 10), shape.get("size", 28)
    if args.model in models.CONFIGURABLE:
        model = models.get(args.model, rng=seed, in_channels=cin, num_classes=k)
    elif (cin, size) != (1, 28):
        raise SystemExit(
            f"fastconv: {args.model} takes 1-channel 28x28 images; {args.dataset} has {cin} "
            f"channels of {size}x{size}: use one of {', '.join(models.CONFIGURABLE)}"
        )
    else:
        model = models.get(args.model, rng=seed)
        if k != 10:
            features.replace_head(model, k, rng=seed)
    if not pretrained:
        return model
    say = log or (lambda s: None)
    init = getattr(args, "init", None)
    if init:
        try:
            skipped = features.load_init(
                model, init, skip_head=getattr(args, "num_classes", None) is not None
            )
        except features.WeightsError as e:
            raise SystemExit(f"fastconv: --init {e}") from None
        if skipped:
            say(
                f"--init {init}: all weights loaded except the head ({', '.join(skipped)}: "
                f"another size in the file), which starts fresh for {k} classes"
            )
        else:
            say(f"--init {init}: all weights loaded (strict)")
    if getattr(args, "freeze", None):
        try:
            frozen = features.freeze(model, args.freeze.split(","))
        except ValueError as e:
            why = str(e).removeprefix("freeze: ")
            raise SystemExit(f"fastconv: --freeze {args.freeze}: {why}") from None
        n = sum(int(p.data.size) for p in model.parameters() if not p.requires_grad)
        say(f"--freeze: {len(frozen)} parameters frozen ({n} values): {', '.join(frozen)}")
    return model


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def _check_backend(args) -> None:
    from . import dispatch

    if args.backend == "cuda":
        ok, why = dispatch.cuda_status()
        if not ok:
            raise SystemExit(f"fastconv: --backend cuda is not available: {why}")


def _backend_context(args):
    from . import dispatch

    return dispatch.using(backend=args.backend)


# --------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from . import training

    _check_train_options(args)
    if getattr(args, "distributed", False) or getattr(args, "ensemble", 1) != 1:
        from .distributed import train_command

        return train_command(args)
    args.model = args.model or "lenet5"
    args.dataset = args.dataset or "mnist"
    if args.resume and not args.checkpoint:
        raise SystemExit("fastconv: --resume needs --checkpoint FILE")
    _check_backend(args)
    if args.plot_dir and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("fastconv: --plot-dir needs matplotlib: pip install 'fastconv[plot]'")
    _set_threads(args.threads)
    x_train, y_train, x_test, y_test = _load_data(args)
    if args.train_limit:
        x_train, y_train = x_train[: args.train_limit], y_train[: args.train_limit]
    mean, std = _stats(args, x_train)
    shape = _shape_meta(args, x_train)
    model = _model_for(args, shape, args.seed, log=lambda s: print(s, flush=True))
    if args.backend == "cuda":
        model.to("cuda")
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    opt = _make_optimizer(args, model.parameters(), lr)
    filled = getattr(args, "defaults", None)
    if filled:
        src = f"--recipe {args.recipe}" if args.recipe else f"{args.model}'s defaults"
        said = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in filled.items() if k != "model")
        print(f"not given, from {src}: {said}", flush=True)
    print(
        f"fastconv train: {args.model} on {args.dataset} ({len(x_train)} images), "
        f"{args.optimizer} lr={lr}, batch {args.batch_size}, {args.epochs} epochs, "
        f"augment={args.augment}, seed {args.seed}, backend {args.backend}",
        flush=True,
    )
    augment = None if args.augment == "none" else args.augment
    steps = training.steps_per_epoch(len(x_train), args.batch_size, augment)
    sched = _make_scheduler(args, opt, steps)
    if sched is not None:
        every = "batch" if args.schedule == "onecycle" else "epoch"
        print(f"lr schedule: {sched!r}, stepped after every {every}", flush=True)
    t0 = time.perf_counter()
    with _backend_context(args):
        hist = training.fit(
            model,
            opt,
            (x_train, y_train),
            (x_test, y_test),
            epochs=args.epochs,
            batch_size=args.batch_size,
            rng=args.seed,
            augment=None if args.augment == "none" else args.augment,
            mean=mean,
            std=std,
            lr_decay=args.lr_decay,
            scheduler=sched,
            loss_fn=_make_loss(args),
            checkpoint=args.checkpoint,
            resume=args.resume,
            progress=not args.no_progress,
            log=lambda s: print(s, flush=True),
        )
    total = time.perf_counter() - t0
    meta = {"model": args.model, "dataset": args.dataset, "mean": mean, "std": std, **shape}
    if args.save:
        training.save_model(args.save, model, meta)
        print(f"saved weights to {args.save}")
    secs = [round(s, 3) for s in hist["seconds"]]
    metrics = {
        "command": "train",
        **meta,
        "test_accuracy": hist["test_accuracy"][-1],
        "test_loss": hist["test_loss"][-1],
        "best_test_accuracy": max(hist["test_accuracy"]),
        "epochs": len(hist["seconds"]),
        "seconds_per_epoch": secs,
        "images_per_second": float(np.mean(hist["images_per_second"])),
        "total_seconds": round(total, 3),
        "history": hist,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "environment": _environment(),
    }
    _write_json(args.metrics_json, metrics)
    if args.plot_dir:
        from . import plots

        written = plots.save_all(args.plot_dir, model, hist, x_test[:1], mean, std)
        print("plots: " + ", ".join(str(w) for w in written))
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs "
        f"({np.mean(secs):.1f} s/epoch)"
    )
    return 0


def cmd_evaluate(args) -> int:
    """One weights file: its test accuracy and loss. Several: each member's, then their
    ensemble's (``fc.Ensemble``: averaged softmax, scored by NLL and accuracy)."""
    from . import features, training

    _check_backend(args)
    _set_threads(args.threads)
    metas = []
    for path in args.load:
        if not os.path.isfile(path):
            raise SystemExit(f"fastconv: --load {path}: no such file")
        try:
            metas.append(training._read_npz(path, "weights")[0])
        except training.WeightsError as e:
            raise SystemExit(f"fastconv: --load {e}") from None
    first = metas[0]
    args.dataset = args.dataset or first.get("dataset") or "mnist"
    for path, meta in zip(args.load, metas):
        if meta.get("dataset", args.dataset) != args.dataset:
            raise SystemExit(
                f"fastconv: --load {path} was trained on {meta['dataset']}, not {args.dataset}"
            )
    x_train, _, x_test, y_test = _load_data(args)
    stats = [(m["mean"], m["std"]) for m in metas if "mean" in m and "std" in m]
    mean, std = stats[0] if stats else _stats(args, x_train)
    if any(s != (mean, std) for s in stats):
        raise SystemExit("fastconv: the --load files normalise their inputs differently")
    name = args.model
    nets, names, results = [], [], []
    for path, meta in zip(args.load, metas):
        args.model = name or meta.get("model") or "lenet5"
        shape = {k: meta[k] for k in ("in_channels", "num_classes", "size") if k in meta}
        model = _model_for(args, shape or _shape_meta(args, x_train), 0, pretrained=False)
        try:
            model, _ = training.load_model(path, model)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"fastconv: --load {path}: {e}") from None
        if args.backend == "cuda":
            model.to("cuda")
        nets.append(model)
        names.append(args.model)
    members = [(path, model_name, net) for path, model_name, net in zip(args.load, names, nets)]
    if len(nets) > 1:
        members.append((f"ensemble of {len(nets)}", "ensemble", features.Ensemble(nets)))
    for label, model_name, net in members:
        t0 = time.perf_counter()
        with _backend_context(args):
            loss, acc = training.evaluate(
                net, x_test, y_test, batch_size=max(args.batch_size, 1), mean=mean, std=std
            )
        secs = time.perf_counter() - t0
        what = f"{model_name} on {args.dataset} test set" if len(nets) == 1 else label
        avg = " (averaged softmax; loss = NLL of it)" if model_name == "ensemble" else ""
        print(f"{what}: accuracy {acc:.4f}, loss {loss:.4f}{avg} ({len(x_test) / secs:.0f} img/s)")
        results.append(
            {"weights": label, "model": model_name, "test_accuracy": acc, "test_loss": loss,
             "images_per_second": len(x_test) / secs}
        )  # fmt: skip
    out = {"command": "evaluate", "dataset": args.dataset, **results[-1]}
    if len(nets) > 1:
        out["members"] = results[:-1]
    out["environment"] = _environment()
    _write_json(args.metrics_json, out)
    return 0


def cmd_summary(args) -> int:
    from . import models
    from .summary import summary

    kw = {}
    if args.model in models.CONFIGURABLE:
        kw = {"in_channels": args.in_channels, "num_classes": args.num_classes}
    elif (args.in_channels, args.num_classes) != (1, 10):
        raise SystemExit(
            f"fastconv summary: {args.model} takes 1-channel images and has 10 outputs; "
            f"--in-channels and --num-classes apply to {', '.join(models.CONFIGURABLE)}"
        )
    try:
        model = models.get(args.model, rng=0, **kw)
        print(summary(model, (args.in_channels, args.size, args.size)))
    except (TypeError, ValueError) as e:  # bad sizes: the layer's own message
        raise SystemExit(f"fastconv summary: {args.model} on {args.size} px inputs: {e}") from e
    return 0


def _environment() -> dict:
    import numba

    from . import __version__, dispatch

    ok, why = dispatch.cuda_status()
    return {
        "fastconv": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "cuda": "available" if ok else f"not available: {why}",
    }


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return f"not initialised (configured: {numba.config.THREADING_LAYER})"


def cmd_info(args) -> int:
    env = _environment()
    try:
        from threadpoolctl import threadpool_info

        blas = [
            f"{i.get('internal_api')} {i.get('version')} ({i.get('num_threads')} threads)"
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ]
    except Exception:  # threadpoolctl is optional
        blas = []
    bench = _benchmarks_root() is not None
    lines = [
        f"fastconv {env['fastconv']} (python {env['python']}, numpy {env['numpy']}, "
        f"numba {env['numba']})",
        f"machine: {env['machine']}, {env['cpu_count']} CPUs",
        f"threads: numba {env['numba_threads']} (layer: {env['numba_threading_layer']})"
        + (f"; BLAS {', '.join(blas)}" if blas else ""),
        "backends: reference, cpu" + (", cuda" if env["cuda"] == "available" else ""),
        f"GPU: {'found' if env['cuda'] == 'available' else 'none'} ({env['cuda']})",
        f"FASTCONV_BACKEND={os.environ.get('FASTCONV_BACKEND', '') or '(unset)'}, "
        f"FASTCONV_DATA={os.environ.get('FASTCONV_DATA', '') or '(unset)'}",
        f"bench: {'available' if bench else 'not installed (source checkout only)'}",
    ]
    print("\n".join(lines))
    return 0


def _benchmarks_root() -> Path | None:
    """The source checkout holding ``benchmarks/compare.py`` (the comparison runner is not part
    of the library): the parent of this package's folder, as in an editable install; None for
    an install without the checkout."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "benchmarks" / "compare.py").is_file() else None


def cmd_bench(args) -> int:
    root = _benchmarks_root()
    if root is None:
        print(
            "fastconv bench: not available in this install: the benchmarks ship with the source "
            "checkout, not with the package; from a checkout: pip install -e . && fastconv bench "
            "(or python -m benchmarks.compare)",
            file=sys.stderr,
        )
        return 2
    if sys.path[:1] != [str(root)]:  # first, before any other folder named benchmarks
        sys.path.insert(0, str(root))
    compare = importlib.import_module("benchmarks.compare")
    return int(compare.main(list(args.args)) or 0)


def cmd_export(args) -> int:
    from . import models, training

    if importlib.util.find_spec("onnx") is None:
        raise SystemExit("fastconv export: needs the onnx package: pip install 'fastconv[onnx]'")
    from . import onnx as fonnx

    if not os.path.isfile(args.load):
        raise SystemExit(f"fastconv: --load {args.load}: no such file")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise SystemExit(f"fastconv: --input-shape must be C,H,W; got {args.input_shape!r}")
    try:
        meta = training._read_npz(args.load, "weights")[0]
    except training.WeightsError as e:
        raise SystemExit(f"fastconv: --load {e}") from None
    name = args.model or meta.get("model") or "lenet5"
    kw = {"in_channels": shape[0]} if shape[0] != 1 else {}
    model, _ = training.load_model(args.load, models.get(name, rng=0, **kw))
    example = np.zeros((2, *shape), np.dtype(model.parameters()[0].dtype))
    fonnx.export(model, example, args.onnx, opset=args.opset)
    print(f"wrote {args.onnx}: {name}, opset {args.opset}, input (N, {', '.join(map(str, shape))})")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "info": cmd_info,
    "summary": cmd_summary,
    "bench": cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastconv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the benchmark runner
        return cmd_bench(argparse.Namespace(args=argv[1:]))
    args = _parser().parse_args(argv)
    if args.command == "train":
        apply_recipe(args, argv)
    from ._jit_notice import arm
    from .datasets import DatasetError
    from .training import NonFiniteLossError, WeightsError

    arm()  # says so on stderr if compiling kernels holds up the first steps
    try:
        return COMMANDS[args.command](args)
    except (DatasetError, WeightsError, NonFiniteLossError) as e:
        print(f"fastconv: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
