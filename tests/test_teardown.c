/* Destroy in any order (docs/API.md, "Objects and ownership"): every destroy function is safe
 * whatever was destroyed before it, the ctx included. Each test builds its objects, runs a real
 * training forward and backward (so that saved handles, workspaces and optimizer state exist),
 * then destroys the parts in one of all their orders, using what is left after every destroy.
 * Every order runs twice: with the library's allocator (valgrind and ASan, tests/sanitize/run,
 * see a read of freed memory) and with a host allocator that poisons each block it frees (such a
 * read then crashes here too) and counts the blocks, which must all come back. */
#define CONFSMOE_EXPERIMENTAL
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "testutil.h"

enum { D = 8, H = 12, E = 3, K = 2, N = 6, C = 3, MAX_PARTS = 6 };

/* Part 0 of every rig is its ctx. */
enum { CTX = 0 };

/* ------------------------------------------------------------------ a poisoning host allocator */

/* Counts blocks, and fills each block with POISON before it goes back to the C library: a
 * pointer read from freed memory (the ctx's allocator, say) is then garbage, not the old value. */
typedef struct {
    long live, allocs, frees;
} poison_alloc;

#define POISON 0xA5
/* Called through a volatile pointer: a plain memset right before free is a dead store to the
 * compiler, which removes it. */
static void *(*volatile poison_fill)(void *, int, size_t) = memset;

/* Each block is preceded by its size and its header's size. */
static void *poison_alloc_fn(void *user, size_t size, size_t alignment)
{
    poison_alloc *a = user;
    const size_t header = alignment > 2 * sizeof(size_t) ? alignment : 2 * sizeof(size_t);
    void *base = NULL;
    if (posix_memalign(&base, alignment, header + size) != 0)
        return NULL;
    size_t *p = (size_t *)((char *)base + header);
    p[-1] = size;
    p[-2] = header;
    a->live++;
    a->allocs++;
    return p;
}

static void poison_free_fn(void *user, void *ptr)
{
    poison_alloc *a = user;
    if (!ptr)
        return;
    const size_t size = ((size_t *)ptr)[-1], header = ((size_t *)ptr)[-2];
    char *base = (char *)ptr - header;
    poison_fill(base, POISON, header + size);
    free(base);
    a->live--;
    a->frees++;
}

/* ------------------------------------------------------------------ orders */

static int64_t factorial(int n) { return n <= 1 ? 1 : n * factorial(n - 1); }

/* The index-th of the n! orders of parts 0..n-1 (the Lehmer code of index). */
static void nth_order(int64_t index, int n, int *order)
{
    int left[MAX_PARTS];
    for (int i = 0; i < n; i++)
        left[i] = i;
    for (int pos = 0; pos < n; pos++) {
        const int64_t block = factorial(n - 1 - pos);
        const int pick = (int)(index / block);
        index %= block;
        order[pos] = left[pick];
        memmove(&left[pick], &left[pick + 1], (size_t)(n - 1 - pos - pick) * sizeof left[0]);
    }
}

/* What each test says about its rig. */
typedef struct {
    int n_parts;
    void (*destroy)(void *rig, int part);
    /* Calls on what is left, each of which must succeed (alive[part] is false once destroyed). */
    void (*use)(void *rig, const bool *alive);
} rig_kind;

/* Loop index i: order i / 2 of the kind's parts, with the host allocator when i is odd. */
static int64_t order_of(int i) { return i / 2; }
static bool host_allocator_of(int i) { return i % 2 == 1; }

/* Destroys the rig's parts in the order-th order. With a host allocator a: the ctx stays
 * until the last part, the allocator gets every block back, and the frees after
 * confsmoe_ctx_destroy still reach it. */
