/* Shared by the Check tests: a counting allocator that can fail on demand, and a main(). */
#ifndef CONFSMOE_TESTUTIL_H
#define CONFSMOE_TESTUTIL_H

#include <check.h>
#include <stdlib.h>

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

static inline int test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

#endif /* CONFSMOE_TESTUTIL_H */
