/* Fault injection across the whole API. A counting allocator (live blocks AND live
 * bytes) fails the n-th allocation of one operation, for every n = 1, 2, ... until
 * the operation succeeds. Each failing call must
 *   - return CONFSMOE_E_NOMEM and leave a fresh, non-empty "... memory ..." last error,
 *   - leak nothing (live blocks and bytes back to what they were before the call),
 *   - change no state (parameters, gradients, a previous checkpoint file; no temp files),
 *   - leave every object usable: the retry succeeds and everything it produces
 *     (outputs, losses, gradients, parameters, file bytes, and what a later backward
 *     or predict gives) is bit-identical to a run that never failed;
 * and after destroying everything zero blocks and zero bytes are live.
 * The number of fault points per operation is printed (docs/RELIABILITY.md). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define MAX_FAULTS 20000

/* ---------------------------------------------------------------- allocator */

typedef struct {
    long live;          /* blocks */
    size_t live_bytes;  /* bytes requested and not yet freed */
    long total;         /* allocation calls so far */
    long fail_at;       /* fail the allocation with this total (0 = never) */
    long fail_from;     /* fail every allocation from this total on (0 = never) */
    long failed;        /* allocations refused */
} falloc;

#define FA_MAGIC UINT64_C(0xc0f5a110c0f5a110)

/* Each block carries its size and alignment in front of the pointer it returns. */
static void *fa_alloc(void *user, size_t size, size_t alignment)
{
    falloc *a = user;
    a->total++;
    if ((a->fail_at > 0 && a->total == a->fail_at) || (a->fail_from > 0 && a->total >= a->fail_from)) {
        a->failed++;
        return NULL;
    }
    size_t pad = alignment < 32 ? 32 : alignment;
    if (size > SIZE_MAX - pad)
        return NULL;
    void *base = NULL;
    if (posix_memalign(&base, pad, pad + size) != 0)
        return NULL;
    unsigned char *p = (unsigned char *)base + pad;
    uint64_t hdr[3] = {FA_MAGIC, (uint64_t)size, (uint64_t)pad};
    memcpy(p - sizeof hdr, hdr, sizeof hdr);
    a->live++;
    a->live_bytes += size;
    return p;
}

static void fa_free(void *user, void *ptr)
{
    falloc *a = user;
    if (!ptr)
        return;
    unsigned char *p = ptr;
    uint64_t hdr[3];
    memcpy(hdr, p - sizeof hdr, sizeof hdr);
    ck_assert_msg(hdr[0] == FA_MAGIC, "free of a pointer this allocator did not return");
    hdr[0] = 0;
    memcpy(p - sizeof hdr, hdr, sizeof hdr);
    a->live--;
    a->live_bytes -= (size_t)hdr[1];
    free(p - hdr[2]);
}

/* ---------------------------------------------------------------- byte record */

/* A growable byte string (plain malloc, outside the counted allocator). */
typedef struct {
    unsigned char *b;
    size_t n, cap;
} rec;

static void rec_put(rec *r, const void *data, size_t n)
{
    if (r->n + n > r->cap) {
        size_t cap = r->cap ? r->cap : 1024;
        while (cap < r->n + n)
            cap *= 2;
        r->b = realloc(r->b, cap);
        ck_assert_ptr_nonnull(r->b);
        r->cap = cap;
    }
    if (n)
        memcpy(r->b + r->n, data, n);
    r->n += n;
}

static void rec_tensor(rec *r, confsmoe_tensor *t)
{
    if (t)
        rec_put(r, confsmoe_tensor_data(t), confsmoe_tensor_nbytes(t));
}

static void rec_file(rec *r, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        rec_put(r, "<missing>", 9);
        return;
    }
    unsigned char buf[4096];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0)
        rec_put(r, buf, got);
    fclose(f);
}

static void rec_free(rec *r)
{
    free(r->b);
    *r = (rec){0};
}

static int rec_same(const rec *a, const rec *b) { return a->n == b->n && (a->n == 0 || memcmp(a->b, b->b, a->n) == 0); }

/* ---------------------------------------------------------------- fixture */

enum { B = 4, N_TOK = 7, D = 6, H = 5, E = 3, K = 2, C = 3, M = 3, S = 2, MODEL_M = 2, POOL = 5 };
static const int64_t MODEL_F[MODEL_M] = {5, 3};

