"""CIFAR-10/100 reader on small files synthesised in the release's exact format (no real CIFAR is
on these machines): Python 2 cPickle protocol-2 streams (str keys and data as 8-bit strings,
``numpy.core.multiarray._reconstruct``), in the extracted folder or the ``.tar.gz``; MD5s
patched in; the restricted unpickler refuses anything else; crop-flip and per-channel
normalisation."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets, training
from fastconv.datasets import DatasetError

# --------------------------------------------------------------------------- Python 2 pickles


def _py2_str(b: bytes) -> bytes:
    # Python 2 str at protocol 2: SHORT_BINSTRING (< 256 bytes) or BINSTRING
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def _py2(obj) -> bytes:
    """The opcodes Python 2's cPickle.dump(obj, f, 2) writes for the release's objects."""
    if isinstance(obj, dict):
        out = b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items())
        return out + b"u"
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(v) for v in obj) + b"e"
    if isinstance(obj, str):
        return _py2_str(obj.encode("latin-1"))
    if isinstance(obj, bytes):
        return _py2_str(obj)
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        return b"K" + bytes([obj]) if 0 <= obj < 256 else b"J" + struct.pack("<i", obj)
    if isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8 and obj.flags.c_contiguous
        shape = b"(" + b"".join(_py2(int(d)) for d in obj.shape) + b"t"
        dtype = (
            b"cnumpy\ndtype\n" + _py2("u1") + b"K\x00K\x01\x87R"  # dtype('u1', 0, 1)
            b"(K\x03" + _py2("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        )
        return (
            b"cnumpy.core.multiarray\n_reconstruct\n"
            b"cnumpy\nndarray\n" + b"K\x00\x85" + _py2("b") + b"\x87R"
            b"(K\x01" + shape + dtype + b"\x89" + _py2(obj.tobytes()) + b"tb"
        )
    raise TypeError(type(obj))


def py2_dumps(obj) -> bytes:
    return b"\x80\x02" + _py2(obj) + b"."


def _batch(n, rng, label_keys):
    d = {"batch_label": "training batch 1 of 5"}
    for key, classes in label_keys.items():
        d[key] = [int(v) for v in rng.integers(0, classes, n)]
    d["data"] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    d["filenames"] = [f"img_{i}.png" for i in range(n)]
    return d


SPEC_LABELS = {"cifar10": {"labels": 10}, "cifar100": {"fine_labels": 100, "coarse_labels": 20}}


def make_release(tmp_path: Path, name: str, monkeypatch, *, archive: bool, n: int = 6):
    """The release of ``name`` with ``n`` images per file under tmp_path (the extracted folder
    or the .tar.gz), its MD5s patched in as the canonical ones; returns (path, batches)."""
    spec = datasets.CIFAR[name]
    rng = np.random.default_rng(hash(name) % 1000)
    blobs = {f: py2_dumps(_batch(n, rng, SPEC_LABELS[name])) for f in spec["train"] + spec["test"]}
    table = {k: dict(v) for k, v in datasets.CIFAR.items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    if archive:
        path = tmp_path / spec["archive"]
        with tarfile.open(path, "w:gz") as tar:
            for f, blob in blobs.items():
                info = tarfile.TarInfo(f"{spec['folder']}/{f}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        table[name]["archive_md5"] = datasets.md5sum(path)
    else:
        path = tmp_path / spec["folder"]
        path.mkdir(parents=True)
        for f, blob in blobs.items():
            (path / f).write_bytes(blob)
            table[name]["md5"][f] = datasets.md5sum(path / f)
    monkeypatch.setattr(datasets, "CIFAR", table)
    monkeypatch.setattr(datasets, "_download", _no_network)
    return path, {f: pickle.loads(b, encoding="latin1") for f, b in blobs.items()}


def _no_network(url, dest):
    raise OSError(f"network disabled in tests ({url})")


def test_synthetic_pickle_has_the_release_layout():
    """What the writer emits is what Python 2 wrote: 8-bit-string keys and numpy 1's path."""
    blob = py2_dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [1, 2]})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in blob and b"U\x04data" in blob
    assert b"_codecs" not in blob  # Python 3 would encode bytes through _codecs.encode


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
def test_cifar10_reads_both_layouts(tmp_path, monkeypatch, archive):
    _, batches = make_release(tmp_path, "cifar10", monkeypatch, archive=archive)
    x_train, y_train, x_test, y_test = datasets.load_cifar("cifar10", tmp_path, download=False)
    assert x_train.shape == (30, 3, 32, 32) and x_train.dtype == np.uint8
    assert y_train.dtype == np.int64 and x_test.shape == (6, 3, 32, 32)
    want = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    # rows are 1024 red, 1024 green, 1024 blue bytes of a 32x32 image
    np.testing.assert_array_equal(x_train, want.reshape(-1, 3, 32, 32))
    assert x_train[0, 1, 0, 0] == want[0, 1024]
    np.testing.assert_array_equal(y_test, batches["test_batch"]["labels"])
    x, y = datasets.cifar10(tmp_path, train=False, download=False)
    np.testing.assert_array_equal(x, x_test)
    np.testing.assert_array_equal(y, y_test)


