/* Stage 1 of imputation (docs/MODEL.md, section 5): a missing sample's raw input becomes the
 * mean of K distinct rows of its modality's pool (or, with no draws, the pool's mean). */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "internal.h"
#include "layout.h"
#include "passes.h"
#include "stage1.h"
#include "threads.h"

confsmoe_status csm_pools_init(confsmoe_ctx *ctx, csm_pools *pools, int32_t n_modalities)
{
    memset(pools, 0, sizeof *pools);
    pools->n_modalities = n_modalities;
    pools->rows = csm_calloc(ctx, (size_t)n_modalities, sizeof *pools->rows);
    pools->mean = csm_calloc(ctx, (size_t)n_modalities, sizeof *pools->mean);
    pools->count = csm_calloc(ctx, (size_t)n_modalities, sizeof *pools->count);
    return pools->rows && pools->mean && pools->count ? CONFSMOE_OK : CONFSMOE_E_NOMEM;
}

void csm_pools_free(confsmoe_ctx *ctx, csm_pools *pools)
{
    /* rows and mean are allocated separately: either may be NULL after a failed init. */
    for (int32_t m = 0; m < pools->n_modalities; m++) {
        csm_free(ctx, pools->rows ? pools->rows[m] : NULL);
        csm_free(ctx, pools->mean ? pools->mean[m] : NULL);
    }
    csm_free(ctx, pools->rows);
    csm_free(ctx, pools->mean);
    csm_free(ctx, pools->count);
    memset(pools, 0, sizeof *pools);
}

confsmoe_status csm_pools_set(confsmoe_ctx *ctx, const char *fn, csm_pools *pools, int32_t m, const float *rows,
                              int64_t count, int64_t width)
{
    float *copy = csm_alloc(ctx, (size_t)(count * width) * sizeof(float));
    float *mean = csm_calloc(ctx, (size_t)width, sizeof(float));
    if (!copy || !mean) {
        csm_free(ctx, copy);
        csm_free(ctx, mean);
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for %" PRId64 " rows", fn, count);
    }
    memcpy(copy, rows, (size_t)(count * width) * sizeof(float));
    for (int64_t c = 0; c < width; c++) {
        double sum = 0.0;
        for (int64_t r = 0; r < count; r++)
            sum += copy[r * width + c];
        mean[c] = (float)(sum / (double)count);
    }
    csm_free(ctx, pools->rows[m]);
    csm_free(ctx, pools->mean[m]);
    pools->rows[m] = copy;
    pools->mean[m] = mean;
    pools->count[m] = count;
    return CONFSMOE_OK;
}

/* Uniform in [0, n), n >= 1, without modulo bias: draws in the incomplete top block are redrawn. */
static uint64_t stage1_uniform_below(csm_substream *stream, uint64_t n)
{
    const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t r;
    do
        r = csm_substream_u64(stream);
    while (r >= limit);
    return r % n;
}

/* Missing cells per task of the loop over them. */
#define STAGE1_CELL_GRAIN 4

/* The missing cells of modality m, each on its own: per worker, the double sums [row], the
 * picked rows [K] and the marks of Floyd's algorithm [mark_words]. */
typedef struct {
    confsmoe_ctx *ctx;
    const float *pool;
    int64_t P, K, row, first;
    int32_t M, m;
    uint64_t base;
    const int64_t *cell_b;  /* [n_missing] the sample of each missing cell */
    float *means;           /* [n_missing, row] */
    int64_t *bad;           /* [n_missing, 2] pool row and element of a non-finite mean, or -1 */
    double *acc;
    int64_t *picked;
    uint64_t *marks;
    size_t mark_words;
} stage1_task;

static void stage1_cells_task(void *arg, int64_t first, int64_t last, int worker)
{
    const stage1_task *t = arg;
    const int64_t P = t->P, K = t->K, row = t->row;
    double *acc = t->acc + (size_t)worker * (size_t)row;
    int64_t *picked = t->picked + (size_t)worker * (size_t)K;
    uint64_t *marks = t->marks + (size_t)worker * t->mark_words;
    for (int64_t cell = first; cell < last; cell++) {
        const int64_t b = t->cell_b[cell];
        if (K == P) {
            /* The pool has no more rows than draws: all of them, no randomness needed. */
            for (int64_t i = 0; i < P; i++)
                picked[i] = i;
        } else {
            /* Floyd's algorithm: K distinct rows, each K-subset equally likely, K draws. */
            csm_substream stream = csm_rng_substream(t->ctx, t->base, (uint64_t)((t->first + b) * t->M + t->m));
            int64_t n = 0;
            for (int64_t j = P - K; j < P; j++) {
                int64_t r = (int64_t)stage1_uniform_below(&stream, (uint64_t)j + 1);
                if (marks[r / 64] >> (r % 64) & 1)
                    r = j;
                marks[r / 64] |= UINT64_C(1) << (r % 64);
                picked[n++] = r;
            }
            for (int64_t i = 0; i < K; i++)
                marks[picked[i] / 64] = 0;
        }
        memset(acc, 0, (size_t)row * sizeof *acc);
        for (int64_t i = 0; i < K; i++) {
            const float *r = t->pool + picked[i] * row;
            for (int64_t c = 0; c < row; c++)
                acc[c] += r[c];
        }
        float *dst = t->means + cell * row;
        int64_t *bad = t->bad + 2 * cell;
        bad[0] = bad[1] = -1;
        for (int64_t c = 0; c < row; c++) {
            /* The sum of finite floats is finite in double: a non-finite mean means a drawn row has NaN/Inf.
             * Only drawn rows are checked, so a large pool is not scanned on every call. */
            if (t->ctx->check_finite && !isfinite(acc[c])) {
                bad[0] = picked[0];
                bad[1] = c;
                for (int64_t i = 0; i < K; i++)
                    if (!isfinite(t->pool[picked[i] * row + c]))
                        bad[0] = picked[i];
                break;
            }
            dst[c] = (float)(acc[c] / (double)K);
        }
    }
}

