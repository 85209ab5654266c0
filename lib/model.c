/* The full Conf-SMoE classifier (docs/MODEL.md, section 6), composed from the public expert,
 * gate and imputer handles plus its own encoders, attention, LayerNorms and readout: its
 * creation, parameter list and pools, and one call's workspace, forward and backward.
 * model_step.c checks a call's arguments, lays out its draws and runs step and predict;
 * attention.c computes the attention, stage1.c stage 1 and loss.c the task loss. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "attention.h"
#include "expert.h"
#include "gate.h"
#include "imputer.h"
#include "internal.h"
#include "kernels.h"
#include "layout.h"
#include "model.h"
#include "params.h"
#include "passes.h"
#include "sized.h"
#include "stage1.h"
#include "threads.h"

#define LN_EPS 1e-5f

/* ------------------------------------------------------------------ parameters */

static void model_defaults(confsmoe_model_params *p)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->tokens = 1;
    p->d = 128;
    p->heads = 4;
    p->n_experts = 8;
    p->k = 2;
    p->gate = CONFSMOE_MODEL_GATE_CONFIDENCE;
    p->load_loss = CONFSMOE_LOAD_LOSS_NONE;
    p->load_loss_weight = 0.01f;
    p->conf_loss_weight = 1.0f;
    p->confidence = CONFSMOE_CONFIDENCE_TOKEN;
    p->router_grad = CONFSMOE_ROUTER_GRAD_FROZEN;
    p->imputation = CONFSMOE_IMPUTE_TWO_STAGE;
    p->draws = 10;
    p->dropout = 0.1f;
}

void confsmoe_model_params_init_sized(confsmoe_model_params *p, size_t struct_size)
{
    confsmoe_model_params defaults;
    model_defaults(&defaults);
    csm_sized_init(p, struct_size, &defaults, sizeof defaults, CSM_MODEL_PARAMS_MIN);
}

size_t confsmoe_sizeof_model_params(void) { return sizeof(confsmoe_model_params); }

static confsmoe_status model_check_params(confsmoe_ctx *ctx, const confsmoe_model_params *p)
{
    static const char fn[] = "model_create";
    if (p->n_modalities < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: n_modalities is %" PRId32 ", must be >= 1", fn,
                        p->n_modalities);
    if (!p->features)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: features is NULL", fn);
    for (int32_t m = 0; m < p->n_modalities; m++)
        if (p->features[m] < 1)
            return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: features[%" PRId32 "] is %" PRId64 ", must be >= 1", fn, m,
                            p->features[m]);
    if ((!p->modality_tokens && p->tokens < 1) || p->d < 1 || p->expert_hidden < 0)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: tokens and d must be >= 1 and expert_hidden >= 0", fn);
    /* L = sum_m S_m tokens and the M d readout input are computed in int64 below (found by tests/fuzz). */
    int64_t L;
    const confsmoe_status st = csm_total_tokens(ctx, fn, p->n_modalities, p->tokens, p->modality_tokens, &L);
    if (st != CONFSMOE_OK)
        return st;
    if (p->d > INT64_MAX / p->n_modalities)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: n_modalities x d overflows", fn);
    if (p->n_experts < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: n_experts is %" PRId32 ", must be >= 1", fn,
                        p->n_experts);
    /* The parameter list counts in int32 (params.h). */
    if (2 * (int64_t)p->n_modalities + 8 * (int64_t)p->n_experts + 64 > INT32_MAX)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: too many modalities or experts", fn);
    if (p->heads < 1 || p->d % p->heads != 0)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: heads=%" PRId32 " must divide d=%" PRId64, fn, p->heads, p->d);
    if (p->n_classes < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: n_classes is %" PRId32 ", must be >= 1", fn,
                        p->n_classes);
    if (p->gate < CONFSMOE_MODEL_GATE_CONFIDENCE || p->gate > CONFSMOE_MODEL_GATE_LAPLACIAN)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown gate %" PRId32, fn, p->gate);
    if (p->imputation != CONFSMOE_IMPUTE_TWO_STAGE && p->imputation != CONFSMOE_IMPUTE_MEAN)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown imputation %" PRId32, fn, p->imputation);
    if (p->draws < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: draws is %" PRId32 ", must be >= 1", fn, p->draws);
    if (!(p->dropout >= 0.0f && p->dropout < 1.0f))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: dropout must be in [0, 1)", fn);
    if ((p->multilabel != 0 && p->multilabel != 1) || (p->compat != 0 && p->compat != 1))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: multilabel and compat must be 0 or 1", fn);
    if (!(p->modality_dropout >= 0.0f && p->modality_dropout <= 1.0f))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: modality_dropout is %g, must be in [0, 1]", fn,
                        (double)p->modality_dropout);
    if (p->predict_pool_mean != 0 && p->predict_pool_mean != 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: predict_pool_mean is %" PRId32 ", must be 0 or 1", fn,
                        p->predict_pool_mean);
    /* The gate and the imputer check the rest of their options when they are created; the
     * write-back also here, as there is no imputer with mean imputation. */
    return csm_check_writeback(ctx, fn, p->writeback);
}

