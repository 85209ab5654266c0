/* One expert: the FFN y = W2 GELU(W1 x + b1) + b2, forward and backward over a batch of tokens
 * (docs/MODEL.md, section 2). */
#include <inttypes.h>
#include <math.h>
#include <string.h>

#include "expert.h"
#include "internal.h"
#include "kernels.h"
#include "layout.h"

/* Indices in the parameter list, in its order. */
enum { W1, B1, W2, B2 };

/* Floats of pre-activations per chunk of rows in forward (256 KiB). */
#define EXPERT_CHUNK_FLOATS 65536

struct confsmoe_expert {
    confsmoe_ctx *ctx;
    int64_t d, h;
    csm_params params;  /* w1 [h, d], b1 [h], w2 [d, h], b2 [d] */
};

const csm_params *csm_expert_param_list(const confsmoe_expert *e) { return &e->params; }

/* What backward needs from one forward: the input, and GELU and GELU' of the pre-activation
 * (computed together in forward, from one evaluation of Phi and phi). */
typedef struct {
    confsmoe_saved base;
    int64_t n;
    float *x;     /* [n, d] */
    float *kept;  /* [n, CSM_EXPERT_KEPT(h)]: GELU(pre), then GELU'(pre) */
} expert_saved;

void confsmoe_expert_destroy(confsmoe_expert *e)
{
    if (!e)
        return;
    confsmoe_ctx *ctx = e->ctx;
    csm_params_free(ctx, &e->params);
    csm_free(ctx, e);
    csm_ctx_release(ctx);
}

confsmoe_status confsmoe_expert_create(confsmoe_ctx *ctx, int64_t d, int64_t h, confsmoe_expert **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !out)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "expert_create: %s is NULL", ctx ? "out" : "ctx");
    if (d < 1 || h < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "expert_create: d=%" PRId64 " and h=%" PRId64 " must be >= 1", d, h);
    confsmoe_expert *e = csm_calloc(ctx, 1, sizeof *e);
    if (!e)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "expert_create: out of memory");
    e->ctx = csm_ctx_retain(ctx);
    e->d = d;
    e->h = h;
    /* Biases are 1-D, as in nn.Linear. */
    confsmoe_tensor *w1, *b1, *w2, *b2;
    confsmoe_status s = csm_params_new(ctx, &e->params, "w1", 2, h, d, &w1);
    if (s == CONFSMOE_OK)
        s = csm_params_new(ctx, &e->params, "b1", 1, h, 0, &b1);
    if (s == CONFSMOE_OK)
        s = csm_params_new(ctx, &e->params, "w2", 2, d, h, &w2);
    if (s == CONFSMOE_OK)
        s = csm_params_new(ctx, &e->params, "b2", 1, d, 0, &b2);
    if (s != CONFSMOE_OK) {
        confsmoe_expert_destroy(e);
        return csm_fail(ctx, s, "expert_create: out of memory for d=%" PRId64 ", h=%" PRId64, d, h);
    }
    float bound_in = 1.0f / sqrtf((float)d), bound_hidden = 1.0f / sqrtf((float)h);
    csm_fill_uniform(ctx, w1, bound_in);
    csm_fill_uniform(ctx, b1, bound_in);
    csm_fill_uniform(ctx, w2, bound_hidden);
    csm_fill_uniform(ctx, b2, bound_hidden);
    *out = e;
    return CONFSMOE_OK;
}

int64_t confsmoe_expert_d(const confsmoe_expert *e) { return e ? e->d : -1; }

int64_t confsmoe_expert_h(const confsmoe_expert *e) { return e ? e->h : -1; }

static void release_saved(confsmoe_saved *s)
{
    confsmoe_ctx *ctx = s->ctx;
    csm_free(ctx, s);
    csm_ctx_release(ctx);
}

