/*
 * confsmoe-train: train the Conf-SMoE classifier of docs/MODEL.md, section 6 on a dataset folder
 * (labels.csv + view<i>_<name>.csv, see dataset.h) under the missing-modality protocol of
 * section 6, select the model on a validation split, and report test accuracy, macro-F1,
 * macro AUROC and the experts' utilisation (stdout, and JSON with --json).
 *
 * Only the public API of libconfsmoe (confsmoe.h) is used, and libconfsmoe_mpi for data
 * parallelism under mpirun (docs/DISTRIBUTED.md). docs/TRAIN.md has the details.
 *
 * Exit status: 0 success, 1 a library or system failure, 2 bad flags or data.
 */
#include <confsmoe.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dataset.h"
#include "distributed.h"
#include "metrics.h"
#include "options.h"
#include "protocol.h"
#include "report.h"
#include "util.h"

const char *const GATE_NAMES[] = {"confidence", "softmax", "gaussian", "laplacian", NULL};
const char *const LOAD_LOSS_NAMES[] = {"none", "cv", "entropy", NULL};
const char *const IMPUTATION_NAMES[] = {"two-stage", "mean", NULL};
const char *const EVAL_FILL_NAMES[] = {"draws", "pool-mean", NULL};
const char *const WRITEBACK_NAMES[] = {"ln-imp", "residual", NULL};
const char *const ROUTER_GRAD_NAMES[] = {"frozen", "trainable", "score", NULL};

/* ------------------------------------------------------------------ defaults
 *
 * PAPER: the hyper-parameters of docs/MODEL.md, section 6 (--paper), with the library's
 * default write-back (LN_IMP).
 * DEFAULTS: the recommended configuration, chosen on validation accuracy at r = 0.3 and 0.5
 * over the three shipped datasets and three seeds (docs/RESULTS.md, section 4): the paper's
 * model and gate with mean imputation, Adam lr 1e-3 and modality dropout 0.4. Its write-back,
 * used with --imputation two-stage, is the residual one, chosen on validation accuracy with
 * two-stage imputation at r = 0.3 and 0.5 on handwritten and AV-digits --hard, seeds 1 and 2
 * (docs/TRAIN.md, "The write-back"). */
static const options PAPER = {
    .missing = 0.0, .val = 0.1, .lr = 3e-4, .dropout = 0.1, .load_weight = 0.01,
    .gate = CONFSMOE_MODEL_GATE_CONFIDENCE, .load_loss = CONFSMOE_LOAD_LOSS_NONE,
    .imputation = CONFSMOE_IMPUTE_TWO_STAGE, .router_grad = CONFSMOE_ROUTER_GRAD_FROZEN, .noisy = 0,
    .writeback = CONFSMOE_WRITEBACK_LN_IMP,
    .experts = 8, .k = 2, .d = 128, .heads = 4, .hidden = 0, .epochs = 30, .batch = 256, .draws = 10,
    .threads = 0, .seed = 1,
};
static const options DEFAULTS = {
    .missing = 0.0, .val = 0.1, .lr = 1e-3, .dropout = 0.1, .load_weight = 0.01, .modality_dropout = 0.4,
    .gate = CONFSMOE_MODEL_GATE_CONFIDENCE, .load_loss = CONFSMOE_LOAD_LOSS_NONE,
    .imputation = CONFSMOE_IMPUTE_MEAN, .router_grad = CONFSMOE_ROUTER_GRAD_FROZEN, .noisy = 0,
    .writeback = CONFSMOE_WRITEBACK_RESIDUAL,
    .experts = 8, .k = 2, .d = 128, .heads = 4, .hidden = 0, .epochs = 30, .batch = 256, .draws = 10,
    .threads = 0, .seed = 1,
};

/* ------------------------------------------------------------------ flags */

typedef enum { K_STR, K_INT, K_U64, K_DBL, K_CHOICE, K_SWITCH } flag_kind;

typedef struct {
    const char *name;
    flag_kind kind;
    size_t offset;
    double lo, hi;                 /* K_INT, K_DBL */
    const char *const *choices;    /* K_CHOICE */
    const char *metavar;
    const char *help;
} flag;

#define OFF(field) offsetof(options, field)

