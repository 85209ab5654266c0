"""The C side of one ``confsmoe.torch.MoELayer``: its ctx, experts and gate, and the raw calls
that run them on torch tensors. Private to the PyTorch bridge (torch_bridge.py).

Memory. The C parameters and gradients are moved into torch memory with the experimental
``confsmoe_tensors_set_data`` (one call per group). The parameters live in one flat float32
buffer: the layer's Parameter ``flat`` itself when it is a contiguous float32 CPU tensor,
otherwise a buffer of ours that each call refreshes from ``flat``. Each parameter starts at a
multiple of 16 floats (64 bytes) of the buffer; the padding stays 0. The gradients live in a
scratch buffer between calls; each backward points them at a fresh zeroed buffer, lets the C
backward accumulate there, points them back, and hands that buffer to autograd as it is.

Calls. The hot path makes no numpy arrays and no Python objects with finalizers: the C tensors
that describe a call's inputs and outputs are kept per role and shape and re-pointed at each
call's torch tensors with one ``confsmoe_tensor_set_data``.

Saved handles. A training forward's saved handle is held by a ``SavedCall`` (destroyed when it
is garbage collected, or by backward). The custom operator path cannot carry Python objects
through the graph, so there the handle waits in the layer under an integer call id, with at most
``PENDING_CAP`` waiting per layer: a backward whose handle is gone (consumed by an earlier
backward of the same graph, or evicted) recomputes the training forward from its saved inputs,
with the same noise seed.
"""
import collections
import ctypes
import itertools
import weakref

import torch

from . import _lib
from ._lib import api
from ._native import tensor_shape
from .context import Context
from .errors import check
from .expert import Expert
from .gate import Gate

ALIGN = 16  # floats: parameters start on 64-byte boundaries of the flat buffer
PENDING_CAP = 16

_F32, _I32, _U8 = 0, 1, 2
_gate_forward = api.gate_forward.c_function
_gate_backward = api.gate_backward.c_function
_saved_destroy = api.saved_destroy.c_function
_set_data = api.tensor_set_data.c_function
_set_many = api.tensors_set_data.c_function
_ctx_set_seed = api.ctx_set_seed.c_function

#: id -> Native of every live layer (the custom operator names its layer by this id).
registry = weakref.WeakValueDictionary()
_ids = itertools.count(1)


def lookup(layer_id):
    native = registry.get(layer_id)
    if native is None:
        raise RuntimeError("confsmoe MoELayer #%d no longer exists in this process (a graph or exported "
                           "program runs only while the MoELayer it was made from is alive)" % layer_id)
    return native


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: it fits a torch int64


class SavedCall:
    """One training forward's saved handle; destroyed by backward or with this object."""

    __slots__ = ("handle",)

    def __init__(self, handle):
        self.handle = handle

    def take(self):
        h, self.handle = self.handle, None
        return h

    def __del__(self, _destroy=_saved_destroy):
        if self.handle:
            _destroy(self.handle)


class _Group:
    """C tensors pointed together into one flat buffer, at fixed offsets (in floats)."""

    __slots__ = ("ctxh", "n", "handles", "offsets")

    def __init__(self, ctxh, handles, offsets):
        self.ctxh = ctxh
        self.n = len(handles)
        self.handles = (_lib.TensorHandle * self.n)(*handles)
        self.offsets = (ctypes.c_size_t * self.n)(*[4 * off for off in offsets])

    def point(self, base):
        status = _set_many(self.handles, self.n, base, self.offsets)
        if status:
            check(status, self.ctxh, "tensors_set_data")


