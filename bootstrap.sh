#!/usr/bin/env bash
# Installs the Debian 12 packages libconfsmoe needs (only those missing), then
# configures and builds into BUILD_DIR (default: build).
# Usage: ./bootstrap.sh [--tests] [BUILD_DIR]; --tests adds what the test suite needs (and
# builds libconfsmoe_mpi: -Dmpi=enabled). Without it MPI is built in when already installed.
set -euo pipefail
cd "$(dirname "$0")"
trap 'echo "bootstrap: FAILED at line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR
# dpkg-dev: meson asks dpkg-architecture for Debian's multiarch libdir (lib/x86_64-linux-gnu);
# without it, it installs into lib64, which neither the loader nor pkg-config searches.
packages=(gcc g++ pkg-config meson ninja-build libblis-dev check dpkg-dev)
options=()
if [ "${1:-}" = "--tests" ]; then
    # clang-14 finds omp.h (which blis.h includes) only through libomp-14-dev.
    # python3-dev: torch.compile on the CPU compiles C++ that includes Python.h. git: the sdist
    # test (meson dist archives the git tree).
    packages+=(valgrind python3-numpy python3-torch python3-venv python3-dev git abigail-tools clang
               libclang-rt-14-dev llvm-14 libomp-14-dev libopenmpi-dev openmpi-bin)
    # The test build always has libconfsmoe_mpi and its mpi suite (docs/DISTRIBUTED.md).
    options+=(-Dmpi=enabled)
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
    meson setup --reconfigure "$build" ${options[@]+"${options[@]}"}
else
    meson setup "$build" ${options[@]+"${options[@]}"}
fi
meson compile -C "$build"
