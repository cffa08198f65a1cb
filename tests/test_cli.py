"""The fastconv command: train / evaluate / info / bench, metrics JSON, plots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import fastconv as fc
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


def _tiny_train(data_dir, *extra, epochs=1):
    return [
        "train",
        "--epochs",
        str(epochs),
        "--train-limit",
        "96",
        "--batch-size",
        "32",
        "--data-dir",
        data_dir,
        "--no-progress",
        "--threads",
        "2",
        *extra,
    ]


def _record_fit(monkeypatch):
    """Wrap training.fit to see what the command passes it."""
    from fastconv import training

    seen = {}
    real = training.fit

    def fit(model, opt, *args, **kw):
        seen.update(kw, optimizer=opt)
        return real(model, opt, *args, **kw)

    monkeypatch.setattr(training, "fit", fit)
    return seen


def test_train_with_warmup_cosine_nesterov_and_label_smoothing(tmp_path, data_dir, monkeypatch):
    seen = _record_fit(monkeypatch)
    metrics = tmp_path / "m.json"
    argv = ["--lr", "0.05", "--schedule", "cosine", "--warmup-epochs", "1", "--nesterov"]
    argv += ["--label-smoothing", "0.1", "--metrics-json", str(metrics)]
    assert cli.main(_tiny_train(data_dir, *argv, epochs=3)) == 0
    lrs = json.loads(metrics.read_text())["history"]["lr"]
    # warm-up epoch at 0.1 x lr, then cosine over the 2 remaining epochs: lr, lr / 2
    assert lrs == pytest.approx([0.005, 0.05, 0.025], rel=1e-12)
    assert type(seen["scheduler"]).__name__ == "SequentialLR"
    assert seen["loss_fn"].label_smoothing == 0.1
    assert seen["optimizer"].nesterov and seen["optimizer"].momentum == 0.9


def test_train_onecycle_with_adam_betas(tmp_path, data_dir, monkeypatch, capsys):
    seen = _record_fit(monkeypatch)
    argv = ["--optimizer", "adam", "--betas", "0.8,0.99", "--schedule", "onecycle"]
    argv += ["--max-lr", "0.004", "--metrics-json", str(tmp_path / "m.json")]
    assert cli.main(_tiny_train(data_dir, *argv)) == 0
    assert "stepped after every batch" in capsys.readouterr().out
    sched, opt = seen["scheduler"], seen["optimizer"]
    assert sched.total_steps == 3 and sched.last_epoch == 3  # 96 images / 32 per batch
    ref = fc.optim.Adam([fc.Parameter(np.zeros(1))], betas=(0.8, 0.99))
    ref_sched = fc.optim.lr_scheduler.OneCycleLR(ref, max_lr=0.004, total_steps=3)
    first_lr = ref.lr
    for _ in range(3):
        ref_sched.step()
    assert opt.betas == ref.betas and opt.lr == ref.lr  # beta1 cycled, beta2 kept
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["history"]["lr"] == [first_lr]
    assert m["args"]["betas"] == [0.8, 0.99] and m["args"]["schedule"] == "onecycle"


def test_train_step_schedule_resumes_from_a_checkpoint(tmp_path, data_dir):
    ckpt, metrics = tmp_path / "c.npz", tmp_path / "m.json"
    argv = ["--schedule", "step", "--step-size", "1", "--gamma", "0.5", "--lr", "0.04"]
    argv += ["--checkpoint", str(ckpt), "--metrics-json", str(metrics)]
    assert cli.main(_tiny_train(data_dir, *argv, epochs=1)) == 0
    assert cli.main(_tiny_train(data_dir, *argv, "--resume", epochs=2)) == 0
    assert json.loads(metrics.read_text())["history"]["lr"] == [0.04, 0.02]
    # the checkpoint holds a StepLR: resuming it as another schedule is refused
    with pytest.raises(ValueError, match=r"holds a StepLR learning-rate scheduler state"):
        cli.main(
            _tiny_train(
                data_dir,
                *["--schedule", "exponential", "--gamma", "0.5", "--checkpoint", str(ckpt)],
                "--resume",
                epochs=3,
            )
        )


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--step-size", "2"], r"--step-size applies to --schedule step, not none"),
        (["--schedule", "cosine", "--gamma", "0.5"], r"--gamma applies to --schedule step/multi"),
        (["--schedule", "step", "--max-lr", "1"], r"--max-lr applies to --schedule onecycle"),
        (["--schedule", "step"], r"--schedule step needs --step-size"),
        (["--schedule", "multistep"], r"--schedule multistep needs --milestones"),
        (["--schedule", "exponential"], r"--schedule exponential needs --gamma"),
        (["--schedule", "step", "--step-size", "0"], r"StepLR: step_size must be an int >= 1"),
        (["--schedule", "exponential", "--gamma", "0"], r"ExponentialLR: gamma must be in \(0"),
        (
            ["--schedule", "multistep", "--milestones", "4,2"],
            r"MultiStepLR: milestones must be strictly increasing",
        ),
        (["--schedule", "onecycle", "--pct-start", "2"], r"OneCycleLR: pct_start must be in"),
        (["--schedule", "onecycle", "--warmup-epochs", "1"], r"does not combine with --schedule"),
        (["--warmup-epochs", "10"], r"--warmup-epochs 10 leaves no epoch of --epochs 10"),
        (["--warmup-epochs", "-1"], r"--warmup-epochs must be >= 0"),
        (["--warmup-start-factor", "0.5"], r"--warmup-start-factor needs --warmup-epochs"),
        (["--warmup-epochs", "2", "--warmup-start-factor", "0"], r"LinearLR: start_factor"),
        (["--schedule", "cosine", "--lr-decay", "0.9"], r"--lr-decay and --schedule"),
        (["--betas", "0.9,0.99"], r"--betas applies to --optimizer adam, not sgd"),
        (["--optimizer", "adam", "--betas", "0.9,1.5"], r"Adam: betas\[1\] must be in"),
        (["--nesterov", "--optimizer", "adam"], r"--nesterov applies to --optimizer sgd, not"),
        (["--nesterov", "--momentum", "0"], r"--nesterov needs --momentum > 0"),
        (["--label-smoothing", "1.5"], r"CrossEntropyLoss: label_smoothing must be in \[0, 1\]"),
    ],
)
def test_schedule_and_optimizer_flag_errors(argv, msg, tmp_path, monkeypatch):
    """Refused before any data is read (the data folder here is empty)."""

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_data", no_data)
    with pytest.raises(SystemExit, match=msg):
        cli.main(["train", "--data-dir", str(tmp_path), *argv])


@pytest.mark.parametrize(
    "argv",
    [
        ["--schedule", "linear"],
        ["--betas", "0.9"],
        ["--betas", "a,b"],
        ["--milestones", "1,x"],
    ],
)
def test_schedule_flag_parse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *argv])
    assert e.value.code == 2 and "usage: fastconv train" in capsys.readouterr().err
