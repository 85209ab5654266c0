#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void die_input(const char *file, long line, const char *fmt, ...)
{
    fflush(stdout);
    fputs(PROG ": ", stderr);
    if (file) {
        if (line > 0)
            fprintf(stderr, "%s:%ld: ", file, line);
        else
            fprintf(stderr, "%s: ", file);
    }
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(EXIT_INPUT);
}

void die_system(const char *fmt, ...)
{
    fflush(stdout);
    fputs(PROG ": ", stderr);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(EXIT_LIBRARY);
}

void warn(const char *fmt, ...)
{
    fflush(stdout);
    fputs(PROG ": warning: ", stderr);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die_system("out of memory (%zu bytes)", n);
    return p;
}

void *xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        die_system("out of memory (%zu x %zu bytes)", count, size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die_system("out of memory (%zu bytes)", n);
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
    int slash = a > 0 && dir[a - 1] != '/';
    char *p = xmalloc(a + (size_t)slash + b + 1);
    memcpy(p, dir, a);
    if (slash)
        p[a] = '/';
    memcpy(p + a + slash, file, b + 1);
    return p;
}

rng64 rng_stream(uint64_t seed, uint64_t purpose)
{
    rng64 r = {seed ^ (purpose * 0xD1B54A32D192ED03ull)};
    /* Decorrelate nearby seeds. */
    rng_next(&r);
    r.state ^= purpose + 0x632BE59BD9B4E019ull;
    rng_next(&r);
    return r;
}

uint64_t rng_next(rng64 *r)
{
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t rng_below(rng64 *r, uint64_t n)
{
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t x;
    do
        x = rng_next(r);
    while (x >= limit);
    return x % n;
}

void rng_shuffle(rng64 *r, int *v, size_t n)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)rng_below(r, (uint64_t)i);
        int t = v[i - 1];
        v[i - 1] = v[j];
        v[j] = t;
    }
}

double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
