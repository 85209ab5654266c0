/* Private: the model's multi-head self-attention over its L = sum_m S_m tokens and the residual
 * dropout after it, forward and backward, on the model's workspace (model.h). Forward draws
 * the attention dropout (kept in w->attn_keep for backward) and the residual dropout (redrawn
 * by backward from the same stream positions), from w->draws. */
#ifndef CONFSMOE_ATTENTION_H
#define CONFSMOE_ATTENTION_H

#include "model.h"

/* Floats of one worker's scratch (w->scratch_stride): P, dropped P and dP [L, L], then one
 * row's residual dropout draws [d] (bytes). */
size_t csm_attention_scratch_floats(int64_t L, int64_t d);
/* Whether a training step keeps the attention weights [B, heads, L, L] for backward
 * (w->attn_weights) rather than computing them again there. */
bool csm_attention_keeps_weights(int64_t L, int64_t d, int64_t heads);
/* Q, K, V from w->Xn, the weights per (sample, head), ctx_, and A = o(ctx_) into w->H2. */
void csm_attention_forward(confsmoe_model *model, workspace *w);
/* Hm (per-modality layout) = X + Dropout(A), or A + Dropout(A) under compat. */
void csm_residual_forward(confsmoe_model *model, workspace *w);
/* g->dA from g->dH through the residual dropout. */
void csm_residual_backward(confsmoe_model *model, workspace *w, gradients *g);
/* g->dXn from g->dA; accumulates the projections' parameter gradients. */
void csm_attention_backward(confsmoe_model *model, workspace *w, gradients *g);

#endif /* CONFSMOE_ATTENTION_H */
