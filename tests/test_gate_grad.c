/* Gradient checks of confsmoe_gate_backward by central differences in double
 * (the ggml test-grad0 recipe), through the public API only.
 *
 * Objective: L = sum(y * R1) + sum(slots * R2) + dloss * loss, with fixed
 * random R1 [N, d] and R2 [N, k, d] held in double and `loss` the scalar the
 * gate returns. The analytic gradient comes from one TRAINING forward and
 * confsmoe_gate_backward(dy = R1, dslots = R2 or NULL, dloss). The numeric one
 * perturbs one float coordinate of x, of a gate parameter or of an expert
 * parameter by +-EPS, reruns a training forward with the ctx reseeded to the
 * same seed (so the router noise is the same draw), and takes
 * (L+ - L-) / (step actually taken), accumulating L in double. Up to 25
 * coordinates per tensor, chosen deterministically, for every tensor. Top-k
 * indices are constants of the backward: a coordinate whose perturbed forwards
 * route differently is skipped and counted; fewer than 20% may be skipped.
 *
 * Each row of `configs` is one gate (one Check loop iteration; failures name
 * the row). The table covers every router, both combines, token- and
 * expert-level confidence, both targets (i32 [N] and u8 [N, C] labels),
 * detach_target on and off, the CV and entropy load losses with and without
 * noise (noisy CV with k < E uses Shazeer's smooth load), FROZEN and TRAINABLE
 * router gradients, compat on and off, `present` masks, k = 1, k = E, N = 1,
 * experts that receive no token, dslots NULL and not, and d = 1, 3, 4, 13.
 * ROUTER_GRAD_SCORE is a straight-through term (the forward does not depend on
 * it): finite differences cannot see it, so it is not checked here.
 *
 * Besides the differences, exact zeros are asserted: the target classifier's
 * gradients under detach_target, the router's (and noise network's) under a
 * FROZEN router with CONFIDENCE, and every gradient of an expert that got no
 * token in the unperturbed forward (its FFN and its ConfNet), in every row.
 * Where the API cuts a gradient on purpose the full L is no ground truth; see
 * DT_CONST_P / DT_PROBE and frozen_with_load() for what is compared there.
 *
 * GATE_GRAD_VERBOSE=1 in the environment prints the worst error per tensor. */
#define _POSIX_C_SOURCE 200809L /* posix_memalign in testutil.h under -std=c11 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

/* Step: 2e-3, in float (the divisor is the step actually taken, (v+EPS) -
 * (v-EPS) as rounded to float, in double). Once the top-k is fixed,
 * everything between a coordinate and L is smooth (GELU, LayerNorm, sigmoid,
 * softmax, the normal CDF of the smooth load), so the central difference errs
 * by EPS^2/6 |L'''| (truncation) plus the float32 rounding of the two forwards
 * over 2 EPS. Measured on the correct library over this whole table, the worst
 * |a - n| as a fraction of the tolerance below:
 *   EPS = 1e-2   5.9 (fails): the steepest rows (confidence combine, d = 3)
 *                have |L'''| up to ~6e3, errors up to 24% that shrink as EPS^2
 *                (truncation, not a bug)
 *   EPS = 5e-3   1.4 (fails)
 *   EPS = 2e-3   0.27   <- both terms small
 *   EPS = 1e-3   0.40   rounding starts to dominate
 *   EPS = 5e-4   0.76
 * and the share of coordinates skipped for a top-k change falls with EPS (at
 * most 7% of a config at 1e-2, 3% at 2e-3). GATE_GRAD_EPS=<step> in the
 * environment overrides it, for diagnosis only. */
static float EPS = 2e-3f;

/* Per-coordinate criterion: |a - n| <= RTOL max(|a|, |n|) + ATOL scale, with
 * scale = max(SCALE_FLOOR, the largest |a| or |n| sampled in the tensor), so
 * the absolute slack follows the tensor's gradient magnitude but never drops
 * below 1e-4 (3x the largest rounding noise measured at EPS = 2e-3, ~3e-5).
 * The correct float32 kernels use at most 27% of this tolerance. A real bug
 * costs far more: a flipped sign errs by 2|g|, a dropped factor like
 * sigmoid' = s (1 - s) <= 1/4 or (1 - p) by >= 25%, a wrong 1/den, a missing
 * term or branch by the whole term; and it is judged per coordinate, so one
 * wrong coordinate cannot hide in the norm of the others. 28 sabotaged builds
 * of lib/ (sign flips, dropped factors and terms in confnet.c, gate.c,
 * router.c, load_loss.c, layernorm.c) each fail at least two configs here. */
#define RTOL 2e-2
#define ATOL 2e-3
#define SCALE_FLOOR 5e-2
#define MAX_SAMPLES 25
#define MAX_SKIP_FRACTION 0.2
#define FWD_SEED UINT64_C(0x5eed)

/* ------------------------------------------------------------ configurations */

