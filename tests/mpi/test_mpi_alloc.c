/* A host allocator (confsmoe_ctx_params.allocator) sees libconfsmoe_mpi's memory: the blocks of
 * confsmoe_mpi_dp and confsmoe_mpi_gate, their per-call state and the statistics' scratch come
 * from the ctx's allocator, and all of it goes back through it, whatever the order of destruction.
 * Each figure is compared with what libconfsmoe alone allocates for the same calls. Run with
 * mpirun -np 2. */
#include <stdatomic.h>

#include "mpitest.h"

/* ------------------------------------------------------------------ a counting allocator */

#define HEADER 64 /* each block's size is kept in front of it; also the largest alignment served */

typedef struct {
    atomic_long calls, live_blocks, live_bytes, misaligned;
} counts;

static void *count_alloc(void *user, size_t size, size_t alignment)
{
    counts *c = user;
    void *base = NULL;
    if (alignment > HEADER)
        atomic_fetch_add(&c->misaligned, 1);
    if (posix_memalign(&base, HEADER, HEADER + size) != 0)
        return NULL;
    *(size_t *)base = size;
    atomic_fetch_add(&c->calls, 1);
    atomic_fetch_add(&c->live_blocks, 1);
    atomic_fetch_add(&c->live_bytes, (long)size);
    return (char *)base + HEADER;
}

static void count_free(void *user, void *ptr)
{
    counts *c = user;
    if (!ptr)
        return;
    void *base = (char *)ptr - HEADER;
    atomic_fetch_sub(&c->live_blocks, 1);
    atomic_fetch_sub(&c->live_bytes, (long)*(size_t *)base);
    free(base);
}

static confsmoe_ctx *counted_ctx(counts *c, confsmoe_allocator *a, uint64_t seed)
{
    *a = (confsmoe_allocator){count_alloc, count_free, c};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = seed;
    p.allocator = a;
    confsmoe_ctx *ctx = NULL;
    MUST(confsmoe_ctx_create(&p, &ctx), NULL);
    return ctx;
}

/* ------------------------------------------------------------------ data parallel */

enum { M = 2, S = 2, C = 3, B = 6 };
static const int64_t features[M] = {4, 3};

static confsmoe_model *small_model(confsmoe_ctx *ctx)
{
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
    confsmoe_model *model = NULL;
    MUST(confsmoe_model_create(ctx, &p, &model), ctx);
    return model;
}

static void dp_step(confsmoe_ctx *ctx, confsmoe_mpi_dp *dp)
{
    float x0[B * S * 4], x1[B * S * 3];
    uint8_t avail[B * M];
    int32_t labels[B];
    uint64_t seed = 3;
    for (int i = 0; i < B * S * 4; i++)
        x0[i] = (float)mt_uniform(&seed, -1, 1);
    for (int i = 0; i < B * S * 3; i++)
        x1[i] = (float)mt_uniform(&seed, -1, 1);
    for (int s = 0; s < B; s++) {
        avail[s * M] = avail[s * M + 1] = 1; /* no modality missing: the model needs no pools */
        labels[s] = s % C;
    }
    int64_t first, n;
    confsmoe_mpi_shard(B, mt_rank, mt_size, &first, &n);
    confsmoe_tensor *x[M] = {mt_wrap(ctx, CONFSMOE_F32, 3, n, S, 4, x0 + first * S * 4),
                             mt_wrap(ctx, CONFSMOE_F32, 3, n, S, 3, x1 + first * S * 3)};
    confsmoe_tensor *av = mt_wrap(ctx, CONFSMOE_U8, 2, n, M, 0, avail + first * M);
    confsmoe_tensor *global = mt_wrap(ctx, CONFSMOE_U8, 2, B, M, 0, avail);
    confsmoe_tensor *lab = mt_wrap(ctx, CONFSMOE_I32, 1, n, 0, 0, labels + first);
    float loss = 0.0f;
    MUST(confsmoe_mpi_dp_step(dp, (const confsmoe_tensor *const *)x, av, lab, global, first, NULL, &loss, NULL), ctx);
    EXPECT(isfinite(loss) && loss > 0.0f, "data-parallel loss %g", (double)loss);
    confsmoe_tensor *all[] = {x[0], x[1], av, global, lab};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        confsmoe_tensor_destroy(all[i]);
}

