/* The gate's router (lib/router.c), called directly: the three logit kinds on a case worked
 * out by hand, top-k with ties, the noise term, and the backward against the derivatives
 * written out in double here (docs/MODEL.md, section 3). */
#include <math.h>

#include "router.h"
#include "testutil.h"

/* x [3, 2] and w [d = 2, E = 3] with columns w_0 = (1, 0), w_1 = (0, 1), w_2 = (1, 1). */
static const float ROUTER_X[6] = {1, 2, 0, -1, 1, 1};
static const float ROUTER_W[6] = {1, 0, 1, 0, 1, 1};

typedef struct {
    confsmoe_ctx *ctx;
    csm_router r;
    float per_expert[16];
} router_fixture;

static void router_open(router_fixture *f, int32_t kind, int64_t d, int32_t n_experts, bool noisy)
{
    f->ctx = test_ctx(3);
    f->r = (csm_router){.kind = kind, .n_experts = n_experts, .d = d, .per_expert = f->per_expert};
    f->r.w = test_tensor(f->ctx, CONFSMOE_F32, 2, d, n_experts, 0, 0);
    f->r.dw = test_tensor(f->ctx, CONFSMOE_F32, 2, d, n_experts, 0, 0);
    if (noisy) {
        f->r.wn = test_tensor(f->ctx, CONFSMOE_F32, 2, d, n_experts, 0, 0);
        f->r.dwn = test_tensor(f->ctx, CONFSMOE_F32, 2, d, n_experts, 0, 0);
    }
}

static void router_close(router_fixture *f)
{
    confsmoe_tensor_destroy(f->r.w);
    confsmoe_tensor_destroy(f->r.dw);
    confsmoe_tensor_destroy(f->r.wn);
    confsmoe_tensor_destroy(f->r.dwn);
    confsmoe_ctx_destroy(f->ctx);
}

static void check_logits(int32_t kind, const double *want)
{
    router_fixture f;
    router_open(&f, kind, 2, 3, false);
    memcpy(f32(f.r.w), ROUTER_W, sizeof ROUTER_W);
    float u[9];
    csm_router_logits(&f.r, ROUTER_X, 3, u);
    for (int i = 0; i < 9; i++)
        ck_assert_msg(fabs(u[i] - want[i]) <= 1e-6 * (1 + fabs(want[i])), "kind %d, u[%d] = %.9g, want %.9g",
                      kind, i, (double)u[i], want[i]);
    router_close(&f);
}

START_TEST(test_logits_by_hand)
{
    /* x . w_e */
    const double dot[9] = {1, 2, 3, 0, -1, -1, 1, 1, 2};
    /* -||x - w_e||^2: (1,2) is 4, 2, 1 away (squared); (0,-1) is 2, 4, 5; (1,1) is 1, 1 and 0. */
    const double gaussian[9] = {-4, -2, -1, -2, -4, -5, -1, -1, 0};
    const double laplacian[9] = {-2, -sqrt(2.0), -1, -sqrt(2.0), -2, -sqrt(5.0), -1, -1, 0};
    check_logits(CONFSMOE_ROUTER_SOFTMAX, dot);
    check_logits(CONFSMOE_ROUTER_GAUSSIAN, gaussian);
    check_logits(CONFSMOE_ROUTER_LAPLACIAN, laplacian);
}
END_TEST

START_TEST(test_topk_best_first_lower_index_on_ties)
{
    const float u[3 * 4] = {1, 3, 3, 2, 5, 5, 5, 5, -1, 0, -2, 4};
    int32_t idx[3 * 4];
    const int32_t top1[3] = {1, 0, 3}, top2[6] = {1, 2, 0, 1, 3, 1};
    const int32_t top4[12] = {1, 2, 3, 0, 0, 1, 2, 3, 3, 1, 0, 2};
    csm_router_topk(u, 3, 4, 1, idx);
    ck_assert_mem_eq(idx, top1, sizeof top1);
    csm_router_topk(u, 3, 4, 2, idx);
    ck_assert_mem_eq(idx, top2, sizeof top2);
    csm_router_topk(u, 3, 4, 4, idx);
    ck_assert_mem_eq(idx, top4, sizeof top4);
}
END_TEST