/* The header, then x and what backward needs of the activation (layout.h); returns the header. */
static expert_saved *expert_saved_parts(csm_layout *l, const confsmoe_expert *e, int64_t n, expert_saved *view)
{
    expert_saved *header = CSM_LAYOUT_ARRAY(l, expert_saved, 1);
    view->x = CSM_LAYOUT_ROWS(l, float, (size_t)n, (size_t)e->d);
    view->kept = CSM_LAYOUT_ROWS(l, float, (size_t)n, (size_t)CSM_EXPERT_KEPT(e->h));
    return header;
}

/* One block for the header and the arrays. */
static expert_saved *expert_alloc_saved(confsmoe_expert *e, int64_t n)
{
    expert_saved view = {0};
    csm_layout l = csm_layout_measure();
    size_t bytes;
    expert_saved_parts(&l, e, n, &view);
    char *block = csm_layout_size(&l, &bytes) ? csm_alloc(e->ctx, bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    expert_saved *s = expert_saved_parts(&l, e, n, &view);
    *s = view;
    s->base.ctx = csm_ctx_retain(e->ctx);
    s->base.owner = e;
    s->base.release = release_saved;
    s->n = n;
    return s;
}

confsmoe_status confsmoe_expert_forward(confsmoe_expert *e, const confsmoe_tensor *x, confsmoe_tensor *y,
                                        confsmoe_saved **saved)
{
    if (!e)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "expert_forward";
    confsmoe_ctx *ctx = e->ctx;
    if (saved)
        *saved = NULL;
    const int64_t x_dims[2] = {-1, e->d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "x", x, CONFSMOE_F32, 2, x_dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t n = x->dims[0], y_dims[2] = {n, e->d};
    if ((s = csm_expect_tensor(ctx, fn, "y", y, CONFSMOE_F32, 2, y_dims)) != CONFSMOE_OK ||
        (s = csm_expect_finite(ctx, fn, "x", x)) != CONFSMOE_OK)
        return s;

    if (!saved) {
        /* The activation: n * h floats, freed before returning. */
        float *act = csm_alloc(ctx, (size_t)n * (size_t)e->h * sizeof(float));
        if (!act)
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "expert_forward: out of memory for N=%" PRId64, n);
        csm_expert_forward_rows(e, csm_f32(x), n, csm_f32(y), NULL, act);
        csm_free(ctx, act);
        return CONFSMOE_OK;
    }
    expert_saved *keep = expert_alloc_saved(e, n);
    if (!keep)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "expert_forward: out of memory saving N=%" PRId64, n);
    if (x->nbytes > 0)
        memcpy(keep->x, x->data, x->nbytes);
    csm_expert_forward_rows(e, csm_f32(x), n, csm_f32(y), keep->kept, NULL);
    *saved = &keep->base;
    return CONFSMOE_OK;
}

void csm_expert_forward_rows(const confsmoe_expert *e, const float *x, int64_t n, float *y, float *kept, float *act)
{
    if (n == 0)
        return;
    const int64_t d = e->d, h = e->h;
    /* x W1^T lands in the GELU' half of kept (training) or in act (inference); one pass adds
     * b1 and writes GELU (into the first half of kept when training) and GELU'. */
    if (kept)
        act = kept;
    float *buf = kept ? kept + n * h : act;
    /* In chunks of rows, so that a chunk's pre-activations and activations are still in cache
     * when the next pass reads them: 256 KiB of each (512 rows at h = 128), and the rest of the
     * rows with the last chunk when they are fewer. Experts too wide for chunks of 256 rows
     * run whole. Each row is computed as in one call. */
    int64_t chunk = EXPERT_CHUNK_FLOATS / h;
    if (chunk < 256)
        chunk = n;
    for (int64_t r0 = 0; r0 < n;) {
        const int64_t rows = n - r0 < 2 * chunk ? n - r0 : chunk;
        csm_gemm(e->ctx, false, true, rows, h, d, 1.0f, x + r0 * d, csm_f32(e->params.param[W1]), 0.0f, buf + r0 * h);
        csm_bias_gelu(buf + r0 * h, csm_f32(e->params.param[B1]), act + r0 * h, rows, h, kept != NULL);
        csm_broadcast_rows(y + r0 * d, csm_f32(e->params.param[B2]), rows, d);
        csm_gemm(e->ctx, false, true, rows, d, h, 1.0f, act + r0 * h, csm_f32(e->params.param[W2]), 1.0f, y + r0 * d);
        r0 += rows;
    }
}

