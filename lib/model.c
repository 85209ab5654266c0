/* The full Conf-SMoE classifier (docs/MODEL.md, section 6), composed from the public expert,
 * gate and imputer handles plus its own encoders, attention, LayerNorms and readout. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "expert.h"
#include "gate.h"
#include "imputer.h"
#include "internal.h"
#include "kernels.h"
#include "layout.h"
#include "params.h"
#include "sized.h"
#include "threads.h"

#define LN_EPS 1e-5f

typedef struct {
    confsmoe_tensor *w, *b;
} linear;

typedef struct {
    confsmoe_tensor *weight, *bias;
} layernorm;

struct confsmoe_model {
    confsmoe_ctx *ctx;
    confsmoe_model_params p;
    int64_t *features;            /* [M] */
    int64_t tokens_total;         /* L = M S */
    linear *enc;                  /* [M] Linear(F_m, d) */
    confsmoe_tensor *pos;         /* [L, d] */
    layernorm ln1, ln2, ln3, ln_out;
    linear q, k, v, o;            /* attention projections */
    linear readout, head;         /* Linear(M d, d), Linear(d, C) */
    confsmoe_expert **experts;
    confsmoe_gate *gate;
    confsmoe_imputer *imputer;    /* two-stage imputation only */
    float **pool;                 /* [M] stage-1 pools, [P_m, S F_m] */
    int64_t *pool_rows;
    float **pool_mean;            /* [M] mean of each pool, [S F_m] */
    csm_params params;
    /* The step's workspace and gradient blocks, kept from one call to the next (grown when
     * a bigger batch comes, freed by destroy): a training loop then touches fresh pages only
     * on its first step. */
    void *ws_cache, *grad_cache;
    size_t ws_cache_size, grad_cache_size;
    /* Lent to the gate and the imputer during a step for their per-call blocks; sized from the
     * previous step. */
    csm_arena arena;
    size_t arena_need; /* what the gate and the imputer wanted of it in the last step */
};

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

static confsmoe_status check_params(confsmoe_ctx *ctx, const confsmoe_model_params *p)
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
    if (p->tokens < 1 || p->d < 1 || p->expert_hidden < 0)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: tokens and d must be >= 1 and expert_hidden >= 0", fn);
    /* M S tokens and the M d readout input are computed in int64 below (found by tests/fuzz). */
    if (p->tokens > INT64_MAX / p->n_modalities || p->d > INT64_MAX / p->n_modalities)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: n_modalities x tokens or n_modalities x d overflows", fn);
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
    /* The gate and the imputer check the rest of their options when they are created. */
    return CONFSMOE_OK;
}

static confsmoe_status new_linear(confsmoe_model *model, const char *name, int64_t in, int64_t out, linear *l)
{
    char buf[CSM_PARAM_NAME_CAP];
    snprintf(buf, sizeof buf, "%s.w", name);
    confsmoe_status s = csm_params_new(model->ctx, &model->params, buf, 2, out, in, &l->w);
    snprintf(buf, sizeof buf, "%s.b", name);
    if (s == CONFSMOE_OK)
        s = csm_params_new(model->ctx, &model->params, buf, 1, out, 0, &l->b);
    if (s == CONFSMOE_OK) {
        /* nn.Linear: U(-1/sqrt(fan_in), +1/sqrt(fan_in)) for weight and bias. */
        float bound = 1.0f / sqrtf((float)in);
        csm_fill_uniform(model->ctx, l->w, bound);
        csm_fill_uniform(model->ctx, l->b, bound);
    }
    return s;
}

static confsmoe_status new_layernorm(confsmoe_model *model, const char *name, layernorm *ln)
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
    /* pool and pool_mean are allocated separately: either may be NULL after a failed create. */
    for (int32_t m = 0; m < model->p.n_modalities; m++) {
        csm_free(ctx, model->pool ? model->pool[m] : NULL);
        csm_free(ctx, model->pool_mean ? model->pool_mean[m] : NULL);
    }
    csm_free(ctx, model->pool);
    csm_free(ctx, model->pool_mean);
    csm_free(ctx, model->pool_rows);
    csm_free(ctx, model->experts);
    csm_free(ctx, model->enc);
    csm_free(ctx, model->ws_cache);
    csm_free(ctx, model->grad_cache);
    csm_free(ctx, model->arena.base);
    csm_free(ctx, model->features);
    csm_free(ctx, model);
    csm_ctx_release(ctx);
}

static confsmoe_status build(confsmoe_model *model)
{
    confsmoe_ctx *ctx = model->ctx;
    const confsmoe_model_params *p = &model->p;
    const int32_t M = p->n_modalities, E = p->n_experts;
    const int64_t d = p->d, hidden = p->expert_hidden ? p->expert_hidden : p->d;
    char name[CSM_PARAM_NAME_CAP];
    confsmoe_status s;

    model->enc = csm_calloc(ctx, (size_t)M, sizeof *model->enc);
    model->experts = csm_calloc(ctx, (size_t)E, sizeof *model->experts);
    model->pool = csm_calloc(ctx, (size_t)M, sizeof *model->pool);
    model->pool_mean = csm_calloc(ctx, (size_t)M, sizeof *model->pool_mean);
    model->pool_rows = csm_calloc(ctx, (size_t)M, sizeof *model->pool_rows);
    if (!model->enc || !model->experts || !model->pool || !model->pool_mean || !model->pool_rows)
        return CONFSMOE_E_NOMEM;

    for (int32_t m = 0; m < M; m++) {
        snprintf(name, sizeof name, "enc.%" PRId32, m);
        if ((s = new_linear(model, name, model->features[m], d, &model->enc[m])) != CONFSMOE_OK)
            return s;
    }
    if ((s = csm_params_new(ctx, &model->params, "pos", 2, model->tokens_total, d, &model->pos)) != CONFSMOE_OK ||
        (s = new_layernorm(model, "ln1", &model->ln1)) != CONFSMOE_OK ||
        (s = new_linear(model, "attn.q", d, d, &model->q)) != CONFSMOE_OK ||
        (s = new_linear(model, "attn.k", d, d, &model->k)) != CONFSMOE_OK ||
        (s = new_linear(model, "attn.v", d, d, &model->v)) != CONFSMOE_OK ||
        (s = new_linear(model, "attn.o", d, d, &model->o)) != CONFSMOE_OK ||
        (s = new_layernorm(model, "ln2", &model->ln2)) != CONFSMOE_OK ||
        (s = new_layernorm(model, "ln3", &model->ln3)) != CONFSMOE_OK)
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
        ip.k = p->k;
        ip.top_t = p->top_t;
        ip.renormalize = p->renormalize;
        ip.separate_value = p->separate_value;
        ip.compat = p->compat;
        if ((s = confsmoe_imputer_create(ctx, &ip, &model->imputer)) != CONFSMOE_OK ||
            (s = csm_params_borrow_all(ctx, &model->params, "imputer", csm_imputer_param_list(model->imputer))) !=
                CONFSMOE_OK)
            return s;
    }
    if ((s = new_linear(model, "readout", (int64_t)M * d, d, &model->readout)) != CONFSMOE_OK ||
        (s = new_layernorm(model, "ln_out", &model->ln_out)) != CONFSMOE_OK ||
        (s = new_linear(model, "head", d, p->n_classes, &model->head)) != CONFSMOE_OK)
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
        s = check_params(ctx, p);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_model *model = csm_calloc(ctx, 1, sizeof *model);
    if (!model)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "model_create: out of memory");
    model->ctx = csm_ctx_retain(ctx);
    model->p = *p;
    model->tokens_total = (int64_t)p->n_modalities * p->tokens;
    model->features = csm_calloc(ctx, (size_t)p->n_modalities, sizeof *model->features);
    if (model->features) {
        memcpy(model->features, p->features, (size_t)p->n_modalities * sizeof *model->features);
        model->p.features = model->features;
    }
    const uint64_t rng_at_entry = csm_rng_tell(ctx);
    s = model->features ? build(model) : CONFSMOE_E_NOMEM;
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

