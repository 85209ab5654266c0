/* The optimizer: params, create, add, step (against a double-precision reference), set_lr, failures. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "confsmoe.h"
#include "testutil.h"

#define SENTINEL_O ((confsmoe_optim *)(uintptr_t)0x1234)

static void assert_error_mentions(confsmoe_ctx *ctx, const char *w1, const char *w2)
{
    const char *m = confsmoe_ctx_last_error(ctx);
    ck_assert_ptr_nonnull(m);
    ck_assert_msg(m[0] != '\0', "last_error is empty");
    ck_assert_msg(strstr(m, w1) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w1);
    if (w2)
        ck_assert_msg(strstr(m, w2) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w2);
}

static confsmoe_tensor *new_f32(confsmoe_ctx *ctx, int32_t ndim, const int64_t *dims)
{
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, ndim, dims, &t), CONFSMOE_OK);
    return t;
}

static confsmoe_tensor *new_f32_1d(confsmoe_ctx *ctx, int64_t n)
{
    return new_f32(ctx, 1, &n);
}

static void fill(confsmoe_tensor *t, const float *v)
{
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, v, confsmoe_tensor_nbytes(t)), CONFSMOE_OK);
}

/* ---------------------------------------------------------------- the reference */

/* Hyperparameters written down by the test, in double. */
typedef struct {
    int kind;
    double lr, beta1, beta2, eps, momentum, weight_decay;
} ref_hparams;

#define MAXN 16

/* Double-precision state of one parameter tensor. */
typedef struct {
    int n;
    double p[MAXN], m[MAXN], v[MAXN];
} ref_param;

/* PyTorch's Adam (torch.optim.Adam, amsgrad=False) and SGD (torch.optim.SGD, dampening=0, nesterov=False). */
static void ref_step(const ref_hparams *h, double lr, ref_param *r, const float *g, int t)
{
    for (int i = 0; i < r->n; i++) {
        double gi = (double)g[i] + h->weight_decay * r->p[i];
        if (h->kind == CONFSMOE_OPTIM_ADAM) {
            r->m[i] = h->beta1 * r->m[i] + (1.0 - h->beta1) * gi;
            r->v[i] = h->beta2 * r->v[i] + (1.0 - h->beta2) * gi * gi;
            double m_hat = r->m[i] / (1.0 - pow(h->beta1, t));
            double v_hat = r->v[i] / (1.0 - pow(h->beta2, t));
            r->p[i] -= lr * m_hat / (sqrt(v_hat) + h->eps);
        } else {
            if (h->momentum != 0.0) {
                /* The first step sets buf = g; later ones buf = mu buf + g. */
                r->m[i] = t == 1 ? gi : h->momentum * r->m[i] + gi;
                gi = r->m[i];
            }
            r->p[i] -= lr * gi;
        }
    }
}

/* |got - want| <= 1e-5 |want| elementwise. On a mismatch, returns 0 with the first one described in msg. */
static int check_close(const confsmoe_tensor *t, const ref_param *r, const char *what, int step, char *msg,
                       size_t cap)
{
    float got[MAXN];
    if (confsmoe_tensor_numel(t) != r->n ||
        confsmoe_tensor_copy_out(t, got, (size_t)r->n * sizeof(float)) != CONFSMOE_OK) {
        snprintf(msg, cap, "%s: cannot read the tensor", what);
        return 0;
    }
    for (int i = 0; i < r->n; i++) {
        double want = r->p[i], err = fabs((double)got[i] - want);
        if (!(err <= 1e-5 * fabs(want) + 1e-9)) {
            snprintf(msg, cap, "%s, step %d, element %d: got %.9g, expected %.9g (error %.3g)", what, step, i,
                     (double)got[i], want, err);
            return 0;
        }
    }
    return 1;
}

static void assert_close(const confsmoe_tensor *t, const ref_param *r, const char *what, int step)
{
    char msg[256];
    ck_assert_msg(check_close(t, r, what, step, msg, sizeof msg), "%s", msg);
}

/* Deterministic, varying gradients; `tiny` spreads their magnitudes over 1 .. 1e-5. */
static void make_grad(float *g, int n, int which, int step, int tiny)
{
    for (int i = 0; i < n; i++) {
        double v = sin(0.9 * i + 1.7 * step + 0.45 * which) * (1.0 + 0.25 * step);
        if (tiny)
            v *= pow(10.0, -(i % 6));
        g[i] = (float)v;
    }
}

/* Initial parameters, away from zero so that a relative tolerance means something. */
static void make_param(float *p, int n, int which)
{
    for (int i = 0; i < n; i++)
        p[i] = (float)(((i + which) % 2 ? -1.0 : 1.0) * (0.4 + 0.07 * i + 0.1 * which));
}

/* Two parameters, [3, 4] and [5], trained for `steps` steps by an optimizer created with
 * `create_with` (NULL: defaults), compared after every step with the reference run with `h`.
 * lr_at (optional) gives the lr set with set_lr before each step. */
