"""confsmoe_imputer: two-stage imputation of missing modalities (docs/MODEL.md)."""
import ctypes

import numpy as np

from . import _lib, _params
from ._layer import Layer
from ._lib import api
from ._native import Scratch
from .errors import check

__all__ = ["Imputer"]


class Imputer(Layer):
    """Imputer(ctx, d, n_modalities, **options): stage 1 (pool means) and stage 2 (sparse attention).

    Options (confsmoe_imputer_params, C defaults): tokens=1 (S of every modality, or a list of
    M per-modality S_m), k=2, top_t=0 (auto), renormalize=False, separate_value=False,
    compat=False, writeback="ln_imp"|"residual" (missing rows of the output: LN(h + Ihat), or
    Ihat alone, with no "ln.*" parameters). Availability masks are uint8 (or bool) [B, M] with
    1 = present."""

    _kind = "imputer"
    _prefix = "imputer"

    def __init__(self, ctx, d, n_modalities, **options):
        options, tokens, per_modality = _params.tokens_option(options, n_modalities, "Imputer")
        options = dict(options, d=d, n_modalities=n_modalities)
        p = _params.fill(_lib.ImputerParams, api.imputer_params_init, options, "Imputer")
        if per_modality is not None:  # read at create
            p.modality_tokens = ctypes.cast(per_modality, ctypes.POINTER(ctypes.c_int64))
        out = _lib.ImputerHandle()
        ctxh = ctx._h
        check(api.imputer_create(ctxh, ctypes.byref(p), ctypes.byref(out)), ctxh, "imputer_create")
        self._ctx = ctx
        self._options = _params.struct_dict(p)
        if per_modality is not None:
            self._options["tokens"] = list(tokens)
        self._tokens = tokens
        self._init_node(out, api.imputer_destroy, (ctx._node,))

    @property
    def options(self):
        return dict(self._options)

    @property
    def tokens(self):
        """S_m of each modality, a tuple of M ints."""
        return self._tokens

    def fill(self, m, pool, avail, x, draws=10, allow_copy=False):
        """Stage 1 for modality m, IN PLACE: each sample b with avail[b, m] == 0 gets in x[b] the mean
        of ``draws`` distinct rows drawn from pool. x is a writable float32 array [B, S, F] or [B, F]
        (or a Tensor); pool has x's trailing shape. Returns x."""
        h = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            pt, _ = s.arg(pool, np.float32, "pool", allow_copy)
            at, _ = s.arg(avail, np.uint8, "avail", allow_copy)
            xt, _ = s.arg(x, np.float32, "x", writable=True)
            check(api.imputer_fill(h, int(m), pt, int(draws), at, xt), ctxh, "imputer_fill")
        return x

    def forward(self, h, slots, avail, train=False, out=None, allow_copy=False):
        """Stage 2: h [B, L, d] (L = sum_m S_m), slots [B L, k, d] modality-major (or [M, B S, k, d]
        when every S_m is S), avail [B, M] -> out [B, L, d] (h with the missing rows imputed;
        ``out=h`` works in place). With train=True returns (out, saved)."""
        ih = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            ht, ha = s.arg(h, np.float32, "h", allow_copy)
            st, _ = s.arg(slots, np.float32, "slots", allow_copy)
            at, _ = s.arg(avail, np.uint8, "avail", allow_copy)
            if out is not None and out is h:
                ot, res = ht, h
            else:
                ot, res = s.output((ha if ha is not None else h).shape, np.float32, out, "out")
            saved = _lib.SavedHandle()
            check(api.imputer_forward(ih, ht, st, at, ot, ctypes.byref(saved) if train else None), ctxh,
                  "imputer_forward")
        if train:
            return res, self._saved(saved)
        return res

    def backward(self, saved, dout, dslots=None, need_dh=True, out=None, allow_copy=False):
        """dout [B, M S, d] -> dh [B, M S, d] (None with need_dh=False). dslots [M, B S, k, d], when
        given, must be a writable float32 array (or Tensor): the slot gradients are ADDED into it.
        Accumulates the imputer's parameter gradients."""
        ih = self._h
        sh = self._check_saved(saved)
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            dt, da = s.arg(dout, np.float32, "dout", allow_copy)
            dst, _ = s.arg(dslots, np.float32, "dslots", writable=True)
            dht, dh = (None, None)
            if need_dh:
                dht, dh = s.output((da if da is not None else dout).shape, np.float32, out, "out")
            check(api.imputer_backward(ih, sh, dt, dht, dst), ctxh, "imputer_backward")
        return dh

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Imputer closed>"
        return "<confsmoe.Imputer d=%d M=%d>" % (self._options["d"], self._options["n_modalities"])
