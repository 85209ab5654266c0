/* Gradient checks of the expert by central differences (the ggml test-grad0
 * recipe): for sampled coordinates of x, W1, b1, W2 and b2, perturb the float
 * value by +-eps, recompute the scalar loss L = sum(y * R) with a fixed random
 * R in double, and compare (L+ - L-) / (2 eps) with what backward (dy = R)
 * produced. Public API only. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum { W1, B1, W2, B2, NP };
enum { T_X = NP, NT }; /* tensors checked: the 4 params and the input */

static const char *const tnames[NT] = {"W1", "b1", "W2", "b2", "x"};

/* Step: 1e-2 in float. The central difference has truncation error
 * eps^2/6 * |L'''| ~ 2e-5 * |L'''| (GELU is smooth, its derivatives are O(1)),
 * and the float32 rounding of L (a sum of at most a few hundred O(1) products,
 * ~1e-6 absolute) divided by 2 eps adds ~5e-5. */
#define EPS 1e-2f

/* Per-coordinate criterion: |analytic - numeric| <= REL * max(|a|, |n|) + ABS.
 * REL = 1e-2 is ~100x the truncation error above for O(1) gradients; ABS = 1e-3
 * is ~20x the rounding noise, so coordinates whose gradient is near zero do not
 * fail on noise alone. Per-coordinate (rather than norm-wise) so that one wrong
 * coordinate or one wrong hidden unit cannot hide in the norm of the others.
 * The sampled analytic gradients are O(0.1 .. 1) (asserted below), so a sign
 * flip (error 2|g|), a missing GELU' factor (error (1 - GELU'(a)) |g|, ~0.5|g|
 * near a = 0) or GELU' without its a*pdf(a) term (error up to ~0.24|g|) exceed
 * this bound by far: test_gradcheck_rejects_wrong proves it on every shape. */
#define REL_TOL 1e-2
#define ABS_TOL 1e-3
#define MAX_SAMPLES 40

/* ------------------------------------------------------------ helpers */


static confsmoe_tensor *mk2(confsmoe_ctx *ctx, int64_t rows, int64_t cols)
{
    const int64_t dims[2] = {rows, cols};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
    return t;
}

/* Values of random sign and magnitude U(lo, hi): bounded away from 0 so that
 * even a 1x1x1 expert has gradients well above the absolute tolerance. */
static void fill_signed(confsmoe_tensor *t, trng *r, double lo, double hi)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++) {
        float m = trng_uniform(r, lo, hi);
        v[i] = (trng_u64(r) >> 63) ? -m : m;
    }
}

typedef struct {
    int64_t n, d, h;
} shape;

/* N = 1, d = 1, d = 3, h != d, d = 130 (past BLIS's small-kernel sizes). */
static const shape shapes[] = {{1, 4, 6}, {5, 1, 3}, {3, 3, 3}, {4, 3, 9}, {2, 130, 17}, {1, 1, 1}, {6, 7, 2}};
#define N_SHAPES ((int)(sizeof shapes / sizeof shapes[0]))

/* ------------------------------------------------------------ the check */

typedef struct {
    test_alloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    confsmoe_expert *e;
    int64_t n, d, h;
    confsmoe_tensor *x, *y, *dy, *dx;
    double *r;                  /* R in double: the same values as dy */
    float *value[NT];           /* where each checked tensor lives */
    float *analytic[NT];        /* backward's gradient of each */
    int64_t numel[NT];
    int64_t *idx[NT];           /* sampled coordinates */
    int64_t m[NT];
    double *num[NT];            /* numeric gradient at the samples */
} gcheck;

static double loss(gcheck *g)
{
    ck_assert_int_eq(confsmoe_expert_forward(g->e, g->x, g->y, NULL), CONFSMOE_OK);
    const float *y = f32(g->y);
    double l = 0.0;
    for (int64_t i = 0; i < g->n * g->d; i++)
        l += (double)y[i] * g->r[i];
    return l;
}

/* Builds the expert and inputs, runs forward + backward (dy = R) for the analytic
 * gradients, then the central differences at the sampled coordinates. */