static void run_against_reference(const confsmoe_optim_params *create_with, const ref_hparams *h, int steps,
                                  int tiny, const float *lr_at)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t d0[2] = {3, 4}, d1[1] = {5};
    confsmoe_tensor *p[2] = {new_f32(ctx, 2, d0), new_f32(ctx, 1, d1)};
    confsmoe_tensor *g[2] = {new_f32(ctx, 2, d0), new_f32(ctx, 1, d1)};
    ref_param ref[2];
    memset(ref, 0, sizeof ref);
    ref[0].n = 12;
    ref[1].n = 5;
    for (int k = 0; k < 2; k++) {
        float init[MAXN];
        make_param(init, ref[k].n, k);
        fill(p[k], init);
        for (int i = 0; i < ref[k].n; i++)
            ref[k].p[i] = init[i];
    }
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, create_with, &o), CONFSMOE_OK);
    for (int k = 0; k < 2; k++)
        ck_assert_int_eq(confsmoe_optim_add(o, p[k], g[k]), CONFSMOE_OK);

    double lr = h->lr;
    for (int t = 1; t <= steps; t++) {
        if (lr_at) {
            ck_assert_int_eq(confsmoe_optim_set_lr(o, lr_at[t - 1]), CONFSMOE_OK);
            lr = (double)lr_at[t - 1];
        }
        for (int k = 0; k < 2; k++) {
            float gv[MAXN];
            make_grad(gv, ref[k].n, k, t, tiny);
            fill(g[k], gv);
            ref_step(h, lr, &ref[k], gv, t);
        }
        ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
        assert_close(p[0], &ref[0], "param 0", t);
        assert_close(p[1], &ref[1], "param 1", t);
    }
    /* The run moved every parameter (so the comparison was not of two no-ops). */
    for (int k = 0; k < 2; k++) {
        float init[MAXN], now[MAXN];
        make_param(init, ref[k].n, k);
        ck_assert_int_eq(confsmoe_tensor_copy_out(p[k], now, (size_t)ref[k].n * sizeof(float)), CONFSMOE_OK);
        for (int i = 0; i < ref[k].n; i++)
            ck_assert_msg(now[i] != init[i], "param %d element %d did not move", k, i);
    }
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    confsmoe_optim_destroy(o);
    for (int k = 0; k < 2; k++) {
        confsmoe_tensor_destroy(p[k]);
        confsmoe_tensor_destroy(g[k]);
    }
    confsmoe_ctx_destroy(ctx);
}

/* The documented defaults, written down here. */
static const ref_hparams default_adam = {CONFSMOE_OPTIM_ADAM, 3e-4f, 0.9f, 0.999f, 1e-8f, 0.0, 0.0};

static confsmoe_optim_params make_params(int kind, float lr, float b1, float b2, float eps, float mom, float wd)
{
    confsmoe_optim_params p;
    confsmoe_optim_params_init(&p);
    p.kind = kind;
    p.lr = lr;
    p.beta1 = b1;
    p.beta2 = b2;
    p.eps = eps;
    p.momentum = mom;
    p.weight_decay = wd;
    return p;
}

static ref_hparams to_ref(const confsmoe_optim_params *p)
{
    /* Only copies the test's own choices into doubles (make_params set every field). */
    ref_hparams h = {p->kind, p->lr, p->beta1, p->beta2, p->eps, p->momentum, p->weight_decay};
    return h;
}

/* ---------------------------------------------------------------- params */

START_TEST(test_params_init_defaults)
{
    confsmoe_optim_params p;
    memset(&p, 0xA5, sizeof p);
    confsmoe_optim_params_init(&p);
    ck_assert_uint_eq(p.struct_size, sizeof(confsmoe_optim_params));
    ck_assert_int_eq(p.kind, CONFSMOE_OPTIM_ADAM);
    ck_assert_float_eq(p.lr, 3e-4f);
    ck_assert_float_eq(p.beta1, 0.9f);
    ck_assert_float_eq(p.beta2, 0.999f);
    ck_assert_float_eq(p.eps, 1e-8f);
    ck_assert_float_eq(p.momentum, 0.0f);
    ck_assert_float_eq(p.weight_decay, 0.0f);
    confsmoe_optim_params_init(NULL);
}
END_TEST

START_TEST(test_sizeof_optim_params)
{
    ck_assert_uint_eq(confsmoe_sizeof_optim_params(), sizeof(confsmoe_optim_params));
}
END_TEST

START_TEST(test_kind_values)
{
    ck_assert_int_eq(CONFSMOE_OPTIM_ADAM, 0);
    ck_assert_int_eq(CONFSMOE_OPTIM_SGD, 1);
}
END_TEST

/* ---------------------------------------------------------------- create */

START_TEST(test_create_null_params_is_default_adam)
{
    /* NULL params train exactly like Adam with lr 3e-4, betas 0.9/0.999, eps 1e-8. */
    run_against_reference(NULL, &default_adam, 5, 0, NULL);
}
END_TEST

START_TEST(test_create_init_params)
{
    confsmoe_optim_params p;
    confsmoe_optim_params_init(&p);
    run_against_reference(&p, &default_adam, 3, 0, NULL);
}
END_TEST

