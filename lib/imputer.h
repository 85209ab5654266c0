/* Private: the imputer's stage 1 for the model, which lays out its own draws. */
#ifndef CONFSMOE_IMPUTER_H
#define CONFSMOE_IMPUTER_H

#include "internal.h"

/* confsmoe_imputer_fill on validated arguments, for the samples first .. first + B - 1 of a
 * batch: the draws of sample b come from substream (first + b) M + m of stream position
 * `base`, so they depend on the sample's index in the whole batch, and the ctx stream does
 * not move. */
confsmoe_status csm_imputer_fill_at(confsmoe_imputer *imp, int32_t m, const confsmoe_tensor *pool, int32_t draws,
                                    const confsmoe_tensor *avail, confsmoe_tensor *x, uint64_t base, int64_t first);

#endif /* CONFSMOE_IMPUTER_H */
