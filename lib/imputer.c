/* The two-stage imputer of missing modalities (docs/MODEL.md, section 5).
 * Stage 1 (fill: a missing sample's raw input becomes the mean of K distinct pool rows) is
 * lib/stage1.c's, which the model also uses without an imputer; this file checks the public
 * confsmoe_imputer_fill's arguments and hands them to it.
 * Stage 2 (forward/backward) lets each missing token attend, per expert slot, over the expert
 * outputs of the modalities present for the same sample, keeps the top T weights, and adds
 * the result to the layer output before a LayerNorm. This file creates the imputer and runs
 * stage 2's forward; imputer_backward.c runs its backward.
 *
 * Stage 2 is gather-based: for each sample that misses a modality, the slot rows of its
 * present modalities (the candidates, shared by all of its missing modalities) are gathered
 * once, slot-major, so that every per-slot product is one contiguous GEMM. Nothing of size
 * [missing tokens x candidates x k x d] is ever built. */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "imputer.h"
#include "imputer_internal.h"
#include "internal.h"
#include "kernels.h"
#include "layout.h"
#include "params.h"
#include "passes.h"
#include "sized.h"
#include "stage1.h"
#include "threads.h"

#define LN_EPS 1e-5f

static const char *const role_names[N_ROLES] = {"q.w", "q.b", "kv.w", "kv.b", "v.w", "v.b", "ln.weight", "ln.bias"};

const csm_params *csm_imputer_param_list(const confsmoe_imputer *imp) { return &imp->params; }

void csm_imputer_set_arena(confsmoe_imputer *imp, csm_arena *arena) { imp->arena = arena; }

/* ------------------------------------------------------------------ parameters */

static void imputer_defaults(confsmoe_imputer_params *p)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->tokens = 1;
    p->k = 2;
}

void confsmoe_imputer_params_init_sized(confsmoe_imputer_params *p, size_t struct_size)
{
    confsmoe_imputer_params defaults;
    imputer_defaults(&defaults);
    csm_sized_init(p, struct_size, &defaults, sizeof defaults, CSM_IMPUTER_PARAMS_MIN);
}

size_t confsmoe_sizeof_imputer_params(void) { return sizeof(confsmoe_imputer_params); }

static bool imputer_is_flag(int32_t v) { return v == 0 || v == 1; }

confsmoe_status csm_total_tokens(confsmoe_ctx *ctx, const char *fn, int32_t M, int64_t tokens,
                                 const int64_t *modality_tokens, int64_t *total)
{
    int64_t L = 0;
    for (int32_t m = 0; m < M; m++) {
        const int64_t S = modality_tokens ? modality_tokens[m] : tokens;
        if (S < 1)
            return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: modality_tokens[%" PRId32 "] is %" PRId64 ", must be >= 1", fn,
                            m, S);
        if (S > INT64_MAX - L)
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: the sum of the modalities' tokens overflows", fn);
        L += S;
    }
    *total = L;
    return CONFSMOE_OK;
}

confsmoe_status csm_check_writeback(confsmoe_ctx *ctx, const char *fn, int32_t writeback)
{
    if (writeback != CONFSMOE_WRITEBACK_LN_IMP && writeback != CONFSMOE_WRITEBACK_RESIDUAL)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: writeback is %" PRId32 ", must be CONFSMOE_WRITEBACK_LN_IMP (0) or _RESIDUAL (1)", fn,
                        writeback);
    return CONFSMOE_OK;
}

