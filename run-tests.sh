#!/usr/bin/env bash
# The whole test suite (docs/RELIABILITY.md): every meson suite, then the C tests under
# valgrind, ASan + UBSan and TSan, then the fuzzers; zero reports required.
set -euo pipefail
cd "$(dirname "$0")"
# A failing step names itself; its tool has printed the error above.
trap 'echo "run-tests: FAILED at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
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

# 1. Every suite of the normal build: unit (Check), abi (abidiff against abi/, exported symbols,
#    header hygiene, an old consumer), parity and reference checks against PyTorch, interop,
#    the installed-tree pkg-config consumers, the trainer, the Python bindings, bench smoke, and
#    mpi (libconfsmoe_mpi and the trainer through mpirun on localhost, docs/DISTRIBUTED.md).
meson test -C "$build" -v --print-errorlogs
# 2. The Python package as pip builds and installs it (pyproject.toml), tested under a current
#    PyTorch 2.x and numpy 2.x from PyPI in a venv of /usr/bin/python3 (bindings/README.md, "Tests").
tests/python/pypi_venv.sh "$build"
# 3. The C test programs under valgrind (memcheck, leaks), ASan + UBSan, and ThreadSanitizer.
BUILD_DIR="$build" tests/sanitize/run valgrind
tests/sanitize/run asan
tests/sanitize/run tsan
# 4. The libFuzzer fuzzers (checkpoint loader, dataset loader, API sequences), 60 s each.
tests/fuzz/run
