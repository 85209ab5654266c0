/* A fully static host (cc -static ... $(pkg-config --static --cflags --libs confsmoe)): it trains
 * a small Conf-SMoE model on a separable two-modality task and fails unless the loss falls and
 * the classes are learnt. Run with BLIS_NUM_THREADS=2, so the static BLIS threading runtime runs too. */
#include <confsmoe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { SAMPLES = 96, CLASSES = 3, MODALITIES = 2, STEPS = 60 };
static const int64_t static_host_features[MODALITIES] = {6, 4};

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        confsmoe_status s_ = (call);                                                                \
        if (s_ != CONFSMOE_OK) {                                                                    \
            fprintf(stderr, "static host: %s failed: %s (%s)\n", #call, confsmoe_status_string(s_), \
                    confsmoe_ctx_last_error(ctx));                                                  \
            return 1;                                                                               \
        }                                                                                           \
    } while (0)

static float static_host_uniform(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}

int main(void)
{
    /* Each class has its own centre in every modality, plus noise smaller than the gaps. */
    static float x0[SAMPLES * 6], x1[SAMPLES * 4];
    float *xs[MODALITIES] = {x0, x1};
    int32_t labels[SAMPLES];
    uint8_t avail[SAMPLES * MODALITIES];
    unsigned rng = 11;
    for (int i = 0; i < SAMPLES; i++) {
        labels[i] = i % CLASSES;
        for (int m = 0; m < MODALITIES; m++) {
            avail[i * MODALITIES + m] = 1;
            for (int64_t f = 0; f < static_host_features[m]; f++)
                xs[m][i * static_host_features[m] + f] =
                    (f % CLASSES == labels[i] ? 1.5f : -0.5f) + 0.3f * static_host_uniform(&rng);
        }
    }

    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = 5;
    if (confsmoe_ctx_create(&cp, &ctx) != CONFSMOE_OK) {
        fprintf(stderr, "static host: confsmoe_ctx_create failed\n");
        return 1;
    }
    confsmoe_model_params mp;
    confsmoe_model_params_init(&mp);
    mp.n_modalities = MODALITIES;
    mp.features = static_host_features;
    mp.d = 16;
    mp.heads = 2;
    mp.n_experts = 4;
    mp.k = 2;
    mp.n_classes = CLASSES;
    mp.dropout = 0.0f;
    confsmoe_model *model = NULL;
    CHECK(confsmoe_model_create(ctx, &mp, &model));
    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.lr = 1e-2f;
    confsmoe_optim *optim = NULL;
    CHECK(confsmoe_optim_create(ctx, &op, &optim));
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        CHECK(confsmoe_optim_add(optim, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)));

    confsmoe_tensor *inputs[MODALITIES], *avail_t = NULL, *labels_t = NULL, *logits_t = NULL;
    for (int m = 0; m < MODALITIES; m++) {
        const int64_t dims[2] = {SAMPLES, static_host_features[m]};
        CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, xs[m], &inputs[m]));
        CHECK(confsmoe_model_set_pool(model, m, inputs[m]));
    }
    const int64_t avail_dims[2] = {SAMPLES, MODALITIES}, label_dims[1] = {SAMPLES},
                  logit_dims[2] = {SAMPLES, CLASSES};
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 2, avail_dims, avail, &avail_t));
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, label_dims, labels, &labels_t));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, logit_dims, &logits_t));

    float first = 0.0f, last = 0.0f;
    for (int step = 1; step <= STEPS; step++) {
        confsmoe_model_zero_grad(model);
        CHECK(confsmoe_model_step(model, (const confsmoe_tensor *const *)inputs, avail_t, labels_t, NULL, NULL,
                                  &last));
        CHECK(confsmoe_optim_step(optim));
        if (step == 1)
            first = last;
    }
    CHECK(confsmoe_model_predict(model, (const confsmoe_tensor *const *)inputs, avail_t, logits_t));
    const float *logits = confsmoe_tensor_data(logits_t);
    int correct = 0;
    for (int i = 0; i < SAMPLES; i++) {
        int best = 0;
        for (int c = 1; c < CLASSES; c++)
            if (logits[i * CLASSES + c] > logits[i * CLASSES + best])
                best = c;
        correct += best == labels[i];
    }
    /* Chance is 1/3 and the initial cross-entropy about ln 3: demand a clear fall and near-perfect fit. */
    int learnt = isfinite(last) && last < 0.25f * first && correct >= SAMPLES * 9 / 10;
    printf("static host: libconfsmoe %s, cross-entropy %.4f -> %.4f in %d steps, train accuracy %d/%d: %s\n",
           confsmoe_version_string(), (double)first, (double)last, STEPS, correct, SAMPLES,
           learnt ? "learnt" : "FAILED");

    confsmoe_tensor_destroy(logits_t);
    confsmoe_tensor_destroy(labels_t);
    confsmoe_tensor_destroy(avail_t);
    for (int m = 0; m < MODALITIES; m++)
        confsmoe_tensor_destroy(inputs[m]);
    confsmoe_optim_destroy(optim);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    return learnt ? 0 : 1;
}
