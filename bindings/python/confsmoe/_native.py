"""Ownership of C handles, zero-copy numpy views, and array argument conversion.

Ownership model
---------------
Every C handle is held by a ``_Node`` with an explicit reference count:

* 1 for the Python object that owns it (Context, Tensor, Expert, ...), dropped by its
  ``close()`` or, failing that, by its ``weakref.finalize`` when it is garbage collected;
* 1 for every child node (a tensor holds its ctx, a gate its ctx and its experts, a saved
  handle its layer, an optimizer its ctx and the parameter tensors registered with it);
* 1 for every live numpy view of the handle's memory (the view's ``base`` pins the node).

The C destroy function runs when the count reaches zero, and only then is the count of each
parent dropped. A parent is therefore always destroyed after its children, whatever order
Python collects the objects in (cyclic garbage is finalised in an unspecified order, so the
order cannot come from the Python references alone).

``close()`` on a parent with live children or views closes the Python object (any further
use raises ClosedError) and defers the C destroy until the last child or view is gone. It
never frees memory that something still uses, and never closes the children behind your back.
"""
import ctypes
import threading
import weakref

import numpy as np

from . import _lib
from ._lib import api
from .errors import ClosedError, check

_lock = threading.RLock()

F32, I32, U8 = 0, 1, 2
DTYPES = {F32: np.dtype(np.float32), I32: np.dtype(np.int32), U8: np.dtype(np.uint8)}
CODES = {np.dtype(np.float32): F32, np.dtype(np.int32): I32, np.dtype(np.uint8): U8}
MAX_DIMS = 4


class _Node:
    __slots__ = ("handle", "destroy", "parents", "refs", "keep", "kind", "__weakref__")

    def __init__(self, handle, destroy, parents=(), keep=None, kind=""):
        self.handle = handle
        self.destroy = destroy
        self.refs = 1
        self.keep = keep
        self.kind = kind
        with _lock:
            for p in parents:
                p.incref()
        self.parents = tuple(parents)

    def incref(self):
        with _lock:
            if self.refs <= 0:
                raise ClosedError("the %s was already freed" % (self.kind or "object"))
            self.refs += 1

    def decref(self):
        with _lock:
            self.refs -= 1
            if self.refs > 0:
                return
            handle, self.handle = self.handle, None
            destroy, self.destroy = self.destroy, None
            if destroy is not None and handle:
                destroy(handle)
            self.keep = None
            parents, self.parents = self.parents, ()
            for p in parents:
                p.decref()

    def adopt(self, parent):
        """Add a parent after creation (an optimizer's registered tensors)."""
        with _lock:
            parent.incref()
            self.parents = self.parents + (parent,)

    @property
    def alive(self):
        return self.refs > 0


class NativeObject:
    """Base of the classes that own (or borrow) a C handle: close(), context manager, finaliser."""

    _kind = "object"

    def _init_node(self, handle, destroy, parents=(), keep=None):
        node = _Node(handle, destroy, [p for p in parents if p is not None], keep, self._kind)
        self._node = node
        self._finalizer = weakref.finalize(self, node.decref)

    @property
    def _h(self):
        """The live C handle; ClosedError once close() was called."""
        fin = self.__dict__.get("_finalizer")
        if fin is None or not fin.alive:
            raise ClosedError("%s is closed" % type(self).__name__)
        return self._node.handle

    @property
    def _ctxh(self):
        """The C handle of this object's ctx. Valid while this object is open, even when the
        Context object itself was closed: this object's node keeps the ctx alive."""
        self._h  # noqa: B018  (refuse a closed object)
        return self._ctx._node.handle

    @property
    def context(self):
        """The Context this object was created from."""
        return self._ctx

    @property
    def closed(self):
        fin = self.__dict__.get("_finalizer")
        return fin is None or not fin.alive

    def close(self):
        """Release this object. Idempotent. The C object is destroyed as soon as nothing that
        depends on it (children, numpy views) is left; until then only this Python object is closed."""
        fin = self.__dict__.get("_finalizer")
        if fin is not None:
            fin()

    def __enter__(self):
        self._h  # noqa: B018  (refuse a closed object)
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ----------------------------------------------------------------------------- zero-copy views


class _Pin:
    """The ``base`` of a numpy view over C memory: it keeps the owning node alive."""

    __slots__ = ("__array_interface__", "_fin", "__weakref__")

    def __init__(self, node, address, shape, dtype):
        node.incref()
        self._fin = weakref.finalize(self, node.decref)
        # At interpreter exit a view may outlive every finaliser: leave its memory to the OS.
        self._fin.atexit = False
        self.__array_interface__ = {
            "version": 3,
            "shape": tuple(int(s) for s in shape),
            "typestr": np.dtype(dtype).str,
            "data": (int(address), False),
        }


def view(node, address, shape, dtype):
    """A writable numpy array over ``address`` that keeps ``node`` (and its parents) alive."""
    shape = tuple(int(s) for s in shape)
    if not address or int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(shape, dtype)  # nothing to share: no memory, or no elements
    return np.asarray(_Pin(node, address, shape, dtype))


def tensor_shape(th):
    return tuple(int(api.tensor_dim(th, a)) for a in range(int(api.tensor_ndim(th))))


