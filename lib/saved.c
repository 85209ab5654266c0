/* Saved state of one forward call: each layer embeds the header and frees its own payload. */
#include "internal.h"

void confsmoe_saved_destroy(confsmoe_saved *s)
{
    if (s)
        s->release(s);
}
