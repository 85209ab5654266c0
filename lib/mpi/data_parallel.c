/* Data parallelism: a shard step on every rank, then the gradients summed in buckets. */
#include "mpi_internal.h"

struct confsmoe_mpi_dp {
    cmpi_comm comm;
    confsmoe_ctx *ctx;                  /* the model's: every block below comes from it */
    confsmoe_model *model;
    int32_t n;
    confsmoe_tensor **params, **grads;  /* the model's, in its order */
    float *before;                      /* the gradients before a step, packed */
    cmpi_stage stage;
};

/* The borrowed model is not touched: it may be destroyed first (each block holds the ctx). */
void confsmoe_mpi_dp_destroy(confsmoe_mpi_dp *dp)
{
    if (!dp)
        return;
    confsmoe_ctx *ctx = dp->ctx;
    cmpi_comm_free(&dp->comm);
    confsmoe_ctx_free(ctx, dp->params);
    confsmoe_ctx_free(ctx, dp->grads);
    confsmoe_ctx_free(ctx, dp->before);
    confsmoe_ctx_free(ctx, dp->stage.stage);
    confsmoe_ctx_free(ctx, dp);
}

confsmoe_status confsmoe_mpi_dp_create(MPI_Comm comm, confsmoe_model *model, size_t bucket_bytes,
                                       confsmoe_mpi_dp **out)
{
    static const char fn[] = "mpi_dp_create";
    if (!out || !model)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, !out ? "out" : "model");
    *out = NULL;
    confsmoe_status s = cmpi_require_version(fn);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_ctx *ctx = confsmoe_gate_ctx(confsmoe_model_gate(model));
    confsmoe_mpi_dp *dp = confsmoe_ctx_calloc(ctx, 1, sizeof *dp);
    if (!dp)
        return cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    dp->comm.comm = MPI_COMM_NULL;
    dp->ctx = ctx;
    dp->model = model;
    dp->n = confsmoe_model_n_params(model);
    dp->params = confsmoe_ctx_calloc(ctx, (size_t)dp->n, sizeof *dp->params);
    dp->grads = confsmoe_ctx_calloc(ctx, (size_t)dp->n, sizeof *dp->grads);
    s = dp->params && dp->grads ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    for (int32_t i = 0; s == CONFSMOE_OK && i < dp->n; i++) {
        dp->params[i] = confsmoe_model_param(model, i);
        dp->grads[i] = confsmoe_model_grad(model, i);
    }
    const size_t floats = s == CONFSMOE_OK ? cmpi_numel(dp->grads, dp->n) : 0;
    if (s == CONFSMOE_OK) {
        dp->before = confsmoe_ctx_calloc(ctx, floats, sizeof(float));
        s = dp->before ? cmpi_stage_alloc(ctx, bucket_bytes, floats, fn, &dp->stage)
                       : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory for %zu gradients", fn, floats);
    }
    if (s == CONFSMOE_OK)
        s = cmpi_comm_dup(comm, fn, &dp->comm);
    /* Every copy starts from rank 0's parameters. */
    if (s == CONFSMOE_OK)
        s = cmpi_buckets(&dp->comm, CMPI_BROADCAST, dp->params, dp->n, NULL, &dp->stage);
    if (s != CONFSMOE_OK) {
        confsmoe_mpi_dp_destroy(dp);
        return s;
    }
    *out = dp;
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_mpi_dp_step(confsmoe_mpi_dp *dp, const confsmoe_tensor *const *inputs,
                                     const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                     const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                     float *loss, float *task_loss)
{
    if (!dp)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "mpi_dp_step: dp is NULL");
    cmpi_pack(dp->grads, dp->n, dp->before);
    float losses[2] = {0.0f, 0.0f};
    confsmoe_status s = confsmoe_model_step_shard(dp->model, inputs, avail, labels, global_avail, first, logits,
                                                  &losses[0], &losses[1]);
    if (s != CONFSMOE_OK) /* the step changed nothing; the model's ctx has the detail */
        return cmpi_fail(s, "mpi_dp_step: confsmoe_model_step_shard failed: %s (the model's ctx has the detail)",
                         confsmoe_status_string(s));
    s = cmpi_buckets(&dp->comm, CMPI_SUM_DELTA, dp->grads, dp->n, dp->before, &dp->stage);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, losses, 2, MPI_FLOAT, MPI_SUM, dp->comm.comm),
                       "MPI_Allreduce of the losses");
    if (s != CONFSMOE_OK)
        return s;
    if (loss)
        *loss = losses[0];
    if (task_loss)
        *task_loss = losses[1];
    return CONFSMOE_OK;
}
