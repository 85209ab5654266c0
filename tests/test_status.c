/* Status codes, their texts, and the library version. */
#include <stdio.h>
#include <string.h>

#include "confsmoe.h"
#include "testutil.h"

/* The documented status values, with the numbers the header pins (the ABI promise). */
static const struct {
    confsmoe_status status;
    int32_t pinned;
} statuses[] = {
    {CONFSMOE_OK, 0},
    {CONFSMOE_E_INVALID_ARGUMENT, -1},
    {CONFSMOE_E_SHAPE, -2},
    {CONFSMOE_E_DTYPE, -3},
    {CONFSMOE_E_NOMEM, -4},
    {CONFSMOE_E_STATE, -5},
    {CONFSMOE_E_UNSUPPORTED, -6},
    {CONFSMOE_E_NUMERIC, -7},
    {CONFSMOE_E_VERSION, -8},
    {CONFSMOE_E_INTERNAL, -9},
    {CONFSMOE_E_IO, -10},
    {CONFSMOE_E_FORMAT, -11},
    {CONFSMOE_E_COMM, -12},
};
#define N_STATUSES ((int)(sizeof statuses / sizeof statuses[0]))

START_TEST(test_status_values_pinned)
{
    ck_assert_int_eq(CONFSMOE_OK, 0);
    ck_assert_int_eq(CONFSMOE_E_INVALID_ARGUMENT, -1);
    ck_assert_int_eq(CONFSMOE_E_SHAPE, -2);
    ck_assert_int_eq(CONFSMOE_E_DTYPE, -3);
    ck_assert_int_eq(CONFSMOE_E_NOMEM, -4);
    ck_assert_int_eq(CONFSMOE_E_STATE, -5);
    ck_assert_int_eq(CONFSMOE_E_UNSUPPORTED, -6);
    ck_assert_int_eq(CONFSMOE_E_NUMERIC, -7);
    ck_assert_int_eq(CONFSMOE_E_VERSION, -8);
    ck_assert_int_eq(CONFSMOE_E_INTERNAL, -9);
    ck_assert_int_eq(CONFSMOE_E_IO, -10);
    ck_assert_int_eq(CONFSMOE_E_FORMAT, -11);
    ck_assert_int_eq(CONFSMOE_E_COMM, -12);
    /* The status type is a 32-bit signed integer. */
    ck_assert_uint_eq(sizeof(confsmoe_status), 4);
    ck_assert_int_lt((confsmoe_status)-1, 0);
}
END_TEST

START_TEST(test_status_string_known)
{
    for (int i = 0; i < N_STATUSES; i++) {
        const char *s = confsmoe_status_string(statuses[i].status);
        ck_assert_ptr_nonnull(s);
        ck_assert_msg(s[0] != '\0', "status %d has an empty text", (int)statuses[i].status);
        ck_assert_msg(strcmp(s, "unknown status") != 0, "status %d is described as unknown", (int)statuses[i].pinned);
        /* Static text: the same pointer contents every time. */
        ck_assert_str_eq(confsmoe_status_string(statuses[i].status), s);
    }
}
END_TEST

START_TEST(test_status_string_specific_words)
{
    /* Each text says what it is about. */
    ck_assert_str_eq(confsmoe_status_string(CONFSMOE_OK), "ok");
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_INVALID_ARGUMENT), "argument"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_SHAPE), "shape"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_DTYPE), "dtype"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_NOMEM), "memory"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_STATE), "state"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_UNSUPPORTED), "unsupported"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_NUMERIC), "finite"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_VERSION), "version"));
    ck_assert_ptr_nonnull(strstr(confsmoe_status_string(CONFSMOE_E_INTERNAL), "internal"));
}
END_TEST

START_TEST(test_status_string_distinct)
{
    for (int i = 0; i < N_STATUSES; i++)
        for (int j = i + 1; j < N_STATUSES; j++)
            ck_assert_msg(strcmp(confsmoe_status_string(statuses[i].status),
                                 confsmoe_status_string(statuses[j].status)) != 0,
                          "statuses %d and %d share the text \"%s\"", (int)statuses[i].pinned,
                          (int)statuses[j].pinned, confsmoe_status_string(statuses[i].status));
}
END_TEST

