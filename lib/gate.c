/* The gate: router -> top-k -> batched experts -> ConfNets or router softmax -> combine,
 * with the confidence loss, the load losses and the utilisation counters. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "confnet.h"
#include "expert.h"
#include "internal.h"
#include "kernels.h"
#include "load_loss.h"
#include "params.h"
#include "router.h"
#include "usage.h"

#define NAME_CAP CSM_PARAM_NAME_CAP
enum { CONFNET_PARAMS = 4 };

struct confsmoe_gate {
    confsmoe_ctx *ctx;
    confsmoe_gate_params p;
    int32_t n_experts;
    confsmoe_expert **experts;    /* borrowed */
    csm_router router;
    csm_confnet *confnets;        /* [E] under CONFIDENCE, views of the parameters */
    confsmoe_tensor *target_w, *target_b, *target_dw, *target_db;
    csm_params params;
    csm_usage last, total;
};

/* Everything one forward keeps. Rows of the "block" arrays are the n*k slots sorted
 * by expert, so that each expert sees one contiguous batch. */
typedef struct {
    confsmoe_saved base;
    int64_t n;
    bool conf_loss;              /* the confidence loss was computed */
    float den;                   /* its denominator */
    float *x;                    /* [n, d] */
    float *u_clean, *u;          /* [n, E]; u == u_clean without noise */
    float *h, *eps, *sigma;      /* [n, E] when noisy, else NULL */
    int32_t *idx;                /* [n, k] */
    float *g;                    /* [n, k] softmax over the kept logits */
    float *c;                    /* [n, k] confidence per slot (CONFIDENCE) */
    int64_t *offset;             /* [E + 1] first block row of each expert */
    int64_t *row_of;             /* [n k] slot -> block row */
    int64_t *slot_of;            /* [n k] block row -> slot t * k + j */
    float *xb, *yb;              /* [n k, d] expert inputs and outputs in block order */
    float *s;                    /* [n k] ConfNet output per block row */
    csm_confnet_cache cache;     /* [n k, d], [n k], [n k] */
    float *probs;                /* [n k, C] softmax or sigmoid of the target classifier */
    int32_t *labels;             /* [n] single-label */
    uint8_t *multi_labels;       /* [n, C] multi-label */
    uint8_t *present;            /* [n] */
    confsmoe_saved **expert_saved;  /* [E] */
} gate_saved;

