/* Gradient checks of the whole model step: central differences in double around the float
 * kernels. The ctx is reseeded before every step, so dropout masks, router noise and stage-1
 * draws are the same in every evaluation; top-k and top-T choices are kept by small steps. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "testutil.h"

typedef struct {
    const char *name;
    int32_t M;
    int64_t S, B;
    int32_t gate;          /* CONFSMOE_MODEL_GATE_* */
    int32_t imputation;
    int32_t load_loss;
    int32_t multilabel;
    int32_t compat;
    float dropout;
    int32_t missing;       /* 0: none, 1: one modality missing for every sample, 2: for exactly one sample,
                              3: a random pattern that keeps one modality per sample */
    const int64_t *tokens; /* S_m per modality (modality_tokens), or NULL: S for every modality */
    int32_t writeback;     /* CONFSMOE_WRITEBACK_* */
} config;

static int64_t tokens_of(const config *c, int32_t m) { return c->tokens ? c->tokens[m] : c->S; }

enum { SEED = 11, CAP = 12 };

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_tensor *inputs[6], *avail, *labels;
    int64_t features[6];
} fixture;

static float uniform(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}

static void setup(const config *c, fixture *f)
{
    memset(f, 0, sizeof *f);
    f->ctx = test_ctx(3);
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    for (int32_t m = 0; m < c->M; m++)
        f->features[m] = 3 + m;
    p.n_modalities = c->M;
    p.features = f->features;
    p.tokens = c->S;
    p.modality_tokens = c->tokens;
    p.d = 8;
    p.heads = 2;
    p.n_experts = 3;
    p.k = 2;
    p.n_classes = 3;
    p.gate = c->gate;
    p.imputation = c->imputation;
    p.load_loss = c->load_loss;
    p.multilabel = c->multilabel;
    p.compat = c->compat;
    p.dropout = c->dropout;
    p.writeback = c->writeback;
    p.draws = 2;
    ck_assert_int_eq(confsmoe_model_create(f->ctx, &p, &f->model), CONFSMOE_OK);

    unsigned rng = 5;
    /* LayerNorm affine and positional parameters start constant; randomise them so they count. */
    for (int32_t i = 0; i < confsmoe_model_n_params(f->model); i++) {
        const char *name = confsmoe_model_param_name(f->model, i);
        if (strstr(name, "ln") || strcmp(name, "pos") == 0) {
            confsmoe_tensor *t = confsmoe_model_param(f->model, i);
            float *v = confsmoe_tensor_data(t);
            for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
                v[j] = (strstr(name, "weight") ? 1.0f : 0.0f) + 0.3f * uniform(&rng);
        }
    }
    for (int32_t m = 0; m < c->M; m++) {
        const int64_t S = tokens_of(c, m);
        const int64_t dims[3] = {c->B, S, f->features[m]}, pool_dims[3] = {4, S, f->features[m]};
        confsmoe_tensor *pool = NULL;
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_F32, 3, dims, &f->inputs[m]), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_F32, 3, pool_dims, &pool), CONFSMOE_OK);
        float *x = confsmoe_tensor_data(f->inputs[m]), *pv = confsmoe_tensor_data(pool);
        for (int64_t i = 0; i < confsmoe_tensor_numel(f->inputs[m]); i++)
            x[i] = uniform(&rng);
        for (int64_t i = 0; i < confsmoe_tensor_numel(pool); i++)
            pv[i] = uniform(&rng);
        ck_assert_int_eq(confsmoe_model_set_pool(f->model, m, pool), CONFSMOE_OK);
        confsmoe_tensor_destroy(pool);
    }
    const int64_t avail_dims[2] = {c->B, c->M};
    ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_U8, 2, avail_dims, &f->avail), CONFSMOE_OK);
    uint8_t *a = confsmoe_tensor_data(f->avail);
    for (int64_t b = 0; b < c->B; b++)
        for (int32_t m = 0; m < c->M; m++) {
            uint8_t present = 1;
            if (c->missing == 1)
                present = m != 1;
            else if (c->missing == 2)
                present = !(b == 1 && m == 0);
            else if (c->missing == 3)
                present = m == b % c->M || uniform(&rng) > 0.2f;
            a[b * c->M + m] = present;
        }
    if (c->multilabel) {
        const int64_t dims[2] = {c->B, 3};
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_U8, 2, dims, &f->labels), CONFSMOE_OK);
        uint8_t *y = confsmoe_tensor_data(f->labels);
        for (int64_t i = 0; i < c->B * 3; i++)
            y[i] = uniform(&rng) > 0.0f;
    } else {
        ck_assert_int_eq(confsmoe_tensor_create(f->ctx, CONFSMOE_I32, 1, &c->B, &f->labels), CONFSMOE_OK);
        int32_t *y = confsmoe_tensor_data(f->labels);
        for (int64_t b = 0; b < c->B; b++)
            y[b] = (int32_t)(b % 3);
    }
}

