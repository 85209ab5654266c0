/* fuzz_checkpoint: confsmoe_checkpoint_load() on arbitrary bytes.
 *
 * The input is the whole file. It is loaded into one small fixed model three times:
 * without an optimizer, with an Adam optimizer over every parameter, and with an SGD
 * (momentum) optimizer over every other parameter plus a tensor the model does not
 * own. Properties checked on every load:
 *   - no crash, leak or sanitizer report;
 *   - the status is CONFSMOE_OK, CONFSMOE_E_FORMAT or CONFSMOE_E_NOMEM (the header's
 *     documented outcomes for a readable file), with a non-empty last error on failure;
 *   - a failed load leaves every model parameter byte-identical;
 *   - a successful load can be saved again, and that file loads back.
 *
 * FUZZ_CHECKPOINT_WRITE_SEEDS=DIR: write valid checkpoints of the model to DIR and exit
 * (how tests/fuzz/corpus/fuzz_checkpoint was made). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <confsmoe.h>

#include "fuzz_common.h"

static confsmoe_ctx *ctx;
static confsmoe_model *model;
static confsmoe_optim *adam, *sgd;
static confsmoe_tensor *foreign, *foreign_grad;
static int32_t n_params;
static void **snapshot;   /* [n_params] the parameters' bytes before each load */
static size_t *snap_size;
static char path[4096], resave_path[4096];

#define CHECK(cond, ...) do { if (!(cond)) fuzz_fail(__VA_ARGS__); } while (0)

static void ok(confsmoe_status s, const char *what)
{
    CHECK(s == CONFSMOE_OK, "%s: %s (%s)", what, confsmoe_status_string(s), confsmoe_ctx_last_error(ctx));
}

static void build_model(void)
{
    ok(confsmoe_ctx_create(NULL, &ctx), "ctx_create");
    static const int64_t features[2] = {2, 1};
    confsmoe_model_params p;
    confsmoe_model_params_init(&p);
    p.n_modalities = 2;
    p.features = features;
    p.d = 2;
    p.heads = 1;
    p.n_experts = 2;
    p.k = 2;
    p.n_classes = 2;
    ok(confsmoe_model_create(ctx, &p, &model), "model_create");
    n_params = confsmoe_model_n_params(model);

    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    ok(confsmoe_optim_create(ctx, &op, &adam), "optim_create adam");
    op.kind = CONFSMOE_OPTIM_SGD;
    op.momentum = 0.9f;
    ok(confsmoe_optim_create(ctx, &op, &sgd), "optim_create sgd");
    const int64_t dims[2] = {2, 2};
    ok(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &foreign), "tensor_create");
    ok(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &foreign_grad), "tensor_create");
    for (int32_t i = 0; i < n_params; i++) {
        ok(confsmoe_optim_add(adam, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)), "optim_add");
        if (i % 2 == 0)
            ok(confsmoe_optim_add(sgd, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)), "optim_add");
        if (i == 1)
            ok(confsmoe_optim_add(sgd, foreign, foreign_grad), "optim_add");
    }
    snapshot = calloc((size_t)n_params, sizeof *snapshot);
    snap_size = calloc((size_t)n_params, sizeof *snap_size);
    for (int32_t i = 0; i < n_params; i++) {
        confsmoe_tensor *t = confsmoe_model_param(model, i);
        snap_size[i] = confsmoe_tensor_nbytes(t);
        snapshot[i] = malloc(snap_size[i] ? snap_size[i] : 1);
        ok(confsmoe_tensor_copy_out(t, snapshot[i], snap_size[i]), "copy_out");
    }
}

static void destroy_all(void)
{
    confsmoe_optim_destroy(adam);
    confsmoe_optim_destroy(sgd);
    confsmoe_tensor_destroy(foreign);
    confsmoe_tensor_destroy(foreign_grad);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    for (int32_t i = 0; i < n_params; i++)
        free(snapshot[i]);
    free(snapshot);
    free(snap_size);
}

/* Valid seeds: with and without optimizer state, after a few updates. */
static void write_seeds(const char *dir)
{
    char p[4096];
    snprintf(p, sizeof p, "%s/model_only.safetensors", dir);
    ok(confsmoe_checkpoint_save(model, NULL, p), "save");
    for (int32_t i = 0; i < n_params; i++) {
        confsmoe_tensor *g = confsmoe_model_grad(model, i);
        float *v = confsmoe_tensor_data(g);
        for (int64_t j = 0; j < confsmoe_tensor_numel(g); j++)
            v[j] = 0.01f * (float)((j % 7) - 3);
    }
    ok(confsmoe_optim_step(adam), "step");
    ok(confsmoe_optim_step(adam), "step");
    snprintf(p, sizeof p, "%s/with_adam.safetensors", dir);
    ok(confsmoe_checkpoint_save(model, adam, p), "save");
    ok(confsmoe_optim_step(sgd), "step");
    snprintf(p, sizeof p, "%s/with_sgd.safetensors", dir);
    ok(confsmoe_checkpoint_save(model, sgd, p), "save");
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    build_model();
    const char *seeds = getenv("FUZZ_CHECKPOINT_WRITE_SEEDS");
    if (seeds && seeds[0]) {
        write_seeds(seeds);
        destroy_all();
        exit(0);
    }
    snprintf(path, sizeof path, "%s/input.safetensors", fuzz_tmpdir());
    snprintf(resave_path, sizeof resave_path, "%s/resaved.safetensors", fuzz_tmpdir());
    /* The documented status of a missing file. */
    char missing[4200];
    snprintf(missing, sizeof missing, "%s/does-not-exist", fuzz_tmpdir());
    CHECK(confsmoe_checkpoint_load(model, NULL, missing) == CONFSMOE_E_IO, "a missing file is not CONFSMOE_E_IO");
    atexit(destroy_all);
    return 0;
}

static void check_unchanged(const char *what)
{
    for (int32_t i = 0; i < n_params; i++) {
        confsmoe_tensor *t = confsmoe_model_param(model, i);
        if (snap_size[i] && memcmp(confsmoe_tensor_data(t), snapshot[i], snap_size[i]) != 0)
            fuzz_fail("%s: a failed load changed parameter %s", what, confsmoe_model_param_name(model, i));
    }
}

static void restore(void)
{
    for (int32_t i = 0; i < n_params; i++)
        ok(confsmoe_tensor_copy_in(confsmoe_model_param(model, i), snapshot[i], snap_size[i]), "copy_in");
}

static void load_once(confsmoe_optim *o, const char *what)
{
    confsmoe_status s = confsmoe_checkpoint_load(model, o, path);
    if (s == CONFSMOE_OK) {
        /* What loaded saves and loads again. */
        ok(confsmoe_checkpoint_save(model, o, resave_path), "save after a successful load");
        ok(confsmoe_checkpoint_load(model, o, resave_path), "load of the re-saved file");
        restore();
        return;
    }
    CHECK(s == CONFSMOE_E_FORMAT || s == CONFSMOE_E_NOMEM, "%s: undocumented status %d (%s): %s", what, (int)s,
          confsmoe_status_string(s), confsmoe_ctx_last_error(ctx));
    CHECK(confsmoe_ctx_last_error(ctx)[0] != '\0', "%s: status %d with an empty last error", what, (int)s);
    check_unchanged(what);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_write_file(fuzz_tmpdir(), "input.safetensors", data, size);
    load_once(NULL, "load without optimizer");
    load_once(adam, "load with adam");
    load_once(sgd, "load with sgd");
    return 0;
}
