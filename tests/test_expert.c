/* Unit tests of one expert, y = W2 GELU(W1 x + b1) + b2: creation, nn.Linear-style
 * initialisation, forward and backward against an independent double-precision
 * reference, argument errors, fault injection and aliasing. Public API only. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum { W1, B1, W2, B2, NP };

/* Forward and backward must match the double reference with a NORM-WISE relative
 * error ||got - ref||_2 / max(||ref||_2, TINY) <= TOL over each whole output or
 * gradient tensor. Float32 rounding in sums of at most a few hundred O(1) terms
 * gives ~1e-7 relative, well inside 1e-5; any real bug (wrong index, missing
 * factor, overwrite instead of accumulate) is off by O(1) relative. TINY only
 * guards a division by zero: no reference tensor here is zero unless empty. */
#define TOL 1e-5
#define TINY 1e-30

/* ------------------------------------------------------------ test helpers */


static confsmoe_tensor *mk2(confsmoe_ctx *ctx, int64_t rows, int64_t cols)
{
    const int64_t dims[2] = {rows, cols};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
    return t;
}

/* All parameters and gradients of an expert. */
typedef struct {
    void *p[NP], *g[NP];
} esnap;

static void esnap_take(confsmoe_expert *e, esnap *s)
{
    for (int i = 0; i < NP; i++) {
        s->p[i] = tsnap(confsmoe_expert_param(e, i));
        s->g[i] = tsnap(confsmoe_expert_grad(e, i));
    }
}

static void esnap_check(confsmoe_expert *e, const esnap *s)
{
    for (int i = 0; i < NP; i++) {
        ck_assert_msg(tsame(confsmoe_expert_param(e, i), s->p[i]), "param %d changed", i);
        ck_assert_msg(tsame(confsmoe_expert_grad(e, i), s->g[i]), "grad %d changed", i);
    }
}

static void esnap_free(esnap *s)
{
    for (int i = 0; i < NP; i++) {
        free(s->p[i]);
        free(s->g[i]);
    }
}

/* Parameters the tests choose: wider than the default init so that the
 * pre-activations cover GELU's curved region on both sides of 0. */
static void set_params(confsmoe_expert *e, uint64_t seed)
{
    trng r = {seed};
    double d = (double)confsmoe_expert_d(e), h = (double)confsmoe_expert_h(e);
    fill_uniform(confsmoe_expert_param(e, W1), &r, -1.5 / sqrt(d), 1.5 / sqrt(d));
    fill_uniform(confsmoe_expert_param(e, B1), &r, -0.5, 0.5);
    fill_uniform(confsmoe_expert_param(e, W2), &r, -1.5 / sqrt(h), 1.5 / sqrt(h));
    fill_uniform(confsmoe_expert_param(e, B2), &r, -0.5, 0.5);
}

#define CK_ERR(ctx, sub)                                                                                   \
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), (sub)) != NULL, "last_error \"%s\" lacks \"%s\"", \
                  confsmoe_ctx_last_error(ctx), (sub))

/* ------------------------------------------------------------ the reference */

typedef struct {
    int64_t d, h;
    float *w[NP];
} pcopy;

static void pcopy_get(confsmoe_expert *e, pcopy *p)
{
    p->d = confsmoe_expert_d(e);
    p->h = confsmoe_expert_h(e);
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *t = confsmoe_expert_param(e, i);
        size_t n = confsmoe_tensor_nbytes(t);
        p->w[i] = xcalloc(1, n);
        ck_assert_int_eq(confsmoe_tensor_copy_out(t, p->w[i], n), CONFSMOE_OK);
    }
}

static void pcopy_free(pcopy *p)
{
    for (int i = 0; i < NP; i++)
        free(p->w[i]);
}

#define INV_SQRT2 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794

static double gelu(double a) { return 0.5 * a * (1.0 + erf(a * INV_SQRT2)); }

static double gelu_grad(double a) { return 0.5 * (1.0 + erf(a * INV_SQRT2)) + a * INV_SQRT_2PI * exp(-0.5 * a * a); }

/* Plain loops in double: y[n, d]. */
static void ref_forward(const pcopy *p, const float *x, int64_t n, double *y)
{
    const int64_t d = p->d, h = p->h;
    double *act = xcalloc((size_t)h, sizeof *act);
    for (int64_t r = 0; r < n; r++) {
        for (int64_t j = 0; j < h; j++) {
            double s = p->w[B1][j];
            for (int64_t k = 0; k < d; k++)
                s += (double)p->w[W1][j * d + k] * x[r * d + k];
            act[j] = gelu(s);
        }
        for (int64_t i = 0; i < d; i++) {
            double s = p->w[B2][i];
            for (int64_t j = 0; j < h; j++)
                s += (double)p->w[W2][i * h + j] * act[j];
            y[r * d + i] = s;
        }
    }
    free(act);
}

/* Writes dx (if not NULL) and ACCUMULATES into g[W1..B2], laid out like the params. */
static void ref_backward(const pcopy *p, const float *x, const float *dy, int64_t n, double *dx, double *g[NP])
{
    const int64_t d = p->d, h = p->h;
    double *pre = xcalloc((size_t)h, sizeof *pre), *dxr = xcalloc((size_t)d, sizeof *dxr);
    for (int64_t r = 0; r < n; r++) {
        for (int64_t j = 0; j < h; j++) {
            double s = p->w[B1][j];
            for (int64_t k = 0; k < d; k++)
                s += (double)p->w[W1][j * d + k] * x[r * d + k];
            pre[j] = s;
        }
        for (int64_t i = 0; i < d; i++) {
            g[B2][i] += dy[r * d + i];
            for (int64_t j = 0; j < h; j++)
                g[W2][i * h + j] += (double)dy[r * d + i] * gelu(pre[j]);
        }
        for (int64_t k = 0; k < d; k++)
            dxr[k] = 0.0;
        for (int64_t j = 0; j < h; j++) {
            double da = 0.0;
            for (int64_t i = 0; i < d; i++)
                da += (double)dy[r * d + i] * p->w[W2][i * h + j];
            double dp = da * gelu_grad(pre[j]);
            g[B1][j] += dp;
            for (int64_t k = 0; k < d; k++) {
                g[W1][j * d + k] += dp * x[r * d + k];
                dxr[k] += dp * p->w[W1][j * d + k];
            }
        }
        if (dx)
            for (int64_t k = 0; k < d; k++)
                dx[r * d + k] = dxr[k];
    }
    free(pre);
    free(dxr);
}

/* Reference gradients, zero-initialised, shaped like the params. */
typedef struct {
    double *g[NP];
} rgrads;

static void rgrads_init(rgrads *r, int64_t d, int64_t h)
{
    const size_t n[NP] = {(size_t)(h * d), (size_t)h, (size_t)(d * h), (size_t)d};
    for (int i = 0; i < NP; i++)
        r->g[i] = xcalloc(n[i], sizeof(double));
}

static void rgrads_free(rgrads *r)
{
    for (int i = 0; i < NP; i++)
        free(r->g[i]);
}

static double rel_err(const float *got, const double *ref, int64_t n)
{
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double diff = (double)got[i] - ref[i];
        num += diff * diff;
        den += ref[i] * ref[i];
    }
    return sqrt(num) / fmax(sqrt(den), TINY);
}

#define CK_CLOSE(got, ref, n, what)                                                                         \
    do {                                                                                                    \
        double err_ = rel_err((got), (ref), (n));                                                           \
        ck_assert_msg(err_ <= TOL, "%s: norm-wise relative error %.3g > %g", (what), err_, (double)TOL); \
    } while (0)