/* Everything any operation needs; teardown destroys whatever is not NULL. */
typedef struct {
    falloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    /* gate */
    confsmoe_expert *experts[E];
    confsmoe_gate *gate;
    confsmoe_tensor *x, *labels, *y, *topk, *slots, *dy, *dslots, *dx;
    float loss;
    confsmoe_saved *saved;
    /* imputer */
    confsmoe_imputer *imp;
    confsmoe_tensor *ih, *islots, *iavail, *iout, *idout, *idh, *idslots;
    /* model */
    confsmoe_model *model;
    confsmoe_optim *optim;
    confsmoe_tensor *in[MODEL_M], *pool[MODEL_M], *pool2, *avail, *mlabels, *logits;
    float task_loss;
    /* checkpoints */
    test_scratch scratch;
    rec previous;  /* the checkpoint file before the operation */
} fx;

static void fx_open(fx *f, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    f->hold = (confsmoe_allocator){fa_alloc, fa_free, &f->a};
    f->ctx = test_ctx_with(seed, 1, &f->hold);
}

static void fx_close(fx *f)
{
    confsmoe_saved_destroy(f->saved);
    confsmoe_gate_destroy(f->gate);
    for (int i = 0; i < E; i++)
        confsmoe_expert_destroy(f->experts[i]);
    confsmoe_imputer_destroy(f->imp);
    confsmoe_optim_destroy(f->optim);
    confsmoe_model_destroy(f->model);
    confsmoe_tensor *ts[] = {f->x,     f->labels, f->y,      f->topk,   f->slots,  f->dy,     f->dslots,
                             f->dx,    f->ih,     f->islots, f->iavail, f->iout,   f->idout,  f->idh,
                             f->idslots, f->in[0], f->in[1], f->pool[0], f->pool[1], f->pool2, f->avail,
                             f->mlabels, f->logits};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++)
        confsmoe_tensor_destroy(ts[i]);
    confsmoe_ctx_destroy(f->ctx);
    ck_assert_msg(f->a.live == 0 && f->a.live_bytes == 0, "after destroying everything: %ld blocks, %zu bytes live",
                  f->a.live, f->a.live_bytes);
    if (f->scratch.dir[0])
        test_rm_dir(f->scratch.dir);
    rec_free(&f->previous);
}

static void fill_seq(confsmoe_tensor *t, uint64_t seed, double lo, double hi)
{
    trng r = {seed};
    fill_uniform(t, &r, lo, hi);
}

/* ---- gate */

static void make_experts(fx *f)
{
    for (int i = 0; i < E; i++)
        ck_assert_int_eq(confsmoe_expert_create(f->ctx, D, H, &f->experts[i]), CONFSMOE_OK);
}

static confsmoe_status gate_create(fx *f)
{
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = D;
    p.k = K;
    p.noisy = 1;
    p.n_classes = C;
    p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
    p.load_loss = CONFSMOE_LOAD_LOSS_CV;
    f->gate = (confsmoe_gate *)(void *)f;  /* must be set to NULL on failure */
    confsmoe_status s = confsmoe_gate_create(f->ctx, &p, f->experts, E, &f->gate);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->gate);
    return s;
}

static void gate_tensors(fx *f)
{
    f->x = test_tensor(f->ctx, CONFSMOE_F32, 2, N_TOK, D, 0, 0);
    fill_seq(f->x, 11, -1.5, 1.5);
    f->labels = test_tensor(f->ctx, CONFSMOE_I32, 1, N_TOK, 0, 0, 0);
    for (int t = 0; t < N_TOK; t++)
        i32(f->labels)[t] = t % C;
    f->y = test_tensor(f->ctx, CONFSMOE_F32, 2, N_TOK, D, 0, 0);
    f->topk = test_tensor(f->ctx, CONFSMOE_I32, 2, N_TOK, K, 0, 0);
    f->slots = test_tensor(f->ctx, CONFSMOE_F32, 3, N_TOK, K, D, 0);
    f->dy = test_tensor(f->ctx, CONFSMOE_F32, 2, N_TOK, D, 0, 0);
    fill_seq(f->dy, 12, -1, 1);
    f->dslots = test_tensor(f->ctx, CONFSMOE_F32, 3, N_TOK, K, D, 0);
    fill_seq(f->dslots, 13, -0.5, 0.5);
    f->dx = test_tensor(f->ctx, CONFSMOE_F32, 2, N_TOK, D, 0, 0);
}

static void rec_gate_state(rec *r, fx *f)
{
    for (int i = 0; f->gate && i < confsmoe_gate_n_params(f->gate); i++) {
        rec_tensor(r, confsmoe_gate_param(f->gate, i));
        rec_tensor(r, confsmoe_gate_grad(f->gate, i));
    }
    for (int e = 0; e < E; e++)
        for (int i = 0; f->experts[e] && i < confsmoe_expert_n_params(f->experts[e]); i++) {
            rec_tensor(r, confsmoe_expert_param(f->experts[e], i));
            rec_tensor(r, confsmoe_expert_grad(f->experts[e], i));
        }
}

