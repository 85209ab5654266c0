/* One forward call of the gate: route (router, noise, top-k, softmax), dispatch (the slots
 * sorted by expert, each expert's input rows packed into one block), the experts (the runner,
 * gate_experts.c), the ConfNets, combine, then the losses and the utilisation counters. */
#include <inttypes.h>
#include <string.h>

#include "gate_internal.h"
#include "kernels.h"
#include "passes.h"
#include "layout.h"
#include "threads.h"

/* Reads only the handle: its gate may be gone. (A handle from a lent arena never reaches the
 * host: the model destroys it within its step.) */
static void gate_release_saved(confsmoe_saved *base)
{
    gate_saved *s = (gate_saved *)base;
    confsmoe_ctx *ctx = base->ctx;
    if (s->call)
        s->release_call(s->exchange_user, s->call);
    csm_arena *arena = s->arena;
    if (s->kept_block)
        csm_lent_free(ctx, arena, s->kept_block, 0);
    csm_lent_free(ctx, arena, base, 0);
    csm_ctx_release(ctx);
}

/* The header and every array of a forward's saved state, sized by the gate's options
 * (layout.h); returns the header. Products by k, d and C are checked by the layout. */
static gate_saved *gate_saved_parts(csm_layout *l, const confsmoe_gate *g, int64_t n, bool training, gate_saved *view)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)n;
    const size_t C = (size_t)g->p.n_classes;
    const bool confidence = csm_gate_confidence(g);
    const bool noisy = g->p.noisy && training;
    const bool conf_loss = confidence && training;
    const size_t nk = N * k; /* wraps only if idx's part overflowed, after which every part is NULL */
    gate_saved *header = CSM_LAYOUT_ARRAY(l, gate_saved, 1);
    view->x = training ? CSM_LAYOUT_ROWS(l, float, N, d) : NULL;
    view->u_clean = CSM_LAYOUT_ROWS(l, float, N, E);
    view->u = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : view->u_clean;
    view->h = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->eps = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->sigma = noisy ? CSM_LAYOUT_ROWS(l, float, N, E) : NULL;
    view->idx = CSM_LAYOUT_ROWS(l, int32_t, N, k);
    view->g = CSM_LAYOUT_ROWS(l, float, N, k);
    view->c = CSM_LAYOUT_ROWS(l, float, N, k);
    view->offset = CSM_LAYOUT_ARRAY(l, int64_t, E + 1);
    view->by_rows = CSM_LAYOUT_ARRAY(l, int32_t, E);
    view->row_of = CSM_LAYOUT_ROWS(l, int64_t, N, k);
    view->slot_of = CSM_LAYOUT_ROWS(l, int64_t, N, k);
    view->yb = CSM_LAYOUT_ROWS(l, float, nk, d);
    view->s = CSM_LAYOUT_ROWS(l, float, N, k);
    view->cache.mean = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->cache.rstd = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->cache.z = CSM_LAYOUT_ROWS(l, float, N, confidence ? k : 0);
    view->probs = CSM_LAYOUT_ROWS(l, float, conf_loss ? nk : 0, C);
    view->labels = CSM_LAYOUT_ARRAY(l, int32_t, conf_loss ? N : 0);
    view->multi_labels = CSM_LAYOUT_ROWS(l, uint8_t, conf_loss ? N : 0, C);
    view->present = CSM_LAYOUT_ARRAY(l, uint8_t, N);
    view->kept_at = CSM_LAYOUT_ARRAY(l, size_t, E + 1);
    return header;
}

/* One block for the header and every array. What the experts keep for backward, whose size
 * depends on the routing, gets a second block later. */
