"""Hypothesis strategies for random convolution / pooling configurations (tiny, odd, awkward)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from fastconv import shapes


@st.composite
def conv_configs(
    draw,
    max_batch: int = 3,
    max_cg: int = 3,
    max_k: int = 4,
    max_dilation: int = 3,
    max_extra: int = 5,
):
    """A valid conv2d configuration: dict(x_shape, w_shape, stride, padding, dilation, groups).

    The bounds shrink it for slow runners (the CUDA simulator): channels per group, kernel
    size, dilation, and how far H/W exceed the smallest input the kernel fits in.
    """
    G = draw(st.sampled_from([1, 1, 1, 2, 3]))
    CG = draw(st.integers(1, max_cg))
    KG = draw(st.integers(1, 3))
    if draw(st.integers(0, 5)) == 0:  # depthwise: one input channel per group
        G, CG = draw(st.integers(2, 4)), 1
    KH, KW = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    dh, dw = draw(st.integers(1, max_dilation)), draw(st.integers(1, max_dilation))
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
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = (sh, sw) if draw(st.booleans()) else (sh if sh == sw else (sh, sw))
    dilation = (dh, dw)
    # Smallest input the padded kernel fits in, plus a little.
    if padding == "same" or padding == "valid":
        pad_h = pad_w = 0
    else:
        pad_h, pad_w = shapes.pair("t", "padding", padding, minimum=0)
    H = max(1, dh * (KH - 1) + 1 - 2 * pad_h) + draw(st.integers(0, max_extra))
    W = max(1, dw * (KW - 1) + 1 - 2 * pad_w) + draw(st.integers(0, max_extra))
    N = draw(st.integers(1, max_batch))
    return dict(
        x_shape=(N, G * CG, H, W),
        w_shape=(G * KG, CG, KH, KW),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=G,
    )


@st.composite
def pool_configs(draw, max_batch: int = 3, max_c: int = 3, max_k: int = 4, max_extra: int = 6):
    """A valid pooling configuration: dict(x_shape, kernel_size, stride, padding, ceil_mode)."""
    KH, KW = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, max_k), st.integers(1, max_k))))
    ph, pw = draw(st.integers(0, KH // 2)), draw(st.integers(0, KW // 2))
    H = max(1, KH - 2 * ph) + draw(st.integers(0, max_extra))
    W = max(1, KW - 2 * pw) + draw(st.integers(0, max_extra))
    ks = (KH, KW) if KH != KW or draw(st.booleans()) else KH
    return dict(
        x_shape=(draw(st.integers(1, max_batch)), draw(st.integers(1, max_c)), H, W),
        kernel_size=ks,
        stride=stride,
        padding=(ph, pw),
        ceil_mode=draw(st.booleans()),
    )


def arrays(rng: np.random.Generator, dtype, *shapes_):
    return [rng.standard_normal(s).astype(dtype) for s in shapes_]
