/* Expert-utilisation statistics summed over the ranks: the ranks' counters are summed, and the
 * figures come from the sums through libconfsmoe's own code (../usage_report.c). */
#include <math.h>

#include "mpi_internal.h"
#include "../usage.h"

confsmoe_status confsmoe_mpi_gate_stats_get(MPI_Comm comm, confsmoe_gate *g, int32_t scope, confsmoe_gate_stats *out,
                                            int64_t *load, double *mean_confidence, int32_t n)
{
    static const char fn[] = "mpi_gate_stats_get";
    confsmoe_status s = cmpi_require_version(fn);
    if (s != CONFSMOE_OK)
        return s;
    if (!g)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: the gate is NULL", fn);
    const int32_t E = confsmoe_gate_n_experts(g);
    if ((load || mean_confidence) && n != E)
        return cmpi_fail(CONFSMOE_E_SHAPE, "%s: arrays of %d given, the gate has E=%d", fn, (int)n, (int)E);
    confsmoe_ctx *ctx = confsmoe_gate_ctx(g);
    /* The counters, as one int64 and one double array for the two sums: ints holds tokens, then
     * load [E] and conf_count [E]; reals holds conf_sum [E], then the conf_loss weight. */
    int64_t *ints = confsmoe_ctx_calloc(ctx, 2 * (size_t)E + 1, sizeof *ints);
    double *reals = confsmoe_ctx_calloc(ctx, (size_t)E + 1, sizeof *reals);
    double *mean = confsmoe_ctx_calloc(ctx, (size_t)E, sizeof *mean);
    s = ints && reals && mean ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    csm_usage sum = {.load = ints + 1, .conf_count = ints + 1 + E, .conf_sum = reals};
    if (s == CONFSMOE_OK) {
        s = confsmoe_gate_stats_get(g, scope, out, sum.load, mean, E);
        if (s != CONFSMOE_OK)
            s = cmpi_fail(s, "%s: confsmoe_gate_stats_get failed: %s", fn, confsmoe_status_string(s));
    }
    if (s == CONFSMOE_OK) {
        /* A gate's slots all carry a confidence or none do: its mean times its load is the sum. */
        ints[0] = out->tokens;
        for (int32_t e = 0; e < E; e++)
            if (!isnan(mean[e])) {
                sum.conf_count[e] = sum.load[e];
                sum.conf_sum[e] = mean[e] * (double)sum.load[e];
            }
        reals[E] = out->conf_loss * (double)out->tokens;
    }
    cmpi_comm c = {MPI_COMM_NULL, 0, 0};
    if (s == CONFSMOE_OK)
        s = cmpi_comm_dup(comm, fn, &c);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, ints, 2 * E + 1, MPI_INT64_T, MPI_SUM, c.comm),
                       "MPI_Allreduce of the expert loads");
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, reals, E + 1, MPI_DOUBLE, MPI_SUM, c.comm),
                       "MPI_Allreduce of the confidences");
    cmpi_comm_free(&c);
    if (s == CONFSMOE_OK) {
        /* conf_loss is the ranks' weighted by their tokens: each token counts as one call. */
        sum.tokens = ints[0];
        sum.conf_loss_sum = reals[E];
        sum.conf_loss_calls = ints[0];
        csm_usage_report(&sum, E, out, load, mean_confidence);
    }
    confsmoe_ctx_free(ctx, ints);
    confsmoe_ctx_free(ctx, reals);
    confsmoe_ctx_free(ctx, mean);
    return s;
}
