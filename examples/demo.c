/*
 * confsmoe-demo: two experts learn a piecewise toy regression.
 *
 * Tokens x in R^4 with x[0] >= 0 go to expert 0, the others to expert 1 (a fixed
 * router written by the host). The target differs between the two halves, so each
 * expert must learn its own function. The host owns the loop: it gathers each
 * expert's tokens, runs forward and backward through the library, and steps Adam.
 */
#include <confsmoe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { D = 4, HIDDEN = 32, N_EXPERTS = 2, BATCH = 128, STEPS = 400 };

#define CHECK(call)                                                                                 \
    do {                                                                                            \
        confsmoe_status s_ = (call);                                                                \
        if (s_ != CONFSMOE_OK) {                                                                    \
            fprintf(stderr, "confsmoe-demo: %s failed: %s (%s)\n", #call, confsmoe_status_string(s_), \
                    confsmoe_ctx_last_error(ctx));                                                  \
            exit(1);                                                                                \
        }                                                                                           \
    } while (0)

/* The function to learn: a different smooth map on each side of x[0] = 0. */
static void target(const float *x, float *y)
{
    for (int j = 0; j < D; j++)
        y[j] = x[0] >= 0 ? sinf(2.0f * x[j]) + 0.5f * x[(j + 1) % D] : x[j] * x[j] - 0.5f;
}

static float uniform(unsigned *state)
{
    *state = *state * 1664525u + 1013904223u;
    return (float)(*state >> 8) / (float)(1u << 24) * 2.0f - 1.0f;
}

int main(void)
{
    confsmoe_ctx *ctx = NULL;
    confsmoe_ctx_params params;
    confsmoe_ctx_params_init(&params);
    params.seed = 42;
    CHECK(confsmoe_ctx_create(&params, &ctx));

    confsmoe_expert *experts[N_EXPERTS];
    confsmoe_optim_params op;
    confsmoe_optim_params_init(&op);
    op.lr = 3e-3f;
    confsmoe_optim *optim = NULL;
    CHECK(confsmoe_optim_create(ctx, &op, &optim));
    for (int e = 0; e < N_EXPERTS; e++) {
        CHECK(confsmoe_expert_create(ctx, D, HIDDEN, &experts[e]));
        for (int32_t i = 0; i < confsmoe_expert_n_params(experts[e]); i++)
            CHECK(confsmoe_optim_add(optim, confsmoe_expert_param(experts[e], i), confsmoe_expert_grad(experts[e], i)));
    }

    printf("confsmoe-demo: libconfsmoe %s, %d experts (d=%d, h=%d), Adam lr=%g, batch %d\n",
           confsmoe_version_string(), N_EXPERTS, D, HIDDEN, (double)op.lr, BATCH);
    unsigned rng = 7;
    float first_loss = 0.0f, loss = 0.0f;
    for (int step = 1; step <= STEPS; step++) {
        /* Draw a batch and split it by the host's router. */
        float xs[N_EXPERTS][BATCH * D], ys[N_EXPERTS][BATCH * D];
        int64_t count[N_EXPERTS] = {0, 0};
        for (int b = 0; b < BATCH; b++) {
            float x[D];
            for (int j = 0; j < D; j++)
                x[j] = uniform(&rng);
            int e = x[0] >= 0 ? 0 : 1;
            memcpy(&xs[e][count[e] * D], x, sizeof x);
            target(x, &ys[e][count[e] * D]);
            count[e]++;
        }
        double sum_sq = 0.0;
        for (int e = 0; e < N_EXPERTS; e++) {
            const int64_t dims[2] = {count[e], D};
            float pred[BATCH * D];
            confsmoe_tensor *x = NULL, *y = NULL;
            confsmoe_saved *saved = NULL;
            CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, xs[e], &x));
            CHECK(confsmoe_tensor_wrap(ctx, CONFSMOE_F32, 2, dims, pred, &y));
            confsmoe_expert_zero_grad(experts[e]);
            CHECK(confsmoe_expert_forward(experts[e], x, y, &saved));
            /* Mean squared error over the whole batch; its gradient goes into pred in place. */
            for (int64_t i = 0; i < count[e] * D; i++) {
                float diff = pred[i] - ys[e][i];
                sum_sq += (double)diff * diff;
                pred[i] = 2.0f * diff / (BATCH * D);
            }
            CHECK(confsmoe_expert_backward(experts[e], saved, y, NULL));
            confsmoe_saved_destroy(saved);
            confsmoe_tensor_destroy(x);
            confsmoe_tensor_destroy(y);
        }
        CHECK(confsmoe_optim_step(optim));
        loss = (float)(sum_sq / (BATCH * D));
        if (step == 1)
            first_loss = loss;
        if (step == 1 || step % 50 == 0)
            printf("step %4d  mse %.5f\n", step, (double)loss);
    }
    printf("mse fell from %.5f to %.5f (%.1fx lower)\n", (double)first_loss, (double)loss,
           (double)(first_loss / loss));

    confsmoe_optim_destroy(optim);
    for (int e = 0; e < N_EXPERTS; e++)
        confsmoe_expert_destroy(experts[e]);
    confsmoe_ctx_destroy(ctx);
    return loss < first_loss ? 0 : 1;
}