static confsmoe_status model_new_layernorm(confsmoe_model *model, const char *name, model_layernorm *ln)
{
    char buf[CSM_PARAM_NAME_CAP];
    snprintf(buf, sizeof buf, "%s.weight", name);
    confsmoe_status s = csm_params_new(model->ctx, &model->params, buf, 1, model->p.d, 0, &ln->weight);
    snprintf(buf, sizeof buf, "%s.bias", name);
    if (s == CONFSMOE_OK)
        s = csm_params_new(model->ctx, &model->params, buf, 1, model->p.d, 0, &ln->bias);
    if (s == CONFSMOE_OK)
        for (int64_t i = 0; i < model->p.d; i++)
            csm_f32(ln->weight)[i] = 1.0f;
    return s;
}

void confsmoe_model_destroy(confsmoe_model *model)
{
    if (!model)
        return;
    confsmoe_ctx *ctx = model->ctx;
    csm_params_free(ctx, &model->params);
    confsmoe_imputer_destroy(model->imputer);
    confsmoe_gate_destroy(model->gate);
    for (int32_t e = 0; model->experts && e < model->p.n_experts; e++)
        confsmoe_expert_destroy(model->experts[e]);
    csm_pools_free(ctx, &model->pools);
    csm_free(ctx, model->experts);
    csm_free(ctx, model->enc);
    csm_free(ctx, model->ws_cache);
    csm_free(ctx, model->grad_cache);
    csm_free(ctx, model->arena.base);
    csm_free(ctx, model->features);
    csm_free(ctx, model);
    csm_ctx_release(ctx);
}

static confsmoe_status model_build(confsmoe_model *model)
{
    confsmoe_ctx *ctx = model->ctx;
    const confsmoe_model_params *p = &model->p;
    const int32_t M = p->n_modalities, E = p->n_experts;
    const int64_t d = p->d, hidden = p->expert_hidden ? p->expert_hidden : p->d;
    char name[CSM_PARAM_NAME_CAP];
    confsmoe_status s;

    model->enc = csm_calloc(ctx, (size_t)M, sizeof *model->enc);
    model->experts = csm_calloc(ctx, (size_t)E, sizeof *model->experts);
    if (!model->enc || !model->experts || csm_pools_init(ctx, &model->pools, M) != CONFSMOE_OK)
        return CONFSMOE_E_NOMEM;

    for (int32_t m = 0; m < M; m++) {
        snprintf(name, sizeof name, "enc.%" PRId32, m);
        if ((s = csm_linear_new(ctx, &model->params, name, model->features[m], d, &model->enc[m])) != CONFSMOE_OK)
            return s;
    }
    if ((s = csm_params_new(ctx, &model->params, "pos", 2, model->tokens_total, d, &model->pos)) != CONFSMOE_OK ||
        (s = model_new_layernorm(model, "ln1", &model->ln1)) != CONFSMOE_OK ||
        (s = csm_linear_new(ctx, &model->params, "attn.q", d, d, &model->q)) != CONFSMOE_OK ||
        (s = csm_linear_new(ctx, &model->params, "attn.k", d, d, &model->k)) != CONFSMOE_OK ||
        (s = csm_linear_new(ctx, &model->params, "attn.v", d, d, &model->v)) != CONFSMOE_OK ||
        (s = csm_linear_new(ctx, &model->params, "attn.o", d, d, &model->o)) != CONFSMOE_OK ||
        (s = model_new_layernorm(model, "ln2", &model->ln2)) != CONFSMOE_OK ||
        (s = model_new_layernorm(model, "ln3", &model->ln3)) != CONFSMOE_OK)
        return s;

    for (int32_t e = 0; e < E; e++) {
        if ((s = confsmoe_expert_create(ctx, d, hidden, &model->experts[e])) != CONFSMOE_OK)
            return s;
        snprintf(name, sizeof name, "expert.%" PRId32, e);
        if ((s = csm_params_borrow_all(ctx, &model->params, name, csm_expert_param_list(model->experts[e]))) !=
            CONFSMOE_OK)
            return s;
    }
    confsmoe_gate_params gp;
    confsmoe_gate_params_init(&gp);
    static const int32_t routers[] = {CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_GAUSSIAN,
                                      CONFSMOE_ROUTER_LAPLACIAN};
    gp.d = d;
    gp.k = p->k;
    gp.router = routers[p->gate];
    gp.noisy = p->noisy;
    gp.combine = p->gate == CONFSMOE_MODEL_GATE_CONFIDENCE ? CONFSMOE_COMBINE_CONFIDENCE
                                                           : CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    gp.confidence = p->confidence;
    gp.n_classes = p->n_classes;
    gp.target = p->multilabel ? CONFSMOE_TARGET_MULTI_LABEL : CONFSMOE_TARGET_SINGLE_LABEL;
    gp.detach_target = p->detach_target;
    gp.router_grad = p->router_grad;
    gp.load_loss = p->load_loss;
    gp.load_loss_weight = p->load_loss_weight;
    gp.conf_loss_weight = p->conf_loss_weight;
    gp.compat = p->compat;
    if ((s = confsmoe_gate_create(ctx, &gp, model->experts, E, &model->gate)) != CONFSMOE_OK ||
        (s = csm_params_borrow_all(ctx, &model->params, "gate", csm_gate_param_list(model->gate))) != CONFSMOE_OK)
        return s;
    if (p->imputation == CONFSMOE_IMPUTE_TWO_STAGE) {
        confsmoe_imputer_params ip;
        confsmoe_imputer_params_init(&ip);
        ip.d = d;
        ip.n_modalities = M;
        ip.tokens = p->tokens;
        ip.modality_tokens = model->tokens;
        ip.k = p->k;
        ip.top_t = p->top_t;
        ip.renormalize = p->renormalize;
        ip.separate_value = p->separate_value;
        ip.compat = p->compat;
        ip.writeback = p->writeback;
        if ((s = confsmoe_imputer_create(ctx, &ip, &model->imputer)) != CONFSMOE_OK ||
            (s = csm_params_borrow_all(ctx, &model->params, "imputer", csm_imputer_param_list(model->imputer))) !=
                CONFSMOE_OK)
            return s;
    }
    if ((s = csm_linear_new(ctx, &model->params, "readout", (int64_t)M * d, d, &model->readout)) != CONFSMOE_OK ||
        (s = model_new_layernorm(model, "ln_out", &model->ln_out)) != CONFSMOE_OK ||
        (s = csm_linear_new(ctx, &model->params, "head", d, p->n_classes, &model->head)) != CONFSMOE_OK)
        return s;
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_model_create(confsmoe_ctx *ctx, const confsmoe_model_params *p, confsmoe_model **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out || !p)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "model_create: %s is NULL",
                        !ctx ? "ctx" : !out ? "out" : "params");
    /* The caller's struct, of any accepted size, over the defaults (docs/API.md, "Struct versioning"). */
    confsmoe_model_params full;
    model_defaults(&full);
    confsmoe_status s = csm_sized_read(ctx, "model_create", "confsmoe_model_params", p, &full, sizeof full,
                                       CSM_MODEL_PARAMS_MIN);
    p = &full;
    if (s == CONFSMOE_OK)
        s = model_check_params(ctx, p);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_model *model = csm_calloc(ctx, 1, sizeof *model);
    if (!model)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "model_create: out of memory");
    model->ctx = csm_ctx_retain(ctx);
    model->p = *p;
    /* F_m, S_m and the token offsets o_m in one block. */
    const int32_t M = p->n_modalities;
    model->features = csm_calloc(ctx, 3 * (size_t)M + 1, sizeof *model->features);
    if (model->features) {
        memcpy(model->features, p->features, (size_t)M * sizeof *model->features);
        model->p.features = model->features;
        model->tokens = model->features + M;
        model->token_offset = model->tokens + M;
        for (int32_t m = 0; m < M; m++) {
            model->tokens[m] = p->modality_tokens ? p->modality_tokens[m] : p->tokens;
            model->token_offset[m + 1] = model->token_offset[m] + model->tokens[m];
            model->max_tokens = model->tokens[m] > model->max_tokens ? model->tokens[m] : model->max_tokens;
        }
        model->tokens_total = model->token_offset[M];
        model->p.modality_tokens = model->tokens;
    }
    const uint64_t rng_at_entry = csm_rng_tell(ctx);
    s = model->features ? model_build(model) : CONFSMOE_E_NOMEM;
    if (s != CONFSMOE_OK) {
        /* A failed call changes no state: the RNG goes back to where it was (as in gate_create). */
        csm_rng_seek(ctx, rng_at_entry);
        /* The child's own message is more precise, unless it was a bare allocation failure here. */
        char detail[CSM_ERROR_CAP];
        snprintf(detail, sizeof detail, "%s", ctx->last_error);
        confsmoe_model_destroy(model);
        return csm_fail(ctx, s, "model_create: %s",
                        s == CONFSMOE_E_NOMEM ? "out of memory" : detail);
    }
    *out = model;
    return CONFSMOE_OK;
}

