/* Stage 2 of the imputer, backward (docs/MODEL.md, section 5): through the LayerNorm, the
 * top-T attention and the projections, into the layer input and the expert slots. */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "imputer_internal.h"
#include "kernels.h"
#include "layout.h"
#include "passes.h"
#include "threads.h"

static confsmoe_status imputer_check_backward(confsmoe_imputer *imp, const confsmoe_saved *saved,
                                              const confsmoe_tensor *dout, const confsmoe_tensor *dh,
                                              const confsmoe_tensor *dslots, bool finite)
{
    static const char fn[] = "imputer_backward";
    confsmoe_ctx *ctx = imp->ctx;
    if (!saved)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved is NULL", fn);
    if (saved->owner != imp)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved comes from another layer's forward", fn);
    if (saved->consumed)
        return csm_fail(ctx, CONFSMOE_E_STATE, "%s: backward already ran on this saved handle", fn);
    const int64_t B = ((const imputer_saved *)saved)->B, L = imp->offset[imp->p.n_modalities], d = imp->p.d;
    const int64_t dims[3] = {B, L, d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "dout", dout, CONFSMOE_F32, 3, dims);
    if (s == CONFSMOE_OK && dh)
        s = csm_expect_tensor(ctx, fn, "dh", dh, CONFSMOE_F32, 3, dims);
    if (s == CONFSMOE_OK && dslots)
        s = csm_imputer_expect_slots(imp, fn, "dslots", dslots, B);
    if (s == CONFSMOE_OK && finite)
        s = csm_expect_finite(ctx, fn, "dout", dout);
    return s;
}

/* Scratch of one backward call. */
typedef struct {
    float *d_a, *d_b;  /* [nq, d] LayerNorm gradients; one ends as dIhat, the other is reused for dybar */
    float *dq;         /* [nq, d] */
    float *dkv;        /* [nk, d] */
    float *dv;         /* [nk, d] with separate_value, else == dkv */
    float *dg;         /* [nk, d] gradient of the gathered slot rows */
    float *dw, *dz;    /* [workers, max_block] gradient of the weights, then of the logits */
} backward_work;

/* The arrays of one backward call (layout.h). */
static void imputer_backward_parts(csm_layout *l, const confsmoe_imputer *imp, const imputer_saved *s,
                                   backward_work *w)
{
    const size_t d = (size_t)imp->p.d, nq = (size_t)s->nq, nk = (size_t)s->nk, mb = (size_t)s->max_block;
    w->d_a = CSM_LAYOUT_ROWS(l, float, nq, d);
    w->d_b = CSM_LAYOUT_ROWS(l, float, nq, d);
    w->dq = CSM_LAYOUT_ROWS(l, float, nq, d);
    w->dkv = CSM_LAYOUT_ROWS(l, float, nk, d);
    w->dv = imp->p.separate_value ? CSM_LAYOUT_ROWS(l, float, nk, d) : w->dkv;
    w->dg = CSM_LAYOUT_ROWS(l, float, nk, d);
    /* One pair per worker of imputer_attention_backward. */
    const size_t workers = (size_t)csm_parallel_workers(imp->ctx, s->n_samples);
    w->dw = CSM_LAYOUT_ARRAY(l, float, mb * workers);
    w->dz = CSM_LAYOUT_ARRAY(l, float, mb * workers);
}