static void check_dp(void)
{
    counts c = {0};
    confsmoe_allocator a;
    confsmoe_ctx *ctx = counted_ctx(&c, &a, 11);
    confsmoe_model *model = small_model(ctx);
    size_t grad_bytes = 0;
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        grad_bytes += confsmoe_tensor_nbytes(confsmoe_model_grad(model, i));
    const size_t bucket = 4096;
    const long calls = atomic_load(&c.calls), bytes = atomic_load(&c.live_bytes);
    confsmoe_mpi_dp *dp = NULL;
    MUST(confsmoe_mpi_dp_create(MPI_COMM_WORLD, model, bucket, &dp), ctx);
    /* Creating dp allocates nothing in libconfsmoe itself: what the host sees is the MPI
     * library's, at least the gradients before a step and one bucket. */
    const long dp_calls = atomic_load(&c.calls) - calls, dp_bytes = atomic_load(&c.live_bytes) - bytes;
    const size_t least = grad_bytes + (bucket < grad_bytes ? bucket : grad_bytes);
    EXPECT(dp_calls >= 2 && dp_bytes >= (long)least,
           "confsmoe_mpi_dp_create: the host allocator saw %ld blocks, %ld bytes; want >= 2 blocks, >= %zu bytes",
           dp_calls, dp_bytes, least);
    if (mt_rank == 0)
        printf("confsmoe_mpi_dp_create: %ld blocks, %ld bytes through the host allocator (%zu gradient bytes)\n",
               dp_calls, dp_bytes, grad_bytes);
    dp_step(ctx, dp);
    /* dp may outlive its model and the host's ctx handle: its blocks keep the ctx. */
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    EXPECT(atomic_load(&c.live_blocks) > 0, "the ctx went with dp's blocks still in use");
    confsmoe_mpi_dp_destroy(dp);
    EXPECT(atomic_load(&c.live_blocks) == 0 && atomic_load(&c.live_bytes) == 0,
           "after the last destroy: %ld blocks, %ld bytes still live", atomic_load(&c.live_blocks),
           atomic_load(&c.live_bytes));
    EXPECT(atomic_load(&c.misaligned) == 0, "%ld requests for more than %d-byte alignment",
           atomic_load(&c.misaligned), HEADER);
}

/* ------------------------------------------------------------------ expert parallel */

enum { D = 6, E = 4, K = 2, N = 9 };

static void gate_params(confsmoe_gate_params *p)
{
    confsmoe_gate_params_init(p);
    p->d = D;
    p->k = K;
    p->n_classes = C;
}

/* The reference gate's exchange, never called: only its creation is counted. */
static confsmoe_status unused_forward(void *user, const int64_t *offset, const float *x, float *y, int32_t training,
                                      void **call, char *error, size_t cap)
{
    (void)user, (void)offset, (void)x, (void)y, (void)training, (void)call, (void)error, (void)cap;
    return CONFSMOE_E_INTERNAL;
}

static confsmoe_status unused_backward(void *user, void *call, const int64_t *offset, const float *dy, float *dx,
                                       char *error, size_t cap)
{
    (void)user, (void)call, (void)offset, (void)dy, (void)dx, (void)error, (void)cap;
    return CONFSMOE_E_INTERNAL;
}

static void release_nothing(void *user, void *call) { (void)user, (void)call; }

typedef struct {
    float x[N * D], y[N * D], dy[N * D], dx[N * D];
    int32_t labels[N], topk[N * K];
    uint8_t present[N];
} tokens;

/* A training forward of this rank's tokens, kept in *saved. */
static void forward(confsmoe_ctx *ctx, confsmoe_mpi_gate *g, tokens *t, confsmoe_mpi_saved **saved)
{
    confsmoe_tensor *x = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, t->x), *y = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, t->y);
    confsmoe_tensor *lab = mt_wrap(ctx, CONFSMOE_I32, 1, N, 0, 0, t->labels);
    confsmoe_tensor *pr = mt_wrap(ctx, CONFSMOE_U8, 1, N, 0, 0, t->present);
    confsmoe_tensor *tk = mt_wrap(ctx, CONFSMOE_I32, 2, N, K, 0, t->topk);
    float loss = 0.0f;
    MUST(confsmoe_mpi_gate_forward(g, x, lab, pr, y, tk, NULL, &loss, saved), ctx);
    confsmoe_tensor *all[] = {x, y, lab, pr, tk};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++)
        confsmoe_tensor_destroy(all[i]);
}

