"""Compile every CUDA kernel for a real GPU without one: NVVM (Python -> PTX), then nvJitLink
(PTX -> SASS for the chosen architecture), with each kernel's registers, spills, stack and
shared memory as ptxas reports them.

The Numba CUDA simulator runs the kernels' Python, never NVVM: a kernel that does not lower,
or one that asks for more shared memory or registers than a block may have, passes there and
fails on the first real launch. This module closes that gap on a machine with no GPU.

Which signatures: the ones the CUDA test suite launches. ``tests/cuda`` records every launch
under the simulator (kernel, argument types, nothing else) and keeps them in
``benchmarks/results/cuda_signatures.json``; a launch with a signature missing from that file
fails the run until the file is brought up to date:

    NUMBA_ENABLE_CUDASIM=1 FASTCONV_CUDA_SIGNATURES=update python -m pytest tests/cuda

``tests/test_cuda_compile.py`` compiles every recorded signature and checks the hard limits;
this module's ``main`` writes the per-kernel table:

    python -m benchmarks.cuda_compile [--cc 9.0] [--out benchmarks/results/cuda_sm90.md]

Needs numba-cuda with the NVVM and nvJitLink libraries (the ``nvvm`` extra installs them);
no GPU, no driver. Kernels compile with the tile set of a real GPU ("default", launch.py)
unless FASTCONV_CUDA_TILES says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

MANIFEST = Path(__file__).parent / "results" / "cuda_signatures.json"
MODULES = ("direct", "elementwise", "extra", "gemm", "im2col", "pool")

# Hopper/Ampere per-block and per-SM limits (CUDA programming guide, compute capability 8.0-9.0).
STATIC_SMEM_LIMIT = 48 * 1024  # bytes of static __shared__ per block
REGS_PER_SM = 65536
MAX_REGS_PER_THREAD = 255


# --------------------------------------------------------------------------- recording


def kernels() -> dict[str, Any]:
    """Every ``@cuda.jit`` kernel (not device function) of fastconv.kernels.cuda, by name:
    ``module.attr``, or ``module.attr[key]`` for one held only in a module-level dict."""
    import importlib

    plain: dict[str, Any] = {}
    keyed: dict[str, Any] = {}
    for m in MODULES:
        for attr, value in vars(importlib.import_module(f"fastconv.kernels.cuda.{m}")).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for key, k in items:
                if not hasattr(k, "py_func"):
                    continue
                opts = getattr(k, "targetoptions", None)  # the simulator's kernels have _device
                if opts.get("device") if opts is not None else k._device:
                    continue  # a device function
                if key is None:
                    plain[f"{m}.{attr}"] = k
                else:
                    keyed[f"{m}.{attr}[{key!r}]"] = k
    held = {id(k) for k in plain.values()}
    return plain | {n: k for n, k in keyed.items() if id(k) not in held}


def kernel_name(kernel: Any) -> str:
    """The name ``kernels()`` gives ``kernel``."""
    for name, k in kernels().items():
        if k is kernel:
            return name
    raise LookupError(f"kernel {kernel!r} is not a module-level name in fastconv.kernels.cuda")


def arg_spec(a: Any) -> str:
    """The Numba type a launch gives argument ``a``, as text: ``array(float32, 4, C)``,
    ``int64``, ``float64``, ``bool``. Simulator device arrays count as device arrays."""
    import numpy as np

    host = getattr(a, "_ary", None)  # the simulator's FakeCUDAArray wraps a NumPy array
    if isinstance(host, np.ndarray):
        a = host
    if isinstance(a, np.ndarray):
        layout = "C" if a.flags.c_contiguous else ("F" if a.flags.f_contiguous else "A")
        return f"array({a.dtype.name}, {a.ndim}, {layout})"
    if hasattr(a, "is_c_contiguous"):  # a numba device array on a GPU
        layout = "C" if a.is_c_contiguous() else ("F" if a.is_f_contiguous() else "A")
        return f"array({np.dtype(a.dtype).name}, {len(a.shape)}, {layout})"
    if isinstance(a, (bool, np.bool_)):
        return "bool"
    if isinstance(a, (int, np.integer)):
        return "int64" if isinstance(a, int) else np.dtype(type(a)).name
    if isinstance(a, (float, np.floating)):
        return "float64" if isinstance(a, float) else np.dtype(type(a)).name
    raise TypeError(f"no signature text for a {type(a).__name__} argument")


def spec_type(spec: str) -> Any:
    """The Numba type for ``arg_spec`` text."""
    from numba import types

    m = re.fullmatch(r"array\((\w+), (\d+), ([CFA])\)", spec)
    if m:
        return types.Array(getattr(types, m.group(1)), int(m.group(2)), m.group(3))
    return types.boolean if spec == "bool" else getattr(types, spec)


def load_manifest(path: Path = MANIFEST) -> dict[str, list[list[str]]]:
    if not path.exists():
        return {}
    return json.loads(path.read_text())["kernels"]


def save_manifest(launched: dict[str, set[tuple[str, ...]]], path: Path = MANIFEST) -> None:
    data = {
        "about": "every (kernel, argument types) the CUDA test suite launches; see "
        "benchmarks/cuda_compile.py",
        "kernels": {k: [list(s) for s in sorted(v)] for k, v in sorted(launched.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# --------------------------------------------------------------------------- compiling

_INFO = re.compile(
    r"used (\d+) registers, used (\d+) barriers, (\d+) stack, (\d+) bytes smem, "
    r"(\d+) bytes cmem\[0\],[^\n]*? (\d+) bytes lmem"  # sm_80 lists cmem[2] between
)
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def toolchain_installed() -> bool:
    """True when the ``nvvm`` extra's wheels are installed (whether or not they work)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("nvidia-nvvm")
        distribution("nvidia-nvjitlink")
    except PackageNotFoundError:
        return False
    return True


