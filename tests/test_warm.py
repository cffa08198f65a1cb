"""Warm start (fastconv/_warm.py): a cold process runs its first CPU calls on the oracle while a
worker compiles their kernels, then switches to them.

The suite runs with warm start off (conftest.py); these tests turn it on with a stand-in
worker in this process (which calls are routed, what the worker is told, when the process
switches) and for real in fresh processes on empty caches.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastconv as fc
from fastconv import _warm, autotune, reference


class _FakeWorker:
    """Stands in for the worker process: records what is sent, replies when told to."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies: queue.Queue = queue.Queue()

    def send(self, key: bytes) -> bool:
        self.sent.append(key)
        return True

    def close(self) -> None:
        pass

    def finish_all(self) -> None:
        for key in self.sent:
            self.replies.put(("done", key))
        self.replies.put(("idle", len(self.sent)))


@pytest.fixture
def warming(monkeypatch):
    """This process warming, with a stand-in worker; everything put back afterwards."""
    saved = (_warm._state, _warm._worker, set(_warm._sent), set(_warm._pending))
    saved += (list(_warm._heard), list(_warm._gone), list(_warm._first))
    w = _FakeWorker()
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    _warm._state, _warm._worker = "warming", w
    _warm._sent.clear()
    _warm._pending.clear()
    _warm._heard[0], _warm._gone[0] = 0, False
    _warm._first[:] = [None, None, 0]
    try:
        yield w
    finally:
        _warm._state, _warm._worker = saved[0], saved[1]
        _warm._sent.clear()
        _warm._sent.update(saved[2])
        _warm._pending.clear()
        _warm._pending.update(saved[3])
        _warm._heard[:], _warm._gone[:], _warm._first[:] = saved[4], saved[5], saved[6]


def _backend_module(t: fc.Tensor):
    return t._node.backward.args[0]


def _specs(w: _FakeWorker) -> list[tuple]:
    return [pickle.loads(k) for k in w.sent if isinstance(k, bytes)]


# --------------------------------------------------------------------------- specifications


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.ones((2, 3, 4, 5), np.float32),  # C
        lambda: np.asfortranarray(np.ones((3, 4), np.float64)),  # F
        lambda: np.ones((3, 8), np.float32)[:, ::2],  # neither: "A"
        lambda: np.arange(5, dtype=np.int64),
        lambda: np.zeros(4, np.bool_),
        lambda: np.float32(3.0) * np.ones((), np.float32),  # 0-d
        lambda: np.ones((0, 3), np.float32),  # empty
    ],
)
def test_a_rebuilt_array_has_the_same_numba_type(make):
    a = make()
    b = _warm._build(_warm._describe(a), np.random.default_rng(0))
    assert b.shape == a.shape and b.dtype == a.dtype
    assert numba.typeof(b) == numba.typeof(a)


def test_descriptions_keep_lists_tuples_and_plain_values():
    arrays = [np.ones((2, 2), np.float32), None, (np.zeros(3, np.int64), 0.5)]
    d = _warm._describe(arrays)
    assert pickle.loads(pickle.dumps(d)) == d
    assert "nan" not in repr(d) and 1.0 not in d[0][0]  # shapes, never values
    b = _warm._build(d, np.random.default_rng(0))
    assert type(b) is list and b[1] is None and type(b[2]) is tuple and b[2][1] == 0.5
    assert b[2][0].dtype == np.int64 and not b[2][0].any()  # integers: zeros (valid labels)


# --------------------------------------------------------------------------- routing


def test_default_cpu_calls_run_on_the_oracle_while_warming(warming):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    y = fc.conv2d(x, w, b, padding=1)
    assert y.dtype == np.float32
    assert np.array_equal(y, reference.conv2d(x, w, b, padding=1))  # the oracle ran it
    t = fc.relu(fc.Tensor(x, requires_grad=True))
    assert _backend_module(t) is reference
    kinds = [(s[0], s[1]) for s in _specs(warming)]
    assert kinds == [("op", "conv2d"), ("op", "relu")]
    kind, name, args, (attrs, needs) = _specs(warming)[0]
    assert [a if a is None else tuple(a[:2]) for a in args] == [
        ((2, 3, 9, 9), "<f4"), ((4, 3, 3, 3), "<f4"), ((4,), "<f4"),
    ]  # fmt: skip
    assert attrs.algorithm == "auto" and needs is None
    fc.conv2d(x, w, b, padding=1)  # the same specification: sent once
    assert len(warming.sent) == 2


