"""fastconv: convolutional networks on hand-written kernels (Numba CPU and CUDA).

import fastconv as fc
y = fc.conv2d(x, w, b, stride=1, padding=2)
"""

import os

# Spin iterations an OpenMP worker waits for the next parallel loop before it sleeps: ~5 ms
# of one core after the last loop of a burst (measured: 5 ms of CPU time per idle second).
SPIN_COUNT = 100_000


def _start_numba_threads() -> None:
    """Start Numba's OpenMP threads now, spinning a short while between parallel loops.

    A training step is a burst of parallel loops a few hundred microseconds apart. Left to
    the runtime's default on this many threads (they outnumber the cores once the calling
    thread is counted) or told OMP_WAIT_POLICY=PASSIVE, the workers sleep at once and every
    loop pays a wake-up: ~50 us on the 2-core benchmark machine, where a batch-1 LeNet-5
    conv2 forward then took 64 us instead of 10. Spinning for GOMP_SPINCOUNT = SPIN_COUNT
    iterations covers a step; measured in alternating processes, LeNet-5 batch-64 steps ran
    1.3x faster than with passive waiting (batch 1: 1.33x, batch 256: 1.23x, Nielsen 1.11x,
    mnist_cnn unchanged). Endless spinning (OMP_WAIT_POLICY=ACTIVE) would keep a core busy
    while the user's own code runs between steps.

    The OpenMP runtime reads the variable once, when it loads, so it is set only while Numba
    loads it and is removed again: child processes do not inherit it. A library sharing that
    runtime and imported later in the same process (PyTorch's CPU build loads the same
    libgomp) gets the same setting. A user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
    """
    ours = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if ours:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    try:
        import numba

        numba.get_num_threads()  # loads the threading layer (and its OpenMP runtime)
    finally:
        if ours:
            os.environ.pop("GOMP_SPINCOUNT", None)


_start_numba_threads()


def _keep_freed_buffers() -> None:
    """Ask glibc's malloc to reuse freed multi-megabyte buffers instead of handing them back.

    A training step allocates its activations and gradients afresh (MB-sized arrays). By
    default glibc serves such sizes with mmap and unmaps them on free, or trims the freed top
    of the heap, so every step page-faults all of that memory in again: LeNet-5's batch-64
    step took 7.9 ms that way and 4.8 ms with the two thresholds below (the role a caching
    allocator plays in larger frameworks). Process-wide; arrays up to 32 MiB then come from
    the heap, and up to 256 MiB of freed heap is kept for reuse. Skipped when the user set
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, set FASTCONV_MALLOC=system, or the C
    library is not glibc.
    """
    env = os.environ
    if env.get("FASTCONV_MALLOC", "").lower() == "system":
        return
    if "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env:
        return
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return
        mallopt = ctypes.CDLL(None).mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 32 << 20)
        mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # pragma: no cover - no mallopt: nothing to tune
        pass


_keep_freed_buffers()

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
    adagrad_update,
    adam_update,
    batch_norm2d,
    batch_norm2d_backward,
    batch_norm2d_relu,
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
    rmsprop_update,
    sgd_update,
    sgd_update_many,
    sigmoid,
    sigmoid_backward,
    tanh,
    tanh_backward,
)
from .init import manual_seed  # noqa: E402
from .functional import (  # noqa: E402
    adaptive_avg_pool2d,
    adaptive_avg_pool2d_backward,
    add,
    batch_norm1d,
    cat,
    conv2d_relu,
    conv2d_relu_maxpool,
    div,
    elu,
    elu_backward,
    linear_relu,
    log_softmax,
    log_softmax_backward,
    matmul,
    mean,
    mul,
    nll_loss,
    reshape,
    softmax,
    softmax_backward,
    sub,
)
from .losses import CrossEntropyLoss, MSELoss, NLLLoss  # noqa: E402
from .nn import (  # noqa: E402
    ELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    ConvTranspose2d,
    Dropout,
    Flatten,
    Identity,
    Layer,
    LeakyReLU,
    Linear,
    LogSoftmax,
    MaxPool2d,
    Module,
    ModuleList,
    Parameter,
    ReLU,
    Sequential,
    Sigmoid,
    Softmax,
    Tanh,
)
from .summary import summary  # noqa: E402  (fc.summary is the function)
from . import features  # noqa: E402
from .features import Ensemble, extract_features  # noqa: E402
from .tensor import GradcheckError, Tensor, enable_grad, gradcheck, no_grad  # noqa: E402
from . import nn, ops  # noqa: E402


# optional extras: imported on first use, never by ``import fastconv``
_LAZY = ("onnx", "distributed")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastconv' has no attribute {name!r}")


def wait_for_kernels(timeout: float | None = None) -> bool:
    """Block until the CPU calls made so far run their compiled kernels at full speed. With an
    empty Numba cache, calls first run on the NumPy oracle while a background process
    compiles their kernels (warm start: ``fastconv/_warm.py``), then on a kernel's serial
    twin while its parallel build compiles in another (``kernels/cpu/tiers.py``); this waits
    for both. Benchmarks call it after their warm-up, so they never time either. False on
    timeout."""
    import time

    from . import _warm
    from .kernels.cpu import tiers

    end = None if timeout is None else time.monotonic() + timeout
    if not _warm.wait(timeout, idle=True):
        return False
    return tiers.wait(None if end is None else max(0.0, end - time.monotonic()))


def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    """A Tensor from data (``torch.tensor``'s habit)."""
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


__all__ += [
    "wait_for_kernels",
    "AdaptiveAvgPool2d",
    "BatchNorm1d",
    "ELU",
    "Ensemble",
    "extract_features",
    "features",
    "GradcheckError",
    "Identity",
    "LogSoftmax",
    "Module",
    "ModuleList",
    "NLLLoss",
    "Softmax",
    "Tensor",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "add",
    "batch_norm1d",
    "cat",
    "conv2d_relu",
    "conv2d_relu_maxpool",
    "div",
    "elu",
    "elu_backward",
    "enable_grad",
    "gradcheck",
    "linear_relu",
    "log_softmax",
    "log_softmax_backward",
    "matmul",
    "mean",
    "mul",
    "nll_loss",
    "nn",
    "no_grad",
    "ops",
    "reshape",
    "softmax",
    "softmax_backward",
    "sub",
    "summary",
    "tensor",
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
    "adagrad_update",
    "adam_update",
    "batch_norm2d",
    "batch_norm2d_backward",
    "batch_norm2d_relu",
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
    "rmsprop_update",
    "sgd_update",
    "sgd_update_many",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "training",
]
