"""pytest-benchmark suite: per-layer conv forward and forward+backward on MNIST-scale shapes.

    pytest benchmarks --benchmark-enable            # (collected only when benchmarks/ is named)

Each case records GFLOP/s, threads and versions in ``extra_info``; the first call of each case
(JIT compile or cache load) is timed apart, before pytest-benchmark's warm-up and rounds.
Benchmarks never assert.
"""

import os
import time

import pytest

import fastconv as fc
from benchmarks.compare import CONV_LAYERS, conv_case, machine_info

IMPLS = ["reference", "cpu-im2col", "cpu-direct", "torch"]
INFO = machine_info()


os.environ.setdefault("FASTCONV_WARM_START", "0")  # time the kernels, never the warm start


def _fns(impl, x, w, b, gy, padding):
    if impl == "torch":
        torch = pytest.importorskip("torch")
        torch.set_num_threads(INFO["threads"])
        tx, tw, tb = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
        tgy = torch.from_numpy(gy)

        def fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, tb, padding=padding)

        def fwdbwd():
            tx.grad = tw.grad = tb.grad = None
            torch.nn.functional.conv2d(tx, tw, tb, padding=padding).backward(tgy)

        return fwd, fwdbwd
    kw = (
        dict(padding=padding, backend="reference")
        if impl == "reference"
        else dict(padding=padding, backend="cpu", algorithm=impl.split("-")[1])
    )
    return (
        lambda: fc.conv2d(x, w, b, **kw),
        lambda: (fc.conv2d(x, w, b, **kw), fc.conv2d_backward(gy, x, w, **kw)),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layer", list(CONV_LAYERS))
def test_conv_layer(benchmark, layer, pass_, impl):
    x, w, b, gy, padding, flops = conv_case(layer)
    fn = _fns(impl, x, w, b, gy, padding)[0 if pass_ == "fwd" else 1]
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if impl == "reference":
        benchmark.pedantic(fn, rounds=3, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    total_flops = flops * (1 if pass_ == "fwd" else 3)
    benchmark.extra_info.update(INFO)
    benchmark.extra_info["first_call_s"] = first
    if benchmark.stats is not None:
        benchmark.extra_info["gflops"] = total_flops / benchmark.stats.stats.median / 1e9
