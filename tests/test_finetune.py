"""Fine-tuning and feature extraction: weights files (fastconv, PyTorch .npz and .pt), strict
loading except a replaced head, freezing by name prefix, extract_features, the CLI flags."""

from __future__ import annotations

import pickle
import re
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli, features, training
from fastconv.features import WeightsError
from tests.test_training import mnist_dir


def _torch():
    return pytest.importorskip("torch")


def _images(n=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


# --------------------------------------------------------------------------- reading weights


def test_reads_fastconv_files_and_checkpoints(tmp_path):
    m = fc.models.lenet5(rng=0)
    training.save_model(tmp_path / "w.npz", m, {"model": "lenet5"})
    opt = fc.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    training.save_checkpoint(tmp_path / "c.npz", m, opt, 1, np.random.default_rng(0))
    for f in ("w.npz", "c.npz"):
        state = features.read_state_dict(tmp_path / f)
        assert sorted(state) == sorted(m.state_dict())  # no __meta__, no optimizer entries
        for k, v in m.state_dict().items():
            np.testing.assert_array_equal(state[k], v)


def _torch_lenet(t):
    nn = t.nn
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )  # fmt: skip


def test_pytorch_state_dict_as_npz_and_pt(tmp_path):
    t = _torch()
    t.manual_seed(0)
    net = _torch_lenet(t)
    sd = net.state_dict()
    np.savez(tmp_path / "w.npz", **{k: v.numpy() for k, v in sd.items()})
    t.save(sd, tmp_path / "w.pt")
    t.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "c.pt")
    x = _images()
    with t.no_grad():
        want = net(t.from_numpy(training.normalize(x))).numpy()
    for f in ("w.npz", "w.pt", "c.pt"):
        m = fc.models.lenet5(rng=5)
        assert features.load_init(m, tmp_path / f) == []
        m.eval()
        with fc.no_grad():
            got = m(training.normalize(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_untrusted_files_are_refused_with_their_name(tmp_path, monkeypatch):
    t = _torch()
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"0.weight": _Boom()}, f)
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    with pytest.raises(WeightsError, match=r"evil\.pt: cannot be read by torch.load\(weights_"):
        features.read_state_dict(tmp_path / "evil.pt")
    np.savez(tmp_path / "obj.npz", w=np.array([None, 1], dtype=object))
    with pytest.raises(WeightsError, match=r"obj\.npz: cannot be read as a \.npz"):
        features.read_state_dict(tmp_path / "obj.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(WeightsError, match=r"junk\.npz: cannot be read"):
        features.read_state_dict(tmp_path / "junk.npz")
    t.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"list\.pt: holds a list, not a state dict"):
        features.read_state_dict(tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=r"nope\.npz: no such file"):
        features.read_state_dict(tmp_path / "nope.npz")
    assert not called


def test_pt_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(WeightsError, match=r"w\.pt: reading a PyTorch file needs torch"):
        features.read_state_dict(tmp_path / "w.pt")


# --------------------------------------------------------------------------- heads, init, freeze


@pytest.mark.parametrize(
    "name, head", [("lenet5", "11"), ("resnet8", "fc"), ("vgg_mini", "classifier.2")]
)
def test_find_and_replace_head(name, head):
    m = fc.models.get(name, rng=0)
    assert features.find_head(m) == head
    before = {k: v for k, v in m.state_dict().items() if not k.startswith(head + ".")}
    new = features.replace_head(m, 7, rng=1)
    assert dict(m.named_modules())[head] is new and new.out_features == 7
    assert features.head_keys(m) == [f"{head}.weight", f"{head}.bias"]
    with fc.no_grad():
        assert m.eval()(training.normalize(_images(3))).shape == (3, 7)
    for k, v in before.items():
        np.testing.assert_array_equal(m.state_dict()[k], v)
    m.head = head  # an explicit head attribute wins over "the last Linear"
    assert features.find_head(m) == head


def test_load_init_is_strict_except_a_replaced_head(tmp_path):
    src = fc.models.lenet5(rng=0)
    features.replace_head(src, 5)
    training.save_model(tmp_path / "five.npz", src)
    m = fc.models.lenet5(rng=1)
    with pytest.raises(
        WeightsError, match=r"five\.npz: 11\.weight has shape \(5, 84\) in the file"
    ):
        features.load_init(m, tmp_path / "five.npz")
    fresh = m.state_dict()["11.weight"].copy()
    assert features.load_init(m, tmp_path / "five.npz", skip_head=True) == ["11.weight", "11.bias"]
    np.testing.assert_array_equal(m.state_dict()["11.weight"], fresh)  # head left fresh
    np.testing.assert_array_equal(m.state_dict()["0.weight"], src.state_dict()["0.weight"])
    # a head of the same shape is loaded even with skip_head
    same = fc.models.lenet5(rng=2)
    features.replace_head(same, 5)
    assert features.load_init(same, tmp_path / "five.npz", skip_head=True) == []
    np.testing.assert_array_equal(same.state_dict()["11.weight"], src.state_dict()["11.weight"])
    state = dict(src.state_dict())
    del state["3.bias"]
    with pytest.raises(WeightsError, match=re.escape("missing ['3.bias']")):
        features.load_init(m, state, skip_head=True)
    state["3.bias"], state["extra"] = src.state_dict()["3.bias"], np.zeros(1)
    with pytest.raises(WeightsError, match=re.escape("unexpected ['extra']")):
        features.load_init(m, state, skip_head=True)


