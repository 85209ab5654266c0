/* Private: expert-utilisation counters of a gate (usage.c) and the figures computed from them
 * (usage_report.c, which libconfsmoe_mpi compiles too). */
#ifndef CONFSMOE_USAGE_H
#define CONFSMOE_USAGE_H

#include "internal.h"

typedef struct {
    int64_t tokens;
    int64_t *load;        /* [E] slots per expert */
    int64_t *conf_count;  /* [E] slots that carried a confidence */
    double *conf_sum;     /* [E] sum of those confidences */
    double conf_loss_sum;
    int64_t conf_loss_calls;   /* training calls that computed a confidence loss */
} csm_usage;

/* Allocates the per-expert arrays of one counter set; false when out of memory. */
bool csm_usage_init(confsmoe_ctx *ctx, csm_usage *u, int32_t n_experts);
void csm_usage_free(confsmoe_ctx *ctx, csm_usage *u);
void csm_usage_clear(csm_usage *u, int32_t n_experts);
/* Adds one call: idx [n, k]; conf [n, k] or NULL; conf_loss when has_conf_loss. */
void csm_usage_add(csm_usage *u, const int32_t *idx, const float *conf, int64_t n, int32_t k, bool has_conf_loss,
                   float conf_loss);
/* The figures of confsmoe_gate_stats from u into out (a whole struct); load and mean_confidence
 * [n_experts] or NULL. conf_loss is conf_loss_sum / conf_loss_calls (0 without calls). */
void csm_usage_report(const csm_usage *u, int32_t n_experts, confsmoe_gate_stats *out, int64_t *load,
                      double *mean_confidence);

#endif /* CONFSMOE_USAGE_H */
