/* Tensors: create, wrap, accessors, copies, and their failures. */
#include <stdio.h>
#include <string.h>

#include "confsmoe.h"
#include "testutil.h"

#define SENTINEL_T ((confsmoe_tensor *)(uintptr_t)0x1234)

static const confsmoe_dtype all_dtypes[3] = {CONFSMOE_F32, CONFSMOE_I32, CONFSMOE_U8};
/* Element sizes written down independently of the library. */
static size_t elem_size(confsmoe_dtype dt) { return dt == CONFSMOE_U8 ? 1 : 4; }

/* last_error of ctx contains every one of the (NULL-terminated) words. */
static void assert_error_mentions(confsmoe_ctx *ctx, const char *w1, const char *w2)
{
    const char *m = confsmoe_ctx_last_error(ctx);
    ck_assert_ptr_nonnull(m);
    ck_assert_msg(m[0] != '\0', "last_error is empty");
    ck_assert_msg(strstr(m, w1) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w1);
    if (w2)
        ck_assert_msg(strstr(m, w2) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w2);
}

/* ---------------------------------------------------------------- create */

START_TEST(test_create_each_dtype_and_rank)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[4] = {3, 2, 5, 4};
    for (int d = 0; d < 3; d++) {
        for (int32_t ndim = 1; ndim <= 4; ndim++) {
            confsmoe_dtype dt = all_dtypes[d];
            int64_t numel = 1;
            for (int32_t i = 0; i < ndim; i++)
                numel *= dims[i];
            confsmoe_tensor *t = SENTINEL_T;
            ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, ndim, dims, &t), CONFSMOE_OK);
            ck_assert_ptr_nonnull(t);
            ck_assert_ptr_ne(t, SENTINEL_T);
            ck_assert_int_eq(confsmoe_tensor_dtype(t), dt);
            ck_assert_int_eq(confsmoe_tensor_ndim(t), ndim);
            for (int32_t i = 0; i < ndim; i++)
                ck_assert_int_eq(confsmoe_tensor_dim(t, i), dims[i]);
            ck_assert_int_eq(confsmoe_tensor_dim(t, ndim), -1);
            ck_assert_int_eq(confsmoe_tensor_dim(t, -1), -1);
            ck_assert_int_eq(confsmoe_tensor_numel(t), numel);
            ck_assert_uint_eq(confsmoe_tensor_nbytes(t), (size_t)numel * elem_size(dt));

            unsigned char *data = confsmoe_tensor_data(t);
            ck_assert_ptr_nonnull(data);
            ck_assert_uint_eq((uintptr_t)data % 64, 0);
            for (size_t i = 0; i < confsmoe_tensor_nbytes(t); i++)
                ck_assert_msg(data[i] == 0, "byte %zu of a new tensor is %u, not 0", i, data[i]);
            /* The whole buffer is writable (valgrind checks the bounds). */
            memset(data, 0x5A, confsmoe_tensor_nbytes(t));
            confsmoe_tensor_destroy(t);
        }
    }
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_zeroed_after_reuse)
{
    /* Zero-fill is real, not an accident of fresh pages: dirty a block, free it, allocate again. */
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[2] = {17, 33};
    for (int round = 0; round < 4; round++) {
        confsmoe_tensor *t = NULL;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_I32, 2, dims, &t), CONFSMOE_OK);
        const int32_t *v = confsmoe_tensor_data(t);
        for (int64_t i = 0; i < 17 * 33; i++)
            ck_assert_int_eq(v[i], 0);
        memset(confsmoe_tensor_data(t), 0xFF, confsmoe_tensor_nbytes(t));
        confsmoe_tensor_destroy(t);
    }
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_aligned_with_counting_allocator)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long base = a.live;
    const int64_t sizes[] = {1, 3, 7, 63, 65, 1000};
    confsmoe_tensor *ts[6];
    for (int i = 0; i < 6; i++) {
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_U8, 1, &sizes[i], &ts[i]), CONFSMOE_OK);
        ck_assert_uint_eq((uintptr_t)confsmoe_tensor_data(ts[i]) % 64, 0);
    }
    ck_assert_int_gt(a.live, base);
    for (int i = 0; i < 6; i++)
        confsmoe_tensor_destroy(ts[i]);
    ck_assert_int_eq(a.live, base);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_create_empty)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t shapes[][3] = {{0, 0, 0}, {0, 5, 3}, {4, 0, 2}, {4, 3, 0}};
    for (int s = 0; s < 4; s++) {
        for (int d = 0; d < 3; d++) {
            confsmoe_tensor *t = SENTINEL_T;
            ck_assert_int_eq(confsmoe_tensor_create(ctx, all_dtypes[d], 3, shapes[s], &t), CONFSMOE_OK);
            ck_assert_ptr_nonnull(t);
            ck_assert_ptr_ne(t, SENTINEL_T);
            ck_assert_int_eq(confsmoe_tensor_numel(t), 0);
            ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 0);
            ck_assert_int_eq(confsmoe_tensor_ndim(t), 3);
            for (int32_t i = 0; i < 3; i++)
                ck_assert_int_eq(confsmoe_tensor_dim(t, i), shapes[s][i]);
            /* Copies of zero bytes work, with or without a buffer. */
            ck_assert_int_eq(confsmoe_tensor_copy_in(t, NULL, 0), CONFSMOE_OK);
            ck_assert_int_eq(confsmoe_tensor_copy_out(t, NULL, 0), CONFSMOE_OK);
            char c = 'q';
            ck_assert_int_eq(confsmoe_tensor_copy_out(t, &c, 0), CONFSMOE_OK);
            ck_assert_int_eq(c, 'q');
            ck_assert_int_eq(confsmoe_tensor_copy_in(t, &c, 1), CONFSMOE_E_SHAPE);
            confsmoe_tensor_destroy(t);
        }
    }
    /* A zero in front of a huge dim: the product is 0, not an overflow. */
    const int64_t zero_big[2] = {0, INT64_MAX};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, zero_big, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_numel(t), 0);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 1), INT64_MAX);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_bad_ndim)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    const int64_t dims[5] = {2, 2, 2, 2, 2};
    const int32_t bad[] = {0, 5, -1, 100, INT32_MIN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_tensor *t = SENTINEL_T;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, bad[i], dims, &t), CONFSMOE_E_SHAPE);
        ck_assert_ptr_null(t);
        assert_error_mentions(ctx, "tensor_create", "ndim");
    }
    ck_assert_int_eq(a.total, total);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_negative_dim)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    const int64_t cases[][3] = {{-1, 2, 3}, {2, -1, 3}, {2, 3, -5}, {INT64_MIN, 1, 1}, {0, -1, 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        confsmoe_tensor *t = SENTINEL_T;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 3, cases[i], &t), CONFSMOE_E_SHAPE);
        ck_assert_ptr_null(t);
        assert_error_mentions(ctx, "tensor_create", "dims[");
    }
    ck_assert_int_eq(a.total, total);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_bad_dtype)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    const int64_t dims[1] = {4};
    const confsmoe_dtype bad[] = {3, -1, 100, INT32_MAX};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        confsmoe_tensor *t = SENTINEL_T;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, bad[i], 1, dims, &t), CONFSMOE_E_DTYPE);
        ck_assert_ptr_null(t);
        assert_error_mentions(ctx, "tensor_create", "dtype");
    }
    ck_assert_int_eq(a.total, total);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_null_dims)
{
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, NULL, &t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_create", "dims");
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_null_out_and_ctx)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[1] = {4};
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 1, dims, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_create", "out");
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_create(NULL, CONFSMOE_F32, 1, dims, &t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(t);
    ck_assert_int_eq(confsmoe_tensor_create(NULL, CONFSMOE_F32, 1, dims, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_overflow)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live, total = a.total;
    const int64_t cases[][3] = {
        {INT64_MAX / 2, 4, 1},          /* elements overflow */
        {INT64_C(1) << 40, INT64_C(1) << 40, 1},
        {INT64_MAX, INT64_MAX, 1},
        {INT64_MAX, 2, 1},
        {INT64_C(1) << 21, INT64_C(1) << 21, INT64_C(1) << 21},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        for (int d = 0; d < 3; d++) {
            confsmoe_tensor *t = SENTINEL_T;
            ck_assert_int_eq(confsmoe_tensor_create(ctx, all_dtypes[d], 3, cases[i], &t), CONFSMOE_E_NOMEM);
            ck_assert_ptr_null(t);
            assert_error_mentions(ctx, "tensor_create", "overflow");
        }
    }
    /* The byte size of f32 overflows although the element count fits in int64_t. */
    const int64_t bytes_overflow[1] = {INT64_MAX};
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 1, bytes_overflow, &t), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_create", "overflow");
    /* Rejected before any allocation. */
    ck_assert_int_eq(a.total, total);
    ck_assert_int_eq(a.live, live);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_create_too_large_to_allocate)
{
    /* A size that fits but that no allocator can provide: E_NOMEM, and the header is freed again. */
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live;
    const int64_t dims[2] = {INT64_C(1) << 25, INT64_C(1) << 25}; /* 4 PiB of f32 */
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(t);
    ck_assert_int_eq(a.live, live);
    assert_error_mentions(ctx, "tensor_create", "memory");
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_create_nomem_header_and_data)
{
    const int64_t dims[2] = {8, 9};
    for (long k = 1; k <= 2; k++) {
        test_alloc a = {0, 0, 0};
        confsmoe_allocator holder;
        confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
        const long live = a.live;
        /* k = 1 fails the header, k = 2 the data. */
        a.fail_at = a.total + k;
        confsmoe_tensor *t = SENTINEL_T;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_E_NOMEM);
        ck_assert_ptr_null(t);
        ck_assert_int_eq(a.total, a.fail_at);
        ck_assert_int_eq(a.live, live);
        assert_error_mentions(ctx, "tensor_create", "memory");
        /* The ctx still works. */
        a.fail_at = 0;
        ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
        ck_assert_int_eq(confsmoe_tensor_numel(t), 72);
        confsmoe_tensor_destroy(t);
        ck_assert_int_eq(a.live, live);
        confsmoe_ctx_destroy(ctx);
        ck_assert_int_eq(a.live, 0);
    }
}
END_TEST

