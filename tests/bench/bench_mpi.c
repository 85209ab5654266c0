/* The distributed benchmark (docs/DISTRIBUTED.md): run under mpirun, one JSON object per line
 * from rank 0.
 *
 *   bench_mpi comm   MPI_Allreduce and MPI_Alltoall of 4 B .. 64 MiB: the per-call and
 *                    per-byte costs of this machine's transport
 *   bench_mpi dp     one data-parallel training step of the paper-shape model (B = 256
 *                    samples, M = 3 modalities of S = 50 tokens, d = 128, E = 8, k = 2) split
 *                    over the ranks: step time, time in MPI_Allreduce, gradient bytes
 *   bench_mpi ep     one expert-parallel gate call (N = 12800 tokens, d = h = 128, E = 8,
 *                    k = 2), forward + backward + replicated gradients, split over the ranks:
 *                    time, time in MPI_Alltoallv, bytes that leave each rank
 *   --quick          small shapes and few repeats (the mpi suite's smoke test)
 *
 * Time in MPI and the bytes sent come from the MPI profiling interface (PMPI wrappers below). */
#define CONFSMOE_EXPERIMENTAL
#include <confsmoe_mpi.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, size;
static double mpi_seconds;      /* inside MPI_Allreduce / MPI_Alltoallv since the last reset */
static double bytes_sent;       /* bytes MPI_Alltoallv sent to other ranks since the last reset */

int MPI_Allreduce(const void *s, void *r, int n, MPI_Datatype t, MPI_Op op, MPI_Comm c)
{
    const double t0 = PMPI_Wtime();
    const int rc = PMPI_Allreduce(s, r, n, t, op, c);
    mpi_seconds += PMPI_Wtime() - t0;
    return rc;
}

int MPI_Alltoallv(const void *s, const int *sc, const int *sd, MPI_Datatype st, void *r, const int *rc,
                  const int *rd, MPI_Datatype rt, MPI_Comm c)
{
    int me, bytes;
    PMPI_Comm_rank(c, &me);
    PMPI_Type_size(st, &bytes);
    int n;
    PMPI_Comm_size(c, &n);
    for (int q = 0; q < n; q++)
        bytes_sent += q == me ? 0.0 : (double)sc[q] * bytes;
    const double t0 = PMPI_Wtime();
    const int status = PMPI_Alltoallv(s, sc, sd, st, r, rc, rd, rt, c);
    mpi_seconds += PMPI_Wtime() - t0;
    return status;
}

#define CHECK(call, ctx)                                                                                   \
    do {                                                                                                   \
        confsmoe_status s_ = (call);                                                                       \
        if (s_ != CONFSMOE_OK) {                                                                           \
            fprintf(stderr, "bench_mpi rank %d: %s: %s %s %s\n", rank, #call, confsmoe_status_string(s_), \
                    (ctx) ? confsmoe_ctx_last_error(ctx) : "", confsmoe_mpi_last_error());                 \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                                  \
        }                                                                                                  \
    } while (0)

static uint64_t rng = 88172645463325252ull;
static float urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)(rng >> 40) * 0x1.0p-24f;
}

