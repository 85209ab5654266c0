/* Private: one allocation for many buffers, laid out in two passes by the same calls.
 *
 * A layer writes its layout once, as a function that takes each part in turn:
 *
 *     static void *thing_parts(csm_layout *l, thing *t)
 *     {
 *         void *header = CSM_LAYOUT_ARRAY(l, thing, 1);
 *         t->x = CSM_LAYOUT_ROWS(l, float, n, d);
 *         t->idx = CSM_LAYOUT_ARRAY(l, int32_t, n);
 *         return header;
 *     }
 *
 * and runs it twice: first over a measuring layout (every part is NULL; the layout sums the
 * block's size and notes an overflow), then, with the block allocated, over the same layout
 * placed on it (every part is its address in the block). Each part starts at a CSM_ALIGN
 * boundary; a part of 0 elements takes no room (its address is where the next part starts).
 * Adding a buffer is one line. */
#ifndef CONFSMOE_LAYOUT_H
#define CONFSMOE_LAYOUT_H

#include "internal.h"

typedef struct {
    char *base;     /* NULL while measuring */
    size_t size;    /* bytes taken so far */
    bool overflow;  /* a part's size, or the total, does not fit in size_t */
} csm_layout;

static inline csm_layout csm_layout_measure(void) { return (csm_layout){NULL, 0, false}; }

/* After a measuring pass: false when it overflowed; else *bytes is the block's size. */
static inline bool csm_layout_size(const csm_layout *l, size_t *bytes)
{
    *bytes = l->size;
    return !l->overflow;
}

/* Starts the second pass over `block`, which holds at least the measured size. */
static inline void csm_layout_place(csm_layout *l, void *block)
{
    l->base = block;
    l->size = 0;
}

/* The next part: rows * cols elements of elem bytes. */
static inline void *csm_layout_take(csm_layout *l, size_t rows, size_t cols, size_t elem)
{
    size_t count, bytes;
    if (l->overflow || !csm_mul_size(rows, cols, &count) || !csm_mul_size(count, elem, &bytes) ||
        bytes > SIZE_MAX - CSM_ALIGN || l->size > SIZE_MAX - CSM_ALIGN - bytes) {
        l->overflow = true;
        return NULL;
    }
    void *part = l->base ? l->base + l->size : NULL;
    l->size += (bytes + CSM_ALIGN - 1) & ~(size_t)(CSM_ALIGN - 1);
    return part;
}

/* count elements of type; rows x cols elements of type. */
#define CSM_LAYOUT_ARRAY(l, type, count) ((type *)csm_layout_take((l), (count), 1, sizeof(type)))
#define CSM_LAYOUT_ROWS(l, type, rows, cols) ((type *)csm_layout_take((l), (rows), (cols), sizeof(type)))

#endif /* CONFSMOE_LAYOUT_H */