START_TEST(test_noise_adds_eps_times_softplus)
{
    enum { N = 1024, D = 3, E = 4 };
    router_fixture f;
    router_open(&f, CONFSMOE_ROUTER_SOFTMAX, D, E, true);
    trng rng = {11};
    fill_uniform(f.r.wn, &rng, -1, 1);
    float *x = xcalloc(N * D, sizeof *x), *u = xcalloc(N * E, sizeof *u), *h = xcalloc(N * E, sizeof *h);
    float *eps = xcalloc(N * E, sizeof *eps), *u0 = xcalloc(N * E, sizeof *u0);
    for (int i = 0; i < N * D; i++)
        x[i] = (float)trng_uniform(&rng, -2, 2);
    for (int i = 0; i < N * E; i++)
        u[i] = u0[i] = (float)trng_uniform(&rng, -1, 1);
    csm_substream noise = csm_rng_at(f.ctx, 0);
    csm_router_add_noise(&f.r, &noise, x, N, u, h, eps);
    const float *wn = f32(f.r.wn);
    double sum = 0, sum2 = 0;
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) {
            double hr = 0;
            for (int i = 0; i < D; i++)
                hr += (double)x[t * D + i] * wn[i * E + e];
            const int k = t * E + e;
            ck_assert_msg(fabs(h[k] - hr) <= 1e-5 * (1 + fabs(hr)), "h[%d] = %g, want %g", k, (double)h[k], hr);
            const double sigma = log1p(exp(hr)) + 0.01, want = u0[k] + (double)eps[k] * sigma;
            ck_assert_msg(fabs(u[k] - want) <= 1e-5 * (1 + fabs(want)), "u[%d] = %g, want %g", k, (double)u[k],
                          want);
            sum += eps[k];
            sum2 += (double)eps[k] * eps[k];
        }
    /* eps ~ N(0, 1): mean and variance within 6 standard errors. */
    const double n = N * E, mean = sum / n, var = sum2 / n - mean * mean;
    ck_assert_msg(fabs(mean) < 6 / sqrt(n), "mean of eps %g", mean);
    ck_assert_msg(fabs(var - 1) < 6 * sqrt(2 / n), "variance of eps %g", var);
    free(x), free(u), free(h), free(eps), free(u0);
    router_close(&f);
}
END_TEST

/* dL/dx and dL/dw of L = sum du . u for one kind, written out:
 * softmax u = x . w_e; Gaussian u = -s, Laplacian u = -sqrt(s) with s = ||x - w_e||^2
 * (ds/dx = 2 (x - w_e) = -ds/dw_e; the Laplacian takes 0 at s = 0). */
static void reference_backward(int32_t kind, const float *x, const float *w, const float *du, int n, int d, int E,
                               double *dx, double *dw)
{
    for (int t = 0; t < n; t++)
        for (int e = 0; e < E; e++) {
            double s = 0;
            for (int i = 0; i < d; i++) {
                double diff = (double)x[t * d + i] - w[i * E + e];
                s += diff * diff;
            }
            for (int i = 0; i < d; i++) {
                double g_x, diff = (double)x[t * d + i] - w[i * E + e];
                if (kind == CONFSMOE_ROUTER_SOFTMAX) {
                    dx[t * d + i] += du[t * E + e] * (double)w[i * E + e];
                    dw[i * E + e] += du[t * E + e] * (double)x[t * d + i];
                    continue;
                }
                if (kind == CONFSMOE_ROUTER_GAUSSIAN)
                    g_x = -2 * diff;
                else
                    g_x = s > 0 ? -diff / sqrt(s) : 0;
                dx[t * d + i] += du[t * E + e] * g_x;
                dw[i * E + e] -= du[t * E + e] * g_x;
            }
        }
}

