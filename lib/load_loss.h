/* Private: the load-balancing losses of the softmax-gate baselines. */
#ifndef CONFSMOE_LOAD_LOSS_H
#define CONFSMOE_LOAD_LOSS_H

#include <stdbool.h>
#include <stdint.h>

typedef struct {
    int64_t n;
    int32_t n_experts, k;
    const int32_t *idx;     /* [n, k] top-k experts */
    const float *g;         /* [n, k] softmax over the kept logits */
    /* Noisy training only (else NULL): the smooth load estimator of Shazeer et al. */
    const float *u_clean;   /* [n, E] */
    const float *u_noisy;   /* [n, E] */
    const float *sigma;     /* [n, E] noise scale softplus(h) + 0.01 */
    const float *eps;       /* [n, E] the noise draws */
} csm_load_input;

/* The loss value. work holds 2 E doubles. */
float csm_load_loss_forward(int32_t kind, const csm_load_input *in, double *work);
/* Accumulates dg [n, k], and for the smooth load du_clean and dsigma [n, E]. */
void csm_load_loss_backward(int32_t kind, const csm_load_input *in, float dloss, double *work, float *dg,
                            float *du_clean, float *dsigma);

#endif /* CONFSMOE_LOAD_LOSS_H */
