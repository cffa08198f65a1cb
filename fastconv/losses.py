"""Loss functions: call to get the loss (a Python float), then ``backward()`` for its gradient.

    loss_fn = fc.CrossEntropyLoss()
    loss = loss_fn(logits, labels)     # float, mean over the batch
    grad_logits = loss_fn.backward()   # feed to model.backward

The math is one call into ``fastconv.functional`` (which returns the loss and the gradient
together, so backward costs nothing extra).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _device
from . import functional as F

Array = Any


class _Loss:
    def __init__(self) -> None:
        self._grad: Array | None = None

    def backward(self) -> Array:
        """Gradient of the last loss computed with respect to its first argument."""
        if self._grad is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward called before the loss was computed"
            )
        return self._grad

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy with mean reduction (``torch.nn.CrossEntropyLoss()``).

    Shape: logits (N, classes) float, labels (N,) integer class indices -> float;
    ``backward()`` -> grad_logits (N, classes).
    """

    def __call__(self, logits: Array, labels: Array) -> float:
        if _device.is_device(logits) and isinstance(labels, np.ndarray):
            labels = _device.to_device(np.ascontiguousarray(labels, dtype=np.int64))
        loss, self._grad = F.cross_entropy(logits, labels)
        return loss

    forward = __call__


class MSELoss(_Loss):
    """Mean squared error (``torch.nn.MSELoss()``).

    Shape: pred, target (same shape) -> float; ``backward()`` -> grad_pred (pred's shape).
    """

    def __call__(self, pred: Array, target: Array) -> float:
        if _device.is_device(pred) and isinstance(target, np.ndarray):
            target = _device.to_device(target)
        loss, self._grad = F.mse_loss(pred, target)
        return loss

    forward = __call__


__all__ = ["CrossEntropyLoss", "MSELoss"]
