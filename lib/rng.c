/* Counter-based RNG: output i is a bijective mix of (key, i), so a stream is
 * reproducible from its seed and position alone. */
#include <math.h>

#include "internal.h"

static uint64_t mix64(uint64_t z)
{
    /* The splitmix64 finaliser: a bijection with full avalanche. */
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

void csm_rng_seed(confsmoe_ctx *ctx, uint64_t seed)
{
    ctx->rng_key = mix64(seed ^ UINT64_C(0x6a09e667f3bcc909));
    ctx->rng_counter = 0;
}

uint64_t csm_rng_u64(confsmoe_ctx *ctx)
{
    uint64_t i = ctx->rng_counter++;
    return mix64(ctx->rng_key + i * UINT64_C(0x9e3779b97f4a7c15));
}

float csm_rng_uniform(confsmoe_ctx *ctx, float lo, float hi)
{
    float u = (float)(csm_rng_u64(ctx) >> 40) * 0x1.0p-24f;  /* 24 random bits in [0, 1) */
    return lo + (hi - lo) * u;
}

float csm_rng_normal(confsmoe_ctx *ctx)
{
    /* Box-Muller in double; u1 is in (0, 1] so the log is finite. */
    double u1 = ((double)(csm_rng_u64(ctx) >> 11) + 1.0) * 0x1.0p-53;
    double u2 = (double)(csm_rng_u64(ctx) >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
