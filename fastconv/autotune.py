"""Measured algorithm choice for ``algorithm="auto"``, cached on disk.

The first time a CPU convolution of a given (op, geometry, dtype, threads) runs with
``algorithm="auto"``, every candidate algorithm is timed on the call's own inputs and the fastest
is remembered: in memory, and in a JSON file in the user cache directory so later processes skip
the measurement. ``dispatch.select`` stays pure: it is handed the remembered choice as a value.

- ``FASTCONV_AUTOTUNE=0`` turns measuring off: "auto" then uses the documented heuristic
  (``dispatch.cpu_conv_algorithm``); choices already cached are not used either.
- ``FASTCONV_CACHE_DIR`` moves the cache (default ``$XDG_CACHE_HOME/fastconv`` or
  ``~/.cache/fastconv``). The file name carries a format version, the fastconv version and a
  digest of the CPU kernel sources, so an upgrade or an edited kernel re-tunes.
- Concurrent processes are safe: writers take an exclusive ``flock`` on a lock file, merge with
  what is on disk, write a temporary file and ``os.replace`` it (readers never see half a file).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT = 1
_lock = threading.Lock()
_memory: dict[str, str] | None = None
_memory_path: Path | None = None


def enabled() -> bool:
    return os.environ.get("FASTCONV_AUTOTUNE", "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def cache_dir() -> Path:
    if os.environ.get("FASTCONV_CACHE_DIR"):
        return Path(os.environ["FASTCONV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastconv"


@functools.cache
def kernel_digest() -> str:
    """Short digest of the CPU kernel sources: a changed kernel invalidates old timings."""
    h = hashlib.sha1()
    cpu = Path(__file__).resolve().parent / "kernels" / "cpu"
    if not cpu.is_dir():  # editable installs map fastconv.kernels to the top-level kernels/
        from .kernels import cpu as _cpu

        cpu = Path(_cpu.__file__).parent
    for f in sorted(cpu.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def cache_path() -> Path:
    env = os.environ
    return _cache_path(env.get("FASTCONV_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.lru_cache(maxsize=16)
def _cache_path(*_env: str | None) -> Path:
    """Built once per environment (``_env``: the variables it depends on); the pathlib work
    cost ~40 us, on every convolution call, as much as a small convolution itself."""
    from . import __version__

    return cache_dir() / f"autotune-v{FORMAT}-fastconv{__version__}-{kernel_digest()}.json"


def threads() -> int:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # pragma: no cover
        return os.cpu_count() or 1


def key(op: str, geom: Any, dtype: Any) -> str:
    """One string per (op, geometry, dtype, threads): the unit a choice is remembered for."""
    return _key(op, tuple(geom), dtype, threads())


@functools.lru_cache(maxsize=1024)
def _key(op: str, geom: tuple, dtype: Any, n_threads: int) -> str:
    import numpy as np

    return f"{op}|{geom}|{np.dtype(dtype).name}|t{n_threads}"


def _read(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    choices = data.get("choices", {})
    return {k: v for k, v in choices.items() if isinstance(k, str) and isinstance(v, str)}


def _load() -> dict[str, str]:
    global _memory, _memory_path
    path = cache_path()
    if _memory is None or _memory_path != path:
        _memory, _memory_path = _read(path), path
    return _memory


def lookup(k: str) -> str | None:
    """The remembered choice for key ``k`` (memory first, then the disk cache), or None."""
    with _lock:
        return _load().get(k)


def _write(k: str, choice: str) -> None:
    """Merge one choice into the on-disk cache, atomically and under an exclusive lock."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+") as lockf:
            try:
                import fcntl

                fcntl.flock(lockf, fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - non-POSIX: last writer wins, still atomic
                pass
            merged = _read(path)
            merged[k] = choice
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump({"format": FORMAT, "choices": merged}, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
    except OSError:
        # A read-only or full cache directory only costs re-tuning in the next process.
        pass


def measure(candidates: dict[str, Callable[[], Any]], repeats: int = 7) -> tuple[str, dict]:
    """Time each candidate (one warm-up call each, then ``repeats`` rounds that call every
    candidate once, in turn); the smallest time wins.

    The minimum, not the median: on a shared machine other work only ever adds time, so the
    fastest run is the best estimate of what the algorithm itself costs. In turns, not one
    candidate's calls after the other's: the load on a shared machine drifts over tens of
    milliseconds, and timed in blocks one candidate could get all the quiet moments (LeNet-5's
    conv1 backward was once remembered as im2col, which then ran 1.7x slower than direct).
    """
    for fn in candidates.values():
        fn()  # warm-up: JIT compile or cache load, page faults of fresh workspaces
    times = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    return min(times, key=times.get), times


def choose(k: str, candidates: dict[str, Callable[[], Any]]) -> str:
    """The remembered choice for ``k``, measuring the candidates the first time."""
    hit = lookup(k)
    if hit in candidates:
        return hit
    best, _ = measure(candidates)
    with _lock:
        _load()[k] = best
    _write(k, best)
    return best


def clear() -> None:
    """Forget every choice, in memory and on disk."""
    global _memory
    with _lock:
        _memory = None
        try:
            cache_path().unlink()
        except OSError:
            pass
