/* The context: params, create/destroy, errors, logging, the allocator, the seed and finite checks. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "confsmoe.h"
#include "testutil.h"

#ifdef HAVE_VALGRIND_H
#include <valgrind/valgrind.h>
#else
#define RUNNING_ON_VALGRIND 0
#endif

/* A pointer value the library never hands out: out-pointers must be overwritten with NULL. */
#define SENTINEL_CTX ((confsmoe_ctx *)(uintptr_t)0x1234)

/* ---------------------------------------------------------------- block reuse */

static void *tensor_data_of_new(confsmoe_ctx *ctx, int64_t n, confsmoe_tensor **out)
{
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 1, &n, out), CONFSMOE_OK);
    return confsmoe_tensor_data(*out);
}

/* With the default allocator a freed large block serves the next request of a similar size
 * (no fresh pages per call); a much smaller request gets a block of its own. */
START_TEST(test_default_allocator_reuses_large_blocks)
{
    confsmoe_ctx *ctx = test_ctx(1);
    confsmoe_tensor *a, *b, *c;
    void *first = tensor_data_of_new(ctx, 1 << 18, &a);
    confsmoe_tensor_destroy(a);
    /* An eighth of the size is not served from the freed block, and takes an allocation of its
     * own in between (so that the C library's malloc would not hand `first` back by chance). */
    ck_assert_ptr_ne(tensor_data_of_new(ctx, 1 << 15, &c), first);
    ck_assert_ptr_eq(tensor_data_of_new(ctx, (1 << 18) - 100, &b), first);
    float *v = confsmoe_tensor_data(b);
    v[(1 << 18) - 101] = 1.0f; /* the whole request is usable (valgrind / ASan check it) */
    confsmoe_tensor_destroy(b);
    confsmoe_tensor_destroy(c);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Page faults of this process so far (minor: a fresh zero page, or a page mapped again). */
static long page_faults(void)
{
    struct rusage u;
    ck_assert_int_eq(getrusage(RUSAGE_SELF, &u), 0);
    return u.ru_minflt;
}

/* Pages in `mib` MiB: what filling a fresh block of that size faults in. */
static long pages_in(int64_t mib) { return (long)((mib << 20) / sysconf(_SC_PAGESIZE)); }

/* A new f32 tensor of `mib` MiB with one store per page; the page faults that took. */
static long faults_to_fill(confsmoe_ctx *ctx, int64_t mib, confsmoe_tensor **out)
{
    const long before = page_faults();
    char *data = tensor_data_of_new(ctx, mib << 18, out);
    const long page = sysconf(_SC_PAGESIZE);
    for (int64_t at = 0; at < mib << 20; at += page)
        data[at] = 1;
    return page_faults() - before;
}

/* Blocks past 64 MiB are kept too (a large layer's saved and work buffers): calling it again
 * takes no fresh pages. */
START_TEST(test_default_allocator_keeps_blocks_past_64_mib)
{
    confsmoe_ctx *ctx = test_ctx(1);
    const long pages = pages_in(72);
    confsmoe_tensor *t;
    ck_assert_int_ge(faults_to_fill(ctx, 72, &t), pages / 2);
    confsmoe_tensor_destroy(t);
    const long again = faults_to_fill(ctx, 72, &t);
    ck_assert_msg(again < pages / 16, "a freed 72 MiB block should be reused, yet filling it again took %ld page faults (%ld pages)", again, pages);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* What is kept never takes the ctx past its own peak: a larger block in use at a new peak
 * gives the kept one back, and the next request of its size takes fresh pages again. */
START_TEST(test_default_allocator_keeps_no_more_than_its_peak)
{
    confsmoe_ctx *ctx = test_ctx(1);
    const long pages = pages_in(72);
    confsmoe_tensor *a, *b;
    faults_to_fill(ctx, 72, &a);
    confsmoe_tensor_destroy(a);
    /* Too large for the kept block: fresh, a new peak, where only 64 MiB may stay kept. */
    faults_to_fill(ctx, 80, &b);
    const long again = faults_to_fill(ctx, 72, &a);
    /* valgrind's own allocator hands the given-back block out again: the faults say nothing there. */
    ck_assert_msg(RUNNING_ON_VALGRIND || again >= pages / 2, "the kept 72 MiB block should be given back at the 80 MiB peak, yet refilling took only %ld page faults", again);
    confsmoe_tensor_destroy(a);
    confsmoe_tensor_destroy(b);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Trim gives the kept blocks back (the next fill takes fresh pages) and leaves blocks in use alone. */
START_TEST(test_trim_gives_kept_blocks_back)
{
    confsmoe_ctx *ctx = test_ctx(1);
    const long pages = pages_in(72);
    confsmoe_tensor *kept, *in_use;
    float *v = tensor_data_of_new(ctx, 1 << 18, &in_use);
    for (int i = 0; i < 1 << 18; i++)
        v[i] = (float)i;
    faults_to_fill(ctx, 72, &kept);
    confsmoe_tensor_destroy(kept);
    const size_t released = confsmoe_ctx_trim(ctx);
    ck_assert_msg(released >= (size_t)72 << 20 && released < (size_t)73 << 20, "trim released %zu bytes, not the kept 72 MiB", released);
    ck_assert_uint_eq(confsmoe_ctx_trim(ctx), 0);
    const long again = faults_to_fill(ctx, 72, &kept);
    ck_assert_msg(RUNNING_ON_VALGRIND || again >= pages / 2, "after trim, filling 72 MiB again took only %ld page faults", again);
    for (int i = 0; i < 1 << 18; i++)
        ck_assert_float_eq(v[i], (float)i);
    confsmoe_tensor_destroy(kept);
    confsmoe_tensor_destroy(in_use);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Trim forgets the peak: with 100 MiB as the old peak, a freed 70 MiB block would stay kept
 * beside 16 MiB in use; measured against the new peak (70 MiB) only 64 MiB may be kept. */
START_TEST(test_trim_forgets_the_peak)
{
    confsmoe_ctx *ctx = test_ctx(1);
    confsmoe_tensor *t, *small;
    tensor_data_of_new(ctx, 25L << 20, &t); /* 100 MiB */
    confsmoe_tensor_destroy(t);
    ck_assert_uint_ge(confsmoe_ctx_trim(ctx), (size_t)100 << 20);
    tensor_data_of_new(ctx, 70L << 18, &t);
    confsmoe_tensor_destroy(t);
    tensor_data_of_new(ctx, 16L << 18, &small);
    ck_assert_uint_eq(confsmoe_ctx_trim(ctx), 0);
    confsmoe_tensor_destroy(small);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* A host allocator sees every allocation and every free: nothing is kept back. */
START_TEST(test_host_allocator_sees_every_block)
{
    test_alloc counts = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counts, &holder, 1);
    const long live = counts.live, total = counts.total;
    for (int i = 0; i < 3; i++) {
        confsmoe_tensor *t;
        tensor_data_of_new(ctx, 1 << 18, &t);
        confsmoe_tensor_destroy(t);
    }
    ck_assert_int_eq(counts.live, live);
    ck_assert_int_ge(counts.total - total, 3);
    /* So trim has nothing to give back, and frees nothing of the host's (nor does it without a ctx). */
    ck_assert_uint_eq(confsmoe_ctx_trim(ctx), 0);
    ck_assert_int_eq(counts.live, live);
    ck_assert_uint_eq(confsmoe_ctx_trim(NULL), 0);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counts.live, 0);
}
END_TEST

/* ---------------------------------------------------------------- params */

START_TEST(test_params_init_defaults)
{
    confsmoe_ctx_params p;
    memset(&p, 0xA5, sizeof p);
    confsmoe_ctx_params_init(&p);
    ck_assert_uint_eq(p.struct_size, sizeof(confsmoe_ctx_params));
    ck_assert_uint_eq(p.seed, 0);
    ck_assert_int_eq(p.check_finite, 1);
    ck_assert_int_eq(p.log_level, CONFSMOE_LOG_WARN);
    ck_assert_msg(p.log_fn == NULL, "log_fn defaults to NULL");
    ck_assert_ptr_null(p.log_user);
    ck_assert_ptr_null(p.allocator);
    ck_assert_int_eq(p.n_threads, 0);
    /* NULL is ignored, not dereferenced. */
    confsmoe_ctx_params_init(NULL);
}
END_TEST

START_TEST(test_sizeof_ctx_params)
{
    ck_assert_uint_eq(confsmoe_sizeof_ctx_params(), sizeof(confsmoe_ctx_params));
}
END_TEST

/* ---------------------------------------------------------------- create / destroy */

START_TEST(test_create_null_params)
{
    confsmoe_ctx *ctx = SENTINEL_CTX;
    ck_assert_int_eq(confsmoe_ctx_create(NULL, &ctx), CONFSMOE_OK);
    ck_assert_ptr_nonnull(ctx);
    ck_assert_ptr_ne(ctx, SENTINEL_CTX);
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    /* Defaults include check_finite = 1: a NaN input is rejected. */
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 2, 3, &e), CONFSMOE_OK);
    const int64_t dims[2] = {1, 2};
    confsmoe_tensor *x = NULL, *y = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &x), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &y), CONFSMOE_OK);
    ((float *)confsmoe_tensor_data(x))[1] = NAN;
    ck_assert_int_eq(confsmoe_expert_forward(e, x, y, NULL), CONFSMOE_E_NUMERIC);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_init_params)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    confsmoe_ctx *ctx = SENTINEL_CTX;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    ck_assert_ptr_nonnull(ctx);
    ck_assert_ptr_ne(ctx, SENTINEL_CTX);
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_independent)
{
    /* Two ctxs are distinct objects with their own error text. */
    confsmoe_ctx *a = test_ctx(1), *b = test_ctx(1);
    ck_assert_ptr_ne(a, b);
    confsmoe_tensor *t = NULL;
    const int64_t dims[1] = {3};
    ck_assert_int_eq(confsmoe_tensor_create(a, 77, 1, dims, &t), CONFSMOE_E_DTYPE);
    ck_assert_str_ne(confsmoe_ctx_last_error(a), "");
    ck_assert_str_eq(confsmoe_ctx_last_error(b), "");
    confsmoe_ctx_destroy(a);
    confsmoe_ctx_destroy(b);
}
END_TEST

