/* Unit tests of the gate (router -> top-k -> experts -> combine): creation and its
 * errors, argument errors of forward and backward (which must change no state), the
 * parameter view, forward semantics against an independent double-precision router
 * and the experts' own forward, utilisation statistics, several forwards in flight,
 * edge sizes and fault injection. Public API only. */
#define _POSIX_C_SOURCE 200809L /* posix_memalign in testutil.h under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define MAXE 12
/* Forward outputs are compared with a norm-wise relative error; float32 rounding of
 * sums of a few dozen O(1) terms is ~1e-7 relative, a real bug is O(1) off. */
#define TOL 1e-5

/* ------------------------------------------------------------ test helpers */


static confsmoe_tensor *mk(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t dims[3] = {d0, d1, d2};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, ndim, dims, &t), CONFSMOE_OK);
    return t;
}

static confsmoe_tensor *mk2(confsmoe_ctx *ctx, int64_t r, int64_t c) { return mk(ctx, CONFSMOE_F32, 2, r, c, 0); }

static int all_zero(confsmoe_tensor *t)
{
    const float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (v[i] != 0.0f)
            return 0;
    return 1;
}

/* Norm-wise relative error of a float array against a double reference. */
static double rel_err(const float *got, const double *ref, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        num += ((double)got[i] - ref[i]) * ((double)got[i] - ref[i]);
        den += ref[i] * ref[i];
    }
    return sqrt(num) / (den > 1e-30 ? sqrt(den) : 1e-30);
}

#define ck_has(ctx, needle)                                                                                            \
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), (needle)) != NULL, "last_error \"%s\" lacks \"%s\"",           \
                  confsmoe_ctx_last_error(ctx), (needle))

/* A counted ctx with E experts of width d and hidden h. */
typedef struct {
    test_alloc a;
    confsmoe_allocator holder;
    confsmoe_ctx *ctx;
    int32_t E;
    int64_t d, h;
    confsmoe_expert *ex[MAXE];
    confsmoe_gate *g;
} fx;

static void fx_init(fx *f, uint64_t seed, int32_t E, int64_t d, int64_t h)
{
    memset(f, 0, sizeof *f);
    f->ctx = test_ctx_counted(&f->a, &f->holder, seed);
    f->E = E;
    f->d = d;
    f->h = h;
    for (int32_t e = 0; e < E; e++)
        ck_assert_int_eq(confsmoe_expert_create(f->ctx, d, h, &f->ex[e]), CONFSMOE_OK);
}

static void fx_free(fx *f)
{
    confsmoe_gate_destroy(f->g);
    for (int32_t e = 0; e < f->E; e++)
        confsmoe_expert_destroy(f->ex[e]);
    confsmoe_ctx_destroy(f->ctx);
    ck_assert_int_eq(f->a.live, 0);
}

static confsmoe_gate_params gparams(int64_t d, int32_t C)
{
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = d;
    p.n_classes = C;
    return p;
}

static void fx_gate(fx *f, const confsmoe_gate_params *p)
{
    ck_assert_int_eq(confsmoe_gate_create(f->ctx, p, f->ex, f->E, &f->g), CONFSMOE_OK);
    ck_assert_ptr_nonnull(f->g);
}

/* ------------------------------------------------------------ 1. create */

START_TEST(test_params_init_defaults)
{
    confsmoe_gate_params p;
    memset(&p, 0x5a, sizeof p);
    confsmoe_gate_params_init(&p);
    ck_assert_uint_eq(p.struct_size, sizeof p);
    ck_assert_uint_eq(confsmoe_sizeof_gate_params(), sizeof p);
    ck_assert_uint_eq(confsmoe_sizeof_gate_stats(), sizeof(confsmoe_gate_stats));
    ck_assert_int_eq(p.k, 2);
    ck_assert_int_eq(p.router, CONFSMOE_ROUTER_SOFTMAX);
    ck_assert_int_eq(p.combine, CONFSMOE_COMBINE_CONFIDENCE);
    ck_assert_int_eq(p.confidence, CONFSMOE_CONFIDENCE_TOKEN);
    ck_assert_int_eq(p.target, CONFSMOE_TARGET_SINGLE_LABEL);
    ck_assert_int_eq(p.router_grad, CONFSMOE_ROUTER_GRAD_FROZEN);
    ck_assert_int_eq(p.load_loss, CONFSMOE_LOAD_LOSS_NONE);
    ck_assert_float_eq(p.load_loss_weight, 0.01f);
    ck_assert_float_eq(p.conf_loss_weight, 1.0f);
    ck_assert_int_eq(p.noisy, 0);
    ck_assert_int_eq(p.compat, 0);
    ck_assert_int_eq(p.detach_target, 0);
    confsmoe_gate_params_init(NULL); /* must not crash */
}
END_TEST

/* One bad parameter set: the status, a phrase of the message, out NULL, nothing leaked. */
typedef struct {
    const char *what;
    confsmoe_status status;
    const char *msg;
} create_case;

enum { N_CREATE_CASES = 30 };

static const create_case create_cases[N_CREATE_CASES] = {
    {"struct_size", CONFSMOE_E_VERSION, "struct_size"},
    {"experts NULL", CONFSMOE_E_INVALID_ARGUMENT, "experts is NULL"},
    {"an expert NULL", CONFSMOE_E_INVALID_ARGUMENT, "experts[2] is NULL"},
    {"n_experts 0", CONFSMOE_E_INVALID_ARGUMENT, "n_experts"},
    {"n_experts -3", CONFSMOE_E_INVALID_ARGUMENT, "n_experts"},
    {"k 0", CONFSMOE_E_INVALID_ARGUMENT, "k=0"},
    {"k -1", CONFSMOE_E_INVALID_ARGUMENT, "k=-1"},
    {"k E+1", CONFSMOE_E_INVALID_ARGUMENT, "k=5"},
    {"expert d differs", CONFSMOE_E_SHAPE, "experts[1]"},
    {"router 3", CONFSMOE_E_INVALID_ARGUMENT, "router"},
    {"router -1", CONFSMOE_E_INVALID_ARGUMENT, "router"},
    {"combine 2", CONFSMOE_E_INVALID_ARGUMENT, "combine"},
    {"confidence 2", CONFSMOE_E_INVALID_ARGUMENT, "confidence"},
    {"target 2", CONFSMOE_E_INVALID_ARGUMENT, "target"},
    {"router_grad 3", CONFSMOE_E_INVALID_ARGUMENT, "router_grad"},
    {"router_grad -1", CONFSMOE_E_INVALID_ARGUMENT, "router_grad"},
    {"load_loss 3", CONFSMOE_E_INVALID_ARGUMENT, "load_loss"},
    {"load_loss -1", CONFSMOE_E_INVALID_ARGUMENT, "load_loss"},
    {"n_classes 0 confidence", CONFSMOE_E_INVALID_ARGUMENT, "n_classes"},
    {"n_classes -1 confidence", CONFSMOE_E_INVALID_ARGUMENT, "n_classes"},
    {"load_loss_weight -1", CONFSMOE_E_INVALID_ARGUMENT, "loss weights"},
    {"load_loss_weight NaN", CONFSMOE_E_INVALID_ARGUMENT, "loss weights"},
    {"conf_loss_weight -0.5", CONFSMOE_E_INVALID_ARGUMENT, "loss weights"},
    {"conf_loss_weight NaN", CONFSMOE_E_INVALID_ARGUMENT, "loss weights"},
    {"conf_loss_weight Inf", CONFSMOE_E_INVALID_ARGUMENT, "loss weights"},
    {"noisy 2", CONFSMOE_E_INVALID_ARGUMENT, "noisy"},
    {"compat 2", CONFSMOE_E_INVALID_ARGUMENT, "compat"},
    {"detach_target -1", CONFSMOE_E_INVALID_ARGUMENT, "detach_target"},
    {"d 0", CONFSMOE_E_SHAPE, "d is 0"},
    {"noisy -1", CONFSMOE_E_INVALID_ARGUMENT, "noisy"},
};

START_TEST(test_create_errors)
{
    const create_case *c = &create_cases[_i];
    fx f;
    fx_init(&f, 11, 4, 6, 5);
    confsmoe_expert *odd = NULL;
    ck_assert_int_eq(confsmoe_expert_create(f.ctx, 7, 5, &odd), CONFSMOE_OK);
    const long base = f.a.live;

    confsmoe_gate_params p = gparams(6, 3);
    confsmoe_expert *list[4] = {f.ex[0], f.ex[1], f.ex[2], f.ex[3]};
    confsmoe_expert *const *experts = list;
    int32_t n = 4;
    switch (_i) {
    case 0: p.struct_size = sizeof p - 4; break;
    case 1: experts = NULL; break;
    case 2: list[2] = NULL; break;
    case 3: n = 0; break;
    case 4: n = -3; break;
    case 5: p.k = 0; break;
    case 6: p.k = -1; break;
    case 7: p.k = 5; break;
    case 8: list[1] = odd; break;
    case 9: p.router = 3; break;
    case 10: p.router = -1; break;
    case 11: p.combine = 2; break;
    case 12: p.confidence = 2; break;
    case 13: p.target = 2; break;
    case 14: p.router_grad = 3; break;
    case 15: p.router_grad = -1; break;
    case 16: p.load_loss = 3; break;
    case 17: p.load_loss = -1; break;
    case 18: p.n_classes = 0; break;
    case 19: p.n_classes = -1; break;
    case 20: p.load_loss_weight = -1.0f; break;
    case 21: p.load_loss_weight = NAN; break;
    case 22: p.conf_loss_weight = -0.5f; break;
    case 23: p.conf_loss_weight = NAN; break;
    case 24: p.conf_loss_weight = INFINITY; break;
    case 25: p.noisy = 2; break;
    case 26: p.compat = 2; break;
    case 27: p.detach_target = -1; break;
    case 28: p.d = 0; break;
    case 29: p.noisy = -1; break;
    default: ck_abort();
    }
    confsmoe_gate *g = (confsmoe_gate *)&p; /* garbage that must be overwritten */
    confsmoe_status s = confsmoe_gate_create(f.ctx, &p, experts, n, &g);
    ck_assert_msg(s == c->status, "%s: status %d, expected %d", c->what, s, c->status);
    ck_assert_msg(g == NULL, "%s: out not NULL", c->what);
    ck_has(f.ctx, c->msg);
    ck_assert_msg(strstr(confsmoe_ctx_last_error(f.ctx), "gate_create") != NULL, "%s: message %s", c->what,
                  confsmoe_ctx_last_error(f.ctx));
    ck_assert_int_eq(f.a.live, base);
    confsmoe_expert_destroy(odd);
    fx_free(&f);
}
END_TEST