/* ------------------------------------------------------------------ pools */

confsmoe_status confsmoe_model_set_pool(confsmoe_model *model, int32_t m, const confsmoe_tensor *pool)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "model_set_pool";
    confsmoe_ctx *ctx = model->ctx;
    if (m < 0 || m >= model->p.n_modalities)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: modality %" PRId32 " out of range 0..%" PRId32, fn, m,
                        model->p.n_modalities - 1);
    const int64_t S = model->p.tokens, F = model->features[m];
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
    const int64_t rows = pool->dims[0], width = S * F;
    float *copy = csm_alloc(ctx, pool->nbytes);
    float *mean = csm_calloc(ctx, (size_t)width, sizeof(float));
    if (!copy || !mean) {
        csm_free(ctx, copy);
        csm_free(ctx, mean);
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for %" PRId64 " rows", fn, rows);
    }
    memcpy(copy, pool->data, pool->nbytes);
    for (int64_t c = 0; c < width; c++) {
        double sum = 0.0;
        for (int64_t r = 0; r < rows; r++)
            sum += copy[r * width + c];
        mean[c] = (float)(sum / (double)rows);
    }
    csm_free(ctx, model->pool[m]);
    csm_free(ctx, model->pool_mean[m]);
    model->pool[m] = copy;
    model->pool_mean[m] = mean;
    model->pool_rows[m] = rows;
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ workspace */

typedef struct gradients gradients;
typedef gradients *gradients_ptr;

/* Where the draws of one call sit in the ctx stream: the first position of each part, in the
 * order the parts are laid out. model_reserve_draws computes it once per call and reserves
 * the total; every draw site takes its base from it. A training step draws every part, predict
 * only stage 1's; a part drawn for the global batch takes the same positions in every shard. */
typedef struct {
    uint64_t modality_dropout;  /* one position: substream b per sample (drop_modalities) */
    uint64_t stage_one;         /* one position: substream b M + m per (sample, modality) (imputer.h) */
    uint64_t attention;         /* csm_dropout_draws(L L) per (sample, head), in that order */
    uint64_t residual;          /* csm_dropout_draws(d) per row (sample, token) */
    uint64_t gate_noise;        /* gate_noise_per_call for each modality's gate call, in order */
    uint64_t gate_noise_per_call;
    uint64_t end;               /* the position after the call */
} model_draws;

/* Everything one forward computes and its backward reads. Rows of [B L, d] arrays are
 * (sample b, token l) with l = m S + s; per-modality arrays are [M, B S, ...].
 *
 * Memory: the attention weights are not kept. Forward computes them one (sample, head) at
 * a time in an L x L scratch, and backward recomputes them the same way (one more Q K^T and
 * softmax per head, bit-identical). The residual dropout masks are not kept either: the ctx
 * RNG is counter-based, so backward regenerates the very same draws from the stream positions
 * in draws. */
typedef struct {
    int64_t B;
    int64_t first, global_B;  /* these samples' place in their global batch (0 and B unless a shard) */
    int64_t global_present;   /* present (sample, modality) cells of the global batch */
    bool training;
    float **x;              /* [M] stage-1 imputed inputs [B S, F_m] */
    float *tok;             /* [B S, d] scratch for one modality's encoder output */
    float *X, *Xn, *ln1_stats;          /* [B L, d], [B L, d], [2 B L] */
    float *Q, *K, *V, *ctx_;            /* [B L, d] */
    int workers;                        /* of the ctx's own threads (threads.h) */
    float *scratch;                     /* per worker: P, dropped P, dP [L, L] each, then one
                                           row's residual dropout draws [d] (bytes) */
    size_t scratch_stride;              /* floats per worker */
    bool dropout;                       /* training with dropout > 0 */
    uint8_t *attn_keep;                 /* [B, heads, L, L] the attention dropout draws (with dropout) */
    model_draws draws;                  /* the call's stream positions */
    float *Hm, *sum_, *ln2_stats, *ln3_stats;  /* [M, B S, d], [M, B S, d], [M, 2 B S] x 2 */
    float *Z, *F;                       /* [B S, d] scratch of one gate call */
    float *H2;                          /* [B L, d] the attention output, then the MoE layer's output,
                                           then (in place) after stage 2 */
    float *slots;                       /* [M, B S, k, d] */
    float *pooled, *r, *rn, *ln_out_stats, *logits;  /* [B, M d], [B, d], [B, d], [2 B], [B, C] */
    int32_t *tok_labels;                /* [B S] */
    uint8_t *tok_multi_labels;          /* [B S, C] */
    uint8_t *tok_present;               /* [B S] */
    float *gate_weight;                 /* [M] weight of each gate call's loss */
    confsmoe_saved **gate_saved;        /* [M] */
    confsmoe_saved *imputer_saved;
} workspace;

