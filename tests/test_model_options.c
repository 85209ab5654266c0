/* The model's stage-1 and training options: fresh stage-1 draws in predict by default, the pool
 * mean with predict_pool_mean (deterministic, no RNG use); modality dropout in training only;
 * the write-back of imputed rows. Public API only. */
#include <math.h>
#include <string.h>

#include "testutil.h"

enum { M = 3, B = 6, C = 4, POOL = 5 };
static const int64_t FEATURES[M] = {4, 3, 5};

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_tensor *inputs[M], *avail, *labels, *logits;
} fixture;

/* A model with the given stage-1 options; inputs, pools and labels from a fixed stream, so that
 * two fixtures made alike hold the same data. Modality 1 is missing for half of the batch. */
static void setup_full(fixture *f, int32_t draws, int32_t pool_mean, int32_t imputation, float modality_dropout,
                       float dropout, int32_t writeback)
{
    memset(f, 0, sizeof *f);
    f->ctx = test_ctx(7);
    confsmoe_model_params p;
    test_model_params(&p, M, FEATURES, 8, C);
    p.n_experts = 3;
    p.draws = draws;
    p.predict_pool_mean = pool_mean;
    p.imputation = imputation;
    p.modality_dropout = modality_dropout;
    p.dropout = dropout;
    p.writeback = writeback;
    ck_assert_int_eq(confsmoe_model_create(f->ctx, &p, &f->model), CONFSMOE_OK);
    trng r = {99};
    for (int32_t m = 0; m < M; m++) {
        const int64_t dims[2] = {B, FEATURES[m]}, pool_dims[2] = {POOL, FEATURES[m]};
        confsmoe_tensor *pool = NULL;
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_F32, 2, dims, &f->inputs[m]), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_F32, 2, pool_dims, &pool), CONFSMOE_OK);
        fill_uniform(f->inputs[m], &r, -1, 1);
        fill_uniform(pool, &r, -2, 2);
        ck_assert_int_eq(confsmoe_model_set_pool(f->model, m, pool), CONFSMOE_OK);
        confsmoe_tensor_destroy(pool);
    }
    const int64_t avail_dims[2] = {B, M}, logit_dims[2] = {B, C}, label_dims[1] = {B};
    ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_U8, 2, avail_dims, &f->avail), CONFSMOE_OK);
    for (int64_t b = 0; b < B; b++)
        for (int32_t m = 0; m < M; m++)
            u8(f->avail)[b * M + m] = !(m == 1 && b % 2 == 0);
    ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_F32, 2, logit_dims, &f->logits), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_I32, 1, label_dims, &f->labels), CONFSMOE_OK);
    for (int64_t b = 0; b < B; b++)
        i32(f->labels)[b] = (int32_t)(b % C);
}

static void setup(fixture *f, int32_t draws, int32_t pool_mean, int32_t imputation)
{
    setup_full(f, draws, pool_mean, imputation, 0.0f, 0.1f, CONFSMOE_WRITEBACK_LN_IMP);
}

static void teardown(fixture *f)
{
    for (int32_t m = 0; m < M; m++)
        confsmoe_tensor_destroy(f->inputs[m]);
    confsmoe_tensor_destroy(f->avail);
    confsmoe_tensor_destroy(f->labels);
    confsmoe_tensor_destroy(f->logits);
    confsmoe_model_destroy(f->model);
    confsmoe_ctx_destroy(f->ctx);
}

/* Copies every parameter of src into dst (same architecture). */
static void copy_params(confsmoe_model *dst, confsmoe_model *src)
{
    ck_assert_int_eq(confsmoe_model_n_params(dst), confsmoe_model_n_params(src));
    for (int32_t i = 0; i < confsmoe_model_n_params(src); i++) {
        confsmoe_tensor *s = confsmoe_model_param(src, i), *d = confsmoe_model_param(dst, i);
        memcpy(confsmoe_tensor_data(d), confsmoe_tensor_data(s), (size_t)confsmoe_tensor_numel(s) * sizeof(float));
    }
}