static void gcheck_open(gcheck *g, int which)
{
    const shape sh = shapes[which];
    memset(g, 0, sizeof *g);
    g->n = sh.n;
    g->d = sh.d;
    g->h = sh.h;
    g->ctx = test_ctx_counted(&g->a, &g->hold, 40 + (uint64_t)which);
    ck_assert_int_eq(confsmoe_expert_create(g->ctx, sh.d, sh.h, &g->e), CONFSMOE_OK);
    /* Parameters wider than the default init: pre-activations ~ N(0, 1), so
     * the samples sit in GELU's curved region on both sides of 0. */
    trng r = {4000 + (uint64_t)which};
    const double d = (double)sh.d, h = (double)sh.h;
    fill_signed(confsmoe_expert_param(g->e, W1), &r, 0.25 / sqrt(d), 2.0 / sqrt(d));
    fill_signed(confsmoe_expert_param(g->e, B1), &r, 0.1, 0.5);
    fill_signed(confsmoe_expert_param(g->e, W2), &r, 0.25 / sqrt(h), 2.0 / sqrt(h));
    fill_signed(confsmoe_expert_param(g->e, B2), &r, 0.1, 0.5);
    g->x = mk2(g->ctx, sh.n, sh.d);
    g->y = mk2(g->ctx, sh.n, sh.d);
    g->dy = mk2(g->ctx, sh.n, sh.d);
    g->dx = mk2(g->ctx, sh.n, sh.d);
    fill_signed(g->x, &r, 0.25, 1.5);
    fill_signed(g->dy, &r, 0.25, 1.0);
    g->r = xcalloc((size_t)(sh.n * sh.d), sizeof *g->r);
    for (int64_t i = 0; i < sh.n * sh.d; i++)
        g->r[i] = f32(g->dy)[i];

    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_expert_forward(g->e, g->x, g->y, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_expert_backward(g->e, s, g->dy, g->dx), CONFSMOE_OK);
    confsmoe_saved_destroy(s);

    for (int t = 0; t < NT; t++) {
        confsmoe_tensor *v = t == T_X ? g->x : confsmoe_expert_param(g->e, t);
        confsmoe_tensor *a = t == T_X ? g->dx : confsmoe_expert_grad(g->e, t);
        g->value[t] = f32(v);
        g->analytic[t] = f32(a);
        g->numel[t] = confsmoe_tensor_numel(v);
        ck_assert_int_eq(confsmoe_tensor_numel(a), g->numel[t]);
        g->idx[t] = xcalloc(MAX_SAMPLES, sizeof(int64_t));
        g->m[t] = test_pick(MAX_SAMPLES, g->numel[t], g->idx[t], 77 * (uint64_t)which + (uint64_t)t);
        g->num[t] = xcalloc(MAX_SAMPLES, sizeof(double));
    }

    /* Central differences. The step actually taken is (v+eps) - (v-eps) as
     * rounded to float, used as the divisor in double. */
    for (int t = 0; t < NT; t++) {
        float *v = g->value[t];
        for (int64_t k = 0; k < g->m[t]; k++) {
            const int64_t i = g->idx[t][k];
            const float orig = v[i], up = orig + EPS, down = orig - EPS;
            v[i] = up;
            const double lp = loss(g);
            v[i] = down;
            const double lm = loss(g);
            v[i] = orig;
            g->num[t][k] = (lp - lm) / ((double)up - (double)down);
        }
    }
}

static void gcheck_close(gcheck *g)
{
    for (int t = 0; t < NT; t++) {
        free(g->idx[t]);
        free(g->num[t]);
    }
    free(g->r);
    confsmoe_tensor_destroy(g->x);
    confsmoe_tensor_destroy(g->y);
    confsmoe_tensor_destroy(g->dy);
    confsmoe_tensor_destroy(g->dx);
    confsmoe_expert_destroy(g->e);
    confsmoe_ctx_destroy(g->ctx);
    ck_assert_int_eq(g->a.live, 0);
}

/* Number of sampled coordinates where `analytic` (indexed like the tensor)
 * disagrees with the numeric gradient; the worst one is reported through *worst. */
static int64_t count_bad(const gcheck *g, int t, const double *analytic, int64_t *worst, double *worst_excess)
{
    int64_t bad = 0;
    *worst = -1;
    *worst_excess = -INFINITY;
    for (int64_t k = 0; k < g->m[t]; k++) {
        const double a = analytic[g->idx[t][k]], n = g->num[t][k];
        const double excess = fabs(a - n) - (REL_TOL * fmax(fabs(a), fabs(n)) + ABS_TOL);
        if (!(excess <= 0.0))
            bad++;
        if (!(excess <= *worst_excess)) {
            *worst_excess = excess;
            *worst = k;
        }
    }
    return bad;
}

static double *to_double(const float *v, int64_t n)
{
    double *out = xcalloc((size_t)n, sizeof *out);
    for (int64_t i = 0; i < n; i++)
        out[i] = v[i];
    return out;
}

