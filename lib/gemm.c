/* Every matrix product of the library goes through BLIS here. */
#include <blis.h>

#include "kernels.h"

void csm_gemm_ld(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                 int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (k == 0) {
        /* An empty sum: BLIS is not asked to handle it. */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++)
                c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
        return;
    }
    /* BLIS 0.9.0's small-matrix ("sup") kernels read past the end of their operands
     * (flame/blis#635, #821: fixed upstream after 0.9.0, the Debian 12 version), which
     * can fault when a host buffer ends at a page boundary. The packed path reads in bounds. */
    rntm_t rntm;
    bli_rntm_init_from_global(&rntm);
    bli_rntm_disable_l3_sup(&rntm);
    /* BLIS takes the strides of the stored matrix and applies the transpose itself. */
    bli_sgemm_ex(trans_a ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, trans_b ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 (dim_t)m, (dim_t)n, (dim_t)k, &alpha, (float *)a, (inc_t)lda, 1, (float *)b, (inc_t)ldb, 1, &beta, c,
                 (inc_t)ldc, 1, NULL, &rntm);
}

void csm_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              const float *b, float beta, float *c)
{
    csm_gemm_ld(trans_a, trans_b, m, n, k, alpha, a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
}
