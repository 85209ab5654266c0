/* A stand-in for libconfsmoe's confsmoe_version_number, loaded first with LD_PRELOAD and
 * exported in the same version node (fake_version.map), so that every caller sees it: it
 * reports the next minor release, as a newer libconfsmoe installed beside this
 * libconfsmoe_mpi would. */
#include "confsmoe.h"

CONFSMOE_API uint32_t confsmoe_version_number(void) { return CONFSMOE_VERSION_NUMBER + 100; }
