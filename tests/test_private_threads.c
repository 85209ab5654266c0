/* The library's own threads (lib/threads.h), called directly: every item runs exactly once, on
 * a worker index below csm_parallel_workers; the threads of the ctx take items; a region entered
 * from a worker runs inline; regions far apart (the workers asleep between them) still run;
 * csm_threads_in_worker is true inside a region of several workers only; and n_threads 0 takes
 * CONFSMOE_NUM_THREADS at create. Without OpenMP (the ctx's own pool of POSIX threads): the
 * pool's memory comes with the ctx (from the host allocator), its threads start at the first
 * region and are joined when the ctx is freed, and a forked child runs its regions inline. */
#include <dirent.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <time.h>

#include "internal.h"
#include "testutil.h"
#include "threads.h"

enum { ITEMS = 1000, MAX_WORKERS = 8 };

typedef struct {
    confsmoe_ctx *ctx;
    atomic_int runs[ITEMS];          /* times each item ran */
    atomic_int items_of[MAX_WORKERS]; /* items each worker index ran */
    atomic_int bad_worker;           /* a worker index out of range */
    atomic_int outside_worker;       /* an item of a region of several workers ran without
                                        csm_threads_in_worker */
    atomic_int nested_not_inline;    /* a nested region ran off its caller's thread or index */
    int workers;                     /* csm_parallel_workers of the region */
    bool nest;                       /* each chunk enters a region of its own */
    bool wait_for_two;               /* the first chunk waits (up to 2 s) for a second worker */
} tally;

typedef struct {
    pthread_t caller;
    atomic_int *wrong;
} nested_check;

static void nested_item(void *arg, int64_t begin, int64_t end, int worker)
{
    nested_check *c = arg;
    (void)begin;
    (void)end;
    if (!pthread_equal(pthread_self(), c->caller) || worker != 0)
        atomic_fetch_add(c->wrong, 1);
}

static int busy_workers(tally *t)
{
    int busy = 0;
    for (int w = 0; w < MAX_WORKERS; w++)
        busy += atomic_load(&t->items_of[w]) > 0;
    return busy;
}

static bool another_worker_ran(tally *t, int worker)
{
    for (int w = 0; w < MAX_WORKERS; w++)
        if (w != worker && atomic_load(&t->items_of[w]) > 0)
            return true;
    return false;
}

/* No Check assertions here: items run off the main thread; the tally is checked afterwards. */
static void count_items(void *arg, int64_t begin, int64_t end, int worker)
{
    tally *t = arg;
    if (worker < 0 || worker >= t->workers) {
        atomic_fetch_add(&t->bad_worker, 1);
        return;
    }
    if (t->workers > 1 && !csm_threads_in_worker())
        atomic_fetch_add(&t->outside_worker, 1);
    if (t->wait_for_two && begin == 0) {
        /* Hold the first chunk until another worker has run one, so that the pool's threads
         * demonstrably take items (one worker would otherwise be free to take them all). */
        const struct timespec tick = {0, 1000 * 1000};
        for (int i = 0; i < 2000 && !another_worker_ran(t, worker); i++)
            nanosleep(&tick, NULL);
    }
    for (int64_t i = begin; i < end; i++)
        atomic_fetch_add(&t->runs[i], 1);
    atomic_fetch_add(&t->items_of[worker], (int)(end - begin));
    if (t->nest) {
        nested_check c = {pthread_self(), &t->nested_not_inline};
        if (csm_parallel_workers(t->ctx, 100) != 1)
            atomic_fetch_add(&t->nested_not_inline, 1);
        csm_parallel_for(t->ctx, 4, 1, nested_item, &c);
    }
}

/* One region over ITEMS items in chunks of grain; checks every item ran once. Returns the
 * number of worker indices that ran items. */
static int run_region(tally *t, int64_t grain)
{
    for (int i = 0; i < ITEMS; i++)
        atomic_store(&t->runs[i], 0);
    for (int w = 0; w < MAX_WORKERS; w++)
        atomic_store(&t->items_of[w], 0);
    t->workers = csm_parallel_workers(t->ctx, ITEMS);
    csm_parallel_for(t->ctx, ITEMS, grain, count_items, t);
    for (int i = 0; i < ITEMS; i++)
        ck_assert_msg(atomic_load(&t->runs[i]) == 1, "item %d ran %d times", i, atomic_load(&t->runs[i]));
    int total = 0;
    for (int w = 0; w < MAX_WORKERS; w++)
        total += atomic_load(&t->items_of[w]);
    ck_assert_int_eq(total, ITEMS);
    const int bad_worker = atomic_load(&t->bad_worker), outside_worker = atomic_load(&t->outside_worker);
    ck_assert_int_eq(bad_worker, 0);
    ck_assert_int_eq(outside_worker, 0);
    ck_assert(!csm_threads_in_worker());
    return busy_workers(t);
}

