/* The harness of the MPI tests. Not Check: an assertion that jumps out of a test on one rank
 * leaves the other ranks waiting in a collective. A failed expectation here is counted and
 * printed with its rank, every rank runs the same calls to the end, and the process exits 1
 * if any rank counted a failure. */
#ifndef CONFSMOE_MPITEST_H
#define CONFSMOE_MPITEST_H

#define CONFSMOE_EXPERIMENTAL
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "confsmoe_mpi.h"

static int mt_rank, mt_size, mt_failures, mt_checks;

#define EXPECT(cond, ...)                                                                  \
    do {                                                                                   \
        mt_checks++;                                                                       \
        if (!(cond)) {                                                                     \
            if (mt_failures++ < 20) {                                                      \
                fprintf(stderr, "rank %d: %s:%d: ", mt_rank, __FILE__, __LINE__);          \
                fprintf(stderr, __VA_ARGS__);                                              \
                fputc('\n', stderr);                                                       \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* A call that must succeed; on failure the test cannot go on meaningfully: abort the job. */
#define MUST(call, ctx)                                                                    \
    do {                                                                                   \
        confsmoe_status s_ = (call);                                                       \
        if (s_ != CONFSMOE_OK) {                                                           \
            fprintf(stderr, "rank %d: %s:%d: %s failed: %s: %s %s\n", mt_rank, __FILE__,   \
                    __LINE__, #call, confsmoe_status_string(s_),                           \
                    (ctx) ? confsmoe_ctx_last_error(ctx) : "", confsmoe_mpi_last_error()); \
            MPI_Abort(MPI_COMM_WORLD, 1);                                                  \
        }                                                                                  \
    } while (0)

static void mt_init(int *argc, char ***argv)
{
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &mt_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &mt_size);
}

/* Every rank's failures, summed; rank 0 prints the total. Returns the exit status. */
static int mt_finish(const char *name)
{
    int total = 0, checks = 0;
    MPI_Allreduce(&mt_failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&mt_checks, &checks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (mt_rank == 0)
        printf("%s: %d ranks, %d checks, %d failed\n", name, mt_size, checks, total);
    MPI_Finalize();
    return total == 0 && checks > 0 ? 0 : 1;
}

/* |got - want| <= tol (1 + |want|) for every element. */
static inline void expect_close(const char *what, const float *got, const float *want, int64_t n, double tol)
{
    for (int64_t i = 0; i < n; i++)
        EXPECT(fabs((double)got[i] - want[i]) <= tol * (1.0 + fabs(want[i])), "%s[%lld]: %.8g, want %.8g", what,
               (long long)i, (double)got[i], (double)want[i]);
}

/* splitmix64, the tests' own RNG, the same on every rank. */
static inline double mt_uniform(uint64_t *s, double lo, double hi)
{
    uint64_t z = (*s += UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    z ^= z >> 31;
    return lo + (hi - lo) * (double)(z >> 11) * 0x1.0p-53;
}

static inline confsmoe_ctx *mt_ctx(uint64_t seed)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = seed;
    confsmoe_ctx *ctx = NULL;
    MUST(confsmoe_ctx_create(&p, &ctx), NULL);
    return ctx;
}

static inline confsmoe_tensor *mt_wrap(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t nd, int64_t d0, int64_t d1,
                                       int64_t d2, void *data)
{
    const int64_t dims[3] = {d0, d1, d2};
    confsmoe_tensor *t = NULL;
    MUST(confsmoe_tensor_wrap(ctx, dt, nd, dims, data, &t), ctx);
    return t;
}

#endif
