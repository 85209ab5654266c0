/* fuzz_api: the public API driven by a program read from the input bytes.
 *
 * The first bytes set up the ctx (seed, NaN checks on or off, the C library's
 * allocator or a counting one that fails after a chosen number of allocations). Each
 * following byte picks an operation, whose arguments come from the next bytes: create
 * and destroy tensors (owned or wrapping host memory), experts, gates, imputers,
 * models and optimizers with small random shapes and parameters, invalid ones
 * included; run forward, backward, step, predict, fill, stats, the parameter view and
 * checkpoints in any order, with tensors that mostly fit, sometimes have a wrong
 * shape or dtype, are NULL, or hold NaN / Inf / huge values.
 *
 * What the harness keeps to, because the header makes it the host's duty: a parent
 * outlives its children (saved handles are destroyed before their layer, gates before
 * the experts they borrow, optimizers before the tensors they update, everything
 * before the ctx), wrapped memory outlives its tensor, one thread.
 *
 * Properties checked: no crash, leak or sanitizer report; every status is CONFSMOE_OK
 * or one of the documented negative statuses other than CONFSMOE_E_INTERNAL, and a
 * failure leaves a non-empty confsmoe_ctx_last_error(); a failed create leaves its
 * out-pointer NULL and a failed forward hands out no saved handle; the custom
 * allocator sees only power-of-two alignments and gets every block back. */
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CONFSMOE_EXPERIMENTAL /* the distributed hooks are fuzzed too */
#include <confsmoe.h>

#include "fuzz_common.h"

/* ---------------------------------------------------------------- input reader */

typedef struct {
    const uint8_t *p;
    size_t n, pos;
} src;

static uint8_t u8(src *s) { return s->pos < s->n ? s->p[s->pos++] : 0; }
static bool more(const src *s) { return s->pos < s->n; }
static int pick(src *s, int n) { return u8(s) % n; }
static bool coin(src *s) { return u8(s) & 1; }

/* A dimension: mostly 0..8, sometimes negative or so large that sizes overflow or
 * exceed what the sanitizer's allocator hands out (it then returns NULL). */
static int64_t dim64(src *s)
{
    static const int64_t special[] = {-1, -7, INT64_MIN, INT64_MAX, (int64_t)1 << 62, (int64_t)1 << 41,
                                      (int64_t)3 << 61, 1, 2, 3, 16, 65};
    uint8_t b = u8(s);
    if (b < 240)
        return b % 9;
    return special[(b - 240) % (sizeof special / sizeof special[0])];
}

/* A count that sizes allocations (experts, classes, ...): small, or invalid. */
static int32_t count32(src *s)
{
    static const int32_t special[] = {-1, -3, INT32_MIN, 0, 7, 8, 12, 17};
    uint8_t b = u8(s);
    if (b < 240)
        return b % 6;
    return special[(b - 240) % 8];
}

/* An enum, flag or bound that sizes nothing: anything. */
static int32_t any32(src *s)
{
    static const int32_t special[] = {-1, INT32_MIN, INT32_MAX, 2, 3, 4, 100, 1 << 20};
    uint8_t b = u8(s);
    if (b < 240)
        return b % 4;
    return special[(b - 240) % 8];
}

static float f32v(src *s)
{
    static const float special[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e30f, -1e30f, 1e-40f,
                                    FLT_MAX, -FLT_MAX, 1e10f, 2.0f, 0.999f, 1.0f, 0.5f, -1.0f};
    uint8_t b = u8(s);
    if (b < 200)
        return ((float)b - 100.0f) / 16.0f;
    return special[(b - 200) % 16];
}

/* ---------------------------------------------------------------- the ctx and its allocator */

typedef struct {
    bool failing;
    int64_t fail_after;  /* allocations left before NULLs */
    bool sticky;         /* once failing, keep failing */
    int64_t live;        /* blocks handed out and not freed */
} alloc_state;

static void *test_alloc(void *user, size_t size, size_t alignment)
{
    alloc_state *a = user;
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
        fuzz_fail("the library asked for alignment %zu", alignment);
    if (a->failing) {
        if (a->fail_after == 0) {
            if (!a->sticky)
                a->fail_after = -1;  /* one failure, then succeed again */
            return NULL;
        }
        if (a->fail_after > 0)
            a->fail_after--;
    }
    void *p = NULL;
    if (posix_memalign(&p, alignment, size ? size : 1) != 0)
        return NULL;
    a->live++;
    return p;
}

static void test_free(void *user, void *ptr)
{
    alloc_state *a = user;
    if (ptr) {
        a->live--;
        free(ptr);
    }
}

static confsmoe_ctx *ctx;
static bool host_allocator; /* ctx uses the fuzzer's allocator, which the ctx keeps nothing of */

#define FAIL_IF(cond, ...) do { if (cond) fuzz_fail(__VA_ARGS__); } while (0)

/* Every status is documented and explained. */
static confsmoe_status check(confsmoe_status s, const char *what)
{
    if (s == CONFSMOE_OK)
        return s;
    FAIL_IF(s > 0 || s < CONFSMOE_E_COMM, "%s returned the undocumented status %d", what, (int)s);
    FAIL_IF(s == CONFSMOE_E_INTERNAL, "%s returned CONFSMOE_E_INTERNAL: %s", what, confsmoe_ctx_last_error(ctx));
    FAIL_IF(strcmp(confsmoe_status_string(s), "unknown status") == 0, "%s: status %d has no text", what, (int)s);
    const char *msg = confsmoe_ctx_last_error(ctx);
    FAIL_IF(!msg || !msg[0], "%s failed with %d (%s) and an empty last error", what, (int)s,
            confsmoe_status_string(s));
    if (getenv("FUZZ_VERBOSE"))
        fprintf(stderr, "  %s -> %s: %s\n", what, confsmoe_status_string(s), msg);
    return s;
}

/* A call on a layer that may be NULL: documented statuses, or a failure for NULL. */
static void chk(const void *layer, confsmoe_status s, const char *what)
{
    if (layer)
        check(s, what);
    else
        FAIL_IF(s == CONFSMOE_OK, "%s succeeded on a NULL handle", what);
}

