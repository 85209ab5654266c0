/* The gate: router -> top-k -> batched experts -> ConfNets or router softmax -> combine,
 * with the confidence loss, the load losses and the utilisation counters
 * (docs/MODEL.md, sections 3 and 4). This file: creation, parameters, statistics, and the
 * public forward and backward, which validate and call csm_gate_forward_rows /
 * csm_gate_backward_rows (gate_forward.c, gate_backward.c). */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "gate_internal.h"
#include "kernels.h"
#include "sized.h"

enum { GATE_CONFNET_PARAMS = 4 };

void csm_gate_set_arena(confsmoe_gate *g, csm_arena *arena) { g->arena = arena; }

static void gate_usage_copy(csm_usage *dst, const csm_usage *src, int32_t E)
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
    gate_usage_copy(&g->mark_last, &g->last, g->n_experts);
    gate_usage_copy(&g->mark_total, &g->total, g->n_experts);
}

void csm_gate_usage_rollback(confsmoe_gate *g)
{
    gate_usage_copy(&g->last, &g->mark_last, g->n_experts);
    gate_usage_copy(&g->total, &g->mark_total, g->n_experts);
}

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

static bool gate_is_flag(int32_t v) { return v == 0 || v == 1; }

/* experts == NULL: a gate whose experts run behind an exchange. */
static confsmoe_status gate_check_params(confsmoe_ctx *ctx, const char *fn, const confsmoe_gate_params *p,
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
    if (!gate_is_flag(p->noisy) || !gate_is_flag(p->detach_target) || !gate_is_flag(p->compat))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: noisy, detach_target and compat must be 0 or 1", fn);
    return CONFSMOE_OK;
}

/* Adds a zero-initialised parameter and its gradient to the gate's list. */
static confsmoe_status gate_add_param(confsmoe_gate *g, const char *name, int32_t ndim, int64_t d0, int64_t d1,
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

static confsmoe_status gate_build(confsmoe_gate *g)
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
    confsmoe_status s = gate_add_param(g, "router.w", 2, p->d, E, &g->router.w, &g->router.dw);
    if (s == CONFSMOE_OK && p->noisy)
        s = gate_add_param(g, "noise.w", 2, p->d, E, &g->router.wn, &g->router.dwn);
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
        static const char *const parts[GATE_CONFNET_PARAMS] = {"ln.weight", "ln.bias", "w", "b"};
        confsmoe_tensor *param[GATE_CONFNET_PARAMS], *grad;
        for (int i = 0; i < GATE_CONFNET_PARAMS && s == CONFSMOE_OK; i++) {
            char name[CSM_PARAM_NAME_CAP];
            snprintf(name, sizeof name, "conf.%" PRId32 ".%s", e, parts[i]);
            s = gate_add_param(g, name, 1, i == 3 ? 1 : p->d, 0, &param[i], &grad);
        }
        if (s != CONFSMOE_OK)
            break;
        for (int64_t i = 0; i < p->d; i++)
            csm_f32(param[0])[i] = 1.0f;
        csm_fill_uniform(ctx, param[2], 1.0f / sqrtf((float)p->d));
        csm_fill_uniform(ctx, param[3], 1.0f / sqrtf((float)p->d));
    }
    if (s == CONFSMOE_OK)
        s = gate_add_param(g, "target.w", 2, p->n_classes, p->d, &g->target_w, &g->target_dw);
    if (s == CONFSMOE_OK)
        s = gate_add_param(g, "target.b", 1, p->n_classes, 0, &g->target_b, &g->target_db);
    if (s != CONFSMOE_OK)
        return s;
    csm_fill_uniform(ctx, g->target_w, 1.0f / sqrtf((float)p->d));
    csm_fill_uniform(ctx, g->target_b, 1.0f / sqrtf((float)p->d));
    return CONFSMOE_OK;
}

/* A gate over borrowed experts, or (experts == NULL) over an exchange. */
static confsmoe_status gate_create(confsmoe_ctx *ctx, const char *fn, const confsmoe_gate_params *p,
                                   confsmoe_expert *const *experts, const confsmoe_gate_exchange *exchange,
                                   int32_t n_experts, confsmoe_gate **out)
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
        s = gate_check_params(ctx, fn, p, experts, n_experts);
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
    s = ok ? gate_build(g) : CONFSMOE_E_NOMEM;
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
    return gate_create(ctx, "gate_create", p, experts, NULL, n_experts, out);
}

confsmoe_status confsmoe_gate_create_exchange(confsmoe_ctx *ctx, const confsmoe_gate_params *p, int32_t n_experts,
                                              const confsmoe_gate_exchange *exchange, confsmoe_gate **out)
{
    if (!exchange) {
        if (out)
            *out = NULL;
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "gate_create_exchange: exchange is NULL");
    }
    return gate_create(ctx, "gate_create_exchange", p, NULL, exchange, n_experts, out);
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

