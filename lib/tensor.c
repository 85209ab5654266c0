/* Tensors: dense row-major f32 / i32 / u8 arrays, owned or wrapping host memory. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "kernels.h"

static const char *dtype_name(confsmoe_dtype dtype)
{
    switch (dtype) {
    case CONFSMOE_F32: return "f32";
    case CONFSMOE_I32: return "i32";
    case CONFSMOE_U8: return "u8";
    default: return "unknown";
    }
}

static size_t dtype_size(confsmoe_dtype dtype)
{
    return dtype == CONFSMOE_U8 ? 1 : 4;
}

/* Checks dtype and dims; on success fills the shape fields of *t. */
static confsmoe_status describe(confsmoe_ctx *ctx, const char *fn, confsmoe_dtype dtype, int32_t ndim,
                                const int64_t *dims, confsmoe_tensor *t)
{
    if (dtype != CONFSMOE_F32 && dtype != CONFSMOE_I32 && dtype != CONFSMOE_U8)
        return csm_fail(ctx, CONFSMOE_E_DTYPE, "%s: unknown dtype %" PRId32, fn, dtype);
    if (ndim < 1 || ndim > CONFSMOE_MAX_DIMS)
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: ndim is %" PRId32 ", must be 1 to %d", fn, ndim,
                        CONFSMOE_MAX_DIMS);
    if (!dims)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: dims is NULL", fn);
    size_t count = 1;
    for (int32_t i = 0; i < ndim; i++) {
        if (dims[i] < 0)
            return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: dims[%" PRId32 "] is %" PRId64 ", must be >= 0", fn, i,
                            dims[i]);
        if ((uint64_t)dims[i] > SIZE_MAX || !csm_mul_size(count, (size_t)dims[i], &count))
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: the element count overflows", fn);
    }
    size_t nbytes;
    if (count > (size_t)INT64_MAX || !csm_mul_size(count, dtype_size(dtype), &nbytes))
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: the byte size overflows", fn);
    memset(t, 0, sizeof *t);
    t->ctx = ctx;
    t->dtype = dtype;
    t->ndim = ndim;
    memcpy(t->dims, dims, (size_t)ndim * sizeof *dims);
    t->numel = (int64_t)count;
    t->nbytes = nbytes;
    return CONFSMOE_OK;
}

static confsmoe_status tensor_create(confsmoe_ctx *ctx, const char *fn, confsmoe_dtype dtype, int32_t ndim,
                                     const int64_t *dims, void *wrap_data, bool wrap, confsmoe_tensor **out)
{
    if (!out)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: out is NULL", fn);
    *out = NULL;
    if (!ctx)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_tensor shape = {0};
    confsmoe_status s = describe(ctx, fn, dtype, ndim, dims, &shape);
    if (s != CONFSMOE_OK)
        return s;
    if (wrap) {
        if (!wrap_data && shape.nbytes > 0)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: data is NULL for %zu bytes", fn, shape.nbytes);
        if ((uintptr_t)wrap_data % dtype_size(dtype) != 0)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: data is not aligned to its %zu-byte elements",
                            fn, dtype_size(dtype));
    }
    confsmoe_tensor *t = csm_alloc(ctx, sizeof *t);
    if (!t)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the tensor header", fn);
    *t = shape;
    if (wrap) {
        t->data = wrap_data;
    } else if (shape.nbytes > 0) {
        t->data = csm_calloc(ctx, 1, shape.nbytes);
        if (!t->data) {
            csm_free(ctx, t);
            return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for %zu bytes", fn, shape.nbytes);
        }
        t->owned = true;
    }
    csm_ctx_retain(ctx);
    *out = t;
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_tensor_create(confsmoe_ctx *ctx, confsmoe_dtype dtype, int32_t ndim,
                                       const int64_t *dims, confsmoe_tensor **out)
{
    return tensor_create(ctx, "tensor_create", dtype, ndim, dims, NULL, false, out);
}

confsmoe_status confsmoe_tensor_wrap(confsmoe_ctx *ctx, confsmoe_dtype dtype, int32_t ndim, const int64_t *dims,
                                     void *data, confsmoe_tensor **out)
{
    return tensor_create(ctx, "tensor_wrap", dtype, ndim, dims, data, true, out);
}

