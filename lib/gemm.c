/* Every matrix product of the library goes through BLIS here, and so does the library's
 * own (opt-in) threading, so that the two compose. */
#define _GNU_SOURCE /* RTLD_DEFAULT */
#include <blis.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* libgomp is not built with ThreadSanitizer, so TSan cannot see that GOMP_parallel starts its
 * team after the job is written and returns only after every member is done. These two
 * annotations state exactly that (tests/sanitize/run tsan); they are nothing elsewhere. */
#if defined(__SANITIZE_THREAD__)
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define CSM_TSAN_ACQUIRE(p) __tsan_acquire(p)
#define CSM_TSAN_RELEASE(p) __tsan_release(p)
#else
#define CSM_TSAN_ACQUIRE(p) ((void)0)
#define CSM_TSAN_RELEASE(p) ((void)0)
#endif

/* Inside a worker of csm_parallel_for, BLIS runs single-threaded: the workers already
 * occupy the cores that BLIS_NUM_THREADS would have used. */
static _Thread_local bool in_worker;

/* Products with m n k at most this are computed here: a BLIS call costs a few microseconds
 * of framework overhead (object setup, checks, packing), which is more than the arithmetic of
 * the per-(sample, head) attention products (L x L x d/heads, e.g. 6 x 6 x 32), issued
 * thousands of times per step. Measured on the handwritten model: 30% of a training step. */
#define SMALL_GEMM_MNK 4096

/* Each BLIS thread gets at least this many multiply-adds (about 25 us of one core). Below it,
 * starting and joining BLIS's team costs more than the split saves: at BLIS_NUM_THREADS=2 the
 * small gate (64 x 128 x 128 expert products) took twice as long as at 1 (docs/PERFORMANCE.md). */
#define MNK_PER_BLIS_THREAD (INT64_C(1) << 20)

/* C = beta C (C = 0 when beta is 0, as BLIS does: no NaN from the old C survives). */
static void scale_c(int64_t m, int64_t n, float beta, float *c, int64_t ldc)
{
    for (int64_t i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (beta == 0.0f)
            memset(ci, 0, (size_t)n * sizeof *ci);
        else
            for (int64_t j = 0; j < n; j++)
                ci[j] *= beta;
    }
}

/* y += s x; restrict lets the compiler vectorise it (C never overlaps A or B). */
static inline void axpy_row(float *restrict y, float s, const float *restrict x, int64_t n)
{
    for (int64_t j = 0; j < n; j++)
        y[j] += s * x[j];
}

/* The same product as BLIS, with the loop order of each case chosen so that the innermost
 * loop runs along contiguous rows (axpy form) where it can. */
CSM_SIMD_CLONES
static void small_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                       int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    scale_c(m, n, beta, c, ldc);
    for (int64_t i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (!trans_b) {
            /* C[i,:] += alpha op(A)[i,p] B[p,:] */
            for (int64_t p = 0; p < k; p++) {
                const float s = alpha * (trans_a ? a[p * lda + i] : a[i * lda + p]);
                axpy_row(ci, s, b + p * ldb, n);
            }
        } else if (!trans_a) {
            /* C[i,j] += alpha A[i,:] . B[j,:], in 8 lanes so that the compiler vectorises it. */
            const float *ai = a + i * lda;
            for (int64_t j = 0; j < n; j++) {
                const float *bj = b + j * ldb;
                float lane[8] = {0};
                int64_t p = 0;
                for (; p + 8 <= k; p += 8)
                    for (int l = 0; l < 8; l++)
                        lane[l] += ai[p + l] * bj[p + l];
                float acc = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
                for (; p < k; p++)
                    acc += ai[p] * bj[p];
                ci[j] += alpha * acc;
            }
        } else {
            /* C[i,j] += alpha A[:,i] . B[j,:] */
            for (int64_t j = 0; j < n; j++) {
                const float *bj = b + j * ldb;
                float acc = 0.0f;
                for (int64_t p = 0; p < k; p++)
                    acc += a[p * lda + i] * bj[p];
                ci[j] += alpha * acc;
            }
        }
    }
}

void csm_gemm_ld(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                 int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc)
{
    if (m == 0 || n == 0)
        return;
    if (k == 0) {
        /* An empty sum: BLIS is not asked to handle it. */
        scale_c(m, n, beta, c, ldc);
        return;
    }
    if (m * n * k <= SMALL_GEMM_MNK) {
        small_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    /* BLIS 0.9.0's small-matrix ("sup") kernels read past the end of their operands
     * (flame/blis#635, #821: fixed upstream after 0.9.0, the Debian 12 version), which
     * can fault when a host buffer ends at a page boundary. The packed path reads in bounds. */
    rntm_t rntm;
    bli_rntm_init_from_global(&rntm);
    bli_rntm_disable_l3_sup(&rntm);
    /* team is -1 when the host gave BLIS per-loop ways (BLIS_JC_NT, ...) instead of a count:
     * those are kept unless the product is worth one thread only. */
    const dim_t team = bli_rntm_num_threads(&rntm);
    int64_t useful = in_worker ? 1 : m * n * k / MNK_PER_BLIS_THREAD;
    if (useful < 1)
        useful = 1;
    if (team < 1 ? useful == 1 : useful < team)
        bli_rntm_set_num_threads((dim_t)useful, &rntm);
    /* BLIS takes the strides of the stored matrix and applies the transpose itself. */
    bli_sgemm_ex(trans_a ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE, trans_b ? BLIS_TRANSPOSE : BLIS_NO_TRANSPOSE,
                 (dim_t)m, (dim_t)n, (dim_t)k, &alpha, (float *)a, (inc_t)lda, 1, (float *)b, (inc_t)ldb, 1, &beta, c,
                 (inc_t)ldc, 1, NULL, &rntm);
}

void csm_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
              const float *b, float beta, float *c)
{
    csm_gemm_ld(trans_a, trans_b, m, n, k, alpha, a, trans_a ? m : k, b, trans_b ? k : n, beta, c, n);
}

