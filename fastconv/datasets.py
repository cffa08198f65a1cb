"""MNIST and Fashion-MNIST from the standard gzipped IDX files; CIFAR-10 and CIFAR-100 from the
canonical python-pickle release (``load_cifar``, ``cifar10``, ``cifar100``; see below).

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
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Any

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
    except (OSError, EOFError, zlib.error) as e:
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
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # zlib: a corrupt stream
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


# --------------------------------------------------------------------------- CIFAR-10 / -100
#
# The canonical "python version" release: a .tar.gz of pickles written by Python 2's cPickle
# (protocol 2): per batch a dict {data: uint8 (N, 3072) array, labels or fine_labels /
# coarse_labels: lists of ints, batch_label, filenames}; each row is 1024 red, 1024 green,
# 1024 blue bytes of a 32x32 image, i.e. (3, 32, 32) in row-major order. The pickles are read
# by ``_RestrictedUnpickler``, which admits only what they hold; the archive is read in
# place (never extracted, so its member paths cannot write anywhere).

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"

CIFAR = {
    "cifar10": {
        "title": "CIFAR-10",
        "archive": "cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        "test": ("test_batch",),
        "labels": {"fine": "labels"},
        "classes": {"fine": 10},
        "md5": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
    },
    "cifar100": {
        "title": "CIFAR-100",
        "archive": "cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "labels": {"fine": "fine_labels", "coarse": "coarse_labels"},
        "classes": {"fine": 100, "coarse": 20},
        "md5": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        },
    },
}


class _NDArrayMarker:
    """Stands for numpy.ndarray inside a pickle: only ``_reconstruct`` may use it, so the
    stream cannot call the ndarray constructor itself (an arbitrary-size allocation)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(
            "refused a direct call of numpy.ndarray (only numpy's _reconstruct builds arrays)"
        )


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> np.ndarray:
    if cls is not _NDArrayMarker:
        raise pickle.UnpicklingError("_reconstruct: only numpy.ndarray may be rebuilt")
    return _NP_RECONSTRUCT(np.ndarray, shape, typecode)


def _dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    dt = np.dtype(spec)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"dtype {dt} holds Python objects")
    return dt


def _latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # how Python 3 pickles bytes at protocol 2: _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode: only latin-1 text")
    return text.encode("latin-1")


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, any version
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # Python 2 / numpy 1 pickles
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2
    ("numpy", "ndarray"): _NDArrayMarker,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only dicts, lists, tuples, str/bytes, numbers and plain numpy arrays: any other
    global (os.system, builtins.eval, ...) raises UnpicklingError instead of being imported."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a CIFAR batch holds only dicts, lists, "
                "strings and numpy arrays"
            ) from None


