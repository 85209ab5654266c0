/* Private: stage 1 of imputation (docs/MODEL.md, section 5), shared by the public
 * confsmoe_imputer_fill and the model, with or without an imputer object: the model's pools
 * of observed rows with their means, and the two ways to fill a missing sample's raw input:
 * the mean of `draws` distinct pool rows drawn at random, or the pool's mean. */
#ifndef CONFSMOE_STAGE1_H
#define CONFSMOE_STAGE1_H

#include "internal.h"

/* The model's pools, one per modality: a copy of the rows the host set and their column means. */
typedef struct {
    int32_t n_modalities;
    float **rows;    /* [M] pool m as [count[m], width], NULL until set */
    float **mean;    /* [M] [width] */
    int64_t *count;  /* [M] */
} csm_pools;

/* No pool set yet; CONFSMOE_E_NOMEM (no message) when out of memory. */
confsmoe_status csm_pools_init(confsmoe_ctx *ctx, csm_pools *pools, int32_t n_modalities);
void csm_pools_free(confsmoe_ctx *ctx, csm_pools *pools);
/* Replaces pool m with a copy of `rows` rows of `width` elements (validated by the caller) and
 * their column means; a failed call keeps the previous pool. */
confsmoe_status csm_pools_set(confsmoe_ctx *ctx, const char *fn, csm_pools *pools, int32_t m, const float *rows,
                              int64_t count, int64_t width);

/* Fills the samples of x [B, row] that miss modality m of avail [B, M] with the mean of
 * min(draws, pool_rows) distinct rows of pool [pool_rows, row], drawn per sample: sample b
 * draws from substream (first + b) M + m of stream position `base` (its index in the whole
 * batch), and the ctx stream does not move. x is unchanged on failure. */
confsmoe_status csm_stage1_fill_draws(confsmoe_ctx *ctx, const char *fn, const float *pool, int64_t pool_rows,
                                      int32_t draws, const uint8_t *avail, int64_t B, int32_t M, int32_t m,
                                      int64_t row, float *x, uint64_t base, int64_t first);

/* The model's stage 1: x[m] [B, S F_m] = inputs[m], with every missing sample filled from pool
 * m, by draws (stage 1 of two-stage imputation) or with the pool mean. */
confsmoe_status csm_stage1_fill_inputs(confsmoe_ctx *ctx, const csm_pools *pools, const confsmoe_tensor *const *inputs,
                                       const uint8_t *avail, int64_t B, bool by_draws, int32_t draws, uint64_t base,
                                       int64_t first, float *const *x);

#endif /* CONFSMOE_STAGE1_H */
