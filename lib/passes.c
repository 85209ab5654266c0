/* Whole-array passes over the ctx's threads (passes.h). */
#include <string.h>

#include "kernels.h"
#include "passes.h"
#include "threads.h"

/* Floats per block of rows (256 KiB): a region costs a few microseconds to enter, a block of
 * this size tens of microseconds to stream. */
#define PASSES_BLOCK_FLOATS 65536

/* One pass's arrays: out = f(a, b), and LayerNorm's. */
typedef struct {
    float *out;
    const float *a, *b;
    const float *gamma, *beta, *mean, *rstd;
    float *mean_out, *rstd_out, *partials;
    int64_t rows, cols, out_stride, in_stride, block_rows;
    float eps;
    bool accumulate;
} passes_task;

static int64_t passes_block_rows(int64_t cols) { return cols >= PASSES_BLOCK_FLOATS ? 1 : PASSES_BLOCK_FLOATS / cols; }

/* fn over the rows [0, rows) of t's arrays: in blocks on the threads when there is more than one
 * block and more than one worker, else at once on the calling thread. */
static void passes_run_rows(confsmoe_ctx *ctx, int64_t rows, csm_task_fn fn, passes_task *t)
{
    const int64_t per = passes_block_rows(t->cols);
    if (rows > per && csm_parallel_workers(ctx, rows) > 1)
        csm_parallel_for(ctx, rows, per, fn, t);
    else
        fn(t, 0, rows, 0);
}

static void passes_zero_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    memset(t->out + first * t->cols, 0, (size_t)((last - first) * t->cols) * sizeof(float));
}

void csm_pass_zero(confsmoe_ctx *ctx, float *out, int64_t rows, int64_t cols)
{
    passes_task t = {.out = out, .cols = cols};
    passes_run_rows(ctx, rows, passes_zero_task, &t);
}

static void passes_broadcast_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    csm_broadcast_rows(t->out + first * t->cols, t->a, last - first, t->cols);
}

void csm_pass_broadcast_rows(confsmoe_ctx *ctx, float *out, const float *bias, int64_t rows, int64_t cols)
{
    passes_task t = {.out = out, .a = bias, .cols = cols};
    passes_run_rows(ctx, rows, passes_broadcast_task, &t);
}

static void passes_add_rows_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    csm_add_rows(t->out + first * t->cols, t->a, last - first, t->cols);
}

void csm_pass_add_rows(confsmoe_ctx *ctx, float *x, const float *bias, int64_t rows, int64_t cols)
{
    passes_task t = {.out = x, .a = bias, .cols = cols};
    passes_run_rows(ctx, rows, passes_add_rows_task, &t);
}

/* Columns first .. last - 1 of acc, over every row in order. */
static void passes_column_sums_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    for (int64_t r = 0; r < t->rows; r++)
        csm_add_column_sums(t->out + first, t->a + r * t->cols + first, 1, last - first);
}

void csm_pass_add_column_sums(confsmoe_ctx *ctx, float *acc, const float *x, int64_t rows, int64_t cols)
{
    /* Blocks of columns that a worker streams down the rows: 4 KiB of each row. */
    const int64_t per = 1024;
    if (rows * cols < 2 * PASSES_BLOCK_FLOATS || cols < 2 * per || csm_parallel_workers(ctx, cols / per) < 2) {
        csm_add_column_sums(acc, x, rows, cols);
        return;
    }
    passes_task t = {.out = acc, .a = x, .rows = rows, .cols = cols};
    csm_parallel_for(ctx, cols, per, passes_column_sums_task, &t);
}

static void passes_add_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    csm_add(t->out + first * t->cols, t->a + first * t->cols, t->b + first * t->cols, (last - first) * t->cols);
}

void csm_pass_add(confsmoe_ctx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols)
{
    passes_task t = {.out = y, .a = a, .b = b, .cols = cols};
    passes_run_rows(ctx, rows, passes_add_task, &t);
}

