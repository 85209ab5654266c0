#!/usr/bin/env bash
# Regenerates the ABI baseline that the 'abi' test suite compares every build against:
#   abi/libconfsmoe.so.0.abi  abidw XML of a debug build, public types only (abi/abidw.sh)
#   abi/include/              the public headers of that build, for the old-consumer test
# Run it only for a deliberate ABI change, and commit its output on its own, in a commit
# that says what changed and why old binaries keep working (or why soversion 0 may break).
# Before regenerating, `meson test --suite abi` should fail in abidiff alone: the
# old-consumer test still passing is what shows that the change is backward compatible.
# Usage: abi/update-baseline.sh [BUILD_DIR]   (default: a fresh debug build, removed after)
set -euo pipefail
cd "$(dirname "$0")/.."

build=${1:-}
if [ -z "$build" ]; then
    # Inside the tree, so that the unit paths in the XML read ../lib/*.c as in any build.
    build=$(mktemp -d "$PWD/build-abi.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    meson setup --buildtype=debug -Dtests=false "$build" >/dev/null
fi
meson compile -C "$build" confsmoe:shared_library >/dev/null
abi/abidw.sh "$build/lib/libconfsmoe.so" abi/libconfsmoe.so.0.abi
mkdir -p abi/include
cp include/confsmoe.h "$build/include/confsmoe_version.h" abi/include/
echo "update-baseline: abi/libconfsmoe.so.0.abi ($(grep -c '<elf-symbol ' abi/libconfsmoe.so.0.abi) exported symbols) and abi/include/ regenerated from $build"