static void destroy_in_order(void *rig, const rig_kind *kind, int64_t order, const poison_alloc *a)
{
    int parts[MAX_PARTS];
    nth_order(order, kind->n_parts, parts);
    bool alive[MAX_PARTS];
    for (int i = 0; i < kind->n_parts; i++)
        alive[i] = true;
    long frees_at_ctx_destroy = -1;
    for (int i = 0; i < kind->n_parts; i++) {
        kind->destroy(rig, parts[i]);
        alive[parts[i]] = false;
        if (parts[i] == CTX && a) {
            frees_at_ctx_destroy = a->frees;
            if (i < kind->n_parts - 1)
                ck_assert_msg(a->live > 0, "the ctx was freed while %d parts still use it", kind->n_parts - 1 - i);
        }
        kind->use(rig, alive);
    }
    if (a) {
        ck_assert_int_eq(a->live, 0);
        ck_assert_int_eq(a->allocs, a->frees);
        if (parts[kind->n_parts - 1] != CTX)
            ck_assert_msg(a->frees > frees_at_ctx_destroy,
                          "the parts destroyed after the ctx freed nothing through its allocator");
    }
}

static confsmoe_ctx *rig_ctx(bool host, poison_alloc *a, confsmoe_allocator *holder)
{
    memset(a, 0, sizeof *a);
    *holder = (confsmoe_allocator){poison_alloc_fn, poison_free_fn, a};
    return test_ctx_with(7, 1, host ? holder : NULL);
}

static bool all_finite(confsmoe_tensor *t)
{
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (!isfinite(f32(t)[i]))
            return false;
    return true;
}

static bool any_nonzero(confsmoe_tensor *t)
{
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (f32(t)[i] != 0.0f)
            return true;
    return false;
}

static void gate_params(confsmoe_gate_params *p)
{
    confsmoe_gate_params_init(p);
    p->d = D;
    p->k = K;
    p->n_classes = C;
}

/* ------------------------------------------------------------------ ctx, experts, gate, tensors, saved, optimizer */

enum { L_EXPERTS = 1, L_GATE, L_TENSORS, L_SAVED, L_OPTIM, L_PARTS };

typedef struct {
    poison_alloc a;
    confsmoe_allocator holder;
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[E];
    confsmoe_gate *gate;
    confsmoe_tensor *x, *labels, *y, *dy, *dx;
    float y_data[N * D];      /* y wraps host memory */
    confsmoe_saved *used;     /* backward ran */
    confsmoe_saved *unused;   /* a training forward never backpropagated */
    confsmoe_saved *expert_saved;
    confsmoe_optim *optim;
} layer_rig;

static void layer_optim_add_all(layer_rig *r)
{
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(r->experts[e]); i++)
            ck_assert_int_eq(confsmoe_optim_add(r->optim, confsmoe_expert_param(r->experts[e], i),
                                                confsmoe_expert_grad(r->experts[e], i)),
                             CONFSMOE_OK);
    for (int32_t i = 0; i < confsmoe_gate_n_params(r->gate); i++)
        ck_assert_int_eq(confsmoe_optim_add(r->optim, confsmoe_gate_param(r->gate, i), confsmoe_gate_grad(r->gate, i)),
                         CONFSMOE_OK);
}

static void layer_open(layer_rig *r, bool host)
{
    memset(r, 0, sizeof *r);
    r->ctx = rig_ctx(host, &r->a, &r->holder);
    for (int e = 0; e < E; e++)
        ck_assert_int_eq(confsmoe_expert_create(r->ctx, D, H, &r->experts[e]), CONFSMOE_OK);
    confsmoe_gate_params p;
    gate_params(&p);
    ck_assert_int_eq(confsmoe_gate_create(r->ctx, &p, r->experts, E, &r->gate), CONFSMOE_OK);
    trng g = {11};
    r->x = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    fill_uniform(r->x, &g, -1, 1);
    r->labels = test_tensor(r->ctx, CONFSMOE_I32, 1, N, 0, 0, 0);
    for (int t = 0; t < N; t++)
        i32(r->labels)[t] = t % C;
    const int64_t dims[2] = {N, D};
    ck_assert_int_eq(confsmoe_tensor_wrap(r->ctx, CONFSMOE_F32, 2, dims, r->y_data, &r->y), CONFSMOE_OK);
    r->dy = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    fill_uniform(r->dy, &g, -1, 1);
    r->dx = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);

    float loss = NAN;
    ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, r->labels, NULL, r->y, NULL, NULL, &loss, &r->used),
                     CONFSMOE_OK);
    ck_assert(isfinite(loss) && all_finite(r->y));
    ck_assert_int_eq(confsmoe_gate_backward(r->gate, r->used, r->dy, NULL, 1.0f, r->dx), CONFSMOE_OK);
    ck_assert(any_nonzero(r->dx));
    ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, r->labels, NULL, r->y, NULL, NULL, NULL, &r->unused),
                     CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_forward(r->experts[0], r->x, r->y, &r->expert_saved), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(r->experts[0], r->expert_saved, r->dy, r->dx), CONFSMOE_OK);

    ck_assert_int_eq(confsmoe_optim_create(r->ctx, NULL, &r->optim), CONFSMOE_OK);
    layer_optim_add_all(r);
    ck_assert_int_eq(confsmoe_optim_step(r->optim), CONFSMOE_OK);
}

