/* The model's task loss (loss.h): softmax cross-entropy, or binary cross-entropy per class. */
#include <math.h>

#include "kernels.h"
#include "loss.h"

float csm_task_loss(const float *logits, const void *labels, bool multilabel, int64_t B, int64_t global_B, int64_t C,
                    float *dlogits)
{
    const int64_t Bg = global_B;
    double total = 0.0;
    for (int64_t b = 0; b < B; b++) {
        const float *z = logits + b * C;
        float *dz = dlogits + b * C;
        if (multilabel) {
            const uint8_t *y = (const uint8_t *)labels + b * C;
            for (int64_t c = 0; c < C; c++) {
                total += fmaxf(z[c], 0.0f) - z[c] * y[c] + log1pf(expf(-fabsf(z[c])));
                dz[c] = (csm_sigmoid(z[c]) - y[c]) / (float)(Bg * C);
            }
            continue;
        }
        const int32_t y = ((const int32_t *)labels)[b];
        float top = z[0];
        for (int64_t c = 1; c < C; c++)
            top = fmaxf(top, z[c]);
        double sum = 0.0;
        for (int64_t c = 0; c < C; c++)
            sum += exp((double)(z[c] - top));
        total += log(sum) - (double)(z[y] - top);
        for (int64_t c = 0; c < C; c++)
            dz[c] = ((float)(exp((double)(z[c] - top)) / sum) - (c == y ? 1.0f : 0.0f)) / (float)Bg;
    }
    return (float)(total / (double)(multilabel ? Bg * C : Bg));
}
