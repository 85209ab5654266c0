/* Private to the gate's files: the gate's struct, what a forward keeps, and the calls that cross
 * them. gate.c: creation, parameters, statistics and the public API (which validates);
 * gate_forward.c / gate_backward.c: one call's work; gate_experts.c: the expert runner, the one
 * place where a gate with local experts and a gate behind an exchange differ. */
#ifndef CONFSMOE_GATE_INTERNAL_H
#define CONFSMOE_GATE_INTERNAL_H

#include "arena.h"
#include "confnet.h"
#include "gate.h"
#include "internal.h"
#include "load_loss.h"
#include "params.h"
#include "router.h"
#include "usage.h"

struct confsmoe_gate {
    confsmoe_ctx *ctx;
    confsmoe_gate_params p;
    int32_t n_experts;
    confsmoe_expert **experts;    /* borrowed; NULL with an exchange */
    confsmoe_gate_exchange exchange; /* where the experts run when experts is NULL */
    int64_t shard_first, shard_total; /* the next calls' tokens in their global batch (total 0: not a shard) */
    csm_router router;
    int32_t conf_first;           /* under CONFIDENCE, the index in params of conf.0.ln.weight */
    confsmoe_tensor *target_w, *target_b, *target_dw, *target_db;
    csm_params params;
    csm_usage last, total;
    csm_usage mark_last, mark_total; /* copies taken by csm_gate_usage_mark */
    csm_arena *arena;             /* lent by the model for a step, else NULL */
};

/* Everything one forward keeps. Rows of the "block" arrays are the n*k slots sorted
 * by expert, so that each expert sees one contiguous batch. */
typedef struct {
    confsmoe_saved base;
    int64_t n;
    bool conf_loss;              /* the confidence loss was computed */
    float den;                   /* its denominator */
    float *x;                    /* [n, d] (training) */
    float *u_clean, *u;          /* [n, E]; u == u_clean without noise */
    float *h, *eps, *sigma;      /* [n, E] when noisy, else NULL */
    int32_t *idx;                /* [n, k] */
    float *g;                    /* [n, k] softmax over the kept logits */
    float *c;                    /* [n, k] confidence per slot (CONFIDENCE) */
    int64_t *offset;             /* [E + 1] first block row of each expert */
    int32_t *by_rows;            /* [E] the experts, most block rows first: the order in which
                                  * the per-expert tasks claim them, so that the last ones to
                                  * start are short and the workers finish together */
    int64_t *row_of;             /* [n k] slot -> block row */
    int64_t *slot_of;            /* [n k] block row -> slot t * k + j */
    float *yb;                   /* [n k, d] expert outputs in block order */
    float *s;                    /* [n k] ConfNet output per block row */
    csm_confnet_cache cache;     /* [n k] each */
    float *probs;                /* [n k, C] softmax or sigmoid of the target classifier */
    int32_t *labels;             /* [n] single-label */
    uint8_t *multi_labels;       /* [n, C] multi-label */
    uint8_t *present;            /* [n] */
    float *kept_block;           /* what local experts keep for backward, a second block (training only) */
    csm_arena *arena;            /* the arena lent when the blocks were allocated, or NULL */
    size_t *kept_at;             /* [E + 1] offset of expert e's part of kept_block, in floats */
    void *call;                  /* the exchange's state for backward, or NULL */
    /* The exchange's release and user, copied: the handle may be destroyed after its gate. */
    void (*release_call)(void *user, void *call);
    void *exchange_user;
} gate_saved;

/* Tokens per task of the loops over tokens. */
#define CSM_GATE_TOKEN_GRAIN 256

/* Per-call blocks come from the lent arena when there is one and they fit. */
static inline void *csm_gate_alloc(const confsmoe_gate *g, size_t bytes)
{
    return csm_lent_alloc(g->ctx, g->arena, bytes);
}

static inline bool csm_gate_confidence(const confsmoe_gate *g)
{
    return g->p.combine == CONFSMOE_COMBINE_CONFIDENCE;
}

/* The load losses' view of a forward. */
static inline csm_load_input csm_gate_load_input(const confsmoe_gate *g, const gate_saved *s)
{
    return (csm_load_input){s->n, g->n_experts, g->p.k, s->idx, s->g, s->eps ? s->u_clean : NULL,
                            s->eps ? s->u : NULL, s->sigma, s->eps};
}

/* gate.c: expert e's ConfNet over its parameter tensors, read at every call: their memory may
 * be the host's (confsmoe_tensor_set_data). */
csm_confnet csm_gate_confnet(const confsmoe_gate *g, int32_t e);
/* gate.c: the target classifier and confidence loss over a forward's block rows. */
csm_confidence_target csm_gate_target(const confsmoe_gate *g, const gate_saved *s);
/* gate.c: expert e's block of a forward's rows, for its ConfNet. */
csm_confnet_block csm_gate_confnet_block(const confsmoe_gate *g, gate_saved *s, int32_t e, const csm_confnet *net);

/* gate_experts.c, the expert runner. The input rows of expert e's block, in block order:
 * slot j of token t runs on token t (compat: the reference ran it on token (t k + j) mod N). */
void csm_gate_gather_rows(const confsmoe_gate *g, const gate_saved *s, int32_t e, const float *x, float *out);
/* Rows of the largest expert batch, and the largest rows * h (0 with an exchange); false if
 * that overflows. */
bool csm_gate_expert_sizes(const confsmoe_gate *g, const gate_saved *s, size_t *rows_max, size_t *rows_h_max);
/* Floats of scratch per worker that the runner's forward and backward need; false if that
 * overflows. */
bool csm_gate_experts_scratch(const confsmoe_gate *g, const gate_saved *s, size_t *per_worker);
/* Training with local experts: allocates s->kept_block, where they keep what backward needs.
 * false: out of memory. */
bool csm_gate_experts_keep(confsmoe_gate *g, gate_saved *s, bool training);
/* The experts' outputs yb (block order) of the call's input rows x [n, d]: local experts
 * gather each block's rows into their worker's scratch, right before they run on them; an
 * exchange gets them packed, xb [n k, d] (NULL with local experts). scratch has per_worker
 * floats (csm_gate_experts_scratch) for each worker. Fails only behind an exchange. */
confsmoe_status csm_gate_experts_forward(confsmoe_gate *g, gate_saved *s, const float *x, const float *xb,
                                         bool training, float *scratch, size_t per_worker);
/* Whether the runner's backward writes the experts' input gradients even when the caller wants
 * none: an exchange always does, so that every participant of a collective exchange makes the
 * same calls. */
bool csm_gate_experts_always_dx(const confsmoe_gate *g);
/* The experts' backward from dyb [n k, d] (block order): accumulates their gradients and writes
 * their input gradients into dxb [n k, d] (NULL: not wanted). Fails only behind an exchange. */
confsmoe_status csm_gate_experts_backward(confsmoe_gate *g, gate_saved *s, const float *dyb, float *dxb,
                                          float *scratch, size_t per_worker);

#endif /* CONFSMOE_GATE_INTERNAL_H */
