/* The gate: router -> top-k -> batched experts -> ConfNets or router softmax -> combine,
 * with the confidence loss, the load losses and the utilisation counters
 * (docs/MODEL.md, sections 3 and 4). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "confnet.h"
#include "expert.h"
#include "gate.h"
#include "internal.h"
#include "kernels.h"
#include "layout.h"
#include "load_loss.h"
#include "params.h"
#include "router.h"
#include "sized.h"
#include "threads.h"
#include "usage.h"

#define NAME_CAP CSM_PARAM_NAME_CAP
enum { CONFNET_PARAMS = 4 };

struct confsmoe_gate {
    confsmoe_ctx *ctx;
    confsmoe_gate_params p;
    int32_t n_experts;
    confsmoe_expert **experts;    /* borrowed; NULL with an exchange */
    confsmoe_gate_exchange exchange; /* where the experts run when experts is NULL */
    int64_t shard_first, shard_total; /* the next calls' tokens in their global batch (total 0: not a shard) */
    csm_router router;
    int32_t conf_first;           /* under CONFIDENCE, the index in params of conf.0.ln.weight */
    confsmoe_tensor *target_w, *target_b, *target_dw, *target_db;
    csm_params params;
    csm_usage last, total;
    csm_usage mark_last, mark_total; /* copies taken by csm_gate_usage_mark */
    csm_arena *arena;             /* lent by the model for a step, else NULL */
};

void csm_gate_set_arena(confsmoe_gate *g, csm_arena *arena) { g->arena = arena; }

static void usage_copy(csm_usage *dst, const csm_usage *src, int32_t E)
{
    dst->tokens = src->tokens;
    dst->conf_loss_sum = src->conf_loss_sum;
    dst->conf_loss_calls = src->conf_loss_calls;
    memcpy(dst->load, src->load, (size_t)E * sizeof *dst->load);
    memcpy(dst->conf_count, src->conf_count, (size_t)E * sizeof *dst->conf_count);
    memcpy(dst->conf_sum, src->conf_sum, (size_t)E * sizeof *dst->conf_sum);
}

void csm_gate_usage_mark(confsmoe_gate *g)
{
    usage_copy(&g->mark_last, &g->last, g->n_experts);
    usage_copy(&g->mark_total, &g->total, g->n_experts);
}

void csm_gate_usage_rollback(confsmoe_gate *g)
{
    usage_copy(&g->last, &g->mark_last, g->n_experts);
    usage_copy(&g->total, &g->mark_total, g->n_experts);
}

/* Per-call blocks come from the lent arena when there is one and they fit. */
static void *gate_alloc(const confsmoe_gate *g, size_t bytes) { return csm_lent_alloc(g->ctx, g->arena, bytes); }

/* Everything one forward keeps. Rows of the "block" arrays are the n*k slots sorted
 * by expert, so that each expert sees one contiguous batch. */
typedef struct {
    confsmoe_saved base;
    int64_t n;
    bool conf_loss;              /* the confidence loss was computed */
    float den;                   /* its denominator */
    float *x;                    /* [n, d] (training) */
    float *u_clean, *u;          /* [n, E]; u == u_clean without noise */
    float *h, *eps, *sigma;      /* [n, E] when noisy, else NULL */
    int32_t *idx;                /* [n, k] */
    float *g;                    /* [n, k] softmax over the kept logits */
    float *c;                    /* [n, k] confidence per slot (CONFIDENCE) */
    int64_t *offset;             /* [E + 1] first block row of each expert */
    int64_t *row_of;             /* [n k] slot -> block row */
    int64_t *slot_of;            /* [n k] block row -> slot t * k + j */
    float *yb;                   /* [n k, d] expert outputs in block order */
    float *s;                    /* [n k] ConfNet output per block row */
    csm_confnet_cache cache;     /* [n k] each */
    float *probs;                /* [n k, C] softmax or sigmoid of the target classifier */
    int32_t *labels;             /* [n] single-label */
    uint8_t *multi_labels;       /* [n, C] multi-label */
    uint8_t *present;            /* [n] */
    float *kept_block;           /* what the experts keep for backward, a second block (training only) */
    csm_arena *arena;            /* the arena lent when the blocks were allocated, or NULL */
    size_t *kept_at;             /* [E + 1] offset of expert e's part of kept_block, in floats */
    void *call;                  /* the exchange's state for backward, or NULL */
    /* The exchange's release and user, copied: the handle may be destroyed after its gate. */
    void (*release_call)(void *user, void *call);
    void *exchange_user;
} gate_saved;

static void gate_defaults(confsmoe_gate_params *p)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->k = 2;
    p->router = CONFSMOE_ROUTER_SOFTMAX;
    p->combine = CONFSMOE_COMBINE_CONFIDENCE;
    p->confidence = CONFSMOE_CONFIDENCE_TOKEN;
    p->target = CONFSMOE_TARGET_SINGLE_LABEL;
    p->router_grad = CONFSMOE_ROUTER_GRAD_FROZEN;
    p->load_loss = CONFSMOE_LOAD_LOSS_NONE;
    p->load_loss_weight = 0.01f;
    p->conf_loss_weight = 1.0f;
}

void confsmoe_gate_params_init_sized(confsmoe_gate_params *p, size_t struct_size)
{
    confsmoe_gate_params defaults;
    gate_defaults(&defaults);
    csm_sized_init(p, struct_size, &defaults, sizeof defaults, CSM_GATE_PARAMS_MIN);
}

size_t confsmoe_sizeof_gate_params(void) { return sizeof(confsmoe_gate_params); }

size_t confsmoe_sizeof_gate_stats(void) { return sizeof(confsmoe_gate_stats); }

static bool is_flag(int32_t v) { return v == 0 || v == 1; }

/* experts == NULL: a gate whose experts run behind an exchange. */
static confsmoe_status check_params(confsmoe_ctx *ctx, const char *fn, const confsmoe_gate_params *p,
                                    confsmoe_expert *const *experts, int32_t n_experts)
{
    if (n_experts < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: n_experts is %" PRId32 ", must be >= 1", fn, n_experts);
    if (p->d < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: d is %" PRId64 ", must be >= 1", fn, p->d);
    for (int32_t e = 0; experts && e < n_experts; e++) {
        if (!experts[e])
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: experts[%" PRId32 "] is NULL", fn, e);
        if (confsmoe_expert_d(experts[e]) != p->d)
            return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: experts[%" PRId32 "] has d=%" PRId64 ", the gate has d=%" PRId64,
                            fn, e, confsmoe_expert_d(experts[e]), p->d);
    }
    if (p->k < 1 || p->k > n_experts)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: k=%" PRId32 " must be in 1..%" PRId32 " (E)", fn, p->k,
                        n_experts);
    if (p->router < CONFSMOE_ROUTER_SOFTMAX || p->router > CONFSMOE_ROUTER_LAPLACIAN)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown router %" PRId32, fn, p->router);
    if (p->combine != CONFSMOE_COMBINE_ROUTER_SOFTMAX && p->combine != CONFSMOE_COMBINE_CONFIDENCE)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown combine %" PRId32, fn, p->combine);
    if (p->confidence != CONFSMOE_CONFIDENCE_TOKEN && p->confidence != CONFSMOE_CONFIDENCE_EXPERT)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown confidence level %" PRId32, fn, p->confidence);
    if (p->target != CONFSMOE_TARGET_SINGLE_LABEL && p->target != CONFSMOE_TARGET_MULTI_LABEL)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown target %" PRId32, fn, p->target);
    if (p->combine == CONFSMOE_COMBINE_CONFIDENCE && p->n_classes < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: n_classes is %" PRId32 ", the confidence gate needs >= 1 for its target classifier", fn,
                        p->n_classes);
    if (p->router_grad < CONFSMOE_ROUTER_GRAD_FROZEN || p->router_grad > CONFSMOE_ROUTER_GRAD_SCORE)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown router_grad %" PRId32, fn, p->router_grad);
    if (p->load_loss < CONFSMOE_LOAD_LOSS_NONE || p->load_loss > CONFSMOE_LOAD_LOSS_ENTROPY)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown load_loss %" PRId32, fn, p->load_loss);
    if (!(p->load_loss_weight >= 0.0f) || !isfinite(p->load_loss_weight) || !(p->conf_loss_weight >= 0.0f) ||
        !isfinite(p->conf_loss_weight))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: loss weights must be finite and >= 0", fn);
    if (!is_flag(p->noisy) || !is_flag(p->detach_target) || !is_flag(p->compat))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: noisy, detach_target and compat must be 0 or 1", fn);
    return CONFSMOE_OK;
}

