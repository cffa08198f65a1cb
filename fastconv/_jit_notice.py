"""One line on stderr when compiling kernels holds up the first steps for more than a second.

A fresh install compiles its Numba kernels for this CPU on first use (cached on disk after
that: Numba's cache beside the sources or in ``NUMBA_CACHE_DIR``). Without a word, a first
training step that takes many seconds looks like a hang. ``arm()`` is called once before the
first step (``fastconv train``, ``training.fit``); if a compile started on that thread is still
running ``DELAY`` seconds after the first one began, the notice is printed, once per process.
Compiles on other threads (the autotuner's background warm-up) do not count. With warm start
(``_warm.py``: the first steps on the oracle while a background process compiles), the line
says that instead, when warming begins, and a second line says when the kernels take over.
"""

from __future__ import annotations

import sys
import threading

DELAY = 1.0  # seconds of compiling before the notice: shorter waits need no explanation
MESSAGE = (
    "fastconv: compiling kernels for this CPU, once: the first steps take a while; "
    "later runs load them from Numba's cache"
)

_armed = False
_said = False
_stream = None  # where arm() asked notices to go
_lock = threading.Lock()


def arm(stream=None) -> None:
    """Watch the calling thread's compiles from now on (idempotent; never raises)."""
    global _armed, _stream
    with _lock:
        if _armed or _said:
            return
        _armed, _stream = True, stream
    try:
        from . import _warm

        if _warm.state() == "warming":  # compiling in the background already: say so now
            say(_warm.NOTICE)
    except Exception:  # noqa: BLE001
        pass
    try:
        from numba.core import event

        event.register("numba:compile", _listener(event)(threading.get_ident(), stream))
    except Exception:  # noqa: BLE001 - no event API in this Numba: no notice, nothing else
        pass


def is_armed() -> bool:
    """Has the CLI or ``fit`` asked for notices in this process?"""
    return _armed


def say(message: str, stream=None, once: bool = True) -> None:
    """Print ``message`` on stderr (or the armed stream); with ``once``, only if no notice was
    printed yet in this process. Never raises."""
    global _said
    with _lock:
        if once and _said:
            return
        _said = True
    try:
        print(message, file=stream or _stream or sys.stderr, flush=True)
    except (OSError, ValueError):  # a closed stream
        pass


def _say(stream) -> None:
    say(MESSAGE, stream)


def _listener(event):
    class Listener(event.Listener):
        """numba:compile events of one thread: a timer starts with a compile and prints the
        notice if a compile is still running when it fires."""

        def __init__(self, thread: int, stream) -> None:
            self.thread, self.stream = thread, stream
            self.depth = 0  # compiles nest (a kernel compiles the functions it calls)
            self.timer: threading.Timer | None = None

        def on_start(self, e) -> None:
            if _said or threading.get_ident() != self.thread:
                return
            self.depth += 1
            if self.timer is None:
                self.timer = threading.Timer(DELAY, self._fire)
                self.timer.daemon = True
                self.timer.start()

        def on_end(self, e) -> None:
            if threading.get_ident() == self.thread:
                self.depth = max(0, self.depth - 1)

        def _fire(self) -> None:
            if self.depth > 0:
                _say(self.stream)
            else:  # the compiles so far were quick: wait for the next one
                self.timer = None

    return Listener
