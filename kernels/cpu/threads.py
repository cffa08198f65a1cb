"""How the CPU backend's GEMM-based ops use several cores: the batch is cut into chunks, and a
small pool of Python threads runs one chunk at a time each, calling single-threaded kernels and
single-threaded BLAS (Linear; the im2col convolution where BLAS cannot be called from inside
Numba, see blas.py, or in a fork()ed child).

Why not Numba's ``prange`` plus a multi-threaded BLAS, one after the other: at MNIST scale a
layer is a few short phases (im2col, GEMM, transpose), each with its own fork/join, and the
GEMMs are skinny (6 or 16 rows), which OpenBLAS splits badly. With one chunk per thread from
start to end, each thread keeps its columns in its own cache and nothing waits between phases
(mnist_cnn conv2 forward at batch 64: 14.4 -> 9.4 ms on 2 threads). And after a multi-threaded
BLAS call OpenBLAS's workers spin for a while, taking the core the next layer's threads need.

The direct and pooling kernels stay ``prange`` loops on Numba's threads: compiled serial (for
this pool) the direct forward kernel ran 1.45x slower on one thread than its ``prange`` form.

Rules that keep results exact:
- The chunk size depends on the shape only, never on the thread count, and every partial sum
  (grad_w, grad_b) is stored per chunk and added in chunk order: the same inputs give the same
  bits on 1 or 16 threads, run after run.
- The kernels are ``@njit(nogil=True)``, so the threads really run at once; BLAS is set to one
  thread while chunks run (two threads each asking OpenBLAS for two threads oversubscribe).
- A chunk body that itself asks for parallel work (it does not, today) runs it inline.

The thread count is Numba's: ``NUMBA_NUM_THREADS`` / ``numba.set_num_threads`` /
``fastconv train --threads``.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba

# Below this much work (multiply-adds or elements touched) a call runs on the calling thread
# alone. ``prange`` kernels: waking Numba's OpenMP pool costs 10-50 us a parallel region.
# ``for_each``: handing chunks to the Python thread pool costs ~50-70 us (a thread wake-up
# through the GIL, measured on the 2-core benchmark machine), so its threshold is higher.
SERIAL_BELOW = 1 << 16
POOL_BELOW = 1 << 20

_state = threading.local()  # .inside: this thread is running a chunk
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_blas_users = 0
_blas_saved: list[tuple[object, int]] = []
_blas_controllers: list | None = None
_blas_fns: list | None = None  # (get, set) per BLAS library (_blas_calls)
# True in a fork()ed child: GNU OpenMP cannot run parallel loops there once the parent has
# (Numba aborts the process), so ops.py keeps such a child on this module's Python threads.
forked = False


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's pool threads (and maybe a lock some other
    thread held at fork time): start from scratch, or the first chunked call would wait for
    workers that do not exist."""
    global _lock, _pool, _pool_size, _blas_users, _state, forked
    forked = True
    _lock = threading.Lock()
    _pool, _pool_size, _blas_users = None, 0, 0
    _blas_saved.clear()
    _state = threading.local()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_get_threads: list = []  # the threading layer's own getter, once Numba has launched it


def num_threads() -> int:
    """``numba.get_num_threads()`` (this thread's count, as ``set_num_threads`` left it), in
    ~0.4 us instead of ~2.3: Numba's function takes two locks on every call to check that its
    threading layer is up; once it is, the layer's getter alone answers the same."""
    if not _get_threads:
        n = int(numba.get_num_threads())  # launches the threading layer
        try:
            from numba.np.ufunc import parallel

            fast = parallel._get_num_threads
            ok = int(fast()) == n
        except Exception:  # noqa: BLE001 - another Numba: keep its public function
            ok = False
        _get_threads.append(fast if ok else numba.get_num_threads)
        return n
    n = int(_get_threads[0]())
    return n if n > 0 else int(numba.get_num_threads())  # (that one raises Numba's error)


class _ThreadsFor:
    """``threads_for``'s context manager: a small class (a ``contextlib.contextmanager``
    generator costs ~1 us more a use, and a step of a small network enters a dozen)."""

    __slots__ = ("work", "n")

    def __init__(self, work: int) -> None:
        self.work, self.n = work, 0

    def __enter__(self) -> None:
        n = num_threads()
        if self.work < SERIAL_BELOW and n != 1:
            numba.set_num_threads(1)
            self.n = n

    def __exit__(self, *exc) -> None:
        if self.n:
            numba.set_num_threads(self.n)


