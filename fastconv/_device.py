"""Moving arrays between host and GPU for layers, losses and optimizers.

numba.cuda is imported only inside these functions, so the CPU path never needs numba-cuda.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dispatch, shapes

DEVICES = ("cpu", "cuda")


def is_device(a: Any) -> bool:
    return a is not None and shapes.is_device_array(a)


def to_device(a: np.ndarray, what: str = "to") -> Any:
    """Copy a host array to the GPU (a device array stays where it is)."""
    if is_device(a):
        return a
    ok, why = dispatch.cuda_status()
    if not ok:
        raise RuntimeError(f"{what}('cuda'): no usable GPU: {why}")
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(a).reshape(np.shape(a)))  # 0-d stays 0-d


def to_host(a: Any) -> Any:
    """NumPy copy of a device array; host arrays (and None) pass through."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


def like(a: Any, host: np.ndarray) -> Any:
    """``host`` placed where ``a`` is."""
    return to_device(host) if is_device(a) else host


def _cuda_op(name: str):
    """The CUDA backend's helper ``name`` if it has one (None otherwise)."""
    return getattr(dispatch.backend_ops(name, "cuda"), name, None)


def zeros_like(a: Any) -> Any:
    """Zeros of a's shape and dtype, where a is (optimizer state buffers)."""
    shape, dtype = tuple(int(s) for s in a.shape), np.dtype(a.dtype)
    if is_device(a):
        zeros = _cuda_op("zeros")
        if zeros is not None:
            return zeros(shape, dtype)
    return like(a, np.zeros(shape, dtype))


def full_like(a: Any, value: float) -> Any:
    """``value`` everywhere, in a's shape and dtype, where a is (optimizer state buffers)."""
    if value == 0:
        return zeros_like(a)
    return like(a, np.full(tuple(int(s) for s in a.shape), value, np.dtype(a.dtype)))


def copy(a: Any) -> Any:
    """A copy of a, where a is."""
    if isinstance(a, np.ndarray):
        return a.copy()
    from numba import cuda

    out = cuda.device_array(tuple(int(s) for s in a.shape), np.dtype(a.dtype))
    out.copy_to_device(a)
    return out


def add(dst: Any, src: Any) -> Any:
    """dst += src, in place where dst is (gradient accumulation over several backward calls
    without zero_grad()): NumPy on the host, the CUDA backend's add_ kernel on the GPU."""
    if isinstance(dst, np.ndarray):
        dst += src
        return dst
    return dispatch.backend_ops("add_", "cuda").add_(dst, src)
