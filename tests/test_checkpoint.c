/* Checkpoints: save / load round trips of the model and its optimizer, and damaged,
 * mismatched or unwritable files, each of which must fail with its documented status
 * and leave the target model and optimizer exactly as they were. */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "confsmoe.h"
#include "testutil.h"

#define BATCH 4
#define PATH_CAP 512

static const int64_t FEATURES2[2] = {5, 3};
static const int64_t FEATURES3[3] = {5, 3, 4};

/* ---------------------------------------------------------------- helpers: files */

typedef struct {
    char dir[64];
} scratch;

static scratch scratch_new(void)
{
    scratch s;
    test_mkdtemp(s.dir, sizeof s.dir, "ckpt");
    return s;
}

/* dir/name in a static ring, so that a few paths can be alive at once. */
static const char *path_in(const scratch *s, const char *name)
{
    static char ring[8][PATH_CAP];
    static int next;
    char *p = ring[next++ % 8];
    snprintf(p, PATH_CAP, "%s/%s", s->dir, name);
    return p;
}

static void scratch_free(scratch *s) { test_rm_dir(s->dir); }

typedef struct {
    unsigned char *bytes;
    size_t size;
} blob;

static blob read_blob(const char *path)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s: %s", path, strerror(errno));
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    ck_assert_int_ge(size, 0);
    rewind(f);
    blob b = {malloc((size_t)size + 1), (size_t)size};
    ck_assert_ptr_nonnull(b.bytes);
    ck_assert_uint_eq(fread(b.bytes, 1, b.size, f), b.size);
    fclose(f);
    return b;
}

static void write_bytes(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "cannot create %s: %s", path, strerror(errno));
    if (size)
        ck_assert_uint_eq(fwrite(data, 1, size, f), size);
    ck_assert_int_eq(fclose(f), 0);
}

static bool blob_equal(blob a, blob b)
{
    return a.size == b.size && memcmp(a.bytes, b.bytes, a.size) == 0;
}

static uint64_t header_length(blob b)
{
    ck_assert_uint_ge(b.size, 8);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | b.bytes[i];
    return n;
}

/* The JSON header of a safetensors file, as a NUL-terminated copy. */
static char *header_of(blob b)
{
    uint64_t n = header_length(b);
    ck_assert_uint_le(8 + n, b.size);
    char *h = malloc((size_t)n + 1);
    memcpy(h, b.bytes + 8, (size_t)n);
    h[n] = '\0';
    return h;
}

/* Writes a file made of a length field, the given header bytes and the data. */
static void write_file_parts(const char *path, uint64_t length_field, const void *header, size_t header_size,
                             const void *data, size_t data_size)
{
    blob b = {malloc(8 + header_size + data_size + 1), 8 + header_size + data_size};
    for (int i = 0; i < 8; i++)
        b.bytes[i] = (unsigned char)(length_field >> (8 * i));
    if (header_size)
        memcpy(b.bytes + 8, header, header_size);
    if (data_size)
        memcpy(b.bytes + 8 + header_size, data, data_size);
    write_bytes(path, b.bytes, b.size);
    free(b.bytes);
}

/* original with its header replaced by `header` (data kept). */
static void write_with_header(const char *path, blob original, const char *header)
{
    uint64_t n = header_length(original);
    write_file_parts(path, strlen(header), header, strlen(header), original.bytes + 8 + n,
                     original.size - 8 - (size_t)n);
}

/* s with its first occurrence of `from` replaced by `to`; the caller frees. */
static char *replace_once(const char *s, const char *from, const char *to)
{
    const char *at = strstr(s, from);
    ck_assert_msg(at != NULL, "\"%s\" not found in the header", from);
    size_t head = (size_t)(at - s), from_len = strlen(from), to_len = strlen(to);
    char *out = malloc(strlen(s) - from_len + to_len + 1);
    memcpy(out, s, head);
    memcpy(out + head, to, to_len);
    strcpy(out + head + to_len, at + from_len);
    return out;
}

/* Where the "[begin,end]" of a tensor's data_offsets lies in a header written by save. */
static void find_offsets(const char *header, const char *name, size_t *open_at, size_t *close_at, uint64_t *begin,
                         uint64_t *end)
{
    char key[128];
    snprintf(key, sizeof key, "\"%s\":{", name);
    const char *entry = strstr(header, key);
    ck_assert_msg(entry != NULL, "tensor %s not in the header", name);
    const char *open = strstr(entry, "\"data_offsets\":[");
    ck_assert_ptr_nonnull(open);
    open += strlen("\"data_offsets\":");
    const char *close = strchr(open, ']');
    ck_assert_ptr_nonnull(close);
    ck_assert_int_eq(sscanf(open, "[%" SCNu64 ",%" SCNu64 "]", begin, end), 2);
    *open_at = (size_t)(open - header);
    *close_at = (size_t)(close - header);
}

