/* The experimental confsmoe_tensor_set_data and confsmoe_tensors_set_data: a tensor, or a
 * layer's parameters and gradients, moved to host memory. A gate whose every parameter and
 * gradient lives in one host buffer must compute exactly what an identical gate over its own
 * memory computes, follow later writes to that buffer, and accumulate its gradients there. */
#define CONFSMOE_EXPERIMENTAL
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static void assert_error_mentions(confsmoe_ctx *ctx, const char *w1, const char *w2)
{
    const char *m = confsmoe_ctx_last_error(ctx);
    ck_assert_msg(strstr(m, w1) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w1);
    ck_assert_msg(strstr(m, w2) != NULL, "last_error \"%s\" does not mention \"%s\"", m, w2);
}

START_TEST(test_set_data_moves_and_frees)
{
    test_alloc counter = {0};
    confsmoe_allocator holder;
    confsmoe_ctx *ctx = test_ctx_counted(&counter, &holder, 0);
    confsmoe_tensor *t = test_tensor(ctx, CONFSMOE_F32, 2, 3, 4, 0, 0);
    const long live_before = counter.live;
    float host[12];
    for (int i = 0; i < 12; i++)
        host[i] = (float)i;
    ck_assert_int_eq(confsmoe_tensor_set_data(t, host), CONFSMOE_OK);
    ck_assert_ptr_eq(confsmoe_tensor_data(t), host);
    ck_assert_int_eq(counter.live, live_before - 1); /* the library's block is freed */
    float out[12];
    ck_assert_int_eq(confsmoe_tensor_copy_out(t, out, sizeof out), CONFSMOE_OK);
    ck_assert_int_eq(memcmp(out, host, sizeof out), 0); /* the host's contents, as they were */
    /* Again, to other host memory: nothing of the library's is left to free. */
    float other[12] = {0};
    ck_assert_int_eq(confsmoe_tensor_set_data(t, other), CONFSMOE_OK);
    ck_assert_int_eq(counter.live, live_before - 1);
    ck_assert_int_eq(confsmoe_tensor_copy_in(t, host, sizeof host), CONFSMOE_OK);
    ck_assert_int_eq(memcmp(other, host, sizeof host), 0);
    confsmoe_tensor_destroy(t); /* does not touch the host's memory */
    other[11] = 5.0f;
    ck_assert_float_eq(other[11], 5.0f);
    confsmoe_ctx_destroy(ctx);
    ck_assert_int_eq(counter.live, 0);
}
END_TEST

