/* libconfsmoe benchmark driver (one process per measurement; tests/bench/run runs it).
 *
 *   bench sgemm --N n --d d --h h --E e --k k [--reps r] [--warmup w]
 *       The BLIS sgemm ceiling at the expert GEMM shapes of a gate call with N tokens:
 *       rows = N k / E tokens per expert; forward [rows,d]x[d,h], [rows,h]x[h,d]; backward
 *       dact = dy W2, dW2 = dy^T act, dW1 = dpre^T x, dx = dpre W1. Each shape is timed
 *       through the packed path (the library's: sup disabled) and through BLIS's default
 *       path (sup enabled, what a BLAS caller such as PyTorch gets). The ceiling is the best
 *       GFLOP/s of any (shape, path).
 *   bench gate --N n --d d --h h --E e --k k --C c [--reps r] [--warmup w]
 *       One confidence-gate call (router softmax, token-level confidence, single-label
 *       target with C classes, frozen router), forward in training mode + backward.
 *   bench model --B b --S s --F f1,f2,.. --d d --h h --E e --k k --C c --missing r
 *       One full training step of the model of docs/MODEL.md, section 6: zero_grad, model_step,
 *       Adam step.
 *   bench membw [--mb m] [--threads t] [--reps r]
 *       STREAM-style copy (c = a) and triad (a = b + s c) over three arrays of m MiB each (default:
 *       4x the last-level cache, at least 256 MiB), split over t threads, the best of --reps
 *       passes: the memory bandwidth of the physical bound.
 *
 * gate and model take --threads t: confsmoe_ctx_params.n_threads (0, the default, leaves the
 * library's fallback: CONFSMOE_NUM_THREADS, else 1). They print the matrix-multiply FLOPs
 * (flops; bound_flops adds the stage-2 imputer's, which depend on the missing cells) and the
 * bytes the non-GEMM passes must move (nongemm_bytes, by pass in nongemm_bytes_by_pass): the
 * two terms of the physical bound (docs/PERFORMANCE.md, "The bound").
 *
 * Each prints one JSON object on stdout. Times are wall-clock (CLOCK_MONOTONIC), the
 * median of --reps timed runs after --warmup untimed ones. RSS from /proc/self/status:
 * base_rss_mb after set-up (before the first timed call), peak_rss_mb (VmHWM) at the end.
 * The library is used through its public API only; BLIS is called directly for the ceiling.
 */
#define _POSIX_C_SOURCE 200809L
#include <blis.h>
#include <confsmoe.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#else
#include <pthread.h>
#endif

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        confsmoe_status st_ = (call);                                                               \
        if (st_ != CONFSMOE_OK) {                                                                   \
            fprintf(stderr, "bench: %s failed: %s (%s)\n", #call, confsmoe_status_string(st_),      \
                    ctx ? confsmoe_ctx_last_error(ctx) : "");                                       \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

/* ------------------------------------------------------------------ options */

typedef struct {
    int64_t N, d, h, B, S;
    int32_t E, k, C, reps, warmup, M, threads;
    int64_t F[16], mb;
    double missing;
    uint64_t seed;
} options;

static void usage(void)
{
    fprintf(stderr, "usage: bench sgemm|gate|model|membw [--N n] [--d d] [--h h] [--E e] [--k k] [--C c] [--B b]\n"
                    "             [--S s] [--F f1,f2,...] [--missing r] [--reps r] [--warmup w] [--seed s]\n"
                    "             [--threads t] [--mb m]\n");
    exit(2);
}

static options parse(int argc, char **argv)
{
    options o = {.N = 256, .d = 128, .h = 128, .B = 256, .S = 50, .E = 8, .k = 2, .C = 10, .reps = 10,
                 .warmup = 2, .M = 3, .F = {300, 74, 35}, .missing = 0.3, .seed = 1};
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--N"))
            o.N = atoll(v);
        else if (!strcmp(a, "--d"))
            o.d = atoll(v);
        else if (!strcmp(a, "--h"))
            o.h = atoll(v);
        else if (!strcmp(a, "--B"))
            o.B = atoll(v);
        else if (!strcmp(a, "--S"))
            o.S = atoll(v);
        else if (!strcmp(a, "--E"))
            o.E = atoi(v);
        else if (!strcmp(a, "--k"))
            o.k = atoi(v);
        else if (!strcmp(a, "--C"))
            o.C = atoi(v);
        else if (!strcmp(a, "--reps"))
            o.reps = atoi(v);
        else if (!strcmp(a, "--warmup"))
            o.warmup = atoi(v);
        else if (!strcmp(a, "--missing"))
            o.missing = atof(v);
        else if (!strcmp(a, "--seed"))
            o.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--threads"))
            o.threads = atoi(v);
        else if (!strcmp(a, "--mb"))
            o.mb = atoll(v);
        else if (!strcmp(a, "--F")) {
            o.M = 0;
            for (char *s = (char *)v; *s && o.M < 16;) {
                o.F[o.M++] = strtoll(s, &s, 10);
                if (*s == ',')
                    s++;
            }
        } else
            usage();
    }
    if (o.reps < 1 || o.warmup < 0 || o.E < 1 || o.k < 1 || o.k > o.E || o.M < 1 || o.threads < 0 || o.mb < 0)
        usage();
    return o;
}