/* ------------------------------------------------------------------ own threads (opt-in) */

int csm_num_threads(void)
{
    /* Read once: CONFSMOE_NUM_THREADS, default 1 (no threads of our own). Capped at 64. */
    static atomic_int cached = 0;
    int n = atomic_load(&cached);
    if (n == 0) {
        const char *v = getenv("CONFSMOE_NUM_THREADS");
        long parsed = v ? strtol(v, NULL, 10) : 1;
        n = parsed < 1 ? 1 : parsed > 64 ? 64 : (int)parsed;
        atomic_store(&cached, n);
    }
    return n;
}

typedef struct {
    csm_task_fn fn;
    void *arg;
    int64_t n, grain;
    atomic_llong next;
} pool_job;

static void run_items(pool_job *job, int worker)
{
    const bool outer = in_worker;
    in_worker = true;
    for (;;) {
        const int64_t begin = (int64_t)atomic_fetch_add(&job->next, (long long)job->grain);
        if (begin >= job->n)
            break;
        const int64_t end = begin + job->grain < job->n ? begin + job->grain : job->n;
        job->fn(job->arg, begin, end, worker);
    }
    in_worker = outer;
}

/* With the OpenMP build of BLIS (Debian's default), libgomp is in the process: the workers
 * are then its thread team, the very threads BLIS runs on, so no thread is created per call
 * and none competes with an idle BLIS thread still spinning for work. The entry points are
 * looked up at run time (GOMP_parallel is the call GCC emits for "omp parallel"), because
 * the library itself is not built with OpenMP; without them, plain threads are started. */
typedef void (*gomp_parallel_fn)(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
typedef int (*omp_thread_num_fn)(void);

typedef struct {
    pool_job *job;
    omp_thread_num_fn thread_num;
} gomp_job;

static void gomp_body(void *p)
{
    CSM_TSAN_ACQUIRE(p);
    gomp_job *g = p;
    run_items(g->job, g->thread_num());
    CSM_TSAN_RELEASE(p);
}

typedef struct {
    pool_job *job;
    int worker;
} thread_arg;

static void *thread_main(void *p)
{
    thread_arg *a = p;
    run_items(a->job, a->worker);
    return NULL;
}

int csm_parallel_workers(int64_t n)
{
    int t = in_worker ? 1 : csm_num_threads();
    return n < t ? (n < 1 ? 1 : (int)n) : t;
}

void csm_parallel_for(int64_t n, int64_t grain, csm_task_fn fn, void *arg)
{
    const int t = csm_parallel_workers(n);
    pool_job job = {fn, arg, n, grain < 1 ? 1 : grain, 0};
    if (t <= 1) {
        for (int64_t begin = 0; begin < n; begin += job.grain)
            fn(arg, begin, begin + job.grain < n ? begin + job.grain : n, 0);
        return;
    }
    static _Atomic(gomp_parallel_fn) gomp_parallel;
    static _Atomic(omp_thread_num_fn) thread_num;
    static atomic_int looked_up;
    if (!atomic_load(&looked_up)) {
        void *a = dlsym(RTLD_DEFAULT, "GOMP_parallel"), *b = dlsym(RTLD_DEFAULT, "omp_get_thread_num");
        if (a && b) {
            /* Object to function pointer: the POSIX way of dlsym. */
            gomp_parallel_fn fa;
            omp_thread_num_fn fb;
            memcpy(&fa, &a, sizeof fa);
            memcpy(&fb, &b, sizeof fb);
            atomic_store(&gomp_parallel, fa);
            atomic_store(&thread_num, fb);
        }
        atomic_store(&looked_up, 1);
    }
    gomp_parallel_fn gp = atomic_load(&gomp_parallel);
    if (gp) {
        gomp_job g = {&job, atomic_load(&thread_num)};
        CSM_TSAN_RELEASE(&g);
        gp(gomp_body, &g, (unsigned)t, 0);
        CSM_TSAN_ACQUIRE(&g);
        return;
    }
    pthread_t tid[64];
    thread_arg args[64];
    int started = 0;
    for (int i = 1; i < t; i++) {
        args[i] = (thread_arg){&job, i};
        if (pthread_create(&tid[i], NULL, thread_main, &args[i]) != 0)
            break; /* fewer workers: the items left still run, here */
        started = i;
    }
    run_items(&job, 0);
    for (int i = 1; i <= started; i++)
        pthread_join(tid[i], NULL);
}
