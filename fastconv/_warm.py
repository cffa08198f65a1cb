"""Warm start: on a cold Numba cache, ops run on the NumPy oracle while a background process
compiles their CPU kernels; the process switches to the kernels once they are ready.

Why: a fresh install compiles its kernels for this CPU before the first CPU step can run;
Numba's front end (typing, lowering) takes ~17 s of CPU for LeNet-5's first train step on a
2-core EPYC (tiers.py already compiles the serial tier first, and on two processes), and it
is not the LLVM optimisation level. Nothing runs meanwhile. ``fastconv.reference`` computes
every op from its definition in NumPy (float64 inside, results in the input dtype): 10-50x
slower than the kernels, but it needs no compiling, so training starts at once.

How: the first CPU call of a process (backend "auto", no ``using``/``FASTCONV_BACKEND``
override, host arrays) looks in Numba's disk cache for the kernels of a first training step
(the tiers manifest). Where none of them is there, the process is *warming*: every registry op
(``ops.apply``) and optimizer update whose backend would be the CPU by default runs on the
oracle instead, and its call -- op name, attributes, and each array's shape, dtype and
layout (never the values) -- goes once to a worker process (``_serve``),
which runs the same CPU op (forward and, where gradients are wanted, backward) on random
arrays of those specifications: the kernels compile, on another core, into Numba's disk
cache (serial tiers, as ``tiers.force("serial")``; the parallel tiers then come from tiers.py's
own worker, as on any process). Convolutions run first with the heuristic's algorithm, and
both algorithms later on (what the autotuner will time). When the worker has finished every
call sent so far, the process stops warming for good: later calls run the CPU kernels, loaded
from the cache. A call the worker could not run is compiled in the process when it is next
made, as without warm start. Where the oracle is slow (a step, from the first call sent to
its next call, over ``ORACLE_STEP_MAX``: larger networks), warming would cost more than it
gives, as only one core compiles meanwhile: the process then stops warming after that first
step and compiles its kernels itself, from its first call on, while the worker takes its
calls from the last one back (then the parallel tiers): two cores compile, as without warm
start, and the first step still came at once.

What it changes: only speed, and the rounding of the first steps: the oracle's results are the
exact definition rounded once to float32 where the kernels sum in float32, so a cold run's
weights differ from a warm-cache run's in the last bits (each is checked against the oracle:
tests/test_warm.py). ``FASTCONV_WARM_START=0`` turns it off (the first calls then wait for
their kernels, bit-for-bit as on a warm cache); the tests and the benchmarks that time
kernels run with it off. ``fastconv.wait_for_kernels()`` blocks until the kernels are in use.
Explicit ``backend="cpu"`` (argument, ``using`` or ``FASTCONV_BACKEND``) always runs the
kernels.
"""

from __future__ import annotations

import atexit
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

ENV = "FASTCONV_WARM_START"
_WORKER_ENV = "FASTCONV_WARM_START_WORKER"

_state: str | None = None  # None: not decided; "off"; "warming"; "done"
_lock = threading.RLock()
_sent: set = set()  # keys of the calls sent to the worker
_pending: set = set()  # ... not finished yet
_worker: _Worker | None = None
_t0 = 0.0  # when warming began (time.monotonic)
_heard = [0]  # calls the worker had received when it last said it was idle
_first = [None, None, 0]  # the first call sent, when it was last made, steps seen since
# The longest oracle step worth warming for (seconds). A step on the oracle is 6-20x a compiled
# one, and while warming only one core compiles: measured on a 2-core EPYC (AVX2), LeNet-5
# batch 64 (0.11 s oracle steps) reached step 200 as soon as without warm start (21.1 vs 21.0
# s), resnet8 batch 128 (~2 s steps) step 50 6 s later (42.5 vs 36.5 s). A second step slower
# than this (or a first one 4x slower) makes the process compile too (``_share``).
ORACLE_STEP_MAX = 0.25
_gone = [False]  # the worker has exited
NOTICE = (
    "fastconv: compiling kernels for this CPU in the background, once (later runs load them "
    "from Numba's cache); until they are ready, steps run on the NumPy reference path, slower"
)


def enabled() -> bool:
    """Warm start allowed here? (``FASTCONV_WARM_START``, default on; never in the worker.)"""
    if os.environ.get(_WORKER_ENV):
        return False
    v = os.environ.get(ENV, "1").strip().lower()
    return v not in ("0", "false", "no", "off")


