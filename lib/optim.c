/* Adam and SGD over (parameter, gradient) pairs that the host registers. */
#include <math.h>
#include <string.h>

#include "internal.h"
#include "optim_state.h"
#include "sized.h"

typedef struct {
    confsmoe_tensor *param;
    const confsmoe_tensor *grad;
    float *m;  /* Adam first moment, or SGD momentum buffer */
    float *v;  /* Adam second moment */
    int64_t steps;  /* per parameter, as in PyTorch: a late registration starts its bias correction at 1 */
} slot;

struct confsmoe_optim {
    confsmoe_ctx *ctx;
    confsmoe_optim_params p;
    slot *slots;
    size_t n_slots, cap_slots;
};

static void optim_defaults(confsmoe_optim_params *p)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->kind = CONFSMOE_OPTIM_ADAM;
    p->lr = 3e-4f;
    p->beta1 = 0.9f;
    p->beta2 = 0.999f;
    p->eps = 1e-8f;
}

void confsmoe_optim_params_init_sized(confsmoe_optim_params *p, size_t struct_size)
{
    confsmoe_optim_params defaults;
    optim_defaults(&defaults);
    csm_sized_init(p, struct_size, &defaults, sizeof defaults, CSM_OPTIM_PARAMS_MIN);
}

size_t confsmoe_sizeof_optim_params(void) { return sizeof(confsmoe_optim_params); }

static confsmoe_status optim_check_params(confsmoe_ctx *ctx, const confsmoe_optim_params *p)
{
    static const char fn[] = "optim_create";
    if (p->kind != CONFSMOE_OPTIM_ADAM && p->kind != CONFSMOE_OPTIM_SGD)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: unknown optimizer kind %d", fn, (int)p->kind);
    if (!(p->lr >= 0.0f) || !isfinite(p->lr))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: lr must be finite and >= 0", fn);
    if (!(p->beta1 >= 0.0f && p->beta1 < 1.0f) || !(p->beta2 >= 0.0f && p->beta2 < 1.0f))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: beta1 and beta2 must be in [0, 1)", fn);
    if (!(p->eps > 0.0f) || !isfinite(p->eps))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: eps must be finite and > 0", fn);
    if (!(p->momentum >= 0.0f && p->momentum < 1.0f))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: momentum must be in [0, 1)", fn);
    if (!(p->weight_decay >= 0.0f) || !isfinite(p->weight_decay))
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: weight_decay must be finite and >= 0", fn);
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_optim_create(confsmoe_ctx *ctx, const confsmoe_optim_params *p, confsmoe_optim **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "optim_create: %s is NULL", ctx ? "out" : "ctx");
    /* The caller's struct, of any accepted size, over the defaults (docs/API.md, "Struct versioning");
     * p == NULL: the defaults. */
    confsmoe_optim_params full;
    optim_defaults(&full);
    confsmoe_status s = p ? csm_sized_read(ctx, "optim_create", "confsmoe_optim_params", p, &full, sizeof full,
                                           CSM_OPTIM_PARAMS_MIN)
                          : CONFSMOE_OK;
    p = &full;
    if (s == CONFSMOE_OK)
        s = optim_check_params(ctx, p);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_optim *o = csm_calloc(ctx, 1, sizeof *o);
    if (!o)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "optim_create: out of memory");
    o->ctx = csm_ctx_retain(ctx);
    o->p = *p;
    *out = o;
    return CONFSMOE_OK;
}

/* The registered tensors are not touched: they may be destroyed before the optimizer. */
void confsmoe_optim_destroy(confsmoe_optim *o)
{
    if (!o)
        return;
    confsmoe_ctx *ctx = o->ctx;
    for (size_t i = 0; i < o->n_slots; i++) {
        csm_free(ctx, o->slots[i].m);
        csm_free(ctx, o->slots[i].v);
    }
    csm_free(ctx, o->slots);
    csm_free(ctx, o);
    csm_ctx_release(ctx);
}

