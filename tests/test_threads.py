"""The CPU backend's threading (kernels/cpu/threads.py): batch chunks on a thread pool.

What must hold: every chunk runs exactly once, results are bit-identical for any thread count
(chunk sizes depend on the shape only, partial sums are added in chunk order), errors in a
chunk surface in the caller after every thread stopped, and BLAS's own thread count is put
back afterwards.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import pytest
from fastconv.kernels.cpu import ops, threads

import fastconv as fc
from fastconv import reference
from tests.helpers import assert_close


@pytest.fixture
def pooled():
    """Every call takes the thread-pool path, however small."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(threads, "SERIAL_BELOW", 0)
        mp.setattr(threads, "POOL_BELOW", 0)
        yield


@pytest.fixture
def two_threads():
    n = numba.get_num_threads()
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(n)


def test_every_index_runs_once(pooled, two_threads):
    seen = []
    names = set()
    lock = threading.Lock()

    def body(i):
        with lock:
            seen.append(i)
            names.add(threading.current_thread().name)

    threads.for_each(body, 50, work=1 << 30)
    assert sorted(seen) == list(range(50))
    assert len(names) >= 1  # on a loaded machine one thread may take every chunk


def test_error_in_a_chunk_is_raised_after_all_threads_stop(pooled, two_threads):
    done = []

    def body(i):
        if i == 3:
            raise ValueError("chunk 3 failed")
        done.append(i)

    with pytest.raises(ValueError, match="chunk 3 failed"):
        threads.for_each(body, 40, work=1 << 30)
    assert threads._blas_users == 0
    # the pool still works afterwards
    out = []
    threads.for_each(out.append, 5, work=1 << 30)
    assert sorted(out) == list(range(5))


def test_blas_thread_count_is_restored(pooled, two_threads):
    ctl = threads.blas_libraries()
    if not ctl:
        pytest.skip("no BLAS library threadpoolctl can drive")
    before = [c.get_num_threads() for c in ctl]
    inside = []
    threads.for_each(lambda i: inside.append([c.get_num_threads() for c in ctl]), 4, 1 << 30)
    assert all(v == [1] * len(ctl) for v in inside)
    assert [c.get_num_threads() for c in ctl] == before


