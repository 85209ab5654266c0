/* The ctx's counter-based stream (lib/rng.c), called directly: the position API (tell, seek,
 * reserve, cursors at a position), the dropout wrapper against bits drawn here, and known
 * answers from an independent implementation of the stream's definition (lib/stream.h). */
#include <math.h>

#include "internal.h"
#include "kernels.h"
#include "testutil.h"

/* Known answers for seed 42, from a Python implementation of the definition in lib/stream.h and
 * lib/rng.c: splitmix64's finaliser mix (Steele, Lea and Flood 2014, as in Vigna's splitmix64.c),
 * key = mix(seed ^ 0x6a09e667f3bcc909), output i = mix(key + i * 0x9e3779b97f4a7c15 mod 2^64),
 * uniform = (output >> 40) 2^-24, normal = Box-Muller over two outputs, substream key =
 * mix(output(base) ^ mix(index ^ 0xbb67ae8584caa73b)). The script:
 *   M=2**64-1; mix=lambda z:(lambda z:(lambda z:z^(z>>31))(((z^(z>>27))*0x94d049bb133111eb)&M))(((z^(z>>30))*0xbf58476d1ce4e5b9)&M)
 *   key=mix(42^0x6a09e667f3bcc909); out=lambda k,i:mix((k+i*0x9e3779b97f4a7c15)&M)
 *   print([hex(out(key,i)) for i in range(4)]) */
enum { KNOWN_SEED = 42 };
static const uint64_t KNOWN_OUTPUT[4] = {UINT64_C(0x735743764450b1b3), UINT64_C(0x8ca10b1dbe91ee23),
                                         UINT64_C(0xe72aac3121269f60), UINT64_C(0xeb61ef540335612c)};
static const double KNOWN_UNIFORM[4] = {0.450550258, 0.549332321, 0.902994871, 0.919463098};
/* Box-Muller from outputs (10, 11) and (12, 13), rounded to float. */
static const double KNOWN_NORMAL_AT_10[2] = {0.688712358, -0.421808809};
/* csm_rng_substream(base 5, index 3): its outputs 0 and 1. */
static const uint64_t KNOWN_SUBSTREAM_5_3[2] = {UINT64_C(0xedf63534f831c923), UINT64_C(0x8d4d320eb49b36bf)};
/* Dropout mask p = 0.5 from position 7, 5 elements: bits 40..63 then 16..39 of each output. */
static const uint8_t KNOWN_MASK_AT_7[5] = {0, 1, 0, 0, 1};