START_TEST(test_create_null_ctx)
{
    /* The header: "on failure the out-pointer is set to NULL". */
    confsmoe_optim *o = SENTINEL_O;
    ck_assert_int_eq(confsmoe_optim_create(NULL, NULL, &o), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(o);
}
END_TEST

START_TEST(test_create_null_out)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_create", "out");
    ck_assert_int_eq(a.total, total);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Creating with p fails with `status`, writes NULL, allocates nothing and names `word`. */
static void assert_create_fails(const confsmoe_optim_params *p, confsmoe_status status, const char *word)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    confsmoe_optim *o = SENTINEL_O;
    ck_assert_int_eq(confsmoe_optim_create(ctx, p, &o), status);
    ck_assert_ptr_null(o);
    ck_assert_int_eq(a.total, total);
    assert_error_mentions(ctx, "optim_create", word);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}

START_TEST(test_create_bad_struct_size)
{
    /* Below the first release's size, or above the 64 KiB limit (not read: p is smaller). */
    const size_t bad[] = {0, sizeof(confsmoe_optim_params) - 4, (size_t)65536 + 4, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.struct_size = bad[i];
        assert_create_fails(&p, CONFSMOE_E_VERSION, "struct_size");
    }
}
END_TEST

START_TEST(test_create_bad_kind)
{
    const confsmoe_optim_kind bad[] = {2, -1, 100, INT32_MIN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.kind = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "kind");
    }
}
END_TEST

START_TEST(test_create_bad_lr)
{
    const float bad[] = {-1e-3f, -1.0f, NAN, INFINITY, -INFINITY};
    const int kinds[] = {CONFSMOE_OPTIM_ADAM, CONFSMOE_OPTIM_SGD};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            confsmoe_optim_params p;
            confsmoe_optim_params_init(&p);
            p.kind = kinds[k];
            p.lr = bad[i];
            assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "lr");
        }
}
END_TEST

START_TEST(test_create_bad_betas)
{
    const float bad[] = {1.0f, 1.5f, -0.1f, NAN, INFINITY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.beta1 = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "beta1");
        confsmoe_optim_params_init(&p);
        p.beta2 = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "beta2");
    }
}
END_TEST

START_TEST(test_create_bad_eps)
{
    const float bad[] = {0.0f, -0.0f, -1e-8f, NAN, INFINITY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.eps = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "eps");
    }
}
END_TEST

START_TEST(test_create_bad_momentum)
{
    const float bad[] = {-0.1f, 1.0f, 2.0f, NAN, INFINITY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.kind = CONFSMOE_OPTIM_SGD;
        p.momentum = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "momentum");
    }
}
END_TEST

START_TEST(test_create_bad_weight_decay)
{
    const float bad[] = {-0.01f, NAN, INFINITY};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_optim_params p;
        confsmoe_optim_params_init(&p);
        p.weight_decay = bad[i];
        assert_create_fails(&p, CONFSMOE_E_INVALID_ARGUMENT, "weight_decay");
    }
}
END_TEST

START_TEST(test_create_edge_values_accepted)
{
    /* The closed ends of the ranges are valid: lr 0, betas 0, momentum 0. */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.0f, 0.0f, 0.0f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_ptr_nonnull(o);
    /* lr 0: a step changes nothing. */
    confsmoe_tensor *w = new_f32_1d(ctx, 3), *g = new_f32_1d(ctx, 3);
    const float wv[3] = {1, 2, 3}, gv[3] = {0.5f, -0.5f, 2};
    fill(w, wv);
    fill(g, gv);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    const float *now = confsmoe_tensor_data(w);
    for (int i = 0; i < 3; i++)
        ck_assert_float_eq(now[i], wv[i]);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_destroy_null)
{
    confsmoe_optim_destroy(NULL);
    /* And an optimizer with nothing registered is destroyed without leaks. */
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live;
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    ck_assert_int_gt(a.live, live);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    confsmoe_optim_destroy(o);
    ck_assert_int_eq(a.live, live);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- add */

START_TEST(test_add_null)
{
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w = new_f32_1d(ctx, 4), *g = new_f32_1d(ctx, 4);
    ck_assert_int_eq(confsmoe_optim_add(NULL, w, g), CONFSMOE_E_INVALID_ARGUMENT);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, NULL, g), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_add", "param");
    ck_assert_int_eq(confsmoe_optim_add(o, w, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_add", "grad");
    ck_assert_int_eq(confsmoe_optim_add(o, NULL, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_add", "NULL");
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* add(param, grad) fails with status naming `word`, allocates nothing, and registers nothing:
 * a later step leaves param untouched. */
static void assert_add_fails(int32_t p_dtype, int32_t p_ndim, const int64_t *p_dims, int32_t g_dtype,
                             int32_t g_ndim, const int64_t *g_dims, confsmoe_status status, const char *word)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    confsmoe_tensor *w = NULL, *g = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, p_dtype, p_ndim, p_dims, &w), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(ctx, g_dtype, g_ndim, g_dims, &g), CONFSMOE_OK);
    memset(confsmoe_tensor_data(w), 0x3F, confsmoe_tensor_nbytes(w));
    memset(confsmoe_tensor_data(g), 0x3F, confsmoe_tensor_nbytes(g));
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    const long live = a.live, total = a.total;
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), status);
    ck_assert_int_eq(a.live, live);
    ck_assert_int_eq(a.total, total);
    assert_error_mentions(ctx, "optim_add", word);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    const unsigned char *bytes = confsmoe_tensor_data(w);
    for (size_t i = 0; i < confsmoe_tensor_nbytes(w); i++)
        ck_assert_uint_eq(bytes[i], 0x3F);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}