/* header with the data_offsets of `name` set to [begin, end]; the caller frees. */
static char *with_offsets(const char *header, const char *name, uint64_t begin, uint64_t end)
{
    size_t open, close;
    uint64_t b, e;
    find_offsets(header, name, &open, &close, &b, &e);
    char offsets[64];
    snprintf(offsets, sizeof offsets, "[%" PRIu64 ",%" PRIu64 "]", begin, end);
    char *out = malloc(strlen(header) + sizeof offsets);
    memcpy(out, header, open);
    strcpy(out + open, offsets);
    strcat(out, header + close + 1);
    return out;
}

/* ---------------------------------------------------------------- helpers: model */

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_model *model;
    confsmoe_optim *optim;
    int32_t m;
    const int64_t *features;
} rig;

static rig rig_new_with(uint64_t seed, int32_t m, const int64_t *features, int64_t d, int32_t noisy,
                        confsmoe_optim_kind kind, bool with_optim)
{
    rig r = {.ctx = test_ctx(seed), .m = m, .features = features};
    confsmoe_model_params p;
    test_model_params(&p, m, features, d, 3);
    p.noisy = noisy;
    ck_assert_int_eq(confsmoe_model_create(r.ctx, &p, &r.model), CONFSMOE_OK);
    if (with_optim) {
        confsmoe_optim_params op;
        confsmoe_optim_params_init(&op);
        op.kind = kind;
        op.lr = 1e-2f;
        op.momentum = kind == CONFSMOE_OPTIM_SGD ? 0.9f : 0.0f;
        ck_assert_int_eq(confsmoe_optim_create(r.ctx, &op, &r.optim), CONFSMOE_OK);
        for (int32_t i = 0; i < confsmoe_model_n_params(r.model); i++)
            ck_assert_int_eq(confsmoe_optim_add(r.optim, confsmoe_model_param(r.model, i),
                                                confsmoe_model_grad(r.model, i)),
                             CONFSMOE_OK);
    }
    return r;
}

/* The default rig: M = 2 with features {5, 3}, d = 8, Adam. */
static rig rig_new(uint64_t seed)
{
    return rig_new_with(seed, 2, FEATURES2, 8, 0, CONFSMOE_OPTIM_ADAM, true);
}

static void rig_free(rig *r)
{
    confsmoe_optim_destroy(r->optim);
    confsmoe_model_destroy(r->model);
    confsmoe_ctx_destroy(r->ctx);
}

/* Known, seed-independent values in every parameter. */
static void set_known_values(confsmoe_model *model)
{
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++) {
        confsmoe_tensor *t = confsmoe_model_param(model, i);
        float *v = confsmoe_tensor_data(t);
        for (int64_t j = 0; j < confsmoe_tensor_numel(t); j++)
            v[j] = 0.01f * (float)((i * 31 + j * 7) % 97) - 0.4f;
    }
}

/* `steps` training steps on a fixed batch with every modality present. */
static void rig_train(rig *r, int steps)
{
    confsmoe_tensor *inputs[3], *avail, *labels;
    for (int32_t m = 0; m < r->m; m++) {
        const int64_t dims[2] = {BATCH, r->features[m]};
        ck_assert_int_eq(confsmoe_tensor_create(r->ctx, CONFSMOE_F32, 2, dims, &inputs[m]), CONFSMOE_OK);
        float *x = confsmoe_tensor_data(inputs[m]);
        for (int64_t j = 0; j < BATCH * r->features[m]; j++)
            x[j] = sinf(0.3f * (float)j + (float)m);
    }
    const int64_t avail_dims[2] = {BATCH, r->m};
    ck_assert_int_eq(confsmoe_tensor_create(r->ctx, CONFSMOE_U8, 2, avail_dims, &avail), CONFSMOE_OK);
    memset(confsmoe_tensor_data(avail), 1, confsmoe_tensor_nbytes(avail));
    const int64_t label_dims[1] = {BATCH};
    ck_assert_int_eq(confsmoe_tensor_create(r->ctx, CONFSMOE_I32, 1, label_dims, &labels), CONFSMOE_OK);
    int32_t *y = confsmoe_tensor_data(labels);
    for (int b = 0; b < BATCH; b++)
        y[b] = b % 3;
    for (int s = 0; s < steps; s++) {
        confsmoe_model_zero_grad(r->model);
        float loss = 0.0f;
        confsmoe_status st = confsmoe_model_step(r->model, (const confsmoe_tensor *const *)inputs, avail, labels,
                                                 NULL, &loss, NULL);
        ck_assert_msg(st == CONFSMOE_OK, "model_step: %s", confsmoe_ctx_last_error(r->ctx));
        ck_assert(isfinite(loss));
        if (r->optim)
            ck_assert_int_eq(confsmoe_optim_step(r->optim), CONFSMOE_OK);
    }
    for (int32_t m = 0; m < r->m; m++)
        confsmoe_tensor_destroy(inputs[m]);
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(labels);
}

static void save_ok(rig *r, bool with_optim, const char *path)
{
    confsmoe_status s = confsmoe_checkpoint_save(r->model, with_optim ? r->optim : NULL, path);
    ck_assert_msg(s == CONFSMOE_OK, "save %s: %s", path, confsmoe_ctx_last_error(r->ctx));
}