static void check_grads(confsmoe_expert *e, const rgrads *r)
{
    static const char *const names[NP] = {"dW1", "db1", "dW2", "db2"};
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *g = confsmoe_expert_grad(e, i);
        CK_CLOSE(f32(g), r->g[i], confsmoe_tensor_numel(g), names[i]);
    }
}

static void check_grads_zero(confsmoe_expert *e)
{
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *g = confsmoe_expert_grad(e, i);
        for (int64_t k = 0; k < confsmoe_tensor_numel(g); k++)
            ck_assert_msg(f32(g)[k] == 0.0f, "grad %d [%lld] = %g, expected 0", i, (long long)k, (double)f32(g)[k]);
    }
}

typedef struct {
    int64_t n, d, h;
} shape;

/* The last two run forward in chunks of rows (512 + 788 and 7 x 256 + 308). */
static const shape shapes[] = {{1, 1, 1}, {1, 3, 5}, {4, 3, 7},       {7, 130, 33},
                               {16, 8, 8}, {0, 4, 4}, {1300, 16, 128}, {2100, 8, 256}};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))

/* ------------------------------------------------------------ creation */

START_TEST(test_create_bad_shape)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 1);
    long base = a.live;
    const int64_t bad[][2] = {{0, 4}, {4, 0}, {-1, 4}, {4, -3}, {0, 0}, {INT64_MIN, 1}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_expert *e = (confsmoe_expert *)(void *)&a;
        ck_assert_int_eq(confsmoe_expert_create(ctx, bad[i][0], bad[i][1], &e), CONFSMOE_E_SHAPE);
        ck_assert_ptr_null(e);
        CK_ERR(ctx, "expert_create");
        CK_ERR(ctx, "must be >= 1");
        ck_assert_int_eq(a.live, base);
    }
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_create_null_args)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 1);
    long base = a.live;
    /* Header: "on failure the out-pointer is set to NULL". Everything is
     * released before the asserts so that a failure here leaks nothing. */
    confsmoe_expert *e = (confsmoe_expert *)(void *)&a;
    confsmoe_status null_ctx = confsmoe_expert_create(NULL, 4, 4, &e);
    confsmoe_status null_out = confsmoe_expert_create(ctx, 4, 4, NULL);
    int msg_ok = strstr(confsmoe_ctx_last_error(ctx), "expert_create: out is NULL") != NULL;
    long live = a.live;
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
    ck_assert_int_eq(null_ctx, CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(null_out, CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_msg(msg_ok, "last_error lacks \"expert_create: out is NULL\"");
    ck_assert_int_eq(live, base);
    ck_assert_msg(e == NULL, "expert_create(NULL ctx, ..., &out) left out = %p, expected NULL", (void *)e);
}
END_TEST

START_TEST(test_create_size_overflow)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 1);
    long base = a.live;
    confsmoe_expert *e = (confsmoe_expert *)(void *)&a;
    /* h * d overflows: reported as E_NOMEM without trying to allocate it. */
    ck_assert_int_eq(confsmoe_expert_create(ctx, INT64_C(1) << 40, INT64_C(1) << 40, &e), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(e);
    ck_assert_int_eq(a.live, base);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_accessors)
{
    confsmoe_ctx *ctx = test_ctx(3);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 3, 5, &e), CONFSMOE_OK);
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(confsmoe_expert_d(e), 3);
    ck_assert_int_eq(confsmoe_expert_h(e), 5);
    ck_assert_int_eq(confsmoe_expert_n_params(e), 4);
    static const char *const names[NP] = {"w1", "b1", "w2", "b2"};
    const int32_t ndims[NP] = {2, 1, 2, 1};
    const int64_t dims[NP][2] = {{5, 3}, {5, -1}, {3, 5}, {3, -1}};
    for (int i = 0; i < NP; i++) {
        ck_assert_str_eq(confsmoe_expert_param_name(e, i), names[i]);
        confsmoe_tensor *p = confsmoe_expert_param(e, i), *g = confsmoe_expert_grad(e, i);
        ck_assert_ptr_nonnull(p);
        ck_assert_ptr_nonnull(g);
        ck_assert_ptr_ne(p, g);
        confsmoe_tensor *both[2] = {p, g};
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(confsmoe_tensor_dtype(both[k]), CONFSMOE_F32);
            ck_assert_int_eq(confsmoe_tensor_ndim(both[k]), ndims[i]);
            ck_assert_int_eq(confsmoe_tensor_dim(both[k], 0), dims[i][0]);
            ck_assert_int_eq(confsmoe_tensor_dim(both[k], 1), dims[i][1]);
        }
        /* The same tensor each time. */
        ck_assert_ptr_eq(confsmoe_expert_param(e, i), p);
        ck_assert_ptr_eq(confsmoe_expert_grad(e, i), g);
    }
    const int32_t out_of_range[] = {-1, 4, 5, INT32_MIN, INT32_MAX};
    for (size_t k = 0; k < sizeof out_of_range / sizeof out_of_range[0]; k++) {
        ck_assert_ptr_null(confsmoe_expert_param(e, out_of_range[k]));
        ck_assert_ptr_null(confsmoe_expert_grad(e, out_of_range[k]));
        ck_assert_ptr_null(confsmoe_expert_param_name(e, out_of_range[k]));
    }
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_null_expert)
{
    ck_assert_int_eq(confsmoe_expert_d(NULL), -1);
    ck_assert_int_eq(confsmoe_expert_h(NULL), -1);
    ck_assert_int_eq(confsmoe_expert_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_expert_param(NULL, 0));
    ck_assert_ptr_null(confsmoe_expert_grad(NULL, 0));
    ck_assert_ptr_null(confsmoe_expert_param_name(NULL, 0));
    confsmoe_expert_zero_grad(NULL);
    confsmoe_expert_destroy(NULL);
    confsmoe_saved_destroy(NULL);

    confsmoe_ctx *ctx = test_ctx(3);
    confsmoe_tensor *x = mk2(ctx, 2, 3), *y = mk2(ctx, 2, 3);
    ck_assert_int_eq(confsmoe_expert_forward(NULL, x, y, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_expert_backward(NULL, NULL, y, x), CONFSMOE_E_INVALID_ARGUMENT);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------ initialisation */

/* Every value within +-bound (float rounding of 1/sqrt(fan_in) allowed), not all
 * equal, and with enough samples the extremes come near the bound: the bound
 * is neither exceeded nor too small (e.g. fan_in of the wrong layer). */
static void check_init_range(confsmoe_tensor *t, double bound, const char *what)
{
    const float *v = f32(t);
    int64_t n = confsmoe_tensor_numel(t);
    double maxabs = 0.0;
    int all_equal = 1;
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(fabs(v[i]) <= bound * (1.0 + 1e-6), "%s[%lld] = %g outside +-%g", what, (long long)i,
                      (double)v[i], bound);
        maxabs = fmax(maxabs, fabs(v[i]));
        all_equal &= v[i] == v[0];
    }
    if (n >= 2)
        ck_assert_msg(!all_equal, "%s: all %lld values equal", what, (long long)n);
    if (n >= 256) /* P(all |v| < 0.9 b) = 0.9^256 ~ 2e-12 for a correct init */
        ck_assert_msg(maxabs >= 0.9 * bound, "%s: max |v| = %g, far below the bound %g", what, maxabs, bound);
}

START_TEST(test_init_range)
{
    const int64_t dh[][2] = {{1, 1}, {3, 5}, {5, 3}, {130, 33}, {4, 400}, {400, 4}};
    for (size_t k = 0; k < sizeof dh / sizeof dh[0]; k++) {
        confsmoe_ctx *ctx = test_ctx(10 + k);
        confsmoe_expert *e = NULL;
        int64_t d = dh[k][0], h = dh[k][1];
        ck_assert_int_eq(confsmoe_expert_create(ctx, d, h, &e), CONFSMOE_OK);
        double bd = 1.0 / sqrt((double)d), bh = 1.0 / sqrt((double)h);
        check_init_range(confsmoe_expert_param(e, W1), bd, "w1");
        check_init_range(confsmoe_expert_param(e, B1), bd, "b1");
        check_init_range(confsmoe_expert_param(e, W2), bh, "w2");
        check_init_range(confsmoe_expert_param(e, B2), bh, "b2");
        /* Not all equal across the whole expert either (covers d = h = 1). */
        int distinct = 0;
        float first = f32(confsmoe_expert_param(e, W1))[0];
        for (int i = 0; i < NP; i++) {
            confsmoe_tensor *t = confsmoe_expert_param(e, i);
            for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
                distinct |= f32(t)[j] != first;
        }
        ck_assert(distinct);
        confsmoe_expert_destroy(e);
        confsmoe_ctx_destroy(ctx);
    }
}
END_TEST

/* U(-b, b) has mean 0, variance b^2/3, and equal mass in equal sub-intervals.
 * Tolerances are ~5 standard errors of the sample statistic: a normal of std b
 * (variance 3x), U(0, b) (mean b/2), U(-b/2, b/2) (variance /4), the other
 * layer's bound or a triangular shape all fail by far more. */
static void check_uniform_stats(const float *v, int64_t n, double b, const char *what)
{
    double sum = 0.0, sq = 0.0;
    enum { BINS = 8 };
    int64_t hist[BINS] = {0};
    for (int64_t i = 0; i < n; i++) {
        sum += v[i];
        sq += (double)v[i] * v[i];
        int bin = (int)floor((v[i] + b) / (2.0 * b) * BINS);
        bin = bin < 0 ? 0 : bin >= BINS ? BINS - 1 : bin;
        hist[bin]++;
    }
    double mean = sum / (double)n, var = sq / (double)n - mean * mean;
    /* Standard errors: mean b/sqrt(3n); variance, relative to b^2/3,
     * 3 sqrt(Var(v^2)/n) / b^2 with Var(v^2) = b^4/5 - b^4/9 = 4 b^4/45. */
    double se_mean = b / sqrt(3.0 * (double)n), se_var_rel = 3.0 * sqrt(4.0 / 45.0) / sqrt((double)n);
    ck_assert_msg(fabs(mean) <= 5.0 * se_mean, "%s: mean %g, expected 0 +- %g", what, mean, 5.0 * se_mean);
    ck_assert_msg(fabs(var / (b * b / 3.0) - 1.0) <= 5.0 * se_var_rel, "%s: variance %g, expected %g (+-%.1f%%)",
                  what, var, b * b / 3.0, 500.0 * se_var_rel);
    if (n >= 4096) {
        double expect = (double)n / BINS, se = sqrt(expect * (1.0 - 1.0 / BINS));
        for (int k = 0; k < BINS; k++)
            ck_assert_msg(fabs((double)hist[k] - expect) <= 5.0 * se, "%s: bin %d holds %lld, expected %.0f", what,
                          k, (long long)hist[k], expect);
    }
}

START_TEST(test_init_distribution)
{
    /* d = h = 256: W1 and W2 have 65536 values each, bound 1/16. */
    confsmoe_ctx *ctx = test_ctx(2024);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 256, 256, &e), CONFSMOE_OK);
    check_uniform_stats(f32(confsmoe_expert_param(e, W1)), 65536, 1.0 / 16, "w1 (256x256)");
    check_uniform_stats(f32(confsmoe_expert_param(e, W2)), 65536, 1.0 / 16, "w2 (256x256)");
    float biases[512];
    memcpy(biases, f32(confsmoe_expert_param(e, B1)), 256 * sizeof(float));
    memcpy(biases + 256, f32(confsmoe_expert_param(e, B2)), 256 * sizeof(float));
    check_uniform_stats(biases, 512, 1.0 / 16, "b1+b2 (256)");
    confsmoe_expert_destroy(e);

    /* d != h: each layer uses its own fan-in, 1/8 for W1 and b1, 1/32 for W2. */
    ck_assert_int_eq(confsmoe_expert_create(ctx, 64, 1024, &e), CONFSMOE_OK);
    check_uniform_stats(f32(confsmoe_expert_param(e, W1)), 65536, 1.0 / 8, "w1 (d=64)");
    check_uniform_stats(f32(confsmoe_expert_param(e, B1)), 1024, 1.0 / 8, "b1 (d=64)");
    check_uniform_stats(f32(confsmoe_expert_param(e, W2)), 65536, 1.0 / 32, "w2 (h=1024)");
    check_init_range(confsmoe_expert_param(e, B2), 1.0 / 32, "b2 (h=1024)");
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

