/* The safetensors reader and writer (lib/safetensors.c), called directly on files written
 * byte by byte here: what a valid file parses to, one malformed file per rule the reader
 * enforces (each CONFSMOE_E_FORMAT with a message naming the problem, nothing kept, nothing
 * leaked), and the byte layout the writer produces. */
#include <stdint.h>

#include "safetensors.h"
#include "testutil.h"

#define WHO "test.safetensors"

/* An 8-byte little-endian header length, the header, then data. */
static unsigned char *st_bytes(const char *header, const void *data, size_t data_bytes, size_t *size)
{
    const size_t n = strlen(header);
    unsigned char *b = xcalloc(8 + n + data_bytes, 1);
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)((uint64_t)n >> (8 * i));
    memcpy(b + 8, header, n);
    if (data_bytes)
        memcpy(b + 8 + n, data, data_bytes);
    *size = 8 + n + data_bytes;
    return b;
}

START_TEST(test_valid_file)
{
    confsmoe_ctx *ctx = test_ctx(1);
    const char *header = "{ \"caf\\u00e9\" : {\"shape\":[], \"data_offsets\":[8,16], \"dtype\":\"I64\"},"
                         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                         "\"__metadata__\":{\"note\":\"a\\\"b\",\"format\":\"pt\"}}   ";
    unsigned char data[16];
    for (int i = 0; i < 16; i++)
        data[i] = (unsigned char)(i + 1);
    size_t size;
    unsigned char *bytes = st_bytes(header, data, sizeof data, &size);
    csm_st_file f;
    ck_assert_int_eq(csm_st_parse(ctx, WHO, bytes, size, &f), CONFSMOE_OK);
    ck_assert_uint_eq(f.n_tensors, 2);
    /* Sorted by name: "b" (0x62) before "caf\xc3\xa9". */
    const csm_st_tensor *b = &f.tensors[0], *cafe = &f.tensors[1];
    ck_assert_str_eq(b->name, "b");
    ck_assert_str_eq(cafe->name, "caf\xc3\xa9");
    ck_assert_int_eq(b->dtype, CSM_ST_F32);
    ck_assert_int_eq(b->ndim, 1);
    ck_assert_int_eq(b->dims[0], 2);
    ck_assert_uint_eq(b->numel, 2);
    ck_assert_ptr_eq(b->data, bytes + 8 + strlen(header));
    ck_assert_int_eq(cafe->dtype, CSM_ST_I64);
    ck_assert_int_eq(cafe->ndim, 0);
    ck_assert_uint_eq(cafe->numel, 1);
    ck_assert_uint_eq(cafe->begin, 8);
    ck_assert_uint_eq(cafe->end, 16);
    ck_assert_int_eq(cafe->data[0], 9);
    ck_assert_ptr_eq(csm_st_find(&f, "b"), b);
    ck_assert_ptr_null(csm_st_find(&f, "c"));
    ck_assert_str_eq(csm_st_meta_get(&f, "format"), "pt");
    ck_assert_str_eq(csm_st_meta_get(&f, "note"), "a\"b");
    ck_assert_ptr_null(csm_st_meta_get(&f, "missing"));
    csm_st_file_free(ctx, &f);
    free(bytes);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_empty_header_and_no_data)
{
    confsmoe_ctx *ctx = test_ctx(1);
    size_t size;
    unsigned char *bytes = st_bytes("{}", NULL, 0, &size);
    csm_st_file f;
    ck_assert_int_eq(csm_st_parse(ctx, WHO, bytes, size, &f), CONFSMOE_OK);
    ck_assert_uint_eq(f.n_tensors, 0);
    ck_assert_uint_eq(f.n_meta, 0);
    csm_st_file_free(ctx, &f);
    free(bytes);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

/* One malformed file each: the header, the data bytes after it, and a phrase of the message. */
static const struct {
    const char *header;
    size_t data_bytes;
    const char *message;
} malformed[] = {
    {" {}", 0, "must start with '{'"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}x", 4, "unexpected bytes after the header"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
     "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "tensor \"a\" appears twice"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"extra\":1}}", 4, "unknown field \"extra\""},
    {"{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "has \"dtype\" twice"},
    {"{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "has no dtype"},
    {"{\"a\":{\"dtype\":\"F4\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "unsupported dtype \"F4\""},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, "must not be negative"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}", 4, "leading zero"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}", 4, "integers only"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,4]}}", 4, "overflows 64 bits"},
    {"{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
     "more than 16 entries"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, "must hold 2 integers, not 1"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4, "reversed data_offsets"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8,
     "12 bytes, but its data_offsets [0, 8] span 8"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4,
     "ends at data byte 8 but the file holds only 4"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, "starts at data byte 8, expected 4"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
     "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, "starts at data byte 4, expected 8"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8, "cover 4 data bytes but the file holds 8"},
    {"{\"\\udc00\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "lone low surrogate"},
    {"{\"a\\u0000\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "NUL character"},
    {"{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "invalid UTF-8"},
    {"{\"a\tb\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "control character 0x09"},
    {"{\"__metadata__\":{\"k\":1}}", 0, "value of \"k\" is not a string"},
    {"{\"__metadata__\":{\"k\":\"v\",\"j\":\"x\",\"k\":\"w\"}}", 0, "metadata key \"k\" appears twice"},
    {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, "the header ends inside the header object"},
};

START_TEST(test_malformed_files)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 1);
    const long live = counter.live;
    const unsigned char zeros[16] = {0};
    for (size_t i = 0; i < sizeof malformed / sizeof *malformed; i++) {
        size_t size;
        unsigned char *bytes = st_bytes(malformed[i].header, zeros, malformed[i].data_bytes, &size);
        csm_st_file f;
        ck_assert_int_eq(csm_st_parse(ctx, WHO, bytes, size, &f), CONFSMOE_E_FORMAT);
        const char *msg = confsmoe_ctx_last_error(ctx);
        ck_assert_msg(strncmp(msg, WHO ": ", strlen(WHO ": ")) == 0 && strstr(msg, malformed[i].message),
                      "case %zu: \"%s\" lacks \"%s\"", i, msg, malformed[i].message);
        ck_assert_uint_eq(f.n_tensors, 0);
        ck_assert_ptr_null(f.tensors);
        ck_assert_ptr_null(f.strings);
        ck_assert_int_eq(counter.live, live);
        free(bytes);
    }
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_header_length_beyond_the_file)
{
    confsmoe_ctx *ctx = test_ctx(1);
    csm_st_file f;
    const unsigned char short_file[5] = {1, 0, 0, 0, 0};
    ck_assert_int_eq(csm_st_parse(ctx, WHO, short_file, sizeof short_file, &f), CONFSMOE_E_FORMAT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(ctx), "fewer than the 8-byte header length"));
    /* Length 3, two bytes after it. */
    const unsigned char cut[10] = {3, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    ck_assert_int_eq(csm_st_parse(ctx, WHO, cut, sizeof cut, &f), CONFSMOE_E_FORMAT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(ctx), "header length 3 exceeds the 2 bytes after it"));
    /* 100000001 bytes: one past the reference implementation's limit. */
    const unsigned char huge[10] = {0x01, 0xE1, 0xF5, 0x05, 0, 0, 0, 0, '{', '}'};
    ck_assert_int_eq(csm_st_parse(ctx, WHO, huge, sizeof huge, &f), CONFSMOE_E_FORMAT);
    ck_assert_ptr_nonnull(strstr(confsmoe_ctx_last_error(ctx), "header length 100000001 exceeds the limit"));
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_dtype_table_and_dims_text)
{
    ck_assert_str_eq(csm_st_dtype_name(CSM_ST_BF16), "BF16");
    ck_assert_uint_eq(csm_st_dtype_size(CSM_ST_BF16), 2);
    ck_assert_str_eq(csm_st_dtype_name(CSM_ST_F8_E4M3), "F8_E4M3");
    ck_assert_uint_eq(csm_st_dtype_size(CSM_ST_F8_E4M3), 1);
    ck_assert_uint_eq(csm_st_dtype_size(CSM_ST_C64), 8);
    ck_assert_str_eq(csm_st_dtype_name((csm_st_dtype)99), "unknown");
    ck_assert_uint_eq(csm_st_dtype_size((csm_st_dtype)99), 0);
    char buf[32];
    const int64_t dims[2] = {2, 3};
    csm_st_format_dims(buf, sizeof buf, 2, dims);
    ck_assert_str_eq(buf, "[2, 3]");
    csm_st_format_dims(buf, sizeof buf, 0, dims);
    ck_assert_str_eq(buf, "[]");
    csm_st_format_dims(buf, 4, 2, dims);
    ck_assert_str_eq(buf, "[2,");
}
END_TEST

START_TEST(test_writer_layout)
{
    confsmoe_ctx *ctx = test_ctx(1);
    test_scratch dir;
    test_scratch_open(&dir, "private_st");
    const float w[3] = {1.5f, -2.0f, 0.25f};
    const int32_t labels[2] = {7, -1};
    const int64_t w_dims[2] = {1, 3}, label_dims[1] = {2};
    const csm_st_entry entries[2] = {
        {.name = "w", .dtype = CSM_ST_F32, .ndim = 2, .dims = w_dims, .data = w, .nbytes = sizeof w},
        {.name = "labels", .dtype = CSM_ST_I32, .ndim = 1, .dims = label_dims, .data = labels, .nbytes = sizeof labels},
    };
    const csm_st_meta meta[1] = {{"format", "pt"}};
    ck_assert_int_eq(csm_st_write(ctx, WHO, dir.path, meta, 1, entries, 2), CONFSMOE_OK);
    ck_assert_int_eq(test_temp_files(dir.dir), 0);

    /* The bytes: u64 N, N bytes of header starting with '{', then the data in the given order. */
    FILE *fp = fopen(dir.path, "rb");
    ck_assert_ptr_nonnull(fp);
    unsigned char raw[1024];
    const size_t got = fread(raw, 1, sizeof raw, fp);
    fclose(fp);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | raw[i];
    ck_assert_uint_eq(got, 8 + n + sizeof w + sizeof labels);
    ck_assert_int_eq(raw[8], '{');
    ck_assert_mem_eq(raw + 8 + n, w, sizeof w);
    ck_assert_mem_eq(raw + 8 + n + sizeof w, labels, sizeof labels);

    /* And the reader finds them where the writer put them. */
    csm_st_file f;
    ck_assert_int_eq(csm_st_read(ctx, WHO, dir.path, &f), CONFSMOE_OK);
    const csm_st_tensor *t = csm_st_find(&f, "labels");
    ck_assert_ptr_nonnull(t);
    ck_assert_uint_eq(t->begin, sizeof w);
    ck_assert_uint_eq(t->end, sizeof w + sizeof labels);
    ck_assert_int_eq(t->dtype, CSM_ST_I32);
    ck_assert_str_eq(csm_st_meta_get(&f, "format"), "pt");
    csm_st_file_free(ctx, &f);

    /* A name twice is refused and leaves the file as it was. */
    const csm_st_entry twice[2] = {entries[0], entries[0]};
    ck_assert_int_eq(csm_st_write(ctx, WHO, dir.path, NULL, 0, twice, 2), CONFSMOE_E_INVALID_ARGUMENT);
    fp = fopen(dir.path, "rb");
    unsigned char again[1024];
    ck_assert_uint_eq(fread(again, 1, sizeof again, fp), got);
    fclose(fp);
    ck_assert_mem_eq(again, raw, got);
    ck_assert_int_eq(test_rm_dir(dir.dir), 1);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_safetensors");
    TCase *tc = tcase_create("safetensors");
    tcase_add_test(tc, test_valid_file);
    tcase_add_test(tc, test_empty_header_and_no_data);
    tcase_add_test(tc, test_malformed_files);
    tcase_add_test(tc, test_header_length_beyond_the_file);
    tcase_add_test(tc, test_dtype_table_and_dims_text);
    tcase_add_test(tc, test_writer_layout);
    suite_add_tcase(s, tc);
    return test_run(s);
}