static void load_ok(rig *r, bool with_optim, const char *path)
{
    confsmoe_status s = confsmoe_checkpoint_load(r->model, with_optim ? r->optim : NULL, path);
    ck_assert_msg(s == CONFSMOE_OK, "load %s: %s", path, confsmoe_ctx_last_error(r->ctx));
}

/* Every parameter of a and b holds the same bytes. */
static void assert_same_params(confsmoe_model *a, confsmoe_model *b)
{
    ck_assert_int_eq(confsmoe_model_n_params(a), confsmoe_model_n_params(b));
    for (int32_t i = 0; i < confsmoe_model_n_params(a); i++) {
        confsmoe_tensor *x = confsmoe_model_param(a, i), *y = confsmoe_model_param(b, i);
        ck_assert_uint_eq(confsmoe_tensor_nbytes(x), confsmoe_tensor_nbytes(y));
        ck_assert_msg(memcmp(confsmoe_tensor_data(x), confsmoe_tensor_data(y), confsmoe_tensor_nbytes(x)) == 0,
                      "parameter %s differs", confsmoe_model_param_name(a, i));
    }
}

/* The bytes of every parameter, to check that a failed load changed nothing. */
typedef struct {
    int32_t n;
    blob *params;
} snapshot;

static snapshot snapshot_take(confsmoe_model *model)
{
    snapshot s = {confsmoe_model_n_params(model), NULL};
    s.params = calloc((size_t)s.n, sizeof *s.params);
    for (int32_t i = 0; i < s.n; i++) {
        confsmoe_tensor *t = confsmoe_model_param(model, i);
        s.params[i].size = confsmoe_tensor_nbytes(t);
        s.params[i].bytes = malloc(s.params[i].size + 1);
        memcpy(s.params[i].bytes, confsmoe_tensor_data(t), s.params[i].size);
    }
    return s;
}

static bool snapshot_matches(const snapshot *s, confsmoe_model *model)
{
    for (int32_t i = 0; i < s->n; i++)
        if (memcmp(s->params[i].bytes, confsmoe_tensor_data(confsmoe_model_param(model, i)), s->params[i].size) != 0)
            return false;
    return true;
}

static void snapshot_free(snapshot *s)
{
    for (int32_t i = 0; i < s->n; i++)
        free(s->params[i].bytes);
    free(s->params);
}

/* A trained target whose state differs from the reference checkpoint, and its saved state. */
typedef struct {
    rig r;
    snapshot params;
    blob state;      /* the target saved with its optimizer, before any damaged load */
    scratch dir;
} target;

static target target_new(void)
{
    target t = {.r = rig_new(2), .dir = scratch_new()};
    rig_train(&t.r, 1);
    t.params = snapshot_take(t.r.model);
    save_ok(&t.r, true, path_in(&t.dir, "target_before.safetensors"));
    t.state = read_blob(path_in(&t.dir, "target_before.safetensors"));
    return t;
}

/* Parameters, optimizer moments and step counts are all as they were: saving again gives the same bytes. */
static void target_assert_unchanged(target *t)
{
    ck_assert_msg(snapshot_matches(&t->params, t->r.model), "a failed load changed the model");
    const char *again = path_in(&t->dir, "target_again.safetensors");
    save_ok(&t->r, true, again);
    blob b = read_blob(again);
    ck_assert_msg(blob_equal(b, t->state), "a failed load changed the model or the optimizer state");
    free(b.bytes);
}

static void target_free(target *t)
{
    snapshot_free(&t->params);
    free(t->state.bytes);
    rig_free(&t->r);
    scratch_free(&t->dir);
}

/* Loading path into the target fails with `want`, a message that names `mention`, and no change. */
static void expect_load_fails(target *t, const char *path, confsmoe_status want, const char *mention)
{
    confsmoe_status s = confsmoe_checkpoint_load(t->r.model, t->r.optim, path);
    const char *msg = confsmoe_ctx_last_error(t->r.ctx);
    ck_assert_msg(s == want, "load returned %d (%s: %s), expected %d", s, confsmoe_status_string(s), msg, want);
    ck_assert_msg(strstr(msg, "checkpoint_load") != NULL, "message \"%s\" does not name the call", msg);
    if (mention)
        ck_assert_msg(strstr(msg, mention) != NULL, "message \"%s\" does not mention \"%s\"", msg, mention);
    ck_assert_msg(snapshot_matches(&t->params, t->r.model), "a failed load (%s) changed the model", msg);
}

/* A reference checkpoint (seed 1, known values, two Adam steps) with and without the optimizer. */
typedef struct {
    rig r;
    blob with_optim, params_only;
} reference;

static reference reference_new(const scratch *dir)
{
    reference ref = {.r = rig_new(1)};
    set_known_values(ref.r.model);
    rig_train(&ref.r, 2);
    save_ok(&ref.r, true, path_in(dir, "ref_full.safetensors"));
    save_ok(&ref.r, false, path_in(dir, "ref_params.safetensors"));
    ref.with_optim = read_blob(path_in(dir, "ref_full.safetensors"));
    ref.params_only = read_blob(path_in(dir, "ref_params.safetensors"));
    return ref;
}

static void reference_free(reference *ref)
{
    free(ref->with_optim.bytes);
    free(ref->params_only.bytes);
    rig_free(&ref->r);
}

