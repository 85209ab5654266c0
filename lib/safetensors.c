/* The safetensors format: a strict, bounds-checked reader and an atomic writer.
 * The header parser is not a general JSON parser: it knows the one shape a
 * header can have (an object of objects of strings and integer arrays), so it
 * needs no recursion and rejects anything else at the first wrong byte. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"

#define METADATA_KEY "__metadata__"
#define ERRNO_TEXT_CAP 128

/* ---------------------------------------------------------------- dtypes */

static const struct {
    const char *name;
    size_t size;
} dtype_table[] = {
    [CSM_ST_BOOL] = {"BOOL", 1},   [CSM_ST_U8] = {"U8", 1},       [CSM_ST_I8] = {"I8", 1},
    [CSM_ST_F8_E5M2] = {"F8_E5M2", 1}, [CSM_ST_F8_E4M3] = {"F8_E4M3", 1}, [CSM_ST_F8_E8M0] = {"F8_E8M0", 1},
    [CSM_ST_I16] = {"I16", 2},     [CSM_ST_U16] = {"U16", 2},     [CSM_ST_F16] = {"F16", 2},
    [CSM_ST_BF16] = {"BF16", 2},   [CSM_ST_I32] = {"I32", 4},     [CSM_ST_U32] = {"U32", 4},
    [CSM_ST_F32] = {"F32", 4},     [CSM_ST_F64] = {"F64", 8},     [CSM_ST_I64] = {"I64", 8},
    [CSM_ST_U64] = {"U64", 8},     [CSM_ST_C64] = {"C64", 8},
};
enum { N_DTYPES = sizeof dtype_table / sizeof dtype_table[0] };

const char *csm_st_dtype_name(csm_st_dtype dtype)
{
    return (unsigned)dtype < N_DTYPES ? dtype_table[dtype].name : "unknown";
}

size_t csm_st_dtype_size(csm_st_dtype dtype)
{
    return (unsigned)dtype < N_DTYPES ? dtype_table[dtype].size : 0;
}

static bool dtype_from_name(const char *name, csm_st_dtype *out)
{
    for (int i = 0; i < N_DTYPES; i++)
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (csm_st_dtype)i;
            return true;
        }
    return false;
}

/* ---------------------------------------------------------------- small helpers */

