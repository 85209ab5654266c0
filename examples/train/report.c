/* Progress lines and the JSON report. */
#include "report.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <confsmoe.h>

#include "util.h"

/* ------------------------------------------------------------------ progress */

static void format_duration(double s, char *buf, size_t cap)
{
    if (!(s >= 0.0) || s > 1e8) {
        snprintf(buf, cap, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, cap, "%ld:%02ld", t / 60, t % 60);
}

static double pct(double v) { return 100.0 * v; }

void report_header(const run_report *r)
{
    const options *o = r->opt;
    const dataset *ds = r->ds;
    const split_plan *p = r->plan;
    printf("confsmoe-train: libconfsmoe %s, data %s\n", confsmoe_version_string(), ds->dir);
    printf("  %d samples, %d classes, %d modalities ", ds->n, ds->n_classes, ds->m);
    if (ds->tokens > 0)
        printf("(S = %" PRId64 " token%s):", ds->tokens, ds->tokens == 1 ? "" : "s");
    else
        printf("(S per view, [S x F]):");
    /* [F] for a vector view, [S x F] for a sequence of S tokens. */
    for (int m = 0; m < ds->m; m++) {
        if (ds->views[m].tokens > 1)
            printf(" %s[%" PRId64 " x %" PRId64 "]", ds->views[m].name, ds->views[m].tokens, ds->views[m].features);
        else
            printf(" %s[%" PRId64 "]", ds->views[m].name, ds->views[m].features);
    }
    printf("\n");
    printf("  split: %d train / %d val / %d test (%s)", p->count[ROLE_TRAIN], p->count[ROLE_VAL],
           p->count[ROLE_TEST], ds->split_name ? ds->split_name : "seeded stratified 80/20");
    if (p->n_excluded)
        printf(", %d excluded (no modality present)", p->n_excluded);
    printf("\n");
    printf("  missing rate %g: missing cells train %.1f%%, val %.1f%%, test %.1f%% (natural: %" PRId64 " cells)\n",
           o->missing, pct((double)p->missing[ROLE_TRAIN] / ((double)p->count[ROLE_TRAIN] * ds->m + 1e-300)),
           p->count[ROLE_VAL] ? pct((double)p->missing[ROLE_VAL] / ((double)p->count[ROLE_VAL] * ds->m)) : 0.0,
           pct((double)p->missing[ROLE_TEST] / ((double)p->count[ROLE_TEST] * ds->m + 1e-300)),
           ds->natural_missing);
    printf("  model: gate %s, load loss %s, imputation %s (evaluation: %s%s%s), d %d, heads %d, E %d, k %d, "
           "hidden %d, dropout %g, %" PRId64 " parameters\n",
           GATE_NAMES[o->gate], LOAD_LOSS_NAMES[o->load_loss], IMPUTATION_NAMES[o->imputation],
           o->imputation == CONFSMOE_IMPUTE_MEAN ? "pool mean" : EVAL_FILL_NAMES[o->eval_fill],
           o->imputation == CONFSMOE_IMPUTE_MEAN ? "" : "; write-back ",
           o->imputation == CONFSMOE_IMPUTE_MEAN ? "" : WRITEBACK_NAMES[o->writeback], o->d, o->heads,
           o->experts, o->k, o->hidden ? o->hidden : o->d, o->dropout, r->n_params);
    printf("  training: Adam lr %g, weight decay %g, batch %d, %d epochs, modality dropout %g, seed %" PRIu64 "\n",
           o->lr, o->weight_decay, o->batch, o->epochs, o->modality_dropout, o->seed);
    if (r->ranks > 1)
        printf("  data parallel: %d MPI ranks, each batch split evenly, gradients summed (libconfsmoe_mpi)\n",
               r->ranks);
    fflush(stdout);
}

void report_epoch(const epoch_record *e, int epochs, double eta_seconds)
{
    char eta[32], acc[16], f1[16];
    format_duration(eta_seconds, eta, sizeof eta);
    if (isnan(e->val.accuracy))
        snprintf(acc, sizeof acc, "    -");
    else
        snprintf(acc, sizeof acc, "%5.1f%%", pct(e->val.accuracy));
    if (isnan(e->val.macro_f1))
        snprintf(f1, sizeof f1, "     -");
    else
        snprintf(f1, sizeof f1, "%.4f", e->val.macro_f1);
    printf("epoch %*d/%d  loss %.4f (task %.4f)  train acc %5.1f%%  val acc %s  val F1 %s  "
           "%6.0f samples/s  %5.1fs  ETA %s\n",
           epochs >= 100 ? 3 : 2, e->epoch, epochs, e->loss, e->task_loss, pct(e->train_accuracy), acc, f1,
           e->samples_per_second, e->seconds, eta);
    fflush(stdout);
}

void report_final(const run_report *r)
{
    const expert_usage *u = &r->experts;
    printf("test: accuracy %.2f%%  macro-F1 %.4f  macro-AUROC %.4f  (%d samples, best epoch %d)\n",
           pct(r->test.accuracy), r->test.macro_f1, r->test.macro_auroc, r->plan->count[ROLE_TEST], r->best_epoch);
    fflush(stdout);
    int64_t total = 0;
    for (int e = 0; e < u->n_experts; e++)
        total += u->slots[e];
    printf("experts (test routing, %% of %" PRId64 " slots):", total);
    for (int e = 0; e < u->n_experts; e++)
        printf(" %.1f", total ? pct((double)u->slots[e] / (double)total) : 0.0);
    printf("\n");
    printf("expert load: entropy %.4f  CV^2 %.4f  max-load fraction %.4f\n", u->load_entropy, u->load_cv2,
           u->max_load_fraction);
    int any_conf = 0;
    for (int e = 0; e < u->n_experts; e++)
        any_conf |= !isnan(u->mean_confidence[e]);
    if (any_conf) {
        printf("mean confidence per expert:");
        for (int e = 0; e < u->n_experts; e++)
            if (isnan(u->mean_confidence[e]))
                printf(" -");
            else
                printf(" %.3f", u->mean_confidence[e]);
        printf("\n");
    }
    printf("total time %.1fs\n", r->seconds);
    fflush(stdout);
}

/* ------------------------------------------------------------------ JSON */

enum { JSON_MAX_DEPTH = 16 };

typedef struct {
    FILE *f;
    int depth;
    int count[JSON_MAX_DEPTH];   /* values written at each level */
    int inline_[JSON_MAX_DEPTH]; /* 1: elements on one line */
} json_writer;

static void json_string_body(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (*p < 0x20)
                fprintf(f, "\\u%04x", *p);
            else
                fputc(*p, f);
        }
    }
    fputc('"', f);
}

