/* The model's calls (confsmoe_model_step, _step_shard and _predict): their argument checks,
 * the draw table of a call, modality dropout, and the schedule of a step around model.c's
 * forward and backward (workspace, arena, gradients kept for a failed step, RNG rollback). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "gate.h"
#include "imputer.h"
#include "internal.h"
#include "kernels.h"
#include "loss.h"
#include "model.h"

/* ------------------------------------------------------------------ checks */

/* A batch of B >= 1 samples, or B >= 0 for a shard. */
static confsmoe_status model_check_batch(confsmoe_model *model, const char *fn, const confsmoe_tensor *const *inputs,
                                         const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                         const confsmoe_tensor *logits, bool need_labels, bool shard)
{
    confsmoe_ctx *ctx = model->ctx;
    const int32_t M = model->p.n_modalities;
    const int64_t C = model->p.n_classes;
    if (!inputs)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: inputs is NULL", fn);
    const int64_t avail_dims[2] = {-1, M};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "avail", avail, CONFSMOE_U8, 2, avail_dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t B = avail->dims[0];
    if (B < 1 && !shard)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: the batch is empty", fn);
    const uint8_t *a = avail->data;
    for (int64_t i = 0; i < B * M; i++)
        if (a[i] > 1)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: avail[%" PRId64 "][%" PRId64 "] is %d; the mask is u8 [B, M] with 1 = present, 0 = missing",
                            fn, i / M, i % M, a[i]);
    for (int32_t m = 0; m < M; m++) {
        char name[32];
        snprintf(name, sizeof name, "inputs[%" PRId32 "]", m);
        const int64_t S = model->tokens[m], dims3[3] = {B, S, model->features[m]}, dims2[2] = {B, model->features[m]};
        const confsmoe_tensor *x = inputs[m];
        s = x && x->ndim == 2 && S == 1 ? csm_expect_tensor(ctx, fn, name, x, CONFSMOE_F32, 2, dims2)
                                        : csm_expect_tensor(ctx, fn, name, x, CONFSMOE_F32, 3, dims3);
        if (s == CONFSMOE_OK)
            s = csm_expect_finite(ctx, fn, name, x);
        if (s != CONFSMOE_OK)
            return s;
        bool missing = false;
        for (int64_t b = 0; b < B; b++)
            missing = missing || !a[b * M + m];
        if (missing && !model->pools.rows[m])
            return csm_fail(ctx, CONFSMOE_E_STATE,
                            "%s: modality %" PRId32 " is missing for some samples but has no pool "
                            "(call confsmoe_model_set_pool first)", fn, m);
    }
    if (logits) {
        const int64_t dims[2] = {B, C};
        if ((s = csm_expect_tensor(ctx, fn, "logits", logits, CONFSMOE_F32, 2, dims)) != CONFSMOE_OK)
            return s;
    }
    if (!need_labels)
        return CONFSMOE_OK;
    if (!model->p.multilabel) {
        if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_I32, 1, &B)) != CONFSMOE_OK)
            return s;
        const int32_t *y = labels->data;
        for (int64_t b = 0; b < B; b++)
            if (y[b] < 0 || y[b] >= C)
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                                "%s: labels[%" PRId64 "] is %" PRId32 ", out of range 0..%" PRId64, fn, b, y[b], C - 1);
    } else {
        const int64_t dims[2] = {B, C};
        if ((s = csm_expect_tensor(ctx, fn, "labels", labels, CONFSMOE_U8, 2, dims)) != CONFSMOE_OK)
            return s;
        const uint8_t *y = labels->data;
        for (int64_t i = 0; i < B * C; i++)
            if (y[i] > 1)
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: multi-label labels must be 0 or 1", fn);
    }
    return CONFSMOE_OK;
}

/* ------------------------------------------------------------------ draws, step and predict */

/* Modality dropout over a global batch: a copy of avail [B, M] in `kept` in which every present
 * cell was dropped with probability p, and a sample left with none keeps one of its present
 * modalities, chosen uniformly. Sample b draws from substream b of stream position `base`: M
 * uniforms, then one more if it was emptied. */