START_TEST(test_wrap_nomem_header)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live;
    float buf[6] = {1, 2, 3, 4, 5, 6};
    const int64_t dims[2] = {2, 3};
    a.fail_at = a.total + 1;
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, buf, &t), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(t);
    ck_assert_int_eq(a.live, live);
    assert_error_mentions(ctx, "tensor_wrap", "memory");
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(buf[i], (float)(i + 1));
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

/* ---------------------------------------------------------------- accessors */

START_TEST(test_accessors_null)
{
    ck_assert_int_eq(confsmoe_tensor_dtype(NULL), -1);
    ck_assert_int_eq(confsmoe_tensor_ndim(NULL), -1);
    ck_assert_int_eq(confsmoe_tensor_dim(NULL, 0), -1);
    ck_assert_int_eq(confsmoe_tensor_numel(NULL), -1);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(NULL), 0);
    ck_assert_ptr_null(confsmoe_tensor_data(NULL));
    confsmoe_tensor_destroy(NULL);
}
END_TEST

START_TEST(test_dim_bad_axis)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[2] = {6, 7};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 0), 6);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 1), 7);
    const int32_t bad[] = {2, 3, 4, -1, -2, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_int_eq(confsmoe_tensor_dim(t, bad[i]), -1);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_dims_copied)
{
    /* The tensor keeps its own copy of dims. */
    confsmoe_ctx *ctx = test_ctx(0);
    int64_t dims[3] = {2, 3, 4};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_U8, 3, dims, &t), CONFSMOE_OK);
    dims[0] = 99;
    dims[1] = -1;
    dims[2] = 0;
    ck_assert_int_eq(confsmoe_tensor_dim(t, 0), 2);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 1), 3);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 2), 4);
    ck_assert_int_eq(confsmoe_tensor_numel(t), 24);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 24);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- wrap */