START_TEST(test_create_wrong_struct_size)
{
    /* Below the first release's size (allocator was its last field), or above the 64 KiB limit
     * (not read: p is smaller). */
    const size_t first_release = offsetof(confsmoe_ctx_params, allocator) + sizeof(void *);
    const size_t bad[] = {0, 1, first_release - 1, (size_t)65536 + 8, first_release / 2, SIZE_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.struct_size = bad[i];
        confsmoe_ctx *ctx = SENTINEL_CTX;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_VERSION);
        ck_assert_ptr_null(ctx);
    }
}
END_TEST

START_TEST(test_create_wrong_struct_size_allocates_nothing)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
    /* A newer program's larger struct, with a field this library does not know set. */
    struct {
        confsmoe_ctx_params p;
        unsigned char newer[8];
    } w;
    memset(&w, 0, sizeof w);
    confsmoe_ctx_params_init(&w.p);
    w.p.allocator = &holder;
    w.p.struct_size = sizeof w.p + 4;
    w.newer[2] = 1;
    confsmoe_ctx *ctx = SENTINEL_CTX;
    ck_assert_int_eq(confsmoe_ctx_create(&w.p, &ctx), CONFSMOE_E_VERSION);
    ck_assert_ptr_null(ctx);
    ck_assert_int_eq(a.total, 0);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

