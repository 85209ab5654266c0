/* Every matrix product of the library goes through BLIS here. */
#include <blis.h>
#include <string.h>

#include "kernels.h"
#include "threads.h"

/* Products with m n k at most this are computed here: a BLIS call costs a few microseconds
 * of framework overhead (object setup, checks, packing), which is more than the arithmetic of
 * the per-(sample, head) attention products (L x L x d/heads, e.g. 6 x 6 x 32), issued
 * thousands of times per step. Measured on the handwritten model: 30% of a training step. */
#define SMALL_GEMM_MNK 4096

/* Products below this many multiply-adds (those BLIS would run on one thread, below) go to the
 * library's own kernels (gemm_direct.c), and so do products with at most DIRECT_NARROW columns of
 * C or (with B not transposed) terms per sum, where BLIS fills 8 or 10 of its micro-kernel's 16
 * columns and packs a whole large operand for one pass: the router's and the target
 * classifier's. At these sizes BLIS's packing of both operands does not pay, and BLIS 0.9.0's
 * kernels on the Intel Xeons are AVX2 (haswell). Measured alone (docs/PERFORMANCE.md): the
 * per-head attention products (150 x 150 x 32, 150 x 32 x 150) at 78-84 GFLOP/s in BLIS and
 * 112-134 there, the classifier's 25600 x 10 x 128 at 36 and 64, the router's 12800 x 8 x 128 at
 * 29 and 53. Shape alone decides it, so results do not depend on the thread count. */
#define DIRECT_GEMM_MNK (INT64_C(2) << 20)
#define DIRECT_NARROW 16
/* A worker's least share of rows when a narrow product is split over the ctx's threads (a
 * multiple of the kernels' 6 and 12 rows). */
#define DIRECT_ROWS_PER_WORKER 480

/* Each BLIS thread gets at least this many multiply-adds (about 25 us of one core). Below it,
 * starting and joining BLIS's team costs more than the split saves: at BLIS_NUM_THREADS=2 the
 * small gate (64 x 128 x 128 expert products) took twice as long as at 1 (docs/PERFORMANCE.md). */
#define MNK_PER_BLIS_THREAD (INT64_C(1) << 20)

/* A product whose sums are at least this many times longer than C is wide or tall is split
 * over the ctx's own threads by rows (or columns) of C, each part a one-thread BLIS call: BLIS
 * 0.9.0 splits such products inside its macro-kernel and meets at a barrier every 256 terms.
 * The weight gradients (128 x 128 x 38 400 at the paper's shape) ran at 145 GFLOP/s on 2
 * threads that way and 170 split by rows (docs/PERFORMANCE.md). Each element is summed as on
 * one thread, so the bits do not change. */
#define LONG_SUM_RATIO 4
/* Parts of C in whole columns of the micro-kernels' tiles (6 or 16 wide on these CPUs). */
#define SPLIT_ALIGN 16

/* C = beta C (C = 0 when beta is 0, as BLIS does: no NaN from the old C survives). */
static void scale_c(int64_t m, int64_t n, float beta, float *c, int64_t ldc)
{
    for (int64_t i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (beta == 0.0f)
            memset(ci, 0, (size_t)n * sizeof *ci);
        else
            for (int64_t j = 0; j < n; j++)
                ci[j] *= beta;
    }
}

/* y += s x; restrict lets the compiler vectorise it (C never overlaps A or B). */
static inline void axpy_row(float *restrict y, float s, const float *restrict x, int64_t n)
{
    for (int64_t j = 0; j < n; j++)
        y[j] += s * x[j];
}

/* The same product as BLIS, with the loop order of each case chosen so that the innermost
 * loop runs along contiguous rows (axpy form) where it can. */
CSM_SIMD_CLONES
static void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                       int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    scale_c(m, n, beta, c, ldc);
    for (int64_t i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (!trans_b) {
            /* C[i,:] += alpha op(A)[i,p] B[p,:] */
            for (int64_t p = 0; p < k; p++) {
                const float s = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
                axpy_row(ci, s, b + p * ldb, n);
            }
        } else if (!trans_a) {
            /* C[i,j] += alpha A[i,:] . B[j,:], in 8 lanes so that the compiler vectorises it. */
            const float *ai = a + i * lda;
            for (int64_t j = 0; j < n; j++) {
                const float *bj = b + j * ldb;
                float lane[8] = {0};
                int64_t p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int l = 0; l < 8; l++)
                        lane[l] += ai[p + l] * bj[p + l];
                float acc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
                for (; p < k; p++)
                    acc += ai[p] * bj[p];
                ci[j] += alpha * acc;
            }
        } else {
            /* C[i,j] += alpha A[:,i] . B[j,:] */
            for (int64_t j = 0; j < n; j++) {
                const float *bj = b + j * ldb;
                float acc = 0.0f;
                for (int64_t p = 0; p < k; p++)
                    acc += a[p * lda + i] * bj[p];
                ci[j] += alpha * acc;
            }
        }
    }
}

