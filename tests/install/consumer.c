/* A downstream C program, built against the installed tree with pkg-config only. */
#include <confsmoe.h>
#include <stdio.h>

int main(void)
{
    if (confsmoe_version_number() != CONFSMOE_VERSION_NUMBER) {
        fprintf(stderr, "header %s, library %s\n", CONFSMOE_VERSION_STRING, confsmoe_version_string());
        return 1;
    }
    confsmoe_ctx *ctx = NULL;
    confsmoe_expert *expert = NULL;
    confsmoe_tensor *x = NULL, *y = NULL;
    const int64_t dims[2] = {3, 8};
    int ok = confsmoe_ctx_create(NULL, &ctx) == CONFSMOE_OK &&
             confsmoe_expert_create(ctx, 8, 16, &expert) == CONFSMOE_OK &&
             confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &x) == CONFSMOE_OK &&
             confsmoe_tensor_create(ctx, CONFSMOE_F32, 2, dims, &y) == CONFSMOE_OK &&
             confsmoe_expert_forward(expert, x, y, NULL) == CONFSMOE_OK;
    /* A bad call must come back as a status, not take the process down. */
    int bad = confsmoe_expert_forward(expert, y, x, NULL) == CONFSMOE_OK &&
              confsmoe_expert_create(ctx, 0, 4, &(confsmoe_expert *){NULL}) == CONFSMOE_E_SHAPE;
    printf("consumer (C): libconfsmoe %s, forward %s, error path %s: %s\n", confsmoe_version_string(),
           ok ? "ok" : "failed", bad ? "ok" : "failed", confsmoe_ctx_last_error(ctx));
    confsmoe_tensor_destroy(x);
    confsmoe_tensor_destroy(y);
    confsmoe_expert_destroy(expert);
    confsmoe_ctx_destroy(ctx);
    return ok && bad ? 0 : 1;
}