static void *dummy_alloc(void *user, size_t size, size_t alignment)
{
    (void)user;
    (void)size;
    (void)alignment;
    ck_abort_msg("an invalid allocator must never be called");
    return NULL;
}

static void dummy_free(void *user, void *ptr)
{
    (void)user;
    (void)ptr;
    ck_abort_msg("an invalid allocator must never be called");
}

START_TEST(test_create_allocator_null_fn)
{
    const confsmoe_allocator bad[] = {
        {NULL, dummy_free, NULL},
        {dummy_alloc, NULL, NULL},
        {NULL, NULL, NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.allocator = &bad[i];
        confsmoe_ctx *ctx = SENTINEL_CTX;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_INVALID_ARGUMENT);
        ck_assert_ptr_null(ctx);
    }
}
END_TEST

START_TEST(test_create_bad_check_finite)
{
    /* check_finite is documented as 0 or 1; anything else is an out-of-range value. */
    const int32_t bad[] = {2, -1, 100};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.check_finite = bad[i];
        confsmoe_ctx *ctx = SENTINEL_CTX;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_INVALID_ARGUMENT);
        ck_assert_ptr_null(ctx);
    }
}
END_TEST

START_TEST(test_create_bad_n_threads)
{
    /* Out of [0, 64]: refused before anything is allocated. */
    const int32_t bad[] = {-1, 65, INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        test_alloc a = {0, 0, 0};
        confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.allocator = &holder;
        p.n_threads = bad[i];
        confsmoe_ctx *ctx = SENTINEL_CTX;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_INVALID_ARGUMENT);
        ck_assert_ptr_null(ctx);
        ck_assert_int_eq(a.total, 0);
    }
}
END_TEST