void confsmoe_tensor_destroy(confsmoe_tensor *t)
{
    if (!t)
        return;
    confsmoe_ctx *ctx = t->ctx;
    if (t->owned)
        csm_free(ctx, t->data);
    csm_free(ctx, t);
    csm_ctx_release(ctx);
}

/* Whether t may take data (confsmoe_tensor_set_data); t is not NULL. */
static confsmoe_status check_set_data(const confsmoe_tensor *t, const char *fn, const char *name, int32_t i,
                                      const void *data)
{
    char what[32] = "data";
    if (i >= 0)
        snprintf(what, sizeof what, "%s[%" PRId32 "]", name, i);
    if (data == t->data)
        return CONFSMOE_OK;
    if (!data && t->nbytes > 0)
        return csm_fail(t->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL for %zu bytes", fn, what, t->nbytes);
    if ((uintptr_t)data % dtype_size(t->dtype) != 0)
        return csm_fail(t->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is not aligned to its %zu-byte elements", fn,
                        what, dtype_size(t->dtype));
    /* Memory inside the block that set_data frees would dangle. */
    const uintptr_t own = (uintptr_t)t->data, at = (uintptr_t)data;
    if (t->owned && at >= own && at < own + t->nbytes)
        return csm_fail(t->ctx, CONFSMOE_E_INVALID_ARGUMENT,
                        "%s: %s lies inside the tensor's own memory, which this call frees", fn, what);
    return CONFSMOE_OK;
}

static void set_data(confsmoe_tensor *t, void *data)
{
    if (data == t->data)
        return;
    if (t->owned)
        csm_free(t->ctx, t->data);
    t->data = data;
    t->owned = false;
}

confsmoe_status confsmoe_tensor_set_data(confsmoe_tensor *t, void *data)
{
    if (!t)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_status s = check_set_data(t, "tensor_set_data", NULL, -1, data);
    if (s == CONFSMOE_OK)
        set_data(t, data);
    return s;
}

confsmoe_status confsmoe_tensors_set_data(confsmoe_tensor *const *tensors, int32_t n, void *base,
                                          const size_t *offsets)
{
    if (!tensors || n < 1)
        return CONFSMOE_E_INVALID_ARGUMENT;
    confsmoe_ctx *ctx = NULL; /* the first tensor's, to hold the message */
    for (int32_t i = 0; i < n && !ctx; i++)
        ctx = tensors[i] ? tensors[i]->ctx : NULL;
    if (!ctx)
        return CONFSMOE_E_INVALID_ARGUMENT;
    for (int32_t i = 0; i < n; i++)
        if (!tensors[i])
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "tensors_set_data: tensors[%" PRId32 "] is NULL", i);
    if (!offsets)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "tensors_set_data: offsets is NULL");
    for (int32_t i = 0; i < n; i++) {
        char *at = base ? (char *)base + offsets[i] : NULL;
        confsmoe_status s = check_set_data(tensors[i], "tensors_set_data", "base + offsets", i, at);
        if (s != CONFSMOE_OK)
            return s;
    }
    for (int32_t i = 0; i < n; i++)
        set_data(tensors[i], base ? (char *)base + offsets[i] : NULL);
    return CONFSMOE_OK;
}

confsmoe_dtype confsmoe_tensor_dtype(const confsmoe_tensor *t) { return t ? t->dtype : -1; }

int32_t confsmoe_tensor_ndim(const confsmoe_tensor *t) { return t ? t->ndim : -1; }

int64_t confsmoe_tensor_dim(const confsmoe_tensor *t, int32_t axis)
{
    if (!t || axis < 0 || axis >= t->ndim)
        return -1;
    return t->dims[axis];
}

int64_t confsmoe_tensor_numel(const confsmoe_tensor *t) { return t ? t->numel : -1; }

size_t confsmoe_tensor_nbytes(const confsmoe_tensor *t) { return t ? t->nbytes : 0; }

void *confsmoe_tensor_data(confsmoe_tensor *t) { return t ? t->data : NULL; }

