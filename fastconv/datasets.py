"""MNIST and Fashion-MNIST from the standard gzipped IDX files.

    x_train, y_train, x_test, y_test = fc.datasets.load_mnist()            # digits
    x_train, y_train, x_test, y_test = fc.datasets.load_mnist(kind="fashion")

Where the files are looked for, in order: ``root`` if given, else ``$FASTCONV_DATA``, else the
user cache directory (``$XDG_CACHE_HOME/fastconv`` or ``~/.cache/fastconv``); in each, the
directory itself and the sub-directories ``mnist/`` or ``fashion-mnist/`` (and torchvision's
``MNIST/raw``, ``FashionMNIST/raw``). Fashion-MNIST is also found where Debian's
``dataset-fashion-mnist`` package installs it (/usr/share/datasets/fashion-mnist).

Every file is checked before use: its MD5 against the canonical one, then the IDX magic number,
dimensions and exact length, then the label range. A bad file raises ``DatasetError`` naming it;
no partial or garbage array is ever returned. Missing files are downloaded (canonical mirrors,
MD5-verified, tqdm progress bar) into the first location; offline, the error says which files
to put where.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

MD5 = {
    "digits": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# MD5 of the decompressed IDX data: accepts re-compressed copies of the canonical data, such as
# Debian's dataset-fashion-mnist package, whose .gz files differ byte-wise but not in content.
RAW_MD5 = {
    "digits": {
        "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion": {
        "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS = {
    "digits": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

SUBDIRS = {
    "digits": ("", "mnist", "MNIST/raw"),
    "fashion": ("fashion-mnist", "fashion", "FashionMNIST/raw", ""),
}

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: 0x0000 | type 0x08 (ubyte) | ndim (3 or 1)
KINDS = ("digits", "fashion")


class DatasetError(RuntimeError):
    """A data file is missing, corrupt or truncated, or could not be downloaded."""


def cache_dir() -> Path:
    """The user cache directory: $XDG_CACHE_HOME/fastconv, else ~/.cache/fastconv."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastconv"


def default_root() -> Path:
    """``$FASTCONV_DATA`` if set, else the user cache directory."""
    env = os.environ.get("FASTCONV_DATA")
    return Path(env).expanduser() if env else cache_dir()


