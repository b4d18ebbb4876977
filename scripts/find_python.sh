# Sourced by the test scripts: find_python 3.X prints the path of a working Python 3.X, under pyenv or as
# python3.X on the PATH, and nothing where the machine has none.
find_python() {
    local pyenv_root candidate
    pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
    # pyenv's shim for python3.X exists, and fails, where another version is selected: try each
    for candidate in "$pyenv_root"/versions/"$1".*/bin/python"$1" python"$1"; do
        if "$candidate" -c "" >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
}
