/* Shared by the Check tests: a counting allocator that can fail on demand, a deterministic
 * RNG, small accessors and builders, scratch folders, and a main(). */
#ifndef CONFSMOE_TESTUTIL_H
#define CONFSMOE_TESTUTIL_H

#include <check.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "confsmoe.h"
#include "testdir.h"

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

/* A ctx with the given seed, finite checks (1 is the default) and allocator (NULL: the library's). */
/* A ctx of these parameters; the test fails if it cannot be made. */
static inline confsmoe_ctx *test_ctx_of(const confsmoe_ctx_params *p)
{
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(p, &ctx), CONFSMOE_OK);
    return ctx;
}

static inline confsmoe_ctx *test_ctx_with(uint64_t seed, int32_t check_finite, const confsmoe_allocator *allocator)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = seed;
    p.check_finite = check_finite;
    p.allocator = allocator;
    return test_ctx_of(&p);
}

/* A ctx that allocates through `a` (which must outlive it). */
static inline confsmoe_ctx *test_ctx_counted(test_alloc *a, confsmoe_allocator *holder, uint64_t seed)
{
    holder->alloc = test_alloc_fn;
    holder->free = test_free_fn;
    holder->user = a;
    return test_ctx_with(seed, 1, holder);
}

static inline confsmoe_ctx *test_ctx(uint64_t seed) { return test_ctx_with(seed, 1, NULL); }

/* A ctx of n_threads `threads` (0: CONFSMOE_NUM_THREADS), the rest as by default. */
static inline confsmoe_ctx *test_ctx_threads(int32_t threads)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.n_threads = threads;
    return test_ctx_of(&p);
}

/* A tensor of nd of the dims d0..d3 (the rest are ignored). */
static inline confsmoe_tensor *test_tensor(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t nd, int64_t d0, int64_t d1,
                                           int64_t d2, int64_t d3)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, nd, dims, &t), CONFSMOE_OK);
    return t;
}

/* The small model most tests build: 2 heads, 4 experts, top-2; callers set the rest. */
static inline void test_model_params(confsmoe_model_params *p, int32_t n_modalities, const int64_t *features,
                                     int64_t d, int32_t n_classes)
{
    confsmoe_model_params_init(p);
    p->n_modalities = n_modalities;
    p->features = features;
    p->d = d;
    p->heads = 2;
    p->n_experts = 4;
    p->k = 2;
    p->n_classes = n_classes;
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

/* A fresh folder /tmp/confsmoe_<tag>_XXXXXX, written into dir. */
static inline void test_mkdtemp(char *dir, size_t cap, const char *tag)
{
    snprintf(dir, cap, "/tmp/confsmoe_%s_XXXXXX", tag);
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

/* Removes dir and what it holds (files, and folders of files). Returns 0 if dir cannot be opened. */
static inline int test_rm_dir(const char *dir)
{
    int opened = test_clear_dir(dir, 1);
    rmdir(dir);
    return opened;
}

/* A fresh folder and the path of a checkpoint in it. */
typedef struct {
    char dir[64], path[128];
} test_scratch;

static inline void test_scratch_open(test_scratch *s, const char *tag)
{
    test_mkdtemp(s->dir, sizeof s->dir, tag);
    snprintf(s->path, sizeof s->path, "%s/model.safetensors", s->dir);
}

/* Number of entries in dir whose name contains ".tmp." (leftover temporary files). */
static inline int test_temp_files(const char *dir)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        n += strstr(e->d_name, ".tmp.") != NULL;
    closedir(d);
    return n;
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
