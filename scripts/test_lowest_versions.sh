#!/usr/bin/env bash
# The tests of what a requirement's version can change, at the lowest versions tiltsmc declares: the
# oldest Python it supports (3.9), and every requirement of the package and of its "test" extra at its
# lower bound in pyproject.toml (uv's "lowest-direct" resolution: what those requirements need in turn
# comes at its newest), installed in a fresh virtual environment. A lower bound no longer true fails here
# (ONNX Runtime 1.17 could not load the demo's models; FastAPI 0.110 let pydantic 1 in, which the server
# cannot use).
# The files run (LOWEST_VERSION_TESTS below) are those that drive a bounded requirement: numpy through the
# C++ core's boundary, ONNX Runtime, onnx, tokenizers and jinja2 through the models, FastAPI, pydantic,
# uvicorn, prometheus-client, httpx and openai through the server, tqdm and jsonschema through the CLI, and
# pytest and hypothesis themselves. Left out, to keep CI short: the samplers' statistics, the engine's
# scheduling, the core's thread-safety, the diagnostics and the test-bed tasks, whose results no version
# of a requirement changes and whose code the files run here also run on Python 3.9 (the README's test
# command runs every file, at the newest versions). Ray needs Python 3.10, so its tests are skipped on 3.9:
# a Python 3.10 as the argument runs them at Ray's bound too.
# Usage: scripts/test_lowest_versions.sh [PYTHON [PYTEST ARGUMENTS]]   (PYTHON: a Python 3.9 under pyenv,
# or python3.9, where it is left out or ""; pytest's arguments, e.g. tests/ for every file, replace
# LOWEST_VERSION_TESTS)
# Without a Python 3.9 on the machine it says so and exits 0 (CI runs it where the image has one).
set -euo pipefail
cd "$(dirname "$0")/.."

LOWEST_VERSION_TESTS=(
    # numpy at the C++ core's boundary (arrays' types, layouts and flags), hypothesis
    tests/test_core_kernels.py tests/test_core_tokens.py tests/test_core_alignment.py
    tests/test_core_statistics.py tests/test_core_properties.py
    # ONNX Runtime sessions, onnx-edited graphs, tokenizers, chat templates (jinja2)
    tests/test_onnx_models.py tests/test_onnx_merged.py tests/test_onnx_reward_heads.py
    tests/test_model_files.py tests/test_reward_files.py tests/test_model_config.py
    tests/test_model_options.py tests/test_model_security.py tests/test_tokenization.py
    tests/test_right_padding.py tests/test_twist_head.py tests/test_reward_cache.py
    tests/test_particles_batching.py tests/test_shared_models.py tests/test_reward_memory.py
    tests/test_reward_token_map.py
    # the server: FastAPI, pydantic, uvicorn, prometheus-client; its clients httpx and openai
    tests/test_server.py tests/test_requests.py
    # the CLI: tqdm's progress bars, its output checked with jsonschema; files, signals, exit statuses
    tests/test_cli.py tests/test_cli_errors.py tests/test_cli_files.py tests/test_output.py
    # the package's metadata, extras and documented commands
    tests/test_packaging.py tests/test_readme_commands.py tests/test_docs_examples.py
)

python="${1:-}"
shift || true
if [ -z "$python" ]; then
    # shellcheck source=scripts/find_python.sh
    . scripts/find_python.sh
    python="$(find_python 3.9)"
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
if [ "$#" -eq 0 ]; then
    set -- "${LOWEST_VERSION_TESTS[@]}"
fi
"$lowest" -m pytest -q -p no:cacheprovider "$@"
