/* The library's own worker threads (threads.h): the calling thread's OpenMP team when the
 * library is built for OpenMP (CSM_THREADS_OPENMP), else a pool of POSIX threads per ctx. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"
#include "threads.h"

typedef struct {
    csm_task_fn fn;
    void *arg;
    int64_t n, grain;
    atomic_llong next; /* the first item not yet claimed */
} threads_job;

static _Thread_local bool threads_in_worker;

bool csm_threads_in_worker(void) { return threads_in_worker; }

int32_t csm_threads_from_env(void)
{
    const char *v = getenv("CONFSMOE_NUM_THREADS");
    const long parsed = v ? strtol(v, NULL, 10) : 1;
    return parsed < 1 ? 1 : parsed > CSM_MAX_THREADS ? CSM_MAX_THREADS : (int32_t)parsed;
}

int csm_parallel_workers(const confsmoe_ctx *ctx, int64_t n)
{
    const int t = threads_in_worker ? 1 : ctx->threads;
    return n < t ? (n < 1 ? 1 : (int)n) : t;
}

static void threads_run_items(threads_job *job, int worker)
{
    threads_in_worker = true;
    for (;;) {
        const int64_t begin = (int64_t)atomic_fetch_add(&job->next, (long long)job->grain);
        if (begin >= job->n)
            break;
        const int64_t end = begin + job->grain < job->n ? begin + job->grain : job->n;
        job->fn(job->arg, begin, end, worker);
    }
    threads_in_worker = false;
}

static void threads_run_inline(const threads_job *job)
{
    for (int64_t begin = 0; begin < job->n; begin += job->grain)
        job->fn(job->arg, begin, begin + job->grain < job->n ? begin + job->grain : job->n, 0);
}

#ifdef CSM_THREADS_OPENMP
/* ------------------------------------------------------------------ OpenMP
 *
 * With BLIS built for OpenMP, the calling thread's OpenMP team is the set of threads BLIS runs
 * on: a region reuses them, and neither the library's threads nor BLIS's wait for the other's
 * idle threads, which libgomp keeps polling for milliseconds after each region. */
#include <omp.h>

confsmoe_status csm_threads_ctx_init(confsmoe_ctx *ctx)
{
    (void)ctx; /* the team belongs to the calling thread, not to the ctx */
    return CONFSMOE_OK;
}

void csm_threads_ctx_release(confsmoe_ctx *ctx) { (void)ctx; }

void csm_parallel_for(confsmoe_ctx *ctx, int64_t n, int64_t grain, csm_task_fn fn, void *arg)
{
    threads_job job = {fn, arg, n, grain < 1 ? 1 : grain, 0};
    const int workers = csm_parallel_workers(ctx, n);
    if (workers <= 1) {
        threads_run_inline(&job);
        return;
    }
#pragma omp parallel num_threads(workers)
    threads_run_items(&job, omp_get_thread_num());
}

#else
/* ------------------------------------------------------------------ POSIX threads
 *
 * The ctx's pool holds up to ctx->threads - 1 threads, started at the first region with work
 * for them and joined when the ctx is freed. The caller posts a region to the threads it needs
 * (a counter per thread, on a cache line of its own), runs items itself as worker 0, then waits
 * for the posted threads to finish theirs. */
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* How long an idle worker, and a caller waiting for its workers, poll before sleeping. The
 * regions of a gate call come tens to hundreds of microseconds apart: sleeping at once made the
 * small gate 22% slower at 2 threads, and 50 us 6%; polling longer costs when other processes
 * share the cores (docs/PERFORMANCE.md, "Threads of the library's own"). */
#define THREADS_SPIN_NS UINT64_C(200000)

typedef struct csm_thread_pool csm_thread_pool;

typedef struct {
    _Alignas(64) atomic_uint posted; /* regions posted to this thread, counted (wraps) */
    csm_thread_pool *pool;
    int worker;                      /* its worker index, 1 .. capacity */
    pthread_t thread;
} threads_slot;

