/* Named parameter lists: the uniform parameter view of every layer. */
#include <stdio.h>
#include <string.h>

#include "params.h"

/* Room for `more` entries past count; false when out of memory (the list is unchanged). */
static bool params_make_room(confsmoe_ctx *ctx, csm_params *list, int32_t more)
{
    if (more <= list->cap - list->count)
        return true;
    if (more > INT32_MAX - list->count)
        return false;
    const int32_t need = list->count + more;
    int32_t cap = list->cap > 0 ? list->cap : 16;
    while (cap < need)
        cap = cap > INT32_MAX / 2 ? need : 2 * cap;
    csm_params grown = {list->count, cap, csm_calloc(ctx, (size_t)cap, sizeof *list->names),
                        csm_calloc(ctx, (size_t)cap, sizeof *list->param),
                        csm_calloc(ctx, (size_t)cap, sizeof *list->grad),
                        csm_calloc(ctx, (size_t)cap, sizeof *list->owned)};
    if (!grown.names || !grown.param || !grown.grad || !grown.owned) {
        csm_free(ctx, grown.names);
        csm_free(ctx, grown.param);
        csm_free(ctx, grown.grad);
        csm_free(ctx, grown.owned);
        return false;
    }
    const size_t n = (size_t)list->count;
    if (n > 0) {
        memcpy(grown.names, list->names, n * sizeof *list->names);
        memcpy(grown.param, list->param, n * sizeof *list->param);
        memcpy(grown.grad, list->grad, n * sizeof *list->grad);
        memcpy(grown.owned, list->owned, n * sizeof *list->owned);
    }
    csm_free(ctx, list->names);
    csm_free(ctx, list->param);
    csm_free(ctx, list->grad);
    csm_free(ctx, list->owned);
    *list = grown;
    return true;
}

confsmoe_status csm_params_new(confsmoe_ctx *ctx, csm_params *list, const char *name, int32_t ndim, int64_t d0,
                               int64_t d1, confsmoe_tensor **param)
{
    if (!params_make_room(ctx, list, 1))
        return CONFSMOE_E_NOMEM;
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

confsmoe_status csm_params_borrow_all(confsmoe_ctx *ctx, csm_params *list, const char *prefix,
                                      const csm_params *child)
{
    if (!params_make_room(ctx, list, child->count))
        return CONFSMOE_E_NOMEM;
    for (int32_t j = 0; j < child->count; j++) {
        const int32_t i = list->count++;
        snprintf(list->names[i], CSM_PARAM_NAME_CAP, "%s.%s", prefix, child->names[j]);
        list->param[i] = child->param[j];
        list->grad[i] = child->grad[j];
        list->owned[i] = false;
    }
    return CONFSMOE_OK;
}

void csm_params_free(confsmoe_ctx *ctx, csm_params *list)
{
    for (int32_t i = 0; i < list->count; i++) {
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

const char *csm_params_name(const csm_params *list, int32_t i)
{
    return i >= 0 && i < list->count ? list->names[i] : NULL;
}

confsmoe_tensor *csm_params_param(const csm_params *list, int32_t i)
{
    return i >= 0 && i < list->count ? list->param[i] : NULL;
}

confsmoe_tensor *csm_params_grad(const csm_params *list, int32_t i)
{
    return i >= 0 && i < list->count ? list->grad[i] : NULL;
}
