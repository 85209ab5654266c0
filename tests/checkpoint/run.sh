#!/usr/bin/env bash
# Runs safetensors_interop.py with the build's venv Python, which run-tests.sh creates
# (with Debian's numpy visible and `safetensors` from PyPI). Fails, never skips, when
# the venv or the package is missing.
# Usage: run.sh BUILD_DIR CKPT_TOOL
set -euo pipefail
build=$1
tool=$2
here=$(cd "$(dirname "$0")" && pwd)
py="$build/venv/bin/python"
fix="/usr/bin/python3 -m venv --system-site-packages '$build/venv' && '$build/venv/bin/pip' install safetensors (or run ./run-tests.sh)"
if [ ! -x "$py" ]; then
    echo "FAIL: $py does not exist; create it with: $fix" >&2
    exit 1
fi
if ! "$py" -c 'import numpy, safetensors.numpy' 2>/dev/null; then
    echo "FAIL: $py cannot import numpy and safetensors.numpy; install them with: $fix" >&2
    exit 1
fi
export CKPT_TOOL=$tool
exec "$py" "$here/safetensors_interop.py" -v
