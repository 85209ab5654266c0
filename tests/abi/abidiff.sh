#!/usr/bin/env bash
# abidiff of the freshly built library against the committed baseline, both written by
# abi/abidw.sh. Any nonzero status fails: a changed type sets only bit 4 (ABI change), not
# bit 8 (incompatible change), and an added symbol must be a deliberate baseline update too.
# abidiff gets no --headers-dir2: it would take int32_t and other types of system headers
# for private ones and drop their changes (confsmoe_dtype becoming int64_t passed).
# Usage: abidiff.sh ABIDW_SH LIBRARY BASELINE_XML
set -euo pipefail
abidw_sh=$1 lib=$2 baseline=$3
if ! command -v abidiff >/dev/null; then
    echo "FAIL: abidiff not found: install abigail-tools (./bootstrap.sh --tests does)"
    exit 1
fi
fresh=$(mktemp)
trap 'rm -f "$fresh"' EXIT
bash "$abidw_sh" "$lib" "$fresh"
status=0
abidiff "$baseline" "$fresh" || status=$?
if [ "$status" -ne 0 ]; then
    echo "FAIL: abidiff status $status (1 error, 2 usage, 4 ABI change, 8 incompatible change)"
    echo "If the change is deliberate, run abi/update-baseline.sh and commit its output on its own, saying why."
    exit 1
fi
echo "abidiff: $(grep -c '<elf-symbol ' "$baseline") exported symbols, no ABI change against the baseline"
