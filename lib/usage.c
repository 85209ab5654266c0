/* Expert utilisation in numbers: load per expert, its entropy, CV^2 and maximum share. */
#include <math.h>
#include <string.h>

#include "usage.h"

bool csm_usage_init(confsmoe_ctx *ctx, csm_usage *u, int32_t n_experts)
{
    memset(u, 0, sizeof *u);
    u->load = csm_calloc(ctx, (size_t)n_experts, sizeof *u->load);
    u->conf_count = csm_calloc(ctx, (size_t)n_experts, sizeof *u->conf_count);
    u->conf_sum = csm_calloc(ctx, (size_t)n_experts, sizeof *u->conf_sum);
    return u->load && u->conf_count && u->conf_sum;
}

void csm_usage_free(confsmoe_ctx *ctx, csm_usage *u)
{
    csm_free(ctx, u->load);
    csm_free(ctx, u->conf_count);
    csm_free(ctx, u->conf_sum);
}

void csm_usage_clear(csm_usage *u, int32_t n_experts)
{
    u->tokens = 0;
    u->conf_loss_sum = 0.0;
    u->conf_loss_calls = 0;
    memset(u->load, 0, (size_t)n_experts * sizeof *u->load);
    memset(u->conf_count, 0, (size_t)n_experts * sizeof *u->conf_count);
    memset(u->conf_sum, 0, (size_t)n_experts * sizeof *u->conf_sum);
}

void csm_usage_add(csm_usage *u, const int32_t *idx, const float *conf, int64_t n, int32_t k, bool has_conf_loss,
                   float conf_loss)
{
    u->tokens += n;
    if (has_conf_loss) {
        u->conf_loss_calls++;
        u->conf_loss_sum += conf_loss;
    }
    for (int64_t i = 0; i < n * k; i++) {
        u->load[idx[i]]++;
        if (conf) {
            u->conf_count[idx[i]]++;
            u->conf_sum[idx[i]] += conf[i];
        }
    }
}

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
