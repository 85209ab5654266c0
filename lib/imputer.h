/* Private: what the model uses of its imputer beyond the public imputer API. */
#ifndef CONFSMOE_IMPUTER_H
#define CONFSMOE_IMPUTER_H

#include "arena.h"
#include "internal.h"
#include "params.h"

/* The imputer's parameter list (q, kv, v with separate_value, ln), which a model appends to its own. */
const csm_params *csm_imputer_param_list(const confsmoe_imputer *imp);
/* The arena the imputer allocates backward's work block from (NULL: none). */
void csm_imputer_set_arena(confsmoe_imputer *imp, csm_arena *arena);

#endif /* CONFSMOE_IMPUTER_H */
