#!/usr/bin/python3
"""Tests of the PyTorch bridge (confsmoe.torch): gradcheck, shared parameters, training.

Run:
    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 BLIS_NUM_THREADS=1 \
        /usr/bin/python3 tests/python/test_torch.py -v

gradcheck tolerance. The layer computes in float32; gradcheck perturbs float64 inputs (x and
a float64 copy of every parameter, which the bridge writes into the C weights) by eps and
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
import gc
import unittest

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

import confsmoe  # noqa: F401  (fails early, with the loader's message, if the library is missing)

EPS, ATOL, RTOL = 1e-3, 1e-3, 1e-2


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestGradcheck(unittest.TestCase):
    def check(self, d=4, hidden=5, n=5, seed=3, n_classes=3, exclude=(), **opts):
        from confsmoe.torch import MoELayer, moe_function
        layer = MoELayer(d, hidden=hidden, seed=seed, n_classes=n_classes, **opts)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad="x" not in exclude)
        labels = torch.randint(0, max(n_classes or 1, 1), (n,), generator=g)
        names = [nm for e in layer.c_experts for nm in ["expert." + x for x in e.param_names()]] + \
            ["gate." + nm for nm in layer.c_gate.param_names()]
        params = [p.detach().double().requires_grad_(not any(nm.endswith(ex) for ex in exclude))
                  for nm, p in zip(names, layer._param_list)]

        def f(x, *ps):
            return moe_function(layer, x, labels, None, params=list(ps))

        ok = torch.autograd.gradcheck(f, (x, *params), eps=EPS, atol=ATOL, rtol=RTOL)
        self.assertTrue(ok)
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
        from confsmoe.torch import MoELayer, moe_function
        layer = MoELayer(4, n_experts=3, k=3, n_classes=2, target="multi_label", hidden=3, seed=1)
        x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
        labels = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 1]], dtype=torch.uint8)
        params = [p.detach().double().requires_grad_() for p in layer._param_list]
        self.assertTrue(torch.autograd.gradcheck(
            lambda x, *ps: moe_function(layer, x, labels, None, params=list(ps)), (x, *params),
            eps=EPS, atol=ATOL, rtol=RTOL))

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


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestMoELayer(unittest.TestCase):
    def test_parameters_share_memory_with_c(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=2, seed=1)
        c_params = {("expert.%d." % i) + p.name: p.value for i, e in enumerate(layer.c_experts)
                    for p in e.parameters()}
        c_params.update({"gate." + p.name: p.value for p in layer.c_gate.parameters()})
        self.assertEqual(len(list(layer.parameters())), len(c_params))
        w = layer.expert_params[1].w1
        with torch.no_grad():
            w.fill_(0.25)
        self.assertTrue((c_params["expert.1.w1"] == 0.25).all())  # torch writes are the C weights
        c_params["gate.router.w"][...] = 3.0
        self.assertTrue((layer.gate_params.router_w == 3.0).all())
        sd = layer.state_dict()
        self.assertIn("gate_params.conf_0_ln_weight", sd)
        sd["expert_params.0.b2"] = torch.full_like(sd["expert_params.0.b2"], -1.0)
        layer.load_state_dict(sd)
        self.assertTrue((c_params["expert.0.b2"] == -1.0).all())

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
        self.assertIsNotNone(model["moe"].expert_params[0].w1.grad)
        self.assertIsNotNone(model["enc"].weight.grad)  # dx reaches the encoder
        w_after = model["moe"].c_experts[0].named_parameters()["w1"]
        self.assertFalse(np.array_equal(w_before, w_after))  # torch's Adam moved the C weights
        st = model["moe"].stats()
        self.assertEqual(st["tokens"], 64)

    def test_eval_mode_and_shapes(self):
        from confsmoe.torch import MoELayer
        layer = MoELayer(4, n_experts=3, k=1, combine="router_softmax", seed=0)
        x = torch.randn(2, 3, 4)
        y, aux = layer(x)  # training mode, no labels needed for the softmax gate
        self.assertEqual(y.shape, (2, 3, 4))
        self.assertTrue(y.requires_grad)
        layer.eval()
        y2, aux2 = layer(x)
        self.assertFalse(y2.requires_grad)
        self.assertEqual(aux2.item(), 0.0)
        torch.testing.assert_close(y.detach(), y2)  # no noise, no dropout: the same function
        with self.assertRaises(ValueError):
            layer(torch.randn(2, 5))

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
        # a float64 module computes through copies of its weights and returns float64 grads
        layer64 = MoELayer(4, n_experts=3, k=2, n_classes=2, seed=0).double()
        layer32 = MoELayer(4, n_experts=3, k=2, n_classes=2, seed=0)
        xd = torch.randn(6, 4, dtype=torch.float64)
        y64, a64 = layer64(xd, labels=labels)
        y32, a32 = layer32(xd.float(), labels=labels)
        self.assertEqual(y64.dtype, torch.float64)
        torch.testing.assert_close(y64.float(), y32)
        ((y64 ** 2).sum() + a64).backward()
        ((y32 ** 2).sum() + a32).backward()
        for p64, p32 in zip(layer64.parameters(), layer32.parameters()):
            self.assertEqual(p64.grad.dtype, torch.float64)
            torch.testing.assert_close(p64.grad.float(), p32.grad, rtol=1e-5, atol=1e-6)

    def test_layer_outlives_gc_of_its_parts(self):
        from confsmoe.torch import MoELayer
        params = list(MoELayer(4, n_experts=2, k=1, combine="router_softmax").parameters())
        gc.collect()
        self.assertEqual(float(params[0].detach().abs().sum()) >= 0, True)  # memory still valid
        with torch.no_grad():
            params[0].add_(1.0)


if __name__ == "__main__":
    unittest.main()
