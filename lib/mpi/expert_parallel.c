/* Expert parallelism: a libconfsmoe gate whose exchange sends each slot's row to the rank
 * that owns its expert, with one MPI_Alltoallv each way in forward and in backward. */
#include <limits.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

#include "mpi_internal.h"

struct confsmoe_mpi_gate {
    cmpi_comm comm;
    confsmoe_ctx *ctx;                /* every block here comes from it, and holds a reference */
    confsmoe_gate *gate;
    int32_t n_experts, first, count;  /* this rank owns experts first .. first + count - 1 */
    bool confidence;                  /* COMBINE_CONFIDENCE: the loss is L_conf over present slots */
    int32_t *lo;                      /* [P + 1] first expert of each rank */
    int64_t d;
    confsmoe_expert **experts;        /* [count] */
    MPI_Datatype row;                 /* one token row, d floats */
    bool row_committed;
    /* Per-call scratch, grown on demand: received rows (source-major), the same rows
     * expert-major, and the experts' outputs (expert-major). */
    float *recv, *work, *out;
    size_t cap_rows;
    /* The counts of one exchange: per rank, and per (source, local expert). */
    int *send_rows, *send_at, *recv_rows, *recv_at, *expert_counts, *expert_at;
    int64_t *sent, *got;              /* [E] slot rows per expert sent; [P count] received */
    cmpi_stage stage;                 /* for the replicated gradients */
    confsmoe_tensor **grads;
    int32_t n_grads;
};

struct confsmoe_mpi_saved {
    confsmoe_mpi_gate *g;
    confsmoe_ctx *ctx;                /* the gate's, for the handle's own block */
    confsmoe_saved *inner;
    float weight;                     /* this rank's share of the global confidence loss */
};

/* One training forward's state, kept until the gate's saved handle goes (which may be after
 * the gate: releasing it reads nothing else). */
typedef struct {
    confsmoe_ctx *ctx;                /* the gate's, for this state's blocks */
    int32_t count;                    /* local experts */
    int64_t *got;                     /* [P count] rows from each source for each local expert */
    confsmoe_saved **saved;           /* [count] */
} exchange_call;

/* ------------------------------------------------------------------ the exchange */

static confsmoe_status ep_fail_text(char *error, size_t cap, confsmoe_status s)
{
    snprintf(error, cap, "%s", confsmoe_mpi_last_error());
    return s;
}

static bool ep_grow(confsmoe_mpi_gate *g, size_t rows)
{
    if (rows <= g->cap_rows)
        return true;
    const size_t d = (size_t)g->d;
    if (rows > SIZE_MAX / d)
        return false;
    float *a = confsmoe_ctx_calloc(g->ctx, rows * d, sizeof(float));
    float *b = confsmoe_ctx_calloc(g->ctx, rows * d, sizeof(float));
    float *c = confsmoe_ctx_calloc(g->ctx, rows * d, sizeof(float));
    if (!a || !b || !c) {
        confsmoe_ctx_free(g->ctx, a);
        confsmoe_ctx_free(g->ctx, b);
        confsmoe_ctx_free(g->ctx, c);
        return false;
    }
    confsmoe_ctx_free(g->ctx, g->recv);
    confsmoe_ctx_free(g->ctx, g->work);
    confsmoe_ctx_free(g->ctx, g->out);
    g->recv = a;
    g->work = b;
    g->out = c;
    g->cap_rows = rows;
    return true;
}

/* The counts of a call whose block offsets are `offset` [E + 1]: how many rows go to each
 * rank and, from the ranks' counts, how many come from each source for each local expert.
 * With got_known, the received counts are the call's (backward) and no message is needed. */
