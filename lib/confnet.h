/* Private: one expert's confidence network, c = sigmoid(v . LN(y) + beta), over a block of rows. */
#ifndef CONFSMOE_CONFNET_H
#define CONFSMOE_CONFNET_H

#include <stdint.h>

typedef struct {
    const float *ln_weight, *ln_bias, *w, *b;  /* [d], [d], [d], [1] */
    float *d_ln_weight, *d_ln_bias, *dw, *db;  /* their gradients */
} csm_confnet;

/* What forward keeps per row for backward (LN(y) itself is recomputed from these). */
typedef struct {
    float *mean, *rstd;  /* [rows] of LN */
    float *z;            /* [rows] sum_c xhat_c ln_weight_c w_c, xhat = (y - mean) rstd */
} csm_confnet_cache;

/* s [rows] = sigmoid(v . LN(y) + beta) of y [rows, d], one fused pass per row.
 * scratch holds d floats. */
void csm_confnet_forward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, float *s,
                         csm_confnet_cache *cache, float *scratch);
/* Given ds [rows]: accumulates the ConfNet gradients and adds dL/dy to dy [rows, d].
 * scratch holds 2 d floats. */
void csm_confnet_backward(const csm_confnet *net, const float *y, int64_t rows, int64_t d, const float *s,
                          const float *ds, const csm_confnet_cache *cache, float *dy, float *scratch);

#endif /* CONFSMOE_CONFNET_H */