START_TEST(test_add_shape_mismatch)
{
    const int64_t d23[2] = {2, 3}, d32[2] = {3, 2}, d24[2] = {2, 4}, d6[1] = {6}, d123[3] = {1, 2, 3};
    assert_add_fails(CONFSMOE_F32, 2, d23, CONFSMOE_F32, 2, d32, CONFSMOE_E_SHAPE, "shape");
    assert_add_fails(CONFSMOE_F32, 2, d23, CONFSMOE_F32, 2, d24, CONFSMOE_E_SHAPE, "grad");
    assert_add_fails(CONFSMOE_F32, 2, d23, CONFSMOE_F32, 1, d6, CONFSMOE_E_SHAPE, "grad");
    assert_add_fails(CONFSMOE_F32, 1, d6, CONFSMOE_F32, 2, d23, CONFSMOE_E_SHAPE, "grad");
    assert_add_fails(CONFSMOE_F32, 2, d23, CONFSMOE_F32, 3, d123, CONFSMOE_E_SHAPE, "grad");
}
END_TEST

START_TEST(test_add_dtype_mismatch)
{
    const int64_t d4[1] = {4};
    assert_add_fails(CONFSMOE_F32, 1, d4, CONFSMOE_I32, 1, d4, CONFSMOE_E_DTYPE, "grad");
    assert_add_fails(CONFSMOE_F32, 1, d4, CONFSMOE_U8, 1, d4, CONFSMOE_E_DTYPE, "grad");
    assert_add_fails(CONFSMOE_I32, 1, d4, CONFSMOE_F32, 1, d4, CONFSMOE_E_DTYPE, "param");
    assert_add_fails(CONFSMOE_U8, 1, d4, CONFSMOE_U8, 1, d4, CONFSMOE_E_DTYPE, "param");
}
END_TEST

START_TEST(test_add_duplicate_rejected)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    confsmoe_tensor *w = new_f32_1d(ctx, 3), *g = new_f32_1d(ctx, 3), *g2 = new_f32_1d(ctx, 3);
    const float wv[3] = {1.0f, -2.0f, 0.5f}, gv[3] = {0.25f, 0.5f, -1.0f}, g2v[3] = {100, 100, 100};
    fill(w, wv);
    fill(g, gv);
    fill(g2, g2v);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.1f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    const long live = a.live, total = a.total;
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_add", "already");
    ck_assert_int_eq(confsmoe_optim_add(o, w, g2), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "optim_add", "already");
    ck_assert_int_eq(a.live, live);
    ck_assert_int_eq(a.total, total);
    /* One step updates w once, from g: w - 0.1 g. */
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    const float *now = confsmoe_tensor_data(w);
    const double want[3] = {1.0 - 0.1 * 0.25, -2.0 - 0.1 * 0.5, 0.5 + 0.1 * 1.0};
    for (int i = 0; i < 3; i++)
        ck_assert_double_eq_tol((double)now[i], want[i], 1e-6);
    /* The same gradient may serve two parameters: only the parameter must be unique. */
    confsmoe_tensor *w2 = new_f32_1d(ctx, 3);
    ck_assert_int_eq(confsmoe_optim_add(o, w2, g), CONFSMOE_OK);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(w2);
    confsmoe_tensor_destroy(g);
    confsmoe_tensor_destroy(g2);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_add_many_and_empty)
{
    /* More parameters than any small initial capacity, and an empty one. */
    enum { N = 40 };
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w[N], *g[N];
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    for (int k = 0; k < N; k++) {
        w[k] = new_f32_1d(ctx, 2);
        g[k] = new_f32_1d(ctx, 2);
        const float wv[2] = {(float)k, -(float)k}, gv[2] = {1.0f + (float)k, 2.0f};
        fill(w[k], wv);
        fill(g[k], gv);
        ck_assert_int_eq(confsmoe_optim_add(o, w[k], g[k]), CONFSMOE_OK);
    }
    confsmoe_tensor *we = new_f32_1d(ctx, 0), *ge = new_f32_1d(ctx, 0);
    ck_assert_int_eq(confsmoe_optim_add(o, we, ge), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    for (int k = 0; k < N; k++) {
        const float *now = confsmoe_tensor_data(w[k]);
        ck_assert_double_eq_tol((double)now[0], k - 0.5 * (1.0 + k), 1e-5);
        ck_assert_double_eq_tol((double)now[1], -k - 0.5 * 2.0, 1e-5);
    }
    confsmoe_optim_destroy(o);
    for (int k = 0; k < N; k++) {
        confsmoe_tensor_destroy(w[k]);
        confsmoe_tensor_destroy(g[k]);
    }
    confsmoe_tensor_destroy(we);
    confsmoe_tensor_destroy(ge);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- step */

START_TEST(test_step_null)
{
    ck_assert_int_eq(confsmoe_optim_step(NULL), CONFSMOE_E_INVALID_ARGUMENT);
}
END_TEST

START_TEST(test_adam_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_adam_weight_decay_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.1f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_adam_custom_betas_eps_matches_reference)
{
    /* Gradients down to 1e-5 against eps 1e-4: where eps sits in the formula shows. */
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.02f, 0.8f, 0.95f, 1e-4f, 0.0f, 0.05f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 1, NULL);
}
END_TEST

START_TEST(test_adam_default_eps_tiny_grads_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 1, NULL);
}
END_TEST

