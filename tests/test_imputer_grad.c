/* Gradient checks of the stage-2 imputer by central differences (the ggml test-grad0
 * recipe): for sampled coordinates of h, slots and every parameter, perturb the float
 * value by +-eps, recompute L = sum(out * R) in double with a fixed random R, and compare
 * (L+ - L-) / (2 eps) with what backward (dout = R) produced. The top-T sets are constants
 * in backward, so a coordinate whose perturbation changes a kept set is skipped (the test
 * recomputes the kept sets itself, in double); the inputs are chosen so that logits are
 * well separated, and few skips are asserted. Public API only. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* Step 1e-2 in float. The central difference has truncation error eps^2/6 |L'''|
 * (~2e-5 |L'''|; softmax and LayerNorm are smooth, their derivatives O(1) .. O(10) here),
 * and the float rounding of L (a sum of at most a few hundred O(1) products, ~1e-6
 * absolute) divided by 2 eps adds ~5e-5. */
#define EPS 1e-2f

/* Per coordinate: |analytic - numeric| <= REL_TOL max(|a|, |n|) + ABS_TOL. REL_TOL is
 * ~100x the truncation error for O(1) gradients, ABS_TOL ~20x the rounding noise. The
 * sampled gradients are asserted to be O(0.1 .. 10), so a sign flip, a missing factor
 * or the gradient of a neighbouring option (test_gradcheck_rejects_wrong) fails by far. */
#define REL_TOL 1e-2
#define ABS_TOL 1e-3
#define MAX_SAMPLES 25
/* A kept set counts as changed (coordinate skipped) also when the gap between the T-th and
 * the (T+1)-th logit of a row falls below this: double and float could rank differently. */
#define MIN_GAP 1e-5

/* ------------------------------------------------------------ helpers */


static confsmoe_tensor *mkt(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t ndim, int64_t d0, int64_t d1, int64_t d2,
                            int64_t d3)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, ndim, dims, &t), CONFSMOE_OK);
    return t;
}

/* Values of random sign and magnitude U(lo, hi). */
static void fill_signed(confsmoe_tensor *t, trng *r, double lo, double hi)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++) {
        double m = trng_uniform(r, lo, hi);
        v[i] = (float)((trng_u64(r) >> 63) ? -m : m);
    }
}

/* ------------------------------------------------------------ configurations */

enum { MASK_RANDOM, MASK_EVERY, MASK_NONE, MASK_ONE };

typedef struct {
    int32_t M;
    int64_t S;
    int32_t k;
    int64_t d, B;
    int32_t top_t, renorm, sep, compat;
    int mask;
    int32_t writeback; /* CONFSMOE_WRITEBACK_* */
} cfg;

/* Default, each option, T = 1 and T > 1, missing for every / no / exactly one sample,
 * M = 2 and 6, S = 1 and > 1, both write-backs. The comment gives the effective T. */
