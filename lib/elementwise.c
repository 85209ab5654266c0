/* Elementwise and reduction kernels that sit between the GEMMs. */
#include <math.h>
#include <string.h>

#include "kernels.h"

void csm_broadcast_rows(float *out, const float *bias, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++)
        memcpy(out + r * cols, bias, (size_t)cols * sizeof *bias);
}

CSM_SIMD_CLONES
void csm_add_column_sums(float *restrict acc, const float *restrict x, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                acc[c + l] += row[c + l];
        for (; c < cols; c++)
            acc[c] += row[c];
    }
}

CSM_SIMD_CLONES
void csm_add_rows(float *restrict x, const float *restrict bias, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                row[c + l] += bias[c + l];
        for (; c < cols; c++)
            row[c] += bias[c];
    }
}

/* ------------------------------------------------------------------ exp and Phi
 *
 * Branch-free float versions that the compiler can vectorise (libm's erff and expf are
 * calls it cannot). Both are accurate to about 2 ulp (checked against double erfc/exp).
 *
 * Selections are made with integer masks: a float select after computing both sides
 * would be turned back into a branch (with trapping math the compiler may not speculate
 * the arithmetic of either side), which stops vectorisation. */
static inline float select_bits(uint32_t mask, float if_set, float if_clear)
{
    uint32_t x, y;
    memcpy(&x, &if_set, sizeof x);
    memcpy(&y, &if_clear, sizeof y);
    const uint32_t r = (x & mask) | (y & ~mask);
    float out;
    memcpy(&out, &r, sizeof out);
    return out;
}

/* Polynomial steps as fused multiply-adds: one rounding instead of two, and one instruction in
 * the AVX2 and AVX-512 versions (fmaf is exact, so every version still computes the same
 * values). A build without those versions, for a target without FMA, would call the C
 * library per element: plain arithmetic there. */
#if defined(CSM_HAVE_SIMD_CLONES) || defined(__FMA__) || defined(__aarch64__)
#define POLY_STEP(p, x, c) fmaf(p, x, c)
#else
#define POLY_STEP(p, x, c) ((p) * (x) + (c))
#endif

/* exp: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, ln2 split in two so n ln2_hi is
 * exact), e^r by its degree-7 Taylor polynomial (error < 5e-9 relative), 2^n built in the
 * exponent bits. x is clamped to [-87, 88] (e^-87 is just above FLT_MIN); NaN stays NaN. */
static inline float exp_approx(float x)
{
    x = select_bits(-(uint32_t)(x < -87.0f), -87.0f, x);
    x = select_bits(-(uint32_t)(x > 88.0f), 88.0f, x);
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float z = x * 1.44269504088896341f + shifter;
    float n = z - shifter;
    float r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = POLY_STEP(p, r, 1.0f / 720.0f);
    p = POLY_STEP(p, r, 1.0f / 120.0f);
    p = POLY_STEP(p, r, 1.0f / 24.0f);
    p = POLY_STEP(p, r, 1.0f / 6.0f);
    p = POLY_STEP(p, r, 0.5f);
    p = POLY_STEP(p, r, 1.0f);
    p = POLY_STEP(p, r, 1.0f);
    /* Unsigned: for a NaN x (check_finite off) z's bits are arbitrary, and the signed form of
     * this overflowed (undefined behaviour, caught by UBSan); p is NaN then anyway. */
    uint32_t zi;
    memcpy(&zi, &z, sizeof zi);
    uint32_t bits = (zi - 0x4B400000u + 127u) << 23; /* z's low mantissa bits hold n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Phi(-t) / exp(-t^2/2) for t >= 0 as s P(s), s = 1 / (1 + 0.235 t): a fit of relative
 * error 2e-9 over t in [0, 14] (beyond, exp(-t^2/2) is below FLT_MIN). */
static inline float phi_tail_ratio(float t)
{
    float s = 1.0f / (1.0f + 0.235f * t);
    float p = 0.028065271186112253f;
    p = POLY_STEP(p, s, -0.14880747190176433f);
    p = POLY_STEP(p, s, 0.27679731282827474f);
    p = POLY_STEP(p, s, -0.23190489539408793f);
    p = POLY_STEP(p, s, 0.21093708561441554f);
    p = POLY_STEP(p, s, -0.005488086143086697f);
    p = POLY_STEP(p, s, 0.09738100940848701f);
    p = POLY_STEP(p, s, 0.08518734533976123f);
    p = POLY_STEP(p, s, 0.09409638788238034f);
    p = POLY_STEP(p, s, 0.09373604011550343f);
    return p * s;
}

#define INV_SQRT_2PI 0.39894228040143267794f

/* Phi(a) and phi(a) = exp(-a^2/2) / sqrt(2 pi). For a < 0, Phi(a) = e R(|a|) has no
 * cancellation (unlike 0.5 (1 + erf(a / sqrt 2))). */
static inline void phi_both(float a, float *cdf, float *pdf)
{
    float e = exp_approx(-0.5f * a * a);
    float tail = e * phi_tail_ratio(fabsf(a)), upper = 1.0f - tail;
    *cdf = select_bits(-(uint32_t)(a >= 0.0f), upper, tail);
    *pdf = INV_SQRT_2PI * e;
}

CSM_SIMD_CLONES
static void bias_gelu_grad(float *restrict buf, const float *restrict bias, float *restrict act, int64_t rows,
                           int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        float *b = buf + r * cols, *o = act + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++) {
                float cdf, pdf, v = b[c + l] + bias[c + l];
                phi_both(v, &cdf, &pdf);
                o[c + l] = v * cdf;
                b[c + l] = cdf + v * pdf;
            }
        for (; c < cols; c++) {
            float cdf, pdf, v = b[c] + bias[c];
            phi_both(v, &cdf, &pdf);
            o[c] = v * cdf;
            b[c] = cdf + v * pdf;
        }
    }
}

