/* The gate's expert runner: where the experts of one call run, forward and backward, on the
 * packed rows of each expert's block. A gate over local experts runs them here, one task per
 * expert on the ctx's workers; a gate behind an exchange hands every block to the host's
 * callbacks in one call (include/confsmoe.h, confsmoe_gate_exchange). The rest of the gate does
 * the same work in both modes. */
#include <string.h>

#include "expert.h"
#include "gate_internal.h"
#include "threads.h"

#define GATE_EXCHANGE_ERROR_CAP 256

void csm_gate_gather_rows(const confsmoe_gate *g, const gate_saved *s, int32_t e, const float *x, float *out)
{
    const int64_t n = s->n, k = g->p.k, d = g->p.d;
    for (int64_t r = s->offset[e]; r < s->offset[e + 1]; r++) {
        const int64_t slot = s->slot_of[r], src = g->p.compat ? slot % n : slot / k;
        memcpy(out + (r - s->offset[e]) * d, x + src * d, (size_t)d * sizeof *x);
    }
}

bool csm_gate_expert_sizes(const confsmoe_gate *g, const gate_saved *s, size_t *rows_max, size_t *rows_h_max)
{
    *rows_max = *rows_h_max = 0;
    for (int32_t e = 0; e < g->n_experts; e++) {
        size_t rows = (size_t)(s->offset[e + 1] - s->offset[e]), rows_h;
        if (!csm_mul_size(rows, g->experts ? (size_t)confsmoe_expert_h(g->experts[e]) : 0, &rows_h))
            return false;
        *rows_max = rows > *rows_max ? rows : *rows_max;
        *rows_h_max = rows_h > *rows_h_max ? rows_h : *rows_h_max;
    }
    return true;
}

/* Local experts, per worker: the block's input rows [rows_max, d], then the expert's scratch
 * [rows_h_max] (forward: the activation). */
bool csm_gate_experts_scratch(const confsmoe_gate *g, const gate_saved *s, size_t *per_worker)
{
    size_t rows_max, rows_h_max, rows_d;
    *per_worker = 0;
    if (!csm_gate_expert_sizes(g, s, &rows_max, &rows_h_max))
        return false;
    if (!g->experts)
        return true;
    if (!csm_mul_size(rows_max, (size_t)g->p.d, &rows_d) || rows_d > SIZE_MAX / 8 - rows_h_max)
        return false;
    *per_worker = rows_d + rows_h_max;
    return true;
}

/* One block of n k CSM_EXPERT_KEPT(h) floats at most, expert e's at kept_at[e]. */
bool csm_gate_experts_keep(confsmoe_gate *g, gate_saved *s, bool training)
{
    if (!training || !g->experts)
        return true;
    size_t total = 0, bytes;
    for (int32_t e = 0; e < g->n_experts; e++) {
        size_t rows_kept;
        s->kept_at[e] = total;
        if (!csm_mul_size((size_t)(s->offset[e + 1] - s->offset[e]),
                          (size_t)CSM_EXPERT_KEPT(confsmoe_expert_h(g->experts[e])), &rows_kept) ||
            total > SIZE_MAX - rows_kept)
            return false;
        total += rows_kept;
    }
    s->kept_at[g->n_experts] = total;
    s->kept_block = csm_mul_size(total, sizeof(float), &bytes) ? csm_gate_alloc(g, bytes) : NULL;
    return s->kept_block != NULL;
}

typedef struct {
    confsmoe_gate *g;
    gate_saved *s;
    const float *rows;  /* forward: the call's input rows x; backward: the output gradients dyb */
    float *dxb;         /* backward: the input gradients, or NULL */
    float *scratch;
    size_t per_worker;
} gate_run_task;

static void gate_run_forward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_run_task *t = arg;
    const confsmoe_gate *g = t->g;
    const gate_saved *s = t->s;
    const int64_t d = g->p.d;
    float *xs = t->scratch + (size_t)worker * t->per_worker;
    for (int64_t i = first; i < last; i++) {
        const int32_t e = s->by_rows[i];
        const int64_t begin = s->offset[e], rows = s->offset[e + 1] - begin;
        if (rows == 0)
            continue;
        /* Gathered here, so that the expert's first product reads them from cache. */
        csm_gate_gather_rows(g, s, e, t->rows, xs);
        csm_expert_forward_rows(g->experts[e], xs, rows, s->yb + begin * d,
                                s->kept_block ? s->kept_block + s->kept_at[e] : NULL, xs + rows * d);
    }
}

static void gate_run_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_run_task *t = arg;
    const confsmoe_gate *g = t->g;
    const gate_saved *s = t->s;
    const int64_t d = g->p.d;
    float *xs = t->scratch + (size_t)worker * t->per_worker;
    for (int64_t i = first; i < last; i++) {
        const int32_t e = s->by_rows[i];
        const int64_t begin = s->offset[e], rows = s->offset[e + 1] - begin;
        if (rows == 0)
            continue;
        /* The expert's input rows again (the saved state keeps x, n rows, not the n k of a block). */
        csm_gate_gather_rows(g, s, e, s->x, xs);
        csm_expert_backward_rows(g->experts[e], xs, s->kept_block + s->kept_at[e], rows, t->rows + begin * d,
                                 t->dxb ? t->dxb + begin * d : NULL, xs + rows * d);
    }
}

confsmoe_status csm_gate_experts_forward(confsmoe_gate *g, gate_saved *s, const float *x, const float *xb,
                                         bool training, float *scratch, size_t per_worker)
{
    if (g->experts) {
        gate_run_task task = {g, s, x, NULL, scratch, per_worker};
        csm_parallel_for(g->ctx, g->n_experts, 1, gate_run_forward_task, &task);
        return CONFSMOE_OK;
    }
    char error[GATE_EXCHANGE_ERROR_CAP] = "";
    confsmoe_status st =
        g->exchange.forward(g->exchange.user, s->offset, xb, s->yb, training, &s->call, error, sizeof error);
    if (st == CONFSMOE_OK)
        return CONFSMOE_OK;
    /* A failed exchange forward keeps no state. */
    s->call = NULL;
    return csm_fail(g->ctx, st < 0 ? st : CONFSMOE_E_INTERNAL, "gate_forward: the expert exchange failed: %s",
                    error[0] ? error : confsmoe_status_string(st));
}

bool csm_gate_experts_always_dx(const confsmoe_gate *g) { return g->experts == NULL; }

confsmoe_status csm_gate_experts_backward(confsmoe_gate *g, gate_saved *s, const float *dyb, float *dxb,
                                          float *scratch, size_t per_worker)
{
    if (g->experts) {
        gate_run_task task = {g, s, dyb, dxb, scratch, per_worker};
        csm_parallel_for(g->ctx, g->n_experts, 1, gate_run_backward_task, &task);
        return CONFSMOE_OK;
    }
    char error[GATE_EXCHANGE_ERROR_CAP] = "";
    confsmoe_status st = g->exchange.backward(g->exchange.user, s->call, s->offset, dyb, dxb, error, sizeof error);
    if (st == CONFSMOE_OK)
        return CONFSMOE_OK;
    return csm_fail(g->ctx, st < 0 ? st : CONFSMOE_E_INTERNAL, "gate_backward: the expert exchange failed: %s",
                    error[0] ? error : confsmoe_status_string(st));
}
