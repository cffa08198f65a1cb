"""MNIST loading: the real files, synthetic IDX files (truncated, wrong magic, bad labels),
MD5 checks, search order, downloads (monkeypatched: tests never touch the network)."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets
from fastconv.datasets import FILES, DatasetError, load_mnist, read_idx

REPO = Path(__file__).resolve().parents[1]


def mnist_dir() -> Path | None:
    for d in (os.environ.get("FASTCONV_DATA"), REPO.parent / "shared" / "data" / "mnist"):
        if d and (Path(d) / FILES["train_images"]).is_file():
            return Path(d)
    return None


needs_mnist = pytest.mark.skipif(mnist_dir() is None, reason="real MNIST files not found")


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = magic if magic is not None else (0x0800 | array.ndim)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def make_set(directory: Path, n_train=6, n_test=4, seed=0) -> dict[str, np.ndarray]:
    """Four small synthetic MNIST-format files; MD5s patched into a fake 'digits' table."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, a in arrays.items():
        write_gz(directory / FILES[key], idx_bytes(a))
    return arrays


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    """A synthetic digits set whose MD5s are the 'canonical' ones for this test."""
    d = tmp_path / "data"
    arrays = make_set(d)
    table = {k: dict(v) for k, v in datasets.MD5.items()}
    table["digits"] = {name: md5(d / name) for name in FILES.values()}
    monkeypatch.setattr(datasets, "MD5", table)
    monkeypatch.setattr(datasets, "_download", _no_network)
    return d, arrays


def _no_network(url, dest):
    raise OSError(f"network disabled in tests ({url})")


# --------------------------------------------------------------------------- real files