CSM_SIMD_CLONES
static void bias_gelu_inplace(float *restrict buf, const float *restrict bias, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        float *b = buf + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++) {
                float cdf, pdf, v = b[c + l] + bias[c + l];
                phi_both(v, &cdf, &pdf);
                b[c + l] = v * cdf;
            }
        for (; c < cols; c++) {
            float cdf, pdf, v = b[c] + bias[c];
            phi_both(v, &cdf, &pdf);
            b[c] = v * cdf;
        }
    }
}

void csm_bias_gelu(float *buf, const float *bias, float *act, int64_t rows, int64_t cols, bool keep_grad)
{
    if (keep_grad)
        bias_gelu_grad(buf, bias, act, rows, cols);
    else {
        bias_gelu_inplace(buf, bias, rows, cols);
        if (act != buf)
            memcpy(act, buf, (size_t)(rows * cols) * sizeof *act);
    }
}

CSM_SIMD_CLONES
void csm_mul_colsum(float *restrict d, const float *restrict g, float *restrict acc, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        float *dr = d + r * cols;
        const float *gr = g + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++) {
                float v = dr[c + l] * gr[c + l];
                dr[c + l] = v;
                acc[c + l] += v;
            }
        for (; c < cols; c++) {
            float v = dr[c] * gr[c];
            dr[c] = v;
            acc[c] += v;
        }
    }
}

/* ------------------------------------------------------------------ softmax */

CSM_SIMD_CLONES
void csm_softmax_rows(float *restrict x, int64_t rows, int64_t cols)
{
    if (cols < CSM_CHUNK) {
        /* Short rows (a router's k kept logits, a classifier's C): the exponentials run in
         * lanes over the whole array, between per-row passes for the maximum and the sum. */
        for (int64_t r = 0; r < rows; r++) {
            float *row = x + r * cols, top = row[0];
            for (int64_t c = 1; c < cols; c++)
                top = row[c] > top ? row[c] : top;
            for (int64_t c = 0; c < cols; c++)
                row[c] -= top;
        }
        const int64_t n = rows * cols;
        int64_t i = 0;
        for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                x[i + l] = exp_approx(x[i + l]);
        for (; i < n; i++)
            x[i] = exp_approx(x[i]);
        for (int64_t r = 0; r < rows; r++) {
            float *row = x + r * cols;
            double sum = 0.0;
            for (int64_t c = 0; c < cols; c++)
                sum += row[c];
            float inv = (float)(1.0 / sum);
            for (int64_t c = 0; c < cols; c++)
                row[c] *= inv;
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols;
        /* The maximum over lanes (an exact operation, so any order gives the same value). */
        float tops[CSM_CHUNK], top = row[0];
        for (int l = 0; l < CSM_CHUNK; l++)
            tops[l] = row[l];
        int64_t c = CSM_CHUNK;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                tops[l] = row[c + l] > tops[l] ? row[c + l] : tops[l];
        for (; c < cols; c++)
            top = row[c] > top ? row[c] : top;
        for (int l = 0; l < CSM_CHUNK; l++)
            top = tops[l] > top ? tops[l] : top;
        float lanes[CSM_CHUNK] = {0.0f};
        c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++) {
                float v = exp_approx(row[c + l] - top);
                row[c + l] = v;
                lanes[l] += v;
            }
        const int64_t rem = cols - c;
        if (rem > 0) {
            /* The tail as one more chunk, padded and masked, so that its exponentials run in
             * the vector lanes too (a scalar tail made a 150-column row cost 1.5x a 160-column one). */
            float tail[CSM_CHUNK];
            for (int l = 0; l < CSM_CHUNK; l++)
                tail[l] = l < rem ? row[c + l] : top;
            for (int l = 0; l < CSM_CHUNK; l++) {
                const float v = select_bits(-(uint32_t)(l < rem), exp_approx(tail[l] - top), 0.0f);
                tail[l] = v;
                lanes[l] += v;
            }
            memcpy(row + c, tail, (size_t)rem * sizeof *row);
        }
        double sum = 0.0;
        for (int l = 0; l < CSM_CHUNK; l++)
            sum += lanes[l];
        float inv = (float)(1.0 / sum);
        c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                row[c + l] *= inv;
        for (; c < cols; c++)
            row[c] *= inv;
    }
}

