/* One expert's confidence network (lib/confnet.c), called directly: c = sigmoid(v . LN(y) + b)
 * with LN as torch.nn.LayerNorm (biased variance, eps 1e-5, affine) against a double reference
 * written here, and every gradient of backward against central differences of that reference.
 * Widths below, at and past the kernels' chunk of 16 floats. */
#include <math.h>

#include "confnet.h"
#include "testutil.h"

enum { ROWS = 3, MAX_D = 37 };

typedef struct {
    double y[ROWS * MAX_D], gamma[MAX_D], beta[MAX_D], v[MAX_D], b;
} confnet_point;

static double reference_confidence(const confnet_point *p, int row, int d)
{
    const double *y = p->y + row * d;
    double mean = 0, var = 0, logit = p->b;
    for (int c = 0; c < d; c++)
        mean += y[c];
    mean /= d;
    for (int c = 0; c < d; c++)
        var += (y[c] - mean) * (y[c] - mean);
    const double rstd = 1 / sqrt(var / d + 1e-5);
    for (int c = 0; c < d; c++)
        logit += ((y[c] - mean) * rstd * p->gamma[c] + p->beta[c]) * p->v[c];
    return 1 / (1 + exp(-logit));
}

/* L = sum_r ds_r c_r */
static double reference_loss(const confnet_point *p, const double *ds, int d)
{
    double loss = 0;
    for (int r = 0; r < ROWS; r++)
        loss += ds[r] * reference_confidence(p, r, d);
    return loss;
}

/* dL/d*value by central differences. */
static double central_difference(confnet_point *p, double *value, const double *ds, int d)
{
    const double h = 1e-5, keep = *value;
    *value = keep + h;
    const double up = reference_loss(p, ds, d);
    *value = keep - h;
    const double down = reference_loss(p, ds, d);
    *value = keep;
    return (up - down) / (2 * h);
}

static void expect_close(const char *what, int d, int i, double got, double want)
{
    ck_assert_msg(fabs(got - want) <= 2e-5 + 1e-4 * fabs(want), "d %d: %s[%d] = %.8g, want %.8g", d, what, i, got,
                  want);
}

static void check_width(int d)
{
    trng rng = {(uint64_t)d};
    confnet_point p;
    float y[ROWS * MAX_D], gamma[MAX_D], beta[MAX_D], v[MAX_D], b[1];
    for (int i = 0; i < ROWS * d; i++)
        p.y[i] = y[i] = (float)trng_uniform(&rng, -1, 1);
    for (int c = 0; c < d; c++) {
        p.gamma[c] = gamma[c] = (float)trng_uniform(&rng, 0.5, 1.5);
        p.beta[c] = beta[c] = (float)trng_uniform(&rng, -0.2, 0.2);
        p.v[c] = v[c] = (float)trng_uniform(&rng, -0.5, 0.5);
    }
    p.b = b[0] = 0.3f;

    /* Gradients start non-zero: backward accumulates. */
    float d_gamma[MAX_D], d_beta[MAX_D], dv[MAX_D], db[1] = {0.5f}, dy[ROWS * MAX_D];
    for (int c = 0; c < d; c++)
        d_gamma[c] = d_beta[c] = dv[c] = 0.5f;
    for (int i = 0; i < ROWS * d; i++)
        dy[i] = 0.25f;
    const csm_confnet net = {.ln_weight = gamma, .ln_bias = beta, .w = v, .b = b,
                             .d_ln_weight = d_gamma, .d_ln_bias = d_beta, .dw = dv, .db = db};

    float s[ROWS], mean[ROWS], rstd[ROWS], z[ROWS], scratch[2 * MAX_D];
    csm_confnet_cache cache = {.mean = mean, .rstd = rstd, .z = z};
    csm_confnet_forward(&net, y, ROWS, d, s, &cache, scratch);
    for (int r = 0; r < ROWS; r++)
        expect_close("c", d, r, s[r], reference_confidence(&p, r, d));

    const float ds_f[ROWS] = {1.0f, -0.7f, 2.5f};
    const double ds[ROWS] = {1.0, -0.7, 2.5};
    csm_confnet_backward(&net, y, ROWS, d, s, ds_f, &cache, dy, scratch);
    expect_close("db", d, 0, db[0] - 0.5, central_difference(&p, &p.b, ds, d));
    for (int c = 0; c < d; c++) {
        expect_close("d_gamma", d, c, d_gamma[c] - 0.5, central_difference(&p, &p.gamma[c], ds, d));
        expect_close("d_beta", d, c, d_beta[c] - 0.5, central_difference(&p, &p.beta[c], ds, d));
        expect_close("dv", d, c, dv[c] - 0.5, central_difference(&p, &p.v[c], ds, d));
    }
    for (int i = 0; i < ROWS * d; i++)
        expect_close("dy", d, i, dy[i] - 0.25, central_difference(&p, &p.y[i], ds, d));
}

START_TEST(test_forward_and_backward_against_reference)
{
    const int widths[] = {1, 5, 16, 37};
    for (size_t i = 0; i < sizeof widths / sizeof *widths; i++)
        check_width(widths[i]);
}
END_TEST