@needs_mnist
def test_real_mnist_loads_with_expected_shapes_and_counts():
    x_train, y_train, x_test, y_test = load_mnist(mnist_dir())
    assert x_train.shape == (60000, 1, 28, 28) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 1, 28, 28) and x_test.dtype == np.uint8
    assert y_train.dtype == np.int64 and y_test.dtype == np.int64
    # the published class counts (SOURCE.txt)
    assert np.bincount(y_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x_train.max() == 255 and x_train.min() == 0


@needs_mnist
def test_fastconv_data_env_var_is_used(monkeypatch):
    monkeypatch.setenv("FASTCONV_DATA", str(mnist_dir()))
    assert datasets.find_mnist() == mnist_dir()


@needs_mnist
def test_digits_folder_is_not_mistaken_for_fashion(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION", tmp_path / "nowhere")
    assert datasets.find_mnist(mnist_dir(), kind="fashion") is None
    with pytest.raises(DatasetError, match=r"Fashion-MNIST files not found"):
        load_mnist(mnist_dir(), kind="fashion", download=False)


@pytest.mark.skipif(not datasets.DEBIAN_FASHION.is_dir(), reason="dataset-fashion-mnist absent")
def test_fashion_from_debian_package(tmp_path):
    x_train, y_train, x_test, y_test = load_mnist(tmp_path, kind="fashion", download=False)
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(y_train).tolist() == [6000] * 10


# --------------------------------------------------------------------------- synthetic files


def test_synthetic_set_round_trips(synthetic):
    d, arrays = synthetic
    x_train, y_train, x_test, y_test = load_mnist(d)
    np.testing.assert_array_equal(x_train[:, 0], arrays["train_images"])
    np.testing.assert_array_equal(y_test, arrays["test_labels"])
    assert y_train.dtype == np.int64 and x_train.shape == (6, 1, 28, 28)


def test_subfolder_and_cache_dir_search(synthetic, tmp_path, monkeypatch):
    d, _ = synthetic
    parent = tmp_path / "parent"
    (parent).mkdir()
    d.rename(parent / "mnist")
    assert datasets.find_mnist(parent) == parent / "mnist"
    monkeypatch.delenv("FASTCONV_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert datasets.cache_dir() == tmp_path / "xdg" / "fastconv"
    (tmp_path / "xdg" / "fastconv").mkdir(parents=True)
    (parent / "mnist").rename(tmp_path / "xdg" / "fastconv" / "mnist")
    assert load_mnist()[0].shape == (6, 1, 28, 28)


def test_truncated_gzip_is_a_clear_error(synthetic):
    d, _ = synthetic
    p = d / FILES["train_images"]
    p.write_bytes(p.read_bytes()[:-40])
    # the MD5 differs, so the content is checked next: the gzip stream ends early
    with pytest.raises(
        DatasetError, match=r"train-images-idx3-ubyte.gz: cannot be read .*truncated"
    ):
        load_mnist(d)


def test_md5_mismatch_names_the_file(synthetic):
    d, _ = synthetic
    write_gz(d / FILES["test_labels"], idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: MD5 .*corrupt"):
        load_mnist(d)


def test_read_idx_rejects_wrong_magic(tmp_path):
    p = write_gz(tmp_path / "x.gz", idx_bytes(np.zeros((2, 28, 28), np.uint8), magic=2049))
    with pytest.raises(DatasetError, match=r"bad IDX magic number 2049 \(expected 2051\)"):
        read_idx(p, 2051)
    p = write_gz(tmp_path / "f.gz", idx_bytes(np.zeros(3, np.uint8), magic=0x0D01))
    with pytest.raises(DatasetError, match=r"not an unsigned-byte IDX file"):
        read_idx(p)


def test_read_idx_rejects_truncated_and_oversized_data(tmp_path):
    good = idx_bytes(np.ones((3, 28, 28), np.uint8))
    p = write_gz(tmp_path / "short.gz", good[:-10])
    with pytest.raises(
        DatasetError,
        match=r"header says \(3, 28, 28\) = 2352 bytes of data but "
        r"the file holds 2342",
    ):
        read_idx(p)
    p = write_gz(tmp_path / "long.gz", good + b"\x00")
    with pytest.raises(DatasetError, match=r"file holds 2353"):
        read_idx(p)
    p = write_gz(tmp_path / "tiny.gz", b"\x00\x00")
    with pytest.raises(DatasetError, match=r"too short to be an IDX file"):
        read_idx(p)
    p = write_gz(tmp_path / "hdr.gz", struct.pack(">I", 0x0803) + b"\x00\x00")
    with pytest.raises(DatasetError, match=r"truncated IDX header"):
        read_idx(p)


def test_read_idx_rejects_a_broken_gzip_stream(tmp_path):
    p = tmp_path / "broken.gz"
    p.write_bytes(gzip.compress(idx_bytes(np.ones(100, np.uint8)))[:-12])
    with pytest.raises(DatasetError, match=r"cannot be read as a gzip file"):
        read_idx(p)


def test_read_idx_plain_file(tmp_path):
    p = tmp_path / "plain-idx1-ubyte"
    p.write_bytes(idx_bytes(np.arange(5, dtype=np.uint8)))
    np.testing.assert_array_equal(read_idx(p, 2049), np.arange(5))


def _patch_md5_for(d: Path, monkeypatch):
    table = {k: dict(v) for k, v in datasets.MD5.items()}
    table["digits"] = {name: md5(d / name) for name in FILES.values()}
    monkeypatch.setattr(datasets, "MD5", table)


def test_label_out_of_range_and_count_mismatch(tmp_path, monkeypatch):
    d = tmp_path / "d"
    make_set(d)
    write_gz(d / FILES["train_labels"], idx_bytes(np.array([0, 1, 2, 3, 4, 12], np.uint8)))
    _patch_md5_for(d, monkeypatch)
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.gz: label 12 is outside 0-9"):
        load_mnist(d)
    write_gz(d / FILES["train_labels"], idx_bytes(np.array([0, 1, 2], np.uint8)))
    _patch_md5_for(d, monkeypatch)
    with pytest.raises(DatasetError, match=r"3 labels for 6 images"):
        load_mnist(d)
    write_gz(d / FILES["train_images"], idx_bytes(np.zeros((3, 20, 20), np.uint8)))
    _patch_md5_for(d, monkeypatch)
    with pytest.raises(DatasetError, match=r"expected 28x28 images; got dimensions"):
        load_mnist(d)


# --------------------------------------------------------------------------- downloading


def test_offline_error_names_files_and_destination(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_download", _no_network)
    with pytest.raises(DatasetError) as e:
        load_mnist(tmp_path)
    msg = str(e.value)
    assert "could not be downloaded (offline?)" in msg
    assert str(tmp_path / "mnist") in msg
    for name in FILES.values():
        assert name in msg
    assert "FASTCONV_DATA" in msg and "network disabled" in msg
    assert not list((tmp_path / "mnist").glob("*.part"))  # no partial files left behind


def test_download_false_does_not_touch_the_network(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(datasets, "_download", lambda url, dest: called.append(url))
    with pytest.raises(DatasetError, match=r"MNIST files not found"):
        load_mnist(tmp_path, download=False)
    assert called == []


def test_download_verifies_md5_and_moves_files_into_place(tmp_path, monkeypatch):
    source = tmp_path / "source"
    arrays = make_set(source)
    _patch_md5_for(source, monkeypatch)
    urls = []

    def fake_download(url, dest):
        urls.append(url)
        dest.write_bytes((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(datasets, "_download", fake_download)
    x_train, *_ = load_mnist(tmp_path / "root")
    assert (tmp_path / "root" / "mnist" / FILES["train_images"]).is_file()
    np.testing.assert_array_equal(x_train[:, 0], arrays["train_images"])
    assert len(urls) == 4 and urls[0].startswith(datasets.MIRRORS["digits"][0])
    load_mnist(tmp_path / "root")  # second call: found, nothing downloaded
    assert len(urls) == 4


def test_download_with_wrong_md5_tries_the_next_mirror_then_fails(tmp_path, monkeypatch):
    urls = []

    def bad_download(url, dest):
        urls.append(url)
        dest.write_bytes(b"not the file")

    monkeypatch.setattr(datasets, "_download", bad_download)
    with pytest.raises(DatasetError, match=r"MD5 [0-9a-f]{32} != f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        datasets.download_mnist(tmp_path, "digits")
    assert len(urls) == len(datasets.MIRRORS["digits"])
    assert list(tmp_path.iterdir()) == []


def test_kind_is_validated():
    with pytest.raises(ValueError, match=r"kind must be 'digits' or 'fashion'; got 'kmnist'"):
        load_mnist(kind="kmnist")