static void teardown(const config *c, fixture *f)
{
    for (int32_t m = 0; m < c->M; m++)
        confsmoe_tensor_destroy(f->inputs[m]);
    confsmoe_tensor_destroy(f->avail);
    confsmoe_tensor_destroy(f->labels);
    confsmoe_model_destroy(f->model);
    confsmoe_ctx_destroy(f->ctx);
}

static double step_loss(fixture *f)
{
    float loss = 0.0f;
    ck_assert_int_eq(confsmoe_ctx_set_seed(f->ctx, SEED), CONFSMOE_OK);
    confsmoe_status s = confsmoe_model_step(f->model, (const confsmoe_tensor *const *)f->inputs, f->avail, f->labels,
                                            NULL, &loss, NULL);
    ck_assert_msg(s == CONFSMOE_OK, "model_step: %s", confsmoe_ctx_last_error(f->ctx));
    return loss;
}

/* The central difference quotient of parameter element v[j] at step eps. */
static double difference_quotient(fixture *f, float *v, int64_t j, float eps)
{
    const float orig = v[j];
    v[j] = orig + eps;
    const double plus = step_loss(f);
    const float up = v[j];
    v[j] = orig - eps;
    const double minus = step_loss(f);
    const float down = v[j];
    v[j] = orig;
    return (plus - minus) / ((double)up - (double)down);
}

/* Per coordinate |a - n| <= 3e-2 max(|a|, |n|) + 2e-3 max(scale, 0.05), where scale is the
 * largest numeric gradient of the tensor. The loss comes back as a float32 of order 1, so at
 * eps = 2e-3 its rounding alone moves a difference quotient by 3e-5; curvature adds about
 * 1e-3 relative. A wrong formula is off by O(1) of the gradient.
 * A step that flips a top-k or top-T choice makes the loss jump by J, which adds J / (2 eps) to
 * the quotient. A disagreeing coordinate is measured again at eps/4: if that quotient agrees
 * (the flip lies between eps/4 and eps), or moved by more than half (the flip lies within
 * eps/4 too, and its part grew fourfold), the coordinate is a jump, not counted against the
 * gradient. A wrong gradient disagrees at both steps with the same quotient. */
static void check_config(const config *c)
{
    fixture f;
    setup(c, &f);
    confsmoe_model_zero_grad(f.model);
    step_loss(&f);
    const int32_t n_params = confsmoe_model_n_params(f.model);
    /* The finite-difference steps accumulate into the gradients too: keep the analytic ones first. */
    float(*analytic_all)[CAP] = calloc((size_t)n_params, sizeof *analytic_all);
    ck_assert_ptr_nonnull(analytic_all);
    for (int32_t i = 0; i < n_params; i++) {
        const int64_t n = confsmoe_tensor_numel(confsmoe_model_param(f.model, i));
        const float *grad = confsmoe_tensor_data(confsmoe_model_grad(f.model, i));
        int count = 0;
        for (int64_t j = 0; j < n && count < CAP; j += (n + CAP - 1) / CAP)
            analytic_all[i][count++] = grad[j];
    }
    int checked = 0, failed = 0, jumps = 0;
    for (int32_t i = 0; i < n_params; i++) {
        confsmoe_tensor *param = confsmoe_model_param(f.model, i);
        const int64_t n = confsmoe_tensor_numel(param);
        const float *analytic = analytic_all[i];
        int64_t coords[CAP];
        int count = 0;
        for (int64_t j = 0; j < n && count < CAP; j += (n + CAP - 1) / CAP)
            coords[count++] = j;
        double numeric[CAP], scale = 0.0;
        float *v = confsmoe_tensor_data(param);
        for (int j = 0; j < count; j++) {
            numeric[j] = difference_quotient(&f, v, coords[j], 2e-3f);
            scale = fmax(scale, fabs(numeric[j]));
        }
        for (int j = 0; j < count; j++) {
            const double a = analytic[j], num = numeric[j];
            const double tol = 3e-2 * fmax(fabs(a), fabs(num)) + 2e-3 * fmax(scale, 0.05);
            checked++;
            if (fabs(a - num) <= tol)
                continue;
            const double finer = difference_quotient(&f, v, coords[j], 5e-4f);
            if (fabs(a - finer) <= tol || fabs(finer - num) > 0.5 * fabs(num)) {
                jumps++;
                continue;
            }
            failed++;
            fprintf(stderr, "%s: %s[%lld]: analytic %.6g numeric %.6g (%.6g at eps/4)\n", c->name,
                    confsmoe_model_param_name(f.model, i), (long long)coords[j], a, num, finer);
        }
    }
    free(analytic_all);
    ck_assert_msg(checked > 0, "%s: nothing checked", c->name);
    /* Disagreements that are not jumps: allow very few. Jumps: a few, so that most coordinates are checked. */
    ck_assert_msg(failed <= checked / 100, "%s: %d of %d coordinates disagree", c->name, failed, checked);
    ck_assert_msg(jumps <= checked / 10, "%s: %d of %d coordinates jump (too many choices flip)", c->name, jumps,
                  checked);
    teardown(c, &f);
}

