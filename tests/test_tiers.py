"""The two tiers of the parallel CPU kernels (kernels/cpu/tiers.py): same bits on both, the
background worker's parallel build taken in, and the fallbacks when it cannot help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import fastconv as fc
from fastconv.kernels.cpu import tiers


def _train(name: str, batch: int, steps: int, tier: str, **kw) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    shape = (batch, 1, 28, 28)
    x = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, 10, batch)
    model = fc.models.MODELS[name](rng=0, **kw)
    opt = fc.optim.SGD(model.parameters(), 0.05, momentum=0.9)
    loss_fn = fc.CrossEntropyLoss()
    with tiers.force(tier):
        for _ in range(steps):
            loss = loss_fn(model(fc.Tensor(x)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return [p.data.copy() for p in model.parameters()] + [
        np.asarray(b).copy() for _, b in model.named_buffers()
    ]


@pytest.mark.parametrize(
    "name,batch,kw",
    [
        ("lenet5", 1, {}),  # batch 1: one image's tiles cut across threads
        ("lenet5", 16, {}),
        ("mnist_cnn", 4, {}),
        ("resnet8", 4, {"in_channels": 1, "num_classes": 10}),  # BN, 1x1 s2, global pooling
    ],
)
def test_serial_and_parallel_tiers_give_the_same_bits(name, batch, kw):
    """Whole training steps (forward, backward, SGD, BN statistics): the serial tier runs the
    same work items as the parallel one, so every parameter ends bit for bit the same."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    numba.set_num_threads(2)
    serial = _train(name, batch, 2, "serial", **kw)
    parallel = _train(name, batch, 2, "parallel", **kw)
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=True)


def test_force_rejects_an_unknown_tier():
    with pytest.raises(ValueError, match="tier must be 'serial' or 'parallel', got 'fast'"):
        with tiers.force("fast"):
            pass


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from numba.core import event
    main_compiles = []

    class L(event.Listener):
        def on_start(self, ev):
            main_compiles.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", L())
    from fastconv.kernels.cpu import pool, tiers
    if len(sys.argv) > 1 and sys.argv[1] == "dead-worker":
        class Dead(tiers._Worker):  # a worker that exits at once
            def __init__(self):
                import subprocess, queue, threading
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", "pass"], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE)
                self.replies = queue.Queue()
                self.reader = threading.Thread(target=self._read, daemon=True)
                self.reader.start()
        tiers._Worker = Dead
    x = np.random.default_rng(0).standard_normal((3, 4, 8, 6)).astype(np.float32)
    k = pool.avg_pool2d_forward_2x2
    y1 = k(x)
    if len(sys.argv) > 1 and sys.argv[1] == "no-wait":  # exit while the worker compiles
        print(json.dumps({"worker": tiers._worker.proc.pid, "par": len(k.par.signatures)}))
        sys.exit(0)
    after_first = {"par": len(k.par.signatures), "ser": len(k.ser.signatures)}
    ok = tiers.wait(120)
    y2 = k(x)
    ref = x.reshape(3, 4, 4, 2, 3, 2).mean(axis=(3, 5))
    print(json.dumps({
        "after_first": after_first, "waited": ok, "par": len(k.par.signatures),
        "same": bool(np.array_equal(y1, y2)), "close": bool(np.allclose(y1, ref, atol=1e-6)),
        "compiles": main_compiles, "tiered": k._tiered, "idle": tiers.idle(),
    }))
    """
)


def _child(tmp_path, *args, **env_extra) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), **env_extra)
    env.pop("FASTCONV_JIT_TIERS", None) if "FASTCONV_JIT_TIERS" not in env_extra else None
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cold_cache_runs_serial_first_and_takes_in_the_workers_parallel_build(tmp_path):
    r = _child(tmp_path)
    assert r["tiered"]
    assert r["after_first"] == {"par": 0, "ser": 1}  # the first call ran the serial tier
    assert r["waited"] and r["idle"] and r["par"] == 1  # then the worker's build, loaded
    assert r["same"] and r["close"]
    # this process compiled the serial tier only: the parallel one came from the worker
    assert "avg_pool2d_forward_2x2__serial" in r["compiles"]
    assert "avg_pool2d_forward_2x2" not in r["compiles"]
    # a second process finds the parallel build in the cache: no serial tier at all
    r2 = _child(tmp_path)
    assert r2["after_first"] == {"par": 1, "ser": 0} and r2["compiles"] == []


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def test_the_worker_finishes_the_builds_asked_for_after_its_parent_exits(tmp_path):
    """A short first process leaves the parallel build it asked for in the cache: the next
    process starts on it (no serial tier), though nobody waited for it."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to watch the worker")
    import time

    r = _child(tmp_path, "no-wait")
    assert r["par"] == 0
    end = time.monotonic() + 300
    while _running(r["worker"]) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _running(r["worker"]), "the worker did not exit after its last build"
    r2 = _child(tmp_path)
    assert r2["after_first"] == {"par": 1, "ser": 0} and r2["compiles"] == []


