/* The softmax-gate baselines' load-balancing losses (lib/load_loss.c), called directly:
 * CV^2(importance) + CV^2(load) (unbiased variance) and 1 / H(mean gate) on a case worked out
 * by hand, and Shazeer's smooth load against a reference written here (thresholds from a
 * sort, not a scan), with every gradient against central differences of the reference. */
#include <math.h>

#include "load_loss.h"
#include "internal.h"
#include "testutil.h"

/* 2 tokens, 3 experts, top-2: token 0 keeps experts 0 and 1, token 1 keeps 1 and 2. */
static const int32_t HAND_IDX[4] = {0, 1, 1, 2};
static const float HAND_G[4] = {0.75f, 0.25f, 0.6f, 0.4f};

START_TEST(test_cv_loss_by_hand)
{
    /* importance = (0.75, 0.85, 0.4): mean 2/3, unbiased variance 0.11166.../2, CV^2 = 0.125625;
     * load = (1, 2, 1): mean 4/3, variance 1/3, CV^2 = (1/3) / (16/9) = 0.1875. */
    const csm_load_input in = {.n = 2, .n_experts = 3, .k = 2, .idx = HAND_IDX, .g = HAND_G};
    double work[6];
    ck_assert_float_eq_tol(csm_load_loss_forward(CONFSMOE_LOAD_LOSS_CV, &in, work), 0.313125f, 1e-6f);
}
END_TEST

START_TEST(test_entropy_loss_by_hand)
{
    /* Mean gate per expert over the 2 tokens: (0.375, 0.425, 0.2). */
    const csm_load_input in = {.n = 2, .n_experts = 3, .k = 2, .idx = HAND_IDX, .g = HAND_G};
    const double h = -(0.375 * log(0.375) + 0.425 * log(0.425) + 0.2 * log(0.2));
    double work[6];
    ck_assert_float_eq_tol(csm_load_loss_forward(CONFSMOE_LOAD_LOSS_ENTROPY, &in, work), 1 / h, 1e-6);
}
END_TEST

START_TEST(test_none_and_empty_are_zero_and_leave_gradients)
{
    const csm_load_input in = {.n = 2, .n_experts = 3, .k = 2, .idx = HAND_IDX, .g = HAND_G};
    const csm_load_input empty = {.n = 0, .n_experts = 3, .k = 2, .idx = HAND_IDX, .g = HAND_G};
    double work[6];
    float dg[4] = {1, 2, 3, 4};
    const float before[4] = {1, 2, 3, 4};
    ck_assert_float_eq(csm_load_loss_forward(CONFSMOE_LOAD_LOSS_NONE, &in, work), 0.0f);
    ck_assert_float_eq(csm_load_loss_forward(CONFSMOE_LOAD_LOSS_CV, &empty, work), 0.0f);
    csm_load_loss_backward(CONFSMOE_LOAD_LOSS_NONE, &in, 1.0f, work, dg, NULL, NULL);
    csm_load_loss_backward(CONFSMOE_LOAD_LOSS_ENTROPY, &empty, 1.0f, work, dg, NULL, NULL);
    ck_assert_mem_eq(dg, before, sizeof before);
}
END_TEST

/* ---------------------------------------------------------------- reference */

enum { N = 6, E = 5, K = 2 };

typedef struct {
    double g[N * K], u_clean[N * E], sigma[N * E], eps[N * E];
    int32_t idx[N * K];
    bool noisy;
} load_point;

static double ref_cv2(const double *v)
{
    double mean = 0, var = 0;
    for (int e = 0; e < E; e++)
        mean += v[e];
    mean /= E;
    for (int e = 0; e < E; e++)
        var += (v[e] - mean) * (v[e] - mean);
    return var / (E - 1) / (mean * mean + 1e-10);
}

