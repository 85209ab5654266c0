/* Private: a strict reader and a writer of the safetensors format.
 *
 * Layout: an 8-byte little-endian u64 N, N bytes of UTF-8 JSON (the header), then
 * the data buffer. The header maps each tensor name to {"dtype", "shape",
 * "data_offsets": [begin, end]} (offsets relative to the buffer), plus an optional
 * "__metadata__" object of string values. The reader accepts exactly what the
 * reference implementation accepts, and a little less: tensor entries with keys
 * other than the three above, duplicate keys, more than CSM_ST_MAX_DIMS dimensions
 * and the sub-byte dtypes (F4, F6_*) are rejected. Every failure is
 * CONFSMOE_E_FORMAT (or E_IO / E_NOMEM) with a message naming the problem. */
#ifndef CONFSMOE_SAFETENSORS_H
#define CONFSMOE_SAFETENSORS_H

#include "internal.h"

#define CSM_ST_MAX_DIMS 16
/* The reference implementation's limit on N. */
#define CSM_ST_MAX_HEADER ((uint64_t)100000000)

typedef enum {
    CSM_ST_BOOL,
    CSM_ST_U8,
    CSM_ST_I8,
    CSM_ST_F8_E5M2,
    CSM_ST_F8_E4M3,
    CSM_ST_F8_E8M0,
    CSM_ST_I16,
    CSM_ST_U16,
    CSM_ST_F16,
    CSM_ST_BF16,
    CSM_ST_I32,
    CSM_ST_U32,
    CSM_ST_F32,
    CSM_ST_F64,
    CSM_ST_I64,
    CSM_ST_U64,
    CSM_ST_C64,
} csm_st_dtype;

/* "[2, 3]" into buf (truncated to cap), for messages. */
void csm_st_format_dims(char *buf, size_t cap, int32_t ndim, const int64_t *dims);

/* "F32", "I64", ... */
const char *csm_st_dtype_name(csm_st_dtype dtype);
size_t csm_st_dtype_size(csm_st_dtype dtype);

/* One tensor of a parsed file. data points into the file buffer, unaligned. */
typedef struct {
    const char *name;
    csm_st_dtype dtype;
    int32_t ndim;                   /* 0 for a scalar */
    int64_t dims[CSM_ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end;            /* byte offsets in the data buffer */
    const unsigned char *data;      /* end - begin bytes */
} csm_st_tensor;

typedef struct {
    const char *key, *value;
} csm_st_meta;

/* A parsed file. Owns the bytes and every string it points to. */
typedef struct {
    unsigned char *bytes;           /* the whole file (NULL after csm_st_parse) */
    size_t size;
    char *strings;                  /* decoded names, keys and values */
    csm_st_tensor *tensors;         /* sorted by name */
    size_t n_tensors;
    csm_st_meta *meta;
    size_t n_meta;
} csm_st_file;

/* Reads and validates a whole file. `who` prefixes every message
 * ("checkpoint_load: model.safetensors"). On failure *out is empty. */
confsmoe_status csm_st_read(confsmoe_ctx *ctx, const char *who, const char *path, csm_st_file *out);
/* Validates size bytes already in memory (kept borrowed: they must outlive *out). */
confsmoe_status csm_st_parse(confsmoe_ctx *ctx, const char *who, const unsigned char *bytes, size_t size,
                             csm_st_file *out);
void csm_st_file_free(confsmoe_ctx *ctx, csm_st_file *f);
/* The tensor or metadata value with that name, or NULL. */
const csm_st_tensor *csm_st_find(const csm_st_file *f, const char *name);
const char *csm_st_meta_get(const csm_st_file *f, const char *key);

/* One tensor to write: nbytes must equal numel(dims) * dtype size. */
typedef struct {
    const char *name;
    csm_st_dtype dtype;
    int32_t ndim;
    const int64_t *dims;
    const void *data;               /* little-endian, row-major */
    size_t nbytes;
} csm_st_entry;

/* Writes the tensors in the given order, atomically: to a temporary file in the
 * same directory, flushed and fsync'ed, then renamed over path. On failure the
 * temporary file is removed and path is untouched. Names must be unique. */
confsmoe_status csm_st_write(confsmoe_ctx *ctx, const char *who, const char *path, const csm_st_meta *meta,
                             size_t n_meta, const csm_st_entry *entries, size_t n_entries);

#endif /* CONFSMOE_SAFETENSORS_H */