/* ---------------------------------------------------------------- round trips */

START_TEST(test_round_trip_with_optimizer)
{
    scratch dir = scratch_new();
    reference ref = reference_new(&dir);
    rig fresh = rig_new(2);
    rig_train(&fresh, 1);  /* different weights, moments and step counts */

    load_ok(&fresh, true, path_in(&dir, "ref_full.safetensors"));
    assert_same_params(ref.r.model, fresh.model);
    /* Saving the loaded state reproduces the file byte for byte: moments and steps came through. */
    save_ok(&fresh, true, path_in(&dir, "again.safetensors"));
    blob again = read_blob(path_in(&dir, "again.safetensors"));
    ck_assert(blob_equal(again, ref.with_optim));
    free(again.bytes);

    /* And training continues identically from there. */
    ck_assert_int_eq(confsmoe_ctx_set_seed(ref.r.ctx, 99), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_ctx_set_seed(fresh.ctx, 99), CONFSMOE_OK);
    rig_train(&ref.r, 1);
    rig_train(&fresh, 1);
    assert_same_params(ref.r.model, fresh.model);

    ck_assert_int_eq(test_temp_files(dir.dir), 0);
    rig_free(&fresh);
    reference_free(&ref);
    scratch_free(&dir);
}
END_TEST

START_TEST(test_round_trip_without_optimizer)
{
    scratch dir = scratch_new();
    reference ref = reference_new(&dir);
    char *header = header_of(ref.params_only);
    ck_assert_ptr_null(strstr(header, "optim."));
    ck_assert_ptr_nonnull(strstr(header, "\"__metadata__\":{\"format\":\"confsmoe\""));
    ck_assert_ptr_nonnull(strstr(header, confsmoe_version_string()));
    ck_assert_uint_eq(header_length(ref.params_only) % 8, 0);
    free(header);

    rig fresh = rig_new_with(3, 2, FEATURES2, 8, 0, CONFSMOE_OPTIM_ADAM, false);
    load_ok(&fresh, false, path_in(&dir, "ref_params.safetensors"));
    assert_same_params(ref.r.model, fresh.model);
    /* A file with optimizer state loads into a model alone: the state is ignored. */
    set_known_values(fresh.model);
    load_ok(&fresh, false, path_in(&dir, "ref_full.safetensors"));
    assert_same_params(ref.r.model, fresh.model);
    save_ok(&fresh, false, path_in(&dir, "again.safetensors"));
    blob again = read_blob(path_in(&dir, "again.safetensors"));
    ck_assert(blob_equal(again, ref.params_only));
    free(again.bytes);

    rig_free(&fresh);
    reference_free(&ref);
    scratch_free(&dir);
}
END_TEST

START_TEST(test_round_trip_sgd)
{
    scratch dir = scratch_new();
    rig a = rig_new_with(1, 2, FEATURES2, 8, 0, CONFSMOE_OPTIM_SGD, true);
    rig_train(&a, 2);
    save_ok(&a, true, path_in(&dir, "sgd.safetensors"));
    blob file = read_blob(path_in(&dir, "sgd.safetensors"));
    char *header = header_of(file);
    ck_assert_ptr_nonnull(strstr(header, "\"optim.head.w.m\""));
    ck_assert_ptr_nonnull(strstr(header, "\"optim.head.w.step\":{\"dtype\":\"I64\",\"shape\":[1]"));
    ck_assert_ptr_null(strstr(header, "\"optim.head.w.v\""));
    ck_assert_ptr_nonnull(strstr(header, "\"optim.kind\":\"sgd\""));
    free(header);

    rig b = rig_new_with(2, 2, FEATURES2, 8, 0, CONFSMOE_OPTIM_SGD, true);
    rig_train(&b, 1);
    load_ok(&b, true, path_in(&dir, "sgd.safetensors"));
    save_ok(&b, true, path_in(&dir, "again.safetensors"));
    blob again = read_blob(path_in(&dir, "again.safetensors"));
    ck_assert(blob_equal(again, file));
    ck_assert_int_eq(confsmoe_ctx_set_seed(a.ctx, 5), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_ctx_set_seed(b.ctx, 5), CONFSMOE_OK);
    rig_train(&a, 1);
    rig_train(&b, 1);
    assert_same_params(a.model, b.model);

    free(again.bytes);
    free(file.bytes);
    rig_free(&a);
    rig_free(&b);
    scratch_free(&dir);
}
END_TEST

/* An optimizer slot for a tensor outside the model is neither saved nor loaded. */
START_TEST(test_foreign_optimizer_slot)
{
    scratch dir = scratch_new();
    reference ref = reference_new(&dir);
    rig r = rig_new(2);
    const int64_t n = 3;
    confsmoe_tensor *extra, *extra_grad;
    ck_assert_int_eq(confsmoe_tensor_create(r.ctx, CONFSMOE_F32, 1, &n, &extra), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(r.ctx, CONFSMOE_F32, 1, &n, &extra_grad), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_add(r.optim, extra, extra_grad), CONFSMOE_OK);
    load_ok(&r, true, path_in(&dir, "ref_full.safetensors"));
    save_ok(&r, true, path_in(&dir, "again.safetensors"));
    blob again = read_blob(path_in(&dir, "again.safetensors"));
    ck_assert(blob_equal(again, ref.with_optim));
    free(again.bytes);
    /* The optimizer borrows the extra tensors, and the ctx owns their memory. */
    confsmoe_optim_destroy(r.optim);
    r.optim = NULL;
    confsmoe_tensor_destroy(extra);
    confsmoe_tensor_destroy(extra_grad);
    rig_free(&r);
    reference_free(&ref);
    scratch_free(&dir);
}
END_TEST

