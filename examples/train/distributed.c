/* See distributed.h. Built with TRAIN_MPI when libconfsmoe_mpi is. */
#include "distributed.h"

#include <stdlib.h>

#include "util.h"

#ifdef TRAIN_MPI
#include <confsmoe_mpi.h>

/* mpirun (Open MPI, or a PMI/PMIx launcher) tells its processes so in the environment. */
static int launched_by_mpirun(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK");
}

void distributed_init(int *argc, char ***argv, distributed *d)
{
    d->rank = 0;
    d->size = 1;
    d->dp = NULL;
    if (!launched_by_mpirun())
        return;
    if (MPI_Init(argc, argv) != MPI_SUCCESS)
        die_system("MPI_Init failed");
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->size);
}

void distributed_attach(distributed *d, confsmoe_model *model)
{
    if (!launched_by_mpirun())
        return;
    confsmoe_mpi_dp *dp = NULL;
    if (confsmoe_mpi_dp_create(MPI_COMM_WORLD, model, 0, &dp) != CONFSMOE_OK)
        die_system("confsmoe_mpi_dp_create failed: %s", confsmoe_mpi_last_error());
    d->dp = dp;
}

confsmoe_status distributed_step(distributed *d, confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                 const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                 const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                 float *loss, float *task)
{
    if (!d->dp)
        return confsmoe_model_step(model, inputs, avail, labels, logits, loss, task);
    return confsmoe_mpi_dp_step(d->dp, inputs, avail, labels, global_avail, first, logits, loss, task);
}

void distributed_sum(const distributed *d, int64_t *v, int n)
{
    if (d->dp && MPI_Allreduce(MPI_IN_PLACE, v, n, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS)
        die_system("MPI_Allreduce failed");
}

confsmoe_status distributed_gate_stats(const distributed *d, confsmoe_gate *gate, int32_t scope,
                                       confsmoe_gate_stats *out)
{
    if (!d->dp)
        return confsmoe_gate_stats_get(gate, scope, out, NULL, NULL, 0);
    return confsmoe_mpi_gate_stats_get(MPI_COMM_WORLD, gate, scope, out, NULL, NULL, 0);
}

void distributed_finish(distributed *d)
{
    confsmoe_mpi_dp_destroy(d->dp);
    d->dp = NULL;
    if (launched_by_mpirun())
        MPI_Finalize();
}

void distributed_shard(const distributed *d, int n, int *first, int *count)
{
    int64_t f, c;
    confsmoe_mpi_shard(n, d->rank, d->size, &f, &c);
    *first = (int)f;
    *count = (int)c;
}

#else /* one process */

void distributed_init(int *argc, char ***argv, distributed *d)
{
    (void)argc;
    (void)argv;
    d->rank = 0;
    d->size = 1;
    d->dp = NULL;
    if (getenv("OMPI_COMM_WORLD_SIZE") && atoi(getenv("OMPI_COMM_WORLD_SIZE")) > 1)
        die_input(NULL, 0, "started by mpirun, but this " PROG " was built without MPI (meson -Dmpi=enabled)");
}

void distributed_attach(distributed *d, confsmoe_model *model)
{
    (void)d;
    (void)model;
}

confsmoe_status distributed_step(distributed *d, confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                 const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                 const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                 float *loss, float *task)
{
    (void)d;
    (void)global_avail;
    (void)first;
    return confsmoe_model_step(model, inputs, avail, labels, logits, loss, task);
}

void distributed_sum(const distributed *d, int64_t *v, int n)
{
    (void)d;
    (void)v;
    (void)n;
}

confsmoe_status distributed_gate_stats(const distributed *d, confsmoe_gate *gate, int32_t scope,
                                       confsmoe_gate_stats *out)
{
    (void)d;
    return confsmoe_gate_stats_get(gate, scope, out, NULL, NULL, 0);
}

void distributed_finish(distributed *d) { (void)d; }

void distributed_shard(const distributed *d, int n, int *first, int *count)
{
    (void)d;
    *first = 0;
    *count = n;
}

#endif
