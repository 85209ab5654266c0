/* Numerical edge cases: huge router and classifier logits, zero-variance LayerNorm inputs,
 * every token routed to one expert (the others idle), and NaN / Inf inputs with the finite
 * checks on (CONFSMOE_E_NUMERIC, a message naming the input, nothing changed) and off (the
 * documented behaviour: the call succeeds, non-finite values propagate, indices stay in
 * range, clean rows stay finite; no crash and no UB under ASan + UBSan). Public API only. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum { N = 8, D = 6, H = 5, E = 4, C = 3 };

static int all_finite(confsmoe_tensor *t)
{
    const float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (!isfinite(v[i]))
            return 0;
    return 1;
}

static int rows_finite(confsmoe_tensor *t, int64_t first, int64_t last, int64_t width)
{
    const float *v = f32(t);
    for (int64_t i = first * width; i < last * width; i++)
        if (!isfinite(v[i]))
            return 0;
    return 1;
}

static void scale(confsmoe_tensor *t, float s)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] *= s;
}

#define CK_FINITE(t, what) ck_assert_msg(all_finite(t), "%s is not finite", what)
#define CK_MSG(ctx, sub)                                                                                     \
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), (sub)) != NULL, "last error \"%s\" lacks \"%s\"", \
                  confsmoe_ctx_last_error(ctx), (sub))

/* ---------------------------------------------------------------- a gate rig */

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *ex[E];
    confsmoe_gate *g;
    confsmoe_tensor *x, *labels, *y, *topk, *slots, *dy, *dx;
    int32_t k;
} grig;

static void grig_open(grig *r, int check_finite, int32_t router, int32_t combine, int32_t k, int32_t load_loss,
                      int32_t router_grad, uint64_t seed)
{
    memset(r, 0, sizeof *r);
    r->ctx = test_ctx_with(seed, check_finite, NULL);
    r->k = k;
    for (int e = 0; e < E; e++)
        ck_assert_int_eq(confsmoe_expert_create(r->ctx, D, H, &r->ex[e]), CONFSMOE_OK);
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = D;
    p.k = k;
    p.router = router;
    p.combine = combine;
    p.n_classes = C;
    p.load_loss = load_loss;
    p.load_loss_weight = 0.5f;
    p.router_grad = router_grad;
    ck_assert_int_eq(confsmoe_gate_create(r->ctx, &p, r->ex, E, &r->g), CONFSMOE_OK);
    r->x = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    trng t = {seed};
    fill_uniform(r->x, &t, -1, 1);
    r->labels = test_tensor(r->ctx, CONFSMOE_I32, 1, N, 0, 0, 0);
    for (int i = 0; i < N; i++)
        i32(r->labels)[i] = i % C;
    r->y = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    r->topk = test_tensor(r->ctx, CONFSMOE_I32, 2, N, k, 0, 0);
    r->slots = test_tensor(r->ctx, CONFSMOE_F32, 3, N, k, D, 0);
    r->dy = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    fill_uniform(r->dy, &t, -1, 1);
    r->dx = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
}

static void grig_close(grig *r)
{
    confsmoe_tensor *ts[] = {r->x, r->labels, r->y, r->topk, r->slots, r->dy, r->dx};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
        confsmoe_tensor_destroy(ts[i]);
    confsmoe_gate_destroy(r->g);
    for (int e = 0; e < E; e++)
        confsmoe_expert_destroy(r->ex[e]);
    confsmoe_ctx_destroy(r->ctx);
}

static confsmoe_tensor *gate_param(confsmoe_gate *g, const char *name)
{
    for (int32_t i = 0; i < confsmoe_gate_n_params(g); i++)
        if (strcmp(confsmoe_gate_param_name(g, i), name) == 0)
            return confsmoe_gate_param(g, i);
    ck_abort_msg("no gate parameter %s", name);
    return NULL;
}

