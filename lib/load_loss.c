/* Load-balancing losses: Shazeer's CV^2(importance) + CV^2(load), and 1 / H(mean gate)
 * (docs/MODEL.md, section 3.4). */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"
#include "load_loss.h"

#define CV_EPS 1e-10
#define ENTROPY_EPS 1e-8

static double normal_cdf(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }

static double normal_pdf(double z) { return exp(-0.5 * z * z) * 0.39894228040143267794; }

static bool smooth_load(const csm_load_input *in)
{
    return in->u_noisy && in->k < in->n_experts;
}

/* The noisy logits that decide whether expert e stays in the top-k of token t:
 * the (k+1)-th largest if e is in, the k-th largest if it is out. */
static void thresholds(const csm_load_input *in, int64_t t, int32_t *kth, int32_t *next)
{
    const int32_t E = in->n_experts, k = in->k;
    const int32_t *idx = in->idx + t * k;
    const float *u = in->u_noisy + t * E;
    *kth = idx[k - 1];
    *next = -1;
    for (int32_t e = 0; e < E; e++) {
        bool in_topk = false;
        for (int32_t j = 0; j < k && !in_topk; j++)
            in_topk = idx[j] == e;
        if (!in_topk && (*next < 0 || u[e] > u[*next]))
            *next = e;
    }
}

static bool in_topk(const csm_load_input *in, int64_t t, int32_t e)
{
    for (int32_t j = 0; j < in->k; j++)
        if (in->idx[t * in->k + j] == e)
            return true;
    return false;
}

/* importance [E] and load [E]. */
static void importance_and_load(const csm_load_input *in, double *importance, double *load)
{
    const int32_t E = in->n_experts, k = in->k;
    memset(importance, 0, (size_t)E * sizeof *importance);
    memset(load, 0, (size_t)E * sizeof *load);
    for (int64_t t = 0; t < in->n; t++) {
        for (int32_t j = 0; j < k; j++) {
            importance[in->idx[t * k + j]] += in->g[t * k + j];
            if (!smooth_load(in))
                load[in->idx[t * k + j]] += 1.0;
        }
        if (!smooth_load(in))
            continue;
        int32_t kth, next;
        thresholds(in, t, &kth, &next);
        for (int32_t e = 0; e < E; e++) {
            float thr = in->u_noisy[t * E + (in_topk(in, t, e) ? next : kth)];
            load[e] += normal_cdf((in->u_clean[t * E + e] - thr) / in->sigma[t * E + e]);
        }
    }
}

/* CV^2 with the unbiased variance (torch's default); 0 for a single expert. */
static double cv2(const double *v, int32_t n)
{
    if (n < 2)
        return 0.0;
    double mean = 0.0, var = 0.0;
    for (int32_t i = 0; i < n; i++)
        mean += v[i];
    mean /= n;
    for (int32_t i = 0; i < n; i++)
        var += (v[i] - mean) * (v[i] - mean);
    var /= n - 1;
    return var / (mean * mean + CV_EPS);
}

/* dv = d CV^2 / dv, scaled by g, written over v. */
static void cv2_backward(double *v, int32_t n, double g)
{
    if (n < 2) {
        memset(v, 0, (size_t)(n > 0 ? n : 0) * sizeof *v);
        return;
    }
    double mean = 0.0, var = 0.0;
    for (int32_t i = 0; i < n; i++)
        mean += v[i];
    mean /= n;
    for (int32_t i = 0; i < n; i++)
        var += (v[i] - mean) * (v[i] - mean);
    var /= n - 1;
    double den = mean * mean + CV_EPS;
    for (int32_t i = 0; i < n; i++)
        v[i] = g * (2.0 * (v[i] - mean) / (n - 1) / den - var * 2.0 * mean / n / (den * den));
}

static double entropy(const double *importance, int64_t n_tokens, int32_t E)
{
    double h = 0.0;
    for (int32_t e = 0; e < E; e++) {
        double p = importance[e] / (double)n_tokens;
        if (p > 0.0)
            h -= p * log(p);
    }
    return h;
}

float csm_load_loss_forward(int32_t kind, const csm_load_input *in, double *work)
{
    const int32_t E = in->n_experts;
    if (in->n == 0 || kind == CONFSMOE_LOAD_LOSS_NONE)
        return 0.0f;
    double *importance = work, *load = work + E;
    importance_and_load(in, importance, load);
    if (kind == CONFSMOE_LOAD_LOSS_CV)
        return (float)(cv2(importance, E) + cv2(load, E));
    return (float)(1.0 / (entropy(importance, in->n, E) + ENTROPY_EPS));
}

void csm_load_loss_backward(int32_t kind, const csm_load_input *in, float dloss, double *work, float *dg,
                            float *du_clean, float *dsigma)
{
    const int32_t E = in->n_experts, k = in->k;
    if (in->n == 0 || kind == CONFSMOE_LOAD_LOSS_NONE)
        return;
    double *dimportance = work, *dload = work + E;
    importance_and_load(in, dimportance, dload);
    if (kind == CONFSMOE_LOAD_LOSS_CV) {
        cv2_backward(dimportance, E, dloss);
        cv2_backward(dload, E, dloss);
    } else {
        double h = entropy(dimportance, in->n, E), dh = -dloss / ((h + ENTROPY_EPS) * (h + ENTROPY_EPS));
        for (int32_t e = 0; e < E; e++) {
            double p = dimportance[e] / (double)in->n;
            dimportance[e] = p > 0.0 ? dh * -(log(p) + 1.0) / (double)in->n : 0.0;
        }
        memset(dload, 0, (size_t)E * sizeof *dload);
    }
    for (int64_t t = 0; t < in->n; t++)
        for (int32_t j = 0; j < k; j++)
            dg[t * k + j] += (float)dimportance[in->idx[t * k + j]];
    if (kind != CONFSMOE_LOAD_LOSS_CV || !smooth_load(in))
        return;
    /* Through the smooth load: z = (u_clean - threshold) / sigma; the threshold is
     * another expert's noisy logit u_clean' + eps' sigma'. */
    for (int64_t t = 0; t < in->n; t++) {
        int32_t kth, next;
        thresholds(in, t, &kth, &next);
        for (int32_t e = 0; e < E; e++) {
            const int64_t i = t * E + e;
            int32_t te = in_topk(in, t, e) ? next : kth;
            const int64_t ti = t * E + te;
            double sigma = in->sigma[i], z = (in->u_clean[i] - in->u_noisy[ti]) / sigma;
            double dz = dload[e] * normal_pdf(z);
            du_clean[i] += (float)(dz / sigma);
            dsigma[i] += (float)(-dz * z / sigma);
            double dthr = -dz / sigma;
            du_clean[ti] += (float)dthr;
            dsigma[ti] += (float)(dthr * in->eps[ti]);
        }
    }
}