START_TEST(test_create_null_args)
{
    fx f;
    fx_init(&f, 12, 2, 4, 3);
    confsmoe_gate_params p = gparams(4, 2);
    confsmoe_gate *g = (confsmoe_gate *)&p;
    ck_assert_int_eq(confsmoe_gate_create(NULL, &p, f.ex, 2, &g), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(g);
    g = (confsmoe_gate *)&p;
    ck_assert_int_eq(confsmoe_gate_create(f.ctx, NULL, f.ex, 2, &g), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(g);
    ck_has(f.ctx, "params");
    ck_assert_int_eq(confsmoe_gate_create(f.ctx, &p, f.ex, 2, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_has(f.ctx, "out");
    confsmoe_gate_destroy(NULL);
    ck_assert_int_eq(confsmoe_gate_n_experts(NULL), -1);
    ck_assert_int_eq(confsmoe_gate_k(NULL), -1);
    ck_assert_int_eq(confsmoe_gate_n_params(NULL), -1);
    fx_free(&f);
}
END_TEST

/* n_classes = 0 is fine without a confidence combine; each option value in range is accepted. */
START_TEST(test_create_accepts)
{
    fx f;
    fx_init(&f, 13, 3, 4, 3);
    const long base = f.a.live;
    for (int variant = 0; variant < 12; variant++) {
        confsmoe_gate_params p = gparams(4, 2);
        switch (variant) {
        case 0: p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX; p.n_classes = 0; break;
        case 1: p.router = CONFSMOE_ROUTER_GAUSSIAN; break;
        case 2: p.router = CONFSMOE_ROUTER_LAPLACIAN; break;
        case 3: p.confidence = CONFSMOE_CONFIDENCE_EXPERT; break;
        case 4: p.target = CONFSMOE_TARGET_MULTI_LABEL; break;
        case 5: p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE; break;
        case 6: p.load_loss = CONFSMOE_LOAD_LOSS_ENTROPY; p.load_loss_weight = 0.0f; break;
        case 7: p.noisy = 1; p.compat = 1; p.detach_target = 1; break;
        case 8: p.k = 1; break;
        case 9: p.k = 3; break;
        case 10: p.conf_loss_weight = 0.0f; break;
        case 11: p.n_classes = 1; p.load_loss = CONFSMOE_LOAD_LOSS_CV; break;
        default: break;
        }
        confsmoe_gate *g = NULL;
        ck_assert_msg(confsmoe_gate_create(f.ctx, &p, f.ex, 3, &g) == CONFSMOE_OK, "variant %d: %s", variant,
                      confsmoe_ctx_last_error(f.ctx));
        ck_assert_int_eq(confsmoe_gate_n_experts(g), 3);
        ck_assert_int_eq(confsmoe_gate_k(g), p.k);
        confsmoe_gate_destroy(g);
        ck_assert_int_eq(f.a.live, base);
    }
    fx_free(&f);
}
END_TEST

/* ------------------------------------------------------------ state snapshots */

/* Everything a failed call must leave alone: the gate's and the experts' parameters
 * and gradients, and both statistics scopes. */
typedef struct {
    int32_t np;
    void *gp[64], *gg[64];
    void *ep[MAXE][4], *eg[MAXE][4];
    confsmoe_gate_stats st[2];
    int64_t load[2][MAXE];
    double mc[2][MAXE];
} gsnap;

static void stats_of(confsmoe_gate *g, int32_t scope, confsmoe_gate_stats *st, int64_t *load, double *mc)
{
    memset(st, 0, sizeof *st);
    st->struct_size = sizeof *st;
    ck_assert_int_eq(confsmoe_gate_stats_get(g, scope, st, load, mc, confsmoe_gate_n_experts(g)), CONFSMOE_OK);
}

static void gsnap_take(fx *f, gsnap *s)
{
    memset(s, 0, sizeof *s);
    s->np = confsmoe_gate_n_params(f->g);
    ck_assert_int_le(s->np, 64);
    for (int32_t i = 0; i < s->np; i++) {
        s->gp[i] = tsnap(confsmoe_gate_param(f->g, i));
        s->gg[i] = tsnap(confsmoe_gate_grad(f->g, i));
    }
    for (int32_t e = 0; e < f->E; e++)
        for (int32_t i = 0; i < 4; i++) {
            s->ep[e][i] = tsnap(confsmoe_expert_param(f->ex[e], i));
            s->eg[e][i] = tsnap(confsmoe_expert_grad(f->ex[e], i));
        }
    for (int sc = 0; sc < 2; sc++)
        stats_of(f->g, sc, &s->st[sc], s->load[sc], s->mc[sc]);
}

/* NULL if nothing changed since the snapshot, else what changed (static text). */
static const char *gsnap_diff(fx *f, const gsnap *s)
{
    static char buf[96];
    if (confsmoe_gate_n_params(f->g) != s->np)
        return "the number of gate params";
    for (int32_t i = 0; i < s->np; i++) {
        snprintf(buf, sizeof buf, "gate %s %s", tsame(confsmoe_gate_param(f->g, i), s->gp[i]) ? "grad" : "param",
                 confsmoe_gate_param_name(f->g, i));
        if (!tsame(confsmoe_gate_param(f->g, i), s->gp[i]) || !tsame(confsmoe_gate_grad(f->g, i), s->gg[i]))
            return buf;
    }
    for (int32_t e = 0; e < f->E; e++)
        for (int32_t i = 0; i < 4; i++) {
            snprintf(buf, sizeof buf, "expert %d %s %d", (int)e,
                     tsame(confsmoe_expert_param(f->ex[e], i), s->ep[e][i]) ? "grad" : "param", (int)i);
            if (!tsame(confsmoe_expert_param(f->ex[e], i), s->ep[e][i]) ||
                !tsame(confsmoe_expert_grad(f->ex[e], i), s->eg[e][i]))
                return buf;
        }
    for (int sc = 0; sc < 2; sc++) {
        confsmoe_gate_stats st;
        int64_t load[MAXE];
        double mc[MAXE];
        stats_of(f->g, sc, &st, load, mc);
        if (memcmp(&st, &s->st[sc], sizeof st) != 0 || memcmp(load, s->load[sc], (size_t)f->E * sizeof *load) != 0 ||
            memcmp(mc, s->mc[sc], (size_t)f->E * sizeof *mc) != 0)
            return sc ? "stats TOTAL" : "stats LAST_CALL";
    }
    return NULL;
}

static void gsnap_check(fx *f, const gsnap *s, const char *what)
{
    const char *diff = gsnap_diff(f, s);
    ck_assert_msg(diff == NULL, "%s: %s changed", what, diff);
}

static void gsnap_free(gsnap *s)
{
    for (int32_t i = 0; i < s->np; i++) {
        free(s->gp[i]);
        free(s->gg[i]);
    }
    for (int e = 0; e < MAXE; e++)
        for (int i = 0; i < 4; i++) {
            free(s->ep[e][i]);
            free(s->eg[e][i]);
        }
}

/* Single-label labels i32 [n] in 0..C-1. */
static confsmoe_tensor *mk_labels(confsmoe_ctx *ctx, int64_t n, int32_t C, trng *r)
{
    confsmoe_tensor *t = mk(ctx, CONFSMOE_I32, 1, n, 0, 0);
    for (int64_t i = 0; i < n; i++)
        i32(t)[i] = (int32_t)(trng_u64(r) % (uint64_t)C);
    return t;
}

/* Multi-label labels u8 [n, C]. */
static confsmoe_tensor *mk_multi(confsmoe_ctx *ctx, int64_t n, int32_t C, trng *r)
{
    confsmoe_tensor *t = mk(ctx, CONFSMOE_U8, 2, n, C, 0);
    for (int64_t i = 0; i < n * C; i++)
        u8(t)[i] = (uint8_t)(trng_u64(r) & 1);
    return t;
}

/* One full training step on fresh data (so that grads and stats are not trivially zero). */
static void train_step(fx *f, int64_t n, trng *r, int multi, int32_t C)
{
    confsmoe_tensor *x = mk2(f->ctx, n, f->d), *y = mk2(f->ctx, n, f->d), *dy = mk2(f->ctx, n, f->d);
    confsmoe_tensor *lab = multi ? mk_multi(f->ctx, n, C, r) : mk_labels(f->ctx, n, C, r);
    fill_uniform(x, r, -1, 1);
    fill_uniform(dy, r, -1, 1);
    confsmoe_saved *sv = NULL;
    float loss = -1.0f;
    ck_assert_msg(confsmoe_gate_forward(f->g, x, lab, NULL, y, NULL, NULL, &loss, &sv) == CONFSMOE_OK, "%s",
                  confsmoe_ctx_last_error(f->ctx));
    ck_assert_int_eq(confsmoe_gate_backward(f->g, sv, dy, NULL, 1.0f, NULL), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(lab);
}

/* ------------------------------------------------------------ 2. invalid forward / backward */

enum { N_FWD_CASES = 27 };

START_TEST(test_forward_invalid)
{
    const int64_t N = 5, d = 6;
    const int32_t C = 3, k = 2;
    const int multi = _i == 16 || _i == 17;
    fx f;
    fx_init(&f, 21, 4, d, 5);
    confsmoe_gate_params p = gparams(d, C);
    if (multi)
        p.target = CONFSMOE_TARGET_MULTI_LABEL;
    fx_gate(&f, &p);
    trng r = {1000 + (uint64_t)_i};
    train_step(&f, 7, &r, multi, C);

    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d);
    confsmoe_tensor *topk = mk(f.ctx, CONFSMOE_I32, 2, N, k, 0), *slots = mk(f.ctx, CONFSMOE_F32, 3, N, k, d);
    confsmoe_tensor *lab = multi ? mk_multi(f.ctx, N, C, &r) : mk_labels(f.ctx, N, C, &r);
    confsmoe_tensor *present = mk(f.ctx, CONFSMOE_U8, 1, N, 0, 0);
    for (int64_t t = 0; t < N; t++)
        u8(present)[t] = 1;
    fill_uniform(x, &r, -1, 1);
    confsmoe_tensor *bad = NULL;
    const confsmoe_tensor *ax = x, *alab = lab, *apres = present;
    confsmoe_tensor *ay = y, *atopk = topk, *aslots = slots;
    int training = 1;
    confsmoe_status want = CONFSMOE_E_SHAPE;
    const char *msg = NULL;
    switch (_i) {
    case 0: ax = bad = mk(f.ctx, CONFSMOE_I32, 2, N, d, 0); want = CONFSMOE_E_DTYPE; msg = "x is"; break;
    case 1: ax = bad = mk2(f.ctx, N, d + 1); msg = "x has shape"; break;
    case 2: ax = bad = mk(f.ctx, CONFSMOE_F32, 3, N, 1, d); msg = "x has shape"; break;
    case 3: ax = bad = mk(f.ctx, CONFSMOE_F32, 1, N * d, 0, 0); msg = "x has shape"; break;
    case 4: ay = bad = mk2(f.ctx, N + 1, d); msg = "y has shape"; break;
    case 5: ay = bad = mk2(f.ctx, N, d - 1); msg = "y has shape"; break;
    case 6: ay = bad = mk(f.ctx, CONFSMOE_I32, 2, N, d, 0); want = CONFSMOE_E_DTYPE; msg = "y is"; break;
    case 7: atopk = bad = mk2(f.ctx, N, k); want = CONFSMOE_E_DTYPE; msg = "topk is"; break;
    case 8: atopk = bad = mk(f.ctx, CONFSMOE_I32, 2, N, k + 1, 0); msg = "topk has shape"; break;
    case 9: aslots = bad = mk(f.ctx, CONFSMOE_F32, 3, N, k, d + 1); msg = "slots has shape"; break;
    case 10: aslots = bad = mk2(f.ctx, N * k, d); msg = "slots has shape"; break;
    case 11: alab = NULL; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "labels are needed"; break;
    case 12: alab = bad = mk(f.ctx, CONFSMOE_U8, 1, N, 0, 0); want = CONFSMOE_E_DTYPE; msg = "labels is"; break;
    case 13: alab = bad = mk(f.ctx, CONFSMOE_I32, 1, N + 1, 0, 0); msg = "labels has shape"; break;
    case 14: i32(lab)[2] = -1; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "labels[2] is -1"; break;
    case 15: i32(lab)[1] = C; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "labels[1] is 3"; break;
    case 16: u8(lab)[1 * C + 2] = 2; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "labels[1][2] is 2"; break;
    case 17: alab = bad = mk(f.ctx, CONFSMOE_I32, 2, N, C, 0); want = CONFSMOE_E_DTYPE; msg = "labels is"; break;
    case 18: apres = bad = mk(f.ctx, CONFSMOE_U8, 1, N + 1, 0, 0); msg = "present has shape"; break;
    case 19: u8(present)[3] = 2; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "present[3] is 2"; break;
    case 20: apres = bad = mk(f.ctx, CONFSMOE_I32, 1, N, 0, 0); want = CONFSMOE_E_DTYPE; msg = "present is"; break;
    case 21: f32(x)[7] = NAN; want = CONFSMOE_E_NUMERIC; msg = "x[7] is NaN"; break;
    case 22: f32(x)[N * d - 1] = -INFINITY; want = CONFSMOE_E_NUMERIC; msg = "Inf"; break;
    case 23: f32(x)[0] = NAN; training = 0; want = CONFSMOE_E_NUMERIC; msg = "x[0] is NaN"; break;
    case 24: ax = NULL; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "x is NULL"; break;
    case 25: ay = NULL; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "y is NULL"; break;
    case 26: ax = bad = mk(f.ctx, CONFSMOE_U8, 2, N, d, 0); training = 0; want = CONFSMOE_E_DTYPE; msg = "x is"; break;
    default: ck_abort();
    }
    gsnap snap;
    gsnap_take(&f, &snap);
    memset(f32(y), 0x7f, confsmoe_tensor_nbytes(y));
    void *ysnap = tsnap(y), *ksnap = tsnap(topk), *ssnap = tsnap(slots);
    const long live = f.a.live;
    float loss = 42.0f;
    confsmoe_saved *sv = (confsmoe_saved *)&loss; /* garbage that must become NULL */
    confsmoe_status s = confsmoe_gate_forward(f.g, ax, alab, apres, ay, atopk, aslots, &loss, training ? &sv : NULL);
    ck_assert_msg(s == want, "case %d: status %d (%s), expected %d", _i, s, confsmoe_ctx_last_error(f.ctx), want);
    ck_has(f.ctx, msg);
    ck_has(f.ctx, "gate_forward");
    if (training)
        ck_assert_ptr_null(sv);
    ck_assert_float_eq(loss, 42.0f);
    ck_assert(tsame(y, ysnap) && tsame(topk, ksnap) && tsame(slots, ssnap));
    ck_assert_int_eq(f.a.live, live);
    gsnap_check(&f, &snap, "forward error");
    gsnap_free(&snap);
    free(ysnap);
    free(ksnap);
    free(ssnap);

    confsmoe_tensor_destroy(bad);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(topk);
    confsmoe_tensor_destroy(slots);
    confsmoe_tensor_destroy(lab);
    confsmoe_tensor_destroy(present);
    fx_free(&f);
}
END_TEST

/* Labels are ignored (may be anything, or NULL) where they are not used. */
START_TEST(test_forward_labels_ignored)
{
    const int64_t N = 4, d = 5;
    fx f;
    fx_init(&f, 22, 3, d, 4);
    confsmoe_gate_params p = gparams(d, 0);
    p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    fx_gate(&f, &p);
    trng r = {22};
    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d);
    confsmoe_tensor *junk = mk(f.ctx, CONFSMOE_F32, 1, 3, 0, 0);
    fill_uniform(x, &r, -1, 1);
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, NULL, NULL, NULL, &sv), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, junk, NULL, y, NULL, NULL, NULL, &sv), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    confsmoe_gate_destroy(f.g);
    f.g = NULL;
    /* Confidence gate at inference: no labels needed. */
    p = gparams(d, 3);
    fx_gate(&f, &p);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(junk);
    fx_free(&f);
}
END_TEST

enum { N_BWD_CASES = 14 };

START_TEST(test_backward_invalid)
{
    const int64_t N = 5, d = 6;
    const int32_t C = 3, k = 2;
    fx f;
    fx_init(&f, 23, 4, d, 5);
    confsmoe_gate_params p = gparams(d, C);
    p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
    fx_gate(&f, &p);
    trng r = {2000 + (uint64_t)_i};
    train_step(&f, 6, &r, 0, C);

    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *dy = mk2(f.ctx, N, d), *dx = mk2(f.ctx, N, d);
    confsmoe_tensor *dslots = mk(f.ctx, CONFSMOE_F32, 3, N, k, d);
    confsmoe_tensor *lab = mk_labels(f.ctx, N, C, &r);
    fill_uniform(x, &r, -1, 1);
    fill_uniform(dy, &r, -1, 1);
    fill_uniform(dslots, &r, -1, 1);
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, lab, NULL, y, NULL, NULL, NULL, &sv), CONFSMOE_OK);

    /* Other owners' handles. */
    fx f2;
    fx_init(&f2, 23, 4, d, 5);
    fx_gate(&f2, &p);
    confsmoe_saved *other = NULL, *esv = NULL;
    confsmoe_tensor *x2 = mk2(f2.ctx, N, d), *y2 = mk2(f2.ctx, N, d), *lab2 = mk_labels(f2.ctx, N, C, &r);
    memcpy(f32(x2), f32(x), confsmoe_tensor_nbytes(x));
    ck_assert_int_eq(confsmoe_gate_forward(f2.g, x2, lab2, NULL, y2, NULL, NULL, NULL, &other), CONFSMOE_OK);
    confsmoe_tensor *ey = mk2(f.ctx, N, d);
    ck_assert_int_eq(confsmoe_expert_forward(f.ex[0], x, ey, &esv), CONFSMOE_OK);

    confsmoe_tensor *bad = NULL;
    confsmoe_saved *asv = sv;
    const confsmoe_tensor *ady = dy, *adslots = dslots;
    confsmoe_tensor *adx = dx;
    float dloss = 1.0f;
    confsmoe_status want = CONFSMOE_E_SHAPE;
    const char *msg = NULL;
    switch (_i) {
    case 0: asv = NULL; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "saved is NULL"; break;
    case 1: asv = other; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "another"; break;
    case 2: asv = esv; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "another"; break;
    case 3:
        ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, dslots, 1.0f, dx), CONFSMOE_OK);
        want = CONFSMOE_E_STATE;
        msg = "already";
        break;
    case 4: ady = bad = mk2(f.ctx, N, d + 1); msg = "dy has shape"; break;
    case 5: ady = bad = mk(f.ctx, CONFSMOE_I32, 2, N, d, 0); want = CONFSMOE_E_DTYPE; msg = "dy is"; break;
    case 6: adslots = bad = mk(f.ctx, CONFSMOE_F32, 3, N, k + 1, d); msg = "dslots has shape"; break;
    case 7: adx = bad = mk2(f.ctx, N + 1, d); msg = "dx has shape"; break;
    case 8: f32(dy)[3] = NAN; want = CONFSMOE_E_NUMERIC; msg = "dy[3] is NaN"; break;
    case 9: dloss = NAN; want = CONFSMOE_E_NUMERIC; msg = "dloss"; break;
    case 10: ady = NULL; want = CONFSMOE_E_INVALID_ARGUMENT; msg = "dy is NULL"; break;
    case 11: f32(dslots)[5] = INFINITY; want = CONFSMOE_E_NUMERIC; msg = "dslots[5] is Inf"; break;
    case 12: dloss = -INFINITY; want = CONFSMOE_E_NUMERIC; msg = "dloss"; break;
    case 13: ady = bad = mk2(f.ctx, N - 1, d); msg = "dy has shape"; break;
    default: ck_abort();
    }
    gsnap snap;
    gsnap_take(&f, &snap);
    gsnap snap2;
    gsnap_take(&f2, &snap2);
    for (int64_t i = 0; i < N * d; i++)
        f32(dx)[i] = 7.0f;
    void *dxsnap = tsnap(dx);
    const long live = f.a.live;
    confsmoe_status s = confsmoe_gate_backward(f.g, asv, ady, adslots, dloss, adx);
    ck_assert_msg(s == want, "case %d: status %d (%s), expected %d", _i, s, confsmoe_ctx_last_error(f.ctx), want);
    ck_has(f.ctx, msg);
    ck_has(f.ctx, "gate_backward");
    ck_assert(tsame(dx, dxsnap));
    ck_assert_int_eq(f.a.live, live);
    gsnap_check(&f, &snap, "backward error");
    gsnap_check(&f2, &snap2, "backward error (other gate)");
    gsnap_free(&snap);
    gsnap_free(&snap2);
    free(dxsnap);

    /* The handles the failed call was given are still good. */
    if (_i != 3) {
        fill_uniform(dy, &r, -1, 1);
        fill_uniform(dslots, &r, -1, 1);
        ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, dslots, 1.0f, dx), CONFSMOE_OK);
    }
    ck_assert_int_eq(confsmoe_gate_backward(f2.g, other, y2, NULL, 1.0f, NULL), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(f.ex[0], esv, ey, NULL), CONFSMOE_OK);

    confsmoe_saved_destroy(sv);
    confsmoe_saved_destroy(esv);
    confsmoe_saved_destroy(other);
    confsmoe_tensor_destroy(bad);
    confsmoe_tensor_destroy(ey);
    confsmoe_tensor_destroy(x2);
    confsmoe_tensor_destroy(y2);
    confsmoe_tensor_destroy(lab2);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_tensor_destroy(dslots);
    confsmoe_tensor_destroy(lab);
    fx_free(&f2);
    fx_free(&f);
}
END_TEST