static int same_params(confsmoe_expert *a, confsmoe_expert *b)
{
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *ta = confsmoe_expert_param(a, i), *tb = confsmoe_expert_param(b, i);
        if (confsmoe_tensor_nbytes(ta) != confsmoe_tensor_nbytes(tb) ||
            memcmp(confsmoe_tensor_data(ta), confsmoe_tensor_data(tb), confsmoe_tensor_nbytes(ta)) != 0)
            return 0;
    }
    return 1;
}

START_TEST(test_init_seed)
{
    confsmoe_ctx *c1 = test_ctx(42), *c2 = test_ctx(42), *c3 = test_ctx(43);
    confsmoe_expert *e1 = NULL, *e2 = NULL, *e3 = NULL, *e4 = NULL;
    ck_assert_int_eq(confsmoe_expert_create(c1, 6, 9, &e1), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_create(c2, 6, 9, &e2), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_create(c3, 6, 9, &e3), CONFSMOE_OK);
    ck_assert_msg(same_params(e1, e2), "same seed, different weights");
    for (int i = 0; i < NP; i++) /* different seed: every tensor differs */
        ck_assert(memcmp(f32(confsmoe_expert_param(e1, i)), f32(confsmoe_expert_param(e3, i)),
                         confsmoe_tensor_nbytes(confsmoe_expert_param(e1, i))) != 0);
    /* The stream advances: a second expert on c1 differs from the first ... */
    ck_assert_int_eq(confsmoe_expert_create(c1, 6, 9, &e4), CONFSMOE_OK);
    ck_assert(!same_params(e1, e4));
    confsmoe_expert_destroy(e4);
    /* ... and set_seed restarts it. */
    ck_assert_int_eq(confsmoe_ctx_set_seed(c1, 42), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_create(c1, 6, 9, &e4), CONFSMOE_OK);
    ck_assert(same_params(e1, e4));
    confsmoe_expert_destroy(e1);
    confsmoe_expert_destroy(e2);
    confsmoe_expert_destroy(e3);
    confsmoe_expert_destroy(e4);
    confsmoe_ctx_destroy(c1);
    confsmoe_ctx_destroy(c2);
    confsmoe_ctx_destroy(c3);
}
END_TEST

START_TEST(test_init_grads_zero)
{
    confsmoe_ctx *ctx = test_ctx(5);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 130, 33, &e), CONFSMOE_OK);
    check_grads_zero(e);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------ forward / backward vs reference */