START_TEST(test_create_n_threads_in_range)
{
    /* The bounds and the fallback are accepted; threads start only at the first region
     * (tests/test_private_threads.c), so creating a ctx of 64 costs nothing. */
    const int32_t good[] = {0, 1, 2, 64};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        confsmoe_ctx_params p;
        confsmoe_ctx_params_init(&p);
        p.n_threads = good[i];
        confsmoe_ctx *ctx = NULL;
        ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
        ck_assert_ptr_nonnull(ctx);
        confsmoe_ctx_destroy(ctx);
    }
}
END_TEST

START_TEST(test_create_null_out)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    ck_assert_int_eq(confsmoe_ctx_create(&p, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_ctx_create(NULL, NULL), CONFSMOE_E_INVALID_ARGUMENT);

    /* And nothing is allocated for it. */
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
    p.allocator = &holder;
    ck_assert_int_eq(confsmoe_ctx_create(&p, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(a.total, 0);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_destroy_null)
{
    confsmoe_ctx_destroy(NULL);
    /* Still alive and able to work afterwards. */
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- last_error */

START_TEST(test_last_error_null_ctx)
{
    const char *m = confsmoe_ctx_last_error(NULL);
    ck_assert_ptr_nonnull(m);
    ck_assert_msg(m[0] != '\0', "last_error(NULL) should say something");
    ck_assert_ptr_nonnull(strstr(m, "NULL"));
}
END_TEST

START_TEST(test_last_error_empty_then_specific)
{
    confsmoe_ctx *ctx = test_ctx(0);
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    confsmoe_expert *e = (confsmoe_expert *)(uintptr_t)0x1234;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 0, 4, &e), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(e);
    const char *m = confsmoe_ctx_last_error(ctx);
    ck_assert_ptr_nonnull(strstr(m, "expert_create"));
    ck_assert_ptr_nonnull(strstr(m, "d=0"));
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- allocator */

START_TEST(test_allocator_used)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    /* The ctx itself comes from the allocator. */
    ck_assert_int_ge(a.live, 1);
    const long after_ctx = a.live, total_ctx = a.total;

    const int64_t dims[2] = {3, 5};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
    ck_assert_int_gt(a.live, after_ctx);
    ck_assert_int_gt(a.total, total_ctx);
    const long after_tensor = a.live;

    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 5, 7, &e), CONFSMOE_OK);
    ck_assert_int_gt(a.live, after_tensor);

    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    ck_assert_int_gt(a.live, after_tensor);

    confsmoe_optim_destroy(o);
    confsmoe_expert_destroy(e);
    ck_assert_int_eq(a.live, after_tensor);
    confsmoe_tensor_destroy(t);
    ck_assert_int_eq(a.live, after_ctx);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* Records each allocation's alignment request, to check the documented contract. */
typedef struct {
    test_alloc counts;
    size_t min_alignment;
    int bad_alignment;
} align_probe;

static void *probe_alloc(void *user, size_t size, size_t alignment)
{
    align_probe *p = user;
    if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
        p->bad_alignment = 1;
    if (alignment < p->min_alignment)
        p->min_alignment = alignment;
    return test_alloc_fn(&p->counts, size, alignment);
}

static void probe_free(void *user, void *ptr)
{
    align_probe *p = user;
    test_free_fn(&p->counts, ptr);
}

START_TEST(test_allocator_alignment_contract)
{
    align_probe probe = {{0, 0, 0}, SIZE_MAX, 0};
    confsmoe_allocator holder = {probe_alloc, probe_free, &probe};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.allocator = &holder;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    /* The allocator is copied at create: the holder may change afterwards. */
    holder.alloc = NULL;
    holder.free = NULL;
    const int64_t dims[1] = {10};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_U8, 1, dims, &t), CONFSMOE_OK);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_ge(probe.counts.total, 3);
    ck_assert_int_eq(probe.bad_alignment, 0);
    ck_assert_uint_ge(probe.min_alignment, sizeof(void *));
    ck_assert_int_eq(probe.counts.live, 0);
}
END_TEST