static const flag FLAGS[] = {
    {"--data", K_STR, OFF(data), 0, 0, NULL, "DIR", "dataset folder (required): labels.csv, view<i>_<name>.csv, ..."},
    {"--missing", K_DBL, OFF(missing), 0, 1, NULL, "R", "missing rate r of the protocol, 0 <= r <= 1"},
    {"--gate", K_CHOICE, OFF(gate), 0, 0, GATE_NAMES, "G", "confidence|softmax|gaussian|laplacian"},
    {"--load-loss", K_CHOICE, OFF(load_loss), 0, 0, LOAD_LOSS_NAMES, "L", "none|cv|entropy (load-balancing loss)"},
    {"--load-weight", K_DBL, OFF(load_weight), 0, 1e6, NULL, "W", "weight of the load loss"},
    {"--imputation", K_CHOICE, OFF(imputation), 0, 0, IMPUTATION_NAMES, "I", "two-stage|mean"},
    {"--draws", K_INT, OFF(draws), 1, 1000000, NULL, "K", "pool rows averaged by stage-1 imputation"},
    {"--eval-fill", K_CHOICE, OFF(eval_fill), 0, 0, EVAL_FILL_NAMES, "F",
     "draws|pool-mean: stage 1 at evaluation (fresh draws, or the deterministic pool mean)"},
    {"--writeback", K_CHOICE, OFF(writeback), 0, 0, WRITEBACK_NAMES, "W",
     "ln-imp|residual: a two-stage-imputed token becomes LN_imp(LN3(H + F) + Ihat), or LN3(H + Ihat)"},
    {"--router-grad", K_CHOICE, OFF(router_grad), 0, 0, ROUTER_GRAD_NAMES, "R",
     "frozen|trainable|score (confidence gate's router)"},
    {"--noisy", K_SWITCH, OFF(noisy), 0, 0, NULL, NULL, "noisy top-k routing in training"},
    {"--modality-dropout", K_DBL, OFF(modality_dropout), 0, 1, NULL, "P",
     "in training, drop each present modality with probability P (one always kept)"},
    {"--experts", K_INT, OFF(experts), 1, 4096, NULL, "E", "number of experts"},
    {"--k", K_INT, OFF(k), 1, 4096, NULL, "K", "experts per token (top-k), k <= E"},
    {"--d", K_INT, OFF(d), 1, 65536, NULL, "D", "token width"},
    {"--heads", K_INT, OFF(heads), 1, 65536, NULL, "H", "attention heads (must divide d)"},
    {"--hidden", K_INT, OFF(hidden), 0, 1048576, NULL, "H", "expert hidden width (0 = d)"},
    {"--epochs", K_INT, OFF(epochs), 0, 1000000, NULL, "N", "training epochs"},
    {"--batch", K_INT, OFF(batch), 1, 1048576, NULL, "B", "mini-batch size"},
    {"--lr", K_DBL, OFF(lr), 1e-12, 10, NULL, "LR", "Adam learning rate"},
    {"--weight-decay", K_DBL, OFF(weight_decay), 0, 10, NULL, "W", "L2 weight decay added to the gradients"},
    {"--dropout", K_DBL, OFF(dropout), 0, 0.99, NULL, "P", "dropout of the attention block"},
    {"--seed", K_U64, OFF(seed), 0, 0, NULL, "S", "seed of splits, masks, batch order and the model"},
    {"--threads", K_INT, OFF(threads), 0, 64, NULL, "T",
     "threads (the library's own, and BLIS_NUM_THREADS; 0 = the environment's)"},
    {"--val", K_DBL, OFF(val), 0, 0.9, NULL, "F", "validation fraction carved from train (0 = none)"},
    {"--json", K_STR, OFF(json), 0, 0, NULL, "PATH", "write the JSON report to PATH"},
    {"--checkpoint", K_STR, OFF(checkpoint), 0, 0, NULL, "PATH", "save the best model + Adam state (safetensors)"},
    {"--resume", K_STR, OFF(resume), 0, 0, NULL, "PATH", "load a checkpoint (model + Adam state) first"},
    {"--dump-masks", K_STR, OFF(dump_masks), 0, 0, NULL, "PATH", "write each sample's split and masks (CSV)"},
    {"--paper", K_SWITCH, OFF(paper), 0, 0, NULL, NULL, "start from the paper's hyper-parameters"},
    {"--quiet", K_SWITCH, OFF(quiet), 0, 0, NULL, NULL, "no header and no per-epoch lines"},
};
#define N_FLAGS ((int)(sizeof FLAGS / sizeof FLAGS[0]))

