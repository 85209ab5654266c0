"""confsmoe_ctx: allocator, seeded RNG, log callback and last-error text."""
import ctypes
import sys

from . import _lib
from ._lib import api
from ._native import NativeObject
from .errors import InvalidArgumentError, check

__all__ = ["Context", "LOG_ERROR", "LOG_WARN", "LOG_INFO", "LOG_DEBUG"]

LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG = 0, 1, 2, 3
_LOG_LEVELS = {"error": LOG_ERROR, "warn": LOG_WARN, "warning": LOG_WARN, "info": LOG_INFO, "debug": LOG_DEBUG}


def _make_log_fn(fn):
    def call(user, level, message):
        try:
            fn(int(level), (message or b"").decode("utf-8", "replace"))
        except Exception as e:  # never let an exception unwind through C
            print("confsmoe: exception in log_fn ignored: %r" % (e,), file=sys.stderr)
    return _lib.LogFn(call)


def _make_allocator(obj):
    def alloc(user, size, alignment):
        try:
            return int(obj.alloc(int(size), int(alignment)) or 0) or None
        except Exception as e:
            print("confsmoe: exception in allocator.alloc (treated as out of memory): %r" % (e,), file=sys.stderr)
            return None

    def free(user, ptr):
        try:
            obj.free(ptr)
        except Exception as e:
            print("confsmoe: exception in allocator.free ignored: %r" % (e,), file=sys.stderr)

    a = _lib.Allocator()
    a.alloc = _lib.AllocFn(alloc)
    a.free = _lib.FreeFn(free)
    a.user = None
    return a


class Context(NativeObject):
    """A libconfsmoe context: every other object is created from one.

    Context(seed=0, check_finite=True, log_level="warn", log_fn=None, allocator=None, threads=0)

    - seed: RNG seed for initialisation, noise, dropout and stage-1 draws.
    - check_finite: reject NaN/Inf inputs with NumericError (False: skip the scan).
    - log_fn: a callable (level: int, message: str), called with every error message
      up to log_level ("error", "warn", "info", "debug" or 0..3).
    - allocator: an object with alloc(size, alignment) -> address (0 for failure) and
      free(address); used for every allocation of this ctx. It must stay usable until the
      ctx is destroyed (the Context keeps a reference to it).
    - threads: the thread count of every object made from this Context, the calling thread
      included: the library's own threads, and above 1 BLIS's outside them too (1: none of the
      library's own, BLIS as BLIS_NUM_THREADS says; at most 64); 0 takes the environment
      variable CONFSMOE_NUM_THREADS, else 1. Results do not depend on it.

    Defaults are the C library's (confsmoe_ctx_params_init). A Context is used by one thread at
    a time; different Contexts may run concurrently.
    """

    _kind = "context"

    def __init__(self, *, seed=0, check_finite=True, log_level=LOG_WARN, log_fn=None, allocator=None, threads=0):
        p = _lib.CtxParams()
        api.ctx_params_init(ctypes.byref(p))
        p.seed = int(seed)
        p.check_finite = 1 if check_finite else 0
        if isinstance(log_level, str):
            try:
                log_level = _LOG_LEVELS[log_level.lower()]
            except KeyError:
                raise InvalidArgumentError("log_level must be one of %s" % sorted(_LOG_LEVELS)) from None
        p.log_level = int(log_level)
        if not 0 <= int(threads) <= 64:  # ctx_create has no ctx for a message: say it here
            raise InvalidArgumentError("threads must be in [0, 64], got %d" % int(threads))
        p.n_threads = int(threads)
        keep = []
        if log_fn is not None:
            if not callable(log_fn):
                raise TypeError("log_fn must be callable (level, message)")
            cb = _make_log_fn(log_fn)
            p.log_fn = cb
            keep += [cb, log_fn]
        if allocator is not None:
            a = _make_allocator(allocator)
            p.allocator = ctypes.pointer(a)
            keep += [a, allocator]
        h = _lib.CtxHandle()
        check(api.ctx_create(ctypes.byref(p), ctypes.byref(h)), None, "ctx_create")
        self._init_node(h, api.ctx_destroy, (), keep)
        self._ctx = self
        self._seed = int(seed)

    @property
    def _raw_handle(self):
        return self._node.handle

    @property
    def last_error(self):
        """confsmoe_ctx_last_error: detail of the last error on this ctx ("" if none)."""
        return (api.ctx_last_error(self._h) or b"").decode("utf-8", "replace")

    def set_seed(self, seed):
        """Restart the RNG stream: the same seed gives the same weights, noise and draws."""
        h = self._h
        check(api.ctx_set_seed(h, int(seed)), h, "ctx_set_seed")
        self._seed = int(seed)

    def trim(self):
        """confsmoe_ctx_trim: give the freed blocks kept for reuse back to the C library and
        forget the peak; returns the bytes given back (0 with a host allocator)."""
        return int(api.ctx_trim(self._h))

    # conveniences
    def tensor(self, shape, dtype="float32"):
        """A zeroed library-owned Tensor (confsmoe_tensor_create)."""
        from .tensor import Tensor
        return Tensor(self, shape, dtype)

    def wrap(self, array, copy=False, allow_copy=False):
        """A Tensor over a numpy array without copying (confsmoe_tensor_wrap)."""
        from .tensor import Tensor
        return Tensor.from_numpy(self, array, copy=copy, allow_copy=allow_copy)

    def __repr__(self):
        return "<confsmoe.Context%s>" % (" closed" if self.closed else " seed=%d" % self._seed)