static void check_backward(int32_t kind, bool noisy)
{
    enum { N = 5, D = 7, E = 4 };
    router_fixture f;
    router_open(&f, kind, D, E, noisy);
    trng rng = {(uint64_t)kind * 10 + noisy};
    fill_uniform(f.r.w, &rng, -1, 1);
    fill_const(f.r.dw, 0.25f);
    float x[N * D], du[N * E], u_clean[N * E], h[N * E], dsigma[N * E], dx[N * D], scratch[N * E];
    for (int i = 0; i < N * D; i++)
        x[i] = (float)trng_uniform(&rng, -1, 1), dx[i] = -0.5f;
    for (int i = 0; i < N * E; i++)
        du[i] = (float)trng_uniform(&rng, -1, 1), dsigma[i] = (float)trng_uniform(&rng, -1, 1);
    const float *w = f32(f.r.w);
    /* Row 0 sits exactly on w_1: the Laplacian's subgradient 0. */
    for (int i = 0; i < D; i++)
        x[i] = w[i * E + 1];
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) {
            double s = 0;
            for (int i = 0; i < D; i++)
                s += ((double)x[t * D + i] - w[i * E + e]) * ((double)x[t * D + i] - w[i * E + e]);
            u_clean[t * E + e] = (float)(kind == CONFSMOE_ROUTER_GAUSSIAN ? -s : -sqrt(s));
        }
    double want_dx[N * D], want_dw[D * E], want_dwn[D * E] = {0};
    for (int i = 0; i < N * D; i++)
        want_dx[i] = -0.5;
    for (int i = 0; i < D * E; i++)
        want_dw[i] = 0.25;
    reference_backward(kind, x, w, du, N, D, E, want_dx, want_dw);
    if (noisy) {
        /* sigma = softplus(h) + 0.01, h = x W_noise: dh = dsigma * sigmoid(h). */
        fill_uniform(f.r.wn, &rng, -1, 1);
        const float *wn = f32(f.r.wn);
        for (int t = 0; t < N; t++)
            for (int e = 0; e < E; e++) {
                double hv = 0;
                for (int i = 0; i < D; i++)
                    hv += (double)x[t * D + i] * wn[i * E + e];
                h[t * E + e] = (float)hv;
                const double dh = dsigma[t * E + e] / (1 + exp(-(double)h[t * E + e]));
                for (int i = 0; i < D; i++) {
                    want_dwn[i * E + e] += dh * x[t * D + i];
                    want_dx[t * D + i] += dh * wn[i * E + e];
                }
            }
    }
    csm_router_backward(&f.r, x, N, u_clean, noisy ? h : NULL, du, noisy ? dsigma : NULL, dx, scratch);
    for (int i = 0; i < N * D; i++)
        ck_assert_msg(fabs(dx[i] - want_dx[i]) <= 1e-5 * (1 + fabs(want_dx[i])),
                      "kind %d noisy %d: dx[%d] = %.7g, want %.7g", kind, noisy, i, (double)dx[i], want_dx[i]);
    for (int i = 0; i < D * E; i++) {
        ck_assert_msg(fabs(f32(f.r.dw)[i] - want_dw[i]) <= 1e-5 * (1 + fabs(want_dw[i])),
                      "kind %d noisy %d: dw[%d] = %.7g, want %.7g", kind, noisy, i, (double)f32(f.r.dw)[i], want_dw[i]);
        if (noisy)
            ck_assert_msg(fabs(f32(f.r.dwn)[i] - want_dwn[i]) <= 1e-5 * (1 + fabs(want_dwn[i])),
                          "kind %d: dw_noise[%d] = %.7g, want %.7g", kind, i, (double)f32(f.r.dwn)[i], want_dwn[i]);
    }
    router_close(&f);
}

START_TEST(test_backward_against_reference)
{
    const int32_t kinds[3] = {CONFSMOE_ROUTER_SOFTMAX, CONFSMOE_ROUTER_GAUSSIAN, CONFSMOE_ROUTER_LAPLACIAN};
    for (int k = 0; k < 3; k++) {
        check_backward(kinds[k], false);
        check_backward(kinds[k], true);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_router");
    TCase *tc = tcase_create("router");
    tcase_add_test(tc, test_logits_by_hand);
    tcase_add_test(tc, test_topk_best_first_lower_index_on_ties);
    tcase_add_test(tc, test_noise_adds_eps_times_softplus);
    tcase_add_test(tc, test_backward_against_reference);
    suite_add_tcase(s, tc);
    return test_run(s);
}
