/* Private: expert entry points for layers of the library that have already validated. */
#ifndef CONFSMOE_EXPERT_H
#define CONFSMOE_EXPERT_H

#include "internal.h"

/* Forward of n rows x [n, d] -> y [n, d] (written) with the caller's buffers: pre [n, h]
 * receives x W1^T + b1 for backward (or is NULL: inference), act [n, h] is scratch for
 * GELU(pre). y must not overlap pre or act. Never fails. */
void csm_expert_forward_rows(const confsmoe_expert *e, const float *x, int64_t n, float *y, float *pre, float *act);
/* Backward of such a forward, from x and pre as it left them; pre is consumed (it holds
 * GELU'(pre) afterwards). dy [n, d] accumulates the expert's gradients and writes dx [n, d]
 * (may be NULL; may alias dy). scratch holds 2 n h floats. Never fails, so a caller can run
 * it after it has started to change gradients. */
void csm_expert_backward_rows(confsmoe_expert *e, const float *x, float *pre, int64_t n, const float *dy, float *dx,
                              float *scratch);

#endif /* CONFSMOE_EXPERT_H */
