/* The context: allocator, error text, logging, the RNG seed and the thread count. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "internal.h"
#include "sized.h"
#include "threads.h"

static void ctx_defaults(confsmoe_ctx_params *p)
{
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->seed = 0;
    p->check_finite = 1;
    p->log_level = CONFSMOE_LOG_WARN;
}

void confsmoe_ctx_params_init_sized(confsmoe_ctx_params *p, size_t struct_size)
{
    confsmoe_ctx_params defaults;
    ctx_defaults(&defaults);
    csm_sized_init(p, struct_size, &defaults, sizeof defaults, CSM_CTX_PARAMS_MIN);
}

size_t confsmoe_sizeof_ctx_params(void) { return sizeof(confsmoe_ctx_params); }

/* The ctx is allocated before its allocator is usable, so it uses the one it was given directly. */
static void *raw_alloc(const confsmoe_allocator *a, size_t size)
{
    if (a)
        return a->alloc(a->user, size, CSM_ALIGN);
    void *p = NULL;
    return posix_memalign(&p, CSM_ALIGN, size) == 0 ? p : NULL;
}

/* ------------------------------------------------------------------ the default allocator's cache
 *
 * A layer call allocates its work and saved buffers and frees them again; with the C library's
 * malloc, large blocks go back to the system on free and come back as fresh zero pages, whose
 * page faults were 18% of a small gate call and 10% of a large one. So the default path keeps
 * freed blocks of at least CACHE_MIN bytes and hands them out again for requests of at least
 * a quarter of their size. What it keeps is at most CACHE_BYTES, or, when more, the most it ever
 * had in use at once less what is in use now: kept and in-use blocks together never exceed the
 * larger of the ctx's own peak and what is in use plus CACHE_BYTES. Each default block carries
 * its capacity in a header. A host allocator sees every allocation: nothing is kept. */

#define HEADER ((size_t)CSM_ALIGN)
#define CACHE_MIN ((size_t)64 << 10)
#define CACHE_BYTES ((size_t)64 << 20)

static size_t capacity_of(void *base) { return *(size_t *)base; }

/* A block of `cap` bytes handed out; a new peak leaves less unused peak to keep. */
static void count_live(csm_block_cache *c, size_t cap)
{
    c->live += cap;
    if (c->live > c->peak)
        c->peak = c->live;
}

static size_t budget(const csm_block_cache *c)
{
    const size_t unused_peak = c->peak - c->live;
    return unused_peak > CACHE_BYTES ? unused_peak : CACHE_BYTES;
}

/* Takes kept block i out of the list (the others keep their order). */
static void *remove_kept(csm_block_cache *c, int i)
{
    void *base = c->block[i];
    c->bytes -= capacity_of(base);
    memmove(&c->block[i], &c->block[i + 1], (size_t)(c->count - i - 1) * sizeof c->block[0]);
    c->count--;
    return base;
}

/* Gives back the oldest kept blocks until `bytes` more in `blocks` more blocks (0 or 1) fit. */
static void evict_for(csm_block_cache *c, size_t bytes, int blocks)
{
    while (c->count > 0 && (c->count + blocks > CSM_CACHE_SLOTS || c->bytes + bytes > budget(c)))
        free(remove_kept(c, 0));
}

/* A kept block of capacity in [size, 4 size], the smallest such, or NULL. (A layer's forward and
 * backward work blocks, 2.2x apart at the large gate shape, take turns in one block.) */
static void *cache_take(csm_block_cache *c, size_t size)
{
    int best = -1;
    for (int i = 0; i < c->count; i++) {
        const size_t cap = capacity_of(c->block[i]);
        if (cap >= size && cap / 4 <= size && (best < 0 || cap < capacity_of(c->block[best])))
            best = i;
    }
    return best < 0 ? NULL : remove_kept(c, best);
}

/* Gives every kept block back; returns their bytes. */
static size_t cache_flush(csm_block_cache *c)
{
    const size_t bytes = c->bytes;
    for (int i = 0; i < c->count; i++)
        free(c->block[i]);
    c->count = 0;
    c->bytes = 0;
    return bytes;
}

