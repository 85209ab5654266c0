#!/usr/bin/env bash
# The one abidw command of the ABI checks: the exported functions of a library built with
# debug info and the types they reach, public types only (--headers-dir include).
# update-baseline.sh writes the baseline with it; tests/abi/abidiff.sh writes the fresh
# build's XML with it, so that abidiff compares like with like.
# Usage: abi/abidw.sh LIBRARY OUT_XML
set -euo pipefail
lib=$1 out=$2
root=$(cd "$(dirname "$0")/.." && pwd)
command -v abidw >/dev/null ||
    { echo "FAIL: abidw not found: install abigail-tools (./bootstrap.sh --tests does)"; exit 1; }
# Without DWARF abidw sees symbol names only and every type change would go unnoticed.
readelf -S --wide "$lib" | grep -q '\.debug_info' ||
    { echo "FAIL: $lib has no debug info: build it with -g (buildtype debug or debugoptimized)"; exit 1; }
# No locations or build paths: a regenerated baseline then differs only where the ABI does,
# and its commit shows just that change.
abidw --headers-dir "$root/include" --drop-private-types --drop-undefined-syms \
    --no-show-locs --no-comp-dir-path --no-corpus-path --out-file "$out" "$lib"
