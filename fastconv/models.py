"""Model zoo: small MNIST networks as ``fc.Sequential``, each equal layer for layer to a
``torch.nn.Sequential`` (same indices, so state dicts move between them).

All take ``rng`` (seed or Generator) for the initial weights and Dropout masks, and ``dtype``.
Inputs are (N, 1, 28, 28) images; outputs are (N, 10) logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import init as _init
from .layers import Conv2d, Dropout, Flatten, Linear, MaxPool2d, ReLU, Sequential


def lenet5(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """LeNet-5 with ReLU and max pooling (61,706 parameters).

    conv 6@5x5 pad 2, ReLU, maxpool 2, conv 16@5x5, ReLU, maxpool 2, flatten,
    FC 120, ReLU, FC 84, ReLU, FC 10.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 6, 5, padding=2, rng=g, dtype=dtype),  # 0: (N, 6, 28, 28)
        ReLU(),
        MaxPool2d(2),  # 2: (N, 6, 14, 14)
        Conv2d(6, 16, 5, rng=g, dtype=dtype),  # 3: (N, 16, 10, 10)
        ReLU(),
        MaxPool2d(2),  # 5: (N, 16, 5, 5)
        Flatten(),  # 6: (N, 400)
        Linear(400, 120, rng=g, dtype=dtype),
        ReLU(),
        Linear(120, 84, rng=g, dtype=dtype),
        ReLU(),
        Linear(84, 10, rng=g, dtype=dtype),
    )


def nielsen(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """The final network of Nielsen's "Neural Networks and Deep Learning", chapter 6.

    conv 20@5x5, ReLU, maxpool 2, conv 40@5x5, ReLU, maxpool 2, flatten,
    FC 1000, ReLU, dropout 0.5, FC 1000, ReLU, dropout 0.5, FC 10 (1.7 M parameters).
    Nielsen reaches 99.6 % with it on "expanded" (shifted) training data.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 20, 5, rng=g, dtype=dtype),  # 0: (N, 20, 24, 24)
        ReLU(),
        MaxPool2d(2),  # 2: (N, 20, 12, 12)
        Conv2d(20, 40, 5, rng=g, dtype=dtype),  # 3: (N, 40, 8, 8)
        ReLU(),
        MaxPool2d(2),  # 5: (N, 40, 4, 4)
        Flatten(),  # 6: (N, 640)
        Linear(640, 1000, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(1000, 1000, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(1000, 10, rng=g, dtype=dtype),
    )


def mnist_cnn(*, rng: _init.RngLike = None, dtype: Any = np.float32) -> Sequential:
    """The Keras/PyTorch "mnist" example CNN (1.2 M parameters).

    conv 32@3x3, ReLU, conv 64@3x3, ReLU, maxpool 2, dropout 0.25, flatten, FC 128, ReLU,
    dropout 0.5, FC 10.

    Shape: x (N, 1, 28, 28) -> logits (N, 10).
    """
    g = _init.get_rng(rng)
    return Sequential(
        Conv2d(1, 32, 3, rng=g, dtype=dtype),  # 0: (N, 32, 26, 26)
        ReLU(),
        Conv2d(32, 64, 3, rng=g, dtype=dtype),  # 2: (N, 64, 24, 24)
        ReLU(),
        MaxPool2d(2),  # 4: (N, 64, 12, 12)
        Dropout(0.25, rng=_init.spawn(g)),
        Flatten(),  # 6: (N, 9216)
        Linear(9216, 128, rng=g, dtype=dtype),
        ReLU(),
        Dropout(0.5, rng=_init.spawn(g)),
        Linear(128, 10, rng=g, dtype=dtype),
    )


MODELS: dict[str, Callable[..., Sequential]] = {
    "lenet5": lenet5,
    "nielsen": nielsen,
    "mnist_cnn": mnist_cnn,
}


def get(name: str, **kwargs: Any) -> Sequential:
    """Build a zoo model by name ("lenet5", "nielsen", "mnist_cnn")."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = ["MODELS", "get", "lenet5", "mnist_cnn", "nielsen"]