START_TEST(test_backward_null_gate)
{
    ck_assert_int_eq(confsmoe_gate_backward(NULL, NULL, NULL, NULL, 1.0f, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_forward(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
                     CONFSMOE_E_INVALID_ARGUMENT);
}
END_TEST

/* ------------------------------------------------------------ 3. parameter view */

static int64_t tdim(confsmoe_tensor *t, int32_t a) { return confsmoe_tensor_dim(t, a); }

START_TEST(test_param_view)
{
    const int noisy = _i & 1, confidence = (_i >> 1) & 1;
    const int32_t E = 3, C = 4;
    const int64_t d = 5;
    fx f;
    fx_init(&f, 31 + (uint64_t)_i, E, d, 4);
    confsmoe_gate_params p = gparams(d, confidence ? C : 0);
    p.noisy = noisy;
    if (!confidence)
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    fx_gate(&f, &p);

    /* The documented list, built here. */
    char names[32][40];
    int64_t shapes[32][2];
    int32_t nd[32], n = 0;
#define ADD(nm, nd_, a, b)                                                                                             \
    do {                                                                                                               \
        snprintf(names[n], sizeof names[n], "%s", nm);                                                                 \
        nd[n] = nd_;                                                                                                   \
        shapes[n][0] = a;                                                                                              \
        shapes[n][1] = b;                                                                                              \
        n++;                                                                                                           \
    } while (0)
    ADD("router.w", 2, d, E);
    if (noisy)
        ADD("noise.w", 2, d, E);
    if (confidence) {
        for (int32_t e = 0; e < E; e++) {
            char buf[40];
            snprintf(buf, sizeof buf, "conf.%d.ln.weight", (int)e);
            ADD(buf, 1, d, 0);
            snprintf(buf, sizeof buf, "conf.%d.ln.bias", (int)e);
            ADD(buf, 1, d, 0);
            snprintf(buf, sizeof buf, "conf.%d.w", (int)e);
            ADD(buf, 1, d, 0);
            snprintf(buf, sizeof buf, "conf.%d.b", (int)e);
            ADD(buf, 1, 1, 0);
        }
        ADD("target.w", 2, C, d);
        ADD("target.b", 1, C, 0);
    }
#undef ADD
    ck_assert_int_eq(confsmoe_gate_n_params(f.g), n);
    for (int32_t i = 0; i < n; i++) {
        const char *nm = confsmoe_gate_param_name(f.g, i);
        ck_assert_ptr_nonnull(nm);
        ck_assert_str_eq(nm, names[i]);
        confsmoe_tensor *t = confsmoe_gate_param(f.g, i), *gt = confsmoe_gate_grad(f.g, i);
        ck_assert_ptr_nonnull(t);
        ck_assert_ptr_nonnull(gt);
        ck_assert_ptr_ne(t, gt);
        ck_assert_int_eq(confsmoe_tensor_dtype(t), CONFSMOE_F32);
        ck_assert_int_eq(confsmoe_tensor_dtype(gt), CONFSMOE_F32);
        ck_assert_msg(confsmoe_tensor_ndim(t) == nd[i], "%s ndim %d", nm, confsmoe_tensor_ndim(t));
        ck_assert_int_eq(confsmoe_tensor_ndim(gt), nd[i]);
        for (int32_t a = 0; a < nd[i]; a++) {
            ck_assert_msg(tdim(t, a) == shapes[i][a], "%s dim %d is %lld", nm, a, (long long)tdim(t, a));
            ck_assert_int_eq(tdim(gt, a), shapes[i][a]);
        }
        ck_assert_msg(all_zero(gt), "%s: grad not zero at create", nm);
        const float *v = f32(t);
        const int64_t cnt = confsmoe_tensor_numel(t);
        if (strstr(nm, "ln.weight"))
            for (int64_t j = 0; j < cnt; j++)
                ck_assert_float_eq(v[j], 1.0f);
        if (strstr(nm, "ln.bias"))
            ck_assert(all_zero(t));
        if (strcmp(nm, "router.w") == 0) {
            const double bound = 1.0 / sqrt((double)E);
            int distinct = 0;
            for (int64_t j = 0; j < cnt; j++) {
                ck_assert_msg(fabs(v[j]) <= bound * (1 + 1e-6), "router.w[%lld] = %g", (long long)j, v[j]);
                distinct += v[j] != v[0];
            }
            ck_assert_msg(distinct > 0, "router.w is constant");
        }
    }
    ck_assert_ptr_null(confsmoe_gate_param_name(f.g, n));
    ck_assert_ptr_null(confsmoe_gate_param(f.g, n));
    ck_assert_ptr_null(confsmoe_gate_grad(f.g, n));
    ck_assert_ptr_null(confsmoe_gate_param_name(f.g, -1));
    ck_assert_ptr_null(confsmoe_gate_param(f.g, -1));
    ck_assert_ptr_null(confsmoe_gate_grad(f.g, -1));
    ck_assert_ptr_null(confsmoe_gate_param_name(NULL, 0));
    ck_assert_ptr_null(confsmoe_gate_param(NULL, 0));
    ck_assert_ptr_null(confsmoe_gate_grad(NULL, 0));

    /* zero_grad: a training step makes some grad non-zero, zero_grad clears them all. */
    trng r = {77};
    if (!confidence) {
        /* ROUTER_SOFTMAX trains the router from the output. */
        confsmoe_tensor *x = mk2(f.ctx, 6, d), *y = mk2(f.ctx, 6, d), *dy = mk2(f.ctx, 6, d);
        fill_uniform(x, &r, -1, 1);
        fill_uniform(dy, &r, -1, 1);
        confsmoe_saved *sv = NULL;
        ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, NULL, NULL, NULL, &sv), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, NULL, 1.0f, NULL), CONFSMOE_OK);
        confsmoe_saved_destroy(sv);
        confsmoe_tensor_destroy(x);
        confsmoe_tensor_destroy(y);
        confsmoe_tensor_destroy(dy);
    } else {
        train_step(&f, 6, &r, 0, C);
    }
    int nonzero = 0;
    for (int32_t i = 0; i < n; i++)
        nonzero += !all_zero(confsmoe_gate_grad(f.g, i));
    ck_assert_int_gt(nonzero, 0);
    void *w0 = tsnap(confsmoe_gate_param(f.g, 0));
    confsmoe_gate_zero_grad(f.g);
    for (int32_t i = 0; i < n; i++)
        ck_assert_msg(all_zero(confsmoe_gate_grad(f.g, i)), "grad %d not zeroed", i);
    ck_assert(tsame(confsmoe_gate_param(f.g, 0), w0));
    free(w0);
    confsmoe_gate_zero_grad(NULL);
    fx_free(&f);
}
END_TEST

