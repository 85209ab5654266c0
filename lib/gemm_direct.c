/* Direct products (kernels.h, csm_gemm_direct): register-blocked AVX-512 and AVX2 kernels that
 * read the operands where they are, for products too small for BLIS's packing to pay (the
 * model's per-(sample, head) attention, L x L x d/heads and L x d/heads x L). */
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* Rows of C per block, and B^T's largest packed size (floats, per thread). */
#define DIRECT_MR 6
#define DIRECT_PACK_FLOATS 16384

/* op(B) packed as rows: the NT case reads B^T[p, j] = B[j, p] from here. */
static _Thread_local float direct_pack[DIRECT_PACK_FLOATS];

/* One kernel for every case: X(i, p) = x[i xr + p xc] (op(A): xr = lda, xc = 1, or transposed
 * xr = 1, xc = lda) times Y(p, j) = y[p ldy + j]; each C element sums over p in order with
 * fused multiply-adds, so both ISAs give the same values. */
#define DIRECT_STORE(vec_t, acc, cp, mask, LOAD, STORE, MUL, FMA)                                                       \
    do {                                                                                                               \
        const vec_t va = SET1(alpha);                                                                                  \
        if (beta == 0.0f)                                                                                              \
            STORE(cp, mask, MUL(va, acc));                                                                             \
        else                                                                                                           \
            STORE(cp, mask, FMA(SET1(beta), LOAD(cp, mask), MUL(va, acc)));                                           \
    } while (0)

/* ------------------------------------------------------------------ AVX-512: 6 x 32 blocks */
#define SET1 _mm512_set1_ps
#define LOAD512(p, m) _mm512_maskz_loadu_ps(m, p)
#define STORE512(p, m, v) _mm512_mask_storeu_ps(p, m, v)

__attribute__((target("avx512f,fma"), always_inline)) static inline void
direct_block_avx512(int mr, int64_t k, float alpha, const float *x, int64_t xr, int64_t xc, const float *y,
                    int64_t ldy, __mmask16 m0, __mmask16 m1, float beta, float *c, int64_t ldc)
{
    __m512 acc[DIRECT_MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < DIRECT_MR; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k; p++) {
        const __m512 y0 = LOAD512(y + p * ldy, m0), y1 = LOAD512(y + p * ldy + 16, m1);
#pragma GCC unroll 6
        for (int r = 0; r < DIRECT_MR; r++)
            if (r < mr) {
                const __m512 a = _mm512_set1_ps(x[r * xr + p * xc]);
                acc[r][0] = _mm512_fmadd_ps(a, y0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(a, y1, acc[r][1]);
            }
    }
#pragma GCC unroll 6
    for (int r = 0; r < DIRECT_MR; r++)
        if (r < mr) {
            DIRECT_STORE(__m512, acc[r][0], c + r * ldc, m0, LOAD512, STORE512, _mm512_mul_ps, _mm512_fmadd_ps);
            if (m1)
                DIRECT_STORE(__m512, acc[r][1], c + r * ldc + 16, m1, LOAD512, STORE512, _mm512_mul_ps,
                             _mm512_fmadd_ps);
        }
}

__attribute__((target("avx512f,fma"))) static void direct_avx512(int64_t m, int64_t n, int64_t k, float alpha,
                                                                  const float *x, int64_t xr, int64_t xc,
                                                                  const float *y, int64_t ldy, float beta, float *c,
                                                                  int64_t ldc)
{
    for (int64_t j = 0; j < n; j += 32) {
        const int64_t nj = n - j < 32 ? n - j : 32;
        const __mmask16 m0 = (__mmask16)(nj >= 16 ? 0xFFFF : (1u << nj) - 1);
        const __mmask16 m1 = (__mmask16)(nj >= 32 ? 0xFFFF : nj > 16 ? (1u << (nj - 16)) - 1 : 0);
        int64_t i = 0;
        for (; i + DIRECT_MR <= m; i += DIRECT_MR)
            direct_block_avx512(DIRECT_MR, k, alpha, x + i * xr, xr, xc, y + j, ldy, m0, m1, beta, c + i * ldc + j,
                                ldc);
        if (i < m)
            direct_block_avx512((int)(m - i), k, alpha, x + i * xr, xr, xc, y + j, ldy, m0, m1, beta,
                                c + i * ldc + j, ldc);
    }
}
#undef SET1

/* ------------------------------------------------------------------ AVX2: 6 x 16 blocks */
#define SET1 _mm256_set1_ps
#define LOAD256(p, m) _mm256_maskload_ps(p, m)
#define STORE256(p, m, v) _mm256_maskstore_ps(p, m, v)

/* The lanes below n of an 8-lane mask (all set for n >= 8). */
__attribute__((target("avx2"))) static inline __m256i direct_mask256(int64_t n)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), lane);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
direct_block_avx2(int mr, int64_t k, float alpha, const float *x, int64_t xr, int64_t xc, const float *y, int64_t ldy,
                  __m256i m0, __m256i m1, bool high, float beta, float *c, int64_t ldc)
{
    __m256 acc[DIRECT_MR][2];
#pragma GCC unroll 6
    for (int r = 0; r < DIRECT_MR; r++)
        acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < k; p++) {
        const __m256 y0 = LOAD256(y + p * ldy, m0), y1 = LOAD256(y + p * ldy + 8, m1);
#pragma GCC unroll 6
        for (int r = 0; r < DIRECT_MR; r++)
            if (r < mr) {
                const __m256 a = _mm256_set1_ps(x[r * xr + p * xc]);
                acc[r][0] = _mm256_fmadd_ps(a, y0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(a, y1, acc[r][1]);
            }
    }
#pragma GCC unroll 6
    for (int r = 0; r < DIRECT_MR; r++)
        if (r < mr) {
            DIRECT_STORE(__m256, acc[r][0], c + r * ldc, m0, LOAD256, STORE256, _mm256_mul_ps, _mm256_fmadd_ps);
            if (high)
                DIRECT_STORE(__m256, acc[r][1], c + r * ldc + 8, m1, LOAD256, STORE256, _mm256_mul_ps,
                             _mm256_fmadd_ps);
        }
}