def md5sum(path: str | os.PathLike, *, decompressed: bool = False) -> str:
    """MD5 of a file, or of its gunzipped content (None-safe: a broken gzip raises DatasetError)."""
    h = hashlib.md5(usedforsecurity=False)
    try:
        with (gzip.open if decompressed else open)(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (OSError, EOFError) as e:
        raise DatasetError(
            f"{path}: cannot be read ({e}); the file is corrupt or truncated: "
            f"delete it and download it again"
        ) from None
    return h.hexdigest()


# --------------------------------------------------------------------------- IDX parsing


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read one (gzipped or plain) IDX file of unsigned bytes into a uint8 array.

    Checks the magic number (type 0x08 = ubyte, and ``expected_magic`` when given) and that the
    data length equals the product of the header's dimensions exactly.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(
            f"{path}: cannot be read as a gzip file ({e}); the file is corrupt or "
            f"truncated: delete it and download it again"
        ) from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    zero, dtype_code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if (
        zero != 0
        or dtype_code != 0x08
        or ndim < 1
        or (expected_magic is not None and magic != expected_magic)
    ):
        want = f" (expected {expected_magic})" if expected_magic is not None else ""
        raise DatasetError(
            f"{path}: bad IDX magic number {magic}{want}; not an unsigned-byte "
            f"IDX file of the expected kind"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    n = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != n:
        raise DatasetError(
            f"{path}: IDX header says {dims} = {n} bytes of data but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images_path, IMAGES_MAGIC)
    y = read_idx(labels_path, LABELS_MAGIC)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: expected 28x28 images; got dimensions {x.shape}")
    if y.shape[0] != x.shape[0]:
        raise DatasetError(
            f"{labels_path}: {y.shape[0]} labels for {x.shape[0]} images in {images_path.name}"
        )
    if y.size and int(y.max()) > 9:
        raise DatasetError(f"{labels_path}: label {int(y.max())} is outside 0-9")
    return x.reshape(-1, 1, 28, 28), y.astype(np.int64)


# --------------------------------------------------------------------------- locating files


def _candidates(root: Path, kind: str) -> list[Path]:
    dirs = [root / sub if sub else root for sub in SUBDIRS[kind]]
    if kind == "fashion":
        dirs.append(DEBIAN_FASHION)
    return dirs


def _verified(directory: Path, kind: str) -> bool | None:
    """True: all four files present with this kind's MD5. None: some missing. False: all present
    but they are the other kind's files (a digits folder searched for fashion). Raises on a file
    that matches no known MD5."""
    paths = [directory / name for name in FILES.values()]
    if not all(p.is_file() for p in paths):
        return None
    other = "fashion" if kind == "digits" else "digits"
    for p in paths:
        digest = md5sum(p)
        if digest == MD5[kind][p.name]:
            continue
        if digest == MD5[other][p.name]:
            return False
        # Not the canonical .gz: accept a re-compressed copy of the canonical content.
        raw = md5sum(p, decompressed=True)
        if raw == RAW_MD5[kind][p.name]:
            continue
        if raw == RAW_MD5[other][p.name]:
            return False
        raise DatasetError(
            f"{p}: MD5 {digest} does not match the canonical {MD5[kind][p.name]} "
            f"({kind} MNIST), nor does its content; the file is corrupt, truncated or a different "
            f"data set: delete it and run again to download a fresh copy"
        )
    return True


def find_mnist(root: str | os.PathLike | None = None, kind: str = "digits") -> Path | None:
    """The directory holding verified files of ``kind``, or None if none is found."""
    _check_kind(kind)
    base = Path(root).expanduser() if root is not None else default_root()
    for d in _candidates(base, kind):
        if _verified(d, kind):
            return d
    return None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"load_mnist: kind must be 'digits' or 'fashion'; got {kind!r}")


# --------------------------------------------------------------------------- downloading


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` with a progress bar (tests replace this function)."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=30) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        with (
            open(dest, "wb") as f,
            tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar,
        ):
            for block in iter(lambda: r.read(1 << 16), b""):
                f.write(block)
                bar.update(len(block))


def download_mnist(directory: str | os.PathLike, kind: str = "digits") -> Path:
    """Download the four canonical files of ``kind`` into ``directory`` and verify their MD5.

    Each file goes to a temporary name and is moved into place only once its MD5 matches, so an
    interrupted download never leaves a file that looks complete.
    """
    _check_kind(kind)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in FILES.values():
        dest = directory / name
        if dest.is_file() and md5sum(dest) == MD5[kind][name]:
            continue
        for mirror in MIRRORS[kind]:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
            os.close(fd)
            try:
                _download(mirror + name, Path(tmp))
                digest = md5sum(tmp)
                if digest != MD5[kind][name]:
                    failures.append(f"{mirror}{name}: MD5 {digest} != {MD5[kind][name]}")
                    continue
                os.replace(tmp, dest)
                break
            except OSError as e:  # URLError is an OSError
                failures.append(f"{mirror}{name}: {e}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise DatasetError(_missing_message(directory, kind, failures))
    return directory


def _missing_message(directory: Path, kind: str, failures: list[str]) -> str:
    title = "MNIST" if kind == "digits" else "Fashion-MNIST"
    lines = [f"{title} files not found and could not be downloaded (offline?)."]
    lines.append(f"Put these four files (from {MIRRORS[kind][0]}) into {directory}:")
    lines += [f"  {name}  (md5 {MD5[kind][name]})" for name in FILES.values()]
    lines.append("or point FASTCONV_DATA (or root=, or --data-dir) at a folder that holds them.")
    if kind == "fashion":
        lines.append(f"On Debian/Ubuntu: apt install dataset-fashion-mnist (-> {DEBIAN_FASHION}).")
    if failures:
        lines.append("Download errors: " + "; ".join(failures[:4]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- public entry


def load_mnist(
    root: str | os.PathLike | None = None, kind: str = "digits", *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST (``kind="digits"``) or Fashion-MNIST (``kind="fashion"``).

    Args:
        root: folder with the four .gz files (or a parent of ``mnist/`` / ``fashion-mnist/``);
            default ``$FASTCONV_DATA``, else the user cache directory.
        kind: "digits" or "fashion".
        download: fetch missing files into ``root`` (MD5-verified).

    Returns:
        (x_train, y_train, x_test, y_test).

    Shape:
        x_train (60000, 1, 28, 28) uint8, y_train (60000,) int64, x_test (10000, 1, 28, 28)
        uint8, y_test (10000,) int64.

    Raises:
        DatasetError: files missing (offline) or corrupt; the message names the files.
    """
    _check_kind(kind)
    base = Path(root).expanduser() if root is not None else default_root()
    directory = find_mnist(base, kind)
    if directory is None:
        target = base / ("mnist" if kind == "digits" else "fashion-mnist")
        if not download:
            raise DatasetError(_missing_message(target, kind, []))
        directory = download_mnist(target, kind)
    x_train, y_train = _read_split(
        directory / FILES["train_images"], directory / FILES["train_labels"]
    )
    x_test, y_test = _read_split(directory / FILES["test_images"], directory / FILES["test_labels"])
    return x_train, y_train, x_test, y_test


__all__ = ["DatasetError", "cache_dir", "download_mnist", "find_mnist", "load_mnist", "read_idx"]