confsmoe_status csm_stage1_fill_draws(confsmoe_ctx *ctx, const char *fn, const float *pool, int64_t pool_rows,
                                      int32_t draws, const uint8_t *avail, int64_t B, int32_t M, int32_t m,
                                      int64_t row, float *x, uint64_t base, int64_t first)
{
    const int64_t P = pool_rows;
    int64_t n_missing = 0;
    for (int64_t b = 0; b < B; b++)
        n_missing += !avail[b * M + m];
    if (n_missing == 0 || row == 0)
        return CONFSMOE_OK;

    /* All means are computed before x changes, so that a NaN in the pool leaves x untouched. */
    const int64_t K = draws < P ? draws : P;
    const int workers = csm_parallel_workers(ctx, n_missing);
    stage1_task t = {ctx, pool, P, K, row, first, M, m, base, .mark_words = ((size_t)P + 63) / 64};
    int64_t *cell_b = NULL;
    char *block = NULL;
    size_t bytes;
    csm_layout l = csm_layout_measure();
    for (int pass = 0; pass < 2; pass++) {
        t.cell_b = cell_b = CSM_LAYOUT_ARRAY(&l, int64_t, (size_t)n_missing);
        t.means = CSM_LAYOUT_ROWS(&l, float, (size_t)n_missing, (size_t)row);
        t.bad = CSM_LAYOUT_ROWS(&l, int64_t, (size_t)n_missing, 2);
        t.acc = CSM_LAYOUT_ROWS(&l, double, (size_t)workers, (size_t)row);
        t.picked = CSM_LAYOUT_ROWS(&l, int64_t, (size_t)workers, (size_t)K);
        t.marks = CSM_LAYOUT_ROWS(&l, uint64_t, (size_t)workers, t.mark_words);
        if (pass == 0 && (!csm_layout_size(&l, &bytes) || !(block = csm_alloc(ctx, bytes))))
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for %" PRId64 " missing rows of %" PRId64, fn,
                            n_missing, row);
        csm_layout_place(&l, block);
    }
    memset(t.marks, 0, (size_t)workers * t.mark_words * sizeof *t.marks);
    int64_t cell = 0;
    for (int64_t b = 0; b < B; b++)
        if (!avail[b * M + m])
            cell_b[cell++] = b;

    csm_parallel_for(ctx, n_missing, STAGE1_CELL_GRAIN, stage1_cells_task, &t);
    for (cell = 0; cell < n_missing; cell++)
        if (t.bad[2 * cell] >= 0) {
            const int64_t bad_row = t.bad[2 * cell], bad_element = t.bad[2 * cell + 1];
            csm_free(ctx, block);
            return csm_fail(ctx, CONFSMOE_E_NUMERIC,
                            "%s: pool row %" PRId64 " has a NaN or Inf at element %" PRId64
                            " (finite checks are on)",
                            fn, bad_row, bad_element);
        }
    for (cell = 0; cell < n_missing; cell++)
        memcpy(x + cell_b[cell] * row, t.means + cell * row, (size_t)row * sizeof(float));
    csm_free(ctx, block);
    return CONFSMOE_OK;
}

confsmoe_status csm_stage1_fill_inputs(confsmoe_ctx *ctx, const csm_pools *pools, const confsmoe_tensor *const *inputs,
                                       const uint8_t *avail, int64_t B, bool by_draws, int32_t draws, uint64_t base,
                                       int64_t first, float *const *x)
{
    const int32_t M = pools->n_modalities;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        const int64_t width = B > 0 ? inputs[m]->numel / B : 0;  /* S F_m */
        csm_pass_copy_blocks(ctx, x[m], width, inputs[m]->data, width, B, width);
        bool missing = false;
        for (int64_t b = 0; b < B; b++)
            missing = missing || !avail[b * M + m];
        if (!missing)
            continue;
        if (!by_draws) {
            for (int64_t b = 0; b < B; b++)
                if (!avail[b * M + m])
                    memcpy(x[m] + b * width, pools->mean[m], (size_t)width * sizeof(float));
            continue;
        }
        s = csm_stage1_fill_draws(ctx, "stage1_fill", pools->rows[m], pools->count[m], draws, avail, B, M, m, width,
                                  x[m], base, first);
    }
    return s;
}
