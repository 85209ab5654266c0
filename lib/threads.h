/* Private: the library's own worker threads.
 *
 * A ctx runs csm_parallel_for on ctx->threads threads, the caller included:
 * confsmoe_ctx_params.n_threads, or, when that is 0, CONFSMOE_NUM_THREADS as it is when the ctx
 * is created (else 1: no threads of the library's own). Which threads they are is fixed at build
 * time (lib/meson.build, option openmp):
 *   - CSM_THREADS_OPENMP (BLIS built for OpenMP, Debian's default): the calling thread's OpenMP
 *     team, the very threads BLIS runs on, through `#pragma omp parallel num_threads(...)`;
 *   - otherwise a pool of POSIX threads that the ctx owns: made with the ctx, its threads
 *     started at the first region with work for them, joined when the ctx is freed; between
 *     regions they poll briefly, then sleep. A forked child runs its regions inline.
 * Two sets of threads would compete for the cores: libgomp's idle team polls for milliseconds
 * after each BLIS call (docs/PERFORMANCE.md, "Threads of the library's own").
 *
 * With BLIS: inside a region every product runs on one BLIS thread, outside on ctx->threads
 * (gemm.c asks csm_threads_in_worker() and sets a per-call rntm_t; the process-global BLIS
 * setting is never touched), so the workers and BLIS's own threads never oversubscribe the
 * cores: BLIS is threaded outside the regions, the library inside them. */
#ifndef CONFSMOE_THREADS_H
#define CONFSMOE_THREADS_H

#include <stdbool.h>
#include <stdint.h>

#include "internal.h"

/* The most threads a ctx runs (confsmoe_ctx_params.n_threads; CONFSMOE_NUM_THREADS is capped). */
#define CSM_MAX_THREADS 64

/* fn(arg, begin, end, worker) runs the items [begin, end); worker is in [0, workers). */
typedef void (*csm_task_fn)(void *arg, int64_t begin, int64_t end, int worker);

/* The fallback for n_threads 0: CONFSMOE_NUM_THREADS, in [1, CSM_MAX_THREADS]; 1 when unset. */
int32_t csm_threads_from_env(void);

/* After ctx->threads is set: what the ctx needs for its threads (the pool's memory, without
 * OpenMP). CONFSMOE_E_NOMEM, with nothing kept, when it cannot be had. */
confsmoe_status csm_threads_ctx_init(confsmoe_ctx *ctx);
/* At the ctx's last release: joins the pool's threads and frees it. */
void csm_threads_ctx_release(confsmoe_ctx *ctx);

/* How many workers csm_parallel_for(ctx, n, ...) uses: at most ctx->threads and n, and 1 inside
 * a worker (a region entered from a worker runs inline). Size per-worker scratch with it. */
int csm_parallel_workers(const confsmoe_ctx *ctx, int64_t n);

/* Runs fn over [0, n) in chunks of `grain` items, claimed in order by up to
 * csm_parallel_workers(ctx, n) workers (the caller is worker 0), and returns when all are done.
 * The items must be independent: which worker runs which item changes from run to run. Never
 * fails: with fewer threads than asked for (none could be started), the items run on those
 * there are. */
void csm_parallel_for(confsmoe_ctx *ctx, int64_t n, int64_t grain, csm_task_fn fn, void *arg);

/* True on a thread while it runs items of a region of several workers (the caller too). */
bool csm_threads_in_worker(void);

#endif /* CONFSMOE_THREADS_H */
