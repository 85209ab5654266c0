/* Data parallelism (confsmoe_mpi_dp) against one process, on every rank: each rank also
 * trains a whole model from the same seed on the whole global batches. After every step the
 * global losses and the gradients must be the whole model's, and after every SGD step the
 * parameters the same on all ranks (bit for bit) and the whole model's (to float rounding).
 * Also: the parameters come from rank 0, gradients accumulate like confsmoe_model_step's,
 * an empty shard, the number of MPI_Allreduce calls (counted through the MPI profiling
 * interface), and the global gate statistics. Run with mpirun -np 1 and -np 2. */
#include "mpitest.h"

enum { M = 3, S = 2, C = 3, MAX_B = 9, SEED = 31 };
static const int64_t features[M] = {5, 3, 4};

/* Every MPI_Allreduce of the process goes through here (PMPI): the library's count. */
static long allreduce_calls;
int MPI_Allreduce(const void *sendbuf, void *recvbuf, int count, MPI_Datatype type, MPI_Op op, MPI_Comm comm)
{
    allreduce_calls++;
    return PMPI_Allreduce(sendbuf, recvbuf, count, type, op, comm);
}

typedef struct {
    const char *name;
    int32_t imputation, noisy;
    float dropout, modality_dropout;
} config;

static const config configs[] = {
    {"trainer defaults: mean imputation, modality dropout 0.4, dropout 0.1", CONFSMOE_IMPUTE_MEAN, 0, 0.1f, 0.4f},
    {"paper: two-stage, dropout 0.1", CONFSMOE_IMPUTE_TWO_STAGE, 0, 0.1f, 0.0f},
    {"noisy gate, two-stage, modality dropout 0.3", CONFSMOE_IMPUTE_TWO_STAGE, 1, 0.1f, 0.3f},
};

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_optim *optim;
} trainer;

static void trainer_open(const config *c, trainer *t)
{
    t->ctx = mt_ctx(SEED);
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    p.n_modalities = M;
    p.features = features;
    p.tokens = S;
    p.d = 8;
    p.heads = 2;
    p.n_experts = 4;
    p.k = 2;
    p.n_classes = C;
    p.imputation = c->imputation;
    p.noisy = c->noisy;
    p.dropout = c->dropout;
    p.modality_dropout = c->modality_dropout;
    p.draws = 2;
    MUST(confsmoe_model_create(t->ctx, &p, &t->model), t->ctx);
    uint64_t g = 77;
    for (int32_t m = 0; m < M; m++) {
        float pool[6 * S * 5];
        for (int64_t i = 0; i < 6 * S * features[m]; i++)
            pool[i] = (float)mt_uniform(&g, -1, 1);
        confsmoe_tensor *tp = mt_wrap(t->ctx, CONFSMOE_F32, 3, 6, S, features[m], pool);
        MUST(confsmoe_model_set_pool(t->model, m, tp), t->ctx);
        confsmoe_tensor_destroy(tp);
    }
    /* SGD, not Adam: Adam scales each step to about lr whatever the gradient's size, so
     * parameters whose gradient is zero but for rounding (the attention's key bias) would move
     * by +-lr on the sign of rounding noise. SGD moves them by lr times the gradient. */
    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.kind = CONFSMOE_OPTIM_SGD;
    op.lr = 0.1f;
    MUST(confsmoe_optim_create(t->ctx, &op, &t->optim), t->ctx);
    for (int32_t i = 0; i < confsmoe_model_n_params(t->model); i++)
        MUST(confsmoe_optim_add(t->optim, confsmoe_model_param(t->model, i), confsmoe_model_grad(t->model, i)), t->ctx);
}

static void trainer_close(trainer *t)
{
    confsmoe_optim_destroy(t->optim);
    confsmoe_model_destroy(t->model);
    confsmoe_ctx_destroy(t->ctx);
}

typedef struct {
    int64_t B;
    float x[M][MAX_B * S * 5];
    uint8_t avail[MAX_B * M];
    int32_t labels[MAX_B];
} batch;

static void make_batch(batch *b, int64_t B, uint64_t seed)
{
    b->B = B;
    for (int32_t m = 0; m < M; m++)
        for (int64_t i = 0; i < B * S * features[m]; i++)
            b->x[m][i] = (float)mt_uniform(&seed, -1, 1);
    for (int64_t s = 0; s < B; s++) {
        for (int32_t m = 0; m < M; m++)
            b->avail[s * M + m] = m == s % M || mt_uniform(&seed, 0, 1) > 0.4;
        b->labels[s] = (int32_t)mt_uniform(&seed, 0, C);
    }
}

