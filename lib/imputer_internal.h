/* Private to the imputer's files: imputer.c (creation, stage 2 forward) and
 * imputer_backward.c (stage 2 backward) share the object and a forward's saved state. */
#ifndef CONFSMOE_IMPUTER_INTERNAL_H
#define CONFSMOE_IMPUTER_INTERNAL_H

#include "arena.h"
#include "internal.h"
#include "params.h"

/* Parameters by role; V_W and V_B exist only with separate_value, LN_W and LN_B only with the
 * LN_IMP write-back. */
enum { Q_W, Q_B, KV_W, KV_B, V_W, V_B, LN_W, LN_B, N_ROLES };

struct confsmoe_imputer {
    confsmoe_ctx *ctx;
    confsmoe_imputer_params p;
    int64_t *tokens;                   /* [M] S_m */
    int64_t *offset;                   /* [M + 1] o_m = sum_{m' < m} S_m'; offset[M] = L */
    int64_t *top_t;                    /* [M] T of a missing m, before the cap at each sample's
                                          candidate count */
    bool uniform;                      /* every S_m is the same: slots may also be [M, B S, k, d] */
    csm_params params;                 /* the present roles, in role order */
    confsmoe_tensor *param[N_ROLES];   /* entries of params by role; NULL when absent */
    confsmoe_tensor *grad[N_ROLES];
    csm_arena *arena;                  /* lent for backward's work block (NULL: none) */
};

/* One missing (sample, modality): its S_m query tokens are rows q_row .. q_row + S_m - 1 of
 * the per-query arrays. */
typedef struct {
    int64_t b;
    int64_t q_row;
    int32_t m;
    bool zero_query;  /* compat: the reference's query is zeros for this modality */
} missing_pair;

/* One sample with at least one missing modality. Its queries are contiguous (pairs are sorted
 * by sample, then modality); its candidates are the S_m' tokens of each present modality m',
 * ordered by modality then token, stored slot-major: candidate c of slot j is row
 * kv_row + j L_b + c. */
typedef struct {
    int64_t q_row, n_query;  /* rows of the per-query arrays */
    int64_t kv_row, n_cand;  /* n_cand = L_b; 0 when no other modality is present */
    int64_t att;             /* first element of its k attention blocks of n_query x L_b */
    int64_t first_pair, n_pairs;  /* its missing pairs */
} sample_plan;

/* What one forward keeps: a copy of everything backward reads, so that the host may reuse
 * its h, slots and avail buffers right after forward. */
typedef struct {
    confsmoe_saved base;
    int64_t B;
    int64_t n_pairs, n_samples;
    int64_t nq;              /* missing tokens: sum over the pairs of S_m */
    int64_t nk;              /* gathered candidate slot rows */
    int64_t na;              /* attention elements */
    int64_t max_block;       /* largest n_query x L_b of one sample */
    int64_t max_cand;        /* largest L_b of one sample */
    missing_pair *pairs;     /* [n_pairs] */
    sample_plan *plans;      /* [n_samples] */
    int64_t *src_row;        /* [nk] row of slots (viewed as [B L k, d]) each candidate came from */
    float *ybar;             /* [nq, d] mean over the slots of each missing token */
    float *q;                /* [nq, d] queries (zero rows under compat's zero query) */
    float *g;                /* [nk, d] gathered candidate slot rows */
    float *kv;               /* [nk, d] keys (and values unless separate_value) */
    float *v;                /* [nk, d] values with separate_value, else == kv */
    float *p;                /* [na] softmax over the candidates */
    float *w;                /* [na] kept (and maybe renormalised) weights, 0 elsewhere */
    uint8_t *keep;           /* [na] 1 = in the top T */
    float *x_pre;            /* [nq, d] h + Ihat (Ihat with the residual write-back) */
    float *mean1, *rstd1;    /* [nq] LayerNorm of x_pre (NULL with the residual write-back) */
    float *y1;               /* [nq, d] compat: the first LayerNorm's output */
    float *mean2, *rstd2;    /* [nq] compat: the second LayerNorm */
} imputer_saved;

/* imputer.c: checks slots (or dslots) of a batch of B against the imputer's layouts. */
confsmoe_status csm_imputer_expect_slots(const confsmoe_imputer *imp, const char *fn, const char *name,
                                         const confsmoe_tensor *slots, int64_t B);

#endif /* CONFSMOE_IMPUTER_INTERNAL_H */