static confsmoe_status ep_plan(confsmoe_mpi_gate *g, const int64_t *offset, const int64_t *got_known, size_t *total)
{
    const int P = g->comm.size, E = g->n_experts, C = g->count;
    for (int q = 0; q < P; q++) {
        const int64_t rows = offset[g->lo[q + 1]] - offset[g->lo[q]];
        if (rows > INT_MAX || offset[g->lo[q]] > INT_MAX)
            return cmpi_fail(CONFSMOE_E_UNSUPPORTED, "more than %d slot rows in one exchange", INT_MAX);
        g->send_rows[q] = (int)rows;
        g->send_at[q] = (int)offset[g->lo[q]];
    }
    confsmoe_status s = CONFSMOE_OK;
    if (got_known) {
        memcpy(g->got, got_known, (size_t)P * (size_t)C * sizeof *g->got);
    } else {
        /* Each rank tells each owner how many rows it sends to each of its experts. The count
         * arrays of the rows' plan serve as this message's counts; they are filled below. */
        int *sc = g->expert_counts, *sd = g->expert_at, *rc = g->recv_rows, *rd = g->recv_at;
        for (int e = 0; e < E; e++)
            g->sent[e] = offset[e + 1] - offset[e];
        for (int q = 0; q < P; q++) {
            sc[q] = g->lo[q + 1] - g->lo[q];
            sd[q] = g->lo[q];
            rc[q] = C;
            rd[q] = q * C;
        }
        s = cmpi_check(MPI_Alltoallv(g->sent, sc, sd, MPI_INT64_T, g->got, rc, rd, MPI_INT64_T, g->comm.comm),
                       "MPI_Alltoallv of the expert counts");
    }
    int64_t at = 0;
    for (int q = 0; q < P && s == CONFSMOE_OK; q++) {
        int64_t rows = 0;
        for (int j = 0; j < C; j++)
            rows += g->got[q * C + j];
        if (at + rows > INT_MAX)
            return cmpi_fail(CONFSMOE_E_UNSUPPORTED, "more than %d slot rows for one rank's experts", INT_MAX);
        g->recv_rows[q] = (int)rows;
        g->recv_at[q] = (int)at;
        at += rows;
    }
    /* Expert-major: local expert j's rows from source 0, then 1, ... (the global token order). */
    int64_t e_at = 0;
    for (int j = 0; j < C; j++) {
        int64_t rows = 0;
        for (int q = 0; q < P; q++)
            rows += g->got[q * C + j];
        g->expert_counts[j] = (int)rows;
        g->expert_at[j] = (int)e_at;
        e_at += rows;
    }
    *total = (size_t)at;
    if (s == CONFSMOE_OK && !ep_grow(g, *total))
        s = cmpi_fail(CONFSMOE_E_NOMEM, "out of memory for %zu exchanged rows", *total);
    return s;
}

/* Rows source-major (as received) <-> expert-major (as the experts run). */
static void ep_reorder(const confsmoe_mpi_gate *g, const float *from, float *to, bool to_expert_major)
{
    const int P = g->comm.size, C = g->count;
    const size_t d = (size_t)g->d;
    for (int j = 0; j < C; j++) {
        size_t e_at = (size_t)g->expert_at[j];
        for (int q = 0; q < P; q++) {
            size_t s_at = (size_t)g->recv_at[q];
            for (int i = 0; i < j; i++)
                s_at += (size_t)g->got[q * C + i];
            const size_t rows = (size_t)g->got[q * C + j];
            if (rows)
                memcpy(to + (to_expert_major ? e_at : s_at) * d, from + (to_expert_major ? s_at : e_at) * d,
                       rows * d * sizeof(float));
            e_at += rows;
        }
    }
}

static confsmoe_status ep_wrap_rows(confsmoe_mpi_gate *g, float *data, int rows, confsmoe_tensor **out)
{
    const int64_t dims[2] = {rows, g->d};
    confsmoe_status s = confsmoe_tensor_wrap(g->ctx, CONFSMOE_F32, 2, dims, data, out);
    return s == CONFSMOE_OK ? s : cmpi_from_ctx(g->ctx, s, "confsmoe_tensor_wrap");
}

/* Runs local expert j forward (saved != NULL: training) or backward on the expert-major rows. */
static confsmoe_status ep_run_expert(confsmoe_mpi_gate *g, int j, bool backward, confsmoe_saved **saved)
{
    const size_t at = (size_t)g->expert_at[j] * (size_t)g->d;
    confsmoe_tensor *in = NULL, *out = NULL;
    confsmoe_status s = ep_wrap_rows(g, g->work + at, g->expert_counts[j], &in);
    if (s == CONFSMOE_OK)
        s = ep_wrap_rows(g, g->out + at, g->expert_counts[j], &out);
    if (s == CONFSMOE_OK) {
        s = backward ? confsmoe_expert_backward(g->experts[j], *saved, in, out)
                     : confsmoe_expert_forward(g->experts[j], in, out, saved);
        if (s != CONFSMOE_OK)
            s = cmpi_from_ctx(g->ctx, s, backward ? "confsmoe_expert_backward" : "confsmoe_expert_forward");
    }
    confsmoe_tensor_destroy(in);
    confsmoe_tensor_destroy(out);
    return s;
}