def _check_loaded(obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(f"array of dtype {obj.dtype} holds Python objects")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_loaded(k)
            _check_loaded(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_loaded(v)
    elif not isinstance(obj, (str, bytes, int, float, bool, type(None))):
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} in the pickle")


def load_pickle(f: Any, name: str | os.PathLike) -> Any:
    """Read one pickle of the CIFAR release from the binary file object ``f`` with the restricted
    unpickler (Python 2 str read as latin-1 text, numpy's own convention); ``name`` (the file)
    is named in the DatasetError raised for anything else."""
    try:
        obj = _RestrictedUnpickler(f, encoding="latin1").load()
        _check_loaded(obj)
        return obj
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{name}: not a CIFAR pickle: {e}") from None
    except Exception as e:  # truncated or garbled streams raise many kinds
        raise DatasetError(
            f"{name}: cannot be read as a pickle ({type(e).__name__}: {e}); the file is corrupt "
            "or truncated: delete it and download it again"
        ) from None


def _key(batch: dict, key: str) -> Any:
    return batch[key] if key in batch else batch.get(key.encode())


def _parse_batch(
    batch: Any, name: str | os.PathLike, label_key: str, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, 3, 32, 32), int64 (N,)) from one loaded batch dict, checked."""
    if not isinstance(batch, dict):
        raise DatasetError(f"{name}: expected a dict; the pickle holds a {type(batch).__name__}")
    data, labels = _key(batch, "data"), _key(batch, label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{name}: 'data' must be a uint8 (N, 3072) array; got {got}")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{name}: 'data' rows hold {data.shape[1]} bytes, not 3072 (3x32x32)")
    if labels is None:
        raise DatasetError(f"{name}: no {label_key!r} entry")
    try:
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise DatasetError(f"{name}: {label_key!r} is not a list of ints ({e})") from None
    if len(y) != len(data):
        raise DatasetError(f"{name}: {len(y)} labels for {len(data)} images")
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise DatasetError(
            f"{name}: label {int(y.min() if y.min() < 0 else y.max())} is outside 0-{classes - 1}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), y


def _cifar_spec(name: str) -> dict:
    if name not in CIFAR:
        raise ValueError(f"CIFAR: name must be one of {sorted(CIFAR)}; got {name!r}")
    return CIFAR[name]


def _cifar_dirs(base: Path, name: str) -> list[Path]:
    spec = _cifar_spec(name)
    short, dashed = {"cifar10": ("cifar10", "cifar-10"), "cifar100": ("cifar100", "cifar-100")}[
        name
    ]
    parents = [base, base / short, base / dashed]
    return [p / spec["folder"] for p in parents] + parents


def _folder_verified(d: Path, spec: dict) -> bool:
    """True when ``d`` holds every batch file with its canonical MD5; raises on a wrong one."""
    paths = [d / f for f in spec["train"] + spec["test"]]
    if not all(p.is_file() for p in paths):
        return False
    for p in paths:
        digest = md5sum(p)
        if digest != spec["md5"][p.name]:
            raise DatasetError(
                f"{p}: MD5 {digest} does not match the canonical {spec['md5'][p.name]} "
                f"({spec['title']}); the file is corrupt, truncated or from another release: "
                "delete it and run again"
            )
    return True


def _archive_verified(p: Path, spec: dict) -> bool:
    if not p.is_file():
        return False
    digest = md5sum(p)
    if digest != spec["archive_md5"]:
        raise DatasetError(
            f"{p}: MD5 {digest} does not match the canonical {spec['archive_md5']} "
            f"({spec['title']}); the file is corrupt or truncated: delete it and run again "
            "to download a fresh copy"
        )
    return True


def find_cifar(root: str | os.PathLike | None = None, name: str = "cifar10") -> Path | None:
    """The verified extracted folder (e.g. ``cifar-10-batches-py/``) or archive (``.tar.gz``)
    of ``name`` under ``root`` (default ``$FASTCONV_DATA``, else the cache), or None. Looks in
    root, root/cifar10 (root/cifar100) and root/cifar-10 (root/cifar-100), and in the release's
    folder inside each; an extracted folder wins over an archive."""
    spec = _cifar_spec(name)
    base = Path(root).expanduser() if root is not None else default_root()
    dirs = _cifar_dirs(base, name)
    for d in dirs:
        if _folder_verified(d, spec):
            return d
    for d in dirs:
        if _archive_verified(d / spec["archive"], spec):
            return d / spec["archive"]
    return None


def download_cifar(directory: str | os.PathLike, name: str = "cifar10") -> Path:
    """Download the canonical archive of ``name`` into ``directory`` (temporary name, moved in
    place once its MD5 matches); returns its path."""
    spec = _cifar_spec(name)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / spec["archive"]
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        _download(CIFAR_URL + spec["archive"], Path(tmp))
        digest = md5sum(tmp)
        if digest != spec["archive_md5"]:
            raise DatasetError(
                _cifar_missing(directory, name, [f"{CIFAR_URL}{dest.name}: MD5 {digest}"])
            )
        os.replace(tmp, dest)
    except OSError as e:  # URLError is an OSError
        failure = f"{CIFAR_URL}{dest.name}: {e}"
        raise DatasetError(_cifar_missing(directory, name, [failure])) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def _cifar_missing(directory: Path, name: str, failures: list[str]) -> str:
    spec = _cifar_spec(name)
    lines = [f"{spec['title']} not found and could not be downloaded (offline?).", "Put either"]
    lines.append(
        f"  {spec['archive']}  (md5 {spec['archive_md5']}, from {CIFAR_URL}{spec['archive']})"
    )
    files = ", ".join(spec["train"] + spec["test"])
    lines.append(f"or its extracted folder {spec['folder']}/ ({files}) into {directory},")
    lines.append("or point FASTCONV_DATA (or root=, or --data-dir) at a folder that holds them.")
    if failures:
        lines.append("Download errors: " + "; ".join(failures[:4]))
    return "\n".join(lines)


def _read_cifar_split(
    source: Path, name: str, files: tuple[str, ...], label_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    spec = _cifar_spec(name)
    key, classes = spec["labels"][label_mode], spec["classes"][label_mode]
    xs, ys = [], []
    if source.is_dir():
        for f in files:
            with open(source / f, "rb") as fh:
                x, y = _parse_batch(load_pickle(fh, source / f), source / f, key, classes)
            xs.append(x)
            ys.append(y)
    else:
        try:
            with tarfile.open(source, "r:gz") as tar:
                for f in files:
                    member = f"{spec['folder']}/{f}"
                    where = f"{source}:{member}"
                    try:
                        fh = tar.extractfile(member)
                    except KeyError:
                        fh = None
                    if fh is None:
                        raise DatasetError(f"{source}: no file {member} in the archive")
                    with fh:
                        x, y = _parse_batch(load_pickle(fh, where), where, key, classes)
                    xs.append(x)
                    ys.append(y)
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DatasetError(
                f"{source}: cannot be read as a .tar.gz ({e}); the file is corrupt or "
                "truncated: delete it and download it again"
            ) from None
    return np.concatenate(xs), np.concatenate(ys)


def _check_label_mode(name: str, label_mode: str) -> None:
    modes = tuple(_cifar_spec(name)["labels"])
    if label_mode not in modes:
        raise ValueError(f"{name}: label_mode must be one of {modes}; got {label_mode!r}")


def load_cifar(
    name: str = "cifar10",
    root: str | os.PathLike | None = None,
    *,
    label_mode: str = "fine",
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``) from the canonical
    python-pickle release: the ``.tar.gz`` (read in place) or its extracted folder, found under
    ``root``, else ``$FASTCONV_DATA``, else the cache; MD5-checked; the archive is downloaded
    into the first of those when missing (``download=True``).

    Args:
        label_mode: CIFAR-100's "fine" (100 classes, default) or "coarse" (20 superclasses).

    Returns:
        (x_train, y_train, x_test, y_test).

    Shape:
        x_train (50000, 3, 32, 32) uint8, y_train (50000,) int64, x_test (10000, 3, 32, 32)
        uint8, y_test (10000,) int64.

    Raises:
        DatasetError: files missing (offline; the message says which to put where) or corrupt
            (the message names the file).
    """
    spec = _cifar_spec(name)
    source = _cifar_source(name, root, label_mode, download)
    x_train, y_train = _read_cifar_split(source, name, spec["train"], label_mode)
    x_test, y_test = _read_cifar_split(source, name, spec["test"], label_mode)
    return x_train, y_train, x_test, y_test