/* The same seed gives the same gate; a different one a different router. */
START_TEST(test_param_seed)
{
    fx a, b, c;
    fx_init(&a, 5, 3, 4, 3);
    fx_init(&b, 5, 3, 4, 3);
    fx_init(&c, 6, 3, 4, 3);
    confsmoe_gate_params p = gparams(4, 2);
    fx_gate(&a, &p);
    fx_gate(&b, &p);
    fx_gate(&c, &p);
    for (int32_t i = 0; i < confsmoe_gate_n_params(a.g); i++) {
        void *sa = tsnap(confsmoe_gate_param(a.g, i));
        ck_assert(tsame(confsmoe_gate_param(b.g, i), sa));
        free(sa);
    }
    void *s0 = tsnap(confsmoe_gate_param(a.g, 0));
    ck_assert(!tsame(confsmoe_gate_param(c.g, 0), s0));
    free(s0);
    fx_free(&a);
    fx_free(&b);
    fx_free(&c);
}
END_TEST

/* ------------------------------------------------------------ 4. forward semantics */

/* Router logits in double from x [n, d] and router.w [d, E]. */
static void ref_logits(int32_t kind, const float *x, const float *w, int64_t n, int64_t d, int32_t E, double *u)
{
    for (int64_t t = 0; t < n; t++)
        for (int32_t e = 0; e < E; e++) {
            double dot = 0.0, dist = 0.0;
            for (int64_t c = 0; c < d; c++) {
                const double xv = x[t * d + c], wv = w[c * E + e];
                dot += xv * wv;
                dist += (xv - wv) * (xv - wv);
            }
            u[t * E + e] = kind == CONFSMOE_ROUTER_SOFTMAX ? dot : kind == CONFSMOE_ROUTER_GAUSSIAN ? -dist : -sqrt(dist);
        }
}

/* Top-k of one row, best first, ties to the lower index. */
static void ref_topk(const double *u, int32_t E, int32_t k, int32_t *out)
{
    int used[MAXE] = {0};
    for (int32_t j = 0; j < k; j++) {
        int32_t best = -1;
        for (int32_t e = 0; e < E; e++)
            if (!used[e] && (best < 0 || u[e] > u[best]))
                best = e;
        used[best] = 1;
        out[j] = best;
    }
}

/* The returned top-k must be the reference's, except that two logits closer than
 * float rounding may swap. */
static void check_topk(const int32_t *got, const double *u, int64_t n, int32_t E, int32_t k)
{
    for (int64_t t = 0; t < n; t++) {
        int32_t ref[MAXE];
        ref_topk(u + t * E, E, k, ref);
        int seen[MAXE] = {0};
        for (int32_t j = 0; j < k; j++) {
            const int32_t e = got[t * k + j];
            ck_assert_msg(e >= 0 && e < E && !seen[e], "token %lld slot %d: expert %d", (long long)t, j, e);
            seen[e] = 1;
            const double a = u[t * E + e], b = u[t * E + ref[j]];
            ck_assert_msg(e == ref[j] || fabs(a - b) <= 1e-5 * (1.0 + fabs(b)),
                          "token %lld slot %d: expert %d (u=%.9g), expected %d (u=%.9g)", (long long)t, j, e, a,
                          ref[j], b);
        }
    }
}

/* Every expert's output on every token, by confsmoe_expert_forward (inference). */
static double *expert_outputs(fx *f, confsmoe_tensor *x)
{
    const int64_t n = confsmoe_tensor_dim(x, 0), d = f->d;
    double *out = xcalloc((size_t)(f->E * n * d), sizeof(double));
    confsmoe_tensor *y = mk2(f->ctx, n, d);
    for (int32_t e = 0; e < f->E; e++) {
        ck_assert_int_eq(confsmoe_expert_forward(f->ex[e], x, y, NULL), CONFSMOE_OK);
        for (int64_t i = 0; i < n * d; i++)
            out[e * n * d + i] = f32(y)[i];
    }
    confsmoe_tensor_destroy(y);
    return out;
}

/* sigmoid(v . LN(y) + b), LN with eps 1e-5 (PyTorch's default), in double. */
static double ref_conf(fx *f, int32_t e, const double *y)
{
    const int64_t d = f->d;
    const float *lw = f32(confsmoe_gate_param(f->g, 1 + 4 * e)), *lb = f32(confsmoe_gate_param(f->g, 2 + 4 * e));
    const float *v = f32(confsmoe_gate_param(f->g, 3 + 4 * e)), *b = f32(confsmoe_gate_param(f->g, 4 + 4 * e));
    double mean = 0.0, var = 0.0;
    for (int64_t c = 0; c < d; c++)
        mean += y[c];
    mean /= (double)d;
    for (int64_t c = 0; c < d; c++)
        var += (y[c] - mean) * (y[c] - mean);
    var /= (double)d;
    double z = b[0];
    for (int64_t c = 0; c < d; c++)
        z += v[c] * ((y[c] - mean) / sqrt(var + 1e-5) * lw[c] + lb[c]);
    return 1.0 / (1.0 + exp(-z));
}

/* Forward against the reference: routers x combines x k x compat, training and inference. */
enum { N_FWD_REF = 3 * 2 * 2 * 4 };

START_TEST(test_forward_reference)
{
    const int32_t kind = _i % 3, confidence = (_i / 3) % 2, compat = (_i / 6) % 2;
    static const int32_t ks[4] = {1, 2, 3, 5}; /* 5 = E */
    const int32_t E = 5, k = ks[(_i / 12) % 4], C = 3;
    const int64_t N = 7, d = 6;
    fx f;
    fx_init(&f, 40 + (uint64_t)_i, E, d, 8);
    confsmoe_gate_params p = gparams(d, confidence ? C : 0);
    p.router = kind;
    p.k = k;
    p.compat = compat;
    if (!confidence)
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    fx_gate(&f, &p);
    trng r = {4000 + (uint64_t)_i};
    /* A wider router than the init, so that logits are well apart. */
    confsmoe_tensor *w = confsmoe_gate_param(f.g, 0);
    fill_uniform(w, &r, -1, 1);

    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *y2 = mk2(f.ctx, N, d);
    confsmoe_tensor *topk = mk(f.ctx, CONFSMOE_I32, 2, N, k, 0), *slots = mk(f.ctx, CONFSMOE_F32, 3, N, k, d);
    confsmoe_tensor *topk2 = mk(f.ctx, CONFSMOE_I32, 2, N, k, 0), *slots2 = mk(f.ctx, CONFSMOE_F32, 3, N, k, d);
    confsmoe_tensor *lab = mk_labels(f.ctx, N, C > 0 ? C : 1, &r);
    fill_uniform(x, &r, -1.5, 1.5);

    double *u = xcalloc((size_t)(N * E), sizeof(double));
    ref_logits(kind, f32(x), f32(w), N, d, E, u);
    double *eo = expert_outputs(&f, x);

    /* Inference first: no labels, loss 0. */
    float loss = -1.0f;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, topk, slots, &loss, NULL), CONFSMOE_OK);
    ck_assert_float_eq(loss, 0.0f);
    check_topk(i32(topk), u, N, E, k);

    /* Slots: expert I_tj on token t (or (t k + j) mod N under compat). */
    double *ref_slot = xcalloc((size_t)(N * k * d), sizeof(double));
    for (int64_t t = 0; t < N; t++)
        for (int32_t j = 0; j < k; j++) {
            const int32_t e = i32(topk)[t * k + j];
            const int64_t src = compat ? (t * k + j) % N : t;
            for (int64_t c = 0; c < d; c++)
                ref_slot[(t * k + j) * d + c] = eo[(e * N + src) * d + c];
        }
    ck_assert_msg(rel_err(f32(slots), ref_slot, N * k * d) <= TOL, "slots off by %g",
                  rel_err(f32(slots), ref_slot, N * k * d));
    /* With k > 1, compat must actually move some slot to another token. */
    if (compat && k > 1) {
        double diff = 0.0;
        for (int64_t t = 0; t < N; t++)
            for (int32_t j = 0; j < k; j++) {
                const int32_t e = i32(topk)[t * k + j];
                for (int64_t c = 0; c < d; c++)
                    diff += fabs(f32(slots)[(t * k + j) * d + c] - eo[(e * N + t) * d + c]);
            }
        ck_assert_msg(diff > 1e-3, "compat=1 ran every slot on its own token");
    }

    /* y = sum_j w_j slot_j, with w the router softmax over the kept logits or the ConfNet output. */
    double *ref_y = xcalloc((size_t)(N * d), sizeof(double));
    double *cref = xcalloc((size_t)(N * k), sizeof(double));
    for (int64_t t = 0; t < N; t++) {
        double mx = -INFINITY, z = 0.0, g[MAXE];
        for (int32_t j = 0; j < k; j++)
            mx = fmax(mx, u[t * E + i32(topk)[t * k + j]]);
        for (int32_t j = 0; j < k; j++)
            z += g[j] = exp(u[t * E + i32(topk)[t * k + j]] - mx);
        for (int32_t j = 0; j < k; j++) {
            const double *ys = ref_slot + (t * k + j) * d;
            const double wgt = confidence ? (cref[t * k + j] = ref_conf(&f, i32(topk)[t * k + j], ys)) : g[j] / z;
            for (int64_t c = 0; c < d; c++)
                ref_y[t * d + c] += wgt * ys[c];
        }
    }
    ck_assert_msg(rel_err(f32(y), ref_y, N * d) <= TOL, "y off by %g", rel_err(f32(y), ref_y, N * d));

    /* Training (no noise): the same outputs, and a saved handle. */
    confsmoe_saved *sv = NULL;
    loss = -1.0f;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, confidence ? lab : NULL, NULL, y2, topk2, slots2, &loss, &sv),
                     CONFSMOE_OK);
    ck_assert_ptr_nonnull(sv);
    ck_assert_mem_eq(f32(y), f32(y2), confsmoe_tensor_nbytes(y));
    ck_assert_mem_eq(i32(topk), i32(topk2), confsmoe_tensor_nbytes(topk));
    ck_assert_mem_eq(f32(slots), f32(slots2), confsmoe_tensor_nbytes(slots));
    if (!confidence) {
        ck_assert_float_eq(loss, 0.0f);
    } else {
        /* L_conf = mean over slots of (c - softmax(P y_j)[label_t])^2. */
        const float *P = f32(confsmoe_gate_param(f.g, 1 + 4 * E)), *pb = f32(confsmoe_gate_param(f.g, 2 + 4 * E));
        double sum = 0.0;
        for (int64_t t = 0; t < N; t++)
            for (int32_t j = 0; j < k; j++) {
                const double *ys = ref_slot + (t * k + j) * d;
                double z[8], mx = -INFINITY, zs = 0.0;
                for (int32_t l = 0; l < C; l++) {
                    z[l] = pb[l];
                    for (int64_t c = 0; c < d; c++)
                        z[l] += P[l * d + c] * ys[c];
                    mx = fmax(mx, z[l]);
                }
                for (int32_t l = 0; l < C; l++)
                    zs += exp(z[l] - mx);
                const double pr = exp(z[i32(lab)[t]] - mx) / zs, diff = cref[t * k + j] - pr;
                sum += diff * diff;
            }
        const double ref_loss = sum / (double)(N * k);
        ck_assert_msg(fabs(loss - ref_loss) <= 1e-5 * fmax(1.0, ref_loss), "loss %g, expected %g", loss, ref_loss);
    }
    confsmoe_saved_destroy(sv);

    free(u);
    free(eo);
    free(ref_slot);
    free(ref_y);
    free(cref);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(y2);
    confsmoe_tensor_destroy(topk);
    confsmoe_tensor_destroy(slots);
    confsmoe_tensor_destroy(topk2);
    confsmoe_tensor_destroy(slots2);
    confsmoe_tensor_destroy(lab);
    fx_free(&f);
}
END_TEST

