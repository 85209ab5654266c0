/* The experimental hooks of data and expert parallelism, in one process (no MPI):
 * - confsmoe_model_step_shard: "ranks" (models of their own, built alike) each train on a
 *   shard of one global batch; their losses and gradients must add up to one model's step on
 *   the whole batch, step after step (so that the ctx streams also move alike);
 * - confsmoe_gate_set_shard: a shard of a noisy gate call sees the noise of its tokens'
 *   global indices;
 * - confsmoe_gate_create_exchange: a gate whose experts run behind an exchange (here, the
 *   experts run in-process through the public expert API) equals a gate over the experts. */
#define CONFSMOE_EXPERIMENTAL
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "testutil.h"

/* ------------------------------------------------------------------ model shards */

enum { M = 3, S = 2, B = 7, C = 3, MAX_RANKS = 4, SEED = 21 };

typedef struct {
    const char *name;
    int32_t gate, imputation, noisy, multilabel, compat, load_loss, router_grad;
    float dropout, modality_dropout;
} model_config;

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
} rank;

static const int64_t features[M] = {5, 3, 4};

static void rank_open(const model_config *c, rank *r)
{
    r->ctx = test_ctx(SEED);
    confsmoe_model_params p;
    test_model_params(&p, M, features, 8, C);
    p.tokens = S;
    p.gate = c->gate;
    p.imputation = c->imputation;
    p.noisy = c->noisy;
    p.multilabel = c->multilabel;
    p.compat = c->compat;
    p.load_loss = c->load_loss;
    p.router_grad = c->router_grad;
    p.dropout = c->dropout;
    p.modality_dropout = c->modality_dropout;
    p.draws = 2;
    ck_assert_int_eq(confsmoe_model_create(r->ctx, &p, &r->model), CONFSMOE_OK);
    trng g = {77};
    for (int32_t m = 0; m < M; m++) {
        confsmoe_tensor *pool = test_tensor(r->ctx, CONFSMOE_F32, 3, 6, S, features[m], 0);
        fill_uniform(pool, &g, -1, 1);
        ck_assert_int_eq(confsmoe_model_set_pool(r->model, m, pool), CONFSMOE_OK);
        confsmoe_tensor_destroy(pool);
    }
}

static void rank_close(rank *r)
{
    confsmoe_model_destroy(r->model);
    confsmoe_ctx_destroy(r->ctx);
}

/* One global batch: inputs, a mask with missing cells (each sample keeps one), labels. */
typedef struct {
    float *x[M];
    uint8_t avail[B * M];
    int32_t labels[B];
    uint8_t multi[B * C];
} global_batch;

static void make_batch(global_batch *g, uint64_t seed)
{
    trng r = {seed};
    for (int32_t m = 0; m < M; m++) {
        g->x[m] = xcalloc((size_t)(B * S * features[m]), sizeof(float));
        for (int64_t i = 0; i < B * S * features[m]; i++)
            g->x[m][i] = (float)trng_uniform(&r, -1, 1);
    }
    for (int64_t b = 0; b < B; b++) {
        for (int32_t m = 0; m < M; m++)
            g->avail[b * M + m] = m == b % M || trng_uniform(&r, 0, 1) > 0.4;
        g->labels[b] = (int32_t)(trng_u64(&r) % C);
        for (int32_t c = 0; c < C; c++)
            g->multi[b * C + c] = trng_uniform(&r, 0, 1) > 0.5;
    }
}

static void free_batch(global_batch *g)
{
    for (int32_t m = 0; m < M; m++)
        free(g->x[m]);
}

