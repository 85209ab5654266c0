/* Helpers shared by the libFuzzer targets of tests/fuzz. */
#ifndef CONFSMOE_FUZZ_COMMON_H
#define CONFSMOE_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* A private folder for this process's files, made once (under /dev/shm when it is
 * writable, else $TMPDIR or /tmp) and removed at exit. */
const char *fuzz_tmpdir(void);
/* Writes n bytes to dir/name (replacing it); aborts on an I/O error. */
void fuzz_write_file(const char *dir, const char *name, const void *data, size_t n);
/* Empties a folder made under fuzz_tmpdir() (one level of files and empty folders). */
void fuzz_clear_dir(const char *dir);
/* Reports a broken property of the code under test and aborts (a fuzzer crash). */
__attribute__((noreturn, format(printf, 1, 2))) void fuzz_fail(const char *fmt, ...);

#endif
