import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# Warm start (fastconv/_warm.py) would run a fresh process's first CPU calls on the oracle:
# every test comparing a CPU kernel to the oracle would then compare the oracle to itself.
# Off for the whole suite; tests/test_warm.py turns it on in processes of its own.
os.environ.setdefault("FASTCONV_WARM_START", "0")

# Autotuning must not read or write the user's cache during tests.
os.environ.setdefault("FASTCONV_CACHE_DIR", tempfile.mkdtemp(prefix="fastconv-test-cache-"))

# CI runs the full profile (>= 200 generated configurations per op); "dev" is for quick local loops.
settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "dev", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _numba_threads_restored():
    """In-process CLI runs (``--threads N``) set Numba's thread count for the whole process;
    put it back after each test, so that no test sees another's setting (the autotune cache
    key includes the thread count)."""
    import numba

    n = numba.get_num_threads()
    yield
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
