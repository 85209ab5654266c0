"""PyTorch bridge: a libconfsmoe MoE layer as a torch.nn.Module (``confsmoe.torch.MoELayer``).

Importing this module imports torch; ``import confsmoe`` alone never does.

- Parameters. The layer has ONE Parameter, ``flat``: every C parameter (the experts' w1, b1, w2,
  b2, the gate's router, ConfNets and target classifier) is a slice of it, and the C library
  computes with that very memory (``confsmoe_tensors_set_data``): an optimizer step on ``flat`` is
  the C weights' update, with no copy. ``weights()`` gives the named views; ``state_dict()`` holds
  them by name ("expert.0.w1", "gate.router.w", ...). A ``flat`` that cannot be shared (another
  dtype, device or layout, e.g. after ``module.double()``) is copied into the C weights at each
  call instead, and its gradient returned in its own dtype.
- Gradients. Each backward points the C gradients at a fresh zeroed flat buffer, runs the C
  backward into it and returns that buffer as ``flat``'s gradient (no copy), so that autograd
  accumulates ``flat.grad`` and its hooks (DistributedDataParallel's) fire.
- Modes. ``module.training`` chooses the gate's function: training (noise when ``noisy``,
  labels for the confidence loss, the aux loss) or inference (no noise, no labels, aux loss 0).
  Autograd is independent of it, as everywhere in PyTorch: an eval-mode call keeps the graph
  unless grad is disabled (``torch.no_grad()``). To keep it, it runs the training forward of a
  noise-free twin of the gate with no token in the confidence loss, which computes the
  inference function and saves what its backward needs.
- Operators. On PyTorch >= 2.4 the call is the custom operator ``torch.ops.confsmoe.moe_forward``
  (with ``moe_backward``, fake kernels and an autograd formula), so that ``torch.compile``
  (fullgraph too) and ``torch.export`` see one opaque node; eager calls of plain tensors take
  ``MoEFunction`` (a ``torch.autograd.Function``) directly, which runs the same code with less
  dispatch. On older PyTorch ``MoEFunction`` is the only path.
- Re-entrance. A backward whose saved C state is gone (a second backward of a retained graph,
  ``torch.autograd.gradcheck``) recomputes the training forward from the saved inputs, with
  the same noise seed.
- Seeds and pickling. The C ctx's seed is drawn from torch's default generator at construction
  (``torch.manual_seed`` reproduces a model; stacked layers differ), and each noisy training
  forward takes the next seed of a stream of the layer's own. ``pickle``, ``torch.save``,
  ``copy.deepcopy`` and spawned DataLoader workers rebuild the C objects from the construction
  arguments, ``flat`` and the position of that stream.

The layer computes in float32 on the CPU; inputs of other dtypes or devices are converted and
the outputs converted back.
"""
from typing import Optional, Tuple

import torch

from ._torch_native import Native, lookup

__all__ = ["MoELayer", "MoEFunction", "moe_function"]

_CUSTOM_OP = hasattr(torch.library, "custom_op")  # PyTorch >= 2.4


def _like(t, x):
    """t (float32, CPU) in x's dtype and device."""
    return t if x.dtype is torch.float32 and x.is_cpu else t.to(device=x.device, dtype=x.dtype)


def _scalar(v, x):
    """The float v as a 0-dim tensor of x's dtype and device."""
    if x.dtype is torch.float32 and x.is_cpu:
        return torch.scalar_tensor(v, dtype=torch.float32)
    return torch.tensor(v, dtype=x.dtype, device=x.device)


class MoEFunction(torch.autograd.Function):
    """(x [N, d], flat, labels, present, native, train) -> (y [N, d], aux_loss []).

    train: the gate's training forward (else the noise-free inference function, aux loss 0)."""

    @staticmethod
    def forward(ctx, x, flat, labels, present, native, train):
        y, loss, call, seed = native.forward(x, flat, labels, present, train, True)
        ctx.native, ctx.call, ctx.seed, ctx.train = native, call, seed, train
        ctx.labels, ctx.present = labels, present
        ctx.save_for_backward(x, flat)
        return _like(y, x), _scalar(loss, x)

    @staticmethod
    def backward(ctx, dy, dloss):
        x, flat = ctx.saved_tensors
        need_dx, need_flat = ctx.needs_input_grad[:2]
        dx, dflat = ctx.native.backward(ctx.call, dy, float(dloss) if dloss is not None else 0.0, need_dx, x, flat,
                                        ctx.labels, ctx.present, ctx.train, ctx.seed)
        return (_like(dx, x) if need_dx else None, _like(dflat, flat) if need_flat else None,
                None, None, None, None)