static int descending(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Shazeer's P(expert e stays in the top-k) for token t: the noisy logits are u_clean + eps sigma;
 * a kept expert competes with the (k+1)-th largest, another with the k-th. */
static double ref_keep_probability(const load_point *p, int t, int e)
{
    double sorted[E];
    for (int j = 0; j < E; j++)
        sorted[j] = p->u_clean[t * E + j] + p->eps[t * E + j] * p->sigma[t * E + j];
    qsort(sorted, E, sizeof *sorted, descending);
    bool kept = false;
    for (int j = 0; j < K; j++)
        kept |= p->idx[t * K + j] == e;
    const double threshold = kept ? sorted[K] : sorted[K - 1];
    /* e's own clean logit against the threshold, in units of its noise scale. */
    return 0.5 * erfc(-(p->u_clean[t * E + e] - threshold) / p->sigma[t * E + e] / sqrt(2.0));
}

static double ref_cv_loss(const load_point *p)
{
    double importance[E] = {0}, load[E] = {0};
    for (int t = 0; t < N; t++)
        for (int j = 0; j < K; j++) {
            importance[p->idx[t * K + j]] += p->g[t * K + j];
            if (!p->noisy)
                load[p->idx[t * K + j]] += 1;
        }
    for (int t = 0; p->noisy && t < N; t++)
        for (int e = 0; e < E; e++)
            load[e] += ref_keep_probability(p, t, e);
    return ref_cv2(importance) + ref_cv2(load);
}

static double ref_entropy_loss(const load_point *p)
{
    double importance[E] = {0}, h = 0;
    for (int t = 0; t < N; t++)
        for (int j = 0; j < K; j++)
            importance[p->idx[t * K + j]] += p->g[t * K + j] / N;
    for (int e = 0; e < E; e++)
        if (importance[e] > 0)
            h -= importance[e] * log(importance[e]);
    return 1 / (h + 1e-8);
}

static double ref_loss(int32_t kind, const load_point *p)
{
    return kind == CONFSMOE_LOAD_LOSS_CV ? ref_cv_loss(p) : ref_entropy_loss(p);
}

static double central_difference(int32_t kind, load_point *p, double *value)
{
    const double h = 1e-6, keep = *value;
    *value = keep + h;
    const double up = ref_loss(kind, p);
    *value = keep - h;
    const double down = ref_loss(kind, p);
    *value = keep;
    return (up - down) / (2 * h);
}

static void expect_close(const char *what, int i, double got, double want)
{
    ck_assert_msg(fabs(got - want) <= 2e-5 + 2e-4 * fabs(want), "%s[%d] = %.8g, want %.8g", what, i, got, want);
}

/* A random point whose top-k (by noisy logit) is idx, with well separated logits so that the
 * differences never cross a top-k boundary. */
static void random_point(load_point *p, bool noisy, uint64_t seed)
{
    trng rng = {seed};
    memset(p, 0, sizeof *p);
    p->noisy = noisy;
    for (int t = 0; t < N; t++) {
        double noisy_u[E];
        for (int e = 0; e < E; e++) {
            const int i = t * E + e;
            /* Distinct ranks: expert (e + t) % E gets about rank e. */
            p->u_clean[i] = 1.0 - 0.5 * ((e + t) % E) + trng_uniform(&rng, -0.05, 0.05);
            p->sigma[i] = trng_uniform(&rng, 0.2, 0.6);
            p->eps[i] = noisy ? trng_uniform(&rng, -0.3, 0.3) : 0;
            noisy_u[e] = p->u_clean[i] + p->eps[i] * p->sigma[i];
        }
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                bool taken = false;
                for (int q = 0; q < j; q++)
                    taken |= p->idx[t * K + q] == e;
                if (!taken && (best < 0 || noisy_u[e] > noisy_u[best]))
                    best = e;
            }
            p->idx[t * K + j] = best;
        }
        const double g0 = trng_uniform(&rng, 0.5, 0.9);
        p->g[t * K] = g0, p->g[t * K + 1] = 1 - g0;
    }
}

static void check_against_reference(int32_t kind, bool noisy)
{
    load_point p;
    random_point(&p, noisy, (uint64_t)kind * 2 + noisy);
    float g[N * K], u_clean[N * E], u_noisy[N * E], sigma[N * E], eps[N * E];
    for (int i = 0; i < N * K; i++)
        p.g[i] = g[i] = (float)p.g[i];
    for (int i = 0; i < N * E; i++) {
        p.u_clean[i] = u_clean[i] = (float)p.u_clean[i];
        p.sigma[i] = sigma[i] = (float)p.sigma[i];
        p.eps[i] = eps[i] = (float)p.eps[i];
        u_noisy[i] = (float)(p.u_clean[i] + p.eps[i] * p.sigma[i]);
    }
    csm_load_input in = {.n = N, .n_experts = E, .k = K, .idx = p.idx, .g = g};
    if (noisy) {
        in.u_clean = u_clean;
        in.u_noisy = u_noisy;
        in.sigma = sigma;
        in.eps = eps;
    }
    double work[2 * E];
    const double want = ref_loss(kind, &p);
    const float got = csm_load_loss_forward(kind, &in, work);
    ck_assert_msg(fabs(got - want) <= 1e-6 + 1e-5 * fabs(want), "kind %d noisy %d: loss %.8g, want %.8g", kind, noisy,
                  (double)got, want);

    /* dloss 2: gradients start at 1 and accumulate. */
    float dg[N * K], du_clean[N * E], dsigma[N * E];
    for (int i = 0; i < N * K; i++)
        dg[i] = 1;
    for (int i = 0; i < N * E; i++)
        du_clean[i] = dsigma[i] = 1;
    csm_load_loss_backward(kind, &in, 2.0f, work, dg, noisy ? du_clean : NULL, noisy ? dsigma : NULL);
    for (int i = 0; i < N * K; i++)
        expect_close("dg", i, dg[i] - 1, 2 * central_difference(kind, &p, &p.g[i]));
    for (int i = 0; noisy && i < N * E; i++) {
        /* The kind's own loss only depends on u_clean and sigma through the smooth load. */
        const double want_du = kind == CONFSMOE_LOAD_LOSS_CV ? 2 * central_difference(kind, &p, &p.u_clean[i]) : 0;
        const double want_ds = kind == CONFSMOE_LOAD_LOSS_CV ? 2 * central_difference(kind, &p, &p.sigma[i]) : 0;
        expect_close("du_clean", i, du_clean[i] - 1, want_du);
        expect_close("dsigma", i, dsigma[i] - 1, want_ds);
    }
}

START_TEST(test_against_reference)
{
    check_against_reference(CONFSMOE_LOAD_LOSS_CV, false);
    check_against_reference(CONFSMOE_LOAD_LOSS_CV, true);
    check_against_reference(CONFSMOE_LOAD_LOSS_ENTROPY, false);
    check_against_reference(CONFSMOE_LOAD_LOSS_ENTROPY, true);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_load_loss");
    TCase *tc = tcase_create("load_loss");
    tcase_add_test(tc, test_cv_loss_by_hand);
    tcase_add_test(tc, test_entropy_loss_by_hand);
    tcase_add_test(tc, test_none_and_empty_are_zero_and_leave_gradients);
    tcase_add_test(tc, test_against_reference);
    suite_add_tcase(s, tc);
    return test_run(s);
}
