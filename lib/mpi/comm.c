/* Errors, the version check, the private communicator, the even split and the bucketed collectives. */
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "mpi_internal.h"

#define ERROR_CAP 512
#define DEFAULT_BUCKET_BYTES ((size_t)16 << 20)

static _Thread_local char last_error[ERROR_CAP];

const char *confsmoe_mpi_last_error(void) { return last_error; }

confsmoe_status cmpi_fail(confsmoe_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

confsmoe_status cmpi_check(int mpi_status, const char *what)
{
    if (mpi_status == MPI_SUCCESS)
        return CONFSMOE_OK;
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(mpi_status, text, &len) != MPI_SUCCESS)
        snprintf(text, sizeof text, "MPI error %d", mpi_status);
    return cmpi_fail(CONFSMOE_E_COMM, "%s: %s", what, text);
}

confsmoe_status cmpi_from_ctx(const confsmoe_ctx *ctx, confsmoe_status status, const char *what)
{
    return cmpi_fail(status, "%s: %s", what, ctx ? confsmoe_ctx_last_error(ctx) : confsmoe_status_string(status));
}

confsmoe_status cmpi_require_version(const char *fn)
{
    const uint32_t loaded = confsmoe_version_number(), built = CONFSMOE_VERSION_NUMBER;
    if (loaded == built)
        return CONFSMOE_OK;
    return cmpi_fail(CONFSMOE_E_VERSION,
                     "%s: libconfsmoe_mpi was built against libconfsmoe %u.%u.%u and calls its experimental "
                     "hooks, which may change in any release, but the loaded libconfsmoe is %u.%u.%u: install "
                     "the libconfsmoe_mpi of that release",
                     fn, (unsigned)(built / 10000), (unsigned)(built / 100 % 100), (unsigned)(built % 100),
                     (unsigned)(loaded / 10000), (unsigned)(loaded / 100 % 100), (unsigned)(loaded % 100));
}

confsmoe_status cmpi_comm_dup(MPI_Comm comm, const char *fn, cmpi_comm *out)
{
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
        return cmpi_fail(CONFSMOE_E_STATE, "%s: MPI is not initialised (call MPI_Init first)", fn);
    if (comm == MPI_COMM_NULL)
        return cmpi_fail(CONFSMOE_E_INVALID_ARGUMENT, "%s: comm is MPI_COMM_NULL", fn);
    out->comm = MPI_COMM_NULL;
    confsmoe_status s = cmpi_check(MPI_Comm_dup(comm, &out->comm), fn);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Comm_set_errhandler(out->comm, MPI_ERRORS_RETURN), fn);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Comm_rank(out->comm, &out->rank), fn);
    if (s == CONFSMOE_OK)
        s = cmpi_check(MPI_Comm_size(out->comm, &out->size), fn);
    if (s != CONFSMOE_OK)
        cmpi_comm_free(out);
    return s;
}

void cmpi_comm_free(cmpi_comm *c)
{
    if (c->comm != MPI_COMM_NULL)
        MPI_Comm_free(&c->comm);
    c->comm = MPI_COMM_NULL;
}

void confsmoe_mpi_shard(int64_t n, int32_t rank, int32_t size, int64_t *first, int64_t *count)
{
    if (size < 1 || rank < 0 || rank >= size || n < 0) {
        *first = *count = 0;
        return;
    }
    /* floor(r n / P) without overflow for any int64 n and int32 P. */
    const int64_t q = n / size, r = n % size;
    const int64_t lo = q * rank + r * rank / size, hi = q * (rank + 1) + r * (rank + 1) / size;
    *first = lo;
    *count = hi - lo;
}

size_t cmpi_numel(confsmoe_tensor *const *t, int32_t n)
{
    size_t total = 0;
    for (int32_t i = 0; i < n; i++)
        total += (size_t)confsmoe_tensor_numel(t[i]);
    return total;
}

void cmpi_pack(confsmoe_tensor *const *t, int32_t n, float *out)
{
    for (int32_t i = 0; i < n; i++) {
        const size_t bytes = confsmoe_tensor_nbytes(t[i]);
        if (bytes)
            memcpy(out, confsmoe_tensor_data(t[i]), bytes);
        out += bytes / sizeof(float);
    }
}

confsmoe_status cmpi_stage_alloc(confsmoe_ctx *ctx, size_t bucket_bytes, size_t list_floats, const char *fn,
                                 cmpi_stage *out)
{
    size_t floats = (bucket_bytes ? bucket_bytes : DEFAULT_BUCKET_BYTES) / sizeof(float);
    floats = floats < list_floats ? floats : list_floats;
    floats = floats < (size_t)INT_MAX ? floats : (size_t)INT_MAX; /* an MPI count is an int */
    floats = floats ? floats : 1;
    out->floats = floats;
    out->stage = confsmoe_ctx_calloc(ctx, floats, sizeof(float));
    return out->stage ? CONFSMOE_OK
                      : cmpi_fail(CONFSMOE_E_NOMEM, "%s: out of memory for a bucket of %zu floats", fn, floats);
}

/* Copies floats [at, at + n) of the list's packed view into dst (to_list false), or back. */
static void move_span(confsmoe_tensor *const *t, int32_t count, size_t at, size_t n, float *buf, bool to_list)
{
    size_t start = 0;
    for (int32_t i = 0; i < count && n > 0; i++) {
        const size_t len = (size_t)confsmoe_tensor_numel(t[i]);
        if (at < start + len) {
            const size_t off = at - start, take = len - off < n ? len - off : n;
            float *data = (float *)confsmoe_tensor_data(t[i]) + off;
            memcpy(to_list ? data : buf, to_list ? buf : data, take * sizeof(float));
            buf += take;
            at += take;
            n -= take;
        }
        start += len;
    }
}

confsmoe_status cmpi_buckets(const cmpi_comm *c, cmpi_op op, confsmoe_tensor *const *t, int32_t n,
                             const float *before, const cmpi_stage *stage)
{
    const size_t total = cmpi_numel(t, n);
    confsmoe_status s = CONFSMOE_OK;
    for (size_t at = 0; at < total && s == CONFSMOE_OK; at += stage->floats) {
        const size_t len = total - at < stage->floats ? total - at : stage->floats;
        float *buf = stage->stage;
        move_span(t, n, at, len, buf, false);
        if (op == CMPI_SUM_DELTA)
            for (size_t i = 0; i < len; i++)
                buf[i] -= before[at + i];
        if (op == CMPI_BROADCAST)
            s = cmpi_check(MPI_Bcast(buf, (int)len, MPI_FLOAT, 0, c->comm), "MPI_Bcast of the parameters");
        else
            s = cmpi_check(MPI_Allreduce(MPI_IN_PLACE, buf, (int)len, MPI_FLOAT, MPI_SUM, c->comm),
                           "MPI_Allreduce of the gradients");
        if (s != CONFSMOE_OK)
            break;
        if (op == CMPI_SUM_DELTA)
            for (size_t i = 0; i < len; i++)
                buf[i] += before[at + i];
        move_span(t, n, at, len, buf, true);
    }
    return s;
}
