"""fastconv: convolutional networks on hand-written kernels (Numba CPU and CUDA).

import fastconv as fc
y = fc.conv2d(x, w, b, stride=1, padding=2)
"""

import os

# Numba's OpenMP threads and OpenBLAS's threads take turns on the same cores (im2col, then GEMM,
# then im2col...). Spinning OpenMP workers starve the BLAS threads: 5-7x slower on LeNet-sized
# convs. Passive waiting fixes it; it must be set before the OpenMP runtime starts, and a user's
# own setting (OMP_WAIT_POLICY, or a GOMP_SPINCOUNT to spin a bounded while) wins.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import dispatch, reference, shapes  # noqa: E402
from .dispatch import using  # noqa: E402
from .functional import (  # noqa: E402
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

# ---- layers, losses, optimizers, initialisers, data, models, training
from . import datasets, init, losses, models, optim, training  # noqa: E402
from .functional import (  # noqa: E402
    adam_update,
    batch_norm2d,
    batch_norm2d_backward,
    conv1d,
    conv1d_backward,
    cross_entropy,
    dropout,
    flatten,
    leaky_relu,
    leaky_relu_backward,
    linear,
    linear_backward,
    mse_loss,
    relu,
    relu_backward,
    sgd_update,
    sigmoid,
    sigmoid_backward,
    tanh,
    tanh_backward,
)
from .init import manual_seed  # noqa: E402
from .layers import (  # noqa: E402
    AvgPool2d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool2d,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from .losses import CrossEntropyLoss, MSELoss  # noqa: E402

__all__ += [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv1d",
    "Conv2d",
    "ConvTranspose2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Layer",
    "LeakyReLU",
    "Linear",
    "MSELoss",
    "MaxPool2d",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "adam_update",
    "batch_norm2d",
    "batch_norm2d_backward",
    "conv1d",
    "conv1d_backward",
    "cross_entropy",
    "datasets",
    "dropout",
    "flatten",
    "init",
    "leaky_relu",
    "leaky_relu_backward",
    "linear",
    "linear_backward",
    "losses",
    "manual_seed",
    "models",
    "mse_loss",
    "optim",
    "relu",
    "relu_backward",
    "sgd_update",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "training",
]
