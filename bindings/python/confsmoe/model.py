"""confsmoe_model: the full Conf-SMoE classifier (docs/MODEL.md), and checkpoints."""
import collections
import ctypes
import os

import numpy as np

from . import _lib, _params
from ._layer import Layer
from ._lib import api
from ._native import Scratch
from .errors import check

__all__ = ["Model", "StepResult", "save_checkpoint", "load_checkpoint"]

#: What Model.step returns: the total loss, its CE / BCE part, and the logits [B, C] (or None).
StepResult = collections.namedtuple("StepResult", ["loss", "task_loss", "logits"])


class Model(Layer):
    """Model(ctx, features, n_classes, **options): the Conf-SMoE classifier over M modalities.

    features: F_m of each modality (M = len(features)). Options (confsmoe_model_params, C
    defaults): tokens=1 (S of every modality, or a list of M per-modality S_m), d=128, heads=4, n_experts=8, k=2, expert_hidden=0 (= d),
    multilabel=False, gate="confidence"|"softmax"|"gaussian"|"laplacian", load_loss="none"|"cv"|
    "entropy", load_loss_weight=0.01, conf_loss_weight=1.0, confidence="token"|"expert",
    router_grad="frozen"|"trainable"|"score", detach_target=False, noisy=False,
    imputation="two_stage"|"mean", draws=10, top_t=0, renormalize=False, separate_value=False,
    dropout=0.1, compat=False, predict_pool_mean=False (True: predict fills stage 1 with the pool
    mean, deterministic), modality_dropout=0.0, writeback="ln_imp"|"residual" (a two-stage-imputed
    token becomes LN_imp(LN3(H + F) + Ihat), or LN3(H + Ihat)). Unknown names: TypeError.

    Inputs are M float32 arrays x_m [B, S_m, F_m] (or [B, F_m] when S_m = 1), the availability
    mask avail uint8/bool [B, M] (1 = present) and labels int32 [B] (uint8 [B, C] multi-label).
    """

    _kind = "model"
    _prefix = "model"

    def __init__(self, ctx, features, n_classes, **options):
        features = [int(f) for f in features]
        feats = (ctypes.c_int64 * max(len(features), 1))(*features)
        options, tokens, per_modality = _params.tokens_option(options, len(features), "Model")
        options = dict(options, n_modalities=len(features), n_classes=n_classes)
        p = _params.fill(_lib.ModelParams, api.model_params_init, options, "Model")
        p.features = ctypes.cast(feats, ctypes.POINTER(ctypes.c_int64))
        if per_modality is not None:  # read at create
            p.modality_tokens = ctypes.cast(per_modality, ctypes.POINTER(ctypes.c_int64))
        out = _lib.ModelHandle()
        ctxh = ctx._h
        check(api.model_create(ctxh, ctypes.byref(p), ctypes.byref(out)), ctxh, "model_create")
        self._ctx = ctx
        self._features = tuple(features)
        self._tokens = tokens
        self._options = _params.struct_dict(p)
        if per_modality is not None:
            self._options["tokens"] = list(tokens)
        self._gate = None
        self._init_node(out, api.model_destroy, (ctx._node,))

    @property
    def options(self):
        return dict(self._options, features=self._features)

    @property
    def features(self):
        return self._features

    @property
    def tokens(self):
        """S_m of each modality, a tuple of M ints."""
        return self._tokens

    @property
    def n_modalities(self):
        return len(self._features)

    @property
    def n_classes(self):
        return int(self._options["n_classes"])

    @property
    def gate(self):
        """The model's gate (owned by the model), for its utilisation statistics."""
        if self._gate is None or self._gate.closed:
            from .gate import Gate
            self._gate = Gate._borrow(self, api.model_gate(self._h))
        return self._gate

    def set_pool(self, m, pool, allow_copy=False):
        """The stage-1 pool of modality m: training inputs where m is present, [P, S_m, F_m] or
        [P, F_m] when S_m = 1 (copied by the library)."""
        h = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            pt, _ = s.arg(pool, np.float32, "pool", allow_copy)
            check(api.model_set_pool(h, int(m), pt), ctxh, "model_set_pool")

    def _inputs(self, s, inputs, allow_copy):
        inputs = list(inputs)
        if len(inputs) != self.n_modalities:
            raise ValueError("inputs must hold %d arrays (one per modality), got %d"
                             % (self.n_modalities, len(inputs)))
        handles = []
        batch = None
        for m, x in enumerate(inputs):
            xt, xa = s.arg(x, np.float32, "inputs[%d]" % m, allow_copy)
            handles.append(xt)
            if batch is None:
                batch = (xa if xa is not None else x).shape[0]
        return (_lib.TensorHandle * max(len(handles), 1))(*handles), batch

    def step(self, inputs, avail, labels, logits=True, allow_copy=False):
        """One training step (forward with dropout/noise/fresh draws, then backward): gradients
        accumulate. Returns StepResult(loss, task_loss, logits [B, C] or None with logits=False)."""
        h = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            arr, b = self._inputs(s, inputs, allow_copy)
            at, _ = s.arg(avail, np.uint8, "avail", allow_copy)
            ldt = np.uint8 if self._options["multilabel"] else np.int32
            lt, _ = s.arg(labels, ldt, "labels", allow_copy)
            if logits is None or logits is False:
                lgt, lg = None, None
            elif logits is True:
                lgt, lg = s.output((b, self.n_classes), np.float32)
            else:  # an array to write the logits into
                lgt, lg = s.output((b, self.n_classes), np.float32, logits, "logits")
            loss, task = ctypes.c_float(0.0), ctypes.c_float(0.0)
            check(api.model_step(h, arr, at, lt, lgt, ctypes.byref(loss), ctypes.byref(task)), ctxh, "model_step")
        return StepResult(float(loss.value), float(task.value), lg)

    def predict(self, inputs, avail, out=None, allow_copy=False):
        """Inference logits [B, C] (no dropout or noise; fresh stage-1 draws)."""
        h = self._h
        ctxh = self._ctxh
        with Scratch(ctxh) as s:
            arr, b = self._inputs(s, inputs, allow_copy)
            at, _ = s.arg(avail, np.uint8, "avail", allow_copy)
            lgt, lg = s.output((b, self.n_classes), np.float32, out, "out")
            check(api.model_predict(h, arr, at, lgt), ctxh, "model_predict")
        return lg

    def save(self, path, optim=None):
        """confsmoe_checkpoint_save: every parameter (and the optimizer's state) as safetensors."""
        save_checkpoint(self, path, optim)

    def load(self, path, optim=None):
        """confsmoe_checkpoint_load: checked in full before anything changes."""
        load_checkpoint(self, path, optim)

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Model closed>"
        return "<confsmoe.Model features=%s classes=%d d=%d E=%d>" % (
            list(self._features), self.n_classes, self._options["d"], self._options["n_experts"])


def _path(path):
    return os.fsencode(os.fspath(path))


def save_checkpoint(model, path, optim=None):
    """Save a Model (and optionally its Optimizer's state) to a safetensors file, atomically."""
    h = model._h
    oh = optim._h if optim is not None else None
    check(api.checkpoint_save(h, oh, _path(path)), model._ctxh, "checkpoint_save")


def load_checkpoint(model, path, optim=None):
    """Load what save_checkpoint wrote. FileIOError for a missing file, FormatError for a damaged
    or mismatched one; in both cases the model and the optimizer are unchanged."""
    h = model._h
    oh = optim._h if optim is not None else None
    check(api.checkpoint_load(h, oh, _path(path)), model._ctxh, "checkpoint_load")
