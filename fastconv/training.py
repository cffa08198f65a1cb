"""Training and evaluation loops, data augmentation, checkpoints.

    model = fc.models.lenet5(rng=0)
    opt = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hist = fc.training.fit(model, opt, (x_train, y_train), (x_test, y_test), epochs=10, rng=0)

Images come in as uint8 (N, 1, 28, 28) and are scaled per batch (``normalize``), so the whole
training set never exists in float. Runs are reproducible: the same seeds give bit-identical
weights on the CPU (shuffling and augmentation draw from ``rng``; Dropout layers from their own
generators; every kernel reduces in a fixed order). Checkpoints hold the model, the optimizer
state, the epoch, the history and every generator's state, and are written atomically
(temporary file + ``os.replace``), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _device, _jit_notice
from . import init as _init
from .losses import CrossEntropyLoss
from .nn import Module as Layer
from .optim import Optimizer
from .tensor import no_grad

# Per-pixel mean and standard deviation of the training images (after /255).
STATS = {"digits": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}

AUGMENTATIONS = (None, "none", "shift", "expand", "crop-flip")


class WeightsError(ValueError):
    """A weights or checkpoint file cannot be read or does not fit the model; the message
    names the file."""


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss (or weights) and stopped; the message names the epoch,
    the step and the learning rate. The last checkpoint written is the last good one."""


# --------------------------------------------------------------------------- data


def normalize(
    x: np.ndarray,
    mean: float | Sequence[float] = STATS["digits"][0],
    std: float | Sequence[float] = STATS["digits"][1],
    dtype: Any = np.float32,
) -> np.ndarray:
    """uint8 images -> (x / 255 - mean) / std in ``dtype``; ``mean`` and ``std`` are numbers or
    one per channel (axis 1, e.g. ``datasets.channel_stats`` of the training set).

    Shape: any -> same; per channel: x (N, C, H, W) with C = len(mean).
    """
    dt = np.dtype(dtype)
    if np.ndim(mean) or np.ndim(std):
        m, sd = np.asarray(mean, np.float64).ravel(), np.asarray(std, np.float64).ravel()
        if x.ndim != 4 or not (len(m) == len(sd) == x.shape[1]):
            raise ValueError(
                f"normalize: {len(m)} channel means and {len(sd)} stds for images of shape "
                f"{x.shape}; expected (N, {len(m)} channels, H, W)"
            )
        out = x.astype(dt)
        out *= (1.0 / (255.0 * sd)).astype(dt).reshape(-1, 1, 1)
        out -= (m / sd).astype(dt).reshape(-1, 1, 1)
        return out
    out = x.astype(dt)
    out *= dt.type(1.0 / (255.0 * std))
    out -= dt.type(mean / std)
    return out


