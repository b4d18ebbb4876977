#!/usr/bin/env bash
# The tests on the newest Python tiltsmc supports that this machine has (the Pythons of pyproject.toml's
# classifiers, "Programming Language :: Python :: 3.X", as the wheels are built for them; newest first,
# those newer than the machine's python3), with every requirement at its newest, in a fresh virtual
# environment: what the Python version changes. Python 3.12 began to look a runtime-checkable protocol's
# members up statically, and the samplers refused a policy that forwards its methods through __getattr__
# there; the README's test command, on the machine's Python (3.11), and the lowest versions' stage, on
# 3.9, could not see it.
# Every file runs, less two kinds of test (NEWEST_PYTHON_SELECTION below), to keep CI short: those marked
# slow, the samplers' and estimators' statistics over many runs, whose results are the C++ core's and
# numpy's, the same on any Python (the quicker tests of the same files still run their code here); and
# those marked ray_cluster, each with a Ray instance of its own, which check how the command meets a
# cluster (joined, held, unable to place a replica): Ray's behaviour, while the tests of the shared Ray
# server still run the command, its signals and its replicas on this Python. The README's test command
# runs them all.
# Usage: scripts/test_newest_python.sh [PYTHON [PYTEST ARGUMENTS]]   (PYTHON: found under pyenv, or as
# python3.X on the PATH, where it is left out or ""; pytest's arguments replace the default selection,
# e.g. tests/ for every test)
# Where the machine has none of them it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."

NEWEST_PYTHON_SELECTION=(-m "not slow and not ray_cluster")

mapfile -t supported < <(
    sed -n 's/^ *"Programming Language :: Python :: 3\.\([0-9]*\)",$/\1/p' pyproject.toml | sort -rn
)
if [ "${#supported[@]}" -eq 0 ]; then
    echo "test_newest_python: pyproject.toml lists no Python 3.X classifier" >&2
    exit 1
fi
python="${1:-}"
shift || true
if [ -z "$python" ]; then
    machine="$(python3 -c 'import sys; print(sys.version_info[1])')"
    # shellcheck source=scripts/find_python.sh
    . scripts/find_python.sh
    missing=()
    for minor in "${supported[@]}"; do
        [ "$minor" -gt "$machine" ] || break
        python="$(find_python 3."$minor")"
        [ -z "$python" ] || break
        missing+=("3.$minor")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "test_newest_python: no Python ${missing[*]} here (supported, newer than python3's 3.$machine)"
    fi
fi
if [ -z "$python" ]; then
    echo "test_newest_python: no supported Python newer than python3's here: skipped"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m venv "$work/venv"
newest_python="$work/venv/bin/python"
"$newest_python" -m pip install --quiet --upgrade pip
echo "== newest Python: $("$newest_python" --version), requirements at their newest"
# without the CUDA module (the package's own code, not the Python version's; it would double the build)
SKBUILD_CMAKE_DEFINE="TILTSMC_CUDA=OFF" "$newest_python" -m pip install --quiet ".[test]"
if [ "$#" -eq 0 ]; then
    set -- "${NEWEST_PYTHON_SELECTION[@]}"
fi
"$newest_python" -m pytest -q -p no:cacheprovider "$@"