class _Headers:
    """C tensors over torch memory, one per role, re-pointed at every call (destroyed with it)."""

    def __init__(self, ctxh):
        self.ctxh = ctxh
        self.by_role = {}
        weakref.finalize(self, _Headers._destroy_all, self.by_role)

    @staticmethod
    def _destroy_all(by_role):
        for handle, _ in by_role.values():
            api.tensor_destroy(handle)
        by_role.clear()

    def point(self, role, code, shape, address):
        entry = self.by_role.get(role)
        if entry is not None and entry[1] == shape:
            status = _set_data(entry[0], address or None)
            if status:
                check(status, self.ctxh, "tensor_set_data")
            return entry[0]
        if entry is not None:
            api.tensor_destroy(entry[0])
            del self.by_role[role]
        handle = _lib.TensorHandle()
        dims = (ctypes.c_int64 * len(shape))(*shape)
        check(api.tensor_wrap(self.ctxh, code, len(shape), dims, address or None, ctypes.byref(handle)),
              self.ctxh, "tensor_wrap")
        self.by_role[role] = (handle, shape)
        return handle


_float32, _int32 = torch.float32, torch.int32


def _f32_cpu(t):
    """t as a contiguous float32 CPU tensor (t itself when it already is one)."""
    if t.dtype is not _float32 or not t.is_cpu:
        return t.detach().to(device="cpu", dtype=_float32).contiguous()
    return t if t.is_contiguous() else t.contiguous()


