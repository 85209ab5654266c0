/* Private: what the model uses of its imputer beyond the public imputer API. */
#ifndef CONFSMOE_IMPUTER_H
#define CONFSMOE_IMPUTER_H

#include "arena.h"
#include "internal.h"
#include "params.h"

/* The imputer's parameter list (q, kv, v with separate_value, ln), which a model appends to its own. */
const csm_params *csm_imputer_param_list(const confsmoe_imputer *imp);
/* L = sum_m S_m of M modalities (S_m = modality_tokens[m], or tokens for all when NULL), each
 * checked >= 1 and the sum against overflow, with fn's messages; the model and the imputer
 * validate their token counts with it. */
confsmoe_status csm_total_tokens(confsmoe_ctx *ctx, const char *fn, int32_t M, int64_t tokens,
                                 const int64_t *modality_tokens, int64_t *total);
/* CONFSMOE_OK when writeback is a CONFSMOE_WRITEBACK_* value, else E_INVALID_ARGUMENT with fn's
 * message; the model and the imputer check it with this. */
confsmoe_status csm_check_writeback(confsmoe_ctx *ctx, const char *fn, int32_t writeback);
/* confsmoe_imputer_forward and _backward without the finite checks of their arrays, for the
 * model, whose own intermediate arrays these are (its optimizer checks the gradients). */
confsmoe_status csm_imputer_forward_trusted(confsmoe_imputer *imp, const confsmoe_tensor *h,
                                            const confsmoe_tensor *slots, const confsmoe_tensor *avail,
                                            confsmoe_tensor *out, confsmoe_saved **saved);
confsmoe_status csm_imputer_backward_trusted(confsmoe_imputer *imp, confsmoe_saved *saved,
                                             const confsmoe_tensor *dout, confsmoe_tensor *dh,
                                             confsmoe_tensor *dslots);
/* The arena the imputer allocates backward's work block from (NULL: none). */
void csm_imputer_set_arena(confsmoe_imputer *imp, csm_arena *arena);

#endif /* CONFSMOE_IMPUTER_H */
