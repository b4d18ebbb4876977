#!/usr/bin/env bash
# The GPU checks in one go, for a machine with an NVIDIA GPU lent for a short while (one call of at most
# ten minutes, no package index), in this order:
#   1. machine: nvidia-smi, nvcc, the Python and its packages (for the record);
#   2. wheels (with --wheels DIR): install the wheels there (no dependencies, no index) into a folder of
#      its own put first on PYTHONPATH, before the build, so that they can also supply build dependencies
#      (what the machine lacks: tiltsmc's own run-time dependency tokenizers, about 3 MB, where the image
#      has no transformers; test dependencies such as jsonschema and its own);
#   3. build: tiltsmc with its CUDA module (TILTSMC_CUDA=ON) into the Python at hand, without a package
#      index or build isolation (nvcc, CMake, pybind11 and scikit-build-core already installed), in
#      build/gpu-checks/<wheel tag> (ignored by git and kept on the machine between calls, so that a
#      rerun on a machine still warm only rebuilds what changed);
#   4. availability: tiltsmc.core.cuda_available(); where it is False the checks stop here, with
#      "no usable GPU: <reason>" in the summary and a non-zero exit status (nothing after it would test
#      the GPU);
#   5. tests_gpu: pytest -m gpu (the CUDA kernels' tests, the ONNX Runtime CUDA tests where it has the
#      provider);
#   6. bench_cuda: bench/bench_cuda.py, its JSON named after the device (cuda_h100.json);
#   7. tests_rest: the rest of the suite, pytest -m "not gpu" (modules whose imports are missing on the
#      machine, such as fastapi, uvicorn, openai or ray, are reported as collection errors and the other
#      modules still run);
#   8. bench_models: bench/bench_models.py --provider cuda (models_h100_cuda.json), only where ONNX
#      Runtime has the CUDA provider, else skipped with the reason.
# ONNX Runtime on CUDA: the CUDA provider comes only with onnxruntime-gpu, whose wheel (about 255 MB) is far
# over what one call of the device tool can carry (64 MiB in all). It cannot be sent with --wheels in one
# call: it has to be sent in parts over consecutive calls to the same warm machine (each part in an ignored
# folder of its own, joined there), or the ONNX-on-CUDA checks (tests/test_onnx_cuda.py and the other gpu
# tests that need the provider, bench_models --provider cuda) are skipped, each saying so; the machine's
# own onnxruntime is the CPU build.
# Every step runs under `timeout -k 10 LIMIT` (machine 30 s, wheels 120, build 420, availability 60,
# tests_gpu 240, bench_cuda 240, tests_rest 360, bench_models 240; cut to the time the budget has left) and
# its output is streamed into checks.log as it is written, so a call stopped at its time limit still
# brings back what ran; summary.txt gets a line as each step ends (its exit status and seconds, the test
# counts for pytest, the reason for a step skipped). pytest runs with --timeout=120 where pytest-timeout
# is installed. A step that fails is reported and the next one still runs, except after a failed build
# or a failed availability check; the exit status is the first failure's (3 for no usable GPU), else 4
# when a step was skipped for want of time, else 0.
# What it writes goes to OUT_DIR, four files at most: the two JSON, checks.log (every step's output) and
# summary.txt.
# Usage: scripts/gpu_checks.sh OUT_DIR [--wheels DIR] [--budget SECONDS] [--quick] [--skip-tests]
#   --budget: the seconds the whole script may take (default 540, for a call limited to 600 s); a step
#             is skipped, saying so, when less is left than it needs, and its limit is cut to what is left.
#   --quick: the benchmarks' --quick runs (a smoke test of the scripts, not figures to quote).
#   --skip-tests: the build, the availability check and the benchmarks only.
# On the device tool: command `scripts/gpu_checks.sh "$OUT" --budget 540` with timeout_s 600.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
usage="usage: scripts/gpu_checks.sh OUT_DIR [--wheels DIR] [--budget SECONDS] [--quick] [--skip-tests]"
out=""
wheels=""
budget=540
quick=()
tests=1
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels | --budget)
            if [ $# -lt 2 ] || [ -z "$2" ] || [[ "$2" == --* ]]; then
                what="a folder of .whl files"
                if [ "$1" = --budget ]; then what="a number of seconds"; fi
                echo "gpu_checks.sh: $1 needs a value: $what" >&2
                echo "$usage" >&2
                exit 2
            fi
            if [ "$1" = --wheels ]; then wheels="$2"; else budget="$2"; fi
            shift ;;
        --wheels=*) wheels="${1#--wheels=}" ;;
        --budget=*) budget="${1#--budget=}" ;;
        --quick) quick=(--quick) ;;
        --skip-tests) tests=0 ;;
        -*) echo "gpu_checks.sh: unknown option $1" >&2; echo "$usage" >&2; exit 2 ;;
        *)
            if [ -n "$out" ]; then
                echo "gpu_checks.sh: one OUT_DIR only (got $out and $1)" >&2
                exit 2
            fi
            out="$1" ;;
    esac
    shift