/* Sends `rows` (block order) to the owners, runs the experts there, brings `result` back. */
static confsmoe_status ep_round_trip(confsmoe_mpi_gate *g, const float *rows, float *result, bool backward,
                                     exchange_call *call)
{
    confsmoe_status s = cmpi_check(MPI_Alltoallv(rows, g->send_rows, g->send_at, g->row, g->recv, g->recv_rows,
                                                 g->recv_at, g->row, g->comm.comm),
                                   backward ? "MPI_Alltoallv of the output gradients" : "MPI_Alltoallv of the tokens");
    if (s != CONFSMOE_OK)
        return s;
    ep_reorder(g, g->recv, g->work, true);
    for (int j = 0; j < g->count && s == CONFSMOE_OK; j++)
        s = ep_run_expert(g, j, backward, call ? &call->saved[j] : NULL);
    /* The ranks must meet in the return message even when an expert failed here: its rows
     * go back as they are, and the status says what happened. */
    ep_reorder(g, g->out, g->recv, false);
    const confsmoe_status sent = cmpi_check(MPI_Alltoallv(g->recv, g->recv_rows, g->recv_at, g->row, result,
                                                          g->send_rows, g->send_at, g->row, g->comm.comm),
                                            backward ? "MPI_Alltoallv of the input gradients"
                                                     : "MPI_Alltoallv of the expert outputs");
    return s != CONFSMOE_OK ? s : sent;
}

/* user, the confsmoe_mpi_gate, may already be destroyed. */
static void ep_release_call(void *user, void *state)
{
    (void)user;
    exchange_call *call = state;
    if (!call)
        return;
    for (int j = 0; call->saved && j < call->count; j++)
        confsmoe_saved_destroy(call->saved[j]);
    confsmoe_ctx_free(call->ctx, call->saved);
    confsmoe_ctx_free(call->ctx, call->got);
    confsmoe_ctx_free(call->ctx, call);
}

static confsmoe_status ep_exchange_forward(void *user, const int64_t *offset, const float *x, float *y,
                                           int32_t training, void **state, char *error, size_t cap)
{
    confsmoe_mpi_gate *g = user;
    *state = NULL;
    exchange_call *call = NULL;
    const size_t got_n = (size_t)g->comm.size * (size_t)g->count;
    confsmoe_status kept = CONFSMOE_OK;
    if (training) {
        call = confsmoe_ctx_calloc(g->ctx, 1, sizeof *call);
        if (call) {
            call->ctx = g->ctx;
            call->count = g->count;
            call->saved = confsmoe_ctx_calloc(g->ctx, (size_t)g->count, sizeof *call->saved);
            call->got = confsmoe_ctx_calloc(g->ctx, got_n, sizeof *call->got);
        }
        if (!call || !call->saved || !call->got) {
            /* The other ranks are on their way: this one still takes part in the messages
             * (running its experts as in inference), then reports. */
            ep_release_call(g, call);
            call = NULL;
            kept = CONFSMOE_E_NOMEM;
        }
    }
    size_t total = 0;
    confsmoe_status s = ep_plan(g, offset, NULL, &total);
    if (s == CONFSMOE_OK)
        s = ep_round_trip(g, x, y, false, call);
    if (s == CONFSMOE_OK && kept != CONFSMOE_OK)
        s = cmpi_fail(kept, "out of memory for the exchange's state");
    if (s != CONFSMOE_OK) {
        ep_release_call(g, call);
        return ep_fail_text(error, cap, s);
    }
    if (call)
        memcpy(call->got, g->got, got_n * sizeof *call->got);
    *state = call;
    return CONFSMOE_OK;
}

