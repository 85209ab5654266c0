/* Private: the passes that stream over whole [rows, cols] float arrays (bias broadcasts, sums,
 * copies between layouts, LayerNorm), split over the ctx's own threads (threads.h) by blocks of
 * rows. Every row is computed as the serial kernel computes it, and sums over rows (column
 * sums, LayerNorm's parameter gradients) are added in an order fixed by the shape: results do
 * not depend on the thread count. Arrays of fewer than one block run on the calling thread. */
#ifndef CONFSMOE_PASSES_H
#define CONFSMOE_PASSES_H

#include <stdbool.h>
#include <stdint.h>

#include "internal.h"

/* out[rows, cols] = 0. */
void csm_pass_zero(confsmoe_ctx *ctx, float *out, int64_t rows, int64_t cols);
/* Each row of out[rows, cols] = bias[cols]. */
void csm_pass_broadcast_rows(confsmoe_ctx *ctx, float *out, const float *bias, int64_t rows, int64_t cols);
/* Each row of x[rows, cols] += bias[cols]. */
void csm_pass_add_rows(confsmoe_ctx *ctx, float *x, const float *bias, int64_t rows, int64_t cols);
/* acc[cols] += the rows of x[rows, cols]: split by columns, each summed over the rows in order. */
void csm_pass_add_column_sums(confsmoe_ctx *ctx, float *acc, const float *x, int64_t rows, int64_t cols);
/* y = a + b over [rows, cols]. */
void csm_pass_add(confsmoe_ctx *ctx, float *y, const float *a, const float *b, int64_t rows, int64_t cols);
/* count blocks of len floats: dst + i dst_stride = src + i src_stride (no overlap). */
void csm_pass_copy_blocks(confsmoe_ctx *ctx, float *dst, int64_t dst_stride, const float *src, int64_t src_stride,
                          int64_t count, int64_t len);
/* csm_layernorm_forward (kernels.h) over the threads. */
void csm_pass_layernorm_forward(confsmoe_ctx *ctx, const float *x, const float *gamma, const float *beta, float *out,
                                float *mean, float *rstd, int64_t rows, int64_t cols, float eps);
/* csm_layernorm_backward (kernels.h) over the threads, in one pass over the rows. With dgamma
 * (and dbeta), each block of rows sums its terms from zero into its row of
 * partials[csm_pass_layernorm_blocks(rows, cols), 2 cols], and the blocks are then added to
 * dgamma and dbeta in order: the same bits on any number of threads (not those of the serial
 * kernel, which adds row after row). Without dgamma, partials is not used. */
int64_t csm_pass_layernorm_blocks(int64_t rows, int64_t cols);
void csm_pass_layernorm_backward(confsmoe_ctx *ctx, const float *x, const float *mean, const float *rstd,
                                 const float *gamma, const float *dout, float *dx, float *dgamma, float *dbeta,
                                 int64_t rows, int64_t cols, bool accumulate, float *partials);

#endif /* CONFSMOE_PASSES_H */