def random_shift(x: np.ndarray, rng: _init.RngLike = None, max_shift: int = 2) -> np.ndarray:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], zero-filled.

    Shape: x (N, C, H, W) -> (N, C, H, W), same dtype.
    """
    rng = _init.get_rng(rng)
    n, c, h, w = x.shape
    s = int(max_shift)
    if s == 0:
        return x.copy()
    padded = np.zeros((n, c, h + 2 * s, w + 2 * s), x.dtype)
    padded[:, :, s : s + h, s : s + w] = x
    dy = rng.integers(-s, s + 1, n)
    dx = rng.integers(-s, s + 1, n)
    # image i reads padded rows s - dy[i] + (0..h-1): the content moves down by dy.
    rows = (s - dy)[:, None] + np.arange(h)[None, :]  # (N, H)
    cols = (s - dx)[:, None] + np.arange(w)[None, :]  # (N, W)
    idx_n = np.arange(n)[:, None, None]
    out = padded.transpose(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def random_crop_flip(x: np.ndarray, rng: _init.RngLike = None, padding: int = 4) -> np.ndarray:
    """The CIFAR augmentation: each image zero-padded by ``padding`` px on every side, cropped
    back to its size at a random offset, and flipped left-right with probability 1/2.

    Shape: x (N, C, H, W) -> (N, C, H, W), same dtype.
    """
    rng = _init.get_rng(rng)
    n, c, h, w = x.shape
    p = int(padding)
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p), x.dtype)
    padded[:, :, p : p + h, p : p + w] = x
    dy = rng.integers(0, 2 * p + 1, n)
    dx = rng.integers(0, 2 * p + 1, n)
    flip = rng.random(n) < 0.5
    rows = dy[:, None] + np.arange(h)[None, :]  # (N, H)
    cols = dx[:, None] + np.arange(w)[None, :]  # (N, W)
    cols = np.where(flip[:, None], cols[:, ::-1], cols)  # a flip reads the columns backwards
    idx_n = np.arange(n)[:, None, None]
    out = padded.transpose(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def expand_shifted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nielsen's "expanded" training set: each image plus its four one-pixel shifts
    (up, down, left, right; zero-filled). Shape: x (N, C, H, W), y (N,) -> (5N, ...), (5N,)."""
    out = [x]
    for axis, d in ((2, -1), (2, 1), (3, -1), (3, 1)):
        s = np.roll(x, d, axis=axis)
        edge = [slice(None)] * 4
        edge[axis] = 0 if d == 1 else -1  # the row/column that wrapped around
        s[tuple(edge)] = 0
        out.append(s)
    return np.concatenate(out), np.tile(y, 5)


# --------------------------------------------------------------------------- evaluation


def _place(model: Layer, a: np.ndarray) -> Any:
    return _device.to_device(a) if model.device == "cuda" else a


def evaluate(
    model: Layer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 1000,
    mean: float = STATS["digits"][0],
    std: float = STATS["digits"][1],
    loss_fn: Any = None,
) -> tuple[float, float]:
    """(mean loss, accuracy in [0, 1]) of ``model`` in evaluation mode on uint8 images.

    The model's train/eval mode is restored afterwards. A model whose ``outputs`` attribute is
    "probabilities" (``fc.Ensemble``) is scored by the NLL of the log of its outputs, not by
    ``loss_fn`` (which expects logits).

    Shape: x (N, 1, H, W) uint8 (or float, used as is), y (N,) ints.
    """
    probs = getattr(model, "outputs", "logits") == "probabilities"
    loss_fn = loss_fn or CrossEntropyLoss()
    modes = [(m, m.training) for m in model.modules()]  # each one's (an ensemble's members)
    model.eval()
    dtype = _model_dtype(model)
    total_loss, correct = 0.0, 0
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            xb = normalize(xb, mean, std, dtype) if xb.dtype == np.uint8 else xb.astype(dtype)
            yb = np.ascontiguousarray(y[i : i + batch_size], dtype=np.int64)
            with no_grad():
                logits = model(_place(model, xb))
                if probs:  # NLL of the probabilities (float64; a zero gives log 1e-300)
                    p = np.asarray(logits.numpy(), np.float64)[np.arange(len(yb)), yb]
                    total_loss -= float(np.log(np.maximum(p, 1e-300)).sum())
                else:
                    total_loss += float(loss_fn(logits, yb)) * len(yb)
            correct += int((logits.numpy().argmax(axis=1) == yb).sum())
    finally:
        for m, mode in modes:
            m.__dict__["training"] = mode
    return total_loss / len(x), correct / len(x)


def _model_dtype(model: Layer) -> np.dtype:
    for p in model.parameters():
        return p.dtype
    return np.dtype(np.float32)


# --------------------------------------------------------------------------- checkpoints


