#!/usr/bin/env bash
# The test suite at the lowest versions tiltsmc declares: the oldest Python it supports (3.9), and every
# requirement of the package and of its "test" extra at its lower bound in pyproject.toml (uv's
# "lowest-direct" resolution: what those requirements need in turn comes at its newest), installed in a
# fresh virtual environment; then the whole suite, as the README's test command runs it. A lower bound no
# longer true fails here (ONNX Runtime 1.17 could not load the demo's models; FastAPI 0.110 let pydantic 1
# in, which the server cannot use).
# Usage: scripts/test_lowest_versions.sh [PYTHON]   (default: a Python 3.9 under pyenv, or python3.9; Ray
# needs 3.10, so its tests are skipped there: a Python 3.10 as the argument runs them at Ray's bound too)
# Without a Python 3.9 on the machine it says so and exits 0 (CI runs it where the image has one).
set -euo pipefail
cd "$(dirname "$0")/.."

python="${1:-}"
if [ -z "$python" ]; then
    pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    # pyenv's shim for python3.9 exists, and fails, where another version is selected: try each
    for candidate in "$pyenv_root"/versions/3.9.*/bin/python3.9 python3.9; do
        if "$candidate" -c "" >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "test_lowest_versions: no Python 3.9 here (pass one as the argument): skipped"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
lowest="$work/venv/bin/python"
"$lowest" -m pip install --quiet --upgrade pip uv
echo "== lowest versions: $("$lowest" --version), requirements at their lower bounds"
# without the CUDA module (the package's own code, not a requirement's version; it would double the build)
SKBUILD_CMAKE_DEFINE="TILTSMC_CUDA=OFF" \
    "$lowest" -m uv pip install --quiet --python "$lowest" --resolution lowest-direct ".[test]"
"$lowest" -c 'import importlib.metadata as m
names = ["numpy", "tokenizers", "tqdm", "onnxruntime", "onnx", "fastapi", "pydantic", "uvicorn", "prometheus-client",
         "jinja2", "openai", "httpx", "jsonschema", "pytest", "hypothesis"]
print("   ", ", ".join(f"{name} {m.version(name)}" for name in names))'
"$lowest" -m pytest -q -p no:cacheprovider