static confsmoe_status gate_fwd(fx *f)
{
    f->saved = (confsmoe_saved *)(void *)f;
    confsmoe_status s = confsmoe_gate_forward(f->gate, f->x, f->labels, NULL, f->y, f->topk, f->slots, &f->loss,
                                              &f->saved);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->saved);
    return s;
}

static confsmoe_status gate_fwd_inference(fx *f)
{
    return confsmoe_gate_forward(f->gate, f->x, NULL, NULL, f->y, f->topk, f->slots, &f->loss, NULL);
}

static confsmoe_status gate_bwd(fx *f)
{
    return confsmoe_gate_backward(f->gate, f->saved, f->dy, f->dslots, 1.0f, f->dx);
}

static void gate_outputs(rec *r, fx *f)
{
    rec_tensor(r, f->y);
    rec_tensor(r, f->topk);
    rec_tensor(r, f->slots);
    rec_put(r, &f->loss, sizeof f->loss);
}

static void setup_gate_create(fx *f) { make_experts(f); }
static void post_gate_create(rec *r, fx *f)
{
    rec_gate_state(r, f);
    gate_tensors(f);
    ck_assert_int_eq(gate_fwd(f), CONFSMOE_OK);
    ck_assert_int_eq(gate_bwd(f), CONFSMOE_OK);
    gate_outputs(r, f);
    rec_gate_state(r, f);
}

static void setup_gate_fwd(fx *f)
{
    make_experts(f);
    ck_assert_int_eq(gate_create(f), CONFSMOE_OK);
    gate_tensors(f);
}
static void post_gate_fwd(rec *r, fx *f)
{
    gate_outputs(r, f);
    ck_assert_int_eq(gate_bwd(f), CONFSMOE_OK);
    rec_tensor(r, f->dx);
    rec_gate_state(r, f);
    /* The RNG moved exactly as in a clean run: the next forward draws the same noise. */
    confsmoe_saved_destroy(f->saved);
    f->saved = NULL;
    ck_assert_int_eq(gate_fwd(f), CONFSMOE_OK);
    gate_outputs(r, f);
}
static void post_gate_fwd_inference(rec *r, fx *f)
{
    gate_outputs(r, f);
    confsmoe_gate_stats st = {.struct_size = sizeof st};
    int64_t load[E];
    ck_assert_int_eq(confsmoe_gate_stats_get(f->gate, CONFSMOE_STATS_TOTAL, &st, load, NULL, E), CONFSMOE_OK);
    rec_put(r, &st.tokens, sizeof st.tokens);
    rec_put(r, load, sizeof load);
}

static void setup_gate_bwd(fx *f)
{
    setup_gate_fwd(f);
    ck_assert_int_eq(gate_fwd(f), CONFSMOE_OK);
}
static void post_gate_bwd(rec *r, fx *f)
{
    rec_tensor(r, f->dx);
    rec_gate_state(r, f);
    /* The handle is consumed now. */
    ck_assert_int_eq(gate_bwd(f), CONFSMOE_E_STATE);
}

/* ---- imputer */

static confsmoe_status imp_create(fx *f)
{
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = D;
    p.n_modalities = M;
    p.tokens = S;
    p.k = K;
    p.separate_value = 1;
    p.top_t = 2;
    f->imp = (confsmoe_imputer *)(void *)f;
    confsmoe_status s = confsmoe_imputer_create(f->ctx, &p, &f->imp);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->imp);
    return s;
}

