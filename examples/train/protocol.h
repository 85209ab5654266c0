/* Splits and the missing-modality protocol of docs/MODEL.md, section 9.
 *
 * Splits. Samples with no naturally present modality (avail.csv / empty rows) are
 * excluded from every split. With a split file, its 0 rows are train and its 1 rows test;
 * without one, a stratified 80/20 train/test split drawn from the seed. A validation split
 * (fraction `val` of each class, at least 1 per class with >= 2 training samples, never all
 * of a class) is then carved from train, also stratified and seeded. The lists are sorted
 * by sample index.
 *
 * Missing protocol, rate r, applied to each split on its own (train, then val, then test,
 * from one seeded stream): every sample keeps one modality, drawn uniformly among its
 * naturally present ones; among the remaining (sample, modality) cells of the split,
 * exactly round(r * count) are dropped, chosen uniformly. The final mask is that AND the
 * natural availability, so cells already naturally missing may also be drawn, and the
 * missing fraction is at least r * (M - 1) / M of the cells. */
#ifndef CONFSMOE_TRAIN_PROTOCOL_H
#define CONFSMOE_TRAIN_PROTOCOL_H

#include <stdint.h>

#include "dataset.h"

enum { ROLE_EXCLUDED = -1, ROLE_TRAIN = 0, ROLE_VAL = 1, ROLE_TEST = 2, N_ROLES = 3 };

typedef struct {
    int *list[N_ROLES];        /* sample indices of train, val, test */
    int count[N_ROLES];
    int n_excluded;
    int8_t *role;              /* [n] ROLE_* */
    uint8_t *mask;             /* [n, m] 1 = present after the protocol AND natural availability */
    int64_t dropped[N_ROLES];  /* cells the protocol removed that were naturally present */
    int64_t missing[N_ROLES];  /* cells missing in the final mask */
} split_plan;

/* Seed streams: splits use (seed, 1) and (seed, 2), the protocol (seed, 3). */
void protocol_split(const dataset *ds, double val_fraction, uint64_t seed, split_plan *p);
void protocol_mask(const dataset *ds, double rate, uint64_t seed, split_plan *p);
void protocol_free(split_plan *p);

#endif