def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """np.savez to a temporary file in the same folder, then os.replace: a crash mid-write
    never leaves a truncated file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# What a truncated, corrupt or foreign .npz raises from np.load or from reading an entry.
_NPZ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def _read_npz(path: str | os.PathLike, what: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of a ``.npz`` written by ``_atomic_savez``, every entry read now, so that
    a truncated or corrupt file fails here with a ``WeightsError`` naming it."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such {what} file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except _NPZ_ERRORS as e:
        raise WeightsError(
            f"{path}: cannot be read as a {what} file ({type(e).__name__}: {e}); it is "
            "truncated, corrupt or not a .npz"
        ) from None
    meta_text = arrays.pop("__meta__", None)
    try:
        meta = json.loads(str(meta_text)) if meta_text is not None else {}
        if not isinstance(meta, dict):
            raise ValueError(f"holds a {type(meta).__name__}, not an object")
    except ValueError as e:
        raise WeightsError(f"{path}: its __meta__ entry is not valid JSON ({e})") from None
    return meta, arrays


def _first_nonfinite(model: Layer) -> str | None:
    """The name of the first parameter or buffer holding a NaN or an infinity, or None."""
    for k, v in model.state_dict().items():
        a = np.asarray(v)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return k
    return None


def save_model(path: str | os.PathLike, model: Layer, meta: dict | None = None) -> None:
    """Model weights (PyTorch state_dict keys) plus a JSON ``__meta__`` entry, atomically."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    arrays["__meta__"] = np.array(json.dumps(meta or {}))
    _atomic_savez(path, arrays)


def load_model(path: str | os.PathLike, model: Layer | None = None) -> tuple[Layer, dict]:
    """Load weights saved by ``save_model`` or ``save_checkpoint`` into ``model`` (built from
    the saved model name when None). Returns (model, meta). A missing, truncated or corrupt
    file raises ``WeightsError`` naming it."""
    meta, arrays = _read_npz(path, "weights")
    state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
    if not state:
        raise WeightsError(f"{path}: holds no model weights (no model/ entries)")
    if model is None:
        from . import models

        if "model" not in meta:
            raise ValueError(f"{path}: no model name saved; build the model and pass it in")
        model = models.get(meta["model"])
    model.load_state_dict(state)
    return model, meta


def save_checkpoint(
    path: str | os.PathLike,
    model: Layer,
    optimizer: Optimizer,
    epoch: int,
    rng: np.random.Generator,
    history: dict | None = None,
    meta: dict | None = None,
    scheduler: Any = None,
) -> None:
    """Everything a resumed run needs, written atomically: model, optimizer state, completed
    epochs, the loop's generator and the model's own generators (Dropout), the history, and
    the learning-rate scheduler's state when one is given. Weights holding a NaN or an
    infinity are refused (``NonFiniteLossError``) and ``path`` is left as it was."""
    bad = _first_nonfinite(model)
    if bad is not None:
        raise NonFiniteLossError(
            f"save_checkpoint: {bad} holds non-finite values; {path} not overwritten"
        )
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for i, s in opt["state"].items():
        for k, v in s.items():
            if isinstance(v, np.ndarray):
                arrays[f"optim/{i}/{k}"] = v
            else:
                scalars.setdefault(str(i), {})[k] = v
    info = dict(meta or {})
    info.update(
        epoch=int(epoch),
        rng=rng.bit_generator.state,
        layer_rngs={k: g.bit_generator.state for k, g in model.named_generators()},
        optim_type=type(optimizer).__name__,
        optim_hyper=opt["hyper"],
        optim_scalars=scalars,
        history=history or {},
    )
    if scheduler is not None:
        info["scheduler"] = {"type": type(scheduler).__name__, "state": scheduler.state_dict()}
    arrays["__meta__"] = np.array(json.dumps(info))
    _atomic_savez(path, arrays)


