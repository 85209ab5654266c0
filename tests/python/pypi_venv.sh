#!/usr/bin/env bash
# The Python package as pip builds and installs it, under a current PyTorch 2.x and numpy 2.x from
# PyPI instead of Debian's (bindings/README.md, "Install" and "Tests"):
#  1. a venv of /usr/bin/python3 without system site-packages, BUILD_DIR/venv-pypi, with the pinned
#     stack of tests/python/pypi-requirements.txt (the leanest CPU install of PyPI's torch; read
#     that file), installed with --no-deps and reused while that file is unchanged;
#  2. a wheel (pip wheel) and an sdist (python -m build --sdist) of this repository, through
#     pyproject.toml and meson-python, into BUILD_DIR/pypi-dist;
#  3. tests/python/test_pip_package.py: the wheel's tag, contents and metadata, the sdist's
#     contents, and install / import / uninstall of each in fresh venvs;
#  4. the wheel installed into the venv, then the bindings' test files (test_bindings.py and every
#     test_torch*.py) run by the venv's python against that INSTALLED package: no PYTHONPATH, no
#     CONFSMOE_LIBRARY, run from outside the source tree.
# Every failure fails the script, pip's included (its error above); a skipped test fails it too.
# pip's cache is left on, so a rebuilt venv reuses what pip could cache.
# Usage: tests/python/pypi_venv.sh BUILD_DIR
set -euo pipefail
trap 'echo "pypi_venv: FAILED at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "${1:?usage: $0 BUILD_DIR}"
build=$(cd "$1" && pwd)
venv="$build/venv-pypi"
dist="$build/pypi-dist"
requirements="$root/tests/python/pypi-requirements.txt"
installed_requirements="$venv/pypi-requirements.txt"
python="$venv/bin/python"
pip=("$python" -m pip --disable-pip-version-check)

# 1. The PyPI stack, once.
if ! cmp -s "$requirements" "$installed_requirements" || ! "$python" -c 'import torch, numpy' 2>/dev/null; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "${pip[@]}" install --progress-bar off --no-deps -r "$requirements"
    cp "$requirements" "$installed_requirements"
fi
"$python" -c 'import sys, numpy, torch
print("pypi_venv: Python %s, numpy %s, torch %s" % (sys.version.split()[0], numpy.__version__, torch.__version__))'

# 2. The wheel and the sdist (the sdist holds the committed tree: meson dist archives git HEAD).
rm -rf "$dist"
"${pip[@]}" wheel --no-deps --wheel-dir "$dist" "$root"
"$python" -m build --sdist --outdir "$dist" "$root"
wheels=("$dist"/confsmoe-*.whl)
sdists=("$dist"/confsmoe-*.tar.gz)

# The tests run in a folder outside the source tree, in an environment that names no other confsmoe.
cd "$build"
unset PYTHONPATH CONFSMOE_LIBRARY
export BLIS_NUM_THREADS=1 CONFSMOE_SOURCE_ROOT="$root"

run_tests() {  # FILE: a unittest file of tests/python under the venv's python; fails on a failure or a skip
    local log="$dist/${1%.py}.log"
    "$python" "$root/tests/python/$1" -v 2>&1 | tee "$log"
    if grep -q '^OK (.*skipped=' "$log"; then
        echo "pypi_venv: $1 skipped tests (above): under the PyPI venv every test must run" >&2
        return 1
    fi
}

# 3. The wheel and the sdist themselves.
CONFSMOE_WHEEL="${wheels[0]}" CONFSMOE_SDIST="${sdists[0]}" run_tests test_pip_package.py

# 4. The bindings' tests against the wheel installed into the venv.
"${pip[@]}" install --no-deps --force-reinstall "${wheels[0]}"
"$python" -c 'import confsmoe, sys
assert confsmoe.__file__.startswith(sys.prefix + "/"), confsmoe.__file__
print("pypi_venv: testing", confsmoe.__file__, "with", confsmoe.library_path)'
for test in "$root"/tests/python/test_bindings.py "$root"/tests/python/test_torch*.py; do
    run_tests "$(basename "$test")"
done
echo "pypi_venv: all passed"