static void predict(fixture *f, float *out)
{
    const confsmoe_tensor *in[M] = {f->inputs[0], f->inputs[1], f->inputs[2]};
    ck_assert_int_eq(confsmoe_model_predict(f->model, in, f->avail, f->logits), CONFSMOE_OK);
    memcpy(out, f32(f->logits), sizeof(float) * B * C);
    for (int i = 0; i < B * C; i++)
        ck_assert(isfinite(out[i]));
}

static double max_diff(const float *a, const float *b, int n)
{
    double worst = 0.0;
    for (int i = 0; i < n; i++)
        worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    return worst;
}

/* With the pool mean, repeated predictions are identical; with draws (2 of 5 pool rows) they
 * differ, since each call draws afresh. */
START_TEST(test_pool_mean_is_deterministic)
{
    fixture det, drawn;
    setup(&det, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE);
    setup(&drawn, 2, 0, CONFSMOE_IMPUTE_TWO_STAGE);
    copy_params(drawn.model, det.model);
    float a[B * C], b[B * C];
    predict(&det, a);
    predict(&det, b);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0, "predict with the pool mean changed between calls");
    double spread = 0.0;
    for (int call = 0; call < 4; call++) {
        predict(&drawn, a);
        predict(&drawn, b);
        spread = fmax(spread, max_diff(a, b, B * C));
    }
    ck_assert_msg(spread > 1e-4, "fresh draws gave the same logits every time (spread %g)", spread);
    teardown(&det);
    teardown(&drawn);
}
END_TEST

/* The pool mean equals what stage 1 computes when it draws every pool row (draws >= pool rows). */
START_TEST(test_pool_mean_matches_all_rows)
{
    fixture det, all;
    setup(&det, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE);
    setup(&all, POOL, 0, CONFSMOE_IMPUTE_TWO_STAGE);
    copy_params(all.model, det.model);
    float a[B * C], b[B * C];
    predict(&det, a);
    predict(&all, b);
    ck_assert_msg(max_diff(a, b, B * C) < 1e-5, "pool mean vs all rows drawn: %g", max_diff(a, b, B * C));
    teardown(&det);
    teardown(&all);
}
END_TEST

/* predict with the pool mean draws nothing from the ctx RNG: a training step after it behaves
 * exactly as a training step without it. Training still draws with the option on. */
START_TEST(test_pool_mean_leaves_rng_alone)
{
    fixture f1, f2;
    setup(&f1, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE);
    setup(&f2, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE);
    copy_params(f2.model, f1.model);
    const confsmoe_tensor *in1[M] = {f1.inputs[0], f1.inputs[1], f1.inputs[2]};
    const confsmoe_tensor *in2[M] = {f2.inputs[0], f2.inputs[1], f2.inputs[2]};
    float scratch[B * C], loss1 = 0, loss2 = 0, loss3 = 0;
    predict(&f1, scratch);
    ck_assert_int_eq(confsmoe_model_step(f1.model, in1, f1.avail, f1.labels, NULL, &loss1, NULL), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_model_step(f2.model, in2, f2.avail, f2.labels, NULL, &loss2, NULL), CONFSMOE_OK);
    ck_assert_msg(loss1 == loss2, "a pool-mean predict moved the RNG: %g vs %g", loss1, loss2);
    /* The next step of f2 draws different stage-1 rows (and dropout): its loss differs. */
    ck_assert_int_eq(confsmoe_model_step(f2.model, in2, f2.avail, f2.labels, NULL, &loss3, NULL), CONFSMOE_OK);
    ck_assert(loss3 != loss2);
    teardown(&f1);
    teardown(&f2);
}
END_TEST

/* Parameters of a valid model but for the one field the caller sets next. */
static void valid_params(confsmoe_model_params *p)
{
    confsmoe_model_params_init(p);
    p->n_modalities = M;
    p->features = FEATURES;
    p->n_classes = C;
}