static uint64_t load_u64_le(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

static void store_u64_le(unsigned char *b, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}

/* Replaces a[0..*cap) by a twice larger zero-tailed copy: the ctx allocator has no realloc. */
static bool grow_array(confsmoe_ctx *ctx, void **a, size_t *cap, size_t used, size_t elem)
{
    size_t new_cap = *cap ? 2 * *cap : 16;
    if (new_cap < *cap)
        return false;
    void *grown = csm_calloc(ctx, new_cap, elem);
    if (!grown)
        return false;
    if (used)
        memcpy(grown, *a, used * elem);
    csm_free(ctx, *a);
    *a = grown;
    *cap = new_cap;
    return true;
}

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if it is not one
 * (overlong forms, surrogates and code points past U+10FFFF are rejected). */
static size_t utf8_sequence_length(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    size_t len;
    uint32_t cp, min;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2, cp = c & 0x1Fu, min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3, cp = c & 0x0Fu, min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

static bool is_valid_utf8(const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t len = utf8_sequence_length((const unsigned char *)s + i, n - i);
        if (len == 0)
            return false;
        i += len;
    }
    return true;
}

/* ---------------------------------------------------------------- header parser */

typedef struct {
    confsmoe_ctx *ctx;
    const char *who;
    const unsigned char *text;  /* the header, not NUL-terminated */
    size_t size, pos;
    char *strings;              /* decoded strings; never more bytes than the header */
    size_t strings_used, strings_cap;
} reader;

__attribute__((format(printf, 2, 3))) static confsmoe_status reader_fail(const reader *r, const char *fmt, ...)
{
    char detail[CSM_ERROR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    return csm_fail(r->ctx, CONFSMOE_E_FORMAT, "%s: bad header at byte %zu: %s", r->who, r->pos, detail);
}

static void skip_whitespace(reader *r)
{
    while (r->pos < r->size) {
        unsigned char c = r->text[r->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            return;
        r->pos++;
    }
}

/* After whitespace, the next byte (or -1 at the end). */
static int peek(reader *r)
{
    skip_whitespace(r);
    return r->pos < r->size ? r->text[r->pos] : -1;
}

static confsmoe_status expect(reader *r, char c, const char *where)
{
    int got = peek(r);
    if (got != c) {
        if (got < 0)
            return reader_fail(r, "the header ends where '%c' %s was expected", c, where);
        return reader_fail(r, "expected '%c' %s", c, where);
    }
    r->pos++;
    return CONFSMOE_OK;
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Reads the 4 hex digits after "\u" at r->pos. */
static confsmoe_status read_hex4(reader *r, uint32_t *out)
{
    if (r->size - r->pos < 4)
        return reader_fail(r, "the header ends inside a \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(r->text[r->pos + (size_t)i]);
        if (h < 0)
            return reader_fail(r, "\\u must be followed by 4 hex digits");
        v = (v << 4) | (uint32_t)h;
    }
    r->pos += 4;
    *out = v;
    return CONFSMOE_OK;
}

static confsmoe_status put_byte(reader *r, unsigned char b)
{
    /* Decoding never grows a string, so this bound only guards against a bug. */
    if (r->strings_used >= r->strings_cap)
        return csm_fail(r->ctx, CONFSMOE_E_INTERNAL, "%s: header string buffer overflow", r->who);
    r->strings[r->strings_used++] = (char)b;
    return CONFSMOE_OK;
}

static confsmoe_status put_code_point(reader *r, uint32_t cp)
{
    unsigned char b[4];
    size_t n;
    if (cp < 0x80) {
        b[0] = (unsigned char)cp, n = 1;
    } else if (cp < 0x800) {
        b[0] = (unsigned char)(0xC0 | (cp >> 6)), b[1] = (unsigned char)(0x80 | (cp & 0x3F)), n = 2;
    } else if (cp < 0x10000) {
        b[0] = (unsigned char)(0xE0 | (cp >> 12)), b[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        b[2] = (unsigned char)(0x80 | (cp & 0x3F)), n = 3;
    } else {
        b[0] = (unsigned char)(0xF0 | (cp >> 18)), b[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        b[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F)), b[3] = (unsigned char)(0x80 | (cp & 0x3F)), n = 4;
    }
    for (size_t i = 0; i < n; i++) {
        confsmoe_status s = put_byte(r, b[i]);
        if (s != CONFSMOE_OK)
            return s;
    }
    return CONFSMOE_OK;
}

static confsmoe_status read_escape(reader *r)
{
    if (r->pos >= r->size)
        return reader_fail(r, "the header ends inside an escape");
    unsigned char c = r->text[r->pos++];
    switch (c) {
    case '"': return put_byte(r, '"');
    case '\\': return put_byte(r, '\\');
    case '/': return put_byte(r, '/');
    case 'b': return put_byte(r, '\b');
    case 'f': return put_byte(r, '\f');
    case 'n': return put_byte(r, '\n');
    case 'r': return put_byte(r, '\r');
    case 't': return put_byte(r, '\t');
    case 'u': break;
    default: r->pos--; return reader_fail(r, "unknown escape '\\%c'", c >= 0x20 && c < 0x7F ? c : '?');
    }
    uint32_t cp;
    confsmoe_status s = read_hex4(r, &cp);
    if (s != CONFSMOE_OK)
        return s;
    if (cp >= 0xDC00 && cp <= 0xDFFF)
        return reader_fail(r, "a \\u escape is a lone low surrogate");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (r->size - r->pos < 2 || r->text[r->pos] != '\\' || r->text[r->pos + 1] != 'u')
            return reader_fail(r, "a high surrogate \\u escape is not followed by a low one");
        r->pos += 2;
        uint32_t low;
        s = read_hex4(r, &low);
        if (s != CONFSMOE_OK)
            return s;
        if (low < 0xDC00 || low > 0xDFFF)
            return reader_fail(r, "a high surrogate \\u escape is not followed by a low one");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    if (cp == 0)
        return reader_fail(r, "a string contains a NUL character");
    return put_code_point(r, cp);
}

/* Reads a JSON string into the string buffer; *out is NUL-terminated UTF-8. */
static confsmoe_status read_string(reader *r, const char **out, const char *what)
{
    int c = peek(r);
    if (c != '"')
        return c < 0 ? reader_fail(r, "the header ends where %s was expected", what)
                     : reader_fail(r, "expected %s (a string)", what);
    r->pos++;
    const size_t start = r->strings_used;
    for (;;) {
        if (r->pos >= r->size)
            return reader_fail(r, "unterminated string");
        unsigned char b = r->text[r->pos];
        confsmoe_status s;
        if (b == '"') {
            r->pos++;
            break;
        }
        if (b < 0x20)
            return reader_fail(r, "control character 0x%02x inside a string", b);
        if (b == '\\') {
            r->pos++;
            s = read_escape(r);
        } else {
            size_t len = utf8_sequence_length(r->text + r->pos, r->size - r->pos);
            if (len == 0)
                return reader_fail(r, "invalid UTF-8 inside a string");
            s = CONFSMOE_OK;
            for (size_t i = 0; i < len && s == CONFSMOE_OK; i++)
                s = put_byte(r, r->text[r->pos + i]);
            r->pos += len;
        }
        if (s != CONFSMOE_OK)
            return s;
    }
    confsmoe_status s = put_byte(r, '\0');
    if (s != CONFSMOE_OK)
        return s;
    *out = r->strings + start;
    return CONFSMOE_OK;
}

/* A non-negative JSON integer that fits in u64; fractions and exponents are rejected. */
static confsmoe_status read_u64(reader *r, uint64_t *out, const char *what)
{
    int c = peek(r);
    if (c == '-')
        return reader_fail(r, "%s must not be negative", what);
    if (c < '0' || c > '9')
        return reader_fail(r, "expected an integer in %s", what);
    uint64_t v = 0;
    const size_t start = r->pos;
    while (r->pos < r->size && r->text[r->pos] >= '0' && r->text[r->pos] <= '9') {
        unsigned digit = r->text[r->pos] - '0';
        if (v > (UINT64_MAX - digit) / 10)
            return reader_fail(r, "an integer in %s overflows 64 bits", what);
        v = v * 10 + digit;
        r->pos++;
    }
    if (r->pos - start > 1 && r->text[start] == '0')
        return reader_fail(r, "an integer in %s has a leading zero", what);
    if (r->pos < r->size && (r->text[r->pos] == '.' || r->text[r->pos] == 'e' || r->text[r->pos] == 'E'))
        return reader_fail(r, "%s must hold integers only", what);
    *out = v;
    return CONFSMOE_OK;
}

/* "[i, j, ...]" with at most cap integers. */
static confsmoe_status read_u64_array(reader *r, uint64_t *values, size_t cap, size_t *count, const char *what)
{
    int c = peek(r);
    if (c != '[')
        return c < 0 ? reader_fail(r, "the header ends where %s was expected", what)
                     : reader_fail(r, "expected '[' to open %s", what);
    r->pos++;
    *count = 0;
    confsmoe_status s;
    if (peek(r) == ']') {
        r->pos++;
        return CONFSMOE_OK;
    }
    for (;;) {
        if (*count == cap)
            return reader_fail(r, "%s has more than %zu entries", what, cap);
        s = read_u64(r, &values[(*count)++], what);
        if (s != CONFSMOE_OK)
            return s;
        c = peek(r);
        if (c < 0)
            return reader_fail(r, "the header ends inside %s", what);
        if (c != ',' && c != ']')
            return reader_fail(r, "expected ',' or ']' in %s", what);
        r->pos++;
        if (c == ']')
            return CONFSMOE_OK;
    }
}

/* What the parser builds up, owned by the csm_st_file being filled. */
typedef struct {
    csm_st_tensor *tensors;
    size_t n_tensors, cap_tensors;
    csm_st_meta *meta;
    size_t n_meta, cap_meta;
    bool seen_metadata;
} collected;

/* After an object member: true with *more for ',' , true with !*more for '}'. */
static confsmoe_status next_member(reader *r, bool *more, const char *where)
{
    int c = peek(r);
    if (c == ',' || c == '}') {
        r->pos++;
        *more = c == ',';
        return CONFSMOE_OK;
    }
    if (c < 0)
        return reader_fail(r, "the header ends inside %s", where);
    return reader_fail(r, "expected ',' or '}' in %s", where);
}

static confsmoe_status parse_metadata(reader *r, collected *c)
{
    if (c->seen_metadata)
        return reader_fail(r, "\"" METADATA_KEY "\" appears twice");
    c->seen_metadata = true;
    confsmoe_status s = expect(r, '{', "to open " METADATA_KEY);
    if (s != CONFSMOE_OK)
        return s;
    if (peek(r) == '}') {
        r->pos++;
        return CONFSMOE_OK;
    }
    for (bool more = true; more;) {
        csm_st_meta m;
        s = read_string(r, &m.key, "a " METADATA_KEY " key");
        if (s == CONFSMOE_OK)
            s = expect(r, ':', "after a " METADATA_KEY " key");
        if (s == CONFSMOE_OK && peek(r) != '"')
            return reader_fail(r, METADATA_KEY " value of \"%s\" is not a string", m.key);
        if (s == CONFSMOE_OK)
            s = read_string(r, &m.value, "a " METADATA_KEY " value");
        if (s != CONFSMOE_OK)
            return s;
        if (c->n_meta == c->cap_meta &&
            !grow_array(r->ctx, (void **)&c->meta, &c->cap_meta, c->n_meta, sizeof *c->meta))
            return csm_fail(r->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the metadata", r->who);
        c->meta[c->n_meta++] = m;
        s = next_member(r, &more, METADATA_KEY);
        if (s != CONFSMOE_OK)
            return s;
    }
    return CONFSMOE_OK;
}

/* {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]} in any order. */
static confsmoe_status parse_tensor_entry(reader *r, const char *name, csm_st_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    confsmoe_status s = expect(r, '{', "to open a tensor entry");
    if (s != CONFSMOE_OK)
        return s;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    if (peek(r) == '}')
        return reader_fail(r, "tensor \"%s\" has no dtype, shape or data_offsets", name);
    for (bool more = true; more;) {
        const size_t key_pos = r->pos;
        const char *key;
        s = read_string(r, &key, "a tensor field name");
        if (s == CONFSMOE_OK)
            s = expect(r, ':', "after a tensor field name");
        if (s != CONFSMOE_OK)
            return s;
        bool *seen;
        if (strcmp(key, "dtype") == 0) {
            seen = &has_dtype;
        } else if (strcmp(key, "shape") == 0) {
            seen = &has_shape;
        } else if (strcmp(key, "data_offsets") == 0) {
            seen = &has_offsets;
        } else {
            r->pos = key_pos;
            return reader_fail(r, "tensor \"%s\" has an unknown field \"%s\"", name, key);
        }
        if (*seen) {
            r->pos = key_pos;
            return reader_fail(r, "tensor \"%s\" has \"%s\" twice", name, key);
        }
        *seen = true;
        if (seen == &has_dtype) {
            const size_t value_pos = r->pos;
            const char *dtype;
            s = read_string(r, &dtype, "the dtype");
            if (s == CONFSMOE_OK && !dtype_from_name(dtype, &t->dtype)) {
                r->pos = value_pos;
                return reader_fail(r, "tensor \"%s\" has the unsupported dtype \"%s\"", name, dtype);
            }
        } else if (seen == &has_shape) {
            uint64_t dims[CSM_ST_MAX_DIMS];
            size_t ndim = 0;
            s = read_u64_array(r, dims, CSM_ST_MAX_DIMS, &ndim, "the shape");
            for (size_t i = 0; s == CONFSMOE_OK && i < ndim; i++) {
                if (dims[i] > (uint64_t)INT64_MAX)
                    return reader_fail(r, "tensor \"%s\" has a dimension larger than 2^63 - 1", name);
                t->dims[i] = (int64_t)dims[i];
            }
            t->ndim = (int32_t)ndim;
        } else {
            uint64_t offsets[2] = {0, 0};
            size_t n = 0;
            s = read_u64_array(r, offsets, 2, &n, "data_offsets");
            if (s == CONFSMOE_OK && n != 2)
                return reader_fail(r, "data_offsets of tensor \"%s\" must hold 2 integers, not %zu", name, n);
            t->begin = offsets[0];
            t->end = offsets[1];
        }
        if (s == CONFSMOE_OK)
            s = next_member(r, &more, "a tensor entry");
        if (s != CONFSMOE_OK)
            return s;
    }
    if (!has_dtype || !has_shape || !has_offsets)
        return reader_fail(r, "tensor \"%s\" has no %s", name,
                           !has_dtype ? "dtype" : !has_shape ? "shape" : "data_offsets");
    return CONFSMOE_OK;
}

static confsmoe_status parse_header(reader *r, collected *c)
{
    /* The format requires '{' as the very first byte, and allows trailing padding. */
    if (r->size == 0 || r->text[0] != '{')
        return reader_fail(r, "the header must start with '{'");
    r->pos = 1;
    confsmoe_status s;
    if (peek(r) == '}') {
        r->pos++;
    } else {
        for (bool more = true; more;) {
            const char *name;
            s = read_string(r, &name, "a tensor name");
            if (s == CONFSMOE_OK)
                s = expect(r, ':', "after a tensor name");
            if (s != CONFSMOE_OK)
                return s;
            if (strcmp(name, METADATA_KEY) == 0) {
                s = parse_metadata(r, c);
            } else {
                if (c->n_tensors == c->cap_tensors &&
                    !grow_array(r->ctx, (void **)&c->tensors, &c->cap_tensors, c->n_tensors, sizeof *c->tensors))
                    return csm_fail(r->ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the tensor list", r->who);
                s = parse_tensor_entry(r, name, &c->tensors[c->n_tensors]);
                if (s == CONFSMOE_OK)
                    c->n_tensors++;
            }
            if (s == CONFSMOE_OK)
                s = next_member(r, &more, "the header object");
            if (s != CONFSMOE_OK)
                return s;
        }
    }
    if (peek(r) >= 0)
        return reader_fail(r, "unexpected bytes after the header object");
    return CONFSMOE_OK;
}

/* ---------------------------------------------------------------- validation */

static int compare_tensor_names(const void *a, const void *b)
{
    return strcmp(((const csm_st_tensor *)a)->name, ((const csm_st_tensor *)b)->name);
}

static int compare_meta_keys(const void *a, const void *b)
{
    return strcmp(((const csm_st_meta *)a)->key, ((const csm_st_meta *)b)->key);
}

static int compare_offsets(const void *a, const void *b)
{
    const csm_st_tensor *x = *(const csm_st_tensor *const *)a, *y = *(const csm_st_tensor *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

void csm_st_format_dims(char *buf, size_t cap, int32_t ndim, const int64_t *dims)
{
    size_t used = (size_t)snprintf(buf, cap, "[");
    for (int32_t i = 0; i < ndim && used < cap; i++)
        used += (size_t)snprintf(buf + used, cap - used, "%s%" PRId64, i ? ", " : "", dims[i]);
    if (used < cap)
        snprintf(buf + used, cap - used, "]");
}

/* Each tensor's byte count matches its shape, and the tensors tile the data buffer
 * exactly: sorted by offset they start at 0, leave no gap, overlap nothing, and end
 * at the end of the file. */
static confsmoe_status check_offsets(confsmoe_ctx *ctx, const char *who, csm_st_tensor *tensors, size_t n,
                                     const unsigned char *data, uint64_t data_size)
{
    for (size_t i = 0; i < n; i++) {
        csm_st_tensor *t = &tensors[i];
        uint64_t numel = 1;
        for (int32_t d = 0; d < t->ndim; d++) {
            uint64_t dim = (uint64_t)t->dims[d];
            if (dim != 0 && numel > UINT64_MAX / dim)
                return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the element count of tensor \"%s\" overflows", who,
                                t->name);
            numel *= dim;
        }
        const uint64_t size = csm_st_dtype_size(t->dtype);
        if (numel > UINT64_MAX / size)
            return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the byte size of tensor \"%s\" overflows", who, t->name);
        t->numel = numel;
        if (t->end < t->begin)
            return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: tensor \"%s\" has reversed data_offsets [%" PRIu64
                            ", %" PRIu64 "]", who, t->name, t->begin, t->end);
        if (t->end - t->begin != numel * size) {
            char shape[160];
            csm_st_format_dims(shape, sizeof shape, t->ndim, t->dims);
            return csm_fail(ctx, CONFSMOE_E_FORMAT,
                            "%s: tensor \"%s\" is %s %s, %" PRIu64 " bytes, but its data_offsets [%" PRIu64
                            ", %" PRIu64 "] span %" PRIu64, who, t->name, csm_st_dtype_name(t->dtype), shape,
                            numel * size, t->begin, t->end, t->end - t->begin);
        }
        if (t->end > data_size)
            return csm_fail(ctx, CONFSMOE_E_FORMAT,
                            "%s: tensor \"%s\" ends at data byte %" PRIu64 " but the file holds only %" PRIu64
                            " data bytes (truncated?)", who, t->name, t->end, data_size);
        t->data = data + t->begin;
    }

    const csm_st_tensor **by_offset = csm_calloc(ctx, n ? n : 1, sizeof *by_offset);
    if (!by_offset)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    for (size_t i = 0; i < n; i++)
        by_offset[i] = &tensors[i];
    qsort(by_offset, n, sizeof *by_offset, compare_offsets);
    confsmoe_status s = CONFSMOE_OK;
    uint64_t expected = 0;
    for (size_t i = 0; i < n && s == CONFSMOE_OK; i++) {
        const csm_st_tensor *t = by_offset[i];
        if (t->begin != expected)
            s = csm_fail(ctx, CONFSMOE_E_FORMAT,
                         "%s: tensor \"%s\" starts at data byte %" PRIu64 ", expected %" PRIu64
                         " (tensors must be contiguous, without gaps or overlaps)", who, t->name, t->begin,
                         expected);
        expected = t->end;
    }
    if (s == CONFSMOE_OK && expected != data_size)
        s = csm_fail(ctx, CONFSMOE_E_FORMAT,
                     "%s: the tensors cover %" PRIu64 " data bytes but the file holds %" PRIu64, who, expected,
                     data_size);
    csm_free(ctx, by_offset);
    return s;
}

static confsmoe_status check_unique(confsmoe_ctx *ctx, const char *who, csm_st_file *f)
{
    /* The arrays are NULL when empty, which qsort must not see. */
    if (f->n_tensors > 1)
        qsort(f->tensors, f->n_tensors, sizeof *f->tensors, compare_tensor_names);
    for (size_t i = 1; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i - 1].name, f->tensors[i].name) == 0)
            return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: tensor \"%s\" appears twice in the header", who,
                            f->tensors[i].name);
    if (f->n_meta > 1)
        qsort(f->meta, f->n_meta, sizeof *f->meta, compare_meta_keys);
    for (size_t i = 1; i < f->n_meta; i++)
        if (strcmp(f->meta[i - 1].key, f->meta[i].key) == 0)
            return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: metadata key \"%s\" appears twice in the header", who,
                            f->meta[i].key);
    return CONFSMOE_OK;
}

/* ---------------------------------------------------------------- reading */

void csm_st_file_free(confsmoe_ctx *ctx, csm_st_file *f)
{
    if (!f)
        return;
    csm_free(ctx, f->bytes);
    csm_free(ctx, f->strings);
    csm_free(ctx, f->tensors);
    csm_free(ctx, f->meta);
    memset(f, 0, sizeof *f);
}

confsmoe_status csm_st_parse(confsmoe_ctx *ctx, const char *who, const unsigned char *bytes, size_t size,
                             csm_st_file *out)
{
    memset(out, 0, sizeof *out);
    if (size < 8)
        return csm_fail(ctx, CONFSMOE_E_FORMAT,
                        "%s: the file has %zu bytes, fewer than the 8-byte header length (truncated?)", who, size);
    const uint64_t header_size = load_u64_le(bytes);
    if (header_size > CSM_ST_MAX_HEADER)
        return csm_fail(ctx, CONFSMOE_E_FORMAT, "%s: the header length %" PRIu64 " exceeds the limit of %" PRIu64,
                        who, header_size, CSM_ST_MAX_HEADER);
    if (header_size > size - 8)
        return csm_fail(ctx, CONFSMOE_E_FORMAT,
                        "%s: the header length %" PRIu64 " exceeds the %zu bytes after it (truncated?)", who,
                        header_size, size - 8);

    reader r = {.ctx = ctx, .who = who, .text = bytes + 8, .size = (size_t)header_size};
    r.strings_cap = r.size + 1;
    r.strings = csm_alloc(ctx, r.strings_cap);
    if (!r.strings)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the header", who);
    collected c = {0};
    confsmoe_status s = parse_header(&r, &c);
    out->size = size;
    out->strings = r.strings;
    out->tensors = c.tensors;
    out->n_tensors = c.n_tensors;
    out->meta = c.meta;
    out->n_meta = c.n_meta;
    if (s == CONFSMOE_OK)
        s = check_unique(ctx, who, out);
    if (s == CONFSMOE_OK)
        s = check_offsets(ctx, who, out->tensors, out->n_tensors, bytes + 8 + header_size,
                          (uint64_t)(size - 8 - header_size));
    if (s != CONFSMOE_OK)
        csm_st_file_free(ctx, out);
    return s;
}

static void errno_text(int err, char *buf, size_t cap)
{
    /* The XSI strerror_r (thread-safe); ctxs may be used from several threads. */
    if (strerror_r(err, buf, cap) != 0)
        snprintf(buf, cap, "errno %d", err);
}

/* "who: cannot <what> [path]: <errno text>"; path is NULL when who names the file already. */
static confsmoe_status fail_errno(confsmoe_ctx *ctx, int err, const char *who, const char *what, const char *path)
{
    char text[ERRNO_TEXT_CAP];
    errno_text(err, text, sizeof text);
    return csm_fail(ctx, CONFSMOE_E_IO, "%s: cannot %s%s%s: %s", who, what, path ? " " : "", path ? path : "", text);
}

/* Reads a whole regular file into a new buffer. */
static confsmoe_status read_file(confsmoe_ctx *ctx, const char *who, const char *path, unsigned char **out,
                                 size_t *size_out)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail_errno(ctx, errno, who, "open it", NULL);
    struct stat st;
    confsmoe_status s = CONFSMOE_OK;
    if (fstat(fd, &st) != 0)
        s = fail_errno(ctx, errno, who, "stat it", NULL);
    else if (!S_ISREG(st.st_mode))
        s = csm_fail(ctx, CONFSMOE_E_IO, "%s: not a regular file", who);
    else if ((uintmax_t)st.st_size > SIZE_MAX - 1)
        s = csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: the file is too large to read", who);
    unsigned char *buf = NULL;
    size_t size = s == CONFSMOE_OK ? (size_t)st.st_size : 0, got = 0;
    if (s == CONFSMOE_OK) {
        buf = csm_alloc(ctx, size);
        if (!buf)
            s = csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the %zu bytes of the file", who, size);
    }
    while (s == CONFSMOE_OK && got < size) {
        ssize_t n = read(fd, buf + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            s = fail_errno(ctx, errno, who, "read it", NULL);
        else if (n == 0)
            s = csm_fail(ctx, CONFSMOE_E_IO, "%s: the file shrank while it was being read", who);
        else
            got += (size_t)n;
    }
    close(fd);
    if (s != CONFSMOE_OK) {
        csm_free(ctx, buf);
        return s;
    }
    *out = buf;
    *size_out = size;
    return CONFSMOE_OK;
}

confsmoe_status csm_st_read(confsmoe_ctx *ctx, const char *who, const char *path, csm_st_file *out)
{
    memset(out, 0, sizeof *out);
    unsigned char *bytes = NULL;
    size_t size = 0;
    confsmoe_status s = read_file(ctx, who, path, &bytes, &size);
    if (s != CONFSMOE_OK)
        return s;
    s = csm_st_parse(ctx, who, bytes, size, out);
    if (s != CONFSMOE_OK) {
        csm_free(ctx, bytes);
        return s;
    }
    out->bytes = bytes;
    return CONFSMOE_OK;
}

const csm_st_tensor *csm_st_find(const csm_st_file *f, const char *name)
{
    size_t lo = 0, hi = f->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->tensors[mid].name);
        if (c == 0)
            return &f->tensors[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *csm_st_meta_get(const csm_st_file *f, const char *key)
{
    for (size_t i = 0; i < f->n_meta; i++)
        if (strcmp(f->meta[i].key, key) == 0)
            return f->meta[i].value;
    return NULL;
}

/* ---------------------------------------------------------------- writing */

/* A growing text buffer; after a failed append it stays failed. */
typedef struct {
    confsmoe_ctx *ctx;
    char *text;
    size_t len, cap;
    bool failed;
} text_buffer;

static void append_bytes(text_buffer *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    while (b->cap - b->len < n) {
        if (!grow_array(b->ctx, (void **)&b->text, &b->cap, b->len, 1)) {
            b->failed = true;
            return;
        }
    }
    memcpy(b->text + b->len, s, n);
    b->len += n;
}

static void append(text_buffer *b, const char *s) { append_bytes(b, s, strlen(s)); }

static void append_json_string(text_buffer *b, const char *s)
{
    append(b, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char esc[8];
        if (*p == '"' || *p == '\\') {
            esc[0] = '\\', esc[1] = (char)*p, esc[2] = '\0';
            append(b, esc);
        } else if (*p < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            append(b, esc);
        } else {
            append_bytes(b, (const char *)p, 1);
        }
    }
    append(b, "\"");
}

static void append_u64(text_buffer *b, uint64_t v)
{
    char digits[24];
    snprintf(digits, sizeof digits, "%" PRIu64, v);
    append(b, digits);
}

static int compare_entry_names(const void *a, const void *b)
{
    return strcmp((*(const csm_st_entry *const *)a)->name, (*(const csm_st_entry *const *)b)->name);
}

/* The caller's entries are well-formed and uniquely named. */
static confsmoe_status check_entries(confsmoe_ctx *ctx, const char *who, const csm_st_meta *meta, size_t n_meta,
                                     const csm_st_entry *entries, size_t n)
{
    for (size_t i = 0; i < n_meta; i++)
        if (!meta[i].key || !meta[i].value || !is_valid_utf8(meta[i].key) || !is_valid_utf8(meta[i].value))
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: metadata entry %zu is NULL or not UTF-8", who, i);
    for (size_t i = 0; i < n; i++) {
        const csm_st_entry *e = &entries[i];
        if (!e->name || !e->name[0] || !is_valid_utf8(e->name) || strcmp(e->name, METADATA_KEY) == 0)
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: tensor %zu has an empty, reserved or non-UTF-8 name",
                            who, i);
        if ((unsigned)e->dtype >= N_DTYPES || e->ndim < 0 || e->ndim > CSM_ST_MAX_DIMS || (e->ndim > 0 && !e->dims))
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: tensor \"%s\" has a bad dtype or shape", who,
                            e->name);
        size_t bytes = csm_st_dtype_size(e->dtype);
        for (int32_t d = 0; d < e->ndim; d++)
            if (e->dims[d] < 0 || (uint64_t)e->dims[d] > SIZE_MAX || !csm_mul_size(bytes, (size_t)e->dims[d], &bytes))
                return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: tensor \"%s\" has a bad or overflowing shape",
                                who, e->name);
        if (bytes != e->nbytes || (bytes > 0 && !e->data))
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: tensor \"%s\" has %zu bytes, its shape needs %zu",
                            who, e->name, e->nbytes, bytes);
    }
    const csm_st_entry **by_name = csm_calloc(ctx, n ? n : 1, sizeof *by_name);
    if (!by_name)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    for (size_t i = 0; i < n; i++)
        by_name[i] = &entries[i];
    qsort(by_name, n, sizeof *by_name, compare_entry_names);
    confsmoe_status s = CONFSMOE_OK;
    for (size_t i = 1; i < n && s == CONFSMOE_OK; i++)
        if (strcmp(by_name[i - 1]->name, by_name[i]->name) == 0)
            s = csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: tensor name \"%s\" is used twice", who,
                         by_name[i]->name);
    csm_free(ctx, by_name);
    return s;
}