static confsmoe_status imputer_check_params(confsmoe_ctx *ctx, const confsmoe_imputer_params *p)
{
    static const char fn[] = "imputer_create";
    if (p->d < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: d is %" PRId64 ", must be >= 1", fn, p->d);
    if (p->n_modalities < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: n_modalities is %" PRId32 ", must be >= 1", fn, p->n_modalities);
    if (!p->modality_tokens && p->tokens < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: tokens is %" PRId64 ", must be >= 1", fn, p->tokens);
    if (p->k < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: k is %" PRId32 ", must be >= 1", fn, p->k);
    if (p->top_t < 0)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: top_t is %" PRId32 ", must be >= 0 (0 = default)", fn,
                        p->top_t);
    if (!imputer_is_flag(p->renormalize) || !imputer_is_flag(p->separate_value) || !imputer_is_flag(p->compat))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: renormalize, separate_value and compat must be 0 or 1", fn);
    const confsmoe_status wb = csm_check_writeback(ctx, fn, p->writeback);
    if (wb != CONFSMOE_OK)
        return wb;
    /* The tensors the imputer accepts must be describable: L k d (one slot row per token and
     * slot, per sample, L = sum_m S_m) fits in int64 for one sample, and d x d fits for the weights. */
    const int64_t k = p->k, d = p->d;
    int64_t L;
    const confsmoe_status st = csm_total_tokens(ctx, fn, p->n_modalities, p->tokens, p->modality_tokens, &L);
    if (st != CONFSMOE_OK)
        return st;
    if (L > INT64_MAX / k || L * k > INT64_MAX / d || d > INT64_MAX / d)
        return csm_fail(ctx, CONFSMOE_E_NOMEM,
                        "%s: sizes overflow for d=%" PRId64 ", L=%" PRId64 " tokens, k=%" PRId64, fn, d, L, k);
    return CONFSMOE_OK;
}

void confsmoe_imputer_destroy(confsmoe_imputer *imp)
{
    if (!imp)
        return;
    confsmoe_ctx *ctx = imp->ctx;
    csm_params_free(ctx, &imp->params);
    csm_free(ctx, imp->tokens);
    csm_free(ctx, imp);
    csm_ctx_release(ctx);
}

confsmoe_status confsmoe_imputer_create(confsmoe_ctx *ctx, const confsmoe_imputer_params *p, confsmoe_imputer **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out || !p)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "imputer_create: %s is NULL",
                        !ctx ? "ctx" : !out ? "out" : "params");
    /* The caller's struct, of any accepted size, over the defaults (docs/API.md, "Struct versioning"). */
    confsmoe_imputer_params full;
    imputer_defaults(&full);
    confsmoe_status s = csm_sized_read(ctx, "imputer_create", "confsmoe_imputer_params", p, &full, sizeof full,
                                       CSM_IMPUTER_PARAMS_MIN);
    p = &full;
    if (s == CONFSMOE_OK)
        s = imputer_check_params(ctx, p);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_imputer *imp = csm_calloc(ctx, 1, sizeof *imp);
    if (!imp)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "imputer_create: out of memory");
    imp->ctx = csm_ctx_retain(ctx);
    imp->p = *p;
    const int64_t M = p->n_modalities, d = p->d;
    /* S_m, the offsets o_m and T_m in one block. */
    imp->tokens = csm_calloc(ctx, (size_t)(3 * M + 1), sizeof *imp->tokens);
    if (!imp->tokens) {
        confsmoe_imputer_destroy(imp);
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "imputer_create: out of memory");
    }
    imp->offset = imp->tokens + M;
    imp->top_t = imp->offset + M + 1;
    imp->uniform = true;
    for (int64_t m = 0; m < M; m++) {
        imp->tokens[m] = p->modality_tokens ? p->modality_tokens[m] : p->tokens;
        imp->offset[m + 1] = imp->offset[m] + imp->tokens[m];
        imp->uniform = imp->uniform && imp->tokens[m] == imp->tokens[0];
    }
    imp->p.modality_tokens = imp->tokens;
    /* T_m = max(1, floor(sum_{m' != m} S_m' / 4)): (M - 1) S / 4 when every S_m is S. */
    for (int64_t m = 0; m < M; m++) {
        const int64_t default_t = (imp->offset[M] - imp->tokens[m]) / 4;
        imp->top_t[m] = p->top_t > 0 ? p->top_t : (default_t > 1 ? default_t : 1);
    }

    /* Every tensor first, then the draws: a failed create leaves the ctx RNG where it was. */
    for (int r = 0; r < N_ROLES; r++) {
        if ((r == V_W || r == V_B) && !p->separate_value)
            continue;
        /* The residual write-back leaves the normalisation to the host: no LayerNorm here. */
        if ((r == LN_W || r == LN_B) && p->writeback == CONFSMOE_WRITEBACK_RESIDUAL)
            continue;
        const bool matrix = r == Q_W || r == KV_W || r == V_W;
        s = csm_params_new(ctx, &imp->params, role_names[r], matrix ? 2 : 1, d, d, &imp->param[r]);
        if (s != CONFSMOE_OK) {
            confsmoe_imputer_destroy(imp);
            return csm_fail(ctx, s, "imputer_create: out of memory for d=%" PRId64, d);
        }
        imp->grad[r] = imp->params.grad[imp->params.count - 1];
    }
    /* nn.Linear: U(+-1/sqrt(fan_in)), drawn in view order; nn.LayerNorm: weight 1, bias 0. */
    const float bound = 1.0f / sqrtf((float)d);
    for (int r = Q_W; r <= V_B; r++)
        if (imp->param[r])
            csm_fill_uniform(ctx, imp->param[r], bound);
    for (int64_t c = 0; imp->param[LN_W] && c < d; c++)
        csm_f32(imp->param[LN_W])[c] = 1.0f;
    *out = imp;
    return CONFSMOE_OK;
}

