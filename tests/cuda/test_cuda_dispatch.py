"""Backend selection around CUDA: lazy import, clear errors without a GPU, device-array routing."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv import dispatch, reference
from tests.cuda.common import Foreign, is_numba_device, to_device
from tests.helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, simulator: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env.pop("FASTCONV_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.no_gpu_needed
def test_import_does_not_touch_cuda():
    """`import fastconv` (and a CPU op) never imports numba.cuda nor the CUDA kernels."""
    code = (
        "import sys, numpy as np, fastconv as fc\n"
        "fc.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))\n"
        "bad = [m for m in sys.modules if m.startswith(('numba.cuda', 'fastconv.kernels.cuda'))]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    r = _run(code, simulator=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.no_gpu_needed
def test_cuda_without_gpu_is_a_clear_error():
    """No GPU (and no simulator): backend='cuda' raises a RuntimeError that says why;
    backend='auto' stays on the CPU."""
    code = (
        "import numpy as np, fastconv as fc\n"
        "from numba import cuda\n"
        "if cuda.is_available():\n"
        "    print('SKIP: a GPU is present'); raise SystemExit(0)\n"
        "x, w = np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))\n"
        "assert fc.conv2d(x, w).shape == (1, 1, 2, 2)\n"
        "try:\n"
        "    fc.conv2d(x, w, backend='cuda')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    r = _run(code, simulator=False)
    assert r.returncode == 0, r.stdout + r.stderr
    if "SKIP" in r.stdout:
        pytest.skip("a real GPU is present")
    assert "conv2d: backend='cuda' is not available" in r.stdout
    assert "no usable CUDA GPU" in r.stdout


def test_cuda_status_ok():
    ok, why = dispatch.cuda_status()
    assert ok, why


def test_auto_routes_device_arrays_to_cuda_and_host_arrays_to_cpu():
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4))
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3))
    y_host = fc.conv2d(x, w)
    assert isinstance(y_host, np.ndarray)
    xd, wd = to_device(x, w)
    y_dev = fc.conv2d(xd, wd)
    assert is_numba_device(y_dev)
    assert_close(y_dev, reference.conv2d(x, w))
    y_f = fc.conv2d(Foreign(xd), Foreign(wd))  # __cuda_array_interface__ only
    assert is_numba_device(y_f)
    assert_close(y_f, reference.conv2d(x, w))


def test_host_inputs_with_cuda_backend_return_numpy():
    x = np.random.default_rng(2).standard_normal((1, 1, 4, 4)).astype(np.float32)
    y = fc.max_pool2d(x, 2, backend="cuda")
    assert isinstance(y, np.ndarray) and y.dtype == np.float32


def test_device_arrays_with_cpu_backend_is_an_error():
    (xd,) = to_device(np.ones((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="device arrays"):
        fc.max_pool2d(xd, 2, backend="cpu")


def test_cuda_ops_module_mirrors_cpu_signatures():
    """Same op names and parameter lists as the CPU backend modules."""
    import inspect

    from fastconv.kernels.cpu import nn as cpu_nn
    from fastconv.kernels.cpu import ops as cpu_ops
    from fastconv.kernels.cuda import ops as cuda_ops

    names = [
        "conv2d",
        "conv2d_backward",
        "max_pool2d",
        "max_pool2d_backward",
        "avg_pool2d",
        "avg_pool2d_backward",
    ]
    for name in names:
        a = list(inspect.signature(getattr(cpu_ops, name)).parameters)
        b = list(inspect.signature(getattr(cuda_ops, name)).parameters)
        assert a == b, (name, a, b)
    for name in cpu_nn.__all__:
        if not hasattr(cuda_ops, name):
            continue
        a = list(inspect.signature(getattr(cpu_nn, name)).parameters)
        b = list(inspect.signature(getattr(cuda_ops, name)).parameters)
        assert a == b, (name, a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_strided_device_arrays_get_a_contiguous_copy(ndim, dtype):
    """A strided device view (any rank an op takes) is copied to a contiguous device array with
    the same values, on the device; a contiguous one passes through as it is."""
    from fastconv.kernels.cuda import ops

    shape = (3, 2, 4, 5)[:ndim]
    a = np.random.default_rng(ndim).standard_normal(shape).astype(dtype)
    big = np.zeros(shape[:-1] + (2 * shape[-1],), dtype)
    big[..., ::2] = a
    (bigd,) = to_device(big)
    view = bigd[..., ::2]
    assert not view.is_c_contiguous()
    d = ops.to_device(view)
    assert is_numba_device(d) and d.is_c_contiguous()
    assert d.dtype == dtype and tuple(d.shape) == shape
    assert d.copy_to_host().tobytes() == a.tobytes()
    (whole,) = to_device(a)
    assert ops.to_device(whole) is whole
