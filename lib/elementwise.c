/* Elementwise and reduction kernels that sit between the GEMMs. */
#include <math.h>
#include <string.h>

#include "kernels.h"

void csm_broadcast_rows(float *out, const float *bias, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++)
        memcpy(out + r * cols, bias, (size_t)cols * sizeof *bias);
}

void csm_add_column_sums(float *acc, const float *x, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * cols;
        for (int64_t c = 0; c < cols; c++)
            acc[c] += row[c];
    }
}

#define INV_SQRT2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

void csm_gelu_forward(const float *a, float *out, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        out[i] = 0.5f * a[i] * (1.0f + erff(a[i] * INV_SQRT2));
}

void csm_gelu_backward(const float *a, const float *dout, float *da, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float cdf = 0.5f * (1.0f + erff(a[i] * INV_SQRT2));
        float pdf = INV_SQRT_2PI * expf(-0.5f * a[i] * a[i]);
        da[i] = dout[i] * (cdf + a[i] * pdf);
    }
}

void csm_softmax_rows(float *x, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * cols, top = row[0];
        for (int64_t c = 1; c < cols; c++)
            top = row[c] > top ? row[c] : top;
        double sum = 0.0;
        for (int64_t c = 0; c < cols; c++) {
            row[c] = expf(row[c] - top);
            sum += row[c];
        }
        float inv = (float)(1.0 / sum);
        for (int64_t c = 0; c < cols; c++)
            row[c] *= inv;
    }
}

void csm_softmax_backward_row(const float *p, const float *dp, float *du, int64_t n)
{
    double dot = 0.0;
    for (int64_t i = 0; i < n; i++)
        dot += (double)p[i] * dp[i];
    for (int64_t i = 0; i < n; i++)
        du[i] = p[i] * (dp[i] - (float)dot);
}