/* A step on samples first .. first + n - 1 (whole: confsmoe_model_step on all of them). */
static float step_rows(const model_config *c, rank *r, global_batch *g, int64_t first, int64_t n, bool whole)
{
    confsmoe_tensor *x[M], *avail, *labels, *global_avail;
    for (int32_t m = 0; m < M; m++) {
        const int64_t dims[3] = {n, S, features[m]};
        ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_F32, 3, dims, g->x[m] + first * S * features[m], &x[m]),
                         CONFSMOE_OK);
    }
    const int64_t ad[2] = {n, M}, gd[2] = {B, M}, ld[2] = {n, C};
    ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_U8, 2, ad, g->avail + first * M, &avail), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_U8, 2, gd, g->avail, &global_avail), CONFSMOE_OK);
    if (c->multilabel)
        ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_U8, 2, ld, g->multi + first * C, &labels), CONFSMOE_OK);
    else
        ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_I32, 1, &n, g->labels + first, &labels), CONFSMOE_OK);
    float loss = NAN, task = NAN;
    confsmoe_status s =
        whole ? confsmoe_model_step(r->model, (const confsmoe_tensor *const *)x, avail, labels, NULL, &loss, &task)
              : confsmoe_model_step_shard(r->model, (const confsmoe_tensor *const *)x, avail, labels, global_avail,
                                          first, NULL, &loss, &task);
    ck_assert_msg(s == CONFSMOE_OK, "%s: %s", c->name, confsmoe_ctx_last_error(r->ctx));
    ck_assert(task <= loss + 1e-6f || c->gate != CONFSMOE_MODEL_GATE_CONFIDENCE);
    for (int32_t m = 0; m < M; m++)
        confsmoe_tensor_destroy(x[m]);
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(global_avail);
    confsmoe_tensor_destroy(labels);
    return loss;
}

/* Sum over the ranks of every gradient element == the whole step's, to float rounding. */
static void check_gradients(const model_config *c, rank *whole, rank *ranks, int n_ranks, int step)
{
    const int32_t n = confsmoe_model_n_params(whole->model);
    int compared = 0;
    for (int32_t i = 0; i < n; i++) {
        confsmoe_tensor *want = confsmoe_model_grad(whole->model, i);
        const float *w = f32(want);
        double scale = 1e-3;
        for (int64_t j = 0; j < confsmoe_tensor_numel(want); j++)
            scale = fmax(scale, fabs(w[j]));
        for (int64_t j = 0; j < confsmoe_tensor_numel(want); j++) {
            double sum = 0.0;
            for (int k = 0; k < n_ranks; k++)
                sum += f32(confsmoe_model_grad(ranks[k].model, i))[j];
            ck_assert_msg(fabs(sum - w[j]) <= 2e-5 * scale + 1e-6 * fabs(w[j]),
                          "%s, step %d: %s[%lld]: shards sum to %.8g, the whole batch gives %.8g", c->name, step,
                          confsmoe_model_param_name(whole->model, i), (long long)j, sum, (double)w[j]);
            compared++;
        }
    }
    ck_assert_int_gt(compared, 100);
}

static const model_config model_configs[] = {
    {"trainer defaults: confidence, mean imputation, modality dropout 0.4, dropout 0.1",
     CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_MEAN, 0, 0, 0, CONFSMOE_LOAD_LOSS_NONE,
     CONFSMOE_ROUTER_GRAD_FROZEN, 0.1f, 0.4f},
    {"paper: confidence, two-stage, dropout 0.1", CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0, 0, 0,
     CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN, 0.1f, 0.0f},
    {"noisy, trainable router, two-stage, modality dropout 1", CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, 1, 0, 0, CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_SCORE, 0.1f, 1.0f},
    {"softmax gate, noisy, multi-label", CONFSMOE_MODEL_GATE_SOFTMAX, CONFSMOE_IMPUTE_TWO_STAGE, 1, 1, 0,
     CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN, 0.1f, 0.2f},
};
static const model_config compat_config = {"compat", CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0,
                                           0, 1, CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN, 0.1f, 0.0f};

/* Splits of the 7 samples over the ranks: {first of each rank ..., B}. An empty shard too. */
static const int64_t splits[][MAX_RANKS + 1] = {{0, 3, 3, 7}, {0, 1, 7}, {0, 2, 4, 6, 7}};
static const int split_ranks[] = {3, 2, 4};

