/* Private elementwise kernels (lib/elementwise.c, linked from the internal library) against
 * independent references: the dropout mask's statistics and stream layout, the fused
 * bias + GELU + GELU' pass against the exact GELU in double, the row softmax, and the direct
 * products of lib/gemm_direct.c against sums in double. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../lib/kernels.h"
#include "testutil.h"

enum { N = 1 << 20 };

static uint8_t *mask(uint64_t counter, float p, int64_t n)
{
    uint8_t *keep = xcalloc((size_t)n, 1);
    csm_dropout_mask(UINT64_C(0x1234567887654321), counter, p, keep, n);
    return keep;
}

START_TEST(test_dropout_rates_and_pairs)
{
    const float ps[] = {0.1f, 0.5f, 0.9f};
    for (size_t t = 0; t < sizeof ps / sizeof *ps; t++) {
        const double p = ps[t], q = 1.0 - p;
        uint8_t *keep = mask(77, ps[t], N);
        int64_t even = 0, odd = 0, both = 0, across = 0;
        for (int64_t j = 0; j < N / 2; j++) {
            even += keep[2 * j];
            odd += keep[2 * j + 1];
            both += keep[2 * j] & keep[2 * j + 1];
            across += j > 0 && keep[2 * j] && keep[2 * j - 1];
        }
        /* Binomial counts over N/2 elements: 6 standard deviations. */
        const double n = N / 2, sd = sqrt(n * q * (1 - q)), sd2 = sqrt(n * q * q * (1 - q * q));
        ck_assert_msg(fabs(even - n * q) < 6 * sd, "p=%g: %lld of %g even elements kept", p, (long long)even, n);
        ck_assert_msg(fabs(odd - n * q) < 6 * sd, "p=%g: %lld of %g odd elements kept", p, (long long)odd, n);
        /* The two halves of a draw, and neighbours across draws, are independent: q^2. */
        ck_assert_msg(fabs(both - n * q * q) < 6 * sd2, "p=%g: a draw's halves both kept %lld, want %g", p,
                      (long long)both, n * q * q);
        ck_assert_msg(fabs(across - (n - 1) * q * q) < 6 * sd2 + 1, "p=%g: neighbours across draws %lld, want %g",
                      p, (long long)across, (n - 1) * q * q);
        free(keep);
    }
}
END_TEST

START_TEST(test_dropout_layout)
{
    /* n elements take ceil(n / 2) draws from counter on: a mask starting 2 j elements later is
     * the mask starting j draws later, and a shorter mask is a prefix. The model's per-head and
     * per-row offsets rely on both. */
    ck_assert_uint_eq(csm_dropout_draws(0), 0);
    ck_assert_uint_eq(csm_dropout_draws(5), 3);
    ck_assert_uint_eq(csm_dropout_draws(6), 3);
    uint8_t *whole = mask(1000, 0.5f, 4099);
    for (int64_t j = 0; j < 40; j += 7) {
        uint8_t *later = mask(1000 + (uint64_t)j, 0.5f, 4099 - 2 * j);
        ck_assert_int_eq(memcmp(later, whole + 2 * j, (size_t)(4099 - 2 * j)), 0);
        free(later);
    }
    for (int64_t n = 1; n < 40; n++) {
        uint8_t *prefix = mask(1000, 0.5f, n);
        ck_assert_int_eq(memcmp(prefix, whole, (size_t)n), 0);
        free(prefix);
    }
    /* The next region of draws is another mask. */
    uint8_t *other = mask(1000 + csm_dropout_draws(4099), 0.5f, 4099);
    ck_assert_int_ne(memcmp(other, whole, 4099), 0);
    free(other);
    free(whole);
    /* p = 0 keeps everything; p = 1 keeps nothing. */
    uint8_t *all = mask(5, 0.0f, 1000), *none = mask(5, 1.0f, 1000);
    for (int i = 0; i < 1000; i++) {
        ck_assert_int_eq(all[i], 1);
        ck_assert_int_eq(none[i], 0);
    }
    free(all);
    free(none);
}
END_TEST

START_TEST(test_bias_gelu_keeps_gelu_and_its_derivative)
{
    enum { ROWS = 7, COLS = 37 }; /* a tail past the 16-element chunks */
    float buf[ROWS * COLS], bias[COLS], act[ROWS * COLS], in_place[ROWS * COLS];
    trng r = {3};
    for (int c = 0; c < COLS; c++)
        bias[c] = (float)trng_uniform(&r, -1, 1);
    for (int i = 0; i < ROWS * COLS; i++)
        buf[i] = in_place[i] = (float)trng_uniform(&r, -6, 6);
    float x[ROWS * COLS];
    memcpy(x, buf, sizeof x);
    csm_bias_gelu(buf, bias, act, ROWS, COLS, true);
    csm_bias_gelu(in_place, bias, in_place, ROWS, COLS, false);
    for (int i = 0; i < ROWS * COLS; i++) {
        const double a = (double)x[i] + bias[i % COLS], cdf = 0.5 * erfc(-a / sqrt(2.0));
        const double pdf = exp(-0.5 * a * a) / sqrt(2.0 * 3.14159265358979323846);
        ck_assert_msg(fabs(act[i] - a * cdf) <= 1e-6 * (1 + fabs(a)), "GELU(%g) = %g, want %g", a, act[i], a * cdf);
        ck_assert_msg(fabs(buf[i] - (cdf + a * pdf)) <= 1e-6, "GELU'(%g) = %g, want %g", a, buf[i], cdf + a * pdf);
        ck_assert_msg(in_place[i] == act[i], "in place GELU(%g) = %g, kept %g", a, in_place[i], act[i]);
    }
}
END_TEST