START_TEST(test_gradcheck)
{
    gcheck g;
    gcheck_open(&g, _i);
    for (int t = 0; t < NT; t++) {
        double *a = to_double(g.analytic[t], g.numel[t]);
        /* The check has teeth only if the gradient is well above ABS_TOL: with
         * |g| >= 10 ABS_TOL a sign flip errs by 2|g| >= 20 ABS_TOL. */
        double amax = 0.0;
        for (int64_t k = 0; k < g.m[t]; k++)
            amax = fmax(amax, fabs(a[g.idx[t][k]]));
        ck_assert_msg(amax >= 10 * ABS_TOL, "%s: sampled gradient max %g is too small to check", tnames[t], amax);
        int64_t worst;
        double excess;
        int64_t bad = count_bad(&g, t, a, &worst, &excess);
        if (bad) {
            const int64_t i = g.idx[t][worst];
            ck_abort_msg("(N,d,h)=(%lld,%lld,%lld) d%s: %lld of %lld sampled coordinates off; worst [%lld]: "
                         "analytic %.7g numeric %.7g",
                         (long long)g.n, (long long)g.d, (long long)g.h, tnames[t], (long long)bad,
                         (long long)g.m[t], (long long)i, a[i], g.num[t][worst]);
        }
        free(a);
    }
    gcheck_close(&g);
}
END_TEST

/* ------------------------------------------------------------ negative controls */

#define INV_SQRT2 0.70710678118654752440
#define INV_SQRT_2PI 0.39894228040143267794

enum { WRONG_NO_GELU_GRAD, WRONG_CDF_ONLY, N_WRONG };

/* The dx, dW1 and db1 a backward with a broken GELU' would produce, in double:
 * GELU'(a) replaced by 1 (factor forgotten) or by Phi(a) (a*pdf(a) forgotten). */
static void wrong_grads(const gcheck *g, int mode, double *out[NT])
{
    const int64_t n = g->n, d = g->d, h = g->h;
    const float *w1 = g->value[W1], *b1 = g->value[B1], *w2 = g->value[W2], *x = g->value[T_X];
    for (int64_t r = 0; r < n; r++) {
        for (int64_t j = 0; j < h; j++) {
            double pre = b1[j], da = 0.0;
            for (int64_t k = 0; k < d; k++)
                pre += (double)w1[j * d + k] * x[r * d + k];
            for (int64_t i = 0; i < d; i++)
                da += g->r[r * d + i] * w2[i * h + j];
            const double f = mode == WRONG_NO_GELU_GRAD ? 1.0 : 0.5 * (1.0 + erf(pre * INV_SQRT2));
            const double dp = da * f;
            out[B1][j] += dp;
            for (int64_t k = 0; k < d; k++) {
                out[W1][j * d + k] += dp * x[r * d + k];
                out[T_X][r * d + k] += dp * w1[j * d + k];
            }
        }
    }
}

/* The criterion of test_gradcheck rejects, on every shape, the gradients of a
 * backward with a sign flip (each tensor) or a broken GELU' (dx, dW1, db1). */
START_TEST(test_gradcheck_rejects_wrong)
{
    gcheck g;
    gcheck_open(&g, _i);
    int64_t worst;
    double excess;
    for (int t = 0; t < NT; t++) {
        double *a = to_double(g.analytic[t], g.numel[t]);
        ck_assert_int_eq(count_bad(&g, t, a, &worst, &excess), 0);
        for (int64_t i = 0; i < g.numel[t]; i++)
            a[i] = -a[i];
        ck_assert_msg(count_bad(&g, t, a, &worst, &excess) > 0, "d%s with its sign flipped passes", tnames[t]);
        free(a);
    }
    static const char *const what[N_WRONG] = {"without GELU'", "with Phi(a) for GELU'"};
    static const int affected[3] = {W1, B1, T_X};
    for (int mode = 0; mode < N_WRONG; mode++) {
        double *w[NT] = {NULL};
        for (int k = 0; k < 3; k++)
            w[affected[k]] = xcalloc((size_t)g.numel[affected[k]], sizeof(double));
        wrong_grads(&g, mode, w);
        for (int k = 0; k < 3; k++) {
            const int t = affected[k];
            ck_assert_msg(count_bad(&g, t, w[t], &worst, &excess) > 0, "(N,d,h)=(%lld,%lld,%lld) d%s %s passes",
                          (long long)g.n, (long long)g.d, (long long)g.h, tnames[t], what[mode]);
            free(w[t]);
        }
    }
    gcheck_close(&g);
}
END_TEST

static Suite *grad_suite(void)
{
    Suite *s = suite_create("expert_grad");
    TCase *tc = tcase_create("central_differences");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_gradcheck, 0, N_SHAPES);
    tcase_add_loop_test(tc, test_gradcheck_rejects_wrong, 0, N_SHAPES);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run(grad_suite());
}
