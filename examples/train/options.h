/* The trainer's knobs (flags and their defaults live in main.c). */
#ifndef CONFSMOE_TRAIN_OPTIONS_H
#define CONFSMOE_TRAIN_OPTIONS_H

#include <stdint.h>

typedef struct {
    const char *data, *json, *checkpoint, *resume, *dump_masks;
    double missing, val, lr, dropout, load_weight, modality_dropout, weight_decay;
    int gate, load_loss, imputation, eval_fill, router_grad, noisy, writeback;
    int experts, k, d, heads, hidden, epochs, batch, draws, threads;
    uint64_t seed;
    int paper, quiet;
} options;

/* Names of the choice flags, indexed by the library's constants (CONFSMOE_MODEL_GATE_*,
 * CONFSMOE_LOAD_LOSS_*, CONFSMOE_IMPUTE_*, CONFSMOE_ROUTER_GRAD_*, CONFSMOE_WRITEBACK_*); NULL-terminated. */
extern const char *const GATE_NAMES[];
extern const char *const LOAD_LOSS_NAMES[];
extern const char *const IMPUTATION_NAMES[];
extern const char *const EVAL_FILL_NAMES[]; /* index = confsmoe_model_params.predict_pool_mean */
extern const char *const WRITEBACK_NAMES[]; /* index = CONFSMOE_WRITEBACK_* */
extern const char *const ROUTER_GRAD_NAMES[];

#endif
