#include "protocol.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

/* Moves a stratified share of the samples of role `from` to role `to`: per class of n_c
 * samples, round(fraction n_c), at least 1 when n_c >= 2, at most n_c - 1. */
static void stratified_move(const dataset *ds, int8_t *role, int8_t from, int8_t to, double fraction, rng64 *r)
{
    int *members = xmalloc((size_t)ds->n * sizeof *members);
    for (int c = 0; c < ds->n_classes; c++) {
        int n_c = 0;
        for (int i = 0; i < ds->n; i++)
            if (role[i] == from && ds->label[i] == c)
                members[n_c++] = i;
        if (n_c < 2 || fraction <= 0.0)
            continue;
        int take = (int)floor(fraction * n_c + 0.5);
        if (take < 1)
            take = 1;
        if (take > n_c - 1)
            take = n_c - 1;
        rng_shuffle(r, members, (size_t)n_c);
        for (int j = 0; j < take; j++)
            role[members[j]] = to;
    }
    free(members);
}

void protocol_split(const dataset *ds, double val_fraction, uint64_t seed, split_plan *p)
{
    memset(p, 0, sizeof *p);
    p->role = xmalloc((size_t)ds->n);
    for (int i = 0; i < ds->n; i++) {
        int any = 0;
        for (int m = 0; m < ds->m; m++)
            any |= ds->natural[(size_t)i * ds->m + m];
        if (!any) {
            p->role[i] = ROLE_EXCLUDED;
            p->n_excluded++;
        } else {
            p->role[i] = ds->split ? (ds->split[i] ? ROLE_TEST : ROLE_TRAIN) : ROLE_TRAIN;
        }
    }
    if (!ds->split) {
        rng64 r = rng_stream(seed, 1);
        stratified_move(ds, p->role, ROLE_TRAIN, ROLE_TEST, 0.2, &r);
    }
    rng64 r = rng_stream(seed, 2);
    stratified_move(ds, p->role, ROLE_TRAIN, ROLE_VAL, val_fraction, &r);
    for (int k = 0; k < N_ROLES; k++)
        p->list[k] = xmalloc((size_t)ds->n * sizeof(int));
    for (int i = 0; i < ds->n; i++)
        if (p->role[i] != ROLE_EXCLUDED)
            p->list[p->role[i]][p->count[p->role[i]]++] = i;
}

void protocol_mask(const dataset *ds, double rate, uint64_t seed, split_plan *p)
{
    const int M = ds->m;
    p->mask = xmalloc((size_t)ds->n * (size_t)M);
    memcpy(p->mask, ds->natural, (size_t)ds->n * (size_t)M);
    for (int i = 0; i < ds->n; i++)
        if (p->role[i] == ROLE_EXCLUDED)
            memset(p->mask + (size_t)i * M, 0, (size_t)M);
    rng64 r = rng_stream(seed, 3);
    int *present = xmalloc((size_t)M * sizeof *present);
    for (int k = 0; k < N_ROLES; k++) {
        const int n = p->count[k];
        /* The cells that may be dropped: every (sample, modality) but the kept one. */
        int64_t *cells = xmalloc(((size_t)n * (size_t)(M - 1) + 1) * sizeof *cells);
        int64_t count = 0;
        for (int t = 0; t < n; t++) {
            const int i = p->list[k][t];
            int n_present = 0;
            for (int m = 0; m < M; m++)
                if (ds->natural[(size_t)i * M + m])
                    present[n_present++] = m;
            const int keep = present[rng_below(&r, (uint64_t)n_present)];
            for (int m = 0; m < M; m++)
                if (m != keep)
                    cells[count++] = (int64_t)i * M + m;
        }
        const int64_t drop = (int64_t)floor(rate * (double)count + 0.5);
        for (int64_t j = 0; j < drop; j++) {
            const int64_t pick = j + (int64_t)rng_below(&r, (uint64_t)(count - j));
            const int64_t c = cells[pick];
            cells[pick] = cells[j];
            cells[j] = c;
            p->dropped[k] += p->mask[c];
            p->mask[c] = 0;
        }
        for (int t = 0; t < n; t++)
            for (int m = 0; m < M; m++)
                p->missing[k] += !p->mask[(size_t)p->list[k][t] * M + m];
        free(cells);
    }
    free(present);
}

void protocol_free(split_plan *p)
{
    for (int k = 0; k < N_ROLES; k++)
        free(p->list[k]);
    free(p->role);
    free(p->mask);
    memset(p, 0, sizeof *p);
}