/* A block of at least `need` bytes from the model's cache (allocated or grown on demand). */
static void *cached_block(confsmoe_model *model, void **cache, size_t *size, size_t need)
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
static void workspace_parts(csm_layout *l, const confsmoe_model *model, workspace *w)
{
    const confsmoe_model_params *p = &model->p;
    const size_t M = (size_t)p->n_modalities, S = (size_t)p->tokens, d = (size_t)p->d, L = M * S;
    const size_t k = (size_t)p->k, C = (size_t)p->n_classes, b = (size_t)w->B;
    w->x = CSM_LAYOUT_ARRAY(l, float *, M);
    for (size_t m = 0; m < M; m++) {
        float *x = CSM_LAYOUT_ROWS(l, float, b * S, (size_t)model->features[m]);
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
    w->Hm = CSM_LAYOUT_ROWS(l, float, M * b * S, d);
    w->sum_ = CSM_LAYOUT_ROWS(l, float, M * b * S, d);
    w->ln2_stats = CSM_LAYOUT_ARRAY(l, float, 2 * M * b * S);
    w->ln3_stats = CSM_LAYOUT_ARRAY(l, float, 2 * M * b * S);
    w->Z = CSM_LAYOUT_ROWS(l, float, b * S, d);
    w->F = CSM_LAYOUT_ROWS(l, float, b * S, d);
    w->H2 = CSM_LAYOUT_ROWS(l, float, b * L, d);
    w->slots = CSM_LAYOUT_ROWS(l, float, M * b * S * k, d);
    w->pooled = CSM_LAYOUT_ROWS(l, float, b * M, d);
    w->r = CSM_LAYOUT_ROWS(l, float, b, d);
    w->rn = CSM_LAYOUT_ROWS(l, float, b, d);
    w->ln_out_stats = CSM_LAYOUT_ARRAY(l, float, 2 * b);
    w->logits = CSM_LAYOUT_ROWS(l, float, b, C);
    w->tok_labels = CSM_LAYOUT_ARRAY(l, int32_t, b * S);
    w->tok_multi_labels = CSM_LAYOUT_ROWS(l, uint8_t, b * S, C);
    w->tok_present = CSM_LAYOUT_ARRAY(l, uint8_t, b * S);
    w->gate_weight = CSM_LAYOUT_ARRAY(l, float, M);
    w->gate_saved = CSM_LAYOUT_ARRAY(l, confsmoe_saved *, M);
    /* Backward reads forward's attention draws rather than drawing them again: 1 byte per
     * weight (23 MB at the paper's batch) against the draws' share of a step. */
    w->attn_keep = w->dropout ? CSM_LAYOUT_ROWS(l, uint8_t, b * (size_t)p->heads, L * L) : NULL;
}

static void *workspace_alloc(confsmoe_model *model, int64_t B, bool training, workspace *w)
{
    const size_t d = (size_t)model->p.d, L = (size_t)model->tokens_total;
    memset(w, 0, sizeof *w);
    w->B = B;
    w->training = training;
    w->dropout = training && model->p.dropout > 0.0f;
    w->workers = csm_parallel_workers(model->ctx, B);
    w->scratch_stride = 3 * L * L + (d + 3) / 4;
    csm_layout l = csm_layout_measure();
    size_t bytes;
    workspace_parts(&l, model, w);
    char *block = csm_layout_size(&l, &bytes)
                      ? cached_block(model, &model->ws_cache, &model->ws_cache_size, bytes)
                      : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    workspace_parts(&l, model, w);
    memset(w->gate_saved, 0, (size_t)model->p.n_modalities * sizeof *w->gate_saved);
    return block;
}

/* The saved handles of the call; the block itself stays in the model's cache. */
static void workspace_release(confsmoe_model *model, workspace *w)
{
    for (int32_t m = 0; w->gate_saved && m < model->p.n_modalities; m++)
        confsmoe_saved_destroy(w->gate_saved[m]);
    confsmoe_saved_destroy(w->imputer_saved);
}

/* ------------------------------------------------------------------ small layers */

static void linear_forward(const linear *l, const float *x, int64_t rows, float *y)
{
    const int64_t out = l->w->dims[0], in = l->w->dims[1];
    csm_broadcast_rows(y, csm_f32(l->b), rows, out);
    csm_gemm(false, true, rows, out, in, 1.0f, x, csm_f32(l->w), 1.0f, y);
}

/* Accumulates dW, db; dx (if not NULL) is written, or added to when accumulate. */
static void linear_backward(const linear *l, const csm_params *params, const float *x, const float *dy, int64_t rows,
                            float *dx, bool accumulate)
{
    const int64_t out = l->w->dims[0], in = l->w->dims[1];
    csm_gemm(true, false, out, in, rows, 1.0f, dy, x, 1.0f, csm_f32(csm_params_grad_of(params, l->w)));
    csm_add_column_sums(csm_f32(csm_params_grad_of(params, l->b)), dy, rows, out);
    if (dx)
        csm_gemm(false, false, rows, in, out, 1.0f, dy, csm_f32(l->w), accumulate ? 1.0f : 0.0f, dx);
}

static void layernorm_forward(const layernorm *ln, const float *x, int64_t rows, int64_t d, float *y, float *stats)
{
    csm_layernorm_forward(x, csm_f32(ln->weight), csm_f32(ln->bias), y, stats, stats + rows, rows, d, LN_EPS);
}

static void layernorm_backward(const layernorm *ln, const csm_params *params, const float *x, const float *stats,
                               const float *dy, int64_t rows, int64_t d, float *dx, bool accumulate)
{
    csm_layernorm_backward(x, stats, stats + rows, csm_f32(ln->weight), dy, dx,
                           csm_f32(csm_params_grad_of(params, ln->weight)),
                           csm_f32(csm_params_grad_of(params, ln->bias)), rows, d, accumulate);
}

/* Rows (b, m S + s) of a [B L, d] array <-> rows (b S + s) of a [B S, d] array. */
static void gather_modality(const float *all, float *one, int64_t B, int64_t S, int64_t L, int64_t d, int32_t m)
{
    for (int64_t b = 0; b < B; b++)
        memcpy(one + b * S * d, all + (b * L + m * S) * d, (size_t)(S * d) * sizeof(float));
}

static void scatter_modality(const float *one, float *all, int64_t B, int64_t S, int64_t L, int64_t d, int32_t m,
                             bool accumulate)
{
    for (int64_t b = 0; b < B; b++) {
        float *dst = all + (b * L + m * S) * d;
        const float *src = one + b * S * d;
        for (int64_t i = 0; i < S * d; i++)
            dst[i] = accumulate ? dst[i] + src[i] : src[i];
    }
}

/* ------------------------------------------------------------------ validation */

/* A batch of B >= 1 samples, or B >= 0 for a shard. */
static confsmoe_status check_batch(confsmoe_model *model, const char *fn, const confsmoe_tensor *const *inputs,
                                   const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                   const confsmoe_tensor *logits, bool need_labels, bool shard)
{
    confsmoe_ctx *ctx = model->ctx;
    const int32_t M = model->p.n_modalities;
    const int64_t S = model->p.tokens, C = model->p.n_classes;
    if (!inputs)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: inputs is NULL", fn);
    const int64_t avail_dims[2] = {-1, M};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "avail", avail, CONFSMOE_U8, 2, avail_dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t B = avail->dims[0];
    if (B < 1 && !shard)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: the batch is empty", fn);
    const uint8_t *a = avail->data;
    for (int64_t i = 0; i < B * M; i++)
        if (a[i] > 1)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: avail[%" PRId64 "][%" PRId64 "] is %d; the mask is u8 [B, M] with 1 = present, 0 = missing",
                            fn, i / M, i % M, a[i]);
    for (int32_t m = 0; m < M; m++) {
        char name[32];
        snprintf(name, sizeof name, "inputs[%" PRId32 "]", m);
        const int64_t dims3[3] = {B, S, model->features[m]}, dims2[2] = {B, model->features[m]};
        const confsmoe_tensor *x = inputs[m];
        s = x && x->ndim == 2 && S == 1 ? csm_expect_tensor(ctx, fn, name, x, CONFSMOE_F32, 2, dims2)
                                        : csm_expect_tensor(ctx, fn, name, x, CONFSMOE_F32, 3, dims3);
        if (s == CONFSMOE_OK)
            s = csm_expect_finite(ctx, fn, name, x);
        if (s != CONFSMOE_OK)
            return s;
        bool missing = false;
        for (int64_t b = 0; b < B; b++)
            missing = missing || !a[b * M + m];
        if (missing && !model->pool[m])
            return csm_fail(ctx, CONFSMOE_E_STATE,
                            "%s: modality %" PRId32 " is missing for some samples but has no pool "
                            "(call confsmoe_model_set_pool first)", fn, m);
    }
    if (logits) {
        const int64_t dims[2] = {B, C};
        if ((s = csm_expect_tensor(ctx, fn, "logits", logits, CONFSMOE_F32, 2, dims)) != CONFSMOE_OK)
            return s;
    }
    if (!need_labels)
        return CONFSMOE_OK;
    if (!model->p.multilabel) {
        if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_I32, 1, &B)) != CONFSMOE_OK)
            return s;
        const int32_t *y = labels->data;
        for (int64_t b = 0; b < B; b++)
            if (y[b] < 0 || y[b] >= C)
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                                "%s: labels[%" PRId64 "] is %" PRId32 ", out of range 0..%" PRId64, fn, b, y[b], C - 1);
    } else {
        const int64_t dims[2] = {B, C};
        if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_U8, 2, dims)) != CONFSMOE_OK)
            return s;
        const uint8_t *y = labels->data;
        for (int64_t i = 0; i < B * C; i++)
            if (y[i] > 1)
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: multi-label labels must be 0 or 1", fn);
    }
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ forward */

