"""Device-array interop: numba device arrays, foreign ``__cuda_array_interface__`` objects, and
the Numba CUDA simulator.

On a GPU, numba device arrays pass through untouched and any other object exposing
``__cuda_array_interface__`` (CuPy, PyTorch) is wrapped zero-copy by ``numba.cuda.as_cuda_array``.

The simulator (NUMBA_ENABLE_CUDASIM=1) has no ``as_cuda_array`` and its device arrays
(``FakeCUDAArray``, thin wrappers around NumPy arrays) expose no ``__cuda_array_interface__``,
so ``fastconv.shapes.is_device_array`` would not recognise them. ``install_simulator_shims``
(run when this package is imported) gives ``FakeCUDAArray`` the interface, describing its host
buffer, and ``as_device`` maps foreign interface objects back to a ``FakeCUDAArray`` over the
same memory, so the device-array paths run, zero-copy, under the simulator as on a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)


def _fake_array_type():
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray


def install_simulator_shims() -> None:
    """Give the simulator's device arrays a ``__cuda_array_interface__`` (idempotent)."""
    if not SIMULATOR:
        return
    fake = _fake_array_type()
    if "__cuda_array_interface__" in fake.__dict__:
        return

    def interface(self: Any) -> dict:
        d = dict(self._ary.__array_interface__)
        d["version"] = 3
        d["stream"] = None
        return d

    fake.__cuda_array_interface__ = property(interface)


def is_numba_device_array(a: Any) -> bool:
    """True for numba's own device arrays (real or simulated)."""
    return bool(getattr(type(a), "__cuda_ndarray__", False))


class _HostView:
    """An ``__array_interface__`` carrier so NumPy can view simulated device memory."""

    def __init__(self, iface: dict):
        self.__array_interface__ = {
            k: iface[k] for k in ("shape", "typestr", "data", "strides", "version") if k in iface
        }
        self.__array_interface__["version"] = 3


def as_device(a: Any) -> Any:
    """A numba device array over the same memory as ``a`` (no copy)."""
    if is_numba_device_array(a):
        return a
    if not hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"expected a CUDA device array; got {type(a).__name__}")
    if SIMULATOR:
        # Under the simulator "device" pointers are host pointers (see install_simulator_shims).
        host = np.asarray(_HostView(a.__cuda_array_interface__))
        return _fake_array_type()(host)
    return cuda.as_cuda_array(a)


install_simulator_shims()
