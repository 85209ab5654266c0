/*
 * confsmoe-gate-dynamics: how routing evolves under the softmax gate and the
 * confidence gate, in numbers.
 *
 * Conf-SMoE (docs/MODEL.md, section 4) argues that with softmax gating the router
 * gradient concentrates on the dominant expert, that a load-balancing loss
 * pushes against it, and that routing then oscillates or collapses, while the
 * confidence gate does not. This example trains the same small model with
 * several gates on real data and reports, per epoch, the load balance of the
 * training routing and how often the top-1 expert of fixed test tokens changes.
 *
 * Task: UCI handwritten digits (Multiple Features), one view (default the 76
 * Fourier coefficients), the fixed 1600/400 train/test split, 10 classes.
 * Features are standardised with train-split statistics.
 *
 * Model, per variant:
 *   z      = W_enc x + b_enc            host-side linear encoder F -> d (learned;
 *                                       --fixed-encoder keeps its random init)
 *   y      = gate(z)                    libconfsmoe: E = 8 experts (d -> h -> d), top-k = 2
 *   logits = W_head y + b_head          host-side linear head d -> 10
 *   L      = CE(logits, label) + the gate's own loss (confidence and/or load loss, dloss = 1)
 * The encoder and head are plain loops here; their parameters are confsmoe
 * tensors so that one confsmoe_optim (Adam) updates everything.
 *
 * Every variant starts from the same seed: the same experts, router, encoder,
 * head and batch order. Only the gate's options differ.
 *
 * Usage: confsmoe-gate-dynamics [--epochs N] [--seed S] [--data DIR]
 *                               [--view FILE] [--fixed-encoder] [--noisy] [--load-weight W]
 *                               [--lr LR]
 */
#include <confsmoe.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Relative to the working directory: the repository's copy when run from its root. An
 * installed program must not point into a source tree, so no absolute path is compiled in. */
#define DEFAULT_DATA_DIR "data/handwritten"

#define PROG "confsmoe-gate-dynamics"

enum {
    D = 32,          /* token width */
    HIDDEN = 32,     /* expert hidden width */
    N_EXPERTS = 8,
    TOP_K = 2,
    N_CLASSES = 10,
    BATCH = 64,
    N_PROBES = 8,
    MAX_EPOCHS = 10000,
};

#define CHECK(ctx, call)                                                                            \
    do {                                                                                            \
        confsmoe_status s_ = (call);                                                                \
        if (s_ != CONFSMOE_OK) {                                                                    \
            fprintf(stderr, PROG ": %s failed: %s (%s)\n", #call, confsmoe_status_string(s_),       \
                    confsmoe_ctx_last_error(ctx));                                                  \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, PROG ": out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------ host RNG (splitmix64) */

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [-a, a). */
static float rng_uniform(uint64_t *s, float a)
{
    return (float)((double)(rng_next(s) >> 11) / 9007199254740992.0 * 2.0 - 1.0) * a;
}

static void shuffle(int *v, int n, uint64_t *s)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(rng_next(s) % (uint64_t)(i + 1));
        int t = v[i];
        v[i] = v[j];
        v[j] = t;
    }
}

/* ------------------------------------------------------------------ data */

/* A numeric CSV without header: rows x cols floats. Exits with a one-line error on failure. */
static float *read_csv(const char *dir, const char *file, int *rows, int *cols)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr,
                PROG ": cannot open data file %s: %s (set the folder with --data DIR; the default "
                     DEFAULT_DATA_DIR " is relative to the working directory)\n",
                path, strerror(errno));
        exit(1);
    }
    size_t cap = 1 << 16, len = 0;
    float *v = xmalloc(cap * sizeof *v);
    char *line = NULL;
    size_t line_cap = 0;
    int r = 0, c = -1;
    while (getline(&line, &line_cap, f) != -1) {
        if (line[0] == '\n' || line[0] == '\0')
            continue;
        int n = 0;
        char *p = line;
        for (;;) {
            char *end;
            errno = 0;
            float x = strtof(p, &end);
            if (end == p || errno == ERANGE) {
                fprintf(stderr, PROG ": %s line %d: not a number at column %d\n", path, r + 1, n + 1);
                exit(1);
            }
            if (len == cap) {
                cap *= 2;
                float *grown = realloc(v, cap * sizeof *v);
                if (!grown) {
                    fprintf(stderr, PROG ": out of memory reading %s\n", path);
                    exit(1);
                }
                v = grown;
            }
            v[len++] = x;
            n++;
            while (*end == ' ' || *end == '\t' || *end == '\r')
                end++;
            if (*end == ',') {
                p = end + 1;
                continue;
            }
            if (*end == '\n' || *end == '\0')
                break;
            fprintf(stderr, PROG ": %s line %d: unexpected character '%c'\n", path, r + 1, *end);
            exit(1);
        }
        if (c >= 0 && n != c) {
            fprintf(stderr, PROG ": %s line %d has %d columns, expected %d\n", path, r + 1, n, c);
            exit(1);
        }
        c = n;
        r++;
    }
    free(line);
    fclose(f);
    if (r == 0) {
        fprintf(stderr, PROG ": %s is empty\n", path);
        exit(1);
    }
    *rows = r;
    *cols = c;
    return v;
}

