/* One backward call of the gate, the reverse of gate_forward.c: per expert block, the
 * combination, the confidence loss and the ConfNet give the experts' output gradients; the
 * runner (gate_experts.c) takes them through the experts; the input gradients go back to the
 * tokens; then the target classifier, the load loss and the router. */
#include <inttypes.h>
#include <string.h>

#include "gate_internal.h"
#include "kernels.h"
#include "layout.h"
#include "threads.h"

/* Scratch of one backward call. */
typedef struct {
    float *dweight;  /* [n k] dL/d(combination weight) per slot */
    float *dc;       /* [n k] dL/dc per slot */
    float *ds;       /* [n k] dL/ds per block row */
    float *dg;       /* [n k] dL/dg per slot */
    float *du;       /* [n, E] dL/du_clean */
    float *dsigma;   /* [n, E] dL/dsigma (noisy) */
    float *dz;       /* [n k, C] dL/d(target logits) */
    float *scratch;  /* max(n E, k) for the router */
    float *dx;       /* [n, d] when the caller's dx overlaps dy or dslots */
    float *dyb;      /* [n k, d] the experts' output gradients in block order */
    float *dxb;      /* [n k, d] their input gradients in block order, when wanted */
    double *work;    /* [2 E] */
    float *worker;   /* per worker: the runner's scratch, or the ConfNet's 2 d floats */
    size_t per_worker;
} gate_backward_work;

static bool gate_overlaps(const void *a, size_t a_bytes, const void *b, size_t b_bytes)
{
    if (!a || !b || a_bytes == 0 || b_bytes == 0)
        return false;
    const char *pa = a, *pb = b;
    return pa < pb + b_bytes && pb < pa + a_bytes;
}

/* The arrays of one backward call (layout.h). */
static void gate_backward_parts(csm_layout *l, const confsmoe_gate *g, const gate_saved *s, bool own_dx, bool block_dx,
                                size_t all_workers, gate_backward_work *w)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)s->n;
    const size_t C = csm_gate_confidence(g) ? (size_t)g->p.n_classes : 0;
    const size_t nk = N * k; /* fits: the saved state holds n k rows of d floats */
    w->dweight = CSM_LAYOUT_ARRAY(l, float, nk);
    w->dc = CSM_LAYOUT_ARRAY(l, float, nk);
    w->ds = CSM_LAYOUT_ARRAY(l, float, nk);
    w->dg = CSM_LAYOUT_ARRAY(l, float, nk);
    w->du = CSM_LAYOUT_ROWS(l, float, N, E);
    w->dsigma = CSM_LAYOUT_ROWS(l, float, N, E);
    w->dz = CSM_LAYOUT_ROWS(l, float, nk, C);
    w->scratch = CSM_LAYOUT_ARRAY(l, float, N * E > k ? N * E : k);
    w->dx = CSM_LAYOUT_ROWS(l, float, own_dx ? N : 0, d);
    w->dyb = CSM_LAYOUT_ROWS(l, float, nk, d);
    w->dxb = CSM_LAYOUT_ROWS(l, float, block_dx ? nk : 0, d);
    w->work = CSM_LAYOUT_ARRAY(l, double, 2 * E);
    w->worker = CSM_LAYOUT_ARRAY(l, float, all_workers);
}

/* Everything backward needs, allocated before any gradient changes: after this it cannot fail
 * but in the exchange. */
static void *gate_backward_alloc(confsmoe_gate *g, const gate_saved *s, bool own_dx, bool block_dx, int workers,
                                 gate_backward_work *w, size_t *bytes)
{
    const size_t E = (size_t)g->n_experts, k = (size_t)g->p.k, d = (size_t)g->p.d, N = (size_t)s->n;
    size_t per_worker, all_workers;
    if (!csm_gate_experts_scratch(g, s, &per_worker))
        return NULL;
    per_worker = per_worker > 2 * d ? per_worker : 2 * d;
    if (!csm_mul_size(per_worker, (size_t)workers, &all_workers))
        return NULL;
    csm_layout l = csm_layout_measure();
    gate_backward_parts(&l, g, s, own_dx, block_dx, all_workers, w);
    char *block = csm_layout_size(&l, bytes) ? csm_gate_alloc(g, *bytes) : NULL;
    if (!block)
        return NULL;
    csm_layout_place(&l, block);
    gate_backward_parts(&l, g, s, own_dx, block_dx, all_workers, w);
    w->per_worker = per_worker;
    /* Zero what accumulates. */
    memset(w->dg, 0, N * k * sizeof *w->dg);
    memset(w->du, 0, N * E * sizeof *w->du);
    memset(w->dsigma, 0, N * E * sizeof *w->dsigma);
    memset(w->work, 0, 2 * E * sizeof *w->work);
    return block;
}

