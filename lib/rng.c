/* Counter-based RNG: output i is a bijective mix of (key, i), so a stream is
 * reproducible from its seed and position alone. */
#include <math.h>

#include "internal.h"
#include "kernels.h"
#include "stream.h"

static float uniform_of(uint64_t r, float lo, float hi)
{
    float u = (float)(r >> 40) * 0x1.0p-24f;  /* 24 random bits in [0, 1) */
    return lo + (hi - lo) * u;
}

void csm_rng_seed(confsmoe_ctx *ctx, uint64_t seed)
{
    ctx->rng_key = csm_mix64(seed ^ UINT64_C(0x6a09e667f3bcc909));
    ctx->rng_counter = 0;
}

uint64_t csm_rng_tell(const confsmoe_ctx *ctx) { return ctx->rng_counter; }

void csm_rng_seek(confsmoe_ctx *ctx, uint64_t position) { ctx->rng_counter = position; }

uint64_t csm_rng_reserve(confsmoe_ctx *ctx, uint64_t n)
{
    const uint64_t base = ctx->rng_counter;
    ctx->rng_counter += n;
    return base;
}

uint64_t csm_rng_u64(confsmoe_ctx *ctx) { return csm_stream_output(ctx->rng_key, ctx->rng_counter++); }

float csm_rng_uniform(confsmoe_ctx *ctx, float lo, float hi) { return uniform_of(csm_rng_u64(ctx), lo, hi); }

csm_substream csm_rng_at(const confsmoe_ctx *ctx, uint64_t position)
{
    return (csm_substream){ctx->rng_key, position};
}

void csm_rng_dropout_mask(const confsmoe_ctx *ctx, uint64_t position, float p, uint8_t *keep, int64_t n)
{
    csm_dropout_mask(ctx->rng_key, position, p, keep, n);
}

csm_substream csm_rng_substream(const confsmoe_ctx *ctx, uint64_t base, uint64_t index)
{
    /* The key mixes the stream's own output at `base` with the index: two (base, index)
     * pairs share a key only by a 64-bit collision. */
    const uint64_t salt = csm_mix64(index ^ UINT64_C(0xbb67ae8584caa73b));
    return (csm_substream){csm_mix64(csm_stream_output(ctx->rng_key, base) ^ salt), 0};
}

uint64_t csm_substream_u64(csm_substream *s) { return csm_stream_output(s->key, s->counter++); }

float csm_substream_uniform(csm_substream *s, float lo, float hi) { return uniform_of(csm_substream_u64(s), lo, hi); }

float csm_substream_normal(csm_substream *s)
{
    /* Box-Muller in double; u1 is in (0, 1] so the log is finite. */
    double u1 = ((double)(csm_substream_u64(s) >> 11) + 1.0) * 0x1.0p-53;
    double u2 = (double)(csm_substream_u64(s) >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}
