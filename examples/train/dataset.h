/* A dataset folder, in the layout of data/handwritten:
 *
 *   labels.csv          N lines, one 0-based integer class per line (single-label)
 *   view<i>_<name>.csv  i = 0 .. M-1, N rows each; row j of every file is sample j
 *   split*.csv          optional, N lines of 0 (train) / 1 (test); at most one such file
 *   avail.csv           optional, N rows x M columns of 0/1 (1 = modality present)
 *
 * CSV: comma separated, no header. A cell may be a number, "nan" (any case) or empty
 * (= NaN). A view row that is empty or all NaN marks that modality missing for the
 * sample, as does a 0 in avail.csv. A view whose first line is "#tokens=S" is a sequence
 * view: each row holds S*F values, S tokens of F features, token-major (token 0's F
 * features, then token 1's, ...). Other views have S = 1. Views may differ in S (S_m per
 * view: the model's modality_tokens).
 *
 * Every problem (missing folder or file, ragged row, non-numeric cell, row counts that
 * disagree, ...) ends the program with one line naming the file and line, exit status 2. */
#ifndef CONFSMOE_TRAIN_DATASET_H
#define CONFSMOE_TRAIN_DATASET_H

#include <stdint.h>

typedef struct {
    char *name;        /* file name, e.g. "view0_pix.csv" */
    int64_t features;  /* F, features per token */
    int64_t tokens;    /* S_m, tokens per row ("#tokens=S"; 1 without) */
    float *x;          /* [n, S_m, F]; NaN cells as read (whole rows NaN where missing) */
} ds_view;

typedef struct {
    char *dir;
    int n;                /* samples: the rows of labels.csv */
    int m;                /* modalities (views) */
    int64_t tokens;       /* S when every view has S tokens, else 0 (see views[].tokens) */
    ds_view *views;       /* [m] */
    int32_t *label;       /* [n] */
    int n_classes;        /* C = max label + 1 */
    char *split_name;     /* file name of the split file, or NULL */
    int8_t *split;        /* [n] 0 = train, 1 = test, or NULL without a split file */
    int has_avail;        /* avail.csv was found */
    uint8_t *natural;     /* [n, m] 1 = present: avail.csv AND a non-empty, not all-NaN row */
    int64_t natural_missing;  /* cells with natural[] == 0 */
    int64_t nan_cells;    /* NaN cells inside present rows (filled with the train mean) */
} dataset;

/* Reads the folder; on any problem prints one line and exits with status 2. */
void dataset_load(const char *dir, dataset *ds);
void dataset_free(dataset *ds);

/* Standardises every view in place: per feature (pooled over the S_m tokens), the mean and
 * standard deviation over the rows of `train` whose modality is present in `mask` [n, m]
 * (std < 1e-8 counts as 1). NaN cells of present rows become 0, the train mean; rows of
 * missing (sample, modality) cells become 0 (they are never read by the model). */
void dataset_standardise(dataset *ds, const uint8_t *mask, const int *train, int n_train);

#endif
