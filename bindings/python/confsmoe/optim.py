"""confsmoe_optim: Adam or SGD over (param, grad) tensor pairs."""
import ctypes

from . import _lib, _params
from ._lib import api
from ._native import NativeObject
from .errors import check

__all__ = ["Optimizer", "ADAM", "SGD"]

ADAM, SGD = 0, 1


class Optimizer(NativeObject):
    """Optimizer(ctx, params=None, kind="adam", **options): the library's Adam or SGD.

    params: a layer (Expert, Gate, Imputer, Model: anything with ``param_tensors()``), a list of
    layers, or a list of (param Tensor, grad Tensor) pairs; more can be added with add().
    Options (confsmoe_optim_params, C defaults): lr=3e-4, beta1=0.9, beta2=0.999, eps=1e-8,
    momentum=0, weight_decay=0. The optimizer keeps every registered tensor (and so its layer)
    alive. Gradients are read as they are at step(): zero them yourself between steps."""

    _kind = "optimizer"

    def __init__(self, ctx, params=None, kind="adam", **options):
        options = dict(options, kind=kind)
        p = _params.fill(_lib.OptimParams, api.optim_params_init, options, "Optimizer")
        out = _lib.OptimHandle()
        ctxh = ctx._h
        check(api.optim_create(ctxh, ctypes.byref(p), ctypes.byref(out)), ctxh, "optim_create")
        self._ctx = ctx
        self._options = _params.struct_dict(p)
        self._n = 0
        self._init_node(out, api.optim_destroy, (ctx._node,))
        if params is not None:
            self.add_parameters(params)

    @property
    def kind(self):
        return "adam" if self._options["kind"] == ADAM else "sgd"

    @property
    def lr(self):
        return self._options["lr"]

    @property
    def options(self):
        return dict(self._options)

    def __len__(self):
        """Number of registered parameters."""
        return self._n

    def add(self, param, grad):
        """Register one parameter Tensor and its gradient Tensor (f32, same shape)."""
        from .tensor import Tensor
        if not isinstance(param, Tensor) or not isinstance(grad, Tensor):
            raise TypeError("Optimizer.add takes two Tensors (param, grad), e.g. from layer.param_tensors()")
        h = self._h
        check(api.optim_add(h, param._h, grad._h), self._ctxh, "optim_add")
        self._node.adopt(param._node)
        self._node.adopt(grad._node)
        self._n += 1

    def add_parameters(self, params):
        """Register every parameter of a layer, of a list of layers, or a list of (param, grad)."""
        if hasattr(params, "param_tensors"):
            params = [params]
        for item in params:
            if hasattr(item, "param_tensors"):
                for _, p, g in item.param_tensors():
                    self.add(p, g)
            elif isinstance(item, (tuple, list)) and len(item) == 3:
                self.add(item[1], item[2])
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                self.add(item[0], item[1])
            else:
                raise TypeError("cannot register %r: pass layers or (param, grad) Tensor pairs" % (item,))

    def step(self):
        """One update of every registered parameter from its current gradient."""
        h = self._h
        check(api.optim_step(h), self._ctxh, "optim_step")

    def set_lr(self, lr):
        h = self._h
        check(api.optim_set_lr(h, float(lr)), self._ctxh, "optim_set_lr")
        self._options["lr"] = float(lr)

    def __repr__(self):
        if self.closed:
            return "<confsmoe.Optimizer closed>"
        return "<confsmoe.Optimizer %s lr=%g params=%d>" % (self.kind, self.lr, self._n)
