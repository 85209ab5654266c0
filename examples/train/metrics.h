/* Classification metrics, all as fractions in [0, 1] (NaN when undefined).
 *
 * accuracy     share of samples whose prediction equals the label.
 * macro-F1     mean over classes of F1_c = 2 TP / (2 TP + FP + FN). A class with no true
 *              and no predicted sample (TP + FP + FN = 0) is left out of the mean.
 * macro AUROC  one-vs-rest: for each class, the AUROC of its score (a softmax probability)
 *              separating its samples from the others, by the rank-sum (Mann-Whitney U)
 *              formula with average ranks for tied scores; classes without positives or
 *              without negatives are left out of the mean. */
#ifndef CONFSMOE_TRAIN_METRICS_H
#define CONFSMOE_TRAIN_METRICS_H

#include <stdint.h>

double metric_accuracy(const int32_t *pred, const int32_t *label, int n);
double metric_macro_f1(const int32_t *pred, const int32_t *label, int n, int n_classes);
/* scores [n, n_classes], row-major. */
double metric_macro_auroc(const float *scores, const int32_t *label, int n, int n_classes);
/* AUROC of one score vector against 0/1 positives (NaN without positives or negatives). */
double metric_auroc(const float *scores, int stride, const uint8_t *positive, int n);

/* In place: logits [n, C] -> softmax probabilities; pred[i] = argmax (the first on ties). */
void metric_softmax_argmax(float *logits, int n, int n_classes, int32_t *pred);

#endif