START_TEST(test_shards_add_up)
{
    const model_config *c = &model_configs[_i];
    for (size_t sp = 0; sp < sizeof split_ranks / sizeof *split_ranks; sp++) {
        const int n_ranks = split_ranks[sp];
        rank whole, ranks[MAX_RANKS];
        rank_open(c, &whole);
        for (int k = 0; k < n_ranks; k++)
            rank_open(c, &ranks[k]);
        /* Three steps over different batches: the streams must stay together from step to step. */
        for (int step = 0; step < 3; step++) {
            global_batch g;
            make_batch(&g, 1000 + (uint64_t)step);
            confsmoe_model_zero_grad(whole.model);
            const float want = step_rows(c, &whole, &g, 0, B, true);
            double sum = 0.0;
            for (int k = 0; k < n_ranks; k++) {
                confsmoe_model_zero_grad(ranks[k].model);
                sum += step_rows(c, &ranks[k], &g, splits[sp][k], splits[sp][k + 1] - splits[sp][k], false);
            }
            ck_assert_msg(fabs(sum - want) <= 1e-5 * fabs(want) + 1e-6,
                          "%s, split %zu, step %d: shard losses sum to %.8g, the whole batch's is %.8g", c->name, sp,
                          step, sum, (double)want);
            check_gradients(c, &whole, ranks, n_ranks, step);
            free_batch(&g);
        }
        rank_close(&whole);
        for (int k = 0; k < n_ranks; k++)
            rank_close(&ranks[k]);
    }
}
END_TEST

/* A shard whose random draws would not depend on its place gives different losses at
 * different places: the same samples as shard {0..2} and as shard {4..6} of two batches. */
START_TEST(test_shard_draws_follow_the_global_index)
{
    const model_config *c = &model_configs[1];
    global_batch g;
    make_batch(&g, 5);
    /* Samples 4..6 copied onto 0..2: both shards hold the same inputs, masks and labels. */
    for (int32_t m = 0; m < M; m++)
        memcpy(g.x[m], g.x[m] + 4 * S * features[m], (size_t)(3 * S * features[m]) * sizeof(float));
    memcpy(g.avail, g.avail + 4 * M, 3 * M);
    memcpy(g.labels, g.labels + 4, 3 * sizeof(int32_t));
    rank a, b;
    rank_open(c, &a);
    rank_open(c, &b);
    const float at0 = step_rows(c, &a, &g, 0, 3, false), at4 = step_rows(c, &b, &g, 4, 3, false);
    ck_assert_msg(at0 != at4, "dropout and stage-1 draws do not depend on the samples' global index");
    rank_close(&a);
    rank_close(&b);
    free_batch(&g);
}
END_TEST

START_TEST(test_shard_errors)
{
    const model_config *c = &model_configs[0];
    rank r;
    rank_open(c, &r);
    global_batch g;
    make_batch(&g, 9);
    confsmoe_tensor *x[M];
    for (int32_t m = 0; m < M; m++) {
        const int64_t dims[3] = {2, S, features[m]};
        ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_F32, 3, dims, g.x[m], &x[m]), CONFSMOE_OK);
    }
    const int64_t ad[2] = {2, M}, gd[2] = {B, M}, n = 2;
    confsmoe_tensor *avail, *global_avail, *labels;
    ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_U8, 2, ad, g.avail, &avail), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_U8, 2, gd, g.avail, &global_avail), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_I32, 1, &n, g.labels, &labels), CONFSMOE_OK);
    const confsmoe_tensor *const *in = (const confsmoe_tensor *const *)x;
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, in, avail, labels, NULL, 0, NULL, NULL, NULL),
                     CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "global_avail is NULL"));
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, in, avail, labels, global_avail, 6, NULL, NULL, NULL),
                     CONFSMOE_E_SHAPE);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "outside the global batch of 7"));
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, in, avail, labels, global_avail, -1, NULL, NULL, NULL),
                     CONFSMOE_E_SHAPE);
    /* Rows 1..2 of the global mask differ from the shard's (rows 0..1) somewhere in this batch. */
    int64_t first = 1;
    while (first < B - 1 && memcmp(g.avail, g.avail + first * M, 2 * M) == 0)
        first++;
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, in, avail, labels, global_avail, first, NULL, NULL, NULL),
                     CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "avail differs from rows"));
    g.avail[6 * M] = 2;
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, in, avail, labels, global_avail, 0, NULL, NULL, NULL),
                     CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "global_avail[6][0] is 2"));
    g.avail[6 * M] = 1;
    ck_assert_int_eq(confsmoe_model_step_shard(NULL, in, avail, labels, global_avail, 0, NULL, NULL, NULL),
                     CONFSMOE_E_INVALID_ARGUMENT);
    /* The plain step still refuses an empty batch; a shard may be empty. */
    const int64_t zd[2] = {0, M}, z3[3] = {0, S, 0}, zero = 0;
    confsmoe_tensor *ex[M], *ea, *el;
    for (int32_t m = 0; m < M; m++) {
        const int64_t dims[3] = {0, z3[1], features[m]};
        ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_F32, 3, dims, NULL, &ex[m]), CONFSMOE_OK);
    }
    ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_U8, 2, zd, NULL, &ea), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_wrap(r.ctx, CONFSMOE_I32, 1, &zero, NULL, &el), CONFSMOE_OK);
    const confsmoe_tensor *const *ein = (const confsmoe_tensor *const *)ex;
    ck_assert_int_eq(confsmoe_model_step(r.model, ein, ea, el, NULL, NULL, NULL), CONFSMOE_E_SHAPE);
    float loss = NAN;
    ck_assert_int_eq(confsmoe_model_step_shard(r.model, ein, ea, el, global_avail, 7, NULL, &loss, NULL), CONFSMOE_OK);
    ck_assert(loss == 0.0f);
    /* compat's defects span the batch: a part of it is refused, the whole of it is a step. */
    rank cr;
    rank_open(&compat_config, &cr);
    ck_assert_int_eq(confsmoe_model_step_shard(cr.model, in, avail, labels, global_avail, 0, NULL, NULL, NULL),
                     CONFSMOE_E_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(cr.ctx), "compat"));
    ck_assert_int_eq(confsmoe_model_step_shard(cr.model, ein, ea, el, global_avail, 0, NULL, NULL, NULL), CONFSMOE_OK);
    rank_close(&cr);
    global_batch whole_batch;
    make_batch(&whole_batch, 9);
    rank cw;
    rank_open(&compat_config, &cw);
    step_rows(&compat_config, &cw, &whole_batch, 0, B, false);
    rank_close(&cw);
    free_batch(&whole_batch);
    for (int32_t m = 0; m < M; m++) {
        confsmoe_tensor_destroy(x[m]);
        confsmoe_tensor_destroy(ex[m]);
    }
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(global_avail);
    confsmoe_tensor_destroy(labels);
    confsmoe_tensor_destroy(ea);
    confsmoe_tensor_destroy(el);
    free_batch(&g);
    rank_close(&r);
}
END_TEST

