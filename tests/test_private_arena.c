/* The scratch arena (csm_arena_*) and the lent blocks over it (csm_lent_alloc / csm_lent_free),
 * called directly: offsets, 64-byte rounding, roll-back of the most recent block only, and the
 * `missed` / `wanted` bookkeeping, against values worked out by hand from the rules in the
 * arena's header comment. */
#include "arena.h"
#include "internal.h"
#include "testutil.h"

enum { ARENA_BYTES = 256 };

static _Alignas(64) char arena_block[ARENA_BYTES];

static csm_arena arena_over_block(void)
{
    csm_arena a = {.base = arena_block, .size = ARENA_BYTES};
    return a;
}

START_TEST(test_arena_without_block_misses)
{
    csm_arena a = {0};
    ck_assert_ptr_null(csm_arena_alloc(&a, 10));
    ck_assert_uint_eq(a.missed, 64);
    ck_assert_uint_eq(a.wanted, 64);
    ck_assert_ptr_null(csm_arena_alloc(&a, 100));
    ck_assert_uint_eq(a.missed, 64 + 128);
    ck_assert_uint_eq(a.wanted, 64 + 128);
    /* A missed block given back no longer counts, and the estimate never goes below 0. */
    csm_arena_forget(&a, 100);
    ck_assert_uint_eq(a.missed, 64);
    csm_arena_forget(&a, 1000);
    ck_assert_uint_eq(a.missed, 0);
    ck_assert_uint_eq(a.wanted, 64 + 128);
    ck_assert(!csm_arena_owns(&a, arena_block));
    ck_assert(!csm_arena_owns(NULL, arena_block));
}
END_TEST

START_TEST(test_arena_rounds_to_64_and_rolls_back_the_last_block)
{
    csm_arena a = arena_over_block();
    char *b1 = csm_arena_alloc(&a, 1), *b2 = csm_arena_alloc(&a, 64), *b3 = csm_arena_alloc(&a, 65);
    ck_assert_ptr_eq(b1, arena_block);
    ck_assert_ptr_eq(b2, arena_block + 64);
    ck_assert_ptr_eq(b3, arena_block + 128);   /* 65 bytes take 128 */
    ck_assert_uint_eq(a.used, 256);
    ck_assert_uint_eq(a.wanted, 256);
    ck_assert_uint_eq(a.missed, 0);

    /* Full: a miss is counted, on top of what is in use. */
    ck_assert_ptr_null(csm_arena_alloc(&a, 1));
    ck_assert_uint_eq(a.missed, 64);
    ck_assert_uint_eq(a.wanted, 320);

    /* The most recent block rolls back; an older one stays until the reset. */
    csm_arena_free(&a, b1);
    ck_assert_uint_eq(a.used, 256);
    csm_arena_free(&a, b3);
    ck_assert_uint_eq(a.used, 128);
    csm_arena_free(&a, b2);
    ck_assert_uint_eq(a.used, 128);
    char *b4 = csm_arena_alloc(&a, 32);
    ck_assert_ptr_eq(b4, arena_block + 128);
    ck_assert_uint_eq(a.used, 192);
    ck_assert_uint_eq(a.wanted, 320);   /* a high-water mark: it does not come down */

    csm_arena_forget(&a, 1);
    ck_assert_uint_eq(a.missed, 0);

    csm_arena_reset(&a);
    ck_assert_uint_eq(a.used, 0);
    ck_assert_uint_eq(a.wanted, 0);
    ck_assert_ptr_eq(a.base, arena_block);
    ck_assert_ptr_eq(csm_arena_alloc(&a, ARENA_BYTES), arena_block);
    ck_assert_uint_eq(a.used, ARENA_BYTES);
}
END_TEST

START_TEST(test_arena_owns_its_block_only)
{
    csm_arena a = arena_over_block();
    ck_assert(csm_arena_owns(&a, arena_block));
    ck_assert(csm_arena_owns(&a, arena_block + ARENA_BYTES - 1));
    ck_assert(!csm_arena_owns(&a, arena_block + ARENA_BYTES));
}
END_TEST

START_TEST(test_arena_rejects_a_size_that_overflows)
{
    csm_arena a = arena_over_block();
    ck_assert_ptr_null(csm_arena_alloc(&a, SIZE_MAX - 10));
    ck_assert_uint_eq(a.used, 0);
    ck_assert_ptr_eq(csm_arena_alloc(&a, 8), arena_block);
}
END_TEST

START_TEST(test_lent_blocks_fall_back_to_the_ctx)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 1);
    const long live = counter.live;

    /* No arena: the ctx's allocator. */
    void *p = csm_lent_alloc(ctx, NULL, 100);
    ck_assert_ptr_nonnull(p);
    ck_assert_int_eq(counter.live, live + 1);
    csm_lent_free(ctx, NULL, p, 100);
    ck_assert_int_eq(counter.live, live);

    /* 128 bytes of arena: the first block fits, the second comes from the ctx. */
    csm_arena a = {.base = arena_block, .size = 128};
    void *in = csm_lent_alloc(ctx, &a, 100), *out = csm_lent_alloc(ctx, &a, 100);
    ck_assert_ptr_eq(in, arena_block);
    ck_assert(!csm_arena_owns(&a, out));
    ck_assert_int_eq(counter.live, live + 1);
    ck_assert_uint_eq(a.missed, 128);
    ck_assert_uint_eq(a.wanted, 256);
    /* Freed as transient, the missed block stops counting; the arena's block rolls back. */
    csm_lent_free(ctx, &a, out, 100);
    ck_assert_int_eq(counter.live, live);
    ck_assert_uint_eq(a.missed, 0);
    csm_lent_free(ctx, &a, in, 100);
    ck_assert_uint_eq(a.used, 0);

    /* A block kept beyond the call (transient 0) still counts as missed. */
    void *big = csm_lent_alloc(ctx, &a, 200);
    ck_assert(!csm_arena_owns(&a, big));
    csm_lent_free(ctx, &a, big, 0);
    ck_assert_uint_eq(a.missed, 256);
    ck_assert_int_eq(counter.live, live);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counter.live, 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_arena");
    TCase *tc = tcase_create("arena");
    tcase_add_test(tc, test_arena_without_block_misses);
    tcase_add_test(tc, test_arena_rounds_to_64_and_rolls_back_the_last_block);
    tcase_add_test(tc, test_arena_owns_its_block_only);
    tcase_add_test(tc, test_arena_rejects_a_size_that_overflows);
    tcase_add_test(tc, test_lent_blocks_fall_back_to_the_ctx);
    suite_add_tcase(s, tc);
    return test_run(s);
}