/* Row softmax against double, for rows shorter than a chunk, exactly chunks, and with tails. */
START_TEST(test_softmax_rows)
{
    const int64_t widths[] = {2, 15, 16, 17, 31, 48, 150};
    trng r = {9};
    for (size_t w = 0; w < sizeof widths / sizeof *widths; w++) {
        const int64_t cols = widths[w], rows = 5;
        float *x = xcalloc((size_t)(rows * cols), sizeof *x);
        double *want = xcalloc((size_t)(rows * cols), sizeof *want);
        for (int64_t i = 0; i < rows * cols; i++)
            x[i] = (float)trng_uniform(&r, -30, 30);
        for (int64_t row = 0; row < rows; row++) {
            double top = -INFINITY, sum = 0.0;
            for (int64_t c = 0; c < cols; c++)
                top = fmax(top, x[row * cols + c]);
            for (int64_t c = 0; c < cols; c++)
                sum += want[row * cols + c] = exp((double)x[row * cols + c] - top);
            for (int64_t c = 0; c < cols; c++)
                want[row * cols + c] /= sum;
        }
        csm_softmax_rows(x, rows, cols);
        for (int64_t i = 0; i < rows * cols; i++)
            ck_assert_msg(fabs(x[i] - want[i]) <= 1e-6 * want[i] + 1e-12, "cols %lld, [%lld]: %.9g, want %.9g",
                          (long long)cols, (long long)i, (double)x[i], want[i]);
        free(x);
        free(want);
    }
}
END_TEST

/* One direct product against sums in double: C's elements within float rounding, C's padding
 * columns untouched, and with beta 0 a C of NaN overwritten (BLIS's rule: C is not read). */
static void check_direct(csm_direct_isa isa, bool have, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float beta,
                         trng *r)
{
    const float alpha = 0.5f, sentinel = 1234.5f;
    const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
    const int64_t arows = ta ? k : m, brows = tb ? n : k;
    float *a = xcalloc((size_t)(arows * lda), sizeof *a), *b = xcalloc((size_t)(brows * ldb), sizeof *b);
    float *c = xcalloc((size_t)(m * ldc), sizeof *c), *c0 = xcalloc((size_t)(m * ldc), sizeof *c0);
    for (int64_t i = 0; i < arows * lda; i++)
        a[i] = (float)trng_uniform(r, -1, 1);
    for (int64_t i = 0; i < brows * ldb; i++)
        b[i] = (float)trng_uniform(r, -1, 1);
    for (int64_t i = 0; i < m * ldc; i++)
        c0[i] = c[i] = i % ldc >= n ? sentinel : beta == 0.0f ? NAN : (float)trng_uniform(r, -1, 1);
    const bool ran = csm_gemm_direct_on(isa, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    ck_assert_msg(ran == have, "isa %d: the direct product %s on this CPU", (int)isa, ran ? "ran" : "did not run");
    for (int64_t i = 0; ran && i < m; i++)
        for (int64_t j = 0; j < ldc; j++) {
            const float got = c[i * ldc + j];
            if (j >= n) {
                ck_assert_msg(got == sentinel, "padding C[%lld, %lld] written", (long long)i, (long long)j);
                continue;
            }
            double sum = 0.0, mag = 0.0;
            for (int64_t p = 0; p < k; p++) {
                const double t =
                    (double)(ta ? a[p * lda + i] : a[i * lda + p]) * (tb ? b[j * ldb + p] : b[p * ldb + j]);
                sum += t;
                mag += fabs(t);
            }
            const double want = alpha * sum + (beta == 0.0f ? 0.0 : beta * (double)c0[i * ldc + j]);
            ck_assert_msg(fabs(got - want) <= 1e-6 * (mag + fabs(want)) + 1e-7,
                          "isa %d ta %d tb %d m %lld n %lld k %lld beta %g: C[%lld, %lld] = %.9g, want %.9g", (int)isa,
                          ta, tb, (long long)m, (long long)n, (long long)k, (double)beta, (long long)i, (long long)j,
                          (double)got, want);
        }
    free(a);
    free(b);
    free(c);
    free(c0);
}

/* Each instruction set the CPU has (and refusals of those it has not), every transpose case, row
 * and column tails of the 6 x 32 and 12 x 16 (AVX-512) and 6 x 16 and 12 x 8 (AVX2) blocks, padded
 * leading dimensions. */
START_TEST(test_gemm_direct)
{
#if defined(__x86_64__) && defined(__GNUC__)
    const bool have[] = {false, __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                         __builtin_cpu_supports("avx512f")};
#else
    const bool have[] = {false, false, false};
#endif
    const int64_t ms[] = {1, 5, 6, 7, 13, 25}, ns[] = {1, 7, 8, 9, 16, 17, 32, 33, 150}, ks[] = {1, 3, 32};
    trng r = {11};
    for (int isa = CSM_DIRECT_NONE; isa <= CSM_DIRECT_AVX512; isa++)
        for (int t = 0; t < 4; t++)
            for (size_t mi = 0; mi < sizeof ms / sizeof *ms; mi++)
                for (size_t ni = 0; ni < sizeof ns / sizeof *ns; ni++)
                    for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++) {
                        check_direct(isa, have[isa], t & 1, t & 2, ms[mi], ns[ni], ks[ki], 0.0f, &r);
                        check_direct(isa, have[isa], t & 1, t & 2, ms[mi], ns[ni], ks[ki], 1.5f, &r);
                    }
    /* A transposed B larger than the packing buffer is left to BLIS, with C untouched. */
    const int64_t big = 129;
    float *a = xcalloc((size_t)(big * big), sizeof *a), *c = xcalloc((size_t)(big * big), sizeof *c);
    ck_assert(!csm_gemm_direct(false, true, big, big, big, 1.0f, a, big, a, big, 0.0f, c, big));
    for (int64_t i = 0; i < big * big; i++)
        ck_assert(c[i] == 0.0f);
    free(a);
    free(c);
}
END_TEST

