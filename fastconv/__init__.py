"""fastconv: convolutional networks on hand-written kernels (Numba CPU and CUDA).

    import fastconv as fc
    y = fc.conv2d(x, w, b, stride=1, padding=2)
"""

from . import dispatch, reference, shapes
from .dispatch import using
from .functional import (
    avg_pool2d,
    avg_pool2d_backward,
    conv2d,
    conv2d_backward,
    conv2d_backward_input,
    conv2d_backward_weight,
    conv_transpose2d,
    conv_transpose2d_backward,
    max_pool2d,
    max_pool2d_backward,
)

__version__ = "0.1.0"

__all__ = [
    "avg_pool2d",
    "avg_pool2d_backward",
    "conv2d",
    "conv2d_backward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "conv_transpose2d",
    "conv_transpose2d_backward",
    "dispatch",
    "max_pool2d",
    "max_pool2d_backward",
    "reference",
    "shapes",
    "using",
]
