"""Two tiers of every parallel CPU kernel: compiled serially first, in parallel on the side.

Why: Numba compiles a ``parallel=True`` kernel 2-4x slower than the same function without it
(the parfor passes type the loop body twice and every caller re-optimises the outlined body):
LeNet-5's conv2d_tiled took 11.5 s of CPU to compile, 5.8 s without ``parallel``. A fresh
install's first train step spent ~29 s compiling.

How: ``parallel_njit(**flags)`` replaces ``@njit(parallel=True, cache=True, **flags)``. The
``Tiered`` kernel it returns holds two dispatchers of one Python function: ``par`` (parallel,
as before) and ``ser`` (the same source, ``prange`` run as ``range``, its own cache entry).
A call whose signature ``par`` has (compiled, or found in Numba's disk cache) runs ``par``.
Otherwise the call runs ``ser`` (compiled now, cheaply) and ``par`` is compiled for that
signature by a background process (``python -m fastconv.kernels.cpu.tiers``, one per
process that needs it, on another core), which writes it to Numba's disk cache; the first
call after it reports back loads it from there and runs ``par`` from then on. A parent that
exits first leaves the worker to finish the builds it asked for (then it exits too), so the
next process finds them cached.

Results do not depend on the tier: every parallel kernel here splits its work by its
arguments (chunks of images, segments of tiles), never by the thread count, and adds partial
results in a fixed order; ``ser`` runs the same work items one after the other, so both tiers
give the same bits (tests/test_tiers.py checks whole training steps). Only the speed differs
(one thread) while ``par`` compiles.

``FASTCONV_JIT_TIERS=0`` compiles ``par`` at once, as before. Tiers are off as well where
Numba cannot cache (the worker's result would be lost) and inside the worker itself. The
autotuner asks ``idle()`` before it times candidates, so it never times a serial tier.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import types as pytypes

from numba import njit

__all__ = ["Tiered", "force", "idle", "parallel_njit", "wait"]

_WORKER_ENV = "FASTCONV_JIT_TIERS_WORKER"
_force: str | None = None  # "serial" / "parallel": every kernel on that tier (``force``)
REGISTRY: dict[tuple[str, str], Tiered] = {}


def enabled() -> bool:
    """Tiering on? (``FASTCONV_JIT_TIERS``, default on; never inside the worker.)"""
    if os.environ.get(_WORKER_ENV):
        return False
    v = os.environ.get("FASTCONV_JIT_TIERS", "1").strip().lower()
    return v not in ("0", "false", "no", "off")


def _serial_copy(fn):
    """``fn`` under another qualified name: Numba's cache files are named by it, and the
    serial build must not share (or overwrite) the parallel build's entries."""
    copy = pytypes.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "__serial", fn.__defaults__, fn.__closure__
    )
    copy.__qualname__ = fn.__qualname__ + "__serial"
    copy.__module__ = fn.__module__
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__doc__ = fn.__doc__
    return copy


def _no_match(e: TypeError) -> bool:
    return "No matching definition" in str(e) or "compilation disabled" in str(e)