/* ------------------------------------------------------------------ helpers */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* A /proc/self/status field in MB ("VmHWM", "VmRSS"), or -1. */
static double status_mb(const char *field)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1.0;
    char line[256];
    double mb = -1.0;
    size_t len = strlen(field);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, field, len) && line[len] == ':') {
            mb = atof(line + len + 1) / 1024.0;
            break;
        }
    fclose(f);
    return mb;
}

static uint64_t rng_state = 88172645463325252ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) * 0x1.0p-53;
}

static void fill(float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++)
        x[i] = scale * (float)(2.0 * urand() - 1.0);
}

static void print_times(const double *t, int n)
{
    printf("\"times_s\": [");
    for (int i = 0; i < n; i++)
        printf("%s%.6g", i ? ", " : "", t[i]);
    printf("]");
}

/* ------------------------------------------------------------------ sgemm ceiling */

typedef struct {
    const char *name;
    trans_t ta, tb;
    int64_t m, n, k;
} gemm_shape;

/* Row-major C[m,n] = op(A) op(B) through bli_sgemm_ex, as lib/gemm.c calls it. */
static double time_gemm(const gemm_shape *g, int sup, int reps, int warmup, float *a, float *b, float *c)
{
    rntm_t rntm;
    bli_rntm_init_from_global(&rntm);
    if (!sup)
        bli_rntm_disable_l3_sup(&rntm);
    float one = 1.0f, zero = 0.0f;
    inc_t lda = g->ta == BLIS_TRANSPOSE ? g->m : g->k, ldb = g->tb == BLIS_TRANSPOSE ? g->k : g->n;
    double *t = malloc(sizeof(double) * (size_t)reps);
    for (int r = -warmup; r < reps; r++) {
        double t0 = now();
        bli_sgemm_ex(g->ta, g->tb, (dim_t)g->m, (dim_t)g->n, (dim_t)g->k, &one, a, lda, 1, b, ldb, 1, &zero, c,
                     (inc_t)g->n, 1, NULL, &rntm);
        if (r >= 0)
            t[r] = now() - t0;
    }
    double med = median(t, reps);
    free(t);
    return med;
}

static int run_sgemm(const options *o)
{
    const int64_t rows = (o->N * o->k + o->E - 1) / o->E, d = o->d, h = o->h;
    const gemm_shape shapes[] = {
        {"fwd1 x W1^T", BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, rows, h, d},
        {"fwd2 act W2^T", BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, rows, d, h},
        {"bwd dact = dy W2", BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, rows, h, d},
        {"bwd dW2 = dy^T act", BLIS_TRANSPOSE, BLIS_NO_TRANSPOSE, d, h, rows},
        {"bwd dW1 = dpre^T x", BLIS_TRANSPOSE, BLIS_NO_TRANSPOSE, h, d, rows},
        {"bwd dx = dpre W1", BLIS_NO_TRANSPOSE, BLIS_NO_TRANSPOSE, rows, d, h},
    };
    enum { NS = sizeof shapes / sizeof *shapes };
    size_t big = (size_t)(rows > h ? rows : h) * (size_t)(h > d ? h : d);
    float *a = malloc(big * sizeof(float)), *b = malloc(big * sizeof(float)), *c = malloc(big * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "bench: out of memory\n");
        return 1;
    }
    fill(a, (int64_t)big, 1.0f);
    fill(b, (int64_t)big, 1.0f);
    fill(c, (int64_t)big, 1.0f);
    double base = status_mb("VmRSS");
    double best = 0.0, total_flops = 0.0, total_packed = 0.0, total_best = 0.0;
    printf("{\"what\": \"sgemm\", \"N\": %" PRId64 ", \"d\": %" PRId64 ", \"h\": %" PRId64 ", \"E\": %d, \"k\": %d, "
           "\"rows_per_expert\": %" PRId64 ", \"arch\": \"%s\", \"shapes\": [",
           o->N, d, h, o->E, o->k, rows, bli_arch_string(bli_arch_query_id()));
    for (int i = 0; i < NS; i++) {
        const gemm_shape *g = &shapes[i];
        double flops = 2.0 * (double)g->m * (double)g->n * (double)g->k;
        double tp = time_gemm(g, 0, o->reps, o->warmup, a, b, c);
        double ts = time_gemm(g, 1, o->reps, o->warmup, a, b, c);
        double gp = flops / tp * 1e-9, gs = flops / ts * 1e-9;
        best = fmax(best, fmax(gp, gs));
        total_flops += flops;
        total_packed += tp;
        total_best += fmin(tp, ts);
        printf("%s{\"name\": \"%s\", \"m\": %" PRId64 ", \"n\": %" PRId64 ", \"k\": %" PRId64
               ", \"packed_gflops\": %.2f, \"sup_gflops\": %.2f}",
               i ? ", " : "", g->name, g->m, g->n, g->k, gp, gs);
    }
    /* The E experts run these shapes once each per call. */
    printf("], \"peak_gflops\": %.2f, \"mix_packed_gflops\": %.2f, \"mix_best_gflops\": %.2f, "
           "\"expert_gemm_s_packed\": %.6g, \"median_s\": %.6g, \"gflops\": %.2f, \"base_rss_mb\": %.1f, "
           "\"peak_rss_mb\": %.1f}\n",
           best, total_flops / total_packed * 1e-9, total_flops / total_best * 1e-9, o->E * total_packed,
           o->E * total_best, total_flops / total_best * 1e-9, base, status_mb("VmHWM"));
    free(a);
    free(b);
    free(c);
    return 0;
}

