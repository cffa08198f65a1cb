"""Benchmarks: pytest-benchmark suites and the side-by-side comparison runner (``python -m
benchmarks.compare``). Benchmarks never assert; every figure is recorded beside the machine,
versions and thread count, and compared with peers measured in the same run."""