/* The JSON header, padded with spaces to a multiple of 8 bytes as the reference writer does. */
static confsmoe_status build_header(confsmoe_ctx *ctx, const char *who, const csm_st_meta *meta, size_t n_meta,
                                    const csm_st_entry *entries, size_t n, text_buffer *b)
{
    *b = (text_buffer){.ctx = ctx};
    append(b, "{");
    if (n_meta > 0) {
        append(b, "\"" METADATA_KEY "\":{");
        for (size_t i = 0; i < n_meta; i++) {
            append(b, i ? "," : "");
            append_json_string(b, meta[i].key);
            append(b, ":");
            append_json_string(b, meta[i].value);
        }
        append(b, "}");
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        const csm_st_entry *e = &entries[i];
        append(b, n_meta > 0 || i > 0 ? "," : "");
        append_json_string(b, e->name);
        append(b, ":{\"dtype\":\"");
        append(b, csm_st_dtype_name(e->dtype));
        append(b, "\",\"shape\":[");
        for (int32_t d = 0; d < e->ndim; d++) {
            append(b, d ? "," : "");
            append_u64(b, (uint64_t)e->dims[d]);
        }
        append(b, "],\"data_offsets\":[");
        append_u64(b, offset);
        append(b, ",");
        if (e->nbytes > UINT64_MAX - offset) {
            csm_free(ctx, b->text);
            return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: the data size overflows", who);
        }
        offset += e->nbytes;
        append_u64(b, offset);
        append(b, "]}");
    }
    append(b, "}");
    while (!b->failed && b->len % 8 != 0)
        append(b, " ");
    if (b->failed) {
        csm_free(ctx, b->text);
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory for the header", who);
    }
    if ((uint64_t)b->len > CSM_ST_MAX_HEADER) {
        csm_free(ctx, b->text);
        return csm_fail(ctx, CONFSMOE_E_INVALID_ARGUMENT, "%s: the header would exceed %" PRIu64 " bytes", who,
                        CSM_ST_MAX_HEADER);
    }
    return CONFSMOE_OK;
}

