/* fuzz_dataset: the trainer's dataset loader (examples/train/dataset.c) on arbitrary
 * folders.
 *
 * The input is a folder written as sections: a line "@<name>" starts the file <name>
 * (characters other than [A-Za-z0-9_.-] are dropped; "@<name>/" makes a folder
 * instead), and the lines up to the next "@" line are its bytes. Bytes before the
 * first "@" line are ignored. A tiny valid folder:
 *
 *   @labels.csv      @view0_a.csv     @view1_b.csv
 *   0                1,2              #tokens=2
 *   1                3,nan            1,2,3,4
 *                                     ,
 *
 * The folder is written under a private temporary folder, then loaded with
 * dataset_load(), standardised with dataset_standardise() and freed.
 *
 * dataset.c reports bad input through die_input(), which prints one line and exits(2)
 * in the trainer. Here util.c is replaced: die_input() checks that the message is not
 * empty and longjmps back to the fuzzer, which then frees everything the loader had
 * allocated or opened (every allocation, FILE and DIR of dataset.c is tracked for
 * that). So the properties are: no crash or sanitizer report on any folder; every
 * rejection is a die_input() with a message (never die_system(), i.e. never an
 * out-of-memory exit); a successful load frees everything in dataset_free() (checked
 * exactly through the tracking) and yields a consistent dataset whose standardised
 * values are finite. */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "util.h"

/* ---------------------------------------------------------------- resource tracking */

enum { RES_MEM, RES_FILE, RES_DIR };
typedef struct {
    void *p;
    int kind;
} resource;

static resource *res;
static size_t n_res, cap_res;

static void track(void *p, int kind)
{
    if (!p)
        return;
    if (n_res == cap_res) {
        cap_res = cap_res ? 2 * cap_res : 256;
        res = realloc(res, cap_res * sizeof *res);
        if (!res)
            abort();
    }
    res[n_res++] = (resource){p, kind};
}

static void untrack(void *p)
{
    if (!p)
        return;
    for (size_t i = n_res; i-- > 0;)
        if (res[i].p == p) {
            res[i] = res[--n_res];
            return;
        }
    fuzz_fail("dataset.c released %p, which it did not allocate or open", p);
}

static void release_all(void)
{
    while (n_res > 0) {
        resource r = res[--n_res];
        if (r.kind == RES_FILE)
            fclose(r.p);
        else if (r.kind == RES_DIR)
            closedir(r.p);
        else
            free(r.p);
    }
}

static FILE *fz_fopen(const char *path, const char *mode)
{
    FILE *f = fopen(path, mode);
    track(f, RES_FILE);
    return f;
}

static int fz_fclose(FILE *f)
{
    untrack(f);
    return fclose(f);
}

static DIR *fz_opendir(const char *path)
{
    DIR *d = opendir(path);
    track(d, RES_DIR);
    return d;
}

static int fz_closedir(DIR *d)
{
    untrack(d);
    return closedir(d);
}

static ssize_t fz_getline(char **buf, size_t *cap, FILE *f)
{
    char *old = *buf;
    ssize_t n = getline(buf, cap, f);
    if (*buf != old) {
        if (old) {
            /* getline reallocated: the old block is gone. */
            for (size_t i = n_res; i-- > 0;)
                if (res[i].p == old) {
                    res[i] = res[--n_res];
                    break;
                }
        }
        track(*buf, RES_MEM);
    }
    return n;
}

static void fz_free(void *p)
{
    untrack(p);
    free(p);
}

/* ---------------------------------------------------------------- util.h stand-in */

static jmp_buf on_error;
static char message[1024];

void die_input(const char *file, long line, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    if (n <= 0)
        fuzz_fail("die_input(%s, %ld) with an empty message", file ? file : "NULL", line);
    if (getenv("FUZZ_VERBOSE"))
        fprintf(stderr, "die_input: %s:%ld: %s\n", file ? file : "-", line, message);
    longjmp(on_error, 1);
}

void die_system(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    fuzz_fail("die_system on a small input: %s", message);
}

void warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die_system("out of memory (%zu bytes)", n);
    track(p, RES_MEM);
    return p;
}

void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        die_system("out of memory (%zu x %zu bytes)", count, size);
    track(p, RES_MEM);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die_system("out of memory (%zu bytes)", n);
    if (q != p) {
        if (p)
            untrack(p);
        track(q, RES_MEM);
    }
    return q;
}

char *xstrdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = xmalloc(n);
    memcpy(d, s, n);
    return d;
}

char *path_join(const char *dir, const char *file)
{
    size_t a = strlen(dir), b = strlen(file);
    char *p = xmalloc(a + b + 2);
    memcpy(p, dir, a);
    p[a] = '/';
    memcpy(p + a + 1, file, b + 1);
    return p;
}

/* ---------------------------------------------------------------- the loader itself */

#define fopen fz_fopen
#define fclose fz_fclose
#define opendir fz_opendir
#define closedir fz_closedir
#define getline fz_getline
#define free fz_free
#include "dataset.c"
#undef fopen
#undef fclose
#undef opendir
#undef closedir
#undef getline
#undef free

/* ---------------------------------------------------------------- the fuzz target */

enum { MAX_FILES = 16, MAX_NAME = 48 };

static char folder[4200];