int32_t confsmoe_imputer_n_params(const confsmoe_imputer *imp) { return imp ? imp->params.count : -1; }

const char *confsmoe_imputer_param_name(const confsmoe_imputer *imp, int32_t i)
{
    return imp ? csm_params_name(&imp->params, i) : NULL;
}

confsmoe_tensor *confsmoe_imputer_param(confsmoe_imputer *imp, int32_t i)
{
    return imp ? csm_params_param(&imp->params, i) : NULL;
}

confsmoe_tensor *confsmoe_imputer_grad(confsmoe_imputer *imp, int32_t i)
{
    return imp ? csm_params_grad(&imp->params, i) : NULL;
}

void confsmoe_imputer_zero_grad(confsmoe_imputer *imp)
{
    if (imp)
        csm_params_zero_grad(&imp->params);
}

/* Checks avail u8 [B, M] with values 0 or 1. */
static confsmoe_status imputer_check_avail(confsmoe_ctx *ctx, const char *fn, const confsmoe_tensor *avail, int64_t B,
                                           int64_t M)
{
    const int64_t dims[2] = {B, M};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "avail", avail, CONFSMOE_U8, 2, dims);
    if (s != CONFSMOE_OK)
        return s;
    const uint8_t *v = avail->data;
    for (int64_t i = 0; i < B * M; i++)
        if (v[i] > 1)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: avail[%" PRId64 "][%" PRId64 "] is %d, must be 0 (missing) or 1 (present)", fn, i / M,
                            i % M, v[i]);
    return CONFSMOE_OK;
}

/* slots (or dslots) of a batch of B: [B L, k, d] modality-major, or [M, B S, k, d] when every
 * S_m is S (the same memory). */
confsmoe_status csm_imputer_expect_slots(const confsmoe_imputer *imp, const char *fn, const char *name,
                                         const confsmoe_tensor *slots, int64_t B)
{
    const int64_t M = imp->p.n_modalities, k = imp->p.k, d = imp->p.d;
    if (imp->uniform && slots && slots->ndim == 4) {
        const int64_t dims[4] = {M, B * imp->tokens[0], k, d};
        return csm_expect_tensor(imp->ctx, fn, name, slots, CONFSMOE_F32, 4, dims);
    }
    const int64_t dims[3] = {B * imp->offset[M], k, d};
    return csm_expect_tensor(imp->ctx, fn, name, slots, CONFSMOE_F32, 3, dims);
}

/* ------------------------------------------------------------------ stage 1 (stage1.c) */

static confsmoe_status imputer_check_fill(confsmoe_imputer *imp, int32_t m, const confsmoe_tensor *pool, int32_t draws,
                                          const confsmoe_tensor *avail, const confsmoe_tensor *x)
{
    static const char fn[] = "imputer_fill";
    confsmoe_ctx *ctx = imp->ctx;
    const int64_t M = imp->p.n_modalities;
    if (m < 0 || m >= M)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: m=%" PRId32 " is out of range 0..%" PRId64, fn, m,
                        M - 1);
    const int64_t S = imp->tokens[m];
    if (draws < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: draws is %" PRId32 ", must be >= 1", fn, draws);
    /* x is [B, S_m, F] with the imputer's S_m, or [B, F] when S_m = 1 (vector views). */
    const int64_t any[CONFSMOE_MAX_DIMS] = {-1, -1, -1, -1};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "x", x, CONFSMOE_F32, x ? x->ndim : 0, any);
    if (s != CONFSMOE_OK)
        return s;
    if (x->ndim != 2 && x->ndim != 3)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: x has %" PRId32 " dims, expected [B, S, F] or [B, F]", fn,
                        x->ndim);
    if (x->ndim == 2 && S != 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE,
                        "%s: x is [B, F] but modality %" PRId32 " has S=%" PRId64 " tokens: pass [B, S, F]", fn,
                        m, S);
    if (x->ndim == 3 && x->dims[1] != S)
        return csm_fail(ctx, CONFSMOE_E_SHAPE,
                        "%s: x has S=%" PRId64 " tokens, modality %" PRId32 " of the imputer has S=%" PRId64, fn,
                        x->dims[1], m, S);
    /* The pool has x's trailing shape. */
    const int64_t pool_dims[3] = {-1, x->dims[1], x->ndim == 3 ? x->dims[2] : 0};
    if ((s = csm_expect_tensor(ctx, fn, "pool", pool, CONFSMOE_F32, x->ndim, pool_dims)) != CONFSMOE_OK)
        return s;
    if (pool->dims[0] < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: pool has 0 rows, needs >= 1", fn);
    return imputer_check_avail(ctx, fn, avail, x->dims[0], M);
}