static void imp_tensors(fx *f)
{
    f->ih = test_tensor(f->ctx, CONFSMOE_F32, 3, B, M * S, D, 0);
    fill_seq(f->ih, 21, -1, 1);
    f->islots = test_tensor(f->ctx, CONFSMOE_F32, 4, M, B * S, K, D);
    fill_seq(f->islots, 22, -1, 1);
    f->iavail = test_tensor(f->ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    static const uint8_t av[B][M] = {{1, 1, 1}, {0, 1, 1}, {1, 0, 1}, {0, 1, 0}};
    memcpy(u8(f->iavail), av, sizeof av);
    f->iout = test_tensor(f->ctx, CONFSMOE_F32, 3, B, M * S, D, 0);
    f->idout = test_tensor(f->ctx, CONFSMOE_F32, 3, B, M * S, D, 0);
    fill_seq(f->idout, 23, -1, 1);
    f->idh = test_tensor(f->ctx, CONFSMOE_F32, 3, B, M * S, D, 0);
    f->idslots = test_tensor(f->ctx, CONFSMOE_F32, 4, M, B * S, K, D);
}

static void rec_imp_state(rec *r, fx *f)
{
    for (int i = 0; f->imp && i < confsmoe_imputer_n_params(f->imp); i++) {
        rec_tensor(r, confsmoe_imputer_param(f->imp, i));
        rec_tensor(r, confsmoe_imputer_grad(f->imp, i));
    }
}

static confsmoe_status imp_fwd(fx *f)
{
    f->saved = (confsmoe_saved *)(void *)f;
    confsmoe_status s = confsmoe_imputer_forward(f->imp, f->ih, f->islots, f->iavail, f->iout, &f->saved);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->saved);
    return s;
}

static confsmoe_status imp_bwd(fx *f)
{
    memset(confsmoe_tensor_data(f->idslots), 0, confsmoe_tensor_nbytes(f->idslots));
    return confsmoe_imputer_backward(f->imp, f->saved, f->idout, f->idh, f->idslots);
}

static void setup_imp_create(fx *f) { (void)f; }
static void post_imp_create(rec *r, fx *f)
{
    rec_imp_state(r, f);
    imp_tensors(f);
    ck_assert_int_eq(imp_fwd(f), CONFSMOE_OK);
    ck_assert_int_eq(imp_bwd(f), CONFSMOE_OK);
    rec_tensor(r, f->iout);
    rec_tensor(r, f->idh);
    rec_tensor(r, f->idslots);
    rec_imp_state(r, f);
}

static void setup_imp_fwd(fx *f)
{
    ck_assert_int_eq(imp_create(f), CONFSMOE_OK);
    imp_tensors(f);
}
static void post_imp_fwd(rec *r, fx *f)
{
    rec_tensor(r, f->iout);
    ck_assert_int_eq(imp_bwd(f), CONFSMOE_OK);
    rec_tensor(r, f->idh);
    rec_tensor(r, f->idslots);
    rec_imp_state(r, f);
}

static void setup_imp_bwd(fx *f)
{
    setup_imp_fwd(f);
    ck_assert_int_eq(imp_fwd(f), CONFSMOE_OK);
}
static void post_imp_bwd(rec *r, fx *f)
{
    rec_tensor(r, f->idh);
    rec_tensor(r, f->idslots);
    rec_imp_state(r, f);
    ck_assert_int_eq(imp_bwd(f), CONFSMOE_E_STATE);
}

/* ---- model, optimizer, checkpoints */

static confsmoe_status model_create(fx *f)
{
    confsmoe_model_params p;
    test_model_params(&p, MODEL_M, MODEL_F, 8, C);
    p.tokens = S;
    p.noisy = 1;
    p.draws = 2;
    p.separate_value = 1;
    f->model = (confsmoe_model *)(void *)f;
    confsmoe_status s = confsmoe_model_create(f->ctx, &p, &f->model);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->model);
    return s;
}

static void model_tensors(fx *f)
{
    for (int m = 0; m < MODEL_M; m++) {
        f->in[m] = test_tensor(f->ctx, CONFSMOE_F32, 3, B, S, MODEL_F[m], 0);
        fill_seq(f->in[m], 31 + (uint64_t)m, -1, 1);
        f->pool[m] = test_tensor(f->ctx, CONFSMOE_F32, 3, POOL, S, MODEL_F[m], 0);
        fill_seq(f->pool[m], 41 + (uint64_t)m, -1, 1);
    }
    f->pool2 = test_tensor(f->ctx, CONFSMOE_F32, 3, POOL + 2, S, MODEL_F[0], 0);
    fill_seq(f->pool2, 51, -2, 2);
    f->avail = test_tensor(f->ctx, CONFSMOE_U8, 2, B, MODEL_M, 0, 0);
    static const uint8_t av[B][MODEL_M] = {{1, 1}, {0, 1}, {1, 0}, {1, 1}};
    memcpy(u8(f->avail), av, sizeof av);
    f->mlabels = test_tensor(f->ctx, CONFSMOE_I32, 1, B, 0, 0, 0);
    for (int b = 0; b < B; b++)
        i32(f->mlabels)[b] = (b * 2) % C;
    f->logits = test_tensor(f->ctx, CONFSMOE_F32, 2, B, C, 0, 0);
}

