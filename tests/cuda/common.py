"""Shared pieces of the CUDA tests: tiny random configurations, hypothesis settings, devices.

The simulator runs each CUDA thread as a Python thread, so shapes stay tiny and example counts
low; the same tests run unchanged on a GPU (HYPOTHESIS_CUDA_EXAMPLES raises the count there).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings

from tests.strategies import conv_configs, pool_configs

EXAMPLES = int(os.environ.get("HYPOTHESIS_CUDA_EXAMPLES", "12"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def few(n: int = EXAMPLES) -> settings:
    return settings(SETTINGS, max_examples=n)


def to_device(*arrays):
    from numba import cuda

    return [None if a is None else cuda.to_device(np.ascontiguousarray(a)) for a in arrays]


def is_numba_device(a) -> bool:
    return bool(getattr(type(a), "__cuda_ndarray__", False))


class Foreign:
    """A stand-in for a CuPy array / PyTorch tensor: only ``__cuda_array_interface__``
    (plus shape and dtype, as both libraries have)."""

    def __init__(self, dev):
        self._dev = dev  # keeps the memory alive
        self.__cuda_array_interface__ = dev.__cuda_array_interface__
        self.shape = tuple(dev.shape)
        self.dtype = np.dtype(dev.dtype)


def tiny_conv_configs():
    """A valid conv2d configuration small enough for the simulator."""
    return conv_configs(max_batch=2, max_cg=2, max_k=3, max_dilation=2, max_extra=3)


def tiny_pool_configs():
    """A valid pooling configuration small enough for the simulator."""
    return pool_configs(max_batch=2, max_c=2, max_k=3, max_extra=4)


def conv_params(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
