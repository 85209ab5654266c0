"""confsmoe_expert: the FFN y = W2 GELU(W1 x + b1) + b2 of one expert."""
import ctypes

import numpy as np

from . import _lib
from ._layer import Layer
from ._lib import api
from ._native import Scratch
from .errors import check

__all__ = ["Expert"]


class Expert(Layer):
    """Expert(ctx, d, h=None): an FFN d -> h -> d (h defaults to d) with the exact erf GELU.

    Parameters "w1" [h, d], "b1" [h], "w2" [d, h], "b2" [d] (nn.Linear layout and init)."""

    _kind = "expert"
    _prefix = "expert"

    def __init__(self, ctx, d, h=None):
        h_ = int(d if h is None else h)
        out = _lib.ExpertHandle()
        ctxh = ctx._h
        check(api.expert_create(ctxh, int(d), h_, ctypes.byref(out)), ctxh, "expert_create")
        self._ctx = ctx
        self._init_node(out, api.expert_destroy, (ctx._node,))

    @property
    def d(self):
        return int(api.expert_d(self._h))

    @property
    def h(self):
        return int(api.expert_h(self._h))

    def forward(self, x, train=False, out=None, allow_copy=False):
        """x [N, d] float32 -> y [N, d]. With train=True returns (y, saved) for backward."""
        h = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            xt, xa = s.arg(x, np.float32, "x", allow_copy)
            n = xa.shape[0] if xa is not None else x.shape[0]
            yt, y = s.output((n, self.d), np.float32, out, "out")
            saved = _lib.SavedHandle()
            check(api.expert_forward(h, xt, yt, ctypes.byref(saved) if train else None), ctxh, "expert_forward")
        if train:
            return y, self._saved(saved)
        return y

    def backward(self, saved, dy, need_dx=True, out=None, allow_copy=False):
        """dy [N, d] -> dx [N, d] (None with need_dx=False); accumulates the parameter gradients."""
        h = self._h
        sh = self._check_saved(saved)
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            dyt, dya = s.arg(dy, np.float32, "dy", allow_copy)
            dxt, dx = (None, None)
            if need_dx:
                shape = dya.shape if dya is not None else dy.shape
                dxt, dx = s.output(shape, np.float32, out, "out")
            check(api.expert_backward(h, sh, dyt, dxt), ctxh, "expert_backward")
        return dx

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Expert closed>"
        return "<confsmoe.Expert d=%d h=%d>" % (self.d, self.h)
