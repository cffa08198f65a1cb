"""Hand-written kernels, installed as ``fastconv.kernels``.

``cpu/`` holds Numba ``@njit`` kernels, ``cuda/`` Numba CUDA kernels. Each backend exposes the same
op signatures through its ``ops`` module; kernels receive a geometry already validated by
``fastconv.shapes`` and never check bounds themselves.
"""
