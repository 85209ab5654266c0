/* The whole-array passes (lib/passes.h), called directly: on a ctx of 2 and 3 threads every
 * output is bit-identical to the serial kernels of lib/kernels.h on one thread, for arrays of
 * several blocks with a ragged last block, LayerNorm backward writing or adding dx, and dx
 * taking the place of dout; bias rows, column sums and zeroed rows. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "passes.h"
#include "testutil.h"

/* 3 blocks of rows of 128 floats and a part of a fourth (a block is 256 KiB of rows). */
enum { BLOCK_ROWS = 512, ROWS = 3 * BLOCK_ROWS + 77, COLS = 128 };

static float *random_array(trng *r, int64_t n)
{
    float *v = xcalloc((size_t)n, sizeof *v);
    for (int64_t i = 0; i < n; i++)
        v[i] = (float)trng_uniform(r, -2, 2);
    return v;
}

static float *copy_of(const float *v, int64_t n)
{
    float *c = xcalloc((size_t)n, sizeof *c);
    memcpy(c, v, (size_t)n * sizeof *c);
    return c;
}

static void same(const float *got, const float *want, int64_t n, const char *what, int threads)
{
    ck_assert_msg(memcmp(got, want, (size_t)n * sizeof *got) == 0, "%s differs at %d threads", what, threads);
}

START_TEST(test_passes_match_the_serial_kernels)
{
    const int64_t n = (int64_t)ROWS * COLS;
    trng r = {5};
    float *x = random_array(&r, n), *y = random_array(&r, n), *dout = random_array(&r, n);
    float *gamma = random_array(&r, COLS), *beta = random_array(&r, COLS);
    /* Serial: forward, then backward adding into dx, then writing it in dout's place, each
     * with its parameter gradients accumulated from a nonzero start: the pass sums each
     * block of rows from zero, then adds the blocks in order. */
    float *out1 = xcalloc((size_t)n, sizeof *out1), *mean1 = xcalloc(ROWS, sizeof *mean1);
    float *rstd1 = xcalloc(ROWS, sizeof *rstd1), *dx1 = copy_of(y, n);
    float *dg1 = copy_of(gamma, COLS), *db1 = copy_of(beta, COLS);
    csm_layernorm_forward(x, gamma, beta, out1, mean1, rstd1, ROWS, COLS, 1e-5f);
    float *alias1 = copy_of(dout, n);
    for (int call = 0; call < 2; call++)
        for (int64_t r0 = 0; r0 < ROWS; r0 += BLOCK_ROWS) {
            const int64_t rows = ROWS - r0 < BLOCK_ROWS ? ROWS - r0 : BLOCK_ROWS, at = r0 * COLS;
            float block_dg[COLS] = {0}, block_db[COLS] = {0};
            if (call == 0)
                csm_layernorm_backward(x + at, mean1 + r0, rstd1 + r0, gamma, dout + at, dx1 + at, block_dg, block_db,
                                       rows, COLS, true);
            else
                csm_layernorm_backward(x + at, mean1 + r0, rstd1 + r0, gamma, alias1 + at, alias1 + at, block_dg,
                                       block_db, rows, COLS, false);
            for (int j = 0; j < COLS; j++)
                dg1[j] += block_dg[j], db1[j] += block_db[j];
        }
    float *sum1 = xcalloc((size_t)n, sizeof *sum1), *bcast1 = xcalloc((size_t)n, sizeof *bcast1);
    csm_add(sum1, x, y, n);
    csm_broadcast_rows(bcast1, gamma, ROWS, COLS);

    const int counts[] = {1, 2, 3};
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
        const int t = counts[c];
        confsmoe_ctx *ctx = test_ctx_threads(t);
        float *out = xcalloc((size_t)n, sizeof *out), *mean = xcalloc(ROWS, sizeof *mean);
        float *rstd = xcalloc(ROWS, sizeof *rstd), *dx = copy_of(y, n);
        float *dg = copy_of(gamma, COLS), *db = copy_of(beta, COLS);
        csm_pass_layernorm_forward(ctx, x, gamma, beta, out, mean, rstd, ROWS, COLS, 1e-5f);
        same(out, out1, n, "LayerNorm forward", t);
        same(mean, mean1, ROWS, "LayerNorm means", t);
        same(rstd, rstd1, ROWS, "LayerNorm 1/std", t);
        float *partials = xcalloc((size_t)(csm_pass_layernorm_blocks(ROWS, COLS) * 2 * COLS), sizeof *partials);
        csm_pass_layernorm_backward(ctx, x, mean, rstd, gamma, dout, dx, dg, db, ROWS, COLS, true, partials);
        same(dx, dx1, n, "LayerNorm dx (added)", t);
        float *alias = copy_of(dout, n);
        csm_pass_layernorm_backward(ctx, x, mean, rstd, gamma, alias, alias, dg, db, ROWS, COLS, false, partials);
        same(alias, alias1, n, "LayerNorm dx in dout's place", t);
        same(dg, dg1, COLS, "dgamma", t);
        same(db, db1, COLS, "dbeta", t);

        float *sum = xcalloc((size_t)n, sizeof *sum), *bcast = xcalloc((size_t)n, sizeof *bcast);
        csm_pass_add(ctx, sum, x, y, ROWS, COLS);
        same(sum, sum1, n, "add", t);
        csm_pass_broadcast_rows(ctx, bcast, gamma, ROWS, COLS);
        same(bcast, bcast1, n, "broadcast", t);
        /* All rows but the last of sum zeroed: the last keeps x + y. */
        csm_pass_zero(ctx, sum, ROWS - 1, COLS);
        for (int64_t i = 0; i < (ROWS - 1) * COLS; i++)
            ck_assert_msg(sum[i] == 0.0f, "element %ld not zeroed at %d threads", (long)i, t);
        same(sum + (ROWS - 1) * COLS, sum1 + (ROWS - 1) * COLS, COLS, "the row after the zeroed ones", t);
        /* Blocks 3 rows long, every other one of x into a packed array and back out. */
        const int64_t len = 3 * COLS, count = ROWS / 6;
        float *packed = xcalloc((size_t)(count * len), sizeof *packed), *back = xcalloc((size_t)n, sizeof *back);
        csm_pass_copy_blocks(ctx, packed, len, x, 2 * len, count, len);
        csm_pass_copy_blocks(ctx, back, 2 * len, packed, len, count, len);
        for (int64_t i = 0; i < count; i++) {
            same(packed + i * len, x + 2 * i * len, len, "copied block", t);
            same(back + 2 * i * len, x + 2 * i * len, len, "block copied back", t);
            for (int64_t j = 0; j < len; j++)
                ck_assert_msg(back[(2 * i + 1) * len + j] == 0.0f, "a block between copied ones was written");
        }
        free(out), free(mean), free(rstd), free(dx), free(dg), free(db), free(alias), free(sum), free(bcast);
        free(partials);
        free(packed), free(back);
        confsmoe_ctx_destroy(ctx);
    }
    free(x), free(y), free(dout), free(gamma), free(beta), free(out1), free(mean1), free(rstd1), free(dx1);
    free(dg1), free(db1), free(alias1), free(sum1), free(bcast1);
}
END_TEST

