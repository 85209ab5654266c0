/* One public header on its own (CONFSMOE_TEST_HEADER, e.g. <confsmoe.h>), compiled as
 * C99, C11 and C++17 (confsmoe.hpp as C++17 only) with -pedantic -Werror by
 * tests/abi/meson.build. It is included twice to check its include guard; the function
 * keeps the unit from being empty, which -pedantic rejects in C. */
#include CONFSMOE_TEST_HEADER
#include CONFSMOE_TEST_HEADER

int confsmoe_header_alone(void);
int confsmoe_header_alone(void) { return 0; }
