/* Unit tests of the two-stage imputer (docs/MODEL.md, section 5): parameters and their
 * validation, initialisation, stage 1 (fill) and stage 2 (forward/backward) against an
 * independent double-precision reference written here with plain loops, argument errors,
 * fault injection and aliasing. Public API only. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* Forward must match the double reference with a NORM-WISE relative error
 * ||got - ref|| / ||ref|| <= TOL over the imputed rows. Float32 rounding through two
 * d x d projections, a softmax and a LayerNorm gives ~1e-7 relative; a wrong index,
 * a missing 1/sqrt(d) or a wrong candidate set is off by O(1). */
#define TOL 1e-5
/* Backward against central differences of the double reference (step 1e-5 in double:
 * truncation ~1e-10, rounding ~1e-11): the float backward is ~1e-6 relative. */
#define GRAD_TOL 1e-4
#define TINY 1e-30

/* ------------------------------------------------------------ test helpers */



static confsmoe_tensor *mkt(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t ndim, int64_t d0, int64_t d1, int64_t d2,
                            int64_t d3)
{
    const int64_t dims[4] = {d0, d1, d2, d3};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, ndim, dims, &t), CONFSMOE_OK);
    return t;
}

static int tequal(confsmoe_tensor *a, confsmoe_tensor *b)
{
    size_t n = confsmoe_tensor_nbytes(a);
    return n == confsmoe_tensor_nbytes(b) &&
           (n == 0 || memcmp(confsmoe_tensor_data(a), confsmoe_tensor_data(b), n) == 0);
}

#define CK_ERR(ctx, sub)                                                                                   \
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), (sub)) != NULL, "last_error \"%s\" lacks \"%s\"", \
                  confsmoe_ctx_last_error(ctx), (sub))

/* Parameters and gradients of an imputer, to prove a failed call changed none. */
#define MAX_P 8
typedef struct {
    int32_t n;
    void *p[MAX_P], *g[MAX_P];
} isnap;

static void isnap_take(confsmoe_imputer *imp, isnap *s)
{
    s->n = confsmoe_imputer_n_params(imp);
    for (int32_t i = 0; i < s->n; i++) {
        s->p[i] = tsnap(confsmoe_imputer_param(imp, i));
        s->g[i] = tsnap(confsmoe_imputer_grad(imp, i));
    }
}

static void isnap_check(confsmoe_imputer *imp, const isnap *s)
{
    for (int32_t i = 0; i < s->n; i++) {
        ck_assert_msg(tsame(confsmoe_imputer_param(imp, i), s->p[i]), "param %d changed", i);
        ck_assert_msg(tsame(confsmoe_imputer_grad(imp, i), s->g[i]), "grad %d changed", i);
    }
}

static void isnap_free(isnap *s)
{
    for (int32_t i = 0; i < s->n; i++) {
        free(s->p[i]);
        free(s->g[i]);
    }
}

static int same_params(confsmoe_imputer *a, confsmoe_imputer *b)
{
    if (confsmoe_imputer_n_params(a) != confsmoe_imputer_n_params(b))
        return 0;
    for (int32_t i = 0; i < confsmoe_imputer_n_params(a); i++)
        if (!tequal(confsmoe_imputer_param(a, i), confsmoe_imputer_param(b, i)))
            return 0;
    return 1;
}