/* Adds a zero-initialised parameter and its gradient to the gate's list. */
static confsmoe_status add_param(confsmoe_gate *g, const char *name, int32_t ndim, int64_t d0, int64_t d1,
                                 confsmoe_tensor **param, confsmoe_tensor **grad)
{
    confsmoe_status s = csm_params_new(g->ctx, &g->params, name, ndim, d0, d1, param);
    if (s == CONFSMOE_OK)
        *grad = g->params.grad[g->params.count - 1];
    return s;
}

/* The borrowed experts are not touched: they may be destroyed before the gate. */
void confsmoe_gate_destroy(confsmoe_gate *g)
{
    if (!g)
        return;
    confsmoe_ctx *ctx = g->ctx;
    csm_params_free(ctx, &g->params);
    csm_usage_free(ctx, &g->last);
    csm_usage_free(ctx, &g->total);
    csm_usage_free(ctx, &g->mark_last);
    csm_usage_free(ctx, &g->mark_total);
    csm_free(ctx, g->router.per_expert);
    csm_free(ctx, g->experts);
    csm_free(ctx, g);
    csm_ctx_release(ctx);
}

static confsmoe_status build(confsmoe_gate *g)
{
    const confsmoe_gate_params *p = &g->p;
    const int32_t E = g->n_experts;
    const bool confidence = p->combine == CONFSMOE_COMBINE_CONFIDENCE;
    confsmoe_ctx *ctx = g->ctx;
    g->router.per_expert = csm_calloc(ctx, (size_t)E, sizeof(float));
    if (!g->router.per_expert || !csm_usage_init(ctx, &g->last, E) ||
        !csm_usage_init(ctx, &g->total, E) || !csm_usage_init(ctx, &g->mark_last, E) ||
        !csm_usage_init(ctx, &g->mark_total, E))
        return CONFSMOE_E_NOMEM;

    g->router.kind = p->router;
    g->router.n_experts = E;
    g->router.d = p->d;
    confsmoe_status s = add_param(g, "router.w", 2, p->d, E, &g->router.w, &g->router.dw);
    if (s == CONFSMOE_OK && p->noisy)
        s = add_param(g, "noise.w", 2, p->d, E, &g->router.wn, &g->router.dwn);
    if (s != CONFSMOE_OK)
        return s;
    /* The reference's router init, U(-1/sqrt(E), +1/sqrt(E)); the noise network is a bias-free Linear(d, E). */
    csm_fill_uniform(ctx, g->router.w, 1.0f / sqrtf((float)E));
    if (p->noisy)
        csm_fill_uniform(ctx, g->router.wn, 1.0f / sqrtf((float)p->d));
    if (!confidence)
        return CONFSMOE_OK;

    g->conf_first = g->params.count;
    for (int32_t e = 0; e < E && s == CONFSMOE_OK; e++) {
        static const char *const parts[CONFNET_PARAMS] = {"ln.weight", "ln.bias", "w", "b"};
        confsmoe_tensor *param[CONFNET_PARAMS], *grad;
        for (int i = 0; i < CONFNET_PARAMS && s == CONFSMOE_OK; i++) {
            char name[NAME_CAP];
            snprintf(name, sizeof name, "conf.%" PRId32 ".%s", e, parts[i]);
            s = add_param(g, name, 1, i == 3 ? 1 : p->d, 0, &param[i], &grad);
        }
        if (s != CONFSMOE_OK)
            break;
        for (int64_t i = 0; i < p->d; i++)
            csm_f32(param[0])[i] = 1.0f;
        csm_fill_uniform(ctx, param[2], 1.0f / sqrtf((float)p->d));
        csm_fill_uniform(ctx, param[3], 1.0f / sqrtf((float)p->d));
    }
    if (s == CONFSMOE_OK)
        s = add_param(g, "target.w", 2, p->n_classes, p->d, &g->target_w, &g->target_dw);
    if (s == CONFSMOE_OK)
        s = add_param(g, "target.b", 1, p->n_classes, 0, &g->target_b, &g->target_db);
    if (s != CONFSMOE_OK)
        return s;
    csm_fill_uniform(ctx, g->target_w, 1.0f / sqrtf((float)p->d));
    csm_fill_uniform(ctx, g->target_b, 1.0f / sqrtf((float)p->d));
    return CONFSMOE_OK;
}

/* A gate over borrowed experts, or (experts == NULL) over an exchange. */
static confsmoe_status create(confsmoe_ctx *ctx, const char *fn, const confsmoe_gate_params *p,
                              confsmoe_expert *const *experts, const confsmoe_gate_exchange *exchange, int32_t n_experts,
                              confsmoe_gate **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out || !p)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, !ctx ? "ctx" : !out ? "out" : "params");
    if (!experts && !exchange)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: experts is NULL", fn);
    if (exchange && (!exchange->forward || !exchange->backward || !exchange->release))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: the exchange needs forward, backward and release", fn);
    /* The caller's struct, of any accepted size, over the defaults (docs/API.md, "Struct versioning"). */
    confsmoe_gate_params full;
    gate_defaults(&full);
    confsmoe_status s = csm_sized_read(ctx, fn, "confsmoe_gate_params", p, &full, sizeof full, CSM_GATE_PARAMS_MIN);
    p = &full;
    if (s == CONFSMOE_OK)
        s = check_params(ctx, fn, p, experts, n_experts);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_gate *g = csm_calloc(ctx, 1, sizeof *g);
    if (!g)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    g->ctx = csm_ctx_retain(ctx);
    g->p = *p;
    g->n_experts = n_experts;
    bool ok = true;
    if (exchange) {
        g->exchange = *exchange;
    } else {
        g->experts = csm_calloc(ctx, (size_t)n_experts, sizeof *g->experts);
        ok = g->experts != NULL;
        if (ok)
            memcpy(g->experts, experts, (size_t)n_experts * sizeof *experts);
    }
    const uint64_t rng_at_entry = csm_rng_tell(ctx);
    s = ok ? build(g) : CONFSMOE_E_NOMEM;
    if (s != CONFSMOE_OK) {
        csm_rng_seek(ctx, rng_at_entry);
        confsmoe_gate_destroy(g);
        return csm_fail(ctx, s, "%s: out of memory for E=%" PRId32 ", d=%" PRId64, fn, n_experts, p->d);
    }
    *out = g;
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_gate_create(confsmoe_ctx *ctx, const confsmoe_gate_params *p, confsmoe_expert *const *experts,
                                     int32_t n_experts, confsmoe_gate **out)
{
    return create(ctx, "gate_create", p, experts, NULL, n_experts, out);
}

confsmoe_status confsmoe_gate_create_exchange(confsmoe_ctx *ctx, const confsmoe_gate_params *p, int32_t n_experts,
                                              const confsmoe_gate_exchange *exchange, confsmoe_gate **out)
{
    if (!exchange) {
        if (out)
            *out = NULL;
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "gate_create_exchange: exchange is NULL");
    }
    return create(ctx, "gate_create_exchange", p, NULL, exchange, n_experts, out);
}

