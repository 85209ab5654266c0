/* A host of libconfsmoe_mpi built from the installed tree with pkg-config confsmoe-mpi and
 * run by mpirun: an expert-parallel gate over the ranks, one training call, and the global
 * statistics. */
#include <confsmoe_mpi.h>
#include <stdio.h>

#define N 16
#define D 8

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_create(NULL, &ctx);
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = D;
    p.n_classes = 2;
    confsmoe_mpi_gate *gate = NULL;
    confsmoe_status s = confsmoe_mpi_gate_create(MPI_COMM_WORLD, ctx, &p, 4, 0, &gate);
    float x[N * D], y[N * D], dy[N * D], loss = -1.0f;
    int32_t labels[N];
    for (int i = 0; i < N * D; i++)
        x[i] = dy[i] = (float)((i * 7 + rank) % 13) / 13.0f - 0.5f;
    for (int i = 0; i < N; i++)
        labels[i] = i % 2;
    const int64_t xd[2] = {N, D}, ld[1] = {N};
    confsmoe_tensor *tx = NULL, *ty = NULL, *tdy = NULL, *tl = NULL;
    confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, x, &tx);
    confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, y, &ty);
    confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, dy, &tdy);
    confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, ld, labels, &tl);
    confsmoe_mpi_saved *saved = NULL;
    if (s == CONFSMOE_OK)
        s = confsmoe_mpi_gate_forward(gate, tx, tl, NULL, ty, NULL, NULL, &loss, &saved);
    if (s == CONFSMOE_OK)
        s = confsmoe_mpi_gate_backward(gate, saved, tdy, NULL, 1.0f, NULL);
    confsmoe_gate_stats st = {.struct_size = sizeof st};
    if (s == CONFSMOE_OK)
        s = confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, confsmoe_mpi_gate_local(gate), CONFSMOE_STATS_TOTAL, &st,
                                        NULL, NULL, 0);
    if (s != CONFSMOE_OK)
        fprintf(stderr, "rank %d: %s: %s\n", rank, confsmoe_status_string(s), confsmoe_mpi_last_error());
    else if (st.tokens != (int64_t)N * size)
        fprintf(stderr, "rank %d: %lld tokens in the global statistics, want %d\n", rank, (long long)st.tokens, N * size);
    else if (rank == 0)
        printf("consumer_mpi: %d ranks, experts %d.. on rank 0, loss %.4f, %lld tokens routed\n", size,
               confsmoe_mpi_gate_first_expert(gate), loss, (long long)st.tokens);
    const int bad = s != CONFSMOE_OK || st.tokens != (int64_t)N * size;
    confsmoe_mpi_saved_destroy(saved);
    confsmoe_mpi_gate_destroy(gate);
    confsmoe_tensor_destroy(tx);
    confsmoe_tensor_destroy(ty);
    confsmoe_tensor_destroy(tdy);
    confsmoe_tensor_destroy(tl);
    confsmoe_ctx_destroy(ctx);
    MPI_Finalize();
    return bad;
}
