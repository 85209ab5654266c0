/* Helper of safetensors_interop.py, on the public API only. The model is always the
 * one of test_checkpoint.c: M = 2 modalities with features {5, 3}, d = 8, 2 heads,
 * E = 4, k = 2, 3 classes; the optimizer is Adam.
 *   ckpt_tool save CKPT DUMP       train 2 steps (seed 7), save with the optimizer, dump the params
 *   ckpt_tool load CKPT DUMP       load CKPT into a fresh model (no optimizer), dump the params
 *   ckpt_tool roundtrip IN OUT     load IN with the optimizer, save it to OUT
 * A dump has one line per parameter: name, TAB, dims joined by ',', TAB, the values as
 * C99 hex floats (exact). On a library error: the status and message on stderr, exit 2. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "confsmoe.h"

#define BATCH 4

static const int64_t FEATURES[2] = {5, 3};

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_optim *optim;
} rig;

static int fail(const rig *r, const char *what, confsmoe_status s)
{
    fprintf(stderr, "ckpt_tool: %s: status %d (%s): %s\n", what, (int)s, confsmoe_status_string(s),
            r->ctx ? confsmoe_ctx_last_error(r->ctx) : "");
    return 2;
}

static void rig_free(rig *r)
{
    confsmoe_optim_destroy(r->optim);
    confsmoe_model_destroy(r->model);
    confsmoe_ctx_destroy(r->ctx);
}

static confsmoe_status rig_init(rig *r, uint64_t seed)
{
    memset(r, 0, sizeof *r);
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = seed;
    confsmoe_status s = confsmoe_ctx_create(&cp, &r->ctx);
    if (s != CONFSMOE_OK)
        return s;
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    p.n_modalities = 2;
    p.features = FEATURES;
    p.d = 8;
    p.heads = 2;
    p.n_experts = 4;
    p.k = 2;
    p.n_classes = 3;
    s = confsmoe_model_create(r->ctx, &p, &r->model);
    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.lr = 1e-2f;
    if (s == CONFSMOE_OK)
        s = confsmoe_optim_create(r->ctx, &op, &r->optim);
    for (int32_t i = 0; s == CONFSMOE_OK && i < confsmoe_model_n_params(r->model); i++)
        s = confsmoe_optim_add(r->optim, confsmoe_model_param(r->model, i), confsmoe_model_grad(r->model, i));
    return s;
}

/* Two Adam steps on a fixed batch with every modality present. */
static confsmoe_status train(rig *r, int steps)
{
    confsmoe_tensor *inputs[2] = {NULL, NULL}, *avail = NULL, *labels = NULL;
    confsmoe_status s = CONFSMOE_OK;
    for (int m = 0; m < 2 && s == CONFSMOE_OK; m++) {
        const int64_t dims[2] = {BATCH, FEATURES[m]};
        s = confsmoe_tensor_create(r->ctx, CONFSMOE_F32, 2, dims, &inputs[m]);
        for (int64_t j = 0; s == CONFSMOE_OK && j < BATCH * FEATURES[m]; j++)
            ((float *)confsmoe_tensor_data(inputs[m]))[j] = sinf(0.3f * (float)j + (float)m);
    }
    const int64_t avail_dims[2] = {BATCH, 2}, label_dims[1] = {BATCH};
    if (s == CONFSMOE_OK)
        s = confsmoe_tensor_create(r->ctx, CONFSMOE_U8, 2, avail_dims, &avail);
    if (s == CONFSMOE_OK) {
        memset(confsmoe_tensor_data(avail), 1, confsmoe_tensor_nbytes(avail));
        s = confsmoe_tensor_create(r->ctx, CONFSMOE_I32, 1, label_dims, &labels);
    }
    for (int b = 0; s == CONFSMOE_OK && b < BATCH; b++)
        ((int32_t *)confsmoe_tensor_data(labels))[b] = b % 3;
    for (int i = 0; s == CONFSMOE_OK && i < steps; i++) {
        confsmoe_model_zero_grad(r->model);
        s = confsmoe_model_step(r->model, (const confsmoe_tensor *const *)inputs, avail, labels, NULL, NULL, NULL);
        if (s == CONFSMOE_OK)
            s = confsmoe_optim_step(r->optim);
    }
    confsmoe_tensor_destroy(inputs[0]);
    confsmoe_tensor_destroy(inputs[1]);
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(labels);
    return s;
}

static int dump(rig *r, const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return 1;
    }
    for (int32_t i = 0; i < confsmoe_model_n_params(r->model); i++) {
        confsmoe_tensor *t = confsmoe_model_param(r->model, i);
        fprintf(f, "%s\t", confsmoe_model_param_name(r->model, i));
        for (int32_t a = 0; a < confsmoe_tensor_ndim(t); a++)
            fprintf(f, "%s%lld", a ? "," : "", (long long)confsmoe_tensor_dim(t, a));
        fputc('\t', f);
        const float *v = confsmoe_tensor_data(t);
        for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
            fprintf(f, "%s%a", j ? " " : "", (double)v[j]);
        fputc('\n', f);
    }
    return fclose(f) == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[1], "save") != 0 && strcmp(argv[1], "load") != 0 &&
                      strcmp(argv[1], "roundtrip") != 0)) {
        fprintf(stderr, "usage: ckpt_tool save CKPT DUMP | load CKPT DUMP | roundtrip IN OUT\n");
        return 1;
    }
    rig r;
    confsmoe_status s = rig_init(&r, strcmp(argv[1], "save") == 0 ? 7 : 11);
    int rc = 0;
    if (s != CONFSMOE_OK) {
        rc = fail(&r, "setup", s);
    } else if (strcmp(argv[1], "save") == 0) {
        s = train(&r, 2);
        if (s == CONFSMOE_OK)
            s = confsmoe_checkpoint_save(r.model, r.optim, argv[2]);
        rc = s == CONFSMOE_OK ? dump(&r, argv[3]) : fail(&r, "save", s);
    } else if (strcmp(argv[1], "load") == 0) {
        s = confsmoe_checkpoint_load(r.model, NULL, argv[2]);
        rc = s == CONFSMOE_OK ? dump(&r, argv[3]) : fail(&r, "load", s);
    } else {
        s = confsmoe_checkpoint_load(r.model, r.optim, argv[2]);
        if (s == CONFSMOE_OK)
            s = confsmoe_checkpoint_save(r.model, r.optim, argv[3]);
        rc = s == CONFSMOE_OK ? 0 : fail(&r, "roundtrip", s);
    }
    rig_free(&r);
    return rc;
}
