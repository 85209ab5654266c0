/* Helpers shared by the libFuzzer targets of tests/fuzz. */
#define _GNU_SOURCE
#include "fuzz_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../testdir.h"

static char tmp_root[4096];

static void remove_tree(void)
{
    if (!tmp_root[0])
        return;
    fuzz_clear_dir(tmp_root);
    rmdir(tmp_root);
}

const char *fuzz_tmpdir(void)
{
    if (tmp_root[0])
        return tmp_root;
    const char *base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : getenv("TMPDIR");
    if (!base || !base[0])
        base = "/tmp";
    snprintf(tmp_root, sizeof tmp_root, "%s/confsmoe-fuzz-XXXXXX", base);
    if (!mkdtemp(tmp_root))
        fuzz_fail("mkdtemp %s: %s", tmp_root, strerror(errno));
    atexit(remove_tree);
    return tmp_root;
}

void fuzz_write_file(const char *dir, const char *name, const void *data, size_t n)
{
    char path[8192];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f)
        fuzz_fail("cannot create %s: %s", path, strerror(errno));
    int bad = n && fwrite(data, 1, n, f) != n;
    bad |= fclose(f) != 0;
    if (bad)
        fuzz_fail("cannot write %s: %s", path, strerror(errno));
}

void fuzz_clear_dir(const char *dir) { test_clear_dir(dir, 4); }

void fuzz_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("FUZZ PROPERTY VIOLATED: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    abort();
}

/* Allocations beyond what ASan supports (a fuzzed size of terabytes) return NULL, as
 * malloc would, so that the library's out-of-memory path runs instead of an ASan
 * report; leaks are always checked. ASAN_OPTIONS from the environment adds to these. */
const char *__asan_default_options(void);
const char *__asan_default_options(void) { return "allocator_may_return_null=1:detect_leaks=1"; }
