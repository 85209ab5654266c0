/* The figures of confsmoe_gate_stats from expert-utilisation counters: load entropy, CV^2 and
 * maximum share. Pure arithmetic (no ctx, no allocation), so libconfsmoe_mpi compiles this file
 * too and computes the figures of counters summed over ranks with the same code. */
#include <math.h>

#include "usage.h"

void csm_usage_report(const csm_usage *u, int32_t n_experts, confsmoe_gate_stats *out, int64_t *load,
                      double *mean_confidence)
{
    double total = 0.0, top = 0.0;
    for (int32_t e = 0; e < n_experts; e++) {
        total += (double)u->load[e];
        top = (double)u->load[e] > top ? (double)u->load[e] : top;
    }
    double entropy = 0.0, mean = total / n_experts, var = 0.0;
    for (int32_t e = 0; e < n_experts; e++) {
        double share = total > 0.0 ? (double)u->load[e] / total : 0.0;
        if (share > 0.0)
            entropy -= share * log(share);
        var += ((double)u->load[e] - mean) * ((double)u->load[e] - mean);
        if (load)
            load[e] = u->load[e];
        if (mean_confidence)
            mean_confidence[e] = u->conf_count[e] > 0 ? u->conf_sum[e] / (double)u->conf_count[e] : NAN;
    }
    out->tokens = u->tokens;
    out->load_entropy = n_experts > 1 ? entropy / log((double)n_experts) : 1.0;
    out->load_cv2 = n_experts > 1 && mean > 0.0 ? var / (n_experts - 1) / (mean * mean) : 0.0;
    out->max_load_fraction = total > 0.0 ? top / total : 0.0;
    out->conf_loss = u->conf_loss_calls > 0 ? u->conf_loss_sum / (double)u->conf_loss_calls : 0.0;
}
