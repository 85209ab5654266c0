/* Thread safety: separate contexts, each with its own model / gate / imputer / optimizer,
 * used from concurrent pthreads give bit-identical results (memcmp of outputs, losses,
 * gradients, parameters and checkpoint bytes) to the same jobs run one after another.
 * Run under ThreadSanitizer by tests/sanitize/run tsan; without TSan it still checks
 * bit-identity. The library's own worker threads are exercised through the ctx's n_threads
 * (its own test case), and through the fallback CONFSMOE_NUM_THREADS when the environment
 * sets it (the ctxs of the first case leave n_threads at 0). How the threads are started and
 * joined is tested in test_private_threads.c. */
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

enum { N_JOBS = 6, ROUNDS = 3, STEPS = 3 };

typedef struct {
    unsigned char *b;
    size_t n, cap;
    int failed;           /* a library call failed: the message is in err */
    char err[640];
} rec;

static void rec_put(rec *r, const void *data, size_t n)
{
    if (r->n + n > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->n + n)
            cap *= 2;
        unsigned char *b = realloc(r->b, cap);
        if (!b) {
            r->failed = 1;
            return;
        }
        r->b = b;
        r->cap = cap;
    }
    if (n)
        memcpy(r->b + r->n, data, n);
    r->n += n;
}

static void rec_tensor(rec *r, confsmoe_tensor *t) { rec_put(r, confsmoe_tensor_data(t), confsmoe_tensor_nbytes(t)); }

/* No Check assertions off the main thread: failures are recorded and asserted later. */
#define TRY(r, ctx, call)                                                                                   \
    do {                                                                                                    \
        confsmoe_status st_ = (call);                                                                       \
        if (st_ != CONFSMOE_OK && !(r)->failed) {                                                           \
            (r)->failed = 1;                                                                                \
            snprintf((r)->err, sizeof (r)->err, "%s:%d: %s -> %d (%s)", __FILE__, __LINE__, #call, (int)st_, \
                     (ctx) ? confsmoe_ctx_last_error(ctx) : "");                                            \
        }                                                                                                   \
    } while (0)

static void fill(confsmoe_tensor *t, uint64_t seed)
{
    trng r = {seed};
    float *v = confsmoe_tensor_data(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] = (float)trng_uniform(&r, -1, 1);
}

static confsmoe_tensor *mk(rec *r, confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t nd, int64_t d0, int64_t d1,
                           int64_t d2)
{
    const int64_t dims[3] = {d0, d1, d2};
    confsmoe_tensor *t = NULL;
    TRY(r, ctx, confsmoe_tensor_create(ctx, dt, nd, dims, &t));
    return t;
}

/* test_ctx without its assertion: NULL, and the failure recorded, if it cannot be made.
 * threads is confsmoe_ctx_params.n_threads (0: CONFSMOE_NUM_THREADS, else 1). */
static confsmoe_ctx *job_ctx(rec *r, uint64_t seed, int32_t threads)
{
    confsmoe_ctx_params cp;
    confsmoe_ctx_params_init(&cp);
    cp.seed = seed;
    cp.n_threads = threads;
    confsmoe_ctx *ctx = NULL;
    TRY(r, NULL, confsmoe_ctx_create(&cp, &ctx));
    return ctx;
}

/* ---- a full model: steps with Adam, a predict, a checkpoint round trip */

