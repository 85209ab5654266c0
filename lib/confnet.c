/* The confidence side of the gate: the per-expert confidence network, LayerNorm (affine),
 * Linear(d, 1), sigmoid (docs/MODEL.md, section 4.1), over one expert's block of rows, and the
 * target classifier with the confidence loss (section 4.2).
 *
 * With xhat = (y - mean) rstd, LN(y) = xhat gamma + beta and the logit is
 *   v . LN(y) + b = z + (beta . v) + b,   z = sum_c xhat_c (gamma_c v_c),
 * so forward needs one pass per row for the statistics and one for z, and never stores
 * LN(y). Backward, with dlogit = ds s (1 - s) and gv = gamma v (mean gv_bar):
 *   dxhat = dlogit gv;  dy = rstd dlogit (gv - gv_bar - xhat z / d)
 * (mean(dxhat xhat) = dlogit z / d), and over the rows, with A = sum dlogit and
 * X_c = sum dlogit xhat_c:  dv += gamma X + beta A, dgamma += v X, dbeta += v A, db += A. */
#include <string.h>

#include "confnet.h"
#include "kernels.h"

#define LN_EPS 1e-5f

/* gv [d] = gamma v; returns beta . v (in double) and writes the mean of gv. */
static double confnet_prepare(const csm_confnet *net, int64_t d, float *gv, float *gv_mean)
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
static float confnet_centered_dot(const float *restrict y, float m, const float *restrict gv, int64_t d)
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
    const float bias = (float)(confnet_prepare(net, d, gv, &gv_mean) + net->b[0]);
    csm_row_stats(y, cache->mean, cache->rstd, rows, d, LN_EPS);
    for (int64_t r = 0; r < rows; r++) {
        const float z = cache->rstd[r] * confnet_centered_dot(y + r * d, cache->mean[r], gv, d);
        cache->z[r] = z;
        s[r] = csm_sigmoid(z + bias);
    }
}

CSM_SIMD_CLONES
static void confnet_row_backward(const float *restrict y, float m, float rs, float dlogit, float zd, const float *restrict gv,
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
    confnet_prepare(net, d, gv, &gv_mean);
    for (int64_t c = 0; c < d; c++)
        acc[c] = 0.0f;
    double A = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const float dlogit = ds[r] * s[r] * (1.0f - s[r]);
        A += dlogit;
        confnet_row_backward(y + r * d, cache->mean[r], cache->rstd[r], dlogit, cache->z[r] / (float)d, gv, gv_mean, acc,
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

void csm_confnet_block_forward(const csm_confnet_block *b, float *c, float *scratch)
{
    csm_confnet_cache cache = b->cache;
    csm_confnet_forward(b->net, b->y, b->rows, b->d, b->s, &cache, scratch);
    double mean = 0.0;
    for (int64_t r = 0; r < b->rows; r++)
        mean += b->s[r];
    mean /= (double)b->rows;
    for (int64_t r = 0; r < b->rows; r++)
        c[b->slot_of[r]] = b->expert_level ? (float)mean : b->s[r];
}

void csm_confnet_block_backward(const csm_confnet_block *b, const float *dc, float *ds, float *dy, float *scratch)
{
    double sum = 0.0;
    for (int64_t r = 0; r < b->rows; r++)
        sum += dc[b->slot_of[r]];
    for (int64_t r = 0; r < b->rows; r++)
        ds[r] = b->expert_level ? (float)(sum / (double)b->rows) : dc[b->slot_of[r]];
    csm_confnet_backward(b->net, b->y, b->rows, b->d, b->s, ds, &b->cache, dy, scratch);
}

/* The probability the target classifier gives the truth at block row r (multi-label: the mean
 * over the classes of the probability of each one's truth). */
static float confidence_target_probability(const csm_confidence_target *t, int64_t r)
{
    const int64_t C = t->n_classes, token = t->slot_of[r] / t->k;
    const float *prob = t->probs + r * C;
    if (!t->multi_label)
        return prob[t->labels[token]];
    const uint8_t *truth = t->multi_labels + token * C;
    double sum = 0.0;
    for (int64_t l = 0; l < C; l++)
        sum += truth[l] ? prob[l] : 1.0f - prob[l];
    return (float)(sum / (double)C);
}

float csm_confidence_loss_forward(const csm_confidence_target *t, const float *y, int64_t rows, float *den)
{
    const int64_t C = t->n_classes;
    csm_broadcast_rows(t->probs, t->b, rows, C);
    csm_gemm(t->ctx, false, true, rows, C, t->d, 1.0f, y, t->w, 1.0f, t->probs);
    if (t->multi_label)
        for (int64_t i = 0; i < rows * C; i++)
            t->probs[i] = csm_sigmoid(t->probs[i]);
    else
        csm_softmax_rows(t->probs, rows, C);
    int64_t present = 0;
    double sum = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        if (!t->present[t->slot_of[r] / t->k])
            continue;
        float diff = t->c[t->slot_of[r]] - confidence_target_probability(t, r);
        sum += (double)diff * diff;
        present++;
    }
    *den = (float)(t->compat ? rows : present);
    return *den > 0.0f ? (float)(sum / *den) : 0.0f;
}

void csm_confidence_loss_rows(const csm_confidence_target *t, float scale, bool detach, int64_t begin, int64_t end,
                              float *dc, float *dz)
{
    const int64_t k = t->k, C = t->n_classes;
    for (int64_t r = begin; r < end; r++) {
        const int64_t slot = t->slot_of[r], token = slot / k;
        float *dzr = dz + r * C;
        if (!t->present[token]) {
            memset(dzr, 0, (size_t)C * sizeof *dzr);
            continue;
        }
        const float diff = t->c[slot] - confidence_target_probability(t, r);
        dc[slot] += scale * diff;
        if (detach)
            continue;
        const float dp = -scale * diff;
        const float *prob = t->probs + r * C;
        if (!t->multi_label) {
            /* p = softmax(z)[label]: dp/dz = p (onehot - softmax). */
            const int32_t label = t->labels[token];
            for (int64_t l = 0; l < C; l++)
                dzr[l] = dp * prob[label] * ((l == label ? 1.0f : 0.0f) - prob[l]);
        } else {
            const uint8_t *truth = t->multi_labels + token * C;
            for (int64_t l = 0; l < C; l++)
                dzr[l] = dp / (float)C * (truth[l] ? 1.0f : -1.0f) * prob[l] * (1.0f - prob[l]);
        }
    }
}

void csm_target_backward_input(const csm_confidence_target *t, const float *dz, int64_t rows, float *dy)
{
    csm_gemm(t->ctx, false, false, rows, t->d, t->n_classes, 1.0f, dz, t->w, 1.0f, dy);
}

void csm_target_backward_params(const csm_confidence_target *t, const float *dz, const float *y, int64_t rows)
{
    csm_gemm(t->ctx, true, false, t->n_classes, t->d, rows, 1.0f, dz, y, 1.0f, t->dw);
    csm_add_column_sums(t->db, dz, rows, t->n_classes);
}
