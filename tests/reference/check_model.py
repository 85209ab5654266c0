#!/usr/bin/python3
"""Checks that the vectorised float32 training model of torch_train.py computes what the library
computes: one training step of libconfsmoe (dropout 0) and of torch_train.ConfSMoE (run in
float64 with the library's own parameters, copied by name) must give the same logits, loss and
gradient of every parameter, for each gate, both imputations and M = 2, 3, 6 (stage 2 keeps
T = 1 of M - 1 keys), one token per modality; then, with the confidence and softmax gates and
two-stage imputation, sequences (S = 3 and 4, M = 2 and 3; and per-modality S_m = 8, 4 and
8, 1, 4, where T_m differs between modalities) with both write-backs of imputed tokens (LN_IMP
and RESIDUAL). The pools have identical rows so the stage-1 draws do not matter.

    CONFSMOE_LIBRARY=build/lib/libconfsmoe.so BLIS_NUM_THREADS=1 /usr/bin/python3 tests/reference/check_model.py

Uses the ctypes layer of tests/parity/model_parity.py. Tolerance: rel(T) = max|T_lib - T_ref| /
max(max|T_ref|, 1e-6) <= 1e-4 per tensor (key biases against the key weights' gradient, as there).
"""
import ctypes
import os
import sys
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "parity"))
sys.path.insert(0, HERE)
import model_parity as mp  # noqa: E402  (sets torch's default dtype to float64)
import torch_train as tt  # noqa: E402

torch.set_default_dtype(torch.float64)
GATES = {mp.GATE_CONFIDENCE: "confidence", mp.GATE_SOFTMAX: "softmax", mp.GATE_GAUSSIAN: "gaussian",
         mp.GATE_LAPLACIAN: "laplacian"}


def torch_params(model):
    """library parameter name -> the torch tensor that holds it (a view for the per-expert stacks)."""
    g = model.gate
    out = {"pos": model.pos, "gate.router.w": g.router}
    for m, enc in enumerate(model.enc):
        out["enc.%d.w" % m], out["enc.%d.b" % m] = enc.w, enc.b
    for ln in ("ln1", "ln2", "ln3", "ln_out"):
        out[ln + ".weight"], out[ln + ".bias"] = getattr(model, ln).weight, getattr(model, ln).bias
    for a, mod in (("q", model.q), ("k", model.kk), ("v", model.v), ("o", model.o)):
        out["attn.%s.w" % a], out["attn.%s.b" % a] = mod.w, mod.b
    for lin, name in ((model.readout, "readout"), (model.head, "head")):
        out[name + ".w"], out[name + ".b"] = lin.w, lin.b
    if g.kind == "confidence":
        out["gate.target.w"], out["gate.target.b"] = g.target.w, g.target.b
    if hasattr(model, "imp_q"):
        out["imputer.q.w"], out["imputer.q.b"] = model.imp_q.w, model.imp_q.b
        out["imputer.kv.w"], out["imputer.kv.b"] = model.imp_kv.w, model.imp_kv.b
        if hasattr(model, "imp_ln"):
            out["imputer.ln.weight"], out["imputer.ln.bias"] = model.imp_ln.weight, model.imp_ln.bias
    return out


def per_expert(model, E):
    g = model.gate
    out = {}
    for e in range(E):
        out["expert.%d.w1" % e] = (g.w1, e)
        out["expert.%d.b1" % e] = (g.b1, e)
        out["expert.%d.w2" % e] = (g.w2, e)
        out["expert.%d.b2" % e] = (g.b2, e)
        if g.kind == "confidence":
            out["gate.conf.%d.ln.weight" % e] = (g.conf_g, e)
            out["gate.conf.%d.ln.bias" % e] = (g.conf_b, e)
            out["gate.conf.%d.w" % e] = (g.conf_v, e)
            out["gate.conf.%d.b" % e] = (g.conf_beta, e)
    return out


