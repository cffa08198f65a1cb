"""Training that loses nothing: a non-finite loss or non-finite weights stop ``fit`` with the
epoch, step and learning rate, the last good checkpoint is never overwritten, and truncated or
corrupt weights, checkpoint and MNIST files fail with errors naming the file."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import fastconv as fc
from fastconv import cli, datasets, features, training
from fastconv.training import NonFiniteLossError, WeightsError
from tests.test_training import synthetic


def tiny(seed: int = 0) -> fc.Sequential:
    g = np.random.default_rng(seed)
    return fc.Sequential(
        fc.Conv2d(1, 2, 5, stride=3, rng=g),  # (N, 2, 8, 8)
        fc.ReLU(),
        fc.Flatten(),
        fc.Linear(128, 4, rng=g),
    )


def run(model, opt, data, **kw):
    kw = {"epochs": 1, "batch_size": 16, "rng": 0, "progress": False, "log": None, **kw}
    return training.fit(model, opt, data, **kw)


# --------------------------------------------------------------------------- non-finite


def test_absurd_lr_stops_at_the_first_nonfinite_loss():
    model = tiny()
    opt = fc.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(NonFiniteLossError) as e:
        run(model, opt, synthetic(96), epochs=3)
    msg = str(e.value)
    assert re.search(r"loss is (nan|inf|-inf) at epoch 1, step \d+ of 6", msg), msg
    assert "learning rate 1e+30" in msg
    assert isinstance(e.value, FloatingPointError)  # what callers may already catch


class PoisonAt:
    """Cross-entropy, NaN at the ``at``-th call (a poisoned batch)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls, self.ce = at, 0, fc.CrossEntropyLoss()

    def __call__(self, logits, y):
        self.calls += 1
        loss = self.ce(logits, y)
        return loss * float("nan") if self.calls == self.at else loss


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = tmp_path / "c.npz"
    data = synthetic(64)  # 4 steps of 16 per epoch
    model = tiny()
    opt = fc.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    poison = PoisonAt(4 + 3)  # epoch 2, step 3
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 3 of 4") as e:
        run(model, opt, data, epochs=3, checkpoint=ckpt, loss_fn=poison)
    assert "learning rate 0.05" in str(e.value) and str(ckpt) in str(e.value)
    # the checkpoint is epoch 1's, whole and finite, and a resumed run carries on from it
    m2 = tiny(1)
    o2 = fc.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
    meta = training.load_checkpoint(ckpt, m2, o2, np.random.default_rng())
    assert meta["epoch"] == 1
    assert all(np.isfinite(v).all() for v in m2.state_dict().values())
    hist = run(m2, o2, data, epochs=2, checkpoint=ckpt, resume=True)
    assert len(hist["test_loss"]) == 2 and np.isfinite(hist["train_loss"]).all()


class BlowUp(fc.optim.SGD):
    """SGD whose ``at``-th step leaves an infinity in the first parameter (the loss stays
    finite until the next forward)."""

    def __init__(self, params, at: int, **kw) -> None:
        super().__init__(params, **kw)
        self.at, self.steps = at, 0

    def step(self) -> None:
        super().step()
        self.steps += 1
        if self.steps == self.at:
            self.params[0].data.flat[0] = np.inf


def test_nonfinite_weights_never_reach_the_checkpoint(tmp_path):
    ckpt = tmp_path / "c.npz"
    model = tiny()
    opt = BlowUp(model.parameters(), at=8, lr=0.05)  # the last step of epoch 2
    with pytest.raises(
        NonFiniteLossError, match=r"0\.weight holds non-finite values after epoch 2"
    ):
        run(model, opt, synthetic(64), epochs=3, checkpoint=ckpt)
    before = ckpt.read_bytes()
    meta, _ = training._read_npz(ckpt, "checkpoint")
    assert meta["epoch"] == 1
    # save_checkpoint itself refuses: the file stays byte for byte
    with pytest.raises(NonFiniteLossError, match=r"not overwritten"):
        training.save_checkpoint(ckpt, model, opt, 2, np.random.default_rng())
    assert ckpt.read_bytes() == before