static const cfg cfgs[] = {
    {3, 2, 2, 6, 4, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 1 */
    {3, 4, 2, 5, 3, 0, 1, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 2, renormalize */
    {3, 3, 2, 6, 4, 0, 0, 1, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 1, separate_value */
    {3, 2, 2, 6, 5, 0, 0, 0, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 1, compat */
    {4, 2, 1, 7, 4, 3, 1, 1, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 3, all options */
    {2, 1, 2, 6, 4, 0, 0, 0, 0, MASK_EVERY, CONFSMOE_WRITEBACK_LN_IMP},  /* M = 2, S = 1: T = L = 1 */
    {6, 1, 2, 5, 3, 0, 1, 0, 0, MASK_ONE, CONFSMOE_WRITEBACK_LN_IMP},    /* M = 6, S = 1, T = 1 of 5 */
    {6, 2, 2, 4, 3, 0, 0, 0, 1, MASK_EVERY, CONFSMOE_WRITEBACK_LN_IMP},  /* M = 6, S = 2, T = 2, compat */
    {3, 2, 2, 5, 3, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP},   /* nothing missing */
    {2, 3, 3, 5, 4, 2, 1, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 2 of 3, k = 3 */
    {6, 2, 2, 6, 4, 4, 0, 1, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP}, /* T = 4, M = 6, S = 2 */
    {3, 2, 2, 6, 4, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_RESIDUAL}, /* T = 1, residual */
    {2, 3, 2, 5, 4, 2, 1, 1, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_RESIDUAL}, /* T = 2 of 3, residual, options */
};
#define N_CFGS ((int)(sizeof cfgs / sizeof cfgs[0]))

static void make_mask(const cfg *c, uint8_t *av, uint64_t seed)
{
    trng r = {seed};
    const int64_t M = c->M, B = c->B;
    for (int64_t i = 0; i < B * M; i++)
        av[i] = 1;
    switch (c->mask) {
    case MASK_NONE:
        break;
    case MASK_ONE:
        av[(B / 2) * M + (M - 1)] = 0;
        break;
    case MASK_EVERY:
        for (int64_t b = 0; b < B; b++) {
            av[b * M] = 0;
            for (int64_t m = 1; m < M; m++)
                av[b * M + m] = trng_uniform(&r, 0, 1) < 0.25 ? 0 : 1;
        }
        break;
    default:
        for (int64_t i = 0; i < B * M; i++)
            av[i] = trng_uniform(&r, 0, 1) < 0.4 ? 0 : 1;
        /* compat: sample 0 misses 0 (real queries for m = 0) and has M-1 (zero queries for
         * M-1, which sample 2 misses); sample 1 misses all (no candidate). */
        av[0] = 0;
        av[M - 1] = 1;
        if (B > 2)
            av[2 * M + M - 1] = 0;
        for (int64_t m = 0; m < M; m++)
            av[M + m] = 0;
        break;
    }
}

/* ------------------------------------------------------------ the check */

#define MAX_T 10 /* h, slots, up to 8 parameters */

typedef struct {
    test_alloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    confsmoe_imputer *imp;
    cfg c;
    int64_t T;
    confsmoe_tensor *h, *slots, *avail, *out, *dout, *dh, *dslots;
    double *r;                    /* R in double: the same values as dout */
    int nt;
    const char *tname[MAX_T];
    float *value[MAX_T];          /* where each checked tensor lives */
    float *analytic[MAX_T];       /* backward's gradient of each */
    int64_t numel[MAX_T];
    int64_t *idx[MAX_T];          /* sampled coordinates */
    int64_t m[MAX_T];
    double *num[MAX_T];           /* numeric gradient at the samples (NAN = skipped) */
    int64_t skipped, checked;
    uint8_t *keep0, *keep1;       /* kept-set signatures */
    int64_t n_keep;
    int iq_w, iq_b, ikv_w, ikv_b, iv_w, iv_b; /* parameter view indices (-1 absent) */
} gcheck;

static double loss(gcheck *g)
{
    ck_assert_int_eq(confsmoe_imputer_forward(g->imp, g->h, g->slots, g->avail, g->out, NULL), CONFSMOE_OK);
    const float *y = f32(g->out);
    double l = 0.0;
    for (int64_t i = 0; i < confsmoe_tensor_numel(g->out); i++)
        l += (double)y[i] * g->r[i];
    return l;
}

static void linear(const float *w, const float *b, const double *x, int64_t d, double *y)
{
    for (int64_t o = 0; o < d; o++) {
        double s = b[o];
        for (int64_t i = 0; i < d; i++)
            s += (double)w[o * d + i] * x[i];
        y[o] = s;
    }
}

/* The kept set of every (missing token, slot) for the current values, in double, as flags
 * over the candidates; returns the smallest gap between a kept and a dropped logit (rows
 * with a compat zero query have exact, stable ties and are left out of the gap). */
static double kept_sets(gcheck *g, uint8_t *keep)
{
    const int64_t M = g->c.M, S = g->c.S, k = g->c.k, d = g->c.d, B = g->c.B;
    const float *hs = f32(g->slots);
    const uint8_t *av = confsmoe_tensor_data(g->avail);
    const float *qw = f32(confsmoe_imputer_param(g->imp, g->iq_w)), *qb = f32(confsmoe_imputer_param(g->imp, g->iq_b));
    const float *kw = f32(confsmoe_imputer_param(g->imp, g->ikv_w));
    const float *kb = f32(confsmoe_imputer_param(g->imp, g->ikv_b));
    double ybar[64], q[64], kv[64], z[64];
    int64_t n = 0;
    double gap = INFINITY;
    for (int64_t b = 0; b < B; b++)
        for (int64_t m = 0; m < M; m++) {
            if (av[b * M + m])
                continue;
            for (int64_t s = 0; s < S; s++) {
                for (int64_t c = 0; c < d; c++) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < k; j++)
                        sum += hs[(((m * B + b) * S + s) * k + j) * d + c];
                    ybar[c] = sum / (double)k;
                }
                const int zero = g->c.compat && av[m];
                if (zero)
                    memset(q, 0, sizeof q);
                else
                    linear(qw, qb, ybar, d, q);
                for (int64_t j = 0; j < k; j++) {
                    int64_t L = 0;
                    for (int64_t m2 = 0; m2 < M; m2++)
                        if (m2 != m && av[b * M + m2])
                            for (int64_t t = 0; t < S; t++) {
                                double yy[64];
                                for (int64_t c = 0; c < d; c++)
                                    yy[c] = hs[(((m2 * B + b) * S + t) * k + j) * d + c];
                                linear(kw, kb, yy, d, kv);
                                double dot = 0.0;
                                for (int64_t c = 0; c < d; c++)
                                    dot += q[c] * kv[c];
                                z[L++] = dot / sqrt((double)d);
                            }
                    const int64_t T = g->T < L ? g->T : L;
                    double lowest_kept = INFINITY, highest_dropped = -INFINITY;
                    for (int64_t c = 0; c < L; c++) {
                        int64_t above = 0;
                        for (int64_t c2 = 0; c2 < L; c2++)
                            above += z[c2] > z[c] || (z[c2] == z[c] && c2 < c);
                        keep[n++] = above < T;
                        if (above < T)
                            lowest_kept = fmin(lowest_kept, z[c]);
                        else
                            highest_dropped = fmax(highest_dropped, z[c]);
                    }
                    if (!zero && T < L)
                        gap = fmin(gap, lowest_kept - highest_dropped);
                }
            }
        }
    g->n_keep = n;
    return gap;
}

static int find_param(confsmoe_imputer *imp, const char *name)
{
    for (int32_t i = 0; i < confsmoe_imputer_n_params(imp); i++)
        if (strcmp(confsmoe_imputer_param_name(imp, i), name) == 0)
            return i;
    return -1;
}

static void gcheck_open(gcheck *g, const cfg *c, uint64_t seed)
{
    memset(g, 0, sizeof *g);
    g->c = *c;
    ck_assert_int_le(c->d, 64);
    ck_assert_int_le(c->M * c->S, 64);
    g->ctx = test_ctx_counted(&g->a, &g->hold, seed);
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = c->d;
    p.n_modalities = c->M;
    p.tokens = c->S;
    p.k = c->k;
    p.top_t = c->top_t;
    p.renormalize = c->renorm;
    p.separate_value = c->sep;
    p.compat = c->compat;
    p.writeback = c->writeback;
    ck_assert_int_eq(confsmoe_imputer_create(g->ctx, &p, &g->imp), CONFSMOE_OK);
    const int64_t def = (c->M - 1) * c->S / 4;
    g->T = c->top_t > 0 ? c->top_t : (def > 1 ? def : 1);
    g->iq_w = find_param(g->imp, "q.w");
    g->iq_b = find_param(g->imp, "q.b");
    g->ikv_w = find_param(g->imp, "kv.w");
    g->ikv_b = find_param(g->imp, "kv.b");
    g->iv_w = find_param(g->imp, "v.w");
    g->iv_b = find_param(g->imp, "v.b");

    /* Wide parameters: logits spread over a few units, so that kept sets are well
     * separated; LayerNorm's affine away from (1, 0). */
    trng r = {seed * 31 + 7};
    const double d = (double)c->d;
    for (int32_t i = 0; i < confsmoe_imputer_n_params(g->imp); i++) {
        const char *name = confsmoe_imputer_param_name(g->imp, i);
        confsmoe_tensor *t = confsmoe_imputer_param(g->imp, i);
        if (strcmp(name, "ln.weight") == 0)
            fill_signed(t, &r, 0.5, 1.5);
        else if (confsmoe_tensor_ndim(t) == 2)
            fill_signed(t, &r, 0.5 / sqrt(d), 2.5 / sqrt(d));
        else
            fill_signed(t, &r, 0.1, 0.5);
    }
    const int64_t M = c->M, S = c->S, B = c->B;
    g->h = mkt(g->ctx, CONFSMOE_F32, 3, B, M * S, c->d, 0);
    g->out = mkt(g->ctx, CONFSMOE_F32, 3, B, M * S, c->d, 0);
    g->dout = mkt(g->ctx, CONFSMOE_F32, 3, B, M * S, c->d, 0);
    g->dh = mkt(g->ctx, CONFSMOE_F32, 3, B, M * S, c->d, 0);
    g->slots = mkt(g->ctx, CONFSMOE_F32, 4, M, B * S, c->k, c->d);
    g->dslots = mkt(g->ctx, CONFSMOE_F32, 4, M, B * S, c->k, c->d);
    g->avail = mkt(g->ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    fill_signed(g->h, &r, 0.1, 1.5);
    fill_signed(g->slots, &r, 0.2, 1.5);
    fill_signed(g->dout, &r, 0.25, 1.0);
    make_mask(c, confsmoe_tensor_data(g->avail), seed * 17 + 3);
    const int64_t nout = confsmoe_tensor_numel(g->out);
    g->r = xcalloc((size_t)nout, sizeof *g->r);
    for (int64_t i = 0; i < nout; i++)
        g->r[i] = f32(g->dout)[i];

    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(g->imp, g->h, g->slots, g->avail, g->out, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(g->imp, s, g->dout, g->dh, g->dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);

    g->tname[0] = "h";
    g->value[0] = f32(g->h);
    g->analytic[0] = f32(g->dh);
    g->numel[0] = confsmoe_tensor_numel(g->h);
    g->tname[1] = "slots";
    g->value[1] = f32(g->slots);
    g->analytic[1] = f32(g->dslots);
    g->numel[1] = confsmoe_tensor_numel(g->slots);
    g->nt = 2;
    for (int32_t i = 0; i < confsmoe_imputer_n_params(g->imp); i++, g->nt++) {
        g->tname[g->nt] = confsmoe_imputer_param_name(g->imp, i);
        g->value[g->nt] = f32(confsmoe_imputer_param(g->imp, i));
        g->analytic[g->nt] = f32(confsmoe_imputer_grad(g->imp, i));
        g->numel[g->nt] = confsmoe_tensor_numel(confsmoe_imputer_param(g->imp, i));
    }

    /* Kept sets: at most (B M S) k (M S) flags. */
    const size_t n_flags = (size_t)(B * M * S * c->k * M * S);
    g->keep0 = xcalloc(n_flags, 1);
    g->keep1 = xcalloc(n_flags, 1);
    const double gap0 = kept_sets(g, g->keep0);
    ck_assert_msg(gap0 >= MIN_GAP, "the chosen inputs have near-tied logits (gap %g)", gap0);
    const int64_t n_keep = g->n_keep;

    /* Central differences; the step actually taken is (v+eps) - (v-eps) in float. */
    for (int t = 0; t < g->nt; t++) {
        g->idx[t] = xcalloc(MAX_SAMPLES, sizeof(int64_t));
        g->num[t] = xcalloc(MAX_SAMPLES, sizeof(double));
        g->m[t] = test_pick(MAX_SAMPLES, g->numel[t], g->idx[t], 77 * seed + (uint64_t)t);
        float *v = g->value[t];
        for (int64_t k = 0; k < g->m[t]; k++) {
            const int64_t i = g->idx[t][k];
            const float orig = v[i], up = orig + EPS, down = orig - EPS;
            int stable = 1;
            v[i] = up;
            const double lp = loss(g);
            stable &= kept_sets(g, g->keep1) >= MIN_GAP && memcmp(g->keep0, g->keep1, (size_t)n_keep) == 0;
            v[i] = down;
            const double lm = loss(g);
            stable &= kept_sets(g, g->keep1) >= MIN_GAP && memcmp(g->keep0, g->keep1, (size_t)n_keep) == 0;
            v[i] = orig;
            g->checked++;
            if (!stable) {
                g->num[t][k] = NAN;
                g->skipped++;
                continue;
            }
            g->num[t][k] = (lp - lm) / ((double)up - (double)down);
        }
    }
}

static void gcheck_close(gcheck *g)
{
    for (int t = 0; t < g->nt; t++) {
        free(g->idx[t]);
        free(g->num[t]);
    }
    free(g->r);
    free(g->keep0);
    free(g->keep1);
    confsmoe_tensor *t[] = {g->h, g->slots, g->avail, g->out, g->dout, g->dh, g->dslots};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        confsmoe_tensor_destroy(t[i]);
    confsmoe_imputer_destroy(g->imp);
    confsmoe_ctx_destroy(g->ctx);
    ck_assert_int_eq(g->a.live, 0);
}

/* Number of sampled coordinates where `analytic` (indexed like the tensor) disagrees with
 * the numeric gradient; the worst one is reported through *worst. */
static int64_t count_bad(const gcheck *g, int t, const double *analytic, int64_t *worst)
{
    int64_t bad = 0;
    double worst_excess = -INFINITY;
    *worst = -1;
    for (int64_t k = 0; k < g->m[t]; k++) {
        const double n = g->num[t][k];
        if (isnan(n))
            continue;
        const double a = analytic[g->idx[t][k]];
        const double excess = fabs(a - n) - (REL_TOL * fmax(fabs(a), fabs(n)) + ABS_TOL);
        if (!(excess <= 0.0))
            bad++;
        if (!(excess <= worst_excess)) {
            worst_excess = excess;
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

/* Largest |numeric gradient| over the checked samples. */
static double numeric_max(const gcheck *g, int t)
{
    double mx = 0.0;
    for (int64_t k = 0; k < g->m[t]; k++)
        if (!isnan(g->num[t][k]))
            mx = fmax(mx, fabs(g->num[t][k]));
    return mx;
}

static void assert_all_pass(const gcheck *g, int which)
{
    for (int t = 0; t < g->nt; t++) {
        double *a = to_double(g->analytic[t], g->numel[t]);
        int64_t worst;
        const int64_t bad = count_bad(g, t, a, &worst);
        if (bad) {
            const int64_t i = g->idx[t][worst];
            ck_abort_msg("cfg %d d%s: %lld of %lld sampled coordinates off; worst [%lld]: analytic %.7g numeric %.7g",
                         which, g->tname[t], (long long)bad, (long long)g->m[t], (long long)i, a[i],
                         g->num[t][worst]);
        }
        free(a);
    }
}

START_TEST(test_gradcheck)
{
    gcheck g;
    gcheck_open(&g, &cfgs[_i], 100 + (uint64_t)_i);
    assert_all_pass(&g, _i);
    /* Teeth: each tensor has sampled gradients well above ABS_TOL, unless its true gradient
     * is zero: slots and parameters when nothing is imputed; kv.b under separate_value (it
     * shifts a whole logit row, which the softmax ignores); the query when there is a single
     * candidate (M = 2, S = 1) or renormalize keeps a single weight (both always 1). Those
     * must be ~0 in the analytic gradient too. */
    const cfg *c = &cfgs[_i];
    for (int t = 0; t < g.nt; t++) {
        const char *name = g.tname[t];
        const int is_q = strncmp(name, "q.", 2) == 0;
        const int expect_zero = (t >= 1 && c->mask == MASK_NONE) || (c->sep && strcmp(name, "kv.b") == 0) ||
                                (is_q && ((c->renorm && g.T == 1) || (c->M - 1) * c->S == 1));
        const double mx = numeric_max(&g, t);
        if (!expect_zero) {
            ck_assert_msg(mx >= 10 * ABS_TOL, "cfg %d d%s: sampled gradient max %g is too small to check", _i, name,
                          mx);
            continue;
        }
        ck_assert_msg(mx < ABS_TOL, "cfg %d d%s: numeric gradient %g, expected 0", _i, name, mx);
        for (int64_t i = 0; i < g.numel[t]; i++)
            ck_assert_msg(fabs(g.analytic[t][i]) <= ABS_TOL, "cfg %d d%s[%lld] = %g where the gradient is 0", _i,
                          name, (long long)i, (double)g.analytic[t][i]);
    }
    /* Well-separated logits: few coordinates need skipping. */
    ck_assert_msg(g.skipped * 10 <= g.checked, "cfg %d: %lld of %lld coordinates skipped (top-T set changed)", _i,
                  (long long)g.skipped, (long long)g.checked);
    gcheck_close(&g);
}
END_TEST

/* ------------------------------------------------------------ negative controls */

/* The criterion rejects (1) every gradient with its sign flipped, (2) a gradient scaled by
 * 1.05, and (3) the exact gradients of a neighbouring configuration (one option toggled, or
 * T + 1), the shape a backward that forgets an option would have. */
static const struct {
    int cfg;
    const char *what;
    int dt, drenorm, dsep, dcompat;
} neighbours[] = {
    {1, "renormalize off", 0, 1, 0, 0}, {3, "compat off", 0, 0, 0, 1}, {7, "compat off", 0, 0, 0, 1},
    {9, "T + 1", 1, 0, 0, 0},           {4, "renormalize off", 0, 1, 0, 0}, {10, "T - 1", -1, 0, 0, 0},
    {12, "renormalize off", 0, 1, 0, 0},
};

START_TEST(test_gradcheck_rejects_wrong)
{
    const int which = neighbours[_i].cfg;
    gcheck g;
    gcheck_open(&g, &cfgs[which], 100 + (uint64_t)which);
    int64_t worst;
    for (int t = 0; t < g.nt; t++) {
        if (numeric_max(&g, t) < 10 * ABS_TOL)
            continue;
        double *a = to_double(g.analytic[t], g.numel[t]);
        ck_assert_int_eq(count_bad(&g, t, a, &worst), 0);
        for (int64_t i = 0; i < g.numel[t]; i++)
            a[i] = -a[i];
        ck_assert_msg(count_bad(&g, t, a, &worst) > 0, "d%s with its sign flipped passes", g.tname[t]);
        for (int64_t i = 0; i < g.numel[t]; i++)
            a[i] = -1.05 * a[i];
        ck_assert_msg(count_bad(&g, t, a, &worst) > 0, "d%s scaled by 1.05 passes", g.tname[t]);
        free(a);
    }

    /* The neighbour: same parameters and inputs, one option different. */
    cfg c = cfgs[which];
    c.top_t = (int32_t)(g.T + neighbours[_i].dt);
    c.renorm ^= neighbours[_i].drenorm;
    c.sep ^= neighbours[_i].dsep;
    c.compat ^= neighbours[_i].dcompat;
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = c.d;
    p.n_modalities = c.M;
    p.tokens = c.S;
    p.k = c.k;
    p.top_t = c.top_t;
    p.renormalize = c.renorm;
    p.separate_value = c.sep;
    p.compat = c.compat;
    p.writeback = c.writeback;
    confsmoe_imputer *other = NULL;
    ck_assert_int_eq(confsmoe_imputer_create(g.ctx, &p, &other), CONFSMOE_OK);
    for (int32_t i = 0; i < confsmoe_imputer_n_params(other); i++) {
        confsmoe_tensor *t = confsmoe_imputer_param(other, i);
        ck_assert_int_eq(confsmoe_tensor_copy_in(t, confsmoe_tensor_data(confsmoe_imputer_param(g.imp, i)),
                                                 confsmoe_tensor_nbytes(t)),
                         CONFSMOE_OK);
    }
    confsmoe_tensor *dh = mkt(g.ctx, CONFSMOE_F32, 3, c.B, c.M * c.S, c.d, 0);
    confsmoe_tensor *dslots = mkt(g.ctx, CONFSMOE_F32, 4, c.M, c.B * c.S, c.k, c.d);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(other, g.h, g.slots, g.avail, g.out, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(other, s, g.dout, dh, dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    int64_t rejected = 0;
    for (int t = 0; t < g.nt; t++) {
        const float *w = t == 0 ? f32(dh) : t == 1 ? f32(dslots) : f32(confsmoe_imputer_grad(other, t - 2));
        double *a = to_double(w, g.numel[t]);
        rejected += count_bad(&g, t, a, &worst) > 0;
        free(a);
    }
    ck_assert_msg(rejected >= 1, "cfg %d: the gradients with %s pass the check", which, neighbours[_i].what);
    confsmoe_tensor_destroy(dh);
    confsmoe_tensor_destroy(dslots);
    confsmoe_imputer_destroy(other);
    gcheck_close(&g);
}
END_TEST

static Suite *grad_suite(void)
{
    Suite *s = suite_create("imputer_grad");
    TCase *tc = tcase_create("central_differences");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_gradcheck, 0, N_CFGS);
    tcase_add_loop_test(tc, test_gradcheck_rejects_wrong, 0, (int)(sizeof neighbours / sizeof *neighbours));
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run(grad_suite());
}