def state() -> str:
    """"off", "warming", "done" or "undecided" (no CPU call yet)."""
    return _state or "undecided"


# --------------------------------------------------------------------------- is the cache cold?


def _cached(dispatcher, sig) -> bool:
    """Is ``sig`` of ``dispatcher`` in memory or in Numba's disk cache (its index, for the
    current source)? Reads the index only: nothing is loaded or compiled."""
    if tuple(sig) in dispatcher.overloads:
        return True
    cache = getattr(dispatcher, "_cache", None)
    index = cache._cache_file._load_index()  # {} when missing or stale
    return any(key[0] == tuple(sig) for key in index)


def cold() -> bool:
    """Is the cache cold: none of the kernels of a first MNIST training step in it (the tiers
    manifest's first-step entries), as on a fresh install or after an upgrade? A cache that
    holds any of them has served this install before, most likely with the kernels this
    process needs (resnet8's run shares the tiled convolution with LeNet-5's but not its fused
    pooling): the oracle would then only slow the first steps. Any error reading the
    manifest counts as warm: warm start stays out of the way."""
    try:
        from .kernels.cpu import tiers

        entries = [e for e in tiers.manifest() if e[4] == 1]
        if not entries:
            return False
        for module, name, tier, sig, _ in entries:
            d = tiers._resolve(module, name, tier)
            if not tiers._can_cache(d):
                return False  # no disk cache: the worker's results would be lost
            if _cached(d, sig):
                return False
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- the main side


def _default_cpu(backend: str, arrays) -> bool:
    """Would this call run on the CPU only because nothing asked otherwise?"""
    if backend != "auto" or os.environ.get("FASTCONV_BACKEND"):
        return False
    from . import dispatch, ops

    ctx = dispatch._override.get() or {}
    if ctx.get("backend", "auto") != "auto":
        return False
    return not ops._on_device(arrays)


def route(backend: str, arrays) -> bool:
    """Run this call on the oracle (the process is warming and the CPU is only the default)?
    Decides, on the first call, whether the process warms at all."""
    global _state
    s = _state
    if s in ("off", "done"):
        return False
    if not _default_cpu(backend, arrays):
        return False
    with _lock:
        if _state is None:
            _state = "warming" if enabled() and cold() else "off"
            if _state == "warming":
                _begin()
        if _state != "warming":
            return False
        _poll()
        return _state == "warming"


def _begin() -> None:
    global _worker, _t0, _state
    _t0 = time.monotonic()
    try:
        _worker = _Worker()
    except OSError:
        _state = "off"
        return
    atexit.register(_worker.close)
    _blas(True)
    from . import _jit_notice

    if _jit_notice.is_armed():  # the CLI and fit say so (arm() does, if called later)
        _jit_notice.say(NOTICE)


def offer(kind: str, name: str, args: tuple, extra: Any = None) -> None:
    """Send one call (``kind`` "op" or "update") to the worker, once per specification. Never
    raises: a call that cannot be described ends warming (it and every later call then run
    the kernels, compiled here where the worker has not compiled them), so that no call stays
    on the oracle for want of a worker that knows about it."""
    try:
        spec = (kind, name, _describe(args), extra)
        key = pickle.dumps(spec, protocol=4)
    except Exception:  # noqa: BLE001 - an argument that does not pickle
        with _lock:
            _finish()
        return
    with _lock:
        if _state != "warming":
            return
        if key in _sent:
            if key == _first[0] and _first[1] is not None:  # the next step begins
                now = time.monotonic()
                took, steps = now - _first[1], _first[2] + 1
                # the first step also pays one-time costs (imports, first calls): judged
                # by itself only when clearly slow, else by the second
                if took > ORACLE_STEP_MAX * (4 if steps == 1 else 1):
                    _share(took)
                _first[1:] = [now, steps] if steps == 1 else [None, steps]
            return
        if _first[0] is None:
            _first[:] = [key, time.monotonic(), 0]
        _sent.add(key)
        _pending.add(key)
        if not _worker.send(key):
            _finish()


def _share(took: float) -> None:
    """The oracle is too slow for this network: stop warming, compile here from the first
    call on while the worker compiles from its last (then the parallel tiers, as before)."""
    global _state
    _worker.send("reverse")
    _state = "done"
    _blas(False)
    from . import _jit_notice

    if _jit_notice.is_armed():
        _jit_notice.say(
            f"fastconv: a step on the NumPy reference path took {took:.1f} s: compiling the "
            "kernels here as well (once)",
            once=False,
        )