int32_t confsmoe_model_n_params(const confsmoe_model *model) { return model ? model->params.count : -1; }

const char *confsmoe_model_param_name(const confsmoe_model *model, int32_t i)
{
    return model ? csm_params_name(&model->params, i) : NULL;
}

confsmoe_tensor *confsmoe_model_param(confsmoe_model *model, int32_t i)
{
    return model ? csm_params_param(&model->params, i) : NULL;
}

confsmoe_tensor *confsmoe_model_grad(confsmoe_model *model, int32_t i)
{
    return model ? csm_params_grad(&model->params, i) : NULL;
}

void confsmoe_model_zero_grad(confsmoe_model *model)
{
    if (model)
        csm_params_zero_grad(&model->params);
}

confsmoe_gate *confsmoe_model_gate(confsmoe_model *model) { return model ? model->gate : NULL; }

/* ------------------------------------------------------------------ pools (stage1.h) */

confsmoe_status confsmoe_model_set_pool(confsmoe_model *model, int32_t m, const confsmoe_tensor *pool)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "model_set_pool";
    confsmoe_ctx *ctx = model->ctx;
    if (m < 0 || m >= model->p.n_modalities)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: modality %" PRId32 " out of range 0..%" PRId32, fn, m,
                        model->p.n_modalities - 1);
    const int64_t S = model->tokens[m], F = model->features[m];
    const int64_t dims3[3] = {-1, S, F}, dims2[2] = {-1, F};
    confsmoe_status s = pool && pool->ndim == 2 && S == 1
                            ? csm_expect_tensor(ctx, fn, "pool", pool, CONFSMOE_F32, 2, dims2)
                            : csm_expect_tensor(ctx, fn, "pool", pool, CONFSMOE_F32, 3, dims3);
    if (s != CONFSMOE_OK)
        return s;
    if (pool->dims[0] < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: the pool of modality %" PRId32 " has no rows", fn, m);
    if ((s = csm_expect_finite(ctx, fn, "pool", pool)) != CONFSMOE_OK)
        return s;
    return csm_pools_set(ctx, fn, &model->pools, m, csm_f32(pool), pool->dims[0], S * F);
}