/* csm_gemm_ld on a ctx of 2 and 3 threads, which splits narrow products over its threads by
 * rows, and products with long sums by rows or columns of C, gives the bits of 1 thread: the
 * classifier's and the router's shapes, and long sums with each operand stored either way. */
START_TEST(test_gemm_threads_same_results)
{
    const struct {
        bool ta, tb;
        int64_t m, n, k;
    } cases[] = {{false, true, 2000, 10, 128}, {false, false, 2000, 8, 64}, {false, false, 1999, 128, 10},
                 {true, false, 128, 96, 1000},  {true, false, 10, 128, 2000}, {false, true, 40, 200, 1000},
                 {false, false, 150, 40, 900},  {true, true, 130, 70, 800}};
    confsmoe_ctx *one = test_ctx_threads(1), *two = test_ctx_threads(2), *three = test_ctx_threads(3);
    trng r = {13};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const bool ta = cases[i].ta, tb = cases[i].tb;
        const int64_t m = cases[i].m, n = cases[i].n, k = cases[i].k;
        float *a = xcalloc((size_t)(m * k), sizeof *a), *b = xcalloc((size_t)(k * n), sizeof *b);
        float *c1 = xcalloc((size_t)(m * n), sizeof *c1), *c2 = xcalloc((size_t)(m * n), sizeof *c2);
        float *c3 = xcalloc((size_t)(m * n), sizeof *c3);
        for (int64_t j = 0; j < m * k; j++)
            a[j] = (float)trng_uniform(&r, -1, 1);
        for (int64_t j = 0; j < k * n; j++)
            b[j] = (float)trng_uniform(&r, -1, 1);
        for (int64_t j = 0; j < m * n; j++)
            c1[j] = c2[j] = c3[j] = (float)trng_uniform(&r, -1, 1);
        /* The product itself, against a sum in double. */
        const int64_t i0 = m / 2, j0 = n - 1;
        double want = c1[i0 * n + j0];
        for (int64_t p = 0; p < k; p++)
            want += 0.5 * (ta ? a[p * m + i0] : a[i0 * k + p]) * (tb ? b[j0 * k + p] : b[p * n + j0]);
        csm_gemm(one, ta, tb, m, n, k, 0.5f, a, b, 1.0f, c1);
        csm_gemm(two, ta, tb, m, n, k, 0.5f, a, b, 1.0f, c2);
        csm_gemm(three, ta, tb, m, n, k, 0.5f, a, b, 1.0f, c3);
        ck_assert_msg(fabs(c1[i0 * n + j0] - want) < 1e-3, "case %zu: %g, not %g", i, c1[i0 * n + j0], want);
        ck_assert_msg(memcmp(c1, c2, (size_t)(m * n) * sizeof *c1) == 0, "case %zu: 2 threads differ from 1", i);
        ck_assert_msg(memcmp(c1, c3, (size_t)(m * n) * sizeof *c1) == 0, "case %zu: 3 threads differ from 1", i);
        free(a), free(b), free(c1), free(c2), free(c3);
    }
    confsmoe_ctx_destroy(one);
    confsmoe_ctx_destroy(two);
    confsmoe_ctx_destroy(three);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kernels");
    TCase *tc = tcase_create("kernels");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_dropout_rates_and_pairs);
    tcase_add_test(tc, test_dropout_layout);
    tcase_add_test(tc, test_bias_gelu_keeps_gelu_and_its_derivative);
    tcase_add_test(tc, test_softmax_rows);
    tcase_add_test(tc, test_gemm_direct);
    tcase_add_test(tc, test_gemm_threads_same_results);
    suite_add_tcase(s, tc);
    return test_run(s);
}
