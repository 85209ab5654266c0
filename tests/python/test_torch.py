#!/usr/bin/python3
"""Tests of the PyTorch bridge (confsmoe.torch) on any PyTorch (Debian's 1.13 and 2.x): gradcheck,
shared parameters, training, modes, labels per token, state dicts, seeds, pickling.

Run:
    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 BLIS_NUM_THREADS=1 \
        /usr/bin/python3 tests/python/test_torch.py -v

gradcheck tolerance. The layer computes in float32; gradcheck perturbs float64 inputs (x and
a float64 copy of the flat parameter, which the bridge writes into the C weights) by eps and
compares central differences with the analytical Jacobian. The float32 rounding of the outputs
(|y| ~ 1, unit roundoff 6e-8, a few roundings per output) puts noise of about
6e-8 * |y| / eps on each finite difference, i.e. ~1e-4 at eps = 1e-3, while the truncation error
is O(eps^2) ~ 1e-6. eps = 1e-3 balances the two (measured worst |numerical - analytical|:
2.4e-4 at eps = 1e-2, 7e-5 at 1e-3, 8e-4 at 1e-4). atol = 1e-3 and rtol = 1e-2 leave a
margin of over 10x on the measured error and are still far below the size of any real mistake
(a wrong or missing term moves derivatives of size ~0.1-1 by a comparable amount).
Top-k selection is a constant in backward, so the configurations use k = E (the selection
cannot change under a perturbation) or a fixed seed whose top-k has no near-ties.
"""
import copy
import gc
import inspect
import io
import pickle
import unittest

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

import confsmoe  # noqa: F401  (fails early, with the loader's message, if the library is missing)

EPS, ATOL, RTOL = 1e-3, 1e-3, 1e-2


def _torch_load(f):
    """torch.load of a whole module (PyTorch >= 2.6 defaults to weights_only=True, 1.13 lacks the flag)."""
    try:
        return torch.load(f, weights_only=False)
    except TypeError:
        return torch.load(f)


def _real_indices(layer, exclude=()):
    """Indices of flat that hold parameter elements (not padding) and whose name ends with none of exclude."""
    idx = []
    for name, shape, off in layer._native.layout:
        if any(name.endswith(ex) for ex in exclude):
            continue
        idx.extend(range(off, off + int(np.prod(shape))))
    return torch.tensor(idx, dtype=torch.long)