static int grads_zero(confsmoe_imputer *imp)
{
    for (int32_t i = 0; i < confsmoe_imputer_n_params(imp); i++) {
        confsmoe_tensor *g = confsmoe_imputer_grad(imp, i);
        for (int64_t k = 0; k < confsmoe_tensor_numel(g); k++)
            if (f32(g)[k] != 0.0f)
                return 0;
    }
    return 1;
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

/* M = 2 and 6, S = 1 and > 1, d = 1 and 130, T = 1 and > 1 (default and explicit, capped),
 * each option alone and all together, missing for every / no / exactly one sample, both
 * write-backs. */
static const cfg cfgs[] = {
    {2, 1, 2, 8, 5, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {6, 1, 2, 8, 6, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 8, 2, 16, 4, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 4, 3, 5, 5, 0, 1, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 3, 2, 7, 5, 0, 0, 1, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 2, 2, 6, 6, 0, 0, 0, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {4, 2, 1, 9, 5, 3, 1, 1, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {2, 3, 2, 4, 3, 0, 0, 0, 0, MASK_EVERY, CONFSMOE_WRITEBACK_LN_IMP},
    {6, 2, 2, 6, 4, 2, 0, 1, 0, MASK_EVERY, CONFSMOE_WRITEBACK_LN_IMP},
    {6, 2, 2, 6, 4, 0, 1, 0, 1, MASK_ONE, CONFSMOE_WRITEBACK_LN_IMP},
    {2, 1, 2, 5, 3, 0, 0, 0, 1, MASK_ONE, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 2, 2, 6, 4, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP},
    {1, 2, 2, 4, 3, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 2, 2, 130, 3, 100, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 2, 2, 1, 4, 2, 1, 1, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP},
    {5, 1, 2, 3, 7, 0, 1, 1, 1, MASK_EVERY, CONFSMOE_WRITEBACK_LN_IMP},
    {3, 2, 2, 6, 5, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_RESIDUAL},
    {4, 2, 1, 9, 5, 3, 1, 1, 1, MASK_RANDOM, CONFSMOE_WRITEBACK_RESIDUAL},
    {2, 3, 2, 4, 3, 0, 0, 0, 0, MASK_EVERY, CONFSMOE_WRITEBACK_RESIDUAL},
};
#define N_CFGS ((int)(sizeof cfgs / sizeof cfgs[0]))

static int64_t default_t(int64_t M, int64_t S)
{
    int64_t t = (M - 1) * S / 4;
    return t > 1 ? t : 1;
}

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
        /* Modality 0 is missing for the whole batch; some others too. */
        for (int64_t b = 0; b < B; b++) {
            av[b * M] = 0;
            for (int64_t m = 1; m < M; m++)
                av[b * M + m] = trng_uniform(&r, 0, 1) < 0.25 ? 0 : 1;
        }
        break;
    default:
        for (int64_t i = 0; i < B * M; i++)
            av[i] = trng_uniform(&r, 0, 1) < 0.4 ? 0 : 1;
        /* Sample 0 misses modality 0 (compat: a real query for m = 0) and has modality
         * M-1 (compat: zero queries for M-1, which sample 2 misses); sample 1 misses all
         * (no candidate at all: LN(h) alone). */
        av[0] = 0;
        if (M >= 2)
            av[M - 1] = 1;
        if (B > 2 && M >= 2)
            av[2 * M + M - 1] = 0;
        if (B > 1)
            for (int64_t m = 0; m < M; m++)
                av[M + m] = 0;
        break;
    }
}

static confsmoe_imputer *make_imputer(confsmoe_ctx *ctx, const cfg *c)
{
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
    confsmoe_imputer *imp = NULL;
    ck_assert_int_eq(confsmoe_imputer_create(ctx, &p, &imp), CONFSMOE_OK);
    ck_assert_ptr_nonnull(imp);
    return imp;
}

/* Parameters the tests choose: wider than the default init, so that the attention
 * logits spread (top-T sets are well defined) and LayerNorm's affine matters. */
static void set_params(confsmoe_imputer *imp, uint64_t seed)
{
    trng r = {seed};
    for (int32_t i = 0; i < confsmoe_imputer_n_params(imp); i++) {
        const char *name = confsmoe_imputer_param_name(imp, i);
        confsmoe_tensor *t = confsmoe_imputer_param(imp, i);
        const double d = (double)confsmoe_tensor_dim(t, 0);
        if (strcmp(name, "ln.weight") == 0)
            fill_uniform(t, &r, 0.5, 1.5);
        else if (confsmoe_tensor_ndim(t) == 2)
            fill_uniform(t, &r, -2.0 / sqrt(d), 2.0 / sqrt(d));
        else
            fill_uniform(t, &r, -0.5, 0.5);
    }
}

typedef struct {
    test_alloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    confsmoe_imputer *imp;
    cfg c;
    confsmoe_tensor *h, *slots, *avail, *out, *dout, *dh, *dslots;
} env;

static void env_open(env *v, const cfg *c, uint64_t seed)
{
    memset(v, 0, sizeof *v);
    v->c = *c;
    v->ctx = test_ctx_counted(&v->a, &v->hold, seed);
    v->imp = make_imputer(v->ctx, c);
    set_params(v->imp, seed * 7 + 1);
    const int64_t M = c->M, S = c->S, B = c->B, d = c->d;
    v->h = mkt(v->ctx, CONFSMOE_F32, 3, B, M * S, d, 0);
    v->out = mkt(v->ctx, CONFSMOE_F32, 3, B, M * S, d, 0);
    v->dout = mkt(v->ctx, CONFSMOE_F32, 3, B, M * S, d, 0);
    v->dh = mkt(v->ctx, CONFSMOE_F32, 3, B, M * S, d, 0);
    v->slots = mkt(v->ctx, CONFSMOE_F32, 4, M, B * S, c->k, d);
    v->dslots = mkt(v->ctx, CONFSMOE_F32, 4, M, B * S, c->k, d);
    v->avail = mkt(v->ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    trng r = {seed * 13 + 5};
    fill_uniform(v->h, &r, -2.0, 2.0);
    fill_uniform(v->slots, &r, -1.5, 1.5);
    fill_uniform(v->dout, &r, -1.0, 1.0);
    make_mask(c, u8(v->avail), seed * 17 + 3);
}

static void env_close(env *v)
{
    confsmoe_tensor *t[] = {v->h, v->slots, v->avail, v->out, v->dout, v->dh, v->dslots};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        confsmoe_tensor_destroy(t[i]);
    confsmoe_imputer_destroy(v->imp);
    confsmoe_ctx_destroy(v->ctx);
    ck_assert_int_eq(v->a.live, 0);
}

/* ------------------------------------------------------------ the reference */

enum { R_QW, R_QB, R_KW, R_KB, R_VW, R_VB, R_LW, R_LB, NR };
static const char *const role_names[NR] = {"q.w", "q.b", "kv.w", "kv.b", "v.w", "v.b", "ln.weight", "ln.bias"};

typedef struct {
    int64_t M, S, k, d, T;
    int renorm, sep, compat, writeback;
    double *w[NR];   /* NULL when absent */
    int64_t n[NR];   /* element counts */
} refm;

static int role_of(const char *name)
{
    for (int r = 0; r < NR; r++)
        if (strcmp(name, role_names[r]) == 0)
            return r;
    ck_abort_msg("unknown parameter name %s", name);
    return -1;
}

static void refm_get(confsmoe_imputer *imp, const cfg *c, refm *r)
{
    memset(r, 0, sizeof *r);
    r->M = c->M;
    r->S = c->S;
    r->k = c->k;
    r->d = c->d;
    r->T = c->top_t > 0 ? c->top_t : default_t(c->M, c->S);
    r->renorm = c->renorm;
    r->sep = c->sep;
    r->compat = c->compat;
    r->writeback = c->writeback;
    for (int32_t i = 0; i < confsmoe_imputer_n_params(imp); i++) {
        const int role = role_of(confsmoe_imputer_param_name(imp, i));
        confsmoe_tensor *t = confsmoe_imputer_param(imp, i);
        r->n[role] = confsmoe_tensor_numel(t);
        r->w[role] = xcalloc((size_t)r->n[role], sizeof(double));
        for (int64_t k = 0; k < r->n[role]; k++)
            r->w[role][k] = f32(t)[k];
    }
}

static void refm_free(refm *r)
{
    for (int i = 0; i < NR; i++)
        free(r->w[i]);
}

static void ref_layernorm(const double *x, const double *g, const double *b, int64_t d, double *out)
{
    double mu = 0.0, var = 0.0;
    for (int64_t c = 0; c < d; c++)
        mu += x[c];
    mu /= (double)d;
    for (int64_t c = 0; c < d; c++)
        var += (x[c] - mu) * (x[c] - mu);
    const double rs = 1.0 / sqrt(var / (double)d + 1e-5);
    for (int64_t c = 0; c < d; c++)
        out[c] = (x[c] - mu) * rs * g[c] + b[c];
}

/* y = W x + b for a [d, d] W. */
static void ref_linear(const double *w, const double *b, const double *x, int64_t d, double *y)
{
    for (int64_t o = 0; o < d; o++) {
        double s = b[o];
        for (int64_t i = 0; i < d; i++)
            s += w[o * d + i] * x[i];
        y[o] = s;
    }
}

/* out [B, M S, d] from h [B, M S, d], slots [M, B S, k, d] and avail [B, M]: plain loops
 * over (b, m, s), no batching, the formulas of docs/MODEL.md, section 5. */
static void ref_forward(const refm *r, int64_t B, const double *h, const double *slots, const uint8_t *avail,
                        double *out)
{
    const int64_t M = r->M, S = r->S, k = r->k, d = r->d;
    memcpy(out, h, (size_t)(B * M * S * d) * sizeof *out);
    double *ybar = xcalloc((size_t)d, sizeof(double)), *q = xcalloc((size_t)d, sizeof(double));
    double *ihat = xcalloc((size_t)d, sizeof(double)), *x = xcalloc((size_t)d, sizeof(double));
    double *tmp = xcalloc((size_t)d, sizeof(double));
    const int64_t maxL = M * S;
    double *kv = xcalloc((size_t)(maxL * d), sizeof(double)), *val = xcalloc((size_t)(maxL * d), sizeof(double));
    double *p = xcalloc((size_t)maxL, sizeof(double));
    int64_t *cm = xcalloc((size_t)maxL, sizeof(int64_t)), *ct = xcalloc((size_t)maxL, sizeof(int64_t));
    for (int64_t b = 0; b < B; b++)
        for (int64_t m = 0; m < M; m++) {
            if (avail[b * M + m])
                continue;
            int64_t L = 0;
            for (int64_t m2 = 0; m2 < M; m2++)
                if (m2 != m && avail[b * M + m2])
                    for (int64_t t = 0; t < S; t++) {
                        cm[L] = m2;
                        ct[L] = t;
                        L++;
                    }
            const int64_t T = r->T < L ? r->T : L;
            for (int64_t s = 0; s < S; s++) {
                for (int64_t c = 0; c < d; c++) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < k; j++)
                        sum += slots[(((m * B + b) * S + s) * k + j) * d + c];
                    ybar[c] = sum / (double)k;
                }
                if (r->compat && avail[m]) /* avail[0][m]: sample 0 has m */
                    memset(q, 0, (size_t)d * sizeof *q);
                else
                    ref_linear(r->w[R_QW], r->w[R_QB], ybar, d, q);
                memset(ihat, 0, (size_t)d * sizeof *ihat);
                for (int64_t j = 0; j < k && L > 0; j++) {
                    double top = -INFINITY;
                    for (int64_t c = 0; c < L; c++) {
                        const double *y = slots + (((cm[c] * B + b) * S + ct[c]) * k + j) * d;
                        ref_linear(r->w[R_KW], r->w[R_KB], y, d, kv + c * d);
                        if (r->sep)
                            ref_linear(r->w[R_VW], r->w[R_VB], y, d, val + c * d);
                        else
                            memcpy(val + c * d, kv + c * d, (size_t)d * sizeof(double));
                        double z = 0.0;
                        for (int64_t e = 0; e < d; e++)
                            z += q[e] * kv[c * d + e];
                        p[c] = z / sqrt((double)d);
                        top = fmax(top, p[c]);
                    }
                    double sum = 0.0;
                    for (int64_t c = 0; c < L; c++) {
                        p[c] = exp(p[c] - top);
                        sum += p[c];
                    }
                    for (int64_t c = 0; c < L; c++)
                        p[c] /= sum;
                    /* Candidate c is kept when fewer than T others rank above it
                     * (larger weight, or equal weight and a lower index). */
                    double kept_sum = 0.0;
                    int keep[64];
                    ck_assert_int_le(L, 64);
                    for (int64_t c = 0; c < L; c++) {
                        int64_t above = 0;
                        for (int64_t c2 = 0; c2 < L; c2++)
                            above += p[c2] > p[c] || (p[c2] == p[c] && c2 < c);
                        keep[c] = above < T;
                        kept_sum += keep[c] ? p[c] : 0.0;
                    }
                    for (int64_t c = 0; c < L; c++) {
                        if (!keep[c])
                            continue;
                        const double a = r->renorm ? p[c] / kept_sum : p[c];
                        for (int64_t e = 0; e < d; e++)
                            ihat[e] += a * val[c * d + e];
                    }
                }
                const int64_t row = (b * M + m) * S + s;
                for (int64_t c = 0; c < d; c++)
                    x[c] = h[row * d + c] + ihat[c];
                if (r->writeback == CONFSMOE_WRITEBACK_RESIDUAL) {
                    memcpy(out + row * d, ihat, (size_t)d * sizeof(double));
                } else if (r->compat) {
                    ref_layernorm(x, r->w[R_LW], r->w[R_LB], d, tmp);
                    ref_layernorm(tmp, r->w[R_LW], r->w[R_LB], d, out + row * d);
                } else {
                    ref_layernorm(x, r->w[R_LW], r->w[R_LB], d, out + row * d);
                }
            }
        }
    free(ybar);
    free(q);
    free(ihat);
    free(x);
    free(tmp);
    free(kv);
    free(val);
    free(p);
    free(cm);
    free(ct);
}

static double *to_double(confsmoe_tensor *t)
{
    const int64_t n = confsmoe_tensor_numel(t);
    double *out = xcalloc((size_t)n, sizeof *out);
    for (int64_t i = 0; i < n; i++)
        out[i] = f32(t)[i];
    return out;
}

/* The reference output for the env's current params and inputs. */
static double *env_ref(env *v, const refm *r)
{
    double *h = to_double(v->h), *sl = to_double(v->slots);
    double *out = xcalloc((size_t)confsmoe_tensor_numel(v->h), sizeof(double));
    ref_forward(r, v->c.B, h, sl, u8(v->avail), out);
    free(h);
    free(sl);
    return out;
}

/* Present rows are h bit for bit; imputed rows match the reference. */
static void check_out(env *v, const float *h0, const float *out, const double *ref, const char *what)
{
    const int64_t M = v->c.M, S = v->c.S, d = v->c.d;
    const uint8_t *av = u8(v->avail);
    double num = 0.0, den = 0.0;
    for (int64_t b = 0; b < v->c.B; b++)
        for (int64_t m = 0; m < M; m++) {
            const int64_t at = (b * M + m) * S * d;
            if (av[b * M + m]) {
                ck_assert_msg(memcmp(out + at, h0 + at, (size_t)(S * d) * sizeof(float)) == 0,
                              "%s: present row (b=%lld, m=%lld) is not h", what, (long long)b, (long long)m);
                continue;
            }
            for (int64_t i = 0; i < S * d; i++) {
                ck_assert_msg(isfinite(out[at + i]), "%s: out[%lld] is not finite", what, (long long)(at + i));
                num += (out[at + i] - ref[at + i]) * (out[at + i] - ref[at + i]);
                den += ref[at + i] * ref[at + i];
            }
        }
    const double err = sqrt(num) / fmax(sqrt(den), TINY);
    ck_assert_msg(err <= TOL, "%s: imputed rows off the reference by %.3g (norm-wise relative)", what, err);
}

/* ------------------------------------------------------------ parameters */

START_TEST(test_params_init)
{
    confsmoe_imputer_params p;
    memset(&p, 0xab, sizeof p);
    confsmoe_imputer_params_init(&p);
    ck_assert_uint_eq(p.struct_size, sizeof p);
    ck_assert_uint_eq(confsmoe_sizeof_imputer_params(), sizeof p);
    ck_assert_int_eq(p.d, 0);
    ck_assert_int_eq(p.n_modalities, 0);
    ck_assert_int_eq(p.tokens, 1);
    ck_assert_int_eq(p.k, 2);
    ck_assert_int_eq(p.top_t, 0);
    ck_assert_int_eq(p.renormalize, 0);
    ck_assert_int_eq(p.separate_value, 0);
    ck_assert_int_eq(p.compat, 0);
    confsmoe_imputer_params_init(NULL);
}
END_TEST

typedef struct {
    const char *what;
    void (*edit)(confsmoe_imputer_params *p);
    confsmoe_status status;
    const char *message;
} bad_param;

/* Smaller than the struct of the first release (which ends with compat). */
static void e_size(confsmoe_imputer_params *p) { p->struct_size = offsetof(confsmoe_imputer_params, compat); }
static void e_size0(confsmoe_imputer_params *p) { p->struct_size = 0; }
static void e_d0(confsmoe_imputer_params *p) { p->d = 0; }
static void e_dneg(confsmoe_imputer_params *p) { p->d = -5; }
static void e_m0(confsmoe_imputer_params *p) { p->n_modalities = 0; }
static void e_mneg(confsmoe_imputer_params *p) { p->n_modalities = -2; }
static void e_s0(confsmoe_imputer_params *p) { p->tokens = 0; }
static void e_k0(confsmoe_imputer_params *p) { p->k = 0; }
static void e_t(confsmoe_imputer_params *p) { p->top_t = -1; }
static void e_renorm(confsmoe_imputer_params *p) { p->renormalize = 2; }
static void e_sep(confsmoe_imputer_params *p) { p->separate_value = -1; }
static void e_compat(confsmoe_imputer_params *p) { p->compat = 7; }
static void e_writeback(confsmoe_imputer_params *p) { p->writeback = 2; }
static void e_overflow(confsmoe_imputer_params *p) { p->tokens = INT64_C(1) << 40; p->d = INT64_C(1) << 30; }
static void e_overflow_d(confsmoe_imputer_params *p) { p->d = INT64_C(1) << 33; }

static const bad_param bad_params[] = {
    {"struct_size", e_size, CONFSMOE_E_VERSION, "struct_size"},
    {"struct_size 0", e_size0, CONFSMOE_E_VERSION, "struct_size is 0"},
    {"d = 0", e_d0, CONFSMOE_E_SHAPE, "d is 0, must be >= 1"},
    {"d < 0", e_dneg, CONFSMOE_E_SHAPE, "d is -5"},
    {"M = 0", e_m0, CONFSMOE_E_SHAPE, "n_modalities is 0"},
    {"M < 0", e_mneg, CONFSMOE_E_SHAPE, "n_modalities is -2"},
    {"S = 0", e_s0, CONFSMOE_E_SHAPE, "tokens is 0"},
    {"k = 0", e_k0, CONFSMOE_E_SHAPE, "k is 0"},
    {"top_t < 0", e_t, CONFSMOE_E_INVALID_ARGUMENT, "top_t is -1"},
    {"renormalize", e_renorm, CONFSMOE_E_INVALID_ARGUMENT, "must be 0 or 1"},
    {"separate_value", e_sep, CONFSMOE_E_INVALID_ARGUMENT, "must be 0 or 1"},
    {"compat", e_compat, CONFSMOE_E_INVALID_ARGUMENT, "must be 0 or 1"},
    {"writeback", e_writeback, CONFSMOE_E_INVALID_ARGUMENT, "writeback is 2"},
    {"M S k d overflows", e_overflow, CONFSMOE_E_NOMEM, "overflow"},
    {"d x d overflows", e_overflow_d, CONFSMOE_E_NOMEM, "overflow"},
};

START_TEST(test_create_bad_params)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 1);
    const long base = a.live;
    for (size_t i = 0; i < sizeof bad_params / sizeof *bad_params; i++) {
        confsmoe_imputer_params p;
        confsmoe_imputer_params_init(&p);
        p.d = 4;
        p.n_modalities = 3;
        bad_params[i].edit(&p);
        confsmoe_imputer *imp = (confsmoe_imputer *)(void *)&a;
        const confsmoe_status st = confsmoe_imputer_create(ctx, &p, &imp);
        ck_assert_msg(st == bad_params[i].status, "%s: status %d, expected %d", bad_params[i].what, (int)st,
                      (int)bad_params[i].status);
        ck_assert_msg(imp == NULL, "%s: out not NULL", bad_params[i].what);
        CK_ERR(ctx, "imputer_create");
        CK_ERR(ctx, bad_params[i].message);
        ck_assert_int_eq(a.live, base);
    }
    /* The required fields really are required. */
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    confsmoe_imputer *imp = NULL;
    ck_assert_int_eq(confsmoe_imputer_create(ctx, &p, &imp), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(imp);
    ck_assert_int_eq(a.live, base);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_create_null_args)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 1);
    const long base = a.live;
    confsmoe_imputer_params p;
    confsmoe_imputer_params_init(&p);
    p.d = 4;
    p.n_modalities = 2;
    confsmoe_imputer *imp = (confsmoe_imputer *)(void *)&a;
    ck_assert_int_eq(confsmoe_imputer_create(NULL, &p, &imp), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(imp);
    imp = (confsmoe_imputer *)(void *)&a;
    ck_assert_int_eq(confsmoe_imputer_create(ctx, NULL, &imp), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(imp);
    CK_ERR(ctx, "imputer_create: params is NULL");
    ck_assert_int_eq(confsmoe_imputer_create(ctx, &p, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    CK_ERR(ctx, "imputer_create: out is NULL");
    ck_assert_int_eq(a.live, base);

    /* NULL handles everywhere else. */
    ck_assert_int_eq(confsmoe_imputer_n_params(NULL), -1);
    ck_assert_ptr_null(confsmoe_imputer_param(NULL, 0));
    ck_assert_ptr_null(confsmoe_imputer_grad(NULL, 0));
    ck_assert_ptr_null(confsmoe_imputer_param_name(NULL, 0));
    confsmoe_imputer_zero_grad(NULL);
    confsmoe_imputer_destroy(NULL);
    confsmoe_tensor *t = mkt(ctx, CONFSMOE_F32, 3, 1, 2, 4, 0);
    ck_assert_int_eq(confsmoe_imputer_forward(NULL, t, t, t, t, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_imputer_backward(NULL, NULL, t, t, t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_imputer_fill(NULL, 0, t, 1, t, t), CONFSMOE_E_INVALID_ARGUMENT);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_param_view)
{
    confsmoe_ctx *ctx = test_ctx(3);
    /* separate_value 0 and 1, each with the LN_IMP write-back and then the residual one (no ln.*). */
    for (int variant = 0; variant < 4; variant++) {
        const int sep = variant & 1, residual = variant >> 1;
        const cfg c = {3, 2, 2, 5, 1, 0, 0, sep, 0, MASK_NONE,
                       residual ? CONFSMOE_WRITEBACK_RESIDUAL : CONFSMOE_WRITEBACK_LN_IMP};
        confsmoe_imputer *imp = make_imputer(ctx, &c);
        static const char *const without[] = {"q.w", "q.b", "kv.w", "kv.b", "ln.weight", "ln.bias"};
        static const char *const with[] = {"q.w", "q.b", "kv.w", "kv.b", "v.w", "v.b", "ln.weight", "ln.bias"};
        const char *const *names = sep ? with : without;
        const int32_t n = (sep ? 8 : 6) - (residual ? 2 : 0);
        ck_assert_int_eq(confsmoe_imputer_n_params(imp), n);
        for (int32_t i = 0; i < n; i++) {
            ck_assert_str_eq(confsmoe_imputer_param_name(imp, i), names[i]);
            confsmoe_tensor *p = confsmoe_imputer_param(imp, i), *g = confsmoe_imputer_grad(imp, i);
            ck_assert_ptr_nonnull(p);
            ck_assert_ptr_nonnull(g);
            ck_assert_ptr_ne(p, g);
            const int matrix = strcmp(names[i] + strlen(names[i]) - 2, ".w") == 0;
            confsmoe_tensor *both[2] = {p, g};
            for (int k = 0; k < 2; k++) {
                ck_assert_int_eq(confsmoe_tensor_dtype(both[k]), CONFSMOE_F32);
                ck_assert_int_eq(confsmoe_tensor_ndim(both[k]), matrix ? 2 : 1);
                ck_assert_int_eq(confsmoe_tensor_dim(both[k], 0), 5);
                if (matrix)
                    ck_assert_int_eq(confsmoe_tensor_dim(both[k], 1), 5);
            }
            ck_assert_ptr_eq(confsmoe_imputer_param(imp, i), p);
            ck_assert_ptr_eq(confsmoe_imputer_grad(imp, i), g);
        }
        const int32_t out_of_range[] = {-1, n, n + 1, INT32_MIN, INT32_MAX};
        for (size_t k = 0; k < sizeof out_of_range / sizeof *out_of_range; k++) {
            ck_assert_ptr_null(confsmoe_imputer_param(imp, out_of_range[k]));
            ck_assert_ptr_null(confsmoe_imputer_grad(imp, out_of_range[k]));
            ck_assert_ptr_null(confsmoe_imputer_param_name(imp, out_of_range[k]));
        }
        ck_assert(grads_zero(imp));
        /* zero_grad zeroes every gradient. */
        for (int32_t i = 0; i < n; i++)
            fill_const(confsmoe_imputer_grad(imp, i), 3.0f);
        confsmoe_imputer_zero_grad(imp);
        ck_assert(grads_zero(imp));
        confsmoe_imputer_destroy(imp);
    }
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* nn.Linear init from the ctx stream in view order, LayerNorm weight 1 and bias 0.
 * The oracle for the stream is an expert with d = h: its w1, b1, w2, b2 are drawn from
 * the same stream with the same bound 1/sqrt(d), in that order (shapes [d,d], [d], [d,d],
 * [d]), so a fresh ctx with the same seed must give q.w, q.b, kv.w, kv.b bit for bit, and
 * a second expert v.w, v.b. */
START_TEST(test_init)
{
    const int64_t dims[] = {1, 7, 64};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) {
        const int64_t d = dims[i];
        for (int sep = 0; sep <= 1; sep++) {
            confsmoe_ctx *c1 = test_ctx(40 + i), *c2 = test_ctx(40 + i);
            const cfg c = {2, 1, 2, d, 1, 0, 0, sep, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
            confsmoe_imputer *imp = make_imputer(c1, &c);
            confsmoe_expert *e1 = NULL, *e2 = NULL;
            ck_assert_int_eq(confsmoe_expert_create(c2, d, d, &e1), CONFSMOE_OK);
            ck_assert_int_eq(confsmoe_expert_create(c2, d, d, &e2), CONFSMOE_OK);
            for (int32_t k = 0; k < 4; k++)
                ck_assert_msg(tequal(confsmoe_imputer_param(imp, k), confsmoe_expert_param(e1, k)),
                              "d=%lld: %s is not the stream's draw", (long long)d, confsmoe_imputer_param_name(imp, k));
            if (sep)
                for (int32_t k = 0; k < 2; k++)
                    ck_assert(tequal(confsmoe_imputer_param(imp, 4 + k), confsmoe_expert_param(e2, k)));
            const int32_t n = confsmoe_imputer_n_params(imp);
            const double bound = 1.0 / sqrt((double)d);
            for (int32_t k = 0; k < n - 2; k++) {
                confsmoe_tensor *t = confsmoe_imputer_param(imp, k);
                for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
                    ck_assert(fabs(f32(t)[j]) <= bound * (1 + 1e-6));
            }
            for (int64_t j = 0; j < d; j++) {
                ck_assert(f32(confsmoe_imputer_param(imp, n - 2))[j] == 1.0f);
                ck_assert(f32(confsmoe_imputer_param(imp, n - 1))[j] == 0.0f);
            }
            ck_assert(grads_zero(imp));
            confsmoe_imputer_destroy(imp);
            confsmoe_expert_destroy(e1);
            confsmoe_expert_destroy(e2);
            confsmoe_ctx_destroy(c1);
            confsmoe_ctx_destroy(c2);
        }
    }
    /* Different seeds give different weights. */
    confsmoe_ctx *c1 = test_ctx(5), *c2 = test_ctx(6);
    const cfg c = {2, 1, 2, 8, 1, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *a = make_imputer(c1, &c), *b = make_imputer(c2, &c);
    ck_assert(!tequal(confsmoe_imputer_param(a, 0), confsmoe_imputer_param(b, 0)));
    confsmoe_imputer_destroy(a);
    confsmoe_imputer_destroy(b);
    confsmoe_ctx_destroy(c1);
    confsmoe_ctx_destroy(c2);
}
END_TEST

/* ------------------------------------------------------------ stage 1: fill */

/* Pool row r is one-hot at column r (times token s + 1 for 3-D pools), so the mean of the
 * drawn rows reveals which rows were drawn: exactly K columns at (s + 1) / K. */
static confsmoe_tensor *one_hot_pool(confsmoe_ctx *ctx, int64_t P, int64_t S, int three_d)
{
    confsmoe_tensor *pool = three_d ? mkt(ctx, CONFSMOE_F32, 3, P, S, P, 0) : mkt(ctx, CONFSMOE_F32, 2, P, P, 0, 0);
    for (int64_t r = 0; r < P; r++)
        for (int64_t s = 0; s < S; s++)
            f32(pool)[(r * S + s) * P + r] = (float)(s + 1);
    return pool;
}

/* The drawn rows of sample b (a bitmap over the pool), checking the one-hot structure. */
static int64_t drawn_rows(confsmoe_tensor *x, int64_t b, int64_t P, int64_t S, int64_t K, uint8_t *which)
{
    const float *v = f32(x) + b * S * P;
    int64_t n = 0;
    for (int64_t c = 0; c < P; c++) {
        which[c] = v[c] != 0.0f;
        if (which[c]) {
            /* Exactly 1/K: a row drawn twice would give 2/K. */
            ck_assert_msg(v[c] == (float)(1.0 / (double)K), "row %lld has weight %g, not 1/%lld", (long long)c,
                          (double)v[c], (long long)K);
            n++;
        }
        for (int64_t s = 1; s < S; s++)
            ck_assert(v[s * P + c] == (float)((double)(s + 1) * (which[c] ? 1.0 / (double)K : 0.0)));
    }
    return n;
}

START_TEST(test_fill_draws)
{
    /* _i: 0 = [B, F] with S = 1, 1 = [B, S, F] with S = 3. */
    const int three_d = _i == 1;
    const int64_t S = three_d ? 3 : 1, B = 6, M = 3, P = 17, K = 5;
    test_alloc a = {0, 0, 0};
    confsmoe_allocator hold;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 9);
    const cfg c = {(int32_t)M, S, 2, 4, B, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *imp = make_imputer(ctx, &c);
    confsmoe_tensor *pool = one_hot_pool(ctx, P, S, three_d);
    confsmoe_tensor *x = three_d ? mkt(ctx, CONFSMOE_F32, 3, B, S, P, 0) : mkt(ctx, CONFSMOE_F32, 2, B, P, 0, 0);
    confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    memset(u8(avail), 1, (size_t)(B * M));
    const int64_t missing[] = {0, 2, 3, 5};
    for (size_t i = 0; i < sizeof missing / sizeof *missing; i++)
        u8(avail)[missing[i] * M + 1] = 0;
    u8(avail)[1 * M + 1] = 1;
    u8(avail)[1 * M + 0] = 0; /* another modality's absence does not matter */
    fill_const(x, -7.25f);
    void *before = tsnap(x);
    const long base = a.live;
    ck_assert_int_eq(confsmoe_imputer_fill(imp, 1, pool, (int32_t)K, avail, x), CONFSMOE_OK);
    ck_assert_int_eq(a.live, base);
    uint8_t which[4][17];
    for (int64_t b = 0, i = 0; b < B; b++) {
        const size_t row = (size_t)(S * P) * sizeof(float);
        if (u8(avail)[b * M + 1]) {
            ck_assert(memcmp(f32(x) + b * S * P, (float *)before + b * S * P, row) == 0);
            continue;
        }
        ck_assert_int_eq(drawn_rows(x, b, P, S, K, which[i]), K);
        i++;
    }
    /* Fresh draws per sample: not every sample gets the same subset. */
    ck_assert(memcmp(which[0], which[1], sizeof which[0]) || memcmp(which[1], which[2], sizeof which[0]) ||
              memcmp(which[2], which[3], sizeof which[0]));
    free(before);
    confsmoe_tensor_destroy(pool);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(imp);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* Each pool row is drawn with probability K / P, and subsets are not biased toward
 * neighbours: over 4000 samples, per-row counts within 5 standard errors. */
START_TEST(test_fill_uniformity)
{
    const int64_t B = 4000, M = 2, P = 12, K = 4;
    confsmoe_ctx *ctx = test_ctx(11);
    const cfg c = {(int32_t)M, 1, 2, 4, B, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *imp = make_imputer(ctx, &c);
    confsmoe_tensor *pool = one_hot_pool(ctx, P, 1, 0), *x = mkt(ctx, CONFSMOE_F32, 2, B, P, 0, 0);
    confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    for (int64_t b = 0; b < B; b++)
        u8(avail)[b * M] = 1; /* modality 1 missing everywhere */
    ck_assert_int_eq(confsmoe_imputer_fill(imp, 1, pool, (int32_t)K, avail, x), CONFSMOE_OK);
    int64_t count[12] = {0}, adjacent = 0;
    uint8_t which[12];
    for (int64_t b = 0; b < B; b++) {
        ck_assert_int_eq(drawn_rows(x, b, P, 1, K, which), K);
        for (int64_t r = 0; r < P; r++) {
            count[r] += which[r];
            adjacent += which[r] && which[(r + 1) % P];
        }
    }
    const double pk = (double)K / (double)P, expect = (double)B * pk, se = sqrt((double)B * pk * (1 - pk));
    for (int64_t r = 0; r < P; r++)
        ck_assert_msg(fabs((double)count[r] - expect) <= 5 * se, "row %lld drawn %lld times, expected %.0f",
                      (long long)r, (long long)count[r], expect);
    /* P(rows r and r+1 both drawn) = K (K-1) / (P (P-1)) for a uniform K-subset. */
    const double pair = (double)K * (K - 1) / ((double)P * (P - 1)), pairs = (double)(B * P) * pair;
    ck_assert_msg(fabs((double)adjacent - pairs) <= 5 * sqrt(pairs), "adjacent pairs %lld, expected %.0f",
                  (long long)adjacent, pairs);
    confsmoe_tensor_destroy(pool);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(imp);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* With no more pool rows than draws, every row is used once. */
START_TEST(test_fill_small_pool)
{
    const int64_t B = 3, M = 2;
    confsmoe_ctx *ctx = test_ctx(12);
    const cfg c = {(int32_t)M, 1, 2, 4, B, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *imp = make_imputer(ctx, &c);
    const int64_t pools[] = {1, 4, 10};
    for (size_t i = 0; i < sizeof pools / sizeof *pools; i++) {
        const int64_t P = pools[i];
        confsmoe_tensor *pool = one_hot_pool(ctx, P, 1, 0), *x = mkt(ctx, CONFSMOE_F32, 2, B, P, 0, 0);
        confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
        uint8_t which[10];
        ck_assert_int_eq(confsmoe_imputer_fill(imp, 0, pool, 10, avail, x), CONFSMOE_OK);
        for (int64_t b = 0; b < B; b++)
            ck_assert_int_eq(drawn_rows(x, b, P, 1, P, which), P);
        confsmoe_tensor_destroy(pool);
        confsmoe_tensor_destroy(x);
        confsmoe_tensor_destroy(avail);
    }
    /* A general pool: the exact mean in double, rounded once. */
    const int64_t P = 3, F = 5;
    confsmoe_tensor *pool = mkt(ctx, CONFSMOE_F32, 2, P, F, 0, 0), *x = mkt(ctx, CONFSMOE_F32, 2, B, F, 0, 0);
    confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    trng r = {5};
    fill_uniform(pool, &r, -3, 3);
    ck_assert_int_eq(confsmoe_imputer_fill(imp, 1, pool, 3, avail, x), CONFSMOE_OK);
    for (int64_t b = 0; b < B; b++)
        for (int64_t f = 0; f < F; f++) {
            double sum = 0.0;
            for (int64_t p = 0; p < P; p++)
                sum += f32(pool)[p * F + f];
            ck_assert(f32(x)[b * F + f] == (float)(sum / 3.0));
        }
    confsmoe_tensor_destroy(pool);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(imp);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* The same seed gives the same draws; the stream moves on; set_seed restarts it. */
START_TEST(test_fill_seed)
{
    const int64_t B = 8, M = 2, P = 40, K = 6;
    confsmoe_ctx *c1 = test_ctx(21), *c2 = test_ctx(21), *c3 = test_ctx(22);
    const cfg c = {(int32_t)M, 1, 2, 4, B, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *i1 = make_imputer(c1, &c), *i2 = make_imputer(c2, &c), *i3 = make_imputer(c3, &c);
    confsmoe_tensor *pool = one_hot_pool(c1, P, 1, 0), *avail = mkt(c1, CONFSMOE_U8, 2, B, M, 0, 0);
    confsmoe_tensor *x[4];
    for (int i = 0; i < 4; i++)
        x[i] = mkt(c1, CONFSMOE_F32, 2, B, P, 0, 0);
    ck_assert_int_eq(confsmoe_imputer_fill(i1, 0, pool, (int32_t)K, avail, x[0]), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_fill(i2, 0, pool, (int32_t)K, avail, x[1]), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_fill(i3, 0, pool, (int32_t)K, avail, x[2]), CONFSMOE_OK);
    ck_assert(tequal(x[0], x[1]));
    ck_assert(!tequal(x[0], x[2]));
    ck_assert_int_eq(confsmoe_imputer_fill(i1, 0, pool, (int32_t)K, avail, x[3]), CONFSMOE_OK);
    ck_assert_msg(!tequal(x[0], x[3]), "a second fill repeated the first draws");
    /* Restart c1's stream and recreate the imputer: the first fill repeats. */
    ck_assert_int_eq(confsmoe_ctx_set_seed(c1, 21), CONFSMOE_OK);
    confsmoe_imputer_destroy(i1);
    i1 = make_imputer(c1, &c);
    ck_assert_int_eq(confsmoe_imputer_fill(i1, 0, pool, (int32_t)K, avail, x[3]), CONFSMOE_OK);
    ck_assert(tequal(x[0], x[3]));
    for (int i = 0; i < 4; i++)
        confsmoe_tensor_destroy(x[i]);
    confsmoe_tensor_destroy(pool);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(i1);
    confsmoe_imputer_destroy(i2);
    confsmoe_imputer_destroy(i3);
    confsmoe_ctx_destroy(c1);
    confsmoe_ctx_destroy(c2);
    confsmoe_ctx_destroy(c3);
}
END_TEST

/* A fill env: S = 2 tokens, F = 5 features, B = 4, M = 3; modality 1 missing for b = 1, 3. */
typedef struct {
    test_alloc a;
    confsmoe_allocator hold;
    confsmoe_ctx *ctx;
    confsmoe_imputer *imp;
    confsmoe_tensor *pool, *x, *avail;
} fenv;

static void fenv_open(fenv *v, uint64_t seed)
{
    memset(v, 0, sizeof *v);
    v->ctx = test_ctx_counted(&v->a, &v->hold, seed);
    const cfg c = {3, 2, 2, 4, 4, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    v->imp = make_imputer(v->ctx, &c);
    v->pool = mkt(v->ctx, CONFSMOE_F32, 3, 9, 2, 5, 0);
    v->x = mkt(v->ctx, CONFSMOE_F32, 3, 4, 2, 5, 0);
    v->avail = mkt(v->ctx, CONFSMOE_U8, 2, 4, 3, 0, 0);
    memset(u8(v->avail), 1, 12);
    u8(v->avail)[1 * 3 + 1] = 0;
    u8(v->avail)[3 * 3 + 1] = 0;
    trng r = {seed};
    fill_uniform(v->pool, &r, -1, 1);
    fill_uniform(v->x, &r, -1, 1);
}

static void fenv_close(fenv *v)
{
    confsmoe_tensor_destroy(v->pool);
    confsmoe_tensor_destroy(v->x);
    confsmoe_tensor_destroy(v->avail);
    confsmoe_imputer_destroy(v->imp);
    confsmoe_ctx_destroy(v->ctx);
    ck_assert_int_eq(v->a.live, 0);
}

/* After a failed call the stream did not move: the next fill equals a clean env's. */
static void fenv_check_rng(fenv *v, uint64_t seed)
{
    fenv clean;
    fenv_open(&clean, seed);
    ck_assert_int_eq(confsmoe_imputer_fill(clean.imp, 1, clean.pool, 3, clean.avail, clean.x), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_fill(v->imp, 1, v->pool, 3, v->avail, v->x), CONFSMOE_OK);
    ck_assert_msg(tequal(v->x, clean.x), "a failed fill moved the RNG");
    fenv_close(&clean);
}

typedef struct {
    const char *what;
    int32_t m, draws;
    int pool_kind, x_kind, avail_kind;
    confsmoe_status status;
    const char *message;
} bad_fill;

enum { OK_T, NULL_T, DTYPE_T, SHAPE_T, SHAPE2_T, EMPTY_T, VALUE_T, NDIM_T };

static const bad_fill bad_fills[] = {
    {"m < 0", -1, 3, OK_T, OK_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "m=-1 is out of range 0..2"},
    {"m = M", 3, 3, OK_T, OK_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "m=3 is out of range"},
    {"draws 0", 1, 0, OK_T, OK_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "draws is 0, must be >= 1"},
    {"draws < 0", 1, -4, OK_T, OK_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "draws is -4"},
    {"pool NULL", 1, 3, NULL_T, OK_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "pool is NULL"},
    {"x NULL", 1, 3, OK_T, NULL_T, OK_T, CONFSMOE_E_INVALID_ARGUMENT, "x is NULL"},
    {"avail NULL", 1, 3, OK_T, OK_T, NULL_T, CONFSMOE_E_INVALID_ARGUMENT, "avail is NULL"},
    {"pool i32", 1, 3, DTYPE_T, OK_T, OK_T, CONFSMOE_E_DTYPE, "pool is i32, expected f32"},
    {"x u8", 1, 3, OK_T, DTYPE_T, OK_T, CONFSMOE_E_DTYPE, "x is u8, expected f32"},
    {"avail f32", 1, 3, OK_T, OK_T, DTYPE_T, CONFSMOE_E_DTYPE, "avail is f32, expected u8"},
    {"pool F", 1, 3, SHAPE_T, OK_T, OK_T, CONFSMOE_E_SHAPE, "pool has shape [9, 2, 6], expected [*, 2, 5]"},
    {"pool 2-D", 1, 3, SHAPE2_T, OK_T, OK_T, CONFSMOE_E_SHAPE, "pool has shape"},
    {"pool 0 rows", 1, 3, EMPTY_T, OK_T, OK_T, CONFSMOE_E_SHAPE, "pool has 0 rows"},
    {"x S", 1, 3, OK_T, SHAPE_T, OK_T, CONFSMOE_E_SHAPE, "x has S=3 tokens, modality 1 of the imputer has S=2"},
    {"x 2-D with S = 2", 1, 3, OK_T, SHAPE2_T, OK_T, CONFSMOE_E_SHAPE, "x is [B, F] but modality 1 has S=2 tokens"},
    {"x 4-D", 1, 3, OK_T, NDIM_T, OK_T, CONFSMOE_E_SHAPE, "x has 4 dims"},
    {"avail B", 1, 3, OK_T, OK_T, SHAPE_T, CONFSMOE_E_SHAPE, "avail has shape [5, 3], expected [4, 3]"},
    {"avail M", 1, 3, OK_T, OK_T, SHAPE2_T, CONFSMOE_E_SHAPE, "avail has shape [4, 2]"},
    {"avail value 2", 1, 3, OK_T, OK_T, VALUE_T, CONFSMOE_E_INVALID_ARGUMENT, "avail[2][1] is 2, must be 0"},
};

START_TEST(test_fill_errors)
{
    const bad_fill *e = &bad_fills[_i];
    fenv v;
    fenv_open(&v, 31);
    confsmoe_ctx *ctx = v.ctx;
    confsmoe_tensor *pool = v.pool, *x = v.x, *avail = v.avail, *extra = NULL;
    switch (e->pool_kind) {
    case NULL_T: pool = NULL; break;
    case DTYPE_T: pool = extra = mkt(ctx, CONFSMOE_I32, 3, 9, 2, 5, 0); break;
    case SHAPE_T: pool = extra = mkt(ctx, CONFSMOE_F32, 3, 9, 2, 6, 0); break;
    case SHAPE2_T: pool = extra = mkt(ctx, CONFSMOE_F32, 2, 9, 10, 0, 0); break;
    case EMPTY_T: pool = extra = mkt(ctx, CONFSMOE_F32, 3, 0, 2, 5, 0); break;
    default: break;
    }
    switch (e->x_kind) {
    case NULL_T: x = NULL; break;
    case DTYPE_T: x = extra = mkt(ctx, CONFSMOE_U8, 3, 4, 2, 5, 0); break;
    case SHAPE_T: x = extra = mkt(ctx, CONFSMOE_F32, 3, 4, 3, 5, 0); break;
    case SHAPE2_T: x = extra = mkt(ctx, CONFSMOE_F32, 2, 4, 10, 0, 0); break;
    case NDIM_T: x = extra = mkt(ctx, CONFSMOE_F32, 4, 4, 2, 5, 1); break;
    default: break;
    }
    switch (e->avail_kind) {
    case NULL_T: avail = NULL; break;
    case DTYPE_T: avail = extra = mkt(ctx, CONFSMOE_F32, 2, 4, 3, 0, 0); break;
    case SHAPE_T: avail = extra = mkt(ctx, CONFSMOE_U8, 2, 5, 3, 0, 0); break;
    case SHAPE2_T: avail = extra = mkt(ctx, CONFSMOE_U8, 2, 4, 2, 0, 0); break;
    case VALUE_T: u8(avail)[2 * 3 + 1] = 2; break;
    default: break;
    }
    void *xs = tsnap(v.x), *es = extra ? tsnap(extra) : NULL;
    const long base = v.a.live;
    const confsmoe_status st = confsmoe_imputer_fill(v.imp, e->m, pool, e->draws, avail, x);
    ck_assert_msg(st == e->status, "%s: status %d, expected %d (%s)", e->what, (int)st, (int)e->status,
                  confsmoe_ctx_last_error(ctx));
    CK_ERR(ctx, "imputer_fill");
    CK_ERR(ctx, e->message);
    ck_assert_int_eq(v.a.live, base);
    ck_assert_msg(tsame(v.x, xs), "%s: x changed", e->what);
    if (extra)
        ck_assert_msg(tsame(extra, es), "%s: an input changed", e->what);
    free(xs);
    free(es);
    confsmoe_tensor_destroy(extra);
    u8(v.avail)[2 * 3 + 1] = 1;
    fenv_check_rng(&v, 31);
    fenv_close(&v);
}
END_TEST

/* Stage 1 runs the missing cells on the ctx's threads: with 2 and 3 threads, x is the same to
 * the bit as with 1, and a pool with non-finite rows fails with the same message, the first
 * bad cell's in sample order. */
START_TEST(test_fill_threads)
{
    enum { B = 60, M = 3, S = 2, F = 400, P = 9, DRAWS = 3 };
    const cfg c = {M, S, 2, 4, B, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    static float first_x[B * S * F];
    char first_error[512] = "";
    for (int bad = 0; bad < 2; bad++)
        for (int32_t threads = 1; threads <= 3; threads++) {
            confsmoe_ctx *ctx = test_ctx_threads(threads);
            confsmoe_imputer *imp = make_imputer(ctx, &c);
            confsmoe_tensor *pool = mkt(ctx, CONFSMOE_F32, 3, P, S, F, 0);
            confsmoe_tensor *x = mkt(ctx, CONFSMOE_F32, 3, B, S, F, 0);
            confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
            trng r = {77};
            fill_uniform(pool, &r, -1, 1);
            fill_uniform(x, &r, -1, 1);
            for (int64_t i = 0; i < B * M; i++)
                u8(avail)[i] = (uint8_t)(trng_uniform(&r, 0, 1) < 0.5);
            if (bad) {
                f32(pool)[4 * S * F + 3] = NAN;
                f32(pool)[7 * S * F + 8] = INFINITY;
            }
            const confsmoe_status st = confsmoe_imputer_fill(imp, 1, pool, DRAWS, avail, x);
            ck_assert_int_eq(st, bad ? CONFSMOE_E_NUMERIC : CONFSMOE_OK);
            if (threads == 1) {
                memcpy(first_x, f32(x), sizeof first_x);
                snprintf(first_error, sizeof first_error, "%s", confsmoe_ctx_last_error(ctx));
            } else {
                ck_assert_msg(memcmp(first_x, f32(x), sizeof first_x) == 0, "x differs at %d threads", (int)threads);
                ck_assert_str_eq(confsmoe_ctx_last_error(ctx), first_error);
            }
            confsmoe_tensor_destroy(pool);
            confsmoe_tensor_destroy(x);
            confsmoe_tensor_destroy(avail);
            confsmoe_imputer_destroy(imp);
            confsmoe_ctx_destroy(ctx);
        }
    ck_assert_msg(strstr(first_error, "has a NaN or Inf") != NULL, "%s", first_error);
}
END_TEST

START_TEST(test_fill_nonfinite)
{
    /* _i = 0: NaN, 1: Inf. A small pool, so that every row is drawn. */
    fenv v;
    fenv_open(&v, 41);
    confsmoe_tensor *pool = mkt(v.ctx, CONFSMOE_F32, 3, 2, 2, 5, 0);
    trng r = {8};
    fill_uniform(pool, &r, -1, 1);
    f32(pool)[1 * 10 + 7] = _i == 0 ? NAN : INFINITY;
    void *xs = tsnap(v.x);
    const long base = v.a.live;
    ck_assert_int_eq(confsmoe_imputer_fill(v.imp, 1, pool, 3, v.avail, v.x), CONFSMOE_E_NUMERIC);
    CK_ERR(v.ctx, "imputer_fill: pool row 1 has a NaN or Inf at element 7");
    ck_assert_int_eq(v.a.live, base);
    ck_assert(tsame(v.x, xs));
    confsmoe_tensor_destroy(pool);
    fenv_check_rng(&v, 41);
    free(xs);
    fenv_close(&v);

    /* A pool of 9 rows, 3 drawn per sample: the bad row is drawn or not depending on the
     * seed. A call that draws it fails after drawing, and must still leave x and the RNG
     * as they were; a call that does not succeeds with finite values. */
    int failed = 0, passed = 0;
    for (uint64_t seed = 42; seed < 62; seed++) {
        fenv w;
        fenv_open(&w, seed);
        confsmoe_tensor *bad = mkt(w.ctx, CONFSMOE_F32, 3, 9, 2, 5, 0);
        memcpy(f32(bad), f32(w.pool), confsmoe_tensor_nbytes(bad));
        f32(bad)[4 * 10 + 3] = _i == 0 ? NAN : -INFINITY;
        void *ws = tsnap(w.x);
        const confsmoe_status st = confsmoe_imputer_fill(w.imp, 1, bad, 3, w.avail, w.x);
        if (st == CONFSMOE_OK) {
            passed++;
            for (int64_t i = 0; i < confsmoe_tensor_numel(w.x); i++)
                ck_assert(isfinite(f32(w.x)[i]));
        } else {
            failed++;
            ck_assert_int_eq(st, CONFSMOE_E_NUMERIC);
            CK_ERR(w.ctx, "pool row 4 has a NaN or Inf at element 3");
            ck_assert(tsame(w.x, ws));
            fenv_check_rng(&w, seed);
        }
        free(ws);
        confsmoe_tensor_destroy(bad);
        fenv_close(&w);
    }
    ck_assert_int_ge(failed, 1);
    ck_assert_int_ge(passed, 1);

    /* Checks off: the value propagates into the imputed rows. */
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.check_finite = 0;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    const cfg c = {2, 1, 2, 4, 2, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *imp = make_imputer(ctx, &c);
    confsmoe_tensor *pool2 = mkt(ctx, CONFSMOE_F32, 2, 2, 3, 0, 0), *x = mkt(ctx, CONFSMOE_F32, 2, 2, 3, 0, 0);
    confsmoe_tensor *avail = mkt(ctx, CONFSMOE_U8, 2, 2, 2, 0, 0);
    u8(avail)[0] = 1;
    u8(avail)[1] = 1;
    f32(pool2)[4] = _i == 0 ? NAN : INFINITY;
    ck_assert_int_eq(confsmoe_imputer_fill(imp, 0, pool2, 5, avail, x), CONFSMOE_OK);
    ck_assert(f32(x)[0] == 0.0f);
    ck_assert(!isfinite(f32(x)[3 + 1]));
    confsmoe_tensor_destroy(pool2);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(imp);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Nothing missing, B = 0, or F = 0: OK and nothing is written or drawn. */
START_TEST(test_fill_nothing_to_do)
{
    fenv v;
    fenv_open(&v, 51);
    memset(u8(v.avail), 1, 12);
    void *xs = tsnap(v.x);
    ck_assert_int_eq(confsmoe_imputer_fill(v.imp, 1, v.pool, 3, v.avail, v.x), CONFSMOE_OK);
    ck_assert(tsame(v.x, xs));
    free(xs);
    confsmoe_tensor *x0 = mkt(v.ctx, CONFSMOE_F32, 3, 0, 2, 5, 0), *a0 = mkt(v.ctx, CONFSMOE_U8, 2, 0, 3, 0, 0);
    ck_assert_int_eq(confsmoe_imputer_fill(v.imp, 1, v.pool, 3, a0, x0), CONFSMOE_OK);
    confsmoe_tensor *xf = mkt(v.ctx, CONFSMOE_F32, 3, 4, 2, 0, 0), *pf = mkt(v.ctx, CONFSMOE_F32, 3, 3, 2, 0, 0);
    u8(v.avail)[0] = 0;
    ck_assert_int_eq(confsmoe_imputer_fill(v.imp, 0, pf, 3, v.avail, xf), CONFSMOE_OK);
    u8(v.avail)[0] = 1;
    u8(v.avail)[1 * 3 + 1] = 0;
    u8(v.avail)[3 * 3 + 1] = 0;
    confsmoe_tensor_destroy(x0);
    confsmoe_tensor_destroy(a0);
    confsmoe_tensor_destroy(xf);
    confsmoe_tensor_destroy(pf);
    fenv_check_rng(&v, 51);
    fenv_close(&v);
}
END_TEST

#define MAX_FAULTS 64

START_TEST(test_fault_fill)
{
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "imputer_fill never succeeded");
        fenv v;
        fenv_open(&v, 61);
        void *xs = tsnap(v.x);
        const long base = v.a.live;
        v.a.fail_at = v.a.total + n;
        const confsmoe_status st = confsmoe_imputer_fill(v.imp, 1, v.pool, 3, v.avail, v.x);
        v.a.fail_at = 0;
        if (st == CONFSMOE_OK) {
            free(xs);
            fenv clean;
            fenv_open(&clean, 61);
            ck_assert_int_eq(confsmoe_imputer_fill(clean.imp, 1, clean.pool, 3, clean.avail, clean.x), CONFSMOE_OK);
            ck_assert(tequal(v.x, clean.x));
            fenv_close(&clean);
            fenv_close(&v);
            break;
        }
        failures++;
        ck_assert_int_eq(st, CONFSMOE_E_NOMEM);
        CK_ERR(v.ctx, "imputer_fill");
        CK_ERR(v.ctx, "out of memory");
        ck_assert_int_eq(v.a.live, base);
        ck_assert(tsame(v.x, xs));
        free(xs);
        fenv_check_rng(&v, 61);
        fenv_close(&v);
    }
    ck_assert_int_ge(failures, 1);
}
END_TEST

/* ------------------------------------------------------------ stage 2 vs the reference */

/* Training and inference forward against the reference; inputs read only; inference
 * equals training and keeps nothing; backward's dh is dout on present rows. */
START_TEST(test_forward_reference)
{
    const cfg *c = &cfgs[_i];
    env v;
    env_open(&v, c, 100 + (uint64_t)_i);
    refm r;
    refm_get(v.imp, c, &r);
    double *ref = env_ref(&v, &r);
    void *hs = tsnap(v.h), *ss = tsnap(v.slots), *as = tsnap(v.avail);
    fill_const(v.out, NAN);
    const long base = v.a.live;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    ck_assert_ptr_nonnull(s);
    check_out(&v, f32(v.h), f32(v.out), ref, "training forward");
    ck_assert(tsame(v.h, hs) && tsame(v.slots, ss) && tsame(v.avail, as));
    ck_assert(grads_zero(v.imp));

    confsmoe_tensor *out2 = mkt(v.ctx, CONFSMOE_F32, 3, c->B, c->M * c->S, c->d, 0);
    fill_const(out2, -NAN);
    const long with_saved = v.a.live;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, out2, NULL), CONFSMOE_OK);
    ck_assert_int_eq(v.a.live, with_saved);
    ck_assert_msg(tequal(v.out, out2), "inference differs from training");

    fill_const(v.dh, NAN);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    const int64_t M = c->M, S = c->S, d = c->d;
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t m = 0; m < M; m++) {
            const int64_t at = (b * M + m) * S * d;
            for (int64_t i = 0; i < S * d; i++) {
                if (u8(v.avail)[b * M + m])
                    ck_assert(f32(v.dh)[at + i] == f32(v.dout)[at + i]);
                else
                    ck_assert(isfinite(f32(v.dh)[at + i]));
            }
        }
    confsmoe_saved_destroy(s);
    confsmoe_tensor_destroy(out2);
    ck_assert_int_eq(v.a.live, base);
    free(ref);
    free(hs);
    free(ss);
    free(as);
    refm_free(&r);
    env_close(&v);
}
END_TEST

/* The default T: max(1, floor((M-1) S / 4)), capped at the candidates. The library with
 * top_t = 0 equals the library with top_t = T and the reference with T, and differs from
 * T + 1 and T - 1 where those are distinguishable. */
START_TEST(test_default_t)
{
    static const struct {
        int32_t M;
        int64_t S, T;
    } cases[] = {{2, 1, 1}, {6, 1, 1}, {3, 8, 4}, {5, 4, 4}};
    const int64_t M = cases[_i].M, S = cases[_i].S, T = cases[_i].T;
    ck_assert_int_eq(default_t(M, S), T);
    cfg c = {(int32_t)M, S, 2, 6, 3, 0, 0, 0, 0, MASK_ONE, CONFSMOE_WRITEBACK_LN_IMP};
    env v;
    env_open(&v, &c, 200 + (uint64_t)_i);
    refm r;
    refm_get(v.imp, &c, &r);
    ck_assert_int_eq(r.T, T);
    double *ref = env_ref(&v, &r);
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, NULL), CONFSMOE_OK);
    check_out(&v, f32(v.h), f32(v.out), ref, "default T");
    free(ref);
    /* Explicit T: bit-identical. */
    confsmoe_tensor *other = mkt(v.ctx, CONFSMOE_F32, 3, c.B, M * S, c.d, 0);
    for (int64_t dt = -1; dt <= 1; dt++) {
        if (T + dt < 1)
            continue;
        c.top_t = (int32_t)(T + dt);
        confsmoe_imputer *imp = make_imputer(v.ctx, &c);
        for (int32_t i = 0; i < confsmoe_imputer_n_params(imp); i++)
            ck_assert_int_eq(confsmoe_tensor_copy_in(confsmoe_imputer_param(imp, i),
                                                     f32(confsmoe_imputer_param(v.imp, i)),
                                                     confsmoe_tensor_nbytes(confsmoe_imputer_param(imp, i))),
                             CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_imputer_forward(imp, v.h, v.slots, v.avail, other, NULL), CONFSMOE_OK);
        const int64_t L = (M - 1) * S; /* MASK_ONE: the missing sample has all others */
        if (dt == 0 || (T >= L && T + dt >= L))
            ck_assert_msg(tequal(v.out, other), "top_t=%lld differs from the default", (long long)(T + dt));
        else
            ck_assert_msg(!tequal(v.out, other), "top_t=%lld is indistinguishable from the default T=%lld",
                          (long long)(T + dt), (long long)T);
        confsmoe_imputer_destroy(imp);
    }
    /* T is never 0 (the reference's floor((M-1) S / 4) for S = 1): with T = 0 the imputed
     * rows would be LN(h) alone. */
    r.T = 0;
    double *none = env_ref(&v, &r);
    double diff = 0.0;
    for (int64_t i = 0; i < confsmoe_tensor_numel(v.out); i++)
        diff = fmax(diff, fabs(f32(v.out)[i] - none[i]));
    ck_assert_msg(diff > 1e-2, "the imputed rows look like LN(h) alone");
    free(none);
    refm_free(&r);
    confsmoe_tensor_destroy(other);
    env_close(&v);
}
END_TEST

/* out == h: in place, the same result as into a separate tensor; the same for dh == dout. */
START_TEST(test_aliasing)
{
    const cfg *c = &cfgs[_i];
    env v;
    env_open(&v, c, 300 + (uint64_t)_i);
    confsmoe_saved *s1 = NULL, *s2 = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s1), CONFSMOE_OK);
    confsmoe_tensor *hh = mkt(v.ctx, CONFSMOE_F32, 3, c->B, c->M * c->S, c->d, 0);
    memcpy(f32(hh), f32(v.h), confsmoe_tensor_nbytes(hh));
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, hh, v.slots, v.avail, hh, &s2), CONFSMOE_OK);
    ck_assert(tequal(hh, v.out));
    /* A second tensor over the same memory counts as the same buffer. */
    confsmoe_tensor *view = NULL;
    const int64_t dims[3] = {c->B, c->M * c->S, c->d};
    memcpy(f32(hh), f32(v.h), confsmoe_tensor_nbytes(hh));
    ck_assert_int_eq(confsmoe_tensor_wrap(v.ctx, CONFSMOE_F32, 3, dims, f32(hh), &view), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, hh, v.slots, v.avail, view, NULL), CONFSMOE_OK);
    ck_assert(tequal(hh, v.out));

    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s1, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    confsmoe_tensor *g = mkt(v.ctx, CONFSMOE_F32, 3, c->B, c->M * c->S, c->d, 0);
    memcpy(f32(g), f32(v.dout), confsmoe_tensor_nbytes(g));
    confsmoe_tensor *dslots2 = mkt(v.ctx, CONFSMOE_F32, 4, c->M, c->B * c->S, c->k, c->d);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s2, g, g, dslots2), CONFSMOE_OK);
    ck_assert(tequal(g, v.dh));
    ck_assert(tequal(dslots2, v.dslots));
    confsmoe_saved_destroy(s1);
    confsmoe_saved_destroy(s2);
    confsmoe_tensor_destroy(hh);
    confsmoe_tensor_destroy(view);
    confsmoe_tensor_destroy(g);
    confsmoe_tensor_destroy(dslots2);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ backward vs the reference */

static double ref_loss(const refm *r, int64_t B, const double *h, const double *sl, const uint8_t *av,
                       const double *R, double *work)
{
    ref_forward(r, B, h, sl, av, work);
    double l = 0.0;
    for (int64_t i = 0; i < B * r->M * r->S * r->d; i++)
        l += work[i] * R[i];
    return l;
}

/* Norm-wise relative error of the float gradient against central differences of the double
 * reference, over up to `cap` sampled coordinates of `value` (all of a small tensor). */
static double fd_error(const refm *r, int64_t B, double *h, double *sl, const uint8_t *av, const double *R,
                       double *work, double *value, int64_t n, const float *analytic, int64_t cap, uint64_t seed)
{
    const double step = 1e-5;
    trng t = {seed};
    double num = 0.0, den = 0.0;
    const int64_t m = n < cap ? n : cap;
    for (int64_t s = 0; s < m; s++) {
        const int64_t i = n <= cap ? s : (int64_t)(trng_u64(&t) % (uint64_t)n);
        const double orig = value[i];
        value[i] = orig + step;
        const double lp = ref_loss(r, B, h, sl, av, R, work);
        value[i] = orig - step;
        const double lm = ref_loss(r, B, h, sl, av, R, work);
        value[i] = orig;
        const double g = (lp - lm) / (2 * step);
        num += (analytic[i] - g) * (analytic[i] - g);
        den += g * g;
    }
    /* Relative, with a floor of 1 on the norm: some true gradients are exactly zero (kv.b
     * with separate_value only shifts all logits of a row alike; T = 1 with renormalize
     * gives constant weights), where float backward leaves ~1e-7 of rounding. */
    return sqrt(num) / fmax(sqrt(den), 1.0);
}

/* dh, dslots and every parameter gradient against central differences of the reference
 * (in double, so the check is tight); dslots and the parameter gradients accumulate. */
START_TEST(test_backward_reference)
{
    const cfg *c = &cfgs[_i];
    env v;
    env_open(&v, c, 400 + (uint64_t)_i);
    refm r;
    refm_get(v.imp, c, &r);
    /* Gradients accumulate: start them (and dslots) from known values. */
    trng t = {77};
    for (int32_t i = 0; i < confsmoe_imputer_n_params(v.imp); i++)
        fill_uniform(confsmoe_imputer_grad(v.imp, i), &t, -1, 1);
    fill_uniform(v.dslots, &t, -1, 1);
    isnap g0;
    isnap_take(v.imp, &g0);
    float *dslots0 = tsnap(v.dslots);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    /* The saved state is a copy: the host may reuse its buffers before backward. */
    double *h = to_double(v.h), *sl = to_double(v.slots), *R = to_double(v.dout);
    uint8_t *av = tsnap(v.avail);
    fill_const(v.h, 1e6f);
    fill_const(v.slots, -1e6f);
    memset(u8(v.avail), 1, (size_t)(c->B * c->M));
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);

    const int64_t nh = confsmoe_tensor_numel(v.h), ns = confsmoe_tensor_numel(v.slots);
    double *work = xcalloc((size_t)nh, sizeof(double));
    const int64_t cap = c->d > 16 ? 40 : 400;
    double err = fd_error(&r, c->B, h, sl, av, R, work, h, nh, f32(v.dh), cap, 1);
    ck_assert_msg(err <= GRAD_TOL, "cfg %d dh: %.3g", _i, err);
    float *ds = xcalloc((size_t)ns, sizeof(float));
    for (int64_t i = 0; i < ns; i++)
        ds[i] = f32(v.dslots)[i] - dslots0[i];
    err = fd_error(&r, c->B, h, sl, av, R, work, sl, ns, ds, cap, 2);
    ck_assert_msg(err <= GRAD_TOL, "cfg %d dslots: %.3g", _i, err);
    for (int32_t i = 0; i < confsmoe_imputer_n_params(v.imp); i++) {
        const int role = role_of(confsmoe_imputer_param_name(v.imp, i));
        confsmoe_tensor *g = confsmoe_imputer_grad(v.imp, i);
        float *dg = xcalloc((size_t)r.n[role], sizeof(float));
        for (int64_t k = 0; k < r.n[role]; k++)
            dg[k] = f32(g)[k] - ((float *)g0.g[i])[k];
        err = fd_error(&r, c->B, h, sl, av, R, work, r.w[role], r.n[role], dg, cap, 3 + (uint64_t)i);
        ck_assert_msg(err <= GRAD_TOL, "cfg %d d%s: %.3g", _i, role_names[role], err);
        free(dg);
    }
    free(ds);
    free(work);
    free(h);
    free(sl);
    free(R);
    free(av);
    free(dslots0);
    isnap_free(&g0);
    refm_free(&r);
    env_close(&v);
}
END_TEST

/* No row missing: forward copies, backward passes dout through, and nothing else changes. */
START_TEST(test_nothing_missing)
{
    const cfg c = {3, 2, 2, 5, 4, 0, 1, 1, 1, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    env v;
    env_open(&v, &c, 500);
    trng t = {3};
    fill_uniform(v.dslots, &t, -1, 1);
    void *ds = tsnap(v.dslots);
    isnap g0;
    isnap_take(v.imp, &g0);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    ck_assert_ptr_nonnull(s);
    ck_assert(tequal(v.out, v.h));
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    ck_assert(tequal(v.dh, v.dout));
    ck_assert(tsame(v.dslots, ds));
    isnap_check(v.imp, &g0);
    /* Still a one-shot handle. */
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_E_STATE);
    confsmoe_saved_destroy(s);
    free(ds);
    isnap_free(&g0);
    env_close(&v);
}
END_TEST

/* B = 0: OK everywhere, nothing written. */
START_TEST(test_empty_batch)
{
    const cfg c = {3, 2, 2, 5, 0, 0, 0, 0, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    env v;
    env_open(&v, &c, 510);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    ck_assert(grads_zero(v.imp));
    confsmoe_saved_destroy(s);
    env_close(&v);
}
END_TEST

/* dh and dslots are optional; each NULL combination gives the same parameter gradients
 * and the same dh / dslots as the full call. */
START_TEST(test_optional_outputs)
{
    const cfg *c = &cfgs[5];
    env v;
    env_open(&v, c, 520);
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    isnap full;
    isnap_take(v.imp, &full);
    void *dh = tsnap(v.dh), *ds = tsnap(v.dslots);
    for (int mode = 0; mode < 3; mode++) {
        confsmoe_imputer_zero_grad(v.imp);
        fill_const(v.dh, 0.0f);
        fill_const(v.dslots, 0.0f);
        ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, mode == 1 ? NULL : v.dh,
                                                   mode == 0 ? NULL : v.dslots),
                         CONFSMOE_OK);
        confsmoe_saved_destroy(s);
        for (int32_t i = 0; i < full.n; i++)
            ck_assert(tsame(confsmoe_imputer_grad(v.imp, i), full.g[i]));
        if (mode != 1)
            ck_assert(tsame(v.dh, dh));
        if (mode != 0)
            ck_assert(tsame(v.dslots, ds));
    }
    free(dh);
    free(ds);
    isnap_free(&full);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ stage 2 errors */

typedef struct {
    const char *what;
    int which;     /* the argument made bad */
    int kind;
    confsmoe_status status;
    const char *message;
} bad_fwd;

enum { A_H, A_SLOTS, A_AVAIL, A_OUT };
enum { K_NULL, K_DTYPE, K_SHAPE_A, K_SHAPE_B, K_NDIM, K_VALUE, K_NAN, K_INF };

/* The env of these tests: M = 3, S = 2, k = 2, d = 4, B = 3. */
static const bad_fwd bad_fwds[] = {
    {"h NULL", A_H, K_NULL, CONFSMOE_E_INVALID_ARGUMENT, "imputer_forward: h is NULL"},
    {"h i32", A_H, K_DTYPE, CONFSMOE_E_DTYPE, "h is i32, expected f32"},
    {"h M S", A_H, K_SHAPE_A, CONFSMOE_E_SHAPE, "h has shape [3, 5, 4], expected [*, 6, 4]"},
    {"h d", A_H, K_SHAPE_B, CONFSMOE_E_SHAPE, "h has shape [3, 6, 5], expected [*, 6, 4]"},
    {"h 2-D", A_H, K_NDIM, CONFSMOE_E_SHAPE, "h has shape [18, 4]"},
    {"h NaN", A_H, K_NAN, CONFSMOE_E_NUMERIC, "h[7] is NaN"},
    {"h Inf", A_H, K_INF, CONFSMOE_E_NUMERIC, "h[7] is Inf"},
    {"slots NULL", A_SLOTS, K_NULL, CONFSMOE_E_INVALID_ARGUMENT, "slots is NULL"},
    {"slots u8", A_SLOTS, K_DTYPE, CONFSMOE_E_DTYPE, "slots is u8, expected f32"},
    {"slots B S", A_SLOTS, K_SHAPE_A, CONFSMOE_E_SHAPE, "slots has shape [3, 5, 2, 4], expected [3, 6, 2, 4]"},
    {"slots k", A_SLOTS, K_SHAPE_B, CONFSMOE_E_SHAPE, "slots has shape [3, 6, 3, 4], expected [3, 6, 2, 4]"},
    {"slots 3-D", A_SLOTS, K_NDIM, CONFSMOE_E_SHAPE, "slots has shape [3, 12, 4]"},
    {"slots NaN", A_SLOTS, K_NAN, CONFSMOE_E_NUMERIC, "slots[7] is NaN"},
    {"slots Inf", A_SLOTS, K_INF, CONFSMOE_E_NUMERIC, "slots[7] is Inf"},
    {"avail NULL", A_AVAIL, K_NULL, CONFSMOE_E_INVALID_ARGUMENT, "avail is NULL"},
    {"avail f32", A_AVAIL, K_DTYPE, CONFSMOE_E_DTYPE, "avail is f32, expected u8"},
    {"avail B", A_AVAIL, K_SHAPE_A, CONFSMOE_E_SHAPE, "avail has shape [2, 3], expected [3, 3]"},
    {"avail M", A_AVAIL, K_SHAPE_B, CONFSMOE_E_SHAPE, "avail has shape [3, 4], expected [3, 3]"},
    {"avail 1-D", A_AVAIL, K_NDIM, CONFSMOE_E_SHAPE, "avail has shape [9]"},
    {"avail value 2", A_AVAIL, K_VALUE, CONFSMOE_E_INVALID_ARGUMENT, "avail[2][1] is 2, must be 0"},
    {"out NULL", A_OUT, K_NULL, CONFSMOE_E_INVALID_ARGUMENT, "out is NULL"},
    {"out i32", A_OUT, K_DTYPE, CONFSMOE_E_DTYPE, "out is i32"},
    {"out B", A_OUT, K_SHAPE_A, CONFSMOE_E_SHAPE, "out has shape [2, 6, 4], expected [3, 6, 4]"},
    {"out d", A_OUT, K_SHAPE_B, CONFSMOE_E_SHAPE, "out has shape [3, 6, 5]"},
};

static const cfg err_cfg = {3, 2, 2, 4, 3, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP};

static confsmoe_tensor *bad_tensor(confsmoe_ctx *ctx, int which, int kind)
{
    static const confsmoe_dtype wrong[4] = {CONFSMOE_I32, CONFSMOE_U8, CONFSMOE_F32, CONFSMOE_I32};
    switch (which) {
    case A_H:
    case A_OUT:
        if (kind == K_DTYPE)
            return mkt(ctx, wrong[which], 3, 3, 6, 4, 0);
        if (kind == K_SHAPE_A)
            return which == A_H ? mkt(ctx, CONFSMOE_F32, 3, 3, 5, 4, 0) : mkt(ctx, CONFSMOE_F32, 3, 2, 6, 4, 0);
        if (kind == K_SHAPE_B)
            return mkt(ctx, CONFSMOE_F32, 3, 3, 6, 5, 0);
        return mkt(ctx, CONFSMOE_F32, 2, 18, 4, 0, 0);
    case A_SLOTS:
        if (kind == K_DTYPE)
            return mkt(ctx, CONFSMOE_U8, 4, 3, 6, 2, 4);
        if (kind == K_SHAPE_A)
            return mkt(ctx, CONFSMOE_F32, 4, 3, 5, 2, 4);
        if (kind == K_SHAPE_B)
            return mkt(ctx, CONFSMOE_F32, 4, 3, 6, 3, 4);
        return mkt(ctx, CONFSMOE_F32, 3, 3, 12, 4, 0);
    default:
        if (kind == K_DTYPE)
            return mkt(ctx, CONFSMOE_F32, 2, 3, 3, 0, 0);
        if (kind == K_SHAPE_A)
            return mkt(ctx, CONFSMOE_U8, 2, 2, 3, 0, 0);
        if (kind == K_SHAPE_B)
            return mkt(ctx, CONFSMOE_U8, 2, 3, 4, 0, 0);
        return mkt(ctx, CONFSMOE_U8, 1, 9, 0, 0, 0);
    }
}

START_TEST(test_forward_errors)
{
    const bad_fwd *e = &bad_fwds[_i];
    env v;
    env_open(&v, &err_cfg, 600);
    confsmoe_tensor *arg[4] = {v.h, v.slots, v.avail, v.out}, *extra = NULL;
    switch (e->kind) {
    case K_NULL: arg[e->which] = NULL; break;
    case K_VALUE: u8(v.avail)[2 * 3 + 1] = 2; break;
    case K_NAN: f32(arg[e->which])[7] = NAN; break;
    case K_INF: f32(arg[e->which])[7] = -INFINITY; break;
    default: arg[e->which] = extra = bad_tensor(v.ctx, e->which, e->kind); break;
    }
    fill_const(v.out, 5.0f);
    void *os = tsnap(v.out), *es = extra ? tsnap(extra) : NULL;
    isnap g0;
    isnap_take(v.imp, &g0);
    const long base = v.a.live;
    for (int training = 0; training <= 1; training++) {
        confsmoe_saved *s = (confsmoe_saved *)(void *)&v;
        const confsmoe_status st =
            confsmoe_imputer_forward(v.imp, arg[A_H], arg[A_SLOTS], arg[A_AVAIL], arg[A_OUT], training ? &s : NULL);
        ck_assert_msg(st == e->status, "%s: status %d, expected %d (%s)", e->what, (int)st, (int)e->status,
                      confsmoe_ctx_last_error(v.ctx));
        CK_ERR(v.ctx, "imputer_forward");
        CK_ERR(v.ctx, e->message);
        if (training)
            ck_assert_ptr_null(s);
        ck_assert_int_eq(v.a.live, base);
        ck_assert(tsame(v.out, os));
        if (extra)
            ck_assert(tsame(extra, es));
        isnap_check(v.imp, &g0);
    }
    free(os);
    free(es);
    isnap_free(&g0);
    confsmoe_tensor_destroy(extra);
    env_close(&v);
}
END_TEST

/* With finite checks off, NaN propagates instead of failing (and nothing crashes: the
 * top-T ranking stays a consistent order). */
START_TEST(test_forward_nonfinite_unchecked)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.check_finite = 0;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    const cfg c = {3, 4, 2, 4, 3, 0, 0, 0, 0, MASK_RANDOM, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_imputer *imp = make_imputer(ctx, &c);
    confsmoe_tensor *h = mkt(ctx, CONFSMOE_F32, 3, 3, 12, 4, 0), *out = mkt(ctx, CONFSMOE_F32, 3, 3, 12, 4, 0);
    confsmoe_tensor *slots = mkt(ctx, CONFSMOE_F32, 4, 3, 12, 2, 4), *avail = mkt(ctx, CONFSMOE_U8, 2, 3, 3, 0, 0);
    make_mask(&c, u8(avail), 1);
    trng r = {1};
    fill_uniform(slots, &r, -1, 1);
    for (int64_t i = 0; i < confsmoe_tensor_numel(slots); i += 3)
        f32(slots)[i] = NAN;
    confsmoe_saved *s = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(imp, h, slots, avail, out, &s), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(imp, s, h, h, slots), CONFSMOE_OK);
    confsmoe_saved_destroy(s);
    confsmoe_tensor_destroy(h);
    confsmoe_tensor_destroy(out);
    confsmoe_tensor_destroy(slots);
    confsmoe_tensor_destroy(avail);
    confsmoe_imputer_destroy(imp);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

typedef struct {
    const char *what;
    int which; /* 0 saved, 1 dout, 2 dh, 3 dslots */
    int kind;
    confsmoe_status status;
    const char *message;
} bad_bwd;

enum { KB_NULL, KB_FOREIGN, KB_EXPERT, KB_DTYPE, KB_SHAPE, KB_NAN, KB_INF };

static const bad_bwd bad_bwds[] = {
    {"saved NULL", 0, KB_NULL, CONFSMOE_E_INVALID_ARGUMENT, "imputer_backward: saved is NULL"},
    {"saved of another imputer", 0, KB_FOREIGN, CONFSMOE_E_INVALID_ARGUMENT, "another layer's forward"},
    {"saved of an expert", 0, KB_EXPERT, CONFSMOE_E_INVALID_ARGUMENT, "another layer's forward"},
    {"dout NULL", 1, KB_NULL, CONFSMOE_E_INVALID_ARGUMENT, "dout is NULL"},
    {"dout u8", 1, KB_DTYPE, CONFSMOE_E_DTYPE, "dout is u8"},
    {"dout shape", 1, KB_SHAPE, CONFSMOE_E_SHAPE, "dout has shape [3, 6, 3], expected [3, 6, 4]"},
    {"dout NaN", 1, KB_NAN, CONFSMOE_E_NUMERIC, "dout[7] is NaN"},
    {"dout Inf", 1, KB_INF, CONFSMOE_E_NUMERIC, "dout[7] is Inf"},
    {"dh u8", 2, KB_DTYPE, CONFSMOE_E_DTYPE, "dh is u8"},
    {"dh shape", 2, KB_SHAPE, CONFSMOE_E_SHAPE, "dh has shape [3, 6, 3]"},
    {"dslots u8", 3, KB_DTYPE, CONFSMOE_E_DTYPE, "dslots is u8"},
    {"dslots shape", 3, KB_SHAPE, CONFSMOE_E_SHAPE, "dslots has shape [3, 6, 2, 3], expected [3, 6, 2, 4]"},
};

START_TEST(test_backward_errors)
{
    const bad_bwd *e = &bad_bwds[_i];
    env v;
    env_open(&v, &err_cfg, 700);
    confsmoe_saved *s = NULL, *other = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
    confsmoe_imputer *imp2 = make_imputer(v.ctx, &err_cfg);
    confsmoe_expert *ex = NULL;
    confsmoe_tensor *x = mkt(v.ctx, CONFSMOE_F32, 2, 2, 4, 0, 0), *y = mkt(v.ctx, CONFSMOE_F32, 2, 2, 4, 0, 0);
    ck_assert_int_eq(confsmoe_expert_create(v.ctx, 4, 4, &ex), CONFSMOE_OK);
    confsmoe_saved *arg_s = s;
    confsmoe_tensor *arg[4] = {NULL, v.dout, v.dh, v.dslots}, *extra = NULL;
    if (e->which == 0) {
        if (e->kind == KB_NULL)
            arg_s = NULL;
        else if (e->kind == KB_FOREIGN)
            ck_assert_int_eq(confsmoe_imputer_forward(imp2, v.h, v.slots, v.avail, v.out, &other), CONFSMOE_OK);
        else
            ck_assert_int_eq(confsmoe_expert_forward(ex, x, y, &other), CONFSMOE_OK);
        if (other)
            arg_s = other;
    } else if (e->kind == KB_NULL) {
        arg[e->which] = NULL;
    } else if (e->kind == KB_NAN || e->kind == KB_INF) {
        f32(arg[e->which])[7] = e->kind == KB_NAN ? NAN : INFINITY;
    } else if (e->which == 3) {
        arg[3] = extra = e->kind == KB_DTYPE ? mkt(v.ctx, CONFSMOE_U8, 4, 3, 6, 2, 4)
                                             : mkt(v.ctx, CONFSMOE_F32, 4, 3, 6, 2, 3);
    } else {
        arg[e->which] = extra = e->kind == KB_DTYPE ? mkt(v.ctx, CONFSMOE_U8, 3, 3, 6, 4, 0)
                                                    : mkt(v.ctx, CONFSMOE_F32, 3, 3, 6, 3, 0);
    }
    fill_const(v.dh, 2.0f);
    fill_const(v.dslots, 3.0f);
    void *dhs = tsnap(v.dh), *dss = tsnap(v.dslots), *es = extra ? tsnap(extra) : NULL;
    isnap g0;
    isnap_take(v.imp, &g0);
    const long base = v.a.live;
    const confsmoe_status st = confsmoe_imputer_backward(v.imp, arg_s, arg[1], arg[2], arg[3]);
    ck_assert_msg(st == e->status, "%s: status %d, expected %d (%s)", e->what, (int)st, (int)e->status,
                  confsmoe_ctx_last_error(v.ctx));
    CK_ERR(v.ctx, "imputer_backward");
    CK_ERR(v.ctx, e->message);
    ck_assert_int_eq(v.a.live, base);
    ck_assert(tsame(v.dh, dhs));
    ck_assert(tsame(v.dslots, dss));
    if (extra)
        ck_assert(tsame(extra, es));
    isnap_check(v.imp, &g0);
    /* The handle was not consumed: a valid call succeeds, a second one does not. */
    if (e->kind == KB_NAN || e->kind == KB_INF)
        fill_const(v.dout, 0.5f);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_E_STATE);
    CK_ERR(v.ctx, "imputer_backward: backward already ran on this saved handle");
    confsmoe_saved_destroy(s);
    confsmoe_saved_destroy(other);
    free(dhs);
    free(dss);
    free(es);
    isnap_free(&g0);
    confsmoe_tensor_destroy(extra);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_expert_destroy(ex);
    confsmoe_imputer_destroy(imp2);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ fault injection */

START_TEST(test_fault_create)
{
    const cfg c = {3, 2, 2, 6, 1, 0, 0, 1, 0, MASK_NONE, CONFSMOE_WRITEBACK_LN_IMP};
    confsmoe_ctx *rctx = test_ctx(81);
    confsmoe_imputer *ref = make_imputer(rctx, &c);
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "imputer_create never succeeded");
        test_alloc a = {0, 0, 0};
        confsmoe_allocator hold;
        confsmoe_ctx *ctx = test_ctx_counted(&a, &hold, 81);
        const long base = a.live;
        confsmoe_imputer_params p;
        confsmoe_imputer_params_init(&p);
        p.d = 6;
        p.n_modalities = 3;
        p.tokens = 2;
        p.separate_value = 1;
        confsmoe_imputer *imp = (confsmoe_imputer *)(void *)&a;
        a.fail_at = a.total + n;
        const confsmoe_status st = confsmoe_imputer_create(ctx, &p, &imp);
        a.fail_at = 0;
        if (st == CONFSMOE_OK) {
            ck_assert(same_params(imp, ref));
            confsmoe_imputer_destroy(imp);
            confsmoe_ctx_destroy(ctx);
            ck_assert_int_eq(a.live, 0);
            break;
        }
        failures++;
        ck_assert_int_eq(st, CONFSMOE_E_NOMEM);
        ck_assert_ptr_null(imp);
        CK_ERR(ctx, "imputer_create");
        CK_ERR(ctx, "out of memory");
        ck_assert_int_eq(a.live, base);
        /* The ctx is usable and its RNG did not move. */
        ck_assert_int_eq(confsmoe_imputer_create(ctx, &p, &imp), CONFSMOE_OK);
        ck_assert(same_params(imp, ref));
        confsmoe_imputer_destroy(imp);
        confsmoe_ctx_destroy(ctx);
        ck_assert_int_eq(a.live, 0);
    }
    ck_assert_int_ge(failures, 1);
    confsmoe_imputer_destroy(ref);
    confsmoe_ctx_destroy(rctx);
}
END_TEST

/* _i = 0: training forward, 1: inference forward. */
START_TEST(test_fault_forward)
{
    const int training = _i == 0;
    const cfg *c = &cfgs[6];
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "imputer_forward never succeeded");
        env v;
        env_open(&v, c, 800);
        fill_const(v.out, 9.0f);
        void *os = tsnap(v.out);
        isnap g0;
        isnap_take(v.imp, &g0);
        const long base = v.a.live;
        confsmoe_saved *s = (confsmoe_saved *)(void *)&v;
        v.a.fail_at = v.a.total + n;
        const confsmoe_status st = confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, training ? &s : NULL);
        v.a.fail_at = 0;
        if (st == CONFSMOE_OK) {
            refm r;
            refm_get(v.imp, c, &r);
            double *ref = env_ref(&v, &r);
            check_out(&v, f32(v.h), f32(v.out), ref, "after faults");
            free(ref);
            refm_free(&r);
            if (training) {
                ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
                confsmoe_saved_destroy(s);
            }
            free(os);
            isnap_free(&g0);
            env_close(&v);
            break;
        }
        failures++;
        ck_assert_int_eq(st, CONFSMOE_E_NOMEM);
        if (training)
            ck_assert_ptr_null(s);
        CK_ERR(v.ctx, "imputer_forward");
        CK_ERR(v.ctx, "out of memory");
        ck_assert_int_eq(v.a.live, base);
        ck_assert(tsame(v.out, os));
        isnap_check(v.imp, &g0);
        free(os);
        isnap_free(&g0);
        env_close(&v);
    }
    ck_assert_int_ge(failures, 1);
}
END_TEST