typedef struct {
    int n, f;            /* samples, features */
    float *x;            /* [n, f] standardised */
    int32_t *label;      /* [n] */
    int *train, *test;   /* sample indices */
    int n_train, n_test;
} dataset;

static void load_data(const char *dir, const char *view, dataset *ds)
{
    int rows, cols, lr, lc, sr, sc;
    float *x = read_csv(dir, view, &rows, &cols);
    float *labels = read_csv(dir, "labels.csv", &lr, &lc);
    float *split = read_csv(dir, "split_tmc.csv", &sr, &sc);
    if (lr != rows || sr != rows || lc != 1 || sc != 1) {
        fprintf(stderr, PROG ": %s/%s has %d rows, labels.csv %d x %d, split_tmc.csv %d x %d: they must agree\n",
                dir, view, rows, lr, lc, sr, sc);
        exit(1);
    }
    ds->n = rows;
    ds->f = cols;
    ds->x = x;
    ds->label = xmalloc((size_t)rows * sizeof *ds->label);
    ds->train = xmalloc((size_t)rows * sizeof *ds->train);
    ds->test = xmalloc((size_t)rows * sizeof *ds->test);
    ds->n_train = ds->n_test = 0;
    for (int i = 0; i < rows; i++) {
        int lab = (int)labels[i];
        if ((float)lab != labels[i] || lab < 0 || lab >= N_CLASSES) {
            fprintf(stderr, PROG ": labels.csv row %d: %g is not a class in 0..%d\n", i + 1, (double)labels[i],
                    N_CLASSES - 1);
            exit(1);
        }
        ds->label[i] = lab;
        if (split[i] == 0.0f)
            ds->train[ds->n_train++] = i;
        else
            ds->test[ds->n_test++] = i;
    }
    free(labels);
    free(split);
    if (ds->n_train < BATCH || ds->n_test < N_PROBES) {
        fprintf(stderr, PROG ": split has %d train / %d test samples, too few\n", ds->n_train, ds->n_test);
        exit(1);
    }
    /* Standardise every feature with the mean and standard deviation of the training split. */
    for (int j = 0; j < cols; j++) {
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < ds->n_train; i++)
            mean += x[(size_t)ds->train[i] * cols + j];
        mean /= ds->n_train;
        for (int i = 0; i < ds->n_train; i++) {
            double dv = x[(size_t)ds->train[i] * cols + j] - mean;
            var += dv * dv;
        }
        double sd = sqrt(var / ds->n_train);
        if (sd < 1e-8)
            sd = 1.0;
        for (int i = 0; i < rows; i++)
            x[(size_t)i * cols + j] = (float)((x[(size_t)i * cols + j] - mean) / sd);
    }
}

/* ------------------------------------------------------------------ variants */

typedef struct {
    const char *name;
    const char *what;
    int32_t combine, load_loss, router_grad;
} variant;