/* A create-style call: on failure *out must be NULL. */
#define CREATE(what, out, call) do { \
        (out) = (void *)(uintptr_t)0x1; \
        confsmoe_status s_ = check((call), what); \
        FAIL_IF(s_ != CONFSMOE_OK && (out) != NULL, "%s failed but left its out-pointer set", what); \
        FAIL_IF(s_ == CONFSMOE_OK && (out) == NULL, "%s succeeded with a NULL handle", what); \
    } while (0)

/* ---------------------------------------------------------------- the objects */

enum { N_T = 8, N_E = 4, N_G = 2, N_I = 2, N_M = 2, N_O = 2, N_S = 8, MAX_M = 3, MAX_MODALITIES = 256 };

typedef struct {
    confsmoe_tensor *t;
    void *host;  /* wrapped memory, freed with the tensor */
} tslot;

typedef struct {
    confsmoe_gate *g;
    unsigned experts;  /* bit i: borrows E[i] */
    int64_t d;
    int32_t k, n_experts, n_classes, target;
} gslot;

typedef struct {
    confsmoe_imputer *imp;
    int64_t d, S;
    int32_t M, k;
} islot;

typedef struct {
    confsmoe_model *m;
    int32_t M, n_classes, multilabel;
    int64_t S, features[MAX_M];
} mslot;

/* What an optimizer updates: destroying any of these destroys the optimizer first. */
enum { DEP_T = 0, DEP_E = N_T, DEP_G = DEP_E + N_E, DEP_I = DEP_G + N_G, DEP_M = DEP_I + N_I };
typedef struct {
    confsmoe_optim *o;
    uint32_t deps;
} oslot;

enum { OWNER_EXPERT, OWNER_GATE, OWNER_IMPUTER };
typedef struct {
    confsmoe_saved *s;
    int owner_kind, owner;
    int64_t n;  /* rows of the forward call (N, or B for the imputer) */
} sslot;

static tslot T[N_T];
static confsmoe_expert *E[N_E];
static gslot G[N_G];
static islot I[N_I];
static mslot M[N_M];
static oslot O[N_O];
static sslot S[N_S];

/* Tensors made for one operation's arguments, destroyed after it. */
static confsmoe_tensor *scratch[64];
static int n_scratch;

static void destroy_optims_with(int dep)
{
    for (int j = 0; j < N_O; j++)
        if (O[j].o && (O[j].deps >> dep & 1u)) {
            confsmoe_optim_destroy(O[j].o);
            O[j] = (oslot){0};
        }
}

static void destroy_saved_of(int kind, int owner)
{
    for (int j = 0; j < N_S; j++)
        if (S[j].s && S[j].owner_kind == kind && S[j].owner == owner) {
            confsmoe_saved_destroy(S[j].s);
            S[j] = (sslot){0};
        }
}

static void destroy_tensor(int i)
{
    destroy_optims_with(DEP_T + i);
    confsmoe_tensor_destroy(T[i].t);
    free(T[i].host);
    T[i] = (tslot){0};
}

static void destroy_gate(int i)
{
    destroy_saved_of(OWNER_GATE, i);
    destroy_optims_with(DEP_G + i);
    confsmoe_gate_destroy(G[i].g);
    G[i] = (gslot){0};
}

static void destroy_expert(int i)
{
    for (int j = 0; j < N_G; j++)
        if (G[j].g && (G[j].experts >> i & 1u))
            destroy_gate(j);
    destroy_saved_of(OWNER_EXPERT, i);
    destroy_optims_with(DEP_E + i);
    confsmoe_expert_destroy(E[i]);
    E[i] = NULL;
}

static void destroy_imputer(int i)
{
    destroy_saved_of(OWNER_IMPUTER, i);
    destroy_optims_with(DEP_I + i);
    confsmoe_imputer_destroy(I[i].imp);
    I[i] = (islot){0};
}

static void destroy_model(int i)
{
    destroy_optims_with(DEP_M + i);
    confsmoe_model_destroy(M[i].m);
    M[i] = (mslot){0};
}

static void destroy_scratch(void)
{
    while (n_scratch > 0)
        confsmoe_tensor_destroy(scratch[--n_scratch]);
}

static void destroy_all(void)
{
    destroy_scratch();
    for (int i = 0; i < N_S; i++) {
        confsmoe_saved_destroy(S[i].s);
        S[i] = (sslot){0};
    }
    for (int i = 0; i < N_O; i++) {
        confsmoe_optim_destroy(O[i].o);
        O[i] = (oslot){0};
    }
    for (int i = 0; i < N_G; i++)
        destroy_gate(i);
    for (int i = 0; i < N_E; i++)
        destroy_expert(i);
    for (int i = 0; i < N_I; i++)
        destroy_imputer(i);
    for (int i = 0; i < N_M; i++)
        destroy_model(i);
    for (int i = 0; i < N_T; i++)
        destroy_tensor(i);
}

/* ---------------------------------------------------------------- tensor arguments */

static void fill_data(src *s, confsmoe_dtype dtype, void *data, int64_t numel, int32_t bound)
{
    if (!data || numel <= 0)
        return;
    uint8_t mode = u8(s);
    uint32_t x = (uint32_t)u8(s) * 2654435761u + 12345u;
    for (int64_t i = 0; i < numel; i++) {
        x = x * 1664525u + 1013904223u;
        if (dtype == CONFSMOE_F32) {
            float v = ((float)(x >> 8) / 16777216.0f) * 4.0f - 2.0f;
            ((float *)data)[i] = v;
        } else if (dtype == CONFSMOE_I32) {
            ((int32_t *)data)[i] = bound > 0 ? (int32_t)((x >> 8) % (uint32_t)bound) : (int32_t)(x >> 8);
        } else {
            ((uint8_t *)data)[i] = bound > 0 ? (uint8_t)((x >> 8) % (uint32_t)bound) : (uint8_t)(x >> 8);
        }
    }
    /* Sometimes one element is special: NaN, Inf, a huge value, an out-of-range label. */
    if (mode >= 200) {
        int64_t at = (int64_t)u8(s) % numel;
        if (dtype == CONFSMOE_F32)
            ((float *)data)[at] = f32v(s);
        else if (dtype == CONFSMOE_I32)
            ((int32_t *)data)[at] = coin(s) ? -1 : bound + (int32_t)u8(s) % 3;
        else
            ((uint8_t *)data)[at] = (uint8_t)(2 + u8(s) % 254);
    }
}