/* ------------------------------------------------------------------ the ConfNet side */

csm_confnet csm_gate_confnet(const confsmoe_gate *g, int32_t e)
{
    confsmoe_tensor *const *w = g->params.param + g->conf_first + GATE_CONFNET_PARAMS * e;
    confsmoe_tensor *const *dw = g->params.grad + g->conf_first + GATE_CONFNET_PARAMS * e;
    return (csm_confnet){csm_f32(w[0]), csm_f32(w[1]), csm_f32(w[2]), csm_f32(w[3]),
                         csm_f32(dw[0]), csm_f32(dw[1]), csm_f32(dw[2]), csm_f32(dw[3])};
}

csm_confnet_block csm_gate_confnet_block(const confsmoe_gate *g, gate_saved *s, int32_t e, const csm_confnet *net)
{
    const int64_t begin = s->offset[e], d = g->p.d;
    return (csm_confnet_block){net, s->yb + begin * d, s->offset[e + 1] - begin, d,
                               g->p.confidence == CONFSMOE_CONFIDENCE_EXPERT, s->slot_of + begin, s->s + begin,
                               {s->cache.mean + begin, s->cache.rstd + begin, s->cache.z + begin}};
}

csm_confidence_target csm_gate_target(const confsmoe_gate *g, const gate_saved *s)
{
    return (csm_confidence_target){g->ctx, g->p.k, g->p.d, g->p.n_classes, g->p.target == CONFSMOE_TARGET_MULTI_LABEL,
                                   g->p.compat != 0, csm_f32(g->target_w), csm_f32(g->target_b),
                                   csm_f32(g->target_dw), csm_f32(g->target_db), s->slot_of, s->present, s->labels,
                                   s->multi_labels, s->c, s->probs};
}

/* ------------------------------------------------------------------ forward and backward */

static confsmoe_status gate_check_forward(confsmoe_gate *g, const confsmoe_tensor *x, const confsmoe_tensor *labels,
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

confsmoe_status confsmoe_gate_forward(confsmoe_gate *g, const confsmoe_tensor *x, const confsmoe_tensor *labels,
                                      const confsmoe_tensor *present, confsmoe_tensor *y, confsmoe_tensor *topk,
                                      confsmoe_tensor *slots, float *loss, confsmoe_saved **saved)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    const bool training = saved != NULL;
    if (saved)
        *saved = NULL;
    confsmoe_status st = gate_check_forward(g, x, labels, present, y, topk, slots, training);
    if (st != CONFSMOE_OK)
        return st;
    const int64_t n = x->dims[0];
    if (g->shard_total && n > g->shard_total - g->shard_first)
        return csm_fail(g->ctx, CONFSMOE_E_SHAPE,
                        "gate_forward: N=%" PRId64 " tokens from %" PRId64 " do not fit the shard's batch of %" PRId64, n,
                        g->shard_first, g->shard_total);
    if (g->shard_total && g->p.compat && n != g->shard_total)
        return csm_fail(g->ctx, CONFSMOE_E_UNSUPPORTED,
                        "gate_forward: compat dispatches slots across the whole batch, which a shard of it cannot");
    /* Labels are read only in training under CONFIDENCE, where they were checked. */
    const bool multi_label = g->p.target == CONFSMOE_TARGET_MULTI_LABEL;
    const csm_gate_call call = {
        .n = n,
        .x = csm_f32(x),
        .present = present ? present->data : NULL,
        .labels = labels && !multi_label ? labels->data : NULL,
        .multi_labels = labels && multi_label ? labels->data : NULL,
        .y = csm_f32(y),
        .topk = topk ? topk->data : NULL,
        .slots = slots ? csm_f32(slots) : NULL,
        .shard_first = g->shard_first,
        .shard_total = g->shard_total,
        .loss = loss,
        .saved = saved,
    };
    return csm_gate_forward_rows(g, &call);
}

static confsmoe_status gate_check_backward(confsmoe_gate *g, const confsmoe_saved *saved, const confsmoe_tensor *dy,
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

confsmoe_status confsmoe_gate_backward(confsmoe_gate *g, confsmoe_saved *saved, const confsmoe_tensor *dy,
                                       const confsmoe_tensor *dslots, float dloss, confsmoe_tensor *dx)
{
    if (!g)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_status st = gate_check_backward(g, saved, dy, dslots, dloss, dx);
    if (st != CONFSMOE_OK)
        return st;
    const csm_gate_grad_call call = {saved, csm_f32(dy), dslots ? csm_f32(dslots) : NULL, dloss,
                                     dx ? csm_f32(dx) : NULL};
    return csm_gate_backward_rows(g, &call);
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