class Tiered:
    """A parallel kernel and its serial twin (module docstring). Called like the kernel,
    with positional arguments (defaults are filled in, so a signature is always complete)."""

    def __init__(self, fn, flags: dict) -> None:
        self.py_func = fn
        self.__name__, self.__qualname__ = fn.__name__, fn.__qualname__
        self.__module__, self.__doc__ = fn.__module__, fn.__doc__
        self.__wrapped__ = fn
        self.par = njit(parallel=True, cache=True, **flags)(fn)
        self.ser = njit(cache=True, **flags)(_serial_copy(fn))
        self._nargs = fn.__code__.co_argcount
        self._defaults = fn.__defaults__ or ()
        self._pending: set = set()  # signatures the worker is compiling par for
        self._looked: dict = {}  # signature -> when the cache was last looked in (warm start)
        self._lock = threading.RLock()
        self._tiered = enabled() and _can_cache(self.par)
        if self._tiered:
            self.par._can_compile = False  # unknown signatures raise: see __call__
        REGISTRY[(fn.__module__, fn.__name__)] = self

    # -- calls
    def __call__(self, *args):
        if len(args) < self._nargs:  # fill defaults: one signature per call shape
            missing = self._nargs - len(args)
            args = args + self._defaults[len(self._defaults) - missing :]
        if _force is None:
            try:
                return self.par(*args)
            except TypeError as e:
                if not self._tiered or not _no_match(e):
                    raise
            return self._slow(args)
        if _force == "serial":
            return self.ser(*args)
        sig = tuple(self.par.typeof_pyval(a) for a in args)
        if not self._load(sig):
            self._compile_here(sig)
        return self.par(*args)

    def _slow(self, args):
        sig = tuple(self.par.typeof_pyval(a) for a in args)
        with self._lock:
            if sig not in self._pending and _warm_busy():
                # the warm-start worker compiles this par (fastconv/_warm.py): load it once
                # it is in the cache (looked for at most twice a second), ser until then
                now = time.monotonic()
                if now - self._looked.get(sig, -1.0) >= 0.5:
                    self._looked[sig] = now
                    if self._load(sig):
                        return self.par(*args)
                return self.ser(*args)
            if sig not in self._pending:
                if self._load(sig):
                    return self.par(*args)
                if not _submit(self, sig):  # no worker: compile par here, as before
                    self._compile_here(sig)
                    return self.par(*args)
                self._pending.add(sig)
        poll()
        with self._lock:
            ready = sig not in self._pending
        if ready:
            return self.par(*args)
        if tuple(sig) not in self.ser.overloads:  # the worker may be compiling it: wait
            _await((self.py_func.__module__, self.py_func.__name__), "ser", sig)
        return self.ser(*args)

    # -- the parallel tier
    def _load(self, sig) -> bool:
        """Load par for ``sig`` from Numba's disk cache, if there (no compiling)."""
        from numba.core.compiler_lock import global_compiler_lock

        par = self.par
        with global_compiler_lock:
            if tuple(sig) in par.overloads:
                return True
            try:
                cres = par._cache.load_overload(sig, par.targetctx)
            except Exception:  # noqa: BLE001 - an unreadable entry: compile instead
                cres = None
            if cres is None:
                return False
            if not cres.objectmode:
                par.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            par.add_overload(cres)
            return True

    def _compile_here(self, sig) -> None:
        par = self.par
        par._can_compile = True
        try:
            par.compile(sig)
        finally:
            par._can_compile = not self._tiered

    def _ready(self, sig, ok: bool) -> None:
        """The worker has finished ``sig`` (``ok``: compiled and cached)."""
        with self._lock:
            if sig not in self._pending:
                return
            try:
                if not (ok and self._load(sig)):
                    self._compile_here(sig)  # the worker failed or could not cache: here, now
            finally:  # compiled, or its error raised here: either way no longer pending
                self._pending.discard(sig)

    def __repr__(self) -> str:
        return f"<Tiered kernel {self.__module__}.{self.__qualname__}>"


def parallel_njit(**flags):
    """Decorator: a ``Tiered`` kernel (module docstring) of ``njit(parallel=True,
    cache=True, **flags)``."""

    def deco(fn):
        return Tiered(fn, flags)

    return deco


@contextlib.contextmanager
def force(tier: str):
    """Run every tiered kernel on one tier inside the block: "serial" or "parallel" (the
    parallel tier compiled here where needed). For tests and measurements."""
    global _force
    if tier not in ("serial", "parallel"):
        raise ValueError(f"tiers.force: tier must be 'serial' or 'parallel', got {tier!r}")
    old, _force = _force, tier
    try:
        yield
    finally:
        _force = old


def _can_cache(dispatcher) -> bool:
    cache = getattr(dispatcher, "_cache", None)
    return cache is not None and type(cache).__name__ != "NullCache"


# --------------------------------------------------------------------------- the worker


class _Worker:
    """The background compiler process and a thread that reads its replies."""

    def __init__(self) -> None:
        env = dict(os.environ)
        env[_WORKER_ENV] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastconv.kernels.cpu.tiers"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("FASTCONV_JIT_TIERS_DEBUG") else subprocess.DEVNULL,
            env=env,
        )
        self.replies: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="fastconv-jit-tiers", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        out = self.proc.stdout
        try:
            while True:
                self.replies.put(pickle.load(out))
        except Exception:  # noqa: BLE001 - EOF or a dead worker: fall back to compiling here
            pass
        self.replies.put(None)

    def send(self, key, sig) -> bool:
        try:
            pickle.dump((key, sig), self.proc.stdin)
            self.proc.stdin.flush()
        except (OSError, ValueError, pickle.PicklingError):
            return False
        return True

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass


_worker: _Worker | None = None
_worker_lock = threading.Lock()
_worker_dead = False


def _submit(kernel: Tiered, sig) -> bool:
    """Ask the worker to compile ``kernel.par`` for ``sig``; False where there is none."""
    global _worker, _worker_dead
    with _worker_lock:
        if _worker_dead:
            return False
        if _worker is None:
            try:
                _worker = _Worker()
            except OSError:
                _worker_dead = True
                return False
            atexit.register(_worker.close)
        return _worker.send((kernel.py_func.__module__, kernel.py_func.__name__), sig)