/* A training forward and backward; returns the loss. */
static float grig_train(grig *r)
{
    float loss = -1.0f;
    confsmoe_saved *s = NULL;
    confsmoe_status st = confsmoe_gate_forward(r->g, r->x, r->labels, NULL, r->y, r->topk, r->slots, &loss, &s);
    ck_assert_msg(st == CONFSMOE_OK, "gate_forward: %s", confsmoe_ctx_last_error(r->ctx));
    st = confsmoe_gate_backward(r->g, s, r->dy, NULL, 1.0f, r->dx);
    ck_assert_msg(st == CONFSMOE_OK, "gate_backward: %s", confsmoe_ctx_last_error(r->ctx));
    confsmoe_saved_destroy(s);
    return loss;
}

static void check_topk_range(grig *r)
{
    for (int64_t i = 0; i < (int64_t)N * r->k; i++)
        ck_assert_msg(i32(r->topk)[i] >= 0 && i32(r->topk)[i] < E, "topk[%ld] = %d", (long)i, i32(r->topk)[i]);
    /* The k experts of a token are distinct. */
    for (int t = 0; t < N; t++)
        for (int a = 0; a < r->k; a++)
            for (int b = a + 1; b < r->k; b++)
                ck_assert_int_ne(i32(r->topk)[t * r->k + a], i32(r->topk)[t * r->k + b]);
}

static void check_gate_grads_finite(grig *r)
{
    for (int32_t i = 0; i < confsmoe_gate_n_params(r->g); i++)
        ck_assert_msg(all_finite(confsmoe_gate_grad(r->g, i)), "gate grad %s not finite",
                      confsmoe_gate_param_name(r->g, i));
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(r->ex[e]); i++)
            ck_assert_msg(all_finite(confsmoe_expert_grad(r->ex[e], i)), "expert %d grad %d not finite", e, i);
}

/* ---------------------------------------------------------------- huge logits */

static const int32_t routers[3] = {CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_GAUSSIAN, CONFSMOE_ROUTER_LAPLACIAN};

/* Huge router logits from huge router weights (|u| ~ 1e30, still a float), with moderate
 * inputs: the kept logits' softmax and everything after it stay finite, the loss is finite
 * and in range, and the gradients are finite. _i: router x combine. */
START_TEST(test_huge_router_logits)
{
    const int32_t router = routers[_i % 3];
    const int32_t combine = _i / 3 ? CONFSMOE_COMBINE_ROUTER_SOFTMAX : CONFSMOE_COMBINE_CONFIDENCE;
    grig r;
    grig_open(&r, 1, router, combine, 2, CONFSMOE_LOAD_LOSS_CV, CONFSMOE_ROUTER_GRAD_SCORE, 10 + (uint64_t)_i);
    /* Gaussian logits are -||z - w||^2: 1e15-sized weights give 1e30-sized logits. The
     * distance routers form ||z||^2 - 2 z.w + ||w||^2 in float (one GEMM), so the squared
     * distance must stay below FLT_MAX (distances below ~1.8e19): the Laplacian is tested at
     * 1e15-sized distances too (docs/RELIABILITY.md, Numerics). */
    scale(gate_param(r.g, "router.w"), router == CONFSMOE_ROUTER_SOFTMAX ? 1e30f : 1e15f);
    const float loss = grig_train(&r);
    CK_FINITE(r.y, "y");
    CK_FINITE(r.slots, "slots");
    CK_FINITE(r.dx, "dx");
    ck_assert_msg(isfinite(loss) && loss >= 0.0f, "loss %g", (double)loss);
    check_topk_range(&r);
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(r.ex[e]); i++)
            ck_assert(all_finite(confsmoe_expert_grad(r.ex[e], i)));
    grig_close(&r);
}
END_TEST

/* Huge classifier logits in the confidence target (target.w x 1e30): p = softmax(P y)[label]
 * is computed stably, so the confidence loss is finite and within [0, 1] (plus the load term). */
START_TEST(test_huge_target_logits)
{
    grig r;
    grig_open(&r, 1, CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_COMBINE_CONFIDENCE, 2, CONFSMOE_LOAD_LOSS_NONE,
              CONFSMOE_ROUTER_GRAD_FROZEN, 20);
    scale(gate_param(r.g, "target.w"), 1e30f);
    const float loss = grig_train(&r);
    ck_assert_msg(isfinite(loss) && loss >= 0.0f && loss <= 1.0f, "loss %g", (double)loss);
    CK_FINITE(r.y, "y");
    CK_FINITE(r.dx, "dx");
    check_gate_grads_finite(&r);
    grig_close(&r);
}
END_TEST