static void passes_copy_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    for (int64_t i = first; i < last; i++)
        memcpy(t->out + i * t->out_stride, t->a + i * t->in_stride, (size_t)t->cols * sizeof(float));
}

void csm_pass_copy_blocks(confsmoe_ctx *ctx, float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                          int64_t count, int64_t len)
{
    passes_task t = {.out = dst, .a = src, .cols = len, .out_stride = dst_stride, .in_stride = src_stride};
    passes_run_rows(ctx, count, passes_copy_task, &t);
}

static void passes_layernorm_forward_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    const int64_t cols = t->cols;
    csm_layernorm_forward(t->a + first * cols, t->gamma, t->beta, t->out + first * cols, t->mean_out + first,
                          t->rstd_out + first, last - first, cols, t->eps);
}

void csm_pass_layernorm_forward(confsmoe_ctx *ctx, const float *x, const float *gamma, const float *beta, float *out,
                                float *mean, float *rstd, int64_t rows, int64_t cols, float eps)
{
    passes_task t = {.out = out, .a = x, .gamma = gamma, .beta = beta, .mean_out = mean, .rstd_out = rstd,
                     .cols = cols, .eps = eps};
    passes_run_rows(ctx, rows, passes_layernorm_forward_task, &t);
}

/* dx of a block of rows, without the parameter gradients. */
static void passes_layernorm_dx_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    const int64_t cols = t->cols;
    csm_layernorm_backward(t->a + first * cols, t->mean + first, t->rstd + first, t->gamma, t->b + first * cols,
                           t->out + first * cols, NULL, NULL, last - first, cols, t->accumulate);
}

/* Blocks first .. last - 1 of rows: dx, and each block's parameter gradients into its own
 * row of partials (dgamma's terms, then dbeta's), summed from zero. */
static void passes_layernorm_blocks_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const passes_task *t = arg;
    const int64_t cols = t->cols, per = t->block_rows;
    for (int64_t i = first; i < last; i++) {
        const int64_t r0 = i * per, n = t->rows - r0 < per ? t->rows - r0 : per;
        float *dg = t->partials + i * 2 * cols, *db = dg + cols;
        memset(dg, 0, (size_t)(2 * cols) * sizeof *dg);
        csm_layernorm_backward(t->a + r0 * cols, t->mean + r0, t->rstd + r0, t->gamma, t->b + r0 * cols,
                               t->out + r0 * cols, dg, db, n, cols, t->accumulate);
    }
}

int64_t csm_pass_layernorm_blocks(int64_t rows, int64_t cols)
{
    const int64_t per = passes_block_rows(cols);
    return (rows + per - 1) / per;
}

void csm_pass_layernorm_backward(confsmoe_ctx *ctx, const float *x, const float *mean, const float *rstd,
                                 const float *gamma, const float *dout, float *dx, float *dgamma, float *dbeta,
                                 int64_t rows, int64_t cols, bool accumulate, float *partials)
{
    const int64_t per = passes_block_rows(cols);
    passes_task t = {.out = dx,
                     .a = x,
                     .b = dout,
                     .gamma = gamma,
                     .mean = mean,
                     .rstd = rstd,
                     .partials = partials,
                     .rows = rows,
                     .cols = cols,
                     .block_rows = per,
                     .accumulate = accumulate};
    if (!dgamma) {
        passes_run_rows(ctx, rows, passes_layernorm_dx_task, &t);
        return;
    }
    /* One pass over the rows, block by block, on any number of threads; then the blocks'
     * parameter gradients are added in block order, so that the sums do not depend on them. */
    const int64_t blocks = (rows + per - 1) / per;
    csm_parallel_for(ctx, blocks, 1, passes_layernorm_blocks_task, &t);
    for (int64_t i = 0; i < blocks; i++) {
        csm_axpy(dgamma, 1.0f, partials + i * 2 * cols, cols);
        csm_axpy(dbeta, 1.0f, partials + i * 2 * cols + cols, cols);
    }
}