/* Exact ties (equal router columns) go to the lower index, for every k and router. */
START_TEST(test_topk_ties)
{
    const int32_t kind = _i % 3, k = 1 + _i / 3;
    const int32_t E = 4;
    const int64_t N = 6, d = 3;
    fx f;
    fx_init(&f, 50 + (uint64_t)_i, E, d, 4);
    confsmoe_gate_params p = gparams(d, 0);
    p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    p.router = kind;
    p.k = k;
    fx_gate(&f, &p);
    /* Columns 0 and 2 are v, columns 1 and 3 are -v. */
    float *w = f32(confsmoe_gate_param(f.g, 0));
    const float v[3] = {0.5f, -0.25f, 0.75f};
    for (int64_t c = 0; c < d; c++)
        for (int32_t e = 0; e < E; e++)
            w[c * E + e] = e % 2 ? -v[c] : v[c];
    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *topk = mk(f.ctx, CONFSMOE_I32, 2, N, k, 0);
    trng r = {5000 + (uint64_t)_i};
    fill_uniform(x, &r, -1, 1);
    /* Make sure both signs of x . v occur. */
    for (int64_t c = 0; c < d; c++) {
        f32(x)[c] = v[c];
        f32(x)[d + c] = -v[c];
    }
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, topk, NULL, NULL, NULL), CONFSMOE_OK);
    for (int64_t t = 0; t < N; t++) {
        double dot = 0.0;
        for (int64_t c = 0; c < d; c++)
            dot += (double)f32(x)[t * d + c] * v[c];
        ck_assert(fabs(dot) > 1e-3); /* no four-way tie */
        /* Under every router here the columns equal to v win when x . v > 0. */
        const int32_t win = dot > 0 ? 0 : 1, lose = 1 - win;
        const int32_t expect[4] = {win, win + 2, lose, lose + 2};
        for (int32_t j = 0; j < k; j++)
            ck_assert_msg(i32(topk)[t * k + j] == expect[j], "router %d k %d token %lld slot %d: %d, expected %d",
                          kind, k, (long long)t, j, i32(topk)[t * k + j], expect[j]);
    }
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(topk);
    fx_free(&f);
}
END_TEST

/* topk and slots are optional; y does not depend on asking for them. */
START_TEST(test_forward_optional_outputs)
{
    const int64_t N = 5, d = 4;
    fx f;
    fx_init(&f, 60, 3, d, 5);
    confsmoe_gate_params p = gparams(d, 2);
    fx_gate(&f, &p);
    trng r = {60};
    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *y2 = mk2(f.ctx, N, d);
    confsmoe_tensor *topk = mk(f.ctx, CONFSMOE_I32, 2, N, 2, 0), *slots = mk(f.ctx, CONFSMOE_F32, 3, N, 2, d);
    fill_uniform(x, &r, -1, 1);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y2, topk, slots, NULL, NULL), CONFSMOE_OK);
    ck_assert_mem_eq(f32(y), f32(y2), confsmoe_tensor_nbytes(y));
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(y2);
    confsmoe_tensor_destroy(topk);
    confsmoe_tensor_destroy(slots);
    fx_free(&f);
}
END_TEST

/* noisy = 1: inference runs without noise (the same y as the same gate without noise),
 * training draws noise (here large enough to change the routing of some token). */
START_TEST(test_noisy_inference_clean)
{
    const int32_t E = 4;
    const int64_t N = 12, d = 5;
    fx a, b;
    fx_init(&a, 66, E, d, 4);
    fx_init(&b, 66, E, d, 4);
    confsmoe_gate_params p = gparams(d, 0);
    p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    fx_gate(&a, &p);
    p.noisy = 1;
    fx_gate(&b, &p);
    ck_assert_str_eq(confsmoe_gate_param_name(b.g, 1), "noise.w");
    /* router.w is drawn first in both. */
    void *w = tsnap(confsmoe_gate_param(a.g, 0));
    ck_assert(tsame(confsmoe_gate_param(b.g, 0), w));
    free(w);
    /* Big noise: softplus(x W_noise) with W_noise = 5. */
    float *wn = f32(confsmoe_gate_param(b.g, 1));
    for (int64_t i = 0; i < d * E; i++)
        wn[i] = 5.0f;
    trng r = {66};
    confsmoe_tensor *x = mk2(a.ctx, N, d), *ya = mk2(a.ctx, N, d), *yb = mk2(a.ctx, N, d);
    confsmoe_tensor *ta = mk(a.ctx, CONFSMOE_I32, 2, N, 2, 0), *tb = mk(a.ctx, CONFSMOE_I32, 2, N, 2, 0);
    fill_uniform(x, &r, 0.0, 1.0);
    ck_assert_int_eq(confsmoe_gate_forward(a.g, x, NULL, NULL, ya, ta, NULL, NULL, NULL), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_forward(b.g, x, NULL, NULL, yb, tb, NULL, NULL, NULL), CONFSMOE_OK);
    ck_assert_mem_eq(f32(ya), f32(yb), confsmoe_tensor_nbytes(ya));
    ck_assert_mem_eq(i32(ta), i32(tb), confsmoe_tensor_nbytes(ta));
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(b.g, x, NULL, NULL, yb, tb, NULL, NULL, &sv), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    ck_assert_msg(memcmp(i32(ta), i32(tb), confsmoe_tensor_nbytes(ta)) != 0, "training drew no effective noise");
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(ya);
    confsmoe_tensor_destroy(yb);
    confsmoe_tensor_destroy(ta);
    confsmoe_tensor_destroy(tb);
    fx_free(&a);
    fx_free(&b);
}
END_TEST

/* ------------------------------------------------------------ 5. statistics */

/* Entropy / log E, unbiased CV^2 and max share of a load vector, in double. */
static void ref_usage(const int64_t *load, int32_t E, double *ent, double *cv2, double *maxf)
{
    double total = 0.0, top = 0.0, h = 0.0, var = 0.0;
    for (int32_t e = 0; e < E; e++) {
        total += (double)load[e];
        top = fmax(top, (double)load[e]);
    }
    const double mean = total / E;
    for (int32_t e = 0; e < E; e++) {
        const double q = (double)load[e] / total;
        if (q > 0)
            h -= q * log(q);
        var += ((double)load[e] - mean) * ((double)load[e] - mean);
    }
    *ent = E > 1 ? h / log((double)E) : 1.0;
    *cv2 = E > 1 ? var / (E - 1) / (mean * mean) : 0.0;
    *maxf = top / total;
}

#define CK_NEAR(a, b) ck_assert_msg(fabs((a) - (b)) <= 1e-9 * (1.0 + fabs(b)), "%s = %.12g, expected %.12g", #a, (double)(a), (double)(b))

/* Softmax router; x > 0 and a very negative column for expert E-1, which then gets no slot. */
static void starve_last(fx *f, confsmoe_tensor *x, trng *r)
{
    float *w = f32(confsmoe_gate_param(f->g, 0));
    for (int64_t c = 0; c < f->d; c++)
        w[c * f->E + f->E - 1] = -5.0f;
    fill_uniform(x, r, 0.1, 1.0);
}

START_TEST(test_stats_basic)
{
    const int confidence = _i;
    const int32_t E = 5, k = 2, C = 3;
    const int64_t N1 = 9, N2 = 4, d = 4;
    fx f;
    fx_init(&f, 70 + (uint64_t)_i, E, d, 5);
    confsmoe_gate_params p = gparams(d, confidence ? C : 0);
    p.k = k;
    if (!confidence)
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    fx_gate(&f, &p);
    trng r = {700 + (uint64_t)_i};
    confsmoe_tensor *x1 = mk2(f.ctx, N1, d), *y1 = mk2(f.ctx, N1, d), *t1 = mk(f.ctx, CONFSMOE_I32, 2, N1, k, 0);
    confsmoe_tensor *s1 = mk(f.ctx, CONFSMOE_F32, 3, N1, k, d), *l1 = mk_labels(f.ctx, N1, C, &r);
    confsmoe_tensor *x2 = mk2(f.ctx, N2, d), *y2 = mk2(f.ctx, N2, d), *t2 = mk(f.ctx, CONFSMOE_I32, 2, N2, k, 0);
    fill_uniform(confsmoe_gate_param(f.g, 0), &r, -1, 1);
    starve_last(&f, x1, &r);
    fill_uniform(x2, &r, -1, 1);

    /* Fresh gate: nothing routed. */
    confsmoe_gate_stats st;
    int64_t load[MAXE];
    double mc[MAXE];
    stats_of(f.g, CONFSMOE_STATS_TOTAL, &st, load, mc);
    ck_assert_int_eq(st.tokens, 0);

    float loss1 = -1.0f;
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x1, l1, NULL, y1, t1, s1, &loss1, &sv), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);

    int64_t cnt1[MAXE] = {0}, cnt2[MAXE] = {0}, both[MAXE];
    double csum[MAXE] = {0};
    for (int64_t i = 0; i < N1 * k; i++) {
        const int32_t e = i32(t1)[i];
        cnt1[e]++;
        if (confidence) {
            double ys[16];
            for (int64_t c = 0; c < d; c++)
                ys[c] = f32(s1)[i * d + c];
            csum[e] += ref_conf(&f, e, ys);
        }
    }
    ck_assert_int_eq(cnt1[E - 1], 0);
    double ent, cv2, maxf;
    stats_of(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, mc);
    ck_assert_int_eq(st.tokens, N1);
    for (int32_t e = 0; e < E; e++)
        ck_assert_int_eq(load[e], cnt1[e]);
    ref_usage(cnt1, E, &ent, &cv2, &maxf);
    CK_NEAR(st.load_entropy, ent);
    CK_NEAR(st.load_cv2, cv2);
    CK_NEAR(st.max_load_fraction, maxf);
    ck_assert(ent < 1.0 && ent > 0.0);
    for (int32_t e = 0; e < E; e++) {
        if (!confidence || cnt1[e] == 0)
            ck_assert_msg(isnan(mc[e]), "mean_confidence[%d] = %g, expected NaN", e, mc[e]);
        else
            ck_assert_msg(fabs(mc[e] - csum[e] / (double)cnt1[e]) <= 1e-5, "mean_confidence[%d] = %g, expected %g",
                          e, mc[e], csum[e] / (double)cnt1[e]);
    }
    ck_assert_msg(fabs(st.conf_loss - loss1) <= 1e-6 * (1 + fabs(loss1)), "conf_loss %g, loss %g", st.conf_loss,
                  (double)loss1);
    if (confidence)
        ck_assert(st.conf_loss > 0.0);
    /* TOTAL after one call equals LAST_CALL. */
    confsmoe_gate_stats tot;
    int64_t tload[MAXE];
    double tmc[MAXE];
    stats_of(f.g, CONFSMOE_STATS_TOTAL, &tot, tload, tmc);
    ck_assert_int_eq(tot.tokens, N1);
    ck_assert_mem_eq(tload, load, (size_t)E * sizeof *load);

    /* A second (inference) call: LAST_CALL shows it, TOTAL accumulates. */
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x2, NULL, NULL, y2, t2, NULL, NULL, NULL), CONFSMOE_OK);
    for (int64_t i = 0; i < N2 * k; i++)
        cnt2[i32(t2)[i]]++;
    stats_of(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, mc);
    ck_assert_int_eq(st.tokens, N2);
    for (int32_t e = 0; e < E; e++)
        ck_assert_int_eq(load[e], cnt2[e]);
    ref_usage(cnt2, E, &ent, &cv2, &maxf);
    CK_NEAR(st.load_entropy, ent);
    CK_NEAR(st.load_cv2, cv2);
    CK_NEAR(st.max_load_fraction, maxf);
    ck_assert(st.conf_loss == 0.0);
    stats_of(f.g, CONFSMOE_STATS_TOTAL, &tot, tload, tmc);
    ck_assert_int_eq(tot.tokens, N1 + N2);
    for (int32_t e = 0; e < E; e++) {
        both[e] = cnt1[e] + cnt2[e];
        ck_assert_int_eq(tload[e], both[e]);
    }
    ref_usage(both, E, &ent, &cv2, &maxf);
    CK_NEAR(tot.load_entropy, ent);
    CK_NEAR(tot.load_cv2, cv2);
    CK_NEAR(tot.max_load_fraction, maxf);
    /* conf_loss of TOTAL is the mean over the training calls: the inference call has none. */
    ck_assert_msg(fabs(tot.conf_loss - loss1) <= 1e-6 * (1 + fabs(loss1)), "TOTAL conf_loss %g, expected %g",
                  tot.conf_loss, (double)loss1);

    /* NULL arrays are fine, with any n. */
    confsmoe_gate_stats st2;
    memset(&st2, 0, sizeof st2);
    st2.struct_size = sizeof st2;
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, &st2, NULL, NULL, 0), CONFSMOE_OK);
    ck_assert_int_eq(st2.tokens, N1 + N2);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, &st2, NULL, NULL, 99), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, &st2, load, NULL, E), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, &st2, NULL, mc, E), CONFSMOE_OK);

    /* Reset zeroes both scopes. */
    confsmoe_gate_stats_reset(f.g);
    for (int sc = 0; sc < 2; sc++) {
        stats_of(f.g, sc, &st, load, mc);
        ck_assert_int_eq(st.tokens, 0);
        ck_assert(st.conf_loss == 0.0);
        ck_assert(st.max_load_fraction == 0.0);
        ck_assert(st.load_cv2 == 0.0);
        for (int32_t e = 0; e < E; e++) {
            ck_assert_int_eq(load[e], 0);
            ck_assert(isnan(mc[e]));
        }
    }
    /* And counting restarts. */
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x2, NULL, NULL, y2, t2, NULL, NULL, NULL), CONFSMOE_OK);
    stats_of(f.g, CONFSMOE_STATS_TOTAL, &tot, tload, NULL);
    ck_assert_int_eq(tot.tokens, N2);
    for (int32_t e = 0; e < E; e++)
        ck_assert_int_eq(tload[e], cnt2[e]);
    confsmoe_gate_stats_reset(NULL);

    confsmoe_tensor_destroy(x1);
    confsmoe_tensor_destroy(y1);
    confsmoe_tensor_destroy(t1);
    confsmoe_tensor_destroy(s1);
    confsmoe_tensor_destroy(l1);
    confsmoe_tensor_destroy(x2);
    confsmoe_tensor_destroy(y2);
    confsmoe_tensor_destroy(t2);
    fx_free(&f);
}
END_TEST