confsmoe_status confsmoe_gate_set_shard(confsmoe_gate *g, int64_t first, int64_t total)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (first < 0 || total < 0 || first > total)
        return csm_fail(g->ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "gate_set_shard: first=%" PRId64 " and total=%" PRId64 " must satisfy 0 <= first <= total", first,
                        total);
    g->shard_first = total ? first : 0;
    g->shard_total = total;
    return CONFSMOE_OK;
}

int64_t csm_gate_noise_draws(const confsmoe_gate *g, int64_t tokens)
{
    return g->p.noisy ? tokens * g->n_experts * CSM_NORMAL_DRAWS : 0;
}

int32_t confsmoe_gate_n_experts(const confsmoe_gate *g) { return g ? g->n_experts : -1; }

confsmoe_ctx *confsmoe_gate_ctx(const confsmoe_gate *g) { return g ? g->ctx : NULL; }

int32_t confsmoe_gate_k(const confsmoe_gate *g) { return g ? g->p.k : -1; }

/* ------------------------------------------------------------------ saved state */

static bool router_learns(const confsmoe_gate *g)
{
    return g->p.combine == CONFSMOE_COMBINE_ROUTER_SOFTMAX || g->p.router_grad != CONFSMOE_ROUTER_GRAD_FROZEN;
}

/* Reads only the handle: its gate may be gone. (A handle from a lent arena never reaches the
 * host: the model destroys it within its step.) */
static void release_saved(confsmoe_saved *base)
{
    gate_saved *s = (gate_saved *)base;
    confsmoe_ctx *ctx = base->ctx;
    if (s->call)
        s->release_call(s->exchange_user, s->call);
    csm_arena *arena = s->arena;
    if (s->kept_block)
        csm_lent_free(ctx, arena, s->kept_block, 0);
    csm_lent_free(ctx, arena, base, 0);
    csm_ctx_release(ctx);
}

/* The header and every array of a forward's saved state, sized by the gate's options
 * (layout.h); returns the header. Products by k, d and C are checked by the layout. */
static gate_saved *gate_saved_parts(csm_layout *l, const confsmoe_gate *g, int64_t n, bool training, gate_saved *view)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)n;
    const size_t C = (size_t)g->p.n_classes;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    const bool noisy = g->p.noisy && training;
    const bool conf_loss = confidence && training;
    const size_t nk = N * k; /* wraps only if idx's part overflowed, after which every part is NULL */
    gate_saved *header = CSM_LAYOUT_ARRAY(l, gate_saved, 1);
    view->x = training ? CSM_LAYOUT_ROWS(l, float, N, d) : NULL;
    view->u_clean = CSM_LAYOUT_ROWS(l, float, N, E);
    view->u = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : view->u_clean;
    view->h = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->eps = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->sigma = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->idx = CSM_LAYOUT_ROWS(l, int32_t, N, k);
    view->g = CSM_LAYOUT_ROWS(l, float, N, k);
    view->c = CSM_LAYOUT_ROWS(l, float, N, k);
    view->offset = CSM_LAYOUT_ARRAY(l, int64_t, E + 1);
    view->row_of = CSM_LAYOUT_ROWS(l, int64_t, N, k);
    view->slot_of = CSM_LAYOUT_ROWS(l, int64_t, N, k);
    view->yb = CSM_LAYOUT_ROWS(l, float, nk, d);
    view->s = CSM_LAYOUT_ROWS(l, float, N, k);
    view->cache.mean = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->cache.rstd = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->cache.z = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->probs = CSM_LAYOUT_ROWS(l, float, conf_loss ? nk : 0, C);
    view->labels = CSM_LAYOUT_ARRAY(l, int32_t, conf_loss ? N : 0);
    view->multi_labels = CSM_LAYOUT_ROWS(l, uint8_t, conf_loss ? N : 0, C);
    view->present = CSM_LAYOUT_ARRAY(l, uint8_t, N);
    view->kept_at = CSM_LAYOUT_ARRAY(l, size_t, E + 1);
    return header;
}

/* One block for the header and every array. What the experts keep for backward, whose size
 * depends on the routing, gets a second block later. */
static gate_saved *gate_alloc_saved(confsmoe_gate *g, int64_t n, bool training)
{
    gate_saved view = {0};
    csm_layout l = csm_layout_measure();
    size_t bytes;
    gate_saved_parts(&l, g, n, training, &view);
    char *block = csm_layout_size(&l, &bytes) ? gate_alloc(g, bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    gate_saved *s = gate_saved_parts(&l, g, n, training, &view);
    *s = view;
    s->arena = g->arena;
    s->base.ctx = csm_ctx_retain(g->ctx);
    s->base.owner = g;
    s->base.release = release_saved;
    s->release_call = g->exchange.release;
    s->exchange_user = g->exchange.user;
    s->n = n;
    return s;
}

/* ------------------------------------------------------------------ forward */

static confsmoe_status check_forward(confsmoe_gate *g, const confsmoe_tensor *x, const confsmoe_tensor *labels,
                                     const confsmoe_tensor *present, const confsmoe_tensor *y,
                                     const confsmoe_tensor *topk, const confsmoe_tensor *slots, bool training)
{
    static const char fn[] = "gate_forward";
    confsmoe_ctx *ctx = g->ctx;
    const int64_t d = g->p.d, k = g->p.k, C = g->p.n_classes;
    const int64_t x_dims[2] = {-1, d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "x", x, CONFSMOE_F32, 2, x_dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t n = x->dims[0], y_dims[2] = {n, d}, topk_dims[2] = {n, k}, slot_dims[3] = {n, k, d};
    if ((s = csm_expect_tensor(ctx, fn, "y", y, CONFSMOE_F32, 2, y_dims)) != CONFSMOE_OK)
        return s;
    if (topk && (s = csm_expect_tensor(ctx, fn, "topk", topk, CONFSMOE_I32, 2, topk_dims)) != CONFSMOE_OK)
        return s;
    if (slots && (s = csm_expect_tensor(ctx, fn, "slots", slots, CONFSMOE_F32, 3, slot_dims)) != CONFSMOE_OK)
        return s;
    if (present) {
        if ((s = csm_expect_tensor(ctx, fn, "present", present, CONFSMOE_U8, 1, &n)) != CONFSMOE_OK)
            return s;
        const uint8_t *v = present->data;
        for (int64_t t = 0; t < n; t++)
            if (v[t] > 1)
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: present[%" PRId64 "] is %d, must be 0 or 1", fn,
                                t, v[t]);
    }
    if (training && g->p.combine == CONFSMOE_COMBINE_CONFIDENCE) {
        if (!labels)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: labels are needed in training for the confidence loss (pass saved = NULL to infer)",
                            fn);
        if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL) {
            if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_I32, 1, &n)) != CONFSMOE_OK)
                return s;
            const int32_t *v = labels->data;
            for (int64_t t = 0; t < n; t++)
                if (v[t] < 0 || v[t] >= C)
                    return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                                    "%s: labels[%" PRId64 "] is %" PRId32 ", out of range 0..%" PRId64, fn, t, v[t],
                                    C - 1);
        } else {
            const int64_t dims[2] = {n, C};
            if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_U8, 2, dims)) != CONFSMOE_OK)
                return s;
            const uint8_t *v = labels->data;
            for (int64_t i = 0; i < n * C; i++)
                if (v[i] > 1)
                    return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                                    "%s: labels[%" PRId64 "][%" PRId64 "] is %d, multi-label values must be 0 or 1", fn,
                                    i / C, i % C, v[i]);
        }
    }
    return csm_expect_finite(ctx, fn, "x", x);
}