__attribute__((target("avx2,fma"))) static void direct_avx2(int64_t m, int64_t n, int64_t k, float alpha,
                                                             const float *x, int64_t xr, int64_t xc, const float *y,
                                                             int64_t ldy, float beta, float *c, int64_t ldc)
{
    for (int64_t j = 0; j < n; j += 16) {
        const int64_t nj = n - j < 16 ? n - j : 16;
        const __m256i m0 = direct_mask256(nj), m1 = direct_mask256(nj - 8);
        int64_t i = 0;
        for (; i + DIRECT_MR <= m; i += DIRECT_MR)
            direct_block_avx2(DIRECT_MR, k, alpha, x + i * xr, xr, xc, y + j, ldy, m0, m1, nj > 8, beta,
                              c + i * ldc + j, ldc);
        if (i < m)
            direct_block_avx2((int)(m - i), k, alpha, x + i * xr, xr, xc, y + j, ldy, m0, m1, nj > 8, beta,
                              c + i * ldc + j, ldc);
    }
}
#undef SET1

csm_direct_isa csm_gemm_direct_best(void)
{
    if (__builtin_cpu_supports("avx512f"))
        return CSM_DIRECT_AVX512;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? CSM_DIRECT_AVX2 : CSM_DIRECT_NONE;
}

bool csm_gemm_direct_on(csm_direct_isa isa, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    if (isa == CSM_DIRECT_NONE || isa > csm_gemm_direct_best())
        return false;
    const float *y = b;
    int64_t ldy = ldb;
    if (trans_b) {
        /* Y = B^T, packed: the kernels run along contiguous rows of Y. */
        if (k * n > DIRECT_PACK_FLOATS)
            return false;
        for (int64_t j = 0; j < n; j++)
            for (int64_t p = 0; p < k; p++)
                direct_pack[p * n + j] = b[j * ldb + p];
        y = direct_pack;
        ldy = n;
    }
    const int64_t xr = trans_a ? 1 : lda, xc = trans_a ? lda : 1;
    if (isa == CSM_DIRECT_AVX512)
        direct_avx512(m, n, k, alpha, a, xr, xc, y, ldy, beta, c, ldc);
    else
        direct_avx2(m, n, k, alpha, a, xr, xc, y, ldy, beta, c, ldc);
    return true;
}

#else
csm_direct_isa csm_gemm_direct_best(void) { return CSM_DIRECT_NONE; }

bool csm_gemm_direct_on(csm_direct_isa isa, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    (void)isa, (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b,
        (void)ldb, (void)beta, (void)c, (void)ldc;
    return false;
}
#endif

bool csm_gemm_direct(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    return csm_gemm_direct_on(csm_gemm_direct_best(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
