#!/usr/bin/env python3
"""Tests of the PyTorch bridge that need PyTorch >= 2.4 (torch.library.custom_op): torch.compile
(fullgraph) and torch.export of a model with a MoELayer inside, against eager, and the whole
path of a user: train compiled, export, pickle, load into a meta-initialised model.

Under Debian's PyTorch 1.13 every test here skips (the bridge falls back to an autograd.Function
there, tested by test_torch.py); the PyPI venv run (tests/python/pypi_venv.sh) runs them all.

    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 BLIS_NUM_THREADS=1 \
        venv/bin/python tests/python/test_torch2.py -v

Tolerances. The MoE layer is one opaque operator: compiled or exported, it runs the same C calls
on the same inputs, so its outputs are bit-identical to eager. Around it, Inductor compiles the
Linear layers and the loss into its own kernels, whose float32 sums may round differently from
eager's (~1e-7 relative): compiled-vs-eager comparisons use rtol 1e-5 / atol 1e-6, far below any
real difference (a wrong weight or a lost gradient term changes values by > 1e-3). Exported
programs run the same ATen kernels as eager and are compared exactly.
"""
import copy
import io
import unittest

import torch

import confsmoe  # noqa: F401  (fails early, with the loader's message, if the library is missing)

HAVE_CUSTOM_OP = hasattr(torch.library, "custom_op")
RTOL, ATOL = 1e-5, 1e-6
D, C, F = 8, 3, 5


class Net(torch.nn.Module):
    def __init__(self, **moe_options):
        from confsmoe.torch import MoELayer
        super().__init__()
        self.enc = torch.nn.Linear(F, D)
        self.moe = MoELayer(D, n_experts=4, k=2, n_classes=C, **moe_options)
        self.head = torch.nn.Linear(D, C)

    def forward(self, x, labels=None):
        h, aux = self.moe(torch.relu(self.enc(x)), labels=labels)
        return self.head(h), aux


def _data(seed=1, b=4, s=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, F, generator=g)
    labels = ((x[..., 0] > 0).long() + (x[..., 1] > 0.5).long())  # one class per token, learnable
    return x, labels


def _loss(model, x, labels):
    out, aux = model(x, labels)
    return torch.nn.functional.cross_entropy(out.reshape(-1, C), labels.reshape(-1)) + aux


def _train(model, x, labels, steps, lr=0.05):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(model, x, labels)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _torch_load(f):
    return torch.load(f, weights_only=False)