def load_checkpoint(
    path: str | os.PathLike,
    model: Layer,
    optimizer: Optimizer,
    rng: np.random.Generator,
    scheduler: Any = None,
) -> dict:
    """Restore a ``save_checkpoint`` file into model, optimizer, generators and, when given, the
    learning-rate scheduler (which must be of the saved type); returns meta. A missing,
    truncated or corrupt file raises ``WeightsError`` naming it."""
    meta, arrays = _read_npz(path, "checkpoint")
    keys = ("epoch", "rng", "layer_rngs", "optim_hyper", "optim_scalars")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise WeightsError(
            f"{path}: not a training checkpoint (no {', '.join(missing)} in its __meta__; "
            "weights alone load with load_model or --init)"
        )
    model_state = {k[len("model/") :]: v for k, v in arrays.items() if k.startswith("model/")}
    opt_state: dict[int, dict[str, Any]] = {}
    try:
        for k, v in arrays.items():
            if k.startswith("optim/"):
                _, i, name = k.split("/", 2)
                opt_state.setdefault(int(i), {})[name] = v
    except ValueError:
        raise WeightsError(f"{path}: bad optimizer entry {k!r}") from None
    if meta.get("optim_type") != type(optimizer).__name__:
        raise ValueError(
            f"{path}: checkpoint holds a {meta.get('optim_type')} optimizer state, "
            f"not {type(optimizer).__name__}"
        )
    saved_sched = meta.get("scheduler")
    if scheduler is not None and (saved_sched or {}).get("type") != type(scheduler).__name__:
        held = f"a {saved_sched['type']}" if saved_sched else "no"
        raise ValueError(
            f"{path}: checkpoint holds {held} learning-rate scheduler state, "
            f"not {type(scheduler).__name__}"
        )
    for i, s in meta["optim_scalars"].items():
        opt_state.setdefault(int(i), {}).update(s)
    model.load_state_dict(model_state)
    hyper = meta["optim_hyper"]
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    optimizer.load_state_dict({"state": opt_state, "hyper": hyper})
    rng.bit_generator.state = meta["rng"]
    gens = dict(model.named_generators())
    for k, st in meta["layer_rngs"].items():
        if k in gens:
            gens[k].bit_generator.state = st
    if scheduler is not None:
        scheduler.load_state_dict(saved_sched["state"])
    return meta


# --------------------------------------------------------------------------- the loop