/* A tensor for an argument that should be `dtype` of shape dims[0..ndim): NULL, a slot
 * tensor, or a new one that mostly fits (sometimes one dimension, the rank or the
 * dtype is off). Values: f32 in [-2, 2], integers below `bound`, with a special now
 * and then. */
static confsmoe_tensor *arg(src *s, confsmoe_dtype dtype, int32_t ndim, const int64_t *dims, int32_t bound)
{
    uint8_t sel = u8(s);
    if (sel < 12)
        return NULL;
    if (sel < 40)
        return T[sel % N_T].t;
    int64_t d[CONFSMOE_MAX_DIMS] = {1, 1, 1, 1};
    for (int32_t i = 0; i < ndim && i < CONFSMOE_MAX_DIMS; i++)
        d[i] = dims[i];
    if (sel >= 232) {
        switch (sel % 4) {
        case 0: d[sel / 4 % (ndim > 0 ? ndim : 1)] += 1; break;
        case 1: ndim = ndim < CONFSMOE_MAX_DIMS ? ndim + 1 : ndim - 1; break;
        case 2: dtype = (dtype + 1) % 3; break;
        default: if (ndim > 0) d[0] = d[0] > 0 ? d[0] - 1 : 1; break;
        }
    }
    for (int32_t i = 0; i < ndim; i++)
        if (d[i] < 0 || d[i] > 4096)
            return NULL;  /* the layer's own shape is invalid: nothing sensible to allocate */
    if (n_scratch == (int)(sizeof scratch / sizeof scratch[0]))
        return NULL;
    confsmoe_tensor *t = NULL;
    if (check(confsmoe_tensor_create(ctx, dtype, ndim, d, &t), "tensor_create (argument)") != CONFSMOE_OK)
        return NULL;
    scratch[n_scratch++] = t;
    fill_data(s, dtype, confsmoe_tensor_data(t), confsmoe_tensor_numel(t), bound);
    return t;
}

static int64_t batch(src *s)
{
    uint8_t b = u8(s);
    return b < 250 ? b % 6 : (b == 250 ? -1 : 7);
}

static int free_saved_slot(src *s)
{
    int i = pick(s, N_S);
    confsmoe_saved_destroy(S[i].s);
    S[i] = (sslot){0};
    return i;
}

static void keep_saved(int slot, confsmoe_status st, confsmoe_saved *sv, int kind, int owner, int64_t n,
                       const char *what)
{
    FAIL_IF(st != CONFSMOE_OK && sv != NULL, "%s failed but handed out a saved handle", what);
    FAIL_IF(st == CONFSMOE_OK && sv == NULL, "%s succeeded in training mode without a saved handle", what);
    if (sv)
        S[slot] = (sslot){sv, kind, owner, n};
}

/* ---------------------------------------------------------------- operations */

static void op_tensor_create(src *s, bool wrap)
{
    int i = pick(s, N_T);
    confsmoe_dtype dtype = pick(s, 8) < 7 ? pick(s, 3) : any32(s);
    int32_t ndim = pick(s, 7) - 1;
    int64_t dims[CONFSMOE_MAX_DIMS];
    for (int k = 0; k < CONFSMOE_MAX_DIMS; k++)
        dims[k] = dim64(s);
    bool null_dims = pick(s, 16) == 0;
    destroy_tensor(i);
    if (!wrap) {
        CREATE("tensor_create", T[i].t, confsmoe_tensor_create(ctx, dtype, ndim, null_dims ? NULL : dims, &T[i].t));
    } else {
        /* Host memory for the shape when it is small; otherwise NULL, or a misaligned pointer. */
        size_t bytes = dtype == CONFSMOE_U8 ? 1 : 4;
        bool small = ndim >= 0 && ndim <= CONFSMOE_MAX_DIMS;
        for (int k = 0; small && k < ndim; k++) {
            small = dims[k] >= 0 && dims[k] <= 4096;
            bytes *= small ? (size_t)dims[k] : 1;
            small = small && bytes <= (1u << 20);
        }
        void *host = NULL;
        int how = pick(s, 8);
        if (small && how != 0 && posix_memalign(&host, 64, bytes + 8) != 0)
            host = NULL;
        char *data = host ? (char *)host + (how == 1 ? 1 : 0) : NULL;
        CREATE("tensor_wrap", T[i].t, confsmoe_tensor_wrap(ctx, dtype, ndim, null_dims ? NULL : dims, data, &T[i].t));
        if (T[i].t)
            T[i].host = host;
        else
            free(host);
    }
    if (T[i].t)
        fill_data(s, confsmoe_tensor_dtype(T[i].t), confsmoe_tensor_data(T[i].t), confsmoe_tensor_numel(T[i].t),
                  pick(s, 4));
}

static void op_tensor_misc(src *s)
{
    confsmoe_tensor *t = coin(s) ? arg(s, CONFSMOE_F32, 1, (const int64_t[]){3}, 0) : T[pick(s, N_T)].t;
    int32_t axis = any32(s);
    (void)confsmoe_tensor_dtype(t);
    (void)confsmoe_tensor_ndim(t);
    int64_t dim = confsmoe_tensor_dim(t, axis);
    FAIL_IF(!t && dim != -1, "tensor_dim(NULL) is %lld", (long long)dim);
    FAIL_IF(t && (axis < 0 || axis >= confsmoe_tensor_ndim(t)) && dim != -1, "tensor_dim out of range is %lld",
            (long long)dim);
    int64_t numel = confsmoe_tensor_numel(t);
    size_t nbytes = confsmoe_tensor_nbytes(t);
    (void)numel;
    /* copy in / out with the right size or a wrong one; the buffer has the size passed. */
    size_t n = nbytes;
    switch (pick(s, 4)) {
    case 0: n = nbytes + 1 + u8(s) % 8; break;
    case 1: n = nbytes > 0 ? nbytes - 1 : 0; break;
    default: break;
    }
    if (n > (1u << 20))
        return;
    unsigned char *buf = malloc(n ? n : 1);
    memset(buf, u8(s), n);
    bool null_buf = pick(s, 16) == 0;
    confsmoe_status st = coin(s) ? confsmoe_tensor_copy_in(t, null_buf ? NULL : buf, n)
                                 : confsmoe_tensor_copy_out(t, null_buf ? NULL : buf, n);
    chk(t, st, "tensor_copy_in/out");
    free(buf);
}

