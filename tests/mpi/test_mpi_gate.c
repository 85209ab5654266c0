/* Expert parallelism (confsmoe_mpi_gate) against the single-process gate, on every rank:
 * each rank also builds the whole gate over all E experts from the same seed, runs it on
 * the whole global batch, and compares its own rows of y, topk, slots and dx, the global
 * loss, the gradients of the experts it owns and (after confsmoe_mpi_gate_allreduce_grads)
 * of the replicated parameters, and the global statistics. Two calls per configuration, so
 * that the ctx streams must also move together. Run with mpirun -np 2 and -np 3. */
#include "mpitest.h"

enum { D = 6, N = 41, C = 3, SEED = 5 };

typedef struct {
    const char *name;
    int32_t n_experts, k, combine, router, noisy, router_grad;
    int64_t hidden;
    int empty_rank0; /* rank 0 routes no tokens */
} config;

static const config configs[] = {
    {"confidence gate", 4, 2, CONFSMOE_COMBINE_CONFIDENCE, CONFSMOE_ROUTER_SOFTMAX, 0, CONFSMOE_ROUTER_GRAD_FROZEN, 0,
     0},
    {"confidence, noisy, score gradient, E=5", 5, 2, CONFSMOE_COMBINE_CONFIDENCE, CONFSMOE_ROUTER_SOFTMAX, 1,
     CONFSMOE_ROUTER_GRAD_SCORE, 12, 0},
    {"softmax combine, gaussian, noisy, k=3", 6, 3, CONFSMOE_COMBINE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_GAUSSIAN, 1,
     CONFSMOE_ROUTER_GRAD_FROZEN, 0, 0},
    {"confidence, trainable router, rank 0 without tokens", 4, 1, CONFSMOE_COMBINE_CONFIDENCE,
     CONFSMOE_ROUTER_LAPLACIAN, 0, CONFSMOE_ROUTER_GRAD_TRAINABLE, 0, 1},
};

static void params_of(const config *c, confsmoe_gate_params *p)
{
    confsmoe_gate_params_init(p);
    p->d = D;
    p->k = c->k;
    p->n_classes = C;
    p->combine = c->combine;
    p->router = c->router;
    p->noisy = c->noisy;
    p->router_grad = c->router_grad;
}

/* The whole gate of one process: E experts, then the gate, drawn from one seed. */
typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[8];
    confsmoe_gate *gate;
} whole_gate;

static void whole_open(const config *c, whole_gate *w)
{
    w->ctx = mt_ctx(SEED);
    for (int e = 0; e < c->n_experts; e++)
        MUST(confsmoe_expert_create(w->ctx, D, c->hidden ? c->hidden : D, &w->experts[e]), w->ctx);
    confsmoe_gate_params p;
    params_of(c, &p);
    MUST(confsmoe_gate_create(w->ctx, &p, w->experts, c->n_experts, &w->gate), w->ctx);
}

static void whole_close(const config *c, whole_gate *w)
{
    confsmoe_gate_destroy(w->gate);
    for (int e = 0; e < c->n_experts; e++)
        confsmoe_expert_destroy(w->experts[e]);
    confsmoe_ctx_destroy(w->ctx);
}

/* One global batch and the outputs of a call on rows first .. first + n - 1 of it. */
typedef struct {
    float x[N * D], dy[N * D], dslots[N * 3 * D];
    int32_t labels[N];
    uint8_t present[N];
    float y[N * D], slots[N * 3 * D], dx[N * D], loss;
    int32_t topk[N * 3];
} batch;

static void make_batch(batch *b, uint64_t seed)
{
    memset(b, 0, sizeof *b);
    for (int i = 0; i < N * D; i++) {
        b->x[i] = (float)mt_uniform(&seed, -1, 1);
        b->dy[i] = (float)mt_uniform(&seed, -1, 1);
    }
    for (int i = 0; i < N * 3 * D; i++)
        b->dslots[i] = (float)mt_uniform(&seed, -0.5, 0.5);
    for (int t = 0; t < N; t++) {
        b->labels[t] = (int32_t)(mt_uniform(&seed, 0, C));
        b->present[t] = mt_uniform(&seed, 0, 1) > 0.25;
    }
}