void confsmoe_gate_params_init(confsmoe_gate_params *p)
{
    if (!p)
        return;
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

size_t confsmoe_sizeof_gate_params(void) { return sizeof(confsmoe_gate_params); }

size_t confsmoe_sizeof_gate_stats(void) { return sizeof(confsmoe_gate_stats); }

static bool is_flag(int32_t v) { return v == 0 || v == 1; }

static confsmoe_status check_params(confsmoe_ctx *ctx, const confsmoe_gate_params *p, confsmoe_expert *const *experts,
                                    int32_t n_experts)
{
    static const char fn[] = "gate_create";
    if (p->struct_size != sizeof *p)
        return csm_fail(ctx, CONFSMOE_E_VERSION, "%s: params.struct_size is %zu, this library expects %zu", fn,
                        p->struct_size, sizeof *p);
    if (!experts)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: experts is NULL", fn);
    if (n_experts < 1)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: n_experts is %" PRId32 ", must be >= 1", fn, n_experts);
    if (p->d < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: d is %" PRId64 ", must be >= 1", fn, p->d);
    for (int32_t e = 0; e < n_experts; e++) {
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

void confsmoe_gate_destroy(confsmoe_gate *g)
{
    if (!g)
        return;
    confsmoe_ctx *ctx = g->ctx;
    csm_params_free(ctx, &g->params);
    csm_usage_free(ctx, &g->last);
    csm_usage_free(ctx, &g->total);
    csm_free(ctx, g->router.per_expert);
    csm_free(ctx, g->confnets);
    csm_free(ctx, g->experts);
    csm_free(ctx, g);
}

static confsmoe_status build(confsmoe_gate *g)
{
    const confsmoe_gate_params *p = &g->p;
    const int32_t E = g->n_experts;
    const bool confidence = p->combine == CONFSMOE_COMBINE_CONFIDENCE;
    const int32_t max_params = 2 + (confidence ? CONFNET_PARAMS * E + 2 : 0);
    confsmoe_ctx *ctx = g->ctx;
    g->router.per_expert = csm_calloc(ctx, (size_t)E, sizeof(float));
    if (!csm_params_reserve(ctx, &g->params, max_params) || !g->router.per_expert || !csm_usage_init(ctx, &g->last, E) ||
        !csm_usage_init(ctx, &g->total, E))
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

    g->confnets = csm_calloc(ctx, (size_t)E, sizeof *g->confnets);
    if (!g->confnets)
        return CONFSMOE_E_NOMEM;
    for (int32_t e = 0; e < E && s == CONFSMOE_OK; e++) {
        static const char *const parts[CONFNET_PARAMS] = {"ln.weight", "ln.bias", "w", "b"};
        confsmoe_tensor *param[CONFNET_PARAMS], *grad[CONFNET_PARAMS];
        for (int i = 0; i < CONFNET_PARAMS && s == CONFSMOE_OK; i++) {
            char name[NAME_CAP];
            snprintf(name, sizeof name, "conf.%" PRId32 ".%s", e, parts[i]);
            s = add_param(g, name, 1, i == 3 ? 1 : p->d, 0, &param[i], &grad[i]);
        }
        if (s != CONFSMOE_OK)
            break;
        for (int64_t i = 0; i < p->d; i++)
            csm_f32(param[0])[i] = 1.0f;
        csm_fill_uniform(ctx, param[2], 1.0f / sqrtf((float)p->d));
        csm_fill_uniform(ctx, param[3], 1.0f / sqrtf((float)p->d));
        g->confnets[e] = (csm_confnet){csm_f32(param[0]), csm_f32(param[1]), csm_f32(param[2]), csm_f32(param[3]),
                                       csm_f32(grad[0]),  csm_f32(grad[1]),  csm_f32(grad[2]),  csm_f32(grad[3])};
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

confsmoe_status confsmoe_gate_create(confsmoe_ctx *ctx, const confsmoe_gate_params *p, confsmoe_expert *const *experts,
                                     int32_t n_experts, confsmoe_gate **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out || !p)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "gate_create: %s is NULL",
                        !ctx ? "ctx" : !out ? "out" : "params");
    confsmoe_status s = check_params(ctx, p, experts, n_experts);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_gate *g = csm_calloc(ctx, 1, sizeof *g);
    if (!g)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "gate_create: out of memory");
    g->ctx = ctx;
    g->p = *p;
    g->n_experts = n_experts;
    g->experts = csm_calloc(ctx, (size_t)n_experts, sizeof *g->experts);
    if (g->experts)
        memcpy(g->experts, experts, (size_t)n_experts * sizeof *experts);
    const uint64_t rng_at_entry = ctx->rng_counter;
    s = g->experts ? build(g) : CONFSMOE_E_NOMEM;
    if (s != CONFSMOE_OK) {
        ctx->rng_counter = rng_at_entry;
        confsmoe_gate_destroy(g);
        return csm_fail(ctx, s, "gate_create: out of memory for E=%" PRId32 ", d=%" PRId64, n_experts, p->d);
    }
    *out = g;
    return CONFSMOE_OK;
}

int32_t confsmoe_gate_n_experts(const confsmoe_gate *g) { return g ? g->n_experts : -1; }

int32_t confsmoe_gate_k(const confsmoe_gate *g) { return g ? g->p.k : -1; }

/* ------------------------------------------------------------------ saved state */

static void release_saved(confsmoe_saved *base)
{
    gate_saved *s = (gate_saved *)base;
    for (int32_t e = 0; s->expert_saved && e < ((const confsmoe_gate *)base->owner)->n_experts; e++)
        confsmoe_saved_destroy(s->expert_saved[e]);
    csm_free(base->ctx, base);
}

/* One block for the header and every array; sizes follow the gate's options. */
static gate_saved *alloc_saved(confsmoe_gate *g, int64_t n, bool training)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)n;
    const size_t C = (size_t)g->p.n_classes;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    const bool noisy = g->p.noisy && training;
    const bool conf_loss = confidence && training;
    size_t nk;
    if (!csm_mul_size(N, k, &nk))
        return NULL;
    struct {
        size_t at, count, elem;
    } part[22] = {
        {0, 1, sizeof(gate_saved)},
        {0, N * (training ? d : 0), sizeof(float)},       /* x */
        {0, N * E, sizeof(float)},                        /* u_clean */
        {0, noisy ? N * E : 0, sizeof(float)},            /* u */
        {0, noisy ? N * E : 0, sizeof(float)},            /* h */
        {0, noisy ? N * E : 0, sizeof(float)},            /* eps */
        {0, noisy ? N * E : 0, sizeof(float)},            /* sigma */
        {0, nk, sizeof(int32_t)},                         /* idx */
        {0, nk, sizeof(float)},                           /* g */
        {0, nk, sizeof(float)},                           /* c */
        {0, E + 1, sizeof(int64_t)},                      /* offset */
        {0, nk, sizeof(int64_t)},                         /* row_of */
        {0, nk, sizeof(int64_t)},                         /* slot_of */
        {0, nk, d * sizeof(float)},                       /* xb */
        {0, nk, d * sizeof(float)},                       /* yb */
        {0, nk, sizeof(float)},                           /* s */
        {0, confidence ? nk : 0, d * sizeof(float)},      /* cache.normed */
        {0, confidence ? nk : 0, 2 * sizeof(float)},      /* cache.mean, cache.rstd */
        {0, conf_loss ? nk : 0, C * sizeof(float)},       /* probs */
        {0, conf_loss ? N : 0, C * sizeof(uint8_t) + sizeof(int32_t)}, /* labels */
        {0, N, sizeof(uint8_t)},                          /* present */
        {0, E, sizeof(confsmoe_saved *)},                 /* expert_saved */
    };
    /* N * E and N * d fit: x and the router output exist. Products by k, d and C are checked by layout. */
    size_t total = 0;
    for (size_t i = 0; i < sizeof part / sizeof *part; i++)
        if (!csm_layout_add(&total, part[i].count, part[i].elem, &part[i].at))
            return NULL;
    char *block = csm_alloc(g->ctx, total);
    if (!block)
        return NULL;
    gate_saved *s = (gate_saved *)block;
    memset(s, 0, sizeof *s);
#define AT(i, type) ((type *)(block + part[i].at))
    s->x = training ? AT(1, float) : NULL;
    s->u_clean = AT(2, float);
    s->u = noisy ? AT(3, float) : s->u_clean;
    s->h = noisy ? AT(4, float) : NULL;
    s->eps = noisy ? AT(5, float) : NULL;
    s->sigma = noisy ? AT(6, float) : NULL;
    s->idx = AT(7, int32_t);
    s->g = AT(8, float);
    s->c = AT(9, float);
    s->offset = AT(10, int64_t);
    s->row_of = AT(11, int64_t);
    s->slot_of = AT(12, int64_t);
    s->xb = AT(13, float);
    s->yb = AT(14, float);
    s->s = AT(15, float);
    s->cache.normed = AT(16, float);
    s->cache.mean = AT(17, float);
    s->cache.rstd = s->cache.mean + nk;
    s->probs = AT(18, float);
    s->labels = AT(19, int32_t);
    s->multi_labels = (uint8_t *)(s->labels + (conf_loss ? N : 0));
    s->present = AT(20, uint8_t);
    s->expert_saved = AT(21, confsmoe_saved *);
#undef AT
    memset(s->expert_saved, 0, E * sizeof *s->expert_saved);
    s->base.ctx = g->ctx;
    s->base.owner = g;
    s->base.release = release_saved;
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

/* Sorts the n*k slots by expert (stable in t, then j) and gathers each slot's input row. */
static void dispatch(const confsmoe_gate *g, gate_saved *s, const float *x)
{
    const int32_t E = g->n_experts, k = g->p.k;
    const int64_t n = s->n, d = g->p.d;
    memset(s->offset, 0, (size_t)(E + 1) * sizeof *s->offset);
    for (int64_t i = 0; i < n * k; i++)
        s->offset[s->idx[i] + 1]++;
    for (int32_t e = 0; e < E; e++)
        s->offset[e + 1] += s->offset[e];
    int64_t *next = s->row_of; /* reused as a cursor, then overwritten below */
    for (int32_t e = 0; e < E; e++)
        next[e] = s->offset[e];
    for (int64_t i = 0; i < n * k; i++)
        s->slot_of[next[s->idx[i]]++] = i;
    for (int64_t r = 0; r < n * k; r++) {
        int64_t slot = s->slot_of[r];
        s->row_of[slot] = r;
        /* compat: the reference ran slot j of token t on token (t k + j) mod N. */
        int64_t src = g->p.compat ? slot % n : slot / k;
        memcpy(s->xb + r * d, x + src * d, (size_t)d * sizeof *x);
    }
}

static confsmoe_status run_experts(confsmoe_gate *g, gate_saved *s, bool training)
{
    const int64_t d = g->p.d;
    for (int32_t e = 0; e < g->n_experts; e++) {
        const int64_t rows = s->offset[e + 1] - s->offset[e];
        if (rows == 0)
            continue;
        const int64_t dims[2] = {rows, d};
        confsmoe_tensor *in = NULL, *out = NULL;
        confsmoe_status st = confsmoe_tensor_wrap(g->ctx, CONFSMOE_F32, 2, dims, s->xb + s->offset[e] * d, &in);
        if (st == CONFSMOE_OK)
            st = confsmoe_tensor_wrap(g->ctx, CONFSMOE_F32, 2, dims, s->yb + s->offset[e] * d, &out);
        if (st == CONFSMOE_OK)
            st = confsmoe_expert_forward(g->experts[e], in, out, training ? &s->expert_saved[e] : NULL);
        confsmoe_tensor_destroy(in);
        confsmoe_tensor_destroy(out);
        if (st != CONFSMOE_OK)
            return st;
    }
    return CONFSMOE_OK;
}

/* c per slot from the ConfNets: the slot's own value, or its expert's mean. */
static void confidence_forward(confsmoe_gate *g, gate_saved *s)
{
    const int64_t d = g->p.d;
    for (int32_t e = 0; e < g->n_experts; e++) {
        const int64_t begin = s->offset[e], rows = s->offset[e + 1] - begin;
        if (rows == 0)
            continue;
        csm_confnet_cache cache = {s->cache.normed + begin * d, s->cache.mean + begin, s->cache.rstd + begin};
        csm_confnet_forward(&g->confnets[e], s->yb + begin * d, rows, d, s->s + begin, &cache);
        double mean = 0.0;
        for (int64_t r = begin; r < begin + rows; r++)
            mean += s->s[r];
        mean /= (double)rows;
        for (int64_t r = begin; r < begin + rows; r++)
            s->c[s->slot_of[r]] = g->p.confidence == CONFSMOE_CONFIDENCE_EXPERT ? (float)mean : s->s[r];
    }
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
    const uint64_t rng_at_entry = g->ctx->rng_counter;
    gate_saved *s = alloc_saved(g, n, training);
    double *load_work = csm_calloc(g->ctx, 2 * (size_t)E, sizeof(double));
    if (!s || !load_work) {
        csm_free(g->ctx, s);
        csm_free(g->ctx, load_work);
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_forward: out of memory for N=%" PRId64, n);
    }
    const float *xin = csm_f32(x);
    if (training && n > 0) {
        memcpy(s->x, xin, x->nbytes);
        xin = s->x;
    }
    if (present)
        memcpy(s->present, present->data, (size_t)n);
    else
        memset(s->present, 1, (size_t)n);
    if (training && confidence) {
        if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL)
            memcpy(s->labels, labels->data, (size_t)n * sizeof(int32_t));
        else
            memcpy(s->multi_labels, labels->data, labels->nbytes);
    }

    /* Route. */
    csm_router_logits(&g->router, xin, n, s->u_clean);
    if (s->eps) {
        memcpy(s->u, s->u_clean, (size_t)(n * E) * sizeof(float));
        csm_router_add_noise(&g->router, g->ctx, xin, n, s->u, s->h, s->eps);
        for (int64_t i = 0; i < n * E; i++)
            s->sigma[i] = csm_softplus(s->h[i]) + 0.01f;
    }
    csm_router_topk(s->u, n, E, k, s->idx);
    for (int64_t i = 0; i < n * k; i++)
        s->g[i] = s->u[(i / k) * E + s->idx[i]];
    csm_softmax_rows(s->g, n, k);

    /* Experts, one batch each. */
    dispatch(g, s, xin);
    st = run_experts(g, s, training);
    if (st != CONFSMOE_OK) {
        /* A failed call leaves the RNG stream where it was, so a retry draws the same noise. */
        g->ctx->rng_counter = rng_at_entry;
        csm_free(g->ctx, load_work);
        s->base.release(&s->base);
        return csm_fail(g->ctx, st, "gate_forward: an expert failed: %s", confsmoe_status_string(st));
    }

    /* Combine. */
    if (confidence)
        confidence_forward(g, s);
    const float *weight = confidence ? s->c : s->g;
    float *out = csm_f32(y);
    memset(out, 0, (size_t)(n * d) * sizeof *out);
    for (int64_t i = 0; i < n * k; i++) {
        const float *yr = s->yb + s->row_of[i] * d;
        float *o = out + (i / k) * d, w = weight[i];
        for (int64_t c = 0; c < d; c++)
            o[c] += w * yr[c];
    }

    float conf = training && confidence ? confidence_loss(g, s) : 0.0f;
    float total = g->p.conf_loss_weight * conf;
    if (training && g->p.load_loss != CONFSMOE_LOAD_LOSS_NONE) {
        csm_load_input in = load_input(g, s);
        total += g->p.load_loss_weight * csm_load_loss_forward(g->p.load_loss, &in, load_work);
    }
    csm_free(g->ctx, load_work);
    if (loss)
        *loss = total;
    if (topk)
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

/* Scratch of one backward call. */
typedef struct {
    float *dyb;      /* [n k, d] gradient of the expert outputs, block order */
    float *dxb;      /* [n k, d] gradient of the expert inputs, block order */
    float *dweight;  /* [n k] dL/d(combination weight) per slot */
    float *dc;       /* [n k] dL/dc per slot */
    float *ds;       /* [n k] dL/ds per block row */
    float *dg;       /* [n k] dL/dg per slot */
    float *du;       /* [n, E] dL/du_clean */
    float *dsigma;   /* [n, E] dL/dsigma (noisy) */
    float *dz;       /* [n k, C] dL/d(target logits) */
    float *scratch;  /* max(n k (d + 1), n E) */
    float *dx;       /* [n, d] */
    float *expert;   /* the largest expert's rows * h */
    double *work;    /* [2 E] */
} backward_work;

/* Everything backward needs, allocated before any gradient changes: after this it cannot fail. */
static void *backward_alloc(confsmoe_gate *g, const gate_saved *s, backward_work *w)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)s->n;
    const size_t C = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE ? (size_t)g->p.n_classes : 0;
    const size_t nk = N * k, scratch = nk * (d + 1) > N * E ? nk * (d + 1) : N * E;
    size_t expert = 0;
    for (int32_t e = 0; e < g->n_experts; e++) {
        size_t rows = (size_t)(s->offset[e + 1] - s->offset[e]), need;
        if (csm_mul_size(rows, (size_t)confsmoe_expert_h(g->experts[e]), &need) && need > expert)
            expert = need;
    }
    enum { PARTS = 13 };
    size_t at[PARTS], total = 0;
    const size_t count[PARTS] = {nk * d, nk * d, nk, nk, nk, nk, N * E, N * E, nk * C, scratch, N * d, expert, 2 * E};
    for (int i = 0; i < PARTS; i++)
        if (!csm_layout_add(&total, count[i], i == PARTS - 1 ? sizeof(double) : sizeof(float), &at[i]))
            return NULL;
    char *block = csm_calloc(g->ctx, 1, total);
    if (!block)
        return NULL;
    float **f[PARTS - 1] = {&w->dyb, &w->dxb, &w->dweight, &w->dc, &w->ds,      &w->dg,    &w->du,
                            &w->dsigma, &w->dz, &w->scratch, &w->dx, &w->expert};
    for (int i = 0; i < PARTS - 1; i++)
        *f[i] = (float *)(block + at[i]);
    w->work = (double *)(block + at[PARTS - 1]);
    return block;
}