void csm_softmax_backward_row(const float *p, const float *dp, float *du, int64_t n)
{
    float dot = (float)csm_dot(p, dp, n);
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            du[i + l] = p[i + l] * (dp[i + l] - dot);
    for (; i < n; i++)
        du[i] = p[i] * (dp[i] - dot);
}

/* ------------------------------------------------------------------ vectors */

CSM_SIMD_CLONES
double csm_dot(const float *restrict a, const float *restrict b, int64_t n)
{
    double lanes[CSM_CHUNK] = {0.0}, sum = 0.0;
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            lanes[l] += (double)a[i + l] * b[i + l];
    for (; i < n; i++)
        sum += (double)a[i] * b[i];
    for (int l = 0; l < CSM_CHUNK; l++)
        sum += lanes[l];
    return sum;
}

CSM_SIMD_CLONES
void csm_axpy(float *restrict y, float alpha, const float *restrict x, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] += alpha * x[i + l];
    for (; i < n; i++)
        y[i] += alpha * x[i];
}

CSM_SIMD_CLONES
void csm_scale_copy(float *restrict y, float alpha, const float *restrict x, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] = alpha * x[i + l];
    for (; i < n; i++)
        y[i] = alpha * x[i];
}

CSM_SIMD_CLONES
void csm_add(float *restrict y, const float *restrict a, const float *restrict b, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] = a[i + l] + b[i + l];
    for (; i < n; i++)
        y[i] = a[i] + b[i];
}

/* ------------------------------------------------------------------ dropout */

CSM_SIMD_CLONES
void csm_mask_scale(float *restrict y, const float *restrict x, const uint8_t *restrict keep, float scale, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] = x[i + l] * ((float)keep[i + l] * scale);
    for (; i < n; i++)
        y[i] = x[i] * ((float)keep[i] * scale);
}

CSM_SIMD_CLONES
void csm_mask_scale_inplace(float *restrict y, const uint8_t *restrict keep, float scale, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] *= (float)keep[i + l] * scale;
    for (; i < n; i++)
        y[i] *= (float)keep[i] * scale;
}

CSM_SIMD_CLONES
void csm_add_masked(float *restrict y, const float *restrict base, const float *restrict x,
                    const uint8_t *restrict keep, float scale, int64_t n)
{
    int64_t i = 0;
    for (; i + CSM_CHUNK <= n; i += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            y[i + l] = base[i + l] + x[i + l] * ((float)keep[i + l] * scale);
    for (; i < n; i++)
        y[i] = base[i] + x[i] * ((float)keep[i] * scale);
}


CSM_SIMD_CLONES
void csm_dropout_mask(uint64_t key, uint64_t counter, float p, uint8_t *restrict keep, int64_t n)
{
    /* u = bits 2^-24 is exact, and so is p 2^24: u >= p iff bits >= ceil(p 2^24). */
    const uint32_t threshold = (uint32_t)ceilf(p * 16777216.0f);
    /* Blocks of 32 draws: with 8, GCC 12 kept the 64-bit mixing scalar (4x slower). */
    enum { DRAWS = 32 };
    int64_t i = 0;
    for (; i + 2 * DRAWS <= n; i += 2 * DRAWS) {
        /* Both halves of the block's draws, then the keeps in element order. */
        const uint64_t at = counter + (uint64_t)i / 2;
        uint8_t hi[DRAWS], lo[DRAWS];
        for (uint64_t l = 0; l < DRAWS; l++) {
            const uint64_t r = csm_stream_output(key, at + l);
            hi[l] = (uint8_t)((uint32_t)(r >> 40) >= threshold);
            lo[l] = (uint8_t)((uint32_t)(r >> 16 & 0xFFFFFF) >= threshold);
        }
        for (int l = 0; l < DRAWS; l++) {
            keep[i + 2 * l] = hi[l];
            keep[i + 2 * l + 1] = lo[l];
        }
    }
    for (; i < n; i++) {
        const uint64_t r = csm_stream_output(key, counter + (uint64_t)i / 2);
        keep[i] = (uint8_t)((uint32_t)(i % 2 ? r >> 16 & 0xFFFFFF : r >> 40) >= threshold);
    }
}
