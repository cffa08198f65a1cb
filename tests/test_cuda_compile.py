"""Every CUDA kernel compiles for a real GPU, at every signature the CUDA tests launch.

The Numba CUDA simulator runs the kernels' Python and never NVVM, so a kernel that does not
lower, or asks for more shared memory or registers than a block may have, passes there and
fails on its first real launch. Here each recorded signature
(benchmarks/results/cuda_signatures.json, kept current by tests/cuda/conftest.py) goes through
NVVM to PTX and through ptxas (nvJitLink) to sm_90 code, the H100's, with no GPU and no
driver, using the tile set a GPU uses. Runs in the CPU invocation: the simulator is off here.
Needs the ``nvvm`` extra (NVVM and nvJitLink wheels): without it the module is skipped and
says why; with it installed, a toolchain that does not work is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("the simulator has no NVVM: run this file without it", allow_module_level=True)
pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (the cuda extra)")

from benchmarks import cuda_compile as cc  # noqa: E402

WHY = cc.toolchain_missing()
if WHY and not cc.toolchain_installed():
    pytest.skip(f"cannot compile CUDA kernels here: {WHY}", allow_module_level=True)

MANIFEST = cc.load_manifest()
SM90 = (9, 0)


def test_toolchain_works():
    """With the nvvm extra installed, a toolchain that does not work fails rather than skips."""
    assert WHY is None, WHY


def test_every_kernel_is_launched_by_the_cuda_tests():
    """A kernel missing from the list is one no CUDA test runs (and none compiles here)."""
    kernels = set(cc.kernels())
    assert len(kernels) >= 30
    assert sorted(kernels - set(MANIFEST)) == []
    assert sorted(set(MANIFEST) - kernels) == []  # stale names


def test_signature_text_round_trips():
    from numba import types

    assert cc.spec_type("array(float32, 4, C)") == types.Array(types.float32, 4, "C")
    assert cc.spec_type("array(float64, 1, A)") == types.Array(types.float64, 1, "A")
    assert cc.spec_type("bool") == types.boolean
    assert cc.spec_type("int64") == types.int64
    np = pytest.importorskip("numpy")
    assert cc.arg_spec(np.zeros((2, 3), np.float32)) == "array(float32, 2, C)"
    assert cc.arg_spec(np.zeros((2, 3))[:, ::2]) == "array(float64, 2, A)"
    assert cc.arg_spec(np.zeros((2, 3)).T) == "array(float64, 2, F)"
    assert [cc.arg_spec(v) for v in (True, 3, 2.5, np.float32(1))] == [
        "bool",
        "int64",
        "float64",
        "float32",
    ]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_kernel_compiles_for_sm90_within_launch_limits(name):
    threads = cc.max_threads(name)
    for spec in MANIFEST[name]:
        row = cc.compile_kernel(name, spec, SM90)
        assert 0 < row["registers"] <= cc.MAX_REGS_PER_THREAD, row
        assert cc.limit_problems(row, threads) == [], (spec, row)


def test_limit_check_flags_what_would_not_launch():
    row = {"registers": 128, "smem": 49 * 1024}
    problems = cc.limit_problems(row, 1024)
    assert len(problems) == 2
    assert "shared memory" in problems[0] and "128 registers x 1024 threads" in problems[1]
    assert cc.limit_problems({"registers": 64, "smem": 48 * 1024}, 1024) == []


def test_ptxas_reports_of_sm80_and_sm90_parse():
    sm90 = (
        "ptxas . 0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "info    : used 149 registers, used 1 barriers, 0 stack, 13312 bytes smem, "
        "1008 bytes cmem[0], 0 bytes lmem\n"
    )
    sm80 = (
        "info    : used 168 registers, used 1 barriers, 16 stack, 12288 bytes smem, "
        "832 bytes cmem[0], 8 bytes cmem[2], 4 bytes lmem\n"
    )
    a, b = cc.parse_report(sm90), cc.parse_report(sm80)
    assert (a["registers"], a["smem"], a["spill_stores"], a["spill_loads"]) == (149, 13312, 8, 12)
    assert (b["registers"], b["stack"], b["smem"], b["lmem"]) == (168, 16, 12288, 4)
    with pytest.raises(RuntimeError, match="one kernel"):
        cc.parse_report(sm90 + sm80)