done
if [ -z "$out" ]; then
    echo "$usage" >&2
    exit 2
fi
if ! [[ "$budget" =~ ^[0-9]+$ ]] || [ "$budget" -lt 60 ]; then
    echo "gpu_checks.sh: --budget: expected whole seconds, at least 60 (got '$budget')" >&2
    exit 2
fi
wheel_files=()
if [ -n "$wheels" ]; then
    if [ ! -d "$wheels" ]; then
        echo "gpu_checks.sh: --wheels $wheels: no such folder" >&2
        exit 2
    fi
    wheels="$(realpath "$wheels")"
    shopt -s nullglob
    wheel_files=("$wheels"/*.whl)
    shopt -u nullglob
    if [ "${#wheel_files[@]}" -eq 0 ]; then
        echo "gpu_checks.sh: --wheels $wheels: no .whl files there" >&2
        exit 2
    fi
fi
mkdir -p "$out" || exit 2
out="$(realpath "$out")"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
log="$out/checks.log"
summary="$out/summary.txt"
status=0        # the first failure's exit status
short=0         # 1 once a step was skipped for want of time
reserve=15      # seconds kept back from each step's limit: its kill grace (timeout -k 10) and the summary
current=""      # the step running, named in the summary if the script is interrupted
began=0         # when it began (bash's SECONDS)
running=""      # the pid of its timeout
work="$(mktemp -d)"
: > "$summary"
: > "$log"

note() {  # a line of the summary (and of the log and the output)
    echo "$*" | tee -a "$summary" "$log"
}

# shellcheck disable=SC2329  # run by the EXIT trap
finish() {
    if [ -n "$current" ]; then
        if [ -n "$running" ]; then  # timeout passes the signal on to the command's process group
            kill -TERM "$running" 2> /dev/null
        fi
        wait  # for the step's output to reach checks.log (at most timeout's 10 s grace)
        note "$current: interrupted after $(( SECONDS - began )) s (the script was stopped)"
        current=""
    fi
    rm -rf "$work"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

fail() {  # record a failure's exit status if it is the first
    if [ "$status" -eq 0 ]; then
        status="$1"
    fi
}

# step NAME LIMIT NEED COMMAND...: run COMMAND under timeout, its output streamed into checks.log (and to
# the output), a summary line when it ends. LIMIT is cut to the budget's time left; the step is skipped,
# saying so, when that is under NEED seconds. Returns the command's exit status, 125 when skipped.
step() {
    local name="$1" limit="$2" need="$3" left code result counts
    shift 3
    left=$(( budget - SECONDS - reserve ))
    if [ "$left" -lt 0 ]; then
        left=0
    fi
    if [ "$left" -lt "$need" ]; then
        note "$name: skipped, ${left} s of the budget left and it needs at least ${need} s (--budget $budget)"
        short=1
        return 125
    fi
    if [ "$limit" -gt "$left" ]; then
        limit=$left
    fi
    echo "== $name (limit ${limit} s, at ${SECONDS} s of ${budget} s): $*" | tee -a "$log"
    : > "$work/step.log"
    current="$name"
    began=$SECONDS
    # In the background, so that a signal to the script is handled at once (the trap stops the step:
    # timeout runs the command in a process group of its own, which a signal to the script's group misses).
    # tee has a limit of its own: a process that escaped timeout's process group and still holds the pipe
    # open must not keep the script waiting. With pipefail the status is the command's unless tee failed.
    timeout -k 10 "$limit" "$@" < /dev/null 2>&1 \
        | timeout -k 5 $(( limit + 20 )) tee -a "$log" "$work/step.log" &
    running="$(jobs -p | tail -n 1)"  # the pipeline's first process: the command's timeout
    wait "$!"
    code=$?
    current=""
    running=""
    case "$code" in
        0) result="exit 0" ;;
        124 | 137) result="TIMED OUT at its limit of ${limit} s (exit $code)" ;;
        *) result="exit $code" ;;
    esac
    counts=""
    if [[ "$name" == tests* ]]; then  # pytest's last line: the counts
        counts="$(grep -aE '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' \
            "$work/step.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')"
    fi
    note "$name: $result in $(( SECONDS - began )) s${counts:+ ($counts)}"
    if [ "$code" -ne 0 ]; then
        fail "$code"
    fi
    return "$code"
}

skip() {  # skip NAME REASON...
    local name="$1"
    shift
    note "$name: skipped, $*"
}

step machine 30 10 bash -c "nvidia-smi; nvcc --version; $python --version; $python -m pip list 2>/dev/null"
device="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
tag="$(echo "$device" | grep -Eio '[a-z][0-9]{2,4}' | head -n 1 | tr '[:upper:]' '[:lower:]')"
tag="${tag:-gpu}"

if [ "${#wheel_files[@]}" -gt 0 ]; then
    if step wheels 120 20 "$python" -m pip install --no-deps --no-index --no-compile --no-cache-dir \
        --target "$work/site" "${wheel_files[@]}"; then
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        note "wheels: not on PYTHONPATH (the install failed); the build and the tests go on without them"
    fi
fi

# A build folder of its own (no CMake cache of a CUDA AUTO or OFF build is reused), kept for a rerun.
built=0
if step build 420 60 env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$python" -m pip install -v \
    --no-build-isolation --no-deps --no-index -C "build-dir=build/gpu-checks/{wheel_tag}" \
    -C cmake.define.TILTSMC_CUDA=ON .; then
    built=1
fi

usable=0
if [ "$built" -eq 1 ]; then
    step availability 60 10 "$python" -c "
import sys
try:
    import onnxruntime
    print('onnxruntime', onnxruntime.__version__, onnxruntime.__file__, onnxruntime.get_available_providers())
except Exception as error:
    print('onnxruntime: not importable:', error)
import tiltsmc, tiltsmc.core as core
print('tiltsmc', tiltsmc.__file__)
state = core.cuda_available()
print('tiltsmc CUDA:', state)
print('usable:' if state else 'not usable:', state.reason)
sys.exit(0 if state else 3)"
    case $? in
        0) usable=1 ;;
        125) ;;  # skipped for want of time: said so
        *)
            reason="$(grep -a '^not usable: ' "$work/step.log" | tail -n 1 | sed 's/^not usable: //')"
            if [ -z "$reason" ]; then  # tiltsmc itself did not import: the error's last line says why
                failed="$(grep -a -E '^[A-Za-z_.]*(Error|Exception)' "$work/step.log" | tail -n 1)"
                reason="tiltsmc.core.cuda_available() could not be read: ${failed:-see checks.log}"
                reason="$reason (a run-time dependency missing here, such as tokenizers, goes in with --wheels)"
            fi
            note "no usable GPU: $reason"
            ;;
    esac
    if [ "$usable" -eq 0 ]; then
        skip "tests_gpu, bench_cuda, tests_rest, bench_models" "no usable GPU (the availability check failed)"
    fi
else
    skip "availability, tests_gpu, bench_cuda, tests_rest, bench_models" \
        "the build failed or did not run (a tiltsmc installed before would be tested instead)"
fi

if [ "$usable" -eq 1 ]; then
    pytest_args=(-p no:cacheprovider -rfE --continue-on-collection-errors)
    if "$python" -c "import pytest_timeout" 2> /dev/null; then
        pytest_args+=(--timeout=120)
    else
        note "pytest-timeout is not installed: the tests run without a per-test limit"
    fi
    if [ "$tests" -eq 1 ]; then
        # -v: a test that hangs is named in checks.log even if the step is stopped
        step tests_gpu 240 60 "$python" -m pytest -v -m gpu --durations=10 "${pytest_args[@]}"
    else
        skip tests_gpu "--skip-tests"
    fi
    step bench_cuda 240 60 "$python" bench/bench_cuda.py "${quick[@]}" --out "$out/cuda_$tag.json"
    if [ "$tests" -eq 1 ]; then
        step tests_rest 360 120 "$python" -m pytest -q -m "not gpu" --durations=10 "${pytest_args[@]}"
    else
        skip tests_rest "--skip-tests"
    fi
    if "$python" -c "
import sys, onnxruntime
sys.exit('CUDAExecutionProvider' not in onnxruntime.get_available_providers())" 2> /dev/null; then
        step bench_models 240 60 "$python" bench/bench_models.py --provider cuda "${quick[@]}" \
            --out "$out/models_${tag}_cuda.json"
    else
        skip bench_models "ONNX Runtime has no CUDA provider here (onnxruntime-gpu is not installed: its" \
            "wheel is too large to carry in one call)"
    fi
fi

if [ "$status" -eq 0 ] && [ "$short" -eq 1 ]; then
    status=4
fi
if [ "$status" -eq 0 ]; then
    note "result: every step that ran passed (${SECONDS} s)"
else
    note "result: FAILED, exit status $status (${SECONDS} s)"
fi
echo
echo "== summary ($summary)"
cat "$summary"
exit "$status"