/* Sorts the n*k slots by expert (stable in t, then j). */
static void dispatch(const confsmoe_gate *g, gate_saved *s)
{
    const int32_t E = g->n_experts, k = g->p.k;
    const int64_t n = s->n;
    memset(s->offset, 0, (size_t)(E + 1) * sizeof *s->offset);
    for (int64_t i = 0; i < n * k; i++)
        s->offset[s->idx[i] + 1]++;
    for (int32_t e = 0; e < E; e++)
        s->offset[e + 1] += s->offset[e];
    /* offset[e] serves as expert e's cursor (it then holds e's end, the next one's start) and
     * is shifted back after: no E-sized scratch (row_of, which served before, holds only n k,
     * fewer than E when a batch is small). */
    for (int64_t i = 0; i < n * k; i++)
        s->slot_of[s->offset[s->idx[i]]++] = i;
    for (int32_t e = E; e > 0; e--)
        s->offset[e] = s->offset[e - 1];
    s->offset[0] = 0;
    for (int64_t r = 0; r < n * k; r++)
        s->row_of[s->slot_of[r]] = r;
}

/* The input rows of expert e's block: slot j of token t runs on token t (compat: the
 * reference ran it on token (t k + j) mod N). */
static void gather_rows(const confsmoe_gate *g, const gate_saved *s, int32_t e, const float *x, float *out)
{
    const int64_t n = s->n, k = g->p.k, d = g->p.d;
    for (int64_t r = s->offset[e]; r < s->offset[e + 1]; r++) {
        const int64_t slot = s->slot_of[r], src = g->p.compat ? slot % n : slot / k;
        memcpy(out + (r - s->offset[e]) * d, x + src * d, (size_t)d * sizeof *x);
    }
}

/* Rows of the largest expert batch, and the largest rows * h (0 with an exchange); false if
 * that overflows. */
static bool expert_sizes(const confsmoe_gate *g, const gate_saved *s, size_t *rows_max, size_t *rows_h_max)
{
    *rows_max = *rows_h_max = 0;
    for (int32_t e = 0; e < g->n_experts; e++) {
        size_t rows = (size_t)(s->offset[e + 1] - s->offset[e]), rows_h;
        if (!csm_mul_size(rows, g->experts ? (size_t)confsmoe_expert_h(g->experts[e]) : 0, &rows_h))
            return false;
        *rows_max = rows > *rows_max ? rows : *rows_max;
        *rows_h_max = rows_h > *rows_h_max ? rows_h : *rows_h_max;
    }
    return true;
}

/* What the experts keep for backward (training): one block of n k CSM_EXPERT_KEPT(h) floats at
 * most, expert e's at kept_at[e]. */
static float *alloc_kept(confsmoe_gate *g, gate_saved *s)
{
    size_t total = 0, bytes;
    for (int32_t e = 0; e < g->n_experts; e++) {
        size_t rows_kept;
        s->kept_at[e] = total;
        if (!csm_mul_size((size_t)(s->offset[e + 1] - s->offset[e]),
                          (size_t)CSM_EXPERT_KEPT(confsmoe_expert_h(g->experts[e])), &rows_kept) ||
            total > SIZE_MAX - rows_kept)
            return NULL;
        total += rows_kept;
    }
    s->kept_at[g->n_experts] = total;
    return csm_mul_size(total, sizeof(float), &bytes) ? gate_alloc(g, bytes) : NULL;
}

/* The experts of a forward call, one task per expert: its rows gathered, the expert, and
 * under CONFIDENCE its ConfNet. Each worker has its own scratch (rows_max d floats for the
 * rows, rows_h_max for the activation, d for the ConfNet). */
typedef struct {
    confsmoe_gate *g;
    gate_saved *s;
    const float *x;
    float *scratch;
    size_t rows_max, per_worker;
} forward_task;

static void confidence_block(confsmoe_gate *g, gate_saved *s, int32_t e, float *scratch);

static void expert_forward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const forward_task *t = arg;
    confsmoe_gate *g = t->g;
    gate_saved *s = t->s;
    const int64_t d = g->p.d;
    float *xs = t->scratch + (size_t)worker * t->per_worker, *act = xs + t->rows_max * (size_t)d;
    float *net = xs + t->per_worker - (size_t)d;
    for (int64_t e = first; e < last; e++) {
        const int64_t begin = s->offset[e], rows = s->offset[e + 1] - begin;
        if (rows == 0)
            continue;
        if (g->experts) { /* with an exchange, yb holds the experts' outputs already */
            gather_rows(g, s, (int32_t)e, t->x, xs);
            csm_expert_forward_rows(g->experts[e], xs, rows, s->yb + begin * d,
                                    s->kept_block ? s->kept_block + s->kept_at[e] : NULL, act);
        }
        if (g->p.combine == CONFSMOE_COMBINE_CONFIDENCE)
            confidence_block(g, s, (int32_t)e, net);
    }
}

#define EXCHANGE_ERROR_CAP 256

/* The experts of a forward call behind the exchange: every slot's input row, in block order,
 * goes out in one call and the experts' outputs come back into yb. */
static confsmoe_status exchange_forward(confsmoe_gate *g, gate_saved *s, const float *x, bool training)
{
    const int64_t rows = s->n * g->p.k, d = g->p.d;
    size_t bytes;
    float *block = csm_mul_size((size_t)rows * (size_t)d, sizeof(float), &bytes) ? gate_alloc(g, bytes) : NULL;
    if (!block)
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_forward: out of memory for the exchange (N=%" PRId64 ")", s->n);
    for (int32_t e = 0; e < g->n_experts; e++)
        gather_rows(g, s, e, x, block + s->offset[e] * d);
    char error[EXCHANGE_ERROR_CAP] = "";
    confsmoe_status st =
        g->exchange.forward(g->exchange.user, s->offset, block, s->yb, training, &s->call, error, sizeof error);
    csm_lent_free(g->ctx, g->arena, block, bytes);
    if (st == CONFSMOE_OK)
        return CONFSMOE_OK;
    /* A failed exchange forward keeps no state. */
    s->call = NULL;
    return csm_fail(g->ctx, st < 0 ? st : CONFSMOE_E_INTERNAL, "gate_forward: the expert exchange failed: %s",
                    error[0] ? error : confsmoe_status_string(st));
}

/* Tokens per task of the loops over tokens. */
#define TOKEN_GRAIN 256

typedef struct {
    const confsmoe_gate *g;
    const gate_saved *s;
    const float *weight;
    float *out;
} combine_task;

static void combine_rows(void *arg, int64_t first, int64_t last, int worker)
{
    const combine_task *t = arg;
    const int64_t d = t->g->p.d, k = t->g->p.k;
    (void)worker;
    for (int64_t tok = first; tok < last; tok++) {
        float *o = t->out + tok * d;
        csm_scale_copy(o, t->weight[tok * k], t->s->yb + t->s->row_of[tok * k] * d, d);
        for (int64_t j = 1; j < k; j++)
            csm_axpy(o, t->weight[tok * k + j], t->s->yb + t->s->row_of[tok * k + j] * d, d);
    }
}

/* Expert e's ConfNet over its parameter tensors, read at every call: their memory may be the
 * host's (confsmoe_tensor_set_data). */
static csm_confnet confnet_of(const confsmoe_gate *g, int32_t e)
{
    confsmoe_tensor *const *w = g->params.param + g->conf_first + CONFNET_PARAMS * e;
    confsmoe_tensor *const *dw = g->params.grad + g->conf_first + CONFNET_PARAMS * e;
    return (csm_confnet){csm_f32(w[0]), csm_f32(w[1]), csm_f32(w[2]), csm_f32(w[3]),
                         csm_f32(dw[0]), csm_f32(dw[1]), csm_f32(dw[2]), csm_f32(dw[3])};
}