/* router_grad only applies to CONFIDENCE: under ROUTER_SOFTMAX the task loss always trains the router. */
static const variant VARIANTS[] = {
    {"softmax", "softmax gate, router trained by the task loss, no load loss", CONFSMOE_COMBINE_ROUTER_SOFTMAX,
     CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN},
    {"softmax+entropy", "softmax gate + entropy load loss 1/H(mean gate)", CONFSMOE_COMBINE_ROUTER_SOFTMAX,
     CONFSMOE_LOAD_LOSS_ENTROPY, CONFSMOE_ROUTER_GRAD_FROZEN},
    {"softmax+cv", "softmax gate + Shazeer load loss CV^2(importance) + CV^2(load)", CONFSMOE_COMBINE_ROUTER_SOFTMAX,
     CONFSMOE_LOAD_LOSS_CV, CONFSMOE_ROUTER_GRAD_FROZEN},
    {"conf-frozen", "confidence gate, router FROZEN at its init (the paper's reference)", CONFSMOE_COMBINE_CONFIDENCE,
     CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_FROZEN},
    {"conf-score", "confidence gate, router trained by the SCORE term", CONFSMOE_COMBINE_CONFIDENCE,
     CONFSMOE_LOAD_LOSS_NONE, CONFSMOE_ROUTER_GRAD_SCORE},
};
#define N_VARIANTS ((int)(sizeof VARIANTS / sizeof VARIANTS[0]))

typedef struct {
    int epochs;
    uint64_t seed;
    int fixed_encoder, noisy;
    float load_weight, lr;
} options;

/* One model: encoder -> gate -> head, with its own ctx (same seed for every variant). */
typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[N_EXPERTS];
    confsmoe_gate *gate;
    confsmoe_optim *optim;
    confsmoe_tensor *enc_w, *enc_b, *enc_dw, *enc_db;    /* [D, F], [D] */
    confsmoe_tensor *head_w, *head_b, *head_dw, *head_db; /* [C, D], [C] */
    int router_param;                                     /* index of "router.w" */
    float *router_init;                                   /* [D * E] copy at create */
    int f;
} model;

static confsmoe_tensor *new_tensor(confsmoe_ctx *ctx, int64_t d0, int64_t d1)
{
    const int64_t dims[2] = {d0, d1};
    confsmoe_tensor *t = NULL;
    CHECK(ctx, confsmoe_tensor_create(ctx, CONFSMOE_F32, d1 > 0 ? 2 : 1, dims, &t));
    return t;
}

static float *f32(confsmoe_tensor *t) { return confsmoe_tensor_data(t); }

static void model_create(model *m, const variant *v, const options *opt, int f)
{
    memset(m, 0, sizeof *m);
    m->f = f;
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = opt->seed;
    confsmoe_status st = confsmoe_ctx_create(&cp, &m->ctx);
    if (st != CONFSMOE_OK) {
        fprintf(stderr, PROG ": confsmoe_ctx_create failed: %s\n", confsmoe_status_string(st));
        exit(1);
    }
    confsmoe_ctx *ctx = m->ctx;
    for (int e = 0; e < N_EXPERTS; e++)
        CHECK(ctx, confsmoe_expert_create(ctx, D, HIDDEN, &m->experts[e]));

    confsmoe_gate_params gp;
    confsmoe_gate_params_init(&gp);
    gp.d = D;
    gp.k = TOP_K;
    gp.router = CONFSMOE_ROUTER_SOFTMAX;
    gp.noisy = opt->noisy;
    gp.combine = v->combine;
    gp.n_classes = N_CLASSES;
    gp.router_grad = v->router_grad;
    gp.load_loss = v->load_loss;
    gp.load_loss_weight = v->load_loss == CONFSMOE_LOAD_LOSS_NONE ? 0.0f : opt->load_weight;
    CHECK(ctx, confsmoe_gate_create(ctx, &gp, m->experts, N_EXPERTS, &m->gate));

    /* Host layers, initialised like nn.Linear from a host RNG with the same seed in every variant. */
    uint64_t rng = opt->seed ^ 0x5DEECE66Dull;
    m->enc_w = new_tensor(ctx, D, f);
    m->enc_b = new_tensor(ctx, D, 0);
    m->enc_dw = new_tensor(ctx, D, f);
    m->enc_db = new_tensor(ctx, D, 0);
    m->head_w = new_tensor(ctx, N_CLASSES, D);
    m->head_b = new_tensor(ctx, N_CLASSES, 0);
    m->head_dw = new_tensor(ctx, N_CLASSES, D);
    m->head_db = new_tensor(ctx, N_CLASSES, 0);
    const float a_enc = 1.0f / sqrtf((float)f), a_head = 1.0f / sqrtf((float)D);
    for (int i = 0; i < D * f; i++)
        f32(m->enc_w)[i] = rng_uniform(&rng, a_enc);
    for (int i = 0; i < D; i++)
        f32(m->enc_b)[i] = rng_uniform(&rng, a_enc);
    for (int i = 0; i < N_CLASSES * D; i++)
        f32(m->head_w)[i] = rng_uniform(&rng, a_head);
    for (int i = 0; i < N_CLASSES; i++)
        f32(m->head_b)[i] = rng_uniform(&rng, a_head);

    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.lr = opt->lr;
    CHECK(ctx, confsmoe_optim_create(ctx, &op, &m->optim));
    for (int e = 0; e < N_EXPERTS; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(m->experts[e]); i++)
            CHECK(ctx, confsmoe_optim_add(m->optim, confsmoe_expert_param(m->experts[e], i),
                                          confsmoe_expert_grad(m->experts[e], i)));
    /* Every gate parameter, the router included: a FROZEN router gets a zero gradient, and
     * Adam leaves a parameter with zero gradient (and zero moments) where it is. The summary
     * checks that. */
    m->router_param = -1;
    for (int32_t i = 0; i < confsmoe_gate_n_params(m->gate); i++) {
        CHECK(ctx, confsmoe_optim_add(m->optim, confsmoe_gate_param(m->gate, i), confsmoe_gate_grad(m->gate, i)));
        if (strcmp(confsmoe_gate_param_name(m->gate, i), "router.w") == 0)
            m->router_param = i;
    }
    if (m->router_param < 0) {
        fprintf(stderr, PROG ": the gate has no parameter named router.w\n");
        exit(1);
    }
    if (!opt->fixed_encoder) {
        CHECK(ctx, confsmoe_optim_add(m->optim, m->enc_w, m->enc_dw));
        CHECK(ctx, confsmoe_optim_add(m->optim, m->enc_b, m->enc_db));
    }
    CHECK(ctx, confsmoe_optim_add(m->optim, m->head_w, m->head_dw));
    CHECK(ctx, confsmoe_optim_add(m->optim, m->head_b, m->head_db));

    confsmoe_tensor *rw = confsmoe_gate_param(m->gate, m->router_param);
    m->router_init = xmalloc(confsmoe_tensor_nbytes(rw));
    CHECK(ctx, confsmoe_tensor_copy_out(rw, m->router_init, confsmoe_tensor_nbytes(rw)));
}