enum { PRESENT_ALL, PRESENT_SOME, PRESENT_NONE }; /* NULL mask, zeros at t % 3 == 1, all zero */

/* detach_target off, or on in one of two set-ups where differences still
 * have a ground truth (the gradient is cut on purpose, so the full L is not it):
 * DT_CONST_P: target.w = 0, so p = softmax(target.b)[label] (or the multi-label
 *   mean of sigmoid(target.b)) is a constant of everything but target.b: the
 *   detached gradient of every other tensor is the full one. Checks the c path
 *   of the confidence loss and that nothing reaches the target classifier.
 * DT_PROBE: target.w != 0 (p depends on the experts' outputs) but every ConfNet
 *   has v = 0, so c = sigmoid(beta) is a constant of x and the experts, and the
 *   detached confidence loss contributes nothing to their gradients, while
 *   backward still gets dloss != 0. The differences use L without its loss
 *   term; any gradient that leaks through p into the experts or x shows up.
 *   The ConfNets and the target classifier are not compared there. */
enum { DT_OFF, DT_CONST_P, DT_PROBE };

typedef struct {
    const char *name;
    int64_t n, d, h;
    int32_t E, k;
    int32_t router, combine, confidence, target, C;
    int32_t detach;   /* DT_* */
    int32_t router_grad, load_loss, noisy, compat;
    int present;      /* PRESENT_* */
    int dslots;       /* 1: dslots = R2; 0: dslots = NULL and the objective has no slots term */
    int dead;         /* 1: the router column of expert E-1 is set so that it never wins */
    float dloss;      /* dloss of backward, the weight of `loss` in L */
    float load_w;     /* load_loss_weight */
    float conf_w;     /* conf_loss_weight */
} cfg;

#define SM CONFSMOE_ROUTER_SOFTMAX
#define GA CONFSMOE_ROUTER_GAUSSIAN
#define LA CONFSMOE_ROUTER_LAPLACIAN
#define RS CONFSMOE_COMBINE_ROUTER_SOFTMAX
#define CF CONFSMOE_COMBINE_CONFIDENCE
#define TOK CONFSMOE_CONFIDENCE_TOKEN
#define EXP CONFSMOE_CONFIDENCE_EXPERT
#define SL CONFSMOE_TARGET_SINGLE_LABEL
#define ML CONFSMOE_TARGET_MULTI_LABEL
#define FRZ CONFSMOE_ROUTER_GRAD_FROZEN
#define TRN CONFSMOE_ROUTER_GRAD_TRAINABLE
#define NONE CONFSMOE_LOAD_LOSS_NONE
#define CV CONFSMOE_LOAD_LOSS_CV
#define ENT CONFSMOE_LOAD_LOSS_ENTROPY

/* Most smooth-load rows use k = E - 1: the threshold of Shazeer's estimator
 * for an expert in the top-k is then the one expert outside it, fixed by the
 * top-k, so the estimator has no kink that the top-k comparison would miss.
 * With E - k >= 2 that threshold is a max over the excluded experts, which can
 * switch without the top-k changing; the "E-k=2" row checks that general case
 * (its samples stay clear of such a switch).
 * Columns: detach DT_*, present PRESENT_*; dsl 0 passes dslots = NULL (and
 * drops the slots term from L); dead 1 sets the router column of expert E-1
 * so that it never wins; dloss is backward's dloss and the weight of `loss`
 * in L; ld_w and cf_w are load_loss_weight and conf_loss_weight. */