static void *default_alloc(confsmoe_ctx *ctx, size_t size)
{
    if (size > SIZE_MAX - HEADER)
        return NULL;
    csm_block_cache *c = &ctx->cache;
    void *base = NULL;
    if (size >= CACHE_MIN) {
        pthread_mutex_lock(&c->lock);
        base = cache_take(c, size);
        if (base)
            count_live(c, capacity_of(base));
        pthread_mutex_unlock(&c->lock);
    }
    if (!base) {
        if (posix_memalign(&base, CSM_ALIGN, size + HEADER) != 0) {
            /* Out of memory: what is kept goes back to the system before giving up. */
            pthread_mutex_lock(&c->lock);
            const bool had = cache_flush(c) > 0;
            pthread_mutex_unlock(&c->lock);
            if (!had || posix_memalign(&base, CSM_ALIGN, size + HEADER) != 0)
                return NULL;
        }
        *(size_t *)base = size;
        if (size >= CACHE_MIN) {
            pthread_mutex_lock(&c->lock);
            count_live(c, size);
            evict_for(c, 0, 0);
            pthread_mutex_unlock(&c->lock);
        }
    }
    return (char *)base + HEADER;
}

static void default_free(confsmoe_ctx *ctx, void *ptr)
{
    void *base = (char *)ptr - HEADER;
    const size_t cap = capacity_of(base);
    if (cap < CACHE_MIN) {
        free(base);
        return;
    }
    csm_block_cache *c = &ctx->cache;
    pthread_mutex_lock(&c->lock);
    c->live -= cap;
    /* The peak held this block as well: the unused peak, and so the budget, is at least cap. */
    evict_for(c, cap, 1);
    c->block[c->count++] = base;
    c->bytes += cap;
    pthread_mutex_unlock(&c->lock);
}

size_t confsmoe_ctx_trim(confsmoe_ctx *ctx)
{
    if (!ctx || ctx->has_allocator)
        return 0;
    csm_block_cache *c = &ctx->cache;
    pthread_mutex_lock(&c->lock);
    const size_t released = cache_flush(c);
    /* The old peak would let the ctx fill up to it again; from here on only later needs count. */
    c->peak = c->live;
    pthread_mutex_unlock(&c->lock);
    return released;
}

confsmoe_status confsmoe_ctx_create(const confsmoe_ctx_params *p, confsmoe_ctx **out)
{
    if (!out)
        return CONFSMOE_E_INVALID_ARGUMENT;
    *out = NULL;
    /* The caller's struct, of any accepted size, over the defaults (docs/API.md, "Struct versioning"). */
    confsmoe_ctx_params full;
    ctx_defaults(&full);
    /* No ctx exists yet to hold an error message: the status alone must say it. */
    if (p && csm_sized_read(NULL, "ctx_create", "confsmoe_ctx_params", p, &full, sizeof full, CSM_CTX_PARAMS_MIN) !=
                 CONFSMOE_OK)
        return CONFSMOE_E_VERSION;
    p = &full;
    if (p->allocator && (!p->allocator->alloc || !p->allocator->free))
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (p->check_finite != 0 && p->check_finite != 1)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (p->n_threads < 0 || p->n_threads > CSM_MAX_THREADS)
        return CONFSMOE_E_INVALID_ARGUMENT;

    confsmoe_ctx *ctx = raw_alloc(p->allocator, sizeof *ctx);
    if (!ctx)
        return CONFSMOE_E_NOMEM;
    memset(ctx, 0, sizeof *ctx);
    if (p->allocator) {
        ctx->allocator = *p->allocator;
        ctx->has_allocator = true;
    } else if (pthread_mutex_init(&ctx->cache.lock, NULL) != 0) {
        free(ctx);
        return CONFSMOE_E_NOMEM;
    }
    ctx->check_finite = p->check_finite;
    ctx->log_level = p->log_level;
    ctx->log_fn = p->log_fn;
    ctx->log_user = p->log_user;
    ctx->threads = p->n_threads > 0 ? p->n_threads : csm_threads_from_env();
    csm_rng_seed(ctx, p->seed);
    ctx->refs = 1; /* the host's */
    const confsmoe_status s = csm_threads_ctx_init(ctx);
    if (s != CONFSMOE_OK) {
        csm_ctx_release(ctx); /* the only reference: frees the ctx */
        return s;
    }
    *out = ctx;
    return CONFSMOE_OK;
}

