/* Private: what the model uses of its gate beyond the public gate API. */
#ifndef CONFSMOE_GATE_H
#define CONFSMOE_GATE_H

#include "arena.h"
#include "internal.h"
#include "params.h"

/* The gate's parameter list (router, noise, ConfNets, target classifier). */
const csm_params *csm_gate_param_list(const confsmoe_gate *g);
/* The arena the gate allocates its per-call blocks from (NULL: none). Every saved handle made
 * while it is set must be destroyed before the arena is reset. */
void csm_gate_set_arena(confsmoe_gate *g, csm_arena *arena);
/* Keep a copy of the gate's utilisation counters, and put it back, so that a model call that
 * fails after some of its gate calls leaves the statistics as they were. */
void csm_gate_usage_mark(confsmoe_gate *g);
void csm_gate_usage_rollback(confsmoe_gate *g);
/* Stream positions the noise of `tokens` tokens takes in a training forward (0 unless noisy):
 * a training forward reserves those of its whole batch (confsmoe_gate_set_shard). */
int64_t csm_gate_noise_draws(const confsmoe_gate *g, int64_t tokens);

/* One forward call over raw rows, for a caller that has validated them (the model): what
 * confsmoe_gate_forward does after its checks. */
typedef struct {
    int64_t n;                    /* tokens */
    const float *x;               /* [n, d], finite */
    const uint8_t *present;       /* [n] of 0 / 1, or NULL: all present */
    const int32_t *labels;        /* [n] in 0 .. C - 1: training under CONFIDENCE, single-label */
    const uint8_t *multi_labels;  /* [n, C] of 0 / 1: training under CONFIDENCE, multi-label */
    float *y;                     /* [n, d] */
    int32_t *topk;                /* [n, k], or NULL */
    float *slots;                 /* [n, k, d], or NULL */
    int64_t shard_first, shard_total; /* the tokens' place in their global batch (total 0: none), which fits */
    float *loss;                  /* or NULL */
    confsmoe_saved **saved;       /* training: receives the handle; NULL: inference */
} csm_gate_call;
confsmoe_status csm_gate_forward_rows(confsmoe_gate *g, const csm_gate_call *call);

/* The backward of such a call (or of confsmoe_gate_forward's), for a caller that has validated:
 * saved is an unconsumed training handle of this gate, and the arrays are finite. */
typedef struct {
    confsmoe_saved *saved;
    const float *dy;              /* [n, d] */
    const float *dslots;          /* [n, k, d], or NULL */
    float dloss;
    float *dx;                    /* [n, d] (written), or NULL; may overlap dy and dslots */
} csm_gate_grad_call;
confsmoe_status csm_gate_backward_rows(confsmoe_gate *g, const csm_gate_grad_call *call);

#endif /* CONFSMOE_GATE_H */