START_TEST(test_stats_errors)
{
    const int64_t d = 4;
    fx f;
    fx_init(&f, 71, 3, d, 5);
    confsmoe_gate_params p = gparams(d, 2);
    fx_gate(&f, &p);
    trng r = {71};
    train_step(&f, 5, &r, 0, 2);
    confsmoe_gate_stats st;
    int64_t load[MAXE];
    double mc[MAXE];
    for (int32_t e = 0; e < MAXE; e++) {
        load[e] = -7;
        mc[e] = -7.0;
    }
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st - 8;
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, mc, 3), CONFSMOE_E_VERSION);
    ck_has(f.ctx, "struct_size");
    st.struct_size = 0;
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, &st, NULL, NULL, 0), CONFSMOE_E_VERSION);
    st.struct_size = sizeof st;
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, mc, 2), CONFSMOE_E_SHAPE);
    ck_has(f.ctx, "E=3");
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, NULL, 4), CONFSMOE_E_SHAPE);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_LAST_CALL, &st, NULL, mc, 0), CONFSMOE_E_SHAPE);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, 2, &st, load, mc, 3), CONFSMOE_E_INVALID_ARGUMENT);
    ck_has(f.ctx, "scope");
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, -1, &st, load, mc, 3), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_stats_get(f.g, CONFSMOE_STATS_TOTAL, NULL, load, mc, 3),
                     CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_gate_stats_get(NULL, CONFSMOE_STATS_TOTAL, &st, load, mc, 3),
                     CONFSMOE_E_INVALID_ARGUMENT);
    /* The arrays were not written by the failed calls. */
    for (int32_t e = 0; e < MAXE; e++) {
        ck_assert_int_eq(load[e], -7);
        ck_assert(mc[e] == -7.0);
    }
    fx_free(&f);
}
END_TEST

/* E = 1: entropy 1 (by definition), CV^2 0, everything on the one expert. */
START_TEST(test_stats_single_expert)
{
    const int64_t N = 6, d = 3;
    fx f;
    fx_init(&f, 72, 1, d, 4);
    confsmoe_gate_params p = gparams(d, 2);
    p.k = 1;
    fx_gate(&f, &p);
    trng r = {72};
    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *topk = mk(f.ctx, CONFSMOE_I32, 2, N, 1, 0);
    fill_uniform(x, &r, -1, 1);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, topk, NULL, NULL, NULL), CONFSMOE_OK);
    for (int64_t t = 0; t < N; t++)
        ck_assert_int_eq(i32(topk)[t], 0);
    confsmoe_gate_stats st;
    int64_t load[1];
    double mc[1];
    stats_of(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, mc);
    ck_assert_int_eq(st.tokens, N);
    ck_assert_int_eq(load[0], N);
    ck_assert(st.load_entropy == 1.0);
    ck_assert(st.load_cv2 == 0.0);
    ck_assert(st.max_load_fraction == 1.0);
    ck_assert(isfinite(mc[0]) && mc[0] > 0.0 && mc[0] < 1.0);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(topk);
    fx_free(&f);
}
END_TEST

/* ------------------------------------------------------------ 6. several forwards in flight */

static double grad_rel(confsmoe_tensor *a, confsmoe_tensor *b)
{
    const int64_t n = confsmoe_tensor_numel(a);
    ck_assert_int_eq(n, confsmoe_tensor_numel(b));
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double u = f32(a)[i], v = f32(b)[i];
        num += (u - v) * (u - v);
        den += v * v;
    }
    return den == 0.0 ? sqrt(num) : sqrt(num / den);
}

/* _i: 0 confidence + score + CV load loss, 1 router softmax + entropy loss, 2 noisy confidence
 * (trainable router), 3 compat confidence with EXPERT granularity and multi-label. */
START_TEST(test_interleaved)
{
    enum { CALLS = 3 };
    const int32_t E = 4, C = 3;
    const int64_t d = 5, ns[CALLS] = {6, 3, 8};
    const int multi = _i == 3;
    fx A, B;
    fx_init(&A, 80 + (uint64_t)_i, E, d, 6);
    fx_init(&B, 80 + (uint64_t)_i, E, d, 6);
    confsmoe_gate_params p = gparams(d, C);
    switch (_i) {
    case 0: p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE; p.load_loss = CONFSMOE_LOAD_LOSS_CV; break;
    case 1: p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX; p.load_loss = CONFSMOE_LOAD_LOSS_ENTROPY; p.k = 3; break;
    case 2: p.noisy = 1; p.router_grad = CONFSMOE_ROUTER_GRAD_TRAINABLE; p.load_loss = CONFSMOE_LOAD_LOSS_CV; break;
    case 3: p.compat = 1; p.confidence = CONFSMOE_CONFIDENCE_EXPERT; p.target = CONFSMOE_TARGET_MULTI_LABEL; break;
    default: ck_abort();
    }
    p.load_loss_weight = 0.5f;
    fx_gate(&A, &p);
    fx_gate(&B, &p);
    trng r = {800 + (uint64_t)_i};
    confsmoe_tensor *x[CALLS], *lab[CALLS], *dy[CALLS], *dsl[CALLS], *ya[CALLS], *yb[CALLS], *dxa[CALLS], *dxb[CALLS];
    confsmoe_saved *sa[CALLS];
    const float dloss[CALLS] = {1.0f, 0.5f, 2.0f};
    for (int c = 0; c < CALLS; c++) {
        x[c] = mk2(A.ctx, ns[c], d);
        fill_uniform(x[c], &r, -1, 1);
        lab[c] = multi ? mk_multi(A.ctx, ns[c], C, &r) : mk_labels(A.ctx, ns[c], C, &r);
        dy[c] = mk2(A.ctx, ns[c], d);
        fill_uniform(dy[c], &r, -1, 1);
        dsl[c] = mk(A.ctx, CONFSMOE_F32, 3, ns[c], p.k, d);
        fill_uniform(dsl[c], &r, -1, 1);
        ya[c] = mk2(A.ctx, ns[c], d);
        yb[c] = mk2(A.ctx, ns[c], d);
        dxa[c] = mk2(A.ctx, ns[c], d);
        dxb[c] = mk2(A.ctx, ns[c], d);
    }
    /* A: all forwards, then the backwards in reverse order. */
    for (int c = 0; c < CALLS; c++)
        ck_assert_int_eq(confsmoe_gate_forward(A.g, x[c], lab[c], NULL, ya[c], NULL, NULL, NULL, &sa[c]), CONFSMOE_OK);
    for (int c = CALLS - 1; c >= 0; c--) {
        ck_assert_int_eq(confsmoe_gate_backward(A.g, sa[c], dy[c], c == 1 ? NULL : dsl[c], dloss[c], dxa[c]),
                         CONFSMOE_OK);
        confsmoe_saved_destroy(sa[c]);
    }
    /* B: one by one. */
    for (int c = 0; c < CALLS; c++) {
        confsmoe_saved *sb = NULL;
        ck_assert_int_eq(confsmoe_gate_forward(B.g, x[c], lab[c], NULL, yb[c], NULL, NULL, NULL, &sb), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_gate_backward(B.g, sb, dy[c], c == 1 ? NULL : dsl[c], dloss[c], dxb[c]), CONFSMOE_OK);
        confsmoe_saved_destroy(sb);
    }
    for (int c = 0; c < CALLS; c++) {
        ck_assert_msg(memcmp(f32(ya[c]), f32(yb[c]), confsmoe_tensor_nbytes(ya[c])) == 0, "call %d: y differs", c);
        ck_assert_msg(grad_rel(dxa[c], dxb[c]) <= 1e-6, "call %d: dx differs by %g", c, grad_rel(dxa[c], dxb[c]));
    }
    int nonzero = 0;
    for (int32_t i = 0; i < confsmoe_gate_n_params(A.g); i++) {
        confsmoe_tensor *ga = confsmoe_gate_grad(A.g, i), *gb = confsmoe_gate_grad(B.g, i);
        nonzero += !all_zero(gb);
        ck_assert_msg(grad_rel(ga, gb) <= 1e-5, "%s: grads differ by %g", confsmoe_gate_param_name(A.g, i),
                      grad_rel(ga, gb));
    }
    ck_assert_int_ge(nonzero, 1);
    if (_i != 3) /* variants 0..2 train the router; 3 keeps it frozen */
        ck_assert(!all_zero(confsmoe_gate_grad(B.g, 0)));
    else
        ck_assert(all_zero(confsmoe_gate_grad(B.g, 0)) && all_zero(confsmoe_gate_grad(A.g, 0)));
    for (int32_t e = 0; e < E; e++)
        for (int32_t i = 0; i < 4; i++) {
            confsmoe_tensor *ga = confsmoe_expert_grad(A.ex[e], i), *gb = confsmoe_expert_grad(B.ex[e], i);
            ck_assert_msg(grad_rel(ga, gb) <= 1e-5, "expert %d grad %d differs by %g", e, i, grad_rel(ga, gb));
        }
    for (int c = 0; c < CALLS; c++) {
        confsmoe_tensor_destroy(x[c]);
        confsmoe_tensor_destroy(lab[c]);
        confsmoe_tensor_destroy(dy[c]);
        confsmoe_tensor_destroy(dsl[c]);
        confsmoe_tensor_destroy(ya[c]);
        confsmoe_tensor_destroy(yb[c]);
        confsmoe_tensor_destroy(dxa[c]);
        confsmoe_tensor_destroy(dxb[c]);
    }
    fx_free(&A);
    fx_free(&B);
}
END_TEST

/* A saved handle may be destroyed without backward (discarding the call), in any order. */
START_TEST(test_discard_saved)
{
    const int64_t d = 4;
    fx f;
    fx_init(&f, 85, 3, d, 4);
    confsmoe_gate_params p = gparams(d, 2);
    fx_gate(&f, &p);
    trng r = {85};
    confsmoe_tensor *x = mk2(f.ctx, 5, d), *y = mk2(f.ctx, 5, d), *lab = mk_labels(f.ctx, 5, 2, &r);
    fill_uniform(x, &r, -1, 1);
    const long base = f.a.live;
    confsmoe_saved *s1 = NULL, *s2 = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, lab, NULL, y, NULL, NULL, NULL, &s1), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, lab, NULL, y, NULL, NULL, NULL, &s2), CONFSMOE_OK);
    confsmoe_saved_destroy(s1);
    confsmoe_saved_destroy(s2);
    confsmoe_saved_destroy(NULL);
    ck_assert_int_eq(f.a.live, base);
    for (int32_t i = 0; i < confsmoe_gate_n_params(f.g); i++)
        ck_assert(all_zero(confsmoe_gate_grad(f.g, i)));
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(lab);
    fx_free(&f);
}
END_TEST

/* ------------------------------------------------------------ 7. edge sizes */