static void rec_model_state(rec *r, fx *f)
{
    for (int i = 0; f->model && i < confsmoe_model_n_params(f->model); i++) {
        rec_tensor(r, confsmoe_model_param(f->model, i));
        rec_tensor(r, confsmoe_model_grad(f->model, i));
    }
    if (f->model) {
        /* The gate's accumulated utilisation statistics are state too. */
        confsmoe_gate_stats st = {.struct_size = sizeof st};
        int64_t load[4];
        ck_assert_int_eq(confsmoe_gate_stats_get(confsmoe_model_gate(f->model), CONFSMOE_STATS_TOTAL, &st, load, NULL, 4),
                         CONFSMOE_OK);
        rec_put(r, &st.tokens, sizeof st.tokens);
        rec_put(r, load, sizeof load);
    }
}

static confsmoe_status set_pools(fx *f)
{
    for (int m = 0; m < MODEL_M; m++) {
        confsmoe_status s = confsmoe_model_set_pool(f->model, m, f->pool[m]);
        if (s != CONFSMOE_OK)
            return s;
    }
    return CONFSMOE_OK;
}

static confsmoe_status model_step(fx *f)
{
    return confsmoe_model_step(f->model, (const confsmoe_tensor *const *)f->in, f->avail, f->mlabels, f->logits,
                               &f->loss, &f->task_loss);
}

static confsmoe_status model_predict(fx *f)
{
    return confsmoe_model_predict(f->model, (const confsmoe_tensor *const *)f->in, f->avail, f->logits);
}

static void rec_step(rec *r, fx *f)
{
    rec_tensor(r, f->logits);
    rec_put(r, &f->loss, sizeof f->loss);
    rec_put(r, &f->task_loss, sizeof f->task_loss);
}

/* After the operation, a step and a predict: bit-identical to a clean run. */
static void rec_model_followup(rec *r, fx *f)
{
    rec_model_state(r, f);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
    rec_step(r, f);
    rec_model_state(r, f);
    ck_assert_int_eq(model_predict(f), CONFSMOE_OK);
    rec_tensor(r, f->logits);
}

static void setup_model_create(fx *f) { (void)f; }
static void post_model_create(rec *r, fx *f)
{
    model_tensors(f);
    ck_assert_int_eq(set_pools(f), CONFSMOE_OK);
    rec_model_followup(r, f);
}

static void setup_model(fx *f)
{
    ck_assert_int_eq(model_create(f), CONFSMOE_OK);
    model_tensors(f);
}
static void setup_model_pools(fx *f)
{
    setup_model(f);
    ck_assert_int_eq(set_pools(f), CONFSMOE_OK);
}

/* set_pool of modality 1 for the first time (modality 0 already set). */
static void setup_set_pool_new(fx *f)
{
    setup_model(f);
    ck_assert_int_eq(confsmoe_model_set_pool(f->model, 0, f->pool[0]), CONFSMOE_OK);
}
static confsmoe_status op_set_pool_new(fx *f) { return confsmoe_model_set_pool(f->model, 1, f->pool[1]); }
/* set_pool replacing the pool of modality 0: a failure must keep the old one. */
static confsmoe_status op_set_pool_replace(fx *f) { return confsmoe_model_set_pool(f->model, 0, f->pool2); }
static void post_set_pool(rec *r, fx *f) { rec_model_followup(r, f); }

/* A second step: the workspace and the gate's arena are warm. */
static void setup_model_warm(fx *f)
{
    setup_model_pools(f);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
    ck_assert_int_eq(model_predict(f), CONFSMOE_OK);
}

static void post_model_step(rec *r, fx *f)
{
    rec_step(r, f);
    rec_model_followup(r, f);
}
static void post_model_predict(rec *r, fx *f)
{
    rec_tensor(r, f->logits);
    rec_model_followup(r, f);
}

static confsmoe_status optim_create(fx *f)
{
    confsmoe_optim_params p;
    confsmoe_optim_params_init(&p);
    p.lr = 1e-2f;
    p.weight_decay = 1e-3f;
    f->optim = (confsmoe_optim *)(void *)f;
    confsmoe_status s = confsmoe_optim_create(f->ctx, &p, &f->optim);
    if (s != CONFSMOE_OK)
        ck_assert_ptr_null(f->optim);
    return s;
}

static confsmoe_status optim_add_all(fx *f)
{
    for (int i = 0; i < confsmoe_model_n_params(f->model); i++) {
        confsmoe_status s = confsmoe_optim_add(f->optim, confsmoe_model_param(f->model, i),
                                               confsmoe_model_grad(f->model, i));
        if (s != CONFSMOE_OK)
            return s;
    }
    return CONFSMOE_OK;
}

