"""Side-by-side comparison runner: ``python -m benchmarks.compare [--quick] ...``.

The runner lives in the library (``fastconv.bench``) so that ``fastconv bench`` works from any
install; this module is the source checkout's entry point. See ``--help``.
"""

from fastconv.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