static void model_job(uint64_t seed, int32_t threads, const char *dir, int id, rec *r)
{
    enum { B = 5, M = 2, S = 2, C = 3, P = 4 };
    static const int64_t F[M] = {7, 4};
    confsmoe_ctx *ctx = job_ctx(r, seed, threads);
    if (!ctx)
        return;
    confsmoe_model_params p;
    test_model_params(&p, M, F, 16, C);
    p.tokens = S;
    p.noisy = 1;
    p.draws = 2;
    confsmoe_model *model = NULL;
    confsmoe_optim *opt = NULL;
    TRY(r, ctx, confsmoe_model_create(ctx, &p, &model));
    TRY(r, ctx, confsmoe_optim_create(ctx, NULL, &opt));
    confsmoe_tensor *in[M], *pool[M];
    for (int m = 0; m < M; m++) {
        in[m] = mk(r, ctx, CONFSMOE_F32, 3, B, S, F[m]);
        pool[m] = mk(r, ctx, CONFSMOE_F32, 3, P, S, F[m]);
    }
    confsmoe_tensor *avail = mk(r, ctx, CONFSMOE_U8, 2, B, M, 0);
    confsmoe_tensor *labels = mk(r, ctx, CONFSMOE_I32, 1, B, 0, 0);
    confsmoe_tensor *logits = mk(r, ctx, CONFSMOE_F32, 2, B, C, 0);
    if (r->failed)
        goto out;
    for (int m = 0; m < M; m++) {
        fill(in[m], seed * 10 + (uint64_t)m);
        fill(pool[m], seed * 10 + 5 + (uint64_t)m);
        TRY(r, ctx, confsmoe_model_set_pool(model, m, pool[m]));
    }
    for (int b = 0; b < B; b++) {
        u8(avail)[b * M + 0] = b != 1;
        u8(avail)[b * M + 1] = b != 2;
        i32(labels)[b] = (int32_t)((seed + (uint64_t)b) % C);
    }
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        TRY(r, ctx, confsmoe_optim_add(opt, confsmoe_model_param(model, i), confsmoe_model_grad(model, i)));
    for (int s = 0; s < STEPS && !r->failed; s++) {
        float loss = 0, task = 0;
        confsmoe_model_zero_grad(model);
        TRY(r, ctx,
            confsmoe_model_step(model, (const confsmoe_tensor *const *)in, avail, labels, logits, &loss, &task));
        rec_tensor(r, logits);
        rec_put(r, &loss, sizeof loss);
        rec_put(r, &task, sizeof task);
        for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
            rec_tensor(r, confsmoe_model_grad(model, i));
        TRY(r, ctx, confsmoe_optim_step(opt));
    }
    TRY(r, ctx, confsmoe_model_predict(model, (const confsmoe_tensor *const *)in, avail, logits));
    rec_tensor(r, logits);
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        rec_tensor(r, confsmoe_model_param(model, i));
    confsmoe_gate_stats gs = {.struct_size = sizeof gs};
    int64_t load[4];
    TRY(r, ctx, confsmoe_gate_stats_get(confsmoe_model_gate(model), CONFSMOE_STATS_TOTAL, &gs, load, NULL, 4));
    rec_put(r, load, sizeof load);
    /* A checkpoint of its own (concurrent saves make distinct temporary files). */
    char path[512];
    snprintf(path, sizeof path, "%s/job%d.safetensors", dir, id);
    TRY(r, ctx, confsmoe_checkpoint_save(model, opt, path));
    FILE *f = fopen(path, "rb");
    if (f) {
        unsigned char buf[4096];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, f)) > 0)
            rec_put(r, buf, got);
        fclose(f);
    } else {
        r->failed = 1;
        snprintf(r->err, sizeof r->err, "cannot reopen %s", path);
    }
    for (int32_t i = 0; i < confsmoe_model_n_params(model); i++)
        memset(confsmoe_tensor_data(confsmoe_model_param(model, i)), 0,
               confsmoe_tensor_nbytes(confsmoe_model_param(model, i)));
    TRY(r, ctx, confsmoe_checkpoint_load(model, opt, path));
    TRY(r, ctx, confsmoe_model_predict(model, (const confsmoe_tensor *const *)in, avail, logits));
    rec_tensor(r, logits);
    unlink(path);
out:
    for (int m = 0; m < M; m++) {
        confsmoe_tensor_destroy(in[m]);
        confsmoe_tensor_destroy(pool[m]);
    }
    confsmoe_tensor_destroy(avail);
    confsmoe_tensor_destroy(labels);
    confsmoe_tensor_destroy(logits);
    confsmoe_optim_destroy(opt);
    confsmoe_model_destroy(model);
    confsmoe_ctx_destroy(ctx);
}

/* ---- a gate over its own experts (Laplacian router, noisy, score gradient) and an imputer */