/* ------------------------------------------------------------------ gate shards and exchange */

enum { D = 6, E = 4, K = 2, N = 40, GC = 3 };

typedef struct {
    const char *name;
    int32_t combine, router, noisy, compat, router_grad, load_loss;
} gate_config;

static const gate_config gate_configs[] = {
    {"confidence", CONFSMOE_COMBINE_CONFIDENCE, CONFSMOE_ROUTER_SOFTMAX, 0, 0, CONFSMOE_ROUTER_GRAD_FROZEN,
     CONFSMOE_LOAD_LOSS_NONE},
    {"confidence, noisy, score gradient", CONFSMOE_COMBINE_CONFIDENCE, CONFSMOE_ROUTER_SOFTMAX, 1, 0,
     CONFSMOE_ROUTER_GRAD_SCORE, CONFSMOE_LOAD_LOSS_CV},
    {"softmax combine, gaussian, noisy", CONFSMOE_COMBINE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_GAUSSIAN, 1, 0,
     CONFSMOE_ROUTER_GRAD_FROZEN, CONFSMOE_LOAD_LOSS_ENTROPY},
    {"confidence, compat", CONFSMOE_COMBINE_CONFIDENCE, CONFSMOE_ROUTER_SOFTMAX, 0, 1, CONFSMOE_ROUTER_GRAD_TRAINABLE,
     CONFSMOE_LOAD_LOSS_NONE},
};

static void gate_params(const gate_config *c, confsmoe_gate_params *p)
{
    confsmoe_gate_params_init(p);
    p->d = D;
    p->k = K;
    p->n_classes = GC;
    p->combine = c->combine;
    p->router = c->router;
    p->noisy = c->noisy;
    p->compat = c->compat;
    p->router_grad = c->router_grad;
    p->load_loss = c->load_loss;
}

/* An exchange that runs the experts here, through the public expert API, as a remote rank would. */
typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[E];
    int fail_forward, fail_backward;
    int live_calls, released;
} local_exchange;

typedef struct {
    confsmoe_saved *saved[E];
} local_call;

static confsmoe_status wrap_rows(confsmoe_ctx *ctx, const float *base, int64_t rows, confsmoe_tensor **out)
{
    const int64_t dims[2] = {rows, D};
    return confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, (void *)base, out);
}

