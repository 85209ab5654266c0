/* Private: a named list of (parameter, gradient) tensors, owned or borrowed from a child layer:
 * every layer's parameter view (expert, gate, imputer, model) and its public accessors. */
#ifndef CONFSMOE_PARAMS_H
#define CONFSMOE_PARAMS_H

#include "internal.h"

#define CSM_PARAM_NAME_CAP 64

/* A zeroed list is empty and valid; entries keep their order, and the list grows as needed. */
typedef struct {
    int32_t count, cap;
    char (*names)[CSM_PARAM_NAME_CAP];
    confsmoe_tensor **param, **grad;
    bool *owned;
} csm_params;

/* Appends a new zeroed parameter [d0] (ndim 1) or [d0, d1] and its gradient, owned by the
 * list. CONFSMOE_E_NOMEM when the list cannot grow; the list is unchanged on failure. */
confsmoe_status csm_params_new(confsmoe_ctx *ctx, csm_params *list, const char *name, int32_t ndim, int64_t d0,
                               int64_t d1, confsmoe_tensor **param);
/* Appends every entry of a child's list under "<prefix>.<name>"; the child keeps ownership.
 * CONFSMOE_E_NOMEM when the list cannot grow (then nothing is appended). */
confsmoe_status csm_params_borrow_all(confsmoe_ctx *ctx, csm_params *list, const char *prefix,
                                      const csm_params *child);
void csm_params_free(confsmoe_ctx *ctx, csm_params *list);
void csm_params_zero_grad(csm_params *list);
/* The gradient tensor of a parameter in the list (NULL if not in it). */
confsmoe_tensor *csm_params_grad_of(const csm_params *list, const confsmoe_tensor *param);

/* Entry i, or NULL when out of range: the public *_param_name / *_param / *_grad of every layer. */
const char *csm_params_name(const csm_params *list, int32_t i);
confsmoe_tensor *csm_params_param(const csm_params *list, int32_t i);
confsmoe_tensor *csm_params_grad(const csm_params *list, int32_t i);

#endif /* CONFSMOE_PARAMS_H */
