/* Private compute kernels. Arguments are validated by the callers: these never fail. */
#ifndef CONFSMOE_KERNELS_H
#define CONFSMOE_KERNELS_H

#include <stdbool.h>
#include <math.h>
#include <stdint.h>

/* Row-major C[m,n] = alpha * op(A) op(B) + beta * C through BLIS.
 * op(A) is [m,k]: A is stored [m,k] (lda = k), or [k,m] (lda = m) when trans_a.
 * op(B) is [k,n]: B is stored [k,n] (ldb = n), or [n,k] (ldb = k) when trans_b. */
void csm_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              const float *b, float beta, float *c);
/* The same with leading dimensions (row strides) of the stored matrices. */
void csm_gemm_ld(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                 int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

/* Each row of out[rows, cols] = bias[cols]. */
void csm_broadcast_rows(float *out, const float *bias, int64_t rows, int64_t cols);
/* acc[cols] += column sums of x[rows, cols]. */
void csm_add_column_sums(float *acc, const float *x, int64_t rows, int64_t cols);

/* Exact GELU, 0.5 a (1 + erf(a / sqrt 2)). */
void csm_gelu_forward(const float *a, float *out, int64_t n);
/* da = dout * GELU'(a). */
void csm_gelu_backward(const float *a, const float *dout, float *da, int64_t n);

#endif /* CONFSMOE_KERNELS_H */

/* LayerNorm over rows of x[rows, cols] with eps; keeps mean and 1/std per row for backward. */
void csm_layernorm_forward(const float *x, const float *gamma, const float *beta, float *out, float *mean,
                           float *rstd, int64_t rows, int64_t cols, float eps);
/* dx = LN'(x) dout (written, or added when accumulate); dgamma, dbeta accumulate. */
void csm_layernorm_backward(const float *x, const float *mean, const float *rstd, const float *gamma,
                            const float *dout, float *dx, float *dgamma, float *dbeta, int64_t rows, int64_t cols,
                            bool accumulate);

/* In place softmax of each row of x[rows, cols]. */
void csm_softmax_rows(float *x, int64_t rows, int64_t cols);
/* Given p = softmax(u) and dp, writes du = p * (dp - <p, dp>) for one row of n. */
void csm_softmax_backward_row(const float *p, const float *dp, float *du, int64_t n);

static inline float csm_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
/* log(1 + e^v) without overflow. */
static inline float csm_softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