typedef struct {
    confsmoe_gate *g;
    gate_saved *s;
    const float *gy, *gslots;
    float loss_scale;
    bool loss_active;
    gate_backward_work *w;
} gate_block_task;

/* Everything downstream of expert e's outputs, into its rows of dyb: the combination (plus
 * the slots output), the confidence loss, the target classifier and the ConfNet. */
static void gate_block_backward(const gate_block_task *t, int32_t e, float *net_scratch)
{
    confsmoe_gate *g = t->g;
    gate_saved *s = t->s;
    gate_backward_work *w = t->w;
    const int32_t k = g->p.k;
    const int64_t d = g->p.d, C = g->p.n_classes;
    const int64_t begin = s->offset[e], end = s->offset[e + 1], rows = end - begin;
    const bool confidence = csm_gate_confidence(g);
    const float *weight = confidence ? s->c : s->g;
    float *dyb = w->dyb + begin * d;
    for (int64_t r = begin; r < end; r++) {
        const int64_t i = s->slot_of[r];
        const float *go = t->gy + (i / k) * d;
        float *dyr = dyb + (r - begin) * d;
        w->dweight[i] = (float)csm_dot(go, s->yb + r * d, d);
        csm_scale_copy(dyr, weight[i], go, d);
        if (t->gslots)
            csm_axpy(dyr, 1.0f, t->gslots + i * d, d);
    }
    if (!confidence)
        return;
    for (int64_t r = begin; r < end; r++)
        w->dc[s->slot_of[r]] = w->dweight[s->slot_of[r]];
    if (t->loss_active) {
        const csm_confidence_target target = csm_gate_target(g, s);
        csm_confidence_loss_rows(&target, t->loss_scale, g->p.detach_target, begin, end, w->dc, w->dz);
        if (!g->p.detach_target)
            csm_target_backward_input(&target, w->dz + begin * C, rows, dyb);
    }
    const csm_confnet net = csm_gate_confnet(g, e);
    const csm_confnet_block block = csm_gate_confnet_block(g, s, e, &net);
    csm_confnet_block_backward(&block, w->dc, w->ds + begin, dyb, net_scratch);
}

static void gate_block_backward_task(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_block_task *t = arg;
    float *net_scratch = t->w->worker + (size_t)worker * t->w->per_worker;
    for (int64_t i = first; i < last; i++) {
        const int32_t e = t->s->by_rows[i];
        if (t->s->offset[e + 1] > t->s->offset[e])
            gate_block_backward(t, e, net_scratch);
    }
}

/* dx_t = the sum of the input gradients of token t's k slots, in block-row order (the order in
 * which one worker, expert after expert, would add them), so that the sum does not depend on
 * the threads. */
typedef struct {
    const confsmoe_gate *g;
    const gate_saved *s;
    const float *dxb;
    float *dx;
} gate_scatter_task;

static void gate_scatter_rows(void *arg, int64_t first, int64_t last, int worker)
{
    const gate_scatter_task *t = arg;
    const int64_t d = t->g->p.d, k = t->g->p.k;
    (void)worker;
    for (int64_t tok = first; tok < last; tok++) {
        int64_t last_row = -1;
        for (int64_t taken = 0; taken < k; taken++) {
            /* The next row of this token after last_row (k is small: a scan per row). */
            int64_t next = INT64_MAX;
            for (int64_t j = 0; j < k; j++) {
                const int64_t r = t->s->row_of[tok * k + j];
                if (r > last_row && r < next)
                    next = r;
            }
            if (taken == 0)
                memcpy(t->dx + tok * d, t->dxb + next * d, (size_t)d * sizeof(float));
            else
                csm_axpy(t->dx + tok * d, 1.0f, t->dxb + next * d, d);
            last_row = next;
        }
    }
}

static void gate_scatter(confsmoe_gate *g, const gate_saved *s, const float *dxb, float *dx)
{
    const int64_t n = s->n, k = g->p.k, d = g->p.d;
    if (g->p.compat) {
        /* Slots run on token (t k + j) mod N: block-row order over the whole call. */
        memset(dx, 0, (size_t)(n * d) * sizeof(float));
        for (int64_t r = 0; r < n * k; r++)
            csm_axpy(dx + (s->slot_of[r] % n) * d, 1.0f, dxb + r * d, d);
        return;
    }
    gate_scatter_task task = {g, s, dxb, dx};
    csm_parallel_for(g->ctx, n, CSM_GATE_TOKEN_GRAIN, gate_scatter_rows, &task);
}

static bool gate_router_learns(const confsmoe_gate *g)
{
    return g->p.combine == CONFSMOE_COMBINE_ROUTER_SOFTMAX || g->p.router_grad != CONFSMOE_ROUTER_GRAD_FROZEN;
}