confsmoe_status confsmoe_expert_backward(confsmoe_expert *e, confsmoe_saved *saved, const confsmoe_tensor *dy,
                                         confsmoe_tensor *dx)
{
    if (!e)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "expert_backward";
    confsmoe_ctx *ctx = e->ctx;
    if (!saved)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved is NULL", fn);
    if (saved->owner != e)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: saved comes from another layer's forward", fn);
    if (saved->consumed)
        return csm_fail(ctx, CONFSMOE_E_STATE, "%s: backward already ran on this saved handle", fn);
    expert_saved *keep = (expert_saved *)saved;
    const int64_t n = keep->n, dims[2] = {n, e->d};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "dy", dy, CONFSMOE_F32, 2, dims);
    if (s == CONFSMOE_OK && dx)
        s = csm_expect_tensor(ctx, fn, "dx", dx, CONFSMOE_F32, 2, dims);
    if (s == CONFSMOE_OK)
        s = csm_expect_finite(ctx, fn, "dy", dy);
    if (s != CONFSMOE_OK)
        return s;

    float *scratch = csm_alloc(ctx, (size_t)n * (size_t)e->h * sizeof(float));
    if (!scratch)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for N=%" PRId64, fn, n);
    csm_expert_backward_rows(e, keep->x, keep->kept, n, csm_f32(dy), dx ? csm_f32(dx) : NULL, scratch);
    saved->consumed = true;
    csm_free(ctx, scratch);
    return CONFSMOE_OK;
}

void csm_expert_backward_rows(confsmoe_expert *e, const float *x, const float *kept, int64_t n, const float *dy,
                              float *dx, float *scratch)
{
    if (n == 0)
        return;
    const int64_t h = e->h;
    const float *act = kept, *gelu_grad = kept + n * h;
    float *dpre = scratch;
    /* d(act) = dy W2, then through GELU: dpre = d(act) GELU'(pre), with db1 in the same pass. */
    csm_gemm(e->ctx, false, false, n, h, e->d, 1.0f, dy, csm_f32(e->params.param[W2]), 0.0f, dpre);
    csm_gemm(e->ctx, true, false, e->d, h, n, 1.0f, dy, act, 1.0f, csm_f32(e->params.grad[W2]));
    csm_add_column_sums(csm_f32(e->params.grad[B2]), dy, n, e->d);
    csm_mul_colsum(dpre, gelu_grad, csm_f32(e->params.grad[B1]), n, h);
    csm_gemm(e->ctx, true, false, h, e->d, n, 1.0f, dpre, x, 1.0f, csm_f32(e->params.grad[W1]));
    if (dx)
        csm_gemm(e->ctx, false, false, n, e->d, h, 1.0f, dpre, csm_f32(e->params.param[W1]), 0.0f, dx);
}

int32_t confsmoe_expert_n_params(const confsmoe_expert *e) { return e ? e->params.count : -1; }

const char *confsmoe_expert_param_name(const confsmoe_expert *e, int32_t i)
{
    return e ? csm_params_name(&e->params, i) : NULL;
}

confsmoe_tensor *confsmoe_expert_param(confsmoe_expert *e, int32_t i)
{
    return e ? csm_params_param(&e->params, i) : NULL;
}

confsmoe_tensor *confsmoe_expert_grad(confsmoe_expert *e, int32_t i)
{
    return e ? csm_params_grad(&e->params, i) : NULL;
}

void confsmoe_expert_zero_grad(confsmoe_expert *e)
{
    if (e)
        csm_params_zero_grad(&e->params);
}