/* Inputs of magnitude 1e30 (finite, so accepted with checks on) through the softmax and
 * Laplacian routers: the experts' outputs and the ConfNets' LayerNorm of them stay finite,
 * and the routing indices stay valid even where the Laplacian's squared distance overflows. */
START_TEST(test_huge_inputs)
{
    const int32_t router = _i ? CONFSMOE_ROUTER_LAPLACIAN : CONFSMOE_ROUTER_SOFTMAX;
    grig r;
    grig_open(&r, 1, router, CONFSMOE_COMBINE_CONFIDENCE, 2, CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN,
              30 + (uint64_t)_i);
    scale(r.x, 1e30f);
    float loss = -1.0f;
    ck_assert_int_eq(confsmoe_gate_forward(r.g, r.x, r.labels, NULL, r.y, r.topk, r.slots, &loss, NULL),
                     CONFSMOE_OK);
    check_topk_range(&r);
    CK_FINITE(r.slots, "slots");
    CK_FINITE(r.y, "y");
    ck_assert_msg(isfinite(loss), "loss %g", (double)loss);
    grig_close(&r);
}
END_TEST

/* ---------------------------------------------------------------- zero variance */

/* Every expert returns a constant vector (W2 = 0, b2 = c): each ConfNet's LayerNorm sees zero
 * variance. Its output is the LN bias, confidences are sigmoid(v . bias + beta), and forward
 * and backward are finite (eps keeps 1 / sqrt(var + eps) finite). */
START_TEST(test_constant_layernorm_gate)
{
    grig r;
    grig_open(&r, 1, CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_COMBINE_CONFIDENCE, 2, CONFSMOE_LOAD_LOSS_NONE,
              CONFSMOE_ROUTER_GRAD_FROZEN, 40);
    for (int e = 0; e < E; e++) {
        fill_const(confsmoe_expert_param(r.ex[e], 2), 0.0f);
        fill_const(confsmoe_expert_param(r.ex[e], 3), 0.25f * (float)(e + 1));
    }
    const float loss = grig_train(&r);
    ck_assert(isfinite(loss));
    CK_FINITE(r.y, "y");
    CK_FINITE(r.dx, "dx");
    check_gate_grads_finite(&r);
    /* y = sum_j c_j b2_j: every row is a constant vector. */
    for (int t = 0; t < N; t++)
        for (int c = 1; c < D; c++)
            ck_assert_float_eq(f32(r.y)[t * D + c], f32(r.y)[t * D]);
    grig_close(&r);
}
END_TEST

/* ---------------------------------------------------------------- one expert takes all */

/* Inputs all positive, router column 0 = +1, the others <= 0: every token picks expert 0
 * first. With k = 1 the other experts get no tokens: their gradients stay exactly zero, the
 * statistics say so (load {N, 0, ...}, NaN mean confidence, entropy 0, max fraction 1), and
 * the load losses are finite. _i: load loss (none, CV, entropy) x router gradient. */
START_TEST(test_one_expert_takes_all)
{
    static const int32_t losses[3] = {CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_LOAD_LOSS_CV, CONFSMOE_LOAD_LOSS_ENTROPY};
    const int32_t load_loss = losses[_i % 3];
    const int32_t router_grad = _i / 3 ? CONFSMOE_ROUTER_GRAD_TRAINABLE : CONFSMOE_ROUTER_GRAD_FROZEN;
    grig r;
    grig_open(&r, 1, CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_COMBINE_CONFIDENCE, 1, load_loss, router_grad,
              50 + (uint64_t)_i);
    trng t = {7};
    fill_uniform(r.x, &t, 0.5, 1.0);
    float *w = f32(gate_param(r.g, "router.w"));  /* [d, E] */
    for (int c = 0; c < D; c++)
        for (int e = 0; e < E; e++)
            w[c * E + e] = e == 0 ? 1.0f : -0.1f * (float)e;
    const float loss = grig_train(&r);
    ck_assert_msg(isfinite(loss), "loss %g with load loss %d", (double)loss, load_loss);
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(i32(r.topk)[i], 0);
    CK_FINITE(r.y, "y");
    CK_FINITE(r.dx, "dx");
    check_gate_grads_finite(&r);
    for (int e = 1; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(r.ex[e]); i++) {
            confsmoe_tensor *gr = confsmoe_expert_grad(r.ex[e], i);
            for (int64_t j = 0; j < confsmoe_tensor_numel(gr); j++)
                ck_assert_msg(f32(gr)[j] == 0.0f, "idle expert %d has a gradient", e);
        }
    confsmoe_gate_stats st = {.struct_size = sizeof st};
    int64_t load[E];
    double conf[E];
    ck_assert_int_eq(confsmoe_gate_stats_get(r.g, CONFSMOE_STATS_LAST_CALL, &st, load, conf, E), CONFSMOE_OK);
    ck_assert_int_eq(load[0], N);
    ck_assert(isfinite(conf[0]));
    for (int e = 1; e < E; e++) {
        ck_assert_int_eq(load[e], 0);
        ck_assert(isnan(conf[e]));
    }
    ck_assert_double_eq_tol(st.load_entropy, 0.0, 1e-12);
    ck_assert_double_eq_tol(st.max_load_fraction, 1.0, 1e-12);
    ck_assert(isfinite(st.load_cv2));
    grig_close(&r);
}
END_TEST