static int cmp(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median over the ranks' slowest: every rank's time, the max per repeat, then the median. */
static double median_of_max(double *t, int n)
{
    PMPI_Allreduce(MPI_IN_PLACE, t, n, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    qsort(t, (size_t)n, sizeof *t, cmp);
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static confsmoe_ctx *new_ctx(void)
{
    confsmoe_ctx *ctx = NULL;
    CHECK(confsmoe_ctx_create(NULL, &ctx), NULL);
    return ctx;
}

static void run_comm(int quick)
{
    const size_t max_bytes = quick ? (size_t)1 << 16 : (size_t)64 << 20;
    float *a = malloc(max_bytes), *b = malloc(max_bytes);
    for (size_t i = 0; i < max_bytes / sizeof(float); i++)
        a[i] = urand();
    for (size_t bytes = 4; bytes <= max_bytes; bytes *= 4) {
        const int count = (int)(bytes / sizeof(float)), reps = bytes < ((size_t)1 << 20) ? 200 : 20;
        double t[200];
        for (int what = 0; what < 2; what++) {
            const int per_rank = count / size;
            if (what == 1 && per_rank == 0)
                continue;
            for (int r = -2; r < reps; r++) {
                PMPI_Barrier(MPI_COMM_WORLD);
                const double t0 = PMPI_Wtime();
                if (what == 0)
                    PMPI_Allreduce(a, b, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                else
                    PMPI_Alltoall(a, per_rank, MPI_FLOAT, b, per_rank, MPI_FLOAT, MPI_COMM_WORLD);
                if (r >= 0)
                    t[r] = PMPI_Wtime() - t0;
            }
            const double med = median_of_max(t, reps);
            if (rank == 0)
                printf("{\"what\": \"%s\", \"ranks\": %d, \"bytes\": %zu, \"median_s\": %.6g}\n",
                       what == 0 ? "allreduce" : "alltoall", size, bytes, med);
        }
    }
    free(a);
    free(b);
}

static void run_dp(int quick)
{
    const int32_t M = 3;
    const int64_t F[3] = {300, 74, 35}, B = quick ? 16 : 256, S = quick ? 5 : 50, pool_rows = 512;
    const int reps = quick ? 2 : 8;
    confsmoe_ctx *ctx = new_ctx();
    confsmoe_model_params mp;
    confsmoe_model_params_init(&mp);
    mp.n_modalities = M;
    mp.features = F;
    mp.tokens = S;
    mp.n_classes = 10;
    confsmoe_model *model = NULL;
    CHECK(confsmoe_model_create(ctx, &mp, &model), ctx);
    float *x[3];
    uint8_t *avail = malloc((size_t)(B * M));
    int32_t *labels = malloc((size_t)B * sizeof *labels);
    for (int32_t m = 0; m < M; m++) {
        x[m] = malloc((size_t)(B * S * F[m]) * sizeof(float));
        float *pool = malloc((size_t)(pool_rows * S * F[m]) * sizeof(float));
        for (int64_t i = 0; i < B * S * F[m]; i++)
            x[m][i] = urand() * 2 - 1;
        for (int64_t i = 0; i < pool_rows * S * F[m]; i++)
            pool[i] = urand() * 2 - 1;
        const int64_t pd[3] = {pool_rows, S, F[m]};
        confsmoe_tensor *tp = NULL;
        CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 3, pd, pool, &tp), ctx);
        CHECK(confsmoe_model_set_pool(model, m, tp), ctx);
        confsmoe_tensor_destroy(tp);
        free(pool);
    }
    /* 30% of the optional cells missing; every sample keeps one modality. */
    for (int64_t b = 0; b < B; b++) {
        const int32_t keep = (int32_t)(urand() * M) % M;
        for (int32_t m = 0; m < M; m++)
            avail[b * M + m] = m == keep || urand() >= 0.3f;
        labels[b] = (int32_t)(urand() * 10) % 10;
    }
    confsmoe_optim *opt = NULL;
    CHECK(confsmoe_optim_create(ctx, NULL, &opt), ctx);
    size_t grad_bytes = 0;
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++) {
        CHECK(confsmoe_optim_add(opt, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)), ctx);
        grad_bytes += confsmoe_tensor_nbytes(confsmoe_model_grad(model, i));
    }
    confsmoe_mpi_dp *dp = NULL;
    CHECK(confsmoe_mpi_dp_create(MPI_COMM_WORLD, model, 0, &dp), ctx);
    int64_t first, n;
    confsmoe_mpi_shard(B, rank, size, &first, &n);
    confsmoe_tensor *tx[3], *ta, *tl, *tg;
    for (int32_t m = 0; m < M; m++) {
        const int64_t d3[3] = {n, S, F[m]};
        CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 3, d3, x[m] + first * S * F[m], &tx[m]), ctx);
    }
    const int64_t ad[2] = {n, M}, gd[2] = {B, M};
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 2, ad, avail + first * M, &ta), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 2, gd, avail, &tg), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, &n, labels + first, &tl), ctx);
    double t[16], in_mpi[16];
    float loss = 0;
    for (int r = -1; r < reps; r++) {
        PMPI_Barrier(MPI_COMM_WORLD);
        mpi_seconds = 0;
        const double t0 = PMPI_Wtime();
        confsmoe_model_zero_grad(model);
        CHECK(confsmoe_mpi_dp_step(dp, (const confsmoe_tensor *const *)tx, ta, tl, tg, first, NULL, &loss, NULL), ctx);
        CHECK(confsmoe_optim_step(opt), ctx);
        if (r >= 0) {
            t[r] = PMPI_Wtime() - t0;
            in_mpi[r] = mpi_seconds;
        }
    }
    const double med = median_of_max(t, reps), med_mpi = median_of_max(in_mpi, reps);
    if (rank == 0)
        printf("{\"what\": \"dp\", \"ranks\": %d, \"B\": %" PRId64 ", \"S\": %" PRId64 ", \"median_s\": %.6g, "
               "\"allreduce_s\": %.6g, \"grad_bytes\": %zu, \"sent_bytes_per_rank\": %.0f, \"loss\": %.5f}\n",
               size, B, S, med, med_mpi, grad_bytes, 2.0 * (size - 1) / size * (double)grad_bytes, loss);
    for (int32_t m = 0; m < M; m++) {
        confsmoe_tensor_destroy(tx[m]);
        free(x[m]);
    }
    confsmoe_tensor_destroy(ta);
    confsmoe_tensor_destroy(tg);
    confsmoe_tensor_destroy(tl);
    free(avail);
    free(labels);
    confsmoe_mpi_dp_destroy(dp);
    confsmoe_optim_destroy(opt);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
}