static void *imputer_backward_alloc(const confsmoe_imputer *imp, const imputer_saved *s, backward_work *w,
                                    size_t *bytes)
{
    csm_layout l = csm_layout_measure();
    imputer_backward_parts(&l, imp, s, w);
    char *block = csm_layout_size(&l, bytes) ? csm_lent_alloc(imp->ctx, imp->arena, *bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    imputer_backward_parts(&l, imp, s, w);
    return block;
}

typedef struct {
    const confsmoe_imputer *imp;
    const imputer_saved *s;
    const float *dihat;
    const backward_work *w;
} attention_backward_task;

/* Through the attention of samples first .. last - 1: dIhat -> dq, dkv, dv. Each sample writes
 * only its own rows of those (its queries, its k L_b candidates) and its worker's dw and dz;
 * its first product into each row sets it (beta 0), so that nothing needs zeroing before. */
static void imputer_attention_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attention_backward_task *t = arg;
    const confsmoe_imputer *imp = t->imp;
    const imputer_saved *s = t->s;
    const float *dihat = t->dihat;
    backward_work own = *t->w;
    own.dw += (size_t)worker * (size_t)s->max_block;
    own.dz += (size_t)worker * (size_t)s->max_block;
    backward_work *w = &own;
    const int64_t k = imp->p.k, d = imp->p.d;
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t i = first; i < last; i++) {
        const sample_plan *plan = &s->plans[i];
        const int64_t nq = plan->n_query, L = plan->n_cand;
        float *dq = w->dq + plan->q_row * d;
        if (L == 0) {
            memset(dq, 0, (size_t)(nq * d) * sizeof *dq);
            continue;
        }
        const float *di = dihat + plan->q_row * d, *q = s->q + plan->q_row * d;
        for (int64_t j = 0; j < k; j++) {
            const int64_t cand = plan->kv_row + j * L, at = plan->att + j * nq * L;
            const float *p = s->p + at, *wt = s->w + at;
            const uint8_t *keep = s->keep + at;
            /* Ihat = W V: dW = dIhat V^T, dV = W^T dIhat (dkv adds its key term below when it is dv). */
            csm_gemm(imp->ctx, false, true, nq, L, d, 1.0f, di, s->v + cand * d, 0.0f, w->dw);
            csm_gemm(imp->ctx, true, false, L, d, nq, 1.0f, wt, di, 0.0f, w->dv + cand * d);
            for (int64_t r = 0; r < nq; r++) {
                float *dwr = w->dw + r * L;
                const float *pr = p + r * L, *wr = wt + r * L;
                const uint8_t *kr = keep + r * L;
                if (imp->p.renormalize) {
                    /* w = p / sum_kept p: dp = (dw - <dw, w>_kept) / sum_kept p on kept entries. */
                    double sum = 0.0, dot = 0.0;
                    for (int64_t c = 0; c < L; c++)
                        if (kr[c]) {
                            sum += pr[c];
                            dot += (double)dwr[c] * wr[c];
                        }
                    for (int64_t c = 0; c < L; c++)
                        dwr[c] = kr[c] ? (float)(((double)dwr[c] - dot) / sum) : 0.0f;
                } else {
                    for (int64_t c = 0; c < L; c++)
                        dwr[c] = kr[c] ? dwr[c] : 0.0f;
                }
                /* The top-T set is a constant; the softmax still spans all L candidates. */
                csm_softmax_backward_row(pr, dwr, w->dz + r * L, L);
            }
            /* logits = q kv^T / sqrt(d). */
            csm_gemm(imp->ctx, false, false, nq, d, L, scale, w->dz, s->kv + cand * d, j > 0 ? 1.0f : 0.0f, dq);
            csm_gemm(imp->ctx, true, false, L, d, nq, scale, w->dz, q, imp->p.separate_value ? 0.0f : 1.0f,
                     w->dkv + cand * d);
        }
    }
}

static void imputer_attention_backward(const confsmoe_imputer *imp, const imputer_saved *s, const float *dihat,
                                       backward_work *w)
{
    attention_backward_task task = {imp, s, dihat, w};
    csm_parallel_for(imp->ctx, s->n_samples, 1, imputer_attention_backward_task, &task);
}

typedef struct {
    const confsmoe_imputer *imp;
    const imputer_saved *s;
    const backward_work *w;
    const float *dybar;
    float *ds;
} slots_task;

/* Each sample's slot rows: its candidates' (from dkv and dv) and its missing tokens' (ybar is
 * the mean of their k slots). The rows of different samples, and of a sample's candidates and
 * its missing tokens, are distinct: every element gets at most one addition here. */