static void layer_destroy(void *rig, int part)
{
    layer_rig *r = rig;
    switch (part) {
    case CTX:
        confsmoe_ctx_destroy(r->ctx);
        break;
    case L_EXPERTS:
        for (int e = 0; e < E; e++)
            confsmoe_expert_destroy(r->experts[e]);
        break;
    case L_GATE:
        confsmoe_gate_destroy(r->gate);
        break;
    case L_TENSORS:
        confsmoe_tensor_destroy(r->x);
        confsmoe_tensor_destroy(r->labels);
        confsmoe_tensor_destroy(r->y);
        confsmoe_tensor_destroy(r->dy);
        confsmoe_tensor_destroy(r->dx);
        break;
    case L_SAVED:
        confsmoe_saved_destroy(r->used);
        confsmoe_saved_destroy(r->unused);
        confsmoe_saved_destroy(r->expert_saved);
        break;
    case L_OPTIM:
        confsmoe_optim_destroy(r->optim);
        break;
    default:
        ck_abort_msg("no part %d", part);
    }
}

/* The gate runs while it and its experts live, and the optimizer steps while its tensors (the
 * experts' and the gate's) live, whatever else is gone, the ctx included. */
static void layer_use(void *rig, const bool *alive)
{
    layer_rig *r = rig;
    if (alive[L_EXPERTS] && alive[L_GATE] && alive[L_TENSORS]) {
        memset(r->y_data, 0xff, sizeof r->y_data);
        ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, NULL, NULL, r->y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
        ck_assert(all_finite(r->y));
    }
    if (alive[L_EXPERTS] && alive[L_GATE] && alive[L_OPTIM])
        ck_assert_int_eq(confsmoe_optim_step(r->optim), CONFSMOE_OK);
}

static const rig_kind layer_kind = {L_PARTS, layer_destroy, layer_use};

START_TEST(test_layers_destroy_in_any_order)
{
    layer_rig r;
    layer_open(&r, host_allocator_of(_i));
    destroy_in_order(&r, &layer_kind, order_of(_i), host_allocator_of(_i) ? &r.a : NULL);
}
END_TEST

/* ------------------------------------------------------------------ ctx, gate over an exchange, tensors, saved */

enum { X_GATE = 1, X_TENSORS, X_SAVED, X_PARTS };

/* Experts elsewhere that double their input; a training call keeps a block of its own. */
typedef struct {
    int kept, released;
} doubling_exchange;

typedef struct {
    poison_alloc a;
    confsmoe_allocator holder;
    doubling_exchange ex;
    confsmoe_ctx *ctx;
    confsmoe_gate *gate;
    confsmoe_tensor *x, *labels, *y, *dy, *dx;
    confsmoe_saved *used, *unused;
} exchange_rig;

static confsmoe_status doubling_forward(void *user, const int64_t *offset, const float *x, float *y, int32_t training,
                                        void **call, char *error, size_t cap)
{
    doubling_exchange *ex = user;
    (void)error;
    (void)cap;
    for (int64_t i = 0; i < offset[E] * D; i++)
        y[i] = 2.0f * x[i];
    *call = NULL;
    if (training) {
        *call = xcalloc(1, 64);
        ex->kept++;
    }
    return CONFSMOE_OK;
}

static confsmoe_status doubling_backward(void *user, void *call, const int64_t *offset, const float *dy, float *dx,
                                         char *error, size_t cap)
{
    (void)user;
    (void)call;
    (void)error;
    (void)cap;
    for (int64_t i = 0; i < offset[E] * D; i++)
        dx[i] = 2.0f * dy[i];
    return CONFSMOE_OK;
}