START_TEST(test_fault_backward)
{
    const cfg *c = &cfgs[6];
    /* What a clean backward produces. */
    env clean;
    env_open(&clean, c, 900);
    confsmoe_saved *cs = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(clean.imp, clean.h, clean.slots, clean.avail, clean.out, &cs),
                     CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(clean.imp, cs, clean.dout, clean.dh, clean.dslots), CONFSMOE_OK);
    confsmoe_saved_destroy(cs);
    int failures = 0;
    for (long n = 1;; n++) {
        ck_assert_msg(n < MAX_FAULTS, "imputer_backward never succeeded");
        env v;
        env_open(&v, c, 900);
        confsmoe_saved *s = NULL;
        ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s), CONFSMOE_OK);
        void *dhs = tsnap(v.dh), *dss = tsnap(v.dslots);
        isnap g0;
        isnap_take(v.imp, &g0);
        const long base = v.a.live;
        v.a.fail_at = v.a.total + n;
        const confsmoe_status st = confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots);
        v.a.fail_at = 0;
        if (st != CONFSMOE_OK) {
            failures++;
            ck_assert_int_eq(st, CONFSMOE_E_NOMEM);
            CK_ERR(v.ctx, "imputer_backward");
            CK_ERR(v.ctx, "out of memory");
            ck_assert_int_eq(v.a.live, base);
            ck_assert(tsame(v.dh, dhs) && tsame(v.dslots, dss));
            isnap_check(v.imp, &g0);
            /* Not consumed: the retry succeeds. */
            ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s, v.dout, v.dh, v.dslots), CONFSMOE_OK);
        }
        ck_assert(tequal(v.dh, clean.dh));
        ck_assert(tequal(v.dslots, clean.dslots));
        for (int32_t i = 0; i < confsmoe_imputer_n_params(v.imp); i++)
            ck_assert(tequal(confsmoe_imputer_grad(v.imp, i), confsmoe_imputer_grad(clean.imp, i)));
        confsmoe_saved_destroy(s);
        free(dhs);
        free(dss);
        isnap_free(&g0);
        env_close(&v);
        if (st == CONFSMOE_OK)
            break;
    }
    ck_assert_int_ge(failures, 1);
    env_close(&clean);
}
END_TEST

