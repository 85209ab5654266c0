/* The trainer's data parallelism: under mpirun (and built with libconfsmoe_mpi) every rank
 * trains on its shard of each global batch and the gradients are summed over the ranks;
 * otherwise one process, and these calls are the plain library calls. docs/DISTRIBUTED.md. */
#ifndef CONFSMOE_TRAIN_DISTRIBUTED_H
#define CONFSMOE_TRAIN_DISTRIBUTED_H

#include <confsmoe.h>
#include <stdint.h>

typedef struct {
    int rank, size;
    void *dp;   /* confsmoe_mpi_dp, with MPI */
} distributed;

/* MPI_Init when the process was started by mpirun (and MPI is built in); rank 0 of 1 otherwise. */
void distributed_init(int *argc, char ***argv, distributed *d);
/* Data parallelism over the model (its parameters come from rank 0). */
void distributed_attach(distributed *d, confsmoe_model *model);
/* This rank's samples of a global batch of n: first .. first + count - 1. */
void distributed_shard(const distributed *d, int n, int *first, int *count);
/* One step of a global batch (global_avail [B_global, M]) on this rank's shard at `first`;
 * loss and task receive the global batch's. */
confsmoe_status distributed_step(distributed *d, confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                 const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                 const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                 float *loss, float *task);
/* Sums v over the ranks, in place. */
void distributed_sum(const distributed *d, int64_t *v, int n);
/* The gate's statistics of the training calls, summed over the ranks' shards. */
confsmoe_status distributed_gate_stats(const distributed *d, confsmoe_gate *gate, int32_t scope,
                                       confsmoe_gate_stats *out);
void distributed_finish(distributed *d);

#endif
