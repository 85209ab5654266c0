/* Expert utilisation counters of a gate (the figures: usage_report.c). */
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