/* A saved handle outlives later forwards, and handles are independent. */
START_TEST(test_saved_interleaved)
{
    const cfg *c = &cfgs[4];
    env v;
    env_open(&v, c, 950);
    confsmoe_saved *s1 = NULL, *s2 = NULL;
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s1), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s1, v.dout, v.dh, v.dslots), CONFSMOE_OK);
    isnap once;
    isnap_take(v.imp, &once);
    void *dh1 = tsnap(v.dh);
    confsmoe_saved_destroy(s1);
    confsmoe_imputer_zero_grad(v.imp);
    /* Two forwards (the second on other inputs), then the first one's backward. */
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s1), CONFSMOE_OK);
    trng r = {1};
    fill_uniform(v.h, &r, -1, 1);
    ck_assert_int_eq(confsmoe_imputer_forward(v.imp, v.h, v.slots, v.avail, v.out, &s2), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_imputer_backward(v.imp, s1, v.dout, v.dh, NULL), CONFSMOE_OK);
    ck_assert(tsame(v.dh, dh1));
    for (int32_t i = 0; i < once.n; i++)
        ck_assert(tsame(confsmoe_imputer_grad(v.imp, i), once.g[i]));
    confsmoe_saved_destroy(s1);
    confsmoe_saved_destroy(s2); /* destroyed without backward */
    free(dh1);
    isnap_free(&once);
    env_close(&v);
}
END_TEST