static const config configs[] = {
    {"confidence, two-stage, M=2 S=1, none missing", 2, 1, 4, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 0, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, two-stage, M=2 S=1, one modality missing for every sample", 2, 1, 4,
     CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 1, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, two-stage, M=2 S=1, missing for exactly one sample", 2, 1, 4, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 2, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, two-stage, M=6 S=1, random missing", 6, 1, 5, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 3, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, two-stage, M=3 S=3, random missing, dropout", 3, 3, 3, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.1f, 3, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"softmax + CV load loss, mean imputation, M=2 S=2", 2, 2, 4, CONFSMOE_MODEL_GATE_SOFTMAX, CONFSMOE_IMPUTE_MEAN,
     CONFSMOE_LOAD_LOSS_CV, 0, 0, 0.0f, 2, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"gaussian, two-stage, multi-label, M=3", 3, 1, 4, CONFSMOE_MODEL_GATE_GAUSSIAN, CONFSMOE_IMPUTE_TWO_STAGE,
     CONFSMOE_LOAD_LOSS_NONE, 1, 0, 0.0f, 3, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"laplacian + entropy loss, two-stage, M=2", 2, 1, 4, CONFSMOE_MODEL_GATE_LAPLACIAN, CONFSMOE_IMPUTE_TWO_STAGE,
     CONFSMOE_LOAD_LOSS_ENTROPY, 0, 0, 0.0f, 2, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, compat, M=3 S=2", 3, 2, 4, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE,
     CONFSMOE_LOAD_LOSS_NONE, 0, 1, 0.1f, 3, NULL, CONFSMOE_WRITEBACK_LN_IMP},
    /* Per-modality S_m: ragged attention, MoE calls, stage 2 (T_m of each missing m) and readout. */
    {"confidence, two-stage, M=3 S=(3,1,2), random missing, dropout", 3, 0, 4, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.1f, 3, (const int64_t[]){3, 1, 2}, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, two-stage, M=2 S=(5,2), one modality missing for every sample", 2, 0, 3,
     CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 1,
     (const int64_t[]){5, 2}, CONFSMOE_WRITEBACK_LN_IMP},
    {"softmax + CV load loss, mean imputation, M=2 S=(1,3)", 2, 0, 4, CONFSMOE_MODEL_GATE_SOFTMAX,
     CONFSMOE_IMPUTE_MEAN, CONFSMOE_LOAD_LOSS_CV, 0, 0, 0.0f, 2, (const int64_t[]){1, 3}, CONFSMOE_WRITEBACK_LN_IMP},
    {"laplacian, two-stage, multi-label, M=3 S=(2,4,1)", 3, 0, 4, CONFSMOE_MODEL_GATE_LAPLACIAN,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 1, 0, 0.0f, 3, (const int64_t[]){2, 4, 1}, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, compat, M=3 S=(1,3,2)", 3, 0, 4, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE,
     CONFSMOE_LOAD_LOSS_NONE, 0, 1, 0.1f, 3, (const int64_t[]){1, 3, 2}, CONFSMOE_WRITEBACK_LN_IMP},
    {"confidence, residual write-back, M=2 S=3, one modality missing for every sample", 2, 3, 4,
     CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 1,
     NULL, CONFSMOE_WRITEBACK_RESIDUAL},
    {"confidence, residual write-back, M=3 S=2, random missing, dropout", 3, 2, 4, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.1f, 3, NULL, CONFSMOE_WRITEBACK_RESIDUAL},
    {"softmax, residual write-back, compat, M=3 S=2", 3, 2, 4, CONFSMOE_MODEL_GATE_SOFTMAX,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 1, 0.1f, 3, NULL, CONFSMOE_WRITEBACK_RESIDUAL},
    {"confidence, residual write-back, M=3 S=(3,1,2), random missing", 3, 0, 4, CONFSMOE_MODEL_GATE_CONFIDENCE,
     CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.0f, 3, (const int64_t[]){3, 1, 2},
     CONFSMOE_WRITEBACK_RESIDUAL},
    /* heads L = 2 x 36 > 8 d: backward computes the attention weights again instead of keeping them
     * (csm_attention_keeps_weights); the configurations above keep them. */
    {"confidence, two-stage, M=2 S=(20,16), one modality missing for every sample, dropout, weights recomputed", 2,
     0, 3, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, CONFSMOE_LOAD_LOSS_NONE, 0, 0, 0.1f, 1,
     (const int64_t[]){20, 16}, CONFSMOE_WRITEBACK_LN_IMP},
};

START_TEST(test_model_gradients)
{
    check_config(&configs[_i]);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("model_grad");
    TCase *tc = tcase_create("model_grad");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_model_gradients, 0, (int)(sizeof configs / sizeof *configs));
    suite_add_tcase(s, tc);
    return test_run(s);
}