class Native:
    """The libconfsmoe objects of one MoELayer and its calls.

    spec: the MoELayer's construction arguments (d, n_experts, k, hidden, seed, gate_options)."""

    def __init__(self, spec, ctx=None):
        self.spec = spec
        self.ctx = ctx if ctx is not None else Context(seed=spec["seed"])
        self.experts = [Expert(self.ctx, spec["d"], spec["hidden"]) for _ in range(spec["n_experts"])]
        self.gate = Gate(self.ctx, self.experts, k=spec["k"], **spec["gate_options"])
        opts = self.gate.options
        self.d, self.k = int(spec["d"]), int(opts["k"])
        self.n_classes = int(opts["n_classes"])
        self.confidence = opts["combine"] == 1
        self.multi_label = opts["target"] == 1
        self.noisy = bool(opts["noisy"])
        self.ctxh = self.ctx._h
        # (name, shape, offset) of every parameter in the flat buffer, experts first.
        self.layout = []
        self._param_handles, grad_handles, offsets = [], [], []
        offset = 0
        named = [("expert.%d." % i, e, api.expert_param, api.expert_grad) for i, e in enumerate(self.experts)]
        named.append(("gate.", self.gate, api.gate_param, api.gate_grad))
        for prefix, layer, param, grad in named:
            h = layer._h
            for i, name in enumerate(layer.param_names()):
                ph = param(h, i)
                shape = tensor_shape(ph)
                self.layout.append((prefix + name, shape, offset))
                self._param_handles.append(ph)
                grad_handles.append(grad(h, i))
                offsets.append(offset)
                offset += -(-_numel(shape) // ALIGN) * ALIGN
        self.numel = offset
        self.offsets = {name: (shape, off) for name, shape, off in self.layout}
        self._params = _Group(self.ctxh, self._param_handles, offsets)
        self._grads = _Group(self.ctxh, grad_handles, offsets)
        # Between backward calls the C gradients live here (each backward points them at a fresh
        # buffer, which becomes the gradient autograd receives).
        self.scratch = torch.zeros(self.numel, dtype=torch.float32, device="cpu")
        self._grads.point(self.scratch.data_ptr())
        self.values = None  # the float32 tensor the C parameters live in
        self.values_ptr = -1  # no flat address equals it
        self._own = None    # our buffer, for a flat Parameter that cannot be shared
        self._twin = None   # the noise-free gate of eval-mode calls that keep the graph
        self.headers = _Headers(self.ctxh)
        self.pending = collections.OrderedDict()  # call id -> SavedCall (custom operator path)
        self._calls = itertools.count(1)
        self.noise_calls = 0  # training forwards drawn so far (the noise stream's position)
        self._topk = None  # int32 [N, k] of the last call
        self.last_gate = self.gate
        self.id = next(_ids)
        registry[self.id] = self

    # ------------------------------------------------------------------ parameter memory

    def initial_values(self, out):
        """Copy the C parameters (the C init from the ctx seed, until bound) into the flat ``out``."""
        for (name, shape, off), ph in zip(self.layout, self._param_handles):
            n = _numel(shape)
            if n:
                check(api.tensor_copy_out(ph, out[off:off + n].data_ptr(), 4 * n), self.ctxh, "tensor_copy_out")

    def bind(self, values):
        """Move the C parameters into ``values`` (a contiguous float32 CPU tensor of numel)."""
        base = values.data_ptr()
        self._params.point(base)
        if self._twin is not None:
            self._twin[1].point(base)
        self.values = values
        self.values_ptr = values.data_ptr()

    def prepare(self, flat):
        """Make the C parameters hold the values of ``flat``: shared when it can be, else copied."""
        if flat.data_ptr() == self.values_ptr and flat.dtype is _float32 and flat.is_contiguous():
            return
        if flat.device.type == "meta":
            raise RuntimeError("MoELayer: its parameters are on the meta device: load them first "
                               "(load_state_dict(..., assign=True), or to_empty(device='cpu') and a load)")
        if flat.numel() != self.numel:
            raise RuntimeError("MoELayer: flat has %d elements, the layer's parameters take %d"
                               % (flat.numel(), self.numel))
        if flat.dtype is _float32 and flat.is_cpu and flat.is_contiguous():
            self.bind(flat.detach())
            return
        if self._own is None:
            self._own = torch.empty(self.numel, dtype=torch.float32, device="cpu")
        if self.values_ptr != self._own.data_ptr():
            self.bind(self._own)
        self._own.copy_(flat.detach().reshape(-1))

    def twin(self):
        """The gate's noise-free twin over the same experts and parameter memory: an eval-mode
        call that keeps the graph runs its training forward (which is the inference function
        without noise) with no token present in the confidence loss."""
        if self._twin is None:
            opts = dict(self.spec["gate_options"], noisy=False)
            gate = Gate(self.ctx, self.experts, k=self.spec["k"], **opts)
            h = gate._h
            offsets = [self.offsets["gate." + name][1] for name in gate.param_names()]
            params = _Group(self.ctxh, [api.gate_param(h, i) for i in range(len(offsets))], offsets)
            # its gradients: the experts' (shared) and its own
            n_expert = sum(1 for name, _, _ in self.layout if name.startswith("expert."))
            expert_grads = list(self._grads.handles)[:n_expert]
            expert_offsets = [off for _, _, off in self.layout[:n_expert]]
            grads = _Group(self.ctxh, expert_grads + [api.gate_grad(h, i) for i in range(len(offsets))],
                           expert_offsets + offsets)
            grads.point(self.scratch.data_ptr())
            self._twin = (gate, params, grads)
            if self.values is not None:
                params.point(self.values_ptr)
        return self._twin[0]

    # ------------------------------------------------------------------ calls

    def draw_seed(self):
        """The noise seed of the next training forward: the layer seed's stream at its position."""
        self.noise_calls += 1
        return _splitmix64(self.spec["seed"] ^ _splitmix64(self.noise_calls))

    def forward(self, x, flat, labels, present, train, keep, seed=None):
        """y [N, d] float32, the aux loss and the SavedCall (None unless keep) of one call on x [N, d].

        train: the gate's training forward (noise, labels, loss); keep: a graph will be
        differentiated, so keep the saved handle (in eval mode: run the noise-free twin)."""
        if flat.data_ptr() != self.values_ptr or flat.dtype is not _float32 or not flat.is_contiguous():
            self.prepare(flat)
        xc = _f32_cpu(x)
        n = xc.shape[0]
        hd = self.headers
        y = torch.empty((n, self.d), dtype=_float32, device="cpu")
        xt = hd.point("x", _F32, (n, self.d), xc.data_ptr())
        yt = hd.point("y", _F32, (n, self.d), y.data_ptr())
        topk = self._topk
        if topk is None or topk.shape[0] != n:  # one buffer while N stays: its C tensor stays too
            topk = self._topk = torch.empty((n, self.k), dtype=torch.int32, device="cpu")
            hd.point("topk", _I32, (n, self.k), topk.data_ptr())
        tt = hd.by_role["topk"][0]
        lt = pt = None
        gate = self.gate
        if train:
            if self.noisy:
                if seed is None:
                    seed = self.draw_seed()
                check(_ctx_set_seed(self.ctxh, seed), self.ctxh, "ctx_set_seed")
            if labels is not None and self.confidence:
                if self.multi_label:
                    lab = self._labels_u8(labels)
                elif labels.dtype is not _int32 or not labels.is_cpu:
                    lab = labels.to(device="cpu", dtype=_int32)
                else:
                    lab = labels
                if not lab.is_contiguous():
                    lab = lab.contiguous()
                lt = hd.point("labels", _U8 if self.multi_label else _I32, tuple(lab.shape), lab.data_ptr())
            if present is not None:
                pres = present.to(device="cpu", dtype=torch.uint8).contiguous()
                pt = hd.point("present", _U8, (n,), pres.data_ptr())
        elif keep:
            gate = self.twin()
            if self.confidence:
                lab = torch.zeros((n, self.n_classes) if self.multi_label else (n,),
                                  dtype=torch.uint8 if self.multi_label else _int32, device="cpu")
                lt = hd.point("labels", _U8 if self.multi_label else _I32, tuple(lab.shape), lab.data_ptr())
                pres = torch.zeros(n, dtype=torch.uint8, device="cpu")
                pt = hd.point("present", _U8, (n,), pres.data_ptr())
        loss = ctypes.c_float(0.0)
        saved = _lib.SavedHandle()
        status = _gate_forward(gate._h, xt, lt, pt, yt, tt, None, ctypes.byref(loss),
                               ctypes.byref(saved) if (train or keep) else None)
        if status:
            check(status, self.ctxh, "gate_forward")
        self.last_gate = gate
        call = SavedCall(saved) if keep and saved else None  # without a graph the handle goes now
        if saved and not keep:
            _saved_destroy(saved)
        return y, (loss.value if train else 0.0), call, seed

    @staticmethod
    def _labels_u8(labels):
        if labels.dtype.is_floating_point and not ((labels == 0) | (labels == 1)).all():
            raise ValueError("MoELayer: multi-label labels must be 0 or 1")
        return labels.to(device="cpu", dtype=torch.uint8)

    def backward(self, call, dy, dloss, need_dx, x, flat, labels, present, train, seed):
        """(dx [N, d] float32 or None, the flat parameter gradient float32) of one call.

        call: its SavedCall, or None to recompute the forward from x, labels, present, seed."""
        handle = call.take() if call is not None else None
        if handle is None:
            _, _, call, _ = self.forward(x, flat, labels, present, train, True, seed)
            handle = call.take()
        elif flat.data_ptr() != self.values_ptr or flat.dtype is not _float32 or not flat.is_contiguous():
            self.prepare(flat)
        gate, grads = (self.gate, self._grads) if train else (self._twin[0], self._twin[2])
        try:
            n = x.shape[0]
            hd = self.headers
            dyc = _f32_cpu(dy) if dy is not None else torch.zeros((n, self.d), dtype=_float32, device="cpu")
            dyt = hd.point("dy", _F32, (n, self.d), dyc.data_ptr())
            dx = dxt = None
            if need_dx:
                dx = torch.empty((n, self.d), dtype=_float32, device="cpu")
                dxt = hd.point("dx", _F32, (n, self.d), dx.data_ptr())
            # A fresh zeroed buffer for the C gradients to accumulate into: it is handed to autograd
            # as it is (no copy), and the C gradients go back to the scratch buffer.
            grad = torch.zeros(self.numel, dtype=_float32, device="cpu")
            grads.point(grad.data_ptr())
            status = _gate_backward(gate._h, handle, dyt, None, dloss if train else 0.0, dxt)
            if status:
                check(status, self.ctxh, "gate_backward")
        finally:
            grads.point(self.scratch.data_ptr())
            _saved_destroy(handle)
        return dx, grad

    # ------------------------------------------------------------------ custom operator path

    def park(self, call):
        """Keep a SavedCall under a new call id until its backward; returns the id."""
        cid = next(self._calls)
        self.pending[cid] = call
        while len(self.pending) > PENDING_CAP:
            self.pending.popitem(last=False)
        return cid

    def unpark(self, cid):
        return self.pending.pop(cid, None)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