START_TEST(test_create_nomem)
{
    test_alloc a = {0, 0, 1};
    confsmoe_allocator holder = {test_alloc_fn, test_free_fn, &a};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.allocator = &holder;
    p.n_threads = 1; /* one block: the ctx (not CONFSMOE_NUM_THREADS's pool) */
    confsmoe_ctx *ctx = SENTINEL_CTX;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(ctx);
    ck_assert_int_eq(a.total, 1);
    ck_assert_int_eq(a.live, 0);
    /* The same params work once memory is available again. */
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_eq(a.live, 1);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* ---------------------------------------------------------------- seed */

#define SD 5
#define SH 7

/* Creates an expert (d=5, h=7) on ctx and copies out its "w1" [7, 5]. */
static void expert_w1(confsmoe_ctx *ctx, float w1[SH * SD])
{
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, SD, SH, &e), CONFSMOE_OK);
    ck_assert_str_eq(confsmoe_expert_param_name(e, 0), "w1");
    confsmoe_tensor *w = confsmoe_expert_param(e, 0);
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(confsmoe_tensor_dim(w, 0), SH);
    ck_assert_int_eq(confsmoe_tensor_dim(w, 1), SD);
    ck_assert_int_eq(confsmoe_tensor_copy_out(w, w1, SH * SD * sizeof(float)), CONFSMOE_OK);
    confsmoe_expert_destroy(e);
}

static int differs(const float *a, const float *b, int n)
{
    return memcmp(a, b, (size_t)n * sizeof *a) != 0;
}

START_TEST(test_set_seed_same_seed_same_weights)
{
    confsmoe_ctx *ctx = test_ctx(0);
    float w_a[SH * SD], w_b[SH * SD], w_c[SH * SD];
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, 42), CONFSMOE_OK);
    expert_w1(ctx, w_a);
    /* Without a reseed the stream moves on. */
    expert_w1(ctx, w_b);
    ck_assert_msg(differs(w_a, w_b, SH * SD), "the RNG stream did not advance between two experts");
    /* A reseed restarts it. */
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, 42), CONFSMOE_OK);
    expert_w1(ctx, w_c);
    ck_assert_msg(!differs(w_a, w_c, SH * SD), "set_seed(42) twice gave different weights");
    /* The weights are real draws, not all zero or constant, within nn.Linear's bound 1/sqrt(5). */
    int distinct = 0;
    for (int i = 0; i < SH * SD; i++) {
        ck_assert_float_le(fabsf(w_a[i]), 1.0f / sqrtf((float)SD));
        if (w_a[i] != w_a[0])
            distinct++;
    }
    ck_assert_int_gt(distinct, SH * SD / 2);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_set_seed_matches_create_seed)
{
    /* set_seed(s) restarts the same stream a ctx created with seed s starts with. */
    confsmoe_ctx *a = test_ctx(12345), *b = test_ctx(7);
    float w_a[SH * SD], w_b[SH * SD];
    expert_w1(a, w_a);
    ck_assert_int_eq(confsmoe_ctx_set_seed(b, 12345), CONFSMOE_OK);
    expert_w1(b, w_b);
    ck_assert_msg(!differs(w_a, w_b, SH * SD), "seed in params and set_seed disagree");
    confsmoe_ctx_destroy(a);
    confsmoe_ctx_destroy(b);
}
END_TEST