/* Bias rows added, and column sums over rows wide enough to be split by columns (a ragged
 * last block of columns), into a nonzero start: the serial kernels' bits. */
START_TEST(test_row_and_column_passes)
{
    enum { R = 41, C = 5 * 1024 + 300 };
    const int64_t n = (int64_t)R * C;
    trng r = {9};
    float *x = random_array(&r, n), *bias = random_array(&r, C), *start = random_array(&r, C);
    float *rows1 = copy_of(x, n), *sums1 = copy_of(start, C);
    csm_add_rows(rows1, bias, R, C);
    csm_add_column_sums(sums1, x, R, C);
    const int counts[] = {1, 2, 3};
    for (size_t c = 0; c < sizeof counts / sizeof *counts; c++) {
        const int t = counts[c];
        confsmoe_ctx *ctx = test_ctx_threads(t);
        float *rows = copy_of(x, n), *sums = copy_of(start, C);
        csm_pass_add_rows(ctx, rows, bias, R, C);
        same(rows, rows1, n, "bias rows added", t);
        csm_pass_add_column_sums(ctx, sums, x, R, C);
        same(sums, sums1, C, "column sums", t);
        free(rows), free(sums);
        confsmoe_ctx_destroy(ctx);
    }
    /* The sums are the rows' sums: each column within float rounding of a double sum. */
    for (int64_t j = 0; j < C; j++) {
        double want = start[j];
        for (int64_t i = 0; i < R; i++)
            want += x[i * C + j];
        ck_assert_msg(fabs(sums1[j] - want) < 1e-4, "column %ld: %g, not %g", (long)j, sums1[j], want);
    }
    free(x), free(bias), free(start), free(rows1), free(sums1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("passes");
    TCase *tc = tcase_create("passes");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_passes_match_the_serial_kernels);
    tcase_add_test(tc, test_row_and_column_passes);
    suite_add_tcase(s, tc);
    return test_run(s);
}