/* Names are compared after JSON unescaping, and the header may carry extra padding. */
START_TEST(test_escaped_names_and_padding)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    char *header = header_of(ref.params_only);
    char *escaped = replace_once(header, "\"head.b\"", "\"head\\u002eb\"");
    size_t len = strlen(escaped);
    char *padded = malloc(len + 3 + 1);
    memcpy(padded, escaped, len);
    memcpy(padded + len, "  \n", 4);
    const char *path = path_in(&t.dir, "escaped.safetensors");
    write_with_header(path, ref.params_only, padded);
    load_ok(&t.r, false, path);
    assert_same_params(ref.r.model, t.r.model);
    free(padded);
    free(escaped);
    free(header);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

/* ---------------------------------------------------------------- bad arguments and missing files */

START_TEST(test_bad_arguments)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "x.safetensors");
    ck_assert_int_eq(confsmoe_checkpoint_save(NULL, NULL, path), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_checkpoint_load(NULL, NULL, path), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_checkpoint_save(t.r.model, t.r.optim, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "path is NULL"));
    ck_assert_int_eq(confsmoe_checkpoint_load(t.r.model, t.r.optim, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_checkpoint_load(t.r.model, t.r.optim, ""), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(access(path, F_OK), -1);
    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

START_TEST(test_load_missing_file)
{
    target t = target_new();
    expect_load_fails(&t, path_in(&t.dir, "does_not_exist.safetensors"), CONFSMOE_E_IO, "No such file");
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "does_not_exist.safetensors"));
    /* A directory is not a checkpoint either. */
    expect_load_fails(&t, t.dir.dir, CONFSMOE_E_IO, "not a regular file");
    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

START_TEST(test_load_empty_file)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "empty.safetensors");
    write_bytes(path, "", 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "truncated");
    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

/* ---------------------------------------------------------------- truncation */

/* Every truncation of the file inside the length field and the header, and many inside the data. */
START_TEST(test_truncated_everywhere)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    const blob full = ref.with_optim;
    const size_t header_end = 8 + (size_t)header_length(full);
    const char *path = path_in(&t.dir, "truncated.safetensors");
    write_bytes(path, full.bytes, full.size);
    /* Shrinking the same file from its end visits every length without rewriting it. */
    size_t checked = 0;
    for (size_t len = full.size; len-- > 0;) {
        bool in_header = len < header_end;
        if (!in_header && (len - header_end) % 97 != 0 && len != full.size - 1 && len != header_end)
            continue;
        ck_assert_int_eq(truncate(path, (off_t)len), 0);
        expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "truncated");
        checked++;
    }
    ck_assert_uint_gt(checked, header_end);
    target_assert_unchanged(&t);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

/* Every prefix of the header, with the length field saying so: the parser meets every cut of the JSON. */
START_TEST(test_header_prefixes)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    const blob full = ref.params_only;
    const size_t n = (size_t)header_length(full);
    const char *path = path_in(&t.dir, "prefix.safetensors");
    for (size_t len = 0; len <= n; len++) {
        write_file_parts(path, len, full.bytes + 8, len, NULL, 0);
        expect_load_fails(&t, path, CONFSMOE_E_FORMAT, NULL);
    }
    /* And the full header with every cut of the data. */
    const size_t data = full.size - 8 - n;
    for (size_t len = 0; len < data; len += 13) {
        write_file_parts(path, n, full.bytes + 8, n, full.bytes + 8 + n, len);
        expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "truncated");
    }
    target_assert_unchanged(&t);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

START_TEST(test_header_length_beyond_file)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    const blob full = ref.with_optim;
    const uint64_t n = header_length(full);
    const char *path = path_in(&t.dir, "long.safetensors");
    const uint64_t lengths[] = {full.size - 7, full.size, n + (full.size - 8 - n) + 1, UINT64_MAX,
                                (uint64_t)1 << 63, 100000001};
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        write_file_parts(path, lengths[i], full.bytes + 8, full.size - 8, NULL, 0);
        expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "header length");
    }
    /* One byte off: the padding shrinks and the data no longer fits, or a data byte joins the JSON. */
    write_file_parts(path, n - 1, full.bytes + 8, full.size - 8, NULL, 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, NULL);
    write_file_parts(path, n + 1, full.bytes + 8, full.size - 8, NULL, 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "bad header");
    target_assert_unchanged(&t);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

/* ---------------------------------------------------------------- corrupted headers */