def test_cifar100_fine_and_coarse_labels(tmp_path, monkeypatch):
    _, batches = make_release(tmp_path, "cifar100", monkeypatch, archive=True)
    x, y = datasets.cifar100(tmp_path, download=False)
    assert x.shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(y, batches["train"]["fine_labels"])
    _, yc = datasets.cifar100(tmp_path, train=False, label_mode="coarse", download=False)
    np.testing.assert_array_equal(yc, batches["test"]["coarse_labels"])
    with pytest.raises(ValueError, match="label_mode"):
        datasets.cifar100(tmp_path, label_mode="super")


def test_found_via_fastconv_data_and_cache_subfolders(tmp_path, monkeypatch):
    make_release(tmp_path / "data" / "cifar10", "cifar10", monkeypatch, archive=False)
    monkeypatch.setenv("FASTCONV_DATA", str(tmp_path / "data"))
    assert datasets.find_cifar(name="cifar10") == tmp_path / "data/cifar10/cifar-10-batches-py"
    monkeypatch.delenv("FASTCONV_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.find_cifar(name="cifar10") is None
    (tmp_path / "xdg").mkdir()
    (tmp_path / "data").rename(tmp_path / "xdg" / "fastconv")
    x, _ = datasets.cifar10(train=False, download=False)
    assert x.shape == (6, 3, 32, 32)


def test_offline_error_names_the_files_and_where(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_download", _no_network)
    with pytest.raises(DatasetError) as e:
        datasets.load_cifar("cifar100", tmp_path)
    msg = str(e.value)
    assert "cifar-100-python.tar.gz" in msg and "eb9058c3a382ffc7106e4002c42a8d85" in msg
    assert "cifar-100-python/" in msg and str(tmp_path) in msg and "network disabled" in msg
    assert "FASTCONV_DATA" in msg and "https://www.cs.toronto.edu/~kriz/" in msg
    assert not list(tmp_path.glob("*.part"))  # the failed download left nothing behind


def test_download_is_md5_checked_then_read(tmp_path, monkeypatch):
    src, _ = make_release(tmp_path / "src", "cifar10", monkeypatch, archive=True)

    def fake(url, dest):
        assert url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
        dest.write_bytes(src.read_bytes())

    monkeypatch.setattr(datasets, "_download", fake)
    x, _ = datasets.cifar10(tmp_path / "root", train=False)
    assert x.shape == (6, 3, 32, 32) and (tmp_path / "root" / src.name).is_file()

    monkeypatch.setattr(datasets, "_download", lambda url, dest: dest.write_bytes(b"junk"))
    with pytest.raises(DatasetError, match="MD5"):
        datasets.cifar10(tmp_path / "other")
    assert not (tmp_path / "other" / src.name).exists()


def test_corrupt_files_are_named(tmp_path, monkeypatch):
    path, _ = make_release(tmp_path, "cifar10", monkeypatch, archive=False)
    (path / "data_batch_3").write_bytes(b"\x80\x02}(U\x04data")
    with pytest.raises(DatasetError, match=r"data_batch_3: MD5 .* does not match"):
        datasets.load_cifar("cifar10", tmp_path, download=False)
    # a truncated stream whose MD5 was accepted: the parser's failure names the file
    datasets.CIFAR["cifar10"]["md5"]["data_batch_3"] = datasets.md5sum(path / "data_batch_3")
    with pytest.raises(DatasetError, match=r"data_batch_3: cannot be read as a pickle"):
        datasets.load_cifar("cifar10", tmp_path, download=False)


def test_bad_archive_md5_and_truncated_archive(tmp_path, monkeypatch):
    path, _ = make_release(tmp_path, "cifar10", monkeypatch, archive=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz: MD5 .*corrupt"):
        datasets.find_cifar(tmp_path, "cifar10")
    datasets.CIFAR["cifar10"]["archive_md5"] = datasets.md5sum(path)
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz.*(corrupt|truncated)"):
        datasets.load_cifar("cifar10", tmp_path, download=False)


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps({"data": _Boom()}, protocol=2),
        pickle.dumps(_Boom(), protocol=0),
        b"\x80\x02cbuiltins\neval\nU\x061+1000\x85R.",
        b"\x80\x02cnumpy\nndarray\nK\x05\x85R.",  # the ndarray constructor, called directly
        pickle.dumps({"data": np.array([None, 1], dtype=object)}, protocol=2),
    ],
    ids=["os.system", "protocol0", "eval", "ndarray-call", "object-array"],
)
def test_malicious_pickles_are_refused(tmp_path, monkeypatch, payload):
    path, _ = make_release(tmp_path, "cifar10", monkeypatch, archive=False)
    (path / "test_batch").write_bytes(payload)
    datasets.CIFAR["cifar10"]["md5"]["test_batch"] = datasets.md5sum(path / "test_batch")
    called = []
    monkeypatch.setattr("os.system", lambda *a: called.append(a))
    with pytest.raises(DatasetError, match=r"test_batch: .*(refused|objects|only numpy)"):
        datasets.cifar10(tmp_path, train=False, download=False)
    assert not called


def test_python3_reprickled_batches_are_accepted(tmp_path, monkeypatch):
    """A batch re-dumped by Python 3 (bytes through _codecs.encode, numpy 2's module path)."""
    path, batches = make_release(tmp_path, "cifar10", monkeypatch, archive=False)
    b = {k.encode(): v for k, v in batches["test_batch"].items()}
    (path / "test_batch").write_bytes(pickle.dumps(b, protocol=2))
    datasets.CIFAR["cifar10"]["md5"]["test_batch"] = datasets.md5sum(path / "test_batch")
    x, y = datasets.cifar10(tmp_path, train=False, download=False)
    np.testing.assert_array_equal(y, batches["test_batch"]["labels"])


def test_bad_contents_are_named(tmp_path, monkeypatch):
    path, batches = make_release(tmp_path, "cifar10", monkeypatch, archive=False)
    bad = dict(batches["test_batch"], labels=[10] * 6)
    (path / "test_batch").write_bytes(py2_dumps(bad))
    datasets.CIFAR["cifar10"]["md5"]["test_batch"] = datasets.md5sum(path / "test_batch")
    with pytest.raises(DatasetError, match=r"test_batch: label 10 is outside 0-9"):
        datasets.cifar10(tmp_path, train=False, download=False)
    bad = dict(batches["test_batch"], data=np.zeros((6, 100), np.uint8))
    (path / "test_batch").write_bytes(py2_dumps(bad))
    datasets.CIFAR["cifar10"]["md5"]["test_batch"] = datasets.md5sum(path / "test_batch")
    with pytest.raises(DatasetError, match=r"test_batch: 'data' rows hold 100 bytes"):
        datasets.cifar10(tmp_path, train=False, download=False)


# --------------------------------------------------------------------------- training inputs


def test_channel_stats_and_per_channel_normalize():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    x[:, 2] //= 4
    mean, std = datasets.channel_stats(x, chunk=7)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, f.std(axis=(0, 2, 3)), rtol=1e-9)
    z = training.normalize(x, mean, std)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-5)
    # scalars keep the single-channel path (and its exact rounding)
    np.testing.assert_array_equal(
        training.normalize(x[:, :1], 0.1307, 0.3081),
        (x[:, :1].astype(np.float32) * np.float32(1 / (255 * 0.3081)))
        - np.float32(0.1307 / 0.3081),
    )
    with pytest.raises(ValueError, match="3 channels"):
        training.normalize(x[:, :2], mean, std)