static void model_drop_modalities(confsmoe_model *model, const uint8_t *avail, int64_t B, uint64_t base, uint8_t *kept)
{
    const int32_t M = model->p.n_modalities;
    const float p = model->p.modality_dropout;
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *a = avail + b * M;
        uint8_t *k = kept + b * M;
        csm_substream stream = csm_rng_substream(model->ctx, base, (uint64_t)b);
        int32_t present = 0, survived = 0;
        for (int32_t m = 0; m < M; m++) {
            const bool drop = csm_substream_uniform(&stream, 0.0f, 1.0f) < p;
            k[m] = a[m] && !drop;
            present += a[m];
            survived += k[m];
        }
        if (survived == 0 && present > 0) {
            int32_t pick = (int32_t)csm_substream_uniform(&stream, 0.0f, (float)present);
            pick = pick < present ? pick : present - 1;
            for (int32_t m = 0; m < M; m++)
                if (a[m] && pick-- == 0)
                    k[m] = 1;
        }
    }
}

/* The present tokens of B samples: L_conf's weights count them (docs/MODEL.md, section 6). */
static int64_t model_count_present(const confsmoe_model *model, const uint8_t *avail, int64_t B)
{
    const int32_t M = model->p.n_modalities;
    int64_t n = 0;
    for (int64_t b = 0; b < B; b++)
        for (int32_t m = 0; m < M; m++)
            n += avail[b * M + m] * model->tokens[m];
    return n;
}

/* Reserves the draws of one call on a global batch of B samples (training: a step; else
 * predict) and lays them out. */
static model_draws model_reserve_draws(confsmoe_model *model, int64_t B, bool training)
{
    const confsmoe_model_params *p = &model->p;
    const uint64_t L = (uint64_t)model->tokens_total, b = (uint64_t)B;
    const bool dropout = training && p->dropout > 0.0f;
    model_draws at;
    uint64_t n = 0;
    at.modality_dropout = n;
    n += training && p->modality_dropout > 0.0f;
    at.stage_one = n;
    n += csm_model_stage_one_draws(model, training);
    at.attention = n;
    n += dropout ? b * (uint64_t)p->heads * csm_dropout_draws((int64_t)(L * L)) : 0;
    at.residual = n;
    n += dropout ? b * L * csm_dropout_draws(p->d) : 0;
    /* The noise draws are linear in the tokens: modality m's call starts at per_token B o_m. */
    at.gate_noise_per_token = training ? (uint64_t)csm_gate_noise_draws(model->gate, 1) : 0;
    at.gate_noise = n;
    n += at.gate_noise_per_token * b * L;
    const uint64_t base = csm_rng_reserve(model->ctx, n);
    at.modality_dropout += base;
    at.stage_one += base;
    at.attention += base;
    at.residual += base;
    at.gate_noise += base;
    at.end = base + n;
    return at;
}

/* The shard checks of confsmoe_model_step_shard: global_avail [B_global, M] holds avail at `first`. */
static confsmoe_status model_check_shard(confsmoe_model *model, const char *fn, const confsmoe_tensor *avail,
                                         const confsmoe_tensor *global_avail, int64_t first)
{
    confsmoe_ctx *ctx = model->ctx;
    const int64_t M = model->p.n_modalities, dims[2] = {-1, M};
    confsmoe_status s = csm_expect_tensor(ctx, fn, "global_avail", global_avail, CONFSMOE_U8, 2, dims);
    if (s != CONFSMOE_OK)
        return s;
    const int64_t B = avail->dims[0], Bg = global_avail->dims[0];
    if (Bg < 1)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: the global batch is empty", fn);
    if (first < 0 || first > Bg - B)
        return csm_fail(ctx, CONFSMOE_E_SHAPE,
                        "%s: samples %" PRId64 " .. %" PRId64 " are outside the global batch of %" PRId64, fn, first,
                        first + B - 1, Bg);
    if (model->p.compat && B > 0 && B < Bg)
        return csm_fail(ctx, CONFSMOE_E_UNSUPPORTED,
                        "%s: compat reproduces defects of the reference that span the whole batch (the gate's "
                        "dispatch, the imputer's query of sample 0): a shard of the batch cannot", fn);
    const uint8_t *g = global_avail->data;
    for (int64_t i = 0; i < Bg * M; i++)
        if (g[i] > 1)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                            "%s: global_avail[%" PRId64 "][%" PRId64 "] is %d, must be 0 or 1", fn, i / M, i % M, g[i]);
    if (B > 0 && memcmp(avail->data, g + first * M, (size_t)(B * M)) != 0)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: avail differs from rows %" PRId64 " .. %" PRId64 " of global_avail", fn, first,
                        first + B - 1);
    return CONFSMOE_OK;
}