START_TEST(test_garbage_json)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "garbage.safetensors");
    static const char *const headers[] = {
        "",
        "not json",
        " {}",
        "[]",
        "{",
        "{\"a\"",
        "{\"a\":",
        "{\"a\":1}",
        "{\"a\":\"F32\"}",
        "{\"a\":{}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":[]}}",
        "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1e0],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"X99\",\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[0,1]}}",
        "{\"a\":{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"a\":{\"dtype\":\"F32\",\"shape\":[0],"
        "\"data_offsets\":[4,4]}}",
        "{\"a\\x\":{}}",
        "{\"\\ud800\":{}}",
        "{\"\\udc00x\":{}}",
        "{\"\\u12\":{}}",
        "{\"\\u0000\":{}}",
        "{\"\xff\":{}}",
        "{\"\xc0\xaf\":{}}",
        "{\"\xed\xa0\x80\":{}}",
        "{\"a\tb\":{}}",
        "{\"unterminated",
        "{\"__metadata__\":{\"a\":1}}",
        "{\"__metadata__\":{\"a\":{\"b\":\"c\"}}}",
        "{\"__metadata__\":[]}",
        "{\"__metadata__\":{},\"__metadata__\":{}}",
        "{\"__metadata__\":{\"a\":\"b\",\"a\":\"c\"}}",
        "{\"__metadata__\":{\"a\":\"b\",}}",
        "{}}",
        "{} {}",
        "{,}",
        "{\"a\" \"b\"}",
        "{null:1}",
        "\xef\xbb\xbf{}",
    };
    for (size_t i = 0; i < sizeof headers / sizeof headers[0]; i++) {
        write_file_parts(path, strlen(headers[i]), headers[i], strlen(headers[i]), NULL, 0);
        expect_load_fails(&t, path, CONFSMOE_E_FORMAT, NULL);
    }
    /* A NUL byte inside the header, and deep nesting that a recursive parser would follow. */
    write_file_parts(path, 3, "{\0}", 3, NULL, 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, NULL);
    const size_t depth = 100000;
    char *deep = malloc(2 * depth + 16);
    size_t len = 0;
    len += (size_t)sprintf(deep, "{\"a\":");
    for (size_t i = 0; i < depth; i++)
        deep[len++] = '[';
    for (size_t i = 0; i < depth; i++)
        deep[len++] = ']';
    deep[len++] = '}';
    write_file_parts(path, len, deep, len, NULL, 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, NULL);
    free(deep);
    /* A well-formed empty file: every parameter is missing. */
    write_file_parts(path, 2, "{}", 2, NULL, 0);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "missing");
    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

/* A parameter stored as I32 (same size, so only the dtype is wrong). */
START_TEST(test_wrong_dtype)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    char *header = header_of(ref.with_optim);
    char *bad = replace_once(header, "\"head.b\":{\"dtype\":\"F32\"", "\"head.b\":{\"dtype\":\"I32\"");
    const char *path = path_in(&t.dir, "dtype.safetensors");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"head.b\" is I32, expected F32");
    free(bad);
    /* A step count stored as F64 (same size). */
    bad = replace_once(header, "\"optim.head.b.step\":{\"dtype\":\"I64\"", "\"optim.head.b.step\":{\"dtype\":\"F64\"");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"optim.head.b.step\" is F64, expected I64");
    free(bad);
    target_assert_unchanged(&t);
    free(header);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

START_TEST(test_wrong_shape)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    char *header = header_of(ref.with_optim);
    const char *path = path_in(&t.dir, "shape.safetensors");
    /* enc.0.w is [8, 5]; [5, 8] has the same byte count, so only the shape is wrong. */
    char *bad = replace_once(header, "\"enc.0.w\":{\"dtype\":\"F32\",\"shape\":[8,5]",
                             "\"enc.0.w\":{\"dtype\":\"F32\",\"shape\":[5,8]");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"enc.0.w\" has shape [5, 8] in the file");
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "[8, 5]"));
    free(bad);
    bad = replace_once(header, "\"enc.0.w\":{\"dtype\":\"F32\",\"shape\":[8,5]",
                       "\"enc.0.w\":{\"dtype\":\"F32\",\"shape\":[40]");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "[40]");
    free(bad);
    /* An optimizer moment with the wrong shape. */
    bad = replace_once(header, "\"optim.enc.0.w.v\":{\"dtype\":\"F32\",\"shape\":[8,5]",
                       "\"optim.enc.0.w.v\":{\"dtype\":\"F32\",\"shape\":[1,40]");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"optim.enc.0.w.v\" has shape [1, 40]");
    free(bad);
    target_assert_unchanged(&t);
    free(header);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