static confsmoe_status ep_exchange_backward(void *user, void *state, const int64_t *offset, const float *dy, float *dx,
                                            char *error, size_t cap)
{
    confsmoe_mpi_gate *g = user;
    exchange_call *call = state;
    size_t total = 0;
    confsmoe_status s = call ? ep_plan(g, offset, call->got, &total)
                             : cmpi_fail(CONFSMOE_E_STATE, "the forward kept no state for backward");
    if (s == CONFSMOE_OK)
        s = ep_round_trip(g, dy, dx, true, call);
    return s == CONFSMOE_OK ? s : ep_fail_text(error, cap, s);
}

/* ------------------------------------------------------------------ the gate */

void confsmoe_mpi_gate_destroy(confsmoe_mpi_gate *g)
{
    if (!g)
        return;
    confsmoe_gate_destroy(g->gate);
    for (int32_t j = 0; g->experts && j < g->count; j++)
        confsmoe_expert_destroy(g->experts[j]);
    if (g->row_committed)
        MPI_Type_free(&g->row);
    cmpi_comm_free(&g->comm);
    confsmoe_ctx *ctx = g->ctx;
    confsmoe_ctx_free(ctx, g->experts);
    confsmoe_ctx_free(ctx, g->lo);
    confsmoe_ctx_free(ctx, g->recv);
    confsmoe_ctx_free(ctx, g->work);
    confsmoe_ctx_free(ctx, g->out);
    confsmoe_ctx_free(ctx, g->send_rows);
    confsmoe_ctx_free(ctx, g->sent);
    confsmoe_ctx_free(ctx, g->got);
    confsmoe_ctx_free(ctx, g->stage.stage);
    confsmoe_ctx_free(ctx, g->grads);
    confsmoe_ctx_free(ctx, g);
}

/* The integer arrays of the exchange plan, in one place. */
static bool ep_alloc_plan(confsmoe_mpi_gate *g)
{
    const size_t P = (size_t)g->comm.size, n = P > (size_t)g->count ? P : (size_t)g->count;
    g->send_rows = confsmoe_ctx_calloc(g->ctx, 6 * (n + 1), sizeof(int));
    g->sent = confsmoe_ctx_calloc(g->ctx, (size_t)g->n_experts, sizeof *g->sent);
    g->got = confsmoe_ctx_calloc(g->ctx, P * (size_t)g->count, sizeof *g->got);
    if (!g->send_rows || !g->sent || !g->got)
        return false;
    g->send_at = g->send_rows + (n + 1);
    g->recv_rows = g->send_at + (n + 1);
    g->recv_at = g->recv_rows + (n + 1);
    g->expert_counts = g->recv_at + (n + 1);
    g->expert_at = g->expert_counts + (n + 1);
    return true;
}