if _CUSTOM_OP:
    @torch.library.custom_op("confsmoe::moe_forward", mutates_args=())
    def _moe_forward(x: torch.Tensor, flat: torch.Tensor, labels: Optional[torch.Tensor],
                     present: Optional[torch.Tensor], layer: int, train: bool,
                     keep: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One call of MoELayer #layer on x [N, d] -> (y, aux_loss, call): call holds the id its
        backward finds the saved C state by, and the noise seed (int64 [2])."""
        native = lookup(layer)
        y, loss, call, seed = native.forward(x, flat, labels, present, train, keep)
        cid = native.park(call) if call is not None else -1
        return (_like(y, x), _scalar(loss, x),
                torch.tensor([cid, seed or 0], dtype=torch.int64, device=x.device))

    @_moe_forward.register_fake
    def _moe_forward_fake(x, flat, labels, present, layer, train, keep):
        return x.new_empty(x.shape), x.new_empty(()), x.new_empty((2,), dtype=torch.int64)

    @torch.library.custom_op("confsmoe::moe_backward", mutates_args=())
    def _moe_backward(dy: torch.Tensor, dloss: torch.Tensor, call: torch.Tensor, x: torch.Tensor,
                      flat: torch.Tensor, labels: Optional[torch.Tensor], present: Optional[torch.Tensor],
                      layer: int, train: bool, need_dx: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dx [N, d] (empty unless need_dx), d flat) of the call moe_forward numbered ``call``."""
        native = lookup(layer)
        cid, seed = (int(v) for v in call.tolist())
        dx, dflat = native.backward(native.unpark(cid), dy, float(dloss), need_dx, x, flat, labels, present,
                                    train, seed)
        return (_like(dx, x) if dx is not None else x.new_empty((0,)), _like(dflat, flat))

    @_moe_backward.register_fake
    def _moe_backward_fake(dy, dloss, call, x, flat, labels, present, layer, train, need_dx):
        return x.new_empty(x.shape if need_dx else (0,)), flat.new_empty(flat.shape)

    def _setup_context(ctx, inputs, output):
        x, flat, labels, present, layer, train, keep = inputs
        ctx.layer, ctx.train = layer, train
        ctx.save_for_backward(x, flat, labels, present, output[2])

    def _backward(ctx, dy, dloss, dcall):
        x, flat, labels, present, call = ctx.saved_tensors
        need_dx, need_flat = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dflat = _moe_backward(dy, dloss, call, x, flat, labels, present, ctx.layer, ctx.train, need_dx)
        return (dx if need_dx else None, dflat if need_flat else None, None, None, None, None, None)

    _moe_forward.register_autograd(_backward, setup_context=_setup_context)


def _use_operator(x):
    """The custom operator when something traces the call (torch.compile, torch.export, FX, a
    tensor subclass); MoEFunction for a plain eager call."""
    return _CUSTOM_OP and (torch.compiler.is_compiling() or type(x) is not torch.Tensor)


def moe_function(layer, x, labels=None, present=None, flat=None):
    """The differentiable training-mode call of ``layer`` on x [N, d] -> (y, aux_loss).

    ``flat`` defaults to the layer's Parameter; pass another tensor of its shape (e.g. a float64
    copy for gradcheck) to compute with those values instead."""
    n = x.shape[0]
    labels = layer._token_labels(labels, (n,), n) if labels is not None else None
    present = layer._token_present(present, (n,), n) if present is not None else None
    return MoEFunction.apply(x, layer.flat if flat is None else flat, labels, present, layer._native, True)


class MoELayer(torch.nn.Module):
    """A libconfsmoe MoE layer inside a PyTorch model.

    MoELayer(d, n_experts=8, k=2, hidden=None, n_classes=None, seed=None, ctx=None, **gate_options)

    - d: token width; hidden: each expert's hidden width (default d).
    - gate_options: the Gate options (combine="confidence" by default, which needs n_classes
      and training labels; combine="router_softmax" needs neither), see confsmoe.Gate.
    - seed: the C ctx's seed (initial weights, noise); None (default) draws it from torch's
      default generator. ctx: a confsmoe.Context to create the C objects from instead.
    - forward(x, labels=None, present=None) with x [..., d] returns (y [..., d], aux_loss): add
      aux_loss (the confidence loss, plus any load loss) to the task loss. labels: the class of
      each token, int [...] (x's leading shape; one label per token), or [..., C] 0/1 under
      target="multi_label"; needed in training under the confidence gate. present: bool [...],
      the tokens that count in the confidence loss (default all).
    - train() / eval() choose the gate's function (eval: no noise, no labels, aux loss 0);
      torch.no_grad() / inference_mode() alone drop the autograd graph.

    ``flat`` is the only Parameter: all the C weights, shared with the library (see
    ``weights()``). ``c_context``, ``c_experts`` and ``c_gate`` are the underlying confsmoe
    objects; their parameters live in ``flat``'s memory, so views taken from them are valid only
    while ``flat`` keeps its storage. The module is CPU-only.
    """

    def __init__(self, d, n_experts=8, k=2, hidden=None, n_classes=None, seed=None, ctx=None, **gate_options):
        super().__init__()
        if n_classes is not None:
            gate_options["n_classes"] = n_classes
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu"))
        spec = dict(d=int(d), n_experts=int(n_experts), k=int(k), hidden=None if hidden is None else int(hidden),
                    seed=int(seed), gate_options=dict(gate_options))
        native = Native(spec, ctx)
        # Under torch.device("meta") the Parameter is meta until loaded (assign=True).
        flat = torch.empty(native.numel, dtype=torch.float32)
        if flat.device.type == "cpu":
            flat.zero_()
            native.initial_values(flat)
            native.bind(flat)
        self.flat = torch.nn.Parameter(flat)
        self._set_native(native)

    def _set_native(self, native):
        self._native = native
        self._op_id = native.id
        self.d = native.d
        self._confidence = native.confidence
        self._multi_label = native.multi_label
        self._n_classes = native.n_classes

    # ----------------------------------------------------------------- inputs

    def _token_labels(self, labels, lead, n):
        """labels as [N] (one class per token) or [N, C] (multi-label), checked against x's lead shape."""
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        shape = tuple(labels.shape)
        lead = tuple(lead)
        if self._multi_label:
            c = self._n_classes
            if shape != lead + (c,) and shape != (n, c):
                raise ValueError("MoELayer: multi-label labels must have shape %s (x's leading shape + [C]), got %s"
                                 % (list(lead + (c,)), list(shape)))
            if labels.dtype.is_complex:
                raise TypeError("MoELayer: multi-label labels must be 0/1 (bool, integer or float), got %s"
                                % labels.dtype)
            return labels if len(shape) == 2 else labels.reshape(n, c)
        if shape != lead and shape != (n,):
            raise ValueError("MoELayer: labels must hold one class per token, shape %s (x's leading shape) "
                             "or [%d], got %s" % (list(lead), n, list(shape)))
        dtype = labels.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype is torch.bool:
            raise TypeError("MoELayer: labels must be integer class indices, got %s" % dtype)
        return labels if len(shape) == 1 else labels.reshape(n)

    def _token_present(self, present, lead, n):
        if not isinstance(present, torch.Tensor):
            present = torch.as_tensor(present)
        shape = tuple(present.shape)
        if shape != tuple(lead) and shape != (n,):
            raise ValueError("MoELayer: present must have x's leading shape %s or [%d], got %s"
                             % (list(lead), n, list(shape)))
        if present.dtype.is_floating_point or present.dtype.is_complex:
            raise TypeError("MoELayer: present must be bool (or 0/1 integers), got %s" % present.dtype)
        return present if len(shape) == 1 else present.reshape(n)

    # ----------------------------------------------------------------- module API

    def forward(self, x, labels=None, present=None):
        d = self.d
        if x.shape[-1] != d:
            raise ValueError("MoELayer: x has width %d, the layer expects %d" % (x.shape[-1], d))
        tokens_2d = x.dim() == 2  # [N, d] as it is: no view node in the graph
        lead = x.shape[:-1]
        x2 = x if tokens_2d else x.reshape(-1, d)
        n = x2.shape[0]
        train = self.training
        if train:
            if labels is None and self._confidence:
                raise ValueError("MoELayer: labels are needed in training under the confidence gate (one class "
                                 "per token); pass labels=..., or use eval() or combine='router_softmax'")
            labels = self._token_labels(labels, lead, n) if labels is not None and self._confidence else None
            present = self._token_present(present, lead, n) if present is not None else None
        else:
            labels = present = None
        flat = self.flat
        keep = torch.is_grad_enabled() and (x.requires_grad or flat.requires_grad)
        if _use_operator(x):
            y, loss, _ = torch.ops.confsmoe.moe_forward(x2, flat, labels, present, self._op_id, train, keep)
        elif keep:
            y, loss = MoEFunction.apply(x2, flat, labels, present, self._native, train)
        else:
            y, loss, _, _ = self._native.forward(x2, flat, labels, present, train, False)
            y, loss = _like(y, x), _scalar(loss, x)
        return (y if tokens_2d else y.reshape(*lead, d)), loss

    def weights(self):
        """{name: view of flat} for every C parameter ("expert.0.w1", "gate.router.w", ...)."""
        flat = self.flat
        return {name: flat[off:off + _numel(shape)].view(shape) for name, shape, off in self._native.layout}

    @property
    def c_context(self):
        return self._native.ctx

    @property
    def c_experts(self):
        return self._native.experts

    @property
    def c_gate(self):
        return self._native.gate

    @property
    def last_topk(self):
        """int32 [N, k] numpy array: the experts each token of the last call went to."""
        t = self._native._topk
        return None if t is None else t.numpy().copy()

    def stats(self, scope="last"):
        """The gate's utilisation statistics (see confsmoe.Gate.stats). "last" is the last call's;
        "total" counts the training calls and the calls without a graph (an eval-mode call that
        keeps the graph runs on the gate's noise-free twin, counted in "last" only)."""
        native = self._native
        return (native.last_gate if scope == "last" else native.gate).stats(scope)

    def extra_repr(self):
        spec = self._native.spec
        return "d=%d, n_experts=%d, k=%d" % (spec["d"], spec["n_experts"], spec["k"])

    # ----------------------------------------------------------------- state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, view in self.weights().items():
            destination[prefix + name] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Gathers the named entries into one flat tensor and loads that as ``flat`` (so that
        assign=True assigns it, and the C weights follow it at the next call)."""
        layout = self._native.layout
        present = [prefix + name in state_dict for name, _, _ in layout]
        others = {k: v for k, v in state_dict.items() if k.startswith(prefix)
                  and k[len(prefix):] not in self._native.offsets}
        if not any(present):
            others.pop(prefix + "flat", None)
            super()._load_from_state_dict(others, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        first = state_dict[prefix + layout[present.index(True)][0]]
        flat = torch.zeros(self._native.numel, dtype=first.dtype, device=first.device)
        if first.device.type != "meta" and self.flat.device.type != "meta":
            with torch.no_grad():
                flat.copy_(self.flat.detach())  # the values of entries that are missing
        for (name, shape, off), here in zip(layout, present):
            if not here:
                missing_keys.append(prefix + name)
                continue
            value = state_dict[prefix + name]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
                error_msgs.append("size mismatch for %s: copying a param with shape %s, the parameter in the "
                                  "current model is %s" % (prefix + name, list(getattr(value, "shape", ())),
                                                           list(shape)))
                continue
            if first.device.type != "meta":
                with torch.no_grad():
                    flat[off:off + _numel(shape)].copy_(value.reshape(-1))
        others[prefix + "flat"] = flat
        super()._load_from_state_dict(others, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __getstate__(self):
        state = self.__dict__.copy()
        native = state.pop("_native")
        state["_native_state"] = (native.spec, native.noise_calls)
        return state

    def __setstate__(self, state):
        spec, noise_calls = state.pop("_native_state")
        super().__setstate__(state)
        native = Native(spec)
        native.noise_calls = noise_calls
        flat = self._parameters["flat"]
        if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.is_contiguous():
            native.bind(flat.detach())
        self._set_native(native)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n