/* ---------------------------------------------------------------- the model */

enum { B = 4, MM = 2, S = 2, P = 3 };
static const int64_t FEAT[MM] = {5, 3};

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_tensor *in[MM], *pool[MM], *avail, *labels, *logits;
} mrig;

static void mrig_open(mrig *r, int check_finite, uint64_t seed)
{
    memset(r, 0, sizeof *r);
    r->ctx = test_ctx_with(seed, check_finite, NULL);
    confsmoe_model_params p;
    test_model_params(&p, MM, FEAT, 8, C);
    p.tokens = S;
    p.n_experts = E;
    p.draws = 2;
    ck_assert_int_eq(confsmoe_model_create(r->ctx, &p, &r->model), CONFSMOE_OK);
    trng t = {seed};
    for (int m = 0; m < MM; m++) {
        r->in[m] = test_tensor(r->ctx, CONFSMOE_F32, 3, B, S, FEAT[m], 0);
        fill_uniform(r->in[m], &t, -1, 1);
        r->pool[m] = test_tensor(r->ctx, CONFSMOE_F32, 3, P, S, FEAT[m], 0);
        fill_uniform(r->pool[m], &t, -1, 1);
        ck_assert_int_eq(confsmoe_model_set_pool(r->model, m, r->pool[m]), CONFSMOE_OK);
    }
    r->avail = test_tensor(r->ctx, CONFSMOE_U8, 2, B, MM, 0, 0);
    memset(u8(r->avail), 1, B * MM);
    u8(r->avail)[1 * MM + 0] = 0;  /* sample 1 misses modality 0: both imputation stages run */
    r->labels = test_tensor(r->ctx, CONFSMOE_I32, 1, B, 0, 0, 0);
    for (int b = 0; b < B; b++)
        i32(r->labels)[b] = b % C;
    r->logits = test_tensor(r->ctx, CONFSMOE_F32, 2, B, C, 0, 0);
}

static void mrig_close(mrig *r)
{
    for (int m = 0; m < MM; m++) {
        confsmoe_tensor_destroy(r->in[m]);
        confsmoe_tensor_destroy(r->pool[m]);
    }
    confsmoe_tensor_destroy(r->avail);
    confsmoe_tensor_destroy(r->labels);
    confsmoe_tensor_destroy(r->logits);
    confsmoe_model_destroy(r->model);
    confsmoe_ctx_destroy(r->ctx);
}

static confsmoe_tensor *model_param(confsmoe_model *m, const char *name)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(m); i++)
        if (strcmp(confsmoe_model_param_name(m, i), name) == 0)
            return confsmoe_model_param(m, i);
    ck_abort_msg("no model parameter %s", name);
    return NULL;
}

static confsmoe_status mrig_step(mrig *r, float *loss, float *task)
{
    return confsmoe_model_step(r->model, (const confsmoe_tensor *const *)r->in, r->avail, r->labels, r->logits, loss,
                               task);
}

