/* Router logits (dot product, Gaussian, Laplacian), noisy top-k, and their backward
 * (docs/MODEL.md, section 3). */
#include <math.h>
#include <string.h>

#include "kernels.h"
#include "router.h"

/* ||w_e||^2 for each column of w [d, E]. */
static void column_norms(const float *w, int64_t d, int32_t n_experts, float *out)
{
    for (int32_t e = 0; e < n_experts; e++)
        out[e] = 0.0f;
    for (int64_t i = 0; i < d; i++)
        for (int32_t e = 0; e < n_experts; e++)
            out[e] += w[i * n_experts + e] * w[i * n_experts + e];
}

static float row_norm(const float *x, int64_t d)
{
    float s = 0.0f;
    for (int64_t i = 0; i < d; i++)
        s += x[i] * x[i];
    return s;
}

void csm_router_logits(const csm_router *r, const float *x, int64_t n, float *u)
{
    const int32_t E = r->n_experts;
    const float *w = csm_f32(r->w);
    if (r->kind == CONFSMOE_ROUTER_SOFTMAX) {
        csm_gemm(r->w->ctx, false, false, n, E, r->d, 1.0f, x, w, 0.0f, u);
        return;
    }
    /* Squared distances from one GEMM: ||x||^2 - 2 x.w + ||w||^2. */
    float *wn = r->per_expert;
    column_norms(w, r->d, E, wn);
    csm_gemm(r->w->ctx, false, false, n, E, r->d, -2.0f, x, w, 0.0f, u);
    for (int64_t t = 0; t < n; t++) {
        float xn = row_norm(x + t * r->d, r->d);
        for (int32_t e = 0; e < E; e++) {
            float s = u[t * E + e] + xn + wn[e];
            s = s > 0.0f ? s : 0.0f;
            u[t * E + e] = r->kind == CONFSMOE_ROUTER_GAUSSIAN ? -s : -sqrtf(s);
        }
    }
}

void csm_router_add_noise(const csm_router *r, csm_substream *noise, const float *x, int64_t n, float *u, float *h,
                          float *eps)
{
    const int64_t total = n * r->n_experts;
    csm_gemm(r->w->ctx, false, false, n, r->n_experts, r->d, 1.0f, x, csm_f32(r->wn), 0.0f, h);
    for (int64_t i = 0; i < total; i++) {
        eps[i] = csm_substream_normal(noise);
        u[i] += eps[i] * (csm_softplus(h[i]) + 0.01f);
    }
}

void csm_router_topk(const float *u, int64_t n, int32_t n_experts, int32_t k, int32_t *idx)
{
    for (int64_t t = 0; t < n; t++) {
        const float *row = u + t * n_experts;
        int32_t *out = idx + t * k;
        /* Insertion into a sorted list of k: strict > keeps the lower index first on ties. */
        int32_t filled = 0;
        for (int32_t e = 0; e < n_experts; e++) {
            int32_t pos = filled < k ? filled : k;
            while (pos > 0 && row[e] > row[out[pos - 1]])
                pos--;
            if (pos >= k)
                continue;
            int32_t last = filled < k ? filled : k - 1;
            for (int32_t j = last; j > pos; j--)
                out[j] = out[j - 1];
            out[pos] = e;
            if (filled < k)
                filled++;
        }
    }
}

void csm_router_backward(const csm_router *r, const float *x, int64_t n, const float *u_clean, const float *h,
                         const float *du_clean, const float *dsigma, float *dx, float *scratch)
{
    const int32_t E = r->n_experts;
    const int64_t d = r->d, total = n * E;
    const float *w = csm_f32(r->w);
    if (r->wn && dsigma) {
        /* sigma = softplus(h) + 0.01 and h = x W_noise. */
        for (int64_t i = 0; i < total; i++)
            scratch[i] = dsigma[i] * csm_sigmoid(h[i]);
        csm_gemm(r->w->ctx, true, false, d, E, n, 1.0f, x, scratch, 1.0f, csm_f32(r->dwn));
        if (dx)
            csm_gemm(r->w->ctx, false, true, n, d, E, 1.0f, scratch, csm_f32(r->wn), 1.0f, dx);
    }
    if (r->kind == CONFSMOE_ROUTER_SOFTMAX) {
        csm_gemm(r->w->ctx, true, false, d, E, n, 1.0f, x, du_clean, 1.0f, csm_f32(r->dw));
        if (dx)
            csm_gemm(r->w->ctx, false, true, n, d, E, 1.0f, du_clean, w, 1.0f, dx);
        return;
    }
    /* a = dL/ds for the squared distance s = ||x - w_e||^2; ds/dx = 2(x - w_e), ds/dw_e = -2(x - w_e). */
    for (int64_t i = 0; i < total; i++) {
        if (r->kind == CONFSMOE_ROUTER_GAUSSIAN)
            scratch[i] = -du_clean[i];
        else /* u = -sqrt(s); at s = 0 the subgradient 0 is used */
            scratch[i] = u_clean[i] < 0.0f ? du_clean[i] / (2.0f * u_clean[i]) : 0.0f;
    }
    float *dw = csm_f32(r->dw);
    for (int64_t t = 0; dx && t < n; t++) {
        float row_sum = 0.0f;
        for (int32_t e = 0; e < E; e++)
            row_sum += scratch[t * E + e];
        for (int64_t i = 0; i < d; i++)
            dx[t * d + i] += 2.0f * row_sum * x[t * d + i];
    }
    float *col_sum = r->per_expert;
    for (int32_t e = 0; e < E; e++)
        col_sum[e] = 0.0f;
    for (int64_t t = 0; t < n; t++)
        for (int32_t e = 0; e < E; e++)
            col_sum[e] += scratch[t * E + e];
    for (int64_t i = 0; i < d; i++)
        for (int32_t e = 0; e < E; e++)
            dw[i * E + e] += 2.0f * col_sum[e] * w[i * E + e];
    if (dx)
        csm_gemm(r->w->ctx, false, true, n, d, E, -2.0f, scratch, w, 1.0f, dx);
    csm_gemm(r->w->ctx, true, false, d, E, n, -2.0f, x, scratch, 1.0f, dw);
}