confsmoe_status confsmoe_imputer_fill(confsmoe_imputer *imp, int32_t m, const confsmoe_tensor *pool, int32_t draws,
                                      const confsmoe_tensor *avail, confsmoe_tensor *x)
{
    if (!imp)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_status st = imputer_check_fill(imp, m, pool, draws, avail, x);
    if (st != CONFSMOE_OK)
        return st;
    const uint8_t *present = avail->data;
    bool missing = false;
    for (int64_t b = 0; b < x->dims[0] && !missing; b++)
        missing = !present[b * imp->p.n_modalities + m];
    if (!missing || x->numel == 0)
        return CONFSMOE_OK;
    /* The call's draws take one stream position; a failed call takes none. */
    const uint64_t base = csm_rng_reserve(imp->ctx, 1);
    st = csm_stage1_fill_draws(imp->ctx, "imputer_fill", csm_f32(pool), pool->dims[0], draws, present, x->dims[0],
                               imp->p.n_modalities, m, x->numel / x->dims[0], csm_f32(x), base, 0);
    if (st != CONFSMOE_OK)
        csm_rng_seek(imp->ctx, base);
    return st;
}

/* ------------------------------------------------------------------ stage 2: saved state */

static void imputer_release_saved(confsmoe_saved *s)
{
    confsmoe_ctx *ctx = s->ctx;
    csm_free(ctx, s);
    csm_ctx_release(ctx);
}

/* Sizes of one call's plan, counted from avail before anything is allocated. */
typedef struct {
    int64_t n_pairs, n_samples, nq, nk, na, max_block, max_cand;
} plan_sizes;

/* False when a size overflows. */
static bool imputer_count_plan(const confsmoe_imputer *imp, const uint8_t *avail, int64_t B, plan_sizes *z)
{
    const int64_t M = imp->p.n_modalities, k = imp->p.k;
    memset(z, 0, sizeof *z);
    for (int64_t b = 0; b < B; b++) {
        int64_t missing = 0, nq = 0;
        for (int64_t m = 0; m < M; m++)
            if (!avail[b * M + m]) {
                missing++;
                nq += imp->tokens[m];
            }
        if (missing == 0)
            continue;
        /* L_b candidates; products are bounded by L k (checked at create) and B. */
        const int64_t L = imp->offset[M] - nq;
        if (nq > 0 && L > INT64_MAX / nq)
            return false;
        const int64_t block = nq * L;
        if (block > INT64_MAX / k || z->na > INT64_MAX - block * k)
            return false;
        z->n_pairs += missing;
        z->n_samples++;
        z->nq += nq;
        z->nk += L * k;
        z->na += block * k;
        z->max_block = block > z->max_block ? block : z->max_block;
        z->max_cand = L > z->max_cand ? L : z->max_cand;
    }
    return true;
}