def toolchain_missing() -> str | None:
    """Why kernels cannot be compiled here, or None when NVVM and nvJitLink both work."""
    try:
        from cuda.bindings import nvjitlink  # noqa: F401
        from numba import config, cuda

        if config.ENABLE_CUDASIM:
            return "the Numba CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); it has no NVVM"

        def probe(a):
            a[0] = 1

        from numba import types

        cuda.compile_ptx(probe, (types.float32[::1],), cc=(9, 0))
        _link(".version 8.0\n.target sm_90\n.address_size 64\n", (9, 0))
    except Exception as e:  # missing wheels, missing libraries, unsupported versions
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return None


def _link(ptx: str, cc: tuple[int, int]) -> str:
    """Assemble ``ptx`` for sm_<cc> with nvJitLink; its info log (the ptxas report)."""
    from cuda.bindings import nvjitlink as J

    opts = [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"]
    h = J.create(len(opts), opts)
    try:
        data = ptx.encode()
        J.add_data(h, J.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            J.complete(h)
        except Exception as e:
            n = J.get_error_log_size(h)
            buf = bytearray(n)
            J.get_error_log(h, buf)
            raise RuntimeError(f"ptxas failed: {buf.decode(errors='replace').strip()}") from e
        n = J.get_info_log_size(h)
        buf = bytearray(n)
        J.get_info_log(h, buf)
        return buf.decode(errors="replace")
    finally:
        J.destroy(h)


def compile_kernel(name: str, spec: list[str], cc: tuple[int, int] = (9, 0)) -> dict[str, Any]:
    """Compile kernel ``name`` for one signature; registers, spills, stack and memory per thread
    / block as ptxas reports them, and the seconds NVVM and ptxas took."""
    from numba import cuda

    kernel = kernels()[name]
    t0 = time.perf_counter()
    ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(spec_type(s) for s in spec), cc=cc)
    t1 = time.perf_counter()
    log = _link(ptx, cc)
    t2 = time.perf_counter()
    return {
        "kernel": name,
        "signature": spec,
        **parse_report(log),
        "nvvm_s": t1 - t0,
        "ptxas_s": t2 - t1,
    }


def parse_report(log: str) -> dict[str, int]:
    """Registers, barriers, stack, memory and spills of the one kernel in a ptxas report."""
    info = _INFO.findall(log)
    spill = _SPILL.findall(log)
    if len(info) != 1:
        raise RuntimeError(f"expected one kernel in the ptxas report, got:\n{log}")
    regs, barriers, stack, smem, cmem, lmem = (int(v) for v in info[0])
    stores, loads = (max(int(s[i]) for s in spill) if spill else 0 for i in (0, 1))
    return {
        "registers": regs,
        "barriers": barriers,
        "stack": stack,
        "smem": smem,
        "cmem": cmem,
        "lmem": lmem,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def limit_problems(row: dict[str, Any], threads: int) -> list[str]:
    """What would stop a launch of ``threads`` threads per block of this compiled kernel."""
    out = []
    if row["smem"] > STATIC_SMEM_LIMIT:
        out.append(f"{row['smem']} bytes of static shared memory > {STATIC_SMEM_LIMIT}")
    if row["registers"] * threads > REGS_PER_SM:
        out.append(f"{row['registers']} registers x {threads} threads > {REGS_PER_SM}")
    return out


def max_threads(name: str) -> int:
    """The most threads per block launch.py ever gives this kernel (the active tile set)."""
    from fastconv.kernels.cuda import launch as L

    m = re.fullmatch(r"gemm\.KERNELS\['(\w+)'\]", name)
    if m:
        BM, BN, _, TM, TN = L.GEMM_CONFIGS[m.group(1)]
        return (BM // TM) * (BN // TN)
    if name.startswith("direct."):
        return L.DIRECT_THREADS
    return max(L.ELEMENTWISE_THREADS, L.REDUCE_THREADS)


def compile_all(cc: tuple[int, int] = (9, 0), progress: bool = True) -> list[dict[str, Any]]:
    rows = []
    items = [(k, s) for k, sigs in load_manifest().items() for s in sigs]
    for i, (name, spec) in enumerate(items, 1):
        if progress:
            print(f"[{i}/{len(items)}] {name}({', '.join(spec)})", file=sys.stderr, flush=True)
        rows.append(compile_kernel(name, spec, cc))
    return rows


def _short(spec: list[str]) -> str:
    dtypes = sorted({m for s in spec if s.startswith("array") for m in re.findall(r"float\d\d", s)})
    return "/".join(dtypes) or "-"


def report(rows: list[dict[str, Any]], cc: tuple[int, int]) -> str:
    import numba
    from fastconv.kernels.cuda import launch as L

    try:
        from importlib.metadata import version

        ncu = version("numba-cuda")
    except Exception:  # pragma: no cover
        ncu = "?"
    from cuda.bindings import nvjitlink

    jl = ".".join(str(v) for v in nvjitlink.version())
    lines = [
        f"# CUDA kernels compiled for sm_{cc[0]}{cc[1]} (no GPU: NVVM + nvJitLink)",
        "",
        f"{datetime.date.today().isoformat()}; `python -m benchmarks.cuda_compile"
        f" --cc {cc[0]}.{cc[1]}`; numba {numba.__version__}, numba-cuda {ncu}, nvJitLink {jl},"
        f" Python {platform.python_version()}; tile set `{L.TILE_SET}`.",
        "",
        "Every signature the CUDA test suite launches"
        " (benchmarks/results/cuda_signatures.json), lowered by NVVM and assembled by ptxas."
        " Registers, spills, stack and local memory are per thread; shared memory per block."
        " `threads` is the largest block launch.py gives the kernel; `blocks/SM` the"
        " resident blocks those limits allow (registers, shared memory, 2048 threads, 32"
        " blocks), i.e. the theoretical occupancy.",
        "",
        "| kernel | dtypes | regs | spill st/ld (B) | stack (B) | smem (B) | threads |"
        " blocks/SM | NVVM + ptxas (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    seen = set()
    for r in rows:
        key = (r["kernel"], _short(r["signature"]), r["registers"], r["stack"], r["smem"])
        if key in seen:  # signatures differing only in layout or scalar types compile alike
            continue
        seen.add(key)
        t = max_threads(r["kernel"])
        regs_blk = ((r["registers"] * 32 + 255) // 256 * 256) * (t // 32 + (t % 32 > 0))
        per_sm = min(
            32,
            2048 // t,
            REGS_PER_SM // max(regs_blk, 1),
            (228 * 1024) // (r["smem"] + 1024),
        )
        lines.append(
            f"| `{r['kernel']}` | {_short(r['signature'])} | {r['registers']} |"
            f" {r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['smem']} | {t} |"
            f" {per_sm} | {r['nvvm_s']:.2f} + {r['ptxas_s']:.2f} |"
        )
    bad = [
        f"- `{r['kernel']}` {r['signature']}: {p}"
        for r in rows
        for p in limit_problems(r, max_threads(r["kernel"]))
    ]
    n_sig = len(rows)
    n_k = len({r["kernel"] for r in rows})
    lines += [
        "",
        f"{n_sig} signatures of {n_k} kernels compiled;"
        f" {sum(r['nvvm_s'] for r in rows):.1f} s in NVVM,"
        f" {sum(r['ptxas_s'] for r in rows):.1f} s in ptxas.",
        f"Spilling: {sum(r['spill_stores'] > 0 for r in rows)} signatures;"
        f" using a stack frame: {sum(r['stack'] > 0 for r in rows)}.",
        "Over a launch limit: " + ("none." if not bad else "\n" + "\n".join(bad)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cc", default="9.0", help="compute capability to compile for (9.0: H100)")
    p.add_argument("--out", type=Path, help="write the markdown table here as well")
    args = p.parse_args(argv)
    cc = tuple(int(v) for v in args.cc.split("."))
    why = toolchain_missing()
    if why:
        print(f"cuda_compile: cannot compile here: {why}", file=sys.stderr)
        return 2
    rows = compile_all(cc)
    text = report(rows, cc)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
    sys.exit(main())