def _poll(block: float | None = None) -> None:
    """Take in the worker's replies (waiting up to ``block`` seconds for one); stop warming when
    nothing is pending."""
    w = _worker
    while w is not None and (_pending or (block is None and not _gone[0])):
        try:
            msg = w.replies.get(timeout=block) if block else w.replies.get_nowait()
        except queue.Empty:
            break
        block = None
        if msg is None:  # the worker is gone: what it owed compiles here, when called
            _pending.clear()
            _gone[0] = True
        elif msg[0] == "idle":
            _heard[0] = msg[1]
        else:
            _pending.discard(msg[1])
    if _sent and not _pending:
        _finish()


_blas_held = False


def _blas(hold: bool) -> None:
    """NumPy's BLAS on one thread while warming: the oracle's products then leave the other
    core to the compiling worker (on 2 cores, two BLAS threads slowed both 2-4x)."""
    global _blas_held
    if hold == _blas_held:
        return
    try:
        from .kernels.cpu import threads

        (threads._blas_single_enter if hold else threads._blas_single_exit)()
        _blas_held = hold
    except Exception:  # noqa: BLE001 - no threadpoolctl handle: BLAS keeps its threads
        pass


def _finish() -> None:
    global _state
    if _state == "warming":
        _state = "done"
        _blas(False)
        from . import _jit_notice

        if _jit_notice.is_armed():
            _jit_notice.say(
                f"fastconv: compiled kernels in use after {time.monotonic() - _t0:.1f} s",
                once=False,
            )


def disable() -> None:
    """No oracle for this process's calls from now on (data-parallel ranks: every rank must
    update its replica with the same kernels); a warm start under way ends here, and what
    the worker has not compiled yet compiles where it is called."""
    global _state
    with _lock:
        if _state is None:
            _state = "off"
        elif _state == "warming":
            _finish()


def busy() -> bool:
    """Is the worker still compiling for this process (after the switch: the parallel tiers
    and the convolutions' other algorithms)? Meanwhile tiers.py loads the parallel tiers it
    writes instead of compiling them again, and the autotuner neither compiles the other
    candidates itself nor times anything."""
    if _worker is None or _gone[0]:
        return False
    with _lock:
        _poll()
        return _state == "warming" or (not _gone[0] and _heard[0] < len(_sent))


def wait(timeout: float | None = None, idle: bool = False) -> bool:
    """Block until this process runs its CPU kernels (warm start over, or never begun); with
    ``idle``, until the worker has also compiled their parallel tiers and the other
    algorithms (``busy()`` False). False on timeout."""
    end = None if timeout is None else time.monotonic() + timeout
    with _lock:
        while _state == "warming" or (idle and busy()):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            if not _sent:  # warming, but nothing asked yet: nothing to wait for
                _finish()
                break
            _poll(block=min(left, 1.0) if left is not None else 1.0)
    return True


class _Worker:
    def __init__(self) -> None:
        env = dict(os.environ)
        env[_WORKER_ENV] = "1"
        env["FASTCONV_AUTOTUNE"] = "0"  # it compiles the candidates; the parent times them
        env["FASTCONV_JIT_TIERS"] = "0"  # serial tiers only (tiers.force), no worker of its own
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from fastconv._warm import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if os.environ.get("FASTCONV_WARM_START_DEBUG") else subprocess.DEVNULL,
            env=env,
        )
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, name="fastconv-warm-start", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                self.replies.put(pickle.load(self.proc.stdout))
        except Exception:  # noqa: BLE001 - EOF or a dead worker
            pass
        self.replies.put(None)

    def send(self, key) -> bool:
        try:
            pickle.dump(key, self.proc.stdin)
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass


def _after_fork_in_child() -> None:
    """A fork()ed child shares its parent's pipes but not the reader thread: it forgets the
    worker, and decides again at its next CPU call (a worker of its own, if still cold)."""
    global _state, _worker, _lock
    if _state == "warming":
        _state = None
    _worker, _lock = None, threading.RLock()
    _sent.clear()
    _pending.clear()
    _heard[0], _gone[0] = 0, False
    _first[:] = [None, None, 0]
    _blas(False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- specifications


class _ArraySpec(tuple):
    """(shape, dtype str, layout "C" / "F" / "A"): what Numba's signature sees of an array."""


def _describe(obj):
    if isinstance(obj, np.ndarray):
        layout = "C" if obj.flags.c_contiguous else "F" if obj.flags.f_contiguous else "A"
        return _ArraySpec((obj.shape, obj.dtype.str, layout))
    if type(obj) in (list, tuple):
        return type(obj)(_describe(o) for o in obj)
    return obj


def _build(obj, rng):
    if isinstance(obj, _ArraySpec):
        shape, dt, layout = obj
        dt = np.dtype(dt)
        big = shape[:-1] + (2 * shape[-1],) if layout == "A" and shape else shape
        if dt.kind == "f":
            a = rng.standard_normal(big).astype(dt)
        else:  # integer labels / indices, masks: zeros are valid everywhere
            a = np.zeros(big, dt)
        if layout == "A" and shape:
            a = a[..., ::2]
        elif layout == "F":
            a = np.asfortranarray(a)
        return a
    if type(obj) in (list, tuple):
        return type(obj)(_build(o, rng) for o in obj)
    return obj


# --------------------------------------------------------------------------- the worker's side


def _run_op(name: str, arrays, a, needs, algorithm: str | None) -> None:
    from . import ops

    m, k = ops.kernel(name, "cpu")
    if algorithm is not None:  # this algorithm forward and backward
        a = a._replace(algorithm=algorithm, requested=algorithm, backend="cpu")
    elif ops.OPS[name].tuned is not None:  # the heuristic's (autotuning is off here)
        from . import dispatch

        a = a._replace(algorithm=dispatch.cpu_conv_algorithm(a.g, "conv2d"), backend="cpu")
    out, ctx = k.forward(m, *arrays, a)
    if needs is not None and any(needs) and isinstance(out, np.ndarray):
        k.backward(m, np.ones_like(out), ctx, needs)


def run(key: bytes, algorithm: str | None = None, tier: str = "serial") -> None:
    """Run one call sent by a parent on the CPU kernels of ``tier`` (compiling what they
    need)."""
    from . import ops
    from .kernels.cpu import tiers

    kind, name, args, extra = pickle.loads(key)
    args = _build(args, np.random.default_rng(0))
    with tiers.force(tier):
        if kind == "op":
            _run_op(name, args, extra[0], extra[1], algorithm)
        else:
            ops.update_kernel(name, "cpu")(*args)


def _alternatives(key: bytes) -> list:
    kind, name, _, extra = pickle.loads(key)
    if kind != "op":
        return []
    from . import ops

    return ["im2col", "direct"] if ops.OPS[name].tuned is not None else []


def _serve() -> None:
    """Run every call the parent sends: first on the serial tiers as the parent would by
    default, replying ("done", key) when finished (or failed: the parent then compiles it
    itself); then, when no such call is waiting, on the parallel tiers, and then each
    convolution with both algorithms (what the autotuner times) on the parallel tiers;
    ("idle", calls received) when all of that is done. Ends when the parent has gone and all
    is done."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            while True:
                inbox.put(pickle.load(inp))
        except Exception:  # noqa: BLE001 - EOF: the parent is gone
            inbox.put(None)

    threading.Thread(target=read, daemon=True).start()
    later: list = []
    parent = True
    eof = False
    received = said_idle = 0  # calls taken in; that count when "idle" was last said
    reverse = False  # the parent compiles too, from its first call: start from the last

    def say(*msg) -> None:
        nonlocal parent
        if parent:
            try:
                pickle.dump(msg, out)
                out.flush()
            except OSError:
                parent = False

    first: list = []  # calls to run as the parent would, before any of ``later``

    def take(m) -> None:
        nonlocal eof, reverse, received
        if m is None:
            eof = True
        elif m == "reverse":
            reverse = True
        else:
            first.append(m)
            received += 1

    while True:
        while True:  # take in what the parent sent, without waiting
            try:
                take(inbox.get_nowait())
            except queue.Empty:
                break
        if first:
            key = first.pop() if reverse else first.pop(0)
            try:
                run(key)
            except Exception:  # noqa: BLE001 - the parent compiles it when it needs it
                _debug()
            say("done", key)
            later.insert(sum(a is None for _, a in later), (key, None))  # its parallel tiers
            later += [(key, a) for a in _alternatives(key)]  # after every call's
        elif later:
            key, algorithm = later.pop(0)
            try:
                run(key, algorithm, "parallel")
            except Exception:  # noqa: BLE001
                _debug()
        elif eof:
            return
        else:
            if received != said_idle:
                say("idle", received)
                said_idle = received
            take(inbox.get())


def _debug() -> None:
    if os.environ.get("FASTCONV_WARM_START_DEBUG"):
        import traceback

        traceback.print_exc()