/* create refuses p, leaves no model behind and names the bad field. */
static void expect_refused(const confsmoe_model_params *p, const char *field)
{
    confsmoe_ctx *ctx = test_ctx(1);
    confsmoe_model *model = (confsmoe_model *)p; /* must be overwritten with NULL */
    ck_assert_int_eq(confsmoe_model_create(ctx, p, &model), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(model);
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), field) != NULL, "error: %s", confsmoe_ctx_last_error(ctx));
    confsmoe_ctx_destroy(ctx);
}

START_TEST(test_pool_mean_flag_validated)
{
    confsmoe_model_params p;
    valid_params(&p);
    ck_assert_int_eq(p.predict_pool_mean, 0);
    p.predict_pool_mean = 2;
    expect_refused(&p, "predict_pool_mean");
}
END_TEST

/* ------------------------------------------------------------------ modality dropout */

static float step_loss(fixture *f, const uint8_t *avail)
{
    memcpy(u8(f->avail), avail, (size_t)B * M);
    const confsmoe_tensor *in[M] = {f->inputs[0], f->inputs[1], f->inputs[2]};
    float loss = 0.0f;
    confsmoe_model_zero_grad(f->model);
    ck_assert_int_eq(confsmoe_model_step(f->model, in, f->avail, f->labels, NULL, &loss, NULL), CONFSMOE_OK);
    ck_assert(isfinite(loss));
    return loss;
}

/* With p = 1 every sample keeps exactly one of its present modalities: the step (nothing else
 * random: mean imputation, no dropout) equals a p = 0 step on one of the 3^B masks that keep one
 * present modality per sample, loss and every gradient; and the modality kept varies. */
START_TEST(test_modality_dropout_keeps_one)
{
    fixture drop, plain;
    setup_full(&drop, 2, 0, CONFSMOE_IMPUTE_MEAN, 1.0f, 0.0f, CONFSMOE_WRITEBACK_LN_IMP);
    setup_full(&plain, 2, 0, CONFSMOE_IMPUTE_MEAN, 0.0f, 0.0f, CONFSMOE_WRITEBACK_LN_IMP);
    copy_params(plain.model, drop.model);
    uint8_t all[B * M];
    memset(all, 1, sizeof all);
    const int32_t n = confsmoe_model_n_params(drop.model);
    int distinct_hits = 0;
    int hit_seen[729] = {0}; /* 3^B masks */
    for (int trial = 0; trial < 8; trial++) {
        const float loss = step_loss(&drop, all);
        int found = -1;
        for (int code = 0; code < 729 && found < 0; code++) {
            uint8_t one[B * M] = {0};
            for (int b = 0, c = code; b < B; b++, c /= 3)
                one[b * M + c % 3] = 1;
            if (step_loss(&plain, one) != loss)
                continue;
            found = code;
            for (int32_t i = 0; i < n; i++) {
                confsmoe_tensor *g1 = confsmoe_model_grad(drop.model, i), *g2 = confsmoe_model_grad(plain.model, i);
                ck_assert_msg(memcmp(confsmoe_tensor_data(g1), confsmoe_tensor_data(g2),
                                     (size_t)confsmoe_tensor_numel(g1) * sizeof(float)) == 0,
                              "gradient %s differs", confsmoe_model_param_name(drop.model, i));
            }
        }
        ck_assert_msg(found >= 0, "trial %d: the p = 1 step matches no one-modality mask", trial);
        distinct_hits += !hit_seen[found];
        hit_seen[found] = 1;
    }
    ck_assert_msg(distinct_hits > 1, "modality dropout kept the same modalities in every step");
    teardown(&drop);
    teardown(&plain);
}
END_TEST

/* p = 0 is the plain step, and predict ignores modality dropout. */
START_TEST(test_modality_dropout_training_only)
{
    fixture drop, plain;
    setup_full(&drop, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE, 0.7f, 0.0f, CONFSMOE_WRITEBACK_LN_IMP);
    setup_full(&plain, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE, 0.0f, 0.0f, CONFSMOE_WRITEBACK_LN_IMP);
    copy_params(plain.model, drop.model);
    float a[B * C], b[B * C];
    predict(&drop, a);
    predict(&plain, b);
    ck_assert_msg(memcmp(a, b, sizeof a) == 0, "predict changed with modality_dropout");
    /* Different masks in training: with p = 0.7 the losses differ from the plain step's. */
    uint8_t all[B * M];
    memset(all, 1, sizeof all);
    const float plain_loss = step_loss(&plain, all);
    int differ = 0;
    for (int trial = 0; trial < 4; trial++)
        differ += step_loss(&drop, all) != plain_loss;
    ck_assert_int_gt(differ, 0);
    teardown(&drop);
    teardown(&plain);
}
END_TEST