static void setup_optim_create(fx *f)
{
    setup_model_pools(f);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
}
static void post_optim(rec *r, fx *f)
{
    for (int t = 0; t < 2; t++) {
        ck_assert_int_eq(confsmoe_optim_step(f->optim), CONFSMOE_OK);
        rec_model_state(r, f);
        confsmoe_model_zero_grad(f->model);
        ck_assert_int_eq(model_step(f), CONFSMOE_OK);
        rec_step(r, f);
    }
}
static void post_optim_create(rec *r, fx *f)
{
    ck_assert_int_eq(optim_add_all(f), CONFSMOE_OK);
    post_optim(r, f);
}

/* optim_add of parameter 16 when 16 are registered (the slot array grows): a failed add
 * leaves the optimizer as it was. */
enum { ADD_AT = 16 };
static void setup_optim_add(fx *f)
{
    setup_optim_create(f);
    ck_assert_int_eq(optim_create(f), CONFSMOE_OK);
    ck_assert_int_gt(confsmoe_model_n_params(f->model), ADD_AT);
    for (int i = 0; i < ADD_AT; i++)
        ck_assert_int_eq(confsmoe_optim_add(f->optim, confsmoe_model_param(f->model, i),
                                            confsmoe_model_grad(f->model, i)),
                         CONFSMOE_OK);
}
static confsmoe_status op_optim_add(fx *f)
{
    return confsmoe_optim_add(f->optim, confsmoe_model_param(f->model, ADD_AT), confsmoe_model_grad(f->model, ADD_AT));
}
static void post_optim_add(rec *r, fx *f)
{
    for (int i = ADD_AT + 1; i < confsmoe_model_n_params(f->model); i++)
        ck_assert_int_eq(confsmoe_optim_add(f->optim, confsmoe_model_param(f->model, i),
                                            confsmoe_model_grad(f->model, i)),
                         CONFSMOE_OK);
    /* Registering the same parameter twice is refused: the failed add did not register it. */
    ck_assert_int_eq(op_optim_add(f), CONFSMOE_E_INVALID_ARGUMENT);
    post_optim(r, f);
}

static void setup_optim_step(fx *f)
{
    setup_optim_create(f);
    ck_assert_int_eq(optim_create(f), CONFSMOE_OK);
    ck_assert_int_eq(optim_add_all(f), CONFSMOE_OK);
}
static confsmoe_status op_optim_step(fx *f) { return confsmoe_optim_step(f->optim); }
static void post_optim_step(rec *r, fx *f)
{
    rec_model_state(r, f);
    confsmoe_model_zero_grad(f->model);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
    post_optim(r, f);
}

/* A trained model and optimizer, a previous checkpoint at path, then one more step. */
static void setup_save(fx *f)
{
    setup_optim_step(f);
    ck_assert_int_eq(confsmoe_optim_step(f->optim), CONFSMOE_OK);
    test_scratch_open(&f->scratch, "faults");
    ck_assert_int_eq(confsmoe_checkpoint_save(f->model, f->optim, f->scratch.path), CONFSMOE_OK);
    rec_file(&f->previous, f->scratch.path);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(f->optim), CONFSMOE_OK);
}
static confsmoe_status op_save(fx *f) { return confsmoe_checkpoint_save(f->model, f->optim, f->scratch.path); }
static void fail_save(rec *r, fx *f)
{
    (void)r;
    rec now = {0};
    rec_file(&now, f->scratch.path);
    ck_assert_msg(rec_same(&now, &f->previous), "a failed save changed the file at the path");
    rec_free(&now);
    ck_assert_int_eq(test_temp_files(f->scratch.dir), 0);
}
static void post_save(rec *r, fx *f)
{
    rec_file(r, f->scratch.path);
    ck_assert_int_eq(test_temp_files(f->scratch.dir), 0);
}

/* A checkpoint at path, then the model and optimizer move on; load brings them back. */
static void setup_load(fx *f)
{
    setup_save(f);
    ck_assert_int_eq(confsmoe_checkpoint_save(f->model, f->optim, f->scratch.path), CONFSMOE_OK);
    ck_assert_int_eq(model_step(f), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(f->optim), CONFSMOE_OK);
}
static confsmoe_status op_load(fx *f) { return confsmoe_checkpoint_load(f->model, f->optim, f->scratch.path); }
static void post_load(rec *r, fx *f)
{
    rec_model_state(r, f);
    /* The optimizer state came back too: the next updates are those of a clean run. */
    post_optim(r, f);
}