static void model_destroy(model *m)
{
    confsmoe_optim_destroy(m->optim);
    confsmoe_gate_destroy(m->gate);
    for (int e = 0; e < N_EXPERTS; e++)
        confsmoe_expert_destroy(m->experts[e]);
    confsmoe_tensor *t[] = {m->enc_w, m->enc_b, m->enc_dw, m->enc_db, m->head_w, m->head_b, m->head_dw, m->head_db};
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        confsmoe_tensor_destroy(t[i]);
    free(m->router_init);
    confsmoe_ctx_destroy(m->ctx);
}

/* z [n, D] = x [n, F] W_enc^T + b_enc for the samples idx[0..n-1]. */
static void encode(const model *m, const dataset *ds, const int *idx, int n, float *z)
{
    const float *w = confsmoe_tensor_data(m->enc_w), *b = confsmoe_tensor_data(m->enc_b);
    for (int t = 0; t < n; t++) {
        const float *x = ds->x + (size_t)idx[t] * ds->f;
        for (int o = 0; o < D; o++) {
            float acc = b[o];
            for (int j = 0; j < ds->f; j++)
                acc += w[o * ds->f + j] * x[j];
            z[t * D + o] = acc;
        }
    }
}

/* logits [n, C] = y [n, D] W_head^T + b_head. */
static void head_forward(const model *m, const float *y, int n, float *logits)
{
    const float *w = confsmoe_tensor_data(m->head_w), *b = confsmoe_tensor_data(m->head_b);
    for (int t = 0; t < n; t++)
        for (int c = 0; c < N_CLASSES; c++) {
            float acc = b[c];
            for (int j = 0; j < D; j++)
                acc += w[c * D + j] * y[t * D + j];
            logits[t * N_CLASSES + c] = acc;
        }
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

/* One Adam step on a batch. Returns the batch's mean cross-entropy; adds the gate loss to *gate_loss. */
static double train_step(model *m, const dataset *ds, const int *idx, int n, int fixed_encoder, double *gate_loss)
{
    confsmoe_ctx *ctx = m->ctx;
    float z[BATCH * D], y[BATCH * D], dz[BATCH * D], logits[BATCH * N_CLASSES];
    int32_t labels[BATCH];
    for (int t = 0; t < n; t++)
        labels[t] = ds->label[idx[t]];
    encode(m, ds, idx, n, z);

    for (int e = 0; e < N_EXPERTS; e++)
        confsmoe_expert_zero_grad(m->experts[e]);
    confsmoe_gate_zero_grad(m->gate);
    confsmoe_tensor *grads[] = {m->enc_dw, m->enc_db, m->head_dw, m->head_db};
    for (size_t i = 0; i < sizeof grads / sizeof *grads; i++)
        memset(confsmoe_tensor_data(grads[i]), 0, confsmoe_tensor_nbytes(grads[i]));

    const int64_t xd[2] = {n, D}, ld[1] = {n};
    confsmoe_tensor *tz = NULL, *ty = NULL, *tl = NULL, *tdz = NULL;
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, z, &tz));
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, y, &ty));
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, ld, labels, &tl));
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, dz, &tdz));
    confsmoe_saved *saved = NULL;
    float gloss = 0.0f;
    CHECK(ctx, confsmoe_gate_forward(m->gate, tz, tl, NULL, ty, NULL, NULL, &gloss, &saved));
    *gate_loss += gloss;

    /* Softmax cross-entropy, mean over the batch; dlogits overwrites logits. */
    head_forward(m, y, n, logits);
    double ce = 0.0;
    for (int t = 0; t < n; t++) {
        float *l = logits + t * N_CLASSES;
        float mx = l[argmax(l, N_CLASSES)];
        double sum = 0.0;
        for (int c = 0; c < N_CLASSES; c++)
            sum += exp((double)(l[c] - mx));
        ce += log(sum) - (double)(l[labels[t]] - mx);
        for (int c = 0; c < N_CLASSES; c++)
            l[c] = (float)((exp((double)(l[c] - mx)) / sum - (c == labels[t] ? 1.0 : 0.0)) / n);
    }
    /* Head backward: dW += dlogits^T y, db += sum dlogits, dy = dlogits W (into y's buffer, now unused). */
    float *hw = f32(m->head_w), *hdw = f32(m->head_dw), *hdb = f32(m->head_db);
    for (int t = 0; t < n; t++)
        for (int c = 0; c < N_CLASSES; c++) {
            float g = logits[t * N_CLASSES + c];
            hdb[c] += g;
            for (int j = 0; j < D; j++)
                hdw[c * D + j] += g * y[t * D + j];
        }
    for (int t = 0; t < n; t++)
        for (int j = 0; j < D; j++) {
            float acc = 0.0f;
            for (int c = 0; c < N_CLASSES; c++)
                acc += logits[t * N_CLASSES + c] * hw[c * D + j];
            y[t * D + j] = acc;
        }
    /* The gate's loss is added to the total, so its gradient is 1. */
    CHECK(ctx, confsmoe_gate_backward(m->gate, saved, ty, NULL, 1.0f, tdz));
    confsmoe_saved_destroy(saved);

    if (!fixed_encoder) {
        float *edw = f32(m->enc_dw), *edb = f32(m->enc_db);
        for (int t = 0; t < n; t++) {
            const float *x = ds->x + (size_t)idx[t] * ds->f;
            for (int o = 0; o < D; o++) {
                float g = dz[t * D + o];
                edb[o] += g;
                for (int j = 0; j < ds->f; j++)
                    edw[o * ds->f + j] += g * x[j];
            }
        }
    }
    CHECK(ctx, confsmoe_optim_step(m->optim));
    confsmoe_tensor_destroy(tz);
    confsmoe_tensor_destroy(ty);
    confsmoe_tensor_destroy(tl);
    confsmoe_tensor_destroy(tdz);
    return ce / n;
}

