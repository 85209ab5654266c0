/* Per-modality sequence lengths (modality_tokens): equal S_m given explicitly is the model of
 * `tokens` bit for bit (weights, losses, gradients, logits and the ctx stream); ragged S_m
 * shapes the positional embedding, the inputs, the pools and the imputer's tensors, and bad
 * values are refused with messages that name them. Public API only; the ragged arithmetic is
 * checked by tests/test_model_grad.c (gradients) and tests/parity (the PyTorch reference). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum { M = 3, B = 5, C = 3, D = 8, POOL = 4 };
static const int64_t FEATURES[M] = {4, 3, 5};

#define CK_LAST_ERROR(ctx, sub)                                                                               \
    ck_assert_msg(strstr(confsmoe_ctx_last_error(ctx), (sub)) != NULL, "last_error \"%s\" lacks \"%s\"", \
                  confsmoe_ctx_last_error(ctx), (sub))

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_tensor *inputs[M], *avail, *labels, *logits;
} fixture;

/* A model of the given gate and imputation with every random part on (noise, dropout, modality
 * dropout, stage-1 draws), and data from the tests' own stream: two fixtures made alike hold the
 * same data. tokens == NULL: p.tokens = S; else modality_tokens = tokens. */
static void fixture_open(fixture *f, int32_t gate, int32_t imputation, int64_t S, const int64_t *tokens)
{
    memset(f, 0, sizeof *f);
    f->ctx = test_ctx(17);
    confsmoe_model_params p;
    test_model_params(&p, M, FEATURES, D, C);
    p.n_experts = 3;
    p.gate = gate;
    p.imputation = imputation;
    p.noisy = 1;
    p.dropout = 0.1f;
    p.modality_dropout = 0.2f;
    p.draws = 2;
    p.tokens = tokens ? 7 : S; /* ignored with modality_tokens */
    p.modality_tokens = tokens;
    ck_assert_int_eq(confsmoe_model_create(f->ctx, &p, &f->model), CONFSMOE_OK);
    trng r = {3};
    for (int32_t m = 0; m < M; m++) {
        const int64_t Sm = tokens ? tokens[m] : S;
        f->inputs[m] = test_tensor(f->ctx, CONFSMOE_F32, 3, B, Sm, FEATURES[m], 0);
        fill_uniform(f->inputs[m], &r, -1.0, 1.0);
        confsmoe_tensor *pool = test_tensor(f->ctx, CONFSMOE_F32, 3, POOL, Sm, FEATURES[m], 0);
        fill_uniform(pool, &r, -1.0, 1.0);
        ck_assert_int_eq(confsmoe_model_set_pool(f->model, m, pool), CONFSMOE_OK);
        confsmoe_tensor_destroy(pool);
    }
    f->avail = test_tensor(f->ctx, CONFSMOE_U8, 2, B, M, 0, 0);
    for (int64_t b = 0; b < B; b++)
        for (int32_t m = 0; m < M; m++)
            u8(f->avail)[b * M + m] = m == b % M || trng_uniform(&r, 0.0, 1.0) > 0.4;
    f->labels = test_tensor(f->ctx, CONFSMOE_I32, 1, B, 0, 0, 0);
    for (int64_t b = 0; b < B; b++)
        i32(f->labels)[b] = (int32_t)(b % C);
    f->logits = test_tensor(f->ctx, CONFSMOE_F32, 2, B, C, 0, 0);
}

static void fixture_close(fixture *f)
{
    for (int32_t m = 0; m < M; m++)
        confsmoe_tensor_destroy(f->inputs[m]);
    confsmoe_tensor_destroy(f->avail);
    confsmoe_tensor_destroy(f->labels);
    confsmoe_tensor_destroy(f->logits);
    confsmoe_model_destroy(f->model);
    confsmoe_ctx_destroy(f->ctx);
}

static void expect_same_tensors(confsmoe_tensor *a, confsmoe_tensor *b, const char *what, const char *name)
{
    ck_assert_int_eq(confsmoe_tensor_nbytes(a), confsmoe_tensor_nbytes(b));
    ck_assert_msg(memcmp(confsmoe_tensor_data(a), confsmoe_tensor_data(b), confsmoe_tensor_nbytes(a)) == 0,
                  "%s of %s differ", what, name);
}