/* ------------------------------------------------------------------ the physical bound
 *
 * The bound of a row is its matrix-multiply FLOPs at the measured sgemm peak plus the bytes its
 * non-GEMM passes must move at the measured memory bandwidth (docs/PERFORMANCE.md, "The bound").
 * The byte counts follow docs/MODEL.md and the passes of lib/gate.c, lib/expert.c, lib/confnet.c,
 * lib/model.c and lib/imputer.c, on one rule: every non-GEMM pass reads each tensor it needs once
 * and writes each tensor it produces once, 4 bytes a float or index, 1 a dropout-mask element.
 * GEMM operands are the FLOP term's, not counted here; a bias add or a reduction (db) fused into
 * a neighbouring pass adds nothing; parameters are counted only by the optimizer. */

typedef struct {
    double softmax, layernorm, gelu, dropout, dispatch_combine, residual, stage1, stage2, optimizer;
} pass_bytes;

static double pass_bytes_total(const pass_bytes *b)
{
    return b->softmax + b->layernorm + b->gelu + b->dropout + b->dispatch_combine + b->residual + b->stage1 +
           b->stage2 + b->optimizer;
}

static void print_pass_bytes(const pass_bytes *b)
{
    printf("\"nongemm_bytes\": %.6g, \"nongemm_bytes_by_pass\": {\"softmax\": %.6g, \"layernorm\": %.6g, "
           "\"gelu\": %.6g, \"dropout\": %.6g, \"dispatch_combine\": %.6g, \"residual\": %.6g, \"stage1\": %.6g, "
           "\"stage2\": %.6g, \"optimizer\": %.6g}, ",
           pass_bytes_total(b), b->softmax, b->layernorm, b->gelu, b->dropout, b->dispatch_combine, b->residual,
           b->stage1, b->stage2, b->optimizer);
}

/* LayerNorm over `rows` rows of d: forward reads x and writes y; backward reads dy and x (the
 * statistics are recomputed or kept, O(rows)) and writes dx. */
static void layernorm_bytes(double rows, double d, pass_bytes *b) { b->layernorm += 4.0 * rows * d * (2.0 + 3.0); }

/* One confidence-gate call forward + backward over N tokens, nk = N k slots (frozen router,
 * token confidence, single label; docs/MODEL.md, sections 3.3, 4):
 * forward:  top-k reads the router logits [N, E], writes the routes [nk]; dispatch reads x's rows
 *           [nk, d] (the gathered block feeds the first GEMM from cache); bias + GELU reads the
 *           pre-activation [nk, h], writes the activation [nk, h]; the ConfNet (LN statistics and
 *           v . LN(y), fused) reads y [nk, d], writes c [nk]; the target softmax reads the logits
 *           [nk, C], writes p [nk]; the combination reads y [nk, d], c, writes out [N, d];
 * backward: the combination reads dy [N, d] and y [nk, d], writes dY [nk, d]; the target softmax
 *           reads its logits and writes their gradient [nk, C]; the ConfNet reads y and updates dY
 *           (read + write) [nk, d]; GELU' reads dact and the pre-activation, writes dpre [nk, h];
 *           dW1 = dpre^T x gathers x's rows again [nk, d]; the scatter of dx reads the slots'
 *           rows [nk, d], writes dx [N, d]. */
