"""fc.Ensemble (averaged softmax, probabilities out), its evaluation, and the command line:
train --ensemble K writes the members, evaluate --load a b ... scores each and the ensemble."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli, training
from fastconv.distributed import evaluate_ensemble
from tests.test_training import mnist_dir


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_ensemble_averages_softmax_and_outputs_probabilities():
    members = [fc.models.lenet5(rng=s) for s in range(3)]
    ens = fc.Ensemble(members).eval()
    assert ens.outputs == "probabilities" and len(ens) == 3
    assert "averaged softmax" in repr(ens)
    x = training.normalize(_data()[0])
    with fc.no_grad():
        p = ens(x).numpy()
        want = sum(_softmax(m(x).numpy()) for m in members) / 3
    np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    # the members' state dicts live under members.<k>.
    assert "members.2.11.weight" in ens.state_dict()
    with pytest.raises(ValueError, match="at least one member"):
        fc.Ensemble([])


def test_ensemble_evaluation_is_nll_of_the_average():
    x, y = _data()
    members = [fc.models.lenet5(rng=s) for s in range(2)]
    loss, acc = training.evaluate(fc.Ensemble(members), x, y, batch_size=7)
    with fc.no_grad():
        z = [m.eval()(training.normalize(x)).numpy() for m in members]
    p = (_softmax(z[0]) + _softmax(z[1])) / 2
    assert loss == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
    assert acc == pytest.approx((p.argmax(axis=1) == y).mean())
    # one member: the ensemble's NLL is that member's cross-entropy
    l1, a1 = training.evaluate(fc.Ensemble(members[:1]), x, y)
    l0, a0 = training.evaluate(members[0], x, y)
    assert l1 == pytest.approx(l0, rel=1e-5) and a1 == a0
    # fc.distributed's evaluation is the same class; member modes come back as they were
    members[1].train()
    assert evaluate_ensemble(members, x, y, batch_size=7) == pytest.approx((loss, acc))
    assert members[1].training and not members[0].training


def test_gradients_flow_through_the_ensemble():
    members = [fc.models.lenet5(rng=s) for s in range(2)]
    ens = fc.Ensemble(members)
    x, y = _data(8)
    p = ens(training.normalize(x))
    loss = fc.nll_loss(fc.Tensor(np.log(p.numpy())), y)  # sanity: finite
    assert np.isfinite(float(loss))
    picked = fc.mean(p * fc.Tensor(np.eye(10, dtype=np.float32)[y]))
    picked.backward()
    assert all(prm.grad is not None for m in members for prm in m.parameters())


@pytest.fixture
def data_dir():
    d = mnist_dir()
    if d is None:
        pytest.skip("real MNIST not found")
    return str(d)


def test_cli_train_ensemble_then_evaluate_the_members(tmp_path, data_dir, capsys):
    save, metrics = str(tmp_path / "m.npz"), str(tmp_path / "t.json")
    args = ["train", "--data-dir", data_dir, "--train-limit", "128", "--batch-size", "32",
            "--epochs", "1", "--no-progress", "--threads", "1", "--seed", "3", "--ensemble", "2",
            "--save", save, "--metrics-json", metrics]  # fmt: skip
    assert cli.main(args) == 0
    t = json.loads((tmp_path / "t.json").read_text())
    assert [m["seed"] for m in t["members"]] == [3, 4]
    files = [str(tmp_path / f"m.member{k}.npz") for k in (0, 1)]
    capsys.readouterr()
    rc = cli.main(
        [
            "evaluate",
            "--data-dir",
            data_dir,
            "--threads",
            "1",
            "--load",
            *files,
            "--metrics-json",
            str(tmp_path / "e.json"),
        ]  # fmt: skip
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "m.member0.npz: accuracy" in out and "ensemble of 2: accuracy" in out
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["test_accuracy"] == pytest.approx(t["ensemble_test_accuracy"])
    assert e["test_loss"] == pytest.approx(t["ensemble_test_loss"], rel=1e-5)
    for got, want in zip(e["members"], t["members"]):
        assert got["test_accuracy"] == pytest.approx(want["test_accuracy"])