START_TEST(test_wrap_zero_copy)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long live = a.live;
    float *buf = malloc(12 * sizeof *buf);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 12; i++)
        buf[i] = (float)i * 0.5f;
    const int64_t dims[2] = {3, 4};
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, buf, &t), CONFSMOE_OK);
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_ne(t, SENTINEL_T);
    ck_assert_ptr_eq(confsmoe_tensor_data(t), buf);
    ck_assert_int_eq(confsmoe_tensor_dtype(t), CONFSMOE_F32);
    ck_assert_int_eq(confsmoe_tensor_ndim(t), 2);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 0), 3);
    ck_assert_int_eq(confsmoe_tensor_dim(t, 1), 4);
    ck_assert_int_eq(confsmoe_tensor_numel(t), 12);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 48);
    /* The caller's values are visible, not zeroed. */
    float out[12];
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, out, sizeof out), CONFSMOE_OK);
    for (int i = 0; i < 12; i++)
        ck_assert_float_eq(out[i], (float)i * 0.5f);
    /* Writes by the caller show in the tensor ... */
    buf[5] = -7.0f;
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, out, sizeof out), CONFSMOE_OK);
    ck_assert_float_eq(out[5], -7.0f);
    /* ... and writes through the tensor show in the caller's memory. */
    float in[12];
    for (int i = 0; i < 12; i++)
        in[i] = 100.0f + (float)i;
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, in, sizeof in), CONFSMOE_OK);
    for (int i = 0; i < 12; i++)
        ck_assert_float_eq(buf[i], 100.0f + (float)i);
    ((float *)confsmoe_tensor_data(t))[11] = 3.25f;
    ck_assert_float_eq(buf[11], 3.25f);

    confsmoe_tensor_destroy(t);
    /* Only the header was the library's: the caller's block was not handed to the allocator. */
    ck_assert_int_eq(a.live, live);
    /* And it was not freed: still readable and writable (valgrind flags it otherwise). */
    buf[0] = 1.0f;
    ck_assert_float_eq(buf[11], 3.25f);
    free(buf);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