/* This rank's rows of the global batch. */
static void my_rows(const config *c, int64_t *first, int64_t *count)
{
    if (!c->empty_rank0 || mt_size == 1) {
        confsmoe_mpi_shard(N, mt_rank, mt_size, first, count);
        return;
    }
    if (mt_rank == 0) {
        *first = *count = 0;
        return;
    }
    confsmoe_mpi_shard(N, mt_rank - 1, mt_size - 1, first, count);
}

static void run_whole(const config *c, whole_gate *w, batch *b)
{
    confsmoe_ctx *ctx = w->ctx;
    const int64_t k = c->k;
    confsmoe_tensor *x = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, b->x), *lab = mt_wrap(ctx, CONFSMOE_I32, 1, N, 0, 0, b->labels);
    confsmoe_tensor *pr = mt_wrap(ctx, CONFSMOE_U8, 1, N, 0, 0, b->present), *y = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, b->y);
    confsmoe_tensor *tk = mt_wrap(ctx, CONFSMOE_I32, 2, N, k, 0, b->topk), *sl = mt_wrap(ctx, CONFSMOE_F32, 3, N, k, D, b->slots);
    confsmoe_tensor *dy = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, b->dy), *ds = mt_wrap(ctx, CONFSMOE_F32, 3, N, k, D, b->dslots);
    confsmoe_tensor *dx = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, b->dx);
    confsmoe_saved *saved = NULL;
    confsmoe_gate_zero_grad(w->gate);
    for (int e = 0; e < c->n_experts; e++)
        confsmoe_expert_zero_grad(w->experts[e]);
    MUST(confsmoe_gate_forward(w->gate, x, lab, pr, y, tk, sl, &b->loss, &saved), ctx);
    MUST(confsmoe_gate_backward(w->gate, saved, dy, ds, 1.0f, dx), ctx);
    confsmoe_saved_destroy(saved);
    confsmoe_tensor *all[] = {x, lab, pr, y, tk, sl, dy, ds, dx};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        confsmoe_tensor_destroy(all[i]);
}

static void run_shard(const config *c, confsmoe_ctx *ctx, confsmoe_mpi_gate *g, batch *b)
{
    int64_t first, n;
    my_rows(c, &first, &n);
    const int64_t k = c->k;
    confsmoe_tensor *x = mt_wrap(ctx, CONFSMOE_F32, 2, n, D, 0, b->x + first * D);
    confsmoe_tensor *lab = mt_wrap(ctx, CONFSMOE_I32, 1, n, 0, 0, b->labels + first);
    confsmoe_tensor *pr = mt_wrap(ctx, CONFSMOE_U8, 1, n, 0, 0, b->present + first);
    confsmoe_tensor *y = mt_wrap(ctx, CONFSMOE_F32, 2, n, D, 0, b->y + first * D);
    confsmoe_tensor *tk = mt_wrap(ctx, CONFSMOE_I32, 2, n, k, 0, b->topk + first * k);
    confsmoe_tensor *sl = mt_wrap(ctx, CONFSMOE_F32, 3, n, k, D, b->slots + first * k * D);
    confsmoe_tensor *dy = mt_wrap(ctx, CONFSMOE_F32, 2, n, D, 0, b->dy + first * D);
    confsmoe_tensor *ds = mt_wrap(ctx, CONFSMOE_F32, 3, n, k, D, b->dslots + first * k * D);
    confsmoe_tensor *dx = mt_wrap(ctx, CONFSMOE_F32, 2, n, D, 0, b->dx + first * D);
    confsmoe_gate_zero_grad(confsmoe_mpi_gate_local(g));
    for (int j = 0; j < confsmoe_mpi_gate_n_local_experts(g); j++)
        confsmoe_expert_zero_grad(confsmoe_mpi_gate_expert(g, j));
    confsmoe_mpi_saved *saved = NULL;
    MUST(confsmoe_mpi_gate_forward(g, x, lab, pr, y, tk, sl, &b->loss, &saved), ctx);
    MUST(confsmoe_mpi_gate_backward(g, saved, dy, ds, 1.0f, dx), ctx);
    confsmoe_mpi_saved_destroy(saved);
    MUST(confsmoe_mpi_gate_allreduce_grads(g), ctx);
    confsmoe_tensor *all[] = {x, lab, pr, y, tk, sl, dy, ds, dx};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        confsmoe_tensor_destroy(all[i]);
}