static void check_model_grads_finite(mrig *r)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(r->model); i++)
        ck_assert_msg(all_finite(confsmoe_model_grad(r->model, i)), "grad %s not finite",
                      confsmoe_model_param_name(r->model, i));
}

/* Classifier logits ~1e29 (head.w x 1e30): the cross-entropy is computed stably (finite,
 * >= 0), and so are the gradients. */
START_TEST(test_model_huge_class_logits)
{
    mrig r;
    mrig_open(&r, 1, 60);
    scale(model_param(r.model, "head.w"), 1e30f);
    float loss = -1, task = -1;
    ck_assert_msg(mrig_step(&r, &loss, &task) == CONFSMOE_OK, "%s", confsmoe_ctx_last_error(r.ctx));
    CK_FINITE(r.logits, "logits");
    ck_assert_msg(isfinite(loss) && isfinite(task) && task >= 0.0f, "loss %g task %g", (double)loss, (double)task);
    check_model_grads_finite(&r);
    ck_assert_int_eq(confsmoe_model_predict(r.model, (const confsmoe_tensor *const *)r.in, r.avail, r.logits),
                     CONFSMOE_OK);
    CK_FINITE(r.logits, "logits");
    mrig_close(&r);
}
END_TEST

/* Inputs of magnitude 1e30: LN1 normalises them; logits and loss stay finite. */
START_TEST(test_model_huge_inputs)
{
    mrig r;
    mrig_open(&r, 1, 61);
    for (int m = 0; m < MM; m++)
        scale(r.in[m], 1e30f);
    float loss = -1, task = -1;
    ck_assert_msg(mrig_step(&r, &loss, &task) == CONFSMOE_OK, "%s", confsmoe_ctx_last_error(r.ctx));
    CK_FINITE(r.logits, "logits");
    ck_assert_msg(isfinite(loss), "loss %g", (double)loss);
    ck_assert_int_eq(confsmoe_model_predict(r.model, (const confsmoe_tensor *const *)r.in, r.avail, r.logits),
                     CONFSMOE_OK);
    CK_FINITE(r.logits, "logits");
    mrig_close(&r);
}
END_TEST

/* Encoders 0 with a constant bias and no positional term: every token of LN1 is a constant
 * vector (zero variance). Forward and backward stay finite. */
START_TEST(test_model_constant_layernorm)
{
    mrig r;
    mrig_open(&r, 1, 62);
    for (int32_t i = 0; i < confsmoe_model_n_params(r.model); i++) {
        const char *name = confsmoe_model_param_name(r.model, i);
        if (strncmp(name, "enc.", 4) == 0)
            fill_const(confsmoe_model_param(r.model, i), strstr(name, ".b") ? 0.75f : 0.0f);
    }
    fill_const(model_param(r.model, "pos"), 0.0f);
    float loss = -1, task = -1;
    ck_assert_msg(mrig_step(&r, &loss, &task) == CONFSMOE_OK, "%s", confsmoe_ctx_last_error(r.ctx));
    CK_FINITE(r.logits, "logits");
    ck_assert(isfinite(loss) && isfinite(task));
    check_model_grads_finite(&r);
    mrig_close(&r);
}
END_TEST

/* ---------------------------------------------------------------- NaN / Inf, checks on */

static const float bad_values[3] = {NAN, INFINITY, -INFINITY};

/* Every entry point that takes float data rejects a NaN / Inf with CONFSMOE_E_NUMERIC, a
 * message that names the call and the element, and no change to parameters or gradients. */