static confsmoe_status local_forward(void *user, const int64_t *offset, const float *x, float *y, int32_t training,
                                     void **call, char *error, size_t cap)
{
    local_exchange *ex = user;
    if (ex->fail_forward) {
        snprintf(error, cap, "rank 1 is unreachable (test)");
        return CONFSMOE_E_COMM;
    }
    local_call *lc = training ? xcalloc(1, sizeof *lc) : NULL;
    for (int e = 0; e < E; e++) {
        confsmoe_tensor *xt, *yt;
        const int64_t rows = offset[e + 1] - offset[e];
        ck_assert_int_eq(wrap_rows(ex->ctx, x + offset[e] * D, rows, &xt), CONFSMOE_OK);
        ck_assert_int_eq(wrap_rows(ex->ctx, y + offset[e] * D, rows, &yt), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_expert_forward(ex->experts[e], xt, yt, lc ? &lc->saved[e] : NULL), CONFSMOE_OK);
        confsmoe_tensor_destroy(xt);
        confsmoe_tensor_destroy(yt);
    }
    *call = lc;
    ex->live_calls += lc != NULL;
    return CONFSMOE_OK;
}

static confsmoe_status local_backward(void *user, void *call, const int64_t *offset, const float *dy, float *dx,
                                      char *error, size_t cap)
{
    local_exchange *ex = user;
    if (ex->fail_backward) {
        snprintf(error, cap, "rank 2 went away (test)");
        return CONFSMOE_E_COMM;
    }
    local_call *lc = call;
    ck_assert_ptr_nonnull(lc);
    for (int e = 0; e < E; e++) {
        confsmoe_tensor *dyt, *dxt;
        const int64_t rows = offset[e + 1] - offset[e];
        ck_assert_int_eq(wrap_rows(ex->ctx, dy + offset[e] * D, rows, &dyt), CONFSMOE_OK);
        ck_assert_int_eq(wrap_rows(ex->ctx, dx + offset[e] * D, rows, &dxt), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_expert_backward(ex->experts[e], lc->saved[e], dyt, dxt), CONFSMOE_OK);
        confsmoe_tensor_destroy(dyt);
        confsmoe_tensor_destroy(dxt);
    }
    return CONFSMOE_OK;
}

static void local_release(void *user, void *call)
{
    local_exchange *ex = user;
    local_call *lc = call;
    for (int e = 0; e < E; e++)
        confsmoe_saved_destroy(lc->saved[e]);
    free(lc);
    ex->live_calls--;
    ex->released++;
}

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[E];
    confsmoe_gate *gate;
    local_exchange ex;
} gate_rig;

/* Experts then the gate, from one seed: with exchange, the gate's experts run behind it. */
static void rig_open(const gate_config *c, bool exchange, gate_rig *r)
{
    memset(r, 0, sizeof *r);
    r->ctx = test_ctx(SEED);
    for (int e = 0; e < E; e++)
        ck_assert_int_eq(confsmoe_expert_create(r->ctx, D, e == 1 ? 5 : 7, &r->experts[e]), CONFSMOE_OK);
    confsmoe_gate_params p;
    gate_params(c, &p);
    if (!exchange) {
        ck_assert_int_eq(confsmoe_gate_create(r->ctx, &p, r->experts, E, &r->gate), CONFSMOE_OK);
        return;
    }
    r->ex.ctx = r->ctx;
    memcpy(r->ex.experts, r->experts, sizeof r->experts);
    const confsmoe_gate_exchange x = {local_forward, local_backward, local_release, &r->ex};
    ck_assert_int_eq(confsmoe_gate_create_exchange(r->ctx, &p, E, &x, &r->gate), CONFSMOE_OK);
}

static void rig_close(gate_rig *r)
{
    ck_assert_int_eq(r->ex.live_calls, 0);
    confsmoe_gate_destroy(r->gate);
    for (int e = 0; e < E; e++)
        confsmoe_expert_destroy(r->experts[e]);
    confsmoe_ctx_destroy(r->ctx);
}

/* One call's inputs and outputs, on rows first .. first + n - 1 of a batch of N tokens. */
typedef struct {
    float x[N * D], dy[N * D], dslots[N * K * D];
    int32_t labels[N];
    uint8_t present[N];
    float y[N * D], slots[N * K * D], dx[N * D], loss;
    int32_t topk[N * K];
} gate_io;