/* Wraps a host-visible view of workspace memory for a public-API call. */
static confsmoe_status wrap(confsmoe_model *model, confsmoe_dtype dtype, int32_t ndim, int64_t d0, int64_t d1,
                            int64_t d2, int64_t d3, void *data, confsmoe_tensor **out)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    return confsmoe_tensor_wrap(model->ctx, dtype, ndim, dims, data, out);
}

/* Stage 1 draws pool rows (or fills in the pool mean). */
static bool stage_one_draws(const confsmoe_model *model, bool training)
{
    return model->p.imputation == CONFSMOE_IMPUTE_TWO_STAGE && (training || !model->p.predict_pool_mean);
}

static confsmoe_status stage_one(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                 const confsmoe_tensor *avail, workspace *w)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens;
    const uint8_t *a = avail->data;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        const int64_t width = S * model->features[m];
        memcpy(w->x[m], inputs[m]->data, inputs[m]->nbytes);
        bool missing = false;
        for (int64_t b = 0; b < B; b++)
            missing = missing || !a[b * M + m];
        if (!missing)
            continue;
        if (!stage_one_draws(model, w->training)) {
            for (int64_t b = 0; b < B; b++)
                if (!a[b * M + m])
                    memcpy(w->x[m] + b * width, model->pool_mean[m], (size_t)width * sizeof(float));
            continue;
        }
        confsmoe_tensor *x = NULL, *pool = NULL;
        s = wrap(model, CONFSMOE_F32, 3, B, S, model->features[m], 0, w->x[m], &x);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 3, model->pool_rows[m], S, model->features[m], 0, model->pool[m], &pool);
        if (s == CONFSMOE_OK)
            s = csm_imputer_fill_at(model->imputer, m, pool, model->p.draws, avail, x, w->draws.stage_one,
                                    w->first);
        confsmoe_tensor_destroy(x);
        confsmoe_tensor_destroy(pool);
    }
    return s;
}

/* One worker's attention scratch. */
typedef struct {
    float *P, *P_w, *dP;  /* [L, L] */
    uint8_t *keep;        /* [d] */
} attn_scratch;

static attn_scratch scratch_of(const confsmoe_model *model, const workspace *w, int worker)
{
    const int64_t L = model->tokens_total;
    float *base = w->scratch + (size_t)worker * w->scratch_stride;
    return (attn_scratch){base, base + L * L, base + 2 * L * L, (uint8_t *)(base + 3 * L * L)};
}

/* The dropout draws of head h of sample b (with dropout). */
static uint8_t *attention_keep(const confsmoe_model *model, const workspace *w, int64_t b, int64_t h)
{
    const int64_t L = model->tokens_total;
    return w->attn_keep + (size_t)(b * model->p.heads + h) * (size_t)(L * L);
}

/* The weights of head h of sample b: P = softmax(scale Q K^T) into a->P, and into a->P_w the
 * dropped weights P keep / (1 - p) with the draws of this head (when dropout is on), which
 * forward draws and backward reads back: backward sees exactly forward's weights. */
static const float *attention_weights(const confsmoe_model *model, const workspace *w, const attn_scratch *a,
                                      int64_t b, int64_t h, bool backward)
{
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    const float scale = 1.0f / sqrtf((float)dh);
    const int64_t off = b * L * d + h * dh;
    csm_gemm_ld(false, true, L, L, dh, scale, w->Q + off, d, w->K + off, d, 0.0f, a->P, L);
    csm_softmax_rows(a->P, L, L);
    if (!w->dropout)
        return a->P;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = attention_keep(model, w, b, h);
    if (!backward)
        csm_rng_dropout_mask(model->ctx,
                             w->draws.attention + (uint64_t)((w->first + b) * heads + h) * csm_dropout_draws(L * L),
                             model->p.dropout, keep, L * L);
    csm_mask_scale(a->P_w, a->P, keep, kept, L * L);
    return a->P_w;
}

typedef struct {
    const confsmoe_model *model;
    workspace *w;
    gradients_ptr g;
} attn_task;

static void attention_forward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attn_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    const attn_scratch a = scratch_of(model, w, worker);
    for (int64_t b = first; b < last; b++)
        for (int64_t h = 0; h < heads; h++) {
            /* Head h of sample b: columns h dh .. h dh + dh - 1 of rows b L .. b L + L - 1. */
            const int64_t off = b * L * d + h * dh;
            const float *weights = attention_weights(model, w, &a, b, h, false);
            csm_gemm_ld(false, false, L, dh, L, 1.0f, weights, L, w->V + off, d, 0.0f, w->ctx_ + off, d);
        }
}

static void attention_forward(confsmoe_model *model, workspace *w)
{
    const int64_t B = w->B, L = model->tokens_total;
    linear_forward(&model->q, w->Xn, B * L, w->Q);
    linear_forward(&model->k, w->Xn, B * L, w->K);
    linear_forward(&model->v, w->Xn, B * L, w->V);
    attn_task task = {model, w, NULL};
    csm_parallel_for(model->ctx, B, 1, attention_forward_task, &task);
    /* A = o(ctx) lands in H2, free until the MoE layer writes it. */
    linear_forward(&model->o, w->ctx_, B * L, w->H2);
}

/* The attention output joins the residual: H = X + Dropout(A), or A + Dropout(A) under compat,
 * written straight into the per-modality layout Hm. Row (b, l) of A takes csm_dropout_draws(d) draws, in
 * row-major order over the global batch, from w->draws.residual on. */
static void residual_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attn_task *t = arg;
    const confsmoe_model *model = t->model;
    workspace *w = t->w;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d;
    const float *A = w->H2, *base = model->p.compat ? w->H2 : w->X;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = scratch_of(model, w, worker).keep;
    for (int64_t b = first; b < last; b++)
        for (int64_t l = 0; l < L; l++) {
            const int64_t row = b * L + l, m = l / S;
            const float *ar = A + row * d, *br = base + row * d;
            float *dst = w->Hm + ((m * B + b) * S + l % S) * d;
            if (!w->dropout) {
                csm_add(dst, br, ar, d);
                continue;
            }
            csm_rng_dropout_mask(model->ctx, w->draws.residual + (uint64_t)(w->first * L + row) * csm_dropout_draws(d),
                                 model->p.dropout, keep, d);
            csm_add_masked(dst, br, ar, keep, kept, d);
        }
}

static void residual_forward(confsmoe_model *model, workspace *w)
{
    attn_task task = {model, w, NULL};
    csm_parallel_for(model->ctx, w->B, 1, residual_task, &task);
}

/* Each modality's gate call returns its own mean loss; weighting them by their share of the
 * present tokens of the global batch makes L_conf the mean over all its present slots, as in
 * docs/MODEL.md, section 6 (compat: the mean of the calls' means, each over all of its slots). */
