/* Private: sized option structs, the struct_size rule of docs/API.md ("Struct versioning").
 *
 * Every options struct starts with size_t struct_size, the size of the struct the caller
 * was compiled with. The library accepts any struct_size from the struct's first-release
 * size (CSM_*_MIN below) up to CSM_SIZED_MAX:
 *   - smaller than its own sizeof (an older caller): the caller's bytes, then this
 *     library's defaults for the fields the caller does not have;
 *   - larger (a newer caller): accepted only if every byte past this library's sizeof is 0,
 *     so that the value 0 of a field appended later must mean "off / as before".
 * A field is appended only at the end, starting at or after the previous release's sizeof
 * (never inside its tail padding, where an older caller's struct_size would cover bytes
 * that it never set); the CSM_*_MIN constants never change. */
#ifndef CONFSMOE_SIZED_H
#define CONFSMOE_SIZED_H

#include <stddef.h>

#include "internal.h"

/* Larger struct_size values are rejected as garbage rather than read or zeroed. */
#define CSM_SIZED_MAX ((size_t)65536)

/* The sizeof a struct had when `member` was its last field: the end of that member rounded up
 * to the struct's alignment (which an appended field must not raise: no long double, no
 * _Alignas; sized.c checks the LP64 values). */
#define CSM_SIZE_UP_TO(type, member)                                                                       \
    ((offsetof(type, member) + sizeof(((type *)0)->member) + _Alignof(type) - 1) / _Alignof(type) *     \
     _Alignof(type))

/* The first ABI of soversion 0 (libconfsmoe 0.1.0): each struct's sizeof then, named by its last
 * field then (LP64: 48, 72, 56, 40, 144 and 48 bytes). Fixed forever: the smallest struct_size
 * accepted. */
#define CSM_CTX_PARAMS_MIN     CSM_SIZE_UP_TO(confsmoe_ctx_params, allocator)
#define CSM_GATE_PARAMS_MIN    CSM_SIZE_UP_TO(confsmoe_gate_params, compat)
#define CSM_IMPUTER_PARAMS_MIN CSM_SIZE_UP_TO(confsmoe_imputer_params, compat)
#define CSM_OPTIM_PARAMS_MIN   CSM_SIZE_UP_TO(confsmoe_optim_params, weight_decay)
#define CSM_MODEL_PARAMS_MIN   CSM_SIZE_UP_TO(confsmoe_model_params, modality_dropout)
#define CSM_GATE_STATS_MIN     CSM_SIZE_UP_TO(confsmoe_gate_stats, conf_loss)

/* The body of a confsmoe_*_params_init_sized: `defaults` is a full struct of the library's
 * defaults (full_size bytes, padding zeroed). Writes struct_size bytes of dst: the defaults,
 * then zeros past full_size, and struct_size itself. An invalid struct_size (below min_size
 * or above CSM_SIZED_MAX) writes only the struct_size member, when struct_size holds it,
 * so that create then fails with CONFSMOE_E_VERSION. dst == NULL writes nothing. */
void csm_sized_init(void *dst, size_t struct_size, const void *defaults, size_t full_size, size_t min_size);

/* Reads a caller's struct into `full`, which holds the defaults on entry: the caller's first
 * min(struct_size, full_size) bytes replace them and full->struct_size becomes full_size.
 * CONFSMOE_E_VERSION, with a message naming fn and the struct type on ctx (if not NULL), for a
 * struct_size out of [min_size, CSM_SIZED_MAX] or a nonzero byte past full_size; `full` is
 * then left as it was. */
confsmoe_status csm_sized_read(confsmoe_ctx *ctx, const char *fn, const char *type, const void *src, void *full,
                               size_t full_size, size_t min_size);

/* For an output struct (confsmoe_gate_stats) whose caller set struct_size: CONFSMOE_OK when
 * struct_size is in [min_size, CSM_SIZED_MAX], else CONFSMOE_E_VERSION with a message. */
confsmoe_status csm_sized_check_out(confsmoe_ctx *ctx, const char *fn, const char *type, size_t struct_size,
                                    size_t min_size);

/* Writes a filled output struct `full` (full_size bytes) to dst, a caller's struct of
 * struct_size bytes (already checked): its fields up to min(struct_size, full_size), then
 * zeros up to struct_size. dst->struct_size is left as the caller set it. */
void csm_sized_write(void *dst, size_t struct_size, const void *full, size_t full_size);

#endif /* CONFSMOE_SIZED_H */
