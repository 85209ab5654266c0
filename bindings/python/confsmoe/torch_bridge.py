"""PyTorch bridge: a libconfsmoe MoE layer as a torch.nn.Module (``confsmoe.torch.MoELayer``).

Importing this module imports torch; ``import confsmoe`` alone never does.

- The C parameters (experts' w1/b1/w2/b2, the gate's router, ConfNets and target classifier)
  are registered as ``torch.nn.Parameter`` objects that SHARE memory with the library
  (``torch.from_numpy`` on the zero-copy views): a torch optimizer updates the C weights in
  place, and ``load_state_dict`` writes straight into them.
- ``forward`` runs through ``MoEFunction`` (a ``torch.autograd.Function``): the gate's
  training-mode forward when ``module.training`` (noise on, labels for the confidence loss),
  its inference forward otherwise (no autograd graph then).
- ``backward`` zeroes the C gradient buffers, runs the C backward and hands torch a copy of
  them, so ``.grad`` accumulates the usual torch way; the C buffers are scratch space.
- It is re-entrant: the first backward uses the forward's saved handle, any further backward
  of the same graph (``retain_graph=True``, ``torch.autograd.gradcheck``) recomputes the
  training forward from the saved inputs (with the same RNG seed when ``noisy``).
- Parameters passed to ``MoEFunction`` that are not the shared ones (float64 copies for
  gradcheck, or after ``module.double()``) are copied into the C weights (as float32) before
  each forward and backward, and their gradients are returned in their own dtype.

The layer computes in float32 on the CPU; inputs of other dtypes or devices are converted and
the outputs converted back.
"""
import numpy as np
import torch

from .context import Context
from .expert import Expert
from .gate import Gate

__all__ = ["MoELayer", "MoEFunction", "moe_function"]


class _ParamGroup(torch.nn.Module):
    """Holds a C layer's parameters as torch Parameters (names with '.' replaced by '_')."""

    def __init__(self, names_and_values):
        super().__init__()
        self.c_names = []
        for name, value in names_and_values:
            attr = name.replace(".", "_")
            self.register_parameter(attr, torch.nn.Parameter(torch.from_numpy(value)))
            self.c_names.append(name)