/* ------------------------------------------------------------------ workspace */

/* A block of at least `need` bytes from the model's cache (allocated or grown on demand). */
static void *model_cached_block(confsmoe_model *model, void **cache, size_t *size, size_t need)
{
    if (*cache && *size >= need)
        return *cache;
    void *block = csm_alloc(model->ctx, need);
    if (!block)
        return NULL;
    csm_free(model->ctx, *cache);
    *cache = block;
    *size = need;
    return block;
}

/* The arrays of one call's workspace (layout.h). */
static void model_workspace_parts(csm_layout *l, const confsmoe_model *model, workspace *w)
{
    const confsmoe_model_params *p = &model->p;
    const size_t M = (size_t)p->n_modalities, S = (size_t)model->max_tokens, d = (size_t)p->d;
    const size_t L = (size_t)model->tokens_total, k = (size_t)p->k, C = (size_t)p->n_classes, b = (size_t)w->B;
    w->x = CSM_LAYOUT_ARRAY(l, float *, M);
    for (size_t m = 0; m < M; m++) {
        float *x = CSM_LAYOUT_ROWS(l, float, b * (size_t)model->tokens[m], (size_t)model->features[m]);
        if (w->x) /* placed */
            w->x[m] = x;
    }
    w->tok = CSM_LAYOUT_ROWS(l, float, b * S, d);
    w->X = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->Xn = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->ln1_stats = CSM_LAYOUT_ARRAY(l, float, 2 * b * L);
    w->Q = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->K = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->V = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->ctx_ = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->scratch = CSM_LAYOUT_ROWS(l, float, w->scratch_stride, (size_t)w->workers);
    w->Hm = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->sum_ = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->ln2_stats = CSM_LAYOUT_ARRAY(l, float, 2 * b * L);
    w->ln3_stats = CSM_LAYOUT_ARRAY(l, float, 2 * b * L);
    w->Z = CSM_LAYOUT_ROWS(l, float, b * S, d);
    w->F = CSM_LAYOUT_ROWS(l, float, b * S, d);
    w->H2 = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->slots = CSM_LAYOUT_ROWS(l, float, b * L * k, d);
    w->pooled = CSM_LAYOUT_ROWS(l, float, b * M, d);
    w->r = CSM_LAYOUT_ROWS(l, float, b, d);
    w->rn = CSM_LAYOUT_ROWS(l, float, b, d);
    w->ln_out_stats = CSM_LAYOUT_ARRAY(l, float, 2 * b);
    w->logits = CSM_LAYOUT_ROWS(l, float, b, C);
    w->tok_labels = CSM_LAYOUT_ARRAY(l, int32_t, b * S);
    w->tok_multi_labels = CSM_LAYOUT_ROWS(l, uint8_t, b * S, C);
    w->tok_present = CSM_LAYOUT_ARRAY(l, uint8_t, b * S);
    w->avail = CSM_LAYOUT_ARRAY(l, uint8_t, b * M);
    w->gate_weight = CSM_LAYOUT_ARRAY(l, float, M);
    w->gate_saved = CSM_LAYOUT_ARRAY(l, confsmoe_saved *, M);
    /* Backward reads forward's attention draws rather than drawing them again: 1 byte per
     * weight (23 MB at the paper's batch) against the draws' share of a step. */
    w->attn_keep = w->dropout ? CSM_LAYOUT_ROWS(l, uint8_t, b * (size_t)p->heads, L * L) : NULL;
    w->attn_weights = w->training && csm_attention_keeps_weights(model->tokens_total, p->d, p->heads)
                          ? CSM_LAYOUT_ROWS(l, float, b * (size_t)p->heads, L * L)
                          : NULL;
}

void *csm_model_workspace_alloc(confsmoe_model *model, int64_t B, bool training, workspace *w)
{
    memset(w, 0, sizeof *w);
    w->B = B;
    w->training = training;
    w->dropout = training && model->p.dropout > 0.0f;
    w->workers = csm_parallel_workers(model->ctx, B);
    w->scratch_stride = csm_attention_scratch_floats(model->tokens_total, model->p.d);
    csm_layout l = csm_layout_measure();
    size_t bytes;
    model_workspace_parts(&l, model, w);
    char *block = csm_layout_size(&l, &bytes)
                      ? model_cached_block(model, &model->ws_cache, &model->ws_cache_size, bytes)
                      : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    model_workspace_parts(&l, model, w);
    memset(w->gate_saved, 0, (size_t)model->p.n_modalities * sizeof *w->gate_saved);
    return block;
}