START_TEST(test_status_string_unknown)
{
    const confsmoe_status unknown[] = {1, 2, 100, -13, -14, -100, INT32_MAX, INT32_MIN};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        const char *s = confsmoe_status_string(unknown[i]);
        ck_assert_ptr_nonnull(s);
        ck_assert_str_eq(s, "unknown status");
        /* Never the text of a real status. */
        for (int j = 0; j < N_STATUSES; j++)
            ck_assert_str_ne(s, confsmoe_status_string(statuses[j].status));
    }
}
END_TEST

START_TEST(test_version_number_macro)
{
    ck_assert_uint_eq(confsmoe_version_number(), (uint32_t)CONFSMOE_VERSION_NUMBER);
    ck_assert_uint_eq(confsmoe_version_number(),
                      (uint32_t)(CONFSMOE_VERSION_MAJOR * 10000 + CONFSMOE_VERSION_MINOR * 100 + CONFSMOE_VERSION_PATCH));
    /* Each part fits its two decimal digits, or the encoding would be ambiguous. */
    ck_assert_int_ge(CONFSMOE_VERSION_MINOR, 0);
    ck_assert_int_lt(CONFSMOE_VERSION_MINOR, 100);
    ck_assert_int_ge(CONFSMOE_VERSION_PATCH, 0);
    ck_assert_int_lt(CONFSMOE_VERSION_PATCH, 100);
    ck_assert_int_ge(CONFSMOE_VERSION_MAJOR, 0);
}
END_TEST

START_TEST(test_version_project)
{
    /* meson.build declares version 0.3.0. */
    ck_assert_int_eq(CONFSMOE_VERSION_MAJOR, 0);
    ck_assert_int_eq(CONFSMOE_VERSION_MINOR, 3);
    ck_assert_int_eq(CONFSMOE_VERSION_PATCH, 0);
    ck_assert_uint_eq(confsmoe_version_number(), 300);
    ck_assert_str_eq(confsmoe_version_string(), "0.3.0");
}
END_TEST

START_TEST(test_version_string_macro)
{
    const char *v = confsmoe_version_string();
    ck_assert_ptr_nonnull(v);
    ck_assert_str_eq(v, CONFSMOE_VERSION_STRING);
}
END_TEST

START_TEST(test_version_string_parses)
{
    const char *v = confsmoe_version_string();
    ck_assert_ptr_nonnull(v);
    unsigned major = 1000, minor = 1000, patch = 1000;
    int consumed = -1;
    ck_assert_int_eq(sscanf(v, "%u.%u.%u%n", &major, &minor, &patch, &consumed), 3);
    /* Nothing after PATCH. */
    ck_assert_int_eq(consumed, (int)strlen(v));
    ck_assert_uint_eq(major, CONFSMOE_VERSION_MAJOR);
    ck_assert_uint_eq(minor, CONFSMOE_VERSION_MINOR);
    ck_assert_uint_eq(patch, CONFSMOE_VERSION_PATCH);
    ck_assert_uint_eq(major * 10000 + minor * 100 + patch, confsmoe_version_number());
}
END_TEST

static Suite *status_suite(void)
{
    Suite *s = suite_create("status");
    TCase *tc = tcase_create("status");
    tcase_add_test(tc, test_status_values_pinned);
    tcase_add_test(tc, test_status_string_known);
    tcase_add_test(tc, test_status_string_specific_words);
    tcase_add_test(tc, test_status_string_distinct);
    tcase_add_test(tc, test_status_string_unknown);
    suite_add_tcase(s, tc);
    TCase *tv = tcase_create("version");
    tcase_add_test(tv, test_version_number_macro);
    tcase_add_test(tv, test_version_project);
    tcase_add_test(tv, test_version_string_macro);
    tcase_add_test(tv, test_version_string_parses);
    suite_add_tcase(s, tv);
    return s;
}

int main(void) { return test_run(status_suite()); }