static gate_saved *gate_alloc_saved(confsmoe_gate *g, int64_t n, bool training)
{
    gate_saved view = {0};
    csm_layout l = csm_layout_measure();
    size_t bytes;
    gate_saved_parts(&l, g, n, training, &view);
    char *block = csm_layout_size(&l, &bytes) ? csm_gate_alloc(g, bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    gate_saved *s = gate_saved_parts(&l, g, n, training, &view);
    *s = view;
    s->arena = g->arena;
    s->base.ctx = csm_ctx_retain(g->ctx);
    s->base.owner = g;
    s->base.release = gate_release_saved;
    s->release_call = g->exchange.release;
    s->exchange_user = g->exchange.user;
    s->n = n;
    return s;
}

typedef struct {
    const confsmoe_gate *g;
    const gate_saved *s;
} gate_token_task;

/* Top-k of the tokens' logits and the softmax over the kept ones. */
static void gate_topk_rows(void *arg, int64_t first, int64_t last, int worker)
{
    (void)worker;
    const gate_token_task *t = arg;
    const gate_saved *s = t->s;
    const int32_t E = t->g->n_experts, k = t->g->p.k;
    csm_router_topk(s->u + first * E, last - first, E, k, s->idx + first * k);
    for (int64_t i = first * k; i < last * k; i++)
        s->g[i] = s->u[(i / k) * E + s->idx[i]];
    csm_softmax_rows(s->g + first * k, last - first, k);
}

/* Logits, noise (training), top-k and the softmax over the kept logits. The call takes the
 * noise of the whole batch of `total` tokens; token t's is that of its index in it (first + t). */
static void gate_route(confsmoe_gate *g, gate_saved *s, const float *x, int64_t first, int64_t total)
{
    const int32_t E = g->n_experts;
    const int64_t n = s->n;
    csm_router_logits(&g->router, x, n, s->u_clean);
    if (s->eps) {
        memcpy(s->u, s->u_clean, (size_t)(n * E) * sizeof(float));
        const uint64_t base = csm_rng_reserve(g->ctx, (uint64_t)csm_gate_noise_draws(g, total));
        csm_substream noise = csm_rng_at(g->ctx, base + (uint64_t)csm_gate_noise_draws(g, first));
        csm_router_add_noise(&g->router, &noise, x, n, s->u, s->h, s->eps);
        for (int64_t i = 0; i < n * E; i++)
            s->sigma[i] = csm_softplus(s->h[i]) + 0.01f;
    }
    gate_token_task task = {g, s};
    csm_parallel_for(g->ctx, n, CSM_GATE_TOKEN_GRAIN, gate_topk_rows, &task);
}

/* order = the E experts by block rows, most first (Shell sort with Ciura's gaps: E may be
 * large, and ties may fall in any order, since each expert's work is its own). */
static void gate_order_by_rows(const int64_t *offset, int32_t E, int32_t *order)
{
    static const int32_t gaps[] = {701, 301, 132, 57, 23, 10, 4, 1};
    for (int32_t e = 0; e < E; e++)
        order[e] = e;
    for (size_t g = 0; g < sizeof gaps / sizeof gaps[0]; g++) {
        const int32_t gap = gaps[g];
        for (int32_t i = gap; i < E; i++) {
            const int32_t e = order[i];
            const int64_t rows = offset[e + 1] - offset[e];
            int32_t j = i;
            for (; j >= gap && offset[order[j - gap] + 1] - offset[order[j - gap]] < rows; j -= gap)
                order[j] = order[j - gap];
            order[j] = e;
        }
    }
}

/* Sorts the n*k slots by expert (stable in t, then j). */
static void gate_dispatch(const confsmoe_gate *g, gate_saved *s)
{
    const int32_t E = g->n_experts, k = g->p.k;
    const int64_t n = s->n;
    memset(s->offset, 0, (size_t)(E + 1) * sizeof *s->offset);
    for (int64_t i = 0; i < n * k; i++)
        s->offset[s->idx[i] + 1]++;
    for (int32_t e = 0; e < E; e++)
        s->offset[e + 1] += s->offset[e];
    /* offset[e] serves as expert e's cursor (it then holds e's end, the next one's start) and
     * is shifted back after: no E-sized scratch (row_of, which served before, holds only n k,
     * fewer than E when a batch is small). */
    for (int64_t i = 0; i < n * k; i++)
        s->slot_of[s->offset[s->idx[i]]++] = i;
    for (int32_t e = E; e > 0; e--)
        s->offset[e] = s->offset[e - 1];
    s->offset[0] = 0;
    for (int64_t r = 0; r < n * k; r++)
        s->row_of[s->slot_of[r]] = r;
    gate_order_by_rows(s->offset, E, s->by_rows);
}

/* Per expert: its input rows packed into the block (pack), or its ConfNet over its outputs
 * (ConfNet pass, d floats of scratch per worker). */
typedef struct {
    confsmoe_gate *g;
    gate_saved *s;
    const float *x;
    float *xb;
    float *scratch;
    size_t per_worker;
} gate_expert_task;

static void gate_pack_task(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_expert_task *t = arg;
    (void)worker;
    for (int64_t i = first; i < last; i++) {
        const int32_t e = t->s->by_rows[i];
        csm_gate_gather_rows(t->g, t->s, e, t->x, t->xb + t->s->offset[e] * t->g->p.d);
    }
}

static void gate_confnet_task(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_expert_task *t = arg;
    float *scratch = t->scratch + (size_t)worker * t->per_worker;
    for (int64_t i = first; i < last; i++) {
        const int32_t e = t->s->by_rows[i];
        if (t->s->offset[e + 1] == t->s->offset[e])
            continue;
        const csm_confnet net = csm_gate_confnet(t->g, e);
        const csm_confnet_block block = csm_gate_confnet_block(t->g, t->s, e, &net);
        csm_confnet_block_forward(&block, t->s->c, scratch);
    }
}

typedef struct {
    const confsmoe_gate *g;
    const gate_saved *s;
    const float *weight;
    float *out;
    float *slots; /* or NULL */
} gate_combine_task;

/* y_t = sum_j weight_tj y_tj, each output row written once; with slots, each token's k expert
 * outputs in slot order too, from the same reads. */
static void gate_combine_rows(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_combine_task *t = arg;
    const int64_t d = t->g->p.d, k = t->g->p.k;
    (void)worker;
    for (int64_t tok = first; tok < last; tok++) {
        float *o = t->out + tok * d;
        for (int64_t j = 0; j < k; j++) {
            const float *yj = t->s->yb + t->s->row_of[tok * k + j] * d;
            if (j == 0)
                csm_scale_copy(o, t->weight[tok * k], yj, d);
            else
                csm_axpy(o, t->weight[tok * k + j], yj, d);
            if (t->slots)
                memcpy(t->slots + (tok * k + j) * d, yj, (size_t)d * sizeof(float));
        }
    }
}

/* The packed input rows [n k, d] for an exchange (none with local experts) and each worker's
 * scratch: the runner's, then d floats for the ConfNet. NULL: out of memory or too large. */
static float *gate_forward_scratch(confsmoe_gate *g, const gate_saved *s, int workers, size_t *per_worker,
                                   size_t *bytes)
{
    const size_t d = (size_t)g->p.d, nk = g->experts ? 0 : (size_t)s->n * (size_t)g->p.k;
    size_t runner, packed, floats;
    if (!csm_gate_experts_scratch(g, s, &runner) || runner > SIZE_MAX / 8 - d ||
        !csm_mul_size(runner + d, (size_t)workers, &floats) || !csm_mul_size(nk, d, &packed) ||
        floats > SIZE_MAX / 8 - packed || !csm_mul_size(packed + floats, sizeof(float), bytes))
        return NULL;
    *per_worker = runner + d;
    return csm_gate_alloc(g, *bytes);
}

confsmoe_status csm_gate_forward_rows(confsmoe_gate *g, const csm_gate_call *call)
{
    const bool training = call->saved != NULL;
    if (call->saved)
        *call->saved = NULL;
    const int32_t E = g->n_experts, k = g->p.k;
    const int64_t n = call->n, d = g->p.d, C = g->p.n_classes;
    const bool confidence = csm_gate_confidence(g);
    const uint64_t rng_at_entry = csm_rng_tell(g->ctx);
    gate_saved *s = gate_alloc_saved(g, n, training);
    /* The load-loss work. */
    const size_t load_bytes = 2 * (size_t)E * sizeof(double);
    double *load_work = csm_gate_alloc(g, load_bytes);
    if (!s || !load_work) {
        if (load_work)
            csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
        if (s)
            s->base.release(&s->base);
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_forward: out of memory for N=%" PRId64, n);
    }
    memset(load_work, 0, load_bytes);
    const float *xin = call->x;
    /* n == 0: these buffers may be NULL, which memcpy must not see (found by tests/fuzz). */
    if (training && n > 0) {
        csm_pass_copy_blocks(g->ctx, s->x, d, xin, d, n, d);
        xin = s->x;
    }
    if (call->present && n > 0)
        memcpy(s->present, call->present, (size_t)n);
    else if (n > 0)
        memset(s->present, 1, (size_t)n);
    if (training && confidence && n > 0) {
        if (g->p.target == CONFSMOE_TARGET_SINGLE_LABEL)
            memcpy(s->labels, call->labels, (size_t)n * sizeof(int32_t));
        else
            memcpy(s->multi_labels, call->multi_labels, (size_t)(n * C));
    }

    gate_route(g, s, xin, call->shard_first, call->shard_total ? call->shard_total : n);
    gate_dispatch(g, s);
    const int workers = csm_parallel_workers(g->ctx, E);
    size_t per_worker = 0, scratch_bytes = 0;
    float *scratch = csm_gate_experts_keep(g, s, training)
                         ? gate_forward_scratch(g, s, workers, &per_worker, &scratch_bytes)
                         : NULL;
    confsmoe_status st = CONFSMOE_OK;
    if (!scratch)
        st = csm_fail(g->ctx, CONFSMOE_E_NOMEM,
                      "gate_forward: out of memory for the experts' activations (N=%" PRId64 ")", n);
    if (st == CONFSMOE_OK) {
        float *xb = g->experts ? NULL : scratch, *workers_scratch = scratch + (xb ? (size_t)(n * k * d) : 0);
        gate_expert_task task = {g, s, xin, xb, workers_scratch, per_worker};
        if (xb)
            csm_parallel_for(g->ctx, E, 1, gate_pack_task, &task);
        st = csm_gate_experts_forward(g, s, xin, xb, training, workers_scratch, per_worker);
        if (st == CONFSMOE_OK && confidence) {
            /* The ConfNet's d floats follow the runner's part of each worker's scratch. */
            task.scratch = workers_scratch + per_worker - (size_t)d;
            csm_parallel_for(g->ctx, E, 1, gate_confnet_task, &task);
        }
        csm_lent_free(g->ctx, g->arena, scratch, scratch_bytes);
    }
    if (st != CONFSMOE_OK) {
        /* A failed call leaves the RNG stream where it was, so a retry draws the same noise. */
        csm_rng_seek(g->ctx, rng_at_entry);
        csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
        s->base.release(&s->base);
        return st;
    }

    gate_combine_task ct = {g, s, confidence ? s->c : s->g, call->y, call->slots};
    csm_parallel_for(g->ctx, n, CSM_GATE_TOKEN_GRAIN, gate_combine_rows, &ct);

    float conf = 0.0f;
    if (training && confidence) {
        const csm_confidence_target target = csm_gate_target(g, s);
        conf = csm_confidence_loss_forward(&target, s->yb, n * k, &s->den);
        s->conf_loss = true;
    }
    float total = g->p.conf_loss_weight * conf;
    if (training && g->p.load_loss != CONFSMOE_LOAD_LOSS_NONE) {
        csm_load_input in = csm_gate_load_input(g, s);
        total += g->p.load_loss_weight * csm_load_loss_forward(g->p.load_loss, &in, load_work);
    }
    csm_lent_free(g->ctx, g->arena, load_work, load_bytes);
    if (call->loss)
        *call->loss = total;
    if (call->topk && n > 0)
        memcpy(call->topk, s->idx, (size_t)(n * k) * sizeof *s->idx);

    csm_usage_clear(&g->last, E);
    csm_usage_add(&g->last, s->idx, confidence ? s->c : NULL, n, k, s->conf_loss, conf);
    csm_usage_add(&g->total, s->idx, confidence ? s->c : NULL, n, k, s->conf_loss, conf);
    if (training)
        *call->saved = &s->base;
    else
        s->base.release(&s->base);
    return CONFSMOE_OK;
}