/* Inference on the whole test split: accuracy, and the top-1 expert of every test token. */
static double evaluate(model *m, const dataset *ds, int32_t *top1)
{
    confsmoe_ctx *ctx = m->ctx;
    const int n = ds->n_test;
    float *z = xmalloc((size_t)n * D * sizeof *z), *y = xmalloc((size_t)n * D * sizeof *y);
    float *logits = xmalloc((size_t)n * N_CLASSES * sizeof *logits);
    int32_t *topk = xmalloc((size_t)n * TOP_K * sizeof *topk);
    encode(m, ds, ds->test, n, z);
    const int64_t xd[2] = {n, D}, kd[2] = {n, TOP_K};
    confsmoe_tensor *tz = NULL, *ty = NULL, *tk = NULL;
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, z, &tz));
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, xd, y, &ty));
    CHECK(ctx, confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 2, kd, topk, &tk));
    CHECK(ctx, confsmoe_gate_forward(m->gate, tz, NULL, NULL, ty, tk, NULL, NULL, NULL));
    head_forward(m, y, n, logits);
    int correct = 0;
    for (int t = 0; t < n; t++) {
        correct += argmax(logits + t * N_CLASSES, N_CLASSES) == ds->label[ds->test[t]];
        top1[t] = topk[t * TOP_K];
    }
    confsmoe_tensor_destroy(tz);
    confsmoe_tensor_destroy(ty);
    confsmoe_tensor_destroy(tk);
    free(z);
    free(y);
    free(logits);
    free(topk);
    return 100.0 * correct / n;
}