confsmoe_status confsmoe_mpi_gate_create(MPI_Comm comm, confsmoe_ctx *ctx, const confsmoe_gate_params *p,
                                         int32_t n_experts, int64_t expert_hidden, confsmoe_mpi_gate **out)
{
    static const char fn[] = "mpi_gate_create";
    if (!out || !ctx || !p)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, !out ? "out" : !ctx ? "ctx" : "params");
    *out = NULL;
    confsmoe_status s = cmpi_require_version(fn);
    if (s != CONFSMOE_OK)
        return s;
    if (n_experts < 1 || p->d < 1 || expert_hidden < 0)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: n_experts >= 1, d >= 1 and expert_hidden >= 0 are needed",
                         fn);
    confsmoe_mpi_gate *g = confsmoe_ctx_calloc(ctx, 1, sizeof *g);
    if (!g)
        return cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    g->comm.comm = MPI_COMM_NULL;
    g->ctx = ctx;
    g->n_experts = n_experts;
    g->d = p->d;
    g->confidence = p->combine == CONFSMOE_COMBINE_CONFIDENCE;
    s = cmpi_comm_dup(comm, fn, &g->comm);
    if (s == CONFSMOE_OK && p->compat && g->comm.size > 1)
        s = cmpi_fail(CONFSMOE_E_UNSUPPORTED, "%s: compat dispatches slots across the whole batch, which cannot be "
                                              "split over ranks", fn);
    if (s == CONFSMOE_OK) {
        g->lo = confsmoe_ctx_calloc(ctx, (size_t)g->comm.size + 1, sizeof *g->lo);
        s = g->lo ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    }
    for (int r = 0; s == CONFSMOE_OK && r <= g->comm.size; r++) {
        int64_t first, count;
        confsmoe_mpi_shard(n_experts, r < g->comm.size ? r : r - 1, g->comm.size, &first, &count);
        g->lo[r] = (int32_t)(r < g->comm.size ? first : first + count);
    }
    if (s == CONFSMOE_OK) {
        g->first = g->lo[g->comm.rank];
        g->count = g->lo[g->comm.rank + 1] - g->first;
        g->experts = confsmoe_ctx_calloc(ctx, (size_t)g->count, sizeof *g->experts);
        s = g->experts && ep_alloc_plan(g) ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    }
    /* Every expert is drawn on every rank, so the streams stay together; each rank keeps its own. */
    for (int32_t e = 0; s == CONFSMOE_OK && e < n_experts; e++) {
        confsmoe_expert *expert = NULL;
        s = confsmoe_expert_create(ctx, p->d, expert_hidden ? expert_hidden : p->d, &expert);
        if (s != CONFSMOE_OK)
            s = cmpi_from_ctx(ctx, s, "confsmoe_expert_create");
        else if (e >= g->first && e < g->first + g->count)
            g->experts[e - g->first] = expert;
        else
            confsmoe_expert_destroy(expert);
    }
    if (s == CONFSMOE_OK) {
        const confsmoe_gate_exchange exchange = {ep_exchange_forward, ep_exchange_backward, ep_release_call, g};
        s = confsmoe_gate_create_exchange(ctx, p, n_experts, &exchange, &g->gate);
        if (s != CONFSMOE_OK)
            s = cmpi_from_ctx(ctx, s, "confsmoe_gate_create_exchange");
    }
    if (s == CONFSMOE_OK) {
        s = cmpi_check(MPI_Type_contiguous((int)p->d, MPI_FLOAT, &g->row), fn);
        if (s == CONFSMOE_OK && (s = cmpi_check(MPI_Type_commit(&g->row), fn)) == CONFSMOE_OK)
            g->row_committed = true;
    }
    if (s == CONFSMOE_OK) {
        g->n_grads = confsmoe_gate_n_params(g->gate);
        g->grads = confsmoe_ctx_calloc(ctx, (size_t)g->n_grads, sizeof *g->grads);
        s = g->grads ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
        for (int32_t i = 0; s == CONFSMOE_OK && i < g->n_grads; i++)
            g->grads[i] = confsmoe_gate_grad(g->gate, i);
        if (s == CONFSMOE_OK)
            s = cmpi_stage_alloc(ctx, 0, cmpi_numel(g->grads, g->n_grads), fn, &g->stage);
    }
    if (s != CONFSMOE_OK) {
        confsmoe_mpi_gate_destroy(g);
        return s;
    }
    *out = g;
    return CONFSMOE_OK;
}

confsmoe_gate *confsmoe_mpi_gate_local(confsmoe_mpi_gate *g) { return g ? g->gate : NULL; }
int32_t confsmoe_mpi_gate_first_expert(const confsmoe_mpi_gate *g) { return g ? g->first : -1; }
int32_t confsmoe_mpi_gate_n_local_experts(const confsmoe_mpi_gate *g) { return g ? g->count : -1; }

confsmoe_expert *confsmoe_mpi_gate_expert(confsmoe_mpi_gate *g, int32_t i)
{
    return g && i >= 0 && i < g->count ? g->experts[i] : NULL;
}