START_TEST(test_wrap_each_dtype)
{
    confsmoe_ctx *ctx = test_ctx(0);
    int32_t i32[6] = {1, -2, 3, -4, 5, -6};
    uint8_t u8[7] = {1, 2, 3, 4, 5, 6, 7};
    const int64_t d6[1] = {6};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_I32, 1, d6, i32, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_dtype(t), CONFSMOE_I32);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 24);
    ck_assert_ptr_eq(confsmoe_tensor_data(t), i32);
    confsmoe_tensor_destroy(t);
    /* u8 elements are 1 byte: an odd address is aligned for them. */
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_U8, 1, d6, u8 + 1, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_dtype(t), CONFSMOE_U8);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 6);
    ck_assert_ptr_eq(confsmoe_tensor_data(t), u8 + 1);
    uint8_t out[6];
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, out, sizeof out), CONFSMOE_OK);
    for (int i = 0; i < 6; i++)
        ck_assert_uint_eq(out[i], (unsigned)(i + 2));
    confsmoe_tensor_destroy(t);
    ck_assert_uint_eq(u8[0], 1);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_wrap_null_data)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[2] = {2, 3};
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, NULL, &t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "data");
    /* Allowed when there are no elements. */
    const int64_t empty[2] = {0, 3};
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, empty, NULL, &t), CONFSMOE_OK);
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_ne(t, SENTINEL_T);
    ck_assert_int_eq(confsmoe_tensor_numel(t), 0);
    ck_assert_uint_eq(confsmoe_tensor_nbytes(t), 0);
    ck_assert_ptr_null(confsmoe_tensor_data(t));
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_wrap_misaligned)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const long total = a.total;
    _Alignas(16) unsigned char raw[64];
    const int64_t dims[1] = {4};
    const confsmoe_dtype four_byte[2] = {CONFSMOE_F32, CONFSMOE_I32};
    for (int d = 0; d < 2; d++) {
        for (int off = 1; off < 4; off++) {
            confsmoe_tensor *t = SENTINEL_T;
            ck_assert_int_eq(confsmoe_tensor_wrap(ctx, four_byte[d], 1, dims, raw + off, &t),
                             CONFSMOE_E_INVALID_ARGUMENT);
            ck_assert_ptr_null(t);
            assert_error_mentions(ctx, "tensor_wrap", "align");
        }
    }
    ck_assert_int_eq(a.total, total);
    /* Aligned to 4 but not to 64 is fine. */
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 1, dims, raw + 4, &t), CONFSMOE_OK);
    ck_assert_ptr_eq(confsmoe_tensor_data(t), raw + 4);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_wrap_bad_shape_and_dtype)
{
    confsmoe_ctx *ctx = test_ctx(0);
    float buf[8];
    const int64_t dims[5] = {2, 2, 2, 1, 1};
    const int64_t neg[2] = {2, -2};
    const int64_t huge[2] = {INT64_MAX / 2, 4};
    confsmoe_tensor *t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 0, dims, buf, &t), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "ndim");
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 5, dims, buf, &t), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(t);
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, neg, buf, &t), CONFSMOE_E_SHAPE);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "dims[1]");
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, 9, 1, dims, buf, &t), CONFSMOE_E_DTYPE);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "dtype");
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, NULL, buf, &t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "dims");
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, huge, buf, &t), CONFSMOE_E_NOMEM);
    ck_assert_ptr_null(t);
    assert_error_mentions(ctx, "tensor_wrap", "overflow");
    ck_assert_int_eq(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 1, dims, buf, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_wrap", "out");
    t = SENTINEL_T;
    ck_assert_int_eq(confsmoe_tensor_wrap(NULL, CONFSMOE_F32, 1, dims, buf, &t), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_null(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* ---------------------------------------------------------------- copies */

START_TEST(test_copy_round_trip)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[3] = {2, 3, 5};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 3, dims, &t), CONFSMOE_OK);
    float in[30], out[30];
    for (int i = 0; i < 30; i++) {
        in[i] = (float)(i * i) - 12.5f;
        out[i] = -1.0f;
    }
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, in, sizeof in), CONFSMOE_OK);
    /* copy_in copies: later changes to the source do not reach the tensor. */
    in[0] = 999.0f;
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, out, sizeof out), CONFSMOE_OK);
    ck_assert_float_eq(out[0], -12.5f);
    for (int i = 1; i < 30; i++)
        ck_assert_float_eq(out[i], in[i]);
    /* The data pointer sees the same row-major contents. */
    const float *data = confsmoe_tensor_data(t);
    ck_assert_float_eq(data[1 * 15 + 2 * 5 + 4], (float)(29 * 29) - 12.5f);
    ck_assert_str_eq(confsmoe_ctx_last_error(ctx), "");
    confsmoe_tensor_destroy(t);

    /* u8 and i32 too. */
    const int64_t d5[1] = {5};
    uint8_t u_in[5] = {0, 1, 128, 254, 255}, u_out[5] = {9, 9, 9, 9, 9};
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_U8, 1, d5, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, u_in, sizeof u_in), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, u_out, sizeof u_out), CONFSMOE_OK);
    ck_assert_int_eq(memcmp(u_in, u_out, sizeof u_in), 0);
    confsmoe_tensor_destroy(t);
    int32_t i_in[5] = {INT32_MIN, -1, 0, 1, INT32_MAX}, i_out[5] = {0};
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_I32, 1, d5, &t), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, i_in, sizeof i_in), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, i_out, sizeof i_out), CONFSMOE_OK);
    ck_assert_int_eq(memcmp(i_in, i_out, sizeof i_in), 0);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_copy_wrong_nbytes)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[2] = {2, 4};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &t), CONFSMOE_OK);
    float init[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, init, sizeof init), CONFSMOE_OK);

    float src[9] = {-1, -1, -1, -1, -1, -1, -1, -1, -1};
    const size_t wrong[] = {0, 4, 7 * sizeof(float), 9 * sizeof(float), 8 * sizeof(float) - 1,
                            8 * sizeof(float) + 1};
    for (size_t i = 0; i < sizeof wrong / sizeof wrong[0]; i++) {
        ck_assert_int_eq(confsmoe_tensor_copy_in(t, src, wrong[i]), CONFSMOE_E_SHAPE);
        assert_error_mentions(ctx, "tensor_copy_in", "bytes");
        /* The tensor is unchanged. */
        const float *data = confsmoe_tensor_data(t);
        for (int j = 0; j < 8; j++)
            ck_assert_float_eq(data[j], init[j]);

        float dst[9] = {42, 42, 42, 42, 42, 42, 42, 42, 42};
        ck_assert_int_eq(confsmoe_tensor_copy_out(t, dst, wrong[i]), CONFSMOE_E_SHAPE);
        assert_error_mentions(ctx, "tensor_copy_out", "bytes");
        /* The destination is unchanged. */
        for (int j = 0; j < 9; j++)
            ck_assert_float_eq(dst[j], 42.0f);
    }
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_copy_null_buffer)
{
    confsmoe_ctx *ctx = test_ctx(0);
    const int64_t dims[1] = {3};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_I32, 1, dims, &t), CONFSMOE_OK);
    const int32_t init[3] = {7, 8, 9};
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, init, sizeof init), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, NULL, sizeof init), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_copy_in", "NULL");
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, NULL, sizeof init), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_copy_out", "NULL");
    const int32_t *data = confsmoe_tensor_data(t);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(data[i], init[i]);
    /* A zero size with NULL on a non-empty tensor is still the wrong size. */
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, NULL, 0), CONFSMOE_E_SHAPE);
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, NULL, 0), CONFSMOE_E_SHAPE);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_copy_null_tensor)
{
    float buf[2] = {5, 6};
    ck_assert_int_eq(confsmoe_tensor_copy_in(NULL, buf, sizeof buf), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_tensor_copy_out(NULL, buf, sizeof buf), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_float_eq(buf[0], 5.0f);
    ck_assert_float_eq(buf[1], 6.0f);
}
END_TEST

START_TEST(test_copy_no_allocation)
{
    test_alloc a = {0, 0, 0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&a, &holder, 0);
    const int64_t dims[1] = {16};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, CONFSMOE_U8, 1, dims, &t), CONFSMOE_OK);
    const long total = a.total;
    uint8_t buf[16] = {0};
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, buf, sizeof buf), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, buf, sizeof buf), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, buf, 3), CONFSMOE_E_SHAPE);
    ck_assert_int_eq(a.total, total);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(a.live, 0);
}
END_TEST

