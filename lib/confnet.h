/* Private: the confidence side of the gate (docs/MODEL.md, section 4): each expert's confidence
 * network, c = sigmoid(v . LN(y) + beta), over a block of rows, and the target classifier with
 * the confidence loss that trains it. */
#ifndef CONFSMOE_CONFNET_H
#define CONFSMOE_CONFNET_H

#include <stdbool.h>
#include <stdint.h>
#include "confsmoe.h"

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

/* One expert's block of rows of a gate call. slot_of [rows] maps its rows to their slots t k + j;
 * c and dc are per slot of the whole call. Expert level: every slot of the block takes the
 * block's mean confidence. */
typedef struct {
    const csm_confnet *net;
    const float *y;            /* [rows, d] the expert's outputs */
    int64_t rows, d;
    bool expert_level;
    const int64_t *slot_of;    /* [rows] */
    float *s;                  /* [rows] ConfNet output */
    csm_confnet_cache cache;   /* [rows] each */
} csm_confnet_block;

/* s of the block's rows, and c [slot] of its slots. scratch holds d floats. */
void csm_confnet_block_forward(const csm_confnet_block *b, float *c, float *scratch);
/* From dc [slot]: ds [rows] of the block, the ConfNet's gradients, and dL/dy added to dy
 * [rows, d]. scratch holds 2 d floats. */
void csm_confnet_block_backward(const csm_confnet_block *b, const float *dc, float *ds, float *dy, float *scratch);

/* The target classifier p = softmax / sigmoid(y W^T + b) over a call's n k block rows, and the
 * confidence loss mean over present slots of (c - p(truth))^2. */
typedef struct {
    confsmoe_ctx *ctx;
    int64_t k, d, n_classes;
    bool multi_label;
    bool compat;                  /* the mean counts absent slots too, as the reference did */
    const float *w, *b;           /* [C, d], [C] */
    float *dw, *db;               /* their gradients */
    const int64_t *slot_of;       /* [n k] block row -> slot */
    const uint8_t *present;       /* [n] */
    const int32_t *labels;        /* [n] single-label */
    const uint8_t *multi_labels;  /* [n, C] multi-label */
    const float *c;               /* [n k] confidence per slot */
    float *probs;                 /* [n k, C] written by forward, read by backward */
} csm_confidence_target;

/* The loss over block rows y [rows, d]; writes probs and *den, the loss's denominator. */
float csm_confidence_loss_forward(const csm_confidence_target *t, const float *y, int64_t rows, float *den);
/* Rows begin .. end - 1: adds scale (c - p) to dc [slot] and, unless detached, writes dz [rows, C]
 * = dL/d(target logits) (zero rows for absent tokens). */
void csm_confidence_loss_rows(const csm_confidence_target *t, float scale, bool detach, int64_t begin, int64_t end,
                              float *dc, float *dz);
/* dy [rows, d] += dz W: the classifier's part of its input rows' gradient. */
void csm_target_backward_input(const csm_confidence_target *t, const float *dz, int64_t rows, float *dy);
/* dW += dz^T y, db += the column sums of dz, over the call's rows. */
void csm_target_backward_params(const csm_confidence_target *t, const float *dz, const float *y, int64_t rows);

#endif /* CONFSMOE_CONFNET_H */
