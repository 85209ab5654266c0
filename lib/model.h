/* Private: the model's object and the state of one call, shared by the files that compute the
 * model: model.c (creation, workspace, forward and backward), model_step.c (argument checks,
 * the call's draw table, step and predict) and attention.c (attention and residual dropout). */
#ifndef CONFSMOE_MODEL_H
#define CONFSMOE_MODEL_H

#include "arena.h"
#include "internal.h"
#include "linear.h"
#include "params.h"
#include "stage1.h"

typedef struct {
    confsmoe_tensor *weight, *bias;
} model_layernorm;

struct confsmoe_model {
    confsmoe_ctx *ctx;
    confsmoe_model_params p;
    int64_t *features;            /* [M] */
    int64_t *tokens;              /* [M] S_m */
    int64_t *token_offset;        /* [M + 1] o_m = sum_{m' < m} S_m'; token_offset[M] = L */
    int64_t max_tokens;           /* max_m S_m */
    int64_t tokens_total;         /* L = sum_m S_m */
    csm_linear *enc;              /* [M] Linear(F_m, d) */
    confsmoe_tensor *pos;         /* [L, d] */
    model_layernorm ln1, ln2, ln3, ln_out;
    csm_linear q, k, v, o;        /* attention projections */
    csm_linear readout, head;     /* Linear(M d, d), Linear(d, C) */
    confsmoe_expert **experts;
    confsmoe_gate *gate;
    confsmoe_imputer *imputer;    /* two-stage imputation only */
    csm_pools pools;              /* stage 1's, [P_m, S_m F_m] each */
    csm_params params;
    /* The step's workspace and gradient blocks, kept from one call to the next (grown when
     * a bigger batch comes, freed by destroy): a training loop then touches fresh pages only
     * on its first step. */
    void *ws_cache, *grad_cache;
    size_t ws_cache_size, grad_cache_size;
    /* Lent to the gate and the imputer during a step for their per-call blocks; sized from the
     * previous step. */
    csm_arena arena;
    size_t arena_need; /* what the gate and the imputer wanted of it in the last step */
};

/* Where the draws of one call sit in the ctx stream: the first position of each part, in the
 * order the parts are laid out. model_reserve_draws (model_step.c) computes it once per
 * call and reserves the total; every draw site takes its base from it. A training step draws
 * every part, predict only stage 1's; a part drawn for the global batch takes the same
 * positions in every shard. */
typedef struct {
    uint64_t modality_dropout;  /* one position: substream b per sample (model_drop_modalities) */
    uint64_t stage_one;         /* one position: substream b M + m per (sample, modality) (stage1.h) */
    uint64_t attention;         /* csm_dropout_draws(L L) per (sample, head), in that order */
    uint64_t residual;          /* csm_dropout_draws(d) per row (sample, token) */
    uint64_t gate_noise;        /* gate_noise_per_token x (global B) S_m for each modality's gate
                                   call, in order */
    uint64_t gate_noise_per_token;
    uint64_t end;               /* the position after the call */
} model_draws;

/* Everything one forward computes and its backward reads. Rows of [B L, d] arrays are
 * (sample b, token l) with l = o_m + s; per-modality arrays are modality-major [B L, ...]: the
 * rows of modality m are B o_m .. B o_m + B S_m - 1, (sample b, token s) at B o_m + b S_m + s
 * ([M, B S, ...] when every S_m is S).
 *
 * Memory: a training forward keeps the attention weights for backward while they are small
 * beside the step's other arrays (csm_attention_keeps_weights); for longer sequences backward
 * computes them again, one (sample, head) at a time in an L x L scratch (one more Q K^T and
 * softmax per head, bit-identical). The residual dropout masks are not kept: the ctx RNG is
 * counter-based, so backward regenerates the very same draws from the stream positions in
 * draws. */
