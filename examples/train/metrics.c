#include "metrics.h"

#include <math.h>
#include <stdlib.h>

double metric_accuracy(const int32_t *pred, const int32_t *label, int n)
{
    if (n <= 0)
        return NAN;
    int correct = 0;
    for (int i = 0; i < n; i++)
        correct += pred[i] == label[i];
    return (double)correct / n;
}

double metric_macro_f1(const int32_t *pred, const int32_t *label, int n, int n_classes)
{
    if (n <= 0 || n_classes <= 0)
        return NAN;
    int64_t *tp = calloc((size_t)n_classes * 3, sizeof *tp);
    if (!tp)
        return NAN;
    int64_t *fp = tp + n_classes, *fn = fp + n_classes;
    for (int i = 0; i < n; i++) {
        const int32_t p = pred[i], y = label[i];
        if (p == y) {
            if (y >= 0 && y < n_classes)
                tp[y]++;
        } else {
            if (p >= 0 && p < n_classes)
                fp[p]++;
            if (y >= 0 && y < n_classes)
                fn[y]++;
        }
    }
    double sum = 0.0;
    int used = 0;
    for (int c = 0; c < n_classes; c++) {
        const int64_t den = 2 * tp[c] + fp[c] + fn[c];
        if (den == 0)
            continue;
        sum += 2.0 * (double)tp[c] / (double)den;
        used++;
    }
    free(tp);
    return used ? sum / used : NAN;
}

typedef struct {
    float score;
    int positive;
} ranked;

static int cmp_ranked(const void *a, const void *b)
{
    const float x = ((const ranked *)a)->score, y = ((const ranked *)b)->score;
    return x < y ? -1 : x > y;
}

double metric_auroc(const float *scores, int stride, const uint8_t *positive, int n)
{
    int64_t n_pos = 0;
    for (int i = 0; i < n; i++)
        n_pos += positive[i] != 0;
    const int64_t n_neg = n - n_pos;
    if (n_pos == 0 || n_neg == 0)
        return NAN;
    ranked *r = malloc((size_t)n * sizeof *r);
    if (!r)
        return NAN;
    for (int i = 0; i < n; i++) {
        r[i].score = scores[(size_t)i * (size_t)stride];
        r[i].positive = positive[i] != 0;
    }
    qsort(r, (size_t)n, sizeof *r, cmp_ranked);
    /* Sum of the 1-based ranks of the positives, ties sharing their average rank. */
    double rank_sum = 0.0;
    for (int i = 0; i < n;) {
        int j = i;
        while (j < n && r[j].score == r[i].score)
            j++;
        const double avg = 0.5 * ((double)(i + 1) + (double)j);
        for (int t = i; t < j; t++)
            if (r[t].positive)
                rank_sum += avg;
        i = j;
    }
    free(r);
    return (rank_sum - 0.5 * (double)n_pos * (double)(n_pos + 1)) / ((double)n_pos * (double)n_neg);
}

double metric_macro_auroc(const float *scores, const int32_t *label, int n, int n_classes)
{
    if (n <= 0 || n_classes <= 0)
        return NAN;
    uint8_t *pos = malloc((size_t)n);
    if (!pos)
        return NAN;
    double sum = 0.0;
    int used = 0;
    for (int c = 0; c < n_classes; c++) {
        for (int i = 0; i < n; i++)
            pos[i] = label[i] == c;
        const double a = metric_auroc(scores + c, n_classes, pos, n);
        if (!isnan(a)) {
            sum += a;
            used++;
        }
    }
    free(pos);
    return used ? sum / used : NAN;
}

void metric_softmax_argmax(float *logits, int n, int n_classes, int32_t *pred)
{
    for (int i = 0; i < n; i++) {
        float *l = logits + (size_t)i * (size_t)n_classes;
        int best = 0;
        for (int c = 1; c < n_classes; c++)
            if (l[c] > l[best])
                best = c;
        if (pred)
            pred[i] = best;
        const float mx = l[best];
        double sum = 0.0;
        for (int c = 0; c < n_classes; c++)
            sum += exp((double)(l[c] - mx));
        for (int c = 0; c < n_classes; c++)
            l[c] = (float)(exp((double)(l[c] - mx)) / sum);
    }
}