static void make_io(gate_io *io, uint64_t seed)
{
    memset(io, 0, sizeof *io);
    trng r = {seed};
    for (int i = 0; i < N * D; i++) {
        io->x[i] = (float)trng_uniform(&r, -1, 1);
        io->dy[i] = (float)trng_uniform(&r, -1, 1);
    }
    for (int i = 0; i < N * K * D; i++)
        io->dslots[i] = (float)trng_uniform(&r, -0.5, 0.5);
    for (int t = 0; t < N; t++) {
        io->labels[t] = (int32_t)(trng_u64(&r) % GC);
        io->present[t] = trng_uniform(&r, 0, 1) > 0.2;
    }
}

static confsmoe_tensor *view(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t nd, int64_t d0, int64_t d1, int64_t d2,
                             void *data)
{
    const int64_t dims[3] = {d0, d1, d2};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, dt, nd, dims, data, &t), CONFSMOE_OK);
    return t;
}

/* Forward (training) and backward of rows first .. first + n - 1; returns the statuses. */
static confsmoe_status run_call(gate_rig *r, gate_io *io, int64_t first, int64_t n, float dloss,
                                confsmoe_status *backward)
{
    confsmoe_ctx *ctx = r->ctx;
    confsmoe_tensor *x = view(ctx, CONFSMOE_F32, 2, n, D, 0, io->x + first * D);
    confsmoe_tensor *lab = view(ctx, CONFSMOE_I32, 1, n, 0, 0, io->labels + first);
    confsmoe_tensor *pr = view(ctx, CONFSMOE_U8, 1, n, 0, 0, io->present + first);
    confsmoe_tensor *y = view(ctx, CONFSMOE_F32, 2, n, D, 0, io->y + first * D);
    confsmoe_tensor *tk = view(ctx, CONFSMOE_I32, 2, n, K, 0, io->topk + first * K);
    confsmoe_tensor *sl = view(ctx, CONFSMOE_F32, 3, n, K, D, io->slots + first * K * D);
    confsmoe_tensor *dy = view(ctx, CONFSMOE_F32, 2, n, D, 0, io->dy + first * D);
    confsmoe_tensor *ds = view(ctx, CONFSMOE_F32, 3, n, K, D, io->dslots + first * K * D);
    confsmoe_tensor *dx = view(ctx, CONFSMOE_F32, 2, n, D, 0, io->dx + first * D);
    confsmoe_saved *saved = NULL;
    confsmoe_status s = confsmoe_gate_forward(r->gate, x, lab, pr, y, tk, sl, &io->loss, &saved);
    *backward = s == CONFSMOE_OK ? confsmoe_gate_backward(r->gate, saved, dy, ds, dloss, dx) : s;
    confsmoe_saved_destroy(saved);
    confsmoe_tensor *all[] = {x, lab, pr, y, tk, sl, dy, ds, dx};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        confsmoe_tensor_destroy(all[i]);
    return s;
}

static void expect_close(const char *what, const float *got, const float *want, int64_t n, double tol)
{
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(fabs((double)got[i] - want[i]) <= tol * (1.0 + fabs(want[i])), "%s[%lld]: %.8g, want %.8g", what,
                      (long long)i, (double)got[i], (double)want[i]);
}

static void expect_same_grads(const char *name, gate_rig *a, gate_rig *b)
{
    for (int32_t i = 0; i < confsmoe_gate_n_params(a->gate); i++)
        expect_close(confsmoe_gate_param_name(a->gate, i), f32(confsmoe_gate_grad(a->gate, i)),
                     f32(confsmoe_gate_grad(b->gate, i)), confsmoe_tensor_numel(confsmoe_gate_grad(a->gate, i)), 1e-5);
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(a->experts[e]); i++)
            expect_close(name, f32(confsmoe_expert_grad(a->experts[e], i)), f32(confsmoe_expert_grad(b->experts[e], i)),
                         confsmoe_tensor_numel(confsmoe_expert_grad(a->experts[e], i)), 1e-5);
}