def _gradcheck_flat(layer, x, labels, exclude=()):
    """gradcheck of moe_function over x and the non-excluded parameter elements, in float64."""
    from confsmoe.torch import moe_function
    base = layer.flat.detach().double()
    idx = _real_indices(layer, exclude)
    free = base[idx].clone().requires_grad_()

    def f(x, free):
        return moe_function(layer, x, labels, None, flat=base.index_put((idx,), free))
    return torch.autograd.gradcheck(f, (x, free), eps=EPS, atol=ATOL, rtol=RTOL)


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestGradcheck(unittest.TestCase):
    def check(self, d=4, hidden=5, n=5, seed=3, n_classes=3, exclude=(), **opts):
        from confsmoe.torch import MoELayer
        layer = MoELayer(d, hidden=hidden, seed=seed, n_classes=n_classes, **opts)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad="x" not in exclude)
        labels = torch.randint(0, max(n_classes or 1, 1), (n,), generator=g)
        self.assertTrue(_gradcheck_flat(layer, x, labels, exclude))
        return layer

    def test_confidence_gate_k_equals_e(self):
        self.check(n_experts=3, k=3)

    def test_tolerance_catches_a_five_percent_error(self):
        # negative control: the same check on a gradient scaled by 1.05 (forward unchanged) fails
        from confsmoe.torch import MoELayer, moe_function
        layer = MoELayer(4, n_experts=3, k=3, n_classes=3, hidden=5, seed=3)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([0, 1, 2, 0, 1])

        def f(x):
            y, loss = moe_function(layer, x, labels)
            return y + 0.05 * (y - y.detach()), loss
        self.assertFalse(torch.autograd.gradcheck(f, (x,), eps=EPS, atol=ATOL, rtol=RTOL, raise_exception=False))

    def test_confidence_gate_top2(self):
        layer = self.check(n_experts=4, k=2, seed=5)
        self.assertEqual(layer.last_topk.shape, (5, 2))

    def test_expert_confidence(self):
        self.check(n_experts=3, k=3, confidence="expert")

    def test_multi_label_target(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(4, n_experts=3, k=3, n_classes=2, target="multi_label", hidden=3, seed=1)
        x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.uint8)
        self.assertTrue(_gradcheck_flat(layer, x, labels))

    def test_router_softmax_with_load_loss(self):
        self.check(n_experts=4, k=2, n_classes=None, combine="router_softmax", load_loss="entropy",
                   load_loss_weight=0.5)

    def test_gaussian_router(self):
        self.check(n_experts=3, k=3, n_classes=None, combine="router_softmax", router="gaussian")

    def test_score_router_gradient_is_a_surrogate(self):
        # Under router_grad="score" the output does not depend on the router (the score term is
        # y_j g_j / stopgrad(g_j) = y_j), but the router still receives a gradient by design
        # (docs/GATES.md), which also flows into x through the router logits: gradcheck holds
        # for every parameter except router.w, and not for x. (detach_target=1 is likewise a
        # deliberate non-gradient and is not gradchecked.)
        self.check(n_experts=3, k=3, router_grad="score", exclude=("x", "router.w"))

    def test_eval_mode_gradient(self):
        # eval() keeps the graph: the gradient of the inference function (no noise, no labels),
        # gradchecked over x and the parameters, noisy gate included
        from confsmoe.torch import MoEFunction, MoELayer
        layer = MoELayer(4, n_experts=3, k=3, n_classes=3, hidden=5, seed=2, noisy=True).eval()
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        base = layer.flat.detach().double()
        idx = _real_indices(layer)
        free = base[idx].clone().requires_grad_()

        def f(x, free):
            return MoEFunction.apply(x, base.index_put((idx,), free), None, None, layer._native, False)
        self.assertTrue(torch.autograd.gradcheck(f, (x, free), eps=EPS, atol=ATOL, rtol=RTOL))
        # and through the module itself, in eval mode
        layer = layer.double()
        self.assertTrue(torch.autograd.gradcheck(lambda x: layer(x)[0], (x,), eps=EPS, atol=ATOL, rtol=RTOL))


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestMoELayer(unittest.TestCase):
    def test_parameters_share_memory_with_c(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=2, seed=1)
        c_params = {("expert.%d." % i) + p.name: p.value for i, e in enumerate(layer.c_experts)
                    for p in e.parameters()}
        c_params.update({"gate." + p.name: p.value for p in layer.c_gate.parameters()})
        self.assertEqual([n for n, _ in layer.named_parameters()], ["flat"])
        views = layer.weights()
        self.assertEqual(sorted(views), sorted(c_params))
        for name, v in views.items():
            self.assertEqual(tuple(v.shape), c_params[name].shape, name)
            np.testing.assert_array_equal(v.detach().numpy(), c_params[name])
        with torch.no_grad():
            views["expert.1.w1"].fill_(0.25)
        self.assertTrue((c_params["expert.1.w1"] == 0.25).all())  # torch writes are the C weights
        c_params["gate.router.w"][...] = 3.0
        self.assertTrue((layer.weights()["gate.router.w"] == 3.0).all())
        sd = layer.state_dict()
        self.assertIn("gate.conf.0.ln.weight", sd)
        self.assertNotIn("flat", sd)
        sd["expert.0.b2"] = torch.full_like(sd["expert.0.b2"], -1.0)
        flat_before = layer.flat
        layer.load_state_dict(sd)
        self.assertIs(layer.flat, flat_before)  # loaded in place
        self.assertTrue((c_params["expert.0.b2"] == -1.0).all())

    def test_state_dict_errors_are_loud(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=2, seed=1)
        sd = layer.state_dict()
        del sd["gate.target.b"]
        with self.assertRaisesRegex(RuntimeError, "gate.target.b"):
            layer.load_state_dict(sd)
        sd = MoELayer(6, n_experts=3, k=2, n_classes=2, seed=1).state_dict()
        sd["expert.2.w1"] = torch.zeros(5, 6)
        with self.assertRaisesRegex(RuntimeError, "size mismatch for expert.2.w1"):
            layer.load_state_dict(sd)

    def test_training_reduces_the_loss(self):
        from confsmoe.torch import MoELayer
        torch.manual_seed(0)
        d, C = 8, 3
        model = torch.nn.ModuleDict({
            "enc": torch.nn.Linear(5, d), "moe": MoELayer(d, n_experts=4, k=2, n_classes=C, seed=2),
            "head": torch.nn.Linear(d, C)})
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 5, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
        w_before = model["moe"].c_experts[0].named_parameters()["w1"].copy()
        losses = []
        for _ in range(40):
            opt.zero_grad()
            h, aux = model["moe"](model["enc"](x), labels=y)
            loss = torch.nn.functional.cross_entropy(model["head"](h), y) + aux
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.assertLess(losses[-1], 0.6 * losses[0])
        self.assertIsNotNone(model["moe"].flat.grad)
        self.assertIsNotNone(model["enc"].weight.grad)  # dx reaches the encoder
        w_after = model["moe"].c_experts[0].named_parameters()["w1"]
        self.assertFalse(np.array_equal(w_before, w_after))  # torch's Adam moved the C weights
        st = model["moe"].stats()
        self.assertEqual(st["tokens"], 64)

    def test_gradient_accumulates_and_equals_the_c_gradient(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(5, n_experts=3, k=2, n_classes=3, seed=4)
        x = torch.randn(7, 5)
        labels = torch.randint(0, 3, (7,))
        y, aux = layer(x, labels=labels)
        (y.sum() + aux).backward()
        g1 = layer.flat.grad.clone()
        # the same call through the numpy API of the same C gate
        out = layer.c_gate.forward(x.numpy(), labels=labels.numpy().astype(np.int32), train=True)
        layer.c_gate.zero_grad(experts=True)
        layer.c_gate.backward(out.saved, np.ones((7, 5), np.float32), dloss=1.0)
        c_grads = {("expert.%d." % i) + n: g for i, e in enumerate(layer.c_experts) for n, g in e.gradients().items()}
        c_grads.update({"gate." + n: g for n, g in layer.c_gate.gradients().items()})
        for name, shape, off in layer._native.layout:
            np.testing.assert_allclose(g1[off:off + int(np.prod(shape))].numpy().reshape(shape), c_grads[name],
                                       rtol=1e-6, atol=1e-7, err_msg=name)
        y, aux = layer(x, labels=labels)
        (y.sum() + aux).backward()
        torch.testing.assert_close(layer.flat.grad, 2 * g1)  # accumulated the torch way

    def test_eval_mode_and_shapes(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(4, n_experts=3, k=1, combine="router_softmax", seed=0)
        x = torch.randn(2, 3, 4)
        y, aux = layer(x)  # training mode, no labels needed for the softmax gate
        self.assertEqual(y.shape, (2, 3, 4))
        self.assertTrue(y.requires_grad)
        layer.eval()
        with torch.no_grad():
            y2, aux2 = layer(x)
        self.assertFalse(y2.requires_grad)
        self.assertEqual(aux2.item(), 0.0)
        torch.testing.assert_close(y.detach(), y2)  # no noise, no dropout: the same function
        with self.assertRaises(ValueError):
            layer(torch.randn(2, 5))

    def test_eval_keeps_the_graph(self):
        # eval() changes the function (no noise, no labels), not autograd: only no_grad detaches
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=4, k=2, n_classes=3, seed=3, noisy=True).eval()
        x = torch.randn(2, 5, 6, requires_grad=True)
        y, aux = layer(x)  # no labels in eval mode
        self.assertTrue(y.requires_grad)
        with torch.no_grad():
            y_ng, _ = layer(x)
        torch.testing.assert_close(y.detach(), y_ng, rtol=0, atol=0)  # the inference function, no noise
        (y ** 2).sum().backward()
        self.assertIsNotNone(x.grad)
        self.assertGreater(float(x.grad.abs().sum()), 0.0)
        self.assertGreater(float(layer.flat.grad.abs().sum()), 0.0)
        self.assertEqual(float(aux.detach()), 0.0)
        # a parameter the layer does not use in eval mode (the noise network) gets a zero gradient
        shape, off = layer._native.offsets["gate.noise.w"]
        self.assertEqual(float(layer.flat.grad[off:off + int(np.prod(shape))].abs().sum()), 0.0)
        # the same input twice: the same output (no noise drawn in eval mode)
        y2, _ = layer(x)
        torch.testing.assert_close(y2.detach(), y_ng, rtol=0, atol=0)

    def test_per_token_labels_of_a_sequence(self):
        # labels [B, S] for x [B, S, d] are one class per token, as for x [B S, d] and labels [B S]
        from confsmoe.torch import MoELayer
        B, S, d, C = 3, 4, 6, 5
        x = torch.randn(B, S, d)
        labels = torch.randint(0, C, (B, S))
        a = MoELayer(d, n_experts=4, k=2, n_classes=C, seed=7)
        b = copy.deepcopy(a)
        ya, aux_a = a(x, labels=labels)
        (ya.sum() + aux_a).backward()
        yb, aux_b = b(x.reshape(B * S, d), labels=labels.reshape(B * S))
        (yb.sum() + aux_b).backward()
        torch.testing.assert_close(ya.reshape(B * S, d), yb)
        torch.testing.assert_close(aux_a, aux_b)
        self.assertGreater(float(aux_a), 0.0)
        torch.testing.assert_close(a.flat.grad, b.flat.grad)
        with self.assertRaisesRegex(ValueError, "one class per token"):
            a(x, labels=torch.randint(0, C, (B,)))
        with self.assertRaisesRegex(TypeError, "integer"):
            a(x, labels=labels.float())
        with self.assertRaisesRegex(ValueError, "labels are needed"):
            a(x)

    def test_multi_label_per_token(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=4, target="multi_label", seed=1)
        x = torch.randn(2, 3, 6)
        labels = torch.randint(0, 2, (2, 3, 4)).float()
        y, aux = layer(x, labels=labels)
        self.assertEqual(y.shape, (2, 3, 6))
        self.assertGreater(float(aux), 0.0)
        with self.assertRaisesRegex(ValueError, "0 or 1"):
            layer(x, labels=labels * 0.5)

    @unittest.skipIf(torch is None or "assign" not in inspect.signature(torch.nn.Module.load_state_dict).parameters,
                     "load_state_dict(assign=True) needs PyTorch >= 2.1")
    def test_load_state_dict_assign_uses_the_loaded_weights(self):
        # assign=True replaces the Parameter: the layer must compute with, and train, the new one
        from confsmoe.torch import MoELayer
        src = MoELayer(6, n_experts=3, k=2, n_classes=3, seed=11)
        dst = MoELayer(6, n_experts=3, k=2, n_classes=3, seed=12)
        x = torch.randn(9, 6)
        labels = torch.randint(0, 3, (9,))
        y_src, aux_src = src(x, labels=labels)
        (y_src.sum() + aux_src).backward()
        sd = {k: v.clone() for k, v in src.state_dict().items()}
        dst.load_state_dict(sd, assign=True)
        y_dst, aux_dst = dst(x, labels=labels)
        torch.testing.assert_close(y_dst, y_src, rtol=0, atol=0)
        (y_dst.sum() + aux_dst).backward()
        self.assertIsNotNone(dst.flat.grad)
        torch.testing.assert_close(dst.flat.grad, src.flat.grad, rtol=0, atol=0)
        # an optimizer step on the loaded Parameter changes what the layer computes
        with torch.no_grad():
            dst.flat.sub_(0.1 * dst.flat.grad)
        y_after, _ = dst(x, labels=labels)
        self.assertFalse(torch.equal(y_after, y_dst))

    @unittest.skipIf(torch is None or not hasattr(torch, "get_default_device"),
                     "torch.device as a context manager needs PyTorch >= 2.3")
    def test_meta_device_init_then_assign(self):
        from confsmoe.torch import MoELayer
        src = torch.nn.Sequential(torch.nn.Linear(4, 6), MoELayer(6, n_experts=3, k=2, n_classes=3, seed=5))
        with torch.device("meta"):
            dst = torch.nn.Sequential(torch.nn.Linear(4, 6), MoELayer(6, n_experts=3, k=2, n_classes=3))
        self.assertEqual(dst[1].flat.device.type, "meta")
        with self.assertRaisesRegex(RuntimeError, "meta device"):
            dst[1](torch.randn(2, 6), labels=torch.tensor([0, 1]))
        dst.load_state_dict(src.state_dict(), assign=True)
        dst.eval()
        src.eval()
        x = torch.randn(8, 4)
        torch.testing.assert_close(dst(x)[0], src(x)[0], rtol=0, atol=0)
        y, _ = dst(x)
        y.sum().backward()
        self.assertIsNotNone(dst[1].flat.grad)
        self.assertGreater(float(dst[1].flat.grad.abs().sum()), 0.0)

    def test_seed_comes_from_torch(self):
        from confsmoe.torch import MoELayer

        def build():
            return torch.nn.Sequential(MoELayer(6, n_experts=3, k=2, n_classes=3),
                                       MoELayer(6, n_experts=3, k=2, n_classes=3))
        torch.manual_seed(123)
        a = build()
        torch.manual_seed(123)
        b = build()
        torch.manual_seed(124)
        c = build()
        self.assertTrue(torch.equal(a[0].flat, b[0].flat))
        self.assertTrue(torch.equal(a[1].flat, b[1].flat))
        self.assertFalse(torch.equal(a[0].flat, a[1].flat))  # stacked layers differ
        self.assertFalse(torch.equal(a[0].flat, c[0].flat))  # another torch seed, other weights
        # an explicit seed still fixes the weights
        self.assertTrue(torch.equal(MoELayer(6, n_experts=3, k=2, n_classes=3, seed=9).flat,
                                    MoELayer(6, n_experts=3, k=2, n_classes=3, seed=9).flat))

    def test_double_module_and_retain_graph(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(4, n_experts=3, k=2, n_classes=2, seed=0, noisy=True)
        x = torch.randn(6, 4, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 1, 1, 0])
        y, aux = layer(x, labels=labels)
        s = (y ** 2).sum() + aux
        g1 = torch.autograd.grad(s, [x] + list(layer.parameters()), retain_graph=True)
        g2 = torch.autograd.grad(s, [x] + list(layer.parameters()))  # recomputed, same noise
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # a float64 module computes through a float32 copy of its weights and returns float64 grads
        layer64 = MoELayer(4, n_experts=3, k=2, n_classes=2, seed=0).double()
        layer32 = MoELayer(4, n_experts=3, k=2, n_classes=2, seed=0)
        xd = torch.randn(6, 4, dtype=torch.float64)
        y64, a64 = layer64(xd, labels=labels)
        y32, a32 = layer32(xd.float(), labels=labels)
        self.assertEqual(y64.dtype, torch.float64)
        torch.testing.assert_close(y64.float(), y32)
        ((y64 ** 2).sum() + a64).backward()
        ((y32 ** 2).sum() + a32).backward()
        self.assertEqual(layer64.flat.grad.dtype, torch.float64)
        torch.testing.assert_close(layer64.flat.grad.float(), layer32.flat.grad, rtol=1e-5, atol=1e-6)

    def test_layer_outlives_gc_of_its_parts(self):
        from confsmoe.torch import MoELayer
        params = list(MoELayer(4, n_experts=2, k=1, combine="router_softmax").parameters())
        gc.collect()
        self.assertEqual(float(params[0].detach().abs().sum()) >= 0, True)  # memory still valid
        with torch.no_grad():
            params[0].add_(1.0)


def _model(seed=0, noisy=False):
    from confsmoe.torch import MoELayer
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), MoELayerBlock(MoELayer(8, n_experts=4, k=2, n_classes=3,
                                                                             noisy=noisy)),
                               torch.nn.Linear(8, 3))


