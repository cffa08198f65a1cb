"""blas.gemm, the BLAS call the im2col kernels make from inside Numba, against NumPy's matmul."""

import numpy as np
import pytest
from fastconv.kernels.cpu import blas

from tests.helpers import DTYPES, assert_close

pytestmark = pytest.mark.skipif(
    not blas.available(), reason="NumPy's BLAS has no 64-bit-integer CBLAS entry point here"
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_gemm_transposes_and_offsets(dtype, ta, tb):
    """op(a) @ op(b) into a block of c, with operands at offsets inside flat buffers; the rest
    of c is left alone."""
    rng = np.random.default_rng(0)
    M, N, K = 5, 7, 3
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(dtype)
    af = np.concatenate([np.full(4, np.nan, dtype), a.ravel()])
    bf = np.concatenate([np.full(2, np.nan, dtype), b.ravel()])
    cf = np.full(3 + M * N + 3, -1.0, dtype)
    blas.gemm(ta, tb, M, N, K, af, 4, a.shape[1], bf, 2, b.shape[1], cf, 3, N)
    expected = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    assert_close(cf[3 : 3 + M * N].reshape(M, N), expected, dtype)
    assert (cf[:3] == -1).all() and (cf[-3:] == -1).all()


def test_forced_off_by_environment(monkeypatch):
    monkeypatch.setattr(blas, "_found", None)
    monkeypatch.setenv("FASTCONV_NATIVE_GEMM", "0")
    assert blas.available() is False
