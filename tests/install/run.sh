#!/usr/bin/env bash
# Installs the build into a temporary destdir, then builds a C and a C++ consumer against
# the INSTALLED tree with nothing but `pkg-config --cflags --libs confsmoe`, and runs them.
# Also links the C consumer against the static library through `pkg-config --static`.
set -euo pipefail
build=$1
src=$2
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT

meson install -C "$build" --destdir "$dest" --no-rebuild --quiet
pc=$(find "$dest" -name confsmoe.pc | head -n 1)
[ -n "$pc" ] || { echo "FAIL: confsmoe.pc was not installed"; exit 1; }
# The .pc names the real prefix; the sysroot points pkg-config at the destdir copy of it.
export PKG_CONFIG_PATH=$(dirname "$pc") PKG_CONFIG_SYSROOT_DIR=$dest PKG_CONFIG_LIBDIR=
flags=$(pkg-config --cflags --libs confsmoe)
echo "pkg-config --cflags --libs confsmoe: $flags"
# The loader is not a build flag: point it at the installed library for the runs.
libdir=$(pkg-config --libs-only-L confsmoe | sed 's/^ *-L//; s/ *$//')
export LD_LIBRARY_PATH=$libdir

cc -std=c11 -Wall -Werror "$src/consumer.c" -o "$dest/consumer_c" $flags
"$dest/consumer_c"
c++ -std=c++17 -Wall -Werror "$src/consumer.cpp" -o "$dest/consumer_cpp" $flags
"$dest/consumer_cpp"

# Static: the same consumer with libconfsmoe.a and its private dependencies from the .pc.
static_libs=$(pkg-config --static --libs confsmoe | sed 's/-lconfsmoe\b/-l:libconfsmoe.a/')
cc -std=c11 -Wall -Werror "$src/consumer.c" -o "$dest/consumer_static" $(pkg-config --cflags confsmoe) $static_libs
if ldd "$dest/consumer_static" | grep -q libconfsmoe; then
    echo "FAIL: the static consumer still loads libconfsmoe.so"
    exit 1
fi
"$dest/consumer_static"
echo "installed-tree consumers: C, C++ and static C all built with pkg-config and ran"
