/* What the trainer tells the user: progress lines on stdout and the JSON report. */
#ifndef CONFSMOE_TRAIN_REPORT_H
#define CONFSMOE_TRAIN_REPORT_H

#include <stdint.h>

#include "dataset.h"
#include "options.h"
#include "protocol.h"

typedef struct {
    double accuracy, macro_f1, macro_auroc;   /* fractions; NaN when undefined */
} eval_metrics;

typedef struct {
    int epoch;
    double loss, task_loss, train_accuracy;
    eval_metrics val;                         /* NaN without a validation split */
    double load_entropy, load_cv2, max_load_fraction, conf_loss;  /* training routing of the epoch */
    double seconds, samples_per_second;
} epoch_record;

typedef struct {
    int n_experts;
    int64_t tokens;
    int64_t *slots;            /* [E] slots routed to each expert */
    double *mean_confidence;   /* [E] NaN outside the confidence gate or for an unused expert */
    double load_entropy, load_cv2, max_load_fraction;
} expert_usage;

typedef struct {
    const options *opt;
    const dataset *ds;
    const split_plan *plan;
    int64_t n_params;
    int ranks;                 /* data-parallel processes (1 without mpirun) */
    const epoch_record *history;
    int n_history;
    int best_epoch;            /* 0 = the initial (or resumed) model */
    eval_metrics test;
    expert_usage experts;      /* routing of the final test evaluation */
    double seconds;
} run_report;

/* Progress (stdout, flushed per line). */
void report_header(const run_report *r);
void report_epoch(const epoch_record *e, int epochs, double eta_seconds);
void report_final(const run_report *r);

/* Writes the JSON report to path; exits with status 2 if the file cannot be written. */
void report_json(const run_report *r, const char *path);

#endif