static void default_text(const flag *f, const options *o, char *buf, size_t cap)
{
    const char *p = (const char *)o + f->offset;
    switch (f->kind) {
    case K_STR: snprintf(buf, cap, "%s", *(const char *const *)(const void *)p ? *(const char *const *)(const void *)p : ""); break;
    case K_INT: snprintf(buf, cap, "%d", *(const int *)(const void *)p); break;
    case K_U64: snprintf(buf, cap, "%" PRIu64, *(const uint64_t *)(const void *)p); break;
    case K_DBL: snprintf(buf, cap, "%g", *(const double *)(const void *)p); break;
    case K_CHOICE: snprintf(buf, cap, "%s", f->choices[*(const int *)(const void *)p]); break;
    case K_SWITCH: buf[0] = '\0'; break;
    }
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: " PROG " --data DIR [--missing R] [--gate G] [--epochs N] [--seed S] [--json PATH] [...]\n"
            "Train the Conf-SMoE classifier on a dataset folder under the missing-modality protocol,\n"
            "select on validation, report test accuracy / macro-F1 / macro AUROC and expert load.\n\n");
    for (int i = 0; i < N_FLAGS; i++) {
        const flag *f = &FLAGS[i];
        char left[64], def[64];
        snprintf(left, sizeof left, "%s%s%s", f->name, f->metavar ? " " : "", f->metavar ? f->metavar : "");
        default_text(f, &DEFAULTS, def, sizeof def);
        fprintf(out, "  %-20s %s%s%s%s\n", left, f->help, def[0] ? " (default " : "", def, def[0] ? ")" : "");
    }
    fprintf(out, "  %-20s %s\n\n", "--help", "this text");
    fprintf(out,
            "The defaults are the recommended configuration (docs/RESULTS.md): the paper's model with mean\n"
            "imputation, lr 1e-3 and modality dropout 0.4 (with --imputation two-stage: the residual write-back).\n"
            "--paper: the hyper-parameters of docs/MODEL.md, section 6 (d 128, 4 heads, E 8, k 2, dropout 0.1,\n"
            "Adam lr 3e-4, batch 256, 30 epochs, confidence gate, two-stage imputation with the ln-imp\n"
            "write-back, no modality dropout); other flags, wherever they stand, override it.\n"
            "Flags may be given as --flag VALUE or --flag=VALUE. Exit status: 0 ok, 1 library error,\n"
            "2 bad flags or data. See docs/TRAIN.md.\n");
}

static void parse_value(const flag *f, const char *value, options *o)
{
    char *p = (char *)o + f->offset;
    char *end;
    errno = 0;
    switch (f->kind) {
    case K_STR:
        if (!value[0])
            die_input(NULL, 0, "%s needs a non-empty value", f->name);
        *(const char **)(void *)p = value;
        return;
    case K_INT: {
        long v = strtol(value, &end, 10);
        if (errno || end == value || *end || v < (long)f->lo || v > (long)f->hi)
            die_input(NULL, 0, "%s needs an integer in %ld..%ld, got '%s'", f->name, (long)f->lo, (long)f->hi, value);
        *(int *)(void *)p = (int)v;
        return;
    }
    case K_U64: {
        if (value[0] == '-')
            die_input(NULL, 0, "%s needs a non-negative integer, got '%s'", f->name, value);
        unsigned long long v = strtoull(value, &end, 10);
        if (errno || end == value || *end)
            die_input(NULL, 0, "%s needs a non-negative integer, got '%s'", f->name, value);
        *(uint64_t *)(void *)p = (uint64_t)v;
        return;
    }
    case K_DBL: {
        double v = strtod(value, &end);
        if (errno || end == value || *end || !(v >= f->lo && v <= f->hi))
            die_input(NULL, 0, "%s needs a number in %g..%g, got '%s'", f->name, f->lo, f->hi, value);
        *(double *)(void *)p = v;
        return;
    }
    case K_CHOICE:
        for (int i = 0; f->choices[i]; i++)
            if (strcmp(value, f->choices[i]) == 0) {
                *(int *)(void *)p = i;
                return;
            }
        {
            char list[256] = "";
            for (int i = 0; f->choices[i]; i++)
                snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? "|" : "", f->choices[i]);
            die_input(NULL, 0, "%s must be one of %s, got '%s'", f->name, list, value);
        }
    case K_SWITCH:
        *(int *)(void *)p = 1;
        return;
    }
}

static void check_writable(const char *flag_name, const char *path)
{
    char *copy = xstrdup(path);
    const char *dir = dirname(copy);
    if (access(dir, W_OK | X_OK) != 0)
        die_input(path, 0, "%s: cannot write in %s: %s", flag_name, dir, strerror(errno));
    free(copy);
}

