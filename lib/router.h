/* Private: the gate's router. Logits, noisy top-k and their backward, over whole batches. */
#ifndef CONFSMOE_ROUTER_H
#define CONFSMOE_ROUTER_H

#include "internal.h"

typedef struct {
    int32_t kind;                 /* CONFSMOE_ROUTER_* */
    int32_t n_experts;
    int64_t d;
    confsmoe_tensor *w, *dw;      /* [d, E]: column e is w_e */
    confsmoe_tensor *wn, *dwn;    /* [d, E] noise network, or NULL */
    float *per_expert;            /* scratch of E floats */
} csm_router;

/* Clean logits u [n, E] of x [n, d]. */
void csm_router_logits(const csm_router *r, const float *x, int64_t n, float *u);
/* Adds eps * (softplus(h) + 0.01) to u, with h = x W_noise and eps ~ N(0, 1) drawn
 * row-major from `noise` (n E CSM_NORMAL_DRAWS positions); keeps h and eps for backward. */
void csm_router_add_noise(const csm_router *r, csm_substream *noise, const float *x, int64_t n, float *u, float *h,
                          float *eps);
/* Indices of the k largest u of each row, best first; ties go to the lower index. */
void csm_router_topk(const float *u, int64_t n, int32_t n_experts, int32_t k, int32_t *idx);
/* Backward of the clean logits (du_clean [n, E]) and, when noisy, of the noise scale
 * (dsigma [n, E] = dL/d(softplus(h) + 0.01)). Accumulates dW, dW_noise and dx [n, d] (dx may be NULL).
 * u_clean and h are what forward produced; scratch holds n * E floats. */
void csm_router_backward(const csm_router *r, const float *x, int64_t n, const float *u_clean, const float *h,
                         const float *du_clean, const float *dsigma, float *dx, float *scratch);

#endif /* CONFSMOE_ROUTER_H */
