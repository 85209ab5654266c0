/* The Linear layer of linear.h. */
#include <math.h>
#include <stdio.h>

#include "kernels.h"
#include "linear.h"
#include "passes.h"

confsmoe_status csm_linear_new(confsmoe_ctx *ctx, csm_params *params, const char *name, int64_t in, int64_t out,
                               csm_linear *l)
{
    char buf[CSM_PARAM_NAME_CAP];
    snprintf(buf, sizeof buf, "%s.w", name);
    confsmoe_status s = csm_params_new(ctx, params, buf, 2, out, in, &l->w);
    snprintf(buf, sizeof buf, "%s.b", name);
    if (s == CONFSMOE_OK)
        s = csm_params_new(ctx, params, buf, 1, out, 0, &l->b);
    if (s == CONFSMOE_OK) {
        /* nn.Linear: U(-1/sqrt(fan_in), +1/sqrt(fan_in)) for weight and bias. */
        float bound = 1.0f / sqrtf((float)in);
        csm_fill_uniform(ctx, l->w, bound);
        csm_fill_uniform(ctx, l->b, bound);
    }
    return s;
}

void csm_linear_forward(const csm_linear *l, const float *x, int64_t rows, float *y)
{
    const int64_t out = l->w->dims[0], in = l->w->dims[1];
    csm_pass_broadcast_rows(l->w->ctx, y, csm_f32(l->b), rows, out);
    csm_gemm(l->w->ctx, false, true, rows, out, in, 1.0f, x, csm_f32(l->w), 1.0f, y);
}

void csm_linear_backward(const csm_linear *l, const csm_params *params, const float *x, const float *dy, int64_t rows,
                         float *dx, bool accumulate)
{
    const int64_t out = l->w->dims[0], in = l->w->dims[1];
    csm_gemm(l->w->ctx, true, false, out, in, rows, 1.0f, dy, x, 1.0f, csm_f32(csm_params_grad_of(params, l->w)));
    csm_add_column_sums(csm_f32(csm_params_grad_of(params, l->b)), dy, rows, out);
    if (dx)
        csm_gemm(l->w->ctx, false, false, rows, in, out, 1.0f, dy, csm_f32(l->w), accumulate ? 1.0f : 0.0f, dx);
}