static void op_expert_create(src *s)
{
    int i = pick(s, N_E);
    int64_t d = dim64(s), h = dim64(s);
    destroy_expert(i);
    if (pick(s, 16) == 0) {
        /* No ctx: nowhere to put a message, but it must fail and clear *out. */
        E[i] = (void *)(uintptr_t)0x1;
        FAIL_IF(confsmoe_expert_create(NULL, d, h, &E[i]) == CONFSMOE_OK || E[i] != NULL,
                "expert_create without a ctx");
        return;
    }
    CREATE("expert_create", E[i], confsmoe_expert_create(ctx, d, h, &E[i]));
}

static void op_expert_forward(src *s)
{
    int i = pick(s, N_E);
    confsmoe_expert *e = E[i];
    int64_t n = batch(s), d = e ? confsmoe_expert_d(e) : 2;
    const int64_t dims[2] = {n, d};
    const confsmoe_tensor *x = arg(s, CONFSMOE_F32, 2, dims, 0);
    confsmoe_tensor *y = arg(s, CONFSMOE_F32, 2, dims, 0);
    if (coin(s)) {
        int slot = free_saved_slot(s);
        confsmoe_saved *sv = NULL;
        confsmoe_status st = confsmoe_expert_forward(e, x, y, &sv);
        chk(e, st, "expert_forward (training)");
        keep_saved(slot, st, sv, OWNER_EXPERT, i, n, "expert_forward");
    } else {
        confsmoe_status st = confsmoe_expert_forward(e, x, y, NULL);
        chk(e, st, "expert_forward");
    }
}

static void op_expert_backward(src *s)
{
    int i = pick(s, N_E), j = pick(s, N_S);
    confsmoe_expert *e = E[i];
    /* The saved handle of this expert most of the time; any other one (or none) otherwise. */
    if (pick(s, 4) != 0)
        for (int k = 0; k < N_S; k++)
            if (S[(j + k) % N_S].s && S[(j + k) % N_S].owner_kind == OWNER_EXPERT && S[(j + k) % N_S].owner == i) {
                j = (j + k) % N_S;
                break;
            }
    int64_t n = S[j].s ? S[j].n : batch(s), d = e ? confsmoe_expert_d(e) : 2;
    const int64_t dims[2] = {n, d};
    const confsmoe_tensor *dy = arg(s, CONFSMOE_F32, 2, dims, 0);
    confsmoe_tensor *dx = coin(s) ? arg(s, CONFSMOE_F32, 2, dims, 0) : NULL;
    confsmoe_status st = confsmoe_expert_backward(e, S[j].s, dy, dx);
    chk(e, st, "expert_backward");
}

static void op_gate_create(src *s)
{
    int i = pick(s, N_G);
    destroy_gate(i);
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    int n = pick(s, 5);
    confsmoe_expert *list[N_E] = {0};
    unsigned used = 0;
    for (int k = 0; k < n; k++) {
        int e = pick(s, N_E);
        list[k] = E[e];
        used |= 1u << e;
    }
    p.d = coin(s) && list[0] ? confsmoe_expert_d(list[0]) : dim64(s);
    uint8_t which = u8(s);
    if (which & 1) p.k = any32(s);
    if (which & 2) p.router = any32(s);
    if (which & 4) p.noisy = any32(s);
    if (which & 8) p.combine = any32(s);
    if (which & 16) p.confidence = any32(s);
    p.n_classes = count32(s);
    if (which & 32) p.target = any32(s);
    if (which & 64) {
        p.detach_target = any32(s);
        p.router_grad = any32(s);
        p.load_loss = any32(s);
        p.compat = any32(s);
    }
    if (which & 128) {
        p.load_loss_weight = f32v(s);
        p.conf_loss_weight = f32v(s);
    }
    if (pick(s, 32) == 0) /* too small, or above the 64 KiB limit (neither is read past p) */
        p.struct_size = coin(s) ? sizeof p - 8 : sizeof p + 65536;
    bool null_params = pick(s, 32) == 0, null_list = pick(s, 32) == 0;
    CREATE("gate_create", G[i].g,
           confsmoe_gate_create(ctx, null_params ? NULL : &p, null_list ? NULL : list, n, &G[i].g));
    if (G[i].g)
        G[i] = (gslot){G[i].g, used, p.d, p.k, n, p.n_classes, p.target};
}

static void op_gate_forward(src *s)
{
    int i = pick(s, N_G);
    gslot *g = &G[i];
    int64_t n = batch(s), d = g->g ? g->d : 2, k = g->g ? g->k : 1, c = g->g ? g->n_classes : 2;
    const int64_t xd[2] = {n, d}, kd[2] = {n, k}, sd[3] = {n, k, d}, ld[2] = {n, c};
    const confsmoe_tensor *x = arg(s, CONFSMOE_F32, 2, xd, 0);
    const confsmoe_tensor *labels = g->target == CONFSMOE_TARGET_MULTI_LABEL ? arg(s, CONFSMOE_U8, 2, ld, 2)
                                                                            : arg(s, CONFSMOE_I32, 1, xd, (int32_t)c);
    const confsmoe_tensor *present = coin(s) ? arg(s, CONFSMOE_U8, 1, xd, 2) : NULL;
    confsmoe_tensor *y = arg(s, CONFSMOE_F32, 2, xd, 0);
    confsmoe_tensor *topk = coin(s) ? arg(s, CONFSMOE_I32, 2, kd, 0) : NULL;
    confsmoe_tensor *slots = coin(s) ? arg(s, CONFSMOE_F32, 3, sd, 0) : NULL;
    /* Sometimes a shard of a larger batch (or a bad one: first past total, a call too long). */
    if (g->g && pick(s, 4) == 0)
        chk(g->g, confsmoe_gate_set_shard(g->g, (int64_t)pick(s, 40) - 2, (int64_t)pick(s, 80) - 2), "gate_set_shard");
    float loss = 0.0f;
    float *lossp = coin(s) ? &loss : NULL;
    if (coin(s)) {
        int slot = free_saved_slot(s);
        confsmoe_saved *sv = NULL;
        confsmoe_status st = confsmoe_gate_forward(g->g, x, labels, present, y, topk, slots, lossp, &sv);
        chk(g->g, st, "gate_forward (training)");
        keep_saved(slot, st, sv, OWNER_GATE, i, n, "gate_forward");
    } else {
        confsmoe_status st = confsmoe_gate_forward(g->g, x, labels, present, y, topk, slots, lossp, NULL);
        chk(g->g, st, "gate_forward");
    }
}