START_TEST(test_set_seed_different_seed_different_weights)
{
    confsmoe_ctx *ctx = test_ctx(0);
    float w_a[SH * SD], w_b[SH * SD], w_c[SH * SD];
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, 1), CONFSMOE_OK);
    expert_w1(ctx, w_a);
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, 2), CONFSMOE_OK);
    expert_w1(ctx, w_b);
    ck_assert_int_eq(confsmoe_ctx_set_seed(ctx, UINT64_MAX), CONFSMOE_OK);
    expert_w1(ctx, w_c);
    ck_assert_msg(differs(w_a, w_b, SH * SD), "seeds 1 and 2 gave the same weights");
    ck_assert_msg(differs(w_a, w_c, SH * SD), "seeds 1 and UINT64_MAX gave the same weights");
    ck_assert_msg(differs(w_b, w_c, SH * SD), "seeds 2 and UINT64_MAX gave the same weights");
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_set_seed_null_ctx)
{
    ck_assert_int_eq(confsmoe_ctx_set_seed(NULL, 1), CONFSMOE_E_INVALID_ARGUMENT);
}
END_TEST

/* ---------------------------------------------------------------- logging */

typedef struct {
    int calls;
    int32_t level;
    void *user_seen;
    char message[1024];
} log_record;

static void record_log(void *user, int32_t level, const char *message)
{
    log_record *r = user;
    r->calls++;
    r->level = level;
    r->user_seen = user;
    snprintf(r->message, sizeof r->message, "%s", message ? message : "(null)");
}