def _check_scheduler(optimizer: Optimizer, scheduler: Any, interval: str, lr_decay: float) -> bool:
    """fit's scheduler arguments; returns True when the scheduler steps once per batch."""
    from .lr_scheduler import LRScheduler, per_batch

    if interval not in ("auto", "epoch", "step"):
        raise ValueError(
            f"fit: scheduler_interval must be 'auto', 'epoch' or 'step'; got {interval!r}"
        )
    if scheduler is None:
        return False
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(
            "fit: scheduler must be a fc.optim.lr_scheduler scheduler; "
            f"got {type(scheduler).__name__}"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError(f"fit: the {type(scheduler).__name__} drives another optimizer")
    if lr_decay != 1.0:
        raise ValueError(
            f"fit: lr_decay={lr_decay} and a scheduler both set the learning rate; "
            "use one (lr_decay is ExponentialLR(optimizer, gamma=lr_decay))"
        )
    return per_batch(scheduler) if interval == "auto" else interval == "step"


def steps_per_epoch(
    n: int, batch_size: int, augment: str | None = None, max_steps: int | None = None
) -> int:
    """Batches in one of fit's epochs over ``n`` images (what a per-batch schedule such as
    OneCycleLR needs: ``total_steps = epochs * steps_per_epoch(...)``)."""
    n = 5 * n if augment == "expand" else n
    steps = -(-n // batch_size)
    return steps if max_steps is None else min(steps, int(max_steps))


def _check_cycle_length(scheduler: Any, steps: int) -> None:
    """A OneCycleLR must last the run: say so before training rather than after hours."""
    from .lr_scheduler import OneCycleLR

    if isinstance(scheduler, OneCycleLR):
        left = scheduler.total_steps - scheduler.last_epoch
        if steps > left:
            raise ValueError(
                f"fit: the run takes {steps} more steps but the OneCycleLR has {left} left "
                f"(total_steps={scheduler.total_steps}); build it with "
                "total_steps = epochs * training.steps_per_epoch(...)"
            )


def fit(
    model: Layer,
    optimizer: Optimizer,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    rng: _init.RngLike = None,
    augment: str | None = None,
    mean: float = STATS["digits"][0],
    std: float = STATS["digits"][1],
    lr_decay: float = 1.0,
    scheduler: Any = None,
    scheduler_interval: str = "auto",
    loss_fn: Any = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    log: Callable[[str], None] | None = print,
    distributed: Any = None,
) -> dict[str, list]:
    """Train ``model`` with mini-batch ``optimizer`` steps; evaluate on ``test`` after each epoch.

    Args:
        train, test: (uint8 images (N, 1, 28, 28), int labels (N,)).
        epochs: total epochs (a resumed run continues up to this number).
        rng: seed or Generator for shuffling and augmentation.
        augment: None | "shift" (random +-2 px per image per epoch) | "expand" (Nielsen's
            expanded data: each image plus its four 1-px shifts, 5x the epoch) | "crop-flip"
            (CIFAR: random crop of the 4-px zero-padded image + horizontal flip).
        mean, std: input normalisation (``STATS``), numbers or one per channel.
        lr_decay: learning rate multiplied by this after every epoch (without a scheduler).
        scheduler: a ``fc.optim.lr_scheduler`` scheduler on ``optimizer``, stepped after the
            optimizer as in PyTorch; saved in and restored from checkpoints.
        scheduler_interval: "epoch" (step it after every epoch), "step" (after every batch)
            or "auto": "step" for a OneCycleLR (or a chain/sequence holding one), else "epoch".
        checkpoint: file written atomically after every epoch; with ``resume`` and an existing
            file, training continues from it (model, optimizer, epoch, generators, history).
        max_steps: stop each epoch after this many batches (smoke tests).
        on_epoch_end: called with (epoch, history) after each epoch.
        distributed: a ``fastconv.distributed.DataParallel``: ``batch_size`` is the global
            batch, each rank trains on its slice, gradients are summed over the ranks, the
            metrics and the evaluation are reduced; rank 0 alone logs and writes the checkpoint.

    Returns:
        History: lists per epoch of train_loss, train_accuracy, test_loss, test_accuracy,
        seconds (training time of the epoch), images_per_second and lr (the learning rate at
        the epoch's first step).
    """
    from tqdm.auto import tqdm

    if augment not in AUGMENTATIONS:
        raise ValueError(f"fit: augment must be one of {AUGMENTATIONS}; got {augment!r}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"fit: epochs must be a positive int; got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"fit: batch_size must be a positive int; got {batch_size!r}")
    x_train, y_train = train
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"fit: {len(x_train)} training images for {len(y_train)} labels")
    per_batch = _check_scheduler(optimizer, scheduler, scheduler_interval, lr_decay)
    gen = _init.spawn(rng) if not isinstance(rng, np.random.Generator) else rng
    loss_fn = loss_fn or CrossEntropyLoss()
    dtype = _model_dtype(model)
    keys = (
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
        "seconds",
        "images_per_second",
    )
    history: dict[str, list] = {k: [] for k in keys}
    base_lr, start = optimizer.lr, 0
    dp = distributed
    if dp is not None and not dp.is_root:
        progress, log = False, None
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        meta = load_checkpoint(checkpoint, model, optimizer, gen, scheduler)
        start, history = int(meta["epoch"]), meta["history"] or history
        base_lr = meta.get("base_lr", base_lr)
        if log:
            log(f"resumed from {checkpoint} after epoch {start}")
    if dp is not None:  # rank 0's generators (and, after a resume, its state) everywhere
        dp.start(gen, resumed=start > 0)
    if augment == "expand":
        x_train, y_train = expand_shifted(x_train, y_train)
    n = len(x_train)
    steps = -(-n // batch_size)
    if max_steps is not None:
        steps = min(steps, int(max_steps))
    if per_batch:
        _check_cycle_length(scheduler, (epochs - start) * steps)
    history.setdefault("lr", [])
    model.train()
    _jit_notice.arm()  # says so on stderr if compiling kernels holds up the first steps
    for epoch in range(start, epochs):
        if scheduler is None:
            optimizer.lr = base_lr * lr_decay**epoch
        history["lr"].append(optimizer.lr)
        order = gen.permutation(n)
        seen, correct, loss_sum = 0, 0, 0.0
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="batch",
            disable=not progress,
            leave=True,
            dynamic_ncols=True,
        )
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            xb = x_train[idx]
            if augment == "shift":
                xb = random_shift(xb, gen, 2)  # the global batch: the same draws on every rank
            elif augment == "crop-flip":
                xb = random_crop_flip(xb, gen, 4)
            n_global = len(idx)
            if dp is not None:  # this rank's slice of the global batch
                part = dp.shard(n_global)
                idx, xb = idx[part], xb[part]
            optimizer.zero_grad()
            if len(idx):  # a short last batch may leave a rank with nothing
                xb = normalize(xb, mean, std, dtype)
                yb = np.ascontiguousarray(y_train[idx], dtype=np.int64)
                logits = model(_place(model, xb))
                loss = loss_fn(logits, yb)
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    bar.close()
                    raise NonFiniteLossError(
                        f"fit: the training loss is {loss_value} at epoch {epoch + 1}, step "
                        f"{step + 1} of {steps} (learning rate {optimizer.lr:.6g}); stopped "
                        "before the update"
                        + (f"; {checkpoint} holds the last good epoch" if checkpoint else "")
                    )
                loss.backward()
            if dp is not None:  # one Allreduce: the gradient of the global batch's mean loss
                dp.sync_gradients(len(idx), n_global)
            optimizer.step()
            if per_batch:
                scheduler.step()
            if len(idx):
                seen += len(idx)
                loss_sum += loss_value * len(idx)
                correct += int((logits.numpy().argmax(axis=1) == yb).sum())
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    loss=f"{loss_sum / max(seen, 1):.4f}",
                    acc=f"{correct / max(seen, 1):.4f}",
                    img_s=f"{rate:.0f}",
                    refresh=False,
                )
        seconds = time.perf_counter() - t0
        bar.close()
        if dp is not None:  # global sums; BatchNorm running statistics averaged over ranks
            seen, loss_sum, correct = dp.end_epoch(seen, loss_sum, correct)
        history["train_loss"].append(loss_sum / seen)
        history["train_accuracy"].append(correct / seen)
        history["seconds"].append(seconds)
        history["images_per_second"].append(seen / seconds)
        if test is not None:
            ev = evaluate if dp is None else dp.evaluate  # sharded and reduced
            tl, ta = ev(model, test[0], test[1], mean=mean, std=std)
        else:
            tl, ta = float("nan"), float("nan")
        history["test_loss"].append(tl)
        history["test_accuracy"].append(ta)
        if log:
            log(
                f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / seen:.4f} "
                f"acc {correct / seen:.4f} | test loss {tl:.4f} acc {ta:.4f} | "
                f"{seconds:.1f} s, {seen / seconds:.0f} img/s"
            )
        if scheduler is not None and not per_batch:
            scheduler.step()
        bad = _first_nonfinite(model)
        if bad is not None:  # the loss was finite, the last update was not
            kept = f"; {checkpoint} not overwritten: it holds the last good epoch"
            raise NonFiniteLossError(
                f"fit: {bad} holds non-finite values after epoch {epoch + 1}, step {steps} "
                f"(learning rate {history['lr'][-1]:.6g})" + (kept if checkpoint else "")
            )
        if checkpoint is not None and (dp is None or dp.is_root):
            save_checkpoint(
                checkpoint,
                model,
                optimizer,
                epoch + 1,
                gen,
                history,
                meta={"base_lr": base_lr},
                scheduler=scheduler,
            )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history)
    return history


__all__ = [
    "STATS",
    "NonFiniteLossError",
    "WeightsError",
    "evaluate",
    "expand_shifted",
    "fit",
    "load_checkpoint",
    "load_model",
    "normalize",
    "random_crop_flip",
    "random_shift",
    "save_checkpoint",
    "save_model",
    "steps_per_epoch",
]
