/* Private compute kernels. Arguments are validated by the callers: these never fail. */
#ifndef CONFSMOE_KERNELS_H
#define CONFSMOE_KERNELS_H

#include <stdbool.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "confsmoe.h"
#include "stream.h"

/* Elementwise kernels are written as loops over fixed chunks of CSM_CHUNK elements, which
 * GCC vectorises at -O2 (its "very cheap" cost model needs a trip count that is a multiple
 * of the vector length), then a scalar tail. With GCC on x86-64 Linux the hot ones are
 * also compiled for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4) and picked at load time
 * from the CPU (an ifunc); the arithmetic is the same, element for element, in every
 * version (no contraction into FMA in ISO C mode, no reassociation; the fused multiply-adds
 * that a kernel writes as fmaf are exact in every version). */
#define CSM_CHUNK 16
/* Not under ThreadSanitizer: gcc instruments the generated ifunc resolvers, which the loader
 * runs before the TSan runtime is up (a crash at load time; tests/sanitize/run tsan). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11 && \
    !defined(__SANITIZE_THREAD__)
#define CSM_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define CSM_HAVE_SIMD_CLONES 1
#else
#define CSM_SIMD_CLONES
#endif

/* Row-major C[m,n] = alpha * op(A) op(B) + beta * C through BLIS.
 * op(A) is [m,k]: A is stored [m,k] (lda = k), or [k,m] (lda = m) when trans_a.
 * op(B) is [k,n]: B is stored [k,n] (ldb = n), or [n,k] (ldb = k) when trans_b.
 * BLIS runs on up to ctx's thread count (one thread inside the library's own workers). */
void csm_gemm(confsmoe_ctx *ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float *a, const float *b, float beta, float *c);
/* The same with leading dimensions (row strides) of the stored matrices. */
void csm_gemm_ld(confsmoe_ctx *ctx, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

/* The product of csm_gemm_ld by the library's own register-blocked kernels (gemm_direct.c), on
 * one thread; false (and nothing written) when it cannot: no AVX2 + FMA on this CPU, or a
 * transposed B of more than 16384 floats. */
bool csm_gemm_direct(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);
/* Whether csm_gemm_direct runs such a product on this CPU. */
bool csm_gemm_direct_fits(bool trans_b, int64_t n, int64_t k);
/* The same with a given instruction set (tests run each one the CPU has); false for one it has not. */
typedef enum { CSM_DIRECT_NONE, CSM_DIRECT_AVX2, CSM_DIRECT_AVX512 } csm_direct_isa;
csm_direct_isa csm_gemm_direct_best(void);
bool csm_gemm_direct_on(csm_direct_isa isa, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

/* Each row of out[rows, cols] = bias[cols]. */
void csm_broadcast_rows(float *out, const float *bias, int64_t rows, int64_t cols);
/* acc[cols] += column sums of x[rows, cols]. */
void csm_add_column_sums(float *acc, const float *x, int64_t rows, int64_t cols);
/* Each row of x[rows, cols] += bias[cols]. */
void csm_add_rows(float *x, const float *bias, int64_t rows, int64_t cols);

/* One pass over buf[rows, cols] holding x W^T (no bias): with a = buf + bias (per column),
 * act = GELU(a), and buf becomes GELU'(a) when keep_grad (for backward: both from one
 * evaluation of Phi and phi); otherwise act may be buf itself (in place). */
void csm_bias_gelu(float *buf, const float *bias, float *act, int64_t rows, int64_t cols, bool keep_grad);
/* d[rows, cols] *= g[rows, cols], and acc[cols] += the column sums of the product. */
void csm_mul_colsum(float *d, const float *g, float *acc, int64_t rows, int64_t cols);

/* LayerNorm over rows of x[rows, cols] with eps; keeps mean and 1/std per row for backward. */
void csm_layernorm_forward(const float *x, const float *gamma, const float *beta, float *out, float *mean,
                           float *rstd, int64_t rows, int64_t cols, float eps);
/* dx = LN'(x) dout (written, or added when accumulate); dgamma, dbeta accumulate (unless NULL). */
void csm_layernorm_backward(const float *x, const float *mean, const float *rstd, const float *gamma,
                            const float *dout, float *dx, float *dgamma, float *dbeta, int64_t rows, int64_t cols,
                            bool accumulate);
/* Mean and 1/std of each row, as csm_layernorm_forward computes them. */
void csm_row_stats(const float *x, float *mean, float *rstd, int64_t rows, int64_t cols, float eps);

/* In place softmax of each row of x[rows, cols]. */
void csm_softmax_rows(float *x, int64_t rows, int64_t cols);
/* Given p = softmax(u) and dp, writes du = p * (dp - <p, dp>) for one row of n. */
void csm_softmax_backward_row(const float *p, const float *dp, float *du, int64_t n);

/* sum_i a[i] b[i], accumulated in double. */
double csm_dot(const float *a, const float *b, int64_t n);
/* y[i] += alpha x[i]. */
void csm_axpy(float *y, float alpha, const float *x, int64_t n);
/* y[i] = alpha x[i]. */
void csm_scale_copy(float *y, float alpha, const float *x, int64_t n);
/* y[i] = a[i] + b[i] (no overlaps). */
void csm_add(float *y, const float *a, const float *b, int64_t n);

static inline float csm_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
/* log(1 + e^v) without overflow. */
static inline float csm_softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

/* Dropout with draws keep [n] (0 or 1) and scale 1 / (1 - p): y = x keep scale;
 * the same in place; y = base + x keep scale. */
void csm_mask_scale(float *y, const float *x, const uint8_t *keep, float scale, int64_t n);
void csm_mask_scale_inplace(float *y, const uint8_t *keep, float scale, int64_t n);
void csm_add_masked(float *y, const float *base, const float *x, const uint8_t *keep, float scale, int64_t n);

/* keep[i] = 1 when a 24-bit uniform u of the stream is >= p (u = bits 2^-24, the precision of
 * csm_rng_uniform), else 0, for i < n. Each draw holds two: keep[2 j] takes bits 40..63 of draw
 * (counter + j), keep[2 j + 1] its bits 16..39; n elements take csm_dropout_draws(n) draws. */
void csm_dropout_mask(uint64_t key, uint64_t counter, float p, uint8_t *keep, int64_t n);
static inline uint64_t csm_dropout_draws(int64_t n) { return ((uint64_t)n + 1) / 2; }

#endif /* CONFSMOE_KERNELS_H */