START_TEST(test_missing_tensor)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    char *header = header_of(ref.with_optim);
    const char *path = path_in(&t.dir, "missing.safetensors");
    char *bad = replace_once(header, "\"ln_out.bias\":", "\"ln_out.biaz\":");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"ln_out.bias\" is missing");
    free(bad);
    /* Optimizer state missing while an optimizer is given... */
    bad = replace_once(header, "\"optim.ln_out.bias.v\":", "\"optim.ln_out.bias.w\":");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "optim.ln_out.bias.w");
    free(bad);
    bad = replace_once(header, "\"optim.ln_out.bias.step\":", "\"optim.ln_out.bias.stop\":");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "optim.ln_out.bias.stop");
    free(bad);
    /* ... or entirely: a parameters-only file. */
    expect_load_fails(&t, path_in(&t.dir, "ref_params.safetensors"), CONFSMOE_E_FORMAT,
                      "optimizer state \"optim.enc.0.w.m\" is missing");
    /* Unknown names are rejected. */
    bad = replace_once(header, "\"optim.ln_out.bias.v\":", "\"optim.nothing.v\":");
    write_with_header(path, ref.with_optim, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"optim.nothing.v\" is not the optimizer state");
    free(bad);
    target_assert_unchanged(&t);
    free(header);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

START_TEST(test_bad_offsets)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    char *header = header_of(ref.params_only);
    const char *path = path_in(&t.dir, "offsets.safetensors");
    size_t open, close;
    uint64_t b0, e0, bh, eh;
    find_offsets(header, "enc.0.b", &open, &close, &b0, &e0);
    find_offsets(header, "head.b", &open, &close, &bh, &eh);
    const uint64_t data = ref.params_only.size - 8 - header_length(ref.params_only);

    /* Overlapping: enc.1.b reads the bytes of enc.0.b (same size). */
    char *bad = with_offsets(header, "enc.1.b", b0, e0);
    write_with_header(path, ref.params_only, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "contiguous");
    free(bad);
    /* Out of range: past the end of the data. */
    bad = with_offsets(header, "head.b", data, data + (eh - bh));
    write_with_header(path, ref.params_only, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"head.b\" ends at data byte");
    free(bad);
    bad = with_offsets(header, "head.b", UINT64_MAX - 4, UINT64_MAX);
    write_with_header(path, ref.params_only, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "head.b");
    free(bad);
    /* Inconsistent with the shape: one element short, and reversed. */
    bad = with_offsets(header, "head.b", bh, eh - 4);
    write_with_header(path, ref.params_only, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"head.b\" is F32 [3], 12 bytes");
    free(bad);
    bad = with_offsets(header, "head.b", eh, bh);
    write_with_header(path, ref.params_only, bad);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "reversed");
    free(bad);
    /* A gap: trailing bytes after the last tensor. */
    blob longer = {malloc(ref.params_only.size + 4), ref.params_only.size + 4};
    memcpy(longer.bytes, ref.params_only.bytes, ref.params_only.size);
    memset(longer.bytes + ref.params_only.size, 0, 4);
    write_bytes(path, longer.bytes, longer.size);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "cover");
    free(longer.bytes);
    target_assert_unchanged(&t);
    free(header);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

/* Checkpoints of other configurations: more modalities, wider d, an extra (noise) parameter. */
START_TEST(test_mismatched_models)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "other.safetensors");

    rig three = rig_new_with(4, 3, FEATURES3, 8, 0, CONFSMOE_OPTIM_ADAM, true);
    save_ok(&three, true, path);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "in the file, the model's is");
    rig_free(&three);

    rig wide = rig_new_with(4, 2, FEATURES2, 16, 0, CONFSMOE_OPTIM_ADAM, true);
    save_ok(&wide, true, path);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "\"enc.0.w\" has shape [16, 5] in the file, the model's is [8, 5]");
    rig_free(&wide);

    rig noisy = rig_new_with(4, 2, FEATURES2, 8, 1, CONFSMOE_OPTIM_ADAM, true);
    save_ok(&noisy, true, path);
    expect_load_fails(&t, path, CONFSMOE_E_FORMAT, "not a parameter of this model");
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "gate.noise.w"));
    save_ok(&noisy, false, path);
    ck_assert_int_eq(confsmoe_checkpoint_load(t.r.model, NULL, path), CONFSMOE_E_FORMAT);
    ck_assert_msg(snapshot_matches(&t.params, t.r.model), "a failed load changed the model");

    /* And the other way round: the noisy model misses its noise weights in our file. */
    save_ok(&t.r, false, path);
    ck_assert_int_eq(confsmoe_checkpoint_load(noisy.model, NULL, path), CONFSMOE_E_FORMAT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(noisy.ctx), "\"gate.noise.w\" is missing"));
    rig_free(&noisy);

    /* Adam state into an SGD optimizer. */
    rig sgd = rig_new_with(4, 2, FEATURES2, 8, 0, CONFSMOE_OPTIM_SGD, true);
    snapshot before = snapshot_take(sgd.model);
    ck_assert_int_eq(confsmoe_checkpoint_load(sgd.model, sgd.optim, path_in(&t.dir, "target_before.safetensors")),
                     CONFSMOE_E_FORMAT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(sgd.ctx), "adam optimizer state, the optimizer is sgd"));
    ck_assert(snapshot_matches(&before, sgd.model));
    snapshot_free(&before);
    rig_free(&sgd);

    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