/* dL/du over the kept logits of each token, scattered into du [n, E]. */
static void gate_router_logit_grads(const confsmoe_gate *g, const gate_saved *s, gate_backward_work *w)
{
    const int32_t E = g->n_experts, k = g->p.k;
    const bool score = csm_gate_confidence(g) && g->p.router_grad == CONFSMOE_ROUTER_GRAD_SCORE;
    float *du_kept = w->scratch;
    for (int64_t t = 0; t < s->n; t++) {
        const float *gt = s->g + t * k;
        csm_softmax_backward_row(gt, w->dg + t * k, du_kept, k);
        if (score) {
            /* y = sum_j c_j y_j g_j / stopgrad(g_j): du_i = a_i - g_i sum_j a_j, a_j = c_j (dy . y_j). */
            double sum = 0.0;
            for (int32_t j = 0; j < k; j++)
                sum += w->dweight[t * k + j];
            for (int32_t j = 0; j < k; j++)
                du_kept[j] += w->dweight[t * k + j] - gt[j] * (float)sum;
        }
        for (int32_t j = 0; j < k; j++) {
            const int64_t i = t * E + s->idx[t * k + j];
            w->du[i] += du_kept[j];
            /* The kept logits are the noisy ones: u = u_clean + eps sigma. */
            if (s->eps)
                w->dsigma[i] += du_kept[j] * s->eps[i];
        }
    }
}

confsmoe_status csm_gate_backward_rows(confsmoe_gate *g, const csm_gate_grad_call *call)
{
    gate_saved *s = (gate_saved *)call->saved;
    const int32_t k = g->p.k;
    const int64_t n = s->n, d = g->p.d;
    const bool confidence = csm_gate_confidence(g);
    const size_t dx_bytes = (size_t)(n * d) * sizeof(float);
    /* dx is written in place unless it overlaps an input. */
    const bool own_dx = call->dx && (gate_overlaps(call->dx, dx_bytes, call->dy, dx_bytes) ||
                                     gate_overlaps(call->dx, dx_bytes, call->dslots, (size_t)k * dx_bytes));
    const int workers = csm_parallel_workers(g->ctx, g->n_experts);
    const bool block_dx = call->dx || csm_gate_experts_always_dx(g);
    gate_backward_work w;
    size_t block_bytes = 0;
    void *block = gate_backward_alloc(g, s, own_dx, block_dx, workers, &w, &block_bytes);
    if (!block)
        return csm_fail(g->ctx, CONFSMOE_E_NOMEM, "gate_backward: out of memory for N=%" PRId64, n);
    call->saved->consumed = true;
    float *gx = call->dx ? (own_dx ? w.dx : call->dx) : NULL;

    const bool loss_active = confidence && s->conf_loss && s->den != 0.0f;
    const float loss_scale = loss_active ? call->dloss * g->p.conf_loss_weight * 2.0f / s->den : 0.0f;
    gate_block_task task = {g, s, call->dy, call->dslots, loss_scale, loss_active, &w};
    csm_parallel_for(g->ctx, g->n_experts, 1, gate_block_backward_task, &task);
    confsmoe_status st = csm_gate_experts_backward(g, s, w.dyb, block_dx ? w.dxb : NULL, w.worker, w.per_worker);
    if (st != CONFSMOE_OK) {
        csm_lent_free(g->ctx, g->arena, block, block_bytes);
        return st;
    }
    if (gx)
        gate_scatter(g, s, w.dxb, gx);
    if (loss_active && !g->p.detach_target) {
        const csm_confidence_target target = csm_gate_target(g, s);
        csm_target_backward_params(&target, w.dz, s->yb, n * k);
    }
    if (confidence) {
        /* For the score term, a_j = c_j (dy . y_j). */
        for (int64_t i = 0; i < n * k; i++)
            w.dweight[i] *= s->c[i];
    } else {
        memcpy(w.dg, w.dweight, (size_t)(n * k) * sizeof(float));
    }

    if (gate_router_learns(g)) {
        if (g->p.load_loss != CONFSMOE_LOAD_LOSS_NONE) {
            csm_load_input in = csm_gate_load_input(g, s);
            csm_load_loss_backward(g->p.load_loss, &in, call->dloss * g->p.load_loss_weight, w.work, w.dg, w.du,
                                   w.dsigma);
        }
        gate_router_logit_grads(g, s, &w);
        csm_router_backward(&g->router, s->x, n, s->u_clean, s->h, w.du, s->eps ? w.dsigma : NULL, gx, w.scratch);
    }
    if (own_dx)
        memcpy(call->dx, w.dx, dx_bytes);
    csm_lent_free(g->ctx, g->arena, block, block_bytes);
    return CONFSMOE_OK;
}
