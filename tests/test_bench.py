"""The benchmark runner runs end to end (a smoke run; figures are never asserted)."""

import pytest

from fastconv import bench


def test_runner_smoke(tmp_path, capsys):
    rc = bench.main(
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


def test_torch_model_matches_fastconv_model():
    torch = pytest.importorskip("torch")
    import numpy as np

    from fastconv import models

    for name in bench.NETWORKS:
        m = models.get(name, rng=0)
        m.eval()
        tm = bench.torch_model(m)
        tm.eval()
        x = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(m(x), ref, rtol=1e-4, atol=1e-4)
