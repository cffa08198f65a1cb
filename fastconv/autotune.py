"""Measured algorithm choice for ``algorithm="auto"``, cached on disk.

A CPU convolution of a given (op, geometry, dtype, threads) has two candidate algorithms (a
backward pass asked for grad_x and grad_w has four: either algorithm, or grad_x by one and
grad_w by the other, ``dispatch.PAIRS``). The fastest, timed on the call's own inputs, is
remembered: in a JSON file in the user cache directory, so later processes use it at once.
``dispatch.select`` stays pure: it is handed the remembered choice as a value.

When nothing is remembered yet, the first call does not wait for the measurement: timing both
candidates means compiling both first, which took ~20 s of a fresh install's first LeNet-5
step. Instead (the default, ``FASTCONV_AUTOTUNE=1``):

1. the first call runs the documented heuristic's choice (``dispatch.cpu_conv_algorithm``), and
   this process keeps that choice for the key from then on: the results of a run never depend
   on when a measurement finished, so seeded runs in one process reproduce bit for bit;
2. the key's second call (a training loop's second step: every kernel of the first step is
   compiled by then) runs the other candidate once on that call's inputs, only to compile it
   (the result is dropped; inline, see ``_background_ok`` for why not on another thread);
3. the first call after that has finished times both candidates in turns, in the calling
   thread (each is compiled by then: milliseconds), and writes the winner to the cache for
   every later process; unless other processes took more than a quarter of a core meanwhile
   (``/proc``'s counters): then the key's next call measures again, up to ``QUIET_TRIES``
   times, and the last measurement is written whatever the load.

- ``FASTCONV_AUTOTUNE=eager`` measures on the first call, as earlier versions did, and uses
  the winner at once (both candidates are compiled before that call returns).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _env

FORMAT = 1
WARM_AT = 2  # a deferred key's call that starts compiling the other candidate (see above)
_lock = threading.Lock()
_memory: dict[str, str] | None = None
_memory_path: Path | None = None


def enabled() -> bool:
    return mode() != "off"


def mode() -> str:
    """The tuning mode: "off", "eager" (measure on the first call) or "deferred" (the
    default; module docstring)."""
    v = _env.get("FASTCONV_AUTOTUNE", "1").strip().lower()
    if v in ("0", "false", "no", "off"):
        return "off"
    return "eager" if v == "eager" else "deferred"


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
    get = _env.get
    return _cache_path(get("FASTCONV_CACHE_DIR"), get("XDG_CACHE_HOME"), get("HOME"))


@functools.lru_cache(maxsize=16)
def _cache_path(*_env: str | None) -> Path:
    """Built once per environment (``_env``: the variables it depends on); the pathlib work
    cost ~40 us, on every convolution call, as much as a small convolution itself."""
    from . import __version__

    return cache_dir() / f"autotune-v{FORMAT}-fastconv{__version__}-{kernel_digest()}.json"


_num_threads: list = []  # the CPU backend's thread count (an import inside threads() cost 3 us)


def threads() -> int:
    try:
        if not _num_threads:
            from .kernels.cpu.threads import num_threads

            _num_threads.append(num_threads)
        return _num_threads[0]()
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
    if _memory is None or (path is not _memory_path and path != _memory_path):
        _memory, _memory_path = _read(path), path
    return _memory


def lookup(k: str) -> str | None:
    """The remembered choice for key ``k`` (memory first, then the disk cache), or None.

    None as well for a key this process runs on its deferred first choice: ``choose`` answers
    for it (and moves its measurement along)."""
    with _lock:
        if k in _deferred:
            return None
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


QUIET_TRIES = 3  # measurements of one key dropped as disturbed before one is kept anyway
OTHERS_MAX = 0.25  # other work, in cores, during the timed rounds that marks them disturbed
_disturbed = [False]  # whether the last ``measure`` was (read right after it returns)


def _cpu_ticks() -> tuple[int, int] | None:
    """(CPU ticks the whole machine has spent busy, or stolen by the hypervisor; ticks this
    process has spent, all its threads), from /proc. None where there is none: every
    measurement then counts as undisturbed."""
    try:
        with open("/proc/stat", "rb") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        with open("/proc/self/stat", "rb") as f:
            own = f.read().rsplit(b")", 1)[1].split()
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def _others_busy(before, after, seconds: float) -> bool:
    """Did other processes use more than OTHERS_MAX of a core over ``seconds``? (At least 2
    ticks of theirs: the counters move in whole ticks, 10 ms on Linux.)"""
    if before is None or after is None:
        return False
    others = (after[0] - before[0]) - (after[1] - before[1])
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return others > max(2.0, OTHERS_MAX * seconds * tick)


def measure(candidates: dict[str, Callable[[], Any]], repeats: int = 7) -> tuple[str, dict]:
    """Time each candidate (one warm-up call each, then ``repeats`` rounds that call every
    candidate once, in turn); the smallest time wins. Whether other processes took CPU time
    meanwhile is left in ``_disturbed[0]``: a background compile on one of two cores made
    LeNet-5's batch-256 conv2 backward remember im2col, then 1.6x slower than direct alone
    (+23 % on the step), so ``choose`` keeps no disturbed result while it can measure again.

    The minimum, not the median: on a shared machine other work only ever adds time, so the
    fastest run is the best estimate of what the algorithm itself costs. In turns, not one
    candidate's calls after the other's: the load on a shared machine drifts over tens of
    milliseconds, and timed in blocks one candidate could get all the quiet moments (LeNet-5's
    conv1 backward was once remembered as im2col, which then ran 1.7x slower than direct).
    """
    for fn in candidates.values():
        fn()  # warm-up: JIT compile or cache load, page faults of fresh workspaces
    _tiers_wait()  # never time a kernel's serial tier (kernels/cpu/tiers.py)
    times = {name: float("inf") for name in candidates}
    ticks, start = _cpu_ticks(), time.perf_counter()
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
    _disturbed[0] = _others_busy(ticks, _cpu_ticks(), time.perf_counter() - start)
    return min(times, key=times.get), times


@dataclass
class _Deferred:
    """A key first met with nothing remembered, in deferred mode (module docstring)."""

    choice: str  # what this process runs for the key, whatever the measurement says
    calls: int = 1
    dropped: int = 0  # disturbed measurements not kept
    compiled: threading.Event = field(default_factory=threading.Event)
    state: str = "waiting"  # -> "compiling" -> "measured" (or "failed")


_deferred: dict[str, _Deferred] = {}
_queue: list[Callable[[], Any]] = []  # warm-up calls for the background thread, in order
_worker: threading.Thread | None = None
_idle = threading.Condition(_lock)


def choose(k: str, candidates: dict[str, Callable[[], Any]], default: str | None = None) -> str:
    """The algorithm for key ``k``: the remembered choice; else, with a ``default`` (the
    heuristic's choice) in deferred mode, that default while the measurement is prepared in
    the background (module docstring); else the candidates are measured now."""
    hit = lookup(k)
    if hit in candidates:
        return hit
    if default is None or default not in candidates or mode() != "deferred":
        for _ in range(QUIET_TRIES + 1):  # measured now: again at once while disturbed
            _disturbed[0] = False
            best, _ = measure(candidates)
            if not _disturbed[0]:
                break
        with _lock:
            _load()[k] = best
        _write(k, best)
        return best
    with _lock:
        d = _deferred.get(k)
        if d is None:
            _deferred[k] = _Deferred(default)
            return default
        d.calls += 1
        start = d.state == "waiting" and d.calls >= WARM_AT and not _warm_busy()
        if start:
            d.state = "compiling"
        ready = d.state == "compiling" and d.compiled.is_set() and _tiers_idle()
        if ready:
            d.state = "measured"
    if start:
        others = [fn for name, fn in candidates.items() if name != d.choice]
        _warm_up(others, d.compiled)
    elif ready:
        _disturbed[0] = False
        best, _ = measure(candidates)  # both compiled by now: milliseconds
        if _disturbed[0] and d.dropped < QUIET_TRIES:
            with _lock:  # other work had the CPU: measured again at the key's next call
                d.dropped += 1
                d.state = "compiling"
        else:  # for later processes; this one keeps d.choice (reproducible runs)
            _write(k, best)
    return d.choice


def _warm_busy() -> bool:
    """Is the warm-start worker still compiling (the other candidates among its calls)? Then
    compiling them here would only do its work twice (``fastconv/_warm.py``)."""
    from . import _warm

    return _warm.busy()


def _tiers_idle() -> bool:
    """Every parallel kernel compiled so far loaded (not still on its serial tier)?"""
    try:
        from .kernels.cpu import tiers
    except ImportError:  # pragma: no cover
        return True
    return tiers.idle()


def _tiers_wait() -> None:
    try:
        from .kernels.cpu import tiers
    except ImportError:  # pragma: no cover
        return
    tiers.wait()


def _background_ok() -> bool:
    """Whether the other candidate may compile on a background thread. Not at present: the
    candidates' BLAS calls run under threadpoolctl limits, which are process-wide, so a
    candidate running on another thread changed the BLAS thread count of GEMMs on the
    training thread, and a seeded run in one process no longer gave the same bits twice
    (tests/test_training.py). The warm-up then runs inline, at the key's second call: later
    than the first step, which it no longer delays. (Parallel kernels could run on two Python
    threads with the OpenMP and TBB layers; the workqueue layer aborts on a concurrent launch.)
    """
    return False


def _warm_up(calls: list[Callable[[], Any]], done: threading.Event) -> None:
    """Run ``calls`` once each (compiling their kernels; results dropped), then set ``done``:
    on the background thread where that is safe, else here and now."""

    def job() -> None:
        try:
            for fn in calls:
                fn()
        except Exception:  # noqa: BLE001 - a failed warm-up only leaves the key untimed
            pass
        finally:
            done.set()

    if not _background_ok():
        job()
        return
    global _worker
    with _lock:
        _queue.append(job)
        if _worker is None:
            _worker = threading.Thread(target=_work, name="fastconv-autotune", daemon=True)
            _worker.start()


def _work() -> None:
    global _worker
    while True:
        with _lock:
            if not _queue:
                _worker = None
                _idle.notify_all()
                return
            job = _queue.pop(0)
        job()


def wait(timeout: float | None = None) -> bool:
    """Block until the background warm-ups queued so far have run (tests, benchmarks).
    False on timeout."""
    with _idle:
        return _idle.wait_for(lambda: _worker is None, timeout)


def _after_fork_in_child() -> None:
    """A fork()ed child has no worker thread (and maybe a lock held at fork time)."""
    global _lock, _idle, _worker
    _lock = threading.Lock()
    _idle = threading.Condition(_lock)
    _worker = None
    _queue.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def clear() -> None:
    """Forget every choice, in memory and on disk."""
    global _memory
    wait()
    with _lock:
        _memory = None
        _deferred.clear()
        try:
            cache_path().unlink()
        except OSError:
            pass