START_TEST(test_set_data_errors_change_nothing)
{
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *t = test_tensor(ctx, CONFSMOE_F32, 1, 8, 0, 0, 0);
    fill_const(t, 2.0f);
    void *own = confsmoe_tensor_data(t);
    ck_assert_int_eq(confsmoe_tensor_set_data(NULL, own), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_tensor_set_data(t, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_set_data", "NULL");
    float host[9];
    ck_assert_int_eq(confsmoe_tensor_set_data(t, (char *)host + 1), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_set_data", "aligned");
    ck_assert_int_eq(confsmoe_tensor_set_data(t, (float *)own + 1), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensor_set_data", "own memory");
    ck_assert_ptr_eq(confsmoe_tensor_data(t), own);
    for (int i = 0; i < 8; i++)
        ck_assert_float_eq(f32(t)[i], 2.0f);
    ck_assert_int_eq(confsmoe_tensor_set_data(t, own), CONFSMOE_OK); /* its own memory: a no-op */
    ck_assert_ptr_eq(confsmoe_tensor_data(t), own);
    confsmoe_tensor *empty = test_tensor(ctx, CONFSMOE_U8, 1, 0, 0, 0, 0);
    ck_assert_int_eq(confsmoe_tensor_set_data(empty, NULL), CONFSMOE_OK);
    confsmoe_tensor_destroy(empty);
    confsmoe_tensor_destroy(t);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

START_TEST(test_tensors_set_data_all_or_nothing)
{
    confsmoe_ctx *ctx = test_ctx(0);
    confsmoe_tensor *t[3] = {test_tensor(ctx, CONFSMOE_F32, 1, 4, 0, 0, 0), test_tensor(ctx, CONFSMOE_U8, 1, 3, 0, 0, 0),
                             test_tensor(ctx, CONFSMOE_F32, 2, 2, 2, 0, 0)};
    void *own[3];
    for (int i = 0; i < 3; i++)
        own[i] = confsmoe_tensor_data(t[i]);
    float host[16];
    /* The u8 tensor at an odd offset is fine; the last f32 one at offset 18 is misaligned. */
    size_t offsets[3] = {0, 17, 18};
    ck_assert_int_eq(confsmoe_tensors_set_data(t, 3, host, offsets), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensors_set_data", "base + offsets[2]");
    for (int i = 0; i < 3; i++)
        ck_assert_ptr_eq(confsmoe_tensor_data(t[i]), own[i]); /* none moved */
    ck_assert_int_eq(confsmoe_tensors_set_data(t, 3, host, NULL), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensors_set_data", "offsets is NULL");
    confsmoe_tensor *with_null[2] = {t[0], NULL};
    ck_assert_int_eq(confsmoe_tensors_set_data(with_null, 2, host, offsets), CONFSMOE_E_INVALID_ARGUMENT);
    assert_error_mentions(ctx, "tensors_set_data", "tensors[1] is NULL");
    ck_assert_int_eq(confsmoe_tensors_set_data(t, 0, host, offsets), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_int_eq(confsmoe_tensors_set_data(NULL, 3, host, offsets), CONFSMOE_E_INVALID_ARGUMENT);
    ck_assert_ptr_eq(confsmoe_tensor_data(t[0]), own[0]);
    offsets[2] = 32;
    ck_assert_int_eq(confsmoe_tensors_set_data(t, 3, host, offsets), CONFSMOE_OK);
    ck_assert_ptr_eq(confsmoe_tensor_data(t[0]), (char *)host);
    ck_assert_ptr_eq(confsmoe_tensor_data(t[1]), (char *)host + 17);
    ck_assert_ptr_eq(confsmoe_tensor_data(t[2]), (char *)host + 32);
    for (int i = 0; i < 3; i++)
        confsmoe_tensor_destroy(t[i]);
    confsmoe_ctx_destroy(ctx);
}
END_TEST

enum { E = 3, K = 2, D = 6, H = 5, C = 4, N = 9 };

typedef struct {
    confsmoe_ctx *ctx;
    confsmoe_expert *experts[E];
    confsmoe_gate *gate;
} layer;

static void layer_open(layer *l)
{
    l->ctx = test_ctx(7);
    for (int e = 0; e < E; e++)
        ck_assert_int_eq(confsmoe_expert_create(l->ctx, D, H, &l->experts[e]), CONFSMOE_OK);
    confsmoe_gate_params p;
    confsmoe_gate_params_init(&p);
    p.d = D;
    p.k = K;
    p.n_classes = C;
    p.noisy = 1;
    p.router_grad = CONFSMOE_ROUTER_GRAD_SCORE;
    ck_assert_int_eq(confsmoe_gate_create(l->ctx, &p, l->experts, E, &l->gate), CONFSMOE_OK);
}

static void layer_close(layer *l)
{
    confsmoe_gate_destroy(l->gate);
    for (int e = 0; e < E; e++)
        confsmoe_expert_destroy(l->experts[e]);
    confsmoe_ctx_destroy(l->ctx);
}

/* Every (parameter, gradient) of the layer, experts first, into out (cap entries); the count. */
static int layer_tensors(layer *l, confsmoe_tensor **param, confsmoe_tensor **grad, int cap)
{
    int n = 0;
    for (int e = 0; e < E; e++)
        for (int32_t i = 0; i < confsmoe_expert_n_params(l->experts[e]) && n < cap; i++, n++) {
            param[n] = confsmoe_expert_param(l->experts[e], i);
            grad[n] = confsmoe_expert_grad(l->experts[e], i);
        }
    for (int32_t i = 0; i < confsmoe_gate_n_params(l->gate) && n < cap; i++, n++) {
        param[n] = confsmoe_gate_param(l->gate, i);
        grad[n] = confsmoe_gate_grad(l->gate, i);
    }
    return n;
}

/* One training call and its backward: y and dx into the given arrays. */
static void layer_step(layer *l, const float *x_in, const int32_t *labels_in, float *y_out, float *dx_out)
{
    confsmoe_ctx *ctx = l->ctx;
    confsmoe_ctx_set_seed(ctx, 11); /* the same noise in both layers */
    confsmoe_tensor *x = test_tensor(ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    confsmoe_tensor *labels = test_tensor(ctx, CONFSMOE_I32, 1, N, 0, 0, 0);
    confsmoe_tensor *y = test_tensor(ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    confsmoe_tensor *dx = test_tensor(ctx, CONFSMOE_F32, 2, N, D, 0, 0);
    memcpy(f32(x), x_in, sizeof(float) * N * D);
    memcpy(i32(labels), labels_in, sizeof(int32_t) * N);
    float loss = 0.0f;
    confsmoe_saved *saved = NULL;
    ck_assert_int_eq(confsmoe_gate_forward(l->gate, x, labels, NULL, y, NULL, NULL, &loss, &saved), CONFSMOE_OK);
    ck_assert_int_eq(confsmoe_gate_backward(l->gate, saved, y, NULL, 1.0f, dx), CONFSMOE_OK);
    memcpy(y_out, f32(y), sizeof(float) * N * D);
    memcpy(dx_out, f32(dx), sizeof(float) * N * D);
    confsmoe_saved_destroy(saved);
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(labels);
    confsmoe_tensor_destroy(y);
    confsmoe_tensor_destroy(dx);
}

START_TEST(test_gate_over_host_memory)
{
    enum { CAP = 64 };
    layer own, host;
    layer_open(&own);
    layer_open(&host); /* the same seed: the same initial weights */
    confsmoe_tensor *own_p[CAP], *own_g[CAP], *host_p[CAP], *host_g[CAP];
    const int n = layer_tensors(&own, own_p, own_g, CAP);
    ck_assert_int_eq(layer_tensors(&host, host_p, host_g, CAP), n);
    ck_assert_int_eq(n, 4 * E + 2 + 4 * E + 2); /* experts, router, noise, ConfNets, target */
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += confsmoe_tensor_nbytes(host_p[i]);
    /* One host block for every parameter (one call each) and one for every gradient (one call). */
    char *values = xcalloc(1, total), *grads = xcalloc(1, total);
    size_t at = 0, offsets[CAP];
    for (int i = 0; i < n; i++) {
        const size_t bytes = confsmoe_tensor_nbytes(host_p[i]);
        memcpy(values + at, confsmoe_tensor_data(host_p[i]), bytes);
        ck_assert_int_eq(confsmoe_tensor_set_data(host_p[i], values + at), CONFSMOE_OK);
        offsets[i] = at;
        at += bytes;
    }
    ck_assert_int_eq(confsmoe_tensors_set_data(host_g, n, grads, offsets), CONFSMOE_OK);
    trng r = {3};
    float x[N * D], y_own[N * D], y_host[N * D], dx_own[N * D], dx_host[N * D];
    int32_t labels[N];
    for (int i = 0; i < N * D; i++)
        x[i] = (float)trng_uniform(&r, -1.0, 1.0);
    for (int i = 0; i < N; i++)
        labels[i] = (int32_t)(trng_u64(&r) % C);
    for (int round = 0; round < 2; round++) {
        if (round == 1) {
            /* The host writes new weights into its buffer (every ConfNet's and the target's
             * included); the same values go into the other layer's own memory. */
            at = 0;
            for (int i = 0; i < n; i++) {
                float *v = (float *)(values + at);
                for (int64_t j = 0; j < confsmoe_tensor_numel(host_p[i]); j++) {
                    v[j] = v[j] * 1.5f + 0.01f * (float)(j % 7);
                    f32(own_p[i])[j] = v[j];
                }
                at += confsmoe_tensor_nbytes(host_p[i]);
            }
            confsmoe_gate_zero_grad(own.gate);
            memset(grads, 0, total);
            for (int e = 0; e < E; e++)
                confsmoe_expert_zero_grad(own.experts[e]);
        }
        layer_step(&own, x, labels, y_own, dx_own);
        layer_step(&host, x, labels, y_host, dx_host);
        ck_assert_int_eq(memcmp(y_own, y_host, sizeof y_own), 0);
        ck_assert_int_eq(memcmp(dx_own, dx_host, sizeof dx_own), 0);
        at = 0;
        float grad_abs = 0.0f;
        for (int i = 0; i < n; i++) {
            const size_t bytes = confsmoe_tensor_nbytes(own_g[i]);
            ck_assert_msg(memcmp(grads + at, confsmoe_tensor_data(own_g[i]), bytes) == 0,
                          "round %d: gradient %d differs", round, i);
            for (int64_t j = 0; j < confsmoe_tensor_numel(own_g[i]); j++)
                grad_abs += f32(own_g[i])[j] < 0 ? -f32(own_g[i])[j] : f32(own_g[i])[j];
            at += bytes;
        }
        ck_assert_float_gt(grad_abs, 0.0f); /* the comparison was not of zeros */
    }
    layer_close(&host);
    layer_close(&own);
    free(values);
    free(grads);
}
END_TEST

static Suite *set_data_suite(void)
{
    Suite *s = suite_create("tensor_set_data");
    TCase *tc = tcase_create("set_data");
    tcase_add_test(tc, test_set_data_moves_and_frees);
    tcase_add_test(tc, test_set_data_errors_change_nothing);
    tcase_add_test(tc, test_tensors_set_data_all_or_nothing);
    tcase_add_test(tc, test_gate_over_host_memory);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return test_run(set_data_suite()); }