START_TEST(test_forward_backward_reference)
{
    const shape sh = shapes[_i];
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 100 + (uint64_t)_i);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, sh.d, sh.h, &e), CONFSMOE_OK);
    check_grads_zero(e);
    set_params(e, 1000 + (uint64_t)_i);
    trng r = {2000 + (uint64_t)_i};
    confsmoe_tensor *x = mk2(ctx, sh.n, sh.d), *y = mk2(ctx, sh.n, sh.d);
    confsmoe_tensor *dy = mk2(ctx, sh.n, sh.d), *dx = mk2(ctx, sh.n, sh.d);
    fill_uniform(x, &r, -2.0, 2.0);
    fill_uniform(dy, &r, -1.0, 1.0);
    fill_const(y, NAN); /* written, not accumulated */
    fill_const(dx, NAN);
    pcopy p;
    pcopy_get(e, &p);
    void *xs = tsnap(x), *dys = tsnap(dy);

    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(e, x, y, &s), CONFSMOE_OK);
    ck_assert_ptr_nonnull(s);
    double *yr = xcalloc((size_t)(sh.n * sh.d), sizeof *yr);
    ref_forward(&p, f32(x), sh.n, yr);
    CK_CLOSE(f32(y), yr, sh.n * sh.d, "y");
    check_grads_zero(e); /* forward touches no gradient */

    ck_assert_int_eq(confsmoe_expert_backward(e, s, dy, dx), CONFSMOE_OK);
    double *dxr = xcalloc((size_t)(sh.n * sh.d), sizeof *dxr);
    rgrads g;
    rgrads_init(&g, sh.d, sh.h);
    ref_backward(&p, f32(x), f32(dy), sh.n, dxr, g.g);
    CK_CLOSE(f32(dx), dxr, sh.n * sh.d, "dx");
    check_grads(e, &g);
    /* Inputs are read only, and the parameters did not move. */
    ck_assert(tsame(x, xs));
    ck_assert(tsame(dy, dys));
    for (int i = 0; i < NP; i++)
        ck_assert(memcmp(f32(confsmoe_expert_param(e, i)), p.w[i], confsmoe_tensor_nbytes(confsmoe_expert_param(e, i))) == 0);

    confsmoe_saved_destroy(s);
    free(xs);
    free(dys);
    free(yr);
    free(dxr);
    rgrads_free(&g);
    pcopy_free(&p);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* N = 0: OK, nothing is written, gradients stay as they were. Caller buffers
 * behind zero-row tensors prove that no byte is touched. */
START_TEST(test_empty_batch)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 7);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 4, 4, &e), CONFSMOE_OK);
    trng r = {77};
    for (int i = 0; i < NP; i++)
        fill_uniform(confsmoe_expert_grad(e, i), &r, -1.0, 1.0);
    esnap before;
    esnap_take(e, &before);
    float buf[4][16];
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 16; j++)
            buf[k][j] = 1234.5f + (float)j;
    float copy[4][16];
    memcpy(copy, buf, sizeof buf);
    const int64_t dims[2] = {0, 4};
    confsmoe_tensor *t[4];
    for (int k = 0; k < 4; k++)
        ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, buf[k], &t[k]), CONFSMOE_OK);

    ck_assert_int_eq(confsmoe_expert_forward(e, t[0], t[1], NULL), CONFSMOE_OK);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(e, t[0], t[1], &s), CONFSMOE_OK);
    ck_assert_ptr_nonnull(s);
    ck_assert_int_eq(confsmoe_expert_backward(e, s, t[2], t[3]), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    ck_assert_int_eq(confsmoe_expert_forward(e, t[0], t[1], &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s, t[2], NULL), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    ck_assert(memcmp(buf, copy, sizeof buf) == 0);
    esnap_check(e, &before);

    esnap_free(&before);
    for (int k = 0; k < 4; k++)
        confsmoe_tensor_destroy(t[k]);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_inference_equals_training)
{
    const shape sh = shapes[_i];
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 300 + (uint64_t)_i);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, sh.d, sh.h, &e), CONFSMOE_OK);
    set_params(e, 3000 + (uint64_t)_i);
    trng r = {4000 + (uint64_t)_i};
    confsmoe_tensor *x = mk2(ctx, sh.n, sh.d), *y1 = mk2(ctx, sh.n, sh.d), *y2 = mk2(ctx, sh.n, sh.d);
    fill_uniform(x, &r, -2.0, 2.0);
    fill_const(y1, NAN);
    fill_const(y2, -NAN);
    esnap before;
    esnap_take(e, &before);
    long base = a.live;
    /* saved == NULL: inference keeps nothing behind. */
    ck_assert_int_eq(confsmoe_expert_forward(e, x, y1, NULL), CONFSMOE_OK);
    ck_assert_int_eq(a.live, base);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(e, x, y2, &s), CONFSMOE_OK);
    ck_assert_ptr_nonnull(s);
    ck_assert_int_gt(a.live, base);
    /* (memcmp with NULL is undefined even for 0 bytes: UBSan, tests/sanitize/run asan) */
    ck_assert(confsmoe_tensor_nbytes(y1) == 0 || memcmp(f32(y1), f32(y2), confsmoe_tensor_nbytes(y1)) == 0);
    esnap_check(e, &before);
    confsmoe_saved_destroy(s);
    ck_assert_int_eq(a.live, base);
    esnap_free(&before);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y1);
    confsmoe_tensor_destroy(y2);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* Gradients accumulate: two backward calls from two forwards give the sum,
 * whatever the order; zero_grad clears them and nothing else. */
START_TEST(test_accumulate_and_zero_grad)
{
    const int64_t n1 = 5, n2 = 3, d = 6, h = 11;
    confsmoe_ctx *ctx = test_ctx(9);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, d, h, &e), CONFSMOE_OK);
    set_params(e, 99);
    trng r = {999};
    confsmoe_tensor *x1 = mk2(ctx, n1, d), *y1 = mk2(ctx, n1, d), *dy1 = mk2(ctx, n1, d), *dx1 = mk2(ctx, n1, d);
    confsmoe_tensor *x2 = mk2(ctx, n2, d), *y2 = mk2(ctx, n2, d), *dy2 = mk2(ctx, n2, d), *dx2 = mk2(ctx, n2, d);
    fill_uniform(x1, &r, -2.0, 2.0);
    fill_uniform(x2, &r, -2.0, 2.0);
    fill_uniform(dy1, &r, -1.0, 1.0);
    fill_uniform(dy2, &r, -1.0, 1.0);
    pcopy p;
    pcopy_get(e, &p);

    confsmoe_saved *s1 = NULL, *s2 = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(e, x1, y1, &s1), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_forward(e, x2, y2, &s2), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s2, dy2, dx2), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s1, dy1, dx1), CONFSMOE_OK);
    rgrads g;
    rgrads_init(&g, d, h);
    double *dxr1 = xcalloc((size_t)(n1 * d), sizeof(double)), *dxr2 = xcalloc((size_t)(n2 * d), sizeof(double));
    ref_backward(&p, f32(x1), f32(dy1), n1, dxr1, g.g);
    ref_backward(&p, f32(x2), f32(dy2), n2, dxr2, g.g);
    check_grads(e, &g);
    CK_CLOSE(f32(dx1), dxr1, n1 * d, "dx1");
    CK_CLOSE(f32(dx2), dxr2, n2 * d, "dx2");
    confsmoe_saved_destroy(s1);
    confsmoe_saved_destroy(s2);

    confsmoe_expert_zero_grad(e);
    check_grads_zero(e);
    for (int i = 0; i < NP; i++)
        ck_assert(memcmp(f32(confsmoe_expert_param(e, i)), p.w[i], confsmoe_tensor_nbytes(confsmoe_expert_param(e, i))) == 0);

    /* After zero_grad a single backward gives exactly its own gradient. */
    ck_assert_int_eq(confsmoe_expert_forward(e, x1, y1, &s1), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s1, dy1, dx1), CONFSMOE_OK);
    confsmoe_saved_destroy(s1);
    rgrads g1;
    rgrads_init(&g1, d, h);
    ref_backward(&p, f32(x1), f32(dy1), n1, NULL, g1.g);
    check_grads(e, &g1);

    /* Accumulation also on top of arbitrary host values H: grad = H + g(x2). */
    rgrads g2;
    rgrads_init(&g2, d, h);
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *gt = confsmoe_expert_grad(e, i);
        fill_uniform(gt, &r, -1.0, 1.0);
        for (int64_t k = 0; k < confsmoe_tensor_numel(gt); k++)
            g2.g[i][k] = f32(gt)[k];
    }
    ck_assert_int_eq(confsmoe_expert_forward(e, x2, y2, &s2), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s2, dy2, NULL), CONFSMOE_OK);
    confsmoe_saved_destroy(s2);
    ref_backward(&p, f32(x2), f32(dy2), n2, NULL, g2.g);
    check_grads(e, &g2);
    rgrads_free(&g2);
    rgrads_free(&g1);

    free(dxr1);
    free(dxr2);
    rgrads_free(&g);
    pcopy_free(&p);
    confsmoe_tensor *all[] = {x1, y1, dy1, dx1, x2, y2, dy2, dx2};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        confsmoe_tensor_destroy(all[k]);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_dx_null)
{
    const int64_t n = 4, d = 3, h = 7;
    confsmoe_ctx *ctx = test_ctx(19);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, d, h, &e), CONFSMOE_OK);
    set_params(e, 191);
    trng r = {192};
    confsmoe_tensor *x = mk2(ctx, n, d), *y = mk2(ctx, n, d), *dy = mk2(ctx, n, d);
    fill_uniform(x, &r, -2.0, 2.0);
    fill_uniform(dy, &r, -1.0, 1.0);
    pcopy p;
    pcopy_get(e, &p);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(e, x, y, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(e, s, dy, NULL), CONFSMOE_OK);
    rgrads g;
    rgrads_init(&g, d, h);
    ref_backward(&p, f32(x), f32(dy), n, NULL, g.g);
    check_grads(e, &g);
    /* The handle is consumed all the same. */
    ck_assert_int_eq(confsmoe_expert_backward(e, s, dy, NULL), CONFSMOE_E_STATE);
    confsmoe_saved_destroy(s);
    rgrads_free(&g);
    pcopy_free(&p);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ------------------------------------------------------------ errors */

