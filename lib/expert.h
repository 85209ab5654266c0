/* Private: expert entry points for layers of the library that have already validated. */
#ifndef CONFSMOE_EXPERT_H
#define CONFSMOE_EXPERT_H

#include "internal.h"
#include "params.h"

/* The expert's parameter list (w1, b1, w2, b2), which a model appends to its own. */
const csm_params *csm_expert_param_list(const confsmoe_expert *e);

/* Floats per row that a training forward keeps for backward: GELU(pre) and GELU'(pre), h each. */
#define CSM_EXPERT_KEPT(h) (2 * (h))

/* Forward of n rows x [n, d] -> y [n, d] (written) with the caller's buffers. Training: kept
 * [n, CSM_EXPERT_KEPT(h)] receives what backward needs (act unused). Inference: kept is NULL
 * and act [n, h] is scratch. y must not overlap kept or act. Never fails. */
void csm_expert_forward_rows(const confsmoe_expert *e, const float *x, int64_t n, float *y, float *kept, float *act);
/* Backward of such a forward, from x and what it kept. dy [n, d] accumulates the expert's
 * gradients and writes dx [n, d] (may be NULL; may alias dy). scratch holds n h floats. Never
 * fails, so a caller can run it after it has started to change gradients. */
void csm_expert_backward_rows(confsmoe_expert *e, const float *x, const float *kept, int64_t n, const float *dy,
                              float *dx, float *scratch);

#endif /* CONFSMOE_EXPERT_H */