static void op_gate_backward(src *s)
{
    int i = pick(s, N_G), j = pick(s, N_S);
    gslot *g = &G[i];
    if (pick(s, 4) != 0)
        for (int k = 0; k < N_S; k++)
            if (S[(j + k) % N_S].s && S[(j + k) % N_S].owner_kind == OWNER_GATE && S[(j + k) % N_S].owner == i) {
                j = (j + k) % N_S;
                break;
            }
    int64_t n = S[j].s ? S[j].n : batch(s), d = g->g ? g->d : 2, k = g->g ? g->k : 1;
    const int64_t xd[2] = {n, d}, sd[3] = {n, k, d};
    const confsmoe_tensor *dy = arg(s, CONFSMOE_F32, 2, xd, 0);
    const confsmoe_tensor *dslots = coin(s) ? arg(s, CONFSMOE_F32, 3, sd, 0) : NULL;
    float dloss = coin(s) ? 1.0f : f32v(s);
    confsmoe_tensor *dx = coin(s) ? arg(s, CONFSMOE_F32, 2, xd, 0) : NULL;
    confsmoe_status st = confsmoe_gate_backward(g->g, S[j].s, dy, dslots, dloss, dx);
    chk(g->g, st, "gate_backward");
}

static void op_gate_stats(src *s)
{
    gslot *g = &G[pick(s, N_G)];
    if (coin(s)) {
        confsmoe_gate_stats_reset(g->g);
        return;
    }
    confsmoe_gate_stats out = {.struct_size = pick(s, 16) ? sizeof out : sizeof out - 8};
    int32_t n = coin(s) && g->g ? confsmoe_gate_n_experts(g->g) : count32(s);
    /* Arrays of exactly n entries: a library that wrote E into fewer would be caught. */
    size_t len = n > 0 ? (size_t)n : 0;
    int64_t *load = coin(s) ? calloc(len ? len : 1, sizeof *load) : NULL;
    double *mc = coin(s) ? calloc(len ? len : 1, sizeof *mc) : NULL;
    confsmoe_status st =
        confsmoe_gate_stats_get(g->g, any32(s), pick(s, 32) ? &out : NULL, load, mc, n);
    chk(g->g, st, "gate_stats_get");
    free(load);
    free(mc);
    (void)confsmoe_gate_k(g->g);
}

static void op_imputer_create(src *s)
{
    int i = pick(s, N_I);
    destroy_imputer(i);
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = dim64(s);
    p.n_modalities = count32(s);
    uint8_t which = u8(s);
    if (which & 1) p.tokens = dim64(s);
    if (which & 2) p.k = count32(s);
    if (which & 4) p.top_t = any32(s);
    if (which & 8) p.renormalize = any32(s);
    if (which & 16) p.separate_value = any32(s);
    if (which & 32) p.compat = any32(s);
    if (which & 64 && pick(s, 4) == 0)
        p.struct_size = 0;
    CREATE("imputer_create", I[i].imp, confsmoe_imputer_create(ctx, (which & 128) && !pick(s, 8) ? NULL : &p,
                                                               &I[i].imp));
    if (I[i].imp)
        I[i] = (islot){I[i].imp, p.d, p.tokens, p.n_modalities, p.k};
}

static void op_imputer_fill(src *s)
{
    islot *im = &I[pick(s, N_I)];
    int64_t B = batch(s), P = batch(s), F = dim64(s) % 5, Sx = im->imp ? im->S : 1;
    int32_t Mo = im->imp ? im->M : 2;
    int32_t m = coin(s) ? pick(s, Mo > 0 ? Mo : 1) : any32(s);
    bool three = coin(s);
    const int64_t xd3[3] = {B, Sx, F}, xd2[2] = {B, F}, pd3[3] = {P, Sx, F}, pd2[2] = {P, F}, ad[2] = {B, Mo};
    const confsmoe_tensor *pool = three ? arg(s, CONFSMOE_F32, 3, pd3, 0) : arg(s, CONFSMOE_F32, 2, pd2, 0);
    const confsmoe_tensor *avail = arg(s, CONFSMOE_U8, 2, ad, 2);
    confsmoe_tensor *x = three ? arg(s, CONFSMOE_F32, 3, xd3, 0) : arg(s, CONFSMOE_F32, 2, xd2, 0);
    confsmoe_status st = confsmoe_imputer_fill(im->imp, m, pool, any32(s), avail, x);
    chk(im->imp, st, "imputer_fill");
}

static void op_imputer_forward(src *s)
{
    int i = pick(s, N_I);
    islot *im = &I[i];
    int64_t B = batch(s), d = im->imp ? im->d : 2, Sx = im->imp ? im->S : 1, k = im->imp ? im->k : 2;
    int32_t Mo = im->imp ? im->M : 2;
    const int64_t hd[3] = {B, Mo * Sx, d}, sd[4] = {Mo, B * Sx, k, d}, ad[2] = {B, Mo};
    const confsmoe_tensor *h = arg(s, CONFSMOE_F32, 3, hd, 0);
    const confsmoe_tensor *slots = arg(s, CONFSMOE_F32, 4, sd, 0);
    const confsmoe_tensor *avail = arg(s, CONFSMOE_U8, 2, ad, 2);
    confsmoe_tensor *out = coin(s) ? (confsmoe_tensor *)h : arg(s, CONFSMOE_F32, 3, hd, 0);
    if (coin(s)) {
        int slot = free_saved_slot(s);
        confsmoe_saved *sv = NULL;
        confsmoe_status st = confsmoe_imputer_forward(im->imp, h, slots, avail, out, &sv);
        chk(im->imp, st, "imputer_forward (training)");
        keep_saved(slot, st, sv, OWNER_IMPUTER, i, B, "imputer_forward");
    } else {
        confsmoe_status st = confsmoe_imputer_forward(im->imp, h, slots, avail, out, NULL);
        chk(im->imp, st, "imputer_forward");
    }
}

