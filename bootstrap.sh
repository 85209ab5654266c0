#!/usr/bin/env bash
# Installs the Debian 12 packages libconfsmoe needs (only those missing), then
# configures and builds into BUILD_DIR (default: build).
# Usage: ./bootstrap.sh [--tests] [BUILD_DIR]; --tests adds what the test suite needs.
set -euo pipefail
cd "$(dirname "$0")"
packages=(gcc g++ pkg-config meson ninja-build libblis-dev check)
if [ "${1:-}" = "--tests" ]; then
    packages+=(valgrind python3-numpy python3-torch python3-venv abigail-tools clang libclang-rt-14-dev llvm-14)
    shift
fi
build=${1:-build}

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ -f "$build/build.ninja" ]; then
    meson setup --reconfigure "$build" >/dev/null
else
    meson setup "$build"
fi
meson compile -C "$build"