static void compare_stats(const config *c, whole_gate *w, confsmoe_mpi_gate *g)
{
    confsmoe_gate_stats want = {.struct_size = sizeof want}, got = {.struct_size = sizeof got};
    int64_t load_w[8], load_g[8];
    double conf_w[8], conf_g[8];
    const int E = c->n_experts;
    MUST(confsmoe_gate_stats_get(w->gate, CONFSMOE_STATS_TOTAL, &want, load_w, conf_w, E), w->ctx);
    MUST(confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, confsmoe_mpi_gate_local(g), CONFSMOE_STATS_TOTAL, &got, load_g,
                                     conf_g, E),
         NULL);
    EXPECT(got.tokens == want.tokens, "%s: tokens %lld, want %lld", c->name, (long long)got.tokens,
           (long long)want.tokens);
    for (int e = 0; e < E; e++) {
        EXPECT(load_g[e] == load_w[e], "%s: load of expert %d: %lld, want %lld", c->name, e, (long long)load_g[e],
               (long long)load_w[e]);
        EXPECT((isnan(conf_g[e]) && isnan(conf_w[e])) || fabs(conf_g[e] - conf_w[e]) <= 1e-6,
               "%s: mean confidence of expert %d: %g, want %g", c->name, e, conf_g[e], conf_w[e]);
    }
    EXPECT(fabs(got.load_entropy - want.load_entropy) <= 1e-12, "%s: load entropy %.15g, want %.15g", c->name,
           got.load_entropy, want.load_entropy);
    EXPECT(fabs(got.load_cv2 - want.load_cv2) <= 1e-12, "%s: CV^2", c->name);
    EXPECT(got.max_load_fraction == want.max_load_fraction, "%s: max load fraction", c->name);
}