/* The separator, indentation and key before a value. */
static void json_prefix(json_writer *w, const char *key)
{
    if (w->depth > 0) {
        const int before = w->count[w->depth]++;
        if (before)
            fputs(w->inline_[w->depth] ? ", " : ",", w->f);
        if (!w->inline_[w->depth])
            fprintf(w->f, "\n%*s", 2 * w->depth, "");
    }
    if (key) {
        json_string_body(w->f, key);
        fputs(": ", w->f);
    }
}

static void json_open(json_writer *w, const char *key, char bracket, int inline_)
{
    json_prefix(w, key);
    fputc(bracket, w->f);
    w->depth++;
    w->count[w->depth] = 0;
    w->inline_[w->depth] = inline_ || (w->depth > 1 && w->inline_[w->depth - 1]);
}

static void json_close(json_writer *w, char bracket)
{
    const int had = w->count[w->depth], was_inline = w->inline_[w->depth];
    w->depth--;
    if (had && !was_inline)
        fprintf(w->f, "\n%*s", 2 * w->depth, "");
    fputc(bracket, w->f);
}

static void json_num(json_writer *w, const char *key, double v)
{
    json_prefix(w, key);
    if (isfinite(v))
        fprintf(w->f, "%.10g", v);
    else
        fputs("null", w->f);
}

