"""Reusing trained networks: ensembles, feature extraction and fine-tuning.

ens = fc.Ensemble([m1, m2, m3])          # averaged softmax: outputs PROBABILITIES
loss, acc = fc.training.evaluate(ens, x_test, y_test)
f = fc.extract_features(model, x, "7")   # (N, 120): LeNet-5's first Linear, in batches

state = fc.features.read_state_dict("weights.npz")   # fastconv / PyTorch, .npz or .pt
fc.features.replace_head(model, 100)                 # fresh Linear(in, 100) as the head
fc.features.load_init(model, state, skip_head=True)  # strict, except the new head
fc.features.freeze(model, ["conv1.", "layer1."])     # by parameter-name prefix
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _device
from . import functional as F
from . import init as _init
from .nn import Linear, Module, ModuleList
from .tensor import no_grad
from .training import WeightsError  # one class for every weights reader

# --------------------------------------------------------------------------- ensembles


def softmax_average(logits: Sequence[Any]) -> Any:
    """Mean of the members' softmax probabilities: the ONE place an ensemble averages (used by
    ``Ensemble`` on Tensors and by ``fc.distributed`` on arrays). Arrays in -> array out,
    Tensors in -> Tensor out (on the tape). Shape: K x (N, C) -> (N, C)."""
    if not len(logits):
        raise ValueError("softmax_average: no members")
    out = None
    for z in logits:
        p = F.softmax(z, 1)
        out = p if out is None else out + p
    return out * (1.0 / len(logits))


class Ensemble(Module):
    """Averages its members' softmax outputs: ``mean_k softmax(member_k(x))``.

    The output is PROBABILITIES, not logits (``outputs == "probabilities"``): score it with
    the NLL of its log (``fc.training.evaluate`` does so for this class) or its argmax, never
    with CrossEntropyLoss. The members keep their state-dict keys under ``members.<k>.``.

    Shape: x (N, ...) -> (N, num_classes), rows summing to 1.
    """

    outputs = "probabilities"

    def __init__(self, models: Iterable[Module]) -> None:
        super().__init__()
        self.members = ModuleList(models)
        if not len(self.members):
            raise ValueError("Ensemble: needs at least one member model")

    def forward(self, x: Any) -> Any:
        return softmax_average([m(x) for m in self.members])

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        return f"{len(self.members)} members, averaged softmax (outputs probabilities)"


# --------------------------------------------------------------------------- features


class _Captured(Exception):
    """Raised by the hook once the layer's output is in: the rest of the network is skipped."""


