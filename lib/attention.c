/* The model's multi-head self-attention and residual dropout (attention.h). */
#include <math.h>
#include <string.h>

#include "attention.h"
#include "kernels.h"
#include "threads.h"

size_t csm_attention_scratch_floats(int64_t L, int64_t d) { return (size_t)(3 * L * L + (d + 3) / 4); }

/* Training keeps the weights when they take at most this many [B L, d] arrays: at the paper's
 * shape (L 150, 4 heads, d 128) 4.7, 92 MB, and backward saves a Q K^T product and a softmax
 * per head (docs/PERFORMANCE.md). Longer sequences recompute them instead. */
#define ATTENTION_KEEP_RATIO 8

bool csm_attention_keeps_weights(int64_t L, int64_t d, int64_t heads) { return heads * L <= ATTENTION_KEEP_RATIO * d; }

/* One worker's attention scratch. */
typedef struct {
    float *P, *P_w, *dP;  /* [L, L] */
    uint8_t *keep;        /* [d] */
} attention_scratch;

static attention_scratch attention_scratch_of(const confsmoe_model *model, const workspace *w, int worker)
{
    const int64_t L = model->tokens_total;
    float *base = w->scratch + (size_t)worker * w->scratch_stride;
    return (attention_scratch){base, base + L * L, base + 2 * L * L, (uint8_t *)(base + 3 * L * L)};
}

/* The dropout draws of head h of sample b (with dropout). */
static uint8_t *attention_keep_of(const confsmoe_model *model, const workspace *w, int64_t b, int64_t h)
{
    const int64_t L = model->tokens_total;
    return w->attn_keep + (size_t)(b * model->p.heads + h) * (size_t)(L * L);
}

/* The weights of head h of sample b, P = softmax(scale Q K^T): forward computes them, into
 * w->attn_weights when training keeps them (else into a->P), and backward reads them back or
 * computes them again, bit for bit. With dropout, a->P_w gets the dropped weights P keep / (1 - p)
 * with the draws of this head, which forward draws and backward reads back. Returns P; *used is
 * the weights ctx is made from (P or a->P_w). */
static const float *attention_weights(const confsmoe_model *model, const workspace *w, const attention_scratch *a,
                                      int64_t b, int64_t h, bool backward, const float **used)
{
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    float *P = w->attn_weights ? w->attn_weights + (size_t)(b * heads + h) * (size_t)(L * L) : a->P;
    if (!backward || !w->attn_weights) {
        const float scale = 1.0f / sqrtf((float)dh);
        const int64_t off = b * L * d + h * dh;
        csm_gemm_ld(model->ctx, false, true, L, L, dh, scale, w->Q + off, d, w->K + off, d, 0.0f, P, L);
        csm_softmax_rows(P, L, L);
    }
    *used = P;
    if (!w->dropout)
        return P;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = attention_keep_of(model, w, b, h);
    if (!backward)
        csm_rng_dropout_mask(model->ctx,
                             w->draws.attention + (uint64_t)((w->first + b) * heads + h) * csm_dropout_draws(L * L),
                             model->p.dropout, keep, L * L);
    csm_mask_scale(a->P_w, P, keep, kept, L * L);
    *used = a->P_w;
    return P;
}

typedef struct {
    const confsmoe_model *model;
    workspace *w;
    gradients *g;
} attention_task;

static void attention_forward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attention_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    const attention_scratch a = attention_scratch_of(model, w, worker);
    for (int64_t b = first; b < last; b++)
        for (int64_t h = 0; h < heads; h++) {
            /* Head h of sample b: columns h dh .. h dh + dh - 1 of rows b L .. b L + L - 1. */
            const int64_t off = b * L * d + h * dh;
            const float *weights;
            attention_weights(model, w, &a, b, h, false, &weights);
            csm_gemm_ld(model->ctx, false, false, L, dh, L, 1.0f, weights, L, w->V + off, d, 0.0f, w->ctx_ + off, d);
        }
}

void csm_attention_forward(confsmoe_model *model, workspace *w)
{
    const int64_t B = w->B, L = model->tokens_total;
    csm_linear_forward(&model->q, w->Xn, B * L, w->Q);
    csm_linear_forward(&model->k, w->Xn, B * L, w->K);
    csm_linear_forward(&model->v, w->Xn, B * L, w->V);
    attention_task task = {model, w, NULL};
    csm_parallel_for(model->ctx, B, 1, attention_forward_task, &task);
    /* A = o(ctx) lands in H2, free until the MoE layer writes it. */
    csm_linear_forward(&model->o, w->ctx_, B * L, w->H2);
}

