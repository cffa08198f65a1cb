"""Every zoo model's default recipe (``fastconv.models.defaults``) and how ``fastconv train``
fills the settings not given on the command line from it."""

from __future__ import annotations

import pytest

from fastconv import cli, models, optim

NEEDED = ("optimizer", "lr", "epochs", "batch_size")


def parse(*argv: str):
    """``fastconv train`` arguments after the recipe and the model's defaults are applied."""
    argv = ["train", *argv]
    args = cli._parser().parse_args(argv)
    return cli.apply_recipe(args, argv)


def with_defaults(name: str) -> list[str]:
    return [m for m in models.MODELS if models.defaults(m)] if name == "all" else [name]


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_zoo_model_has_a_recipe(name):
    d = cli._model_defaults(name, "mnist")  # its own, or the named recipe that trains it
    assert set(NEEDED) <= set(d), f"{name}: defaults lack {set(NEEDED) - set(d)}"
    assert d["optimizer"] in optim.OPTIMIZERS
    assert d["lr"] > 0 and d["epochs"] >= 1 and d["batch_size"] >= 1


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_defaults_pass_the_option_checks(name, dataset):
    """What `fastconv train --model NAME` runs with is a valid combination."""
    if dataset == "cifar10" and name not in models.CONFIGURABLE:
        pytest.skip("a 1-channel 28 px model")
    args = parse("--model", name, "--dataset", dataset)
    cli._check_train_options(args)  # raises SystemExit on a bad combination
    for k, v in models.defaults(name, dataset).items():
        assert getattr(args, k) == v, k


def test_plain_train_is_lenet5_with_its_recipe():
    args = parse()
    assert args.model == "lenet5"
    d = models.lenet5.recipe
    assert (args.optimizer, args.lr, args.momentum) == (d["optimizer"], d["lr"], d["momentum"])
    assert (args.epochs, args.batch_size, args.lr_decay) == (
        d["epochs"],
        d["batch_size"],
        d["lr_decay"],
    )
    assert args.weight_decay == d["weight_decay"]
    assert args.defaults["lr"] == d["lr"]


def test_recipe_sits_on_the_builder():
    for name in with_defaults("all"):
        assert models.defaults(name) == {
            k: v for k, v in models.MODELS[name].recipe.items() if k != "cifar"
        }
    with pytest.raises(ValueError, match="unknown model 'alexnet'"):
        models.defaults("alexnet")


def test_cifar_changes():
    mnist, cifar = models.defaults("resnet20", "mnist"), models.defaults("resnet20", "cifar100")
    assert "augment" not in mnist and cifar["augment"] == "crop-flip"
    assert cifar["epochs"] > mnist["epochs"]
    assert parse("--model", "resnet20", "--dataset", "cifar10").augment == "crop-flip"
    assert parse("--model", "resnet20").augment == "none"


def test_given_flags_win():
    args = parse("--model", "lenet5", "--lr", "0.01", "--epochs", "3", "--batch-size", "32")
    assert (args.lr, args.epochs, args.batch_size) == (0.01, 3, 32)
    assert args.lr_decay == models.lenet5.recipe["lr_decay"]  # the rest stays
    assert "lr" not in args.defaults and "epochs" not in args.defaults
    # a value equal to argparse's default still counts as given
    assert parse("--model", "lenet5", "--weight-decay", "0").weight_decay == 0.0


def test_another_optimizer_drops_the_recipes_lr_and_momentum():
    args = parse("--model", "lenet5", "--optimizer", "adam")
    assert args.lr is None  # DEFAULT_LR["adam"] then
    assert args.epochs == models.lenet5.recipe["epochs"]
    args = parse("--model", "mnist_cnn", "--optimizer", "sgd")
    assert args.lr is None and args.momentum == 0.9


@pytest.mark.parametrize(
    "argv", [["--schedule", "cosine"], ["--warmup-epochs", "2"], ["--lr-decay", "1"]]
)
def test_a_given_schedule_replaces_the_recipes(argv):
    args = parse("--model", "lenet5", *argv)
    assert args.lr_decay == 1.0
    cli._check_train_options(args)


def test_named_recipes():
    args = parse("--recipe", "fast99")
    assert args.model == "fast99" and args.schedule == "onecycle"
    # a model's name is a recipe too: that model with its defaults
    args = parse("--recipe", "nielsen")
    assert args.model == "nielsen" and args.augment == "shift"
    # --model wins over the recipe's model, the recipe's settings stay
    args = parse("--recipe", "fast99", "--model", "lenet5")
    assert args.model == "lenet5" and args.schedule == "onecycle"
    # --lr given: onecycle peaks there, not at the recipe's max_lr
    args = parse("--recipe", "fast99", "--lr", "0.003")
    assert args.max_lr is None and args.lr == 0.003
    with pytest.raises(SystemExit):
        parse("--recipe", "alexnet")


def test_fast99_model_trains_with_its_recipe_by_default():
    if "fast99" not in models.MODELS:
        pytest.skip("no fast99 model")
    args = parse("--model", "fast99")
    assert args.schedule == "onecycle" and args.optimizer == "adam"


def test_cli_says_which_defaults_it_used(tmp_path, capsys, monkeypatch):
    """A run prints the settings it took from the model's recipe (tiny synthetic data)."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    monkeypatch.setattr(cli, "_load_data", lambda args: (x, y, x[:16], y[:16]))
    argv = ["train", "--epochs", "1", "--no-progress", "--threads", "1"]
    assert cli.main([*argv, "--metrics-json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "not given, from lenet5's defaults: optimizer sgd" in out
    assert "lr-decay 0.8" in out and "epochs" not in out.split("not given")[1].split("\n")[0]