static void gate_job(uint64_t seed, int32_t threads, rec *r)
{
    enum { N = 700, D = 8, E = 4, K = 2, C = 3, M = 3, S = 1, B = 3 }; /* N: tokens in 3 chunks of the token loops */
    confsmoe_ctx *ctx = job_ctx(r, seed, threads);
    if (!ctx)
        return;
    confsmoe_expert *ex[E] = {0};
    for (int e = 0; e < E; e++)
        TRY(r, ctx, confsmoe_expert_create(ctx, D, 6, &ex[e]));
    confsmoe_gate_params gp;
    confsmoe_gate_params_init(&gp);
    gp.d = D;
    gp.k = K;
    gp.router = CONFSMOE_ROUTER_LAPLACIAN;
    gp.noisy = 1;
    gp.n_classes = C;
    gp.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
    gp.load_loss = CONFSMOE_LOAD_LOSS_ENTROPY;
    confsmoe_gate *g = NULL;
    if (!r->failed)
        TRY(r, ctx, confsmoe_gate_create(ctx, &gp, ex, E, &g));
    confsmoe_imputer_params ip;
    confsmoe_imputer_params_init(&ip);
    ip.d = D;
    ip.n_modalities = M;
    ip.tokens = S;
    ip.k = K;
    confsmoe_imputer *imp = NULL;
    TRY(r, ctx, confsmoe_imputer_create(ctx, &ip, &imp));
    confsmoe_tensor *x = mk(r, ctx, CONFSMOE_F32, 2, N, D, 0), *y = mk(r, ctx, CONFSMOE_F32, 2, N, D, 0);
    confsmoe_tensor *slots = mk(r, ctx, CONFSMOE_F32, 3, N, K, D), *dx = mk(r, ctx, CONFSMOE_F32, 2, N, D, 0);
    confsmoe_tensor *labels = mk(r, ctx, CONFSMOE_I32, 1, N, 0, 0);
    confsmoe_tensor *h = mk(r, ctx, CONFSMOE_F32, 3, B, M * S, D), *hout = mk(r, ctx, CONFSMOE_F32, 3, B, M * S, D);
    confsmoe_tensor *avail = mk(r, ctx, CONFSMOE_U8, 2, B, M, 0);
    const int64_t sdims[4] = {M, B * S, K, D};
    confsmoe_tensor *islots = NULL, *dslots = NULL;
    TRY(r, ctx, confsmoe_tensor_create(ctx, CONFSMOE_F32, 4, sdims, &islots));
    TRY(r, ctx, confsmoe_tensor_create(ctx, CONFSMOE_F32, 4, sdims, &dslots));
    confsmoe_tensor *dh = mk(r, ctx, CONFSMOE_F32, 3, B, M * S, D);
    if (r->failed)
        goto out;
    for (int t = 0; t < N; t++)
        i32(labels)[t] = t % C;
    fill(h, seed + 3);
    fill(islots, seed + 4);
    for (int b = 0; b < B; b++)
        for (int m = 0; m < M; m++)
            u8(avail)[b * M + m] = (b + m) % 3 != 0;
    for (int s = 0; s < STEPS && !r->failed; s++) {
        fill(x, seed * 100 + (uint64_t)s);
        float loss = 0;
        confsmoe_saved *sv = NULL;
        TRY(r, ctx, confsmoe_gate_forward(g, x, labels, NULL, y, NULL, slots, &loss, &sv));
        rec_tensor(r, y);
        rec_tensor(r, slots);
        rec_put(r, &loss, sizeof loss);
        TRY(r, ctx, confsmoe_gate_backward(g, sv, y, NULL, 1.0f, dx));
        confsmoe_saved_destroy(sv);
        rec_tensor(r, dx);
        sv = NULL;
        TRY(r, ctx, confsmoe_imputer_forward(imp, h, islots, avail, hout, &sv));
        TRY(r, ctx, confsmoe_imputer_backward(imp, sv, hout, dh, dslots));
        confsmoe_saved_destroy(sv);
        rec_tensor(r, hout);
        rec_tensor(r, dh);
        rec_tensor(r, dslots);
    }
    for (int32_t i = 0; g && i < confsmoe_gate_n_params(g); i++)
        rec_tensor(r, confsmoe_gate_grad(g, i));
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; ex[e] && i < confsmoe_expert_n_params(ex[e]); i++)
            rec_tensor(r, confsmoe_expert_grad(ex[e], i));
    for (int32_t i = 0; imp && i < confsmoe_imputer_n_params(imp); i++)
        rec_tensor(r, confsmoe_imputer_grad(imp, i));
out:;
    confsmoe_tensor *ts[] = {x, y, slots, dx, labels, h, hout, avail, islots, dslots, dh};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
        confsmoe_tensor_destroy(ts[i]);
    confsmoe_imputer_destroy(imp);
    confsmoe_gate_destroy(g);
    for (int e = 0; e < E; e++)
        confsmoe_expert_destroy(ex[e]);
    confsmoe_ctx_destroy(ctx);
}

/* ---- the harness */

typedef struct {
    int id;
    int32_t threads;      /* its ctx's n_threads */
    const char *dir;
    pthread_barrier_t *start;
    rec out;
} job;