static void gate_bytes(int64_t N_, int64_t d_, int64_t h_, int64_t E_, int64_t k_, int64_t C_, pass_bytes *b)
{
    const double N = (double)N_, d = (double)d_, h = (double)h_, E = (double)E_, C = (double)C_;
    const double nk = N * (double)k_;
    b->softmax += 4.0 * (N * E + nk) + 4.0 * (nk * C + nk) + 4.0 * 2.0 * nk * C;
    b->dispatch_combine += 4.0 * nk * d + 4.0 * (nk * d + nk + N * d)               /* gather, combine */
                           + 4.0 * (N * d + 2.0 * nk * d) + 4.0 * nk * d + 4.0 * (nk * d + N * d);
    b->gelu += 4.0 * 2.0 * nk * h + 4.0 * 3.0 * nk * h;
    b->layernorm += 4.0 * (nk * d + nk) + 4.0 * 3.0 * nk * d;                          /* the ConfNets */
}

/* One training step of the model (docs/MODEL.md, section 6) with the mask `avail` [B, M], on top
 * of the three gate calls (gate_bytes, N = B S each). L = M S, BLd = B L d floats:
 * stage 1 reads K' = min(draws, pool) pool rows [S, F_m] and writes one, per missing (b, m);
 * the encoder bias + positions read tok and write X (BLd); LN1, LN2 and LN3 (LN2, LN3 per
 * modality over B S rows), LN_imp (S rows per missing cell) and LN_out (B rows) as layernorm_bytes;
 * attention, per (sample, head): the softmax reads the scores and writes the weights [L, L], the
 * dropout writes their mask (1 byte) and backward reads it, the softmax backward reads the
 * weights and their gradient and writes the scores' gradient; the residual X + Dropout(A) reads
 * X and A, writes H (BLd), its mask 1 byte each way, backward reads dH and writes dA; the MoE
 * residual H_m + F_m before LN3 reads both (2 B S d per modality), and LN2's gradient is added
 * into dH (read + write); stage 2, per missing (b, m) with L_b candidates: the slot mean reads
 * [S, k, d], writes [S, d]; per (s, j) the softmax and top-T read and write [S, k, L_b] forward
 * and backward; the mean's gradient reads [S, d], updates [S, k, d]; the readout's mean reads H
 * (BLd) and backward writes its gradient (BLd); the optimizer (zero_grad, Adam) writes g, reads
 * p, g, m, v and writes p, m, v: 32 bytes a parameter. Also the imputer's matrix FLOPs, which
 * model_flops leaves out: per sample with a missing cell, kv of its k L_b candidate slots; per
 * missing cell, q (S rows), the scores and the weighted sum (2 S k L_b d each); 3x for backward. */
static void model_bytes(const options *o, const uint8_t *avail, int64_t n_params, pass_bytes *b,
                        double *imputer_flops)
{
    const double B = (double)o->B, S = (double)o->S, d = (double)o->d, M = o->M, L = M * S, H = 4.0;
    const double BLd = B * L * d, k = (double)o->k, draws = 10.0, pool_rows = 512.0;
    const double K = draws < pool_rows ? draws : pool_rows;
    b->residual += 4.0 * 2.0 * BLd;                                     /* encoder bias + positions */
    layernorm_bytes(B * L, d, b);                                       /* LN1 */
    b->softmax += 4.0 * B * H * L * L * (2.0 + 3.0);
    b->dropout += 2.0 * B * H * L * L + 2.0 * BLd;                      /* attention and residual masks */
    b->residual += 4.0 * 3.0 * BLd + 4.0 * 2.0 * BLd;                   /* X + Dropout(A), its backward */
    for (int32_t m = 0; m < o->M; m++) {
        gate_bytes(o->B * o->S, o->d, o->h, o->E, o->k, o->C, b);
        layernorm_bytes(B * S, d, b);                                   /* LN2 */
        layernorm_bytes(B * S, d, b);                                   /* LN3 */
        b->residual += 4.0 * 2.0 * B * S * d + 4.0 * 2.0 * B * S * d;   /* H_m + F_m; dH += dLN2 */
    }
    *imputer_flops = 0.0;
    for (int64_t s = 0; s < o->B; s++) {
        double present = 0.0, missing = 0.0;
        for (int32_t m = 0; m < o->M; m++) {
            present += avail[s * o->M + m] != 0;
            if (!avail[s * o->M + m]) {
                missing += 1.0;
                b->stage1 += 4.0 * (K + 1.0) * S * (double)o->F[m];
            }
        }
        if (missing == 0.0)
            continue;
        const double Lb = present * S;
        *imputer_flops += 3.0 * 2.0 * Lb * k * d * d + missing * 3.0 * (2.0 * S * d * d + 2.0 * 2.0 * S * k * Lb * d);
        b->stage2 += missing * 4.0 * ((S * k * d + S * d) + 2.0 * S * k * Lb + 3.0 * S * k * Lb + (S * d + 2.0 * S * k * d));
        layernorm_bytes(missing * S, d, b);                             /* LN_imp */
    }
    b->residual += 4.0 * 2.0 * BLd;                                     /* readout mean, its backward */
    layernorm_bytes(B, d, b);                                           /* LN_out */
    b->optimizer += 32.0 * (double)n_params;
}