/* ------------------------------------------------------------ suite */

static Suite *imputer_suite(void)
{
    Suite *s = suite_create("imputer");
    TCase *tc;

    tc = tcase_create("params");
    tcase_add_test(tc, test_params_init);
    tcase_add_test(tc, test_create_bad_params);
    tcase_add_test(tc, test_create_null_args);
    tcase_add_test(tc, test_param_view);
    tcase_add_test(tc, test_init);
    suite_add_tcase(s, tc);

    tc = tcase_create("fill");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_fill_draws, 0, 2);
    tcase_add_test(tc, test_fill_uniformity);
    tcase_add_test(tc, test_fill_small_pool);
    tcase_add_test(tc, test_fill_seed);
    tcase_add_loop_test(tc, test_fill_errors, 0, (int)(sizeof bad_fills / sizeof *bad_fills));
    tcase_add_loop_test(tc, test_fill_nonfinite, 0, 2);
    tcase_add_test(tc, test_fill_threads);
    tcase_add_test(tc, test_fill_nothing_to_do);
    tcase_add_test(tc, test_fault_fill);
    suite_add_tcase(s, tc);

    tc = tcase_create("forward");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_forward_reference, 0, N_CFGS);
    tcase_add_loop_test(tc, test_default_t, 0, 4);
    tcase_add_loop_test(tc, test_aliasing, 0, N_CFGS);
    tcase_add_test(tc, test_nothing_missing);
    tcase_add_test(tc, test_empty_batch);
    suite_add_tcase(s, tc);

    tc = tcase_create("backward");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_backward_reference, 0, N_CFGS);
    tcase_add_test(tc, test_optional_outputs);
    tcase_add_test(tc, test_saved_interleaved);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_loop_test(tc, test_forward_errors, 0, (int)(sizeof bad_fwds / sizeof *bad_fwds));
    tcase_add_test(tc, test_forward_nonfinite_unchecked);
    tcase_add_loop_test(tc, test_backward_errors, 0, (int)(sizeof bad_bwds / sizeof *bad_bwds));
    suite_add_tcase(s, tc);

    tc = tcase_create("faults");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_fault_create);
    tcase_add_loop_test(tc, test_fault_forward, 0, 2);
    tcase_add_test(tc, test_fault_backward);
    suite_add_tcase(s, tc);

    return s;
}

int main(void)
{
    return test_run(imputer_suite());
}