class CheckModel(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        path = os.environ.get("CONFSMOE_LIBRARY")
        if not path:
            raise unittest.SkipTest("set CONFSMOE_LIBRARY to libconfsmoe.so")
        cls.lib, missing = mp.load_lib(path)
        if missing:
            raise RuntimeError("library lacks %s" % missing)

    def one(self, gate, imputation, M, seed, S=1, writeback=mp.WRITEBACK_LN_IMP):
        lib = self.lib
        c = mp.cfg(M=M, S=S, B=16, d=16, heads=4, E=4, k=2, C=5, gate=gate, imputation=imputation, avail="some",
                   pool_rows=3, seed=seed, writeback=writeback)
        rs = np.random.RandomState(seed)
        lm = mp.LibModel(lib, c)
        w = mp.gp.Wrapped(lib, lm.ctx)
        try:
            names = lm.params()
            for n, i in names.items():  # randomise the constant inits, as model_parity does
                view = mp.tensor_view(lib, lib.model_param(lm.model, i))
                if n.endswith(".weight"):
                    view[...] = (1.0 + 0.3 * rs.randn(*view.shape)).astype(np.float32)
                elif n.endswith(".bias") or n == "pos":
                    view[...] = (0.3 * rs.randn(*view.shape)).astype(np.float32)
            params = {n: lib.read(lib.model_param(lm.model, i)) for n, i in names.items()}
            B = c["B"]
            tok = [(s,) if s > 1 else () for s in mp.tokens_of(c)]
            xs = [np.ascontiguousarray((0.7 * rs.randn(B, *t, f)).astype(np.float32)) for t, f in zip(tok, c["F"])]
            rows = [(0.7 * rs.randn(*t, f)).astype(np.float32) for t, f in zip(tok, c["F"])]
            pools = [np.ascontiguousarray(np.repeat(r[None], 3, 0)) for r in rows]
            avail = np.ascontiguousarray(mp.make_avail(c, rs))
            labels = rs.randint(0, c["C"], size=B).astype(np.int32)
            for m in range(M):
                lib.check(lib.model_set_pool(lm.model, m, w(pools[m], mp.F32)), lm.ctx, "set_pool")
            in_t = (mp.P * M)(*[w(x, mp.F32) for x in xs])
            logits = np.zeros((B, c["C"]), np.float32)
            loss, task = ctypes.c_float(), ctypes.c_float()
            lib.model_zero_grad(lm.model)
            lib.check(lib.model_step(lm.model, in_t, w(avail, mp.U8), w(labels, mp.I32), w(logits, mp.F32),
                                     ctypes.byref(loss), ctypes.byref(task)), lm.ctx, "model_step")
            grads = {n: lib.read(lib.model_grad(lm.model, i)) for n, i in names.items()}
        finally:
            w.close()
            lm.close()

        model = tt.ConfSMoE(c["F"], c["C"], GATES[gate], "mean" if imputation == mp.IMPUTE_MEAN else "two-stage",
                            d=16, heads=4, E=4, k=2, hidden=0, dropout=0.0, draws=10, tokens=mp.tokens_of(c),
                            writeback="residual" if writeback == mp.WRITEBACK_RESIDUAL else "ln-imp")
        tp, pe = torch_params(model), per_expert(model, 4)
        with torch.no_grad():
            for n, v in params.items():
                if n in tp:
                    tp[n].copy_(torch.from_numpy(v.astype(np.float64)).reshape(tp[n].shape))
                elif n in pe:
                    t, e = pe[n]
                    t[e].copy_(torch.from_numpy(v.astype(np.float64)).reshape(t[e].shape))
                else:
                    self.fail("library parameter %s has no counterpart" % n)
        self.assertEqual(sum(p.numel() for p in model.parameters()), sum(v.size for v in params.values()))
        model.set_pools([p.astype(np.float64) for p in pools])
        model.train()
        out, l_conf, _ = model([torch.from_numpy(x.astype(np.float64)) for x in xs], torch.from_numpy(avail.astype(bool)),
                               torch.from_numpy(labels.astype(np.int64)))
        ref_task = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels.astype(np.int64)))
        ref_loss = ref_task + l_conf
        model.zero_grad()
        ref_loss.backward()
        errs = {"logits": mp.rel_err(logits, out.detach().numpy()),
                "loss": mp.rel_err(np.float32(loss.value), ref_loss.item()),
                "task": mp.rel_err(np.float32(task.value), ref_task.item())}
        for n, g in grads.items():
            if n in tp:
                rg = tp[n].grad
            else:
                t, e = pe[n]
                rg = t.grad[e] if t.grad is not None else None
            rg = np.zeros(g.shape) if rg is None else rg.detach().numpy().reshape(g.shape)
            if n in ("attn.k.b",):
                scale = max(float(np.max(np.abs(tp["attn.k.w"].grad.numpy()))), 1e-6)
                errs["grad " + n] = float(np.max(np.abs(g - rg))) / scale
            else:
                errs["grad " + n] = mp.rel_err(g, rg)
        bad = {k: v for k, v in errs.items() if not v <= 1e-4}
        return max(errs.values()), bad

    def test_all(self):
        worst = 0.0
        failures = []
        for gate in GATES:
            for imp in (mp.IMPUTE_TWO_STAGE, mp.IMPUTE_MEAN):
                for M in (2, 3, 6):
                    for seed in (1, 2):
                        wmax, bad = self.one(gate, imp, M, seed)
                        worst = max(worst, wmax)
                        if bad:
                            failures.append("%s %s M=%d seed %d: %s" % (GATES[gate], imp, M, seed, bad))
        print("\n[check_model] worst relative error %.3g over 48 configurations" % worst, file=sys.stderr)
        if failures:
            self.fail("\n".join(failures))

    def test_sequences_writeback(self):
        worst = 0.0
        failures = []
        n = 0
        for gate in (mp.GATE_CONFIDENCE, mp.GATE_SOFTMAX):
            for writeback in (mp.WRITEBACK_LN_IMP, mp.WRITEBACK_RESIDUAL):
                for M, S in ((2, 4), (3, 3), (2, [8, 4]), (3, [8, 1, 4])):
                    for seed in (1, 2):
                        wmax, bad = self.one(gate, mp.IMPUTE_TWO_STAGE, M, seed, S=S, writeback=writeback)
                        worst = max(worst, wmax)
                        n += 1
                        if bad:
                            failures.append("%s writeback %d M=%d S=%s seed %d: %s"
                                            % (GATES[gate], writeback, M, S, seed, bad))
        print("\n[check_model] sequences: worst relative error %.3g over %d configurations" % (worst, n),
              file=sys.stderr)
        if failures:
            self.fail("\n".join(failures))


if __name__ == "__main__":
    unittest.main()
