/* LayerNorm over the last dimension, as torch.nn.LayerNorm (biased variance). */
#include <math.h>

#include "kernels.h"

/* Sums in double over CSM_CHUNK independent lanes (so that they vectorise), then the tail
 * and the lanes. A row of equal values sums exactly: its variance is exactly zero. */
static inline __attribute__((always_inline)) void row_mean_rstd(const float *restrict xr, int64_t cols, float eps, float *mean, float *rstd)
{
    double lanes[CSM_CHUNK] = {0.0}, sum = 0.0;
    int64_t c = 0;
    for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            lanes[l] += xr[c + l];
    for (; c < cols; c++)
        sum += xr[c];
    for (int l = 0; l < CSM_CHUNK; l++)
        sum += lanes[l];
    const double mu = sum / (double)cols;
    double vl[CSM_CHUNK] = {0.0}, var = 0.0;
    c = 0;
    for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++) {
            double v = (double)xr[c + l] - mu;
            vl[l] += v * v;
        }
    for (; c < cols; c++)
        var += ((double)xr[c] - mu) * ((double)xr[c] - mu);
    for (int l = 0; l < CSM_CHUNK; l++)
        var += vl[l];
    *mean = (float)mu;
    *rstd = (float)(1.0 / sqrt(var / (double)cols + eps));
}

CSM_SIMD_CLONES
void csm_row_stats(const float *restrict x, float *restrict mean, float *restrict rstd, int64_t rows, int64_t cols,
                   float eps)
{
    for (int64_t r = 0; r < rows; r++)
        row_mean_rstd(x + r * cols, cols, eps, &mean[r], &rstd[r]);
}

CSM_SIMD_CLONES
void csm_layernorm_forward(const float *restrict x, const float *restrict gamma, const float *restrict beta,
                           float *restrict out, float *restrict mean, float *restrict rstd, int64_t rows, int64_t cols,
                           float eps)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float m, rs;
        row_mean_rstd(xr, cols, eps, &m, &rs);
        float *o = out + r * cols;
        int64_t c = 0;
        for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
            for (int l = 0; l < CSM_CHUNK; l++)
                o[c + l] = (xr[c + l] - m) * rs * gamma[c + l] + beta[c + l];
        for (; c < cols; c++)
            o[c] = (xr[c] - m) * rs * gamma[c] + beta[c];
        mean[r] = m;
        rstd[r] = rs;
    }
}

/* One row of backward: dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dout
 * gamma, written or added; with params, dgamma and dbeta accumulate this row's terms. */
static inline __attribute__((always_inline)) void layernorm_backward_row(const float *restrict xr, float m, float rs,
                                                                         const float *restrict gamma, const float *g,
                                                                         float *dxr, float *restrict dgamma,
                                                                         float *restrict dbeta, int64_t cols,
                                                                         bool accumulate, bool params)
{
    double l1[CSM_CHUNK] = {0.0}, l2[CSM_CHUNK] = {0.0}, sum_dxhat = 0.0, sum_dxhat_xhat = 0.0;
    int64_t c = 0;
    for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++) {
            float xhat = (xr[c + l] - m) * rs, gv = g[c + l];
            float dxhat = gv * gamma[c + l];
            l1[l] += dxhat;
            l2[l] += (double)dxhat * xhat;
            if (params) {
                dgamma[c + l] += gv * xhat;
                dbeta[c + l] += gv;
            }
        }
    for (; c < cols; c++) {
        float xhat = (xr[c] - m) * rs, gv = g[c];
        float dxhat = gv * gamma[c];
        sum_dxhat += dxhat;
        sum_dxhat_xhat += (double)dxhat * xhat;
        if (params) {
            dgamma[c] += gv * xhat;
            dbeta[c] += gv;
        }
    }
    for (int l = 0; l < CSM_CHUNK; l++) {
        sum_dxhat += l1[l];
        sum_dxhat_xhat += l2[l];
    }
    const float a = (float)(sum_dxhat / (double)cols), b = (float)(sum_dxhat_xhat / (double)cols);
    c = 0;
    for (; c + CSM_CHUNK <= cols; c += CSM_CHUNK) {
        float v[CSM_CHUNK];
        for (int l = 0; l < CSM_CHUNK; l++) {
            float xhat = (xr[c + l] - m) * rs;
            v[l] = rs * (g[c + l] * gamma[c + l] - a - xhat * b);
        }
        for (int l = 0; l < CSM_CHUNK; l++)
            dxr[c + l] = accumulate ? dxr[c + l] + v[l] : v[l];
    }
    for (; c < cols; c++) {
        float xhat = (xr[c] - m) * rs;
        const float v = rs * (g[c] * gamma[c] - a - xhat * b);
        dxr[c] = accumulate ? dxr[c] + v : v;
    }
}

/* dx may alias dout (then accumulate must be false). */
CSM_SIMD_CLONES
void csm_layernorm_backward(const float *restrict x, const float *restrict mean, const float *restrict rstd,
                            const float *restrict gamma, const float *dout, float *dx, float *restrict dgamma,
                            float *restrict dbeta, int64_t rows, int64_t cols, bool accumulate)
{
    for (int64_t r = 0; r < rows; r++) {
        if (!dgamma)
            layernorm_backward_row(x + r * cols, mean[r], rstd[r], gamma, dout + r * cols, dx + r * cols, NULL, NULL,
                                   cols, accumulate, false);
        else if (accumulate)
            layernorm_backward_row(x + r * cols, mean[r], rstd[r], gamma, dout + r * cols, dx + r * cols, dgamma, dbeta,
                                   cols, true, true);
        else
            layernorm_backward_row(x + r * cols, mean[r], rstd[r], gamma, dout + r * cols, dx + r * cols, dgamma, dbeta,
                                   cols, false, true);
    }
}