struct csm_thread_pool {
    pthread_mutex_t lock;
    pthread_cond_t wake;        /* sleeping workers wait here for a region */
    pthread_cond_t done;        /* a sleeping caller waits here for its last worker */
    threads_job *job;           /* the running region's (on the caller's stack) */
    atomic_uint pending;        /* workers posted to the running region and not done with it */
    atomic_int sleepers;        /* workers asleep on wake, or about to be */
    atomic_bool caller_asleep;  /* the caller is asleep on done, or about to be */
    atomic_bool stopping;
    pid_t pid;                  /* the ctx's process (in a forked child the threads are gone) */
    bool started;               /* threads_start ran */
    int capacity;               /* threads it may start: ctx->threads - 1 */
    int n_workers;              /* threads started */
    threads_slot slot[];        /* [capacity] */
};

static uint64_t threads_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * UINT64_C(1000000000) + (uint64_t)t.tv_nsec;
}

/* A hint to the core that this is a polling loop (it yields to the sibling hyperthread). */
static inline void threads_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Whether *word moves from `value` (or, when until_zero, reaches 0) within THREADS_SPIN_NS. */
static bool threads_spin(const atomic_uint *word, unsigned value, bool until_zero)
{
    const uint64_t start = threads_now_ns();
    for (unsigned round = 1;; round++) {
        const unsigned now = atomic_load(word);
        if (until_zero ? now == 0 : now != value)
            return true;
        if (round % 64 == 0 && threads_now_ns() - start > THREADS_SPIN_NS)
            return false;
        threads_relax();
    }
}

/* The sleeping side of both waits pairs a seq_cst counter or flag (sleepers, caller_asleep),
 * set under the lock before its last check, with the waker's seq_cst store then load: either
 * the sleeper sees the new value, or the waker sees the sleeper and signals under the lock. */

/* Waits until the caller posts a region to this thread (true) or the pool stops (false). */
static bool threads_await_post(csm_thread_pool *pool, threads_slot *slot, unsigned seen)
{
    if (threads_spin(&slot->posted, seen, false))
        return true;
    pthread_mutex_lock(&pool->lock);
    atomic_fetch_add(&pool->sleepers, 1);
    while (atomic_load(&slot->posted) == seen && !atomic_load(&pool->stopping))
        pthread_cond_wait(&pool->wake, &pool->lock);
    atomic_fetch_sub(&pool->sleepers, 1);
    pthread_mutex_unlock(&pool->lock);
    return atomic_load(&slot->posted) != seen;
}

static void *threads_worker_main(void *p)
{
    threads_slot *slot = p;
    csm_thread_pool *pool = slot->pool;
    unsigned seen = 0;
    while (threads_await_post(pool, slot, seen)) {
        seen = atomic_load(&slot->posted);
        threads_run_items(pool->job, slot->worker);
        /* The job is not touched after this: the caller may return at once. */
        if (atomic_fetch_sub(&pool->pending, 1) == 1 && atomic_load(&pool->caller_asleep)) {
            pthread_mutex_lock(&pool->lock);
            pthread_cond_signal(&pool->done);
            pthread_mutex_unlock(&pool->lock);
        }
    }
    return NULL;
}

static void threads_await_workers(csm_thread_pool *pool)
{
    if (threads_spin(&pool->pending, 0, true))
        return;
    pthread_mutex_lock(&pool->lock);
    atomic_store(&pool->caller_asleep, true);
    while (atomic_load(&pool->pending) != 0)
        pthread_cond_wait(&pool->done, &pool->lock);
    atomic_store(&pool->caller_asleep, false);
    pthread_mutex_unlock(&pool->lock);
}