static void run_ep(int quick)
{
    const int64_t N = quick ? 512 : 12800, d = 128, C = 10;
    const int32_t E = 8, k = 2;
    const int reps = quick ? 3 : 15;
    confsmoe_ctx *ctx = new_ctx();
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = d;
    p.k = k;
    p.n_classes = (int32_t)C;
    confsmoe_mpi_gate *g = NULL;
    CHECK(confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, E, d, &g), ctx);
    int64_t first, n;
    confsmoe_mpi_shard(N, rank, size, &first, &n);
    float *x = malloc((size_t)(n * d) * sizeof(float)), *y = malloc((size_t)(n * d) * sizeof(float));
    float *dy = malloc((size_t)(n * d) * sizeof(float)), *dx = malloc((size_t)(n * d) * sizeof(float));
    int32_t *labels = malloc((size_t)n * sizeof *labels);
    for (int64_t i = 0; i < n * d; i++) {
        x[i] = urand() * 2 - 1;
        dy[i] = urand() * 2 - 1;
    }
    for (int64_t i = 0; i < n; i++)
        labels[i] = (int32_t)(urand() * C) % (int32_t)C;
    const int64_t xd[2] = {n, d};
    confsmoe_tensor *tx, *ty, *tdy, *tdx, *tl;
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, x, &tx), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, y, &ty), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, dy, &tdy), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, dx, &tdx), ctx);
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, &n, labels, &tl), ctx);
    double t[16], in_mpi[16], sent[16];
    float loss = 0;
    for (int r = -2; r < reps; r++) {
        PMPI_Barrier(MPI_COMM_WORLD);
        mpi_seconds = bytes_sent = 0;
        const double t0 = PMPI_Wtime();
        confsmoe_mpi_saved *saved = NULL;
        CHECK(confsmoe_mpi_gate_forward(g, tx, tl, NULL, ty, NULL, NULL, &loss, &saved), ctx);
        CHECK(confsmoe_mpi_gate_backward(g, saved, tdy, NULL, 1.0f, tdx), ctx);
        confsmoe_mpi_saved_destroy(saved);
        CHECK(confsmoe_mpi_gate_allreduce_grads(g), ctx);
        if (r >= 0) {
            t[r] = PMPI_Wtime() - t0;
            in_mpi[r] = mpi_seconds;
            sent[r] = bytes_sent;
        }
    }
    const double med = median_of_max(t, reps), med_mpi = median_of_max(in_mpi, reps);
    const double med_sent = median_of_max(sent, reps);
    if (rank == 0)
        printf("{\"what\": \"ep\", \"ranks\": %d, \"N\": %" PRId64 ", \"d\": %" PRId64 ", \"E\": %d, \"k\": %d, "
               "\"median_s\": %.6g, \"mpi_s\": %.6g, \"sent_bytes_per_rank\": %.0f, \"loss\": %.5f}\n",
               size, N, d, E, k, med, med_mpi, med_sent, loss);
    confsmoe_tensor *all[] = {tx, ty, tdy, tdx, tl};
    for (int i = 0; i < 5; i++)
        confsmoe_tensor_destroy(all[i]);
    free(x);
    free(y);
    free(dy);
    free(dx);
    free(labels);
    confsmoe_mpi_gate_destroy(g);
    confsmoe_ctx_destroy(ctx);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const char *mode = argc > 1 ? argv[1] : "";
    const int quick = argc > 2 && strcmp(argv[2], "--quick") == 0;
    if (strcmp(mode, "comm") == 0)
        run_comm(quick);
    else if (strcmp(mode, "dp") == 0)
        run_dp(quick);
    else if (strcmp(mode, "ep") == 0)
        run_ep(quick);
    else if (rank == 0)
        fprintf(stderr, "usage: mpirun -np P bench_mpi comm|dp|ep [--quick]\n");
    const int ok = !strcmp(mode, "comm") || !strcmp(mode, "dp") || !strcmp(mode, "ep");
    MPI_Finalize();
    return ok ? 0 : 2;
}
