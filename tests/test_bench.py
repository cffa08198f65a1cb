"""The benchmark runner runs end to end (a smoke run; figures are never asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import compare


def test_runner_smoke(tmp_path, capsys):
    rc = compare.main(
        [
            "--quick",
            "--only",
            "pool",
            "networks",
            "--networks",
            "lenet5",
            "--batches",
            "2",
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "| lenet5 | 2 | train step | fastconv |" in out
    assert "| lenet5.pool1 | fwd | max/cpu |" in out
    assert (tmp_path / "cpu.md").read_text().startswith("# CPU benchmark")


def test_conv_rows_call_what_they_are_named(monkeypatch):
    """Each per-layer row's callables run conv2d's forward and backward kernels on that row's
    backend and algorithm (the CPU rows through the tape, as a layer runs them): the
    ``reference`` row times the oracle, not the last CPU algorithm built after it."""
    from fastconv.kernels.cpu import ops as cpu

    from fastconv import reference

    calls = []

    def record(module, name, op, backend):
        real = getattr(module, name)

        def call(*a, **kw):  # the CPU kernels take the algorithm after (x, w, b | gy, x, w, g)
            calls.append((op, backend, None if backend == "reference" else a[4]))
            return real(*a, **kw)

        monkeypatch.setattr(module, name, call)

    record(reference, "conv2d", "fwd", "reference")
    record(reference, "conv2d_backward", "bwd", "reference")
    record(cpu, "conv2d", "fwd", "cpu")
    record(cpu, "conv2d_backward", "bwd", "cpu")
    x, w, b, gy = (
        np.zeros(s, np.float32) for s in ((1, 1, 5, 5), (2, 1, 3, 3), (2,), (1, 2, 3, 3))
    )
    impls = compare.conv_impls(x, w, b, gy, 0, include_reference=True)
    assert set(impls) == {"reference", "cpu-im2col", "cpu-direct"}
    expected = {
        "reference": ("reference", None),
        "cpu-im2col": ("cpu", "im2col"),
        "cpu-direct": ("cpu", "direct"),
    }
    for name, (fwd, fwdbwd) in impls.items():
        calls.clear()
        fwd()
        fwdbwd()
        assert calls == [
            ("fwd", *expected[name]),
            ("fwd", *expected[name]),
            ("bwd", *expected[name]),
        ], name


def test_torch_model_matches_fastconv_model():
    torch = pytest.importorskip("torch")
    from fastconv import models

    for name in compare.NETWORKS:
        m = models.get(name, rng=0)
        m.eval()
        tm = compare.torch_model(m)
        tm.eval()
        x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(m(x), ref, rtol=1e-4, atol=1e-4)


def test_gpu_script_without_a_gpu_says_so_and_runs_nothing(tmp_path):
    """`bash benchmarks/gpu_run.sh` on a machine with no GPU: exit 0, the reason, no files."""
    try:
        from numba import cuda

        if cuda.is_available():
            pytest.skip("a GPU is present: the script would run the whole GPU suite")
    except ImportError:
        pass
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "results"))
    r = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_run.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no usable CUDA GPU here; nothing run" in r.stdout
    assert list((tmp_path / "results").iterdir()) == []
