"""What every layer shares: the uniform parameter view and saved handles."""
import collections

from ._lib import api
from ._native import NativeObject, tensor_view

__all__ = ["Layer", "Saved", "Param"]

#: One parameter: its name and zero-copy numpy views of its value and its gradient.
Param = collections.namedtuple("Param", ["name", "value", "grad"])


class Saved(NativeObject):
    """What ONE training-mode forward call kept for its backward (confsmoe_saved).

    Pass it to the layer's backward (once: a second backward raises StateError). It is
    destroyed when closed or garbage collected, always before its layer."""

    _kind = "saved handle"

    def __init__(self, layer, handle):
        self._ctx = layer._ctx
        self._layer = layer
        self._init_node(handle, api.saved_destroy, (layer._node,))

    def __repr__(self):
        return "<confsmoe.Saved of %s%s>" % (type(self._layer).__name__, " closed" if self.closed else "")


class Layer(NativeObject):
    """Base of Expert, Gate, Imputer and Model: the uniform parameter view.

    Subclasses set ``_prefix`` ("expert", "gate", ...) naming the C functions
    confsmoe_<prefix>_n_params / _param_name / _param / _grad / _zero_grad."""

    _prefix = None

    def _fn(self, suffix):
        return getattr(api, "%s_%s" % (self._prefix, suffix))

    @property
    def n_params(self):
        return int(self._fn("n_params")(self._h))

    def param_names(self):
        h = self._h
        name = self._fn("param_name")
        return [name(h, i).decode() for i in range(int(self._fn("n_params")(h)))]

    def parameters(self):
        """[Param(name, value, grad)]: zero-copy numpy views of every parameter and its gradient.
        Writes through ``value`` change the layer's weights; the views keep the layer alive."""
        h = self._h
        n = int(self._fn("n_params")(h))
        name, param, grad = self._fn("param_name"), self._fn("param"), self._fn("grad")
        return [Param(name(h, i).decode(), tensor_view(self._node, param(h, i)),
                      tensor_view(self._node, grad(h, i))) for i in range(n)]

    def named_parameters(self):
        """{name: value view}."""
        return collections.OrderedDict((p.name, p.value) for p in self.parameters())

    def gradients(self):
        """{name: gradient view}."""
        return collections.OrderedDict((p.name, p.grad) for p in self.parameters())

    def param_tensors(self):
        """[(name, param Tensor, grad Tensor)]: the layer's own tensors (borrowed; they keep the
        layer alive), e.g. for Optimizer.add."""
        from .tensor import Tensor
        h = self._h
        n = int(self._fn("n_params")(h))
        name, param, grad = self._fn("param_name"), self._fn("param"), self._fn("grad")
        return [(name(h, i).decode(), Tensor._borrow(self._ctx, param(h, i), self),
                 Tensor._borrow(self._ctx, grad(h, i), self)) for i in range(n)]

    def zero_grad(self):
        """Zero the gradients (they accumulate over backward calls until zeroed)."""
        self._fn("zero_grad")(self._h)

    def _saved(self, handle):
        return Saved(self, handle) if handle else None

    def _check_saved(self, saved):
        if not isinstance(saved, Saved):
            raise TypeError("saved must be the Saved handle of a training forward, got %s" % type(saved).__name__)
        return saved._h