def tensor_view(node, th):
    """Zero-copy numpy view of the C tensor ``th`` whose memory is kept alive by ``node``."""
    dtype = DTYPES[int(api.tensor_dtype(th))]
    return view(node, api.tensor_data(th), tensor_shape(th), dtype)


# ----------------------------------------------------------------------------- arguments

_DT_NAMES = {F32: "float32", I32: "int32", U8: "uint8"}


def as_array(a, dtype, name, allow_copy=False, writable=False, ndim=None):
    """``a`` as a C-contiguous numpy array of ``dtype`` without copying when it already is one.

    A bool array is reinterpreted as uint8 (same bytes, no copy). Anything else (another dtype,
    a non-contiguous or unaligned array, a list, a torch tensor) is converted only with
    ``allow_copy=True``; otherwise TypeError (dtype) or ValueError (layout)."""
    dt = np.dtype(dtype)
    if isinstance(a, np.ndarray):
        arr = a
        if arr.dtype == np.bool_ and dt == np.uint8:
            arr = arr.view(np.uint8)
        ok_layout = arr.flags.c_contiguous and arr.flags.aligned
        if arr.dtype == dt and ok_layout and (arr.flags.writeable or not writable):
            out = arr
        elif not allow_copy:
            if arr.dtype != dt:
                raise TypeError("%s must be %s, got %s: convert it (e.g. np.asarray(%s, np.%s)) or pass "
                                "allow_copy=True" % (name, dt.name, arr.dtype, name, dt.name))
            if writable and not arr.flags.writeable:
                raise ValueError("%s must be writable (the library writes to it)" % name)
            raise ValueError("%s must be C-contiguous and aligned to be shared without a copy: use "
                             "np.ascontiguousarray(%s) or pass allow_copy=True" % (name, name))
        else:
            if writable:
                raise ValueError("%s is written in place by the library: it must already be a C-contiguous "
                                 "writable %s array" % (name, dt.name))
            out = _convert(arr, dt, name)
    else:
        # Only objects that expose their memory through the array interface are shared
        # (np.asarray of them is a view by protocol); lists, torch tensors, ... are converted.
        src = np.asarray(a) if hasattr(a, "__array_interface__") else None
        if src is not None and src.dtype == dt and src.flags.c_contiguous and src.flags.aligned \
                and (src.flags.writeable or not writable):
            out = src
        elif not allow_copy:
            raise TypeError("%s must be a C-contiguous numpy array of %s (got %s); pass allow_copy=True to "
                            "convert it" % (name, dt.name, type(a).__name__))
        else:
            if writable:
                raise TypeError("%s is written in place: pass a numpy %s array" % (name, dt.name))
            out = _convert(np.asarray(a) if src is None else src, dt, name)
    if ndim is not None and out.ndim not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError("%s must have %s dimensions, got shape %s" % (name, ndim, out.shape))
    if out.ndim < 1 or out.ndim > MAX_DIMS:
        raise ValueError("%s must have 1 to %d dimensions, got shape %s" % (name, MAX_DIMS, out.shape))
    return out


def _convert(arr, dt, name):
    if arr.dtype == np.bool_ and dt.kind in "uif":
        return np.ascontiguousarray(arr, dt)
    if not np.can_cast(arr.dtype, dt, casting="same_kind"):
        raise TypeError("%s: cannot convert %s to %s without losing its meaning" % (name, arr.dtype, dt.name))
    return np.ascontiguousarray(arr.astype(dt, casting="same_kind", copy=False))


class Scratch:
    """Temporary C tensors over numpy arrays for the duration of one call (``with Scratch(ctx) as s``)."""

    __slots__ = ("ctx", "handles", "arrays")

    def __init__(self, ctxh):
        self.ctx = ctxh  # a raw ctx handle (NativeObject._ctxh)
        self.handles = []
        self.arrays = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            api.tensor_destroy(h)
        self.handles.clear()
        self.arrays.clear()
        return False

    def wrap(self, arr):
        """A C tensor over a ready numpy array (see as_array)."""
        code = CODES[arr.dtype]
        dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        out = _lib.TensorHandle()
        data = arr.ctypes.data if arr.size else None
        ctxh = self.ctx
        check(api.tensor_wrap(ctxh, code, arr.ndim, dims, data, ctypes.byref(out)), ctxh, "tensor_wrap")
        self.handles.append(out)
        self.arrays.append(arr)
        return out

    def arg(self, a, dtype, name, allow_copy=False, writable=False, ndim=None):
        """A Tensor's own handle, or a temporary tensor over an array argument; None stays NULL."""
        if a is None:
            return None, None
        from .tensor import Tensor
        if isinstance(a, Tensor):
            return a._h, None  # a dtype or shape mismatch is reported by the library itself
        arr = as_array(a, dtype, name, allow_copy=allow_copy, writable=writable, ndim=ndim)
        return self.wrap(arr), arr

    def output(self, shape, dtype, out=None, name="out"):
        """A fresh (or the given) output array and its temporary tensor."""
        if out is None:
            arr = np.empty(shape, dtype)
        else:
            arr = as_array(out, dtype, name, writable=True)
            if arr.shape != tuple(shape):
                raise ValueError("%s has shape %s, expected %s" % (name, arr.shape, tuple(shape)))
        return self.wrap(arr), arr