def extract_features(
    model: Module,
    x: np.ndarray,
    layer_name: str,
    batch_size: int = 256,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> np.ndarray:
    """The activations of the module ``layer_name`` (a name from ``model.named_modules()``;
    "" is the whole model) for all of ``x``, in batches, in eval mode without a tape.

    uint8 images are normalised as ``fc.training.evaluate`` does (``mean``/``std``, default
    MNIST's; one per channel for CIFAR); float input is used as is. A forward hook takes the
    layer's output and stops the batch there: the layers after it never run. The model's
    mode is restored afterwards.

    Shape: x (N, C, H, W) -> (N, *the layer's output shape), float (NumPy, on the host).
    """
    from . import training

    modules = dict(model.named_modules())
    if layer_name not in modules:
        names = ", ".join(repr(n) for n in modules if n) or "(none)"
        raise ValueError(
            f"extract_features: no module named {layer_name!r} in {type(model).__name__}; "
            f"available: {names}"
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"extract_features: batch_size must be a positive int; got {batch_size}")
    mean = training.STATS["digits"][0] if mean is None else mean
    std = training.STATS["digits"][1] if std is None else std
    dtype = training._model_dtype(model)
    got: list[np.ndarray] = []

    def hook(module, inputs, output):
        got.append(
            np.array(_device.to_host(output.numpy() if hasattr(output, "numpy") else output))
        )
        raise _Captured

    handle = modules[layer_name].register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            xb = training.normalize(xb, mean, std, dtype) if xb.dtype == np.uint8 else xb
            with no_grad():
                try:
                    model(training._place(model, np.asarray(xb, dtype)))
                except _Captured:
                    pass
    finally:
        handle.remove()
        model.train(was_training)
    if not got:
        raise ValueError("extract_features: x holds no images")
    return np.concatenate(got)


# --------------------------------------------------------------------------- fine-tuning


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict from a file: fastconv's ``save_model`` / checkpoint ``.npz`` (the
    ``model/`` entries), a plain ``.npz`` of a state dict (e.g. a PyTorch one exported with
    ``np.savez(f, **{k: v.numpy() for k, v in sd.items()})``), or a PyTorch ``.pt``/``.pth``
    read with ``torch.load(weights_only=True)`` (needs torch; a ``{"state_dict": ...}`` or
    ``{"model_state_dict": ...}`` wrapper and DataParallel's ``module.`` prefix are undone).
    Nothing is unpickled beyond what those two readers allow."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such file")
    if p.suffix in (".pt", ".pth"):
        state = _read_torch(p)
    else:
        try:
            with np.load(p, allow_pickle=False) as f:
                files = list(f.files)
                if any(k.startswith("model/") for k in files):
                    state = {k[len("model/") :]: f[k] for k in files if k.startswith("model/")}
                else:
                    state = {k: f[k] for k in files if k != "__meta__"}
        except Exception as e:  # zip, header and pickle-refusal errors all name the file
            raise WeightsError(f"{p}: cannot be read as a .npz of arrays ({e})") from None
    if not state:
        raise WeightsError(f"{p}: holds no weights")
    prefix = "module."
    if all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _read_torch(p: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{p}: reading a PyTorch file needs torch (pip install torch); or export it "
            "where torch is installed: np.savez('w.npz', **{k: v.numpy() for k, v in "
            "torch.load('w.pt', weights_only=True).items()})"
        ) from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(
            f"{p}: cannot be read by torch.load(weights_only=True) ({type(e).__name__}: {e})"
        ) from None
    for wrapper in ("state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = v.detach().cpu().numpy()
    return out


def find_head(model: Module) -> str:
    """The name of the model's classifier head: its ``head`` attribute when that names a
    Linear sub-module, else the last Linear in ``named_modules()``."""
    modules = dict(model.named_modules())
    head = model.__dict__.get("head")
    if isinstance(head, str) and isinstance(modules.get(head), Linear):
        return head
    linears = [n for n, m in modules.items() if isinstance(m, Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to serve as the head")
    return linears[-1]


def replace_head(model: Module, num_classes: int, *, rng: _init.RngLike = None) -> Linear:
    """Put a fresh ``Linear(in_features, num_classes)`` (PyTorch's default init, the old
    head's dtype and device) in place of the head (``find_head``); returns it."""
    name = find_head(model)
    modules = dict(model.named_modules())
    old = modules[name]
    new = Linear(old.in_features, num_classes, bias=old.bias is not None, dtype=old.dtype, rng=rng)
    if model.device != "cpu":
        new.to(model.device)
    parent_name, _, attr = name.rpartition(".")
    parent = modules[parent_name]
    setattr(parent, attr, new)  # a Sequential replans: a fused Linear+ReLU sees the new head
    return new


def head_keys(model: Module) -> list[str]:
    """The state-dict keys of the head's parameters (``fc.weight``, ``fc.bias``, ...)."""
    name = find_head(model)
    return [
        f"{name}.{k}"
        for k, p in dict(model.named_modules())[name]._parameters.items()
        if p is not None
    ]


def load_init(
    model: Module,
    state: dict[str, Any] | str | os.PathLike,
    *,
    skip_head: bool = False,
) -> list[str]:
    """Load initial weights (a state dict, or a file for ``read_state_dict``) with strict key
    matching. ``skip_head``: the head's entries (``head_keys``) may be absent or of another
    shape and are then left as they are (a fresh head after ``replace_head``); entries of the
    same shape are loaded. Returns the head keys that were left out. Errors name the file,
    the keys and the shapes."""
    where = f"{state}" if not isinstance(state, dict) else "the state dict"
    if not isinstance(state, dict):
        state = read_state_dict(state)
    own = model.state_dict()
    skipped: list[str] = []
    if skip_head:
        for k in head_keys(model):
            if k not in state or np.shape(state[k]) != own[k].shape:
                skipped.append(k)
        state = {k: v for k, v in state.items() if k not in skipped}
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise WeightsError(
            f"{where}: keys do not match {type(model).__name__}: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for k, v in state.items():
        if tuple(np.shape(v)) != own[k].shape:
            hint = (
                " (a different number of classes? replace the head)"
                if k in head_keys(model)
                else ""
            )
            raise WeightsError(
                f"{where}: {k} has shape {tuple(np.shape(v))} in the file but {own[k].shape} "
                f"in the model{hint}"
            )
    model.load_state_dict(state, strict=False)
    return skipped


def freeze(model: Module, prefixes: Iterable[str]) -> list[str]:
    """``requires_grad = False`` for every parameter whose name (``named_parameters``) starts
    with one of ``prefixes``; returns the frozen names. A prefix matching nothing is an error
    that lists the names."""
    prefixes = [p for p in prefixes if p]
    params = dict(model.named_parameters())
    frozen = []
    for pre in prefixes:
        hit = [n for n in params if n.startswith(pre)]
        if not hit:
            raise ValueError(
                f"freeze: prefix {pre!r} matches no parameter of {type(model).__name__}; "
                f"parameters: {', '.join(params)}"
            )
        frozen += [n for n in hit if n not in frozen]
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen


__all__ = [
    "Ensemble",
    "WeightsError",
    "extract_features",
    "find_head",
    "freeze",
    "head_keys",
    "load_init",
    "read_state_dict",
    "replace_head",
    "softmax_average",
]