def test_explicit_cpu_always_runs_the_kernels(warming, monkeypatch):
    x = fc.Tensor(np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4), requires_grad=True)
    assert _backend_module(fc.relu(x)) is reference
    cpu = fc.dispatch.backend_ops("relu", "cpu")
    with fc.using(backend="cpu"):
        assert _backend_module(fc.relu(x)) is cpu
    monkeypatch.setenv("FASTCONV_BACKEND", "cpu")
    assert _backend_module(fc.relu(x)) is cpu
    monkeypatch.delenv("FASTCONV_BACKEND")
    with fc.using(backend="reference"):
        assert _backend_module(fc.relu(x)) is reference
    assert len(warming.sent) == 1  # only the default call was sent


def test_the_process_switches_once_the_worker_has_finished(warming):
    x = np.linspace(-2, 2, 30, dtype=np.float32).reshape(5, 6)
    t = fc.Tensor(x, requires_grad=True)
    assert _backend_module(fc.relu(t)) is reference
    assert _warm.busy() and _warm.state() == "warming"
    assert not _warm.wait(timeout=0.05)  # nothing finished: times out
    warming.finish_all()
    assert _backend_module(fc.relu(t)) is fc.dispatch.backend_ops("relu", "cpu")
    assert _warm.state() == "done" and not _warm.busy()
    assert _warm.wait(timeout=0) and len(warming.sent) == 1


