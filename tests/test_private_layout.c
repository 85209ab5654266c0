/* The two-pass layout builder (lib/layout.h), called directly: one parts function run over a
 * measuring layout and then over a placed one, against offsets and a total worked out by hand
 * from the rule in the header (each part rounded up to CSM_ALIGN = 64 bytes, in call order,
 * 0 elements take no room), and the overflow report. */
#include <stdint.h>

#include "layout.h"
#include "testutil.h"

/* The fixed example, with each part's bytes and its room rounded up to 64 by hand:
 *   a   float   [3, 5]   60 bytes -> 64     at 0
 *   e   int32_t [0]       0 bytes -> 0      at 64
 *   b   double  [10]     80 bytes -> 128    at 64
 *   c   uint8_t [1]       1 byte  -> 64     at 192
 *   m   float   [7, 9]  252 bytes -> 256    at 256
 * total 512. */
enum { EXAMPLE_PARTS = 5, EXAMPLE_BYTES = 512 };
static const size_t EXAMPLE_OFFSET[EXAMPLE_PARTS] = {0, 64, 64, 192, 256};
static const size_t EXAMPLE_SIZE[EXAMPLE_PARTS] = {60, 0, 80, 1, 252};

typedef struct {
    float *a;
    int32_t *e;
    double *b;
    uint8_t *c;
    float *m;
} example_parts_t;

/* The layout, written once and run for both passes, as lib/ layers do. */
static void example_parts(csm_layout *l, example_parts_t *p)
{
    p->a = CSM_LAYOUT_ROWS(l, float, 3, 5);
    p->e = CSM_LAYOUT_ARRAY(l, int32_t, 0);
    p->b = CSM_LAYOUT_ARRAY(l, double, 10);
    p->c = CSM_LAYOUT_ARRAY(l, uint8_t, 1);
    p->m = CSM_LAYOUT_ROWS(l, float, 7, 9);
}

static void example_addresses(const example_parts_t *p, char *out[EXAMPLE_PARTS])
{
    out[0] = (char *)p->a;
    out[1] = (char *)p->e;
    out[2] = (char *)p->b;
    out[3] = (char *)p->c;
    out[4] = (char *)p->m;
}

START_TEST(test_layout_measure_then_place)
{
    csm_layout l = csm_layout_measure();
    example_parts_t p;
    example_parts(&l, &p);
    char *measured[EXAMPLE_PARTS];
    example_addresses(&p, measured);
    for (int i = 0; i < EXAMPLE_PARTS; i++)
        ck_assert_ptr_null(measured[i]);
    size_t bytes = 0;
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_uint_eq(bytes, EXAMPLE_BYTES);

    char *block = aligned_alloc(CSM_ALIGN, bytes);
    ck_assert_ptr_nonnull(block);
    csm_layout_place(&l, block);
    example_parts(&l, &p);
    char *placed[EXAMPLE_PARTS];
    example_addresses(&p, placed);
    for (int i = 0; i < EXAMPLE_PARTS; i++) {
        ck_assert_ptr_eq(placed[i], block + EXAMPLE_OFFSET[i]);
        ck_assert_uint_eq((uintptr_t)placed[i] % 64, 0);
        /* In call order, and each ends at or before the next begins. */
        if (i > 0)
            ck_assert(placed[i - 1] + EXAMPLE_SIZE[i - 1] <= placed[i]);
        ck_assert(placed[i] + EXAMPLE_SIZE[i] <= block + bytes);
        /* Every byte is the block's (valgrind reports a write outside it). */
        memset(placed[i], 0xA5, EXAMPLE_SIZE[i]);
    }
    /* The placed pass takes exactly what the measuring pass counted. */
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_uint_eq(bytes, EXAMPLE_BYTES);
    free(block);
}
END_TEST