/* Confidence loss backward: adds to dc (and, unless detached, to the target classifier and dyb). */
static void confidence_loss_backward(confsmoe_gate *g, const gate_saved *s, float dloss, backward_work *w)
{
    const int64_t k = g->p.k, C = g->p.n_classes, rows = s->n * k, d = g->p.d;
    if (!s->conf_loss || s->den == 0.0f)
        return;
    const float scale = dloss * g->p.conf_loss_weight * 2.0f / s->den;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t slot = s->slot_of[r], t = slot / k;
        float *dz = w->dz + r * C;
        if (!s->present[t])
            continue;
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
    if (g->p.detach_target)
        return;
    csm_gemm(true, false, C, d, rows, 1.0f, w->dz, s->yb, 1.0f, csm_f32(g->target_dw));
    csm_add_column_sums(csm_f32(g->target_db), w->dz, rows, C);
    csm_gemm(false, false, rows, d, C, 1.0f, w->dz, csm_f32(g->target_w), 1.0f, w->dyb);
}

static void confidence_backward(confsmoe_gate *g, const gate_saved *s, backward_work *w)
{
    const int64_t d = g->p.d;
    for (int32_t e = 0; e < g->n_experts; e++) {
        const int64_t begin = s->offset[e], rows = s->offset[e + 1] - begin;
        if (rows == 0)
            continue;
        double sum = 0.0;
        for (int64_t r = begin; r < begin + rows; r++)
            sum += w->dc[s->slot_of[r]];
        for (int64_t r = begin; r < begin + rows; r++)
            w->ds[r] = g->p.confidence == CONFSMOE_CONFIDENCE_EXPERT ? (float)(sum / (double)rows)
                                                                      : w->dc[s->slot_of[r]];
        const csm_confnet_cache cache = {s->cache.normed + begin * d, s->cache.mean + begin, s->cache.rstd + begin};
        csm_confnet_backward(&g->confnets[e], s->yb + begin * d, rows, d, s->s + begin, w->ds + begin, &cache,
                             w->dyb + begin * d, w->scratch);
    }
}

