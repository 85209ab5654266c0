#!/usr/bin/env bash
# Installs the build into a temporary destdir, then builds a C and a C++ consumer against
# the INSTALLED tree with nothing but `pkg-config --cflags --libs confsmoe`, and runs them.
# Also links the C consumer and a training host fully statically (cc -static) with
# `pkg-config --static --cflags --libs confsmoe`.
# With "mpi" as the third argument (a build with libconfsmoe_mpi), also builds an MPI host with
# `pkg-config --cflags --libs confsmoe-mpi` and runs it on 2 ranks with mpirun.
set -euo pipefail
build=$1
src=$2
mpi=${3:-}
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

# A dynamic link names libconfsmoe alone; BLIS and the rest are only for --static.
[ "$(pkg-config --libs confsmoe | xargs)" = "-L$libdir -lconfsmoe" ] ||
    { echo "FAIL: pkg-config --libs confsmoe is not just -L$libdir -lconfsmoe"; exit 1; }
# Fully static executables from exactly `cc -static ... $(pkg-config --static --cflags --libs confsmoe)`:
# the consumer, and a host that trains a small model (with 2 BLIS threads) and checks it learns.
static_flags=$(pkg-config --static --cflags --libs confsmoe)
echo "pkg-config --static --cflags --libs confsmoe: $static_flags"
for host in consumer static_host; do
    cc -static -std=c11 -Wall -Werror "$src/$host.c" -o "$dest/${host}_static" $static_flags
    # Fully static: no program interpreter, no shared library needed, and ldd agrees.
    dynamic=$(readelf -lW -dW "$dest/${host}_static" | grep -E 'INTERP|\(NEEDED\)' || true)
    loader=$(ldd "$dest/${host}_static" 2>&1 || true)
    if [ -n "$dynamic" ] || [ "$(echo $loader)" != "not a dynamic executable" ]; then
        echo "FAIL: $host.c linked with -static is not a static executable: $dynamic; ldd: $loader"
        exit 1
    fi
    echo "${host}_static: ldd: $(echo $loader)"
    env -u LD_LIBRARY_PATH BLIS_NUM_THREADS=2 "$dest/${host}_static"
done
if [ "$mpi" = mpi ]; then
    [ -f "$(dirname "$pc")/confsmoe-mpi.pc" ] || { echo "FAIL: confsmoe-mpi.pc was not installed"; exit 1; }
    # confsmoe-mpi.pc requires the system's MPI module (ompi-c), which a sysroot would
    # misplace: here the installed .pc files get their prefix pointed at the destdir instead,
    # and pkg-config searches its default folders too.
    pcdir=$dest/pc-mpi
    mkdir -p "$pcdir"
    for f in confsmoe.pc confsmoe-mpi.pc; do
        prefix=$(sed -n 's/^prefix=//p' "$(dirname "$pc")/$f")
        sed "s|^prefix=.*|prefix=$dest$prefix|" "$(dirname "$pc")/$f" >"$pcdir/$f"
    done
    mflags=$(env -u PKG_CONFIG_SYSROOT_DIR -u PKG_CONFIG_LIBDIR PKG_CONFIG_PATH="$pcdir" \
        pkg-config --cflags --libs confsmoe-mpi)
    echo "pkg-config --cflags --libs confsmoe-mpi: $mflags"
    cc -std=c11 -Wall -Werror "$src/consumer_mpi.c" -o "$dest/consumer_mpi" $mflags
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 -x LD_LIBRARY_PATH "$dest/consumer_mpi"
    echo "installed-tree consumers: C, C++, fully static C and training host, MPI host (2 ranks) built with pkg-config and ran"
else
    echo "installed-tree consumers: C, C++, fully static C and training host all built with pkg-config and ran"
fi