/* ------------------------------------------------------------------ memory bandwidth */

/* Runs fn(arg, worker, workers) on `workers` threads (the caller is worker 0), with the
 * mechanism of the library's own threads: the OpenMP team when the library is built for OpenMP
 * (meson.build passes -fopenmp then), else POSIX threads. */
typedef void (*membw_fn)(void *arg, int worker, int workers);

#ifndef _OPENMP
typedef struct {
    membw_fn fn;
    void *arg;
    int worker, workers;
} membw_thread_arg;

static void *membw_thread_main(void *p)
{
    const membw_thread_arg *t = p;
    t->fn(t->arg, t->worker, t->workers);
    return NULL;
}
#endif

static void membw_run(int workers, membw_fn fn, void *arg)
{
#ifdef _OPENMP
#pragma omp parallel num_threads(workers)
    fn(arg, omp_get_thread_num(), omp_get_num_threads());
#else
    pthread_t threads[64];
    membw_thread_arg args[64];
    int started = 1;
    for (int w = 1; w < workers && w < 64; w++, started++) {
        args[w] = (membw_thread_arg){fn, arg, w, workers};
        if (pthread_create(&threads[w], NULL, membw_thread_main, &args[w]) != 0)
            break;
    }
    fn(arg, 0, workers);
    for (int w = 1; w < started; w++)
        pthread_join(threads[w], NULL);
#endif
}

typedef struct {
    float *a, *b, *c;
    int64_t n;
    int triad;
} membw_pass;

/* One thread's contiguous share of a pass (the same share each pass: first touch placed it). */
static void membw_kernel(void *arg, int worker, int workers)
{
    const membw_pass *p = arg;
    const int64_t begin = p->n * worker / workers, end = p->n * (worker + 1) / workers;
    float *restrict a = p->a, *restrict c = p->c;
    const float *restrict b = p->b;
    if (p->triad)
        for (int64_t i = begin; i < end; i++)
            a[i] = b[i] + 3.0f * c[i];
    else
        for (int64_t i = begin; i < end; i++)
            c[i] = a[i];
}

static void membw_init(void *arg, int worker, int workers)
{
    const membw_pass *p = arg;
    for (int64_t i = p->n * worker / workers; i < p->n * (worker + 1) / workers; i++) {
        p->a[i] = 1.0f;
        p->b[i] = 2.0f;
        p->c[i] = 0.5f;
    }
}

/* The last-level cache in bytes from sysfs (the highest index of cpu0), or 0. */
static int64_t last_level_cache_bytes(void)
{
    int64_t best = 0;
    for (int i = 0; i < 8; i++) {
        char path[96], text[32];
        snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", i);
        FILE *f = fopen(path, "r");
        if (!f)
            break;
        if (fgets(text, sizeof text, f)) {
            char *unit;
            int64_t v = strtoll(text, &unit, 10);
            v *= *unit == 'M' ? 1 << 20 : *unit == 'K' ? 1 << 10 : 1;
            best = v > best ? v : best;
        }
        fclose(f);
    }
    return best;
}

