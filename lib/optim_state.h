/* Private: the optimizer's per-parameter state, for checkpoints. */
#ifndef CONFSMOE_OPTIM_STATE_H
#define CONFSMOE_OPTIM_STATE_H

#include "internal.h"

/* One registered parameter. The buffers belong to the optimizer and hold
 * param->numel floats each. */
typedef struct {
    confsmoe_tensor *param;  /* borrowed from the host */
    float *m;                /* Adam first moment, or SGD momentum buffer */
    float *v;                /* Adam second moment; NULL under SGD */
    int64_t steps;           /* updates applied to this parameter */
} csm_optim_slot_state;

confsmoe_ctx *csm_optim_ctx(const confsmoe_optim *o);
const confsmoe_optim_params *csm_optim_hparams(const confsmoe_optim *o);
size_t csm_optim_n_slots(const confsmoe_optim *o);
/* Slot i < csm_optim_n_slots(o), in registration order. */
csm_optim_slot_state csm_optim_slot(const confsmoe_optim *o, size_t i);
void csm_optim_set_steps(confsmoe_optim *o, size_t i, int64_t steps);

#endif /* CONFSMOE_OPTIM_STATE_H */