/* ------------------------------------------------------------------ one variant */

typedef struct {
    double acc_final, acc_best;
    double h_mean, h_min, h_last, cv2_last, max_last;
    int probe_switches;
    double test_switch_late;   /* mean % of test tokens whose top-1 changed, over the second half of epochs */
    double router_delta;       /* max |router.w - init| at the end */
    double test_h_final;       /* H(load)/log E of the final test routing */
    int64_t load_last[N_EXPERTS];
    double seconds;
} result;

static void format_probes(const int32_t *top1, const int *probe_pos, char *out)
{
    for (int p = 0; p < N_PROBES; p++) {
        out[2 * p] = (char)('0' + top1[probe_pos[p]]);
        out[2 * p + 1] = p + 1 < N_PROBES ? ' ' : '\0';
    }
}

static void run_variant(const variant *v, const options *opt, const dataset *ds, const int *probe_pos, result *r)
{
    const double t0 = now_seconds();
    model m;
    model_create(&m, v, opt, ds->f);
    confsmoe_ctx *ctx = m.ctx;
    memset(r, 0, sizeof *r);
    r->h_min = 1.0;

    int *order = xmalloc((size_t)ds->n_train * sizeof *order);
    memcpy(order, ds->train, (size_t)ds->n_train * sizeof *order);
    uint64_t rng = opt->seed * 0x2545F4914F6CDD1Dull + 1;
    int32_t *top1 = xmalloc((size_t)ds->n_test * sizeof *top1), *prev = xmalloc((size_t)ds->n_test * sizeof *prev);

    if (v->load_loss != CONFSMOE_LOAD_LOSS_NONE)
        printf("\n== %s: %s, weight %g\n", v->name, v->what, (double)opt->load_weight);
    else
        printf("\n== %s: %s\n", v->name, v->what);
    printf("%5s %7s %7s %6s %7s %7s %6s  %-15s %4s %6s\n", "epoch", "ce", "gate_l", "acc%", "H/logE", "CV^2",
           "max%", "probe top-1", "psw", "tsw%");
    double acc = evaluate(&m, ds, prev);
    char probes[2 * N_PROBES];
    format_probes(prev, probe_pos, probes);
    printf("%5d %7s %7s %6.1f %7s %7s %6s  %-15s %4s %6s\n", 0, "-", "-", acc, "-", "-", "-", probes, "-", "-");

    int late_epochs = 0;
    for (int epoch = 1; epoch <= opt->epochs; epoch++) {
        shuffle(order, ds->n_train, &rng);
        confsmoe_gate_stats_reset(m.gate);
        double ce = 0.0, gate_loss = 0.0;
        int batches = 0;
        for (int at = 0; at < ds->n_train; at += BATCH, batches++) {
            int n = ds->n_train - at < BATCH ? ds->n_train - at : BATCH;
            ce += train_step(&m, ds, order + at, n, opt->fixed_encoder, &gate_loss);
        }
        /* Utilisation of this epoch's training routing, read before the test forward adds to it. */
        confsmoe_gate_stats st;
        memset(&st, 0, sizeof st);
        st.struct_size = sizeof st; /* this program's size: the library writes no more */
        CHECK(ctx, confsmoe_gate_stats_get(m.gate, CONFSMOE_STATS_TOTAL, &st, r->load_last, NULL, N_EXPERTS));

        acc = evaluate(&m, ds, top1);
        int psw = 0, tsw = 0;
        for (int p = 0; p < N_PROBES; p++)
            psw += top1[probe_pos[p]] != prev[probe_pos[p]];
        for (int t = 0; t < ds->n_test; t++)
            tsw += top1[t] != prev[t];
        double tsw_pct = 100.0 * tsw / ds->n_test;
        memcpy(prev, top1, (size_t)ds->n_test * sizeof *prev);
        format_probes(top1, probe_pos, probes);
        printf("%5d %7.4f %7.4f %6.1f %7.4f %7.4f %6.1f  %-15s %4d %6.1f\n", epoch, ce / batches,
               gate_loss / batches, acc, st.load_entropy, st.load_cv2, 100.0 * st.max_load_fraction, probes, psw,
               tsw_pct);

        r->acc_final = acc;
        r->acc_best = acc > r->acc_best ? acc : r->acc_best;
        r->h_mean += st.load_entropy / opt->epochs;
        r->h_min = st.load_entropy < r->h_min ? st.load_entropy : r->h_min;
        r->h_last = st.load_entropy;
        r->cv2_last = st.load_cv2;
        r->max_last = 100.0 * st.max_load_fraction;
        r->probe_switches += psw;
        if (epoch > opt->epochs / 2) {
            r->test_switch_late += tsw_pct;
            late_epochs++;
        }
    }
    if (late_epochs > 0)
        r->test_switch_late /= late_epochs;

    /* Routing of the final model on the test split (the last call: the evaluate() above). */
    confsmoe_gate_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    CHECK(ctx, confsmoe_gate_stats_get(m.gate, CONFSMOE_STATS_LAST_CALL, &st, NULL, NULL, 0));
    r->test_h_final = st.load_entropy;

    const float *rw = confsmoe_tensor_data(confsmoe_gate_param(m.gate, m.router_param));
    for (int i = 0; i < D * N_EXPERTS; i++) {
        double dv = fabs((double)rw[i] - (double)m.router_init[i]);
        r->router_delta = dv > r->router_delta ? dv : r->router_delta;
    }
    printf("   last-epoch training load per expert (%% of slots):");
    int64_t total = 0;
    for (int e = 0; e < N_EXPERTS; e++)
        total += r->load_last[e];
    for (int e = 0; e < N_EXPERTS; e++)
        printf(" %4.1f", total > 0 ? 100.0 * (double)r->load_last[e] / (double)total : 0.0);
    printf("\n");

    free(order);
    free(top1);
    free(prev);
    model_destroy(&m);
    r->seconds = now_seconds() - t0;
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: " PROG " [--epochs N] [--seed S] [--data DIR] [--view FILE] [--fixed-encoder] [--noisy]\n"
            "       [--load-weight W] [--lr LR]\n"
            "  --epochs N       training epochs per variant (default 20)\n"
            "  --seed S         seed of the library ctx and of the host RNG (default 1)\n"
            "  --data DIR       folder of the handwritten data set (default " DEFAULT_DATA_DIR
            ", relative to the\n"
            "                   working directory: the repository's copy when run from its root)\n"
            "  --view FILE      feature view inside DIR (default view1_fou.csv)\n"
            "  --fixed-encoder  keep the input projection at its random init (not trained)\n"
            "  --noisy          noisy top-k routing in training, for every variant\n"
            "  --load-weight W  weight of the load losses of the softmax+entropy and softmax+cv variants\n"
            "                   (default 0.1)\n"
            "  --lr LR          Adam learning rate (default 0.002)\n");
}