/* c per slot of expert e's block from its ConfNet: the slot's own value, or the expert's
 * mean. scratch holds d floats. */
static void confidence_block(confsmoe_gate *g, gate_saved *s, int32_t e, float *scratch)
{
    const int64_t d = g->p.d, begin = s->offset[e], rows = s->offset[e + 1] - begin;
    csm_confnet_cache cache = {s->cache.mean + begin, s->cache.rstd + begin, s->cache.z + begin};
    const csm_confnet net = confnet_of(g, e);
    csm_confnet_forward(&net, s->yb + begin * d, rows, d, s->s + begin, &cache, scratch);
    double mean = 0.0;
    for (int64_t r = begin; r < begin + rows; r++)
        mean += s->s[r];
    mean /= (double)rows;
    for (int64_t r = begin; r < begin + rows; r++)
        s->c[s->slot_of[r]] = g->p.confidence == CONFSMOE_CONFIDENCE_EXPERT ? (float)mean : s->s[r];
}

/* The probability the target classifier gives the truth, per block row; also keeps probs. */
static float target_probability(const confsmoe_gate *g, const gate_saved *s, int64_t r)
{
    const int64_t C = g->p.n_classes, t = s->slot_of[r] / g->p.k;
    const float *prob = s->probs + r * C;
    if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL)
        return prob[s->labels[t]];
    const uint8_t *truth = s->multi_labels + t * C;
    double sum = 0.0;
    for (int64_t l = 0; l < C; l++)
        sum += truth[l] ? prob[l] : 1.0f - prob[l];
    return (float)(sum / (double)C);
}

static float confidence_loss(confsmoe_gate *g, gate_saved *s)
{
    const int64_t n = s->n, k = g->p.k, C = g->p.n_classes, rows = n * k;
    csm_broadcast_rows(s->probs, csm_f32(g->target_b), rows, C);
    csm_gemm(false, true, rows, C, g->p.d, 1.0f, s->yb, csm_f32(g->target_w), 1.0f, s->probs);
    if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL)
        csm_softmax_rows(s->probs, rows, C);
    else
        for (int64_t i = 0; i < rows * C; i++)
            s->probs[i] = csm_sigmoid(s->probs[i]);
    int64_t present = 0;
    double sum = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        if (!s->present[s->slot_of[r] / k])
            continue;
        float diff = s->c[s->slot_of[r]] - target_probability(g, s, r);
        sum += (double)diff * diff;
        present++;
    }
    /* compat: the reference kept zero rows for missing samples in the mean. */
    s->den = (float)(g->p.compat ? rows : present);
    s->conf_loss = true;
    return s->den > 0.0f ? (float)(sum / s->den) : 0.0f;
}

static csm_load_input load_input(const confsmoe_gate *g, const gate_saved *s)
{
    return (csm_load_input){s->n, g->n_experts, g->p.k, s->idx, s->g, s->eps ? s->u_clean : NULL,
                            s->eps ? s->u : NULL, s->sigma, s->eps};
}

confsmoe_status confsmoe_gate_forward(confsmoe_gate *g, const confsmoe_tensor *x, const confsmoe_tensor *labels,
                                      const confsmoe_tensor *present, confsmoe_tensor *y, confsmoe_tensor *topk,
                                      confsmoe_tensor *slots, float *loss, confsmoe_saved **saved)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    const bool training = saved != NULL;
    if (saved)
        *saved = NULL;
    confsmoe_status st = check_forward(g, x, labels, present, y, topk, slots, training);
    if (st != CONFSMOE_OK)
        return st;
    const int32_t E = g->n_experts, k = g->p.k;
    const int64_t n = x->dims[0], d = g->p.d;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    const int64_t first = g->shard_first, total_tokens = g->shard_total ? g->shard_total : n;
    if (g->shard_total && n > g->shard_total - first)
        return csm_fail(g->ctx, CONFSMOE_E_SHAPE,
                        "gate_forward: N=%" PRId64 " tokens from %" PRId64 " do not fit the shard's batch of %" PRId64, n,
                        first, g->shard_total);
    if (g->shard_total && g->p.compat && n != g->shard_total)
        return csm_fail(g->ctx, CONFSMOE_E_UNSUPPORTED,
                        "gate_forward: compat dispatches slots across the whole batch, which a shard of it cannot");
    const uint64_t rng_at_entry = csm_rng_tell(g->ctx);
    gate_saved *s = gate_alloc_saved(g, n, training);
    /* The load-loss work. */
    const size_t load_bytes = 2 * (size_t)E * sizeof(double);
    double *load_work = gate_alloc(g, load_bytes);
    if (!s || !load_work) {
        if (load_work)
            csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
        if (s)
            s->base.release(&s->base);
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_forward: out of memory for N=%" PRId64, n);
    }
    memset(load_work, 0, 2 * (size_t)E * sizeof(double));
    const float *xin = csm_f32(x);
    if (training && n > 0) {
        memcpy(s->x, xin, x->nbytes);
        xin = s->x;
    }
    /* n == 0: these buffers and tensors may be NULL, which memcpy must not see (found by tests/fuzz). */
    if (present && n > 0)
        memcpy(s->present, present->data, (size_t)n);
    else if (n > 0)
        memset(s->present, 1, (size_t)n);
    if (training && confidence && n > 0) {
        if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL)
            memcpy(s->labels, labels->data, (size_t)n * sizeof(int32_t));
        else
            memcpy(s->multi_labels, labels->data, labels->nbytes);
    }

    /* Route. */
    csm_router_logits(&g->router, xin, n, s->u_clean);
    if (s->eps) {
        /* The call takes the noise of the whole batch; token t's is that of its index in it (its
         * shard's first + t). */
        memcpy(s->u, s->u_clean, (size_t)(n * E) * sizeof(float));
        const uint64_t base = csm_rng_reserve(g->ctx, (uint64_t)csm_gate_noise_draws(g, total_tokens));
        csm_substream noise = csm_rng_at(g->ctx, base + (uint64_t)csm_gate_noise_draws(g, first));
        csm_router_add_noise(&g->router, &noise, xin, n, s->u, s->h, s->eps);
        for (int64_t i = 0; i < n * E; i++)
            s->sigma[i] = csm_softplus(s->h[i]) + 0.01f;
    }
    csm_router_topk(s->u, n, E, k, s->idx);
    for (int64_t i = 0; i < n * k; i++)
        s->g[i] = s->u[(i / k) * E + s->idx[i]];
    csm_softmax_rows(s->g, n, k);

    /* Experts, one batch each. */
    dispatch(g, s);
    size_t rows_max, rows_h_max, per_worker = 0, scratch_bytes = 0;
    const int workers = csm_parallel_workers(g->ctx, E);
    bool ok = expert_sizes(g, s, &rows_max, &rows_h_max);
    float *kept = ok && training && g->experts ? alloc_kept(g, s) : NULL, *scratch = NULL;
    ok = ok && (!training || !g->experts || kept);
    const size_t gathered = g->experts ? rows_max : 0; /* rows gathered per worker */
    if (ok && csm_mul_size(gathered, (size_t)d, &per_worker) && per_worker <= SIZE_MAX / 8 - rows_h_max - (size_t)d &&
        csm_mul_size(per_worker + rows_h_max + (size_t)d, (size_t)workers * sizeof(float), &scratch_bytes))
        scratch = gate_alloc(g, scratch_bytes);
    if (!ok || !scratch) {
        /* A failed call leaves the RNG stream where it was, so a retry draws the same noise. */
        csm_rng_seek(g->ctx, rng_at_entry);
        if (kept)
            csm_lent_free(g->ctx, g->arena, kept, 0);
        csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
        s->base.release(&s->base);
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_forward: out of memory for the experts' activations (N=%" PRId64 ")", n);
    }
    s->kept_block = kept;
    if (!g->experts && (st = exchange_forward(g, s, xin, training)) != CONFSMOE_OK) {
        csm_rng_seek(g->ctx, rng_at_entry);
        csm_lent_free(g->ctx, g->arena, scratch, scratch_bytes);
        csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
        s->base.release(&s->base);
        return st;
    }
    forward_task task = {g, s, xin, scratch, gathered, per_worker + rows_h_max + (size_t)d};
    csm_parallel_for(g->ctx, E, 1, expert_forward_task, &task);
    csm_lent_free(g->ctx, g->arena, scratch, scratch_bytes);

    /* Combine: y_t = sum_j weight_tj y_tj, each output row written once. */
    combine_task ct = {g, s, confidence ? s->c : s->g, csm_f32(y)};
    csm_parallel_for(g->ctx, n, TOKEN_GRAIN, combine_rows, &ct);

    float conf = training && confidence ? confidence_loss(g, s) : 0.0f;
    float total = g->p.conf_loss_weight * conf;
    if (training && g->p.load_loss != CONFSMOE_LOAD_LOSS_NONE) {
        csm_load_input in = load_input(g, s);
        total += g->p.load_loss_weight * csm_load_loss_forward(g->p.load_loss, &in, load_work);
    }
    csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
    if (loss)
        *loss = total;
    if (topk && topk->nbytes > 0)
        memcpy(topk->data, s->idx, topk->nbytes);
    if (slots)
        for (int64_t i = 0; i < n * k; i++)
            memcpy(csm_f32(slots) + i * d, s->yb + s->row_of[i] * d, (size_t)d * sizeof(float));

    csm_usage_clear(&g->last, E);
    csm_usage_add(&g->last, s->idx, confidence ? s->c : NULL, n, k, s->conf_loss, conf);
    csm_usage_add(&g->total, s->idx, confidence ? s->c : NULL, n, k, s->conf_loss, conf);
    if (training)
        *saved = &s->base;
    else
        s->base.release(&s->base);
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ backward */