static void imputer_slots_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const slots_task *t = arg;
    const confsmoe_imputer *imp = t->imp;
    const imputer_saved *s = t->s;
    const int64_t k = imp->p.k, d = imp->p.d, B = s->B;
    const float inv_k = 1.0f / (float)k;
    for (int64_t i = first; i < last; i++) {
        const sample_plan *plan = &s->plans[i];
        for (int64_t r = plan->kv_row; r < plan->kv_row + k * plan->n_cand; r++) {
            float *dst = t->ds + s->src_row[r] * d;
            const float *src = t->w->dg + r * d;
            for (int64_t c = 0; c < d; c++)
                dst[c] += src[c];
        }
        for (int64_t p = plan->first_pair; p < plan->first_pair + plan->n_pairs; p++) {
            const int64_t m = s->pairs[p].m, S = imp->tokens[m];
            for (int64_t tok = 0; tok < S; tok++) {
                const float *src = t->dybar + (s->pairs[p].q_row + tok) * d;
                float *dst = t->ds + (B * imp->offset[m] + s->pairs[p].b * S + tok) * k * d;
                for (int64_t j = 0; j < k; j++)
                    for (int64_t c = 0; c < d; c++)
                        dst[j * d + c] += src[c] * inv_k;
            }
        }
    }
}

