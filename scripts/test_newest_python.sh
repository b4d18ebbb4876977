#!/usr/bin/env bash
# Every test on the newest Python tiltsmc supports (the last "Programming Language :: Python :: 3.X" of
# pyproject.toml's classifiers, as the wheels are built for it), with every requirement at its newest, in
# a fresh virtual environment: what the Python version changes. Python 3.12 began to look a
# runtime-checkable protocol's members up statically, and the samplers refused a policy that forwards its
# methods through __getattr__ there; the README's test command, on the machine's Python 3.11, and the
# lowest versions' stage, on 3.9, could not see it.
# Usage: scripts/test_newest_python.sh [PYTHON [PYTEST ARGUMENTS]]   (PYTHON: that Python under pyenv, or
# python3.X on the PATH, where it is left out or ""; pytest's arguments replace the default, every file)
# Without that Python on the machine it says so and exits 0 (CI runs it where the image has one).
set -euo pipefail
cd "$(dirname "$0")/.."

newest="$(sed -n 's/^ *"Programming Language :: Python :: \(3\.[0-9]*\)",$/\1/p' pyproject.toml | sort -t. -k2,2n | tail -n 1)"
if [ -z "$newest" ]; then
    echo "test_newest_python: pyproject.toml lists no Python 3.X classifier" >&2
    exit 1
fi
python="${1:-}"
shift || true
if [ -z "$python" ]; then
    pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    # pyenv's shim for python3.X exists, and fails, where another version is selected: try each
    for candidate in "$pyenv_root"/versions/"$newest".*/bin/python"$newest" python"$newest"; do
        if "$candidate" -c "" >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
fi
if [ -z "$python" ]; then
    echo "test_newest_python: no Python $newest here (pass one as the argument): skipped"
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
"$newest_python" -m pytest -q -p no:cacheprovider "$@"
