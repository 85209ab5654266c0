/* Small helpers shared by the trainer's files: fatal errors with the trainer's exit
 * statuses, checked allocation, a seeded host RNG and a monotonic clock. */
#ifndef CONFSMOE_TRAIN_UTIL_H
#define CONFSMOE_TRAIN_UTIL_H

#include <stddef.h>
#include <stdint.h>

#define PROG "confsmoe-train"

/* Exit statuses: 0 success, 1 a library or system failure, 2 bad input (flags, data). */
enum { EXIT_LIBRARY = 1, EXIT_INPUT = 2 };

#if defined(__GNUC__)
#define TRAIN_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define TRAIN_NORETURN __attribute__((noreturn))
#else
#define TRAIN_PRINTF(a, b)
#define TRAIN_NORETURN
#endif

/* One line on stderr, "confsmoe-train: <file>:<line>: <what>" (":<line>" left out when
 * line <= 0, "<file>: " left out when file is NULL), then exit(2). */
TRAIN_NORETURN void die_input(const char *file, long line, const char *fmt, ...) TRAIN_PRINTF(3, 4);
/* One line on stderr, "confsmoe-train: <what>", then exit(1). */
TRAIN_NORETURN void die_system(const char *fmt, ...) TRAIN_PRINTF(1, 2);
/* A warning line on stderr ("confsmoe-train: warning: ..."). */
void warn(const char *fmt, ...) TRAIN_PRINTF(1, 2);

void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
/* "a/b" (a freshly allocated string). */
char *path_join(const char *dir, const char *file);

/* splitmix64: a small, seedable host RNG for splits, masks and batch order. */
typedef struct {
    uint64_t state;
} rng64;

/* An independent stream for (seed, purpose). */
rng64 rng_stream(uint64_t seed, uint64_t purpose);
uint64_t rng_next(rng64 *r);
/* Uniform integer in [0, n), n >= 1 (rejection sampling, no modulo bias). */
uint64_t rng_below(rng64 *r, uint64_t n);
void rng_shuffle(rng64 *r, int *v, size_t n);

double now_seconds(void);

#endif