START_TEST(test_every_item_once)
{
    const int32_t counts[] = {1, 2, 3, 8};
    const int64_t grains[] = {1, 7, ITEMS, 5000};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
        tally *t = calloc(1, sizeof *t);
        t->ctx = test_ctx_threads(counts[c]);
        ck_assert_int_eq(csm_parallel_workers(t->ctx, ITEMS), counts[c]);
        /* Fewer items than threads: as many workers as items, and 1 for none. */
        ck_assert_int_eq(csm_parallel_workers(t->ctx, 1), 1);
        ck_assert_int_eq(csm_parallel_workers(t->ctx, 0), 1);
        for (size_t g = 0; g < sizeof grains / sizeof grains[0]; g++)
            run_region(t, grains[g]);
        confsmoe_ctx_destroy(t->ctx);
        free(t);
    }
}
END_TEST

START_TEST(test_pool_threads_take_items)
{
    tally *t = calloc(1, sizeof *t);
    t->ctx = test_ctx_threads(2);
    t->wait_for_two = true;
    ck_assert_int_eq(run_region(t, 1), 2);
    confsmoe_ctx_destroy(t->ctx);
    free(t);
}
END_TEST

START_TEST(test_nested_region_inline)
{
    tally *t = calloc(1, sizeof *t);
    t->ctx = test_ctx_threads(3);
    t->nest = true;
    run_region(t, 10);
    const int nested_not_inline = atomic_load(&t->nested_not_inline);
    ck_assert_int_eq(nested_not_inline, 0);
    confsmoe_ctx_destroy(t->ctx);
    free(t);
}
END_TEST

/* Regions far apart (beyond the workers' polling time) wake sleeping workers. */
START_TEST(test_regions_after_sleep)
{
    tally *t = calloc(1, sizeof *t);
    t->ctx = test_ctx_threads(2);
    t->wait_for_two = true;
    const struct timespec pause = {0, 20 * 1000 * 1000};
    for (int round = 0; round < 5; round++) {
        nanosleep(&pause, NULL);
        ck_assert_int_eq(run_region(t, 1), 2);
    }
    confsmoe_ctx_destroy(t->ctx);
    free(t);
}
END_TEST

/* n_threads 0 takes CONFSMOE_NUM_THREADS as it is at create (1 when unset, not a positive number,
 * capped at 64); a nonzero n_threads ignores it. */
START_TEST(test_environment_fallback)
{
    const char *saved = getenv("CONFSMOE_NUM_THREADS");
    char *restore = saved ? strdup(saved) : NULL;
    static const struct {
        const char *value;
        int threads;
    } cases[] = {{"3", 3}, {"1", 1}, {"0", 1}, {"-4", 1}, {"many", 1}, {"1000", CSM_MAX_THREADS}, {NULL, 1}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (cases[i].value)
            ck_assert_int_eq(setenv("CONFSMOE_NUM_THREADS", cases[i].value, 1), 0);
        else
            ck_assert_int_eq(unsetenv("CONFSMOE_NUM_THREADS"), 0);
        confsmoe_ctx *from_env = test_ctx_threads(0), *explicit_two = test_ctx_threads(2);
        /* Read at create: a later change does not reach these ctxs. */
        ck_assert_int_eq(setenv("CONFSMOE_NUM_THREADS", "5", 1), 0);
        ck_assert_msg(csm_parallel_workers(from_env, 1000) == cases[i].threads, "CONFSMOE_NUM_THREADS=%s: %d workers",
                      cases[i].value ? cases[i].value : "(unset)", csm_parallel_workers(from_env, 1000));
        ck_assert_int_eq(csm_parallel_workers(explicit_two, 1000), 2);
        confsmoe_ctx_destroy(from_env);
        confsmoe_ctx_destroy(explicit_two);
    }
    if (restore) {
        setenv("CONFSMOE_NUM_THREADS", restore, 1);
        free(restore);
    } else {
        unsetenv("CONFSMOE_NUM_THREADS");
    }
}
END_TEST

#ifndef CSM_THREADS_OPENMP
/* Threads of this process now (Linux: /proc/self/task). */
static int process_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += e->d_name[0] != '.';
    closedir(d);
    return n;
}