/* Called when a saved handle goes, which may be after its gate: only user and call are read. */
static void doubling_release(void *user, void *call)
{
    doubling_exchange *ex = user;
    free(call);
    ex->released++;
}

static void exchange_open(exchange_rig *r, bool host)
{
    memset(r, 0, sizeof *r);
    r->ctx = rig_ctx(host, &r->a, &r->holder);
    confsmoe_gate_params p;
    gate_params(&p);
    const confsmoe_gate_exchange x = {doubling_forward, doubling_backward, doubling_release, &r->ex};
    ck_assert_int_eq(confsmoe_gate_create_exchange(r->ctx, &p, E, &x, &r->gate), CONFSMOE_OK);
    trng g = {13};
    r->x = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    fill_uniform(r->x, &g, -1, 1);
    r->labels = test_tensor(r->ctx, CONFSMOE_I32, 1, N, 0, 0, 0);
    r->y = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    r->dy = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    fill_uniform(r->dy, &g, -1, 1);
    r->dx = test_tensor(r->ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, r->labels, NULL, r->y, NULL, NULL, NULL, &r->used),
                     CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_backward(r->gate, r->used, r->dy, NULL, 1.0f, r->dx), CONFSMOE_OK);
    ck_assert(any_nonzero(r->dx));
    ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, r->labels, NULL, r->y, NULL, NULL, NULL, &r->unused),
                     CONFSMOE_OK);
    ck_assert_int_eq(r->ex.kept, 2);
}

static void exchange_destroy(void *rig, int part)
{
    exchange_rig *r = rig;
    switch (part) {
    case CTX:
        confsmoe_ctx_destroy(r->ctx);
        break;
    case X_GATE:
        confsmoe_gate_destroy(r->gate);
        break;
    case X_TENSORS:
        confsmoe_tensor_destroy(r->x);
        confsmoe_tensor_destroy(r->labels);
        confsmoe_tensor_destroy(r->y);
        confsmoe_tensor_destroy(r->dy);
        confsmoe_tensor_destroy(r->dx);
        break;
    case X_SAVED:
        confsmoe_saved_destroy(r->used);
        confsmoe_saved_destroy(r->unused);
        /* Each kept call is released exactly once, by its handle, with the exchange's user. */
        ck_assert_int_eq(r->ex.released, 2);
        break;
    default:
        ck_abort_msg("no part %d", part);
    }
}