/* One expert on a counting ctx with inputs, sentinel-filled outputs and
 * non-zero gradients, so that "nothing changed" is a meaningful check. */
typedef struct {
    test_alloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    confsmoe_expert *e;
    int64_t n, d, h;
    confsmoe_tensor *x, *y, *dy, *dx;
    esnap snap;
    void *ys, *dxs;
    int marked;
    long base;
} env;

static void env_open_params(env *v, int64_t n, int64_t d, int64_t h, uint64_t seed, int check_finite)
{
    memset(v, 0, sizeof *v);
    v->n = n;
    v->d = d;
    v->h = h;
    if (check_finite) {
        v->ctx = test_ctx_counted(&v->a, &v->hold, seed);
    } else {
        v->hold.alloc = test_alloc_fn;
        v->hold.free = test_free_fn;
        v->hold.user = &v->a;
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.seed = seed;
        p.allocator = &v->hold;
        p.check_finite = 0;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &v->ctx), CONFSMOE_OK);
    }
    ck_assert_int_eq(confsmoe_expert_create(v->ctx, d, h, &v->e), CONFSMOE_OK);
    set_params(v->e, seed + 1);
    trng r = {seed + 2};
    v->x = mk2(v->ctx, n, d);
    v->y = mk2(v->ctx, n, d);
    v->dy = mk2(v->ctx, n, d);
    v->dx = mk2(v->ctx, n, d);
    fill_uniform(v->x, &r, -2.0, 2.0);
    fill_uniform(v->dy, &r, -1.0, 1.0);
    fill_const(v->y, 777.0f);
    fill_const(v->dx, 555.0f);
    for (int i = 0; i < NP; i++)
        fill_uniform(confsmoe_expert_grad(v->e, i), &r, -1.0, 1.0);
}

static void env_open(env *v, int64_t n, int64_t d, int64_t h, uint64_t seed)
{
    env_open_params(v, n, d, h, seed, 1);
}

static void env_unmark(env *v)
{
    if (v->marked) {
        esnap_free(&v->snap);
        free(v->ys);
        free(v->dxs);
        v->marked = 0;
    }
}

/* Remember the whole observable state and the live block count. */
static void env_mark(env *v)
{
    env_unmark(v);
    esnap_take(v->e, &v->snap);
    v->ys = tsnap(v->y);
    v->dxs = tsnap(v->dx);
    v->marked = 1;
    v->base = v->a.live;
}

static void env_check_unchanged(env *v)
{
    ck_assert(v->marked);
    esnap_check(v->e, &v->snap);
    ck_assert_msg(tsame(v->y, v->ys), "y was written");
    ck_assert_msg(tsame(v->dx, v->dxs), "dx was written");
    ck_assert_msg(v->a.live == v->base, "live blocks %ld, expected %ld", v->a.live, v->base);
}

static void env_close(env *v)
{
    env_unmark(v);
    confsmoe_tensor_destroy(v->x);
    confsmoe_tensor_destroy(v->y);
    confsmoe_tensor_destroy(v->dy);
    confsmoe_tensor_destroy(v->dx);
    confsmoe_expert_destroy(v->e);
    confsmoe_ctx_destroy(v->ctx);
    ck_assert_int_eq(v->a.live, 0);
}

/* Backward from a handle made by forward(v->x) succeeds and adds exactly the
 * reference gradients to whatever the grads held; dx (if any) gets the reference. */
static void env_backward_ok(env *v, confsmoe_saved *s, const float *x, confsmoe_tensor *dy, confsmoe_tensor *dx)
{
    pcopy p;
    pcopy_get(v->e, &p);
    rgrads g;
    rgrads_init(&g, v->d, v->h);
    for (int i = 0; i < NP; i++) {
        confsmoe_tensor *gt = confsmoe_expert_grad(v->e, i);
        for (int64_t k = 0; k < confsmoe_tensor_numel(gt); k++)
            g.g[i][k] = f32(gt)[k];
    }
    double *dxr = xcalloc((size_t)(v->n * v->d), sizeof *dxr);
    ref_backward(&p, x, f32(dy), v->n, dxr, g.g);
    ck_assert_int_eq(confsmoe_expert_backward(v->e, s, dy, dx), CONFSMOE_OK);
    check_grads(v->e, &g);
    if (dx)
        CK_CLOSE(f32(dx), dxr, v->n * v->d, "dx");
    free(dxr);
    rgrads_free(&g);
    pcopy_free(&p);
}

static void env_forward_ok(env *v, const float *x, confsmoe_tensor *xt, confsmoe_tensor *y, confsmoe_saved **s)
{
    pcopy p;
    pcopy_get(v->e, &p);
    double *yr = xcalloc((size_t)(v->n * v->d), sizeof *yr);
    ref_forward(&p, x, v->n, yr);
    ck_assert_int_eq(confsmoe_expert_forward(v->e, xt, y, s), CONFSMOE_OK);
    CK_CLOSE(f32(y), yr, v->n * v->d, "y");
    free(yr);
    pcopy_free(&p);
}

/* After failures the expert still works: a full training step matches the reference. */
static void env_roundtrip(env *v)
{
    confsmoe_saved *s = NULL;
    env_forward_ok(v, f32(v->x), v->x, v->y, &s);
    ck_assert_ptr_nonnull(s);
    env_backward_ok(v, s, f32(v->x), v->dy, v->dx);
    confsmoe_saved_destroy(s);
}

/* Both forward modes fail with `want` and `sub` in the message, and change nothing
 * (other than last_error): params, grads, y (and `other`, a bad y) untouched, no leak. */