START_TEST(test_log_called_on_error)
{
    log_record rec = {0, -100, NULL, ""};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.log_fn = record_log;
    p.log_user = &rec;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    /* Success is not an error: nothing logged. */
    const int64_t dims[1] = {4};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 1, dims, &t), CONFSMOE_OK);
    ck_assert_int_eq(rec.calls, 0);

    confsmoe_tensor *bad = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, 42, 1, dims, &bad), CONFSMOE_E_DTYPE);
    ck_assert_int_eq(rec.calls, 1);
    ck_assert_int_eq(rec.level, CONFSMOE_LOG_ERROR);
    ck_assert_ptr_eq(rec.user_seen, &rec);
    ck_assert_ptr_nonnull(strstr(rec.message, "tensor_create"));
    ck_assert_ptr_nonnull(strstr(rec.message, "dtype"));
    ck_assert_str_eq(rec.message, confsmoe_ctx_last_error(ctx));

    /* A second error is logged too, with its own message. */
    uint8_t buf[15];
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, buf, sizeof buf), CONFSMOE_E_SHAPE);
    ck_assert_int_eq(rec.calls, 2);
    ck_assert_ptr_nonnull(strstr(rec.message, "tensor_copy_out"));
    ck_assert_str_eq(rec.message, confsmoe_ctx_last_error(ctx));

    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_log_at_error_level)
{
    /* log_level = ERROR still receives errors ("up to this level"). */
    log_record rec = {0, -100, NULL, ""};
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.log_fn = record_log;
    p.log_user = &rec;
    p.log_level = CONFSMOE_LOG_ERROR;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    confsmoe_optim *o = NULL;
    ck_assert_int_eq(confsmoe_optim_create(ctx, NULL, &o), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_optim_set_lr(o, -1.0f), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(rec.calls, 1);
    ck_assert_int_eq(rec.level, CONFSMOE_LOG_ERROR);
    ck_assert_ptr_nonnull(strstr(rec.message, "lr"));
    ck_assert_str_eq(rec.message, confsmoe_ctx_last_error(ctx));
    confsmoe_optim_destroy(o);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* Runs an error on a default ctx with stdout and stderr redirected to a file, and
 * returns how many bytes the library wrote to them. */
static long bytes_written_by_default_error(void)
{
    fflush(stdout);
    fflush(stderr);
    FILE *sink = tmpfile();
    ck_assert_ptr_nonnull(sink);
    int sink_fd = fileno(sink);
    int saved_out = dup(STDOUT_FILENO), saved_err = dup(STDERR_FILENO);
    ck_assert_int_ge(saved_out, 0);
    ck_assert_int_ge(saved_err, 0);
    ck_assert_int_ge(dup2(sink_fd, STDOUT_FILENO), 0);
    ck_assert_int_ge(dup2(sink_fd, STDERR_FILENO), 0);

    confsmoe_ctx *ctx = NULL;
    confsmoe_status s1 = confsmoe_ctx_create(NULL, &ctx);
    confsmoe_tensor *t = NULL;
    const int64_t dims[1] = {-3};
    confsmoe_status s2 = ctx ? confsmoe_tensor_create(ctx, CONFSMOE_F32, 1, dims, &t) : CONFSMOE_E_INTERNAL;
    int has_message = ctx && strstr(confsmoe_ctx_last_error(ctx), "dims") != NULL;
    confsmoe_ctx_destroy(ctx);

    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, STDOUT_FILENO);
    dup2(saved_err, STDERR_FILENO);
    close(saved_out);
    close(saved_err);
    long size = lseek(sink_fd, 0, SEEK_END);
    fclose(sink);

    ck_assert_int_eq(s1, CONFSMOE_OK);
    ck_assert_int_eq(s2, CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(t);
    ck_assert_msg(has_message, "the error was not recorded in last_error");
    return size;
}

START_TEST(test_log_silent_by_default)
{
    ck_assert_int_eq(bytes_written_by_default_error(), 0);
}
END_TEST

/* ---------------------------------------------------------------- check_finite */

/* A ctx with the given check_finite, an expert d=3 h=4, and x [2, 3] with x[bad] = value. */
static confsmoe_status forward_with(int32_t check_finite, float value, float y_out[6], char *message, size_t cap)
{
    confsmoe_ctx_params p;
    confsmoe_ctx_params_init(&p);
    p.check_finite = check_finite;
    p.seed = 3;
    confsmoe_ctx *ctx = NULL;
    ck_assert_int_eq(confsmoe_ctx_create(&p, &ctx), CONFSMOE_OK);
    confsmoe_expert *e = NULL;
    ck_assert_int_eq(confsmoe_expert_create(ctx, 3, 4, &e), CONFSMOE_OK);
    const int64_t dims[2] = {2, 3};
    confsmoe_tensor *x = NULL, *y = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &x), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &y), CONFSMOE_OK);
    const float xv[6] = {0.5f, -1.0f, value, 0.25f, 2.0f, -0.75f};
    ck_assert_int_eq(confsmoe_tensor_copy_in(x, xv, sizeof xv), CONFSMOE_OK);
    const float sentinel[6] = {101, 102, 103, 104, 105, 106};
    ck_assert_int_eq(confsmoe_tensor_copy_in(y, sentinel, sizeof sentinel), CONFSMOE_OK);
    confsmoe_status s = confsmoe_expert_forward(e, x, y, NULL);
    snprintf(message, cap, "%s", confsmoe_ctx_last_error(ctx));
    ck_assert_int_eq(confsmoe_tensor_copy_out(y, y_out, 6 * sizeof(float)), CONFSMOE_OK);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_expert_destroy(e);
    confsmoe_ctx_destroy(ctx);
    return s;
}

START_TEST(test_check_finite_on_nan)
{
    float y[6];
    char msg[512];
    ck_assert_int_eq(forward_with(1, NAN, y, msg, sizeof msg), CONFSMOE_E_NUMERIC);
    ck_assert_ptr_nonnull(strstr(msg, "NaN"));
    ck_assert_ptr_nonnull(strstr(msg, "expert_forward"));
    ck_assert_ptr_nonnull(strstr(msg, "x"));
    /* A failed call writes nothing: y keeps its contents. */
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(y[i], (float)(101 + i));
}
END_TEST

START_TEST(test_check_finite_on_inf)
{
    float y[6];
    char msg[512];
    ck_assert_int_eq(forward_with(1, INFINITY, y, msg, sizeof msg), CONFSMOE_E_NUMERIC);
    ck_assert_ptr_nonnull(strstr(msg, "Inf"));
    ck_assert_ptr_nonnull(strstr(msg, "expert_forward"));
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(y[i], (float)(101 + i));
}
END_TEST