@unittest.skipUnless(HAVE_CUSTOM_OP, "torch.library.custom_op needs PyTorch >= 2.4 (this is %s)" % torch.__version__)
class TestCompileAndExport(unittest.TestCase):
    def assert_grads_close(self, a, b, rtol=RTOL, atol=ATOL):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            self.assertEqual(na, nb)
            self.assertIsNotNone(pa.grad, na)
            torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol, msg=lambda m: "%s: %s" % (na, m))

    def test_the_path_of_a_user(self):
        # train under torch.compile(fullgraph=True), export, pickle, load into a meta-initialised model
        torch.manual_seed(0)
        model = Net()
        eager = copy.deepcopy(model)
        x, labels = _data()
        compiled = torch.compile(model, fullgraph=True)
        # the first steps, compiled and eager, side by side
        opt_c = torch.optim.Adam(model.parameters(), lr=0.05)
        opt_e = torch.optim.Adam(eager.parameters(), lr=0.05)
        for _ in range(3):
            opt_c.zero_grad()
            opt_e.zero_grad()
            loss_c = _loss(compiled, x, labels)
            loss_e = _loss(eager, x, labels)
            loss_c.backward()
            loss_e.backward()
            torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
            self.assert_grads_close(model, eager)
            opt_c.step()
            opt_e.step()
        losses = _train(compiled, x, labels, 60)
        self.assertLess(losses[-1], 0.5 * losses[0], losses)
        # export (eval mode, as for serving) = eager
        model.eval()
        ep = torch.export.export(model, (x,))
        targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
        self.assertIn(torch.ops.confsmoe.moe_forward.default, targets)
        with torch.no_grad():
            want, _ = model(x)
            got, _ = ep.module()(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # pickle the trained model, and load its state into a model built on the meta device
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        restored = _torch_load(buf)
        with torch.device("meta"):
            fresh = Net()
        fresh.load_state_dict(model.state_dict(), assign=True)
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(restored(x)[0], want, rtol=0, atol=0)
            torch.testing.assert_close(fresh(x)[0], want, rtol=0, atol=0)
        # and the restored model trains on, compiled
        restored.train()
        more = _train(torch.compile(restored, fullgraph=True), x, labels, 3)
        self.assertLess(more[-1], losses[0])
        self.assertIsNotNone(restored.moe.flat.grad)

    def test_compiled_inference_equals_eager(self):
        torch.manual_seed(1)
        model = Net().eval()
        compiled = torch.compile(model, fullgraph=True)
        x, _ = _data(2)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x)[0], model(x)[0], rtol=RTOL, atol=ATOL)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x)[0], model(x)[0], rtol=RTOL, atol=ATOL)
        # eval mode with autograd on: the compiled graph keeps the gradient too
        xg = x.clone().requires_grad_()
        xe = x.clone().requires_grad_()
        compiled(xg)[0].square().sum().backward()
        model.zero_grad()
        model(xe)[0].square().sum().backward()
        torch.testing.assert_close(xg.grad, xe.grad, rtol=RTOL, atol=ATOL)

    def test_noisy_gate_compiled_draws_the_noise_of_eager(self):
        # AOTAutograd with the eager backend: the same graph capture, without Inductor's compile time
        torch.manual_seed(2)
        model = Net(noisy=True)
        eager = copy.deepcopy(model)  # the same noise stream, at the same position
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x, labels = _data(3)
        for _ in range(2):
            model.zero_grad()
            eager.zero_grad()
            loss_c, loss_e = _loss(compiled, x, labels), _loss(eager, x, labels)
            loss_c.backward()
            loss_e.backward()
            torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
            self.assert_grads_close(model, eager, rtol=0, atol=0)

    def test_retained_graph_recomputes_under_compile(self):
        torch.manual_seed(3)
        model = Net(noisy=True)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x, labels = _data(4)
        loss = _loss(compiled, x, labels)
        g1 = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        g2 = torch.autograd.grad(loss, list(model.parameters()))  # the saved C state is gone: recomputed
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_exported_training_forward_equals_eager(self):
        torch.manual_seed(4)
        model = Net()
        x, labels = _data(5)
        ep = torch.export.export(model, (x, labels))
        out_ep, aux_ep = ep.module()(x, labels)
        out, aux = model(x, labels)
        torch.testing.assert_close(out_ep, out, rtol=0, atol=0)
        torch.testing.assert_close(aux_ep, aux, rtol=0, atol=0)
        self.assertGreater(float(aux.detach()), 0.0)

    def test_operator_registration(self):
        # torch.library.opcheck: schema, fake kernel, autograd registration. (Its AOT-dispatch
        # check compares two calls' outputs, and the third output, the id that a call's backward
        # finds its saved C state by, differs between calls by design: the tests above run the
        # operator under AOTAutograd and compare with eager instead.)
        from confsmoe.torch import MoELayer
        layer = MoELayer(6, n_experts=3, k=2, n_classes=3, seed=1)
        x = torch.randn(5, 6, requires_grad=True)
        labels = torch.randint(0, 3, (5,))
        result = torch.library.opcheck(torch.ops.confsmoe.moe_forward.default,
                                       (x, layer.flat, labels, None, layer._op_id, True, True),
                                       test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        self.assertEqual(result, {"test_schema": "SUCCESS", "test_autograd_registration": "SUCCESS",
                                  "test_faketensor": "SUCCESS"})


if __name__ == "__main__":
    unittest.main()