static void expect_forward_fails(env *v, const confsmoe_tensor *x, confsmoe_tensor *y, confsmoe_tensor *other,
                                 confsmoe_status want, const char *sub)
{
    void *os = other ? tsnap(other) : NULL;
    env_mark(v);
    for (int training = 1; training >= 0; training--) {
        confsmoe_saved *s = (confsmoe_saved *)(void *)v; /* not a handle: must come back NULL */
        confsmoe_status st = confsmoe_expert_forward(v->e, x, y, training ? &s : NULL);
        ck_assert_msg(st == want, "forward (%s): status %d, expected %d (%s)", training ? "training" : "inference",
                      (int)st, (int)want, confsmoe_ctx_last_error(v->ctx));
        if (training)
            ck_assert_ptr_null(s);
        CK_ERR(v->ctx, "expert_forward");
        CK_ERR(v->ctx, sub);
        env_check_unchanged(v);
        if (other)
            ck_assert_msg(tsame(other, os), "the rejected y was written");
    }
    free(os);
}

static void expect_backward_fails(env *v, confsmoe_saved *s, const confsmoe_tensor *dy, confsmoe_tensor *dx,
                                  confsmoe_status want, const char *sub)
{
    void *os = dx ? tsnap(dx) : NULL;
    env_mark(v);
    confsmoe_status st = confsmoe_expert_backward(v->e, s, dy, dx);
    ck_assert_msg(st == want, "backward: status %d, expected %d (%s)", (int)st, (int)want,
                  confsmoe_ctx_last_error(v->ctx));
    CK_ERR(v->ctx, "expert_backward");
    CK_ERR(v->ctx, sub);
    env_check_unchanged(v);
    if (dx)
        ck_assert_msg(tsame(dx, os), "the rejected dx was written");
    free(os);
}

START_TEST(test_forward_x_dtype)
{
    env v;
    env_open(&v, 3, 4, 6, 501);
    const int64_t dims[2] = {3, 4};
    confsmoe_tensor *xi = NULL, *xu = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_I32, 2, dims, &xi), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_U8, 2, dims, &xu), CONFSMOE_OK);
    expect_forward_fails(&v, xi, v.y, NULL, CONFSMOE_E_DTYPE, "x is i32, expected f32");
    expect_forward_fails(&v, xu, v.y, NULL, CONFSMOE_E_DTYPE, "x is u8, expected f32");
    confsmoe_tensor_destroy(xi);
    confsmoe_tensor_destroy(xu);
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

START_TEST(test_forward_x_shape)
{
    env v;
    env_open(&v, 3, 4, 6, 502);
    confsmoe_tensor *wide = mk2(v.ctx, 3, 5), *narrow = mk2(v.ctx, 3, 3), *x3 = NULL, *x1 = NULL;
    const int64_t d3[3] = {3, 4, 1}, d1[1] = {4};
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_F32, 3, d3, &x3), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_F32, 1, d1, &x1), CONFSMOE_OK);
    expect_forward_fails(&v, wide, v.y, NULL, CONFSMOE_E_SHAPE, "x has shape [3, 5], expected [*, 4]");
    expect_forward_fails(&v, narrow, v.y, NULL, CONFSMOE_E_SHAPE, "x has shape [3, 3]");
    expect_forward_fails(&v, x3, v.y, NULL, CONFSMOE_E_SHAPE, "x has shape [3, 4, 1]");
    expect_forward_fails(&v, x1, v.y, NULL, CONFSMOE_E_SHAPE, "x has shape [4]");
    confsmoe_tensor_destroy(wide);
    confsmoe_tensor_destroy(narrow);
    confsmoe_tensor_destroy(x3);
    confsmoe_tensor_destroy(x1);
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

START_TEST(test_forward_y_shape)
{
    env v;
    env_open(&v, 3, 4, 6, 503);
    confsmoe_tensor *tall = mk2(v.ctx, 4, 4), *wide = mk2(v.ctx, 3, 5), *flat = NULL, *yi = NULL;
    const int64_t d1[1] = {12}, d2[2] = {3, 4};
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_F32, 1, d1, &flat), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_I32, 2, d2, &yi), CONFSMOE_OK);
    fill_const(tall, 3.0f);
    fill_const(wide, 3.0f);
    fill_const(flat, 3.0f);
    expect_forward_fails(&v, v.x, tall, tall, CONFSMOE_E_SHAPE, "y has shape [4, 4], expected [3, 4]");
    expect_forward_fails(&v, v.x, wide, wide, CONFSMOE_E_SHAPE, "y has shape [3, 5], expected [3, 4]");
    expect_forward_fails(&v, v.x, flat, flat, CONFSMOE_E_SHAPE, "y has shape [12]");
    expect_forward_fails(&v, v.x, yi, yi, CONFSMOE_E_DTYPE, "y is i32");
    confsmoe_tensor *all[] = {tall, wide, flat, yi};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        confsmoe_tensor_destroy(all[k]);
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

START_TEST(test_forward_null_args)
{
    env v;
    env_open(&v, 3, 4, 6, 504);
    expect_forward_fails(&v, NULL, v.y, NULL, CONFSMOE_E_INVALID_ARGUMENT, "x is NULL");
    expect_forward_fails(&v, v.x, NULL, NULL, CONFSMOE_E_INVALID_ARGUMENT, "y is NULL");
    expect_forward_fails(&v, NULL, NULL, NULL, CONFSMOE_E_INVALID_ARGUMENT, "is NULL");
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

START_TEST(test_forward_nonfinite)
{
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    const char *const msg[3] = {"x[5] is NaN", "x[5] is Inf", "x[5] is Inf"};
    env v;
    env_open(&v, 3, 4, 6, 505);
    for (int k = 0; k < 3; k++) {
        float keep = f32(v.x)[5];
        f32(v.x)[5] = bad[k];
        expect_forward_fails(&v, v.x, v.y, NULL, CONFSMOE_E_NUMERIC, msg[k]);
        f32(v.x)[5] = keep;
    }
    /* The last element too (the whole tensor is scanned). */
    f32(v.x)[11] = NAN;
    expect_forward_fails(&v, v.x, v.y, NULL, CONFSMOE_E_NUMERIC, "x[11] is NaN");
    f32(v.x)[11] = 0.25f;
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

/* With check_finite = 0 the scan is skipped and NaN propagates to its own row only. */
START_TEST(test_forward_nonfinite_unchecked)
{
    env v;
    env_open_params(&v, 3, 4, 6, 506, 0);
    f32(v.x)[5] = NAN; /* row 1 */
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, NULL), CONFSMOE_OK);
    for (int64_t i = 0; i < 12; i++) {
        if (i / 4 == 1)
            ck_assert_msg(isnan(f32(v.y)[i]), "y[%lld] = %g, expected NaN", (long long)i, (double)f32(v.y)[i]);
        else
            ck_assert_msg(isfinite(f32(v.y)[i]), "y[%lld] = %g, expected finite", (long long)i, (double)f32(v.y)[i]);
    }
    env_close(&v);
}
END_TEST

START_TEST(test_backward_null_args)
{
    env v;
    env_open(&v, 3, 4, 6, 507);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    expect_backward_fails(&v, NULL, v.dy, v.dx, CONFSMOE_E_INVALID_ARGUMENT, "saved is NULL");
    expect_backward_fails(&v, s, NULL, v.dx, CONFSMOE_E_INVALID_ARGUMENT, "dy is NULL");
    /* The handle survived the failures. */
    env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
    confsmoe_saved_destroy(s);
    env_close(&v);
}
END_TEST