/* ---------------------------------------------------------------- the loop */

typedef struct {
    const char *name;
    void (*setup)(fx *);
    confsmoe_status (*op)(fx *);
    void (*post)(rec *, fx *);       /* after success: what must be bit-identical */
    void (*on_fail)(rec *, fx *);    /* extra checks after a failure, or NULL */
    void (*state)(rec *, fx *);      /* what a failure must leave unchanged, or NULL */
    int may_keep;                    /* 1: a failure may keep a reusable block (the model's workspace
                                        cache, the optimizer's grown slot array), freed at destroy */
} scenario;

static void rec_all_state(rec *r, fx *f)
{
    rec_gate_state(r, f);
    rec_imp_state(r, f);
    rec_model_state(r, f);
}

static const scenario scenarios[] = {
    {"gate_create", setup_gate_create, gate_create, post_gate_create, NULL, rec_all_state, 0},
    {"gate_forward", setup_gate_fwd, gate_fwd, post_gate_fwd, NULL, rec_all_state, 0},
    {"gate_forward_inference", setup_gate_fwd, gate_fwd_inference, post_gate_fwd_inference, NULL, rec_all_state, 0},
    {"gate_backward", setup_gate_bwd, gate_bwd, post_gate_bwd, NULL, rec_all_state, 0},
    {"imputer_create", setup_imp_create, imp_create, post_imp_create, NULL, rec_all_state, 0},
    {"imputer_forward", setup_imp_fwd, imp_fwd, post_imp_fwd, NULL, rec_all_state, 0},
    {"imputer_backward", setup_imp_bwd, imp_bwd, post_imp_bwd, NULL, rec_all_state, 0},
    {"model_create", setup_model_create, model_create, post_model_create, NULL, rec_all_state, 0},
    {"model_set_pool_new", setup_set_pool_new, op_set_pool_new, post_set_pool, NULL, rec_all_state, 0},
    {"model_set_pool_replace", setup_model_pools, op_set_pool_replace, post_set_pool, NULL, rec_all_state, 0},
    {"model_step", setup_model_pools, model_step, post_model_step, NULL, rec_all_state, 1},
    {"model_step_warm", setup_model_warm, model_step, post_model_step, NULL, rec_all_state, 1},
    {"model_predict_warm", setup_model_warm, model_predict, post_model_predict, NULL, rec_all_state, 1},
    {"model_predict", setup_model_pools, model_predict, post_model_predict, NULL, rec_all_state, 1},
    {"optim_create", setup_optim_create, optim_create, post_optim_create, NULL, rec_all_state, 0},
    {"optim_add", setup_optim_add, op_optim_add, post_optim_add, NULL, rec_all_state, 1},
    {"optim_step", setup_optim_step, op_optim_step, post_optim_step, NULL, rec_all_state, 0},
    {"checkpoint_save", setup_save, op_save, post_save, fail_save, rec_all_state, 0},
    {"checkpoint_load", setup_load, op_load, post_load, NULL, rec_all_state, 0},
};
enum { N_SCENARIOS = sizeof scenarios / sizeof scenarios[0] };

/* A message no operation writes, to prove that a failure wrote its own. */
static void prime_last_error(fx *f)
{
    const int64_t dims[1] = {1};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(f->ctx, 99, 1, dims, &t), CONFSMOE_E_DTYPE);
}

static long fault_points[N_SCENARIOS];

