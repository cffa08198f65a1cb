"""The fastconv command: train / evaluate / info / bench, metrics JSON, plots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastconv import cli, datasets
from tests.test_training import mnist_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_dir():
    d = mnist_dir()
    if d is None:
        pytest.skip("real MNIST not found")
    return str(d)


def test_train_then_evaluate(tmp_path, data_dir, capsys):
    metrics, weights = tmp_path / "m.json", tmp_path / "w.npz"
    rc = cli.main(
        [
            "train",
            "--model",
            "lenet5",
            "--epochs",
            "1",
            "--train-limit",
            "640",
            "--batch-size",
            "32",
            "--data-dir",
            data_dir,
            "--save",
            str(weights),
            "--metrics-json",
            str(metrics),
            "--no-progress",
            "--seed",
            "1",
            "--optimizer",
            "adam",
            "--threads",
            "2",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "test accuracy" in out
    m = json.loads(metrics.read_text())
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy"] > 0.3
    assert m["epochs"] == 1 and len(m["seconds_per_epoch"]) == 1
    assert m["images_per_second"] > 0 and m["model"] == "lenet5"
    assert m["args"]["optimizer"] == "adam" and "numba" in m["environment"]
    rc = cli.main(
        [
            "evaluate",
            "--load",
            str(weights),
            "--data-dir",
            data_dir,
            "--metrics-json",
            str(tmp_path / "e.json"),
        ]
    )
    assert rc == 0
    assert "lenet5 on mnist test set: accuracy" in capsys.readouterr().out
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test_accuracy"] == pytest.approx(m["test_accuracy"])


def test_train_with_checkpoint_resume_and_plots(tmp_path, data_dir):
    pytest.importorskip("matplotlib")
    ckpt = tmp_path / "ckpt.npz"
    args = [
        "train",
        "--epochs",
        "1",
        "--train-limit",
        "256",
        "--batch-size",
        "64",
        "--data-dir",
        data_dir,
        "--checkpoint",
        str(ckpt),
        "--no-progress",
        "--augment",
        "shift",
        "--lr-decay",
        "0.5",
    ]
    assert cli.main(args) == 0 and ckpt.is_file()
    args[2] = "2"
    assert (
        cli.main(
            args
            + [
                "--resume",
                "--plot-dir",
                str(tmp_path / "plots"),
                "--metrics-json",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["epochs"] == 2  # one from the checkpoint, one resumed
    for name in ("curves.png", "filters.png", "feature_maps.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def offline(url, dest):
        raise OSError("offline")

    monkeypatch.setattr(datasets, "_download", offline)
    rc = cli.main(["train", "--data-dir", str(tmp_path), "--epochs", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and str(tmp_path) in err


def test_argument_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "alexnet"])
    with pytest.raises(SystemExit, match=r"--resume needs --checkpoint"):
        cli.main(["train", "--resume"])
    with pytest.raises(SystemExit):
        cli.main([])


def test_cuda_backend_without_gpu_is_a_clear_error(monkeypatch, data_dir):
    from fastconv import dispatch

    monkeypatch.setattr(dispatch, "cuda_status", lambda: (False, "no GPU here"))
    with pytest.raises(SystemExit, match=r"--backend cuda is not available: no GPU here"):
        cli.main(
            [
                "train",
                "--backend",
                "cuda",
                "--train-limit",
                "64",
                "--epochs",
                "1",
                "--data-dir",
                data_dir,
                "--no-progress",
            ]
        )


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("fastconv", "numba", "threads", "backends: reference, cpu", "GPU:"):
        assert word in out


def test_python_dash_m_fastconv_info():
    r = subprocess.run(
        [sys.executable, "-m", "fastconv", "info"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "backends:" in r.stdout


def test_bench_without_a_checkout_says_so(monkeypatch, capsys):
    """Installed without the source checkout (a wheel): no runner, and a message saying where
    the benchmarks are."""
    monkeypatch.setattr(cli, "_benchmarks_root", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "fastconv bench: not available" in err
    assert "source checkout" in err


def test_bench_forwards_its_arguments(monkeypatch):
    got = []
    fake = types.ModuleType("benchmarks.compare")
    fake.main = lambda argv: got.append(argv) or 0
    monkeypatch.setitem(sys.modules, "benchmarks.compare", fake)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert cli.main(["bench", "--quick", "-k", "conv"]) == 0
    assert got == [["--quick", "-k", "conv"]]


def test_bench_finds_the_checkout_runner_from_any_directory(tmp_path):
    """In a checkout, ``fastconv bench`` runs benchmarks/compare.py whatever the working
    directory (its --help, so that nothing is timed)."""
    assert cli._benchmarks_root() == REPO
    r = subprocess.run(
        [sys.executable, "-m", "fastconv", "bench", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "usage: fastconv bench" in r.stdout
    assert "--quick" in r.stdout


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'fastconv = "fastconv.cli:main"' in text


def test_evaluate_missing_weights_file(tmp_path):
    with pytest.raises(SystemExit, match=r"--load .*nope.npz: no such file"):
        cli.main(["evaluate", "--load", str(tmp_path / "nope.npz")])