confsmoe_ctx *csm_ctx_retain(confsmoe_ctx *ctx)
{
    ctx->refs++;
    return ctx;
}

void csm_ctx_release(confsmoe_ctx *ctx)
{
    if (--ctx->refs > 0)
        return;
    csm_threads_ctx_release(ctx);
    if (ctx->has_allocator) {
        ctx->allocator.free(ctx->allocator.user, ctx);
        return;
    }
    cache_flush(&ctx->cache);
    pthread_mutex_destroy(&ctx->cache.lock);
    free(ctx); /* from raw_alloc: no header */
}

/* Objects still alive keep the ctx (and its allocator) until the last of them is destroyed. */
void confsmoe_ctx_destroy(confsmoe_ctx *ctx)
{
    if (ctx)
        csm_ctx_release(ctx);
}

const char *confsmoe_ctx_last_error(const confsmoe_ctx *ctx)
{
    return ctx ? ctx->last_error : "confsmoe_ctx_last_error: ctx is NULL";
}

confsmoe_status confsmoe_ctx_set_seed(confsmoe_ctx *ctx, uint64_t seed)
{
    if (!ctx)
        return CONFSMOE_E_INVALID_ARGUMENT;
    csm_rng_seed(ctx, seed);
    return CONFSMOE_OK;
}

confsmoe_status csm_fail(confsmoe_ctx *ctx, confsmoe_status status, const char *fmt, ...)
{
    if (!ctx)
        return status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ctx->last_error, sizeof ctx->last_error, fmt, ap);
    va_end(ap);
    if (ctx->log_fn && ctx->log_level >= CONFSMOE_LOG_ERROR)
        ctx->log_fn(ctx->log_user, CONFSMOE_LOG_ERROR, ctx->last_error);
    return status;
}

bool csm_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a)
        return false;
    *out = a * b;
    return true;
}

void *csm_alloc(confsmoe_ctx *ctx, size_t size)
{
    if (size == 0)
        size = 1;
    /* Round up so that every buffer ends on an alignment boundary. */
    if (size > SIZE_MAX - (CSM_ALIGN - 1))
        return NULL;
    size = (size + CSM_ALIGN - 1) & ~(size_t)(CSM_ALIGN - 1);
    return ctx->has_allocator ? raw_alloc(&ctx->allocator, size) : default_alloc(ctx, size);
}

void *csm_lent_alloc(confsmoe_ctx *ctx, csm_arena *arena, size_t bytes)
{
    void *p = arena ? csm_arena_alloc(arena, bytes) : NULL;
    return p ? p : csm_alloc(ctx, bytes);
}

void csm_lent_free(confsmoe_ctx *ctx, csm_arena *arena, void *p, size_t transient)
{
    if (csm_arena_owns(arena, p)) {
        csm_arena_free(arena, p);
        return;
    }
    if (arena && transient)
        csm_arena_forget(arena, transient);
    csm_free(ctx, p);
}

void *csm_calloc(confsmoe_ctx *ctx, size_t count, size_t size)
{
    size_t total;
    if (!csm_mul_size(count, size, &total))
        return NULL;
    void *p = csm_alloc(ctx, total);
    if (p)
        memset(p, 0, total);
    return p;
}

void csm_free(confsmoe_ctx *ctx, void *ptr)
{
    if (!ptr)
        return;
    if (ctx->has_allocator)
        ctx->allocator.free(ctx->allocator.user, ptr);
    else
        default_free(ctx, ptr);
}

/* A library built on libconfsmoe allocates as an object would: each block holds a reference. */
void *confsmoe_ctx_calloc(confsmoe_ctx *ctx, size_t count, size_t size)
{
    void *p = ctx ? csm_calloc(ctx, count, size) : NULL;
    if (p)
        csm_ctx_retain(ctx);
    return p;
}

void confsmoe_ctx_free(confsmoe_ctx *ctx, void *ptr)
{
    if (!ctx || !ptr)
        return;
    csm_free(ctx, ptr);
    csm_ctx_release(ctx);
}