def threads_for(work: int) -> _ThreadsFor:
    """Run the enclosed ``prange`` kernels (direct convolution, pooling) on one thread when
    ``work`` is small: waking Numba's OpenMP pool costs 10-50 us a parallel region."""
    return _ThreadsFor(work)


def blas_libraries():
    """threadpoolctl's handles on the loaded BLAS libraries (found once)."""
    global _blas_controllers
    if _blas_controllers is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas_controllers = [
                c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"
            ]
        except Exception:  # no threadpoolctl or an unknown BLAS: leave BLAS alone
            _blas_controllers = []
    return _blas_controllers


def _thread_calls(c) -> tuple[Callable[[], int], Callable[[int], object]]:
    """(get, set) of one BLAS library's thread count. For OpenBLAS the library's own two
    functions, the symbols threadpoolctl itself calls, looked up once: its controller looked
    them up again on every call (a blas_single block cost ~12 us, three times a LeNet-5
    step). Any other library, or a symbol not found, keeps the controller's methods."""
    try:
        if type(c).__name__ == "OpenBLASController":
            names = ("omp_get_max_threads", "omp_set_num_threads")
            if c.threading_layer != "openmp":
                names = ("openblas_get_num_threads", "openblas_set_num_threads")
            get, put = (c._get_symbol(n) for n in names)
            if get is not None and put is not None and int(get()) == c.get_num_threads():
                return get, put
    except Exception:  # noqa: BLE001 - another threadpoolctl: its public methods
        pass
    return c.get_num_threads, c.set_num_threads


def _blas_calls() -> list:
    global _blas_fns
    if _blas_fns is None:
        _blas_fns = [_thread_calls(c) for c in blas_libraries()]
    return _blas_fns


def _blas_single_enter() -> None:
    global _blas_users
    with _lock:
        if _blas_users == 0:
            _blas_saved[:] = [(put, int(get())) for get, put in _blas_calls()]
            for put, n in _blas_saved:
                if n != 1:
                    put(1)
        _blas_users += 1


def _blas_single_exit() -> None:
    global _blas_users
    with _lock:
        _blas_users -= 1
        if _blas_users == 0:
            for put, n in _blas_saved:
                if n != 1:
                    put(n)


class _BlasSingle:
    """``blas_single``'s context manager (one shared object; the state is module-wide)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _blas_single_enter()

    def __exit__(self, *exc) -> None:
        _blas_single_exit()


_BLAS_SINGLE = _BlasSingle()


def blas_single() -> _BlasSingle:
    """BLAS on one thread inside the block (then back to its own setting)."""
    return _BLAS_SINGLE


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="fastconv")
            _pool_size = workers
        return _pool


def _drain(body: Callable[[int], None], counter, n: int, failed: threading.Event) -> None:
    """Take chunk numbers from the shared counter until none are left (dynamic schedule: a
    thread that the machine slows down simply takes fewer chunks); stop early once any
    thread has failed."""
    outer = getattr(_state, "inside", False)
    _state.inside = True
    try:
        for i in counter:
            if i >= n or failed.is_set():
                return
            body(i)
    except BaseException:
        failed.set()
        raise
    finally:
        _state.inside = outer


def for_each(body: Callable[[int], None], n: int, work: int) -> None:
    """Call ``body(i)`` for i in range(n), on up to ``num_threads()`` threads.

    ``work``: the call's multiply-adds (or elements touched); small calls stay on this thread.
    Each body must write only its own part of the outputs. Returns when every body has run;
    the first exception raised by a body is raised here, after all threads have stopped.
    """
    threads = min(num_threads(), n)
    with blas_single():
        if threads <= 1 or work < POOL_BELOW or getattr(_state, "inside", False):
            for i in range(n):
                body(i)
            return
        counter = itertools.count()  # next() on a count is atomic under the GIL
        failed = threading.Event()
        pool = _executor(threads - 1)
        futures = [pool.submit(_drain, body, counter, n, failed) for _ in range(threads - 1)]
        error = None
        try:
            _drain(body, counter, n, failed)
        except BaseException as e:  # noqa: BLE001 — re-raised below, after the others stop
            error = e
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001
                error = error or e
        if error is not None:
            raise error


def chunks(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)) ranges of ``size`` items covering range(n)."""
    return [(i, min(i + size, n)) for i in range(0, n, size)]
