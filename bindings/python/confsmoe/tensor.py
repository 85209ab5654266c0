"""confsmoe_tensor: dense row-major f32 / i32 / u8 arrays, owned by the library or wrapping numpy memory."""
import ctypes

import numpy as np

from . import _lib
from ._lib import api
from ._native import CODES, DTYPES, NativeObject, as_array, tensor_shape, tensor_view
from .errors import check

__all__ = ["Tensor", "F32", "I32", "U8"]

F32, I32, U8 = 0, 1, 2


def _dtype_code(dtype):
    if isinstance(dtype, int) and dtype in DTYPES:
        return dtype
    try:
        return CODES[np.dtype(dtype)]
    except (TypeError, KeyError):
        raise TypeError("dtype must be float32, int32 or uint8, got %r" % (dtype,)) from None


def _target_dtype(dt):
    """The libconfsmoe dtype an array of numpy dtype ``dt`` maps to (possibly after conversion)."""
    if dt in CODES:
        return dt
    if dt == np.bool_:
        return np.dtype(np.uint8)
    if dt.kind == "f":
        return np.dtype(np.float32)
    if dt.kind in "iu":
        return np.dtype(np.int32)
    raise TypeError("dtype %s has no libconfsmoe equivalent (float32, int32, uint8)" % dt)


class Tensor(NativeObject):
    """A libconfsmoe tensor.

    Tensor(ctx, shape, dtype="float32")   a zeroed, 64-byte aligned tensor owned by the library
    Tensor.from_numpy(ctx, array)         a tensor over the array's memory (no copy; the tensor
                                          keeps the array alive)

    ``t.numpy()`` (or ``np.asarray(t)``) is a zero-copy view of the tensor's memory: writes through
    it are seen by the library and the other way round. The view keeps the tensor's memory alive,
    even after ``t.close()``.
    """

    _kind = "tensor"

    def __init__(self, ctx, shape, dtype="float32"):
        code = _dtype_code(dtype)
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        h = _lib.TensorHandle()
        ctxh = ctx._h
        check(api.tensor_create(ctxh, code, len(shape), dims, ctypes.byref(h)), ctxh, "tensor_create")
        self._ctx = ctx
        self._init_node(h, api.tensor_destroy, (ctx._node,))

    @classmethod
    def from_numpy(cls, ctx, array, copy=False, allow_copy=False):
        """Wrap a float32 / int32 / uint8 (or bool, seen as uint8) C-contiguous, writable array
        without copying (confsmoe_tensor_wrap); the tensor keeps the array alive.

        copy=True: a library-owned copy instead (confsmoe_tensor_create + copy_in).
        allow_copy=True: another dtype (float64 -> float32, int64 -> int32, ...) or layout is
        converted to a new array first, and that array is wrapped. Without it such an array is
        refused with TypeError (dtype) or ValueError (layout)."""
        if not isinstance(array, np.ndarray):
            if not (allow_copy or copy):
                raise TypeError("Tensor.from_numpy needs a numpy array (got %s); pass allow_copy=True to "
                                "convert it" % type(array).__name__)
            array = np.asarray(array)
        dtype = _target_dtype(array.dtype)
        if copy:
            arr = as_array(array, dtype, "array", allow_copy=True)
            t = cls(ctx, arr.shape, arr.dtype)
            t.copy_in(arr)
            return t
        arr = as_array(array, dtype, "array", allow_copy=allow_copy, writable=not allow_copy)
        if not arr.flags.writeable:  # only with allow_copy: the library may write to a wrapped tensor
            arr = arr.copy()
        self = cls.__new__(cls)
        dims = (ctypes.c_int64 * max(arr.ndim, 1))(*arr.shape)
        h = _lib.TensorHandle()
        ctxh = ctx._h
        data = arr.ctypes.data if arr.size else None
        check(api.tensor_wrap(ctxh, CODES[arr.dtype], arr.ndim, dims, data, ctypes.byref(h)), ctxh, "tensor_wrap")
        self._ctx = ctx
        self._init_node(h, api.tensor_destroy, (ctx._node,), keep=arr)
        return self

    @classmethod
    def _borrow(cls, ctx, handle, owner):
        """A tensor owned by a layer (a parameter or a gradient): not destroyed here; it keeps
        its owner alive."""
        self = cls.__new__(cls)
        self._ctx = ctx
        self._init_node(handle, None, (owner._node,))
        return self

    # ----------------------------------------------------------------- properties

    @property
    def dtype_code(self):
        return int(api.tensor_dtype(self._h))

    @property
    def dtype(self):
        """The numpy dtype (float32, int32 or uint8)."""
        return DTYPES[self.dtype_code]

    @property
    def shape(self):
        return tensor_shape(self._h)

    @property
    def ndim(self):
        return int(api.tensor_ndim(self._h))

    @property
    def numel(self):
        return int(api.tensor_numel(self._h))

    @property
    def size(self):
        return self.numel

    @property
    def nbytes(self):
        return int(api.tensor_nbytes(self._h))

    @property
    def data_ptr(self):
        """Address of the first element (None for a tensor without elements)."""
        return api.tensor_data(self._h)

    def __len__(self):
        return self.shape[0]

    # ----------------------------------------------------------------- data

    def numpy(self):
        """A zero-copy numpy view (writable) that keeps the tensor's memory alive."""
        return tensor_view(self._node, self._h)

    def __array__(self, dtype=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def copy_in(self, array, allow_copy=False):
        """Copy exactly nbytes from a C-contiguous array of the tensor's dtype (confsmoe_tensor_copy_in)."""
        h = self._h
        src = as_array(array, self.dtype, "array", allow_copy=allow_copy)
        check(api.tensor_copy_in(h, src.ctypes.data if src.size else None, src.nbytes), self._ctxh,
              "tensor_copy_in")

    def copy_out(self, out=None):
        """A new array (or ``out``) with a copy of the tensor (confsmoe_tensor_copy_out)."""
        h = self._h
        if out is None:
            out = np.empty(self.shape, self.dtype)
        else:
            out = as_array(out, self.dtype, "out", writable=True)
        check(api.tensor_copy_out(h, out.ctypes.data if out.size else None, out.nbytes), self._ctxh,
              "tensor_copy_out")
        return out

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Tensor closed>"
        return "<confsmoe.Tensor shape=%s dtype=%s>" % (self.shape, self.dtype.name)