static const int32_t GATES[] = {CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_MODEL_GATE_SOFTMAX,
                                CONFSMOE_MODEL_GATE_GAUSSIAN, CONFSMOE_MODEL_GATE_LAPLACIAN};

/* Loop index: gate (4) x imputation (2). */
START_TEST(test_explicit_equal_tokens_is_bit_identical)
{
    const int32_t gate = GATES[_i / 2];
    const int32_t imputation = _i % 2 ? CONFSMOE_IMPUTE_MEAN : CONFSMOE_IMPUTE_TWO_STAGE;
    static const int64_t equal[M] = {2, 2, 2};
    fixture a, b;
    fixture_open(&a, gate, imputation, 2, NULL);
    fixture_open(&b, gate, imputation, 0, equal);
    ck_assert_int_eq(confsmoe_model_n_params(a.model), confsmoe_model_n_params(b.model));
    for (int step = 0; step < 2; step++) {
        float loss_a = 0.0f, loss_b = 1.0f, task_a = 0.0f, task_b = 1.0f;
        const confsmoe_tensor *const *in_a = (const confsmoe_tensor *const *)a.inputs;
        const confsmoe_tensor *const *in_b = (const confsmoe_tensor *const *)b.inputs;
        ck_assert_int_eq(confsmoe_model_step(a.model, in_a, a.avail, a.labels, a.logits, &loss_a, &task_a), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_model_step(b.model, in_b, b.avail, b.labels, b.logits, &loss_b, &task_b), CONFSMOE_OK);
        ck_assert_msg(memcmp(&loss_a, &loss_b, sizeof loss_a) == 0, "step %d: loss %.9g vs %.9g", step, loss_a,
                      loss_b);
        ck_assert_msg(memcmp(&task_a, &task_b, sizeof task_a) == 0, "step %d: task loss differs", step);
        expect_same_tensors(a.logits, b.logits, "training logits", "the step");
        for (int32_t i = 0; i < confsmoe_model_n_params(a.model); i++) {
            const char *name = confsmoe_model_param_name(a.model, i);
            ck_assert_str_eq(name, confsmoe_model_param_name(b.model, i));
            expect_same_tensors(confsmoe_model_param(a.model, i), confsmoe_model_param(b.model, i), "weights", name);
            expect_same_tensors(confsmoe_model_grad(a.model, i), confsmoe_model_grad(b.model, i), "gradients", name);
        }
        ck_assert_int_eq(confsmoe_model_predict(a.model, in_a, a.avail, a.logits), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_model_predict(b.model, in_b, b.avail, b.logits), CONFSMOE_OK);
        expect_same_tensors(a.logits, b.logits, "predicted logits", "predict");
    }
    fixture_close(&a);
    fixture_close(&b);
}
END_TEST

static confsmoe_tensor *param_named(confsmoe_model *model, const char *name)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        if (strcmp(confsmoe_model_param_name(model, i), name) == 0)
            return confsmoe_model_param(model, i);
    ck_abort_msg("no parameter %s", name);
    return NULL;
}