static void op_imputer_backward(src *s)
{
    int i = pick(s, N_I), j = pick(s, N_S);
    islot *im = &I[i];
    if (pick(s, 4) != 0)
        for (int k = 0; k < N_S; k++)
            if (S[(j + k) % N_S].s && S[(j + k) % N_S].owner_kind == OWNER_IMPUTER && S[(j + k) % N_S].owner == i) {
                j = (j + k) % N_S;
                break;
            }
    int64_t B = S[j].s ? S[j].n : batch(s), d = im->imp ? im->d : 2, Sx = im->imp ? im->S : 1,
            k = im->imp ? im->k : 2;
    int32_t Mo = im->imp ? im->M : 2;
    const int64_t hd[3] = {B, Mo * Sx, d}, sd[4] = {Mo, B * Sx, k, d};
    const confsmoe_tensor *dout = arg(s, CONFSMOE_F32, 3, hd, 0);
    confsmoe_tensor *dh = coin(s) ? arg(s, CONFSMOE_F32, 3, hd, 0) : NULL;
    confsmoe_tensor *dslots = coin(s) ? arg(s, CONFSMOE_F32, 4, sd, 0) : NULL;
    confsmoe_status st = confsmoe_imputer_backward(im->imp, S[j].s, dout, dh, dslots);
    chk(im->imp, st, "imputer_backward");
}

static void op_optim_create(src *s)
{
    int i = pick(s, N_O);
    confsmoe_optim_destroy(O[i].o);
    O[i] = (oslot){0};
    confsmoe_optim_params p;
    confsmoe_optim_params_init(&p);
    uint8_t which = u8(s);
    if (which & 1) p.kind = any32(s);
    if (which & 2) p.lr = f32v(s);
    if (which & 4) {
        p.beta1 = f32v(s);
        p.beta2 = f32v(s);
        p.eps = f32v(s);
    }
    if (which & 8) p.momentum = f32v(s);
    if (which & 16) p.weight_decay = f32v(s);
    if (which & 32 && coin(s))
        p.struct_size = 1;
    CREATE("optim_create", O[i].o, confsmoe_optim_create(ctx, (which & 64) && coin(s) ? NULL : &p, &O[i].o));
}

/* A (param, grad) pair from a layer's parameter view or from the tensor slots. */
static void op_optim_add(src *s)
{
    oslot *o = &O[pick(s, N_O)];
    int32_t idx = any32(s) % 64;
    confsmoe_tensor *p = NULL, *g = NULL;
    int dep = -1;
    int which = pick(s, 5);
    if (which == 0) {
        int e = pick(s, N_E);
        p = confsmoe_expert_param(E[e], idx);
        g = coin(s) ? confsmoe_expert_grad(E[e], idx) : confsmoe_expert_grad(E[e], idx + 1);
        dep = DEP_E + e;
    } else if (which == 1) {
        int j = pick(s, N_G);
        p = confsmoe_gate_param(G[j].g, idx);
        g = confsmoe_gate_grad(G[j].g, idx);
        dep = DEP_G + j;
    } else if (which == 2) {
        int j = pick(s, N_I);
        p = confsmoe_imputer_param(I[j].imp, idx);
        g = confsmoe_imputer_grad(I[j].imp, idx);
        dep = DEP_I + j;
    } else if (which == 3) {
        int j = pick(s, N_M);
        p = confsmoe_model_param(M[j].m, idx);
        g = confsmoe_model_grad(M[j].m, idx);
        dep = DEP_M + j;
    } else {
        int a = pick(s, N_T), b = pick(s, N_T);
        p = T[a].t;
        g = T[b].t;
        confsmoe_status st = confsmoe_optim_add(o->o, p, g);
        chk(o->o, st, "optim_add (tensors)");
        if (st == CONFSMOE_OK)
            o->deps |= 1u << (DEP_T + a) | 1u << (DEP_T + b);
        return;
    }
    confsmoe_status st = confsmoe_optim_add(o->o, p, g);
    chk(o->o, st, "optim_add");
    if (st == CONFSMOE_OK)
        o->deps |= 1u << dep;
}

static void op_optim_step(src *s)
{
    oslot *o = &O[pick(s, N_O)];
    confsmoe_status st = coin(s) ? confsmoe_optim_step(o->o) : confsmoe_optim_set_lr(o->o, f32v(s));
    chk(o->o, st, "optim_step/set_lr");
}

