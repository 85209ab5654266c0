/* Private: a named list of (parameter, gradient) tensors, owned or borrowed from a child layer. */
#ifndef CONFSMOE_PARAMS_H
#define CONFSMOE_PARAMS_H

#include "internal.h"

#define CSM_PARAM_NAME_CAP 64

typedef struct {
    int32_t count, cap;
    char (*names)[CSM_PARAM_NAME_CAP];
    confsmoe_tensor **param, **grad;
    bool *owned;
} csm_params;

/* Room for cap entries; false when out of memory. */
bool csm_params_reserve(confsmoe_ctx *ctx, csm_params *list, int32_t cap);
/* A new zeroed parameter [d0] (ndim 1) or [d0, d1] and its gradient, owned by the list. */
confsmoe_status csm_params_new(confsmoe_ctx *ctx, csm_params *list, const char *name, int32_t ndim, int64_t d0,
                               int64_t d1, confsmoe_tensor **param);
/* A child's parameter under "<prefix>.<name>"; the child keeps ownership. */
void csm_params_borrow(csm_params *list, const char *prefix, const char *name, confsmoe_tensor *param,
                       confsmoe_tensor *grad);
void csm_params_free(confsmoe_ctx *ctx, csm_params *list);
void csm_params_zero_grad(csm_params *list);
/* The gradient tensor of an owned parameter (NULL if not in the list). */
confsmoe_tensor *csm_params_grad_of(const csm_params *list, const confsmoe_tensor *param);

#endif /* CONFSMOE_PARAMS_H */