typedef struct {
    int64_t B;
    int64_t first, global_B;  /* these samples' place in their global batch (0 and B unless a shard) */
    int64_t global_present;   /* present tokens (cells x S_m) of the global batch */
    bool training;
    float **x;              /* [M] stage-1 imputed inputs [B S_m, F_m] */
    float *tok;             /* [B max S_m, d] scratch for one modality's encoder output */
    float *X, *Xn, *ln1_stats;          /* [B L, d], [B L, d], [2 B L] */
    float *Q, *K, *V, *ctx_;            /* [B L, d] */
    int workers;                        /* of the ctx's own threads (threads.h) */
    float *scratch;                     /* per worker: csm_attention_scratch_floats (attention.h) */
    size_t scratch_stride;              /* floats per worker */
    bool dropout;                       /* training with dropout > 0 */
    uint8_t *attn_keep;                 /* [B, heads, L, L] the attention dropout draws (with dropout) */
    float *attn_weights;                /* [B, heads, L, L] training, when csm_attention_keeps_weights:
                                           the attention weights, else NULL */
    model_draws draws;                  /* the call's stream positions */
    float *Hm, *sum_, *ln2_stats, *ln3_stats;  /* [B L, d] x 2 modality-major, [2 B L] x 2 (modality
                                                  m's at 2 B o_m: means, then 1/std) */
    float *Z, *F;                       /* [B max S_m, d] scratch of one gate call */
    float *H2;                          /* [B L, d] the attention output, then the MoE layer's output,
                                           then (in place) after stage 2 */
    float *slots;                       /* [B L, k, d] modality-major */
    float *pooled, *r, *rn, *ln_out_stats, *logits;  /* [B, M d], [B, d], [B, d], [2 B], [B, C] */
    int32_t *tok_labels;                /* [B max S_m] */
    uint8_t *tok_multi_labels;          /* [B max S_m, C] */
    uint8_t *tok_present;               /* [B max S_m] */
    uint8_t *avail;                     /* [B, M] the call's availability, after modality dropout */
    float *gate_weight;                 /* [M] weight of each gate call's loss */
    confsmoe_saved **gate_saved;        /* [M] */
    confsmoe_saved *imputer_saved;
} workspace;

/* Gradients of one backward, all [B L, d] unless noted. Six [B L, d] buffers serve ten
 * gradients, by lifetime: G1 = dH3, then dH = dX; G2 = dH2, then dA, then dXn; G3 = dctx;
 * G4 = dV; G5 = dQ; G6 = dK. */
typedef struct {
    float *dlogits;                  /* [B, C] */
    float *drn, *dr, *dpooled;       /* [B, d], [B, d], [B, M d] */
    float *dH3, *dH2, *dH, *dA, *dctx, *dQ, *dK, *dV, *dXn, *dX;
    float *dslots;                   /* [B L, k, d] modality-major */
    float *dsum, *dZ, *dtok;         /* [B max S_m, d] */
    float *ln_partials;              /* the LayerNorms' parameter gradients per block of rows
                                      * (csm_pass_layernorm_backward), for up to B L rows */
} gradients;

/* Stage 1 draws pool rows (or fills in the pool mean): both the draw table and the fill ask. */
static inline bool csm_model_stage_one_draws(const confsmoe_model *model, bool training)
{
    return model->p.imputation == CONFSMOE_IMPUTE_TWO_STAGE && (training || !model->p.predict_pool_mean);
}

/* model.c, for model_step.c's step and predict: one call's blocks (NULL when out of memory;
 * they stay in the model's cache), its forward and its backward. */
void *csm_model_workspace_alloc(confsmoe_model *model, int64_t B, bool training, workspace *w);
void csm_model_workspace_release(confsmoe_model *model, workspace *w);
void *csm_model_gradients_alloc(confsmoe_model *model, int64_t B, gradients *g);
confsmoe_status csm_model_forward(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                  const confsmoe_tensor *avail, const confsmoe_tensor *labels, workspace *w,
                                  float *aux);
confsmoe_status csm_model_backward(confsmoe_model *model, workspace *w, gradients *g);

#endif /* CONFSMOE_MODEL_H */
