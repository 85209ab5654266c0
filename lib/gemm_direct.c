/* Direct products (kernels.h, csm_gemm_direct): register-blocked AVX-512 and AVX2 kernels that
 * read the operands where they are, for products too small or too narrow for BLIS's packing to
 * pay (the model's per-(sample, head) attention, L x L x d/heads and L x d/heads x L; the
 * router's and the target classifier's E or C columns; gemm.c decides which). */
#include "kernels.h"

/* B^T's largest packed size (floats, per thread). */
#define DIRECT_PACK_FLOATS 16384

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* op(B) packed as rows: the NT case reads B^T[p, j] = B[j, p] from here. */
static _Thread_local float direct_pack[DIRECT_PACK_FLOATS];

/* One kernel for every case: X(i, p) = x[i xr + p xc] (op(A): xr = lda, xc = 1, or transposed
 * xr = 1, xc = lda) times Y(p, j) = y[p ldy + j]; each C element sums over p in order with
 * fused multiply-adds, so both ISAs give the same values. */

/* The store of one accumulated vector: C = alpha acc, or beta C + alpha acc (with beta 0, C is
 * not read: BLIS's rule). */
#define DIRECT_STORE(vec_t, acc, cp, mask, SET1, LOAD, STORE, MUL, FMA)                                                \
    do {                                                                                                               \
        const vec_t va = SET1(alpha);                                                                                  \
        if (beta == 0.0f)                                                                                              \
            STORE(cp, mask, MUL(va, acc));                                                                             \
        else                                                                                                           \
            STORE(cp, mask, FMA(SET1(beta), LOAD(cp, mask), MUL(va, acc)));                                           \
    } while (0)

/* A block of 6 rows x 2 vectors or 12 rows x 1 vector of C, held in registers for the whole of
 * k: each row's broadcast feeds 2 or 1 fused multiply-adds. mr <= the block's rows. */
#define DIRECT_BLOCKS(suffix, target_, vec_t, mask_t, W, SET1, ZERO, LOAD, STORE, FMA, MUL)                            \
    __attribute__((target(target_), always_inline)) static inline void direct_block2_##suffix(                         \
        int mr, int64_t k, float alpha, const float *x, int64_t xr, int64_t xc, const float *y, int64_t ldy,           \
        mask_t m0, mask_t m1, float beta, float *c, int64_t ldc)                                                       \
    {                                                                                                                  \
        vec_t acc0[6], acc1[6];                                                                                        \
        _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) acc0[r] = acc1[r] = ZERO();                                \
        for (int64_t p = 0; p < k; p++) {                                                                              \
            const vec_t y0 = LOAD(y + p * ldy, m0), y1 = LOAD(y + p * ldy + W, m1);                                    \
            _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) if (r < mr)                                            \
            {                                                                                                          \
                const vec_t a = SET1(x[r * xr + p * xc]);                                                              \
                acc0[r] = FMA(a, y0, acc0[r]);                                                                         \
                acc1[r] = FMA(a, y1, acc1[r]);                                                                         \
            }                                                                                                          \
        }                                                                                                              \
        _Pragma("GCC unroll 6") for (int r = 0; r < 6; r++) if (r < mr)                                                \
        {                                                                                                              \
            DIRECT_STORE(vec_t, acc0[r], c + r * ldc, m0, SET1, LOAD, STORE, MUL, FMA);                                \
            DIRECT_STORE(vec_t, acc1[r], c + r * ldc + W, m1, SET1, LOAD, STORE, MUL, FMA);                            \
        }                                                                                                              \
    }                                                                                                                  \
    __attribute__((target(target_), always_inline)) static inline void direct_block1_##suffix(                         \
        int mr, int64_t k, float alpha, const float *x, int64_t xr, int64_t xc, const float *y, int64_t ldy,           \
        mask_t m0, mask_t m1, float beta, float *c, int64_t ldc)                                                       \
    {                                                                                                                  \
        (void)m1;                                                                                                      \
        vec_t acc[12];                                                                                                 \
        _Pragma("GCC unroll 12") for (int r = 0; r < 12; r++) acc[r] = ZERO();                                         \
        for (int64_t p = 0; p < k; p++) {                                                                              \
            const vec_t y0 = LOAD(y + p * ldy, m0);                                                                    \
            _Pragma("GCC unroll 12") for (int r = 0; r < 12; r++) if (r < mr) acc[r] =                                 \
                FMA(SET1(x[r * xr + p * xc]), y0, acc[r]);                                                             \
        }                                                                                                              \
        _Pragma("GCC unroll 12") for (int r = 0; r < 12; r++) if (r < mr)                                              \
            DIRECT_STORE(vec_t, acc[r], c + r * ldc, m0, SET1, LOAD, STORE, MUL, FMA);                                 \
    }

/* Rows 0 .. m - 1 of a column block, in blocks of MR rows and a last one. A function of its own:
 * with both shapes inlined into one caller the 6 x 32 loop ran 12% slower. */