static confsmoe_status check_copy(const confsmoe_tensor *t, const char *fn, const void *buffer, size_t nbytes)
{
    if (!t)
        return CONFSMOE_E_INVALID_ARGUMENT;
    if (!buffer && nbytes > 0)
        return csm_fail(t->ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: buffer is NULL", fn);
    if (nbytes != t->nbytes)
        return csm_fail(t->ctx, CONFSMOE_E_SHAPE, "%s: %zu bytes given, the tensor holds %zu", fn, nbytes,
                        t->nbytes);
    return CONFSMOE_OK;
}

confsmoe_status confsmoe_tensor_copy_in(confsmoe_tensor *t, const void *src, size_t nbytes)
{
    confsmoe_status s = check_copy(t, "tensor_copy_in", src, nbytes);
    if (s == CONFSMOE_OK && nbytes > 0)
        memmove(t->data, src, nbytes);
    return s;
}

confsmoe_status confsmoe_tensor_copy_out(const confsmoe_tensor *t, void *dst, size_t nbytes)
{
    confsmoe_status s = check_copy(t, "tensor_copy_out", dst, nbytes);
    if (s == CONFSMOE_OK && nbytes > 0)
        memmove(dst, t->data, nbytes);
    return s;
}

static void format_shape(char *buf, size_t cap, int32_t ndim, const int64_t *dims)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int32_t i = 0; i < ndim && used < cap; i++) {
        if (dims[i] < 0)
            used += (size_t)snprintf(buf + used, cap - used, "%s*", i ? ", " : "");
        else
            used += (size_t)snprintf(buf + used, cap - used, "%s%" PRId64, i ? ", " : "", dims[i]);
    }
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

confsmoe_status csm_expect_tensor(confsmoe_ctx *ctx, const char *fn, const char *name, const confsmoe_tensor *t,
                                  confsmoe_dtype dtype, int32_t ndim, const int64_t *dims)
{
    if (!t)
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: %s is NULL", fn, name);
    if (t->dtype != dtype)
        return csm_fail(ctx, CONFSMOE_E_DTYPE, "%s: %s is %s, expected %s", fn, name, dtype_name(t->dtype),
                        dtype_name(dtype));
    bool match = t->ndim == ndim;
    for (int32_t i = 0; match && i < ndim; i++)
        match = dims[i] < 0 || dims[i] == t->dims[i];
    if (!match) {
        char got[96], want[96];
        format_shape(got, sizeof got, t->ndim, t->dims);
        format_shape(want, sizeof want, ndim, dims);
        return csm_fail(ctx, CONFSMOE_E_SHAPE, "%s: %s has shape %s, expected %s", fn, name, got, want);
    }
    return CONFSMOE_OK;
}

/* NaN and Inf are the floats whose exponent bits are all ones; an integer OR over the bits
 * vectorises, unlike isfinite, so the common all-finite case costs a streaming pass. */
CSM_SIMD_CLONES
static bool all_finite(const float *v, int64_t n)
{
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        bad |= (uint32_t)((bits & 0x7f800000u) == 0x7f800000u);
    }
    return bad == 0;
}

confsmoe_status csm_expect_finite(confsmoe_ctx *ctx, const char *fn, const char *name, const confsmoe_tensor *t)
{
    if (!ctx->check_finite || t->dtype != CONFSMOE_F32)
        return CONFSMOE_OK;
    const float *v = csm_f32(t);
    if (all_finite(v, t->numel))
        return CONFSMOE_OK;
    for (int64_t i = 0; i < t->numel; i++)
        if (!isfinite(v[i]))
            return csm_fail(ctx, CONFSMOE_E_NUMERIC, "%s: %s[%" PRId64 "] is %s (finite checks are on)", fn, name, i,
                            isnan(v[i]) ? "NaN" : "Inf");
    return CONFSMOE_OK;
}

void csm_fill_uniform(confsmoe_ctx *ctx, confsmoe_tensor *t, float bound)
{
    float *v = csm_f32(t);
    for (int64_t i = 0; i < t->numel; i++)
        v[i] = csm_rng_uniform(ctx, -bound, bound);
}