START_TEST(test_layout_zero_parts_take_no_room)
{
    csm_layout l = csm_layout_measure();
    ck_assert_ptr_null(csm_layout_take(&l, 0, 100, 4));
    ck_assert_ptr_null(csm_layout_take(&l, 100, 0, 4));
    ck_assert_ptr_null(csm_layout_take(&l, 3, 3, 0));
    size_t bytes = 1;
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_uint_eq(bytes, 0);

    /* Placed: an empty part sits where the next part starts. */
    _Alignas(64) static char block[128];
    csm_layout_place(&l, block);
    char *first = csm_layout_take(&l, 1, 1, 1);
    char *empty = csm_layout_take(&l, 0, 5, 8);
    char *next = csm_layout_take(&l, 2, 2, 2);
    ck_assert_ptr_eq(first, block);
    ck_assert_ptr_eq(empty, block + 64);
    ck_assert_ptr_eq(next, block + 64);
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_uint_eq(bytes, 128);
}
END_TEST

/* After an overflow, csm_layout_size is false and every later part is NULL. */
static void check_overflowed(csm_layout *l)
{
    size_t bytes;
    ck_assert(!csm_layout_size(l, &bytes));
    ck_assert_ptr_null(csm_layout_take(l, 1, 1, 1));
    ck_assert_ptr_null(CSM_LAYOUT_ARRAY(l, float, 4));
    ck_assert(!csm_layout_size(l, &bytes));
}

START_TEST(test_layout_overflow_of_a_part)
{
    /* rows * cols past SIZE_MAX. */
    csm_layout l = csm_layout_measure();
    ck_assert_ptr_null(csm_layout_take(&l, SIZE_MAX / 2, 3, 1));
    check_overflowed(&l);

    /* rows * cols fits, times the element size does not: 2^62 floats. */
    l = csm_layout_measure();
    ck_assert_ptr_null(CSM_LAYOUT_ROWS(&l, float, (size_t)1 << 31, (size_t)1 << 31));
    check_overflowed(&l);

    /* A part that fits in size_t but not once rounded up to 64. */
    l = csm_layout_measure();
    ck_assert_ptr_null(csm_layout_take(&l, SIZE_MAX - 10, 1, 1));
    check_overflowed(&l);
}
END_TEST

START_TEST(test_layout_overflow_of_the_total)
{
    /* 2^63 - 1 bytes round up to 2^63; a second part of 2^63 bytes passes SIZE_MAX. */
    csm_layout l = csm_layout_measure();
    size_t bytes = 0;
    ck_assert_ptr_null(csm_layout_take(&l, SIZE_MAX / 2, 1, 1));
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_uint_eq(bytes, (SIZE_MAX / 2) + 1);
    ck_assert_ptr_null(csm_layout_take(&l, (SIZE_MAX / 2) + 1, 1, 1));
    check_overflowed(&l);

    /* Three parts each of which fits alone. */
    l = csm_layout_measure();
    const size_t third = SIZE_MAX / 3;
    ck_assert_ptr_null(csm_layout_take(&l, third, 1, 1));
    ck_assert_ptr_null(csm_layout_take(&l, third, 1, 1));
    ck_assert(csm_layout_size(&l, &bytes));
    ck_assert_ptr_null(csm_layout_take(&l, third, 1, 1));
    check_overflowed(&l);

    /* In a placed pass too, the overflowing part and the ones after it are NULL. */
    _Alignas(64) static char block[64];
    l = csm_layout_measure();
    csm_layout_place(&l, block);
    ck_assert_ptr_eq(csm_layout_take(&l, 1, 1, 1), block);
    ck_assert_ptr_null(csm_layout_take(&l, SIZE_MAX - 64, 1, 1));
    check_overflowed(&l);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("private_layout");
    TCase *tc = tcase_create("layout");
    tcase_add_test(tc, test_layout_measure_then_place);
    tcase_add_test(tc, test_layout_zero_parts_take_no_room);
    tcase_add_test(tc, test_layout_overflow_of_a_part);
    tcase_add_test(tc, test_layout_overflow_of_the_total);
    suite_add_tcase(s, tc);
    return test_run(s);
}