/* The attention output joins the residual: H = X + Dropout(A), or A + Dropout(A) under compat,
 * written straight into the per-modality layout Hm. Row (b, l) of A takes csm_dropout_draws(d) draws, in
 * row-major order over the global batch, from w->draws.residual on. */
static void attention_residual_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attention_task *t = arg;
    const confsmoe_model *model = t->model;
    workspace *w = t->w;
    const int64_t B = w->B, L = model->tokens_total, d = model->p.d;
    const float *A = w->H2, *base = model->p.compat ? w->H2 : w->X;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = attention_scratch_of(model, w, worker).keep;
    for (int64_t b = first; b < last; b++)
        for (int64_t l = 0, m = 0; l < L; l++) {
            while (l >= model->token_offset[m + 1])
                m++;
            const int64_t row = b * L + l, S = model->tokens[m], o = model->token_offset[m];
            const float *ar = A + row * d, *br = base + row * d;
            float *dst = w->Hm + (B * o + b * S + (l - o)) * d;
            if (!w->dropout) {
                csm_add(dst, br, ar, d);
                continue;
            }
            csm_rng_dropout_mask(model->ctx, w->draws.residual + (uint64_t)(w->first * L + row) * csm_dropout_draws(d),
                                 model->p.dropout, keep, d);
            csm_add_masked(dst, br, ar, keep, kept, d);
        }
}

void csm_residual_forward(confsmoe_model *model, workspace *w)
{
    attention_task task = {model, w, NULL};
    csm_parallel_for(model->ctx, w->B, 1, attention_residual_task, &task);
}

static void attention_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attention_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    gradients *g = t->g;
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    const float scale = 1.0f / sqrtf((float)dh), kept = 1.0f / (1.0f - model->p.dropout);
    const attention_scratch a = attention_scratch_of(model, w, worker);
    for (int64_t b = first; b < last; b++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t off = b * L * d + h * dh;
            /* Forward's weights again. */
            const float *weights, *P = attention_weights(model, w, &a, b, h, true, &weights);
            /* ctx = weights V: d(weights) = dctx V^T and dV = weights^T dctx. */
            csm_gemm_ld(model->ctx, false, true, L, L, dh, 1.0f, g->dctx + off, d, w->V + off, d, 0.0f, a.dP, L);
            csm_gemm_ld(model->ctx, true, false, L, dh, L, 1.0f, weights, L, g->dctx + off, d, 0.0f, g->dV + off, d);
            if (w->dropout)
                csm_mask_scale_inplace(a.dP, attention_keep_of(model, w, b, h), kept, L * L);
            for (int64_t i = 0; i < L; i++)
                csm_softmax_backward_row(P + i * L, a.dP + i * L, a.dP + i * L, L);
            /* scores = scale Q K^T. */
            csm_gemm_ld(model->ctx, false, false, L, dh, L, scale, a.dP, L, w->K + off, d, 0.0f, g->dQ + off, d);
            csm_gemm_ld(model->ctx, true, false, L, dh, L, scale, a.dP, L, w->Q + off, d, 0.0f, g->dK + off, d);
        }
}

void csm_attention_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int64_t B = w->B, L = model->tokens_total;
    const csm_params *params = &model->params;
    csm_linear_backward(&model->o, params, w->ctx_, g->dA, B * L, g->dctx, false);
    attention_task task = {model, w, g};
    csm_parallel_for(model->ctx, B, 1, attention_backward_task, &task);
    csm_linear_backward(&model->q, params, w->Xn, g->dQ, B * L, g->dXn, false);
    csm_linear_backward(&model->k, params, w->Xn, g->dK, B * L, g->dXn, true);
    csm_linear_backward(&model->v, params, w->Xn, g->dV, B * L, g->dXn, true);
}

/* dA = dH keep / (1 - p) with forward's residual draws (plus dH under compat). */
static void attention_residual_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attention_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    gradients *g = t->g;
    const int64_t L = model->tokens_total, d = model->p.d;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = attention_scratch_of(model, w, worker).keep;
    for (int64_t row = first * L; row < last * L; row++) {
        const float *dHr = g->dH + row * d;
        float *dAr = g->dA + row * d;
        if (w->dropout) {
            csm_rng_dropout_mask(model->ctx, w->draws.residual + (uint64_t)(w->first * L + row) * csm_dropout_draws(d),
                                 model->p.dropout, keep, d);
            csm_mask_scale(dAr, dHr, keep, kept, d);
        } else {
            memcpy(dAr, dHr, (size_t)d * sizeof *dAr);
        }
        if (model->p.compat)
            for (int64_t c = 0; c < d; c++)
                dAr[c] += dHr[c];
    }
}

void csm_residual_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    attention_task task = {model, w, g};
    csm_parallel_for(model->ctx, w->B, 1, attention_residual_backward_task, &task);
}