START_TEST(test_sgd_plain_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.05f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_sgd_momentum_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.05f, 0.9f, 0.999f, 1e-8f, 0.9f, 0.0f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_sgd_weight_decay_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.05f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.2f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_sgd_momentum_weight_decay_matches_reference)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.05f, 0.9f, 0.999f, 1e-8f, 0.5f, 0.2f);
    ref_hparams h = to_ref(&p);
    run_against_reference(&p, &h, 5, 0, NULL);
}
END_TEST

START_TEST(test_sgd_first_steps_by_hand)
{
    /* Two momentum steps worked out by hand: w=1, g=2 then g=1, lr=0.1, mu=0.5.
     * Step 1: buf = 2, w = 1 - 0.2 = 0.8. Step 2: buf = 0.5*2 + 1 = 2, w = 0.8 - 0.2 = 0.6. */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w = new_f32_1d(ctx, 1), *g = new_f32_1d(ctx, 1);
    const float one = 1.0f, two = 2.0f;
    fill(w, &one);
    fill(g, &two);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.1f, 0.9f, 0.999f, 1e-8f, 0.5f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_double_eq_tol((double)*(float *)confsmoe_tensor_data(w), 0.8, 1e-6);
    fill(g, &one);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_double_eq_tol((double)*(float *)confsmoe_tensor_data(w), 0.6, 1e-6);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_adam_first_step_by_hand)
{
    /* At t=1 bias correction makes m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps),
     * whatever the betas: w = 1 - 0.1 * 3 / (3 + 1e-8) ~= 0.9, and for g = -1e-4, where eps
     * matters, w = 1 + 0.1 * 1e-4 / (1e-4 + 1e-8) = 1.09999000... */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w = new_f32_1d(ctx, 2), *g = new_f32_1d(ctx, 2);
    const float wv[2] = {1.0f, 1.0f}, gv[2] = {3.0f, -1e-4f};
    fill(w, wv);
    fill(g, gv);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.1f, 0.5f, 0.6f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    const float *now = confsmoe_tensor_data(w);
    ck_assert_double_eq_tol((double)now[0], 1.0 - 0.1 * 3.0 / (3.0 + 1e-8), 1e-6);
    ck_assert_double_eq_tol((double)now[1], 1.0 + 0.1 * 1e-4 / (1e-4 + 1e-8), 1e-6);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_step_allocates_nothing)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    confsmoe_tensor *w = new_f32_1d(ctx, 8), *g = new_f32_1d(ctx, 8);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    const long total = a.total, live = a.live;
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_int_eq(a.total, total);
    ck_assert_int_eq(a.live, live);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_adam_late_registration_matches_reference)
{
    /* torch.optim.Adam keeps the step count per parameter: one registered after two steps
     * starts its bias correction at t = 1, like its zeroed moments. */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w[2] = {new_f32_1d(ctx, 6), new_f32_1d(ctx, 4)};
    confsmoe_tensor *g[2] = {new_f32_1d(ctx, 6), new_f32_1d(ctx, 4)};
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    ref_param ref[2];
    memset(ref, 0, sizeof ref);
    ref[0].n = 6;
    ref[1].n = 4;
    for (int k = 0; k < 2; k++) {
        float init[MAXN];
        make_param(init, ref[k].n, k);
        fill(w[k], init);
        for (int i = 0; i < ref[k].n; i++)
            ref[k].p[i] = init[i];
    }
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w[0], g[0]), CONFSMOE_OK);
    /* Mismatches are collected and reported after the cleanup, so that a failure here
     * does not also show up as a leak under valgrind (CK_FORK=no). */
    int ok = 1;
    char msg[256] = "";
    for (int t = 1; t <= 5 && ok; t++) {
        if (t == 3)
            ck_assert_int_eq(confsmoe_optim_add(o, w[1], g[1]), CONFSMOE_OK);
        for (int k = 0; k < 2; k++) {
            if (k == 1 && t < 3)
                continue;
            float gv[MAXN];
            make_grad(gv, ref[k].n, k, t, 0);
            fill(g[k], gv);
            ref_step(&h, h.lr, &ref[k], gv, k == 0 ? t : t - 2);
        }
        ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
        ok = check_close(w[0], &ref[0], "param registered first", t, msg, sizeof msg);
        if (ok && t >= 3)
            ok = check_close(w[1], &ref[1], "param registered after two steps", t, msg, sizeof msg);
    }
    confsmoe_optim_destroy(o);
    for (int k = 0; k < 2; k++) {
        confsmoe_tensor_destroy(w[k]);
        confsmoe_tensor_destroy(g[k]);
    }
    confsmoe_ctx_destroy(ctx);
    ck_assert_msg(ok, "%s", msg);
}
END_TEST

/* ---------------------------------------------------------------- set_lr */