/* The saved handles of the call; the block itself stays in the model's cache. */
void csm_model_workspace_release(confsmoe_model *model, workspace *w)
{
    for (int32_t m = 0; w->gate_saved && m < model->p.n_modalities; m++)
        confsmoe_saved_destroy(w->gate_saved[m]);
    confsmoe_saved_destroy(w->imputer_saved);
}

/* ------------------------------------------------------------------ small layers */

static void model_layernorm_forward(confsmoe_model *model, const model_layernorm *ln, const float *x, int64_t rows,
                                    int64_t d, float *y, float *stats)
{
    csm_pass_layernorm_forward(model->ctx, x, csm_f32(ln->weight), csm_f32(ln->bias), y, stats, stats + rows, rows,
                               d, LN_EPS);
}

static void model_layernorm_backward(confsmoe_model *model, gradients *g, const model_layernorm *ln,
                                     const float *x, const float *stats, const float *dy, int64_t rows, int64_t d,
                                     float *dx, bool accumulate)
{
    const csm_params *params = &model->params;
    csm_pass_layernorm_backward(model->ctx, x, stats, stats + rows, csm_f32(ln->weight), dy, dx,
                                csm_f32(csm_params_grad_of(params, ln->weight)),
                                csm_f32(csm_params_grad_of(params, ln->bias)), rows, d, accumulate, g->ln_partials);
}

/* Rows (b, o_m + s) of a [B L, d] array <-> rows (b S_m + s) of a [B S_m, d] array. */
static void model_gather_modality(confsmoe_model *model, const float *all, float *one, int64_t B, int32_t m)
{
    const int64_t S = model->tokens[m], L = model->tokens_total, d = model->p.d, o = model->token_offset[m];
    csm_pass_copy_blocks(model->ctx, one, S * d, all + o * d, L * d, B, S * d);
}

static void model_scatter_modality(confsmoe_model *model, const float *one, float *all, int64_t B, int32_t m)
{
    const int64_t S = model->tokens[m], L = model->tokens_total, d = model->p.d, o = model->token_offset[m];
    csm_pass_copy_blocks(model->ctx, all + o * d, L * d, one, S * d, B, S * d);
}

/* ------------------------------------------------------------------ forward */

/* Wraps a host-visible view of workspace memory for a public-API call. */
static confsmoe_status model_wrap(confsmoe_model *model, confsmoe_dtype dtype, int32_t ndim, int64_t d0, int64_t d1,
                                  int64_t d2, int64_t d3, void *data, confsmoe_tensor **out)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    return confsmoe_tensor_wrap(model->ctx, dtype, ndim, dims, data, out);
}

/* Stage 1 (stage1.h), from the pools. */
static confsmoe_status model_stage_one(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                       const confsmoe_tensor *avail, workspace *w)
{
    return csm_stage1_fill_inputs(model->ctx, &model->pools, inputs, avail->data, w->B,
                                  csm_model_stage_one_draws(model, w->training), model->p.draws, w->draws.stage_one,
                                  w->first, w->x);
}

/* Each modality's gate call returns its own mean loss; weighting them by their share of the
 * present tokens of the global batch makes L_conf the mean over all its present slots, as in
 * docs/MODEL.md, section 6 (compat: the mean of the calls' means, each over all of its slots). */
static void model_gate_weights(confsmoe_model *model, const uint8_t *avail, workspace *w)
{
    const int32_t M = model->p.n_modalities;
    for (int32_t m = 0; m < M; m++) {
        int64_t present = 0;  /* present tokens of modality m in this shard */
        for (int64_t b = 0; b < w->B; b++)
            present += avail[b * M + m] * model->tokens[m];
        w->gate_weight[m] = model->p.compat ? 1.0f / (float)M * ((float)w->B / (float)w->global_B)
                            : w->global_present > 0 ? (float)present / (float)w->global_present
                                                    : 0.0f;
    }
}

/* Each token of modality m carries its sample's label. */
static void model_token_labels(confsmoe_model *model, const confsmoe_tensor *labels, workspace *w, int32_t m)
{
    const int64_t S = model->tokens[m], C = model->p.n_classes;
    for (int64_t b = 0; b < w->B; b++)
        for (int64_t s = 0; s < S; s++) {
            if (model->p.multilabel)
                memcpy(w->tok_multi_labels + (b * S + s) * C, (const uint8_t *)labels->data + b * C, (size_t)C);
            else
                w->tok_labels[b * S + s] = ((const int32_t *)labels->data)[b];
        }
}