START_TEST(test_modality_dropout_validated)
{
    const float bad[] = {-0.1f, 1.5f, NAN};
    for (int i = 0; i < 3; i++) {
        confsmoe_model_params p;
        valid_params(&p);
        ck_assert(p.modality_dropout == 0.0f);
        p.modality_dropout = bad[i];
        expect_refused(&p, "modality_dropout");
    }
}
END_TEST

/* ------------------------------------------------------------------ write-back */

START_TEST(test_writeback_validated)
{
    /* Also with mean imputation, where no imputer is created to check it. */
    const int32_t bad[] = {-1, 2}, imputation[] = {CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_IMPUTE_MEAN};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            confsmoe_model_params p;
            valid_params(&p);
            ck_assert_int_eq(p.writeback, CONFSMOE_WRITEBACK_LN_IMP);
            p.writeback = bad[i];
            p.imputation = imputation[j];
            expect_refused(&p, "writeback");
        }
}
END_TEST

/* The residual write-back drops exactly imputer.ln.* from the parameter list (the rest keeps its
 * names and order), and with the same weights changes the logits of the samples that miss a
 * modality only: the others are bit-identical. */
START_TEST(test_writeback_changes_missing_samples_only)
{
    fixture ln, res;
    setup_full(&ln, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE, 0.0f, 0.0f, CONFSMOE_WRITEBACK_LN_IMP);
    setup_full(&res, 2, 1, CONFSMOE_IMPUTE_TWO_STAGE, 0.0f, 0.0f, CONFSMOE_WRITEBACK_RESIDUAL);
    const int32_t n = confsmoe_model_n_params(ln.model);
    ck_assert_int_eq(confsmoe_model_n_params(res.model), n - 2);
    for (int32_t i = 0, j = 0; i < n; i++) {
        const char *name = confsmoe_model_param_name(ln.model, i);
        if (strncmp(name, "imputer.ln.", 11) == 0)
            continue;
        ck_assert_str_eq(confsmoe_model_param_name(res.model, j), name);
        confsmoe_tensor *src = confsmoe_model_param(ln.model, i), *dst = confsmoe_model_param(res.model, j++);
        memcpy(confsmoe_tensor_data(dst), confsmoe_tensor_data(src),
               (size_t)confsmoe_tensor_numel(src) * sizeof(float));
    }
    float a[B * C], b[B * C];
    predict(&ln, a);
    predict(&res, b);
    for (int64_t s = 0; s < B; s++) {
        /* Modality 1 is missing for the even samples. */
        const double diff = max_diff(a + s * C, b + s * C, C);
        if (s % 2)
            ck_assert_msg(diff == 0.0, "sample %d has every modality, yet its logits differ by %g", (int)s, diff);
        else
            ck_assert_msg(diff > 1e-3, "sample %d misses a modality, yet its logits differ by only %g", (int)s,
                          diff);
    }
    teardown(&ln);
    teardown(&res);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("model_options");
    TCase *tc = tcase_create("predict");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_pool_mean_is_deterministic);
    tcase_add_test(tc, test_pool_mean_matches_all_rows);
    tcase_add_test(tc, test_pool_mean_leaves_rng_alone);
    tcase_add_test(tc, test_pool_mean_flag_validated);
    tcase_add_test(tc, test_modality_dropout_keeps_one);
    tcase_add_test(tc, test_modality_dropout_training_only);
    tcase_add_test(tc, test_modality_dropout_validated);
    tcase_add_test(tc, test_writeback_validated);
    tcase_add_test(tc, test_writeback_changes_missing_samples_only);
    suite_add_tcase(s, tc);
    return test_run(s);
}