START_TEST(test_exchange_equals_local_experts)
{
    const gate_config *c = &gate_configs[_i];
    gate_rig plain, remote;
    rig_open(c, false, &plain);
    rig_open(c, true, &remote);
    for (int call = 0; call < 2; call++) {
        gate_io *want = xcalloc(1, sizeof *want), *got = xcalloc(1, sizeof *got);
        make_io(want, 40 + (uint64_t)call);
        make_io(got, 40 + (uint64_t)call);
        confsmoe_status bw, bg;
        ck_assert_int_eq(run_call(&plain, want, 0, N, 1.0f, &bw), CONFSMOE_OK);
        ck_assert_int_eq(bw, CONFSMOE_OK);
        ck_assert_int_eq(run_call(&remote, got, 0, N, 1.0f, &bg), CONFSMOE_OK);
        ck_assert_msg(bg == CONFSMOE_OK, "%s: %s", c->name, confsmoe_ctx_last_error(remote.ctx));
        ck_assert_int_eq(memcmp(got->topk, want->topk, sizeof got->topk), 0);
        expect_close("y", got->y, want->y, N * D, 1e-6);
        expect_close("slots", got->slots, want->slots, N * K * D, 1e-6);
        expect_close("dx", got->dx, want->dx, N * D, 1e-5);
        expect_close("loss", &got->loss, &want->loss, 1, 1e-6);
        expect_same_grads(c->name, &remote, &plain);
        free(want);
        free(got);
    }
    ck_assert_int_eq(remote.ex.released, 2);
    /* Inference keeps no state. */
    gate_io *io = xcalloc(1, sizeof *io);
    make_io(io, 3);
    confsmoe_tensor *x = view(remote.ctx, CONFSMOE_F32, 2, N, D, 0, io->x);
    confsmoe_tensor *y = view(remote.ctx, CONFSMOE_F32, 2, N, D, 0, io->y);
    ck_assert_int_eq(confsmoe_gate_forward(remote.gate, x, NULL, NULL, y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    ck_assert_int_eq(remote.ex.live_calls, 0);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    free(io);
    rig_close(&plain);
    rig_close(&remote);
}
END_TEST

START_TEST(test_exchange_failures)
{
    const gate_config *c = &gate_configs[1];
    gate_rig r;
    rig_open(c, true, &r);
    gate_io *io = xcalloc(1, sizeof *io), *again = xcalloc(1, sizeof *again);
    make_io(io, 8);
    make_io(again, 8);
    confsmoe_status bw;
    r.ex.fail_forward = 1;
    ck_assert_int_eq(run_call(&r, io, 0, N, 1.0f, &bw), CONFSMOE_E_COMM);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "gate_forward: the expert exchange failed"));
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "rank 1 is unreachable (test)"));
    ck_assert_int_eq(r.ex.live_calls, 0);
    /* The failed call drew nothing: a retry routes exactly as a first call would. */
    r.ex.fail_forward = 0;
    gate_rig fresh;
    rig_open(c, true, &fresh);
    ck_assert_int_eq(run_call(&r, io, 0, N, 1.0f, &bw), CONFSMOE_OK);
    ck_assert_int_eq(run_call(&fresh, again, 0, N, 1.0f, &bw), CONFSMOE_OK);
    expect_close("y after a failed call", io->y, again->y, N * D, 0.0);
    r.ex.fail_backward = 1;
    ck_assert_int_eq(run_call(&r, io, 0, N, 1.0f, &bw), CONFSMOE_OK);
    ck_assert_int_eq(bw, CONFSMOE_E_COMM);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "rank 2 went away (test)"));
    ck_assert_int_eq(r.ex.live_calls, 0);
    /* Creation checks the exchange. */
    confsmoe_gate_params p;
    gate_params(c, &p);
    confsmoe_gate *g = (confsmoe_gate *)&p;
    ck_assert_int_eq(confsmoe_gate_create_exchange(r.ctx, &p, E, NULL, &g), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(g);
    const confsmoe_gate_exchange half = {local_forward, NULL, local_release, &r.ex};
    ck_assert_int_eq(confsmoe_gate_create_exchange(r.ctx, &p, E, &half, &g), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "forward, backward and release"));
    ck_assert_int_eq(confsmoe_gate_create(r.ctx, &p, NULL, E, &g), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "experts is NULL"));
    free(io);
    free(again);
    rig_close(&r);
    rig_close(&fresh);
}
END_TEST

