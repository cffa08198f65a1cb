"""fastconv train --recipe fast99: the settings it stands for, flags overriding it, a short run."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli
from tests.test_training import mnist_dir

FAST99 = {
    "model": "fast99",
    "optimizer": "adam",
    "schedule": "onecycle",
    "batch_size": 64,
    "epochs": 1,
}


def parse(argv: list[str]):
    args = cli._parser().parse_args(argv)
    return cli.apply_recipe(args, argv) if args.recipe else args


def test_recipe_sets_its_settings():
    args = parse(["train", "--recipe", "fast99"])
    for dest, value in cli.RECIPES["fast99"].items():
        assert getattr(args, dest) == value, dest
    for dest, value in FAST99.items():  # the documented core of the recipe
        assert getattr(args, dest) == value, dest
    assert args.max_lr == args.lr > 0


def test_flags_given_win_over_the_recipe():
    args = parse(["train", "--recipe", "fast99", "--epochs", "3", "--batch", "32", "--lr", "0.5"])
    assert (args.epochs, args.batch_size, args.lr) == (3, 32, 0.5)  # --batch: abbreviation
    assert args.model == "fast99" and args.schedule == "onecycle"
    args = parse(["train", "--label-smoothing", "0.05", "--recipe", "fast99", "--seed", "4"])
    assert args.label_smoothing == 0.05 and args.seed == 4
    assert args.max_lr == cli.RECIPES["fast99"]["max_lr"]


def test_no_recipe_keeps_the_defaults():
    args = parse(["train"])
    assert args.recipe is None and args.model is None and args.epochs == 10


def test_fast99_model():
    model = fc.models.fast99(rng=0)
    assert "fast99" in fc.models.MODELS
    assert sum(int(p.data.size) for p in model.parameters()) == 24986
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    assert model(x).shape == (3, 10)


def test_recipe_smoke_run(tmp_path, capsys):
    d = mnist_dir()
    if d is None:
        pytest.skip("real MNIST not found")
    metrics = tmp_path / "m.json"
    argv = ["train", "--recipe", "fast99", "--train-limit", str(20 * 64), "--data-dir", str(d)]
    argv += ["--no-progress", "--metrics-json", str(metrics), "--seed", "1"]
    assert cli.main(argv) == 0  # 20 steps of batch 64, one epoch, the whole one cycle
    m = json.loads(metrics.read_text())
    assert m["model"] == "fast99" and m["args"]["optimizer"] == "adam"
    assert m["args"]["schedule"] == "onecycle" and m["args"]["batch_size"] == 64
    assert m["epochs"] == 1
    assert m["test_accuracy"] > 0.5  # it learns: 10 classes, chance is 0.1
    assert "onecycle" in capsys.readouterr().out.lower()
