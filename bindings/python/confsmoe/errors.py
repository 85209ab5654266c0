"""Statuses as exceptions: one class per confsmoe_status, under ConfSMoEError.

Each class also derives from the closest built-in exception, so generic handlers work too
(``except ValueError`` catches a ShapeError, ``except OSError`` a FileIOError, ...).
The exception carries the status (``.status``), its static text (``.status_text``), the
function that failed (``.function``) and the ctx's ``confsmoe_ctx_last_error`` (``.detail``).
The constants and classes follow CONFSMOE_STATUS_MAP of include/confsmoe.h, which
tests/abi/check_constants.py compares them with.
"""
import ctypes

from ._lib import api

__all__ = [
    "ConfSMoEError", "InvalidArgumentError", "ShapeError", "DTypeError", "OutOfMemoryError",
    "StateError", "UnsupportedError", "NumericError", "VersionError", "InternalError",
    "FileIOError", "FormatError", "CommunicationError", "ClosedError", "error_class", "check",
    "OK", "E_INVALID_ARGUMENT", "E_SHAPE", "E_DTYPE", "E_NOMEM", "E_STATE", "E_UNSUPPORTED",
    "E_NUMERIC", "E_VERSION", "E_INTERNAL", "E_IO", "E_FORMAT", "E_COMM",
]

OK = 0
E_INVALID_ARGUMENT = -1
E_SHAPE = -2
E_DTYPE = -3
E_NOMEM = -4
E_STATE = -5
E_UNSUPPORTED = -6
E_NUMERIC = -7
E_VERSION = -8
E_INTERNAL = -9
E_IO = -10
E_FORMAT = -11
E_COMM = -12


class ConfSMoEError(Exception):
    """A libconfsmoe call failed. ``status`` is the negative confsmoe_status."""

    status = None

    def __init__(self, message, status=None, function=None, detail=""):
        super().__init__(message)
        if status is not None:
            self.status = status
        self.function = function
        self.detail = detail

    @property
    def status_text(self):
        return api.status_string(self.status if self.status is not None else 1).decode()


class InvalidArgumentError(ConfSMoEError, ValueError):
    """CONFSMOE_E_INVALID_ARGUMENT: NULL pointer, value out of range, handle from the wrong object."""
    status = E_INVALID_ARGUMENT


class ShapeError(ConfSMoEError, ValueError):
    """CONFSMOE_E_SHAPE: dimensions do not fit together."""
    status = E_SHAPE


class DTypeError(ConfSMoEError, TypeError):
    """CONFSMOE_E_DTYPE: wrong element type."""
    status = E_DTYPE


class OutOfMemoryError(ConfSMoEError, MemoryError):
    """CONFSMOE_E_NOMEM: an allocation failed, or a size overflows."""
    status = E_NOMEM


class StateError(ConfSMoEError, RuntimeError):
    """CONFSMOE_E_STATE: call out of order (e.g. backward twice on one saved handle)."""
    status = E_STATE


class ClosedError(StateError, ValueError):
    """Raised by the bindings (not the C library) when a closed object is used."""


class UnsupportedError(ConfSMoEError, NotImplementedError):
    """CONFSMOE_E_UNSUPPORTED: a valid request this build cannot do."""
    status = E_UNSUPPORTED


class NumericError(ConfSMoEError, ArithmeticError):
    """CONFSMOE_E_NUMERIC: NaN or Inf in an input, with finite checks on."""
    status = E_NUMERIC


class VersionError(ConfSMoEError, RuntimeError):
    """CONFSMOE_E_VERSION: options struct of another size (a header/library mismatch)."""
    status = E_VERSION


class InternalError(ConfSMoEError, RuntimeError):
    """CONFSMOE_E_INTERNAL: a bug in libconfsmoe; please report it."""
    status = E_INTERNAL


class FileIOError(ConfSMoEError, OSError):
    """CONFSMOE_E_IO: a file could not be opened, read or written."""
    status = E_IO


class FormatError(ConfSMoEError, ValueError):
    """CONFSMOE_E_FORMAT: a file is truncated, corrupted or does not match the model."""
    status = E_FORMAT


class CommunicationError(ConfSMoEError, OSError):
    """CONFSMOE_E_COMM: a message or collective of a distributed run failed."""
    status = E_COMM


_BY_STATUS = {cls.status: cls for cls in (
    InvalidArgumentError, ShapeError, DTypeError, OutOfMemoryError, StateError, UnsupportedError,
    NumericError, VersionError, InternalError, FileIOError, FormatError, CommunicationError)}


def error_class(status):
    """The exception class of a negative status (ConfSMoEError for an unknown one)."""
    return _BY_STATUS.get(int(status), ConfSMoEError)


def make_error(status, function=None, ctx_handle=None):
    status = int(status)
    text = api.status_string(status).decode()
    detail = ""
    if ctx_handle:
        detail = (api.ctx_last_error(ctx_handle) or b"").decode("utf-8", "replace")
    if detail:  # the library's detail already names the function ("gate_forward: x has ...")
        message = "%s [%s, status %d]" % (detail, text, status)
    else:
        message = "%s%s (status %d)" % ("%s: " % function if function else "", text, status)
    cls = error_class(status)
    return cls(message, status=status, function=function, detail=detail)


def check(status, ctx=None, function=None):
    """Raise the exception of a failed status; return None for CONFSMOE_OK.

    ``ctx`` is a Context, a raw ctx handle or None; its last_error becomes the detail.
    """
    if status == OK:
        return
    handle = ctx
    if ctx is not None and not isinstance(ctx, ctypes._Pointer):
        handle = getattr(ctx, "_raw_handle", None)
    raise make_error(status, function, handle)
