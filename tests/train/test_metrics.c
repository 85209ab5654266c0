/* Unit tests of the trainer's metrics (examples/train/metrics.c) against hand-computed values. */
#include <math.h>
#include <stdio.h>

#include "metrics.h"

static int failures = 0;

#define EXPECT_CLOSE(got, want)                                                                     \
    do {                                                                                            \
        const double g_ = (got), w_ = (want);                                                       \
        if (!(fabs(g_ - w_) <= 1e-6)) {                                                             \
            fprintf(stderr, "%s:%d: %s = %.12g, expected %.12g\n", __FILE__, __LINE__, #got, g_, w_); \
            failures++;                                                                             \
        }                                                                                           \
    } while (0)

#define EXPECT_NAN(got)                                                                             \
    do {                                                                                            \
        const double g_ = (got);                                                                    \
        if (!isnan(g_)) {                                                                           \
            fprintf(stderr, "%s:%d: %s = %.12g, expected NaN\n", __FILE__, __LINE__, #got, g_);    \
            failures++;                                                                             \
        }                                                                                           \
    } while (0)

static void test_accuracy(void)
{
    const int32_t pred[] = {0, 1, 2, 2}, label[] = {0, 1, 1, 2};
    EXPECT_CLOSE(metric_accuracy(pred, label, 4), 0.75);
    EXPECT_NAN(metric_accuracy(pred, label, 0));
}

static void test_macro_f1(void)
{
    /* Class 3 has no true and no predicted sample: left out of the mean.
     * class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 1, FN 1 -> 2/3. */
    const int32_t label[] = {0, 0, 1, 1, 2, 2}, pred[] = {0, 1, 1, 1, 2, 0};
    EXPECT_CLOSE(metric_macro_f1(pred, label, 6, 4), (0.5 + 0.8 + 2.0 / 3.0) / 3.0);
    /* A class predicted but never true counts, with F1 = 0: (2/3 + 1 + 0) / 3. */
    const int32_t label2[] = {0, 0, 1}, pred2[] = {0, 2, 1};
    EXPECT_CLOSE(metric_macro_f1(pred2, label2, 3, 3), (2.0 / 3.0 + 1.0 + 0.0) / 3.0);
    /* All correct. */
    EXPECT_CLOSE(metric_macro_f1(label, label, 6, 3), 1.0);
}

static void test_auroc(void)
{
    /* The textbook example: 3 of the 4 (positive, negative) pairs ordered correctly. */
    const float s1[] = {0.1f, 0.4f, 0.35f, 0.8f};
    const uint8_t p1[] = {0, 0, 1, 1};
    EXPECT_CLOSE(metric_auroc(s1, 1, p1, 4), 0.75);
    /* Ties between a positive and a negative count one half: pairs (0.8,0.5)=1, (0.8,0.2)=1,
     * (0.5,0.5)=0.5, (0.5,0.2)=1 -> 3.5 / 4. */
    const float s2[] = {0.8f, 0.5f, 0.5f, 0.2f};
    const uint8_t p2[] = {1, 1, 0, 0};
    EXPECT_CLOSE(metric_auroc(s2, 1, p2, 4), 0.875);
    /* All scores tied: 0.5. */
    const float s3[] = {0.3f, 0.3f, 0.3f, 0.3f, 0.3f};
    const uint8_t p3[] = {1, 0, 1, 0, 0};
    EXPECT_CLOSE(metric_auroc(s3, 1, p3, 5), 0.5);
    /* Tie groups mixing both sides: positives {0.9, 0.5, 0.5}, negatives {0.5, 0.1}:
     * pairs 1 + 1 + 0.5 + 1 + 0.5 + 1 = 5 of 6. */
    const float s4[] = {0.9f, 0.5f, 0.5f, 0.5f, 0.1f};
    const uint8_t p4[] = {1, 1, 1, 0, 0};
    EXPECT_CLOSE(metric_auroc(s4, 1, p4, 5), 5.0 / 6.0);
    /* No negatives: undefined. */
    const uint8_t p5[] = {1, 1, 1, 1};
    EXPECT_NAN(metric_auroc(s1, 1, p5, 4));
}

static void test_macro_auroc(void)
{
    /* 3 classes, class 2 has no sample: left out. Scores [n, 3].
     * class 0 positives {0.7, 0.6}, negatives {0.2, 0.6}: 1 + 1 + 1 + 0.5 = 3.5 / 4.
     * class 1 positives {0.5, 0.3}, negatives {0.2, 0.3}: 1 + 1 + 1 + 0.5 = 3.5 / 4. */
    const float scores[] = {
        0.7f, 0.2f, 0.1f,
        0.6f, 0.3f, 0.1f,
        0.2f, 0.5f, 0.3f,
        0.6f, 0.3f, 0.1f,
    };
    const int32_t label[] = {0, 0, 1, 1};
    EXPECT_CLOSE(metric_macro_auroc(scores, label, 4, 3), 0.875);
}

static void test_softmax_argmax(void)
{
    float logits[] = {1.0f, 3.0f, 3.0f, 0.0f, 0.0f, 0.0f};
    int32_t pred[2];
    metric_softmax_argmax(logits, 2, 3, pred);
    if (pred[0] != 1 || pred[1] != 0) {
        fprintf(stderr, "argmax: got %d %d, expected 1 0 (the first on ties)\n", pred[0], pred[1]);
        failures++;
    }
    const double e = exp(1.0), f = exp(3.0);
    EXPECT_CLOSE(logits[0], e / (e + 2 * f));
    EXPECT_CLOSE(logits[0] + logits[1] + logits[2], 1.0);
    EXPECT_CLOSE(logits[3], 1.0 / 3.0);
}

int main(void)
{
    test_accuracy();
    test_macro_f1();
    test_auroc();
    test_macro_auroc();
    test_softmax_argmax();
    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("metrics: all tests passed\n");
    return 0;
}