START_TEST(test_set_lr_sgd_changes_step)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.05f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    const float lrs[5] = {0.05f, 0.5f, 0.5f, 0.0f, 0.125f};
    run_against_reference(&p, &h, 5, 0, lrs);
}
END_TEST

START_TEST(test_set_lr_adam_changes_step)
{
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_ADAM, 0.01f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ref_hparams h = to_ref(&p);
    const float lrs[5] = {0.01f, 0.03f, 0.001f, 0.02f, 0.02f};
    run_against_reference(&p, &h, 5, 0, lrs);
}
END_TEST

START_TEST(test_set_lr_by_hand)
{
    /* SGD, g = 1: a step moves w by exactly lr. */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w = new_f32_1d(ctx, 1), *g = new_f32_1d(ctx, 1);
    const float zero = 0.0f, one = 1.0f;
    fill(w, &zero);
    fill(g, &one);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.25f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    const float *now = confsmoe_tensor_data(w);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_float_eq(*now, -0.25f);
    ck_assert_int_eq(confsmoe_optim_set_lr(o, 0.5f), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_float_eq(*now, -0.75f);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_set_lr_invalid)
{
    ck_assert_int_eq(confsmoe_optim_set_lr(NULL, 0.1f), CONFSMOE_E_INVALID_ARGUMENT);
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w = new_f32_1d(ctx, 1), *g = new_f32_1d(ctx, 1);
    const float zero = 0.0f, one = 1.0f;
    fill(w, &zero);
    fill(g, &one);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.25f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    const float bad[] = {-0.1f, -INFINITY, INFINITY, NAN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_int_eq(confsmoe_optim_set_lr(o, bad[i]), CONFSMOE_E_INVALID_ARGUMENT);
        assert_error_mentions(ctx, "optim_set_lr", "lr");
    }
    /* The rejected values left lr at 0.25. */
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_float_eq(*(float *)confsmoe_tensor_data(w), -0.25f);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- non-finite gradients */

/* Adam on w0 [4] and w1 [3]; grad 1 gets `bad` at index 1 before the second step. */
static void nonfinite_grad_case(int kind, float bad, const char *word)
{
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *w[2] = {new_f32_1d(ctx, 4), new_f32_1d(ctx, 3)};
    confsmoe_tensor *g[2] = {new_f32_1d(ctx, 4), new_f32_1d(ctx, 3)};
    confsmoe_optim_params p = make_params(kind, 0.01f, 0.9f, 0.999f, 1e-8f, kind == CONFSMOE_OPTIM_SGD ? 0.9f : 0.0f,
                                          0.01f);
    ref_hparams h = to_ref(&p);
    ref_param ref[2];
    memset(ref, 0, sizeof ref);
    ref[0].n = 4;
    ref[1].n = 3;
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    for (int k = 0; k < 2; k++) {
        float init[MAXN];
        make_param(init, ref[k].n, k);
        fill(w[k], init);
        for (int i = 0; i < ref[k].n; i++)
            ref[k].p[i] = init[i];
        ck_assert_int_eq(confsmoe_optim_add(o, w[k], g[k]), CONFSMOE_OK);
    }
    /* Step 1 is normal. */
    for (int k = 0; k < 2; k++) {
        float gv[MAXN];
        make_grad(gv, ref[k].n, k, 1, 0);
        fill(g[k], gv);
        ref_step(&h, h.lr, &ref[k], gv, 1);
    }
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);

    /* Step 2 has a bad value in the second gradient: rejected, and the first parameter,
     * though its gradient is fine, is not touched either. */
    float before[2][MAXN];
    for (int k = 0; k < 2; k++) {
        ck_assert_int_eq(confsmoe_tensor_copy_out(w[k], before[k], (size_t)ref[k].n * sizeof(float)), CONFSMOE_OK);
        float gv[MAXN];
        make_grad(gv, ref[k].n, k, 2, 0);
        if (k == 1)
            gv[1] = bad;
        fill(g[k], gv);
    }
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_E_NUMERIC);
    assert_error_mentions(ctx, "optim_step", word);
    for (int k = 0; k < 2; k++) {
        float now[MAXN];
        ck_assert_int_eq(confsmoe_tensor_copy_out(w[k], now, (size_t)ref[k].n * sizeof(float)), CONFSMOE_OK);
        ck_assert_msg(memcmp(now, before[k], (size_t)ref[k].n * sizeof(float)) == 0,
                      "parameter %d changed in a rejected step", k);
    }

    /* With the gradient fixed, training continues as if the bad step never happened:
     * same step count (bias correction) and same moments. */
    for (int t = 2; t <= 4; t++) {
        for (int k = 0; k < 2; k++) {
            float gv[MAXN];
            make_grad(gv, ref[k].n, k, t, 0);
            fill(g[k], gv);
            ref_step(&h, h.lr, &ref[k], gv, t);
        }
        ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
        assert_close(w[0], &ref[0], "param 0 after recovery", t);
        assert_close(w[1], &ref[1], "param 1 after recovery", t);
    }
    confsmoe_optim_destroy(o);
    for (int k = 0; k < 2; k++) {
        confsmoe_tensor_destroy(w[k]);
        confsmoe_tensor_destroy(g[k]);
    }
    confsmoe_ctx_destroy(ctx);
}