def cifar10(
    root: str | os.PathLike | None = None, train: bool = True, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's training (50,000) or test (10,000) split: (uint8 (N, 3, 32, 32), int64 (N,)).
    See ``load_cifar`` for where the files are looked for."""
    return _cifar_split("cifar10", root, train, "fine", download)


def cifar100(
    root: str | os.PathLike | None = None,
    train: bool = True,
    *,
    label_mode: str = "fine",
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-100's training (50,000) or test (10,000) split: (uint8 (N, 3, 32, 32), int64 (N,))
    with the 100 fine labels, or the 20 superclasses with ``label_mode="coarse"``."""
    return _cifar_split("cifar100", root, train, label_mode, download)


def _cifar_split(name, root, train, label_mode, download) -> tuple[np.ndarray, np.ndarray]:
    source = _cifar_source(name, root, label_mode, download)
    return _read_cifar_split(source, name, CIFAR[name]["train" if train else "test"], label_mode)


def _cifar_source(name: str, root, label_mode: str, download: bool) -> Path:
    """The verified folder or archive of ``name``, downloaded into the root when missing."""
    _check_label_mode(name, label_mode)
    base = Path(root).expanduser() if root is not None else default_root()
    source = find_cifar(base, name)
    if source is None:
        if not download:
            raise DatasetError(_cifar_missing(base, name, []))
        source = download_cifar(base, name)
    return source


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images after /255 (float64, in chunks:
    the whole set never exists in float). Shape: x (N, C, H, W) -> two lists of C floats."""
    n, c = x.shape[0], x.shape[1]
    s, ss = np.zeros(c), np.zeros(c)
    for i in range(0, n, chunk):
        b = x[i : i + chunk].astype(np.float64) / 255.0
        s += b.sum(axis=(0, 2, 3))
        ss += np.square(b).sum(axis=(0, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = s / count
    std = np.sqrt(np.maximum(ss / count - mean**2, 0.0))
    return [float(v) for v in mean], [float(v) for v in std]


__all__ = [
    "CIFAR",
    "DatasetError",
    "cache_dir",
    "channel_stats",
    "cifar10",
    "cifar100",
    "download_cifar",
    "download_mnist",
    "find_cifar",
    "find_mnist",
    "load_cifar",
    "load_mnist",
    "load_pickle",
    "read_idx",
]
