/* Private: the scratch arena, a bump allocator over one block that a layer lends to a child
 * for the length of a call (the model lends one to its gate and imputer for a training step,
 * so that their per-call blocks do not hit fresh pages every step). Requests that do not fit
 * return NULL and the caller falls back to csm_alloc, so correctness never depends on its
 * size; `wanted` records how big it would have had to be. Freeing the most recent block rolls
 * it back; others are released by csm_arena_reset. */
#ifndef CONFSMOE_ARENA_H
#define CONFSMOE_ARENA_H

#include "internal.h"

typedef struct {
    char *base;
    size_t size;      /* bytes at base */
    size_t used;      /* the top */
    size_t last;      /* offset of the most recent block (rolled back on free) */
    size_t missed;    /* bytes requested since the reset that did not fit */
    size_t wanted;    /* high-water mark of used + missed since the reset */
} csm_arena;

static inline void *csm_arena_alloc(csm_arena *a, size_t bytes)
{
    const size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes)
        return NULL;
    if (!a->base || a->size - a->used < rounded) { /* no block yet: not even 0 bytes fit */
        a->missed = a->missed + rounded < a->missed ? SIZE_MAX : a->missed + rounded;
        a->wanted = a->used + a->missed > a->wanted ? a->used + a->missed : a->wanted;
        return NULL;
    }
    void *p = a->base + a->used;
    a->last = a->used;
    a->used += rounded;
    a->wanted = a->used + a->missed > a->wanted ? a->used + a->missed : a->wanted;
    return p;
}

static inline bool csm_arena_owns(const csm_arena *a, const void *p)
{
    return a && a->base && (const char *)p >= a->base && (const char *)p < a->base + a->size;
}

static inline void csm_arena_free(csm_arena *a, void *p)
{
    if ((char *)p == a->base + a->last && a->last < a->used) {
        a->used = a->last;
        a->last = a->used;
    }
}

/* A block of `bytes` that did not fit (it came from csm_alloc) was freed. */
static inline void csm_arena_forget(csm_arena *a, size_t bytes)
{
    const size_t rounded = (bytes + 63) & ~(size_t)63;
    a->missed = a->missed > rounded ? a->missed - rounded : 0;
}

static inline void csm_arena_reset(csm_arena *a)
{
    a->used = a->last = a->missed = a->wanted = 0;
}

/* A per-call block from the lent arena when there is one (may be NULL) and it fits, else from
 * the ctx. csm_lent_free releases it; `transient` is its size when it lives only within the
 * call (when it missed the arena, the arena's estimate of its need then stops counting it), or
 * 0 for a block kept beyond the call. */
void *csm_lent_alloc(confsmoe_ctx *ctx, csm_arena *arena, size_t bytes);
void csm_lent_free(confsmoe_ctx *ctx, csm_arena *arena, void *p, size_t transient);

#endif /* CONFSMOE_ARENA_H */