/* Distinguishes the temporary files of concurrent saves in one process. */
static atomic_uint temp_counter;

/* Creates "<path>.tmp.<pid>.<n>" exclusively, readable as umask allows. */
static confsmoe_status create_temp(confsmoe_ctx *ctx, const char *who, const char *path, char **tmp_out, int *fd_out)
{
    size_t cap = strlen(path) + 48;
    char *tmp = csm_alloc(ctx, cap);
    if (!tmp)
        return csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    for (int attempt = 0;; attempt++) {
        snprintf(tmp, cap, "%s.tmp.%ld.%u", path, (long)getpid(), atomic_fetch_add(&temp_counter, 1u));
        int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd >= 0) {
            *tmp_out = tmp;
            *fd_out = fd;
            return CONFSMOE_OK;
        }
        if (errno != EEXIST || attempt == 100) {
            confsmoe_status s = fail_errno(ctx, errno, who, "create the temporary file", tmp);
            csm_free(ctx, tmp);
            return s;
        }
    }
}

/* The directory of path ("." for a bare name), allocated before anything is written so that
 * the sync after the rename cannot be skipped for want of memory; NULL when out of memory. */
static char *parent_directory(confsmoe_ctx *ctx, const char *path)
{
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 1;
    char *dir = csm_alloc(ctx, len + 1);
    if (!dir)
        return NULL;
    if (slash)
        memcpy(dir, path, len ? len : 1);
    else
        dir[0] = '.';
    dir[len ? len : 1] = '\0';
    return dir;
}