static Suite *tensor_suite(void)
{
    Suite *s = suite_create("tensor");
    TCase *tc = tcase_create("create");
    tcase_add_test(tc, test_create_each_dtype_and_rank);
    tcase_add_test(tc, test_create_zeroed_after_reuse);
    tcase_add_test(tc, test_create_aligned_with_counting_allocator);
    tcase_add_test(tc, test_create_empty);
    tcase_add_test(tc, test_create_bad_ndim);
    tcase_add_test(tc, test_create_negative_dim);
    tcase_add_test(tc, test_create_bad_dtype);
    tcase_add_test(tc, test_create_null_dims);
    tcase_add_test(tc, test_create_null_out_and_ctx);
    tcase_add_test(tc, test_create_overflow);
    tcase_add_test(tc, test_create_too_large_to_allocate);
    tcase_add_test(tc, test_create_nomem_header_and_data);
    suite_add_tcase(s, tc);

    TCase *ta = tcase_create("accessors");
    tcase_add_test(ta, test_accessors_null);
    tcase_add_test(ta, test_dim_bad_axis);
    tcase_add_test(ta, test_dims_copied);
    suite_add_tcase(s, ta);

    TCase *tw = tcase_create("wrap");
    tcase_add_test(tw, test_wrap_zero_copy);
    tcase_add_test(tw, test_wrap_each_dtype);
    tcase_add_test(tw, test_wrap_null_data);
    tcase_add_test(tw, test_wrap_misaligned);
    tcase_add_test(tw, test_wrap_bad_shape_and_dtype);
    tcase_add_test(tw, test_wrap_nomem_header);
    suite_add_tcase(s, tw);

    TCase *tp = tcase_create("copy");
    tcase_add_test(tp, test_copy_round_trip);
    tcase_add_test(tp, test_copy_wrong_nbytes);
    tcase_add_test(tp, test_copy_null_buffer);
    tcase_add_test(tp, test_copy_null_tensor);
    tcase_add_test(tp, test_copy_no_allocation);
    suite_add_tcase(s, tp);
    return s;
}

int main(void) { return test_run(tensor_suite()); }