static void json_int(json_writer *w, const char *key, int64_t v)
{
    json_prefix(w, key);
    fprintf(w->f, "%" PRId64, v);
}

static void json_str(json_writer *w, const char *key, const char *s)
{
    json_prefix(w, key);
    if (s)
        json_string_body(w->f, s);
    else
        fputs("null", w->f);
}

static void json_bool(json_writer *w, const char *key, int v)
{
    json_prefix(w, key);
    fputs(v ? "true" : "false", w->f);
}

static void json_metrics(json_writer *w, const char *key, const eval_metrics *m)
{
    json_open(w, key, '{', 1);
    json_num(w, "accuracy", m->accuracy);
    json_num(w, "macro_f1", m->macro_f1);
    json_num(w, "macro_auroc", m->macro_auroc);
    json_close(w, '}');
}

static void json_config(json_writer *w, const options *o)
{
    json_open(w, "config", '{', 0);
    json_str(w, "gate", GATE_NAMES[o->gate]);
    json_str(w, "load_loss", LOAD_LOSS_NAMES[o->load_loss]);
    json_num(w, "load_weight", o->load_weight);
    json_str(w, "imputation", IMPUTATION_NAMES[o->imputation]);
    json_int(w, "draws", o->draws);
    json_str(w, "eval_fill", EVAL_FILL_NAMES[o->eval_fill]);
    json_str(w, "writeback", WRITEBACK_NAMES[o->writeback]);
    json_num(w, "modality_dropout", o->modality_dropout);
    json_num(w, "weight_decay", o->weight_decay);
    json_str(w, "router_grad", ROUTER_GRAD_NAMES[o->router_grad]);
    json_bool(w, "noisy", o->noisy);
    json_int(w, "experts", o->experts);
    json_int(w, "k", o->k);
    json_int(w, "d", o->d);
    json_int(w, "heads", o->heads);
    json_int(w, "hidden", o->hidden ? o->hidden : o->d);
    json_num(w, "dropout", o->dropout);
    json_int(w, "epochs", o->epochs);
    json_int(w, "batch", o->batch);
    json_num(w, "lr", o->lr);
    json_num(w, "missing", o->missing);
    json_num(w, "val", o->val);
    json_int(w, "seed", (int64_t)o->seed);
    if (o->threads > 0)
        json_int(w, "threads", o->threads);
    else
        json_str(w, "threads", NULL);
    json_bool(w, "paper", o->paper);
    json_str(w, "checkpoint", o->checkpoint);
    json_str(w, "resume", o->resume);
    json_close(w, '}');
}

