/* LayerNorm over the last dimension, as torch.nn.LayerNorm (biased variance). */
#include <math.h>

#include "kernels.h"

void csm_layernorm_forward(const float *x, const float *gamma, const float *beta, float *out, float *mean,
                           float *rstd, int64_t rows, int64_t cols, float eps)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        /* Two passes in double: constant rows give exactly zero variance. */
        double sum = 0.0;
        for (int64_t c = 0; c < cols; c++)
            sum += xr[c];
        double mu = sum / (double)cols, var = 0.0;
        for (int64_t c = 0; c < cols; c++)
            var += ((double)xr[c] - mu) * ((double)xr[c] - mu);
        float m = (float)mu, rs = (float)(1.0 / sqrt(var / (double)cols + eps));
        float *o = out + r * cols;
        for (int64_t c = 0; c < cols; c++)
            o[c] = (xr[c] - m) * rs * gamma[c] + beta[c];
        mean[r] = m;
        rstd[r] = rs;
    }
}

void csm_layernorm_backward(const float *x, const float *mean, const float *rstd, const float *gamma,
                            const float *dout, float *dx, float *dgamma, float *dbeta, int64_t rows, int64_t cols,
                            bool accumulate)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols, *g = dout + r * cols;
        float m = mean[r], rs = rstd[r];
        /* dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dout gamma. */
        double sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
        for (int64_t c = 0; c < cols; c++) {
            float xhat = (xr[c] - m) * rs;
            float dxhat = g[c] * gamma[c];
            sum_dxhat += dxhat;
            sum_dxhat_xhat += (double)dxhat * xhat;
            dgamma[c] += g[c] * xhat;
            dbeta[c] += g[c];
        }
        float a = (float)(sum_dxhat / (double)cols), b = (float)(sum_dxhat_xhat / (double)cols);
        float *dxr = dx + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            float xhat = (xr[c] - m) * rs;
            float v = rs * (g[c] * gamma[c] - a - xhat * b);
            dxr[c] = accumulate ? dxr[c] + v : v;
        }
    }
}