/* N = 1 with k = 1 and k = E: y is the weighted sum of the experts on the one token. */
START_TEST(test_single_token)
{
    /* _i 2: more experts than the token has slots (12 > k = 2), the top two 3 and then 8: the
     * dispatch once kept its E cursors in an array of n k entries, where expert 8's cursor
     * (past the alignment padding) was the first slot's entry, clobbered by expert 3's write. */
    const int32_t E = _i < 2 ? 3 : MAXE, k = _i == 0 ? 1 : _i == 1 ? E : 2;
    const int64_t d = 4;
    fx f;
    fx_init(&f, 90 + (uint64_t)_i, E, d, 5);
    confsmoe_gate_params p = gparams(d, 0);
    p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    p.k = k;
    p.compat = 1; /* (0 k + j) mod 1 = 0: the same token */
    fx_gate(&f, &p);
    trng r = {900 + (uint64_t)_i};
    confsmoe_tensor *x = mk2(f.ctx, 1, d), *y = mk2(f.ctx, 1, d), *dy = mk2(f.ctx, 1, d), *dx = mk2(f.ctx, 1, d);
    confsmoe_tensor *topk = mk(f.ctx, CONFSMOE_I32, 2, 1, k, 0);
    fill_uniform(x, &r, -1, 1);
    fill_uniform(dy, &r, -1, 1);
    if (_i == 2) {
        /* Logits a_e sum |x_c| with a_3 > a_8 > every other a_e. */
        float *w = f32(confsmoe_gate_param(f.g, 0));
        for (int64_t c = 0; c < d; c++)
            for (int32_t e = 0; e < E; e++)
                w[c * E + e] = (f32(x)[c] < 0 ? -1.0f : 1.0f) * (e == 3 ? 0.3f : e == 8 ? 0.2f : 0.01f * (float)e);
    }
    double u[MAXE], yref[8] = {0}, g[MAXE], z = 0.0, mx = -INFINITY;
    ref_logits(CONFSMOE_ROUTER_SOFTMAX, f32(x), f32(confsmoe_gate_param(f.g, 0)), 1, d, E, u);
    double *eo = expert_outputs(&f, x);
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, topk, NULL, NULL, &sv), CONFSMOE_OK);
    check_topk(i32(topk), u, 1, E, k);
    if (_i == 2)
        ck_assert(i32(topk)[0] == 3 && i32(topk)[1] == 8);
    for (int32_t j = 0; j < k; j++)
        mx = fmax(mx, u[i32(topk)[j]]);
    for (int32_t j = 0; j < k; j++)
        z += g[j] = exp(u[i32(topk)[j]] - mx);
    for (int32_t j = 0; j < k; j++)
        for (int64_t c = 0; c < d; c++)
            yref[c] += g[j] / z * eo[i32(topk)[j] * d + c];
    ck_assert_msg(rel_err(f32(y), yref, d) <= TOL, "y off by %g", rel_err(f32(y), yref, d));
    ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, NULL, 1.0f, dx), CONFSMOE_OK);
    for (int64_t c = 0; c < d; c++)
        ck_assert(isfinite(f32(dx)[c]));
    /* k = 1: the softmax over one logit is constant, so the router gets no gradient. */
    if (k == 1)
        ck_assert(all_zero(confsmoe_gate_grad(f.g, 0)));
    else
        ck_assert(!all_zero(confsmoe_gate_grad(f.g, 0)));
    for (int32_t e = 0; e < E; e++) {
        int used = 0;
        for (int32_t j = 0; j < k; j++)
            used |= i32(topk)[j] == e;
        ck_assert_msg(used == !all_zero(confsmoe_expert_grad(f.ex[e], 3)), "expert %d: used %d", e, used);
    }
    confsmoe_saved_destroy(sv);
    free(eo);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_tensor_destroy(topk);
    fx_free(&f);
}
END_TEST

/* N = 0: every output is empty, the loss is 0, backward adds nothing. */
START_TEST(test_empty_batch)
{
    const int confidence = _i;
    const int32_t E = 3, k = 2, C = 2;
    const int64_t d = 4;
    fx f;
    fx_init(&f, 95 + (uint64_t)_i, E, d, 5);
    confsmoe_gate_params p = gparams(d, confidence ? C : 0);
    if (!confidence)
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    p.load_loss = CONFSMOE_LOAD_LOSS_CV;
    p.router_grad = CONFSMOE_ROUTER_GRAD_TRAINABLE;
    fx_gate(&f, &p);
    confsmoe_tensor *x = mk2(f.ctx, 0, d), *y = mk2(f.ctx, 0, d), *dy = mk2(f.ctx, 0, d), *dx = mk2(f.ctx, 0, d);
    confsmoe_tensor *topk = mk(f.ctx, CONFSMOE_I32, 2, 0, k, 0), *slots = mk(f.ctx, CONFSMOE_F32, 3, 0, k, d);
    confsmoe_tensor *dslots = mk(f.ctx, CONFSMOE_F32, 3, 0, k, d), *lab = mk(f.ctx, CONFSMOE_I32, 1, 0, 0, 0);
    confsmoe_tensor *present = mk(f.ctx, CONFSMOE_U8, 1, 0, 0, 0);
    float loss = -1.0f;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, NULL, NULL, y, topk, slots, &loss, NULL), CONFSMOE_OK);
    ck_assert_float_eq(loss, 0.0f);
    confsmoe_saved *sv = NULL;
    loss = -1.0f;
    ck_assert_msg(confsmoe_gate_forward(f.g, x, lab, present, y, topk, slots, &loss, &sv) == CONFSMOE_OK, "%s",
                  confsmoe_ctx_last_error(f.ctx));
    ck_assert_ptr_nonnull(sv);
    ck_assert_msg(loss == 0.0f, "loss %g", (double)loss);
    ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, dslots, 1.0f, dx), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    for (int32_t i = 0; i < confsmoe_gate_n_params(f.g); i++)
        ck_assert_msg(all_zero(confsmoe_gate_grad(f.g, i)), "%s grad not zero", confsmoe_gate_param_name(f.g, i));
    for (int32_t e = 0; e < E; e++)
        for (int32_t i = 0; i < 4; i++)
            ck_assert(all_zero(confsmoe_expert_grad(f.ex[e], i)));
    confsmoe_gate_stats st;
    int64_t load[MAXE];
    stats_of(f.g, CONFSMOE_STATS_LAST_CALL, &st, load, NULL);
    ck_assert_int_eq(st.tokens, 0);
    for (int32_t e = 0; e < E; e++)
        ck_assert_int_eq(load[e], 0);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_tensor_destroy(topk);
    confsmoe_tensor_destroy(slots);
    confsmoe_tensor_destroy(dslots);
    confsmoe_tensor_destroy(lab);
    confsmoe_tensor_destroy(present);
    fx_free(&f);
}
END_TEST

/* An expert that receives no token: its parameters' and its ConfNet's grads stay exactly 0. */
START_TEST(test_idle_expert)
{
    const int32_t E = 4, C = 3;
    const int64_t N = 8, d = 5;
    fx f;
    fx_init(&f, 97 + (uint64_t)_i, E, d, 6);
    confsmoe_gate_params p = gparams(d, C);
    if (_i == 1) {
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
    } else {
        p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
        p.confidence = _i == 2 ? CONFSMOE_CONFIDENCE_EXPERT : CONFSMOE_CONFIDENCE_TOKEN;
    }
    p.load_loss = CONFSMOE_LOAD_LOSS_CV;
    fx_gate(&f, &p);
    trng r = {970 + (uint64_t)_i};
    confsmoe_tensor *x = mk2(f.ctx, N, d), *y = mk2(f.ctx, N, d), *dy = mk2(f.ctx, N, d);
    confsmoe_tensor *dslots = mk(f.ctx, CONFSMOE_F32, 3, N, 2, d), *topk = mk(f.ctx, CONFSMOE_I32, 2, N, 2, 0);
    confsmoe_tensor *lab = mk_labels(f.ctx, N, C, &r);
    fill_uniform(confsmoe_gate_param(f.g, 0), &r, -1, 1);
    starve_last(&f, x, &r);
    fill_uniform(dy, &r, -1, 1);
    fill_uniform(dslots, &r, -1, 1);
    confsmoe_saved *sv = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(f.g, x, lab, NULL, y, topk, NULL, NULL, &sv), CONFSMOE_OK);
    int64_t used[MAXE] = {0};
    for (int64_t i = 0; i < N * 2; i++) {
        ck_assert_int_ne(i32(topk)[i], E - 1);
        used[i32(topk)[i]]++;
    }
    ck_assert_int_eq(confsmoe_gate_backward(f.g, sv, dy, dslots, 1.0f, NULL), CONFSMOE_OK);
    confsmoe_saved_destroy(sv);
    for (int32_t e = 0; e < E; e++)
        for (int32_t i = 0; i < 4; i++) {
            const int zero = all_zero(confsmoe_expert_grad(f.ex[e], i));
            if (e == E - 1)
                ck_assert_msg(zero, "idle expert grad %d not zero", i);
            else if (i == 3)
                ck_assert_msg(zero == (used[e] == 0), "expert %d (%lld slots): b2 grad zero %d", e,
                              (long long)used[e], zero);
        }
    if (_i != 1)
        for (int32_t i = 0; i < 4; i++) {
            const int32_t at = 1 + 4 * (E - 1) + i;
            ck_assert_msg(all_zero(confsmoe_gate_grad(f.g, at)), "%s grad not zero", confsmoe_gate_param_name(f.g, at));
            if (used[0] > 0)
                ck_assert(!all_zero(confsmoe_gate_grad(f.g, 1 + i))); /* conf.0 is used */
        }
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dslots);
    confsmoe_tensor_destroy(topk);
    confsmoe_tensor_destroy(lab);
    fx_free(&f);
}
END_TEST

/* ------------------------------------------------------------ 8. fault injection */

#define MAX_FAULTS 5000

static confsmoe_gate_params fault_params(int variant, int64_t d, int32_t C)
{
    confsmoe_gate_params p = gparams(d, C);
    p.load_loss = CONFSMOE_LOAD_LOSS_CV;
    if (variant == 0) {
        p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
        p.noisy = 1;
    } else {
        p.combine = CONFSMOE_COMBINE_ROUTER_SOFTMAX;
        p.n_classes = 0;
    }
    return p;
}

/* Documented ("a failed call changes no state") properties that a sweep found broken are
 * collected, so that the sweep still checks status and leaks at every allocation, and
 * reported at the end. */
typedef struct {
    long first_n;
    char what[160];
    int count;
} violation;

static void violate(violation *v, long n, const char *what)
{
    if (v->count++ == 0) {
        v->first_n = n;
        snprintf(v->what, sizeof v->what, "%s", what);
    }
}

#define CK_NO_VIOLATION(v, call)                                                                                       \
    ck_assert_msg((v).count == 0, "%s: %d failing allocations broke documented behaviour, first at allocation %ld: %s", \
                  call, (v).count, (v).first_n, (v).what)

START_TEST(test_fault_create)
{
    const int64_t d = 5;
    const int32_t E = 3, C = 3;
    const confsmoe_gate_params p = fault_params(_i, d, C);
    /* The gate a clean ctx with this seed gives. */
    fx ref;
    fx_init(&ref, 100, E, d, 4);
    fx_gate(&ref, &p);
    int failures = 0;
    violation bad = {0, "", 0};
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "gate_create never succeeded");
        fx f;
        fx_init(&f, 100, E, d, 4);
        const long base = f.a.live;
        confsmoe_gate *g = (confsmoe_gate *)(void *)&f;
        f.a.fail_at = f.a.total + n;
        confsmoe_status st = confsmoe_gate_create(f.ctx, &p, f.ex, E, &g);
        f.a.fail_at = 0;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
            ck_assert_ptr_null(g);
            ck_has(f.ctx, "gate_create");
            ck_has(f.ctx, "out of memory");
            ck_assert_msg(f.a.live == base, "allocation %ld failed: %ld blocks leaked", n, f.a.live - base);
            /* The ctx is usable. */
            ck_assert_int_eq(confsmoe_gate_create(f.ctx, &p, f.ex, E, &g), CONFSMOE_OK);
        }
        ck_assert_ptr_nonnull(g);
        f.g = g;
        ck_assert_int_eq(confsmoe_gate_n_params(g), confsmoe_gate_n_params(ref.g));
        int moved = 0;
        for (int32_t i = 0; i < confsmoe_gate_n_params(g); i++) {
            ck_assert_str_eq(confsmoe_gate_param_name(g, i), confsmoe_gate_param_name(ref.g, i));
            ck_assert(all_zero(confsmoe_gate_grad(g, i)));
            /* A failed create must not move the ctx RNG: the next gate equals a clean ctx's. */
            void *want = tsnap(confsmoe_gate_param(ref.g, i));
            if (!moved && !tsame(confsmoe_gate_param(g, i), want)) {
                moved = 1;
                char msg[120];
                snprintf(msg, sizeof msg, "the next create's %s differs from a clean ctx's (the RNG moved)",
                         confsmoe_gate_param_name(g, i));
                violate(&bad, n, msg);
            }
            free(want);
        }
        fx_free(&f);
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 1);
    fx_free(&ref);
    CK_NO_VIOLATION(bad, "gate_create");
}
END_TEST