START_TEST(test_checks_on_gate)
{
    const float bad = bad_values[_i];
    const char *word = isnan(bad) ? "NaN" : "Inf";
    grig r;
    grig_open(&r, 1, CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_COMBINE_CONFIDENCE, 2, CONFSMOE_LOAD_LOSS_NONE,
              CONFSMOE_ROUTER_GRAD_FROZEN, 70);
    void *router0 = tsnap(gate_param(r.g, "router.w"));
    /* expert_forward / gate_forward: x */
    f32(r.x)[3 * D + 2] = bad;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(r.ex[0], r.x, r.y, &s), CONFSMOE_E_NUMERIC);
    ck_assert_ptr_null(s);
    CK_MSG(r.ctx, "expert_forward");
    CK_MSG(r.ctx, word);
    float loss = 0;
    ck_assert_int_eq(confsmoe_gate_forward(r.g, r.x, r.labels, NULL, r.y, r.topk, r.slots, &loss, &s),
                     CONFSMOE_E_NUMERIC);
    ck_assert_ptr_null(s);
    CK_MSG(r.ctx, "gate_forward");
    CK_MSG(r.ctx, "x[20]");
    CK_MSG(r.ctx, word);
    ck_assert_int_eq(confsmoe_gate_forward(r.g, r.x, NULL, NULL, r.y, NULL, NULL, NULL, NULL), CONFSMOE_E_NUMERIC);
    /* gate_backward: dy, dslots and dloss */
    f32(r.x)[3 * D + 2] = 0.5f;
    ck_assert_int_eq(confsmoe_gate_forward(r.g, r.x, r.labels, NULL, r.y, r.topk, r.slots, &loss, &s), CONFSMOE_OK);
    f32(r.dy)[5] = bad;
    ck_assert_int_eq(confsmoe_gate_backward(r.g, s, r.dy, NULL, 1.0f, r.dx), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "gate_backward");
    CK_MSG(r.ctx, "dy");
    f32(r.dy)[5] = 0.5f;
    fill_const(r.slots, 0.0f);
    f32(r.slots)[7] = bad;
    ck_assert_int_eq(confsmoe_gate_backward(r.g, s, r.dy, r.slots, 1.0f, r.dx), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "dslots");
    ck_assert_int_eq(confsmoe_gate_backward(r.g, s, r.dy, NULL, bad, r.dx), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "gate_backward");
    /* Nothing accumulated; the handle is still usable. */
    for (int32_t i = 0; i < confsmoe_gate_n_params(r.g); i++) {
        confsmoe_tensor *gr = confsmoe_gate_grad(r.g, i);
        for (int64_t j = 0; j < confsmoe_tensor_numel(gr); j++)
            ck_assert(f32(gr)[j] == 0.0f);
    }
    ck_assert_int_eq(confsmoe_gate_backward(r.g, s, r.dy, NULL, 1.0f, r.dx), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    ck_assert(tsame(gate_param(r.g, "router.w"), router0));
    free(router0);
    grig_close(&r);
}
END_TEST

START_TEST(test_checks_on_model)
{
    const float bad = bad_values[_i];
    const char *word = isnan(bad) ? "NaN" : "Inf";
    mrig r;
    mrig_open(&r, 1, 80);
    f32(r.in[1])[4] = bad;
    float loss = 123.0f;
    ck_assert_int_eq(mrig_step(&r, &loss, NULL), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "model_step");
    CK_MSG(r.ctx, "inputs[1]");
    CK_MSG(r.ctx, word);
    ck_assert_float_eq(loss, 123.0f);
    for (int32_t i = 0; i < confsmoe_model_n_params(r.model); i++) {
        confsmoe_tensor *gr = confsmoe_model_grad(r.model, i);
        for (int64_t j = 0; j < confsmoe_tensor_numel(gr); j++)
            ck_assert(f32(gr)[j] == 0.0f);
    }
    ck_assert_int_eq(confsmoe_model_predict(r.model, (const confsmoe_tensor *const *)r.in, r.avail, r.logits),
                     CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "model_predict");
    f32(r.in[1])[4] = 0.0f;
    /* A pool with a bad value is refused and the old pool stays. */
    f32(r.pool[0])[2] = bad;
    ck_assert_int_eq(confsmoe_model_set_pool(r.model, 0, r.pool[0]), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "model_set_pool");
    ck_assert_int_eq(mrig_step(&r, &loss, NULL), CONFSMOE_OK);
    ck_assert(isfinite(loss));
    /* optim_step with a bad gradient changes no parameter. */
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(r.ctx, NULL, &o), CONFSMOE_OK);
    for (int32_t i = 0; i < confsmoe_model_n_params(r.model); i++)
        ck_assert_int_eq(confsmoe_optim_add(o, confsmoe_model_param(r.model, i), confsmoe_model_grad(r.model, i)),
                         CONFSMOE_OK);
    confsmoe_tensor *p0 = confsmoe_model_param(r.model, 0);
    void *snap = tsnap(p0);
    f32(confsmoe_model_grad(r.model, 3))[0] = bad;
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "optim_step");
    ck_assert(tsame(p0, snap));
    free(snap);
    confsmoe_optim_destroy(o);
    mrig_close(&r);
}
END_TEST