void report_json(const run_report *r, const char *path)
{
    const options *o = r->opt;
    const dataset *ds = r->ds;
    const split_plan *p = r->plan;
    FILE *f = fopen(path, "w");
    if (!f)
        die_input(path, 0, "cannot write the JSON report: %s", strerror(errno));
    json_writer w = {.f = f};
    json_open(&w, NULL, '{', 0);
    json_str(&w, "dataset", ds->dir);
    json_str(&w, "library_version", confsmoe_version_string());
    json_config(&w, o);
    json_int(&w, "seed", (int64_t)o->seed);
    json_int(&w, "ranks", r->ranks);
    json_num(&w, "missing", o->missing);
    json_int(&w, "n_samples", ds->n);
    json_int(&w, "n_classes", ds->n_classes);
    json_int(&w, "n_modalities", ds->m);
    json_int(&w, "tokens", ds->tokens);
    json_open(&w, "modalities", '[', 0);
    for (int m = 0; m < ds->m; m++) {
        json_open(&w, NULL, '{', 1);
        json_str(&w, "file", ds->views[m].name);
        json_int(&w, "features", ds->views[m].features);
        json_int(&w, "tokens", ds->views[m].tokens);
        json_close(&w, '}');
    }
    json_close(&w, ']');
    json_str(&w, "split", ds->split_name ? ds->split_name : "stratified-80-20");
    json_int(&w, "n_train", p->count[ROLE_TRAIN]);
    json_int(&w, "n_val", p->count[ROLE_VAL]);
    json_int(&w, "n_test", p->count[ROLE_TEST]);
    json_int(&w, "n_excluded", p->n_excluded);
    json_open(&w, "missing_cells", '{', 0);
    json_int(&w, "natural", ds->natural_missing);
    json_int(&w, "nan_filled", ds->nan_cells);
    json_int(&w, "train", p->missing[ROLE_TRAIN]);
    json_int(&w, "val", p->missing[ROLE_VAL]);
    json_int(&w, "test", p->missing[ROLE_TEST]);
    json_int(&w, "protocol_dropped_train", p->dropped[ROLE_TRAIN]);
    json_int(&w, "protocol_dropped_val", p->dropped[ROLE_VAL]);
    json_int(&w, "protocol_dropped_test", p->dropped[ROLE_TEST]);
    json_close(&w, '}');
    json_int(&w, "n_params", r->n_params);
    json_metrics(&w, "test", &r->test);
    json_int(&w, "best_epoch", r->best_epoch);
    json_open(&w, "history", '[', 0);
    for (int i = 0; i < r->n_history; i++) {
        const epoch_record *e = &r->history[i];
        json_open(&w, NULL, '{', 1);
        json_int(&w, "epoch", e->epoch);
        json_num(&w, "loss", e->loss);
        json_num(&w, "task_loss", e->task_loss);
        json_num(&w, "train_accuracy", e->train_accuracy);
        json_num(&w, "val_accuracy", e->val.accuracy);
        json_num(&w, "val_macro_f1", e->val.macro_f1);
        json_num(&w, "val_macro_auroc", e->val.macro_auroc);
        json_num(&w, "load_entropy", e->load_entropy);
        json_num(&w, "load_cv2", e->load_cv2);
        json_num(&w, "max_load_fraction", e->max_load_fraction);
        json_num(&w, "conf_loss", e->conf_loss);
        json_num(&w, "seconds", e->seconds);
        json_num(&w, "samples_per_second", e->samples_per_second);
        json_close(&w, '}');
    }
    json_close(&w, ']');
    const expert_usage *u = &r->experts;
    int64_t total = 0;
    for (int e = 0; e < u->n_experts; e++)
        total += u->slots[e];
    json_open(&w, "experts", '{', 0);
    json_str(&w, "scope", "test");
    json_int(&w, "tokens", u->tokens);
    json_open(&w, "load", '[', 1);
    for (int e = 0; e < u->n_experts; e++)
        json_num(&w, NULL, total ? (double)u->slots[e] / (double)total : NAN);
    json_close(&w, ']');
    json_open(&w, "slots", '[', 1);
    for (int e = 0; e < u->n_experts; e++)
        json_int(&w, NULL, u->slots[e]);
    json_close(&w, ']');
    json_num(&w, "load_entropy", u->load_entropy);
    json_num(&w, "load_cv2", u->load_cv2);
    json_num(&w, "max_load_fraction", u->max_load_fraction);
    json_open(&w, "mean_confidence", '[', 1);
    for (int e = 0; e < u->n_experts; e++)
        json_num(&w, NULL, u->mean_confidence[e]);
    json_close(&w, ']');
    json_close(&w, '}');
    json_num(&w, "seconds", r->seconds);
    json_close(&w, '}');
    fputc('\n', f);
    if (ferror(f) | (fclose(f) != 0))
        die_input(path, 0, "cannot write the JSON report: %s", strerror(errno));
}