/* A failed step or predict changes no state: the stream goes back to where the call found it
 * (it draws nothing) and the gate's utilisation counters to their mark; the message names the
 * public function first. */
static confsmoe_status model_finish_call(confsmoe_model *model, const char *fn, confsmoe_status s, uint64_t rng_at_entry)
{
    if (s == CONFSMOE_OK)
        return CONFSMOE_OK;
    csm_rng_seek(model->ctx, rng_at_entry);
    csm_gate_usage_rollback(model->gate);
    char detail[CSM_ERROR_CAP];
    snprintf(detail, sizeof detail, "%s", model->ctx->last_error);
    return csm_fail(model->ctx, s, "%s: %s", fn, detail);
}

/* One training step on samples first .. first + B - 1 of a global batch (global_avail NULL:
 * the batch is the whole batch). */
static confsmoe_status model_train_step(confsmoe_model *model, const char *fn, const confsmoe_tensor *const *inputs,
                                        const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                        const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                        float *loss, float *task)
{
    const bool shard = global_avail != NULL;
    confsmoe_status s = model_check_batch(model, fn, inputs, avail, labels, logits, true, shard);
    if (s == CONFSMOE_OK && shard)
        s = model_check_shard(model, fn, avail, global_avail, first);
    if (s != CONFSMOE_OK)
        return s;
    if (!shard)
        global_avail = avail;
    const int64_t B = avail->dims[0], Bg = global_avail->dims[0], M = model->p.n_modalities;
    if (B == 0) {
        /* Nothing to compute; the stream moves as it does for the other shards. */
        model_reserve_draws(model, Bg, true);
        if (loss)
            *loss = 0.0f;
        if (task)
            *task = 0.0f;
        return CONFSMOE_OK;
    }
    workspace w;
    gradients g;
    void *block = csm_model_workspace_alloc(model, B, true, &w);
    void *grad_block = block ? csm_model_gradients_alloc(model, B, &g) : NULL;
    if (!block || !grad_block)
        return csm_fail(model->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for a batch of %" PRId64, fn, B);
    w.first = first;
    w.global_B = Bg;
    /* The arena of the gate and the imputer: as big as the previous step wanted, with some slack
     * (the first step, or a bigger batch, falls back to the allocator). If growing fails, they
     * just allocate. */
    csm_arena *arena = &model->arena;
    const size_t need = model->arena_need, target = need + need / 8;
    if (need > arena->size || target < arena->size / 2) {
        /* Grown only after a step that did not fit (whose estimate counts freed blocks too):
         * the routing, hence the size of the gate's blocks, moves a little from step to step,
         * and a new block is fresh pages to fault in. Shrunk after a step that needed less
         * than half of it. */
        void *block = target ? csm_alloc(model->ctx, target) : NULL;
        if (block || !target) {
            csm_free(model->ctx, arena->base);
            arena->base = block;
            arena->size = target;
        }
    }
    csm_arena_reset(arena);
    csm_gate_set_arena(model->gate, arena);
    if (model->imputer)
        csm_imputer_set_arena(model->imputer, arena);
    float aux = 0.0f, task_value = 0.0f;
    const uint64_t rng_at_entry = csm_rng_tell(model->ctx);
    w.draws = model_reserve_draws(model, Bg, true);
    csm_gate_usage_mark(model->gate);
    /* backward accumulates into the parameter gradients as it goes and can still fail part-way
     * (an allocation in the gate or the imputer): a copy of them goes back in that case, so
     * that a failed step changes no state. */
    size_t grad_bytes = 0;
    for (int32_t i = 0; i < model->params.count; i++)
        grad_bytes += model->params.grad[i]->nbytes;
    char *grad_copy = csm_alloc(model->ctx, grad_bytes);
    s = grad_copy ? CONFSMOE_OK : csm_fail(model->ctx, CONFSMOE_E_NOMEM, "out of memory for a copy of the gradients");
    /* Modality dropout is drawn for the whole global batch: L_conf's weights count its present tokens. */
    uint8_t *kept = NULL;
    confsmoe_tensor *kept_avail = NULL;
    w.global_present = model_count_present(model, global_avail->data, Bg);
    if (s == CONFSMOE_OK && model->p.modality_dropout > 0.0f) {
        kept = csm_alloc(model->ctx, (size_t)global_avail->nbytes);
        const int64_t kept_dims[2] = {B, M};
        s = kept ? confsmoe_tensor_wrap(model->ctx, CONFSMOE_U8, 2, kept_dims, kept + first * M, &kept_avail)
                 : csm_fail(model->ctx, CONFSMOE_E_NOMEM, "out of memory for the modality-dropout mask");
        if (s == CONFSMOE_OK) {
            model_drop_modalities(model, global_avail->data, Bg, w.draws.modality_dropout, kept);
            w.global_present = model_count_present(model, kept, Bg);
            avail = kept_avail;
        }
    }
    if (s == CONFSMOE_OK)
        s = csm_model_forward(model, inputs, avail, labels, &w, &aux);
    if (s == CONFSMOE_OK) {
        task_value = csm_task_loss(w.logits, labels->data, model->p.multilabel, w.B, w.global_B, model->p.n_classes,
                                   g.dlogits);
        for (size_t i = 0, at = 0; i < (size_t)model->params.count; at += model->params.grad[i++]->nbytes)
            if (model->params.grad[i]->nbytes > 0)
                memcpy(grad_copy + at, model->params.grad[i]->data, model->params.grad[i]->nbytes);
        s = csm_model_backward(model, &w, &g);
        for (size_t i = 0, at = 0; s != CONFSMOE_OK && i < (size_t)model->params.count;
             at += model->params.grad[i++]->nbytes)
            if (model->params.grad[i]->nbytes > 0)
                memcpy(model->params.grad[i]->data, grad_copy + at, model->params.grad[i]->nbytes);
    }
    csm_free(model->ctx, grad_copy);
    confsmoe_tensor_destroy(kept_avail);
    csm_free(model->ctx, kept);
    if (s == CONFSMOE_OK) {
        if (logits)
            memcpy(logits->data, w.logits, logits->nbytes);
        if (loss)
            *loss = task_value + aux;
        if (task)
            *task = task_value;
    }
    csm_model_workspace_release(model, &w);
    csm_gate_set_arena(model->gate, NULL);
    if (model->imputer)
        csm_imputer_set_arena(model->imputer, NULL);
    model->arena_need = arena->wanted;
    csm_arena_reset(arena);
    return model_finish_call(model, fn, s, rng_at_entry);
}

confsmoe_status confsmoe_model_step(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                    const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                    confsmoe_tensor *logits, float *loss, float *task)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    return model_train_step(model, "model_step", inputs, avail, labels, NULL, 0, logits, loss, task);
}