static confsmoe_status check_backward(confsmoe_gate *g, const confsmoe_saved *saved, const confsmoe_tensor *dy,
                                      const confsmoe_tensor *dslots, float dloss, const confsmoe_tensor *dx)
{
    static const char fn[] = "gate_backward";
    confsmoe_ctx *ctx = g->ctx;
    if (!saved)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved is NULL", fn);
    if (saved->owner != g)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved comes from another layer's forward", fn);
    if (saved->consumed)
        return csm_fail(ctx, CONFSMOE_E_STATE, "%s: backward already ran on this saved handle", fn);
    const int64_t n = ((const gate_saved *)saved)->n, d = g->p.d;
    const int64_t dims[2] = {n, d}, slot_dims[3] = {n, g->p.k, d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "dy", dy, CONFSMOE_F32, 2, dims);
    if (s == CONFSMOE_OK && dslots)
        s = csm_expect_tensor(ctx, fn, "dslots", dslots, CONFSMOE_F32, 3, slot_dims);
    if (s == CONFSMOE_OK && dx)
        s = csm_expect_tensor(ctx, fn, "dx", dx, CONFSMOE_F32, 2, dims);
    if (s == CONFSMOE_OK)
        s = csm_expect_finite(ctx, fn, "dy", dy);
    if (s == CONFSMOE_OK && dslots)
        s = csm_expect_finite(ctx, fn, "dslots", dslots);
    if (s == CONFSMOE_OK && ctx->check_finite && !isfinite(dloss))
        s = csm_fail(ctx, CONFSMOE_E_NUMERIC, "%s: dloss is not finite", fn);
    return s;
}

/* Scratch of one backward call. Each worker has its own expert-sized buffers, which hold
 * one expert's rows at a time. */
typedef struct {
    float *dweight;  /* [n k] dL/d(combination weight) per slot */
    float *dc;       /* [n k] dL/dc per slot */
    float *ds;       /* [n k] dL/ds per block row */
    float *dg;       /* [n k] dL/dg per slot */
    float *du;       /* [n, E] dL/du_clean */
    float *dsigma;   /* [n, E] dL/dsigma (noisy) */
    float *dz;       /* [n k, C] dL/d(target logits) */
    float *scratch;  /* max(n E, k) for the router */
    float *dx;       /* [n, d] when the host's dx overlaps dy or dslots */
    float *dxb;      /* [n k, d] the experts' input gradients in block order, with several workers
                        or an exchange */
    float *dyblock;  /* [n k, d] the experts' output gradients in block order, for an exchange */
    double *work;    /* [2 E] */
    float *worker;   /* per worker: dyb, dxb, xs [rows_max, d]; expert [rows_h_max]; net [2 d] */
    size_t rows_max, per_worker;
} backward_work;

typedef struct {
    float *dyb, *dxb, *xs, *expert, *net;
} worker_scratch;

static worker_scratch worker_of(const backward_work *w, const confsmoe_gate *g, int worker)
{
    const size_t d = (size_t)g->p.d, rd = w->rows_max * d;
    float *base = w->worker + (size_t)worker * w->per_worker;
    return (worker_scratch){base, base + rd, base + 2 * rd, base + 3 * rd, base + w->per_worker - 2 * d};
}

static bool overlaps(const confsmoe_tensor *a, const confsmoe_tensor *b)
{
    if (!a || !b || a->nbytes == 0 || b->nbytes == 0)
        return false;
    const char *pa = a->data, *pb = b->data;
    return pa < pb + b->nbytes && pb < pa + a->nbytes;
}

/* The arrays of one backward call (layout.h). */
static void gate_backward_parts(csm_layout *l, const confsmoe_gate *g, const gate_saved *s, bool own_dx, bool block_dx,
                                size_t all_workers, backward_work *w)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)s->n;
    const size_t C = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE ? (size_t)g->p.n_classes : 0;
    const size_t nk = N * k; /* fits: the saved state holds n k rows of d floats */
    w->dweight = CSM_LAYOUT_ARRAY(l, float, nk);
    w->dc = CSM_LAYOUT_ARRAY(l, float, nk);
    w->ds = CSM_LAYOUT_ARRAY(l, float, nk);
    w->dg = CSM_LAYOUT_ARRAY(l, float, nk);
    w->du = CSM_LAYOUT_ROWS(l, float, N, E);
    w->dsigma = CSM_LAYOUT_ROWS(l, float, N, E);
    w->dz = CSM_LAYOUT_ROWS(l, float, nk, C);
    w->scratch = CSM_LAYOUT_ARRAY(l, float, N * E > k ? N * E : k);
    w->dx = CSM_LAYOUT_ROWS(l, float, own_dx ? N : 0, d);
    w->dxb = CSM_LAYOUT_ROWS(l, float, block_dx ? nk : 0, d);
    w->dyblock = g->experts ? NULL : CSM_LAYOUT_ROWS(l, float, nk, d);
    w->work = CSM_LAYOUT_ARRAY(l, double, 2 * E);
    w->worker = CSM_LAYOUT_ARRAY(l, float, all_workers);
}