START_TEST(test_faults)
{
    const scenario *sc = &scenarios[_i];
    const uint64_t seed = 1000 + (uint64_t)_i;

    /* The clean run. */
    rec want = {0};
    fx f;
    fx_open(&f, seed);
    sc->setup(&f);
    long before = f.a.total;
    ck_assert_msg(sc->op(&f) == CONFSMOE_OK, "%s: %s", sc->name, confsmoe_ctx_last_error(f.ctx));
    const long allocs = f.a.total - before;
    sc->post(&want, &f);
    fx_close(&f);

    long failures = 0, kept = 0;
    if (allocs == 0) {
        /* An operation that allocates nothing must also succeed with every allocation failing. */
        fx_open(&f, seed);
        sc->setup(&f);
        f.a.fail_from = f.a.total + 1;
        ck_assert_int_eq(sc->op(&f), CONFSMOE_OK);
        f.a.fail_from = 0;
        rec got = {0};
        sc->post(&got, &f);
        ck_assert(rec_same(&got, &want));
        rec_free(&got);
        rec_free(&want);
        fx_close(&f);
        printf("fault points: %-24s %5d (allocates nothing; succeeds with every allocation failing)\n", sc->name, 0);
        return;
    }
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "%s never succeeded", sc->name);
        fx_open(&f, seed);
        sc->setup(&f);
        rec st0 = {0}, st1 = {0}, got = {0};
        if (sc->state)
            sc->state(&st0, &f);
        prime_last_error(&f);
        const char *primed = confsmoe_ctx_last_error(f.ctx);
        char primed_copy[256];
        snprintf(primed_copy, sizeof primed_copy, "%s", primed);
        const long live = f.a.live;
        const size_t live_bytes = f.a.live_bytes;
        f.a.fail_at = f.a.total + n;
        f.a.failed = 0;
        confsmoe_status s = sc->op(&f);
        f.a.fail_at = 0;
        if (s == CONFSMOE_OK) {
            /* Either n is past the last allocation, or a best-effort allocation failed
             * (the directory sync after a save): the result must still be right. */
            sc->post(&got, &f);
            ck_assert_msg(rec_same(&got, &want), "%s: success with allocation %ld failed differs from a clean run",
                          sc->name, n);
            rec_free(&got);
            rec_free(&st0);
            fx_close(&f);
            if (f.a.failed == 0)
                break;
            continue;
        }
        failures++;
        const char *msg = confsmoe_ctx_last_error(f.ctx);
        ck_assert_msg(s == CONFSMOE_E_NOMEM, "%s: allocation %ld failed: status %d (%s)", sc->name, n, (int)s, msg);
        ck_assert_msg(msg[0] != '\0' && strcmp(msg, primed_copy) != 0, "%s: allocation %ld: no fresh last error",
                      sc->name, n);
        ck_assert_msg(strstr(msg, "memory") != NULL, "%s: allocation %ld: last error \"%s\" lacks \"memory\"",
                      sc->name, n, msg);
        if (sc->may_keep && f.a.live_bytes != live_bytes)
            kept++;
        else
            ck_assert_msg(f.a.live == live && f.a.live_bytes == live_bytes,
                      "%s: allocation %ld failed: %ld blocks, %ld bytes leaked (%s)", sc->name, n, f.a.live - live,
                      (long)(f.a.live_bytes - live_bytes), msg);
        if (sc->state) {
            sc->state(&st1, &f);
            ck_assert_msg(rec_same(&st0, &st1), "%s: allocation %ld failed but the state changed", sc->name, n);
        }
        if (sc->on_fail)
            sc->on_fail(&got, &f);
        /* The retry succeeds and gives exactly the clean result. */
        s = sc->op(&f);
        ck_assert_msg(s == CONFSMOE_OK, "%s: retry after allocation %ld failed: %s", sc->name, n,
                      confsmoe_ctx_last_error(f.ctx));
        sc->post(&got, &f);
        ck_assert_msg(rec_same(&got, &want), "%s: retry after allocation %ld failed differs from a clean run",
                      sc->name, n);
        rec_free(&got);
        rec_free(&st0);
        rec_free(&st1);
        fx_close(&f);
    }
    rec_free(&want);
    ck_assert_msg(failures >= 1, "%s allocated nothing", sc->name);
    fault_points[_i] = failures;
    printf("fault points: %-24s %5ld (of %ld allocations in a clean call; %ld kept a reusable block)\n", sc->name,
           failures, allocs, kept);
    fflush(stdout);
}
END_TEST

/* Also on a ctx that fails EVERY allocation from the call on: one clean error each. */
START_TEST(test_all_fail)
{
    const scenario *sc = &scenarios[_i];
    fx f;
    fx_open(&f, 7);
    sc->setup(&f);
    const long live = f.a.live;
    const size_t bytes = f.a.live_bytes;
    for (int rep = 0; rep < 3 && sc->op != op_optim_step; rep++) {
        f.a.fail_from = f.a.total + 1;
        confsmoe_status s = sc->op(&f);
        f.a.fail_from = 0;
        ck_assert_int_eq(s, CONFSMOE_E_NOMEM);
        ck_assert(sc->may_keep || (f.a.live == live && f.a.live_bytes == bytes));
    }
    ck_assert_int_eq(sc->op(&f), CONFSMOE_OK);
    rec r = {0};
    sc->post(&r, &f);
    rec_free(&r);
    fx_close(&f);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("faults");
    TCase *tc = tcase_create("every allocation");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_faults, 0, N_SCENARIOS);
    tcase_add_loop_test(tc, test_all_fail, 0, N_SCENARIOS);
    suite_add_tcase(s, tc);
    return test_run(s);
}