confsmoe_status confsmoe_mpi_gate_forward(confsmoe_mpi_gate *g, const confsmoe_tensor *x, const confsmoe_tensor *labels,
                                          const confsmoe_tensor *present, confsmoe_tensor *y, confsmoe_tensor *topk,
                                          confsmoe_tensor *slots, float *loss, confsmoe_mpi_saved **saved)
{
    static const char fn[] = "mpi_gate_forward";
    if (!g)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: the gate is NULL", fn);
    if (saved)
        *saved = NULL;
    const int64_t n = x && confsmoe_tensor_ndim(x) == 2 ? confsmoe_tensor_dim(x, 0) : 0;
    int64_t mine[2] = {n, n};
    if (present && confsmoe_tensor_numel(present) == n) {
        const uint8_t *v = confsmoe_tensor_data((confsmoe_tensor *)present);
        mine[1] = 0;
        for (int64_t t = 0; t < n; t++)
            mine[1] += v[t] != 0;
    }
    /* The global batch is the ranks' tokens in rank order: this rank's first, and the totals. */
    int64_t *all = confsmoe_ctx_calloc(g->ctx, (size_t)g->comm.size, sizeof mine);
    if (!all)
        return cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    confsmoe_status s = cmpi_check(MPI_Allgather(mine, 2, MPI_INT64_T, all, 2, MPI_INT64_T, g->comm.comm),
                                   "MPI_Allgather of the token counts");
    int64_t first = 0, tokens = 0, present_total = 0;
    for (int r = 0; s == CONFSMOE_OK && r < g->comm.size; r++) {
        first += r < g->comm.rank ? all[2 * r] : 0;
        tokens += all[2 * r];
        present_total += all[2 * r + 1];
    }
    confsmoe_ctx_free(g->ctx, all);
    if (s != CONFSMOE_OK)
        return s;
    /* The gate normalises its loss over this rank's tokens; the weight makes it a share of the
     * global batch's: L_conf's over the present slots (confidence gates), the load loss's over
     * the tokens (the others). */
    const int64_t part = g->confidence ? mine[1] : mine[0], whole = g->confidence ? present_total : tokens;
    const float weight = whole > 0 ? (float)part / (float)whole : 0.0f;
    s = confsmoe_gate_set_shard(g->gate, first, tokens);
    confsmoe_saved *inner = NULL;
    float local = 0.0f;
    if (s == CONFSMOE_OK)
        s = confsmoe_gate_forward(g->gate, x, labels, present, y, topk, slots, &local, saved ? &inner : NULL);
    confsmoe_gate_set_shard(g->gate, 0, 0);
    if (s != CONFSMOE_OK)
        return cmpi_from_ctx(g->ctx, s, "confsmoe_gate_forward");
    float share = weight * local;
    s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, &share, 1, MPI_FLOAT, MPI_SUM, g->comm.comm),
                   "MPI_Allreduce of the loss");
    confsmoe_mpi_saved *keep = NULL;
    if (s == CONFSMOE_OK && saved) {
        keep = confsmoe_ctx_calloc(g->ctx, 1, sizeof *keep);
        s = keep ? CONFSMOE_OK : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory", fn);
    }
    if (s != CONFSMOE_OK) {
        confsmoe_saved_destroy(inner);
        return s;
    }
    if (loss)
        *loss = share;
    if (saved) {
        *keep = (confsmoe_mpi_saved){g, g->ctx, inner, weight};
        *saved = keep;
    }
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_mpi_gate_backward(confsmoe_mpi_gate *g, confsmoe_mpi_saved *saved, const confsmoe_tensor *dy,
                                           const confsmoe_tensor *dslots, float dloss, confsmoe_tensor *dx)
{
    static const char fn[] = "mpi_gate_backward";
    if (!g || !saved)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, !g ? "the gate" : "saved");
    if (saved->g != g)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: saved comes from another gate's forward", fn);
    confsmoe_status s = confsmoe_gate_backward(g->gate, saved->inner, dy, dslots, dloss * saved->weight, dx);
    return s == CONFSMOE_OK ? s : cmpi_from_ctx(g->ctx, s, "confsmoe_gate_backward");
}

/* s->g is not read: the gate may be destroyed first (s's block holds the ctx). */
void confsmoe_mpi_saved_destroy(confsmoe_mpi_saved *s)
{
    if (!s)
        return;
    confsmoe_saved_destroy(s->inner);
    confsmoe_ctx_free(s->ctx, s);
}

confsmoe_status confsmoe_mpi_gate_allreduce_grads(confsmoe_mpi_gate *g)
{
    if (!g)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "mpi_gate_allreduce_grads: the gate is NULL");
    return cmpi_buckets(&g->comm, CMPI_SUM, g->grads, g->n_grads, NULL, &g->stage);
}