static void op_model_create(src *s)
{
    int i = pick(s, N_M);
    destroy_model(i);
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    int64_t features[MAX_MODALITIES];
    p.n_modalities = coin(s) ? 1 + pick(s, MAX_M) : count32(s);
    for (int m = 0; m < MAX_MODALITIES; m++)
        features[m] = m <= MAX_M ? 1 + pick(s, 4) : 1;
    if (pick(s, 8) == 0)
        features[pick(s, MAX_M)] = dim64(s);
    p.features = pick(s, 32) ? features : NULL;
    p.tokens = 1 + pick(s, 3);
    p.d = 1 + pick(s, 8);
    p.heads = 1;
    p.n_experts = 1 + pick(s, 4);
    p.k = 1 + pick(s, 2);
    p.n_classes = 2 + pick(s, 3);
    p.draws = 1 + pick(s, 4);
    uint8_t which = u8(s), more_bits = u8(s);
    if (which & 1) p.tokens = dim64(s);
    if (which & 2) p.d = dim64(s);
    if (which & 4) p.heads = count32(s);
    if (which & 8) p.n_experts = count32(s);
    if (which & 16) p.k = any32(s);
    if (which & 32) p.expert_hidden = dim64(s);
    if (which & 64) p.n_classes = count32(s);
    if (which & 128) p.multilabel = any32(s);
    if (more_bits & 1) p.gate = any32(s);
    if (more_bits & 2) {
        p.load_loss = any32(s);
        p.load_loss_weight = f32v(s);
        p.conf_loss_weight = f32v(s);
    }
    if (more_bits & 4) {
        p.confidence = any32(s);
        p.router_grad = any32(s);
        p.detach_target = any32(s);
        p.noisy = any32(s);
    }
    if (more_bits & 8) {
        p.imputation = any32(s);
        p.draws = any32(s);
        p.top_t = any32(s);
    }
    if (more_bits & 16) {
        p.renormalize = any32(s);
        p.separate_value = any32(s);
        p.compat = any32(s);
    }
    p.dropout = more_bits & 32 ? f32v(s) : (float)pick(s, 3) * 0.25f;
    if (more_bits & 64 && coin(s))
        p.struct_size = sizeof p - 4;
    CREATE("model_create", M[i].m, confsmoe_model_create(ctx, &p, &M[i].m));
    if (M[i].m) {
        M[i].M = p.n_modalities;
        M[i].S = p.tokens;
        M[i].n_classes = p.n_classes;
        M[i].multilabel = p.multilabel;
        for (int m = 0; m < MAX_M; m++)
            M[i].features[m] = m < p.n_modalities ? features[m] : 1;
        /* features are read at create: the model must not keep the pointer. */
        features[0] = -5;
    }
}

static void op_model_pool(src *s)
{
    mslot *mo = &M[pick(s, N_M)];
    int32_t m = coin(s) ? pick(s, mo->m && mo->M > 0 ? mo->M : 1) : any32(s);
    int64_t F = mo->m && m >= 0 && m < MAX_M ? mo->features[m] : 2, P = batch(s), Sx = mo->m ? mo->S : 1;
    const int64_t d3[3] = {P, Sx, F}, d2[2] = {P, F};
    const confsmoe_tensor *pool = coin(s) ? arg(s, CONFSMOE_F32, 3, d3, 0) : arg(s, CONFSMOE_F32, 2, d2, 0);
    confsmoe_status st = confsmoe_model_set_pool(mo->m, m, pool);
    chk(mo->m, st, "model_set_pool");
}

static void op_model_run(src *s, bool train)
{
    mslot *mo = &M[pick(s, N_M)];
    int64_t B = batch(s), Sx = mo->m ? mo->S : 1, C = mo->m ? mo->n_classes : 2;
    int32_t Mo = mo->m ? mo->M : 2;
    /* M entries as the header requires; past the first MAX_M they are NULL. */
    static const confsmoe_tensor *inputs[MAX_MODALITIES];
    memset(inputs, 0, sizeof inputs);
    bool three = coin(s);
    for (int m = 0; m < MAX_M; m++) {
        const int64_t d3[3] = {B, Sx, mo->m ? mo->features[m] : 2}, d2[2] = {B, d3[2]};
        inputs[m] = three || Sx != 1 ? arg(s, CONFSMOE_F32, 3, d3, 0) : arg(s, CONFSMOE_F32, 2, d2, 0);
    }
    const int64_t ad[2] = {B, Mo}, cd[2] = {B, C};
    const confsmoe_tensor *avail = arg(s, CONFSMOE_U8, 2, ad, 2);
    confsmoe_tensor *logits = train && coin(s) ? NULL : arg(s, CONFSMOE_F32, 2, cd, 0);
    bool null_inputs = pick(s, 32) == 0;
    if (train) {
        const confsmoe_tensor *labels = mo->multilabel == 1 ? arg(s, CONFSMOE_U8, 2, cd, 2)
                                                            : arg(s, CONFSMOE_I32, 1, cd, (int32_t)C);
        float loss, task;
        confsmoe_status st;
        if (pick(s, 4) == 0) {
            /* A shard: of a global mask that holds avail, or of any mask, at any place. */
            const int64_t gd[2] = {batch(s), coin(s) ? Mo : Mo + 1};
            const confsmoe_tensor *global = coin(s) ? avail : arg(s, CONFSMOE_U8, 2, gd, 2);
            st = confsmoe_model_step_shard(mo->m, null_inputs ? NULL : inputs, avail, labels, global,
                                           (int64_t)pick(s, 16) - 1, logits, coin(s) ? &loss : NULL,
                                           coin(s) ? &task : NULL);
            chk(mo->m, st, "model_step_shard");
        } else {
            st = confsmoe_model_step(mo->m, null_inputs ? NULL : inputs, avail, labels, logits,
                                     coin(s) ? &loss : NULL, coin(s) ? &task : NULL);
            chk(mo->m, st, "model_step");
        }
    } else {
        confsmoe_status st = confsmoe_model_predict(mo->m, null_inputs ? NULL : inputs, avail, logits);
        chk(mo->m, st, "model_predict");
    }
}