static void gate_weights(confsmoe_model *model, const uint8_t *avail, workspace *w)
{
    const int32_t M = model->p.n_modalities;
    for (int32_t m = 0; m < M; m++) {
        int64_t present = 0;
        for (int64_t b = 0; b < w->B; b++)
            present += avail[b * M + m];
        w->gate_weight[m] = model->p.compat ? 1.0f / (float)M * ((float)w->B / (float)w->global_B)
                            : w->global_present > 0 ? (float)present / (float)w->global_present
                                                    : 0.0f;
    }
}

static void token_labels(confsmoe_model *model, const confsmoe_tensor *labels, workspace *w)
{
    const int64_t S = model->p.tokens, C = model->p.n_classes;
    for (int64_t b = 0; b < w->B; b++)
        for (int64_t s = 0; s < S; s++) {
            if (model->p.multilabel)
                memcpy(w->tok_multi_labels + (b * S + s) * C, (const uint8_t *)labels->data + b * C, (size_t)C);
            else
                w->tok_labels[b * S + s] = ((const int32_t *)labels->data)[b];
        }
}

static confsmoe_status moe_forward(confsmoe_model *model, const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                   workspace *w, float *aux)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d, k = model->p.k;
    const int64_t C = model->p.n_classes, rows = B * S;
    const uint8_t *a = avail->data;
    gate_weights(model, a, w);
    if (labels)
        token_labels(model, labels, w);
    *aux = 0.0f;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        float *Hm = w->Hm + m * rows * d, *Z = w->Z, *F = w->F;
        float *sum = w->sum_ + m * rows * d;
        layernorm_forward(&model->ln2, Hm, rows, d, Z, w->ln2_stats + m * 2 * rows);
        for (int64_t i = 0; i < rows; i++)
            w->tok_present[i] = a[(i / S) * M + m];
        confsmoe_tensor *z = NULL, *f = NULL, *slots = NULL, *lab = NULL, *present = NULL;
        float loss = 0.0f;
        s = wrap(model, CONFSMOE_F32, 2, rows, d, 0, 0, Z, &z);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 2, rows, d, 0, 0, F, &f);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 3, rows, k, d, 0, w->slots + m * rows * k * d, &slots);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_U8, 1, rows, 0, 0, 0, w->tok_present, &present);
        if (s == CONFSMOE_OK && labels)
            s = model->p.multilabel ? wrap(model, CONFSMOE_U8, 2, rows, C, 0, 0, w->tok_multi_labels, &lab)
                                    : wrap(model, CONFSMOE_I32, 1, rows, 0, 0, 0, w->tok_labels, &lab);
        /* The gate's noise follows the tokens' places in the global batch; the call reserves it
         * from the stream's position, which is its part of the table. */
        csm_rng_seek(model->ctx, w->draws.gate_noise + (uint64_t)m * w->draws.gate_noise_per_call);
        if (s == CONFSMOE_OK)
            s = confsmoe_gate_set_shard(model->gate, w->first * S, w->global_B * S);
        if (s == CONFSMOE_OK)
            s = confsmoe_gate_forward(model->gate, z, lab, present, f, NULL, slots, &loss,
                                      w->training ? &w->gate_saved[m] : NULL);
        confsmoe_gate_set_shard(model->gate, 0, 0);
        confsmoe_tensor_destroy(z);
        confsmoe_tensor_destroy(f);
        confsmoe_tensor_destroy(slots);
        confsmoe_tensor_destroy(lab);
        confsmoe_tensor_destroy(present);
        if (s != CONFSMOE_OK)
            break;
        *aux += w->gate_weight[m] * loss;
        csm_add(sum, Hm, F, rows * d);
        layernorm_forward(&model->ln3, sum, rows, d, w->tok, w->ln3_stats + m * 2 * rows);
        scatter_modality(w->tok, w->H2, B, S, L, d, m, false);
    }
    csm_rng_seek(model->ctx, w->draws.end);
    return s;
}

static void readout_forward(confsmoe_model *model, workspace *w)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d;
    for (int64_t b = 0; b < B; b++)
        for (int32_t m = 0; m < M; m++) {
            float *out = w->pooled + (b * M + m) * d;
            for (int64_t c = 0; c < d; c++) {
                double sum = 0.0;
                for (int64_t s = 0; s < S; s++)
                    sum += w->H2[(b * L + m * S + s) * d + c];
                out[c] = (float)(sum / (double)S);
            }
        }
    linear_forward(&model->readout, w->pooled, B, w->r);
    layernorm_forward(&model->ln_out, w->r, B, d, w->rn, w->ln_out_stats);
    linear_forward(&model->head, w->rn, B, w->logits);
}

static confsmoe_status forward(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                               const confsmoe_tensor *avail, const confsmoe_tensor *labels, workspace *w, float *aux)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d;
    confsmoe_status s = stage_one(model, inputs, avail, w);
    if (s != CONFSMOE_OK)
        return s;
    for (int32_t m = 0; m < M; m++) {
        linear_forward(&model->enc[m], w->x[m], B * S, w->tok);
        scatter_modality(w->tok, w->X, B, S, L, d, m, false);
    }
    csm_add_rows(w->X, csm_f32(model->pos), B, L * d);
    layernorm_forward(&model->ln1, w->X, B * L, d, w->Xn, w->ln1_stats);
    attention_forward(model, w);
    residual_forward(model, w);
    if ((s = moe_forward(model, avail, labels, w, aux)) != CONFSMOE_OK)
        return s;
    if (model->imputer) {
        confsmoe_tensor *h = NULL, *slots = NULL, *out = NULL;
        s = wrap(model, CONFSMOE_F32, 3, B, L, d, 0, w->H2, &h);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 4, M, B * S, model->p.k, d, w->slots, &slots);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 3, B, L, d, 0, w->H2, &out);
        if (s == CONFSMOE_OK)
            s = confsmoe_imputer_forward(model->imputer, h, slots, avail, out,
                                         w->training ? &w->imputer_saved : NULL);
        confsmoe_tensor_destroy(h);
        confsmoe_tensor_destroy(slots);
        confsmoe_tensor_destroy(out);
        if (s != CONFSMOE_OK)
            return s;
    }
    readout_forward(model, w);
    return CONFSMOE_OK;
}

/* Mean cross-entropy (or BCE with logits) over the global batch, this batch's share, and its
 * gradient with respect to the logits. */
static float task_loss(const confsmoe_model *model, const workspace *w, const confsmoe_tensor *labels,
                       float *dlogits)
{
    const int64_t B = w->B, Bg = w->global_B, C = model->p.n_classes;
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const float *z = w->logits + b * C;
        float *dz = dlogits + b * C;
        if (model->p.multilabel) {
            const uint8_t *y = (const uint8_t *)labels->data + b * C;
            for (int64_t c = 0; c < C; c++) {
                total += fmaxf(z[c], 0.0f) - z[c] * y[c] + log1pf(expf(-fabsf(z[c])));
                dz[c] = (csm_sigmoid(z[c]) - y[c]) / (float)(Bg * C);
            }
            continue;
        }
        const int32_t y = ((const int32_t *)labels->data)[b];
        float top = z[0];
        for (int64_t c = 1; c < C; c++)
            top = fmaxf(top, z[c]);
        double sum = 0.0;
        for (int64_t c = 0; c < C; c++)
            sum += exp((double)(z[c] - top));
        total += log(sum) - (double)(z[y] - top);
        for (int64_t c = 0; c < C; c++)
            dz[c] = ((float)(exp((double)(z[c] - top)) / sum) - (c == y ? 1.0f : 0.0f)) / (float)Bg;
    }
    return (float)(total / (double)(model->p.multilabel ? Bg * C : Bg));
}

