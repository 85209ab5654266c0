/* Private to libconfsmoe_mpi: errors, the version check, communicators and bucketed collectives.
 * Every block the library holds comes from the ctx of the objects it serves (confsmoe_ctx_calloc),
 * so that a host allocator sees it. */
#ifndef CONFSMOE_MPI_INTERNAL_H
#define CONFSMOE_MPI_INTERNAL_H

#define CONFSMOE_EXPERIMENTAL
#include <stdbool.h>

#include "confsmoe_mpi.h"

/* Sets this thread's last error and returns status. */
confsmoe_status cmpi_fail(confsmoe_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* CONFSMOE_OK for MPI_SUCCESS, else CONFSMOE_E_COMM with `what` and MPI's text. */
confsmoe_status cmpi_check(int mpi_status, const char *what);
/* A failed libconfsmoe call: its status, with `what` and the ctx's message. */
confsmoe_status cmpi_from_ctx(const confsmoe_ctx *ctx, confsmoe_status status, const char *what);
/* CONFSMOE_E_VERSION unless the loaded libconfsmoe is the release this library was built
 * against: the experimental hooks it calls may change in any release. Entry points that make
 * objects or allocate call it first; `fn` prefixes the message. */
confsmoe_status cmpi_require_version(const char *fn);

/* A private duplicate of comm that returns errors instead of aborting, its rank and size. */
typedef struct {
    MPI_Comm comm;
    int rank, size;
} cmpi_comm;

confsmoe_status cmpi_comm_dup(MPI_Comm comm, const char *fn, cmpi_comm *out);
void cmpi_comm_free(cmpi_comm *c);

/* What a bucketed collective does with a list of f32 tensors, viewed as one array. */
typedef enum {
    CMPI_SUM,        /* every rank ends with the sum over the ranks */
    CMPI_SUM_DELTA,  /* the sum over the ranks of (t - before) is added to before */
    CMPI_BROADCAST,  /* every rank ends with rank 0's values */
} cmpi_op;

/* A staging buffer of `floats` floats for the buckets, and (SUM_DELTA) the values before. */
typedef struct {
    float *stage;
    size_t floats;
} cmpi_stage;

/* Runs op over t[0..n-1] through the stage, one MPI call per stage-full: the tensors are
 * packed back to back, so that few large calls carry many small tensors. before (SUM_DELTA
 * only) holds the list's values before the step, packed the same way. */
confsmoe_status cmpi_buckets(const cmpi_comm *c, cmpi_op op, confsmoe_tensor *const *t, int32_t n,
                             const float *before, const cmpi_stage *stage);
/* The list's values packed back to back into out (the layout `before` needs). */
void cmpi_pack(confsmoe_tensor *const *t, int32_t n, float *out);
/* Total elements of the list. */
size_t cmpi_numel(confsmoe_tensor *const *t, int32_t n);
/* The stage for bucket_bytes (0: the default), no larger than the list, from ctx's allocator
 * (free it with confsmoe_ctx_free). NULL stage on failure. */
confsmoe_status cmpi_stage_alloc(confsmoe_ctx *ctx, size_t bucket_bytes, size_t list_floats, const char *fn,
                                 cmpi_stage *out);

#endif /* CONFSMOE_MPI_INTERNAL_H */