/* Random byte flips in the header: never a crash; a failure leaves everything as it was. */
START_TEST(test_header_byte_flips)
{
    target t = target_new();
    reference ref = reference_new(&t.dir);
    const blob full = ref.with_optim;
    const size_t n = (size_t)header_length(full);
    const char *path = path_in(&t.dir, "flipped.safetensors");
    blob copy = {malloc(full.size), full.size};
    uint64_t state = 12345;
    int failures = 0;
    for (int iter = 0; iter < 600; iter++) {
        memcpy(copy.bytes, full.bytes, full.size);
        for (int k = 0; k < 1 + iter % 3; k++) {
            state = state * 6364136223846793005u + 1442695040888963407u;
            size_t at = 8 + (size_t)((state >> 33) % n);
            copy.bytes[at] ^= (unsigned char)(1u << ((state >> 20) % 8));
        }
        write_bytes(path, copy.bytes, copy.size);
        snapshot before = snapshot_take(t.r.model);
        confsmoe_status s = confsmoe_checkpoint_load(t.r.model, t.r.optim, path);
        if (s != CONFSMOE_OK) {
            failures++;
            ck_assert_msg(s == CONFSMOE_E_FORMAT, "status %d: %s", s, confsmoe_ctx_last_error(t.r.ctx));
            ck_assert(snapshot_matches(&before, t.r.model));
        }
        snapshot_free(&before);
    }
    ck_assert_int_gt(failures, 300);
    free(copy.bytes);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

/* ---------------------------------------------------------------- failed saves */

START_TEST(test_save_into_missing_directory)
{
    target t = target_new();
    char path[PATH_CAP];
    snprintf(path, sizeof path, "%s/no/such/dir/x.safetensors", t.dir.dir);
    confsmoe_status s = confsmoe_checkpoint_save(t.r.model, t.r.optim, path);
    ck_assert_int_eq(s, CONFSMOE_E_IO);
    const char *msg = confsmoe_ctx_last_error(t.r.ctx);
    ck_assert_msg(strstr(msg, "No such file or directory") && strstr(msg, "checkpoint_save"), "message: %s", msg);
    ck_assert_int_eq(access(path_in(&t.dir, "no"), F_OK), -1);
    ck_assert_int_eq(test_temp_files(t.dir.dir), 0);
    target_assert_unchanged(&t);
    target_free(&t);
}
END_TEST

/* The rename fails when path is a directory: the temporary file is removed, the directory stays. */
START_TEST(test_save_over_directory)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "a_directory");
    ck_assert_int_eq(mkdir(path, 0700), 0);
    ck_assert_int_eq(confsmoe_checkpoint_save(t.r.model, t.r.optim, path), CONFSMOE_E_IO);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "rename"));
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert(S_ISDIR(st.st_mode));
    ck_assert_int_eq(test_temp_files(t.dir.dir), 0);
    ck_assert_int_eq(rmdir(path), 0);
    target_free(&t);
}
END_TEST

/* A write that fails half-way (file size limit) leaves the previous checkpoint at path intact. */
START_TEST(test_failed_save_keeps_previous_checkpoint)
{
    target t = target_new();
    const char *path = path_in(&t.dir, "keep.safetensors");
    reference ref = reference_new(&t.dir);
    write_bytes(path, ref.with_optim.bytes, ref.with_optim.size);

    struct rlimit old, small;
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    small = old;
    small.rlim_cur = 100;
    void (*previous)(int) = signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    confsmoe_status s = confsmoe_checkpoint_save(t.r.model, t.r.optim, path);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, previous);

    ck_assert_int_eq(s, CONFSMOE_E_IO);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(t.r.ctx), "cannot write"));
    blob after = read_blob(path);
    ck_assert_msg(blob_equal(after, ref.with_optim), "the previous checkpoint was damaged");
    free(after.bytes);
    ck_assert_int_eq(test_temp_files(t.dir.dir), 0);
    /* It still loads. */
    load_ok(&t.r, true, path);
    assert_same_params(ref.r.model, t.r.model);
    reference_free(&ref);
    target_free(&t);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("round_trip");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_round_trip_with_optimizer);
    tcase_add_test(tc, test_round_trip_without_optimizer);
    tcase_add_test(tc, test_round_trip_sgd);
    tcase_add_test(tc, test_foreign_optimizer_slot);
    tcase_add_test(tc, test_escaped_names_and_padding);
    suite_add_tcase(s, tc);

    tc = tcase_create("damaged");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_bad_arguments);
    tcase_add_test(tc, test_load_missing_file);
    tcase_add_test(tc, test_load_empty_file);
    tcase_add_test(tc, test_truncated_everywhere);
    tcase_add_test(tc, test_header_prefixes);
    tcase_add_test(tc, test_header_length_beyond_file);
    tcase_add_test(tc, test_garbage_json);
    tcase_add_test(tc, test_wrong_dtype);
    tcase_add_test(tc, test_wrong_shape);
    tcase_add_test(tc, test_missing_tensor);
    tcase_add_test(tc, test_bad_offsets);
    tcase_add_test(tc, test_mismatched_models);
    tcase_add_test(tc, test_header_byte_flips);
    suite_add_tcase(s, tc);

    tc = tcase_create("failed_save");
    tcase_add_test(tc, test_save_into_missing_directory);
    tcase_add_test(tc, test_save_over_directory);
    tcase_add_test(tc, test_failed_save_keeps_previous_checkpoint);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run(suite()); }