/* STREAM's byte counts (no write-allocate traffic): copy moves 8 bytes an element, triad 12. */
static int run_membw(const options *o)
{
    const int64_t llc = last_level_cache_bytes();
    int64_t bytes = o->mb > 0 ? o->mb << 20 : 4 * llc;
    if (o->mb == 0 && bytes < (INT64_C(256) << 20))
        bytes = INT64_C(256) << 20;
    const int workers = o->threads > 0 ? o->threads : 1;
    membw_pass p = {.n = bytes / (int64_t)sizeof(float)};
    p.a = malloc((size_t)bytes);
    p.b = malloc((size_t)bytes);
    p.c = malloc((size_t)bytes);
    if (!p.a || !p.b || !p.c) {
        fprintf(stderr, "bench membw: cannot allocate 3 x %" PRId64 " MiB\n", bytes >> 20);
        return 1;
    }
    membw_run(workers, membw_init, &p);
    double best[2] = {1e30, 1e30};
    for (int r = 0; r < o->reps; r++)
        for (p.triad = 0; p.triad < 2; p.triad++) {
            const double t0 = now();
            membw_run(workers, membw_kernel, &p);
            best[p.triad] = fmin(best[p.triad], now() - t0);
        }
    /* Reading the arrays keeps the passes from being optimised away. */
    const double check = (double)p.a[p.n - 1] + (double)p.c[p.n / 2];
    const double elems = (double)p.n;
    printf("{\"what\": \"membw\", \"threads\": %d, \"array_mib\": %" PRId64 ", \"llc_mib\": %.1f, \"passes\": %d, "
           "\"copy_gbps\": %.2f, \"triad_gbps\": %.2f, \"median_s\": %.6g, \"check\": %g, \"peak_rss_mb\": %.1f, "
           "\"threads_mechanism\": \"%s\"}\n",
           workers, bytes >> 20, (double)llc / (1 << 20), o->reps, 8.0 * elems / best[0] * 1e-9,
           12.0 * elems / best[1] * 1e-9, best[1], check, status_mb("VmHWM"),
#ifdef _OPENMP
           "openmp"
#else
           "pthreads"
#endif
    );
    free(p.a);
    free(p.b);
    free(p.c);
    return 0;
}

/* ------------------------------------------------------------------ gate */

/* Matrix-multiply FLOPs of one confidence-gate forward + backward (frozen router):
 * experts 2 GEMMs forward, 4 backward, each 2 N k d h; the router logits 2 N d E; the
 * target classifier 2 N k d C forward, 2 x that backward (dW, dY); the ConfNet's
 * Linear(d, 1) 2 N k d forward, 2 x that backward. */
static double gate_flops(int64_t N, int64_t d, int64_t h, int64_t E, int64_t k, int64_t C)
{
    const double nk = (double)N * (double)k;
    return 12.0 * nk * (double)d * (double)h + 2.0 * (double)N * (double)d * (double)E +
           6.0 * nk * (double)d * (double)C + 6.0 * nk * (double)d;
}

