/* Private: one expert's confidence network, c = sigmoid(v . LN(y) + beta), over a block of rows. */
#ifndef CONFSMOE_CONFNET_H
#define CONFSMOE_CONFNET_H

#include <stdint.h>

typedef struct {
    const float *ln_weight, *ln_bias, *w, *b;  /* [d], [d], [d], [1] */
    float *d_ln_weight, *d_ln_bias, *dw, *db;  /* their gradients */
} csm_confnet;

/* What forward keeps per row block for backward. */
typedef struct {
    float *normed;  /* [rows, d] LN(y) */
    float *mean, *rstd;  /* [rows] */
} csm_confnet_cache;

/* s [rows] = sigmoid(v . LN(y) + beta) of y [rows, d]. */
void csm_confnet_forward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, float *s,
                         csm_confnet_cache *cache);
/* Given ds [rows]: accumulates the ConfNet gradients and adds dL/dy to dy [rows, d].
 * scratch holds rows * (d + 1) floats. */
void csm_confnet_backward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, const float *s,
                          const float *ds, const csm_confnet_cache *cache, float *dy, float *scratch);

#endif /* CONFSMOE_CONFNET_H */