_current = None  # (key, tier, sig) the worker is compiling now, from its "start" message


def _after_fork_in_child() -> None:
    """A fork()ed child shares its parent's pipes but not the reader thread: it forgets the
    worker (its kernels still waiting are looked up again, and a worker of its own started,
    at their next call)."""
    global _worker, _worker_dead, _current, _worker_lock
    _worker, _worker_dead, _current = None, False, None
    _worker_lock = threading.Lock()
    for k in REGISTRY.values():
        k._pending.clear()
        k._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _handle(msg) -> None:
    global _worker_dead, _current
    if msg is None:  # the worker is gone: compile what it still owed here
        _worker_dead, _current = True, None
        for k in list(REGISTRY.values()):
            for sig in list(k._pending):
                k._ready(sig, False)
        return
    what, key, tier, sig = msg[:4]
    if what == "start":
        _current = (tuple(key), tier, sig)
        return
    _current = None
    if tier == "par":
        k = REGISTRY.get(tuple(key))
        if k is not None:
            k._ready(sig, msg[4])


def _await(key, tier: str, sig) -> None:
    """If the worker is compiling (key, tier, sig) right now, wait for it (then the caller
    loads it from the cache instead of compiling it a second time)."""
    poll()
    w = _worker
    while w is not None and _current == (key, tier, sig):
        try:
            msg = w.replies.get(timeout=60)
        except queue.Empty:
            return
        _handle(msg)


def poll() -> None:
    """Take in whatever the worker has finished (never waits)."""
    w = _worker
    if w is None:
        return
    while True:
        try:
            msg = w.replies.get_nowait()
        except queue.Empty:
            return
        _handle(msg)


def idle() -> bool:
    """No parallel tier still compiling (after taking in the worker's replies), here or in
    the warm-start worker."""
    poll()
    return not any(k._pending for k in REGISTRY.values()) and not _warm_busy()


def _warm_busy() -> bool:
    from ... import _warm

    return _warm.busy()


def wait(timeout: float | None = None) -> bool:
    """Block until every parallel tier asked for so far is loaded. False on timeout."""
    import time

    end = None if timeout is None else time.monotonic() + timeout
    while not idle():
        w = _worker
        if w is None:
            return idle()
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            return False
        try:
            msg = w.replies.get(timeout=left)
        except queue.Empty:
            return False
        _handle(msg)
    return True


# --------------------------------------------------------------------------- the manifest
# The kernels and signatures a float32 MNIST-sized training run compiles on its first steps,
# in order (``python -m fastconv.kernels.cpu.tiers --record``). A fresh worker compiles their
# serial tiers (and plain kernels) from the end of the list while the parent compiles from
# the start: the first step's compiling is shared by two cores. A manifest from another
# Numba version is not used (signatures are pickled Numba types).

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiers_manifest.json")


def _resolve(module: str, name: str, tier: str):
    obj = getattr(importlib.import_module(module), name)
    if tier in ("ser", "par"):
        return getattr(obj, tier)
    return obj


def manifest(path: str = MANIFEST) -> list:
    """[(module, name, tier, signature, step)] from the manifest (in the order the recording
    compiled them; ``step``: the training step that needed it), or [] where it does not
    apply."""
    import base64
    import json

    import numba

    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("numba") != numba.__version__:
            return []
        return [
            (m, n, t, pickle.loads(base64.b64decode(s)), k) for m, n, t, s, k in data["entries"]
        ]
    except Exception:  # noqa: BLE001 - no usable manifest: nothing to guess ahead
        return []