/* The slot rows of all ranks that go to this rank's experts in the last forward. */
static int64_t rows_for_me(confsmoe_mpi_gate *g, const tokens *t)
{
    int64_t per_expert[E] = {0};
    for (int i = 0; i < N * K; i++)
        per_expert[t->topk[i]]++;
    MPI_Allreduce(MPI_IN_PLACE, per_expert, E, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    int64_t rows = 0;
    for (int j = 0; j < confsmoe_mpi_gate_n_local_experts(g); j++)
        rows += per_expert[confsmoe_mpi_gate_first_expert(g) + j];
    return rows;
}

static void check_gate(void)
{
    tokens t;
    uint64_t seed = 17 + (uint64_t)mt_rank;
    for (int i = 0; i < N * D; i++) {
        t.x[i] = (float)mt_uniform(&seed, -1, 1);
        t.dy[i] = (float)mt_uniform(&seed, -1, 1);
    }
    for (int i = 0; i < N; i++) {
        t.labels[i] = i % C;
        t.present[i] = i % 4 != 0;
    }
    confsmoe_gate_params p;
    gate_params(&p);

    /* libconfsmoe alone: E experts, then a gate behind an exchange, as confsmoe_mpi_gate_create
     * makes them. */
    counts rc = {0};
    confsmoe_allocator ra;
    confsmoe_ctx *rctx = counted_ctx(&rc, &ra, 5);
    confsmoe_expert *experts[E];
    for (int e = 0; e < E; e++)
        MUST(confsmoe_expert_create(rctx, D, D, &experts[e]), rctx);
    const confsmoe_gate_exchange unused = {unused_forward, unused_backward, release_nothing, NULL};
    confsmoe_gate *ref = NULL;
    MUST(confsmoe_gate_create_exchange(rctx, &p, E, &unused, &ref), rctx);
    const long ref_create = atomic_load(&rc.calls);
    confsmoe_gate_destroy(ref);
    for (int e = 0; e < E; e++)
        confsmoe_expert_destroy(experts[e]);
    confsmoe_ctx_destroy(rctx);
    EXPECT(atomic_load(&rc.live_blocks) == 0, "the reference left %ld blocks", atomic_load(&rc.live_blocks));

    counts c = {0};
    confsmoe_allocator a;
    confsmoe_ctx *ctx = counted_ctx(&c, &a, 5);
    confsmoe_mpi_gate *g = NULL;
    MUST(confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, E, 0, &g), ctx);
    const long mpi_create = atomic_load(&c.calls);
    EXPECT(mpi_create > ref_create, "confsmoe_mpi_gate_create: %ld blocks through the host allocator, libconfsmoe's "
                                    "own are %ld: none of the MPI library's", mpi_create, ref_create);

    /* A training step. What it leaves allocated once its handle is gone is the gate's exchange
     * buffers: the rows this rank's experts received, kept three times (as received, by expert,
     * and the experts' outputs). */
    const long live_before = atomic_load(&c.live_bytes);
    confsmoe_mpi_saved *ms = NULL;
    forward(ctx, g, &t, &ms);
    confsmoe_tensor *dy = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, t.dy), *dx = mt_wrap(ctx, CONFSMOE_F32, 2, N, D, 0, t.dx);
    MUST(confsmoe_mpi_gate_backward(g, ms, dy, NULL, 1.0f, dx), ctx);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_mpi_saved_destroy(ms);
    MUST(confsmoe_mpi_gate_allreduce_grads(g), ctx);
    const int64_t rows = rows_for_me(g, &t);
    int64_t all_rows = rows;
    MPI_Allreduce(MPI_IN_PLACE, &all_rows, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    EXPECT(all_rows == (int64_t)N * K * mt_size, "the ranks' experts received %lld rows, the slots are %lld",
           (long long)all_rows, (long long)N * K * mt_size);
    const long kept = atomic_load(&c.live_bytes) - live_before, want = 3 * (long)rows * D * (long)sizeof(float);
    EXPECT(kept >= want, "after a training step the host allocator holds %ld more bytes, want >= %ld for %lld "
                         "received rows", kept, want, (long long)rows);
    if (mt_rank == 0)
        printf("host allocator: gate create %ld blocks (libconfsmoe alone %ld); after a step %ld bytes kept for %lld "
               "received rows\n", mpi_create, ref_create, kept, (long long)rows);

    /* The statistics' scratch: allocated and given back within the call. */
    confsmoe_gate_stats st = {.struct_size = sizeof st};
    const long before_calls = atomic_load(&c.calls), before_live = atomic_load(&c.live_blocks);
    MUST(confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, confsmoe_mpi_gate_local(g), CONFSMOE_STATS_TOTAL, &st, NULL,
                                     NULL, 0),
         ctx);
    EXPECT(atomic_load(&c.calls) > before_calls && atomic_load(&c.live_blocks) == before_live,
           "confsmoe_mpi_gate_stats_get: %ld blocks allocated, %ld still live",
           atomic_load(&c.calls) - before_calls, atomic_load(&c.live_blocks) - before_live);
    EXPECT(st.tokens == (long)N * mt_size, "global tokens %lld, want %lld", (long long)st.tokens,
           (long long)N * mt_size);

    /* A saved handle outlives its gate and the host's ctx handle: its blocks keep the ctx. */
    confsmoe_mpi_saved *late = NULL;
    forward(ctx, g, &t, &late);
    confsmoe_mpi_gate_destroy(g);
    confsmoe_ctx_destroy(ctx);
    EXPECT(atomic_load(&c.live_blocks) > 0, "the ctx went with a saved handle's blocks still in use");
    confsmoe_mpi_saved_destroy(late);
    EXPECT(atomic_load(&c.live_blocks) == 0 && atomic_load(&c.live_bytes) == 0,
           "after the last destroy: %ld blocks, %ld bytes still live", atomic_load(&c.live_blocks),
           atomic_load(&c.live_bytes));
}

int main(int argc, char **argv)
{
    mt_init(&argc, &argv);
    check_dp();
    check_gate();
    return mt_finish("test_mpi_alloc");
}
