"""Where a training step's time goes: each op's forward and backward kernel, timed inside the
real step (fused ops as Sequential plans them; the tape's own bookkeeping is the rest), medians
over 100 steps. Never asserts.

    python benchmarks/profile_layers.py lenet5 64
    python benchmarks/profile_layers.py inception_mini 128 --by-shape   # one row per layer shape
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

import fastconv as fc
from fastconv import losses, models, ops, optim


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def _shape_of(phase, args):
    """The shapes that tell one call of an op from another: the forward's first two arrays
    (input and weight), the backward's context's x and w where it has them."""
    if phase == "forward":
        arrays = [a for a in args[1:3] if hasattr(a, "shape")]
    else:
        ctx = args[2]
        arrays = [getattr(ctx, f) for f in ("x", "w") if hasattr(getattr(ctx, f, None), "shape")]
    return " ".join("x".join(map(str, a.shape)) for a in arrays)


def main(name: str = "lenet5", batch: int = 64, steps: int = 100, by_shape: bool = False) -> None:
    model = models.get(name, rng=0)
    model.train()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    loss_fn = losses.CrossEntropyLoss()
    spent: dict[tuple, float] = {}  # this step's time per (op, phase), all its calls
    per_steps: list[dict[tuple, float]] = []

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            k = key + (_shape_of(key[1], args),) if by_shape else key
            spent[k] = spent.get(k, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    saved = dict(ops.KERNELS)
    for (op, be), k in saved.items():  # every kernel of the table, timed where it is called
        ops.KERNELS[(op, be)] = ops.Kernel(
            timed((op, "forward"), k.forward), timed((op, "backward"), k.backward)
        )

    def step():
        out = model(x)
        loss = loss_fn(out, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    try:
        for _ in range(20):
            step()
        getattr(fc, "wait_for_kernels", lambda: True)()  # never time a serial build
        totals = []
        for _ in range(steps):
            spent.clear()
            t0 = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t0)
            per_steps.append(dict(spent))
    finally:
        ops.KERNELS.update(saved)
    # an op may run several times a step (layers of other sizes): each step's total of its
    # calls, then the median over the steps
    per_step = {
        key: statistics.median(s.get(key, 0.0) for s in per_steps)
        for key in {k for s in per_steps for k in s}
    }
    for (op, phase, *shape), t in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"{op:22s} {phase:9s} {t * 1e3:8.3f} ms / step  {' '.join(shape)}".rstrip())
    whole = statistics.median(totals)
    print(
        f"whole step (median of {steps}): {whole * 1e3:.3f} ms; kernels "
        f"{sum(per_step.values()) * 1e3:.3f} ms, the rest (checks, tape, optimizer) "
        f"{(whole - sum(per_step.values())) * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--by-shape"]
    main(
        args[0] if args else "lenet5",
        int(args[1]) if len(args) > 1 else 64,
        by_shape="--by-shape" in sys.argv[1:],
    )
