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

#endif /* CONFSMOE_GATE_H */