START_TEST(test_rng_known_answers)
{
    confsmoe_ctx *ctx = test_ctx(KNOWN_SEED);
    ck_assert_uint_eq(csm_rng_tell(ctx), 0);
    for (int i = 0; i < 4; i++)
        ck_assert_uint_eq(csm_rng_u64(ctx), KNOWN_OUTPUT[i]);
    csm_rng_seek(ctx, 0);
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq_tol(csm_rng_uniform(ctx, 0.0f, 1.0f), KNOWN_UNIFORM[i], 1e-8);

    csm_substream at = csm_rng_at(ctx, 10);
    ck_assert_double_eq_tol(csm_substream_normal(&at), KNOWN_NORMAL_AT_10[0], 1e-7);
    ck_assert_uint_eq(at.counter, 10 + CSM_NORMAL_DRAWS);
    ck_assert_double_eq_tol(csm_substream_normal(&at), KNOWN_NORMAL_AT_10[1], 1e-7);

    csm_substream sub = csm_rng_substream(ctx, 5, 3);
    ck_assert_uint_eq(csm_substream_u64(&sub), KNOWN_SUBSTREAM_5_3[0]);
    ck_assert_uint_eq(csm_substream_u64(&sub), KNOWN_SUBSTREAM_5_3[1]);

    uint8_t keep[5];
    csm_rng_dropout_mask(ctx, 7, 0.5f, keep, 5);
    for (int i = 0; i < 5; i++)
        ck_assert_uint_eq(keep[i], KNOWN_MASK_AT_7[i]);

    /* Cursors and masks do not move the ctx's stream; reseeding restarts it. */
    ck_assert_uint_eq(csm_rng_tell(ctx), 4);
    csm_rng_u64(ctx);
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, KNOWN_SEED), CONFSMOE_OK);
    ck_assert_uint_eq(csm_rng_tell(ctx), 0);
    ck_assert_uint_eq(csm_rng_u64(ctx), KNOWN_OUTPUT[0]);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_rng_reserve_returns_the_old_position)
{
    confsmoe_ctx *ctx = test_ctx(7);
    for (int i = 0; i < 3; i++)
        csm_rng_u64(ctx);
    ck_assert_uint_eq(csm_rng_tell(ctx), 3);
    ck_assert_uint_eq(csm_rng_reserve(ctx, 10), 3);
    ck_assert_uint_eq(csm_rng_tell(ctx), 13);
    ck_assert_uint_eq(csm_rng_reserve(ctx, 0), 13);
    ck_assert_uint_eq(csm_rng_tell(ctx), 13);
    ck_assert_uint_eq(csm_rng_reserve(ctx, 1), 13);
    ck_assert_uint_eq(csm_rng_tell(ctx), 14);

    /* The next draw after a reservation is the one at its end, not one inside it. */
    csm_substream past = csm_rng_at(ctx, 14);
    ck_assert_uint_eq(csm_rng_u64(ctx), csm_substream_u64(&past));
    ck_assert_uint_eq(csm_rng_tell(ctx), 15);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_rng_seek_reproduces_draws)
{
    enum { N = 16 };
    confsmoe_ctx *ctx = test_ctx(11);
    csm_rng_reserve(ctx, 1000);
    const uint64_t start = csm_rng_tell(ctx);
    uint64_t first[N];
    float uniform[N];
    for (int i = 0; i < N; i++)
        first[i] = csm_rng_u64(ctx);
    for (int i = 0; i < N; i++)
        uniform[i] = csm_rng_uniform(ctx, -2.0f, 3.0f);
    /* Draws differ from one position to the next (a stuck counter would repeat). */
    ck_assert_uint_ne(first[0], first[1]);

    csm_rng_seek(ctx, start);
    ck_assert_uint_eq(csm_rng_tell(ctx), start);
    for (int i = 0; i < N; i++)
        ck_assert_uint_eq(csm_rng_u64(ctx), first[i]);
    for (int i = 0; i < N; i++)
        ck_assert_float_eq(csm_rng_uniform(ctx, -2.0f, 3.0f), uniform[i]);

    /* Into the middle of the run, and back from further on. */
    csm_rng_seek(ctx, start + 5);
    ck_assert_uint_eq(csm_rng_u64(ctx), first[5]);
    csm_rng_seek(ctx, start + 3);
    ck_assert_uint_eq(csm_rng_u64(ctx), first[3]);
    ck_assert_uint_eq(csm_rng_tell(ctx), start + 4);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_rng_cursors_at_one_position_agree)
{
    confsmoe_ctx *ctx = test_ctx(13);
    const uint64_t at = csm_rng_reserve(ctx, 64);
    csm_substream a = csm_rng_at(ctx, at), b = csm_rng_at(ctx, at);
    for (int i = 0; i < 32; i++)
        ck_assert_uint_eq(csm_substream_u64(&a), csm_substream_u64(&b));
    for (int i = 0; i < 8; i++)
        ck_assert_float_eq(csm_substream_normal(&a), csm_substream_normal(&b));
    ck_assert_uint_eq(a.counter, at + 32 + 8 * CSM_NORMAL_DRAWS);

    /* A cursor reads the ctx's own stream: the same as seeking there and drawing. */
    csm_substream c = csm_rng_at(ctx, at);
    csm_rng_seek(ctx, at);
    for (int i = 0; i < 32; i++)
        ck_assert_uint_eq(csm_substream_u64(&c), csm_rng_u64(ctx));

    /* Substreams of one base differ by index and agree for the same index. */
    csm_substream s0 = csm_rng_substream(ctx, at, 0), s1 = csm_rng_substream(ctx, at, 1);
    csm_substream s1_again = csm_rng_substream(ctx, at, 1);
    const uint64_t v1 = csm_substream_u64(&s1);
    ck_assert_uint_ne(csm_substream_u64(&s0), v1);
    ck_assert_uint_eq(csm_substream_u64(&s1_again), v1);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* The wrapper gives the kernel's mask at the given position, and both give the bits of the
 * stream's outputs as the kernel's header defines them, read here through a cursor. */
START_TEST(test_rng_dropout_mask_matches_the_stream)
{
    enum { N = 131 };  /* two 64-element blocks of the kernel and a tail of 3 */
    const float p = 0.3f;
    confsmoe_ctx *ctx = test_ctx(17);
    csm_rng_reserve(ctx, 500);
    const uint64_t position = 123;
    uint8_t wrapped[N], direct[N], want[N];
    csm_rng_dropout_mask(ctx, position, p, wrapped, N);
    csm_dropout_mask(ctx->rng_key, position, p, direct, N);
    ck_assert_uint_eq(csm_rng_tell(ctx), 500);

    const uint32_t threshold = (uint32_t)ceil((double)p * 16777216.0);
    csm_substream cursor = csm_rng_at(ctx, position);
    int kept = 0;
    for (int j = 0; j < (N + 1) / 2; j++) {
        const uint64_t r = csm_substream_u64(&cursor);
        want[2 * j] = (uint8_t)((r >> 40) >= threshold);
        if (2 * j + 1 < N)
            want[2 * j + 1] = (uint8_t)(((r >> 16) & 0xFFFFFF) >= threshold);
    }
    for (int i = 0; i < N; i++) {
        ck_assert_uint_eq(wrapped[i], want[i]);
        ck_assert_uint_eq(direct[i], want[i]);
        kept += want[i];
    }
    ck_assert_uint_eq(cursor.counter, position + csm_dropout_draws(N));
    /* Not all one value: the comparison above would pass for a constant mask of either. */
    ck_assert_int_gt(kept, 0);
    ck_assert_int_lt(kept, N);

    /* Another position gives another mask. */
    uint8_t other[N];
    csm_rng_dropout_mask(ctx, position + 1, p, other, N);
    ck_assert(memcmp(other, wrapped, N) != 0);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_rng");
    TCase *tc = tcase_create("rng");
    tcase_add_test(tc, test_rng_known_answers);
    tcase_add_test(tc, test_rng_reserve_returns_the_old_position);
    tcase_add_test(tc, test_rng_seek_reproduces_draws);
    tcase_add_test(tc, test_rng_cursors_at_one_position_agree);
    tcase_add_test(tc, test_rng_dropout_mask_matches_the_stream);
    suite_add_tcase(s, tc);
    return test_run(s);
}