/* A shard of a noisy call equals those rows of the whole call, and the stream moves alike.
 * dloss is 0: each call normalises its own losses, and weighting the shards' loss gradients
 * into the whole call's is the distributed layer's job (libconfsmoe_mpi, tests/mpi). */
START_TEST(test_gate_shard_noise)
{
    const gate_config *c = &gate_configs[_i];
    const int64_t cuts[] = {0, 13, 13, 40};
    gate_rig whole, part[3];
    rig_open(c, false, &whole);
    for (int k = 0; k < 3; k++)
        rig_open(c, k == 1, &part[k]);
    for (int call = 0; call < 2; call++) {
        gate_io *want = xcalloc(1, sizeof *want), *got = xcalloc(1, sizeof *got);
        make_io(want, 60 + (uint64_t)call);
        make_io(got, 60 + (uint64_t)call);
        confsmoe_status bw;
        ck_assert_int_eq(run_call(&whole, want, 0, N, 0.0f, &bw), CONFSMOE_OK);
        for (int k = 0; k < 3; k++) {
            ck_assert_int_eq(confsmoe_gate_set_shard(part[k].gate, cuts[k], N), CONFSMOE_OK);
            ck_assert_int_eq(run_call(&part[k], got, cuts[k], cuts[k + 1] - cuts[k], 0.0f, &bw), CONFSMOE_OK);
        }
        ck_assert_int_eq(memcmp(got->topk, want->topk, sizeof got->topk), 0);
        expect_close("y of the shards", got->y, want->y, N * D, 1e-5);
        expect_close("dx of the shards", got->dx, want->dx, N * D, 1e-4);
        free(want);
        free(got);
    }
    /* Errors: first past total, and a call with more rows than the shard has room for. */
    ck_assert_int_eq(confsmoe_gate_set_shard(part[0].gate, 5, 4), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_set_shard(part[0].gate, -1, 4), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_set_shard(NULL, 0, 4), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_set_shard(part[0].gate, 30, N), CONFSMOE_OK);
    gate_io *io = xcalloc(1, sizeof *io);
    make_io(io, 1);
    confsmoe_status bw;
    ck_assert_int_eq(run_call(&part[0], io, 0, 11, 1.0f, &bw), CONFSMOE_E_SHAPE);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(part[0].ctx), "do not fit the shard's batch of 40"));
    ck_assert_int_eq(confsmoe_gate_set_shard(part[0].gate, 0, 0), CONFSMOE_OK);
    ck_assert_int_eq(run_call(&part[0], io, 0, 11, 1.0f, &bw), CONFSMOE_OK);
    free(io);
    rig_close(&whole);
    for (int k = 0; k < 3; k++)
        rig_close(&part[k]);
}
END_TEST

START_TEST(test_gate_shard_compat)
{
    gate_rig r;
    rig_open(&gate_configs[3], false, &r);
    gate_io *io = xcalloc(1, sizeof *io);
    make_io(io, 2);
    confsmoe_status bw;
    ck_assert_int_eq(confsmoe_gate_set_shard(r.gate, 10, N), CONFSMOE_OK);
    ck_assert_int_eq(run_call(&r, io, 10, 20, 1.0f, &bw), CONFSMOE_E_UNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(r.ctx), "compat dispatches slots across the whole batch"));
    ck_assert_int_eq(confsmoe_gate_set_shard(r.gate, 0, N), CONFSMOE_OK);
    ck_assert_int_eq(run_call(&r, io, 0, N, 1.0f, &bw), CONFSMOE_OK);
    free(io);
    rig_close(&r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("shard");
    TCase *tc = tcase_create("model");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_shards_add_up, 0, (int)(sizeof model_configs / sizeof *model_configs));
    tcase_add_test(tc, test_shard_draws_follow_the_global_index);
    tcase_add_test(tc, test_shard_errors);
    suite_add_tcase(s, tc);
    tc = tcase_create("gate");
    tcase_add_loop_test(tc, test_exchange_equals_local_experts, 0, (int)(sizeof gate_configs / sizeof *gate_configs));
    tcase_add_test(tc, test_exchange_failures);
    tcase_add_loop_test(tc, test_gate_shard_noise, 0, 3); /* not compat: see test_gate_shard_compat */
    tcase_add_test(tc, test_gate_shard_compat);
    suite_add_tcase(s, tc);
    return test_run(s);
}
