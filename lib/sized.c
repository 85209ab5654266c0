/* Sized option structs: the struct_size rule of docs/API.md ("Struct versioning"). */
#include <stdint.h>
#include <string.h>

#include "sized.h"

/* The first-ABI sizes on LP64 (x86_64, aarch64): a first-release field edited, or an appended
 * field that raised a struct's alignment, would move a minimum and fail here. */
#if UINTPTR_MAX == UINT64_MAX && SIZE_MAX == UINT64_MAX
_Static_assert(CSM_CTX_PARAMS_MIN == 48, "confsmoe_ctx_params: the first release's size moved");
_Static_assert(CSM_GATE_PARAMS_MIN == 72, "confsmoe_gate_params: the first release's size moved");
_Static_assert(CSM_IMPUTER_PARAMS_MIN == 56, "confsmoe_imputer_params: the first release's size moved");
_Static_assert(CSM_OPTIM_PARAMS_MIN == 40, "confsmoe_optim_params: the first release's size moved");
_Static_assert(CSM_MODEL_PARAMS_MIN == 144, "confsmoe_model_params: the first release's size moved");
_Static_assert(CSM_GATE_STATS_MIN == 48, "confsmoe_gate_stats: the first release's size moved");
#endif

void csm_sized_init(void *dst, size_t struct_size, const void *defaults, size_t full_size, size_t min_size)
{
    if (!dst)
        return;
    if (struct_size >= min_size && struct_size <= CSM_SIZED_MAX) {
        const size_t known = struct_size < full_size ? struct_size : full_size;
        memcpy(dst, defaults, known);
        if (struct_size > known)
            memset((unsigned char *)dst + known, 0, struct_size - known);
    }
    if (struct_size >= sizeof struct_size)
        memcpy(dst, &struct_size, sizeof struct_size);
}

confsmoe_status csm_sized_read(confsmoe_ctx *ctx, const char *fn, const char *type, const void *src, void *full,
                               size_t full_size, size_t min_size)
{
    size_t struct_size;
    memcpy(&struct_size, src, sizeof struct_size);
    if (struct_size < min_size || struct_size > CSM_SIZED_MAX)
        return csm_fail(ctx, CONFSMOE_E_VERSION,
                        "%s: %s.struct_size is %zu, not a size this library accepts (%zu..%zu; its own %s has "
                        "%zu bytes): initialise the struct with %s_init()",
                        fn, type, struct_size, min_size, CSM_SIZED_MAX, type, full_size, type);
    const unsigned char *bytes = src;
    for (size_t i = full_size; i < struct_size; i++)
        if (bytes[i] != 0)
            return csm_fail(ctx, CONFSMOE_E_VERSION,
                            "%s: %s.struct_size is %zu, larger than this library's %zu (libconfsmoe %s), and "
                            "byte %zu, in a field this version does not have, is not 0: a newer program must "
                            "leave such fields at 0 here",
                            fn, type, struct_size, full_size, confsmoe_version_string(), i);
    memcpy(full, src, struct_size < full_size ? struct_size : full_size);
    memcpy(full, &full_size, sizeof full_size);
    return CONFSMOE_OK;
}

confsmoe_status csm_sized_check_out(confsmoe_ctx *ctx, const char *fn, const char *type, size_t struct_size,
                                    size_t min_size)
{
    if (struct_size < min_size || struct_size > CSM_SIZED_MAX)
        return csm_fail(ctx, CONFSMOE_E_VERSION,
                        "%s: %s.struct_size is %zu: set it to sizeof(%s) before the call "
                        "(this library accepts %zu..%zu)",
                        fn, type, struct_size, type, min_size, CSM_SIZED_MAX);
    return CONFSMOE_OK;
}

void csm_sized_write(void *dst, size_t struct_size, const void *full, size_t full_size)
{
    const size_t known = struct_size < full_size ? struct_size : full_size;
    const size_t skip = sizeof(size_t); /* the caller's struct_size stays */
    if (known > skip)
        memcpy((unsigned char *)dst + skip, (const unsigned char *)full + skip, known - skip);
    if (struct_size > known)
        memset((unsigned char *)dst + known, 0, struct_size - known);
}