def test_nested_for_each_runs_inline(pooled, two_threads):
    out = []
    lock = threading.Lock()

    def inner(j):
        with lock:
            out.append(j)

    threads.for_each(lambda i: threads.for_each(inner, 3, 1 << 30), 4, 1 << 30)
    assert sorted(out) == sorted(list(range(3)) * 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_on_one_and_two_threads(pooled, dtype):
    """Chunking never depends on the thread count, so neither do the results."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs NUMBA_NUM_THREADS >= 2")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, 4, 11, 11)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    gy = rng.standard_normal((9, 6, 9, 11)).astype(dtype)
    kw = dict(padding=1, stride=1, dilation=(2, 1), groups=2, backend="cpu", algorithm="im2col")
    n = numba.get_num_threads()
    results = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "CHUNK_BYTES", 1)  # one image per chunk: 9 chunks
        for t in (1, 2):
            numba.set_num_threads(t)
            try:
                results.append((fc.conv2d(x, w, b, **kw),) + fc.conv2d_backward(gy, x, w, **kw))
            finally:
                numba.set_num_threads(n)
    for a, c in zip(*results):
        np.testing.assert_array_equal(a, c)
    ref = reference.conv2d_backward(gy, x, w, padding=1, dilation=(2, 1), groups=2)
    for a, e in zip(results[0][1:], ref):
        assert_close(a, e, dtype)


def test_chunks_depend_on_shape_only():
    g = fc.shapes.conv2d_geometry("t", (64, 1, 28, 28), (6, 1, 5, 5), padding=2)
    parts = ops.batch_chunks(g, 4)
    assert parts[0] == (0, parts[0][1]) and parts[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    assert len(parts) % ops.MIN_CHUNKS == 0
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert ops.batch_chunks(g, 4) == parts
    finally:
        numba.set_num_threads(n)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("shape", [(1, 3), (7, 5), (64, 120)])
def test_linear_on_the_pool_matches_the_oracle(pooled, two_threads, shape, split, monkeypatch):
    from fastconv.kernels.cpu import nn

    if split:
        monkeypatch.setattr(nn, "LINEAR_SPLIT_ABOVE", 0)
    rng = np.random.default_rng(4)
    N, O = shape
    x = rng.standard_normal((N, 9))
    w = rng.standard_normal((O, 9))
    b = rng.standard_normal(O)
    gy = rng.standard_normal((N, O))
    assert_close(fc.functional.linear(x, w, b, backend="cpu"), reference.linear(x, w, b))
    got = fc.functional.linear_backward(gy, x, w, backend="cpu")
    for a, e in zip(got, reference.linear_backward(gy, x, w)):
        assert_close(a, e)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_in_blocks_matches_the_oracle(pooled, two_threads, monkeypatch, dtype):
    from fastconv.kernels.cpu import nn

    monkeypatch.setattr(nn, "ELEMENTWISE_BLOCK", 7)  # blocks that do not divide the size
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 2, 5, 5)).astype(dtype)
    x[0, 0, 0, :2] = 0.0  # derivative 0 at 0
    gy = rng.standard_normal(x.shape).astype(dtype)
    got = fc.functional.relu_backward(gy, x, backend="cpu")
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, reference.relu_backward(gy, x))


def test_sgd_update_one_pass_matches_the_oracle():
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        p = rng.standard_normal(50).astype(dtype)
        g = rng.standard_normal(50).astype(dtype)
        buf = rng.standard_normal(50).astype(dtype)
        for first, nesterov, wd in ((True, False, 0.0), (False, True, 0.01), (False, False, 0.1)):
            args = (0.05, 0.9, 0.0, wd, nesterov, first)
            ep, eb = reference.sgd_update(p, g, buf, *args)
            pp, bb = p.copy(), buf.copy()
            fc.functional.sgd_update(pp, g, bb, *args, backend="cpu")
            assert_close(pp, ep, dtype)
            assert_close(bb, eb, dtype)


def _update_cases(dtype, n, seed):
    """(name, run(arrays, backend), oracle(arrays), arrays) for each optimizer update, on flat
    arrays of n elements (one of them a second, later step)."""
    rng = np.random.default_rng(seed)

    def arrays(k):
        a = [rng.standard_normal(n).astype(dtype) for _ in range(k)]
        a[2] = np.abs(a[2]) + dtype(0.5)  # square averages / sums: positive
        if k == 5:  # RMSprop's grad_avg: its square well below square_avg (no cancellation)
            a[3] *= dtype(0.1)
        return a

    F = fc.functional
    return [
        (
            "sgd",
            lambda a, be: F.sgd_update(a[0], a[1], a[2], 0.05, 0.9, 0.1, 1e-2, False, False,
                                       backend=be),
            lambda a: reference.sgd_update(a[0], a[1], a[2], 0.05, 0.9, 0.1, 1e-2, False, False),
            arrays(3),
        ),
        (
            "sgd nesterov",
            lambda a, be: F.sgd_update(a[0], a[1], a[2], 0.05, 0.9, 0.0, 0.0, True, False,
                                       backend=be),
            lambda a: reference.sgd_update(a[0], a[1], a[2], 0.05, 0.9, 0.0, 0.0, True, False),
            arrays(3),
        ),
        (
            "adam",
            lambda a, be: F.adam_update(*a, 1e-2, 0.9, 0.999, 1e-8, 1e-2, 3, backend=be),
            lambda a: reference.adam_update(*a, 1e-2, 0.9, 0.999, 1e-8, 1e-2, 3),
            arrays(4),
        ),
        (
            "rmsprop centered momentum",
            lambda a, be: F.rmsprop_update(*a, 1e-2, 0.99, 1e-8, 1e-2, 0.9, True, backend=be),
            lambda a: reference.rmsprop_update(*a, 1e-2, 0.99, 1e-8, 1e-2, 0.9, True),
            arrays(5),
        ),
        (
            "rmsprop",
            lambda a, be: F.rmsprop_update(*a[:3], None, None, 1e-2, 0.99, 1e-8, 0.0, 0.0, False,
                                           backend=be),
            lambda a: reference.rmsprop_update(*a[:3], None, None, 1e-2, 0.99, 1e-8, 0.0, 0.0,
                                               False),
            arrays(3),
        ),
        (
            "adagrad",
            lambda a, be: F.adagrad_update(*a, 0.1, 0.01, 1e-2, 1e-10, 4, backend=be),
            lambda a: reference.adagrad_update(*a, 0.1, 0.01, 1e-2, 1e-10, 4),
            arrays(3),
        ),
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_updates_in_parallel_spans_match_the_oracle(dtype, monkeypatch):
    """Parameters of OPT_PARALLEL_MIN elements or more update span by span on Numba's threads
    (a size no span count divides): each array the oracle's, and bit for bit what one serial
    pass over the whole array gives (the split never changes a value)."""
    from fastconv.kernels.cpu import nn

    n = 2 * nn.OPT_SPAN + 1237
    assert n >= nn.OPT_PARALLEL_MIN
    serial_bits = {}
    for parallel in (True, False):
        if not parallel:  # the same updates as one serial call each
            monkeypatch.setattr(nn, "OPT_PARALLEL_MIN", 1 << 62)
        for name, run, oracle, arrays in _update_cases(dtype, n, seed=8):
            expect = oracle(arrays)
            got = [a.copy() for a in arrays]
            run(got, "cpu")
            updated = [got[0]] + got[2:]  # p and the state; grad is read only
            for i, (a, e) in enumerate(zip(updated, expect)):
                if e is not None:
                    assert_close(a, e, dtype, f"{name}: array {i}")
            np.testing.assert_array_equal(got[1], arrays[1])
            if parallel:
                serial_bits[name] = got
            else:
                for a, b in zip(got, serial_bits[name]):
                    np.testing.assert_array_equal(a, b, err_msg=name)


def test_malloc_tuning_can_be_switched_off():
    """The import-time malloc thresholds (fastconv/__init__.py) change speed, never results."""
    import subprocess
    import sys

    code = (
        "import numpy as np, fastconv as fc\n"
        "m = fc.models.lenet5(rng=0); x = np.random.default_rng(0).standard_normal("
        "(4, 1, 28, 28)).astype(np.float32)\n"
        "print(float(np.abs(m(x)).sum()))"
    )
    outs = []
    for env in ({}, {"FASTCONV_MALLOC": "system"}):
        import os

        r = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        )
        outs.append(r.stdout.strip())
    assert outs[0] == outs[1] and outs[0]


def test_pool_works_in_a_forked_child(pooled, two_threads):
    """After the parent used the pool, a fork()ed child (multiprocessing's default start on
    Linux) gets a fresh pool instead of waiting for the parent's threads."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    x = np.random.default_rng(8).standard_normal((6, 2, 9, 9))
    w = np.random.default_rng(9).standard_normal((3, 2, 3, 3))
    y = fc.conv2d(x, w, backend="cpu", algorithm="im2col")  # the parent's pool is running
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_conv, args=(q, x, w))
    p.start()
    p.join(timeout=60)
    alive = p.is_alive()
    if alive:
        p.kill()
    assert not alive, "the forked child hung in a chunked call"
    np.testing.assert_array_equal(q.get(timeout=5), y)