static void exchange_use(void *rig, const bool *alive)
{
    exchange_rig *r = rig;
    if (alive[X_GATE] && alive[X_TENSORS])
        ck_assert_int_eq(confsmoe_gate_forward(r->gate, r->x, NULL, NULL, r->y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    if (alive[X_SAVED])
        ck_assert_int_eq(r->ex.released, 0);
}

static const rig_kind exchange_kind = {X_PARTS, exchange_destroy, exchange_use};

START_TEST(test_exchange_gate_destroy_in_any_order)
{
    exchange_rig r;
    exchange_open(&r, host_allocator_of(_i));
    destroy_in_order(&r, &exchange_kind, order_of(_i), host_allocator_of(_i) ? &r.a : NULL);
    ck_assert_int_eq(r.ex.released, r.ex.kept);
}
END_TEST

/* ------------------------------------------------------------------ ctx, imputer, tensors, saved */

enum { I_IMPUTER = 1, I_TENSORS, I_SAVED, I_PARTS };
enum { IB = 3, IM = 2 };

typedef struct {
    poison_alloc a;
    confsmoe_allocator holder;
    confsmoe_ctx *ctx;
    confsmoe_imputer *imp;
    confsmoe_tensor *h, *slots, *avail, *out, *dout, *dh, *dslots;
    confsmoe_saved *used, *unused;
} imputer_rig;

static void imputer_open(imputer_rig *r, bool host)
{
    memset(r, 0, sizeof *r);
    r->ctx = rig_ctx(host, &r->a, &r->holder);
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = D;
    p.n_modalities = IM;
    p.k = K;
    ck_assert_int_eq(confsmoe_imputer_create(r->ctx, &p, &r->imp), CONFSMOE_OK);
    trng g = {17};
    r->h = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    fill_uniform(r->h, &g, -1, 1);
    r->slots = test_tensor(r->ctx, CONFSMOE_F32, 4, IM, IB, K, D);
    fill_uniform(r->slots, &g, -1, 1);
    r->avail = test_tensor(r->ctx, CONFSMOE_U8, 2, IB, IM, 0, 0);
    static const uint8_t mask[IB * IM] = {1, 1, 1, 0, 0, 1};
    memcpy(u8(r->avail), mask, sizeof mask);
    r->out = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    r->dout = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    fill_uniform(r->dout, &g, -1, 1);
    r->dh = test_tensor(r->ctx, CONFSMOE_F32, 3, IB, IM, D, 0);
    r->dslots = test_tensor(r->ctx, CONFSMOE_F32, 4, IM, IB, K, D);
    ck_assert_int_eq(confsmoe_imputer_forward(r->imp, r->h, r->slots, r->avail, r->out, &r->used), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(r->imp, r->used, r->dout, r->dh, r->dslots), CONFSMOE_OK);
    ck_assert(any_nonzero(r->dslots));
    ck_assert_int_eq(confsmoe_imputer_forward(r->imp, r->h, r->slots, r->avail, r->out, &r->unused), CONFSMOE_OK);
}

static void imputer_destroy(void *rig, int part)
{
    imputer_rig *r = rig;
    switch (part) {
    case CTX:
        confsmoe_ctx_destroy(r->ctx);
        break;
    case I_IMPUTER:
        confsmoe_imputer_destroy(r->imp);
        break;
    case I_TENSORS:
        confsmoe_tensor_destroy(r->h);
        confsmoe_tensor_destroy(r->slots);
        confsmoe_tensor_destroy(r->avail);
        confsmoe_tensor_destroy(r->out);
        confsmoe_tensor_destroy(r->dout);
        confsmoe_tensor_destroy(r->dh);
        confsmoe_tensor_destroy(r->dslots);
        break;
    case I_SAVED:
        confsmoe_saved_destroy(r->used);
        confsmoe_saved_destroy(r->unused);
        break;
    default:
        ck_abort_msg("no part %d", part);
    }
}

static void imputer_use(void *rig, const bool *alive)
{
    imputer_rig *r = rig;
    if (alive[I_IMPUTER] && alive[I_TENSORS]) {
        ck_assert_int_eq(confsmoe_imputer_forward(r->imp, r->h, r->slots, r->avail, r->out, NULL), CONFSMOE_OK);
        ck_assert(all_finite(r->out));
    }
}

static const rig_kind imputer_kind = {I_PARTS, imputer_destroy, imputer_use};

START_TEST(test_imputer_destroy_in_any_order)
{
    imputer_rig r;
    imputer_open(&r, host_allocator_of(_i));
    destroy_in_order(&r, &imputer_kind, order_of(_i), host_allocator_of(_i) ? &r.a : NULL);
}
END_TEST

/* ------------------------------------------------------------------ ctx, model, tensors */

enum { M_MODEL = 1, M_TENSORS, M_PARTS };
enum { MB = 4, MM = 2 };
static const int64_t model_features[MM] = {5, 3};

typedef struct {
    poison_alloc a;
    confsmoe_allocator holder;
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_tensor *x[MM], *avail, *labels, *logits;
} model_rig;

static void model_open(model_rig *r, bool host)
{
    memset(r, 0, sizeof *r);
    r->ctx = rig_ctx(host, &r->a, &r->holder);
    confsmoe_model_params p;
    test_model_params(&p, MM, model_features, D, C);
    p.draws = 2;
    ck_assert_int_eq(confsmoe_model_create(r->ctx, &p, &r->model), CONFSMOE_OK);
    trng g = {19};
    for (int m = 0; m < MM; m++) {
        confsmoe_tensor *pool = test_tensor(r->ctx, CONFSMOE_F32, 2, 5, model_features[m], 0, 0);
        fill_uniform(pool, &g, -1, 1);
        ck_assert_int_eq(confsmoe_model_set_pool(r->model, m, pool), CONFSMOE_OK);
        confsmoe_tensor_destroy(pool);
        r->x[m] = test_tensor(r->ctx, CONFSMOE_F32, 2, MB, model_features[m], 0, 0);
        fill_uniform(r->x[m], &g, -1, 1);
    }
    r->avail = test_tensor(r->ctx, CONFSMOE_U8, 2, MB, MM, 0, 0);
    static const uint8_t mask[MB * MM] = {1, 1, 1, 0, 0, 1, 1, 1};
    memcpy(u8(r->avail), mask, sizeof mask);
    r->labels = test_tensor(r->ctx, CONFSMOE_I32, 1, MB, 0, 0, 0);
    for (int b = 0; b < MB; b++)
        i32(r->labels)[b] = b % C;
    r->logits = test_tensor(r->ctx, CONFSMOE_F32, 2, MB, C, 0, 0);
    float loss = NAN;
    const confsmoe_tensor *const in[MM] = {r->x[0], r->x[1]};
    ck_assert_int_eq(confsmoe_model_step(r->model, in, r->avail, r->labels, r->logits, &loss, NULL), CONFSMOE_OK);
    ck_assert(isfinite(loss) && loss > 0.0f);
}

static void model_destroy(void *rig, int part)
{
    model_rig *r = rig;
    switch (part) {
    case CTX:
        confsmoe_ctx_destroy(r->ctx);
        break;
    case M_MODEL:
        confsmoe_model_destroy(r->model);
        break;
    case M_TENSORS:
        for (int m = 0; m < MM; m++)
            confsmoe_tensor_destroy(r->x[m]);
        confsmoe_tensor_destroy(r->avail);
        confsmoe_tensor_destroy(r->labels);
        confsmoe_tensor_destroy(r->logits);
        break;
    default:
        ck_abort_msg("no part %d", part);
    }
}

static void model_use(void *rig, const bool *alive)
{
    model_rig *r = rig;
    if (!alive[M_MODEL] || !alive[M_TENSORS])
        return;
    const confsmoe_tensor *const in[MM] = {r->x[0], r->x[1]};
    float loss = NAN;
    ck_assert_int_eq(confsmoe_model_step(r->model, in, r->avail, r->labels, NULL, &loss, NULL), CONFSMOE_OK);
    ck_assert(isfinite(loss) && loss > 0.0f);
    ck_assert_int_eq(confsmoe_model_predict(r->model, in, r->avail, r->logits), CONFSMOE_OK);
    ck_assert(all_finite(r->logits));
}

static const rig_kind model_kind = {M_PARTS, model_destroy, model_use};

START_TEST(test_model_destroy_in_any_order)
{
    model_rig r;
    model_open(&r, host_allocator_of(_i));
    destroy_in_order(&r, &model_kind, order_of(_i), host_allocator_of(_i) ? &r.a : NULL);
}
END_TEST

/* ------------------------------------------------------------------ the orders themselves */

/* nth_order gives n! different orders, each of every part once: the tests above cover them all. */
START_TEST(test_orders_are_all_permutations)
{
    const int n = L_PARTS;
    const int64_t count = factorial(n);
    ck_assert_int_eq(count, 720);
    int64_t *codes = xcalloc((size_t)count, sizeof *codes);
    for (int64_t i = 0; i < count; i++) {
        int order[MAX_PARTS], seen = 0;
        nth_order(i, n, order);
        int64_t code = 0;
        for (int j = 0; j < n; j++) {
            ck_assert(order[j] >= 0 && order[j] < n);
            seen |= 1 << order[j];
            code = code * n + order[j];
        }
        ck_assert_int_eq(seen, (1 << n) - 1);
        for (int64_t j = 0; j < i; j++)
            ck_assert(codes[j] != code);
        codes[i] = code;
    }
    free(codes);
}
END_TEST

static Suite *teardown_suite(void)
{
    Suite *s = suite_create("teardown");
    TCase *to = tcase_create("orders");
    tcase_add_test(to, test_orders_are_all_permutations);
    suite_add_tcase(s, to);

    TCase *tc = tcase_create("any_order");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_layers_destroy_in_any_order, 0, 2 * (int)factorial(L_PARTS));
    tcase_add_loop_test(tc, test_exchange_gate_destroy_in_any_order, 0, 2 * (int)factorial(X_PARTS));
    tcase_add_loop_test(tc, test_imputer_destroy_in_any_order, 0, 2 * (int)factorial(I_PARTS));
    tcase_add_loop_test(tc, test_model_destroy_in_any_order, 0, 2 * (int)factorial(M_PARTS));
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run(teardown_suite()); }