START_TEST(test_constant_row_gives_sigmoid_of_beta_dot_v_plus_b)
{
    /* A row of equal values has LN(y) = beta exactly: c = sigmoid(beta . v + b), by hand
     * 0.1 * 2 + (-0.3) * 1 + 0.05 = -0.05. */
    const float y[2] = {4.0f, 4.0f}, gamma[2] = {3.0f, -2.0f}, beta[2] = {0.1f, -0.3f}, v[2] = {2.0f, 1.0f};
    const float b[1] = {0.05f};
    float unused[2] = {0}, unused_b[1] = {0};
    const csm_confnet net = {.ln_weight = gamma, .ln_bias = beta, .w = v, .b = b, .d_ln_weight = unused,
                             .d_ln_bias = unused, .dw = unused, .db = unused_b};
    float s[1], mean[1], rstd[1], z[1], scratch[4];
    csm_confnet_cache cache = {.mean = mean, .rstd = rstd, .z = z};
    csm_confnet_forward(&net, y, 1, 2, s, &cache, scratch);
    ck_assert_float_eq_tol(s[0], 1 / (1 + exp(0.05)), 1e-7);
    ck_assert_float_eq(mean[0], 4.0f);
    ck_assert_float_eq(z[0], 0.0f);
}
END_TEST

START_TEST(test_block_maps_rows_to_slots_and_expert_level_takes_the_mean)
{
    /* Block row r is slot slot_of[r]: token level copies s to its slot, expert level gives
     * every slot of the block the mean of s. */
    const float y[4] = {1.0f, 2.0f, 2.0f, -1.0f}, gamma[2] = {1.0f, 1.0f}, beta[2] = {0.0f, 0.0f};
    const float v[2] = {0.5f, -1.5f}, b[1] = {0.2f};
    float unused[2] = {0}, unused_b[1] = {0};
    const csm_confnet net = {.ln_weight = gamma, .ln_bias = beta, .w = v, .b = b, .d_ln_weight = unused,
                             .d_ln_bias = unused, .dw = unused, .db = unused_b};
    const int64_t slot_of[2] = {1, 0};
    float s[2], mean[2], rstd[2], z[2], scratch[2], c[2];
    for (int expert_level = 0; expert_level <= 1; expert_level++) {
        const csm_confnet_block block = {&net, y, 2, 2, expert_level, slot_of, s, {mean, rstd, z}};
        csm_confnet_block_forward(&block, c, scratch);
        ck_assert_float_ne(s[0], s[1]);
        if (expert_level) {
            ck_assert_float_eq_tol(c[0], 0.5 * (s[0] + s[1]), 1e-7);
            ck_assert_float_eq(c[1], c[0]);
        } else {
            ck_assert_float_eq(c[1], s[0]);
            ck_assert_float_eq(c[0], s[1]);
        }
    }
}
END_TEST

START_TEST(test_confidence_loss_by_hand)
{
    /* W = 0, b = 0: the target classifier gives 1/2 to each of C = 2 classes. Token 0 (present,
     * c = 0.8) contributes (0.8 - 0.5)^2 = 0.09; token 1 is absent. compat divides by both rows. */
    const float y[2] = {3.0f, -7.0f}, w[2] = {0.0f, 0.0f}, bias[2] = {0.0f, 0.0f}, c[2] = {0.8f, 0.3f};
    const int64_t slot_of[2] = {0, 1};
    const uint8_t present[2] = {1, 0};
    const int32_t labels[2] = {0, 1};
    float probs[4], den, dc[2] = {0.0f, 0.0f}, dz[4] = {9.0f, 9.0f, 9.0f, 9.0f};
    csm_confidence_target t = {.k = 1, .d = 1, .n_classes = 2, .w = w, .b = bias, .slot_of = slot_of,
                               .present = present, .labels = labels, .c = c, .probs = probs};
    ck_assert_float_eq_tol(csm_confidence_loss_forward(&t, y, 2, &den), 0.09f, 1e-7);
    ck_assert_float_eq(den, 1.0f);
    ck_assert_float_eq_tol(probs[0], 0.5f, 1e-7);
    /* d/dc of scale (c - p)^2 / 2 is scale (c - p); dz = -scale (c - p) p (onehot - p). */
    csm_confidence_loss_rows(&t, 1.0f, false, 0, 2, dc, dz);
    ck_assert_float_eq_tol(dc[0], 0.3f, 1e-7);
    ck_assert_float_eq(dc[1], 0.0f);
    ck_assert_float_eq_tol(dz[0], -0.075f, 1e-7);
    ck_assert_float_eq_tol(dz[1], 0.075f, 1e-7);
    ck_assert_float_eq(dz[2], 0.0f);
    ck_assert_float_eq(dz[3], 0.0f);
    t.compat = true;
    ck_assert_float_eq_tol(csm_confidence_loss_forward(&t, y, 2, &den), 0.045f, 1e-7);
    ck_assert_float_eq(den, 2.0f);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_confnet");
    TCase *tc = tcase_create("confnet");
    tcase_add_test(tc, test_forward_and_backward_against_reference);
    tcase_add_test(tc, test_constant_row_gives_sigmoid_of_beta_dot_v_plus_b);
    tcase_add_test(tc, test_block_maps_rows_to_slots_and_expert_level_takes_the_mean);
    tcase_add_test(tc, test_confidence_loss_by_hand);
    suite_add_tcase(s, tc);
    return test_run(s);
}