/* The header and every array of a forward's saved state (layout.h); returns the header. */
static imputer_saved *imputer_saved_parts(csm_layout *l, const confsmoe_imputer *imp, const plan_sizes *z,
                                          imputer_saved *view, uint64_t **rank)
{
    const size_t d = (size_t)imp->p.d, nq = (size_t)z->nq, nk = (size_t)z->nk;
    const size_t na = (size_t)z->na;
    const bool compat = imp->p.compat, ln = imp->p.writeback == CONFSMOE_WRITEBACK_LN_IMP;
    imputer_saved *header = CSM_LAYOUT_ARRAY(l, imputer_saved, 1);
    view->pairs = CSM_LAYOUT_ARRAY(l, missing_pair, (size_t)z->n_pairs);
    view->plans = CSM_LAYOUT_ARRAY(l, sample_plan, (size_t)z->n_samples);
    view->src_row = CSM_LAYOUT_ARRAY(l, int64_t, nk);
    view->ybar = CSM_LAYOUT_ROWS(l, float, nq, d);
    view->q = CSM_LAYOUT_ROWS(l, float, nq, d);
    view->g = CSM_LAYOUT_ROWS(l, float, nk, d);
    view->kv = CSM_LAYOUT_ROWS(l, float, nk, d);
    view->v = imp->p.separate_value ? CSM_LAYOUT_ROWS(l, float, nk, d) : view->kv;
    view->p = CSM_LAYOUT_ARRAY(l, float, na);
    view->w = CSM_LAYOUT_ARRAY(l, float, na);
    view->keep = CSM_LAYOUT_ARRAY(l, uint8_t, na);
    view->x_pre = CSM_LAYOUT_ROWS(l, float, nq, d);
    view->mean1 = ln ? CSM_LAYOUT_ARRAY(l, float, nq) : NULL;
    view->rstd1 = ln ? CSM_LAYOUT_ARRAY(l, float, nq) : NULL;
    view->y1 = ln && compat ? CSM_LAYOUT_ROWS(l, float, nq, d) : NULL;
    view->mean2 = ln && compat ? CSM_LAYOUT_ARRAY(l, float, nq) : NULL;
    view->rstd2 = ln && compat ? CSM_LAYOUT_ARRAY(l, float, nq) : NULL;
    /* keep_top's ranking scratch, one per worker of imputer_attend. */
    *rank = CSM_LAYOUT_ARRAY(l, uint64_t, (size_t)(z->max_cand * csm_parallel_workers(imp->ctx, z->n_samples)));
    return header;
}

/* One block for the header and every array (the inference path uses it as scratch). */
static imputer_saved *imputer_alloc_saved(const confsmoe_imputer *imp, const plan_sizes *z, uint64_t **rank)
{
    imputer_saved view = {0};
    csm_layout l = csm_layout_measure();
    size_t bytes;
    imputer_saved_parts(&l, imp, z, &view, rank);
    char *block = csm_layout_size(&l, &bytes) ? csm_alloc(imp->ctx, bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    imputer_saved *s = imputer_saved_parts(&l, imp, z, &view, rank);
    *s = view;
    s->base.ctx = csm_ctx_retain(imp->ctx);
    s->base.owner = imp;
    s->base.release = imputer_release_saved;
    s->n_pairs = z->n_pairs;
    s->n_samples = z->n_samples;
    s->nq = z->nq;
    s->nk = z->nk;
    s->na = z->na;
    s->max_block = z->max_block;
    s->max_cand = z->max_cand;
    return s;
}

/* ------------------------------------------------------------------ stage 2: forward */

static confsmoe_status imputer_check_forward(confsmoe_imputer *imp, const confsmoe_tensor *h,
                                             const confsmoe_tensor *slots, const confsmoe_tensor *avail,
                                             const confsmoe_tensor *out, bool finite)
{
    static const char fn[] = "imputer_forward";
    confsmoe_ctx *ctx = imp->ctx;
    const int64_t M = imp->p.n_modalities, L = imp->offset[M], d = imp->p.d;
    const int64_t h_dims[3] = {-1, L, d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "h", h, CONFSMOE_F32, 3, h_dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t B = h->dims[0], out_dims[3] = {B, L, d};
    if ((s = csm_imputer_expect_slots(imp, fn, "slots", slots, B)) != CONFSMOE_OK ||
        (s = imputer_check_avail(ctx, fn, avail, B, M)) != CONFSMOE_OK ||
        (s = csm_expect_tensor(ctx, fn, "out", out, CONFSMOE_F32, 3, out_dims)) != CONFSMOE_OK)
        return s;
    if (!finite)
        return CONFSMOE_OK;
    if ((s = csm_expect_finite(ctx, fn, "h", h)) != CONFSMOE_OK)
        return s;
    return csm_expect_finite(ctx, fn, "slots", slots);
}

/* Lists the missing pairs and per-sample plans, and gathers the candidates' slot rows
 * (slot-major per sample), the missing tokens' mean slot and their h rows. */
typedef struct {
    const confsmoe_imputer *imp;
    imputer_saved *s;
    const uint8_t *avail;
    const float *h, *slots;
} gather_task;

/* Each sample's rows of x_pre and ybar, and its candidates' slot rows. */
static void imputer_gather_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const gather_task *t = arg;
    const confsmoe_imputer *imp = t->imp;
    imputer_saved *s = t->s;
    const int64_t M = imp->p.n_modalities, L = imp->offset[M], k = imp->p.k, d = imp->p.d, B = s->B;
    for (int64_t i = first; i < last; i++) {
        const sample_plan *plan = &s->plans[i];
        const int64_t b = s->pairs[plan->first_pair].b;
        for (int64_t p = plan->first_pair; p < plan->first_pair + plan->n_pairs; p++) {
            const int64_t m = s->pairs[p].m, q_row = s->pairs[p].q_row;
            for (int64_t tok = 0; tok < imp->tokens[m]; tok++) {
                const int64_t r = q_row + tok;
                /* x_pre starts as the residual h, or as 0 when the row becomes Ihat alone. */
                if (imp->p.writeback == CONFSMOE_WRITEBACK_LN_IMP)
                    memcpy(s->x_pre + r * d, t->h + (b * L + imp->offset[m] + tok) * d, (size_t)d * sizeof(float));
                else
                    memset(s->x_pre + r * d, 0, (size_t)d * sizeof(float));
                /* Mean over the k slots, in double. */
                const float *y = t->slots + (B * imp->offset[m] + b * imp->tokens[m] + tok) * k * d;
                for (int64_t c = 0; c < d; c++) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < k; j++)
                        sum += y[j * d + c];
                    s->ybar[r * d + c] = (float)(sum / (double)k);
                }
            }
        }
        /* Candidates: the S_m tokens of every present modality, by modality then token. */
        const uint8_t *av = t->avail + b * M;
        for (int64_t j = 0; j < k; j++) {
            int64_t c = 0;
            for (int64_t m = 0; m < M; m++) {
                if (!av[m])
                    continue;
                for (int64_t tok = 0; tok < imp->tokens[m]; tok++, c++) {
                    const int64_t src = (B * imp->offset[m] + b * imp->tokens[m] + tok) * k + j;
                    const int64_t dst = plan->kv_row + j * plan->n_cand + c;
                    s->src_row[dst] = src;
                    memcpy(s->g + dst * d, t->slots + src * d, (size_t)d * sizeof(float));
                }
            }
        }
    }
}