/* clang-format off */
static const cfg configs[] = {
    /* name                                n   d  h  E  k  rtr  cmb  conf  tgt  C      detach  rgrad  load  noisy  compat       present  dsl  dead  dloss  ld_w  cf_w */
    /* routers under the classic softmax combine */
    {"softmax router, router-softmax",     6,  3, 5, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  0.7f, 0.5f, 1.0f},
    {"gaussian router, router-softmax",    6,  3, 5, 4, 2,  GA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  0.7f, 0.5f, 1.0f},
    {"laplacian router, router-softmax",   6,  3, 5, 4, 2,  LA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   0,    0,  0.7f, 0.5f, 1.0f},
    /* routers under the confidence combine (frozen router) */
    {"softmax router, confidence",         5,  3, 4, 4, 2,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  0.8f, 0.5f, 1.3f},
    {"gaussian router, confidence",        5,  3, 4, 4, 2,  GA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  0.8f, 0.5f, 1.3f},
    {"laplacian router, confidence",       5,  3, 4, 4, 2,  LA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   0,    0,  0.8f, 0.5f, 1.3f},
    /* confidence level x target x detach */
    {"token conf, single-label",           5,  4, 3, 3, 2,  SM,  CF,  TOK,  SL, 4,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"token conf, multi-label",            5,  4, 3, 3, 2,  SM,  CF,  TOK,  ML, 4,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"expert conf, single-label",          6,  4, 3, 3, 2,  SM,  CF,  EXP,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"expert conf, multi-label",           6,  4, 3, 3, 2,  SM,  CF,  EXP,  ML, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   0,    0,  1.0f, 0.5f, 1.0f},
    {"token conf, single-label, detach",   5,  4, 3, 3, 2,  SM,  CF,  TOK,  SL, 4, DT_CONST_P,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"token conf, multi-label, detach",    5,  4, 3, 3, 2,  GA,  CF,  TOK,  ML, 4, DT_CONST_P,   FRZ, NONE,     0,      0,  PRESENT_ALL,   0,    0,  1.0f, 0.5f, 1.0f},
    {"expert conf, multi-label, detach",   6,  3, 3, 3, 2,  LA,  CF,  EXP,  ML, 2, DT_CONST_P,   FRZ, NONE,     0,      0, PRESENT_SOME,   1,    0,  1.0f, 0.5f, 1.0f},
    {"single-label, detach, leak probe",   5,  3, 3, 3, 2,  SM,  CF,  TOK,  SL, 3,   DT_PROBE,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 2.0f},
    {"multi-label, detach, leak probe",    5,  4, 3, 3, 2,  GA,  CF,  EXP,  ML, 3,   DT_PROBE,   FRZ, NONE,     0,      0, PRESENT_SOME,   0,    0,  1.0f, 0.5f, 2.0f},
    /* load losses under the softmax combine, with and without noise */
    {"CV load, clean",                     8,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     0,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"CV load, noisy (smooth load)",       8,  3, 4, 4, 3,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"CV load, noisy, E-k=2",              8,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   0,    0,  0.9f, 0.5f, 1.0f},
    {"CV load, noisy, k=E (counts)",       6,  3, 4, 3, 3,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"CV load, noisy, gaussian",           8,  3, 4, 4, 3,  GA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"entropy load, clean",                8,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,  ENT,     0,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"entropy load, noisy",                8,  3, 4, 4, 2,  LA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,  ENT,     1,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    {"noisy, no load loss",                6,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     1,      0,  PRESENT_ALL,   1,    0,  0.9f, 0.5f, 1.0f},
    /* router gradient under the confidence combine */
    {"confidence, frozen, noisy",          5,  3, 4, 4, 2,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     1,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"confidence, frozen, CV noisy",       6,  3, 4, 4, 3,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"confidence, frozen, entropy",        6,  3, 4, 4, 2,  GA,  CF,  EXP,  ML, 3,     DT_OFF,   FRZ,  ENT,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"confidence, trainable, CV noisy",    6,  3, 4, 4, 3,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   TRN,   CV,     1,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"confidence, trainable, entropy",     6,  3, 4, 4, 2,  GA,  CF,  EXP,  SL, 3,     DT_OFF,   TRN,  ENT,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"confidence, trainable, no load",     5,  3, 4, 4, 2,  SM,  CF,  TOK,  ML, 3,     DT_OFF,   TRN, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    /* compat and present */
    {"compat, confidence",                 5,  3, 4, 4, 2,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      1,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"compat, router-softmax",             5,  3, 4, 4, 2,  GA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      1,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"compat, present mask, expert conf",  6,  3, 4, 4, 2,  SM,  CF,  EXP,  ML, 3,     DT_OFF,   FRZ, NONE,     0,      1, PRESENT_SOME,   1,    0,  1.0f, 0.5f, 1.0f},
    {"present mask, confidence",           6,  3, 4, 4, 2,  LA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0, PRESENT_SOME,   1,    0,  1.0f, 0.5f, 1.0f},
    {"present all zero, confidence",       3,  3, 4, 4, 2,  SM,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0, PRESENT_NONE,   1,    0,  1.0f, 0.5f, 1.0f},
    /* k = 1, k = E, N = 1 */
    {"k=1, router-softmax",                6,  3, 4, 4, 1,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,  ENT,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"k=1, confidence",                    6,  3, 4, 4, 1,  GA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"k=E, router-softmax",                4,  3, 4, 3, 3,  LA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"k=E, confidence, expert conf",       4,  3, 4, 3, 3,  SM,  CF,  EXP,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"N=1, router-softmax",                1,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"N=1, confidence",                    1,  3, 4, 4, 2,  GA,  CF,  TOK,  ML, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"N=1, compat, expert conf",           1,  3, 4, 3, 2,  SM,  CF,  EXP,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      1,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    /* an expert with no token */
    {"dead expert, gaussian, confidence",  5,  3, 4, 4, 2,  GA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    1,  1.0f, 0.5f, 1.0f},
    {"dead expert, laplacian, softmax",    5,  3, 4, 4, 2,  LA,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    1,  1.0f, 0.5f, 1.0f},
    {"dead expert, softmax, CV noisy",     6,  3, 4, 4, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    1,  1.0f, 0.5f, 1.0f},
    {"dead expert, k=1, expert conf",      3,  3, 4, 4, 1,  SM,  CF,  EXP,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    1,  1.0f, 0.5f, 1.0f},
    /* widths */
    {"d=1, router-softmax",                5,  1, 3, 3, 2,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"d=1, confidence",                    5,  1, 3, 3, 2,  GA,  CF,  TOK,  SL, 3,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"d=1, confidence, multi, laplacian",  5,  1, 3, 3, 2,  LA,  CF,  EXP,  ML, 2,     DT_OFF,   FRZ, NONE,     0,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"d=13, router-softmax, noisy CV",     5, 13, 6, 4, 3,  SM,  RS,  TOK,  SL, 3,     DT_OFF,   FRZ,   CV,     1,      0,  PRESENT_ALL,   1,    0,  1.0f, 0.5f, 1.0f},
    {"d=13, confidence",                   5, 13, 6, 4, 2,  GA,  CF,  TOK,  SL, 5,     DT_OFF,   FRZ, NONE,     0,      0, PRESENT_SOME,   1,    0,  1.0f, 0.5f, 1.0f},
    {"d=13, confidence, multi, trainable", 4, 13, 5, 4, 2,  LA,  CF,  EXP,  ML, 4,     DT_OFF,   TRN,  ENT,     0,      0,  PRESENT_ALL,   0,    0,  1.0f, 0.5f, 1.0f},
};
/* clang-format on */
#define N_CONFIGS ((int)(sizeof configs / sizeof configs[0]))

/* ------------------------------------------------------------ helpers */


static confsmoe_tensor *mk(confsmoe_ctx *ctx, confsmoe_dtype dt, int32_t ndim, int64_t d0, int64_t d1, int64_t d2)
{
    const int64_t dims[3] = {d0, d1, d2};
    confsmoe_tensor *t = NULL;
    ck_assert_int_eq(confsmoe_tensor_create(ctx, dt, ndim, dims, &t), CONFSMOE_OK);
    return t;
}

/* Uniform in [lo, hi] with a random sign. */
static void fill_signed(confsmoe_tensor *t, trng *r, double lo, double hi)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++) {
        double m = trng_uniform(r, lo, hi);
        v[i] = (float)((trng_u64(r) >> 63) ? -m : m);
    }
}

static void fill_range(confsmoe_tensor *t, trng *r, double lo, double hi)
{
    float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        v[i] = (float)trng_uniform(r, lo, hi);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int all_zero(confsmoe_tensor *t)
{
    const float *v = f32(t);
    for (int64_t i = 0; i < confsmoe_tensor_numel(t); i++)
        if (v[i] != 0.0f)
            return 0;
    return 1;
}

/* ------------------------------------------------------------ one gate under test */

#define MAX_TENSORS 64
#define NAME_LEN 48

typedef struct {
    const cfg *c;
    confsmoe_ctx *ctx;
    confsmoe_expert **experts;
    confsmoe_gate *g;
    confsmoe_tensor *x, *labels, *present, *y, *topk, *slots, *dy, *dslots, *dx;
    double *r1, *r2;          /* R1, R2 in double: the same values as dy, dslots */
    int32_t *topk0;           /* the unperturbed routing */
    int64_t *load;            /* [E] slots per expert in the unperturbed forward */
    /* tensors checked: x, then the gate's parameters, then each expert's */
    int n_t;
    char name[MAX_TENSORS][NAME_LEN];
    confsmoe_tensor *value[MAX_TENSORS], *grad[MAX_TENSORS];
    int owner[MAX_TENSORS];   /* -1: x or a gate parameter; e: expert e's parameter */
} gate_case;

/* L of one training forward, reseeded so that the noise is the same draw;
 * copies the routing into topk_out. */
static double objective(gate_case *gc, int32_t *topk_out)
{
    const cfg *c = gc->c;
    confsmoe_saved *saved = NULL;
    float loss = NAN;
    ck_assert_int_eq(confsmoe_ctx_set_seed(gc->ctx, FWD_SEED), CONFSMOE_OK);
    confsmoe_status st = confsmoe_gate_forward(gc->g, gc->x, gc->labels, gc->present, gc->y, gc->topk, gc->slots,
                                               &loss, &saved);
    ck_assert_msg(st == CONFSMOE_OK, "[%s] gate_forward: %s", c->name, confsmoe_ctx_last_error(gc->ctx));
    confsmoe_saved_destroy(saved);
    const float *y = f32(gc->y), *sl = f32(gc->slots);
    double l = c->detach == DT_PROBE ? 0.0 : (double)c->dloss * loss;
    for (int64_t i = 0; i < c->n * c->d; i++)
        l += (double)y[i] * gc->r1[i];
    if (c->dslots)
        for (int64_t i = 0; i < c->n * c->k * c->d; i++)
            l += (double)sl[i] * gc->r2[i];
    memcpy(topk_out, confsmoe_tensor_data(gc->topk), (size_t)(c->n * c->k) * sizeof(int32_t));
    return l;
}

static void add_tensor(gate_case *gc, const char *name, confsmoe_tensor *v, confsmoe_tensor *g, int owner)
{
    ck_assert_int_lt(gc->n_t, MAX_TENSORS);
    ck_assert_ptr_nonnull(v);
    ck_assert_ptr_nonnull(g);
    ck_assert_int_eq(confsmoe_tensor_numel(v), confsmoe_tensor_numel(g));
    snprintf(gc->name[gc->n_t], NAME_LEN, "%s", name);
    gc->value[gc->n_t] = v;
    gc->grad[gc->n_t] = g;
    gc->owner[gc->n_t] = owner;
    gc->n_t++;
}

static void gate_case_open(gate_case *gc, int which)
{
    const cfg *c = &configs[which];
    memset(gc, 0, sizeof *gc);
    gc->c = c;
    gc->ctx = test_ctx(1000 + (uint64_t)which);
    trng r = {7000 + 31 * (uint64_t)which};

    /* Experts with parameters wider than the default init, so that the GELU
     * pre-activations cover its curved region and the outputs are O(1). */
    gc->experts = xcalloc((size_t)c->E, sizeof *gc->experts);
    const double d = (double)c->d, h = (double)c->h;
    for (int32_t e = 0; e < c->E; e++) {
        ck_assert_int_eq(confsmoe_expert_create(gc->ctx, c->d, c->h, &gc->experts[e]), CONFSMOE_OK);
        fill_signed(confsmoe_expert_param(gc->experts[e], 0), &r, 0.3 / sqrt(d), 1.5 / sqrt(d));
        fill_signed(confsmoe_expert_param(gc->experts[e], 1), &r, 0.1, 0.6);
        fill_signed(confsmoe_expert_param(gc->experts[e], 2), &r, 0.3 / sqrt(h), 1.5 / sqrt(h));
        fill_signed(confsmoe_expert_param(gc->experts[e], 3), &r, 0.1, 0.6);
    }

    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = c->d;
    p.k = c->k;
    p.router = c->router;
    p.noisy = c->noisy;
    p.combine = c->combine;
    p.confidence = c->confidence;
    p.n_classes = c->C;
    p.target = c->target;
    p.detach_target = c->detach != DT_OFF;
    p.router_grad = c->router_grad;
    p.load_loss = c->load_loss;
    p.load_loss_weight = c->load_w;
    p.conf_loss_weight = c->conf_w;
    p.compat = c->compat;
    confsmoe_status st = confsmoe_gate_create(gc->ctx, &p, gc->experts, c->E, &gc->g);
    ck_assert_msg(st == CONFSMOE_OK, "[%s] gate_create: %s", c->name, confsmoe_ctx_last_error(gc->ctx));

    /* Inputs: |x| <= 1 (scaled down for wide d, so that distances stay O(1)). */
    const double xs = fmin(1.0, 2.0 / sqrt(d));
    gc->x = mk(gc->ctx, CONFSMOE_F32, 2, c->n, c->d, 0);
    fill_signed(gc->x, &r, 0.2 * xs, xs);

    /* Gate parameters, by name. */
    for (int32_t i = 0; i < confsmoe_gate_n_params(gc->g); i++) {
        const char *name = confsmoe_gate_param_name(gc->g, i);
        confsmoe_tensor *t = confsmoe_gate_param(gc->g, i);
        if (strcmp(name, "router.w") == 0) {
            if (c->router == CONFSMOE_ROUTER_SOFTMAX)
                fill_signed(t, &r, 0.3 / sqrt(d), 2.0 / sqrt(d));
            else /* centres among the tokens */
                fill_signed(t, &r, 0.0, xs);
            if (c->dead) {
                /* Column E-1 never wins: far from every token (|x| <= 1), or for the
                 * dot product, -4 x_0 with x_0 >= 0.5 against logits of at most ~2. */
                float *w = f32(t);
                for (int64_t j = 0; j < c->d; j++)
                    w[j * c->E + c->E - 1] = c->router == CONFSMOE_ROUTER_SOFTMAX ? (j == 0 ? -4.0f : 0.0f) : 4.0f;
                if (c->router == CONFSMOE_ROUTER_SOFTMAX)
                    for (int64_t t2 = 0; t2 < c->n; t2++)
                        f32(gc->x)[t2 * c->d] = (float)trng_uniform(&r, 0.5, 1.0);
            }
        } else if (strcmp(name, "noise.w") == 0) {
            fill_signed(t, &r, 0.2 / sqrt(d), 1.0 / sqrt(d));
        } else if (ends_with(name, "ln.weight")) {
            fill_range(t, &r, 0.5, 1.5);
        } else if (ends_with(name, "ln.bias") || ends_with(name, ".b")) { /* conf.<i>.b, target.b */
            fill_signed(t, &r, 0.0, 0.5);
        } else if (strcmp(name, "target.w") == 0) {
            /* DT_CONST_P: see there. */
            if (c->detach == DT_CONST_P)
                memset(confsmoe_tensor_data(t), 0, confsmoe_tensor_nbytes(t));
            else
                fill_signed(t, &r, 0.3 / sqrt(d), 2.0 / sqrt(d));
        } else if (c->detach == DT_PROBE && ends_with(name, ".w")) { /* conf.<i>.w: see DT_PROBE */
            memset(confsmoe_tensor_data(t), 0, confsmoe_tensor_nbytes(t));
        } else { /* conf.<i>.w */
            fill_signed(t, &r, 0.3 / sqrt(d), 1.5 / sqrt(d));
        }
    }

    if (c->combine == CONFSMOE_COMBINE_CONFIDENCE) {
        if (c->target == CONFSMOE_TARGET_SINGLE_LABEL) {
            gc->labels = mk(gc->ctx, CONFSMOE_I32, 1, c->n, 0, 0);
            int32_t *l = confsmoe_tensor_data(gc->labels);
            for (int64_t t = 0; t < c->n; t++)
                l[t] = (int32_t)(trng_u64(&r) % (uint64_t)c->C);
        } else {
            gc->labels = mk(gc->ctx, CONFSMOE_U8, 2, c->n, c->C, 0);
            uint8_t *l = confsmoe_tensor_data(gc->labels);
            for (int64_t i = 0; i < c->n * c->C; i++)
                l[i] = (uint8_t)(trng_u64(&r) >> 63);
        }
    }
    if (c->present != PRESENT_ALL) {
        gc->present = mk(gc->ctx, CONFSMOE_U8, 1, c->n, 0, 0);
        uint8_t *m = confsmoe_tensor_data(gc->present);
        for (int64_t t = 0; t < c->n; t++)
            m[t] = c->present == PRESENT_SOME && t % 3 != 1;
    }

    gc->y = mk(gc->ctx, CONFSMOE_F32, 2, c->n, c->d, 0);
    gc->dy = mk(gc->ctx, CONFSMOE_F32, 2, c->n, c->d, 0);
    gc->dx = mk(gc->ctx, CONFSMOE_F32, 2, c->n, c->d, 0);
    gc->topk = mk(gc->ctx, CONFSMOE_I32, 2, c->n, c->k, 0);
    gc->slots = mk(gc->ctx, CONFSMOE_F32, 3, c->n, c->k, c->d);
    gc->dslots = mk(gc->ctx, CONFSMOE_F32, 3, c->n, c->k, c->d);
    fill_signed(gc->dy, &r, 0.2, 1.0);
    fill_signed(gc->dslots, &r, 0.2, 1.0);
    gc->r1 = xcalloc((size_t)(c->n * c->d), sizeof *gc->r1);
    gc->r2 = xcalloc((size_t)(c->n * c->k * c->d), sizeof *gc->r2);
    for (int64_t i = 0; i < c->n * c->d; i++)
        gc->r1[i] = f32(gc->dy)[i];
    for (int64_t i = 0; i < c->n * c->k * c->d; i++)
        gc->r2[i] = f32(gc->dslots)[i];

    add_tensor(gc, "x", gc->x, gc->dx, -1);
    for (int32_t i = 0; i < confsmoe_gate_n_params(gc->g); i++)
        add_tensor(gc, confsmoe_gate_param_name(gc->g, i), confsmoe_gate_param(gc->g, i),
                   confsmoe_gate_grad(gc->g, i), -1);
    for (int32_t e = 0; e < c->E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(gc->experts[e]); i++) {
            char name[NAME_LEN];
            snprintf(name, sizeof name, "expert%d.%s", (int)e, confsmoe_expert_param_name(gc->experts[e], i));
            add_tensor(gc, name, confsmoe_expert_param(gc->experts[e], i), confsmoe_expert_grad(gc->experts[e], i),
                       (int)e);
        }

    /* The analytic gradient: one training forward, one backward. Gradients
     * start at zero (fresh objects); zero them anyway, the API accumulates. */
    confsmoe_gate_zero_grad(gc->g);
    for (int32_t e = 0; e < c->E; e++)
        confsmoe_expert_zero_grad(gc->experts[e]);
    confsmoe_saved *saved = NULL;
    float loss = NAN;
    ck_assert_int_eq(confsmoe_ctx_set_seed(gc->ctx, FWD_SEED), CONFSMOE_OK);
    st = confsmoe_gate_forward(gc->g, gc->x, gc->labels, gc->present, gc->y, gc->topk, gc->slots, &loss, &saved);
    ck_assert_msg(st == CONFSMOE_OK, "[%s] gate_forward: %s", c->name, confsmoe_ctx_last_error(gc->ctx));
    ck_assert_ptr_nonnull(saved);
    ck_assert_msg(isfinite(loss), "[%s] loss %g", c->name, (double)loss);
    st = confsmoe_gate_backward(gc->g, saved, gc->dy, c->dslots ? gc->dslots : NULL, c->dloss, gc->dx);
    ck_assert_msg(st == CONFSMOE_OK, "[%s] gate_backward: %s", c->name, confsmoe_ctx_last_error(gc->ctx));
    confsmoe_saved_destroy(saved);

    gc->topk0 = xcalloc((size_t)(c->n * c->k), sizeof *gc->topk0);
    memcpy(gc->topk0, confsmoe_tensor_data(gc->topk), (size_t)(c->n * c->k) * sizeof(int32_t));
    gc->load = xcalloc((size_t)c->E, sizeof *gc->load);
    for (int64_t i = 0; i < c->n * c->k; i++) {
        ck_assert(gc->topk0[i] >= 0 && gc->topk0[i] < c->E);
        gc->load[gc->topk0[i]]++;
    }
}

static void gate_case_close(gate_case *gc)
{
    free(gc->r1);
    free(gc->r2);
    free(gc->topk0);
    free(gc->load);
    confsmoe_tensor *ts[] = {gc->x, gc->labels, gc->present, gc->y, gc->topk, gc->slots, gc->dy, gc->dslots, gc->dx};
    for (size_t i = 0; i < sizeof ts / sizeof *ts; i++)
        confsmoe_tensor_destroy(ts[i]);
    confsmoe_gate_destroy(gc->g);
    for (int32_t e = 0; e < gc->c->E; e++)
        confsmoe_expert_destroy(gc->experts[e]);
    free(gc->experts);
    confsmoe_ctx_destroy(gc->ctx);
}

static int frozen_with_load(const cfg *c)
{
    return c->combine == CONFSMOE_COMBINE_CONFIDENCE && c->router_grad == CONFSMOE_ROUTER_GRAD_FROZEN &&
           c->load_loss != CONFSMOE_LOAD_LOSS_NONE;
}

/* Whether a tensor's analytic gradient must be exactly zero, and why (or NULL). */
static const char *must_be_zero(const gate_case *gc, int t)
{
    const cfg *c = gc->c;
    const char *name = gc->name[t];
    if (c->detach && strncmp(name, "target.", 7) == 0)
        return "detach_target: the target classifier gets no gradient";
    if (c->combine == CONFSMOE_COMBINE_CONFIDENCE && c->router_grad == CONFSMOE_ROUTER_GRAD_FROZEN &&
        (strcmp(name, "router.w") == 0 || strcmp(name, "noise.w") == 0))
        return "ROUTER_GRAD_FROZEN under CONFIDENCE: the router gets no gradient";
    if (gc->owner[t] >= 0 && gc->load[gc->owner[t]] == 0)
        return "the expert received no token";
    int e;
    char rest[NAME_LEN];
    if (sscanf(name, "conf.%d.%47s", &e, rest) == 2 && e >= 0 && e < c->E && gc->load[e] == 0)
        return "the ConfNet of an expert that received no token";
    return NULL;
}

/* ------------------------------------------------------------ the check */

START_TEST(test_gate_gradcheck)
{
    const cfg *c = &configs[_i];
    const int verbose = getenv("GATE_GRAD_VERBOSE") != NULL;
    if (getenv("GATE_GRAD_EPS") && atof(getenv("GATE_GRAD_EPS")) > 0.0)
        EPS = (float)atof(getenv("GATE_GRAD_EPS"));
    gate_case gc;
    gate_case_open(&gc, _i);

    char msg[1024] = "";
    int failed = 0;
    int64_t checked = 0, skipped = 0;
    int32_t *tk = xcalloc((size_t)(c->n * c->k), sizeof *tk);
    const size_t tk_bytes = (size_t)(c->n * c->k) * sizeof *tk;

    /* The forward is deterministic given the seed: L0 twice, bit for bit. */
    const double l0 = objective(&gc, tk);
    ck_assert_msg(memcmp(tk, gc.topk0, tk_bytes) == 0, "[%s] routing not reproducible", c->name);
    ck_assert_msg(objective(&gc, tk) == l0, "[%s] objective not reproducible", c->name);

    if (c->dead)
        ck_assert_msg(gc.load[c->E - 1] == 0, "[%s] expert %d was meant to get no token but got %lld slots", c->name,
                      (int)c->E - 1, (long long)gc.load[c->E - 1]);

    double x_scale = 0.0;
    for (int t = 0; t < gc.n_t; t++) {
        const char *zero_why = must_be_zero(&gc, t);
        if (zero_why && !all_zero(gc.grad[t])) {
            if (!failed++)
                snprintf(msg, sizeof msg, "[%s] d%s must be exactly zero (%s), it is not", c->name, gc.name[t],
                         zero_why);
            continue;
        }
        /* With detach_target the loss still depends on the target classifier
         * (the gradient is cut on purpose): no difference to compare with. */
        if (c->detach != DT_OFF && strncmp(gc.name[t], "target.", 7) == 0)
            continue;
        if (c->detach == DT_PROBE && strncmp(gc.name[t], "conf.", 5) == 0)
            continue;
        /* A FROZEN router under CONFIDENCE is detached: a load loss still
         * depends on x and the router through the routing weights, but gets
         * no gradient by design, so x and the router have no ground truth
         * (their gradients are asserted zero above, for the router). */
        if (frozen_with_load(c) && (t == 0 || strcmp(gc.name[t], "router.w") == 0 ||
                                    strcmp(gc.name[t], "noise.w") == 0))
            continue;

        float *v = f32(gc.value[t]);
        const float *an = f32(gc.grad[t]);
        int64_t idx[MAX_SAMPLES];
        double num[MAX_SAMPLES];
        int ok[MAX_SAMPLES];
        const int64_t m = test_pick(MAX_SAMPLES, confsmoe_tensor_numel(gc.value[t]), idx, 131 * (uint64_t)_i + (uint64_t)t);
        double scale = SCALE_FLOOR;
        for (int64_t j = 0; j < m; j++) {
            const int64_t i = idx[j];
            const float orig = v[i], up = orig + EPS, down = orig - EPS;
            v[i] = up;
            const double lp = objective(&gc, tk);
            int same = memcmp(tk, gc.topk0, tk_bytes) == 0;
            v[i] = down;
            const double lm = objective(&gc, tk);
            same &= memcmp(tk, gc.topk0, tk_bytes) == 0;
            v[i] = orig;
            ok[j] = same;
            if (!same) {
                skipped++;
                continue;
            }
            checked++;
            num[j] = (lp - lm) / ((double)up - (double)down);
            scale = fmax(scale, fmax(fabs(num[j]), fabs((double)an[i])));
        }
        if (t == 0)
            x_scale = scale;
        int64_t bad = 0, worst = -1;
        double worst_excess = -INFINITY, worst_rel = 0.0, worst_use = 0.0;
        for (int64_t j = 0; j < m; j++) {
            if (!ok[j])
                continue;
            const double a = an[idx[j]], n = num[j];
            const double excess = fabs(a - n) - (RTOL * fmax(fabs(a), fabs(n)) + ATOL * scale);
            if (!(excess <= 0.0)) {
                bad++;
                if (verbose)
                    printf("  BAD %s %s [%lld] analytic %.7g numeric %.7g\n", c->name, gc.name[t],
                           (long long)idx[j], a, n);
            }
            worst_use = fmax(worst_use, fabs(a - n) / (RTOL * fmax(fabs(a), fabs(n)) + ATOL * scale));
            if (!(excess <= worst_excess)) {
                worst_excess = excess;
                worst = j;
                worst_rel = fabs(a - n) / fmax(fmax(fabs(a), fabs(n)), 1e-30);
            }
        }
        if (verbose && worst >= 0)
            printf("  %-36s %-22s m=%2lld scale %.3g worst [%lld] a %.6g n %.6g rel %.2g use %.3f\n", c->name,
                   gc.name[t], (long long)m, scale, (long long)idx[worst], (double)an[idx[worst]], num[worst],
                   worst_rel, worst_use);
        if (bad && !failed++) {
            snprintf(msg, sizeof msg,
                     "[%s] d%s: %lld of %lld sampled coordinates off; worst [%lld]: analytic %.7g numeric %.7g "
                     "(tolerance %.3g)",
                     c->name, gc.name[t], (long long)bad, (long long)m, (long long)idx[worst], (double)an[idx[worst]],
                     num[worst], RTOL * fmax(fabs((double)an[idx[worst]]), fabs(num[worst])) + ATOL * scale);
        }
    }
    free(tk);
    if (!failed && (double)skipped > MAX_SKIP_FRACTION * (double)(skipped + checked)) {
        snprintf(msg, sizeof msg, "[%s] %lld of %lld coordinates skipped for a top-k change (more than %.0f%%)",
                 c->name, (long long)skipped, (long long)(skipped + checked), 100 * MAX_SKIP_FRACTION);
        failed = 1;
    }
    /* The check has teeth only where the gradient is well above the absolute
     * tolerance: dx always is (every config routes x through its experts). */
    if (!failed && !frozen_with_load(c) && !(x_scale > SCALE_FLOOR)) {
        snprintf(msg, sizeof msg, "[%s] the sampled dx is at most %g: too small to check", c->name, x_scale);
        failed = 1;
    }
    if (verbose)
        printf("%-38s checked %lld skipped %lld\n", c->name, (long long)checked, (long long)skipped);
    fflush(stdout);
    gate_case_close(&gc);
    ck_assert_msg(!failed, "%s%s", msg, failed > 1 ? " (and other tensors: GATE_GRAD_VERBOSE=1 lists them)" : "");
}
END_TEST

static Suite *gate_grad_suite(void)
{
    Suite *s = suite_create("gate_grad");
    TCase *tc = tcase_create("central_differences");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_gate_gradcheck, 0, N_CONFIGS);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return test_run(gate_grad_suite());
}