def _child_conv(q, x, w):
    threads.SERIAL_BELOW = threads.POOL_BELOW = 0
    q.put(fc.conv2d(x, w, backend="cpu", algorithm="im2col"))


def test_concurrent_callers_share_the_pool(pooled, two_threads):
    """Several user threads calling chunked ops at once all finish with the right answer."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(10)
    xs = [rng.standard_normal((5, 2, 8, 8)) for _ in range(3)]
    w = rng.standard_normal((4, 2, 3, 3))
    expected = [reference.conv2d(x, w, padding=1) for x in xs]

    def work(i):
        return [fc.conv2d(xs[i], w, padding=1, backend="cpu", algorithm="im2col") for _ in range(5)]

    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(work, range(3)))
    for got, e in zip(results, expected):
        for y in got:
            assert_close(y, e)
    assert threads._blas_users == 0


def test_num_threads_is_numbas_count_per_thread():
    """The fast getter answers what numba.get_num_threads answers: after set_num_threads, and
    per Python thread (Numba's count is thread-local)."""
    n = numba.get_num_threads()
    assert threads.num_threads() == n
    try:
        numba.set_num_threads(1)
        assert threads.num_threads() == numba.get_num_threads() == 1
        seen = []

        def other():
            seen.append((threads.num_threads(), numba.get_num_threads()))
            numba.set_num_threads(1)
            seen.append((threads.num_threads(), numba.get_num_threads()))

        numba.set_num_threads(n)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen[0][0] == seen[0][1] and seen[1] == (1, 1)
        assert threads.num_threads() == n
    finally:
        numba.set_num_threads(n)


def test_blas_thread_calls_agree_with_threadpoolctl():
    """The (get, set) pairs blas_single calls answer and act as threadpoolctl's controllers:
    a count set through one is read back through the other, and blas_single restores it."""
    ctl = threads.blas_libraries()
    if not ctl:
        pytest.skip("no BLAS library threadpoolctl can drive")
    calls = threads._blas_calls()
    assert len(calls) == len(ctl)
    for c, (get, put) in zip(ctl, calls):
        n = c.get_num_threads()
        try:
            assert int(get()) == n
            put(1)
            assert c.get_num_threads() == 1 and int(get()) == 1
            c.set_num_threads(max(n, 2))
            assert int(get()) == max(n, 2)
            with threads.blas_single():
                assert c.get_num_threads() == 1
            assert c.get_num_threads() == max(n, 2)
        finally:
            c.set_num_threads(n)