/* Jobs 0, 2, 4 are models, 1, 3, 5 gates; jobs i and i + 4 share a seed, so that two
 * threads run the very same computation at the same time. */
static void run_job(job *j)
{
    const uint64_t seed = 1 + (uint64_t)(j->id % 4);
    if (j->id % 2 == 0)
        model_job(seed, j->threads, j->dir, j->id, &j->out);
    else
        gate_job(seed, j->threads, &j->out);
}

static void *thread_main(void *arg)
{
    job *j = arg;
    pthread_barrier_wait(j->start);
    run_job(j);
    return NULL;
}

/* The jobs one after another, each on a ctx of n_threads `threads`. */
static void run_serial(job *serial, const char *dir, int32_t threads)
{
    for (int i = 0; i < N_JOBS; i++) {
        serial[i] = (job){.id = i, .threads = threads, .dir = dir};
        run_job(&serial[i]);
        ck_assert_msg(!serial[i].out.failed, "serial job %d (n_threads %d): %s", i, (int)threads, serial[i].out.err);
        ck_assert_uint_gt(serial[i].out.n, 0);
    }
}

static bool same_results(const job *a, const job *b)
{
    return a->out.n == b->out.n && memcmp(a->out.b, b->out.b, a->out.n) == 0;
}

static void free_results(job *jobs)
{
    for (int i = 0; i < N_JOBS; i++)
        free(jobs[i].out.b);
}

/* ROUNDS rounds of the jobs in concurrent host threads, on ctxs of n_threads `threads`: each
 * job's results are those of `serial`. */
static void ck_concurrent_equals(const job *serial, const char *dir, int32_t threads)
{
    for (int round = 0; round < ROUNDS; round++) {
        pthread_barrier_t start;
        ck_assert_int_eq(pthread_barrier_init(&start, NULL, N_JOBS), 0);
        job par[N_JOBS];
        pthread_t th[N_JOBS];
        for (int i = 0; i < N_JOBS; i++) {
            par[i] = (job){.id = i, .threads = threads, .dir = dir, .start = &start};
            ck_assert_int_eq(pthread_create(&th[i], NULL, thread_main, &par[i]), 0);
        }
        for (int i = 0; i < N_JOBS; i++)
            ck_assert_int_eq(pthread_join(th[i], NULL), 0);
        pthread_barrier_destroy(&start);
        for (int i = 0; i < N_JOBS; i++) {
            ck_assert_msg(!par[i].out.failed, "round %d, thread %d: %s", round, i, par[i].out.err);
            ck_assert_msg(same_results(&par[i], &serial[i]),
                          "round %d, thread %d (n_threads %d): %zu bytes of results differ from the serial run", round,
                          i, (int)threads, par[i].out.n);
        }
        free_results(par);
    }
}

START_TEST(test_concurrent_equals_serial)
{
    char dir[64];
    test_mkdtemp(dir, sizeof dir, "threads");
    job serial[N_JOBS];
    run_serial(serial, dir, 0);
    /* Same seed, same job: the serial runs agree with each other already. */
    for (int i = 0; i + 4 < N_JOBS; i++)
        ck_assert(same_results(&serial[i], &serial[i + 4]));
    ck_concurrent_equals(serial, dir, 0);
    free_results(serial);
    test_rm_dir(dir);
}
END_TEST

/* The ctx's own threads change no bit: 2, and 4 (more than the cores of a small machine), give
 * the results of 1, one job at a time and with the jobs' ctxs running concurrently. */
START_TEST(test_ctx_threads_same_results)
{
    char dir[64];
    test_mkdtemp(dir, sizeof dir, "threads");
    job one[N_JOBS], more[N_JOBS];
    run_serial(one, dir, 1);
    const int32_t counts[] = {2, 4};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        run_serial(more, dir, counts[c]);
        for (int i = 0; i < N_JOBS; i++)
            ck_assert_msg(same_results(&more[i], &one[i]), "job %d: n_threads %d differs from 1", i, (int)counts[c]);
        free_results(more);
    }
    ck_concurrent_equals(one, dir, 2);
    free_results(one);
    test_rm_dir(dir);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("threads");
    TCase *tc = tcase_create("separate contexts");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_concurrent_equals_serial);
    suite_add_tcase(s, tc);
    TCase *tt = tcase_create("ctx threads");
    tcase_set_timeout(tt, 600);
    tcase_add_test(tt, test_ctx_threads_same_results);
    suite_add_tcase(s, tt);
    return test_run(s);
}
