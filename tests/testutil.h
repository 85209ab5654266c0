/* Shared by the Check tests: a counting allocator that can fail on demand, a deterministic
 * RNG, small accessors, and a main(). */
#ifndef CONFSMOE_TESTUTIL_H
#define CONFSMOE_TESTUTIL_H

#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "confsmoe.h"

/* Counts live blocks and fails the fail_at-th allocation (1-based; 0 = never). */
typedef struct {
    long live;
    long total;
    long fail_at;
} test_alloc;

static void *test_alloc_fn(void *user, size_t size, size_t alignment)
{
    test_alloc *a = user;
    a->total++;
    if (a->fail_at > 0 && a->total == a->fail_at)
        return NULL;
    void *p = NULL;
    if (posix_memalign(&p, alignment, size) != 0)
        return NULL;
    a->live++;
    return p;
}

static void test_free_fn(void *user, void *ptr)
{
    test_alloc *a = user;
    if (ptr) {
        a->live--;
        free(ptr);
    }
}

/* A ctx that allocates through `a` (which must outlive it). */
static inline confsmoe_ctx *test_ctx_counted(test_alloc *a, confsmoe_allocator *holder, uint64_t seed)
{
    holder->alloc = test_alloc_fn;
    holder->free = test_free_fn;
    holder->user = a;
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = seed;
    p.allocator = holder;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    return ctx;
}

static inline confsmoe_ctx *test_ctx(uint64_t seed)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = seed;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    return ctx;
}

/* A deterministic RNG of the tests' own (splitmix64), independent of the library's. */
typedef struct {
    uint64_t s;
} trng;

static inline uint64_t trng_u64(trng *r)
{
    uint64_t z = (r->s += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* Uniform in [lo, hi). */
static inline double trng_uniform(trng *r, double lo, double hi)
{
    double u = (double)(trng_u64(r) >> 11) * 0x1.0p-53;
    return lo + (hi - lo) * u;
}

static inline void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    ck_assert_ptr_nonnull(p);
    return p;
}

static inline float *f32(confsmoe_tensor *t) { return (float *)confsmoe_tensor_data(t); }
static inline int32_t *i32(confsmoe_tensor *t) { return (int32_t *)confsmoe_tensor_data(t); }
static inline uint8_t *u8(confsmoe_tensor *t) { return (uint8_t *)confsmoe_tensor_data(t); }

static inline void fill_uniform(confsmoe_tensor *t, trng *r, double lo, double hi)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] = (float)trng_uniform(r, lo, hi);
}

static inline void fill_const(confsmoe_tensor *t, float c)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] = c;
}

/* A byte copy of a tensor, to prove later that a call left it alone. */
static inline void *tsnap(confsmoe_tensor *t)
{
    size_t n = confsmoe_tensor_nbytes(t);
    void *p = xcalloc(1, n);
    if (n)
        memcpy(p, confsmoe_tensor_data(t), n);
    return p;
}

static inline int tsame(confsmoe_tensor *t, const void *snap)
{
    size_t n = confsmoe_tensor_nbytes(t);
    return n == 0 || memcmp(confsmoe_tensor_data(t), snap, n) == 0;
}

/* Up to cap distinct coordinates of a tensor of numel, deterministic: all of a small
 * tensor, else the first, the last and pseudo-random others. */
static inline int64_t test_pick(int64_t cap, int64_t numel, int64_t *idx, uint64_t seed)
{
    if (numel <= cap) {
        for (int64_t i = 0; i < numel; i++)
            idx[i] = i;
        return numel;
    }
    trng r = {seed};
    int64_t m = 0;
    idx[m++] = 0;
    idx[m++] = numel - 1;
    while (m < cap) {
        int64_t c = (int64_t)(trng_u64(&r) % (uint64_t)numel);
        int dup = 0;
        for (int64_t j = 0; j < m; j++)
            dup |= idx[j] == c;
        if (!dup)
            idx[m++] = c;
    }
    return m;
}

static inline int test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif /* CONFSMOE_TESTUTIL_H */
