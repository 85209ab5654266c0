/* One public header on its own (CONFSMOE_TEST_HEADER, e.g. <confsmoe.h>), compiled as
 * C99, C11 and C++17 (confsmoe.hpp as C++17 only) with -pedantic -Werror by
 * tests/abi/meson.build. It is included twice to check its include guard; the function
 * keeps the unit from being empty, which -pedantic rejects in C. Where the header brings
 * CONFSMOE_STATUS_MAP, the function expands it, as a user of the X-macro would. */
#include CONFSMOE_TEST_HEADER
#include CONFSMOE_TEST_HEADER

int confsmoe_header_alone(void);
#ifdef CONFSMOE_STATUS_MAP
#define HEADER_ALONE_STATUS(name, value, text) {CONFSMOE_##name, value, text},
int confsmoe_header_alone(void)
{
    static const struct {
        int macro, value;
        const char *text;
    } statuses[] = {CONFSMOE_STATUS_MAP(HEADER_ALONE_STATUS)};
    return (int)(sizeof statuses / sizeof statuses[0]);
}
#else
int confsmoe_header_alone(void) { return 0; }
#endif
