/* Private to libconfsmoe: object layouts and helpers shared by lib/ files. */
#ifndef CONFSMOE_INTERNAL_H
#define CONFSMOE_INTERNAL_H

#include <stdarg.h>
#include <pthread.h>
#include <stdbool.h>

/* The library implements the experimental declarations too (docs/API.md, "Experimental API"). */
#define CONFSMOE_EXPERIMENTAL
#include "confsmoe.h"

#define CSM_ALIGN 64
#define CSM_ERROR_CAP 512

/* Freed large blocks of the default allocator, kept for reuse (ctx.c). */
#define CSM_CACHE_SLOTS 16
typedef struct {
    pthread_mutex_t lock;    /* the library's own threads may allocate concurrently */
    int count;
    size_t bytes;            /* kept */
    size_t live, peak;       /* large blocks handed out now, and the most at once */
    void *block[CSM_CACHE_SLOTS]; /* oldest first */
} csm_block_cache;

struct confsmoe_ctx {
    confsmoe_allocator allocator;
    bool has_allocator;
    csm_block_cache cache;       /* default allocator only */
    bool check_finite;
    int32_t log_level;
    confsmoe_log_fn log_fn;
    void *log_user;
    uint64_t rng_key;
    uint64_t rng_counter;
    int32_t threads;                  /* of the library's own (threads.h), fixed at create */
    struct csm_thread_pool *pool;     /* threads.c's, when threads > 1 (not with OpenMP) */
    char last_error[CSM_ERROR_CAP];
    /* The host's reference (until confsmoe_ctx_destroy) and one per object that frees through
     * the ctx: tensor, expert, gate, imputer, optimizer, model and saved handle. The last one
     * frees the ctx, so that objects and the ctx may be destroyed in any order. A plain
     * counter: objects are created and destroyed only in host calls, one thread at a time
     * per ctx (confsmoe.h); the library's workers (csm_parallel_for tasks) allocate and free
     * buffers through the ctx, which is thread-safe, but never create or destroy an object. */
    size_t refs;
};

struct confsmoe_tensor {
    confsmoe_ctx *ctx;
    confsmoe_dtype dtype;
    int32_t ndim;
    int64_t dims[CONFSMOE_MAX_DIMS];
    int64_t numel;
    size_t nbytes;
    void *data;
    bool owned;
};

/* Every layer's saved state starts with this header. */
struct confsmoe_saved {
    confsmoe_ctx *ctx;   /* holds a reference */
    const void *owner;   /* the layer whose forward made it; compared, never read in release
                            (the layer may be destroyed first) */
    bool consumed;       /* backward already ran */
    void (*release)(confsmoe_saved *s);
};

/* ctx.c: errors, logging and memory. */
confsmoe_status csm_fail(confsmoe_ctx *ctx, confsmoe_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void *csm_alloc(confsmoe_ctx *ctx, size_t size);   /* 64-byte aligned, uninitialised */
void *csm_calloc(confsmoe_ctx *ctx, size_t count, size_t size);
void csm_free(confsmoe_ctx *ctx, void *ptr);
/* A reference for an object created from ctx; returns ctx. */
confsmoe_ctx *csm_ctx_retain(confsmoe_ctx *ctx);
/* Drops one; the last frees the ctx. An object releases after its last csm_free. */
void csm_ctx_release(confsmoe_ctx *ctx);
/* Multiply with overflow detection: false when a*b does not fit. */
bool csm_mul_size(size_t a, size_t b, size_t *out);

/* rng.c: the ctx's counter-based stream. Output i depends on the seed and i alone, so a layer
 * takes its draws at positions it chose (csm_rng_reserve, then a cursor or substreams at the
 * base) and only rng.c moves the stream. */
void csm_rng_seed(confsmoe_ctx *ctx, uint64_t seed);
/* The position of the next draw; moving it back makes a failed call draw nothing. */
uint64_t csm_rng_tell(const confsmoe_ctx *ctx);
void csm_rng_seek(confsmoe_ctx *ctx, uint64_t position);
/* Takes the next n positions and returns the first. */
uint64_t csm_rng_reserve(confsmoe_ctx *ctx, uint64_t n);
uint64_t csm_rng_u64(confsmoe_ctx *ctx);
float csm_rng_uniform(confsmoe_ctx *ctx, float lo, float hi);  /* [lo, hi) */
#define CSM_NORMAL_DRAWS 2  /* stream positions one csm_substream_normal takes */
/* A cursor over the ctx stream itself, or over item `index` of a batch whose draws take the one
 * stream position `base`: a stream of its own, so that an item's draws depend on its index
 * alone, not on how many draws the items before it took (which a shard of a batch cannot
 * know). Neither moves the ctx stream. */
typedef struct {
    uint64_t key, counter;
} csm_substream;
csm_substream csm_rng_at(const confsmoe_ctx *ctx, uint64_t position);
csm_substream csm_rng_substream(const confsmoe_ctx *ctx, uint64_t base, uint64_t index);
uint64_t csm_substream_u64(csm_substream *s);
float csm_substream_uniform(csm_substream *s, float lo, float hi);  /* [lo, hi) */
float csm_substream_normal(csm_substream *s);
/* csm_dropout_mask (kernels.h) over the ctx stream from `position` on. */
void csm_rng_dropout_mask(const confsmoe_ctx *ctx, uint64_t position, float p, uint8_t *keep, int64_t n);

/* tensor.c: a tensor's f32 data, and argument checks for entry points. */
static inline float *csm_f32(const confsmoe_tensor *t) { return (float *)t->data; }
/* The tensor is non-NULL, of dtype and ndim, and each dims[i] >= 0 matches.
 * `fn` and `name` prefix the error ("expert_forward: x ..."). */
confsmoe_status csm_expect_tensor(confsmoe_ctx *ctx, const char *fn, const char *name, const confsmoe_tensor *t,
                                  confsmoe_dtype dtype, int32_t ndim, const int64_t *dims);
/* With ctx checks on: every element of an f32 tensor is finite. */
confsmoe_status csm_expect_finite(confsmoe_ctx *ctx, const char *fn, const char *name, const confsmoe_tensor *t);
/* Initialise like torch.nn.Linear: U(-1/sqrt(fan_in), +1/sqrt(fan_in)). */
void csm_fill_uniform(confsmoe_ctx *ctx, confsmoe_tensor *t, float bound);

#endif /* CONFSMOE_INTERNAL_H */