def test_a_training_step_on_the_oracle_matches_the_kernels(warming):
    """The same LeNet-5 steps, warming (oracle) and not (CPU kernels): float32 agreement of
    every loss, parameter and the momentum buffers; the worker is told every op and the
    optimizer's fused update once."""

    def train(steps=2):
        rng = np.random.default_rng(3)
        x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
        labels = rng.integers(0, 10, 8)
        model = fc.models.lenet5(rng=0)
        opt = fc.optim.SGD(model.parameters(), 0.05, momentum=0.9)
        loss_fn = fc.CrossEntropyLoss()
        losses = []
        for _ in range(steps):
            loss = loss_fn(model(fc.Tensor(x)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.data))
        return losses, [p.data.copy() for p in model.parameters()]

    warm_losses, warm_params = train()
    names = {(s[0], s[1]) for s in _specs(warming)}
    assert ("update", "sgd_update_many") in names
    assert ("op", "conv2d_relu_maxpool") in names and ("op", "cross_entropy") in names
    assert all(s[0] != "op" or s[3][1] is not None for s in _specs(warming))  # gradients asked
    _warm._state = "off"
    cpu_losses, cpu_params = train()
    np.testing.assert_allclose(warm_losses, cpu_losses, rtol=1e-5)
    for a, b in zip(warm_params, cpu_params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_disable_ends_warming_at_once(warming):
    fc.relu(np.ones(3, np.float32))
    _warm.disable()
    assert _warm.state() == "done"
    assert _backend_module(fc.relu(fc.Tensor(np.ones(3, np.float32), requires_grad=True))) is (
        fc.dispatch.backend_ops("relu", "cpu")
    )


def test_the_autotuner_leaves_the_other_candidate_to_a_busy_worker(monkeypatch):
    calls = []
    cands = {"im2col": lambda: calls.append("im2col"), "direct": lambda: calls.append("direct")}
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    busy = [True]
    monkeypatch.setattr(_warm, "busy", lambda: busy[0])
    k = f"test-warm-{os.getpid()}-{id(calls)}"
    for _ in range(autotune.WARM_AT + 2):
        assert autotune.choose(k, cands, default="direct") == "direct"
    assert calls == []  # the worker compiles it: not here
    busy[0] = False
    autotune.choose(k, cands, default="direct")
    assert calls == ["im2col"]  # now compiled (run once, result dropped) here


# --------------------------------------------------------------------------- the worker's side


def test_the_worker_runs_each_call_on_the_kernels_of_each_tier_and_algorithm(warming):
    rng = np.random.default_rng(0)
    x = fc.Tensor(rng.standard_normal((2, 1, 12, 12)).astype(np.float32))
    w = fc.Tensor(rng.standard_normal((3, 1, 5, 5)).astype(np.float32), requires_grad=True)
    fc.conv2d(x, w, None, padding=2)
    p = [np.zeros(4, np.float32)]
    fc.functional.sgd_update_many(p, [np.ones(4, np.float32)], None, 0.5)
    np.testing.assert_array_equal(p[0], -0.5)  # the oracle's update, in place
    keys = warming.sent
    assert [pickle.loads(k)[:2] for k in keys] == [("op", "conv2d"), ("update", "sgd_update_many")]
    assert _warm._alternatives(keys[0]) == ["im2col", "direct"] and not _warm._alternatives(keys[1])
    _warm.run(keys[0])  # serial tiers, the heuristic's algorithm
    for algo in ("im2col", "direct"):
        _warm.run(keys[0], algo, "parallel")
    _warm.run(keys[1])


# --------------------------------------------------------------------------- for real

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from numba.core import event
    compiles = []
    class L(event.Listener):
        def on_start(self, ev):
            compiles.append(ev.data["dispatcher"].py_func.__name__)
        def on_end(self, ev):
            pass
    event.register("numba:compile", L())
    import numpy as np
    import fastconv as fc
    from fastconv import _jit_notice, _warm
    _jit_notice.arm()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 20)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    model = fc.nn.Sequential(fc.nn.Linear(20, 10, rng=0))
    opt = fc.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    loss_fn = fc.CrossEntropyLoss()
    def step():
        loss = loss_fn(model(fc.Tensor(x)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.data)
    out = {"cold": _warm.cold()}
    out["losses"] = [step()]
    out["state1"] = _warm.state()
    out["compiles1"] = list(compiles)
    out["ready"] = fc.wait_for_kernels(timeout=600)
    import os, pathlib
    cache = pathlib.Path(os.environ["NUMBA_CACHE_DIR"])
    out["cached"] = sorted(p.name for p in cache.rglob("*.nbi"))
    out["losses"] += [step() for _ in range(3)]
    out["state2"] = _warm.state()
    print(json.dumps(out))
    """
)


def test_a_cold_process_steps_at_once_and_switches_to_the_compiled_kernels(tmp_path):
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path / "numba"),
        FASTCONV_CACHE_DIR=str(tmp_path / "fc"),
        FASTCONV_WARM_START="1",
    )
    env.pop("FASTCONV_BACKEND", None)
    r = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["cold"] and out["state1"] == "warming"
    assert out["compiles1"] == []  # the first step compiled nothing in this process
    assert out["ready"] and out["state2"] == "done"
    assert all(np.isfinite(out["losses"])) and out["losses"][-1] < out["losses"][0]
    assert _warm.NOTICE in r.stderr and "compiled kernels in use after" in r.stderr
    # before this process ran another step, the worker had written the kernels of every call
    for kernel in ("_linear_cols", "_linear_grad", "_cross_entropy", "_sgd_update"):
        assert any(f"nn.{kernel}-" in n for n in out["cached"]), (kernel, out["cached"])


def test_warm_start_off_and_a_warm_cache_never_route():
    code = (
        "import numpy as np, fastconv as fc; from fastconv import _warm; "
        "fc.relu(fc.Tensor(np.ones(3, np.float32), requires_grad=True)); print(_warm.state())"
    )
    env = dict(os.environ, FASTCONV_WARM_START="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "off"


def test_cold_reads_the_cache_index_only(tmp_path):
    code = (
        "from fastconv import _warm; from fastconv.kernels.cpu import tiers; "
        "print(len(tiers.manifest()) > 0, _warm.cold())"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "empty"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]  # nothing cached: cold
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.nbc"))


def _square(v):
    return v * v


def test_cached_sees_the_disk_cache_of_a_fresh_dispatcher(tmp_path, monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    d1 = numba.njit(cache=True)(_square)
    d1(2.0)
    sig = d1.signatures[0]
    d2 = numba.njit(cache=True)(_square)  # nothing in memory: only the index can say
    assert not d2.overloads
    assert _warm._cached(d2, sig)
    assert not _warm._cached(d2, (numba.types.int8,))


def test_a_call_the_worker_cannot_be_told_about_ends_warming(warming):
    _warm.offer("update", "sgd_update", (np.ones(2, np.float32), lambda: None))
    assert _warm.state() == "done" and warming.sent == []


def test_a_slow_oracle_step_makes_the_process_compile_too(warming, monkeypatch):
    x = fc.Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    monkeypatch.setattr(_warm, "ORACLE_STEP_MAX", 1e9)
    for _ in range(4):  # quick enough steps: still warming
        fc.relu(x)
    assert _warm.state() == "warming" and warming.sent[-1] != "reverse"
    assert _warm._first[1] is None and _warm._first[2] == 2  # judged by its second step
    _warm._first[:] = [None, None, 0]
    _warm._sent.clear()
    monkeypatch.setattr(_warm, "ORACLE_STEP_MAX", 0.0)
    fc.relu(x)
    assert _backend_module(fc.relu(x)) is reference  # this call was routed already
    assert _warm.state() == "done" and warming.sent[-1] == "reverse"
    assert _backend_module(fc.relu(x)) is fc.dispatch.backend_ops("relu", "cpu")
