/* The context: allocator, error text, logging, and the RNG seed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "sized.h"

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

    confsmoe_ctx *ctx = raw_alloc(p->allocator, sizeof *ctx);
    if (!ctx)
        return CONFSMOE_E_NOMEM;
    memset(ctx, 0, sizeof *ctx);
    if (p->allocator) {
        ctx->allocator = *p->allocator;
        ctx->has_allocator = true;
    }
    ctx->check_finite = p->check_finite;
    ctx->log_level = p->log_level;
    ctx->log_fn = p->log_fn;
    ctx->log_user = p->log_user;
    csm_rng_seed(ctx, p->seed);
    *out = ctx;
    return CONFSMOE_OK;
}

void confsmoe_ctx_destroy(confsmoe_ctx *ctx)
{
    csm_free(ctx, ctx);
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

bool csm_layout_add(size_t *total, size_t count, size_t elem, size_t *offset)
{
    size_t bytes;
    if (!csm_mul_size(count, elem, &bytes) || bytes > SIZE_MAX - CSM_ALIGN || *total > SIZE_MAX - CSM_ALIGN - bytes)
        return false;
    *offset = *total;
    *total += (bytes + CSM_ALIGN - 1) & ~(size_t)(CSM_ALIGN - 1);
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
    return raw_alloc(ctx->has_allocator ? &ctx->allocator : NULL, size);
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
        free(ptr);
}
