"""Numba CUDA kernels (``@cuda.jit``) and the CUDA backend module ``ops``.

Imported only when the CUDA backend is first used (``fastconv.dispatch.backend_ops``), never by
``import fastconv``. Importing it also lets the Numba CUDA simulator's device arrays pass for
device arrays (see ``_compat``).
"""

from . import _compat  # noqa: F401