/* An imputer (M = 3, k = 2, d = D) on a batch of 2 with filled h and slots, every modality
 * present but modality 0 of sample 0; dh and dslots for its backward. */
enum { IM = 3, IB = 2 };

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_imputer *imp;
    confsmoe_tensor *h, *out, *slots, *avail, *dh, *dslots;
} irig;

static void irig_open(irig *r, uint64_t seed, int32_t check_finite, int32_t top_t, uint64_t fill_seed)
{
    r->ctx = test_ctx_with(seed, check_finite, NULL);
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = D;
    p.n_modalities = IM;
    p.k = 2;
    p.top_t = top_t;
    r->imp = NULL;
    ck_assert_int_eq(confsmoe_imputer_create(r->ctx, &p, &r->imp), CONFSMOE_OK);
    r->h = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    r->out = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    r->slots = test_tensor(r->ctx, CONFSMOE_F32, 4, IM, IB, 2, D);
    r->avail = test_tensor(r->ctx, CONFSMOE_U8, 2, IB, IM, 0, 0);
    r->dh = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    r->dslots = test_tensor(r->ctx, CONFSMOE_F32, 4, IM, IB, 2, D);
    trng t = {fill_seed};
    fill_uniform(r->h, &t, -1, 1);
    fill_uniform(r->slots, &t, -1, 1);
    memset(u8(r->avail), 1, IB * IM);
    u8(r->avail)[0 * IM + 0] = 0; /* sample 0 misses modality 0 */
}

static void irig_close(irig *r)
{
    confsmoe_tensor *ts[] = {r->h, r->out, r->slots, r->avail, r->dh, r->dslots};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        confsmoe_tensor_destroy(ts[i]);
    confsmoe_imputer_destroy(r->imp);
    confsmoe_ctx_destroy(r->ctx);
}

START_TEST(test_checks_on_imputer)
{
    const float bad = bad_values[_i];
    irig r;
    irig_open(&r, 90, 1, 0, 3);
    f32(r.h)[1] = bad;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(r.imp, r.h, r.slots, r.avail, r.out, &s), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "imputer_forward");
    f32(r.h)[1] = 0.0f;
    f32(r.slots)[9] = bad;
    ck_assert_int_eq(confsmoe_imputer_forward(r.imp, r.h, r.slots, r.avail, r.out, &s), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "slots");
    f32(r.slots)[9] = 0.0f;
    ck_assert_int_eq(confsmoe_imputer_forward(r.imp, r.h, r.slots, r.avail, r.out, &s), CONFSMOE_OK);
    f32(r.out)[0] = bad;
    ck_assert_int_eq(confsmoe_imputer_backward(r.imp, s, r.out, NULL, NULL), CONFSMOE_E_NUMERIC);
    CK_MSG(r.ctx, "imputer_backward");
    confsmoe_saved_destroy(s);
    irig_close(&r);
}
END_TEST


/* ---------------------------------------------------------------- NaN / Inf, checks off */

/* check_finite = 0: the calls succeed, the bad token's values propagate, the routing indices
 * stay in range (a NaN logit never selects a non-expert), and tokens without a bad value keep
 * finite outputs (inference: no batch-level coupling). Training runs through backward. */
START_TEST(test_checks_off_gate)
{
    const float bad = bad_values[_i % 3];
    const int32_t router = routers[_i / 3];
    grig r;
    grig_open(&r, 0, router, CONFSMOE_COMBINE_CONFIDENCE, 2, CONFSMOE_LOAD_LOSS_CV, CONFSMOE_ROUTER_GRAD_SCORE,
              100 + (uint64_t)_i);
    f32(r.x)[0 * D + 1] = bad;  /* token 0 */
    ck_assert_int_eq(confsmoe_gate_forward(r.g, r.x, NULL, NULL, r.y, r.topk, r.slots, NULL, NULL), CONFSMOE_OK);
    check_topk_range(&r);
    ck_assert_msg(rows_finite(r.y, 1, N, D), "a clean token's output is not finite");
    ck_assert_msg(!rows_finite(r.y, 0, 1, D), "the bad token's output is finite: it did not propagate");
    /* Training: forward and backward succeed; the router was fed a bad value. */
    grig_train(&r);
    check_topk_range(&r);
    confsmoe_gate_stats st = {.struct_size = sizeof st};
    int64_t load[E];
    ck_assert_int_eq(confsmoe_gate_stats_get(r.g, CONFSMOE_STATS_TOTAL, &st, load, NULL, E), CONFSMOE_OK);
    int64_t slots = 0;
    for (int e = 0; e < E; e++)
        slots += load[e];
    ck_assert_int_eq(slots, 2 * N * 2);
    grig_close(&r);
}
END_TEST