START_TEST(test_backward_twice)
{
    env v;
    env_open(&v, 3, 4, 6, 508);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
    fill_const(v.dx, 555.0f);
    expect_backward_fails(&v, s, v.dy, v.dx, CONFSMOE_E_STATE, "already ran");
    expect_backward_fails(&v, s, v.dy, NULL, CONFSMOE_E_STATE, "already ran");
    confsmoe_saved_destroy(s);
    env_roundtrip(&v);
    env_close(&v);
}
END_TEST

START_TEST(test_backward_foreign_saved)
{
    env v;
    env_open(&v, 3, 4, 6, 509);
    /* Another expert of the same shape on the same ctx, with gradients to watch. */
    confsmoe_expert *other = NULL;
    ck_assert_int_eq(confsmoe_expert_create(v.ctx, 4, 6, &other), CONFSMOE_OK);
    confsmoe_saved *mine = NULL, *theirs = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &mine), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_forward(other, v.x, v.y, &theirs), CONFSMOE_OK);
    fill_const(v.dx, 555.0f);
    esnap os;
    esnap_take(other, &os);
    expect_backward_fails(&v, theirs, v.dy, v.dx, CONFSMOE_E_INVALID_ARGUMENT, "another layer");
    ck_assert_int_eq(confsmoe_expert_backward(other, mine, v.dy, v.dx), CONFSMOE_E_INVALID_ARGUMENT);
    CK_ERR(v.ctx, "another layer");
    env_check_unchanged(&v);
    esnap_check(other, &os);
    /* Both handles are still good for their own expert. */
    ck_assert_int_eq(confsmoe_expert_backward(other, theirs, v.dy, NULL), CONFSMOE_OK);
    env_backward_ok(&v, mine, f32(v.x), v.dy, v.dx);
    confsmoe_saved_destroy(mine);
    confsmoe_saved_destroy(theirs);
    esnap_free(&os);
    confsmoe_expert_destroy(other);
    env_close(&v);
}
END_TEST

START_TEST(test_backward_dy_shape)
{
    env v;
    env_open(&v, 3, 4, 6, 510);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    confsmoe_tensor *tall = mk2(v.ctx, 4, 4), *wide = mk2(v.ctx, 3, 5), *d3 = NULL, *di = NULL;
    const int64_t dims3[3] = {3, 4, 1}, dims2[2] = {3, 4};
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_F32, 3, dims3, &d3), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_I32, 2, dims2, &di), CONFSMOE_OK);
    expect_backward_fails(&v, s, tall, v.dx, CONFSMOE_E_SHAPE, "dy has shape [4, 4], expected [3, 4]");
    expect_backward_fails(&v, s, wide, v.dx, CONFSMOE_E_SHAPE, "dy has shape [3, 5], expected [3, 4]");
    expect_backward_fails(&v, s, d3, v.dx, CONFSMOE_E_SHAPE, "dy has shape [3, 4, 1]");
    expect_backward_fails(&v, s, di, v.dx, CONFSMOE_E_DTYPE, "dy is i32");
    expect_backward_fails(&v, s, tall, NULL, CONFSMOE_E_SHAPE, "dy has shape [4, 4]");
    confsmoe_tensor *all[] = {tall, wide, d3, di};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        confsmoe_tensor_destroy(all[k]);
    env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
    confsmoe_saved_destroy(s);
    env_close(&v);
}
END_TEST

START_TEST(test_backward_dx_shape)
{
    env v;
    env_open(&v, 3, 4, 6, 511);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    confsmoe_tensor *tall = mk2(v.ctx, 4, 4), *wide = mk2(v.ctx, 3, 5), *flat = NULL, *di = NULL;
    const int64_t dims1[1] = {12}, dims2[2] = {3, 4};
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_F32, 1, dims1, &flat), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(v.ctx, CONFSMOE_I32, 2, dims2, &di), CONFSMOE_OK);
    fill_const(tall, 9.0f);
    fill_const(wide, 9.0f);
    fill_const(flat, 9.0f);
    expect_backward_fails(&v, s, v.dy, tall, CONFSMOE_E_SHAPE, "dx has shape [4, 4], expected [3, 4]");
    expect_backward_fails(&v, s, v.dy, wide, CONFSMOE_E_SHAPE, "dx has shape [3, 5], expected [3, 4]");
    expect_backward_fails(&v, s, v.dy, flat, CONFSMOE_E_SHAPE, "dx has shape [12]");
    expect_backward_fails(&v, s, v.dy, di, CONFSMOE_E_DTYPE, "dx is i32");
    confsmoe_tensor *all[] = {tall, wide, flat, di};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        confsmoe_tensor_destroy(all[k]);
    env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
    confsmoe_saved_destroy(s);
    env_close(&v);
}
END_TEST

START_TEST(test_backward_nonfinite_dy)
{
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    const char *const msg[3] = {"dy[7] is NaN", "dy[7] is Inf", "dy[7] is Inf"};
    env v;
    env_open(&v, 3, 4, 6, 512);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    for (int k = 0; k < 3; k++) {
        float keep = f32(v.dy)[7];
        f32(v.dy)[7] = bad[k];
        expect_backward_fails(&v, s, v.dy, v.dx, CONFSMOE_E_NUMERIC, msg[k]);
        expect_backward_fails(&v, s, v.dy, NULL, CONFSMOE_E_NUMERIC, msg[k]);
        f32(v.dy)[7] = keep;
    }
    env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
    confsmoe_saved_destroy(s);
    env_close(&v);
}
END_TEST

START_TEST(test_saved_lifetime)
{
    confsmoe_saved_destroy(NULL);
    env v;
    env_open(&v, 5, 4, 6, 513);
    long base = v.a.live;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    ck_assert_int_gt(v.a.live, base);
    /* Discarding a call without its backward leaks nothing... */
    confsmoe_saved_destroy(s);
    ck_assert_int_eq(v.a.live, base);
    /* ...and neither does backward (its scratch is released before it returns). */
    ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
    long with_saved = v.a.live;
    ck_assert_int_eq(confsmoe_expert_backward(v.e, s, v.dy, v.dx), CONFSMOE_OK);
    ck_assert_int_eq(v.a.live, with_saved);
    confsmoe_saved_destroy(s);
    ck_assert_int_eq(v.a.live, base);
    /* Several live handles at once, destroyed in any order. */
    confsmoe_saved *h[3] = {NULL, NULL, NULL};
    for (int k = 0; k < 3; k++)
        ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &h[k]), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(v.e, h[1], v.dy, NULL), CONFSMOE_OK);
    confsmoe_saved_destroy(h[1]);
    confsmoe_saved_destroy(h[0]);
    confsmoe_saved_destroy(h[2]);
    ck_assert_int_eq(v.a.live, base);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ fault injection */

#define MAX_FAULTS 10000

START_TEST(test_fault_create)
{
    /* The weights a clean ctx with this seed gives. */
    confsmoe_ctx *rctx = test_ctx(55);
    confsmoe_expert *ref = NULL;
    ck_assert_int_eq(confsmoe_expert_create(rctx, 7, 5, &ref), CONFSMOE_OK);
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "expert_create never succeeded");
        test_alloc a = {0, 0, 0};
        confsmoe_allocator hold;
        confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 55);
        long base = a.live;
        confsmoe_expert *e = (confsmoe_expert *)(void *)&a;
        a.fail_at = a.total + n;
        confsmoe_status st = confsmoe_expert_create(ctx, 7, 5, &e);
        a.fail_at = 0;
        if (st == CONFSMOE_OK) {
            ck_assert_ptr_nonnull(e);
            ck_assert(same_params(e, ref));
            check_grads_zero(e);
            confsmoe_expert_destroy(e);
            confsmoe_ctx_destroy(ctx);
            ck_assert_int_eq(a.live, 0);
            break;
        }
        failures++;
        ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
        ck_assert_ptr_null(e);
        CK_ERR(ctx, "expert_create");
        CK_ERR(ctx, "out of memory");
        ck_assert_msg(a.live == base, "allocation %ld failed: %ld blocks leaked", n, a.live - base);
        /* The ctx is usable, and its RNG did not move: the same weights as a clean ctx. */
        ck_assert_int_eq(confsmoe_expert_create(ctx, 7, 5, &e), CONFSMOE_OK);
        ck_assert(same_params(e, ref));
        confsmoe_expert_destroy(e);
        confsmoe_ctx_destroy(ctx);
        ck_assert_int_eq(a.live, 0);
    }
    ck_assert_int_ge(failures, 1);
    confsmoe_expert_destroy(ref);
    confsmoe_ctx_destroy(rctx);
}
END_TEST