/* Starts the pool's threads, or as many as the system gives (possibly none), once. */
static void threads_start(csm_thread_pool *pool)
{
    pool->started = true;
    /* Signals go to the host's threads, never to the library's. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int i = 0; i < pool->capacity; i++) {
        threads_slot *slot = &pool->slot[i];
        atomic_init(&slot->posted, 0);
        slot->pool = pool;
        slot->worker = i + 1;
        if (pthread_create(&slot->thread, NULL, threads_worker_main, slot) != 0)
            break; /* fewer workers: the regions still run, on those there are */
        pool->n_workers = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

confsmoe_status csm_threads_ctx_init(confsmoe_ctx *ctx)
{
    if (ctx->threads <= 1)
        return CONFSMOE_OK;
    const int capacity = ctx->threads - 1;
    const size_t bytes = sizeof(csm_thread_pool) + (size_t)capacity * sizeof(threads_slot);
    csm_thread_pool *pool = csm_alloc(ctx, bytes);
    if (!pool)
        return CONFSMOE_E_NOMEM;
    memset(pool, 0, bytes);
    if (pthread_mutex_init(&pool->lock, NULL) != 0) {
        csm_free(ctx, pool);
        return CONFSMOE_E_NOMEM;
    }
    if (pthread_cond_init(&pool->wake, NULL) != 0) {
        pthread_mutex_destroy(&pool->lock);
        csm_free(ctx, pool);
        return CONFSMOE_E_NOMEM;
    }
    if (pthread_cond_init(&pool->done, NULL) != 0) {
        pthread_cond_destroy(&pool->wake);
        pthread_mutex_destroy(&pool->lock);
        csm_free(ctx, pool);
        return CONFSMOE_E_NOMEM;
    }
    atomic_init(&pool->pending, 0);
    atomic_init(&pool->sleepers, 0);
    atomic_init(&pool->caller_asleep, false);
    atomic_init(&pool->stopping, false);
    pool->pid = getpid();
    pool->capacity = capacity;
    ctx->pool = pool;
    return CONFSMOE_OK;
}

void csm_threads_ctx_release(confsmoe_ctx *ctx)
{
    csm_thread_pool *pool = ctx->pool;
    if (!pool)
        return;
    /* In a forked child the threads, and the state of the lock, are the parent's: only the
     * memory is the child's. */
    if (pool->pid == getpid()) {
        atomic_store(&pool->stopping, true);
        pthread_mutex_lock(&pool->lock);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->lock);
        for (int i = 0; i < pool->n_workers; i++)
            pthread_join(pool->slot[i].thread, NULL);
        pthread_cond_destroy(&pool->done);
        pthread_cond_destroy(&pool->wake);
        pthread_mutex_destroy(&pool->lock);
    }
    csm_free(ctx, pool);
    ctx->pool = NULL;
}

void csm_parallel_for(confsmoe_ctx *ctx, int64_t n, int64_t grain, csm_task_fn fn, void *arg)
{
    threads_job job = {fn, arg, n, grain < 1 ? 1 : grain, 0};
    int workers = csm_parallel_workers(ctx, n);
    csm_thread_pool *pool = ctx->pool;
    /* In a forked child the pool's threads are the parent's: the regions run inline. */
    if (workers > 1 && pool->pid != getpid())
        workers = 1;
    if (workers > 1) {
        if (!pool->started)
            threads_start(pool);
        if (workers > pool->n_workers + 1)
            workers = pool->n_workers + 1;
    }
    if (workers <= 1) {
        threads_run_inline(&job);
        return;
    }
    pool->job = &job;
    atomic_store(&pool->pending, (unsigned)(workers - 1));
    for (int i = 0; i < workers - 1; i++)
        atomic_fetch_add(&pool->slot[i].posted, 1);
    if (atomic_load(&pool->sleepers) > 0) {
        pthread_mutex_lock(&pool->lock);
        pthread_cond_broadcast(&pool->wake);
        pthread_mutex_unlock(&pool->lock);
    }
    threads_run_items(&job, 0);
    threads_await_workers(pool);
}
#endif /* CSM_THREADS_OPENMP */