def test_freeze_by_prefix_keeps_those_weights_while_training():
    m = fc.models.lenet5(rng=0)
    frozen = features.freeze(m, ["0.", "3."])
    assert frozen == ["0.weight", "0.bias", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match=r"prefix 'conv1\.' matches no parameter .*0\.weight"):
        features.freeze(m, ["conv1."])
    before = m.state_dict()
    opt = fc.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = _images(16), np.arange(16) % 10
    training.fit(m, opt, (x, y), epochs=1, batch_size=8, rng=0, progress=False, log=None)
    after = m.state_dict()
    for k in before:
        same = np.array_equal(before[k], after[k])
        assert same == (k in frozen), k


# --------------------------------------------------------------------------- extract_features


def test_extract_features_in_batches_stops_at_the_layer():
    m = fc.models.lenet5(rng=0)
    x = _images(10)
    calls = []
    m[9].register_forward_hook(lambda mod, i, o: calls.append(1))
    m.train()
    f3 = fc.extract_features(m, x, "7", batch_size=3)
    f10 = fc.extract_features(m, x, "7", batch_size=100)
    assert f3.shape == (10, 120) and isinstance(f3, np.ndarray)
    # equal up to float32 rounding: the BLAS GEMM behind the Linear may sum a dot product in
    # another order for 3 rows than for 10 (OpenBLAS's AVX2 kernels do; 2e-7 apart here)
    np.testing.assert_allclose(f3, f10, rtol=1e-6, atol=1e-6)
    with fc.no_grad():
        want = m[:8](training.normalize(x)).numpy()  # up to the Linear, before its ReLU
    np.testing.assert_allclose(f3, want, rtol=1e-5, atol=1e-5)
    assert not calls  # the layers after the hooked one never ran
    assert m.training and not m[7]._forward_hooks  # mode restored, hook removed
    pool = fc.extract_features(m, x, "5")
    assert pool.shape == (10, 16, 5, 5)
    logits = fc.extract_features(m, x.astype(np.float32) / 255, "")  # float input, whole model
    assert logits.shape == (10, 10)
    with pytest.raises(ValueError, match=r"no module named 'fc' in Sequential; available: '0'"):
        fc.extract_features(m, x, "fc")


def test_extract_features_of_a_resnet_stage():
    m = fc.models.resnet8(rng=0)
    f = fc.extract_features(m, _images(4), "layer2", batch_size=2)
    assert f.shape == (4, 32, 14, 14)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def data_dir():
    d = mnist_dir()
    if d is None:
        pytest.skip("real MNIST not found")
    return str(d)


def _train(data_dir, tmp_path, *extra):
    return cli.main(
        ["train", "--data-dir", data_dir, "--train-limit", "128", "--batch-size", "32",
         "--epochs", "1", "--no-progress", "--threads", "1", *extra]
    )  # fmt: skip


def test_cli_init_freeze_and_new_head(tmp_path, data_dir, capsys):
    assert _train(data_dir, tmp_path, "--save", str(tmp_path / "a.npz")) == 0
    capsys.readouterr()
    args = ["--init", str(tmp_path / "a.npz"), "--freeze", "0.,3.", "--seed", "2"]
    assert _train(data_dir, tmp_path, *args, "--save", str(tmp_path / "b.npz")) == 0
    out = capsys.readouterr().out
    assert "all weights loaded (strict)" in out and "4 parameters frozen (2572 values)" in out
    a, b = (features.read_state_dict(tmp_path / f) for f in ("a.npz", "b.npz"))
    for k in a:
        assert np.array_equal(a[k], b[k]) == (k[:2] in ("0.", "3.")), k
    # a file with a 5-class head: refused without --num-classes, a fresh head with it
    src = fc.models.lenet5(rng=0)
    features.replace_head(src, 5)
    training.save_model(tmp_path / "five.npz", src)
    with pytest.raises(SystemExit, match=r"five\.npz: 11\.weight has shape \(5, 84\)"):
        _train(data_dir, tmp_path, "--init", str(tmp_path / "five.npz"))
    assert (
        _train(data_dir, tmp_path, "--init", str(tmp_path / "five.npz"), "--num-classes", "10") == 0
    )
    assert "except the head (11.weight, 11.bias" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--num-classes 5: mnist has 10 classes"):
        _train(data_dir, tmp_path, "--num-classes", "5")
    with pytest.raises(SystemExit, match="--freeze layer1.: prefix 'layer1.' matches no parameter"):
        _train(data_dir, tmp_path, "--freeze", "layer1.")
    with pytest.raises(SystemExit, match=r"--init .*nope\.npz: no such file"):
        _train(data_dir, tmp_path, "--init", str(tmp_path / "nope.npz"))


def test_readme_features_example(capsys):
    """The README's nearest-centroid / linear classifier on extracted features runs."""
    from tests.test_readme import _blocks

    block = next((b for b in _blocks() if "extract_features" in b), None)
    if block is None:
        pytest.skip("README has no extract_features example")
    if mnist_dir() is None:
        pytest.skip("real MNIST not found")
    env = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), env)
    out = capsys.readouterr().out
    accs = [float(v) for v in re.findall(r"accuracy ([0-9.]+)", out)]
    assert len(accs) == 2 and all(0.5 < a <= 1 for a in accs), out
