"""The one test helper: compare an op (and its gradients) with the oracle, plus finite differences.

check_op checks, in this order: shape, dtype, values, then every gradient. Tolerances come from
the one table TOL, per dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# dtype -> (rtol, atol). float64 kernels differ from the oracle only by summation order;
# float32 ones by float32 rounding over reductions of up to a few thousand terms.
TOL = {
    np.dtype(np.float64): (1e-10, 1e-10),
    np.dtype(np.float32): (1e-4, 1e-4),
}

DTYPES = (np.float64, np.float32)


def to_host(a):
    """NumPy view of a result (device arrays are copied back)."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


def assert_close(actual, expected, dtype=None, what: str = "value") -> None:
    """Shape, then dtype, then values (scaled by the magnitude of the expected result)."""
    actual, expected = to_host(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    dtype = np.dtype(dtype or expected.dtype)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        actual.astype(np.float64),
        expected.astype(np.float64),
        rtol=rtol,
        atol=atol * scale,
        err_msg=what,
    )


def check_op(
    actual: Callable,
    expected: Callable,
    args: Sequence,
    grads: Callable | None = None,
    expected_grads: Callable | None = None,
    grad_y: np.ndarray | None = None,
    dtype=None,
) -> None:
    """Check ``actual(*args)`` against ``expected(*args)``: shape, dtype, values, then gradients.

    ``grads(grad_y, *args)`` / ``expected_grads(grad_y, *args)`` return tuples of gradients;
    each pair is checked the same way (None entries must match None).
    """
    dtype = np.dtype(dtype or args[0].dtype)
    y, y_ref = actual(*args), expected(*args)
    assert_close(y, y_ref, dtype, "forward")
    if grads is None:
        return
    if grad_y is None:
        grad_y = np.random.default_rng(1).standard_normal(np.shape(y_ref)).astype(dtype)
    got, ref = grads(grad_y, *args), expected_grads(grad_y, *args)
    if not isinstance(got, tuple):
        got, ref = (got,), (ref,)
    assert len(got) == len(ref)
    for i, (a, e) in enumerate(zip(got, ref)):
        if e is None:
            assert a is None, f"gradient {i}: expected None"
            continue
        assert_close(a, e, dtype, f"gradient {i}")


def numerical_grad(f: Callable[[], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar f() with respect to x (perturbed in place)."""
    g = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g