/* Makes the rename itself durable. Best effort: the file is already in place, and
 * some file systems cannot sync a directory. */
static void sync_parent_directory(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

static bool write_all(FILE *f, const void *data, size_t n)
{
    return n == 0 || fwrite(data, 1, n, f) == n;
}

confsmoe_status csm_st_write(confsmoe_ctx *ctx, const char *who, const char *path, const csm_st_meta *meta,
                             size_t n_meta, const csm_st_entry *entries, size_t n_entries)
{
    confsmoe_status s = check_entries(ctx, who, meta, n_meta, entries, n_entries);
    if (s != CONFSMOE_OK)
        return s;
    text_buffer header;
    s = build_header(ctx, who, meta, n_meta, entries, n_entries, &header);
    if (s != CONFSMOE_OK)
        return s;

    char *tmp = NULL;
    int fd = -1;
    char *dir = parent_directory(ctx, path);
    s = dir ? create_temp(ctx, who, path, &tmp, &fd) : csm_fail(ctx, CONFSMOE_E_NOMEM, "%s: out of memory", who);
    if (s != CONFSMOE_OK) {
        csm_free(ctx, dir);
        csm_free(ctx, header.text);
        return s;
    }
    FILE *f = fdopen(fd, "wb");
    if (!f) {
        s = fail_errno(ctx, errno, who, "open a stream on", tmp);
        close(fd);
    } else {
        unsigned char length[8];
        store_u64_le(length, header.len);
        bool ok = write_all(f, length, sizeof length) && write_all(f, header.text, header.len);
        for (size_t i = 0; ok && i < n_entries; i++)
            ok = write_all(f, entries[i].data, entries[i].nbytes);
        if (ok)
            ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
        /* errno of the first failure, before fclose may change it. */
        int err = errno;
        if (fclose(f) != 0 && ok) {
            ok = false;
            err = errno;
        }
        if (!ok)
            s = fail_errno(ctx, err, who, "write", tmp);
        else if (rename(tmp, path) != 0)
            s = fail_errno(ctx, errno, who, "rename the temporary file over", path);
    }
    if (s != CONFSMOE_OK)
        (void)unlink(tmp);
    else
        sync_parent_directory(dir);
    csm_free(ctx, dir);
    csm_free(ctx, tmp);
    csm_free(ctx, header.text);
    return s;
}