def _to_numpy_f32(t):
    """A float32 C-contiguous numpy array of a torch tensor (no copy when it already is one)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.contiguous().numpy()


def _labels_numpy(labels, n, target_multi):
    if labels is None:
        return None
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if target_multi or labels.ndim == 2:
        return np.ascontiguousarray(labels.reshape(n, -1), np.uint8)
    return np.ascontiguousarray(labels.reshape(n), np.int32)


def _present_numpy(present, n):
    if present is None:
        return None
    if isinstance(present, torch.Tensor):
        present = present.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(present).reshape(n), np.uint8)


class MoEFunction(torch.autograd.Function):
    """(layer, x [N, d], labels, present, *params) -> (y [N, d], aux_loss []), training mode."""

    @staticmethod
    def forward(ctx, layer, x, labels, present, *params):
        layer._sync_in(params)
        seed = layer._draw_seed()
        x32 = _to_numpy_f32(x)
        out = layer.c_gate.forward(x32, labels=labels, present=present, train=True)
        layer.last_topk = out.topk
        ctx.layer = layer
        ctx.saved_handle = out.saved
        ctx.labels, ctx.present, ctx.seed = labels, present, seed
        ctx.x_dtype, ctx.x_device = x.dtype, x.device
        ctx.save_for_backward(x, *params)
        y = torch.from_numpy(out.y).to(device=x.device, dtype=x.dtype)
        loss = torch.tensor(out.loss, dtype=x.dtype, device=x.device)
        return y, loss

    @staticmethod
    def backward(ctx, dy, dloss):
        layer = ctx.layer
        x, *params = ctx.saved_tensors
        layer._sync_in(params)
        saved, ctx.saved_handle = ctx.saved_handle, None
        if saved is None:  # a second backward of the same graph: recompute the training forward
            if ctx.seed is not None:
                layer.c_context.set_seed(ctx.seed)
            saved = layer.c_gate.forward(_to_numpy_f32(x), labels=ctx.labels, present=ctx.present,
                                         train=True).saved
        try:
            layer.c_gate.zero_grad(experts=True)
            n, d = x.shape
            dy32 = _to_numpy_f32(dy) if dy is not None else np.zeros((n, d), np.float32)
            dl = float(dloss) if dloss is not None else 0.0
            dx = layer.c_gate.backward(saved, dy32, dloss=dl, need_dx=ctx.needs_input_grad[1])
        finally:
            saved.close()
        dx_t = torch.from_numpy(dx).to(device=ctx.x_device, dtype=ctx.x_dtype) if dx is not None else None
        grads = []
        for i, (p, (_, grad_view)) in enumerate(zip(params, layer._c_params)):
            if ctx.needs_input_grad[4 + i]:
                grads.append(torch.from_numpy(grad_view.copy()).to(device=p.device, dtype=p.dtype))
            else:
                grads.append(None)
        return (None, dx_t, None, None) + tuple(grads)


def moe_function(layer, x, labels=None, present=None, params=None):
    """The differentiable training-mode call of ``layer`` on x [N, d] -> (y, aux_loss).

    ``params`` defaults to the layer's shared Parameters; pass other tensors of the same shapes
    (e.g. float64 copies for gradcheck) to compute with those values instead."""
    n = x.shape[0]
    labels = _labels_numpy(labels, n, layer._multi_label)
    present = _present_numpy(present, n)
    if params is None:
        params = layer._param_list
    return MoEFunction.apply(layer, x, labels, present, *params)


class MoELayer(torch.nn.Module):
    """A libconfsmoe MoE layer inside a PyTorch model.

    MoELayer(d, n_experts=8, k=2, hidden=None, n_classes=None, seed=0, ctx=None, **gate_options)

    - d: token width; hidden: each expert's hidden width (default d).
    - gate_options: the Gate options (combine="confidence" by default, which needs n_classes
      and training labels; combine="router_softmax" needs neither), see confsmoe.Gate.
    - forward(x, labels=None, present=None) with x [..., d] returns (y [..., d], aux_loss): add
      aux_loss (the confidence loss, plus any load loss) to the task loss. labels: int [...]
      class per token (or [..., C] multi-label), needed in training under the confidence gate;
      present: bool [...] tokens that count in the confidence loss.
    - In eval mode the gate's inference forward runs (no noise, no labels, no autograd graph).

    ``c_context``, ``c_experts`` and ``c_gate`` are the underlying confsmoe objects
    (``c_gate.stats()`` gives the utilisation statistics). The module is CPU-only and cannot
    be deep-copied or pickled; save it with ``state_dict()``.
    """

    def __init__(self, d, n_experts=8, k=2, hidden=None, n_classes=None, seed=0, ctx=None, **gate_options):
        super().__init__()
        self.c_context = ctx if ctx is not None else Context(seed=seed)
        self.c_experts = [Expert(self.c_context, d, hidden) for _ in range(n_experts)]
        if n_classes is not None:
            gate_options["n_classes"] = n_classes
        self.c_gate = Gate(self.c_context, self.c_experts, k=k, **gate_options)
        opts = self.c_gate.options
        self.d = int(d)
        self._multi_label = opts["target"] == 1
        self._noisy = bool(opts["noisy"])
        self._seed_rng = np.random.default_rng(seed)
        self.last_topk = None
        self._c_params = []  # [(torch Parameter, C grad view)] in MoEFunction's order
        groups = []
        for e in self.c_experts:
            ps = e.parameters()
            groups.append((_ParamGroup([(p.name, p.value) for p in ps]), ps))
        self.expert_params = torch.nn.ModuleList([g for g, _ in groups])
        gps = self.c_gate.parameters()
        self.gate_params = _ParamGroup([(p.name, p.value) for p in gps])
        for group, ps in groups + [(self.gate_params, gps)]:
            for name, p in zip(group.c_names, ps):
                self._c_params.append((getattr(group, name.replace(".", "_")), p.grad))
        self._c_values = [p.value for e in self.c_experts for p in e.parameters()] + [p.value for p in gps]
        self._param_list = [p for p, _ in self._c_params]

    # ----------------------------------------------------------------- internals

    def _sync_in(self, params):
        """Copy parameter values that do not already live in the C memory into it."""
        for p, view in zip(params, self._c_values):
            if p.dtype == torch.float32 and p.device.type == "cpu" and p.data_ptr() == view.ctypes.data:
                continue
            view[...] = p.detach().to(device="cpu", dtype=torch.float32).numpy().reshape(view.shape)

    def _draw_seed(self):
        """With noisy top-k: reseed the ctx for every training forward so a recomputation repeats it."""
        if not self._noisy:
            return None
        seed = int(self._seed_rng.integers(0, 2**63 - 1))
        self.c_context.set_seed(seed)
        return seed

    # ----------------------------------------------------------------- module API

    def forward(self, x, labels=None, present=None):
        if x.shape[-1] != self.d:
            raise ValueError("MoELayer: x has width %d, the layer expects %d" % (x.shape[-1], self.d))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d)
        if self.training:
            y, loss = moe_function(self, x2, labels, present)
        else:
            self._sync_in(self._param_list)
            n = x2.shape[0]
            out = self.c_gate.forward(_to_numpy_f32(x2), present=_present_numpy(present, n))
            self.last_topk = out.topk
            y = torch.from_numpy(out.y).to(device=x.device, dtype=x.dtype)
            loss = torch.zeros((), dtype=x.dtype, device=x.device)
        return y.reshape(*lead, self.d), loss

    def stats(self, scope="last"):
        """The gate's utilisation statistics (see confsmoe.Gate.stats)."""
        return self.c_gate.stats(scope)

    def extra_repr(self):
        return "d=%d, n_experts=%d, k=%d" % (self.d, len(self.c_experts), self.c_gate.k)

    def __deepcopy__(self, memo):
        raise TypeError("MoELayer holds libconfsmoe objects and cannot be deep-copied; use state_dict()")