START_TEST(test_adam_nan_grad_rejected)
{
    nonfinite_grad_case(CONFSMOE_OPTIM_ADAM, NAN, "NaN");
}
END_TEST

START_TEST(test_adam_inf_grad_rejected)
{
    nonfinite_grad_case(CONFSMOE_OPTIM_ADAM, -INFINITY, "Inf");
}
END_TEST

START_TEST(test_sgd_nan_grad_rejected)
{
    nonfinite_grad_case(CONFSMOE_OPTIM_SGD, NAN, "NaN");
}
END_TEST

START_TEST(test_nan_grad_checks_off_propagates)
{
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.check_finite = 0;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&cp, &ctx), CONFSMOE_OK);
    confsmoe_tensor *w = new_f32_1d(ctx, 3), *g = new_f32_1d(ctx, 3);
    const float wv[3] = {1, 1, 1}, gv[3] = {1, NAN, -1};
    fill(w, wv);
    fill(g, gv);
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    const float *now = confsmoe_tensor_data(w);
    ck_assert_float_eq(now[0], 0.5f);
    ck_assert(isnan(now[1]));
    ck_assert_float_eq(now[2], 1.5f);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- fault injection */

START_TEST(test_create_nomem)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live;
    a.fail_at = a.total + 1;
    confsmoe_optim *o = SENTINEL_O;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(o);
    ck_assert_int_eq(a.live, live);
    assert_error_mentions(ctx, "optim_create", "memory");
    /* Memory back: create and train. */
    a.fail_at = 0;
    confsmoe_optim_params p = make_params(CONFSMOE_OPTIM_SGD, 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
    ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
    confsmoe_tensor *w = new_f32_1d(ctx, 1), *g = new_f32_1d(ctx, 1);
    const float one = 1.0f;
    fill(g, &one);
    ck_assert_int_eq(confsmoe_optim_add(o, w, g), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    ck_assert_float_eq(*(float *)confsmoe_tensor_data(w), -0.5f);
    confsmoe_optim_destroy(o);
    confsmoe_tensor_destroy(w);
    confsmoe_tensor_destroy(g);
    ck_assert_int_eq(a.live, live);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* One step with g = 1 and lr 0.5, from w = 0: a registered w moves by about lr (SGD: exactly
 * -0.5; Adam: about -0.5), an unregistered one stays 0, and one registered twice would move
 * about twice as far. Checks that exactly the first `n` of ws are registered, once each. */
static void assert_trained_once(confsmoe_optim *o, confsmoe_tensor **ws, int n, int n_total)
{
    for (int k = 0; k < n_total; k++)
        memset(confsmoe_tensor_data(ws[k]), 0, confsmoe_tensor_nbytes(ws[k]));
    ck_assert_int_eq(confsmoe_optim_step(o), CONFSMOE_OK);
    for (int k = 0; k < n_total; k++) {
        const float *v = confsmoe_tensor_data(ws[k]);
        for (int64_t i = 0; i < confsmoe_tensor_numel(ws[k]); i++)
            ck_assert_msg(k < n ? (v[i] > -0.75f && v[i] < -0.25f) : v[i] == 0.0f,
                          "param %d element %d is %g after one step", k, (int)i, (double)v[i]);
    }
}

/* Registers `before` parameters, then fails each allocation of the next add in turn. */
static void add_nomem_case(int kind, int before)
{
    enum { MAXP = 24 };
    for (long k = 1;; k++) {
        test_alloc a = {0, 0, 0};
        confsmoe_allocator holder;
        confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
        const long live_ctx = a.live;
        confsmoe_optim_params p = make_params(kind, 0.5f, 0.9f, 0.999f, 1e-8f, 0.0f, 0.0f);
        confsmoe_optim *o = NULL;
        ck_assert_int_eq(confsmoe_optim_create(ctx, &p, &o), CONFSMOE_OK);
        confsmoe_tensor *w[MAXP], *g = new_f32_1d(ctx, 3);
        const float ones[3] = {1, 1, 1};
        fill(g, ones);
        for (int i = 0; i <= before; i++)
            w[i] = new_f32_1d(ctx, 3);
        for (int i = 0; i < before; i++)
            ck_assert_int_eq(confsmoe_optim_add(o, w[i], g), CONFSMOE_OK);

        const long live = a.live, total = a.total;
        a.fail_at = total + k;
        confsmoe_status s = confsmoe_optim_add(o, w[before], g);
        const int injected = a.total >= a.fail_at;
        a.fail_at = 0;
        if (!injected) {
            /* k is past the last allocation of add: every one of them has been failed. */
            ck_assert_int_eq(s, CONFSMOE_OK);
            ck_assert_int_gt(k, 1);
        } else {
            ck_assert_int_eq(s, CONFSMOE_E_NOMEM);
            assert_error_mentions(ctx, "optim_add", "memory");
            if (before > 0)
                /* Nothing of the failed add remains. (For the very first add, the
                 * library may keep the registry it grew; destroy releases it below.) */
                ck_assert_int_eq(a.live, live);
            /* The optimizer still works: the earlier parameters train, the failed one does not. */
            assert_trained_once(o, w, before, before + 1);
            /* And the same add succeeds once memory is back. */
            ck_assert_int_eq(confsmoe_optim_add(o, w[before], g), CONFSMOE_OK);
            assert_trained_once(o, w, before + 1, before + 1);
        }
        confsmoe_optim_destroy(o);
        for (int i = 0; i <= before; i++)
            confsmoe_tensor_destroy(w[i]);
        confsmoe_tensor_destroy(g);
        ck_assert_int_eq(a.live, live_ctx);
        confsmoe_ctx_destroy(ctx);
        ck_assert_int_eq(a.live, 0);
        if (!injected)
            break;
        ck_assert_int_lt(k, 10);
    }
}

START_TEST(test_add_nomem_adam_first)
{
    add_nomem_case(CONFSMOE_OPTIM_ADAM, 0);
}
END_TEST

START_TEST(test_add_nomem_adam_second)
{
    add_nomem_case(CONFSMOE_OPTIM_ADAM, 1);
}
END_TEST

START_TEST(test_add_nomem_adam_growth)
{
    /* Past the first 16: covers a registry that grows. */
    add_nomem_case(CONFSMOE_OPTIM_ADAM, 16);
}
END_TEST

START_TEST(test_add_nomem_sgd)
{
    add_nomem_case(CONFSMOE_OPTIM_SGD, 0);
    add_nomem_case(CONFSMOE_OPTIM_SGD, 1);
    add_nomem_case(CONFSMOE_OPTIM_SGD, 16);
}
END_TEST

static Suite *optim_suite(void)
{
    Suite *s = suite_create("optim");
    TCase *tp = tcase_create("params");
    tcase_add_test(tp, test_params_init_defaults);
    tcase_add_test(tp, test_sizeof_optim_params);
    tcase_add_test(tp, test_kind_values);
    suite_add_tcase(s, tp);

    TCase *tc = tcase_create("create");
    tcase_add_test(tc, test_create_null_params_is_default_adam);
    tcase_add_test(tc, test_create_init_params);
    tcase_add_test(tc, test_create_null_ctx);
    tcase_add_test(tc, test_create_null_out);
    tcase_add_test(tc, test_create_bad_struct_size);
    tcase_add_test(tc, test_create_bad_kind);
    tcase_add_test(tc, test_create_bad_lr);
    tcase_add_test(tc, test_create_bad_betas);
    tcase_add_test(tc, test_create_bad_eps);
    tcase_add_test(tc, test_create_bad_momentum);
    tcase_add_test(tc, test_create_bad_weight_decay);
    tcase_add_test(tc, test_create_edge_values_accepted);
    tcase_add_test(tc, test_destroy_null);
    suite_add_tcase(s, tc);

    TCase *ta = tcase_create("add");
    tcase_add_test(ta, test_add_null);
    tcase_add_test(ta, test_add_shape_mismatch);
    tcase_add_test(ta, test_add_dtype_mismatch);
    tcase_add_test(ta, test_add_duplicate_rejected);
    tcase_add_test(ta, test_add_many_and_empty);
    suite_add_tcase(s, ta);

    TCase *ts = tcase_create("step");
    tcase_add_test(ts, test_step_null);
    tcase_add_test(ts, test_adam_matches_reference);
    tcase_add_test(ts, test_adam_weight_decay_matches_reference);
    tcase_add_test(ts, test_adam_custom_betas_eps_matches_reference);
    tcase_add_test(ts, test_adam_default_eps_tiny_grads_matches_reference);
    tcase_add_test(ts, test_sgd_plain_matches_reference);
    tcase_add_test(ts, test_sgd_momentum_matches_reference);
    tcase_add_test(ts, test_sgd_weight_decay_matches_reference);
    tcase_add_test(ts, test_sgd_momentum_weight_decay_matches_reference);
    tcase_add_test(ts, test_adam_late_registration_matches_reference);
    tcase_add_test(ts, test_sgd_first_steps_by_hand);
    tcase_add_test(ts, test_adam_first_step_by_hand);
    tcase_add_test(ts, test_step_allocates_nothing);
    suite_add_tcase(s, ts);

    TCase *tl = tcase_create("set_lr");
    tcase_add_test(tl, test_set_lr_sgd_changes_step);
    tcase_add_test(tl, test_set_lr_adam_changes_step);
    tcase_add_test(tl, test_set_lr_by_hand);
    tcase_add_test(tl, test_set_lr_invalid);
    suite_add_tcase(s, tl);

    TCase *tn = tcase_create("numeric");
    tcase_add_test(tn, test_adam_nan_grad_rejected);
    tcase_add_test(tn, test_adam_inf_grad_rejected);
    tcase_add_test(tn, test_sgd_nan_grad_rejected);
    tcase_add_test(tn, test_nan_grad_checks_off_propagates);
    suite_add_tcase(s, tn);

    TCase *tf = tcase_create("nomem");
    tcase_add_test(tf, test_create_nomem);
    tcase_add_test(tf, test_add_nomem_adam_first);
    tcase_add_test(tf, test_add_nomem_adam_second);
    tcase_add_test(tf, test_add_nomem_adam_growth);
    tcase_add_test(tf, test_add_nomem_sgd);
    suite_add_tcase(s, tf);
    return s;
}

int main(void) { return test_run(optim_suite()); }