/* A step on samples first .. first + n - 1: the whole model's (dp NULL) or this rank's shard. */
static void step(trainer *t, confsmoe_mpi_dp *dp, batch *b, int64_t first, int64_t n, float *loss, float *task)
{
    confsmoe_tensor *x[M];
    for (int32_t m = 0; m < M; m++)
        x[m] = mt_wrap(t->ctx, CONFSMOE_F32, 3, n, S, features[m], b->x[m] + first * S * features[m]);
    confsmoe_tensor *avail = mt_wrap(t->ctx, CONFSMOE_U8, 2, n, M, 0, b->avail + first * M);
    confsmoe_tensor *global = mt_wrap(t->ctx, CONFSMOE_U8, 2, b->B, M, 0, b->avail);
    confsmoe_tensor *labels = mt_wrap(t->ctx, CONFSMOE_I32, 1, n, 0, 0, b->labels + first);
    const confsmoe_tensor *const *in = (const confsmoe_tensor *const *)x;
    if (dp)
        MUST(confsmoe_mpi_dp_step(dp, in, avail, labels, global, first, NULL, loss, task), t->ctx);
    else
        MUST(confsmoe_model_step(t->model, in, avail, labels, NULL, loss, task), t->ctx);
    for (int32_t m = 0; m < M; m++)
        confsmoe_tensor_destroy(x[m]);
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(global);
    confsmoe_tensor_destroy(labels);
}

static void compare_tensors(const char *what, const config *c, confsmoe_model *got, confsmoe_model *want, bool grads,
                            double tol)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(want); i++) {
        confsmoe_tensor *g = grads ? confsmoe_model_grad(got, i) : confsmoe_model_param(got, i);
        confsmoe_tensor *w = grads ? confsmoe_model_grad(want, i) : confsmoe_model_param(want, i);
        const float *gv = confsmoe_tensor_data(g), *wv = confsmoe_tensor_data(w);
        double scale = 1e-3;
        for (int64_t j = 0; j < confsmoe_tensor_numel(w); j++)
            scale = fmax(scale, fabs(wv[j]));
        for (int64_t j = 0; j < confsmoe_tensor_numel(w); j++)
            EXPECT(fabs((double)gv[j] - wv[j]) <= tol * scale, "%s, %s: %s[%lld]: %.8g, one process %.8g", c->name,
                   what, confsmoe_model_param_name(want, i), (long long)j, (double)gv[j], (double)wv[j]);
    }
}

/* The parameters are the same bits on every rank. */
static void expect_same_everywhere(const config *c, confsmoe_model *model)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++) {
        confsmoe_tensor *t = confsmoe_model_param(model, i);
        const int n = (int)confsmoe_tensor_numel(t);
        float *lo = malloc((size_t)n * sizeof *lo + 1), *hi = malloc((size_t)n * sizeof *hi + 1);
        PMPI_Allreduce(confsmoe_tensor_data(t), lo, n, MPI_FLOAT, MPI_MIN, MPI_COMM_WORLD);
        PMPI_Allreduce(confsmoe_tensor_data(t), hi, n, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
        EXPECT(memcmp(lo, hi, (size_t)n * sizeof *lo) == 0, "%s: %s differs between ranks", c->name,
               confsmoe_model_param_name(model, i));
        free(lo);
        free(hi);
    }
}