START_TEST(test_ragged_shapes)
{
    static const int64_t ragged[M] = {3, 1, 2};
    fixture f;
    fixture_open(&f, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0, ragged);
    /* The positional embedding spans L = 3 + 1 + 2 tokens. */
    confsmoe_tensor *pos = param_named(f.model, "pos");
    ck_assert_int_eq(confsmoe_tensor_dim(pos, 0), 6);
    ck_assert_int_eq(confsmoe_tensor_dim(pos, 1), D);
    float loss = 0.0f;
    ck_assert_int_eq(confsmoe_model_step(f.model, (const confsmoe_tensor *const *)f.inputs, f.avail, f.labels,
                                         f.logits, &loss, NULL),
                     CONFSMOE_OK);
    ck_assert(loss > 0.0f);
    /* S_1 = 1: modality 1 may also come as [B, F]. */
    confsmoe_tensor *flat = test_tensor(f.ctx, CONFSMOE_F32, 2, B, FEATURES[1], 0, 0);
    memcpy(confsmoe_tensor_data(flat), confsmoe_tensor_data(f.inputs[1]), confsmoe_tensor_nbytes(flat));
    confsmoe_tensor *flat_inputs[M] = {f.inputs[0], flat, f.inputs[2]};
    ck_assert_int_eq(confsmoe_model_predict(f.model, (const confsmoe_tensor *const *)flat_inputs, f.avail, f.logits),
                     CONFSMOE_OK);
    /* Modality 0 with modality 2's S is refused, naming the input. */
    confsmoe_tensor *wrong = test_tensor(f.ctx, CONFSMOE_F32, 3, B, 2, FEATURES[0], 0);
    confsmoe_tensor *wrong_inputs[M] = {wrong, f.inputs[1], f.inputs[2]};
    ck_assert_int_eq(confsmoe_model_predict(f.model, (const confsmoe_tensor *const *)wrong_inputs, f.avail, f.logits),
                     CONFSMOE_E_SHAPE);
    CK_LAST_ERROR(f.ctx, "inputs[0]");
    /* A pool has its modality's S_m. */
    confsmoe_tensor *pool = test_tensor(f.ctx, CONFSMOE_F32, 3, POOL, 3, FEATURES[2], 0);
    ck_assert_int_eq(confsmoe_model_set_pool(f.model, 2, pool), CONFSMOE_E_SHAPE);
    CK_LAST_ERROR(f.ctx, "pool");
    confsmoe_tensor_destroy(pool);
    confsmoe_tensor_destroy(wrong);
    confsmoe_tensor_destroy(flat);
    fixture_close(&f);
}
END_TEST

