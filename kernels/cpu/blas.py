"""GEMM callable from inside Numba kernels: the very BLAS library NumPy uses, called directly.

Why: a batch-chunked im2col convolution is a few short steps per chunk (im2col, GEMM, transpose).
Run from Python threads, every step is a native call that gives up the GIL and takes it back,
and each take-back can wait for the other thread (tens of microseconds on a small VM): LeNet-5's
conv1 backward ran slower on two threads than on one. With GEMM callable from Numba, a whole
chunk is one native call and all chunks one ``prange`` loop (im2col_gemm.py).

How: threadpoolctl (threads.blas_libraries) finds the OpenBLAS that NumPy loaded; its ILP64
CBLAS entry points (``scipy_cblas_sgemm64_`` in NumPy's own wheels, ``cblas_sgemm64_`` in other
64-bit-integer builds) are registered with LLVM under fixed names, which the kernels call as
external functions (so Numba's on-disk cache stays valid across processes). Where no such
library is found, ``available()`` is False and the CPU backend keeps its Python-thread path
(threads.py); ``FASTCONV_NATIVE_GEMM=0`` forces that path.
"""

from __future__ import annotations

import ctypes
import os

import llvmlite.binding as llb
import numpy as np
from numba import njit, types

from ._common import U
from .threads import blas_libraries

_NAMES = ("fastconv_cblas_sgemm_ilp64", "fastconv_cblas_dgemm_ilp64")
_found: bool | None = None


def available() -> bool:
    """True when a 64-bit-integer CBLAS sgemm/dgemm was found and registered (once)."""
    global _found
    if _found is None:
        _found = os.environ.get("FASTCONV_NATIVE_GEMM", "1") != "0" and _register()
    return _found


def _register() -> bool:
    for lib_info in blas_libraries():  # threadpoolctl's handles, found once for both uses
        if lib_info.internal_api != "openblas":
            continue
        try:
            lib = ctypes.CDLL(lib_info.filepath)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            symbols = (f"{prefix}cblas_sgemm64_", f"{prefix}cblas_dgemm64_")
            if all(hasattr(lib, s) for s in symbols):
                for name, s in zip(_NAMES, symbols):
                    llb.add_symbol(name, ctypes.cast(getattr(lib, s), ctypes.c_void_p).value)
                return True
    return False


# cblas_?gemm(order, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) with
# 64-bit integers; pointers are passed as uintp (same registers as a pointer on x86-64/arm64).
def _sig(f):
    i32, i64, p = types.int32, types.int64, types.uintp
    return types.void(i32, i32, i32, i64, i64, i64, f, p, i64, p, i64, f, p, i64)


_sgemm = types.ExternalFunction(_NAMES[0], _sig(types.float32))
_dgemm = types.ExternalFunction(_NAMES[1], _sig(types.float64))
_ROW_MAJOR, _N, _T = 101, 111, 112


@njit(nogil=True, cache=True)
def gemm(ta, tb, M, N, K, a, ia, lda, b, ib, ldb, c, ic, ldc):
    """c[ic:] (M, N, row stride ldc) = op(a[ia:]) @ op(b[ib:]), op = transpose where ta / tb.

    a, b, c: flat C-contiguous arrays of one dtype (float32 or float64); ia, ib, ic: element
    offsets of the operands inside them; lda, ldb: row strides of a and b as stored. The
    caller has checked every extent (BLAS does not).
    """
    gemm_beta(ta, tb, M, N, K, a, ia, lda, b, ib, ldb, 0.0, c, ic, ldc)


@njit(nogil=True, cache=True)
def gemm_beta(ta, tb, M, N, K, a, ia, lda, b, ib, ldb, beta, c, ic, ldc):
    """``gemm`` into beta * c: beta 0 overwrites c (whatever it held, NaN included), 1 adds
    the product to it (a sum over several products, e.g. one per image)."""
    s = a.itemsize
    pa, pb = a.ctypes.data + U(ia * s), b.ctypes.data + U(ib * s)
    pc = c.ctypes.data + U(ic * s)
    ta_, tb_ = (_T if ta else _N), (_T if tb else _N)
    if s == 4:
        _sgemm(
            _ROW_MAJOR, ta_, tb_, M, N, K, np.float32(1), pa, lda, pb, ldb, np.float32(beta), pc,
            ldc,
        )  # fmt: skip
    else:
        _dgemm(_ROW_MAJOR, ta_, tb_, M, N, K, 1.0, pa, lda, pb, ldb, float(beta), pc, ldc)
