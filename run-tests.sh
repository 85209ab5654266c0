#!/usr/bin/env bash
# The whole test suite: the Check unit tests, parity with PyTorch, the installed-tree
# pkg-config consumers, then the unit tests again under valgrind (zero reports required).
set -euo pipefail
cd "$(dirname "$0")"
build=${BUILD_DIR:-build-tests}
./bootstrap.sh --tests "$build"
export BLIS_NUM_THREADS=1
meson test -C "$build" -v --print-errorlogs
meson test -C "$build" -v --print-errorlogs --setup valgrind --suite unit