static void parse_flags(int argc, char **argv, options *o)
{
    int paper = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            usage(stdout);
            exit(0);
        }
        paper |= strcmp(argv[i], "--paper") == 0;
    }
    *o = paper ? PAPER : DEFAULTS;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *eq = strchr(arg, '=');
        const size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        const flag *f = NULL;
        for (int j = 0; j < N_FLAGS && !f; j++)
            if (strlen(FLAGS[j].name) == name_len && strncmp(FLAGS[j].name, arg, name_len) == 0)
                f = &FLAGS[j];
        if (!f) {
            if (arg[0] == '-')
                die_input(NULL, 0, "unknown flag '%.*s' (see --help)", (int)name_len, arg);
            die_input(NULL, 0, "unexpected argument '%s' (see --help)", arg);
        }
        if (f->kind == K_SWITCH) {
            if (eq)
                die_input(NULL, 0, "%s takes no value", f->name);
            parse_value(f, "", o);
            continue;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            if (i + 1 >= argc)
                die_input(NULL, 0, "%s needs a value (%s)", f->name, f->metavar);
            value = argv[++i];
        }
        parse_value(f, value, o);
    }
    if (!o->data)
        die_input(NULL, 0, "--data DIR is required (see --help)");
    if (o->k > o->experts)
        die_input(NULL, 0, "--k %d is larger than --experts %d", o->k, o->experts);
    if (o->d % o->heads != 0)
        die_input(NULL, 0, "--heads %d does not divide --d %d", o->heads, o->d);
    if (o->json)
        check_writable("--json", o->json);
    if (o->checkpoint)
        check_writable("--checkpoint", o->checkpoint);
    if (o->dump_masks)
        check_writable("--dump-masks", o->dump_masks);
    if (o->resume && access(o->resume, R_OK) != 0)
        die_input(o->resume, 0, "--resume: cannot read: %s", strerror(errno));
}

/* ------------------------------------------------------------------ library calls */

static TRAIN_NORETURN void die_library(confsmoe_ctx *ctx, const char *call, confsmoe_status s)
{
    die_system("%s failed: %s: %s", call, confsmoe_status_string(s), ctx ? confsmoe_ctx_last_error(ctx) : "");
}

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        confsmoe_status s_ = (call);                                                                \
        if (s_ != CONFSMOE_OK)                                                                      \
            die_library(ctx, #call, s_);                                                            \
    } while (0)

/* ------------------------------------------------------------------ batches */

typedef struct {
    const dataset *ds;
    const uint8_t *mask;   /* [n, M] */
    int cap;               /* rows the buffers hold */
    float **x;             /* [M] -> [cap, S_m, F_m] */
    uint8_t *avail;        /* [cap, M] */
    int32_t *label;        /* [cap] */
    float *logits;         /* [cap, C] */
} batch_buffers;

static void batch_init(batch_buffers *b, const dataset *ds, const uint8_t *mask, int cap)
{
    b->ds = ds;
    b->mask = mask;
    b->cap = cap;
    b->x = xcalloc((size_t)ds->m, sizeof *b->x);
    for (int m = 0; m < ds->m; m++)
        b->x[m] = xmalloc((size_t)cap * (size_t)(ds->views[m].tokens * ds->views[m].features) * sizeof(float));
    b->avail = xmalloc((size_t)cap * (size_t)ds->m);
    b->label = xmalloc((size_t)cap * sizeof *b->label);
    b->logits = xmalloc((size_t)cap * (size_t)ds->n_classes * sizeof *b->logits);
}

static void batch_free(batch_buffers *b)
{
    for (int m = 0; m < b->ds->m; m++)
        free(b->x[m]);
    free(b->x);
    free(b->avail);
    free(b->label);
    free(b->logits);
}

/* Tensors over the buffers for the samples idx[0..n-1]. */
typedef struct {
    confsmoe_tensor **x, *avail, *label, *logits;
    int m;
} batch_tensors;

static void batch_gather(confsmoe_ctx *ctx, batch_buffers *b, const int *idx, int n, batch_tensors *t)
{
    const dataset *ds = b->ds;
    const int M = ds->m;
    for (int m = 0; m < M; m++) {
        const size_t w = (size_t)(ds->views[m].tokens * ds->views[m].features);
        for (int r = 0; r < n; r++)
            memcpy(b->x[m] + (size_t)r * w, ds->views[m].x + (size_t)idx[r] * w, w * sizeof(float));
    }
    for (int r = 0; r < n; r++) {
        memcpy(b->avail + (size_t)r * M, b->mask + (size_t)idx[r] * M, (size_t)M);
        b->label[r] = ds->label[idx[r]];
    }
    t->m = M;
    t->x = xcalloc((size_t)M, sizeof *t->x);
    for (int m = 0; m < M; m++) {
        const int64_t dims[3] = {n, ds->views[m].tokens, ds->views[m].features};
        CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 3, dims, b->x[m], &t->x[m]));
    }
    const int64_t ad[2] = {n, M}, ld[1] = {n}, cd[2] = {n, ds->n_classes};
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 2, ad, b->avail, &t->avail));
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, ld, b->label, &t->label));
    CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, cd, b->logits, &t->logits));
}

