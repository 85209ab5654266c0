/* Private: what the model uses of its imputer beyond the public imputer API. */
#ifndef CONFSMOE_IMPUTER_H
#define CONFSMOE_IMPUTER_H

#include "arena.h"
#include "internal.h"
#include "params.h"

/* confsmoe_imputer_fill on validated arguments, for the samples first .. first + B - 1 of a
 * batch: the draws of sample b come from substream (first + b) M + m of stream position
 * `base`, so they depend on the sample's index in the whole batch, and the ctx stream does
 * not move. */
confsmoe_status csm_imputer_fill_at(confsmoe_imputer *imp, int32_t m, const confsmoe_tensor *pool, int32_t draws,
                                    const confsmoe_tensor *avail, confsmoe_tensor *x, uint64_t base, int64_t first);
/* The imputer's parameter list (q, kv, v with separate_value, ln), which a model appends to its own. */
const csm_params *csm_imputer_param_list(const confsmoe_imputer *imp);
/* The arena the imputer allocates backward's work block from (NULL: none). */
void csm_imputer_set_arena(confsmoe_imputer *imp, csm_arena *arena);

#endif /* CONFSMOE_IMPUTER_H */