/* A product split over the ctx's threads by rows (or columns) of C. */
typedef struct {
    bool trans_a, trans_b, by_rows;
    int64_t m, n, k;
    float alpha;
    const float *a;
    int64_t lda;
    const float *b;
    int64_t ldb;
    float beta;
    float *c;
    int64_t ldc;
} gemm_part_task;

/* Rows first .. last - 1 of a narrow product with A as stored (not transposed). */
static void gemm_direct_rows_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const gemm_part_task *t = arg;
    csm_gemm_direct(false, t->trans_b, last - first, t->n, t->k, t->alpha, t->a + first * t->lda, t->lda, t->b,
                    t->ldb, t->beta, t->c + first * t->ldc, t->ldc);
}

/* The product in BLIS on at most `useful` threads of a team of `team` (0: the host's setting
 * for BLIS: BLIS_NUM_THREADS, or -1 when the host gave per-loop ways such as BLIS_JC_NT, which
 * are kept unless the product is worth one thread only). */
static void gemm_blis(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                      int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc, int64_t team,
                      int64_t useful)
{
    /* BLIS 0.9.0's small-matrix ("sup") kernels read past the end of their operands
     * (flame/blis#635, #821: fixed upstream after 0.9.0, the Debian 12 version), which
     * can fault when a host buffer ends at a page boundary. The packed path reads in bounds. */
    rntm_t rntm;
    bli_rntm_init_from_global(&rntm);
    bli_rntm_disable_l3_sup(&rntm);
    if (team < 1)
        team = bli_rntm_num_threads(&rntm);
    if (team >= 1 || useful == 1)
        bli_rntm_set_num_threads((dim_t)(team >= 1 && team < useful ? team : useful), &rntm);
    /* BLIS takes the strides of the stored matrix and applies the transpose itself. */
    bli_sgemm_ex(trans_a ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, trans_b ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 (dim_t)m, (dim_t)n, (dim_t)k, &alpha, (float *)a, (inc_t)lda, 1, (float *)b, (inc_t)ldb, 1, &beta, c,
                 (inc_t)ldc, 1, NULL, &rntm);
}

/* Rows (or columns) first .. last - 1 of C of a long-sum product, on one BLIS thread. */
static void gemm_split_part(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const gemm_part_task *t = arg;
    if (t->by_rows)
        gemm_blis(t->trans_a, t->trans_b, last - first, t->n, t->k, t->alpha,
                  t->a + (t->trans_a ? first : first * t->lda), t->lda, t->b, t->ldb, t->beta, t->c + first * t->ldc,
                  t->ldc, 1, 1);
    else
        gemm_blis(t->trans_a, t->trans_b, t->m, last - first, t->k, t->alpha, t->a, t->lda,
                  t->b + (t->trans_b ? first * t->ldb : first), t->ldb, t->beta, t->c + first, t->ldc, 1, 1);
}

void csm_gemm_ld(confsmoe_ctx *ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (k == 0) {
        /* An empty sum: BLIS is not asked to handle it. */
        scale_c(m, n, beta, c, ldc);
        return;
    }
    if (m * n * k <= SMALL_GEMM_MNK) {
        small_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    const bool narrow = !trans_a && (n <= DIRECT_NARROW || (k <= DIRECT_NARROW && !trans_b));
    if (m * n * k >= DIRECT_GEMM_MNK && narrow && csm_gemm_direct_fits(trans_b, n, k) &&
        csm_parallel_workers(ctx, m / DIRECT_ROWS_PER_WORKER) > 1) {
        /* A product BLIS would have split over its threads: rows split over the ctx's. */
        gemm_part_task t = {false, trans_b, true, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc};
        csm_parallel_for(ctx, m, DIRECT_ROWS_PER_WORKER / 2, gemm_direct_rows_task, &t);
        return;
    }
    if ((m * n * k < DIRECT_GEMM_MNK || narrow) &&
        csm_gemm_direct(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
        return;
    int64_t useful = m * n * k / MNK_PER_BLIS_THREAD;
    if (useful < 1)
        useful = 1;
    const bool by_rows = m >= n;
    const int64_t wide = by_rows ? m : n;
    const int workers = csm_parallel_workers(ctx, useful);
    if (workers > 1 && k >= LONG_SUM_RATIO * wide) {
        const int64_t per = (wide / workers + SPLIT_ALIGN - 1) / SPLIT_ALIGN * SPLIT_ALIGN;
        if (per < wide) {
            gemm_part_task t = {trans_a, trans_b, by_rows, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc};
            csm_parallel_for(ctx, wide, per, gemm_split_part, &t);
            return;
        }
    }
    /* BLIS's team: one thread inside a worker of the library's own threads (the workers already
     * occupy the cores, threads.h); else the ctx's thread count, or, when that is 1, the host's. */
    gemm_blis(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
              csm_threads_in_worker() ? 1 : ctx->threads > 1 ? ctx->threads : 0, useful);
}

void csm_gemm(confsmoe_ctx *ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float *a, const float *b, float beta, float *c)
{
    csm_gemm_ld(ctx, trans_a, trans_b, m, n, k, alpha, a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
}