static confsmoe_status imputer_backward(confsmoe_imputer *imp, confsmoe_saved *saved, const confsmoe_tensor *dout,
                                        confsmoe_tensor *dh, confsmoe_tensor *dslots, bool finite)
{
    if (!imp)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_status st = imputer_check_backward(imp, saved, dout, dh, dslots, finite);
    if (st != CONFSMOE_OK)
        return st;
    imputer_saved *s = (imputer_saved *)saved;
    const int64_t L = imp->offset[imp->p.n_modalities], d = imp->p.d, B = s->B;
    backward_work w;
    size_t block_bytes = 0;
    void *block = imputer_backward_alloc(imp, s, &w, &block_bytes);
    if (!block)
        return csm_fail(imp->ctx, CONFSMOE_E_NOMEM, "imputer_backward: out of memory for %" PRId64 " missing tokens",
                        s->nq);
    saved->consumed = true;

    /* The imputed rows of dout, gathered before dh (which may be dout) is written. */
    const float *gout = csm_f32(dout);
    for (int64_t i = 0; i < s->n_pairs; i++)
        memcpy(w.d_a + s->pairs[i].q_row * d, gout + (s->pairs[i].b * L + imp->offset[s->pairs[i].m]) * d,
               (size_t)(imp->tokens[s->pairs[i].m] * d) * sizeof(float));
    float *dihat = w.d_b, *spare = w.d_a;
    if (imp->p.writeback == CONFSMOE_WRITEBACK_RESIDUAL) {
        /* The rows were Ihat itself. */
        dihat = w.d_a;
        spare = w.d_b;
    } else if (imp->p.compat) {
        const float *gamma = csm_f32(imp->param[LN_W]);
        float *dgamma = csm_f32(imp->grad[LN_W]), *dbeta = csm_f32(imp->grad[LN_B]);
        csm_layernorm_backward(s->y1, s->mean2, s->rstd2, gamma, w.d_a, w.d_b, dgamma, dbeta, s->nq, d, false);
        csm_layernorm_backward(s->x_pre, s->mean1, s->rstd1, gamma, w.d_b, w.d_a, dgamma, dbeta, s->nq, d, false);
        dihat = w.d_a;
        spare = w.d_b;
    } else {
        const float *gamma = csm_f32(imp->param[LN_W]);
        float *dgamma = csm_f32(imp->grad[LN_W]), *dbeta = csm_f32(imp->grad[LN_B]);
        csm_layernorm_backward(s->x_pre, s->mean1, s->rstd1, gamma, w.d_a, w.d_b, dgamma, dbeta, s->nq, d, false);
    }

    imputer_attention_backward(imp, s, dihat, &w);
    /* A zero query is a constant: nothing flows into W_q or the slots through it. */
    for (int64_t i = 0; i < s->n_pairs; i++)
        if (s->pairs[i].zero_query)
            memset(w.dq + s->pairs[i].q_row * d, 0, (size_t)(imp->tokens[s->pairs[i].m] * d) * sizeof(float));

    /* Projections: q = Wq ybar + bq, kv = Wk g + bk, v = Wv g + bv. */
    if (imp->p.separate_value && s->nk > 0) {
        csm_gemm(imp->ctx, true, false, d, d, s->nk, 1.0f, w.dv, s->g, 1.0f, csm_f32(imp->grad[V_W]));
        csm_add_column_sums(csm_f32(imp->grad[V_B]), w.dv, s->nk, d);
        csm_gemm(imp->ctx, false, false, s->nk, d, d, 1.0f, w.dv, csm_f32(imp->param[V_W]), 0.0f, w.dg);
    }
    if (s->nk > 0) {
        csm_gemm(imp->ctx, true, false, d, d, s->nk, 1.0f, w.dkv, s->g, 1.0f, csm_f32(imp->grad[KV_W]));
        csm_add_column_sums(csm_f32(imp->grad[KV_B]), w.dkv, s->nk, d);
        csm_gemm(imp->ctx, false, false, s->nk, d, d, 1.0f, w.dkv, csm_f32(imp->param[KV_W]),
                 imp->p.separate_value ? 1.0f : 0.0f, w.dg);
    }
    float *dybar = spare;
    if (s->nq > 0) {
        csm_gemm(imp->ctx, true, false, d, d, s->nq, 1.0f, w.dq, s->ybar, 1.0f, csm_f32(imp->grad[Q_W]));
        csm_add_column_sums(csm_f32(imp->grad[Q_B]), w.dq, s->nq, d);
        csm_gemm(imp->ctx, false, false, s->nq, d, d, 1.0f, w.dq, csm_f32(imp->param[Q_W]), 0.0f, dybar);
    }

    if (dslots) {
        slots_task task = {imp, s, &w, dybar, csm_f32(dslots)};
        csm_parallel_for(imp->ctx, s->n_samples, 1, imputer_slots_backward_task, &task);
    }
    if (dh) {
        /* dout into dh: on the threads when the two are apart, else with memmove. */
        const uintptr_t to = (uintptr_t)dh->data, from = (uintptr_t)dout->data, size = dout->nbytes;
        if (to + size <= from || from + size <= to)
            csm_pass_copy_blocks(imp->ctx, csm_f32(dh), d, csm_f32(dout), d, B * L, d);
        else if (to != from)
            memmove(dh->data, dout->data, size);
        /* The residual write-back's rows do not depend on h. */
        const bool residual = imp->p.writeback == CONFSMOE_WRITEBACK_RESIDUAL;
        for (int64_t i = 0; i < s->n_pairs; i++) {
            float *dst = csm_f32(dh) + (s->pairs[i].b * L + imp->offset[s->pairs[i].m]) * d;
            const size_t bytes = (size_t)(imp->tokens[s->pairs[i].m] * d) * sizeof(float);
            if (residual)
                memset(dst, 0, bytes);
            else
                memcpy(dst, dihat + s->pairs[i].q_row * d, bytes);
        }
    }
    csm_lent_free(imp->ctx, imp->arena, block, block_bytes);
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_imputer_backward(confsmoe_imputer *imp, confsmoe_saved *saved, const confsmoe_tensor *dout,
                                          confsmoe_tensor *dh, confsmoe_tensor *dslots)
{
    return imputer_backward(imp, saved, dout, dh, dslots, true);
}

confsmoe_status csm_imputer_backward_trusted(confsmoe_imputer *imp, confsmoe_saved *saved,
                                             const confsmoe_tensor *dout, confsmoe_tensor *dh,
                                             confsmoe_tensor *dslots)
{
    return imputer_backward(imp, saved, dout, dh, dslots, false);
}
