/* The per-expert confidence network: LayerNorm (affine), Linear(d, 1), sigmoid. */
#include "confnet.h"
#include "kernels.h"

#define LN_EPS 1e-5f

void csm_confnet_forward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, float *s,
                         csm_confnet_cache *cache)
{
    csm_layernorm_forward(y, net->ln_weight, net->ln_bias, cache->normed, cache->mean, cache->rstd, rows, d, LN_EPS);
    csm_gemm(false, false, rows, 1, d, 1.0f, cache->normed, net->w, 0.0f, s);
    for (int64_t r = 0; r < rows; r++)
        s[r] = csm_sigmoid(s[r] + net->b[0]);
}

void csm_confnet_backward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, const float *s,
                          const float *ds, const csm_confnet_cache *cache, float *dy, float *scratch)
{
    /* scratch first holds dlogit [rows], then d(LN out) [rows, d] = dlogit v^T. */
    float *dlogit = scratch + rows * d;
    for (int64_t r = 0; r < rows; r++) {
        dlogit[r] = ds[r] * s[r] * (1.0f - s[r]);
        net->db[0] += dlogit[r];
    }
    csm_gemm(true, false, d, 1, rows, 1.0f, cache->normed, dlogit, 1.0f, net->dw);
    csm_gemm(false, false, rows, d, 1, 1.0f, dlogit, net->w, 0.0f, scratch);
    csm_layernorm_backward(y, cache->mean, cache->rstd, net->ln_weight, scratch, dy, net->d_ln_weight,
                           net->d_ln_bias, rows, d, true);
}
