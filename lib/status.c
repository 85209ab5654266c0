/* Status text and the library's version. */
#include "internal.h"

/* Each CONFSMOE_<NAME> macro holds the value its CONFSMOE_STATUS_MAP entry pins. */
#define STATUS_PINNED(name, value, text) \
    _Static_assert(CONFSMOE_##name == (value), "CONFSMOE_" #name " differs from CONFSMOE_STATUS_MAP");
CONFSMOE_STATUS_MAP(STATUS_PINNED)
#undef STATUS_PINNED

const char *confsmoe_status_string(confsmoe_status s)
{
    switch (s) {
#define STATUS_TEXT(name, value, text) \
    case CONFSMOE_##name: return text;
        CONFSMOE_STATUS_MAP(STATUS_TEXT)
#undef STATUS_TEXT
    default: return "unknown status";
    }
}

uint32_t confsmoe_version_number(void) { return CONFSMOE_VERSION_NUMBER; }

const char *confsmoe_version_string(void) { return CONFSMOE_VERSION_STRING; }