static int run_gate(const options *o)
{
    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = o->seed;
    cp.n_threads = o->threads;
    CHECK(confsmoe_ctx_create(&cp, &ctx));
    confsmoe_expert **experts = calloc((size_t)o->E, sizeof *experts);
    for (int32_t e = 0; e < o->E; e++)
        CHECK(confsmoe_expert_create(ctx, o->d, o->h, &experts[e]));
    confsmoe_gate_params gp;
    confsmoe_gate_params_init(&gp);
    gp.d = o->d;
    gp.k = o->k;
    gp.router = CONFSMOE_ROUTER_SOFTMAX;
    gp.combine = CONFSMOE_COMBINE_CONFIDENCE;
    gp.confidence = CONFSMOE_CONFIDENCE_TOKEN;
    gp.n_classes = o->C;
    gp.target = CONFSMOE_TARGET_SINGLE_LABEL;
    gp.router_grad = CONFSMOE_ROUTER_GRAD_FROZEN;
    confsmoe_gate *gate = NULL;
    CHECK(confsmoe_gate_create(ctx, &gp, experts, o->E, &gate));

    const int64_t xd[2] = {o->N, o->d};
    confsmoe_tensor *x, *y, *dy, *dx, *labels;
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, xd, &x));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, xd, &y));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, xd, &dy));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, xd, &dx));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_I32, 1, &o->N, &labels));
    fill(confsmoe_tensor_data(x), o->N * o->d, 1.0f);
    fill(confsmoe_tensor_data(dy), o->N * o->d, 1.0f / (float)o->N);
    int32_t *lab = confsmoe_tensor_data(labels);
    for (int64_t t = 0; t < o->N; t++)
        lab[t] = (int32_t)(urand() * o->C) % o->C;

    double base = status_mb("VmRSS");
    double *t = malloc(sizeof(double) * (size_t)o->reps), fwd_sum = 0.0;
    for (int r = -o->warmup; r < o->reps; r++) {
        confsmoe_saved *saved = NULL;
        float loss = 0.0f;
        double t0 = now();
        CHECK(confsmoe_gate_forward(gate, x, labels, NULL, y, NULL, NULL, &loss, &saved));
        double t1 = now();
        CHECK(confsmoe_gate_backward(gate, saved, dy, NULL, 1.0f, dx));
        double t2 = now();
        confsmoe_saved_destroy(saved);
        if (r >= 0) {
            t[r] = t2 - t0;
            fwd_sum += t1 - t0;
        }
    }
    confsmoe_gate_stats stats = {.struct_size = sizeof stats};
    CHECK(confsmoe_gate_stats_get(gate, CONFSMOE_STATS_LAST_CALL, &stats, NULL, NULL, 0));
    const double flops = gate_flops(o->N, o->d, o->h, o->E, o->k, o->C);
    double times[1024];
    int nt = o->reps < 1024 ? o->reps : 1024;
    memcpy(times, t, sizeof(double) * (size_t)nt);
    double med = median(t, o->reps);
    printf("{\"what\": \"gate\", \"N\": %" PRId64 ", \"d\": %" PRId64 ", \"h\": %" PRId64
           ", \"E\": %d, \"k\": %d, \"C\": %d, \"median_s\": %.6g, \"fwd_mean_s\": %.6g, \"flops\": %.6g, "
           "\"bound_flops\": %.6g, \"gflops\": %.2f, \"max_load_fraction\": %.3f, \"threads\": %d, "
           "\"base_rss_mb\": %.1f, \"peak_rss_mb\": %.1f, ",
           o->N, o->d, o->h, o->E, o->k, o->C, med, fwd_sum / o->reps, flops, flops, flops / med * 1e-9,
           stats.max_load_fraction, o->threads, base, status_mb("VmHWM"));
    pass_bytes bytes = {0};
    gate_bytes(o->N, o->d, o->h, o->E, o->k, o->C, &bytes);
    print_pass_bytes(&bytes);
    print_times(times, nt);
    printf("}\n");
    free(t);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dy);
    confsmoe_tensor_destroy(dx);
    confsmoe_tensor_destroy(labels);
    confsmoe_gate_destroy(gate);
    for (int32_t e = 0; e < o->E; e++)
        confsmoe_expert_destroy(experts[e]);
    free(experts);
    confsmoe_ctx_destroy(ctx);
    return 0;
}

/* ------------------------------------------------------------------ model */

/* Matrix-multiply FLOPs of one training step (forward + backward = 3 x forward for every
 * GEMM whose input gradient is needed; the encoders' input gradient is not): encoders,
 * q k v o projections, attention scores and context, the gate per modality (as above),
 * the stage-2 imputer is not counted (it depends on the missing pattern), the readout. */
static double model_flops(const options *o)
{
    const double B = (double)o->B, S = (double)o->S, d = (double)o->d, M = o->M, L = M * S;
    const double C = o->C, heads_dh = d;
    double f = 0.0;
    for (int32_t m = 0; m < o->M; m++)
        f += 2.0 * 2.0 * B * S * (double)o->F[m] * d;          /* enc fwd + dW */
    f += 3.0 * 4.0 * 2.0 * B * L * d * d;                       /* q k v o */
    f += 3.0 * 2.0 * 2.0 * B * L * L * heads_dh;                /* scores, context */
    f += M * gate_flops(o->B * o->S, o->d, o->h, o->E, o->k, o->C);
    f += 3.0 * 2.0 * B * M * d * d + 3.0 * 2.0 * B * d * C;     /* readout, head */
    return f;
}

