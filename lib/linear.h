/* Private: a Linear layer, y = x W^T + b, whose tensors live in a layer's parameter list
 * (params.h): the model's encoders, attention projections, readout and head. */
#ifndef CONFSMOE_LINEAR_H
#define CONFSMOE_LINEAR_H

#include "internal.h"
#include "params.h"

typedef struct {
    confsmoe_tensor *w, *b;  /* [out, in], [out] */
} csm_linear;

/* Appends "<name>.w" and "<name>.b" to the list, initialised like torch.nn.Linear (draws from
 * the ctx stream). CONFSMOE_E_NOMEM when the list cannot grow. */
confsmoe_status csm_linear_new(confsmoe_ctx *ctx, csm_params *params, const char *name, int64_t in, int64_t out,
                               csm_linear *l);
/* y [rows, out] = x [rows, in] W^T + b. */
void csm_linear_forward(const csm_linear *l, const float *x, int64_t rows, float *y);
/* Accumulates dW, db into the gradients of `params`; dx (if not NULL) is written, or added to
 * when accumulate. */
void csm_linear_backward(const csm_linear *l, const csm_params *params, const float *x, const float *dy, int64_t rows,
                         float *dx, bool accumulate);

#endif /* CONFSMOE_LINEAR_H */
