/* Expert-utilisation statistics summed over the ranks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mpi_internal.h"

confsmoe_status confsmoe_mpi_gate_stats_get(MPI_Comm comm, confsmoe_gate *g, int32_t scope, confsmoe_gate_stats *out,
                                            int64_t *load, double *mean_confidence, int32_t n)
{
    static const char fn[] = "mpi_gate_stats_get";
    if (!g)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: the gate is NULL", fn);
    const int32_t E = confsmoe_gate_n_experts(g);
    if ((load || mean_confidence) && n != E)
        return cmpi_fail(CONFSMOE_E_SHAPE, "%s: arrays of %d given, the gate has E=%d", fn, (int)n, (int)E);
    /* ints: tokens, then the load of each expert; doubles: the sum of the confidences of each
     * expert's slots, their count, then conf_loss weighted by tokens. */
    int64_t *ints = calloc((size_t)E + 1, sizeof *ints);
    double *reals = calloc(2 * (size_t)E + 1, sizeof *reals), *mean = calloc((size_t)E, sizeof *mean);
    if (!ints || !reals || !mean) {
        free(ints);
        free(reals);
        free(mean);
        return cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    }
    confsmoe_status s = confsmoe_gate_stats_get(g, scope, out, ints + 1, mean, E);
    if (s != CONFSMOE_OK)
        s = cmpi_fail(s, "%s: confsmoe_gate_stats_get failed: %s", fn, confsmoe_status_string(s));
    if (s == CONFSMOE_OK) {
        ints[0] = out->tokens;
        for (int32_t e = 0; e < E; e++)
            if (!isnan(mean[e])) {
                reals[e] = mean[e] * (double)ints[1 + e];
                reals[E + e] = (double)ints[1 + e];
            }
        reals[2 * E] = out->conf_loss * (double)out->tokens;
    }
    cmpi_comm c = {MPI_COMM_NULL, 0, 0};
    if (s == CONFSMOE_OK)
        s = cmpi_comm_dup(comm, fn, &c);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, ints, E + 1, MPI_INT64_T, MPI_SUM, c.comm),
                       "MPI_Allreduce of the expert loads");
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, reals, 2 * E + 1, MPI_DOUBLE, MPI_SUM, c.comm),
                       "MPI_Allreduce of the confidences");
    cmpi_comm_free(&c);
    if (s == CONFSMOE_OK) {
        /* The figures of confsmoe_gate_stats, from the total loads. */
        double total = 0.0, top = 0.0, entropy = 0.0, var = 0.0;
        for (int32_t e = 0; e < E; e++) {
            total += (double)ints[1 + e];
            top = fmax(top, (double)ints[1 + e]);
        }
        const double avg = total / E;
        for (int32_t e = 0; e < E; e++) {
            const double share = total > 0.0 ? (double)ints[1 + e] / total : 0.0;
            entropy -= share > 0.0 ? share * log(share) : 0.0;
            var += ((double)ints[1 + e] - avg) * ((double)ints[1 + e] - avg);
            if (load)
                load[e] = ints[1 + e];
            if (mean_confidence)
                mean_confidence[e] = reals[E + e] > 0.0 ? reals[e] / reals[E + e] : NAN;
        }
        out->tokens = ints[0];
        out->load_entropy = E > 1 ? entropy / log((double)E) : 1.0;
        out->load_cv2 = E > 1 && avg > 0.0 ? var / (E - 1) / (avg * avg) : 0.0;
        out->max_load_fraction = total > 0.0 ? top / total : 0.0;
        out->conf_loss = ints[0] > 0 ? reals[2 * E] / (double)ints[0] : 0.0;
    }
    free(ints);
    free(reals);
    free(mean);
    return s;
}