/* The plan of every sample with a missing modality, then its rows on the ctx's threads. */
static void imputer_gather(const confsmoe_imputer *imp, imputer_saved *s, const uint8_t *avail, const float *h,
                           const float *slots)
{
    const int64_t M = imp->p.n_modalities, L = imp->offset[M], k = imp->p.k, B = s->B;
    int64_t pair = 0, q_row = 0, sample = 0, kv_row = 0, att = 0;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *av = avail + b * M;
        int64_t missing = 0, n_query = 0;
        for (int64_t m = 0; m < M; m++)
            if (!av[m]) {
                missing++;
                n_query += imp->tokens[m];
            }
        if (missing == 0)
            continue;
        sample_plan *plan = &s->plans[sample++];
        plan->q_row = q_row;
        plan->n_query = n_query;
        plan->n_cand = L - n_query;
        plan->kv_row = kv_row;
        plan->att = att;
        plan->first_pair = pair;
        plan->n_pairs = missing;
        for (int64_t m = 0; m < M; m++) {
            if (av[m])
                continue;
            /* compat: the reference's query is zeros unless sample 0 of the call misses m. */
            s->pairs[pair++] = (missing_pair){b, q_row, (int32_t)m, imp->p.compat && avail[m]};
            q_row += imp->tokens[m];
        }
        kv_row += k * plan->n_cand;
        att += k * plan->n_query * plan->n_cand;
    }
    gather_task task = {imp, s, avail, h, slots};
    csm_parallel_for(imp->ctx, sample, 1, imputer_gather_task, &task);
}

/* The top-T selection's total order as one integer per candidate, larger first: the weight's
 * bits made monotonic (-0 counted as +0; NaN, possible only with finite checks off, lowest),
 * then the index inverted, so that of two equal weights the lower index ranks first. No two
 * candidates tie, so the kept set is the one a full sort would keep. */
static inline uint64_t rank_key(float weight, int64_t index)
{
    weight += 0.0f; /* -0 -> +0 */
    uint32_t bits;
    memcpy(&bits, &weight, sizeof bits);
    const uint32_t order = (bits & 0x7FFFFFFFu) > 0x7F800000u ? 0u : bits >> 31 ? ~bits : bits | 0x80000000u;
    return (uint64_t)order << 32 | (uint32_t)~(uint32_t)index;
}

/* The kept-th largest of the n distinct values a[0..n-1] (0 < kept <= n), which it reorders:
 * quickselect with a branch-free partition (the comparisons are data-dependent, so a branch
 * would be mispredicted half the time). */