class MoELayerBlock(torch.nn.Module if torch is not None else object):
    """MoELayer in a Sequential: labels come from an attribute, the aux loss goes to one."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe
        self.labels = None
        self.aux = None

    def forward(self, h):
        y, self.aux = self.moe(h, labels=self.labels)
        return y


def _step(model, x, labels):
    model[1].labels = labels
    out = model(x)
    return torch.nn.functional.cross_entropy(out, labels) + model[1].aux


class FeatureDataset(torch.utils.data.Dataset if torch is not None else object):
    """Items computed by a MoELayer (eval mode, no graph) inside DataLoader workers."""

    def __init__(self, layer, x):
        self.layer = layer
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        with torch.no_grad():
            return self.layer(self.x[i:i + 1])[0][0]


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestPickling(unittest.TestCase):
    def assert_same_training_step(self, a, b, x, labels):
        """a and b compute the same loss and gradients; b's gradients reach b's own Parameter."""
        la = _step(a, x, labels)
        la.backward()
        lb = _step(b, x, labels)
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            self.assertEqual(na, nb)
            self.assertIsNot(pa, pb)
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0)

    def test_torch_save_and_load_a_model(self):
        model = _model(1)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = _torch_load(buf)
        x, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
        self.assert_same_training_step(model, loaded, x, labels)

    def test_deepcopy_is_independent(self):
        model = _model(2)
        twin = copy.deepcopy(model)
        x, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
        self.assert_same_training_step(model, twin, x, labels)
        with torch.no_grad():
            twin[1].moe.flat.mul_(2.0)
        self.assertFalse(torch.equal(model[1].moe.flat, twin[1].moe.flat))
        model.eval()
        twin.eval()
        model[1].labels = twin[1].labels = None
        self.assertFalse(torch.equal(model(x), twin(x)))  # the copy's C weights are its own

    def test_pickle_keeps_the_noise_stream(self):
        # a noisy layer's copy draws the same noise as the original from the same position
        model = _model(3, noisy=True)
        x, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
        _step(model, x, labels)  # move the stream
        clone = pickle.loads(pickle.dumps(model))
        la, lb = _step(model, x, labels), _step(clone, x, labels)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)
        la2, lb2 = _step(model, x, labels), _step(clone, x, labels)
        torch.testing.assert_close(la2, lb2, rtol=0, atol=0)
        self.assertNotEqual(float(la), float(la2))  # and the stream moves: fresh noise per call

    def test_averaged_model(self):
        from torch.optim.swa_utils import AveragedModel
        model = _model(4)
        avg = AveragedModel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, labels = torch.randn(10, 5), torch.randint(0, 3, (10,))
        snapshots = []
        for _ in range(3):
            opt.zero_grad()
            _step(model, x, labels).backward()
            opt.step()
            avg.update_parameters(model)
            snapshots.append(model[1].moe.flat.detach().clone())
        mean = torch.stack(snapshots).mean(0)
        torch.testing.assert_close(avg.module[1].moe.flat.detach(), mean)
        # the average's layer computes with the averaged weights
        ref = _model(99)
        ref.load_state_dict(avg.module.state_dict())
        avg.eval()
        ref.eval()
        avg.module[1].labels = ref[1].labels = None
        torch.testing.assert_close(avg(x), ref(x), rtol=0, atol=0)

    def test_dataloader_with_spawned_workers(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=3, seed=8).eval()
        x = torch.randn(12, 6)
        with torch.no_grad():  # item by item, as the workers compute them
            want = torch.stack([layer(x[i:i + 1])[0][0] for i in range(len(x))])
        loader = torch.utils.data.DataLoader(FeatureDataset(layer, x), batch_size=4, num_workers=2,
                                             multiprocessing_context="spawn")
        got = torch.cat(list(loader))
        torch.testing.assert_close(got, want, rtol=0, atol=0)


if __name__ == "__main__":
    unittest.main()