static int parse_int(const char *flag, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, PROG ": %s needs an integer in %ld..%ld, got '%s'\n", flag, lo, hi, s);
        return 0;
    }
    *out = v;
    return 1;
}

static int parse_float(const char *flag, const char *s, double lo, double hi, float *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, PROG ": %s needs a number in %g..%g, got '%s'\n", flag, lo, hi, s);
        return 0;
    }
    *out = (float)v;
    return 1;
}

int main(int argc, char **argv)
{
    options opt = {20, 1, 0, 0, 0.1f, 2e-3f};
    const char *data_dir = DEFAULT_DATA_DIR, *view = "view1_fou.csv";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long v;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--fixed-encoder") == 0) {
            opt.fixed_encoder = 1;
        } else if (strcmp(a, "--noisy") == 0) {
            opt.noisy = 1;
        } else if (i + 1 < argc && strcmp(a, "--epochs") == 0) {
            if (!parse_int(a, argv[++i], 1, MAX_EPOCHS, &v))
                return 2;
            opt.epochs = (int)v;
        } else if (i + 1 < argc && strcmp(a, "--seed") == 0) {
            if (!parse_int(a, argv[++i], 0, 2147483647L, &v))
                return 2;
            opt.seed = (uint64_t)v;
        } else if (i + 1 < argc && strcmp(a, "--load-weight") == 0) {
            if (!parse_float(a, argv[++i], 0.0, 1e6, &opt.load_weight))
                return 2;
        } else if (i + 1 < argc && strcmp(a, "--lr") == 0) {
            if (!parse_float(a, argv[++i], 1e-9, 10.0, &opt.lr))
                return 2;
        } else if (i + 1 < argc && strcmp(a, "--data") == 0) {
            data_dir = argv[++i];
        } else if (i + 1 < argc && strcmp(a, "--view") == 0) {
            view = argv[++i];
        } else {
            fprintf(stderr, PROG ": unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }

    dataset ds;
    load_data(data_dir, view, &ds);

    /* Probes: N_PROBES test samples spread evenly over the (class-sorted) test split. */
    int probe_pos[N_PROBES];
    printf(PROG ": libconfsmoe %s\n", confsmoe_version_string());
    printf("data: %s/%s, %d features, %d train / %d test samples, standardised with train statistics\n", data_dir,
           view, ds.f, ds.n_train, ds.n_test);
    printf("model: %s encoder %d -> %d, gate E=%d k=%d (experts %d -> %d -> %d), linear head %d -> %d\n",
           opt.fixed_encoder ? "fixed random" : "learned", ds.f, D, N_EXPERTS, TOP_K, D, HIDDEN, D, D, N_CLASSES);
    printf("training: Adam lr=%g, batch %d, %d epochs, seed %llu, router noise %s\n", (double)opt.lr, BATCH, opt.epochs,
           (unsigned long long)opt.seed, opt.noisy ? "on" : "off");
    printf("probes (test samples, label):");
    for (int p = 0; p < N_PROBES; p++) {
        probe_pos[p] = (int)((2 * p + 1) * (long)ds.n_test / (2 * N_PROBES));
        printf(" #%d:%d", ds.test[probe_pos[p]], ds.label[ds.test[probe_pos[p]]]);
    }
    printf("\n");
    printf("columns: ce = train cross-entropy, gate_l = the gate's loss (confidence or load), acc%% = test accuracy,\n"
           "  H/logE, CV^2, max%% = load entropy, CV^2 and largest expert share of this epoch's training slots,\n"
           "  probe top-1 = top-1 expert of each probe, psw = probes whose top-1 changed since the previous epoch,\n"
           "  tsw%% = the same over all test tokens\n");
    fflush(stdout);

    result res[N_VARIANTS];
    for (int i = 0; i < N_VARIANTS; i++) {
        run_variant(&VARIANTS[i], &opt, &ds, probe_pos, &res[i]);
        fflush(stdout);
    }

    printf("\n== summary (%d epochs, seed %llu)\n", opt.epochs, (unsigned long long)opt.seed);
    printf("%-16s %6s %6s %7s %7s %7s %7s %6s %5s %9s %8s %7s %6s\n", "variant", "acc%", "best%", "H mean", "H min",
           "H last", "CV2 last", "max%", "psw", "tsw% 2nd", "H test", "router", "time");
    printf("%-16s %6s %6s %7s %7s %7s %7s %6s %5s %9s %8s %7s %6s\n", "", "final", "", "(train)", "(train)", "(train)",
           "(train)", "last", "total", "half", "final", "max|dW|", "s");
    for (int i = 0; i < N_VARIANTS; i++) {
        const result *r = &res[i];
        printf("%-16s %6.1f %6.1f %7.4f %7.4f %7.4f %8.4f %6.1f %5d %9.2f %8.4f %7.4f %6.2f\n", VARIANTS[i].name,
               r->acc_final, r->acc_best, r->h_mean, r->h_min, r->h_last, r->cv2_last, r->max_last, r->probe_switches,
               r->test_switch_late, r->test_h_final, r->router_delta, r->seconds);
    }

    free(ds.x);
    free(ds.label);
    free(ds.train);
    free(ds.test);
    return 0;
}