def _record(out: str) -> None:
    """Write the manifest: run small float32 training steps with empty caches and list the
    kernels compiled at the top level, in order. Runs in a fresh process (``--record``)."""
    import base64
    import json

    import numba
    import numpy as np
    from numba.core import event

    import fastconv as fc

    seen, entries, depth, step = set(), [], [0], [1]

    def locate(d):
        if d.py_func.__name__.endswith("__serial"):
            for (m, n), k in REGISTRY.items():
                if k.ser is d:
                    return m, n, "ser"
        mod = importlib.import_module(d.py_func.__module__)
        for n, obj in vars(mod).items():
            if obj is d:
                return d.py_func.__module__, n, "plain"
            if isinstance(obj, Tiered) and obj.par is d:
                return d.py_func.__module__, n, "par"
        return None

    class Listener(event.Listener):
        def on_start(self, ev):
            depth[0] += 1
            if depth[0] == 1:
                d = ev.data["dispatcher"]
                if d.py_func.__module__.startswith(__package__ or "fastconv.kernels.cpu"):
                    where = locate(d)
                    sig = tuple(ev.data["args"])
                    if where is not None and (where, sig) not in seen:
                        seen.add((where, sig))
                        entries.append((*where, sig, step[0]))

        def on_end(self, ev):
            depth[0] -= 1

    event.register("numba:compile", Listener())
    rng = np.random.default_rng(0)
    for name, batch in (("lenet5", 64), ("mnist_cnn", 8)):
        x = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        labels = rng.integers(0, 10, batch)
        model = fc.models.MODELS[name](rng=0)
        opt = fc.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        loss_fn = fc.CrossEntropyLoss()
        for step[0] in (1, 2, 3):  # the autotuner's other candidate compiles at the 2nd step
            loss = loss_fn(model(fc.Tensor(x)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            wait()
        model.eval()
        with fc.no_grad():
            model(x)
    data = {
        "numba": numba.__version__,
        "made_by": "python -m fastconv.kernels.cpu.tiers --record",
        "entries": [
            [m, n, t, base64.b64encode(pickle.dumps(sig)).decode(), k]
            for m, n, t, sig, k in entries
        ],
    }
    with open(out + ".tmp", "w") as f:
        json.dump(data, f, indent=0)
    os.replace(out + ".tmp", out)
    print(f"{len(entries)} kernels recorded in {out}")


# --------------------------------------------------------------------------- the worker's side


def _serve() -> None:
    """The worker: first the manifest's serial tiers and plain kernels, from its end (skipped
    quickly where already cached), then every (kernel, signature) the parent sends: replies
    ("start", key, tier, sig) and ("done", key, tier, sig, ok). When the parent has gone, it
    still finishes the parallel builds it was asked for (no guesses ahead any more): the next
    process finds them in the cache instead of starting on serial kernels again."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    from . import blas

    blas.available()  # the GEMM symbols the kernels call, registered as in the parent
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            while True:
                inbox.put(pickle.load(inp))
        except Exception as e:  # noqa: BLE001 - EOF: the parent is gone
            if not isinstance(e, EOFError) and os.environ.get("FASTCONV_JIT_TIERS_DEBUG"):
                print("tiers worker: reading failed:", repr(e), file=sys.stderr, flush=True)
            inbox.put(None)

    threading.Thread(target=read, daemon=True).start()
    # the first step's kernels from the last one back (the parent starts at the first), then
    # the second step's (the autotuner's other candidates), ...
    listed = manifest()
    order = sorted(range(len(listed)), key=lambda i: (listed[i][4], -i))
    ahead = [listed[i][:4] for i in order if listed[i][2] in ("ser", "plain")]
    if os.environ.get("FASTCONV_TIERS_RECORDING"):
        ahead = []  # recording: the parent must compile (and list) everything itself
    asked: list = []
    parent = [True]  # still there to read replies

    def say(*msg) -> None:
        if parent[0]:
            try:
                pickle.dump(msg, out)
                out.flush()
            except OSError:  # the parent is gone
                parent[0] = False

    eof = False  # the parent's end of the pipe closed: nothing more will be asked
    while True:
        while not eof:  # take in what the parent sent, without waiting
            try:
                m = inbox.get_nowait()
            except queue.Empty:
                break
            if m is None:
                eof = True
            else:
                asked.append(m)
        if eof or not parent[0]:
            ahead.clear()  # nobody to guess for; finish what was asked, then stop
        if ahead:
            module, name, tier, sig = ahead.pop(0)
        elif asked:
            (module, name), sig = asked.pop(0)
            tier = "par"
        elif eof:
            return
        else:
            m = inbox.get()
            if m is None:
                eof = True
            else:
                asked.append(m)
            continue
        key = (module, name)
        say("start", key, tier, sig)
        ok = False
        try:
            _resolve(module, name, tier).compile(sig)
            ok = True
        except Exception:  # noqa: BLE001 - reported; the parent compiles it itself
            if os.environ.get("FASTCONV_JIT_TIERS_DEBUG"):
                import traceback

                traceback.print_exc()
        say("done", key, tier, sig, ok)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record"]:
        import tempfile

        # fresh caches, then the real module (this file runs as __main__)
        if not os.environ.get("FASTCONV_TIERS_RECORDING"):
            env = dict(os.environ, FASTCONV_TIERS_RECORDING="1")
            env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastconv-record-")
            env["FASTCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastconv-record-")
            out = sys.argv[2] if len(sys.argv) > 2 else MANIFEST
            sys.exit(subprocess.call([sys.executable, "-m", "fastconv.kernels.cpu.tiers",
                                      "--record", out], env=env))
        from fastconv.kernels.cpu import tiers as _real

        _real._record(sys.argv[2])
    else:
        _serve()