/* Forward data shared by the fault tests. */
typedef struct {
    confsmoe_tensor *x, *lab, *y, *topk, *slots, *dy, *dslots, *dx;
} fdata;

static void fdata_open(fx *f, fdata *v, int64_t N, int32_t k, int32_t C, uint64_t seed)
{
    trng r = {seed};
    v->x = mk2(f->ctx, N, f->d);
    fill_uniform(v->x, &r, -1, 1);
    v->lab = mk_labels(f->ctx, N, C, &r);
    v->y = mk2(f->ctx, N, f->d);
    v->topk = mk(f->ctx, CONFSMOE_I32, 2, N, k, 0);
    v->slots = mk(f->ctx, CONFSMOE_F32, 3, N, k, f->d);
    v->dy = mk2(f->ctx, N, f->d);
    fill_uniform(v->dy, &r, -1, 1);
    v->dslots = mk(f->ctx, CONFSMOE_F32, 3, N, k, f->d);
    fill_uniform(v->dslots, &r, -1, 1);
    v->dx = mk2(f->ctx, N, f->d);
}

static void fdata_close(fdata *v)
{
    confsmoe_tensor_destroy(v->x);
    confsmoe_tensor_destroy(v->lab);
    confsmoe_tensor_destroy(v->y);
    confsmoe_tensor_destroy(v->topk);
    confsmoe_tensor_destroy(v->slots);
    confsmoe_tensor_destroy(v->dy);
    confsmoe_tensor_destroy(v->dslots);
    confsmoe_tensor_destroy(v->dx);
}

/* _i: variant 0/1 of fault_params. A training forward fails at its n-th allocation. */
START_TEST(test_fault_forward)
{
    const int64_t N = 7, d = 5;
    const int32_t E = 3, C = 3, k = 2;
    const confsmoe_gate_params p = fault_params(_i, d, C);
    /* A clean run: y, topk, slots, loss and the grads after backward. */
    fx ref;
    fx_init(&ref, 110, E, d, 4);
    fx_gate(&ref, &p);
    fdata rv;
    fdata_open(&ref, &rv, N, k, C, 1100);
    float rloss = 0.0f;
    confsmoe_saved *rs = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(ref.g, rv.x, rv.lab, NULL, rv.y, rv.topk, rv.slots, &rloss, &rs),
                     CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_backward(ref.g, rs, rv.dy, rv.dslots, 1.0f, rv.dx), CONFSMOE_OK);
    confsmoe_saved_destroy(rs);

    int failures = 0;
    violation bad = {0, "", 0};
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "gate_forward never succeeded");
        fx f;
        fx_init(&f, 110, E, d, 4);
        fx_gate(&f, &p);
        fdata v;
        fdata_open(&f, &v, N, k, C, 1100);
        gsnap snap;
        gsnap_take(&f, &snap);
        const long base = f.a.live;
        confsmoe_saved *s = (confsmoe_saved *)(void *)&f;
        float loss = 0.0f;
        f.a.fail_at = f.a.total + n;
        confsmoe_status st = confsmoe_gate_forward(f.g, v.x, v.lab, NULL, v.y, v.topk, v.slots, &loss, &s);
        f.a.fail_at = 0;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
            ck_assert_ptr_null(s);
            ck_has(f.ctx, "gate_forward");
            ck_assert_msg(f.a.live == base, "allocation %ld failed: %ld blocks leaked", n, f.a.live - base);
            gsnap_check(&f, &snap, "failed forward");
            /* The following normal call succeeds. */
            ck_assert_int_eq(confsmoe_gate_forward(f.g, v.x, v.lab, NULL, v.y, v.topk, v.slots, &loss, &s),
                             CONFSMOE_OK);
        }
        gsnap_free(&snap);
        ck_assert_ptr_nonnull(s);
        ck_assert_int_eq(confsmoe_gate_backward(f.g, s, v.dy, v.dslots, 1.0f, v.dx), CONFSMOE_OK);
        confsmoe_saved_destroy(s);
        /* ... with the clean run's results: same noise draw, so the failed call left the RNG alone. */
        int same = tsame(v.y, confsmoe_tensor_data(rv.y)) && tsame(v.topk, confsmoe_tensor_data(rv.topk)) &&
                   tsame(v.slots, confsmoe_tensor_data(rv.slots)) && loss == rloss &&
                   tsame(v.dx, confsmoe_tensor_data(rv.dx));
        for (int32_t i = 0; i < confsmoe_gate_n_params(f.g); i++)
            same = same && tsame(confsmoe_gate_grad(f.g, i), confsmoe_tensor_data(confsmoe_gate_grad(ref.g, i)));
        if (!same)
            violate(&bad, n, "the next forward differs from a clean run's (the ctx RNG moved: another noise draw)");
        fdata_close(&v);
        fx_free(&f);
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 3);
    fdata_close(&rv);
    fx_free(&ref);
    CK_NO_VIOLATION(bad, "gate_forward");
}
END_TEST

/* The same for an inference forward. */
START_TEST(test_fault_forward_inference)
{
    const int64_t N = 6, d = 4;
    const int32_t E = 3, C = 2, k = 2;
    const confsmoe_gate_params p = fault_params(0, d, C);
    fx f;
    fx_init(&f, 115, E, d, 4);
    fx_gate(&f, &p);
    fdata v;
    fdata_open(&f, &v, N, k, C, 1150);
    confsmoe_tensor *yref = mk2(f.ctx, N, d);
    ck_assert_int_eq(confsmoe_gate_forward(f.g, v.x, NULL, NULL, yref, NULL, NULL, NULL, NULL), CONFSMOE_OK);
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "gate_forward never succeeded");
        gsnap snap;
        gsnap_take(&f, &snap);
        const long base = f.a.live;
        f.a.fail_at = f.a.total + n;
        confsmoe_status st = confsmoe_gate_forward(f.g, v.x, NULL, NULL, v.y, v.topk, NULL, NULL, NULL);
        f.a.fail_at = 0;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
            ck_assert_int_eq(f.a.live, base);
            gsnap_check(&f, &snap, "failed inference");
            ck_assert_int_eq(confsmoe_gate_forward(f.g, v.x, NULL, NULL, v.y, v.topk, NULL, NULL, NULL), CONFSMOE_OK);
        }
        gsnap_free(&snap);
        ck_assert(tsame(v.y, confsmoe_tensor_data(yref)));
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 2);
    confsmoe_tensor_destroy(yref);
    fdata_close(&v);
    fx_free(&f);
}
END_TEST

/* A backward fails at its n-th allocation: E_NOMEM, no leak, and (documented: a failed
 * call changes no state) the gradients are untouched and the same handle can be
 * retried, giving the clean run's gradients. */
START_TEST(test_fault_backward)
{
    const int64_t N = 7, d = 5;
    const int32_t E = 3, C = 3, k = 2;
    const confsmoe_gate_params p = fault_params(_i, d, C);
    fx ref;
    fx_init(&ref, 120, E, d, 4);
    fx_gate(&ref, &p);
    fdata rv;
    fdata_open(&ref, &rv, N, k, C, 1200);
    confsmoe_saved *rs = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(ref.g, rv.x, rv.lab, NULL, rv.y, NULL, NULL, NULL, &rs), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_backward(ref.g, rs, rv.dy, rv.dslots, 1.0f, rv.dx), CONFSMOE_OK);
    confsmoe_saved_destroy(rs);

    int failures = 0;
    violation bad = {0, "", 0};
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "gate_backward never succeeded");
        fx f;
        fx_init(&f, 120, E, d, 4);
        fx_gate(&f, &p);
        fdata v;
        fdata_open(&f, &v, N, k, C, 1200);
        confsmoe_saved *s = NULL;
        ck_assert_int_eq(confsmoe_gate_forward(f.g, v.x, v.lab, NULL, v.y, NULL, NULL, NULL, &s), CONFSMOE_OK);
        gsnap snap;
        gsnap_take(&f, &snap);
        const long base = f.a.live;
        f.a.fail_at = f.a.total + n;
        confsmoe_status st = confsmoe_gate_backward(f.g, s, v.dy, v.dslots, 1.0f, v.dx);
        f.a.fail_at = 0;
        int compare = 1;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
            ck_has(f.ctx, "gate_backward");
            ck_assert_msg(f.a.live == base, "allocation %ld failed: %ld blocks leaked", n, f.a.live - base);
            const char *diff = gsnap_diff(&f, &snap);
            if (diff) {
                char msg[160];
                snprintf(msg, sizeof msg, "the failed backward changed %s", diff);
                violate(&bad, n, msg);
            }
            confsmoe_status again = confsmoe_gate_backward(f.g, s, v.dy, v.dslots, 1.0f, v.dx);
            if (again != CONFSMOE_OK) {
                char msg[160];
                snprintf(msg, sizeof msg, "retrying the same handle gives %d (%s)", (int)again,
                         confsmoe_ctx_last_error(f.ctx));
                violate(&bad, n, msg);
                compare = 0;
                /* A following normal call (a fresh forward and backward) still succeeds. */
                confsmoe_saved *s2 = NULL;
                ck_assert_int_eq(confsmoe_gate_forward(f.g, v.x, v.lab, NULL, v.y, NULL, NULL, NULL, &s2),
                                 CONFSMOE_OK);
                ck_assert_int_eq(confsmoe_gate_backward(f.g, s2, v.dy, v.dslots, 1.0f, v.dx), CONFSMOE_OK);
                confsmoe_saved_destroy(s2);
            }
        }
        gsnap_free(&snap);
        confsmoe_saved_destroy(s);
        if (compare) {
            int same = tsame(v.dx, confsmoe_tensor_data(rv.dx));
            for (int32_t i = 0; i < confsmoe_gate_n_params(f.g); i++)
                same = same && tsame(confsmoe_gate_grad(f.g, i), confsmoe_tensor_data(confsmoe_gate_grad(ref.g, i)));
            for (int32_t e = 0; e < E; e++)
                for (int32_t i = 0; i < 4; i++)
                    same = same && tsame(confsmoe_expert_grad(f.ex[e], i),
                                         confsmoe_tensor_data(confsmoe_expert_grad(ref.ex[e], i)));
            if (st == CONFSMOE_OK)
                ck_assert_msg(same, "the clean backward differs from the reference run");
            else if (!same)
                violate(&bad, n, "after the retry the gradients differ from a clean run's");
        }
        fdata_close(&v);
        fx_free(&f);
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 1);
    fdata_close(&rv);
    fx_free(&ref);
    CK_NO_VIOLATION(bad, "gate_backward");
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *gate_suite(void)
{
    Suite *s = suite_create("gate");
    TCase *tc = tcase_create("create");
    tcase_add_test(tc, test_params_init_defaults);
    tcase_add_loop_test(tc, test_create_errors, 0, N_CREATE_CASES);
    tcase_add_test(tc, test_create_null_args);
    tcase_add_test(tc, test_create_accepts);
    suite_add_tcase(s, tc);

    tc = tcase_create("invalid");
    tcase_add_loop_test(tc, test_forward_invalid, 0, N_FWD_CASES);
    tcase_add_test(tc, test_forward_labels_ignored);
    tcase_add_loop_test(tc, test_backward_invalid, 0, N_BWD_CASES);
    tcase_add_test(tc, test_backward_null_gate);
    suite_add_tcase(s, tc);

    tc = tcase_create("params");
    tcase_add_loop_test(tc, test_param_view, 0, 4);
    tcase_add_test(tc, test_param_seed);
    suite_add_tcase(s, tc);

    tc = tcase_create("forward");
    tcase_add_loop_test(tc, test_forward_reference, 0, N_FWD_REF);
    tcase_add_loop_test(tc, test_topk_ties, 0, 12);
    tcase_add_test(tc, test_forward_optional_outputs);
    tcase_add_test(tc, test_noisy_inference_clean);
    suite_add_tcase(s, tc);

    tc = tcase_create("stats");
    tcase_add_loop_test(tc, test_stats_basic, 0, 2);
    tcase_add_test(tc, test_stats_errors);
    tcase_add_test(tc, test_stats_single_expert);
    suite_add_tcase(s, tc);

    tc = tcase_create("interleaved");
    tcase_add_loop_test(tc, test_interleaved, 0, 4);
    tcase_add_test(tc, test_discard_saved);
    suite_add_tcase(s, tc);

    tc = tcase_create("edges");
    tcase_add_loop_test(tc, test_single_token, 0, 3);
    tcase_add_loop_test(tc, test_empty_batch, 0, 2);
    tcase_add_loop_test(tc, test_idle_expert, 0, 3);
    suite_add_tcase(s, tc);

    tc = tcase_create("faults");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_fault_create, 0, 2);
    tcase_add_loop_test(tc, test_fault_forward, 0, 2);
    tcase_add_test(tc, test_fault_forward_inference);
    tcase_add_loop_test(tc, test_fault_backward, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run(gate_suite());
}
