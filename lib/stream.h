/* The counter-based stream that lib/rng.c serves one value at a time and the dropout kernel
 * draws in vector lanes: output i of the stream with key `key` is mix64(key + i * golden). */
#ifndef CONFSMOE_STREAM_H
#define CONFSMOE_STREAM_H

#include <stdint.h>

/* The splitmix64 finaliser: a bijection with full avalanche. */
static inline uint64_t csm_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static inline uint64_t csm_stream_output(uint64_t key, uint64_t i)
{
    return csm_mix64(key + i * UINT64_C(0x9e3779b97f4a7c15));
}

#endif
