"""confsmoe_gate: router -> top-k -> batched experts -> confidence or router-softmax combination."""
import collections
import ctypes

import numpy as np

from . import _lib, _params
from ._layer import Layer
from ._lib import api
from ._native import Scratch
from .errors import check

__all__ = ["Gate", "GateOutput", "STATS_LAST_CALL", "STATS_TOTAL"]

STATS_LAST_CALL, STATS_TOTAL = 0, 1
_SCOPES = {"last": STATS_LAST_CALL, "last_call": STATS_LAST_CALL, "total": STATS_TOTAL}

#: What Gate.forward returns. topk i32 [N, k]; slots f32 [N, k, d] (None unless asked for);
#: loss the gate's auxiliary loss (0 at inference); saved the handle for backward (train only).
GateOutput = collections.namedtuple("GateOutput", ["y", "topk", "slots", "loss", "saved"])


class Gate(Layer):
    """Gate(ctx, experts, **options): one sparse MoE layer over borrowed experts.

    Options are the fields of confsmoe_gate_params, with the C defaults (docs/GATES.md):
    d (default: the experts' d), k=2, router="softmax"|"gaussian"|"laplacian", noisy=False,
    combine="confidence"|"router_softmax", confidence="token"|"expert", n_classes (required
    under confidence), target="single_label"|"multi_label", detach_target=False,
    router_grad="frozen"|"trainable"|"score", load_loss="none"|"cv"|"entropy",
    load_loss_weight=0.01, conf_loss_weight=1.0, compat=False. Unknown names: TypeError.

    The gate keeps its experts (and its Context) alive; they are destroyed after it.
    """

    _kind = "gate"
    _prefix = "gate"

    def __init__(self, ctx, experts, **options):
        from .expert import Expert
        experts = tuple(experts)
        for e in experts:
            if not isinstance(e, Expert):
                raise TypeError("experts must be Expert objects, got %s" % type(e).__name__)
        if "d" not in options and experts:
            options["d"] = experts[0].d
        p = _params.fill(_lib.GateParams, api.gate_params_init, options, "Gate")
        arr = (_lib.ExpertHandle * max(len(experts), 1))(*[e._h for e in experts])
        out = _lib.GateHandle()
        ctxh = ctx._h
        check(api.gate_create(ctxh, ctypes.byref(p), arr, len(experts), ctypes.byref(out)), ctxh, "gate_create")
        self._ctx = ctx
        self._experts = experts
        self._options = _params.struct_dict(p)
        self._init_node(out, api.gate_destroy, (ctx._node,) + tuple(e._node for e in experts))

    @classmethod
    def _borrow(cls, owner, handle):
        """A gate owned by another object (a Model's): not destroyed here; keeps the owner alive."""
        self = cls.__new__(cls)
        self._ctx = owner._ctx
        self._experts = None
        self._options = None
        self._init_node(handle, None, (owner._node,))
        return self

    @property
    def experts(self):
        """The experts given at creation (None for a model's gate)."""
        return self._experts

    @property
    def options(self):
        """The confsmoe_gate_params it was created with, as a dict (None for a model's gate)."""
        return dict(self._options) if self._options is not None else None

    @property
    def n_experts(self):
        return int(api.gate_n_experts(self._h))

    @property
    def k(self):
        return int(api.gate_k(self._h))

    @property
    def d(self):
        if self._options is not None:
            return int(self._options["d"])
        d = self.__dict__.get("_d")
        if d is None:  # a model's gate: the router is [d, E]
            names = self.param_names()
            d = self._d = int(self.parameters()[names.index("router.w")].value.shape[0])
        return d

    def forward(self, x, labels=None, present=None, train=False, slots=False, out=None, allow_copy=False):
        """One MoE call over x [N, d] float32 -> GateOutput(y, topk, slots, loss, saved).

        labels: int32 [N] (single label) or uint8/bool [N, C] (multi label); needed with train=True
        under the confidence combination. present: uint8/bool [N], tokens whose slots count in the
        confidence loss (None: all). slots=True also returns each slot's expert output [N, k, d].
        train=True runs in training mode (noise on) and returns the Saved handle for backward."""
        h = self._h
        ctxh = self._ctxh
        d = self.d
        k = int(api.gate_k(h))
        with Scratch(ctxh) as s:
            xt, xa = s.arg(x, np.float32, "x", allow_copy)
            n = (xa if xa is not None else x).shape[0]
            lt = None
            if labels is not None:
                ldt = np.uint8 if np.ndim(labels) == 2 else np.int32
                lt, _ = s.arg(labels, ldt, "labels", allow_copy)
            pt, _ = s.arg(present, np.uint8, "present", allow_copy)
            yt, y = s.output((n, d), np.float32, out, "out")
            tt, topk = s.output((n, k), np.int32)
            st, sl = s.output((n, k, d), np.float32) if slots else (None, None)
            loss = ctypes.c_float(0.0)
            saved = _lib.SavedHandle()
            check(api.gate_forward(h, xt, lt, pt, yt, tt, st, ctypes.byref(loss),
                                   ctypes.byref(saved) if train else None), ctxh, "gate_forward")
        return GateOutput(y, topk, sl, float(loss.value), self._saved(saved) if train else None)

    def backward(self, saved, dy, dslots=None, dloss=1.0, need_dx=True, out=None, allow_copy=False):
        """dy [N, d] (and optionally dslots [N, k, d]; dloss the gradient of the returned loss)
        -> dx [N, d]. Accumulates into the gate's and the experts' gradients."""
        h = self._h
        sh = self._check_saved(saved)
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            dyt, dya = s.arg(dy, np.float32, "dy", allow_copy)
            dst, _ = s.arg(dslots, np.float32, "dslots", allow_copy)
            dxt, dx = (None, None)
            if need_dx:
                dxt, dx = s.output((dya if dya is not None else dy).shape, np.float32, out, "out")
            check(api.gate_backward(h, sh, dyt, dst, float(dloss), dxt), ctxh, "gate_backward")
        return dx

    def zero_grad(self, experts=False):
        """Zero the gate's own gradients (and, with experts=True, its experts')."""
        api.gate_zero_grad(self._h)
        if experts and self._experts:
            for e in self._experts:
                e.zero_grad()

    def stats(self, scope="last"):
        """Utilisation statistics of the last call ("last") or since create/reset ("total"):
        a dict with tokens, load_entropy, load_cv2, max_load_fraction, conf_loss, load (int64 [E],
        slots per expert) and mean_confidence (float64 [E], NaN for an expert with no slot)."""
        h = self._h
        if isinstance(scope, str):
            try:
                scope = _SCOPES[scope.lower()]
            except KeyError:
                raise ValueError("scope must be 'last' or 'total', got %r" % scope) from None
        e = int(api.gate_n_experts(h))
        st = _lib.GateStats()
        st.struct_size = ctypes.sizeof(_lib.GateStats)
        load = np.zeros(e, np.int64)
        conf = np.zeros(e, np.float64)
        check(api.gate_stats_get(h, int(scope), ctypes.byref(st), load.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                                 conf.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), e), self._ctxh,
              "gate_stats_get")
        return {
            "tokens": int(st.tokens),
            "load_entropy": float(st.load_entropy),
            "load_cv2": float(st.load_cv2),
            "max_load_fraction": float(st.max_load_fraction),
            "conf_loss": float(st.conf_loss),
            "load": load,
            "mean_confidence": conf,
        }

    def reset_stats(self):
        """Restart the TOTAL statistics."""
        api.gate_stats_reset(self._h)

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Gate closed>"
        return "<confsmoe.Gate E=%d k=%d>" % (self.n_experts, self.k)