static void batch_release(batch_tensors *t)
{
    for (int m = 0; m < t->m; m++)
        confsmoe_tensor_destroy(t->x[m]);
    free(t->x);
    confsmoe_tensor_destroy(t->avail);
    confsmoe_tensor_destroy(t->label);
    confsmoe_tensor_destroy(t->logits);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------ evaluation */

/* Inference on the samples idx[0..n-1]: the metrics of the softmax probabilities. */
static eval_metrics evaluate(confsmoe_ctx *ctx, confsmoe_model *model, batch_buffers *b, const int *idx, int n)
{
    eval_metrics r = {NAN, NAN, NAN};
    if (n <= 0)
        return r;
    const int C = b->ds->n_classes;
    float *probs = xmalloc((size_t)n * (size_t)C * sizeof *probs);
    int32_t *pred = xmalloc((size_t)n * sizeof *pred), *label = xmalloc((size_t)n * sizeof *label);
    for (int at = 0; at < n; at += b->cap) {
        const int nb = n - at < b->cap ? n - at : b->cap;
        batch_tensors t;
        batch_gather(ctx, b, idx + at, nb, &t);
        CHECK(confsmoe_model_predict(model, (const confsmoe_tensor *const *)t.x, t.avail, t.logits));
        memcpy(probs + (size_t)at * C, b->logits, (size_t)nb * (size_t)C * sizeof *probs);
        memcpy(label + at, b->label, (size_t)nb * sizeof *label);
        batch_release(&t);
    }
    metric_softmax_argmax(probs, n, C, pred);
    r.accuracy = metric_accuracy(pred, label, n);
    r.macro_f1 = metric_macro_f1(pred, label, n, C);
    r.macro_auroc = metric_macro_auroc(probs, label, n, C);
    free(probs);
    free(pred);
    free(label);
    return r;
}

/* ------------------------------------------------------------------ parameters */

typedef struct {
    int32_t n;
    float **data;
    size_t *bytes;
} param_copy;

static void params_snapshot(confsmoe_ctx *ctx, confsmoe_model *model, param_copy *c)
{
    if (!c->data) {
        c->n = confsmoe_model_n_params(model);
        c->data = xcalloc((size_t)c->n, sizeof *c->data);
        c->bytes = xcalloc((size_t)c->n, sizeof *c->bytes);
        for (int32_t i = 0; i < c->n; i++) {
            c->bytes[i] = confsmoe_tensor_nbytes(confsmoe_model_param(model, i));
            c->data[i] = xmalloc(c->bytes[i]);
        }
    }
    for (int32_t i = 0; i < c->n; i++)
        CHECK(confsmoe_tensor_copy_out(confsmoe_model_param(model, i), c->data[i], c->bytes[i]));
}

static void params_restore(confsmoe_ctx *ctx, confsmoe_model *model, const param_copy *c)
{
    for (int32_t i = 0; i < c->n; i++)
        CHECK(confsmoe_tensor_copy_in(confsmoe_model_param(model, i), c->data[i], c->bytes[i]));
}

static void params_free(param_copy *c)
{
    for (int32_t i = 0; i < c->n; i++)
        free(c->data[i]);
    free(c->data);
    free(c->bytes);
}

/* ------------------------------------------------------------------ masks dump */

static void dump_masks(const char *path, const dataset *ds, const split_plan *p)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die_input(path, 0, "--dump-masks: cannot write: %s", strerror(errno));
    static const char *const role_name[] = {"excluded", "train", "val", "test"};
    fprintf(f, "sample,split");
    for (int m = 0; m < ds->m; m++)
        fprintf(f, ",natural%d", m);
    for (int m = 0; m < ds->m; m++)
        fprintf(f, ",present%d", m);
    fputc('\n', f);
    for (int i = 0; i < ds->n; i++) {
        fprintf(f, "%d,%s", i, role_name[p->role[i] + 1]);
        for (int m = 0; m < ds->m; m++)
            fprintf(f, ",%d", ds->natural[(size_t)i * ds->m + m]);
        for (int m = 0; m < ds->m; m++)
            fprintf(f, ",%d", p->mask[(size_t)i * ds->m + m]);
        fputc('\n', f);
    }
    if (ferror(f) | (fclose(f) != 0))
        die_input(path, 0, "--dump-masks: cannot write: %s", strerror(errno));
}

/* ------------------------------------------------------------------ main */

