"""The dispatcher is one pure function: tested here without running any kernel."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import shapes
from fastconv.dispatch import Choice, select

LENET_C1 = shapes.conv2d_geometry("t", (64, 1, 28, 28), (6, 1, 5, 5), 1, 2)
LENET_C2 = shapes.conv2d_geometry("t", (64, 6, 14, 14), (16, 6, 5, 5))
DEPTHWISE = shapes.conv2d_geometry("t", (8, 32, 14, 14), (32, 1, 3, 3), groups=32)
POOL = shapes.pool2d_geometry("t", (8, 6, 28, 28), 2)


def test_auto_is_cpu_for_host_and_cuda_for_device():
    assert select("conv2d", LENET_C2).backend == "cpu"
    assert select("conv2d", LENET_C2, on_device=True).backend == "cuda"


def test_documented_cpu_heuristic():
    strided = shapes.conv2d_geometry("t", (64, 16, 14, 14), (32, 16, 3, 3), 2, 1)
    one_by_one = shapes.conv2d_geometry("t", (2, 3, 5, 5), (16, 3, 1, 1), 2)
    # the CPU: direct for every forward convolution and the conv2d backward ops at stride 1
    for geom in (LENET_C1, LENET_C2, DEPTHWISE, strided):
        assert select("conv2d", geom) == Choice("cpu", "direct")
    for op in ("conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight"):
        assert select(op, LENET_C2).algorithm == "direct"
        assert select(op, strided).algorithm == "im2col"  # 16*3*3 = 144 >= 8, K=32
        assert select(op, one_by_one).algorithm == "direct"  # 3*1*1 = 3 < 8
    assert select("conv_transpose2d", LENET_C2).algorithm == "im2col"  # the general rule
    # pointwise (1x1, stride 1, no padding): the general rule for every op
    pointwise = shapes.conv2d_geometry("t", (8, 32, 14, 14), (16, 32, 1, 1))
    thin = shapes.conv2d_geometry("t", (8, 3, 14, 14), (16, 3, 1, 1))  # 3*1*1 = 3 < 8
    for op in ("conv2d", "conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight"):
        assert select(op, pointwise).algorithm == "im2col"
        assert select(op, thin).algorithm == "direct"
    # elsewhere (CUDA) the general rule: im2col unless the GEMM is thin
    assert select("conv2d", LENET_C2, on_device=True).algorithm == "im2col"  # 150, K=16
    assert select("conv2d", LENET_C1, on_device=True).algorithm == "im2col"  # 1*5*5 = 25
    assert select("conv2d", DEPTHWISE, on_device=True).algorithm == "direct"  # K/G = 1 < 4


def test_explicit_choices_win():
    assert select("conv2d", LENET_C2, backend="cpu", algorithm="direct") == Choice("cpu", "direct")
    assert select("conv2d", LENET_C2, backend="reference") == Choice("reference", "reference")
    assert select("conv2d", LENET_C2, backend="cpu", env_backend="reference").backend == "cpu"
    ctx = {"backend": "reference", "algorithm": "auto"}
    assert select("conv2d", LENET_C2, backend="cpu", context=ctx).backend == "cpu"


def test_env_and_context_override_auto():
    assert select("conv2d", LENET_C2, env_backend="reference").backend == "reference"
    ctx = {"backend": "cpu", "algorithm": "direct"}
    assert select("conv2d", LENET_C2, env_backend="reference", context=ctx) == Choice(
        "cpu", "direct"
    )
    with pytest.raises(ValueError, match="FASTCONV_BACKEND must be one of"):
        select("conv2d", LENET_C2, env_backend="gpu")


def test_pooling_has_one_algorithm():
    assert select("max_pool2d", POOL) == Choice("cpu", "direct")
    with pytest.raises(ValueError, match="pooling has only the 'direct' algorithm"):
        select("max_pool2d", POOL, algorithm="im2col")


def test_device_arrays_need_cuda_backend():
    with pytest.raises(ValueError, match="backend='cpu' needs host .* CUDA device arrays"):
        select("conv2d", LENET_C2, backend="cpu", on_device=True)


def test_using_context_and_env_reach_the_op(monkeypatch):
    x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2))
    calls = []
    monkeypatch.setattr(fc.reference, "conv2d", lambda *a, **k: calls.append("ref") or "ref")
    with fc.using(backend="reference"):
        assert fc.conv2d(x, w) == "ref"
    assert fc.conv2d(x, w).shape == (1, 1, 3, 3)
    monkeypatch.setenv("FASTCONV_BACKEND", "reference")
    assert fc.conv2d(x, w) == "ref"
    assert isinstance(fc.conv2d(x, w, backend="cpu"), np.ndarray)
    assert calls == ["ref", "ref"]


def test_cuda_backend_without_gpu_is_a_clear_error():
    """In a fresh process without a GPU (and without the simulator), 'cuda' explains itself, 'auto'
    stays on the CPU, and importing fastconv never imports numba.cuda."""
    code = (
        "import sys, numpy as np, fastconv as fc\n"
        "assert 'numba.cuda' not in sys.modules, 'import initialised CUDA'\n"
        "x, w = np.ones((1, 1, 4, 4)), np.ones((1, 1, 2, 2))\n"
        "fc.conv2d(x, w)\n"
        "assert 'numba.cuda' not in sys.modules, 'the CPU path imported numba.cuda'\n"
        "try:\n"
        "    fc.conv2d(x, w, backend='cuda')\n"
        "    print('CUDA-RAN')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
        "from numba import cuda\n"
        "print('GPU' if cuda.is_available() else 'NOGPU')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip().endswith("NOGPU"):
        assert "ERR conv2d: backend='cuda' is not available" in out.stdout
    else:
        assert "CUDA-RAN" in out.stdout


# ------------------------------------------------------------------ autotuning


def test_select_uses_tuned_choice_only_when_auto():
    assert select("conv2d", LENET_C2, tuned="direct", autotune=True) == Choice("cpu", "direct")
    assert select("conv2d", LENET_C2, autotune=True) == Choice("cpu", "auto")  # measure now
    strided = shapes.conv2d_geometry("t", (64, 16, 14, 14), (32, 16, 3, 3), 2, 1)
    assert select("conv2d_backward", strided, tuned="direct", autotune=False).algorithm == (
        "im2col"
    )  # tuning off: the heuristic, not the remembered choice
    assert select("conv2d", LENET_C2, algorithm="im2col", tuned="direct", autotune=True) == Choice(
        "cpu", "im2col"
    )
    ctx = {"backend": "auto", "algorithm": "im2col"}
    assert select("conv2d", LENET_C2, context=ctx, tuned="direct", autotune=True).algorithm == (
        "im2col"
    )
    assert select("conv2d", LENET_C2, on_device=True, autotune=True).algorithm == "im2col"


@pytest.fixture
def tune_dir(tmp_path, monkeypatch):
    from fastconv import autotune

    monkeypatch.setenv("FASTCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "1")
    monkeypatch.setattr(autotune, "_cpu_ticks", lambda: None)  # never "disturbed" (own test)
    autotune.clear()
    yield tmp_path
    autotune.clear()


def _ticks(script):
    """A stand-in for autotune._cpu_ticks: (machine, own) counters, the other processes' share
    per measurement from ``script`` (ticks of theirs; the process's own ticks stay 0)."""
    state = {"calls": 0, "machine": 0}

    def ticks():
        i = state["calls"]
        state["calls"] += 1
        if i % 2:  # the reading after a measurement's timed rounds
            state["machine"] += script[min(i // 2, len(script) - 1)]
        return state["machine"], 0

    return ticks


def test_autotune_drops_disturbed_measurements(tune_dir, monkeypatch):
    """Deferred mode: a measurement during which other processes took CPU time is not written;
    the key's next call measures again; a quiet one is written. Eager mode measures again at
    once, and keeps the last of QUIET_TRIES + 1 whatever the load."""
    from fastconv import autotune

    measured = []
    real_measure = autotune.measure

    def spy(candidates, repeats=7):
        measured.append(1)
        return real_measure(candidates, repeats)

    monkeypatch.setattr(autotune, "measure", spy)
    monkeypatch.setattr(autotune, "_cpu_ticks", _ticks([500, 500, 0]))  # busy, busy, quiet
    x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    k = autotune.key("conv2d", shapes.conv2d_geometry("t", x.shape, w.shape), x.dtype)
    fc.conv2d(x, w)
    fc.conv2d(x, w)  # the other candidate compiles
    assert autotune.wait(timeout=600)
    for n in (1, 2):  # disturbed: nothing written, measured again at the next call
        fc.conv2d(x, w)
        assert len(measured) == n and autotune._read(autotune.cache_path()).get(k) is None
    fc.conv2d(x, w)
    assert len(measured) == 3 and autotune._read(autotune.cache_path())[k] in ("im2col", "direct")
    fc.conv2d(x, w)
    assert len(measured) == 3  # remembered: no more measuring

    autotune.clear()
    measured.clear()
    monkeypatch.setenv("FASTCONV_AUTOTUNE", "eager")
    monkeypatch.setattr(autotune, "_cpu_ticks", _ticks([500]))  # always busy
    x = np.ones((2, 3, 9, 9))
    k = autotune.key("conv2d", shapes.conv2d_geometry("t", x.shape, w.shape), x.dtype)
    fc.conv2d(x, w)
    assert len(measured) == autotune.QUIET_TRIES + 1
    assert autotune._read(autotune.cache_path())[k] in ("im2col", "direct")
    assert not autotune._others_busy((0, 0), (3, 1), 0.1)  # 2 ticks of others: the resolution
    assert autotune._others_busy((0, 0), (300, 100), 1.0)  # 2 cores' worth for a second
    assert not autotune._others_busy(None, (300, 100), 1.0)  # no /proc: never disturbed


def test_autotune_measures_once_and_persists(tune_dir, monkeypatch):
    from fastconv import autotune

    monkeypatch.setenv("FASTCONV_AUTOTUNE", "eager")  # measured on the first call
    calls = []
    real_measure = autotune.measure

    def spy(candidates, repeats=5):
        calls.append(sorted(candidates))
        return real_measure(candidates, repeats)

    monkeypatch.setattr(autotune, "measure", spy)
    x, w = np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3))
    y1 = fc.conv2d(x, w)
    y2 = fc.conv2d(x, w)
    np.testing.assert_allclose(y1, fc.reference.conv2d(x, w))
    np.testing.assert_array_equal(y1, y2)
    assert calls == [["direct", "im2col"]]  # the second call reused the choice
    data = __import__("json").loads(autotune.cache_path().read_text())
    ((k, v),) = data["choices"].items()
    assert k.startswith("conv2d|") and "float64" in k and v in ("im2col", "direct")
    # a fresh process reads the file instead of measuring
    code = (
        "import numpy as np, fastconv as fc\n"
        "from fastconv import autotune\n"
        "autotune.measure = lambda *a, **k: (_ for _ in ()).throw(SystemExit('measured again'))\n"
        "fc.conv2d(np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr


def test_autotune_times_the_fused_call_itself(tune_dir, monkeypatch):
    """A fused conv + ReLU + max-pool is tuned as such, forward and backward: its own keys
    (the fusion in them), candidates that run the fused op, and the timed backward
    candidates leave the op's context alone; the candidates are called in turns."""
    from fastconv import autotune, dispatch

    monkeypatch.setenv("FASTCONV_AUTOTUNE", "eager")
    order, rounds = [], []
    real_measure = autotune.measure

    def spy(candidates, repeats=7):
        def tracked(name, fn):
            def call():
                order.append(name)
                return fn()

            return call

        rounds.append(sorted(candidates))
        return real_measure({k: tracked(k, f) for k, f in candidates.items()}, repeats)

    monkeypatch.setattr(autotune, "measure", spy)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    xt, wt = fc.Tensor(x, requires_grad=True), fc.Tensor(w, requires_grad=True)
    y = fc.conv2d_relu_maxpool(xt, wt, None, pool=2)
    gy = rng.standard_normal(y.shape)
    y.backward(gy, retain_graph=True)  # keep the context to look at below
    keys = sorted(autotune._read(autotune.cache_path()))
    assert len(keys) == 2 and all("+relu+pool2x2" in k for k in keys), keys
    pairs = sorted(dispatch.PAIRS)  # the backward of grad_x and grad_w: the pairs as well
    assert rounds == [["direct", "im2col"], sorted(["direct", "im2col", *pairs])]
    # warm-up calls first, then the candidates in turns: 1 + 7 calls each
    assert order[:16] == ["im2col", "direct"] * 8
    assert order[16:] == ["im2col", "direct", *dispatch.PAIRS] * 8
    assert y._node.ctx.scratch["pool"][0] is y.data  # the op's context holds its own call


def test_autotune_deferred_keeps_the_heuristic_and_tunes_for_later(tune_dir, monkeypatch):
    """Deferred (the default): the first call runs the heuristic's choice without compiling or
    timing the other candidate; the second call has that one compiled (inline, see
    autotune._background_ok); a call after that times both and writes the winner for later processes, while this process
    keeps its first choice (same bits on every call)."""
    from fastconv import autotune, dispatch

    measured, warmed = [], []
    real_measure, real_warm = autotune.measure, autotune._warm_up

    def spy_measure(candidates, repeats=7):
        measured.append(sorted(candidates))
        return real_measure(candidates, repeats)

    def spy_warm(calls, done):
        warmed.append(len(calls))
        return real_warm(calls, done)

    monkeypatch.setattr(autotune, "measure", spy_measure)
    monkeypatch.setattr(autotune, "_warm_up", spy_warm)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    y1 = fc.conv2d(x, w)
    assert measured == [] and warmed == []  # first call: the heuristic, nothing else
    assert autotune.lookup(autotune.key("conv2d", shapes.conv2d_geometry(
        "t", x.shape, w.shape), x.dtype)) is None  # fmt: skip
    y2 = fc.conv2d(x, w)
    assert measured == [] and warmed == [1]  # second call: the other candidate compiles
    assert autotune.wait(timeout=600)
    y3 = fc.conv2d(x, w)
    assert measured == [["direct", "im2col"]]  # timed once both were compiled
    y4 = fc.conv2d(x, w)
    assert len(measured) == 1
    np.testing.assert_allclose(y1, fc.reference.conv2d(x, w))
    for y in (y2, y3, y4):  # this process keeps the heuristic's algorithm: the same bits
        np.testing.assert_array_equal(y, y1)
    geom = shapes.conv2d_geometry("t", x.shape, w.shape)
    assert dispatch.cpu_conv_algorithm(geom) == "direct"
    ((k, v),) = autotune._read(autotune.cache_path()).items()  # for later processes
    assert k.startswith("conv2d|") and v in ("im2col", "direct")


def test_autotune_warm_up_runs_inline_without_a_safe_threading_layer(tune_dir, monkeypatch):
    from fastconv import autotune

    monkeypatch.setattr(autotune, "_background_ok", lambda: False)
    ran, done = [], __import__("threading").Event()
    autotune._warm_up([lambda: ran.append(1)], done)
    assert ran == [1] and done.is_set()
    failing = __import__("threading").Event()
    autotune._warm_up([lambda: 1 / 0], failing)  # a failed warm-up only skips the timing
    assert failing.is_set()


def test_autotune_off_uses_heuristic(tune_dir, monkeypatch):
    from fastconv import autotune

    monkeypatch.setenv("FASTCONV_AUTOTUNE", "0")
    monkeypatch.setattr(
        autotune, "measure", lambda *a, **k: pytest.fail("measured with tuning off")
    )
    fc.conv2d(np.ones((2, 3, 8, 8)), np.ones((4, 3, 3, 3)))
    assert not autotune.cache_path().exists()


def test_autotune_cache_is_safe_under_concurrent_writers(tune_dir):
    """Several processes record different keys at once: every key survives, the file stays JSON."""
    from fastconv import autotune

    code = (
        "import sys\n"
        "from fastconv import autotune\n"
        "for i in range(20):\n"
        "    autotune._write(f'p{sys.argv[1]}-k{i}', 'direct')\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(p)], env=dict(os.environ))
        for p in range(4)
    ]
    assert all(p.wait() == 0 for p in procs)
    choices = autotune._read(autotune.cache_path())
    assert len(choices) == 80 and set(choices.values()) == {"direct"}


def test_autotune_ignores_corrupt_or_foreign_cache(tune_dir):
    from fastconv import autotune

    autotune.cache_path().parent.mkdir(parents=True, exist_ok=True)
    autotune.cache_path().write_text("{not json")
    assert autotune.lookup("anything") is None
    autotune.clear()
    autotune.cache_path().write_text('{"format": 999, "choices": {"k": "direct"}}')
    assert autotune.lookup("k") is None
    autotune.clear()
    autotune.cache_path().write_text(
        f'{{"format": {autotune.FORMAT}, "choices": {{"k": "direct"}}}}'
    )
    assert autotune.lookup("k") == "direct"  # the same file, well-formed, is read


def test_fast_environment_reads_follow_os_environ(monkeypatch):
    """fastconv._env.get is os.environ.get: set, changed, removed, non-ASCII, and what the
    dispatcher makes of FASTCONV_BACKEND read through it."""
    from fastconv import _env, dispatch

    name = "FASTCONV_TEST_ENV_READ"
    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None and _env.get(name, "d") == "d"
    for value in ("1", "", "  off ", "caf\u00e9", "a=b"):
        monkeypatch.setenv(name, value)
        assert _env.get(name) == os.environ.get(name) == value
    monkeypatch.delenv(name)
    assert _env.get(name, "gone") == "gone"
    g = shapes.conv2d_geometry("t", (1, 1, 8, 8), (2, 1, 3, 3))
    monkeypatch.setenv("FASTCONV_BACKEND", "reference")
    assert dispatch.choose("conv2d", g, "auto", "auto", False).backend == "reference"
    monkeypatch.setenv("FASTCONV_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTCONV_BACKEND must be one of"):
        dispatch.choose("conv2d", g, "auto", "auto", False)
    monkeypatch.delenv("FASTCONV_BACKEND")
    assert dispatch.choose("conv2d", g, "auto", "auto", False).backend == "cpu"