/* A joined thread may still be listed for a moment after pthread_join returns: wait up to 2 s. */
static int process_threads_settled(int expected)
{
    int n = process_threads();
    const struct timespec tick = {0, 10 * 1000 * 1000};
    for (int i = 0; i < 200 && n != expected; i++) {
        nanosleep(&tick, NULL);
        n = process_threads();
    }
    return n;
}

/* n_threads 3: no thread at create, 2 at the first region, the same 2 afterwards; they outlive
 * the host's handle while an object holds the ctx, and are joined with its last release. */
START_TEST(test_pool_started_and_joined)
{
    const int before = process_threads();
    tally *t = calloc(1, sizeof *t);
    t->ctx = test_ctx_threads(3);
    ck_assert_int_eq(process_threads(), before);
    run_region(t, 1);
    ck_assert_int_eq(process_threads(), before + 2);
    run_region(t, 1);
    ck_assert_int_eq(process_threads(), before + 2);
    csm_ctx_retain(t->ctx); /* as an object made from the ctx does */
    confsmoe_ctx_destroy(t->ctx);
    t->wait_for_two = true;
    ck_assert_int_ge(run_region(t, 1), 2);
    ck_assert_int_eq(process_threads(), before + 2);
    csm_ctx_release(t->ctx);
    ck_assert_int_eq(process_threads_settled(before), before);
    free(t);
}
END_TEST

/* The pool is one block of the ctx, made at create: a host allocator sees it, a ctx whose pool
 * cannot be had is not made (and keeps nothing), and the block goes with the ctx. */
START_TEST(test_pool_memory_from_the_ctx)
{
    const int32_t threads[] = {1, 2};
    for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++) {
        test_alloc a = {0, 0, 0};
        confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.allocator = &holder;
        p.n_threads = threads[i];
        confsmoe_ctx *ctx = NULL;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
        ck_assert_int_eq(a.live, threads[i] > 1 ? 2 : 1);
        confsmoe_ctx_destroy(ctx);
        ck_assert_int_eq(a.live, 0);
    }
    test_alloc a = {0, 0, 2};
    confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.allocator = &holder;
    p.n_threads = 2;
    confsmoe_ctx *ctx = (confsmoe_ctx *)(uintptr_t)0x1234;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(ctx);
    ck_assert_int_eq(a.total, 2);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* The pool's threads stay in the parent: a forked child computes every item on its own thread
 * (and does not wait for threads it does not have). */
START_TEST(test_forked_child_runs_inline)
{
    tally *t = calloc(1, sizeof *t);
    t->ctx = test_ctx_threads(2);
    run_region(t, 1); /* the parent's threads start */
    const pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        for (int i = 0; i < ITEMS; i++)
            atomic_store(&t->runs[i], 0);
        for (int w = 0; w < MAX_WORKERS; w++)
            atomic_store(&t->items_of[w], 0);
        t->workers = 1; /* every item on worker 0 */
        csm_parallel_for(t->ctx, ITEMS, 1, count_items, t);
        int once = 0;
        for (int i = 0; i < ITEMS; i++)
            once += atomic_load(&t->runs[i]) == 1;
        const bool inline_ok = once == ITEMS && atomic_load(&t->items_of[0]) == ITEMS && atomic_load(&t->bad_worker) == 0;
        /* The child's copy of the ctx goes too: its pool's memory is freed, the parent's threads
         * are left alone. */
        confsmoe_ctx_destroy(t->ctx);
        free(t);
        _exit(inline_ok ? 0 : 1);
    }
    int status = 0;
    ck_assert_int_eq(waitpid(child, &status, 0), child);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    t->wait_for_two = true;
    ck_assert_int_eq(run_region(t, 1), 2); /* the parent's pool still works */
    confsmoe_ctx_destroy(t->ctx);
    free(t);
}
END_TEST
#endif /* CSM_THREADS_OPENMP */

int main(void)
{
    Suite *s = suite_create("private_threads");
    TCase *tc = tcase_create("regions");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_every_item_once);
    tcase_add_test(tc, test_pool_threads_take_items);
    tcase_add_test(tc, test_nested_region_inline);
    tcase_add_test(tc, test_regions_after_sleep);
    tcase_add_test(tc, test_environment_fallback);
    suite_add_tcase(s, tc);
#ifndef CSM_THREADS_OPENMP
    TCase *tp = tcase_create("posix pool");
    tcase_set_timeout(tp, 120);
    tcase_add_test(tp, test_pool_started_and_joined);
    tcase_add_test(tp, test_pool_memory_from_the_ctx);
    tcase_add_test(tp, test_forked_child_runs_inline);
    suite_add_tcase(s, tp);
#endif
    return test_run(s);
}