def test_random_crop_flip():
    rng = np.random.default_rng(1)
    x = rng.integers(1, 256, (64, 3, 32, 32), dtype=np.uint8)
    out = training.random_crop_flip(x, np.random.default_rng(2))
    assert out.shape == x.shape and out.dtype == np.uint8
    flips = 0
    for a, b in zip(x, out):  # each output is a flipped or not, shifted (<= 4 px) copy
        pad = np.zeros((3, 40, 40), np.uint8)
        pad[:, 4:36, 4:36] = a
        crops = [pad[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        hits = [
            f for c in crops for f in (False, True) if np.array_equal(b, c[:, :, ::-1] if f else c)
        ]
        assert hits, "output is not a crop of the padded image"
        flips += hits[0]
    assert 15 < flips < 49  # about half flipped
    again = training.random_crop_flip(x, np.random.default_rng(2))
    np.testing.assert_array_equal(out, again)  # seeded: reproducible


def test_cli_trains_and_evaluates_on_cifar(tmp_path, monkeypatch, capsys):
    from fastconv import cli, models

    make_release(tmp_path, "cifar10", monkeypatch, archive=True)
    w, m = str(tmp_path / "w.npz"), str(tmp_path / "m.json")
    args = ["train", "--dataset", "cifar10", "--model", "resnet8", "--augment", "crop-flip",
            "--data-dir", str(tmp_path), "--epochs", "1", "--batch-size", "10", "--threads", "1",
            "--no-progress", "--save", w, "--metrics-json", m]  # fmt: skip
    assert cli.main(args) == 0
    meta = training.load_model(w, models.resnet8(in_channels=3))[1]
    x_train, *_ = datasets.load_cifar("cifar10", tmp_path, download=False)
    assert meta["in_channels"] == 3 and meta["num_classes"] == 10 and meta["size"] == 32
    assert meta["mean"] == pytest.approx(datasets.channel_stats(x_train)[0])
    capsys.readouterr()
    assert cli.main(["evaluate", "--load", w, "--data-dir", str(tmp_path), "--threads", "1"]) == 0
    assert "resnet8 on cifar10 test set: accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="lenet5 takes 1-channel 28x28 images; cifar10 has 3"):
        cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--epochs", "1"])
    rc = cli.main(["train", "--dataset", "cifar100", "--model", "resnet8", "--epochs", "1",
                   "--data-dir", str(tmp_path / "none")])  # fmt: skip
    assert rc == 1 and "cifar-100-python.tar.gz" in capsys.readouterr().err
