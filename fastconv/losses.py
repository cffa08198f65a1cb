"""Loss modules: ``loss = loss_fn(logits, labels)`` is a 0-d Tensor; ``loss.backward()``.

    loss_fn = fc.CrossEntropyLoss()
    loss = loss_fn(model(x), labels)   # float(loss): the mean over the batch
    loss.backward()                    # gradients into every parameter's .grad

The math is one op of ``fastconv.functional``, whose kernel returns the loss and its gradient
together (so backward costs nothing extra). Targets and labels may be NumPy arrays; they are
moved to the GPU when the predictions live there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _device, shapes
from . import functional as F
from .nn import Module
from .tensor import Tensor


def _beside(pred: Any, target: Any, dtype: Any = None) -> Any:
    """``target`` where ``pred`` lives (labels as int64)."""
    if isinstance(target, Tensor):
        if target.requires_grad:
            return target
        target = target.data  # Module.__call__ wrapped the NumPy labels: move them too
    data = pred.data if isinstance(pred, Tensor) else pred
    if _device.is_device(data) and isinstance(target, np.ndarray):
        target = np.ascontiguousarray(target, dtype=dtype or target.dtype)
        return _device.to_device(target)
    return target


def _as_tensor(x: Any) -> Any:
    return x if isinstance(x, Tensor) else Tensor._make(x, None)


class CrossEntropyLoss(Module):
    """Softmax cross-entropy with mean reduction (``torch.nn.CrossEntropyLoss``), with
    PyTorch's ``label_smoothing``.

    Shape: logits (N, classes) float, labels (N,) integer class indices -> 0-d Tensor.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = shapes.check_number(
            "CrossEntropyLoss", "label_smoothing", label_smoothing, lo=0.0, hi=1.0
        )

    def forward(self, logits: Any, labels: Any) -> Tensor:
        labels = _beside(logits, labels, np.int64)
        return F.cross_entropy(_as_tensor(logits), labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return "" if self.label_smoothing == 0 else f"label_smoothing={self.label_smoothing}"


class NLLLoss(Module):
    """Negative log-likelihood with mean reduction (``torch.nn.NLLLoss``), after LogSoftmax.

    Shape: logp (N, classes), labels (N,) -> 0-d Tensor.
    """

    def forward(self, logp: Any, labels: Any) -> Tensor:
        return F.nll_loss(_as_tensor(logp), _beside(logp, labels, np.int64))


class MSELoss(Module):
    """Mean squared error (``torch.nn.MSELoss()``).

    Shape: pred, target (same shape) -> 0-d Tensor.
    """

    def forward(self, pred: Any, target: Any) -> Tensor:
        return F.mse_loss(_as_tensor(pred), _beside(pred, target))


__all__ = ["CrossEntropyLoss", "MSELoss", "NLLLoss"]
