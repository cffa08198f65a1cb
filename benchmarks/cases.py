"""The MNIST-scale layer shapes every benchmark uses (batch 64 unless told otherwise)."""

from __future__ import annotations

import numpy as np

# name -> conv2d arguments. x (N, C, H, W), w (K, C, KH, KW).
CONV_LAYERS = {
    "lenet5.conv1": dict(x=(64, 1, 28, 28), w=(6, 1, 5, 5), padding=2),
    "lenet5.conv2": dict(x=(64, 6, 14, 14), w=(16, 6, 5, 5), padding=0),
    "mnist_cnn.conv2": dict(x=(64, 32, 26, 26), w=(64, 32, 3, 3), padding=0),
    "nielsen.conv2": dict(x=(64, 20, 12, 12), w=(40, 20, 5, 5), padding=0),
}


def conv_case(name: str, batch: int | None = None, dtype=np.float32, seed: int = 0):
    """Synthetic MNIST-shaped data for one layer: (x, w, b, gy, padding, flops_forward)."""
    from fastconv import shapes

    spec = CONV_LAYERS[name]
    xs = spec["x"] if batch is None else (batch, *spec["x"][1:])
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(dtype)
    w = (rng.standard_normal(spec["w"]) * 0.1).astype(dtype)
    b = rng.standard_normal(spec["w"][0]).astype(dtype)
    g = shapes.conv2d_geometry("bench", x.shape, w.shape, 1, spec["padding"])
    gy = rng.standard_normal(g.y_shape).astype(dtype)
    return x, w, b, gy, spec["padding"], g.flops()