static bool router_learns(const confsmoe_gate *g)
{
    return g->p.combine == CONFSMOE_COMBINE_ROUTER_SOFTMAX || g->p.router_grad != CONFSMOE_ROUTER_GRAD_FROZEN;
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

static void run_expert_backward(confsmoe_gate *g, gate_saved *s, backward_work *w)
{
    const int64_t d = g->p.d;
    for (int32_t e = 0; e < g->n_experts; e++)
        if (s->offset[e + 1] > s->offset[e])
            csm_expert_backward_rows(g->experts[e], s->expert_saved[e], w->dyb + s->offset[e] * d,
                                     w->dxb + s->offset[e] * d, w->expert);
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
    const int64_t n = s->n, d = g->p.d;
    const bool confidence = g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
    backward_work w;
    void *block = backward_alloc(g, s, &w);
    if (!block)
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_backward: out of memory for N=%" PRId64, n);
    saved->consumed = true;

    /* Combine: y_t = sum_j weight_j y_j. */
    const float *weight = confidence ? s->c : s->g, *gy = csm_f32(dy);
    for (int64_t i = 0; i < n * k; i++) {
        const int64_t r = s->row_of[i];
        const float *go = gy + (i / k) * d, *yr = s->yb + r * d;
        float *dyr = w.dyb + r * d;
        double dot = 0.0;
        for (int64_t c = 0; c < d; c++) {
            dot += (double)go[c] * yr[c];
            dyr[c] = weight[i] * go[c];
        }
        if (dslots)
            for (int64_t c = 0; c < d; c++)
                dyr[c] += csm_f32(dslots)[i * d + c];
        w.dweight[i] = (float)dot;
    }
    if (confidence) {
        memcpy(w.dc, w.dweight, (size_t)(n * k) * sizeof(float));
        confidence_loss_backward(g, s, dloss, &w);
        confidence_backward(g, s, &w);
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
        csm_router_backward(&g->router, s->x, n, s->u_clean, s->h, w.du, s->eps ? w.dsigma : NULL, w.dx, w.scratch);
    }

    run_expert_backward(g, s, &w);
    for (int64_t i = 0; i < n * k; i++) {
        const float *src = w.dxb + s->row_of[i] * d;
        float *dst = w.dx + (g->p.compat ? i % n : i / k) * d;
        for (int64_t c = 0; c < d; c++)
            dst[c] += src[c];
    }
    if (dx)
        memcpy(dx->data, w.dx, dx->nbytes);
    csm_free(g->ctx, block);
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ parameters and statistics */

int32_t confsmoe_gate_n_params(const confsmoe_gate *g) { return g ? g->params.count : -1; }

const char *confsmoe_gate_param_name(const confsmoe_gate *g, int32_t i)
{
    return g && i >= 0 && i < g->params.count ? g->params.names[i] : NULL;
}

confsmoe_tensor *confsmoe_gate_param(confsmoe_gate *g, int32_t i)
{
    return g && i >= 0 && i < g->params.count ? g->params.param[i] : NULL;
}

confsmoe_tensor *confsmoe_gate_grad(confsmoe_gate *g, int32_t i)
{
    return g && i >= 0 && i < g->params.count ? g->params.grad[i] : NULL;
}

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
    if (out->struct_size != sizeof *out)
        return csm_fail(g->ctx, CONFSMOE_E_VERSION, "%s: out->struct_size is %zu, this library expects %zu", fn,
                        out->struct_size, sizeof *out);
    if (scope != CONFSMOE_STATS_LAST_CALL && scope != CONFSMOE_STATS_TOTAL)
        return csm_fail(g->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown scope %" PRId32, fn, scope);
    if ((load || mean_confidence) && n != g->n_experts)
        return csm_fail(g->ctx, CONFSMOE_E_SHAPE, "%s: arrays of %" PRId32 " given, the gate has E=%" PRId32, fn, n,
                        g->n_experts);
    csm_usage_report(scope == CONFSMOE_STATS_TOTAL ? &g->total : &g->last, g->n_experts, out, load, mean_confidence);
    return CONFSMOE_OK;
}

void confsmoe_gate_stats_reset(confsmoe_gate *g)
{
    if (!g)
        return;
    csm_usage_clear(&g->last, g->n_experts);
    csm_usage_clear(&g->total, g->n_experts);
}