START_TEST(test_checks_off_model)
{
    const float bad = bad_values[_i];
    mrig r;
    mrig_open(&r, 0, 110 + (uint64_t)_i);
    f32(r.in[0])[0] = bad;  /* sample 0 */
    ck_assert_int_eq(confsmoe_model_predict(r.model, (const confsmoe_tensor *const *)r.in, r.avail, r.logits),
                     CONFSMOE_OK);
    ck_assert_msg(rows_finite(r.logits, 1, B, C), "a clean sample's logits are not finite");
    ck_assert_msg(!rows_finite(r.logits, 0, 1, C), "the bad sample's logits are finite: it did not propagate");
    float loss = 0, task = 0;
    ck_assert_int_eq(mrig_step(&r, &loss, &task), CONFSMOE_OK);
    ck_assert(!isfinite(task));
    /* A bad pool row reaches only the samples that miss the modality. */
    f32(r.in[0])[0] = 0.5f;
    f32(r.pool[0])[0] = bad;
    ck_assert_int_eq(confsmoe_model_set_pool(r.model, 0, r.pool[0]), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_model_predict(r.model, (const confsmoe_tensor *const *)r.in, r.avail, r.logits),
                     CONFSMOE_OK);
    ck_assert(rows_finite(r.logits, 0, 1, C));
    ck_assert(rows_finite(r.logits, 2, B, C));
    mrig_close(&r);
}
END_TEST

START_TEST(test_checks_off_imputer)
{
    const float bad = bad_values[_i];
    irig r;
    irig_open(&r, 120, 0, 1, 4);
    /* A bad value in the slots of a present modality of sample 0: its attention scores are
     * non-finite. The top-T choice still picks valid tokens; sample 1 is untouched. */
    f32(r.slots)[(1 * IB + 0) * 2 * D + 3] = bad;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(r.imp, r.h, r.slots, r.avail, r.out, &s), CONFSMOE_OK);
    ck_assert(rows_finite(r.out, IM, 2 * IM, D));
    ck_assert_int_eq(confsmoe_imputer_backward(r.imp, s, r.out, r.dh, r.dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    irig_close(&r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("numerics");
    TCase *tc = tcase_create("huge");
    tcase_add_loop_test(tc, test_huge_router_logits, 0, 6);
    tcase_add_test(tc, test_huge_target_logits);
    tcase_add_loop_test(tc, test_huge_inputs, 0, 2);
    tcase_add_test(tc, test_model_huge_class_logits);
    tcase_add_test(tc, test_model_huge_inputs);
    suite_add_tcase(s, tc);
    tc = tcase_create("degenerate");
    tcase_add_test(tc, test_constant_layernorm_gate);
    tcase_add_test(tc, test_model_constant_layernorm);
    tcase_add_loop_test(tc, test_one_expert_takes_all, 0, 6);
    suite_add_tcase(s, tc);
    tc = tcase_create("nonfinite");
    tcase_add_loop_test(tc, test_checks_on_gate, 0, 3);
    tcase_add_loop_test(tc, test_checks_on_model, 0, 3);
    tcase_add_loop_test(tc, test_checks_on_imputer, 0, 3);
    tcase_add_loop_test(tc, test_checks_off_gate, 0, 9);
    tcase_add_loop_test(tc, test_checks_off_model, 0, 3);
    tcase_add_loop_test(tc, test_checks_off_imputer, 0, 3);
    suite_add_tcase(s, tc);
    return test_run(s);
}