/* Everything backward needs, allocated before any gradient changes: after this it cannot fail. */
static void *backward_alloc(confsmoe_gate *g, const gate_saved *s, bool own_dx, bool block_dx, int workers,
                            backward_work *w, size_t *bytes)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)s->n;
    size_t rows_h, rows_max, per_worker, all_workers;
    if (!expert_sizes(g, s, &rows_max, &rows_h) || rows_h > SIZE_MAX / 4 || rows_max > SIZE_MAX / 4 / d ||
        3 * rows_max * d > SIZE_MAX / 2 - rows_h - 2 * d)
        return NULL;
    if (!g->experts)
        rows_max = 0; /* an exchange runs the experts: the workers only need the ConfNet's scratch */
    per_worker = 3 * rows_max * d + rows_h + 2 * d;
    if (!csm_mul_size(per_worker, (size_t)workers, &all_workers))
        return NULL;
    csm_layout l = csm_layout_measure();
    gate_backward_parts(&l, g, s, own_dx, block_dx, all_workers, w);
    char *block = csm_layout_size(&l, bytes) ? gate_alloc(g, *bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    gate_backward_parts(&l, g, s, own_dx, block_dx, all_workers, w);
    w->rows_max = rows_max;
    w->per_worker = per_worker;
    /* Zero what accumulates. */
    memset(w->dg, 0, N * k * sizeof *w->dg);
    memset(w->du, 0, N * E * sizeof *w->du);
    memset(w->dsigma, 0, N * E * sizeof *w->dsigma);
    memset(w->work, 0, 2 * E * sizeof *w->work);
    return block;
}

/* One expert's rows of the confidence loss backward: adds to dc and writes dz (zero rows
 * for absent tokens, or when the target is detached). */
static void confidence_loss_rows(const confsmoe_gate *g, const gate_saved *s, float scale, int64_t begin,
                                 int64_t end, backward_work *w)
{
    const int64_t k = g->p.k, C = g->p.n_classes;
    for (int64_t r = begin; r < end; r++) {
        const int64_t slot = s->slot_of[r], t = slot / k;
        float *dz = w->dz + r * C;
        if (!s->present[t]) {
            memset(dz, 0, (size_t)C * sizeof *dz);
            continue;
        }
        const float diff = s->c[slot] - target_probability(g, s, r);
        w->dc[slot] += scale * diff;
        if (g->p.detach_target)
            continue;
        const float dp = -scale * diff;
        const float *prob = s->probs + r * C;
        if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL) {
            /* p = softmax(z)[label]: dp/dz = p (onehot - softmax). */
            const int32_t label = s->labels[t];
            for (int64_t l = 0; l < C; l++)
                dz[l] = dp * prob[label] * ((l == label ? 1.0f : 0.0f) - prob[l]);
        } else {
            const uint8_t *truth = s->multi_labels + t * C;
            for (int64_t l = 0; l < C; l++)
                dz[l] = dp / (float)C * (truth[l] ? 1.0f : -1.0f) * prob[l] * (1.0f - prob[l]);
        }
    }
}

/* dL/du over the kept logits of each token, scattered into du [n, E]. */
static void router_logit_grads(const confsmoe_gate *g, const gate_saved *s, backward_work *w)
{
    const int32_t E = g->n_experts, k = g->p.k;
    const bool score = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE && g->p.router_grad == CONFSMOE_ROUTER_GRAD_SCORE;
    float *du_kept = w->scratch;
    for (int64_t t = 0; t < s->n; t++) {
        const float *gt = s->g + t * k;
        csm_softmax_backward_row(gt, w->dg + t * k, du_kept, k);
        if (score) {
            /* y = sum_j c_j y_j g_j / stopgrad(g_j): du_i = a_i - g_i sum_j a_j, a_j = c_j (dy . y_j). */
            double sum = 0.0;
            for (int32_t j = 0; j < k; j++)
                sum += w->dweight[t * k + j];
            for (int32_t j = 0; j < k; j++)
                du_kept[j] += w->dweight[t * k + j] - gt[j] * (float)sum;
        }
        for (int32_t j = 0; j < k; j++) {
            const int64_t i = t * E + s->idx[t * k + j];
            w->du[i] += du_kept[j];
            /* The kept logits are the noisy ones: u = u_clean + eps sigma. */
            if (s->eps)
                w->dsigma[i] += du_kept[j] * s->eps[i];
        }
    }
}

/* Everything downstream of expert e's rows, one expert at a time: the combination, the
 * confidence loss, the ConfNet, then the expert itself. Its input gradient goes to dxb
 * (block rows, when not NULL), or is added into dx straight away (when not NULL). */
static void expert_block_backward(confsmoe_gate *g, gate_saved *s, int32_t e, const float *gy, const float *gslots,
                                  float loss_scale, bool loss_active, float *dx, float *dxb, backward_work *w,
                                  const worker_scratch *ws)
{
    const int32_t k = g->p.k;
    const int64_t n = s->n, d = g->p.d, C = g->p.n_classes;
    const int64_t begin = s->offset[e], end = s->offset[e + 1], rows = end - begin;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    const float *weight = confidence ? s->c : s->g;
    float *dyb = w->dyblock ? w->dyblock + begin * d : ws->dyb; /* the expert's output gradient */
    /* The combination y_t = sum_j weight_j y_j (plus the slots output). */
    for (int64_t r = begin; r < end; r++) {
        const int64_t i = s->slot_of[r];
        const float *go = gy + (i / k) * d;
        float *dyr = dyb + (r - begin) * d;
        w->dweight[i] = (float)csm_dot(go, s->yb + r * d, d);
        csm_scale_copy(dyr, weight[i], go, d);
        if (gslots)
            csm_axpy(dyr, 1.0f, gslots + i * d, d);
    }
    if (confidence) {
        for (int64_t r = begin; r < end; r++)
            w->dc[s->slot_of[r]] = w->dweight[s->slot_of[r]];
        if (loss_active) {
            confidence_loss_rows(g, s, loss_scale, begin, end, w);
            if (!g->p.detach_target)
                csm_gemm(false, false, rows, d, C, 1.0f, w->dz + begin * C, csm_f32(g->target_w), 1.0f, dyb);
        }
        double sum = 0.0;
        for (int64_t r = begin; r < end; r++)
            sum += w->dc[s->slot_of[r]];
        for (int64_t r = begin; r < end; r++)
            w->ds[r] = g->p.confidence == CONFSMOE_CONFIDENCE_EXPERT ? (float)(sum / (double)rows)
                                                                      : w->dc[s->slot_of[r]];
        const csm_confnet_cache cache = {s->cache.mean + begin, s->cache.rstd + begin, s->cache.z + begin};
        const csm_confnet net = confnet_of(g, e);
        csm_confnet_backward(&net, s->yb + begin * d, rows, d, s->s + begin, w->ds + begin, &cache, dyb, ws->net);
    }
    if (!g->experts)
        return; /* the exchange runs the expert's backward */
    /* The expert, then its input gradient back to the tokens. */
    gather_rows(g, s, e, s->x, ws->xs);
    float *out = dxb ? dxb + begin * d : dx ? ws->dxb : NULL;
    csm_expert_backward_rows(g->experts[e], ws->xs, s->kept_block + s->kept_at[e], rows, ws->dyb, out, ws->expert);
    if (dxb || !dx)
        return;
    for (int64_t r = begin; r < end; r++) {
        const int64_t i = s->slot_of[r];
        csm_axpy(dx + (g->p.compat ? i % n : i / k) * d, 1.0f, ws->dxb + (r - begin) * d, d);
    }
}

typedef struct {
    confsmoe_gate *g;
    gate_saved *s;
    const float *gy, *gslots;
    float loss_scale;
    bool loss_active;
    float *dx, *dxb;
    backward_work *w;
} backward_task;

static void expert_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const backward_task *t = arg;
    const worker_scratch ws = worker_of(t->w, t->g, worker);
    for (int64_t e = first; e < last; e++)
        if (t->s->offset[e + 1] > t->s->offset[e])
            expert_block_backward(t->g, t->s, (int32_t)e, t->gy, t->gslots, t->loss_scale, t->loss_active, t->dx,
                                  t->dxb, t->w, &ws);
}

/* dx_t += the input gradients of token t's k slots, in block-row order (the order in which
 * one worker, expert after expert, would have added them). */
