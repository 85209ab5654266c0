#!/usr/bin/env bash
# The whole test suite: the Check unit tests, parity with PyTorch, the installed-tree
# pkg-config consumers, then the unit tests again under valgrind (zero reports required).
set -euo pipefail
cd "$(dirname "$0")"
build=${BUILD_DIR:-build-tests}
./bootstrap.sh --tests "$build"
export BLIS_NUM_THREADS=1

# The safetensors interop test runs under a venv that sees Debian's numpy and has the
# reference `safetensors` package from PyPI.
venv="$build/venv"
if [ ! -x "$venv/bin/python" ]; then
    /usr/bin/python3 -m venv --system-site-packages "$venv" ||
        { echo "run-tests: cannot create the venv $venv (is python3-venv installed?)" >&2; exit 1; }
fi
if ! "$venv/bin/python" -c 'import safetensors' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check safetensors ||
        { echo "run-tests: pip install safetensors into $venv failed (is PyPI reachable?)" >&2; exit 1; }
fi

meson test -C "$build" -v --print-errorlogs
meson test -C "$build" -v --print-errorlogs --setup valgrind --suite unit