confsmoe_status confsmoe_optim_add(confsmoe_optim *o, confsmoe_tensor *param, const confsmoe_tensor *grad)
{
    if (!o)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "optim_add";
    confsmoe_ctx *ctx = o->ctx;
    if (!param || !grad)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, param ? "grad" : "param");
    confsmoe_status s = csm_expect_tensor(ctx, fn, "param", param, CONFSMOE_F32, param->ndim, param->dims);
    if (s == CONFSMOE_OK)
        s = csm_expect_tensor(ctx, fn, "grad", grad, CONFSMOE_F32, param->ndim, param->dims);
    if (s != CONFSMOE_OK)
        return s;
    for (size_t i = 0; i < o->n_slots; i++)
        if (o->slots[i].param == param)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: this parameter is already registered", fn);

    if (o->n_slots == o->cap_slots) {
        size_t cap = o->cap_slots ? 2 * o->cap_slots : 16;
        slot *grown = csm_calloc(ctx, cap, sizeof *grown);
        if (!grown)
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", fn);
        if (o->n_slots)
            memcpy(grown, o->slots, o->n_slots * sizeof *grown);
        csm_free(ctx, o->slots);
        o->slots = grown;
        o->cap_slots = cap;
    }
    slot sl = {param, grad, NULL, NULL, 0};
    sl.m = csm_calloc(ctx, 1, param->nbytes);
    if (sl.m && o->p.kind == CONFSMOE_OPTIM_ADAM)
        sl.v = csm_calloc(ctx, 1, param->nbytes);
    if (!sl.m || (o->p.kind == CONFSMOE_OPTIM_ADAM && !sl.v)) {
        csm_free(ctx, sl.m);
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the optimizer state", fn);
    }
    o->slots[o->n_slots++] = sl;
    return CONFSMOE_OK;
}

static void adam_update(const confsmoe_optim_params *p, int64_t t, float *w, const float *g, float *m, float *v,
                        int64_t n)
{
    /* PyTorch's Adam: bias-corrected moments, eps added after the square root. */
    const float c1 = 1.0f - powf(p->beta1, (float)t), c2 = 1.0f - powf(p->beta2, (float)t);
    const float step = p->lr / c1, inv_sqrt_c2 = 1.0f / sqrtf(c2);
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] + p->weight_decay * w[i];
        m[i] = p->beta1 * m[i] + (1.0f - p->beta1) * gi;
        v[i] = p->beta2 * v[i] + (1.0f - p->beta2) * gi * gi;
        w[i] -= step * m[i] / (sqrtf(v[i]) * inv_sqrt_c2 + p->eps);
    }
}

static void sgd_update(const confsmoe_optim_params *p, float *w, const float *g, float *buf, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i] + p->weight_decay * w[i];
        if (p->momentum > 0.0f) {
            /* The buffer starts at zero, so the first step uses the gradient itself, as PyTorch does. */
            buf[i] = p->momentum * buf[i] + gi;
            gi = buf[i];
        }
        w[i] -= p->lr * gi;
    }
}

confsmoe_status confsmoe_optim_step(confsmoe_optim *o)
{
    if (!o)
        return CONFSMOE_E_INVALID_ARGUMENT;
    /* Check every gradient first, so that a bad one leaves all parameters as they were. */
    for (size_t i = 0; i < o->n_slots; i++) {
        confsmoe_status s = csm_expect_finite(o->ctx, "optim_step", "a gradient", o->slots[i].grad);
        if (s != CONFSMOE_OK)
            return s;
    }
    for (size_t i = 0; i < o->n_slots; i++) {
        slot *sl = &o->slots[i];
        const int64_t t = ++sl->steps;
        float *w = csm_f32(sl->param);
        const float *g = csm_f32(sl->grad);
        if (o->p.kind == CONFSMOE_OPTIM_ADAM)
            adam_update(&o->p, t, w, g, sl->m, sl->v, sl->param->numel);
        else
            sgd_update(&o->p, w, g, sl->m, sl->param->numel);
    }
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_optim_set_lr(confsmoe_optim *o, float lr)
{
    if (!o)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (!(lr >= 0.0f) || !isfinite(lr))
        return csm_fail(o->ctx, CONFSMOE_E_INVALID_ARGUMENT, "optim_set_lr: lr must be finite and >= 0");
    o->p.lr = lr;
    return CONFSMOE_OK;
}

confsmoe_ctx *csm_optim_ctx(const confsmoe_optim *o) { return o->ctx; }

const confsmoe_optim_params *csm_optim_hparams(const confsmoe_optim *o) { return &o->p; }

size_t csm_optim_n_slots(const confsmoe_optim *o) { return o->n_slots; }

csm_optim_slot_state csm_optim_slot(const confsmoe_optim *o, size_t i)
{
    const slot *sl = &o->slots[i];
    return (csm_optim_slot_state){sl->param, sl->m, sl->v, sl->steps};
}

void csm_optim_set_steps(confsmoe_optim *o, size_t i, int64_t steps) { o->slots[i].steps = steps; }