static uint64_t kth_largest(uint64_t *a, int64_t n, int64_t kept)
{
    const int64_t target = kept - 1;
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        const uint64_t pivot = a[mid];
        a[mid] = a[hi];
        a[hi] = pivot;
        int64_t at = lo;
        for (int64_t i = lo; i < hi; i++) {
            /* a[lo .. at - 1] are larger than the pivot, a[at .. i - 1] smaller. */
            const uint64_t v = a[i];
            a[i] = a[at];
            a[at] = v;
            at += v > pivot;
        }
        a[hi] = a[at];
        a[at] = pivot;
        if (at == target)
            return pivot;
        if (at < target)
            lo = at + 1;
        else
            hi = at - 1;
    }
    return a[lo];
}

/* Marks the top `kept` of one softmax row p[L] and writes their weights (others 0). rank holds
 * L keys. */
static void keep_top(const float *p, int64_t L, int64_t kept, bool renormalize, uint64_t *rank, uint8_t *keep, float *w)
{
    if (kept >= L) {
        memset(keep, 1, (size_t)L);
    } else {
        for (int64_t c = 0; c < L; c++)
            rank[c] = rank_key(p[c], c);
        const uint64_t threshold = kth_largest(rank, L, kept);
        for (int64_t c = 0; c < L; c++)
            keep[c] = rank_key(p[c], c) >= threshold;
    }
    double sum = 0.0;
    for (int64_t c = 0; c < L; c++)
        sum += keep[c] ? p[c] : 0.0f;
    const float scale = renormalize ? (float)(1.0 / sum) : 1.0f;
    for (int64_t c = 0; c < L; c++)
        w[c] = keep[c] ? p[c] * scale : 0.0f;
}

typedef struct {
    const confsmoe_imputer *imp;
    imputer_saved *s;
    uint64_t *rank;  /* [workers, max L_b] */
} attend_task;

/* The attention of samples first .. last - 1 (each writes only its own rows of p, w, keep and
 * x_pre), on worker `worker`'s ranking scratch. */
static void imputer_attend_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attend_task *t = arg;
    const confsmoe_imputer *imp = t->imp;
    imputer_saved *s = t->s;
    const int64_t k = imp->p.k, d = imp->p.d;
    const float scale = 1.0f / sqrtf((float)d);
    uint64_t *rank = t->rank + (size_t)worker * (size_t)s->max_cand;
    for (int64_t i = first; i < last; i++) {
        const sample_plan *plan = &s->plans[i];
        const int64_t nq = plan->n_query, L = plan->n_cand;
        /* No other modality present: nothing to attend to, Ihat = 0 (the rows get LN(h), or 0). */
        if (L == 0)
            continue;
        const float *q = s->q + plan->q_row * d;
        float *x_pre = s->x_pre + plan->q_row * d;
        for (int64_t j = 0; j < k; j++) {
            const int64_t cand = plan->kv_row + j * L, at = plan->att + j * nq * L;
            float *p = s->p + at, *w = s->w + at;
            csm_gemm(imp->ctx, false, true, nq, L, d, scale, q, s->kv + cand * d, 0.0f, p);
            csm_softmax_rows(p, nq, L);
            /* Each missing m keeps its own T_m, capped at L_b. */
            for (int64_t i = plan->first_pair; i < plan->first_pair + plan->n_pairs; i++) {
                const missing_pair *pair = &s->pairs[i];
                const int64_t kept = imp->top_t[pair->m] < L ? imp->top_t[pair->m] : L;
                for (int64_t r = pair->q_row - plan->q_row; r < pair->q_row - plan->q_row + imp->tokens[pair->m]; r++)
                    keep_top(p + r * L, L, kept, imp->p.renormalize, rank, s->keep + at + r * L, w + r * L);
            }
            /* Ihat += W V with the masked weights: T of the L columns are non-zero. */
            csm_gemm(imp->ctx, false, false, nq, d, L, 1.0f, w, s->v + cand * d, 1.0f, x_pre);
        }
    }
}

/* Queries, keys, values, attention and x_pre = h + Ihat (Ihat with the residual write-back),
 * for every missing token. */