/* The uniform parameter view of any layer: names, tensors, and writes into them. */
static void op_params(src *s)
{
    int32_t idx = any32(s) % 80;
    confsmoe_tensor *p = NULL, *g = NULL;
    const char *name = NULL;
    int32_t n = 0;
    switch (pick(s, 4)) {
    case 0: {
        confsmoe_expert *e = E[pick(s, N_E)];
        n = confsmoe_expert_n_params(e);
        name = confsmoe_expert_param_name(e, idx);
        p = confsmoe_expert_param(e, idx);
        g = confsmoe_expert_grad(e, idx);
        if (coin(s))
            confsmoe_expert_zero_grad(e);
        break;
    }
    case 1: {
        confsmoe_gate *gt = coin(s) && M[0].m ? confsmoe_model_gate(M[0].m) : G[pick(s, N_G)].g;
        n = confsmoe_gate_n_params(gt);
        name = confsmoe_gate_param_name(gt, idx);
        p = confsmoe_gate_param(gt, idx);
        g = confsmoe_gate_grad(gt, idx);
        if (coin(s))
            confsmoe_gate_zero_grad(gt);
        break;
    }
    case 2: {
        confsmoe_imputer *im = I[pick(s, N_I)].imp;
        n = confsmoe_imputer_n_params(im);
        name = confsmoe_imputer_param_name(im, idx);
        p = confsmoe_imputer_param(im, idx);
        g = confsmoe_imputer_grad(im, idx);
        if (coin(s))
            confsmoe_imputer_zero_grad(im);
        break;
    }
    default: {
        confsmoe_model *mo = M[pick(s, N_M)].m;
        n = confsmoe_model_n_params(mo);
        name = confsmoe_model_param_name(mo, idx);
        p = confsmoe_model_param(mo, idx);
        g = confsmoe_model_grad(mo, idx);
        if (coin(s))
            confsmoe_model_zero_grad(mo);
        break;
    }
    }
    bool in_range = idx >= 0 && idx < n;
    FAIL_IF(in_range != (p != NULL) || in_range != (g != NULL) || in_range != (name != NULL),
            "parameter view: index %d of %d gives param %p, grad %p, name %s", idx, n, (void *)p, (void *)g,
            name ? name : "NULL");
    if (p && coin(s)) {
        FAIL_IF(confsmoe_tensor_nbytes(p) != confsmoe_tensor_nbytes(g), "param %s and its grad differ in size",
                name);
        fill_data(s, CONFSMOE_F32, confsmoe_tensor_data(coin(s) ? p : g), confsmoe_tensor_numel(p), 0);
    }
}

static void op_checkpoint(src *s)
{
    confsmoe_model *mo = M[pick(s, N_M)].m;
    confsmoe_optim *o = coin(s) ? O[pick(s, N_O)].o : NULL;
    char path[4200];
    snprintf(path, sizeof path, "%s/api.safetensors", fuzz_tmpdir());
    const char *p = pick(s, 16) ? path : (coin(s) ? "" : NULL);
    if (!mo)
        return;  /* no ctx to report into; checked to fail quietly below */
    confsmoe_status st = coin(s) ? confsmoe_checkpoint_save(mo, o, p) : confsmoe_checkpoint_load(mo, o, p);
    check(st, "checkpoint_save/load");
    FAIL_IF(st != CONFSMOE_OK && st != CONFSMOE_E_INVALID_ARGUMENT && st != CONFSMOE_E_IO &&
                st != CONFSMOE_E_FORMAT && st != CONFSMOE_E_NOMEM,
            "checkpoint: undocumented status %d", (int)st);
}

static void op_misc(src *s)
{
    switch (pick(s, 5)) {
    case 0: check(confsmoe_ctx_set_seed(ctx, u8(s)), "ctx_set_seed"); break;
    case 1: FAIL_IF(!confsmoe_status_string(any32(s)), "status_string is NULL"); break;
    case 2: free_saved_slot(s); break;
    case 3: {
        /* Blocks in use must survive it (ASan sees a use after free if not). */
        const size_t released = confsmoe_ctx_trim(ctx);
        FAIL_IF(host_allocator && released != 0, "ctx_trim gave back %zu bytes of a host allocator", released);
        break;
    }
    default: {
        int kind = pick(s, 5);
        if (kind == 0) destroy_tensor(pick(s, N_T));
        else if (kind == 1) destroy_expert(pick(s, N_E));
        else if (kind == 2) destroy_gate(pick(s, N_G));
        else if (kind == 3) destroy_imputer(pick(s, N_I));
        else destroy_model(pick(s, N_M));
    }
    }
}

/* ---------------------------------------------------------------- the fuzz target */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    src in = {data, size, 0};
    static alloc_state astate;
    astate = (alloc_state){0};
    confsmoe_allocator allocator = {test_alloc, test_free, &astate};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.seed = u8(&in);
    uint8_t setup = u8(&in);
    p.check_finite = setup & 1 ? 0 : 1;
    host_allocator = (setup & 2) != 0;
    if (host_allocator) {
        p.allocator = &allocator;
        astate.failing = (setup & 4) != 0;
        astate.sticky = (setup & 8) != 0;
        astate.fail_after = u8(&in) * (setup & 16 ? 8 : 1);
    }
    ctx = (void *)(uintptr_t)0x1;
    confsmoe_status st = confsmoe_ctx_create(&p, &ctx);
    FAIL_IF(st != CONFSMOE_OK && ctx != NULL, "ctx_create failed but left its out-pointer set");
    if (st != CONFSMOE_OK) {
        FAIL_IF(st != CONFSMOE_E_NOMEM, "ctx_create: status %d", (int)st);
        FAIL_IF(astate.live != 0, "a failed ctx_create kept %lld blocks", (long long)astate.live);
        return 0;
    }
    for (int ops = 0; ops < 32 && more(&in); ops++) {
        switch (u8(&in) % 24) {
        case 0: op_tensor_create(&in, false); break;
        case 1: op_tensor_create(&in, true); break;
        case 2: op_tensor_misc(&in); break;
        case 3: op_expert_create(&in); break;
        case 4: op_expert_forward(&in); break;
        case 5: op_expert_backward(&in); break;
        case 6: op_gate_create(&in); break;
        case 7: op_gate_forward(&in); break;
        case 8: op_gate_backward(&in); break;
        case 9: op_gate_stats(&in); break;
        case 10: op_imputer_create(&in); break;
        case 11: op_imputer_fill(&in); break;
        case 12: op_imputer_forward(&in); break;
        case 13: op_imputer_backward(&in); break;
        case 14: op_optim_create(&in); break;
        case 15: op_optim_add(&in); break;
        case 16: op_optim_step(&in); break;
        case 17: op_model_create(&in); break;
        case 18: op_model_pool(&in); break;
        case 19: op_model_run(&in, true); break;
        case 20: op_model_run(&in, false); break;
        case 21: op_params(&in); break;
        case 22: op_checkpoint(&in); break;
        default: op_misc(&in); break;
        }
        destroy_scratch();
    }
    destroy_all();
    confsmoe_ctx_destroy(ctx);
    ctx = NULL;
    FAIL_IF(astate.live != 0, "%lld blocks of the ctx allocator were never freed", (long long)astate.live);
    return 0;
}
