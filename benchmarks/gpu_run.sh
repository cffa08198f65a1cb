#!/usr/bin/env bash
# One call on a machine with a CUDA GPU: the CUDA test suite (both tile sets) on the hardware,
# then the GPU benchmark beside PyTorch + cuDNN. Everything it prints is also written under
# benchmarks/results/ (device name and date in the file names). Without a GPU it says so and
# exits 0 without running anything.
#
#   bash benchmarks/gpu_run.sh            # from anywhere; PYTHON=... picks the interpreter
#   REPS=50 EXAMPLES=60 bash benchmarks/gpu_run.sh
#   RESULTS_DIR=$OUT bash benchmarks/gpu_run.sh   # write the outputs somewhere else
#
# On a lent machine that has numba-cuda, PyTorch, pytest and hypothesis but not this checkout
# installed, the script installs it in place first (editable, no dependencies, no network), as
# `fastconv.kernels` maps to kernels/ only through pyproject.toml.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
unset NUMBA_ENABLE_CUDASIM
RESULTS="${RESULTS_DIR:-benchmarks/results}"
mkdir -p "$RESULTS"

if ! "$PY" -c "import fastconv.kernels" 2>/dev/null; then
    echo "gpu_run: fastconv is not installed for $PY; installing this checkout (editable, --no-deps)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || {
        echo "gpu_run: could not install this checkout; nothing run"
        exit 1
    }
fi

if ! DEVICE=$("$PY" - <<'PYEOF'
import re, sys
try:
    from numba import cuda
    ok = cuda.is_available()
except Exception as e:  # numba-cuda missing or broken
    print(f"numba.cuda unusable: {e}", file=sys.stderr)
    sys.exit(1)
if not ok:
    print("numba.cuda.is_available() is False", file=sys.stderr)
    sys.exit(1)
name = cuda.get_current_device().name
name = name.decode() if isinstance(name, bytes) else str(name)
print(re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower())
PYEOF
); then
    echo "gpu_run: no usable CUDA GPU here; nothing run (see the reason above)."
    exit 0
fi

STAMP=$(date +%Y-%m-%d)
LOG="$RESULTS/gpu_tests_${DEVICE}_${STAMP}.txt"
{
    echo "# fastconv CUDA tests on $DEVICE, $(date -Iseconds)"
    "$PY" -c "import numba, numpy, sys; print('python', sys.version.split()[0], 'numba', numba.__version__, 'numpy', numpy.__version__)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} > "$LOG"

status=0
for tiles in default small; do
    echo "== tests/cuda on the GPU, tile set: $tiles" | tee -a "$LOG"
    FASTCONV_CUDA_TILES=$tiles HYPOTHESIS_CUDA_EXAMPLES="${EXAMPLES:-40}" \
        "$PY" -m pytest tests/cuda -q -rs -p no:cacheprovider 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "== exit status ($tiles): $rc" | tee -a "$LOG"
    [ "$rc" -ne 0 ] && status=$rc
done

echo "== benchmark" | tee -a "$LOG"
"$PY" -m benchmarks.gpu_bench --out-dir "$RESULTS" --reps "${REPS:-30}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && status=$rc
echo "gpu_run: done (status $status); outputs under $RESULTS/ (tests: $LOG)"
exit $status