typedef struct {
    const confsmoe_gate *g;
    const gate_saved *s;
    const float *dxb;
    float *dx;
} scatter_task;

static void scatter_rows(void *arg, int64_t first, int64_t last, int worker)
{
    const scatter_task *t = arg;
    const int64_t d = t->g->p.d, k = t->g->p.k;
    (void)worker;
    for (int64_t tok = first; tok < last; tok++) {
        int64_t last_row = -1;
        for (int64_t taken = 0; taken < k; taken++) {
            /* The next row of this token after last_row (k is small: a scan per row). */
            int64_t next = INT64_MAX;
            for (int64_t j = 0; j < k; j++) {
                const int64_t r = t->s->row_of[tok * k + j];
                if (r > last_row && r < next)
                    next = r;
            }
            csm_axpy(t->dx + tok * d, 1.0f, t->dxb + next * d, d);
            last_row = next;
        }
    }
}

confsmoe_status confsmoe_gate_backward(confsmoe_gate *g, confsmoe_saved *saved, const confsmoe_tensor *dy,
                                       const confsmoe_tensor *dslots, float dloss, confsmoe_tensor *dx)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_status st = check_backward(g, saved, dy, dslots, dloss, dx);
    if (st != CONFSMOE_OK)
        return st;
    gate_saved *s = (gate_saved *)saved;
    const int32_t k = g->p.k;
    const int64_t n = s->n, d = g->p.d, C = g->p.n_classes;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    /* dx is written in place unless the host passed it overlapping an input. With several
     * workers, the experts' input gradients are kept in block order and summed afterwards in
     * the order one worker would have used, so the result does not depend on the threads. */
    const bool own_dx = dx && (overlaps(dx, dy) || overlaps(dx, dslots));
    const int workers = csm_parallel_workers(g->ctx, g->n_experts);
    /* An exchange always returns the experts' input gradients, so that every participant of a
     * collective exchange makes the same calls whether or not its host wants dx. */
    const bool block_dx = !g->experts || (dx && workers > 1);
    backward_work w;
    size_t block_bytes = 0;
    void *block = backward_alloc(g, s, own_dx, block_dx, workers, &w, &block_bytes);
    if (!block)
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_backward: out of memory for N=%" PRId64, n);
    saved->consumed = true;
    float *gx = dx ? (own_dx ? w.dx : csm_f32(dx)) : NULL;
    if (gx)
        memset(gx, 0, (size_t)(n * d) * sizeof *gx);

    const bool loss_active = confidence && s->conf_loss && s->den != 0.0f;
    const float loss_scale = loss_active ? dloss * g->p.conf_loss_weight * 2.0f / s->den : 0.0f;
    backward_task task = {g, s, csm_f32(dy), dslots ? csm_f32(dslots) : NULL, loss_scale, loss_active, gx,
                          block_dx ? w.dxb : NULL, &w};
    csm_parallel_for(g->ctx, g->n_experts, 1, expert_backward_task, &task);
    if (!g->experts) {
        char error[EXCHANGE_ERROR_CAP] = "";
        st = g->exchange.backward(g->exchange.user, s->call, s->offset, w.dyblock, w.dxb, error, sizeof error);
        if (st != CONFSMOE_OK) {
            csm_lent_free(g->ctx, g->arena, block, block_bytes);
            return csm_fail(g->ctx, st < 0 ? st : CONFSMOE_E_INTERNAL, "gate_backward: the expert exchange failed: %s",
                            error[0] ? error : confsmoe_status_string(st));
        }
    }
    if (block_dx && gx) {
        if (g->p.compat) {
            for (int64_t r = 0; r < n * k; r++) {
                const int64_t i = s->slot_of[r];
                csm_axpy(gx + (i % n) * d, 1.0f, w.dxb + r * d, d);
            }
        } else {
            scatter_task st = {g, s, w.dxb, gx};
            csm_parallel_for(g->ctx, n, TOKEN_GRAIN, scatter_rows, &st);
        }
    }
    if (loss_active && !g->p.detach_target) {
        csm_gemm(true, false, C, d, n * k, 1.0f, w.dz, s->yb, 1.0f, csm_f32(g->target_dw));
        csm_add_column_sums(csm_f32(g->target_db), w.dz, n * k, C);
    }
    if (confidence) {
        /* For the score term, a_j = c_j (dy . y_j). */
        for (int64_t i = 0; i < n * k; i++)
            w.dweight[i] *= s->c[i];
    } else {
        memcpy(w.dg, w.dweight, (size_t)(n * k) * sizeof(float));
    }

    if (router_learns(g)) {
        if (g->p.load_loss != CONFSMOE_LOAD_LOSS_NONE) {
            csm_load_input in = load_input(g, s);
            csm_load_loss_backward(g->p.load_loss, &in, dloss * g->p.load_loss_weight, w.work, w.dg, w.du, w.dsigma);
        }
        router_logit_grads(g, s, &w);
        csm_router_backward(&g->router, s->x, n, s->u_clean, s->h, w.du, s->eps ? w.dsigma : NULL, gx, w.scratch);
    }
    if (own_dx)
        memcpy(dx->data, w.dx, dx->nbytes);
    csm_lent_free(g->ctx, g->arena, block, block_bytes);
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ parameters and statistics */

int32_t confsmoe_gate_n_params(const confsmoe_gate *g) { return g ? g->params.count : -1; }

const char *confsmoe_gate_param_name(const confsmoe_gate *g, int32_t i)
{
    return g ? csm_params_name(&g->params, i) : NULL;
}

confsmoe_tensor *confsmoe_gate_param(confsmoe_gate *g, int32_t i)
{
    return g ? csm_params_param(&g->params, i) : NULL;
}

confsmoe_tensor *confsmoe_gate_grad(confsmoe_gate *g, int32_t i)
{
    return g ? csm_params_grad(&g->params, i) : NULL;
}

const csm_params *csm_gate_param_list(const confsmoe_gate *g) { return &g->params; }

void confsmoe_gate_zero_grad(confsmoe_gate *g)
{
    if (g)
        csm_params_zero_grad(&g->params);
}

confsmoe_status confsmoe_gate_stats_get(confsmoe_gate *g, int32_t scope, confsmoe_gate_stats *out, int64_t *load,
                                        double *mean_confidence, int32_t n)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "gate_stats_get";
    if (!out)
        return csm_fail(g->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: out is NULL", fn);
    /* Any size from the first release's on: at most out->struct_size bytes are written. */
    const size_t out_size = out->struct_size;
    confsmoe_status s = csm_sized_check_out(g->ctx, fn, "confsmoe_gate_stats", out_size, CSM_GATE_STATS_MIN);
    if (s != CONFSMOE_OK)
        return s;
    if (scope != CONFSMOE_STATS_LAST_CALL && scope != CONFSMOE_STATS_TOTAL)
        return csm_fail(g->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown scope %" PRId32, fn, scope);
    if ((load || mean_confidence) && n != g->n_experts)
        return csm_fail(g->ctx, CONFSMOE_E_SHAPE, "%s: arrays of %" PRId32 " given, the gate has E=%" PRId32, fn, n,
                        g->n_experts);
    confsmoe_gate_stats full;
    memset(&full, 0, sizeof full);
    csm_usage_report(scope == CONFSMOE_STATS_TOTAL ? &g->total : &g->last, g->n_experts, &full, load,
                     mean_confidence);
    csm_sized_write(out, out_size, &full, sizeof full);
    return CONFSMOE_OK;
}

void confsmoe_gate_stats_reset(confsmoe_gate *g)
{
    if (!g)
        return;
    csm_usage_clear(&g->last, g->n_experts);
    csm_usage_clear(&g->total, g->n_experts);
}