def test_a_dead_worker_means_compiling_here(tmp_path):
    r = _child(tmp_path, "dead-worker")
    assert r["waited"] and r["idle"] and r["par"] == 1 and r["same"] and r["close"]
    assert "avg_pool2d_forward_2x2" in r["compiles"]  # compiled in this process instead


def test_tiers_off_compiles_the_parallel_kernel_at_once(tmp_path):
    r = _child(tmp_path, FASTCONV_JIT_TIERS="0")
    assert not r["tiered"]
    assert r["after_first"] == {"par": 1, "ser": 0} and r["close"]
    assert "avg_pool2d_forward_2x2__serial" not in r["compiles"]


def test_the_autotuner_waits_for_the_parallel_tier(monkeypatch):
    """A deferred key is not timed while a kernel still runs its serial tier."""
    from fastconv import autotune

    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_write", lambda k, c: None)
    timed = []
    monkeypatch.setattr(autotune, "measure", lambda c, repeats=7: (timed.append(1), ("a", {}))[1])
    busy = [True]
    monkeypatch.setattr(autotune, "_tiers_idle", lambda: not busy[0])
    key = "test-tiers|(1,)|float32|t2"
    autotune._deferred.pop(key, None)
    cands = {"a": lambda: None, "b": lambda: None}
    try:
        for _ in range(5):  # first call, warm-up at the second, then waiting
            assert autotune.choose(key, cands, default="a") == "a"
        assert timed == []
        busy[0] = False
        autotune.choose(key, cands, default="a")
        assert timed == [1]
    finally:
        autotune._deferred.pop(key, None)


def test_the_manifest_names_kernels_that_exist():
    """Every entry of the committed manifest resolves to a compiled kernel of this version
    (a renamed kernel or a stale manifest would only waste the worker's time: caught here).
    Remake it with ``python -m fastconv.kernels.cpu.tiers --record``."""
    listed = tiers.manifest()
    if not listed:
        pytest.skip(f"manifest made with another Numba version than {numba.__version__}")
    assert {e[4] for e in listed} >= {1, 2}  # first-step kernels and the autotuner's others
    for module, name, tier, sig, _ in listed:
        kernel = tiers._resolve(module, name, tier)
        assert hasattr(kernel, "compile") and isinstance(sig, tuple), (module, name, tier)
    names = {(m, n) for m, n, *_ in listed}
    assert ("fastconv.kernels.cpu.direct", "conv2d_tiled") in names


def test_a_forked_child_forgets_the_parents_worker():
    """After fork() the child has the parent's pipes but no reader thread: it must not wait on
    them (its kernels look themselves up again at their next call). The child runs no
    parallel kernel: the OpenMP runtime aborts a forked child that does."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork() here")
    from fastconv.kernels.cpu import pool

    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    pool.avg_pool2d_forward_2x2(x)
    k, sig = pool.avg_pool2d_forward_2x2, (numba.typeof(x),)
    with k._lock:  # the parent: a worker, and a build it waits for
        k._pending.add(sig)
        assert tiers._submit(k, sig)
    assert tiers._worker is not None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its tiers state is fresh, and waiting returns at once
        code = 1
        try:
            fresh = tiers._worker is None and tiers._current is None
            fresh = fresh and not any(k._pending for k in tiers.REGISTRY.values())
            code = 0 if fresh and tiers.idle() and tiers.wait(5) else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    status = os.read(r, 1)
    os.waitpid(pid, 0)
    assert status == b"\x00"
    assert fc.wait_for_kernels(120)