/* Writes the sections of the input as files of `folder`. */
static void write_folder(const uint8_t *data, size_t size)
{
    fuzz_clear_dir(folder);
    size_t pos = 0, files = 0;
    /* Skip to the first "@" line. */
    while (pos < size && !(data[pos] == '@' && (pos == 0 || data[pos - 1] == '\n'))) {
        const uint8_t *nl = memchr(data + pos, '\n', size - pos);
        pos = nl ? (size_t)(nl - data) + 1 : size;
    }
    while (pos < size && files < MAX_FILES) {
        /* data[pos] == '@': the name line. */
        const uint8_t *nl = memchr(data + pos, '\n', size - pos);
        size_t name_end = nl ? (size_t)(nl - data) : size;
        char name[MAX_NAME + 1];
        size_t n = 0;
        int is_dir = name_end > pos + 1 && data[name_end - 1] == '/';
        for (size_t i = pos + 1; i < name_end && n < MAX_NAME; i++) {
            unsigned char c = data[i];
            if (isalnum(c) || c == '_' || c == '-' || (c == '.' && n > 0))
                name[n++] = (char)c;
        }
        name[n] = '\0';
        size_t body = nl ? name_end + 1 : size, end = body;
        while (end < size && !(data[end] == '@' && data[end - 1] == '\n')) {
            const uint8_t *next = memchr(data + end, '\n', size - end);
            end = next ? (size_t)(next - data) + 1 : size;
        }
        if (n > 0) {
            if (is_dir) {
                char p[4300];
                snprintf(p, sizeof p, "%s/%s", folder, name);
                if (mkdir(p, 0700) != 0 && errno != EEXIST)
                    fuzz_fail("mkdir %s: %s", p, strerror(errno));
            } else {
                char p[4300];
                struct stat st;
                snprintf(p, sizeof p, "%s/%s", folder, name);
                if (stat(p, &st) != 0 || !S_ISDIR(st.st_mode))
                    fuzz_write_file(folder, name, data + body, end - body);
            }
            files++;
        }
        pos = end;
    }
}

static void check_loaded(const dataset *ds)
{
    if (ds->n < 1 || ds->m < 1 || ds->n_classes < 2 || ds->tokens < 0)
        fuzz_fail("loaded n=%d m=%d classes=%d tokens=%" PRId64, ds->n, ds->m, ds->n_classes, ds->tokens);
    for (int i = 0; i < ds->n; i++) {
        if (ds->label[i] < 0 || ds->label[i] >= ds->n_classes)
            fuzz_fail("label %d of sample %d is outside 0..%d", ds->label[i], i, ds->n_classes - 1);
        if (ds->split && ds->split[i] != 0 && ds->split[i] != 1)
            fuzz_fail("split %d of sample %d", ds->split[i], i);
        for (int m = 0; m < ds->m; m++)
            if (ds->natural[(size_t)i * ds->m + m] > 1)
                fuzz_fail("natural mask %d", ds->natural[(size_t)i * ds->m + m]);
    }
    /* tokens is the one S of every view, or 0 when the views differ. */
    bool views_differ = false;
    for (int m = 0; m < ds->m; m++) {
        if (ds->views[m].features < 1 || !ds->views[m].x || !ds->views[m].name)
            fuzz_fail("view %d has %" PRId64 " features", m, ds->views[m].features);
        if (ds->views[m].tokens < 1 || (ds->tokens > 0 && ds->views[m].tokens != ds->tokens))
            fuzz_fail("view %d has %" PRId64 " tokens, the dataset %" PRId64, m, ds->views[m].tokens, ds->tokens);
        views_differ |= ds->views[m].tokens != ds->views[0].tokens;
    }
    if ((ds->tokens == 0) != views_differ)
        fuzz_fail("dataset tokens %" PRId64 " but the views %s", ds->tokens, views_differ ? "differ" : "agree");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!folder[0]) {
        snprintf(folder, sizeof folder, "%s/data", fuzz_tmpdir());
        if (mkdir(folder, 0700) != 0)
            fuzz_fail("mkdir %s: %s", folder, strerror(errno));
    }
    write_folder(data, size);

    static dataset ds;
    if (setjmp(on_error) != 0) {
        /* A clean rejection: free what the loader had when it gave up. */
        release_all();
        memset(&ds, 0, sizeof ds);
        return 0;
    }
    dataset_load(folder, &ds);
    check_loaded(&ds);

    int *train = xmalloc((size_t)ds.n * sizeof *train);
    int n_train = 0;
    for (int i = 0; i < ds.n; i++)
        if (!ds.split || ds.split[i] == 0)
            train[n_train++] = i;
    dataset_standardise(&ds, ds.natural, train, n_train);
    for (int m = 0; m < ds.m; m++) {
        const int64_t w = ds.tokens * ds.views[m].features;
        for (int64_t j = 0; j < (int64_t)ds.n * w; j++)
            if (!isfinite(ds.views[m].x[j]))
                fuzz_fail("view %d: standardised value %" PRId64 " is %g", m, j, (double)ds.views[m].x[j]);
    }
    fz_free(train);
    dataset_free(&ds);
    if (n_res != 0)
        fuzz_fail("dataset_free left %zu allocations or open files behind", n_res);
    return 0;
}
