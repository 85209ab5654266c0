/* Named parameter lists: the uniform parameter view of layers built from other layers. */
#include <stdio.h>
#include <string.h>

#include "params.h"

bool csm_params_reserve(confsmoe_ctx *ctx, csm_params *list, int32_t cap)
{
    memset(list, 0, sizeof *list);
    list->names = csm_calloc(ctx, (size_t)cap, sizeof *list->names);
    list->param = csm_calloc(ctx, (size_t)cap, sizeof *list->param);
    list->grad = csm_calloc(ctx, (size_t)cap, sizeof *list->grad);
    list->owned = csm_calloc(ctx, (size_t)cap, sizeof *list->owned);
    list->cap = cap;
    return list->names && list->param && list->grad && list->owned;
}

confsmoe_status csm_params_new(confsmoe_ctx *ctx, csm_params *list, const char *name, int32_t ndim, int64_t d0,
                               int64_t d1, confsmoe_tensor **param)
{
    if (list->count >= list->cap)
        return CONFSMOE_E_INTERNAL;
    const int64_t dims[2] = {d0, d1};
    const int32_t i = list->count;
    confsmoe_status s = confsmoe_tensor_create(ctx, CONFSMOE_F32, ndim, dims, &list->param[i]);
    if (s == CONFSMOE_OK)
        s = confsmoe_tensor_create(ctx, CONFSMOE_F32, ndim, dims, &list->grad[i]);
    if (s != CONFSMOE_OK) {
        confsmoe_tensor_destroy(list->param[i]);
        list->param[i] = NULL;
        return s;
    }
    snprintf(list->names[i], CSM_PARAM_NAME_CAP, "%s", name);
    list->owned[i] = true;
    list->count++;
    if (param)
        *param = list->param[i];
    return CONFSMOE_OK;
}

void csm_params_borrow(csm_params *list, const char *prefix, const char *name, confsmoe_tensor *param,
                       confsmoe_tensor *grad)
{
    if (list->count >= list->cap)
        return;
    const int32_t i = list->count++;
    snprintf(list->names[i], CSM_PARAM_NAME_CAP, "%s.%s", prefix, name);
    list->param[i] = param;
    list->grad[i] = grad;
    list->owned[i] = false;
}

void csm_params_free(confsmoe_ctx *ctx, csm_params *list)
{
    for (int32_t i = 0; list->owned && i < list->count; i++) {
        if (!list->owned[i])
            continue;
        confsmoe_tensor_destroy(list->param[i]);
        confsmoe_tensor_destroy(list->grad[i]);
    }
    csm_free(ctx, list->names);
    csm_free(ctx, list->param);
    csm_free(ctx, list->grad);
    csm_free(ctx, list->owned);
    memset(list, 0, sizeof *list);
}

void csm_params_zero_grad(csm_params *list)
{
    for (int32_t i = 0; i < list->count; i++)
        memset(list->grad[i]->data, 0, list->grad[i]->nbytes);
}

confsmoe_tensor *csm_params_grad_of(const csm_params *list, const confsmoe_tensor *param)
{
    for (int32_t i = 0; i < list->count; i++)
        if (list->param[i] == param)
            return list->grad[i];
    return NULL;
}
