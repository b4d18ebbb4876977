#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU lent for a short while:
#   1. build tiltsmc with its CUDA module (TILTSMC_CUDA=ON) into the Python at hand, without a package
#      index (nvcc, CMake, pybind11, scikit-build-core and the test dependencies already installed);
#   2. with --wheels DIR, install the wheels there (no dependencies, no index) into a folder of its own put
#      first on PYTHONPATH: onnxruntime-gpu, then imported instead of the CPU build installed beside, and
#      test dependencies the machine lacks (jsonschema and its own);
#   3. run the README's test command (the GPU tests run where a device is usable; the rest as on the CPU);
#   4. run bench/bench_cuda.py and, where ONNX Runtime has the CUDA provider, bench/bench_models.py
#      --provider cuda; their JSON is named after the device (cuda_h200.json, models_h200_cuda.json).
# What it writes goes to OUT_DIR, four files at most: the two JSON, checks.log (every step's output) and
# summary.txt (each step's exit status and seconds); the build and the onnxruntime-gpu install go to a
# temporary folder. A step that fails is reported and the next one still runs; the exit status is the
# first failure's.
# Usage: scripts/gpu_checks.sh OUT_DIR [--wheels DIR] [--quick] [--skip-tests]
#   --quick: the benchmarks' --quick runs (a smoke test of the scripts, not figures to quote).
set -uo pipefail
cd "$(dirname "$0")/.."
out=""
wheels=""
quick=()
tests=1
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$(realpath "$2")"; shift ;;
        --quick) quick=(--quick) ;;
        --skip-tests) tests=0 ;;
        -*) echo "gpu_checks.sh: unknown option $1" >&2; exit 2 ;;
        *) out="$1" ;;
    esac
    shift
done
if [ -z "$out" ]; then
    echo "usage: scripts/gpu_checks.sh OUT_DIR [--wheels DIR] [--quick] [--skip-tests]" >&2
    exit 2
fi
mkdir -p "$out"
out="$(realpath "$out")"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
status=0
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
: > "$out/summary.txt"
: > "$out/checks.log"

step() {  # step NAME COMMAND...: run it, its output added to checks.log, its status and time to the summary
    local name="$1" began code
    shift
    began=$(date +%s)
    echo "== $name: $*" | tee -a "$out/checks.log"
    "$@" > "$work/step.log" 2>&1
    code=$?
    cat "$work/step.log" >> "$out/checks.log"
    echo "$name: exit $code in $(( $(date +%s) - began )) s" | tee -a "$out/summary.txt"
    tail -n 5 "$work/step.log"
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
        status=$code
    fi
    return "$code"
}

step machine bash -c "nvidia-smi; nvcc --version; $python --version; $python -m pip list 2>/dev/null"
device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
tag="$(echo "$device" | grep -Eio '[a-z][0-9]{2,4}' | head -n 1 | tr '[:upper:]' '[:lower:]')"
tag="${tag:-gpu}"

# A build folder of its own, so that no CMake cache from another build (CUDA AUTO or OFF) is reused.
step build env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$python" -m pip install --no-build-isolation --no-deps \
    --no-index -C build-dir="$work/build" -C cmake.define.TILTSMC_CUDA=ON .
if [ -n "$wheels" ]; then
    step wheels "$python" -m pip install --no-deps --no-index --target "$work/site" "$wheels"/*.whl \
        && export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step availability "$python" -c "
import onnxruntime, tiltsmc.core as core
print('onnxruntime', onnxruntime.__version__, onnxruntime.__file__, onnxruntime.get_available_providers())
print('tiltsmc CUDA:', core.cuda_available())"
if [ "$tests" -eq 1 ]; then
    # a module whose imports are missing here is reported, and the others still run
    step tests "$python" -m pytest -q -p no:cacheprovider -rfE --continue-on-collection-errors
fi
step bench_cuda "$python" bench/bench_cuda.py "${quick[@]}" --out "$out/cuda_$tag.json"
if "$python" -c "import onnxruntime, sys; sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())"
then
    step bench_models "$python" bench/bench_models.py --provider cuda "${quick[@]}" \
        --out "$out/models_${tag}_cuda.json"
else
    echo "bench_models: skipped, ONNX Runtime has no CUDA provider here" | tee -a "$out/summary.txt"
fi
cat "$out/summary.txt"
exit "$status"
