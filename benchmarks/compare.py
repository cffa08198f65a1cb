"""Side-by-side comparison runner: fastconv backends beside PyTorch CPU and the NumPy oracle.

    python -m benchmarks.compare               # full table, written under benchmarks/results/
    python -m benchmarks.compare --quick       # fewer repeats, no oracle, no cold-compile probe

Everything runs in one process on synthetic MNIST-shaped data (no download, no GPU). Each figure
is the median of repeated calls after warm-up; the first call of each kernel (JIT compile or
cache load) is reported apart, and the cold compile (empty Numba cache, fresh process) apart
again. Ratios are against PyTorch measured in the same run with the same thread count.
Benchmarks never assert.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def threads() -> int:
    return int(
        os.environ.get("FASTCONV_THREADS", os.environ.get("NUMBA_NUM_THREADS", os.cpu_count()))
    )


def bench(fn, min_time: float = 0.3, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds per call after two warm-up calls."""
    fn()
    fn()
    times: list[float] = []
    t_end = time.perf_counter() + min_time
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sgemm_ceiling() -> float:
    """Best float32 GEMM rate NumPy's BLAS reaches here (GFLOP/s), over a few square sizes."""
    best = 0.0
    rng = np.random.default_rng(0)
    for n in (256, 512, 1024, 1536):
        a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
        t = bench(lambda a=a, b=b: a @ b, min_time=0.3)
        best = max(best, 2 * n**3 / t / 1e9)
    return best


def machine_info() -> dict:
    import numba

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": dt.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = "not installed"
    import fastconv

    info["fastconv"] = fastconv.__version__
    return info


def cold_compile_seconds() -> float | None:
    """Compile every CPU conv kernel used by one LeNet-5 conv in a fresh process, empty cache."""
    code = (
        "import time, numpy as np, fastconv as fc\n"
        "x = np.ones((2, 1, 28, 28), np.float32); w = np.ones((6, 1, 5, 5), np.float32)\n"
        "t = time.perf_counter()\n"
        "for a in ('im2col', 'direct'):\n"
        "    y = fc.conv2d(x, w, padding=2, backend='cpu', algorithm=a)\n"
        "    fc.conv2d_backward(y, x, w, padding=2, backend='cpu', algorithm=a)\n"
        "print(time.perf_counter() - t)\n"
    )
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def conv_impls(x, w, b, gy, padding, include_reference: bool):
    """name -> (forward fn, forward+backward fn) for every implementation available."""
    import fastconv as fc

    impls = {}
    if include_reference:
        impls["reference"] = (
            lambda: fc.conv2d(x, w, b, padding=padding, backend="reference"),
            lambda: (
                fc.conv2d(x, w, b, padding=padding, backend="reference"),
                fc.conv2d_backward(gy, x, w, padding=padding, backend="reference"),
            ),
        )
    for algo in ("im2col", "direct"):
        impls[f"cpu-{algo}"] = (
            lambda a=algo: fc.conv2d(x, w, b, padding=padding, backend="cpu", algorithm=a),
            lambda a=algo: (
                fc.conv2d(x, w, b, padding=padding, backend="cpu", algorithm=a),
                fc.conv2d_backward(gy, x, w, padding=padding, backend="cpu", algorithm=a),
            ),
        )
    try:
        import torch
    except ImportError:
        return impls
    tx, tw, tb = (torch.from_numpy(a).requires_grad_(True) for a in (x, w, b))
    tgy = torch.from_numpy(gy)

    def t_fwd():
        with torch.no_grad():
            return torch.nn.functional.conv2d(tx, tw, tb, padding=padding)

    def t_fwdbwd():
        tx.grad = tw.grad = tb.grad = None
        y = torch.nn.functional.conv2d(tx, tw, tb, padding=padding)
        y.backward(tgy)

    impls["torch"] = (t_fwd, t_fwdbwd)
    return impls


def run_conv_layers(quick: bool, rows: list[dict], log) -> None:
    from benchmarks.cases import CONV_LAYERS, conv_case

    for name in CONV_LAYERS:
        x, w, b, gy, padding, flops = conv_case(name)
        impls = conv_impls(x, w, b, gy, padding, include_reference=not quick)
        for pass_name, idx, mult in (("fwd", 0, 1), ("fwd+bwd", 1, 3)):
            torch_t = None
            measured = []
            for impl, fns in impls.items():
                fn = fns[idx]
                first = first_call(fn)
                t = bench(fn, min_time=0.1 if quick or impl == "reference" else 0.4)
                measured.append((impl, first, t))
                if impl == "torch":
                    torch_t = t
            for impl, first, t in measured:
                rows.append(
                    dict(
                        layer=name,
                        pass_=pass_name,
                        impl=impl,
                        first_ms=first * 1e3,
                        ms=t * 1e3,
                        gflops=mult * flops / t / 1e9,
                        vs_torch=(torch_t / t) if torch_t else None,
                        batch=x.shape[0],
                    )
                )
                log(f"  {name:16s} {pass_name:8s} {impl:11s} {t * 1e3:8.2f} ms")


def markdown(rows: list[dict], info: dict, ceiling: float, cold: float | None) -> str:
    lines = [
        "## Per-layer convolution, batch 64, float32",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads for every "
        f"library. Versions: fastconv {info['fastconv']}, numpy {info['numpy']}, numba "
        f"{info['numba']}, torch {info['torch']}, Python {info['python']}. Date: {info['date']}.",
        f"Measured sgemm ceiling (NumPy BLAS, float32): **{ceiling:.0f} GFLOP/s**. "
        + (
            f"Cold JIT compile of the CPU conv kernels (fresh process, empty cache): "
            f"**{cold:.1f} s**."
            if cold is not None
            else ""
        ),
        "",
        "`ms` is the median steady-state time per call; `first call` is the first call in the "
        "process (JIT compile or cache load); `vs torch` > 1 means fastconv is faster than "
        "PyTorch CPU in the same run. fwd+bwd counts 3x the forward FLOPs (forward, grad input, "
        "grad weight).",
        "",
        "| layer | pass | impl | ms | GFLOP/s | % sgemm | vs torch | first call ms |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = f"{r['vs_torch']:.2f}x" if r["vs_torch"] is not None else "-"
        lines.append(
            f"| {r['layer']} | {r['pass_']} | {r['impl']} | {r['ms']:.2f} | {r['gflops']:.1f} | "
            f"{100 * r['gflops'] / ceiling:.0f} % | {vs} | {r['first_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats; skip the NumPy oracle and the cold-compile probe",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "cpu_conv.md",
        help="markdown file to write (default: benchmarks/results/cpu_conv.md)",
    )
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    n = threads()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(n))
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        print("torch is not installed: PyTorch columns are left out (pip install torch)")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    log(f"machine: {info}")
    cold = None if args.quick else cold_compile_seconds()
    ceiling = sgemm_ceiling()
    log(f"sgemm ceiling {ceiling:.1f} GFLOP/s; cold compile {cold}")
    rows: list[dict] = []
    run_conv_layers(args.quick, rows, log)
    table = markdown(rows, info, ceiling, cold)
    print(table)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# CPU benchmark: `python -m benchmarks.compare`\n\n{table}")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