def test_cli_reports_a_nonfinite_loss(tmp_path, monkeypatch, capsys):
    x, y = synthetic(128)
    monkeypatch.setattr(cli, "_load_data", lambda args: (x, y, x[:32], y[:32]))
    ckpt = tmp_path / "c.npz"
    argv = ["train", "--lr", "1e30", "--epochs", "2", "--batch-size", "32", "--no-progress"]
    rc = cli.main(
        [*argv, "--threads", "1", "--checkpoint", str(ckpt), "--save", str(tmp_path / "w.npz")]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert re.search(r"fastconv: fit: the training loss is \S+ at epoch 1, step \d+ of 4 "
                     r"\(learning rate 1e\+30\)", err), err  # fmt: skip
    assert not ckpt.exists() and not (tmp_path / "w.npz").exists()


# --------------------------------------------------------------------------- corrupt files


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    model = tiny()
    opt = fc.optim.SGD(model.parameters(), lr=0.05)
    w, c = tmp_path / "w.npz", tmp_path / "c.npz"
    training.save_model(w, model, {"note": "tiny"})
    training.save_checkpoint(c, model, opt, 1, np.random.default_rng(0))
    return w, c


def _spoil(path: Path, how: str) -> Path:
    raw = path.read_bytes()
    out = path.with_name(f"{how}-{path.name}")
    if how == "truncated":
        out.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        out.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    elif how == "empty":
        out.write_bytes(b"")
    elif how == "flipped":  # the zip directory intact, a stored array's bytes changed
        b = bytearray(raw)
        i = raw.index(b"model/0.weight") + 200
        b[i : i + 32] = bytes(32)
        out.write_bytes(bytes(b))
    return out


SPOILS = ("truncated", "garbage", "empty")


@pytest.mark.parametrize("how", SPOILS)
def test_load_model_names_a_bad_file(tmp_path, how):
    w, _ = _saved(tmp_path)
    bad = _spoil(w, how)
    with pytest.raises(WeightsError, match=re.escape(str(bad)) + ": cannot be read as a weights"):
        training.load_model(bad, tiny())


@pytest.mark.parametrize("how", SPOILS)
def test_load_checkpoint_names_a_bad_file(tmp_path, how):
    _, c = _saved(tmp_path)
    bad = _spoil(c, how)
    model = tiny()
    opt = fc.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(WeightsError, match=re.escape(str(bad)) + ": cannot be read as a checkp"):
        training.load_checkpoint(bad, model, opt, np.random.default_rng())


def test_other_bad_weights_files(tmp_path):
    w, c = _saved(tmp_path)
    model = tiny()
    opt = fc.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(WeightsError, match=r"nope\.npz: no such checkpoint file"):
        training.load_checkpoint(tmp_path / "nope.npz", model, opt, np.random.default_rng())
    with pytest.raises(WeightsError, match=r"w\.npz: not a training checkpoint"):
        training.load_checkpoint(w, model, opt, np.random.default_rng())
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(WeightsError, match=r"plain\.npz: holds no model weights"):
        training.load_model(tmp_path / "plain.npz", model)
    np.savez(tmp_path / "meta.npz", __meta__=np.array("{not json"), **{"model/x": np.zeros(1)})
    with pytest.raises(WeightsError, match=r"meta\.npz: its __meta__ entry is not valid JSON"):
        training.load_model(tmp_path / "meta.npz", model)
    # a changed byte inside a compressed-free entry: the values differ, the file still reads;
    # fastconv's files are plain zips, so a bad entry shows as a read error or other values
    flipped = _spoil(w, "flipped")
    try:
        training.load_model(flipped, tiny())
    except WeightsError as e:
        assert str(flipped) in str(e)
    # one class for every weights reader
    assert features.WeightsError is WeightsError


@pytest.mark.parametrize("how", SPOILS)
def test_cli_resume_init_evaluate_name_a_bad_file(tmp_path, monkeypatch, capsys, how):
    x, y = synthetic(64)
    monkeypatch.setattr(cli, "_load_data", lambda args: (x, y, x[:16], y[:16]))
    # a real lenet5 checkpoint and weights to spoil
    base = ["train", "--epochs", "1", "--batch-size", "32", "--no-progress", "--threads", "1"]
    ckpt, w = tmp_path / "c.npz", tmp_path / "w.npz"
    assert cli.main([*base, "--checkpoint", str(ckpt), "--save", str(w)]) == 0
    bad_c, bad_w = _spoil(ckpt, how), _spoil(w, how)
    before = bad_c.read_bytes()
    capsys.readouterr()
    rc = cli.main([*base, "--epochs", "2", "--checkpoint", str(bad_c), "--resume"])
    assert rc == 1
    assert f"fastconv: {bad_c}: cannot be read as a checkpoint file" in capsys.readouterr().err
    assert bad_c.read_bytes() == before  # left for the user to look at
    with pytest.raises(SystemExit, match=f"--init {re.escape(str(bad_w))}: cannot be read"):
        cli.main([*base, "--init", str(bad_w)])
    with pytest.raises(SystemExit, match=f"--load {re.escape(str(bad_w))}: cannot be read as a"):
        cli.main(["evaluate", "--load", str(bad_w)])


def _gz(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


def _idx_images(n: int = 3) -> bytes:
    return struct.pack(">IIII", datasets.IMAGES_MAGIC, n, 28, 28) + bytes(n * 784)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "corrupt-stream", "short"])
def test_mnist_reader_names_a_bad_file(tmp_path, how):
    good = _gz(tmp_path / "good-images-idx3-ubyte.gz", _idx_images())
    assert datasets.read_idx(good, datasets.IMAGES_MAGIC).shape == (3, 28, 28)
    raw = good.read_bytes()
    bad = tmp_path / f"{how}-images-idx3-ubyte.gz"
    if how == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        bad.write_bytes(np.random.default_rng(0).bytes(len(raw)))
    elif how == "empty":
        bad.write_bytes(b"")
    elif how == "corrupt-stream":  # a valid gzip header, then a broken deflate stream
        b = bytearray(raw)
        b[10:30] = b"\xff" * 20
        bad.write_bytes(bytes(b))
    elif how == "short":  # a whole gzip of an IDX file whose data stops early
        _gz(bad, _idx_images()[:-100])
    with pytest.raises(datasets.DatasetError, match=re.escape(str(bad))):
        datasets.read_idx(bad, datasets.IMAGES_MAGIC)
    if how in ("truncated", "garbage", "corrupt-stream"):  # the MD5 check reads it too
        with pytest.raises(datasets.DatasetError, match=re.escape(str(bad))):
            datasets.md5sum(bad, decompressed=True)