static void read_stats(confsmoe_ctx *ctx, confsmoe_gate *gate, confsmoe_gate_stats *st, int64_t *load,
                       double *conf, int32_t n)
{
    memset(st, 0, sizeof *st);
    st->struct_size = sizeof *st; /* this program's size: the library writes no more */
    CHECK(confsmoe_gate_stats_get(gate, CONFSMOE_STATS_TOTAL, st, load, conf, n));
}

/* The availability of the samples idx[0..n-1], [n, M]. */
static void batch_mask(const uint8_t *mask, int M, const int *idx, int n, uint8_t *out)
{
    for (int r = 0; r < n; r++)
        memcpy(out + (size_t)r * M, mask + (size_t)idx[r] * M, (size_t)M);
}

int main(int argc, char **argv)
{
    const double t_start = now_seconds();
    distributed dist;
    distributed_init(&argc, &argv, &dist);
    options opt;
    parse_flags(argc, argv, &opt);
    /* Under mpirun every rank trains; rank 0 alone prints and writes files. */
    const int lead = dist.rank == 0;
    if (!lead) {
        opt.quiet = 1;
        opt.json = opt.checkpoint = opt.dump_masks = NULL;
    }
    if (opt.threads > 0) {
        /* The ctx's n_threads (below) sets the library's own threads and, when above 1, BLIS's
         * for the products outside them; with --threads 1 BLIS would follow the environment, so
         * the count goes there too, before the first BLIS call (BLIS reads it once). */
        char buf[16];
        snprintf(buf, sizeof buf, "%d", opt.threads);
        setenv("BLIS_NUM_THREADS", buf, 1);
    }

    dataset ds;
    dataset_load(opt.data, &ds);
    split_plan plan;
    protocol_split(&ds, opt.val, opt.seed, &plan);
    if (plan.count[ROLE_TRAIN] == 0)
        die_input(ds.split_name ? ds.split_name : ds.dir, 0, "no training samples");
    if (plan.count[ROLE_TEST] == 0)
        die_input(ds.split_name ? ds.split_name : ds.dir, 0, "no test samples");
    if (opt.val > 0 && plan.count[ROLE_VAL] == 0)
        warn("no validation samples (too few training samples per class): the last epoch is kept");
    protocol_mask(&ds, opt.missing, opt.seed, &plan);
    if (opt.dump_masks)
        dump_masks(opt.dump_masks, &ds, &plan);
    dataset_standardise(&ds, plan.mask, plan.list[ROLE_TRAIN], plan.count[ROLE_TRAIN]);
    if (plan.n_excluded && lead)
        warn("%d sample(s) have no modality present (avail.csv / empty rows) and are excluded", plan.n_excluded);

    const int M = ds.m, C = ds.n_classes;

    /* The model. */
    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = opt.seed;
    cp.n_threads = opt.threads; /* 0: CONFSMOE_NUM_THREADS, else 1 */
    confsmoe_status st0 = confsmoe_ctx_create(&cp, &ctx);
    if (st0 != CONFSMOE_OK)
        die_system("confsmoe_ctx_create failed: %s", confsmoe_status_string(st0));
    int64_t *features = xmalloc((size_t)M * sizeof *features), *tokens = xmalloc((size_t)M * sizeof *tokens);
    for (int m = 0; m < M; m++) {
        features[m] = ds.views[m].features;
        tokens[m] = ds.views[m].tokens;
    }
    confsmoe_model_params mp;
    confsmoe_model_params_init(&mp);
    mp.n_modalities = M;
    mp.features = features;
    mp.modality_tokens = tokens;
    mp.d = opt.d;
    mp.heads = opt.heads;
    mp.n_experts = opt.experts;
    mp.k = opt.k;
    mp.expert_hidden = opt.hidden;
    mp.n_classes = C;
    mp.gate = opt.gate;
    mp.load_loss = opt.load_loss;
    mp.load_loss_weight = (float)opt.load_weight;
    mp.router_grad = opt.router_grad;
    mp.noisy = opt.noisy;
    mp.imputation = opt.imputation;
    mp.draws = opt.draws;
    mp.predict_pool_mean = opt.eval_fill;
    mp.writeback = opt.writeback;
    mp.modality_dropout = (float)opt.modality_dropout;
    mp.dropout = (float)opt.dropout;
    confsmoe_model *model = NULL;
    CHECK(confsmoe_model_create(ctx, &mp, &model));
    free(features);
    free(tokens);
    confsmoe_gate *gate = confsmoe_model_gate(model);
    const int E = confsmoe_gate_n_experts(gate);
    distributed_attach(&dist, model);

    /* Stage-1 pools: the standardised training rows in which each modality is present. */
    for (int m = 0; m < M; m++) {
        const size_t w = (size_t)(ds.views[m].tokens * ds.views[m].features);
        int rows = 0;
        for (int t = 0; t < plan.count[ROLE_TRAIN]; t++)
            rows += plan.mask[(size_t)plan.list[ROLE_TRAIN][t] * M + m];
        float *pool = xcalloc((size_t)(rows ? rows : 1) * w, sizeof *pool);
        if (rows == 0 && lead)
            warn("%s is present in no training sample: its pool is one row of zeros (the train mean)",
                 ds.views[m].name);
        int r = 0;
        for (int t = 0; t < plan.count[ROLE_TRAIN]; t++) {
            const int i = plan.list[ROLE_TRAIN][t];
            if (plan.mask[(size_t)i * M + m])
                memcpy(pool + (size_t)r++ * w, ds.views[m].x + (size_t)i * w, w * sizeof *pool);
        }
        const int64_t dims[3] = {rows ? rows : 1, ds.views[m].tokens, ds.views[m].features};
        confsmoe_tensor *tp = NULL;
        CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 3, dims, pool, &tp));
        CHECK(confsmoe_model_set_pool(model, m, tp));
        confsmoe_tensor_destroy(tp);
        free(pool);
    }

    /* Adam over every parameter. */
    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.kind = CONFSMOE_OPTIM_ADAM;
    op.lr = (float)opt.lr;
    op.weight_decay = (float)opt.weight_decay;
    confsmoe_optim *optim = NULL;
    CHECK(confsmoe_optim_create(ctx, &op, &optim));
    const int32_t n_params = confsmoe_model_n_params(model);
    int64_t n_weights = 0;
    for (int32_t i = 0; i < n_params; i++) {
        CHECK(confsmoe_optim_add(optim, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)));
        n_weights += confsmoe_tensor_numel(confsmoe_model_param(model, i));
    }
    if (opt.resume) {
        confsmoe_status s = confsmoe_checkpoint_load(model, optim, opt.resume);
        if (s == CONFSMOE_E_IO || s == CONFSMOE_E_FORMAT)
            die_input(NULL, 0, "--resume: %s", confsmoe_ctx_last_error(ctx)); /* names the file */
        if (s != CONFSMOE_OK)
            die_library(ctx, "confsmoe_checkpoint_load", s);
    }

    epoch_record *history = xcalloc((size_t)opt.epochs + 1, sizeof *history);
    run_report rep = {.opt = &opt, .ds = &ds, .plan = &plan, .n_params = n_weights, .history = history,
                      .ranks = dist.size};
    if (!opt.quiet)
        report_header(&rep);

    const int n_train = plan.count[ROLE_TRAIN], n_val = plan.count[ROLE_VAL];
    batch_buffers bb;
    batch_init(&bb, &ds, plan.mask, opt.batch > 256 ? opt.batch : 256);
    int *order = xmalloc((size_t)n_train * sizeof *order);
    memcpy(order, plan.list[ROLE_TRAIN], (size_t)n_train * sizeof *order);
    rng64 shuffle_rng = rng_stream(opt.seed, 4);
    int32_t *pred = xmalloc((size_t)bb.cap * sizeof *pred);
    uint8_t *global_avail = xmalloc((size_t)bb.cap * (size_t)M);

    /* Model selection: the best validation accuracy (the earliest on ties). Epoch 0, the
     * initial or resumed model, is a candidate only with --resume or --epochs 0. */
    param_copy best = {0};
    double best_acc = -1.0;
    int best_epoch = -1;
    if (opt.resume || opt.epochs == 0) {
        const eval_metrics v = evaluate(ctx, model, &bb, plan.list[ROLE_VAL], n_val);
        best_acc = n_val ? v.accuracy : -1.0;
        best_epoch = 0;
        params_snapshot(ctx, model, &best);
        if (!opt.quiet)
            printf("epoch %*d/%d  val acc %5.1f%%  val F1 %.4f  (%s model)\n", opt.epochs >= 100 ? 3 : 2, 0,
                   opt.epochs, 100.0 * v.accuracy, v.macro_f1, opt.resume ? "resumed" : "initial");
    }

    double epoch_seconds_total = 0.0;
    for (int epoch = 1; epoch <= opt.epochs; epoch++) {
        const double t0 = now_seconds();
        rng_shuffle(&shuffle_rng, order, (size_t)n_train);
        confsmoe_gate_stats_reset(gate);
        double loss_sum = 0.0, task_sum = 0.0;
        int64_t correct = 0;
        for (int at = 0; at < n_train; at += opt.batch) {
            /* The global batch order[at .. at + nb - 1]; this rank's shard of it. */
            const int nb = n_train - at < opt.batch ? n_train - at : opt.batch;
            int first, count;
            distributed_shard(&dist, nb, &first, &count);
            batch_mask(plan.mask, M, order + at, nb, global_avail);
            const int64_t gd[2] = {nb, M};
            confsmoe_tensor *ga = NULL;
            CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 2, gd, global_avail, &ga));
            batch_tensors t;
            batch_gather(ctx, &bb, order + at + first, count, &t);
            float loss = 0.0f, task = 0.0f;
            confsmoe_model_zero_grad(model);
            CHECK(distributed_step(&dist, model, (const confsmoe_tensor *const *)t.x, t.avail, t.label, ga, first,
                                   t.logits, &loss, &task));
            CHECK(confsmoe_optim_step(optim));
            if (!isfinite(loss))
                die_system("epoch %d: the loss is %g (diverged); try a smaller --lr", epoch, (double)loss);
            loss_sum += (double)loss * nb;
            task_sum += (double)task * nb;
            metric_softmax_argmax(bb.logits, count, C, pred);
            for (int r = 0; r < count; r++)
                correct += pred[r] == bb.label[r];
            batch_release(&t);
            confsmoe_tensor_destroy(ga);
        }
        distributed_sum(&dist, &correct, 1);
        const double t_train = now_seconds() - t0;
        confsmoe_gate_stats gs;
        memset(&gs, 0, sizeof gs);
        gs.struct_size = sizeof gs;
        CHECK(distributed_gate_stats(&dist, gate, CONFSMOE_STATS_TOTAL, &gs));

        epoch_record *e = &history[rep.n_history++];
        e->epoch = epoch;
        e->loss = loss_sum / n_train;
        e->task_loss = task_sum / n_train;
        e->train_accuracy = (double)correct / n_train;
        e->load_entropy = gs.load_entropy;
        e->load_cv2 = gs.load_cv2;
        e->max_load_fraction = gs.max_load_fraction;
        e->conf_loss = opt.gate == CONFSMOE_MODEL_GATE_CONFIDENCE ? gs.conf_loss : NAN;
        e->samples_per_second = n_train / (t_train > 1e-9 ? t_train : 1e-9);
        e->val = evaluate(ctx, model, &bb, plan.list[ROLE_VAL], n_val);
        const int improved = n_val ? e->val.accuracy > best_acc : 1;
        if (improved) {
            best_acc = n_val ? e->val.accuracy : -1.0;
            best_epoch = epoch;
            params_snapshot(ctx, model, &best);
            if (opt.checkpoint)
                CHECK(confsmoe_checkpoint_save(model, optim, opt.checkpoint));
        }
        e->seconds = now_seconds() - t0;
        epoch_seconds_total += e->seconds;
        if (!opt.quiet)
            report_epoch(e, opt.epochs, epoch_seconds_total / epoch * (opt.epochs - epoch));
    }

    /* The selected model on the test split, once; its routing is the reported utilisation.
     * Every rank evaluates every sample (the ctx streams stay together), so the local
     * statistics are the whole test set's. */
    params_restore(ctx, model, &best);
    if (opt.checkpoint && best_epoch == 0) /* the initial / resumed model, with the latest Adam state */
        CHECK(confsmoe_checkpoint_save(model, optim, opt.checkpoint));
    confsmoe_gate_stats_reset(gate);
    rep.test = evaluate(ctx, model, &bb, plan.list[ROLE_TEST], plan.count[ROLE_TEST]);
    rep.best_epoch = best_epoch;
    expert_usage *u = &rep.experts;
    u->n_experts = E;
    u->slots = xcalloc((size_t)E, sizeof *u->slots);
    u->mean_confidence = xcalloc((size_t)E, sizeof *u->mean_confidence);
    confsmoe_gate_stats gs;
    read_stats(ctx, gate, &gs, u->slots, u->mean_confidence, E);
    u->tokens = gs.tokens;
    u->load_entropy = gs.load_entropy;
    u->load_cv2 = gs.load_cv2;
    u->max_load_fraction = gs.max_load_fraction;
    rep.seconds = now_seconds() - t_start;
    if (lead)
        report_final(&rep);
    if (opt.json)
        report_json(&rep, opt.json);

    free(u->slots);
    free(u->mean_confidence);
    params_free(&best);
    free(pred);
    free(global_avail);
    free(order);
    batch_free(&bb);
    free(history);
    confsmoe_optim_destroy(optim);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    protocol_free(&plan);
    dataset_free(&ds);
    distributed_finish(&dist);
    return 0;
}