static confsmoe_status model_moe_forward(confsmoe_model *model, const confsmoe_tensor *avail,
                                         const confsmoe_tensor *labels, workspace *w, float *aux)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, d = model->p.d, k = model->p.k;
    const uint8_t *a = avail->data;
    model_gate_weights(model, a, w);
    *aux = 0.0f;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        const int64_t S = model->tokens[m], rows = B * S, first_row = B * model->token_offset[m];
        float *Hm = w->Hm + first_row * d, *Z = w->Z, *F = w->F;
        float *sum = w->sum_ + first_row * d;
        if (labels)
            model_token_labels(model, labels, w, m);
        model_layernorm_forward(model, &model->ln2, Hm, rows, d, Z, w->ln2_stats + 2 * first_row);
        for (int64_t i = 0; i < rows; i++)
            w->tok_present[i] = a[(i / S) * M + m];
        float loss = 0.0f;
        /* The gate's noise follows the tokens' places in the global batch; the call reserves it
         * from the stream's position, which is its part of the table. */
        csm_rng_seek(model->ctx, w->draws.gate_noise + w->draws.gate_noise_per_token * (uint64_t)w->global_B *
                                                           (uint64_t)model->token_offset[m]);
        /* The gate's private entry: the model has checked its inputs, labels and shard. */
        const csm_gate_call call = {
            .n = rows,
            .x = Z,
            .present = w->tok_present,
            .labels = labels && !model->p.multilabel ? w->tok_labels : NULL,
            .multi_labels = labels && model->p.multilabel ? w->tok_multi_labels : NULL,
            .y = F,
            .slots = w->slots + first_row * k * d,
            .shard_first = w->first * S,
            .shard_total = w->global_B * S,
            .loss = &loss,
            .saved = w->training ? &w->gate_saved[m] : NULL,
        };
        s = csm_gate_forward_rows(model->gate, &call);
        if (s != CONFSMOE_OK)
            break;
        *aux += w->gate_weight[m] * loss;
        csm_pass_add(model->ctx, sum, Hm, F, rows, d);
        model_layernorm_forward(model, &model->ln3, sum, rows, d, w->tok, w->ln3_stats + 2 * first_row);
        model_scatter_modality(model, w->tok, w->H2, B, m);
    }
    csm_rng_seek(model->ctx, w->draws.end);
    return s;
}

/* The residual write-back (docs/MODEL.md, section 6): each missing (b, m) row of H2 holds Ihat
 * from the imputer and becomes LN3(H_m + Ihat); from then on sum_ and LN3's statistics of
 * that row are this LayerNorm's, for backward. The MoE output of the row is not used. */
static void model_residual_writeback(confsmoe_model *model, workspace *w)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, L = model->tokens_total, d = model->p.d;
    const float *gamma = csm_f32(model->ln3.weight), *beta = csm_f32(model->ln3.bias);
    for (int32_t m = 0; m < M; m++) {
        const int64_t S = model->tokens[m], rows = B * S, first_row = B * model->token_offset[m];
        float *stats = w->ln3_stats + 2 * first_row;
        for (int64_t b = 0; b < B; b++) {
            if (w->avail[b * M + m])
                continue;
            /* The S tokens of (b, m) are contiguous rows in every array. */
            float *sum = w->sum_ + (first_row + b * S) * d, *h = w->H2 + (b * L + model->token_offset[m]) * d;
            csm_add(sum, w->Hm + (first_row + b * S) * d, h, S * d);
            csm_layernorm_forward(sum, gamma, beta, h, stats + b * S, stats + rows + b * S, S, d, LN_EPS);
        }
    }
}

/* Columns summed at once by the readout's mean. */
#define MODEL_MEAN_COLS 64

/* Samples per task of the readout's loops. */
#define MODEL_READOUT_GRAIN 16

typedef struct {
    const confsmoe_model *model;
    workspace *w;
    gradients *g;
} model_readout_task;

/* pooled (b, m) = the mean of the S_m tokens of (b, m) in H2, each element summed in double
 * over the tokens in order. */
static void model_readout_mean_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const model_readout_task *t = arg;
    const confsmoe_model *model = t->model;
    const int32_t M = model->p.n_modalities;
    const int64_t L = model->tokens_total, d = model->p.d;
    for (int64_t b = first; b < last; b++)
        for (int32_t m = 0; m < M; m++) {
            const int64_t S = model->tokens[m];
            const float *h = t->w->H2 + (b * L + model->token_offset[m]) * d;
            float *out = t->w->pooled + (b * M + m) * d;
            for (int64_t c0 = 0; c0 < d; c0 += MODEL_MEAN_COLS) {
                const int64_t n = d - c0 < MODEL_MEAN_COLS ? d - c0 : MODEL_MEAN_COLS;
                double sum[MODEL_MEAN_COLS] = {0};
                for (int64_t s = 0; s < S; s++)
                    for (int64_t c = 0; c < n; c++)
                        sum[c] += h[s * d + c0 + c];
                for (int64_t c = 0; c < n; c++)
                    out[c0 + c] = (float)(sum[c] / (double)S);
            }
        }
}

/* The mean's gradient: every token of (b, m) gets dpooled (b, m) / S_m. */
static void model_readout_mean_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const model_readout_task *t = arg;
    const confsmoe_model *model = t->model;
    const int32_t M = model->p.n_modalities;
    const int64_t L = model->tokens_total, d = model->p.d;
    for (int64_t b = first; b < last; b++)
        for (int32_t m = 0; m < M; m++)
            for (int64_t s = 0; s < model->tokens[m]; s++)
                for (int64_t c = 0; c < d; c++)
                    t->g->dH3[(b * L + model->token_offset[m] + s) * d + c] =
                        t->g->dpooled[(b * M + m) * d + c] / (float)model->tokens[m];
}