#define DIRECT_ROWS(name, target_, block, mask_t, MR)                                                                  \
    __attribute__((target(target_), noinline)) static void name(                                                       \
        int64_t m, int64_t k, float alpha, const float *x, int64_t xr, int64_t xc, const float *y, int64_t ldy,        \
        mask_t m0, mask_t m1, float beta, float *c, int64_t ldc)                                                       \
    {                                                                                                                  \
        int64_t i = 0;                                                                                                 \
        for (; i + MR <= m; i += MR)                                                                                   \
            block(MR, k, alpha, x + i * xr, xr, xc, y, ldy, m0, m1, beta, c + i * ldc, ldc);                           \
        if (i < m)                                                                                                     \
            block((int)(m - i), k, alpha, x + i * xr, xr, xc, y, ldy, m0, m1, beta, c + i * ldc, ldc);                 \
    }

/* ------------------------------------------------------------------ AVX-512: 6 x 32 and 12 x 16 blocks */
#define LOAD512(p, m) _mm512_maskz_loadu_ps(m, p)
#define STORE512(p, m, v) _mm512_mask_storeu_ps(p, m, v)
DIRECT_BLOCKS(avx512, "avx512f,fma", __m512, __mmask16, 16, _mm512_set1_ps, _mm512_setzero_ps, LOAD512, STORE512,
              _mm512_fmadd_ps, _mm512_mul_ps)
DIRECT_ROWS(direct_rows2_avx512, "avx512f,fma", direct_block2_avx512, __mmask16, 6)
DIRECT_ROWS(direct_rows1_avx512, "avx512f,fma", direct_block1_avx512, __mmask16, 12)

__attribute__((target("avx512f,fma"))) static void direct_avx512(int64_t m, int64_t n, int64_t k, float alpha,
                                                                  const float *x, int64_t xr, int64_t xc,
                                                                  const float *y, int64_t ldy, float beta, float *c,
                                                                  int64_t ldc)
{
    for (int64_t j = 0; j < n; j += 32) {
        const int64_t nj = n - j < 32 ? n - j : 32;
        const __mmask16 m0 = (__mmask16)(nj >= 16 ? 0xFFFF : (1u << nj) - 1);
        const __mmask16 m1 = (__mmask16)(nj >= 32 ? 0xFFFF : nj > 16 ? (1u << (nj - 16)) - 1 : 0);
        if (nj > 16)
            direct_rows2_avx512(m, k, alpha, x, xr, xc, y + j, ldy, m0, m1, beta, c + j, ldc);
        else
            direct_rows1_avx512(m, k, alpha, x, xr, xc, y + j, ldy, m0, m1, beta, c + j, ldc);
    }
}

/* ------------------------------------------------------------------ AVX2: 6 x 16 and 12 x 8 blocks */
#define LOAD256(p, m) _mm256_maskload_ps(p, m)
#define STORE256(p, m, v) _mm256_maskstore_ps(p, m, v)
DIRECT_BLOCKS(avx2, "avx2,fma", __m256, __m256i, 8, _mm256_set1_ps, _mm256_setzero_ps, LOAD256, STORE256,
              _mm256_fmadd_ps, _mm256_mul_ps)
DIRECT_ROWS(direct_rows2_avx2, "avx2,fma", direct_block2_avx2, __m256i, 6)
DIRECT_ROWS(direct_rows1_avx2, "avx2,fma", direct_block1_avx2, __m256i, 12)

/* The lanes below n of an 8-lane mask (all set for n >= 8). */
__attribute__((target("avx2"))) static inline __m256i direct_mask256(int64_t n)
{
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? n : 8)), lane);
}

__attribute__((target("avx2,fma"))) static void direct_avx2(int64_t m, int64_t n, int64_t k, float alpha,
                                                             const float *x, int64_t xr, int64_t xc, const float *y,
                                                             int64_t ldy, float beta, float *c, int64_t ldc)
{
    for (int64_t j = 0; j < n; j += 16) {
        const int64_t nj = n - j < 16 ? n - j : 16;
        const __m256i m0 = direct_mask256(nj), m1 = direct_mask256(nj - 8);
        if (nj > 8)
            direct_rows2_avx2(m, k, alpha, x, xr, xc, y + j, ldy, m0, m1, beta, c + j, ldc);
        else
            direct_rows1_avx2(m, k, alpha, x, xr, xc, y + j, ldy, m0, m1, beta, c + j, ldc);
    }
}

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

bool csm_gemm_direct_fits(bool trans_b, int64_t n, int64_t k)
{
    return csm_gemm_direct_best() != CSM_DIRECT_NONE && (!trans_b || k * n <= DIRECT_PACK_FLOATS);
}

bool csm_gemm_direct(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                     int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    return csm_gemm_direct_on(csm_gemm_direct_best(), trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
