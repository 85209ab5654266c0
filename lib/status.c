/* Status text and the library's version. */
#include "internal.h"

const char *confsmoe_status_string(confsmoe_status s)
{
    switch (s) {
    case CONFSMOE_OK: return "ok";
    case CONFSMOE_E_INVALID_ARGUMENT: return "invalid argument";
    case CONFSMOE_E_SHAPE: return "shape mismatch";
    case CONFSMOE_E_DTYPE: return "wrong dtype";
    case CONFSMOE_E_NOMEM: return "out of memory";
    case CONFSMOE_E_STATE: return "invalid state";
    case CONFSMOE_E_UNSUPPORTED: return "unsupported";
    case CONFSMOE_E_NUMERIC: return "non-finite value";
    case CONFSMOE_E_VERSION: return "version mismatch";
    case CONFSMOE_E_INTERNAL: return "internal error";
    case CONFSMOE_E_IO: return "i/o error";
    case CONFSMOE_E_FORMAT: return "bad file format";
    case CONFSMOE_E_COMM: return "communication error";
    default: return "unknown status";
    }
}

uint32_t confsmoe_version_number(void) { return CONFSMOE_VERSION_NUMBER; }

const char *confsmoe_version_string(void) { return CONFSMOE_VERSION_STRING; }