confsmoe_status confsmoe_model_step_shard(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                          const confsmoe_tensor *avail, const confsmoe_tensor *labels,
                                          const confsmoe_tensor *global_avail, int64_t first, confsmoe_tensor *logits,
                                          float *loss, float *task)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (!global_avail)
        return csm_fail(model->ctx, CONFSMOE_E_INVALID_ARGUMENT, "model_step_shard: global_avail is NULL");
    return model_train_step(model, "model_step_shard", inputs, avail, labels, global_avail, first, logits, loss, task);
}

confsmoe_status confsmoe_model_predict(confsmoe_model *model, const confsmoe_tensor *const *inputs,
                                       const confsmoe_tensor *avail, confsmoe_tensor *logits)
{
    if (!model)
        return CONFSMOE_E_INVALID_ARGUMENT;
    static const char fn[] = "model_predict";
    if (!logits)
        return csm_fail(model->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: logits is NULL", fn);
    confsmoe_status s = model_check_batch(model, fn, inputs, avail, NULL, logits, false, false);
    if (s != CONFSMOE_OK)
        return s;
    workspace w;
    void *block = csm_model_workspace_alloc(model, avail->dims[0], false, &w);
    if (!block)
        return csm_fail(model->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for a batch of %" PRId64, fn,
                        avail->dims[0]);
    w.first = 0;
    w.global_B = w.B;
    w.global_present = model_count_present(model, avail->data, w.B);
    float aux = 0.0f;
    const uint64_t rng_at_entry = csm_rng_tell(model->ctx);
    w.draws = model_reserve_draws(model, w.B, false);
    csm_gate_usage_mark(model->gate);
    s = csm_model_forward(model, inputs, avail, NULL, &w, &aux);
    if (s == CONFSMOE_OK)
        memcpy(logits->data, w.logits, logits->nbytes);
    csm_model_workspace_release(model, &w);
    return model_finish_call(model, fn, s, rng_at_entry);
}