static void imputer_attend(const confsmoe_imputer *imp, imputer_saved *s, uint64_t *rank)
{
    const int64_t d = imp->p.d;
    /* One GEMM per projection over all rows: Q = ybar Wq^T + bq, KV = G Wk^T + bk, V = G Wv^T + bv. */
    csm_pass_broadcast_rows(imp->ctx, s->q, csm_f32(imp->param[Q_B]), s->nq, d);
    csm_gemm(imp->ctx, false, true, s->nq, d, d, 1.0f, s->ybar, csm_f32(imp->param[Q_W]), 1.0f, s->q);
    for (int64_t i = 0; i < s->n_pairs; i++)
        if (s->pairs[i].zero_query)
            memset(s->q + s->pairs[i].q_row * d, 0, (size_t)(imp->tokens[s->pairs[i].m] * d) * sizeof(float));
    csm_pass_broadcast_rows(imp->ctx, s->kv, csm_f32(imp->param[KV_B]), s->nk, d);
    csm_gemm(imp->ctx, false, true, s->nk, d, d, 1.0f, s->g, csm_f32(imp->param[KV_W]), 1.0f, s->kv);
    if (imp->p.separate_value) {
        csm_pass_broadcast_rows(imp->ctx, s->v, csm_f32(imp->param[V_B]), s->nk, d);
        csm_gemm(imp->ctx, false, true, s->nk, d, d, 1.0f, s->g, csm_f32(imp->param[V_W]), 1.0f, s->v);
    }
    attend_task task = {imp, s, rank};
    csm_parallel_for(imp->ctx, s->n_samples, 1, imputer_attend_task, &task);
}

static confsmoe_status imputer_forward(confsmoe_imputer *imp, const confsmoe_tensor *h, const confsmoe_tensor *slots,
                                       const confsmoe_tensor *avail, confsmoe_tensor *out, confsmoe_saved **saved,
                                       bool finite)
{
    if (!imp)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "imputer_forward";
    confsmoe_ctx *ctx = imp->ctx;
    if (saved)
        *saved = NULL;
    confsmoe_status st = imputer_check_forward(imp, h, slots, avail, out, finite);
    if (st != CONFSMOE_OK)
        return st;
    const int64_t B = h->dims[0], d = imp->p.d;
    plan_sizes z;
    imputer_saved *s = NULL;
    uint64_t *rank = NULL;
    if (imputer_count_plan(imp, avail->data, B, &z))
        s = imputer_alloc_saved(imp, &z, &rank);
    if (!s)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for B=%" PRId64 " with %" PRId64 " missing pairs", fn,
                        B, z.n_pairs);
    s->B = B;
    /* Everything is read from h and slots before out (which may be h) is written. */
    imputer_gather(imp, s, avail->data, csm_f32(h), csm_f32(slots));
    imputer_attend(imp, s, rank);

    if (out->data != h->data && h->nbytes > 0)
        memmove(out->data, h->data, h->nbytes);
    const bool ln = imp->p.writeback == CONFSMOE_WRITEBACK_LN_IMP;
    const float *gamma = ln ? csm_f32(imp->param[LN_W]) : NULL, *beta = ln ? csm_f32(imp->param[LN_B]) : NULL;
    const int64_t L = imp->offset[imp->p.n_modalities];
    for (int64_t i = 0; i < s->n_pairs; i++) {
        const int64_t r = s->pairs[i].q_row, S = imp->tokens[s->pairs[i].m];
        float *dst = csm_f32(out) + (s->pairs[i].b * L + imp->offset[s->pairs[i].m]) * d;
        if (!ln) {
            memcpy(dst, s->x_pre + r * d, (size_t)(S * d) * sizeof(float));
        } else if (imp->p.compat) {
            /* compat: the reference normalised imputed rows twice with the same LayerNorm. */
            csm_layernorm_forward(s->x_pre + r * d, gamma, beta, s->y1 + r * d, s->mean1 + r, s->rstd1 + r, S, d,
                                  LN_EPS);
            csm_layernorm_forward(s->y1 + r * d, gamma, beta, dst, s->mean2 + r, s->rstd2 + r, S, d, LN_EPS);
        } else {
            csm_layernorm_forward(s->x_pre + r * d, gamma, beta, dst, s->mean1 + r, s->rstd1 + r, S, d, LN_EPS);
        }
    }
    if (saved)
        *saved = &s->base;
    else
        s->base.release(&s->base);
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_imputer_forward(confsmoe_imputer *imp, const confsmoe_tensor *h,
                                         const confsmoe_tensor *slots, const confsmoe_tensor *avail,
                                         confsmoe_tensor *out, confsmoe_saved **saved)
{
    return imputer_forward(imp, h, slots, avail, out, saved, true);
}

confsmoe_status csm_imputer_forward_trusted(confsmoe_imputer *imp, const confsmoe_tensor *h,
                                            const confsmoe_tensor *slots, const confsmoe_tensor *avail,
                                            confsmoe_tensor *out, confsmoe_saved **saved)
{
    return imputer_forward(imp, h, slots, avail, out, saved, false);
}