/* Gradients of one backward, all [B L, d] unless noted. Six [B L, d] buffers serve ten
 * gradients, by lifetime: G1 = dH3, then dH = dX; G2 = dH2, then dA, then dXn; G3 = dctx;
 * G4 = dV; G5 = dQ; G6 = dK. */
struct gradients {
    float *dlogits;                  /* [B, C] */
    float *drn, *dr, *dpooled;       /* [B, d], [B, d], [B, M d] */
    float *dH3, *dH2, *dH, *dA, *dctx, *dQ, *dK, *dV, *dXn, *dX;
    float *dslots;                   /* [M, B S, k, d] */
    float *dsum, *dZ, *dtok;         /* [B S, d] */
};

/* The arrays of one backward call (layout.h). */
static void gradients_parts(csm_layout *l, const confsmoe_model *model, int64_t B, gradients *g)
{
    const size_t M = (size_t)model->p.n_modalities, S = (size_t)model->p.tokens, d = (size_t)model->p.d;
    const size_t L = M * S, b = (size_t)B, C = (size_t)model->p.n_classes, k = (size_t)model->p.k;
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
    g->dslots = CSM_LAYOUT_ROWS(l, float, M * b * S * k, d);
    g->dsum = CSM_LAYOUT_ROWS(l, float, b * S, d);
    g->dZ = CSM_LAYOUT_ROWS(l, float, b * S, d);
    g->dtok = CSM_LAYOUT_ROWS(l, float, b * S, d);
}

static void *gradients_alloc(confsmoe_model *model, int64_t B, gradients *g)
{
    csm_layout l = csm_layout_measure();
    size_t bytes;
    gradients_parts(&l, model, B, g);
    char *block = csm_layout_size(&l, &bytes)
                      ? cached_block(model, &model->grad_cache, &model->grad_cache_size, bytes)
                      : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    gradients_parts(&l, model, B, g);
    /* Stage 2 (or nothing) adds into dslots; everything else is written before it is read. */
    const size_t slot_floats = (size_t)(model->p.n_modalities * B * model->p.tokens * model->p.k * model->p.d);
    memset(g->dslots, 0, slot_floats * sizeof(float));
    return block;
}

static void attention_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attn_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    gradients *g = t->g;
    const int64_t L = model->tokens_total, d = model->p.d, heads = model->p.heads, dh = d / heads;
    const float scale = 1.0f / sqrtf((float)dh), kept = 1.0f / (1.0f - model->p.dropout);
    const attn_scratch a = scratch_of(model, w, worker);
    for (int64_t b = first; b < last; b++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t off = b * L * d + h * dh;
            /* Forward's weights again. */
            const float *weights = attention_weights(model, w, &a, b, h, true), *P = a.P;
            /* ctx = weights V: d(weights) = dctx V^T and dV = weights^T dctx. */
            csm_gemm_ld(false, true, L, L, dh, 1.0f, g->dctx + off, d, w->V + off, d, 0.0f, a.dP, L);
            csm_gemm_ld(true, false, L, dh, L, 1.0f, weights, L, g->dctx + off, d, 0.0f, g->dV + off, d);
            if (w->dropout)
                csm_mask_scale_inplace(a.dP, attention_keep(model, w, b, h), kept, L * L);
            for (int64_t i = 0; i < L; i++)
                csm_softmax_backward_row(P + i * L, a.dP + i * L, a.dP + i * L, L);
            /* scores = scale Q K^T. */
            csm_gemm_ld(false, false, L, dh, L, scale, a.dP, L, w->K + off, d, 0.0f, g->dQ + off, d);
            csm_gemm_ld(true, false, L, dh, L, scale, a.dP, L, w->Q + off, d, 0.0f, g->dK + off, d);
        }
}

static void attention_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int64_t B = w->B, L = model->tokens_total;
    const csm_params *params = &model->params;
    linear_backward(&model->o, params, w->ctx_, g->dA, B * L, g->dctx, false);
    attn_task task = {model, w, g};
    csm_parallel_for(model->ctx, B, 1, attention_backward_task, &task);
    linear_backward(&model->q, params, w->Xn, g->dQ, B * L, g->dXn, false);
    linear_backward(&model->k, params, w->Xn, g->dK, B * L, g->dXn, true);
    linear_backward(&model->v, params, w->Xn, g->dV, B * L, g->dXn, true);
}

/* dA = dH keep / (1 - p) with forward's residual draws (plus dH under compat). */
static void residual_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const attn_task *t = arg;
    const confsmoe_model *model = t->model;
    const workspace *w = t->w;
    gradients *g = t->g;
    const int64_t L = model->tokens_total, d = model->p.d;
    const float kept = 1.0f / (1.0f - model->p.dropout);
    uint8_t *keep = scratch_of(model, w, worker).keep;
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

static confsmoe_status moe_backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d, k = model->p.k;
    const int64_t rows = B * S;
    const csm_params *params = &model->params;
    confsmoe_status s = CONFSMOE_OK;
    for (int32_t m = 0; m < M && s == CONFSMOE_OK; m++) {
        const float *Hm = w->Hm + m * rows * d, *sum = w->sum_ + m * rows * d;
        /* H_m <- LN3(H_m + F): both terms get the same gradient. */
        gather_modality(g->dH2, g->dtok, B, S, L, d, m);
        layernorm_backward(&model->ln3, params, sum, w->ln3_stats + m * 2 * rows, g->dtok, rows, d, g->dsum, false);
        confsmoe_tensor *dy = NULL, *dslots = NULL, *dz = NULL;
        s = wrap(model, CONFSMOE_F32, 2, rows, d, 0, 0, g->dsum, &dy);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 3, rows, k, d, 0, g->dslots + m * rows * k * d, &dslots);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 2, rows, d, 0, 0, g->dZ, &dz);
        if (s == CONFSMOE_OK)
            s = confsmoe_gate_backward(model->gate, w->gate_saved[m], dy, dslots, w->gate_weight[m], dz);
        confsmoe_tensor_destroy(dy);
        confsmoe_tensor_destroy(dslots);
        confsmoe_tensor_destroy(dz);
        if (s != CONFSMOE_OK)
            break;
        /* Z = LN2(H_m): its gradient joins the residual's in dsum. */
        layernorm_backward(&model->ln2, params, Hm, w->ln2_stats + m * 2 * rows, g->dZ, rows, d, g->dsum, true);
        scatter_modality(g->dsum, g->dH, B, S, L, d, m, false);
    }
    return s;
}