static void model_readout_forward(confsmoe_model *model, workspace *w)
{
    const int64_t B = w->B, d = model->p.d;
    model_readout_task task = {model, w, NULL};
    csm_parallel_for(model->ctx, B, MODEL_READOUT_GRAIN, model_readout_mean_task, &task);
    csm_linear_forward(&model->readout, w->pooled, B, w->r);
    model_layernorm_forward(model, &model->ln_out, w->r, B, d, w->rn, w->ln_out_stats);
    csm_linear_forward(&model->head, w->rn, B, w->logits);
}

confsmoe_status csm_model_forward(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                  const confsmoe_tensor *avail, const confsmoe_tensor *labels, workspace *w,
                                  float *aux)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, L = model->tokens_total, d = model->p.d;
    confsmoe_status s = model_stage_one(model, inputs, avail, w);
    if (s != CONFSMOE_OK)
        return s;
    memcpy(w->avail, avail->data, (size_t)(B * M));
    for (int32_t m = 0; m < M; m++) {
        csm_linear_forward(&model->enc[m], w->x[m], B * model->tokens[m], w->tok);
        model_scatter_modality(model, w->tok, w->X, B, m);
    }
    csm_pass_add_rows(model->ctx, w->X, csm_f32(model->pos), B, L * d);
    model_layernorm_forward(model, &model->ln1, w->X, B * L, d, w->Xn, w->ln1_stats);
    csm_attention_forward(model, w);
    csm_residual_forward(model, w);
    if ((s = model_moe_forward(model, avail, labels, w, aux)) != CONFSMOE_OK)
        return s;
    if (model->imputer) {
        confsmoe_tensor *h = NULL, *slots = NULL, *out = NULL;
        s = model_wrap(model, CONFSMOE_F32, 3, B, L, d, 0, w->H2, &h);
        if (s == CONFSMOE_OK)
            s = model_wrap(model, CONFSMOE_F32, 3, B * L, model->p.k, d, 0, w->slots, &slots);
        if (s == CONFSMOE_OK)
            s = model_wrap(model, CONFSMOE_F32, 3, B, L, d, 0, w->H2, &out);
        if (s == CONFSMOE_OK)
            s = csm_imputer_forward_trusted(model->imputer, h, slots, avail, out,
                                            w->training ? &w->imputer_saved : NULL);
        confsmoe_tensor_destroy(h);
        confsmoe_tensor_destroy(slots);
        confsmoe_tensor_destroy(out);
        if (s != CONFSMOE_OK)
            return s;
        if (model->p.writeback == CONFSMOE_WRITEBACK_RESIDUAL)
            model_residual_writeback(model, w);
    }
    model_readout_forward(model, w);
    return CONFSMOE_OK;
}

/* The arrays of one backward call (layout.h). */
static void model_gradients_parts(csm_layout *l, const confsmoe_model *model, int64_t B, gradients *g)
{
    const size_t M = (size_t)model->p.n_modalities, S = (size_t)model->max_tokens, d = (size_t)model->p.d;
    const size_t L = (size_t)model->tokens_total, b = (size_t)B, C = (size_t)model->p.n_classes, k = (size_t)model->p.k;
    g->dlogits = CSM_LAYOUT_ROWS(l, float, b, C);
    g->drn = CSM_LAYOUT_ROWS(l, float, b, d);
    g->dr = CSM_LAYOUT_ROWS(l, float, b, d);
    g->dpooled = CSM_LAYOUT_ROWS(l, float, b * M, d);
    g->dH3 = g->dH = g->dX = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dH2 = g->dA = g->dXn = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dctx = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dV = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dQ = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dK = CSM_LAYOUT_ROWS(l, float, b * L, d);
    g->dslots = CSM_LAYOUT_ROWS(l, float, b * L * k, d);
    g->dsum = CSM_LAYOUT_ROWS(l, float, b * S, d);
    g->dZ = CSM_LAYOUT_ROWS(l, float, b * S, d);
    g->dtok = CSM_LAYOUT_ROWS(l, float, b * S, d);
    g->ln_partials = CSM_LAYOUT_ROWS(l, float, (size_t)csm_pass_layernorm_blocks((int64_t)(b * L), (int64_t)d), 2 * d);
}

void *csm_model_gradients_alloc(confsmoe_model *model, int64_t B, gradients *g)
{
    csm_layout l = csm_layout_measure();
    size_t bytes;
    model_gradients_parts(&l, model, B, g);
    char *block = csm_layout_size(&l, &bytes)
                      ? model_cached_block(model, &model->grad_cache, &model->grad_cache_size, bytes)
                      : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    model_gradients_parts(&l, model, B, g);
    /* Stage 2 (or nothing) adds into dslots; everything else is written before it is read. */
    csm_pass_zero(model->ctx, g->dslots, B * model->tokens_total * model->p.k, model->p.d);
    return block;
}

/* The residual write-back's first part: LN3 backward of every row, dH3 -> dH2, the gradient of
 * LN3's input H_m + F (present rows) or H_m + Ihat (missing rows). */
static void model_ln3_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int64_t B = w->B, d = model->p.d;
    for (int32_t m = 0; m < model->p.n_modalities; m++) {
        const int64_t rows = B * model->tokens[m], first_row = B * model->token_offset[m];
        model_gather_modality(model, g->dH3, g->dtok, B, m);
        model_layernorm_backward(model, g, &model->ln3, w->sum_ + first_row * d, w->ln3_stats + 2 * first_row,
                                 g->dtok, rows, d, g->dsum, false);
        model_scatter_modality(model, g->dsum, g->dH2, B, m);
    }
}