START_TEST(test_check_finite_off_nan_propagates)
{
    float y[6];
    char msg[512];
    ck_assert_int_eq(forward_with(0, NAN, y, msg, sizeof msg), CONFSMOE_OK);
    ck_assert_str_eq(msg, "");
    /* Row 0 holds the NaN and every output of it depends on every input: all NaN.
     * Row 1 is finite input, so finite output. */
    for (int i = 0; i < 3; i++)
        ck_assert_msg(isnan(y[i]), "y[0][%d] = %g, expected NaN", i, (double)y[i]);
    for (int i = 3; i < 6; i++)
        ck_assert_msg(isfinite(y[i]), "y[1][%d] = %g, expected finite", i - 3, (double)y[i]);
}
END_TEST

START_TEST(test_check_finite_on_finite_input_ok)
{
    /* The control: with checks on, finite input goes through and y is written. */
    float y[6];
    char msg[512];
    ck_assert_int_eq(forward_with(1, 1.5f, y, msg, sizeof msg), CONFSMOE_OK);
    ck_assert_str_eq(msg, "");
    for (int i = 0; i < 6; i++) {
        ck_assert(isfinite(y[i]));
        ck_assert_float_ne(y[i], (float)(101 + i));
    }
}
END_TEST

static Suite *ctx_suite(void)
{
    Suite *s = suite_create("ctx");
    TCase *tp = tcase_create("params");
    tcase_add_test(tp, test_params_init_defaults);
    tcase_add_test(tp, test_sizeof_ctx_params);
    suite_add_tcase(s, tp);

    TCase *tc = tcase_create("create");
    tcase_add_test(tc, test_create_null_params);
    tcase_add_test(tc, test_create_init_params);
    tcase_add_test(tc, test_create_independent);
    tcase_add_test(tc, test_create_wrong_struct_size);
    tcase_add_test(tc, test_create_wrong_struct_size_allocates_nothing);
    tcase_add_test(tc, test_create_allocator_null_fn);
    tcase_add_test(tc, test_create_bad_check_finite);
    tcase_add_test(tc, test_create_bad_n_threads);
    tcase_add_test(tc, test_create_n_threads_in_range);
    tcase_add_test(tc, test_create_null_out);
    tcase_add_test(tc, test_destroy_null);
    tcase_add_test(tc, test_last_error_null_ctx);
    tcase_add_test(tc, test_last_error_empty_then_specific);
    suite_add_tcase(s, tc);

    TCase *ta = tcase_create("allocator");
    tcase_add_test(ta, test_allocator_used);
    tcase_add_test(ta, test_allocator_alignment_contract);
    tcase_add_test(ta, test_create_nomem);
    suite_add_tcase(s, ta);

    TCase *tr = tcase_create("seed");
    tcase_add_test(tr, test_set_seed_same_seed_same_weights);
    tcase_add_test(tr, test_set_seed_matches_create_seed);
    tcase_add_test(tr, test_set_seed_different_seed_different_weights);
    tcase_add_test(tr, test_set_seed_null_ctx);
    suite_add_tcase(s, tr);

    TCase *tb = tcase_create("block_reuse");
    tcase_add_test(tb, test_default_allocator_reuses_large_blocks);
    tcase_add_test(tb, test_default_allocator_keeps_blocks_past_64_mib);
    tcase_add_test(tb, test_default_allocator_keeps_no_more_than_its_peak);
    tcase_add_test(tb, test_host_allocator_sees_every_block);
    tcase_add_test(tb, test_trim_gives_kept_blocks_back);
    tcase_add_test(tb, test_trim_forgets_the_peak);
    suite_add_tcase(s, tb);

    TCase *tl = tcase_create("log");
    tcase_add_test(tl, test_log_called_on_error);
    tcase_add_test(tl, test_log_at_error_level);
    tcase_add_test(tl, test_log_silent_by_default);
    suite_add_tcase(s, tl);

    TCase *tf = tcase_create("check_finite");
    tcase_add_test(tf, test_check_finite_on_nan);
    tcase_add_test(tf, test_check_finite_on_inf);
    tcase_add_test(tf, test_check_finite_off_nan_propagates);
    tcase_add_test(tf, test_check_finite_on_finite_input_ok);
    suite_add_tcase(s, tf);
    return s;
}

int main(void) { return test_run(ctx_suite()); }
