/* The per-expert confidence network: LayerNorm (affine), Linear(d, 1), sigmoid
 * (docs/MODEL.md, section 4.1).
 *
 * With xhat = (y - mean) rstd, LN(y) = xhat gamma + beta and the logit is
 *   v . LN(y) + b = z + (beta . v) + b,   z = sum_c xhat_c (gamma_c v_c),
 * so forward needs one pass per row for the statistics and one for z, and never stores
 * LN(y). Backward, with dlogit = ds s (1 - s) and gv = gamma v (mean gv_bar):
 *   dxhat = dlogit gv;  dy = rstd dlogit (gv - gv_bar - xhat z / d)
 * (mean(dxhat xhat) = dlogit z / d), and over the rows, with A = sum dlogit and
 * X_c = sum dlogit xhat_c:  dv += gamma X + beta A, dgamma += v X, dbeta += v A, db += A. */
#include "confnet.h"
#include "kernels.h"

#define LN_EPS 1e-5f

/* gv [d] = gamma v; returns beta . v (in double) and writes the mean of gv. */
static double prepare(const csm_confnet *net, int64_t d, float *gv, float *gv_mean)
{
    double bv = 0.0, sum = 0.0;
    for (int64_t c = 0; c < d; c++) {
        gv[c] = net->ln_weight[c] * net->w[c];
        bv += (double)net->ln_bias[c] * net->w[c];
        sum += gv[c];
    }
    *gv_mean = (float)(sum / (double)d);
    return bv;
}

CSM_SIMD_CLONES
static float centered_dot(const float *restrict y, float m, const float *restrict gv, int64_t d)
{
    float lanes[CSM_CHUNK] = {0.0f}, sum = 0.0f;
    int64_t c = 0;
    for (; c + CSM_CHUNK <= d; c += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++)
            lanes[l] += (y[c + l] - m) * gv[c + l];
    for (; c < d; c++)
        sum += (y[c] - m) * gv[c];
    for (int l = 0; l < CSM_CHUNK; l++)
        sum += lanes[l];
    return sum;
}

void csm_confnet_forward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, float *s,
                         csm_confnet_cache *cache, float *scratch)
{
    float *gv = scratch, gv_mean;
    const float bias = (float)(prepare(net, d, gv, &gv_mean) + net->b[0]);
    csm_row_stats(y, cache->mean, cache->rstd, rows, d, LN_EPS);
    for (int64_t r = 0; r < rows; r++) {
        const float z = cache->rstd[r] * centered_dot(y + r * d, cache->mean[r], gv, d);
        cache->z[r] = z;
        s[r] = csm_sigmoid(z + bias);
    }
}

CSM_SIMD_CLONES
static void row_backward(const float *restrict y, float m, float rs, float dlogit, float zd, const float *restrict gv,
                         float gv_mean, float *restrict acc, float *restrict dy, int64_t d)
{
    const float scale = rs * dlogit;
    int64_t c = 0;
    for (; c + CSM_CHUNK <= d; c += CSM_CHUNK)
        for (int l = 0; l < CSM_CHUNK; l++) {
            float xhat = (y[c + l] - m) * rs;
            acc[c + l] += dlogit * xhat;
            dy[c + l] += scale * (gv[c + l] - gv_mean - xhat * zd);
        }
    for (; c < d; c++) {
        float xhat = (y[c] - m) * rs;
        acc[c] += dlogit * xhat;
        dy[c] += scale * (gv[c] - gv_mean - xhat * zd);
    }
}

void csm_confnet_backward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, const float *s,
                          const float *ds, const csm_confnet_cache *cache, float *dy, float *scratch)
{
    float *gv = scratch, *acc = scratch + d, gv_mean;
    prepare(net, d, gv, &gv_mean);
    for (int64_t c = 0; c < d; c++)
        acc[c] = 0.0f;
    double A = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const float dlogit = ds[r] * s[r] * (1.0f - s[r]);
        A += dlogit;
        row_backward(y + r * d, cache->mean[r], cache->rstd[r], dlogit, cache->z[r] / (float)d, gv, gv_mean, acc,
                     dy + r * d, d);
    }
    const float a = (float)A;
    net->db[0] += a;
    for (int64_t c = 0; c < d; c++) {
        net->dw[c] += net->ln_weight[c] * acc[c] + net->ln_bias[c] * a;
        net->d_ln_weight[c] += net->w[c] * acc[c];
        net->d_ln_bias[c] += net->w[c] * a;
    }
}