static void check_config(const config *c)
{
    whole_gate w;
    whole_open(c, &w);
    confsmoe_ctx *ctx = mt_ctx(SEED);
    confsmoe_gate_params p;
    params_of(c, &p);
    confsmoe_mpi_gate *g = NULL;
    MUST(confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, c->n_experts, c->hidden, &g), ctx);
    const int first_expert = confsmoe_mpi_gate_first_expert(g), owned = confsmoe_mpi_gate_n_local_experts(g);
    int total_owned = owned;
    MPI_Allreduce(MPI_IN_PLACE, &total_owned, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    EXPECT(total_owned == c->n_experts, "%s: the ranks own %d experts, the gate has %d", c->name, total_owned,
           c->n_experts);
    EXPECT(owned >= c->n_experts / mt_size && owned <= c->n_experts / mt_size + 1, "%s: %d experts here", c->name,
           owned);
    for (int call = 0; call < 2; call++) {
        batch *want = calloc(1, sizeof *want), *got = calloc(1, sizeof *got);
        make_batch(want, 100 + (uint64_t)call);
        make_batch(got, 100 + (uint64_t)call);
        run_whole(c, &w, want);
        run_shard(c, ctx, g, got);
        int64_t first, n;
        my_rows(c, &first, &n);
        const int64_t k = c->k;
        EXPECT(memcmp(got->topk + first * k, want->topk + first * k, (size_t)(n * k) * sizeof(int32_t)) == 0,
               "%s, call %d: topk differs", c->name, call);
        expect_close("y", got->y + first * D, want->y + first * D, n * D, 2e-6);
        expect_close("slots", got->slots + first * k * D, want->slots + first * k * D, n * k * D, 2e-6);
        expect_close("dx", got->dx + first * D, want->dx + first * D, n * D, 2e-5);
        EXPECT(fabs(got->loss - want->loss) <= 1e-5 * fabs(want->loss) + 1e-7, "%s, call %d: loss %.8g, want %.8g",
               c->name, call, (double)got->loss, (double)want->loss);
        confsmoe_gate *local = confsmoe_mpi_gate_local(g);
        EXPECT(confsmoe_gate_n_params(local) == confsmoe_gate_n_params(w.gate), "%s: parameter count", c->name);
        for (int32_t i = 0; i < confsmoe_gate_n_params(local); i++) {
            confsmoe_tensor *pg = confsmoe_gate_grad(local, i), *pw = confsmoe_gate_grad(w.gate, i);
            expect_close(confsmoe_gate_param_name(local, i), confsmoe_tensor_data(pg), confsmoe_tensor_data(pw),
                         confsmoe_tensor_numel(pw), 2e-5);
            /* The replicated parameters start equal everywhere. */
            expect_close("replicated parameter", confsmoe_tensor_data(confsmoe_gate_param(local, i)),
                         confsmoe_tensor_data(confsmoe_gate_param(w.gate, i)), confsmoe_tensor_numel(pw), 0.0);
        }
        for (int j = 0; j < owned; j++) {
            confsmoe_expert *mine = confsmoe_mpi_gate_expert(g, j), *ref = w.experts[first_expert + j];
            for (int32_t i = 0; i < confsmoe_expert_n_params(ref); i++) {
                expect_close("expert weight", confsmoe_tensor_data(confsmoe_expert_param(mine, i)),
                             confsmoe_tensor_data(confsmoe_expert_param(ref, i)),
                             confsmoe_tensor_numel(confsmoe_expert_param(ref, i)), 0.0);
                expect_close(confsmoe_expert_param_name(ref, i), confsmoe_tensor_data(confsmoe_expert_grad(mine, i)),
                             confsmoe_tensor_data(confsmoe_expert_grad(ref, i)),
                             confsmoe_tensor_numel(confsmoe_expert_grad(ref, i)), 2e-5);
            }
        }
        free(want);
        free(got);
    }
    compare_stats(c, &w, g);
    confsmoe_mpi_gate_destroy(g);
    confsmoe_ctx_destroy(ctx);
    whole_close(c, &w);
}

static void check_errors(void)
{
    confsmoe_ctx *ctx = mt_ctx(SEED);
    confsmoe_gate_params p;
    params_of(&configs[0], &p);
    confsmoe_mpi_gate *g = (confsmoe_mpi_gate *)&p;
    EXPECT(confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, 0, 0, &g) == CONFSMOE_E_INVALID_ARGUMENT && !g,
           "0 experts accepted");
    EXPECT(confsmoe_mpi_gate_create(MPI_COMM_NULL, ctx, &p, 4, 0, &g) == CONFSMOE_E_INVALID_ARGUMENT,
           "MPI_COMM_NULL accepted");
    EXPECT(strstr(confsmoe_mpi_last_error(), "MPI_COMM_NULL") != NULL, "message: %s", confsmoe_mpi_last_error());
    p.compat = 1;
    const confsmoe_status s = confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, 4, 0, &g);
    if (mt_size > 1)
        EXPECT(s == CONFSMOE_E_UNSUPPORTED && strstr(confsmoe_mpi_last_error(), "compat"), "compat on %d ranks: %d",
               mt_size, (int)s);
    else
        confsmoe_mpi_gate_destroy(g);
    EXPECT(confsmoe_mpi_gate_backward(NULL, NULL, NULL, NULL, 1.0f, NULL) == CONFSMOE_E_INVALID_ARGUMENT, "NULL gate");
    confsmoe_ctx_destroy(ctx);
}

int main(int argc, char **argv)
{
    mt_init(&argc, &argv);
    for (size_t i = 0; i < sizeof configs / sizeof *configs; i++)
        check_config(&configs[i]);
    check_errors();
    return mt_finish("test_mpi_gate");
}