START_TEST(test_bad_modality_tokens)
{
    confsmoe_ctx *ctx = test_ctx(1);
    static const int64_t zero[M] = {2, 1, 0}, huge[M] = {INT64_MAX / 2, INT64_MAX / 2, 4};
    confsmoe_model_params p;
    test_model_params(&p, M, FEATURES, D, C);
    confsmoe_model *model = (confsmoe_model *)(void *)ctx;
    p.modality_tokens = zero;
    ck_assert_int_eq(confsmoe_model_create(ctx, &p, &model), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(model);
    CK_LAST_ERROR(ctx, "model_create: modality_tokens[2] is 0, must be >= 1");
    p.modality_tokens = huge;
    ck_assert_int_eq(confsmoe_model_create(ctx, &p, &model), CONFSMOE_E_NOMEM);
    CK_LAST_ERROR(ctx, "sum of the modalities' tokens overflows");

    confsmoe_imputer_params ip;
    confsmoe_imputer_params_init(&ip);
    ip.d = D;
    ip.n_modalities = M;
    ip.modality_tokens = zero;
    confsmoe_imputer *imp = NULL;
    ck_assert_int_eq(confsmoe_imputer_create(ctx, &ip, &imp), CONFSMOE_E_SHAPE);
    CK_LAST_ERROR(ctx, "imputer_create: modality_tokens[2] is 0, must be >= 1");
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* The imputer's slots: [B L, k, d] modality-major for ragged S_m; [M, B S, k, d] only when every
 * S_m is S, and then it is the same memory as [B L, k, d]. */
START_TEST(test_imputer_slot_layouts)
{
    confsmoe_ctx *ctx = test_ctx(2);
    static const int64_t ragged[M] = {3, 1, 2}, equal[M] = {2, 2, 2};
    const int32_t k = 2;
    trng r = {9};
    for (int variant = 0; variant < 2; variant++) {
        const int64_t *tokens = variant ? equal : ragged, L = tokens[0] + tokens[1] + tokens[2];
        confsmoe_imputer_params ip;
        confsmoe_imputer_params_init(&ip);
        ip.d = D;
        ip.n_modalities = M;
        ip.k = k;
        ip.modality_tokens = tokens;
        confsmoe_imputer *imp = NULL;
        ck_assert_int_eq(confsmoe_imputer_create(ctx, &ip, &imp), CONFSMOE_OK);
        confsmoe_tensor *h = test_tensor(ctx, CONFSMOE_F32, 3, B, L, D, 0);
        confsmoe_tensor *out3 = test_tensor(ctx, CONFSMOE_F32, 3, B, L, D, 0);
        confsmoe_tensor *out4 = test_tensor(ctx, CONFSMOE_F32, 3, B, L, D, 0);
        confsmoe_tensor *slots3 = test_tensor(ctx, CONFSMOE_F32, 3, B * L, k, D, 0);
        confsmoe_tensor *slots4 = test_tensor(ctx, CONFSMOE_F32, 4, M, B * 2, k, D);
        confsmoe_tensor *avail = test_tensor(ctx, CONFSMOE_U8, 2, B, M, 0, 0);
        fill_uniform(h, &r, -1.0, 1.0);
        fill_uniform(slots3, &r, -1.0, 1.0);
        for (int64_t i = 0; i < B * M; i++)
            u8(avail)[i] = i % 4 != 1;
        ck_assert_int_eq(confsmoe_imputer_forward(imp, h, slots3, avail, out3, NULL), CONFSMOE_OK);
        /* The missing rows changed, the present ones did not. */
        ck_assert(memcmp(f32(h), f32(out3), confsmoe_tensor_nbytes(h)) != 0);
        if (variant == 0) {
            ck_assert_int_eq(confsmoe_imputer_forward(imp, h, slots4, avail, out4, NULL), CONFSMOE_E_SHAPE);
            CK_LAST_ERROR(ctx, "slots");
        } else {
            memcpy(f32(slots4), f32(slots3), confsmoe_tensor_nbytes(slots3));
            ck_assert_int_eq(confsmoe_imputer_forward(imp, h, slots4, avail, out4, NULL), CONFSMOE_OK);
            ck_assert(memcmp(f32(out3), f32(out4), confsmoe_tensor_nbytes(out3)) == 0);
        }
        /* h of the wrong L. */
        confsmoe_tensor *short_h = test_tensor(ctx, CONFSMOE_F32, 3, B, L - 1, D, 0);
        ck_assert_int_eq(confsmoe_imputer_forward(imp, short_h, slots3, avail, short_h, NULL), CONFSMOE_E_SHAPE);
        CK_LAST_ERROR(ctx, "imputer_forward");
        confsmoe_tensor_destroy(short_h);
        confsmoe_tensor_destroy(h);
        confsmoe_tensor_destroy(out3);
        confsmoe_tensor_destroy(out4);
        confsmoe_tensor_destroy(slots3);
        confsmoe_tensor_destroy(slots4);
        confsmoe_tensor_destroy(avail);
        confsmoe_imputer_destroy(imp);
    }
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* The positional embedding [L, d] fixes only L: the checkpoint records S_m, and a model that
 * splits the same L otherwise refuses the file (and keeps its weights). */
START_TEST(test_checkpoint_records_tokens)
{
    static const int64_t ragged[M] = {3, 1, 2}, other[M] = {2, 2, 2};
    test_scratch dir;
    test_scratch_open(&dir, "model-tokens");
    const char *path = dir.path;
    fixture a, b, c;
    fixture_open(&a, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0, ragged);
    fixture_open(&b, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0, other);
    fixture_open(&c, CONFSMOE_MODEL_GATE_CONFIDENCE, CONFSMOE_IMPUTE_TWO_STAGE, 0, ragged);
    ck_assert_int_eq(confsmoe_checkpoint_save(a.model, NULL, path), CONFSMOE_OK);
    confsmoe_tensor *pos_b = param_named(b.model, "pos");
    void *before = tsnap(pos_b);
    ck_assert_int_eq(confsmoe_checkpoint_load(b.model, NULL, path), CONFSMOE_E_FORMAT);
    CK_LAST_ERROR(b.ctx, "the file's model has 3,1,2 tokens per modality, this model 2,2,2");
    ck_assert(tsame(pos_b, before));
    free(before);
    /* The same S_m load: c then holds a's weights. */
    fill_const(param_named(c.model, "pos"), 0.25f);
    ck_assert_int_eq(confsmoe_checkpoint_load(c.model, NULL, path), CONFSMOE_OK);
    expect_same_tensors(param_named(a.model, "pos"), param_named(c.model, "pos"), "loaded weights", "pos");
    fixture_close(&a);
    fixture_close(&b);
    fixture_close(&c);
    test_rm_dir(dir.dir);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("model_tokens");
    TCase *tc = tcase_create("model_tokens");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_explicit_equal_tokens_is_bit_identical, 0, 8);
    tcase_add_test(tc, test_ragged_shapes);
    tcase_add_test(tc, test_bad_modality_tokens);
    tcase_add_test(tc, test_imputer_slot_layouts);
    tcase_add_test(tc, test_checkpoint_records_tokens);
    suite_add_tcase(s, tc);
    return test_run(s);
}
