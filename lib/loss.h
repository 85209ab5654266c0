/* Private: the model's task loss on its logits. */
#ifndef CONFSMOE_LOSS_H
#define CONFSMOE_LOSS_H

#include <stdbool.h>
#include <stdint.h>

/* The mean softmax cross-entropy (labels int32 [B]) or, when multilabel, the mean binary
 * cross-entropy with logits (labels u8 [B, C]) of logits [B, C] over a global batch of
 * global_B samples: this batch's share of it, returned, and its gradient with respect to the
 * logits in dlogits [B, C]. */
float csm_task_loss(const float *logits, const void *labels, bool multilabel, int64_t B, int64_t global_B, int64_t C,
                    float *dlogits);

#endif /* CONFSMOE_LOSS_H */