static confsmoe_status backward(confsmoe_model *model, workspace *w, gradients *g)
{
    const int32_t M = model->p.n_modalities;
    const int64_t B = w->B, S = model->p.tokens, L = model->tokens_total, d = model->p.d;
    const csm_params *params = &model->params;
    confsmoe_status s = CONFSMOE_OK;

    linear_backward(&model->head, params, w->rn, g->dlogits, B, g->drn, false);
    layernorm_backward(&model->ln_out, params, w->r, w->ln_out_stats, g->drn, B, d, g->dr, false);
    linear_backward(&model->readout, params, w->pooled, g->dr, B, g->dpooled, false);
    for (int64_t b = 0; b < B; b++)
        for (int32_t m = 0; m < M; m++)
            for (int64_t t = 0; t < S; t++)
                for (int64_t c = 0; c < d; c++)
                    g->dH3[(b * L + m * S + t) * d + c] = g->dpooled[(b * M + m) * d + c] / (float)S;

    if (model->imputer) {
        confsmoe_tensor *dout = NULL, *dh = NULL, *dslots = NULL;
        s = wrap(model, CONFSMOE_F32, 3, B, L, d, 0, g->dH3, &dout);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 3, B, L, d, 0, g->dH2, &dh);
        if (s == CONFSMOE_OK)
            s = wrap(model, CONFSMOE_F32, 4, M, B * S, model->p.k, d, g->dslots, &dslots);
        if (s == CONFSMOE_OK)
            s = confsmoe_imputer_backward(model->imputer, w->imputer_saved, dout, dh, dslots);
        confsmoe_tensor_destroy(dout);
        confsmoe_tensor_destroy(dh);
        confsmoe_tensor_destroy(dslots);
        if (s != CONFSMOE_OK)
            return s;
    } else {
        memcpy(g->dH2, g->dH3, (size_t)(B * L * d) * sizeof(float));
    }
    if ((s = moe_backward(model, w, g)) != CONFSMOE_OK)
        return s;

    /* H = base + Dropout(A), base = X (or A under compat), with forward's draws again. */
    attn_task task = {model, w, g};
    csm_parallel_for(model->ctx, B, 1, residual_backward_task, &task);
    attention_backward(model, w, g);
    /* dX is dH itself (the residual), plus LN1's gradient; under compat X has no residual. */
    layernorm_backward(&model->ln1, params, w->X, w->ln1_stats, g->dXn, B * L, d, g->dX, !model->p.compat);
    float *dpos = csm_f32(csm_params_grad_of(params, model->pos));
    for (int64_t b = 0; b < B; b++)
        csm_axpy(dpos, 1.0f, g->dX + b * L * d, L * d);
    for (int32_t m = 0; m < M; m++) {
        gather_modality(g->dX, g->dtok, B, S, L, d, m);
        linear_backward(&model->enc[m], params, w->x[m], g->dtok, B * S, NULL, false);
    }
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ step and predict */

/* Modality dropout over a global batch: a copy of avail [B, M] in `kept` in which every present
 * cell was dropped with probability p, and a sample left with none keeps one of its present
 * modalities, chosen uniformly. Sample b draws from substream b of stream position `base`: M
 * uniforms, then one more if it was emptied. */
static void drop_modalities(confsmoe_model *model, const uint8_t *avail, int64_t B, uint64_t base, uint8_t *kept)
{
    const int32_t M = model->p.n_modalities;
    const float p = model->p.modality_dropout;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *a = avail + b * M;
        uint8_t *k = kept + b * M;
        csm_substream stream = csm_rng_substream(model->ctx, base, (uint64_t)b);
        int32_t present = 0, survived = 0;
        for (int32_t m = 0; m < M; m++) {
            const bool drop = csm_substream_uniform(&stream, 0.0f, 1.0f) < p;
            k[m] = a[m] && !drop;
            present += a[m];
            survived += k[m];
        }
        if (survived == 0 && present > 0) {
            int32_t pick = (int32_t)csm_substream_uniform(&stream, 0.0f, (float)present);
            pick = pick < present ? pick : present - 1;
            for (int32_t m = 0; m < M; m++)
                if (a[m] && pick-- == 0)
                    k[m] = 1;
        }
    }
}

static int64_t count_present(const uint8_t *avail, int64_t cells)
{
    int64_t n = 0;
    for (int64_t i = 0; i < cells; i++)
        n += avail[i];
    return n;
}

/* Reserves the draws of one call on a global batch of B samples (training: a step; else
 * predict) and lays them out. */
static model_draws model_reserve_draws(confsmoe_model *model, int64_t B, bool training)
{
    const confsmoe_model_params *p = &model->p;
    const uint64_t L = (uint64_t)model->tokens_total, b = (uint64_t)B;
    const bool dropout = training && p->dropout > 0.0f;
    model_draws at;
    uint64_t n = 0;
    at.modality_dropout = n;
    n += training && p->modality_dropout > 0.0f;
    at.stage_one = n;
    n += stage_one_draws(model, training);
    at.attention = n;
    n += dropout ? b * (uint64_t)p->heads * csm_dropout_draws((int64_t)(L * L)) : 0;
    at.residual = n;
    n += dropout ? b * L * csm_dropout_draws(p->d) : 0;
    at.gate_noise_per_call = training ? (uint64_t)csm_gate_noise_draws(model->gate, B * p->tokens) : 0;
    at.gate_noise = n;
    n += (uint64_t)p->n_modalities * at.gate_noise_per_call;
    const uint64_t base = csm_rng_reserve(model->ctx, n);
    at.modality_dropout += base;
    at.stage_one += base;
    at.attention += base;
    at.residual += base;
    at.gate_noise += base;
    at.end = base + n;
    return at;
}

/* The shard checks of confsmoe_model_step_shard: global_avail [B_global, M] holds avail at `first`. */
static confsmoe_status check_shard(confsmoe_model *model, const char *fn, const confsmoe_tensor *avail,
                                   const confsmoe_tensor *global_avail, int64_t first)
{
    confsmoe_ctx *ctx = model->ctx;
    const int64_t M = model->p.n_modalities, dims[2] = {-1, M};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "global_avail", global_avail, CONFSMOE_U8, 2, dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t B = avail->dims[0], Bg = global_avail->dims[0];
    if (Bg < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: the global batch is empty", fn);
    if (first < 0 || first > Bg - B)
        return csm_fail(ctx, CONFSMOE_E_SHAPE,
                        "%s: samples %" PRId64 " .. %" PRId64 " are outside the global batch of %" PRId64, fn, first,
                        first + B - 1, Bg);
    if (model->p.compat && B > 0 && B < Bg)
        return csm_fail(ctx, CONFSMOE_E_UNSUPPORTED,
                        "%s: compat reproduces defects of the reference that span the whole batch (the gate's "
                        "dispatch, the imputer's query of sample 0): a shard of the batch cannot", fn);
    const uint8_t *g = global_avail->data;
    for (int64_t i = 0; i < Bg * M; i++)
        if (g[i] > 1)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: global_avail[%" PRId64 "][%" PRId64 "] is %d, must be 0 or 1", fn, i / M, i % M, g[i]);
    if (B > 0 && memcmp(avail->data, g + first * M, (size_t)(B * M)) != 0)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: avail differs from rows %" PRId64 " .. %" PRId64 " of global_avail", fn, first,
                        first + B - 1);
    return CONFSMOE_OK;
}

/* One training step on samples first .. first + B - 1 of a global batch (global_avail NULL:
 * the batch is the whole batch). */
