/* Private: expert entry points for layers of the library that have already validated. */
#ifndef CONFSMOE_EXPERT_H
#define CONFSMOE_EXPERT_H

#include "internal.h"

/* Backward of one forward call that belongs to e and has not run yet. dy and dx are
 * [n, d] rows (dx may be NULL), scratch holds n * h floats. Never fails, so a caller
 * can run it after it has started to change gradients. */
void csm_expert_backward_rows(confsmoe_expert *e, confsmoe_saved *saved, const float *dy, float *dx, float *scratch);

#endif /* CONFSMOE_EXPERT_H */
