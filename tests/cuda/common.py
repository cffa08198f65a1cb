"""Shared pieces of the CUDA tests: tiny random configurations, hypothesis settings, devices.

The simulator runs each CUDA thread as a Python thread, so shapes stay tiny and example counts
low; the same tests run unchanged on a GPU (HYPOTHESIS_CUDA_EXAMPLES raises the count there).
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fastconv import shapes

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


@st.composite
def tiny_conv_configs(draw):
    """A valid conv2d configuration small enough for the simulator."""
    G = draw(st.sampled_from([1, 1, 2, 3]))
    CG = draw(st.integers(1, 2))
    KG = draw(st.integers(1, 3))
    if draw(st.integers(0, 4)) == 0:  # depthwise
        G, CG = draw(st.integers(2, 3)), 1
    KH, KW = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if mode == "same":
        sh = sw = 1
        padding = "same"
    elif mode == "valid":
        padding = "valid"
    elif mode == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 1)))
    pad_h = pad_w = 0
    if not isinstance(padding, str):
        pad_h, pad_w = shapes.pair("t", "padding", padding, minimum=0)
    H = max(1, dh * (KH - 1) + 1 - 2 * pad_h) + draw(st.integers(0, 3))
    W = max(1, dw * (KW - 1) + 1 - 2 * pad_w) + draw(st.integers(0, 3))
    return dict(
        x_shape=(draw(st.integers(1, 2)), G * CG, H, W),
        w_shape=(G * KG, CG, KH, KW),
        stride=(sh, sw),
        padding=padding,
        dilation=(dh, dw),
        groups=G,
    )


@st.composite
def tiny_pool_configs(draw):
    KH, KW = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    ph, pw = draw(st.integers(0, KH // 2)), draw(st.integers(0, KW // 2))
    H = max(1, KH - 2 * ph) + draw(st.integers(0, 4))
    W = max(1, KW - 2 * pw) + draw(st.integers(0, 4))
    return dict(
        x_shape=(draw(st.integers(1, 2)), draw(st.integers(1, 2)), H, W),
        kernel_size=(KH, KW),
        stride=stride,
        padding=(ph, pw),
        ceil_mode=draw(st.booleans()),
    )


def conv_params(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}