static void check_config(const config *c)
{
    trainer whole, mine;
    trainer_open(c, &whole);
    trainer_open(c, &mine);
    /* Rank 0's parameters win: another rank's copy starts perturbed. */
    if (mt_rank > 0)
        ((float *)confsmoe_tensor_data(confsmoe_model_param(mine.model, 0)))[0] += 1.0f;
    confsmoe_mpi_dp *dp = NULL;
    MUST(confsmoe_mpi_dp_create(MPI_COMM_WORLD, mine.model, 0, &dp), mine.ctx);
    compare_tensors("parameters after create", c, mine.model, whole.model, false, 0.0);
    /* Batches of 9 (uneven shards), then of 1 (a rank with nothing to do when P > 1). */
    const int64_t sizes[] = {9, 9, 1, 7};
    for (int s = 0; s < 4; s++) {
        batch *b = calloc(1, sizeof *b);
        make_batch(b, sizes[s], 500 + (uint64_t)s);
        int64_t first, n;
        confsmoe_mpi_shard(b->B, mt_rank, mt_size, &first, &n);
        float lw = 0, tw = 0, lm = 0, tm = 0;
        confsmoe_model_zero_grad(whole.model);
        confsmoe_model_zero_grad(mine.model);
        step(&whole, NULL, b, 0, b->B, &lw, &tw);
        step(&mine, dp, b, first, n, &lm, &tm);
        EXPECT(fabs(lm - lw) <= 1e-5 * fabs(lw), "%s, step %d: loss %.8g, one process %.8g", c->name, s, (double)lm,
               (double)lw);
        EXPECT(fabs(tm - tw) <= 1e-5 * fabs(tw), "%s, step %d: task loss %.8g, one process %.8g", c->name, s,
               (double)tm, (double)tw);
        compare_tensors("gradients", c, mine.model, whole.model, true, 2e-5);
        MUST(confsmoe_optim_step(whole.optim), whole.ctx);
        MUST(confsmoe_optim_step(mine.optim), mine.ctx);
        expect_same_everywhere(c, mine.model);
        compare_tensors("parameters", c, mine.model, whole.model, false, 1e-5);
        free(b);
    }
    /* Gradients accumulate across steps without zeroing, as with confsmoe_model_step. */
    batch *b = calloc(1, sizeof *b);
    make_batch(b, 8, 900);
    int64_t first, n;
    confsmoe_mpi_shard(b->B, mt_rank, mt_size, &first, &n);
    confsmoe_model_zero_grad(whole.model);
    confsmoe_model_zero_grad(mine.model);
    confsmoe_gate_stats_reset(confsmoe_model_gate(whole.model));
    confsmoe_gate_stats_reset(confsmoe_model_gate(mine.model));
    float l, t;
    for (int r = 0; r < 2; r++) {
        step(&whole, NULL, b, 0, b->B, &l, &t);
        step(&mine, dp, b, first, n, &l, &t);
    }
    compare_tensors("accumulated gradients", c, mine.model, whole.model, true, 4e-5);
    /* The global statistics of the two steps are the whole model's. */
    confsmoe_gate_stats got = {.struct_size = sizeof got}, want = {.struct_size = sizeof want};
    int64_t load_g[4], load_w[4];
    MUST(confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, confsmoe_model_gate(mine.model), CONFSMOE_STATS_TOTAL, &got,
                                     load_g, NULL, 4),
         mine.ctx);
    MUST(confsmoe_gate_stats_get(confsmoe_model_gate(whole.model), CONFSMOE_STATS_TOTAL, &want, load_w, NULL, 4),
         whole.ctx);
    EXPECT(got.tokens == want.tokens && memcmp(load_g, load_w, sizeof load_g) == 0,
           "%s: global statistics: %lld tokens, loads %lld %lld %lld %lld; one process %lld tokens", c->name,
           (long long)got.tokens, (long long)load_g[0], (long long)load_g[1], (long long)load_g[2],
           (long long)load_g[3], (long long)want.tokens);
    EXPECT(fabs(got.load_entropy - want.load_entropy) < 1e-12, "%s: load entropy", c->name);
    free(b);
    confsmoe_mpi_dp_destroy(dp);
    trainer_close(&whole);
    trainer_close(&mine);
}

/* The gradients of every parameter tensor go in ceil(bytes / bucket) calls, plus one for the losses. */
static void check_buckets(void)
{
    const config *c = &configs[0];
    const size_t buckets[] = {0, 4096, 1 << 20};
    for (size_t i = 0; i < sizeof buckets / sizeof *buckets; i++) {
        trainer t;
        trainer_open(c, &t);
        size_t bytes = 0;
        const int32_t tensors = confsmoe_model_n_params(t.model);
        for (int32_t j = 0; j < tensors; j++)
            bytes += confsmoe_tensor_nbytes(confsmoe_model_grad(t.model, j));
        confsmoe_mpi_dp *dp = NULL;
        MUST(confsmoe_mpi_dp_create(MPI_COMM_WORLD, t.model, buckets[i], &dp), t.ctx);
        batch *b = calloc(1, sizeof *b);
        make_batch(b, 6, 7);
        int64_t first, n;
        confsmoe_mpi_shard(b->B, mt_rank, mt_size, &first, &n);
        float l, task;
        const long before = allreduce_calls;
        step(&t, dp, b, first, n, &l, &task);
        const long calls = allreduce_calls - before;
        const size_t bucket = buckets[i] ? buckets[i] : (size_t)16 << 20;
        const long want = (long)((bytes + bucket - 1) / bucket) + 1;
        EXPECT(calls == want, "bucket %zu B: %ld MPI_Allreduce calls for %d tensors (%zu B), want %ld", bucket, calls,
               (int)tensors, bytes, want);
        EXPECT(calls < tensors, "one call per tensor or more (%ld calls, %d tensors)", calls, (int)tensors);
        if (mt_rank == 0)
            printf("bucket %zu B: %d gradient tensors, %zu B, %ld MPI_Allreduce calls per step\n", bucket,
                   (int)tensors, bytes, calls);
        free(b);
        confsmoe_mpi_dp_destroy(dp);
        trainer_close(&t);
    }
}

int main(int argc, char **argv)
{
    mt_init(&argc, &argv);
    for (size_t i = 0; i < sizeof configs / sizeof *configs; i++)
        check_config(&configs[i]);
    check_buckets();
    return mt_finish("test_mpi_dp");
}