static int run_model(const options *o)
{
    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = o->seed;
    cp.n_threads = o->threads;
    CHECK(confsmoe_ctx_create(&cp, &ctx));
    confsmoe_model_params mp;
    confsmoe_model_params_init(&mp);
    mp.n_modalities = o->M;
    mp.features = o->F;
    mp.tokens = o->S;
    mp.d = o->d;
    mp.heads = 4;
    mp.n_experts = o->E;
    mp.k = o->k;
    mp.expert_hidden = o->h;
    mp.n_classes = o->C;
    mp.gate = CONFSMOE_MODEL_GATE_CONFIDENCE;
    mp.imputation = CONFSMOE_IMPUTE_TWO_STAGE;
    mp.draws = 10;
    mp.dropout = 0.1f;
    confsmoe_model *model = NULL;
    CHECK(confsmoe_model_create(ctx, &mp, &model));

    const int32_t M = o->M;
    const int64_t B = o->B, S = o->S, pool_rows = 512;
    confsmoe_tensor *inputs[16], *avail, *labels;
    for (int32_t m = 0; m < M; m++) {
        const int64_t dims[3] = {B, S, o->F[m]}, pdims[3] = {pool_rows, S, o->F[m]};
        confsmoe_tensor *pool;
        CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 3, dims, &inputs[m]));
        fill(confsmoe_tensor_data(inputs[m]), B * S * o->F[m], 1.0f);
        CHECK(confsmoe_tensor_create(ctx, CONFSMOE_F32, 3, pdims, &pool));
        fill(confsmoe_tensor_data(pool), pool_rows * S * o->F[m], 1.0f);
        CHECK(confsmoe_model_set_pool(model, m, pool));
        confsmoe_tensor_destroy(pool);
    }
    const int64_t adims[2] = {B, M};
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_U8, 2, adims, &avail));
    CHECK(confsmoe_tensor_create(ctx, CONFSMOE_I32, 1, &B, &labels));
    uint8_t *a = confsmoe_tensor_data(avail);
    int32_t *lab = confsmoe_tensor_data(labels);
    int64_t n_missing = 0;
    /* docs/MODEL.md, section 9: every sample keeps one random modality; the other cells drop with p = missing. */
    for (int64_t b = 0; b < B; b++) {
        int32_t keep = (int32_t)(urand() * M) % M;
        for (int32_t m = 0; m < M; m++) {
            a[b * M + m] = m == keep || urand() >= o->missing;
            n_missing += !a[b * M + m];
        }
        lab[b] = (int32_t)(urand() * o->C) % o->C;
    }
    confsmoe_optim *opt = NULL;
    CHECK(confsmoe_optim_create(ctx, NULL, &opt));
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        CHECK(confsmoe_optim_add(opt, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)));

    double base = status_mb("VmRSS");
    double *t = malloc(sizeof(double) * (size_t)o->reps);
    float loss = 0.0f, first = 0.0f;
    for (int r = -o->warmup; r < o->reps; r++) {
        double t0 = now();
        confsmoe_model_zero_grad(model);
        CHECK(confsmoe_model_step(model, (const confsmoe_tensor *const *)inputs, avail, labels, NULL, &loss, NULL));
        CHECK(confsmoe_optim_step(opt));
        double t1 = now();
        if (r == -o->warmup)
            first = loss;
        if (r >= 0)
            t[r] = t1 - t0;
    }
    const double flops = model_flops(o);
    int64_t n_params = 0;
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        n_params += confsmoe_tensor_numel(confsmoe_model_param(model, i));
    pass_bytes bytes = {0};
    double imputer_flops = 0.0;
    model_bytes(o, a, n_params, &bytes, &imputer_flops);
    double times[1024];
    int nt = o->reps < 1024 ? o->reps : 1024;
    memcpy(times, t, sizeof(double) * (size_t)nt);
    double med = median(t, o->reps);
    printf("{\"what\": \"model\", \"B\": %" PRId64 ", \"S\": %" PRId64 ", \"M\": %d, \"d\": %" PRId64
           ", \"h\": %" PRId64 ", \"E\": %d, \"k\": %d, \"C\": %d, \"missing_cells\": %" PRId64
           ", \"median_s\": %.6g, \"flops\": %.6g, \"bound_flops\": %.6g, \"gflops\": %.2f, \"first_loss\": %.5f, "
           "\"last_loss\": %.5f, \"threads\": %d, \"parameters\": %" PRId64 ", \"base_rss_mb\": %.1f, "
           "\"peak_rss_mb\": %.1f, ",
           B, S, M, o->d, o->h, o->E, o->k, o->C, n_missing, med, flops, flops + imputer_flops, flops / med * 1e-9,
           first, loss, o->threads, n_params, base, status_mb("VmHWM"));
    print_pass_bytes(&bytes);
    print_times(times, nt);
    printf("}\n");
    free(t);
    confsmoe_optim_destroy(opt);
    for (int32_t m = 0; m < M; m++)
        confsmoe_tensor_destroy(inputs[m]);
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(labels);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    options o = parse(argc, argv);
    bli_init(); /* before bli_arch_query_id(): with BLIS_ARCH_TYPE set, BLIS 0.9 aborts otherwise */
    rng_state ^= o.seed * 0x9E3779B97F4A7C15ull;
    if (!strcmp(argv[1], "sgemm"))
        return run_sgemm(&o);
    if (!strcmp(argv[1], "gate"))
        return run_gate(&o);
    if (!strcmp(argv[1], "model"))
        return run_model(&o);
    if (!strcmp(argv[1], "membw"))
        return run_membw(&o);
    usage();
    return 2;
}