static confsmoe_status train_step(confsmoe_model *model, const char *fn, const confsmoe_tensor *const *inputs,
                                  const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                  const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                  float *loss, float *task)
{
    const bool shard = global_avail != NULL;
    confsmoe_status s = check_batch(model, fn, inputs, avail, labels, logits, true, shard);
    if (s == CONFSMOE_OK && shard)
        s = check_shard(model, fn, avail, global_avail, first);
    if (s != CONFSMOE_OK)
        return s;
    if (!shard)
        global_avail = avail;
    const int64_t B = avail->dims[0], Bg = global_avail->dims[0], M = model->p.n_modalities;
    if (B == 0) {
        /* Nothing to compute; the stream moves as it does for the other shards. */
        model_reserve_draws(model, Bg, true);
        if (loss)
            *loss = 0.0f;
        if (task)
            *task = 0.0f;
        return CONFSMOE_OK;
    }
    workspace w;
    gradients g;
    void *block = workspace_alloc(model, B, true, &w);
    void *grad_block = block ? gradients_alloc(model, B, &g) : NULL;
    if (!block || !grad_block)
        return csm_fail(model->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for a batch of %" PRId64, fn, B);
    w.first = first;
    w.global_B = Bg;
    /* The arena of the gate and the imputer: as big as the previous step wanted, with some slack
     * (the first step, or a bigger batch, falls back to the allocator). If growing fails, they
     * just allocate. */
    csm_arena *arena = &model->arena;
    const size_t need = model->arena_need, target = need + need / 8;
    if (need > arena->size || target < arena->size / 2) {
        /* Grown only after a step that did not fit (whose estimate counts freed blocks too):
         * the routing, hence the size of the gate's blocks, moves a little from step to step,
         * and a new block is fresh pages to fault in. Shrunk after a step that needed less
         * than half of it. */
        void *block = target ? csm_alloc(model->ctx, target) : NULL;
        if (block || !target) {
            csm_free(model->ctx, arena->base);
            arena->base = block;
            arena->size = target;
        }
    }
    csm_arena_reset(arena);
    csm_gate_set_arena(model->gate, arena);
    if (model->imputer)
        csm_imputer_set_arena(model->imputer, arena);
    float aux = 0.0f, task_value = 0.0f;
    const uint64_t rng_at_entry = csm_rng_tell(model->ctx);
    w.draws = model_reserve_draws(model, Bg, true);
    csm_gate_usage_mark(model->gate);
    /* backward accumulates into the parameter gradients as it goes and can still fail part-way
     * (an allocation in the gate or the imputer): a copy of them goes back in that case, so
     * that a failed step changes no state. */
    size_t grad_bytes = 0;
    for (int32_t i = 0; i < model->params.count; i++)
        grad_bytes += model->params.grad[i]->nbytes;
    char *grad_copy = csm_alloc(model->ctx, grad_bytes);
    s = grad_copy ? CONFSMOE_OK : csm_fail(model->ctx, CONFSMOE_E_NOMEM, "out of memory for a copy of the gradients");
    /* Modality dropout is drawn for the whole global batch: L_conf's weights count its present cells. */
    uint8_t *kept = NULL;
    confsmoe_tensor *kept_avail = NULL;
    w.global_present = count_present(global_avail->data, Bg * M);
    if (s == CONFSMOE_OK && model->p.modality_dropout > 0.0f) {
        kept = csm_alloc(model->ctx, (size_t)global_avail->nbytes);
        s = kept ? wrap(model, CONFSMOE_U8, 2, B, M, 0, 0, kept + first * M, &kept_avail)
                 : csm_fail(model->ctx, CONFSMOE_E_NOMEM, "out of memory for the modality-dropout mask");
        if (s == CONFSMOE_OK) {
            drop_modalities(model, global_avail->data, Bg, w.draws.modality_dropout, kept);
            w.global_present = count_present(kept, Bg * M);
            avail = kept_avail;
        }
    }
    if (s == CONFSMOE_OK)
        s = forward(model, inputs, avail, labels, &w, &aux);
    if (s == CONFSMOE_OK) {
        task_value = task_loss(model, &w, labels, g.dlogits);
        for (size_t i = 0, at = 0; i < (size_t)model->params.count; at += model->params.grad[i++]->nbytes)
            if (model->params.grad[i]->nbytes > 0)
                memcpy(grad_copy + at, model->params.grad[i]->data, model->params.grad[i]->nbytes);
        s = backward(model, &w, &g);
        for (size_t i = 0, at = 0; s != CONFSMOE_OK && i < (size_t)model->params.count;
             at += model->params.grad[i++]->nbytes)
            if (model->params.grad[i]->nbytes > 0)
                memcpy(model->params.grad[i]->data, grad_copy + at, model->params.grad[i]->nbytes);
    }
    csm_free(model->ctx, grad_copy);
    confsmoe_tensor_destroy(kept_avail);
    csm_free(model->ctx, kept);
    if (s == CONFSMOE_OK) {
        if (logits)
            memcpy(logits->data, w.logits, logits->nbytes);
        if (loss)
            *loss = task_value + aux;
        if (task)
            *task = task_value;
    }
    workspace_release(model, &w);
    csm_gate_set_arena(model->gate, NULL);
    if (model->imputer)
        csm_imputer_set_arena(model->imputer, NULL);
    model->arena_need = arena->wanted;
    csm_arena_reset(arena);
    if (s != CONFSMOE_OK) {
        csm_rng_seek(model->ctx, rng_at_entry);  /* a failed step draws nothing */
        csm_gate_usage_rollback(model->gate);
        char detail[CSM_ERROR_CAP];
        snprintf(detail, sizeof detail, "%s", model->ctx->last_error);
        return csm_fail(model->ctx, s, "%s: %s", fn, detail);
    }
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_model_step(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                    const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                    confsmoe_tensor *logits, float *loss, float *task)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    return train_step(model, "model_step", inputs, avail, labels, NULL, 0, logits, loss, task);
}

confsmoe_status confsmoe_model_step_shard(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                          const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                          const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                          float *loss, float *task)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (!global_avail)
        return csm_fail(model->ctx, CONFSMOE_E_INVALID_ARGUMENT, "model_step_shard: global_avail is NULL");
    return train_step(model, "model_step_shard", inputs, avail, labels, global_avail, first, logits, loss, task);
}

confsmoe_status confsmoe_model_predict(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                       const confsmoe_tensor *avail, confsmoe_tensor *logits)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "model_predict";
    if (!logits)
        return csm_fail(model->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: logits is NULL", fn);
    confsmoe_status s = check_batch(model, fn, inputs, avail, NULL, logits, false, false);
    if (s != CONFSMOE_OK)
        return s;
    workspace w;
    void *block = workspace_alloc(model, avail->dims[0], false, &w);
    if (!block)
        return csm_fail(model->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for a batch of %" PRId64, fn,
                        avail->dims[0]);
    w.first = 0;
    w.global_B = w.B;
    w.global_present = count_present(avail->data, avail->nbytes);
    float aux = 0.0f;
    const uint64_t rng_at_entry = csm_rng_tell(model->ctx);
    w.draws = model_reserve_draws(model, w.B, false);
    csm_gate_usage_mark(model->gate);
    s = forward(model, inputs, avail, NULL, &w, &aux);
    if (s == CONFSMOE_OK)
        memcpy(logits->data, w.logits, logits->nbytes);
    workspace_release(model, &w);
    if (s != CONFSMOE_OK) {
        csm_rng_seek(model->ctx, rng_at_entry);  /* a failed predict draws nothing */
        csm_gate_usage_rollback(model->gate);
        char detail[CSM_ERROR_CAP];
        snprintf(detail, sizeof detail, "%s", model->ctx->last_error);
        return csm_fail(model->ctx, s, "%s: %s", fn, detail);
    }
    return CONFSMOE_OK;
}