/* _i = 0: training forward, 1: inference forward. */
START_TEST(test_fault_forward)
{
    const int training = _i == 0;
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "expert_forward never succeeded");
        env v;
        env_open(&v, 6, 5, 9, 600);
        env_mark(&v);
        confsmoe_saved *s = (confsmoe_saved *)(void *)&v;
        v.a.fail_at = v.a.total + n;
        confsmoe_status st = confsmoe_expert_forward(v.e, v.x, v.y, training ? &s : NULL);
        v.a.fail_at = 0;
        if (st == CONFSMOE_OK) {
            pcopy p;
            pcopy_get(v.e, &p);
            double *yr = xcalloc((size_t)(v.n * v.d), sizeof *yr);
            ref_forward(&p, f32(v.x), v.n, yr);
            CK_CLOSE(f32(v.y), yr, v.n * v.d, "y");
            free(yr);
            pcopy_free(&p);
            if (training) {
                ck_assert_ptr_nonnull(s);
                env_backward_ok(&v, s, f32(v.x), v.dy, v.dx);
                confsmoe_saved_destroy(s);
            }
            env_close(&v);
            break;
        }
        failures++;
        ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
        if (training)
            ck_assert_ptr_null(s);
        CK_ERR(v.ctx, "expert_forward");
        CK_ERR(v.ctx, "out of memory");
        env_check_unchanged(&v);
        env_roundtrip(&v);
        env_close(&v);
    }
    ck_assert_int_ge(failures, 1);
}
END_TEST

START_TEST(test_fault_backward)
{
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "expert_backward never succeeded");
        env v;
        env_open(&v, 6, 5, 9, 700);
        confsmoe_saved *s = NULL;
        ck_assert_int_eq(confsmoe_expert_forward(v.e, v.x, v.y, &s), CONFSMOE_OK);
        env_mark(&v);
        /* What a successful call must produce from this state. */
        pcopy p;
        pcopy_get(v.e, &p);
        rgrads g;
        rgrads_init(&g, v.d, v.h);
        for (int i = 0; i < NP; i++)
            for (int64_t k = 0; k < confsmoe_tensor_numel(confsmoe_expert_grad(v.e, i)); k++)
                g.g[i][k] = f32(confsmoe_expert_grad(v.e, i))[k];
        double *dxr = xcalloc((size_t)(v.n * v.d), sizeof *dxr);
        ref_backward(&p, f32(v.x), f32(v.dy), v.n, dxr, g.g);

        v.a.fail_at = v.a.total + n;
        confsmoe_status st = confsmoe_expert_backward(v.e, s, v.dy, v.dx);
        v.a.fail_at = 0;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(st == CONFSMOE_E_NOMEM, "allocation %ld failed: status %d", n, (int)st);
            CK_ERR(v.ctx, "expert_backward");
            CK_ERR(v.ctx, "out of memory");
            env_check_unchanged(&v);
            /* The handle was not consumed: the retry succeeds. */
            ck_assert_int_eq(confsmoe_expert_backward(v.e, s, v.dy, v.dx), CONFSMOE_OK);
        }
        check_grads(v.e, &g);
        CK_CLOSE(f32(v.dx), dxr, v.n * v.d, "dx");
        free(dxr);
        rgrads_free(&g);
        pcopy_free(&p);
        confsmoe_saved_destroy(s);
        env_close(&v);
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 1);
}
END_TEST

/* ------------------------------------------------------------ aliasing */

/* y may be x (in place), dx may be dy: results still match the reference. */
START_TEST(test_aliasing)
{
    const shape sh = shapes[_i];
    env v;
    env_open(&v, sh.n, sh.d, sh.h, 800 + (uint64_t)_i);
    const size_t nb = confsmoe_tensor_nbytes(v.x);
    float *x0 = xcalloc(1, nb), *dy0 = xcalloc(1, nb);
    if (nb) {
        memcpy(x0, f32(v.x), nb);
        memcpy(dy0, f32(v.dy), nb);
    }
    /* Inference in place. */
    confsmoe_tensor *t = mk2(v.ctx, sh.n, sh.d);
    if (nb)
        memcpy(f32(t), x0, nb);
    env_forward_ok(&v, x0, t, t, NULL);
    /* Training in place, then backward with dx == dy. */
    if (nb)
        memcpy(f32(t), x0, nb);
    confsmoe_saved *s = NULL;
    env_forward_ok(&v, x0, t, t, &s);
    ck_assert_ptr_nonnull(s);
    confsmoe_tensor *g = mk2(v.ctx, sh.n, sh.d);
    if (nb)
        memcpy(f32(g), dy0, nb);
    /* env_backward_ok reads dy for its reference before the call. */
    env_backward_ok(&v, s, x0, g, g);
    confsmoe_saved_destroy(s);
    free(x0);
    free(dy0);
    confsmoe_tensor_destroy(t);
    confsmoe_tensor_destroy(g);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *expert_suite(void)
{
    Suite *s = suite_create("expert");
    TCase *tc;

    tc = tcase_create("create");
    tcase_add_test(tc, test_create_bad_shape);
    tcase_add_test(tc, test_create_null_args);
    tcase_add_test(tc, test_create_size_overflow);
    tcase_add_test(tc, test_accessors);
    tcase_add_test(tc, test_null_expert);
    suite_add_tcase(s, tc);

    tc = tcase_create("init");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_init_range);
    tcase_add_test(tc, test_init_distribution);
    tcase_add_test(tc, test_init_seed);
    tcase_add_test(tc, test_init_grads_zero);
    suite_add_tcase(s, tc);

    tc = tcase_create("reference");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_forward_backward_reference, 0, N_SHAPES);
    tcase_add_test(tc, test_empty_batch);
    tcase_add_loop_test(tc, test_inference_equals_training, 0, N_SHAPES);
    tcase_add_test(tc, test_accumulate_and_zero_grad);
    tcase_add_test(tc, test_dx_null);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_test(tc, test_forward_x_dtype);
    tcase_add_test(tc, test_forward_x_shape);
    tcase_add_test(tc, test_forward_y_shape);
    tcase_add_test(tc, test_forward_null_args);
    tcase_add_test(tc, test_forward_nonfinite);
    tcase_add_test(tc, test_forward_nonfinite_unchecked);
    tcase_add_test(tc, test_backward_null_args);
    tcase_add_test(tc, test_backward_twice);
    tcase_add_test(tc, test_backward_foreign_saved);
    tcase_add_test(tc, test_backward_dy_shape);
    tcase_add_test(tc, test_backward_dx_shape);
    tcase_add_test(tc, test_backward_nonfinite_dy);
    tcase_add_test(tc, test_saved_lifetime);
    suite_add_tcase(s, tc);

    tc = tcase_create("faults");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_fault_create);
    tcase_add_loop_test(tc, test_fault_forward, 0, 2);
    tcase_add_test(tc, test_fault_backward);
    suite_add_tcase(s, tc);

    tc = tcase_create("aliasing");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_aliasing, 0, N_SHAPES);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run(expert_suite());
}
