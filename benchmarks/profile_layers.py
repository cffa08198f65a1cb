"""Where a training step's time goes: each layer's forward and backward, timed inside the real
``Sequential`` step (fused conv + ReLU included), medians over 100 steps. Never asserts.

    python benchmarks/profile_layers.py lenet5 64
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from fastconv import losses, models, optim


def main(name: str = "lenet5", batch: int = 64, steps: int = 100) -> None:
    model = models.get(name, rng=0)
    model.train()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    loss = losses.CrossEntropyLoss()
    spent: dict[tuple, list[float]] = {}

    def timed(i, layer, method):
        fn = getattr(layer, method)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent.setdefault((i, type(layer).__name__, method), []).append(time.perf_counter() - t0)
            return out

        setattr(layer, method, wrapper)

    for i, layer in enumerate(model.layers):
        for method in ("forward", "backward"):
            timed(i, layer, method)

    def step():
        opt.zero_grad()
        loss(model(x), labels)
        model.backward_params(loss.backward())
        opt.step()

    for _ in range(20):
        step()
    spent.clear()
    totals = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        totals.append(time.perf_counter() - t0)
    rows = sorted(spent.items(), key=lambda kv: -statistics.median(kv[1]))
    for (i, kind, method), ts in rows:
        print(f"{i:3d} {kind:12s} {method:9s} {statistics.median(ts) * 1e3:8.3f} ms")
    print(f"whole step (median of {steps}): {statistics.median(totals) * 1e3:.3f} ms")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[0] if args else "lenet5", int(args[1]) if len(args) > 1 else 64)
