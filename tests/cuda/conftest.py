"""CUDA backend tests: run on the Numba CUDA simulator in CI and unchanged on a real GPU.

CI runs this folder as its own invocation with the simulator enabled before numba is imported:

    NUMBA_ENABLE_CUDASIM=1 pytest tests/cuda -q

Every test here is skipped when numba.cuda is unusable (no numba-cuda, or no GPU and no
simulator), except those marked ``no_gpu_needed`` (subprocess checks of the no-GPU behaviour).
Tests marked ``hardware`` (timing, determinism under real thread scheduling) are skipped on the
simulator. ``on_simulator`` tells a test which of the two it runs on.
"""

from __future__ import annotations

import os

import pytest

on_simulator = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _cuda_usable() -> tuple[bool, str]:
    try:
        from numba import cuda
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"numba.cuda cannot be imported: {e}"
    try:
        if not cuda.is_available():
            return False, "no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 to use the simulator)"
    except Exception as e:  # pragma: no cover
        return False, f"CUDA could not be initialised: {e}"
    return True, ""


CUDA_OK, CUDA_WHY = _cuda_usable()
if CUDA_OK:
    import fastconv.kernels.cuda  # noqa: F401  (lets simulator device arrays pass as device arrays)

# Every launch's (kernel, argument types) is recorded and compared with
# benchmarks/results/cuda_signatures.json, the list tests/test_cuda_compile.py compiles for a
# real GPU (see benchmarks/cuda_compile.py). FASTCONV_CUDA_SIGNATURES: "check" (default: a
# signature missing from the file fails the run), "update" (rewrite the file from this run;
# run the whole folder), "off".
SIGNATURES = os.environ.get("FASTCONV_CUDA_SIGNATURES", "check").strip().lower()
_launched: dict[str, set[tuple[str, ...]]] = {}
if CUDA_OK and SIGNATURES != "off":
    from fastconv.kernels.cuda import launch as _L

    from benchmarks import cuda_compile

    _names: dict[int, str] = {}
    _launch = _L.launch

    def _recording_launch(kernel, blocks, threads, *args):
        name = _names.get(id(kernel))
        if name is None:
            name = _names[id(kernel)] = cuda_compile.kernel_name(kernel)
        _launched.setdefault(name, set()).add(tuple(cuda_compile.arg_spec(a) for a in args))
        _launch(kernel, blocks, threads, *args)

    _L.launch = _recording_launch


def pytest_configure(config):
    config.addinivalue_line("markers", "no_gpu_needed: runs without a usable CUDA device")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        if not CUDA_OK and "no_gpu_needed" not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=CUDA_WHY))
        elif on_simulator and "hardware" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a real GPU (simulator run)"))


@pytest.fixture
def simulator() -> bool:
    """True when the tests run on the Numba CUDA simulator."""
    return on_simulator


def pytest_sessionfinish(session, exitstatus):
    if not _launched:
        return
    if SIGNATURES == "update":
        cuda_compile.save_manifest(_launched)
        print(f"\nwrote {cuda_compile.MANIFEST} ({sum(map(len, _launched.values()))} signatures)")
        return
    known = cuda_compile.load_manifest()
    missing = [
        f"  {name}({', '.join(sig)})"
        for name, sigs in sorted(_launched.items())
        for sig in sorted(sigs)
        if list(sig) not in known.get(name, [])
    ]
    if missing:
        print(
            f"\n{len(missing)} kernel signature(s) launched here are missing from "
            f"{cuda_compile.MANIFEST}, so no test compiles them for a GPU:\n"
            + "\n".join(missing)
            + "\nRun the whole folder with FASTCONV_CUDA_SIGNATURES=update to rewrite it."
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
