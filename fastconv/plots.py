"""PNG figures for a trained model (the optional 'plot' extra: matplotlib).

Training curves (loss and accuracy per epoch), the first convolution's filters and that
layer's feature maps for one input image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from . import _device
from .layers import Conv2d, Layer


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("fastconv.plots needs matplotlib: pip install 'fastconv[plot]'") from e
    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def training_curves(path: str | os.PathLike, history: dict[str, list]) -> Path:
    """Loss and accuracy per epoch, train and test."""
    plt = _pyplot()
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(epochs, history["train_loss"], "o-", label="train")
    a1.plot(epochs, history["test_loss"], "o-", label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    a2.plot(epochs, history["train_accuracy"], "o-", label="train")
    a2.plot(epochs, history["test_accuracy"], "o-", label="test")
    a2.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for a in (a1, a2):
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _first_conv(model: Layer) -> Conv2d:
    for layer in model.modules():
        if isinstance(layer, Conv2d):
            return layer
    raise ValueError("the model has no Conv2d layer")


def filters(path: str | os.PathLike, model: Layer) -> Path:
    """The first convolution's filters (input channel 0), one tile each, own colour scale."""
    plt = _pyplot()
    w = _device.to_host(_first_conv(model).weight.data)[:, 0]  # (K, KH, KW)
    rows, cols = _grid(len(w))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(w):
            ax.imshow(w[i], cmap="gray", interpolation="nearest")
    fig.suptitle("first-layer filters")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def feature_maps(
    path: str | os.PathLike, model: Layer, image: np.ndarray, mean: float, std: float
) -> Path:
    """The first convolution's output for one uint8 image (1, 1, H, W), after the layer."""
    from .training import normalize

    plt = _pyplot()
    conv = _first_conv(model)
    x = normalize(image[:1], mean, std, conv.weight.dtype)
    was = conv.training
    conv.eval()
    y = _device.to_host(conv(_device.like(conv.weight.data, x)))[0]  # (K, OH, OW)
    conv.train(was)
    rows, cols = _grid(len(y) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image[0, 0], cmap="gray")
    axes.flat[0].set_title("input", fontsize=8)
    for i in range(len(y)):
        axes.flat[i + 1].imshow(y[i], cmap="viridis")
    fig.suptitle("first-layer feature maps")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_all(
    directory: str | os.PathLike,
    model: Layer,
    history: dict[str, list],
    image: Any,
    mean: float,
    std: float,
) -> list[Path]:
    """Write curves.png, filters.png and feature_maps.png into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [
        training_curves(d / "curves.png", history),
        filters(d / "filters.png", model),
        feature_maps(d / "feature_maps.png", model, np.asarray(image), mean, std),
    ]