/* dH2 -> dH through the MoE layer. dH2 is the gradient of LN3's output, or with
 * after_ln3 (the residual write-back) already that of its input, whose missing rows took
 * Ihat in place of the MoE output F: F gets no gradient there. */
static confsmoe_status model_moe_backward(confsmoe_model *model, workspace *w, gradients *g, bool after_ln3)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, d = model->p.d, k = model->p.k;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        const int64_t rows = B * model->tokens[m], first_row = B * model->token_offset[m];
        const int64_t S = model->tokens[m];
        const float *Hm = w->Hm + first_row * d, *sum = w->sum_ + first_row * d;
        const float *dF = g->dsum;
        if (after_ln3) {
            model_gather_modality(model, g->dH2, g->dsum, B, m);
            csm_pass_copy_blocks(model->ctx, g->dtok, S * d, g->dsum, S * d, B, S * d);
            for (int64_t b = 0; b < B; b++)
                if (!w->avail[b * M + m])
                    memset(g->dtok + b * S * d, 0, (size_t)(S * d) * sizeof(float));
            dF = g->dtok;
        } else {
            /* H_m <- LN3(H_m + F): both terms get the same gradient. */
            model_gather_modality(model, g->dH2, g->dtok, B, m);
            model_layernorm_backward(model, g, &model->ln3, sum, w->ln3_stats + 2 * first_row, g->dtok, rows, d,
                                     g->dsum, false);
        }
        const csm_gate_grad_call call = {w->gate_saved[m], dF, g->dslots + first_row * k * d, w->gate_weight[m],
                                         g->dZ};
        s = csm_gate_backward_rows(model->gate, &call);
        if (s != CONFSMOE_OK)
            break;
        /* Z = LN2(H_m): its gradient joins the residual's in dsum. */
        model_layernorm_backward(model, g, &model->ln2, Hm, w->ln2_stats + 2 * first_row, g->dZ, rows, d, g->dsum,
                                 true);
        model_scatter_modality(model, g->dsum, g->dH, B, m);
    }
    return s;
}

confsmoe_status csm_model_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, L = model->tokens_total, d = model->p.d;
    const csm_params *params = &model->params;
    confsmoe_status s = CONFSMOE_OK;

    csm_linear_backward(&model->head, params, w->rn, g->dlogits, B, g->drn, false);
    model_layernorm_backward(model, g, &model->ln_out, w->r, w->ln_out_stats, g->drn, B, d, g->dr, false);
    csm_linear_backward(&model->readout, params, w->pooled, g->dr, B, g->dpooled, false);
    model_readout_task readout = {model, w, g};
    csm_parallel_for(model->ctx, B, MODEL_READOUT_GRAIN, model_readout_mean_backward_task, &readout);

    /* With the residual write-back, LN3 comes after the imputer: its backward runs first, and
     * the imputer's rows (Ihat) take the gradient of LN3's input; h gets none through them. */
    const bool residual = model->imputer && model->p.writeback == CONFSMOE_WRITEBACK_RESIDUAL;
    if (residual)
        model_ln3_backward(model, w, g);
    if (model->imputer) {
        confsmoe_tensor *dout = NULL, *dh = NULL, *dslots = NULL;
        s = model_wrap(model, CONFSMOE_F32, 3, B, L, d, 0, residual ? g->dH2 : g->dH3, &dout);
        if (s == CONFSMOE_OK && !residual)
            s = model_wrap(model, CONFSMOE_F32, 3, B, L, d, 0, g->dH2, &dh);
        if (s == CONFSMOE_OK)
            s = model_wrap(model, CONFSMOE_F32, 3, B * L, model->p.k, d, 0, g->dslots, &dslots);
        if (s == CONFSMOE_OK)
            s = csm_imputer_backward_trusted(model->imputer, w->imputer_saved, dout, dh, dslots);
        confsmoe_tensor_destroy(dout);
        confsmoe_tensor_destroy(dh);
        confsmoe_tensor_destroy(dslots);
        if (s != CONFSMOE_OK)
            return s;
    } else {
        csm_pass_copy_blocks(model->ctx, g->dH2, d, g->dH3, d, B * L, d);
    }
    if ((s = model_moe_backward(model, w, g, residual)) != CONFSMOE_OK)
        return s;

    /* H = base + Dropout(A), base = X (or A under compat), with forward's draws again. */
    csm_residual_backward(model, w, g);
    csm_attention_backward(model, w, g);
    /* dX is dH itself (the residual), plus LN1's gradient; under compat X has no residual. */
    model_layernorm_backward(model, g, &model->ln1, w->X, w->ln1_stats, g->dXn, B * L, d, g->dX, !model->p.compat);
    float *dpos = csm_f32(csm_params_grad_of(params, model->pos));
    csm_pass_add_column_sums(model->ctx, dpos, g->dX, B, L * d);
    for (int32_t m = 0; m < M; m++) {
        model_gather_modality(model, g->dX, g->dtok, B, m);
        csm_linear_backward(&model->enc[m], params, w->x[m], g->dtok, B * model->tokens[m], NULL, false);
    }
    return CONFSMOE_OK;
}

