#!/usr/bin/python3
"""Parity test: libconfsmoe's full model against an independent PyTorch float64 model.

Run:
    CONFSMOE_LIBRARY=/path/to/libconfsmoe.so BLIS_NUM_THREADS=1 /usr/bin/python3 tests/parity/model_parity.py -v

The PyTorch side is written from docs/MODEL.md (sections 1-6) and the comments of
include/confsmoe.h only (the "model", "imputer" and "gate" sections), never from
lib/model.c, lib/imputer.c or lib/gate.c. It uses plain torch ops and autograd in
float64, starting from the library's own float32 parameters, read by name through
confsmoe_model_param after the degenerate ones (pos = 0, LayerNorm gamma = 1 / beta = 0)
were overwritten with random values in the library.

What is compared, per configuration: the logits of confsmoe_model_step and of
confsmoe_model_predict, the total and the task loss of the step, and the gradient of
EVERY model parameter, by name. The error measure is gate_parity.py's:
    rel(T) = max|T_lib - T_ref| / max(max|T_ref|, 1e-6)      (<= 1e-4 for every tensor)
and a tensor that is exactly zero in the reference (a frozen router, an expert with no
tokens, the imputer without missing modalities) must be <= 1e-10 in the library.
Exception: the key biases (attn.k.b, and imputer.kv.b with separate_value) have an
analytically zero gradient (a softmax row is invariant to q . b_k); both sides hold only
rounding noise, so their difference is scaled by the key weight's gradient instead.

The reference model (docs/MODEL.md, section 6 as the header documents it):
    stage 1: missing x_m[b] = pool mean (IMPUTE_MEAN), or the mean of `draws` distinct pool
             rows (TWO_STAGE; the test's pools have identical rows so the draws do not matter)
    tokens_m = x_m W_m^T + b_m [B, S_m, d];  X = concat_m tokens_m (l = o_m + s, o_m = sum_{m'<m} S_m') + pos
    A = MHA(LN1(X)) (heads, per-head softmax(Q K^T / sqrt(d/heads)) V, no mask, dropout 0)
    H = X + A   (compat: A + A)
    per modality m (tokens b S_m + s): Z = LN2(H_m); F, slots, loss_m = gate(Z, labels of the
             sample, present = avail[b, m]); H_m <- LN3(H_m + F)
    stage 2 (TWO_STAGE) for missing (b, m): the imputer section of the header, over the tokens
             of the present m' != m, T_m = max(1, floor(sum_{m' != m} S_m' / 4)) by default; the
             row becomes LN_imp(H_m + Ihat) with H_m the LN3 output above (writeback LN_IMP), or
             LN3(H_m + Ihat) with H_m the LN3 input's residual, the MoE output dropped (RESIDUAL)
    r = readout(concat_m mean over the S_m tokens of H_m); logits = head(LN_out(r))
    loss = CE (or BCE over B*C) + sum_m w_m loss_m,  w_m = present tokens of m (present samples x
             S_m) / present tokens of the batch (compat: 1/M)
Every LayerNorm has eps 1e-5.

Top-k. The model does not expose its top-k indices, so the reference takes its own from
float64 logits (ties to the lower index) and records the smallest gap between the k-th
and the (k+1)-th logit (and between the T-th and (T+1)-th stage-2 weight); configurations
are seeded away from near-ties. As a cross-check, the gate's accumulated expert loads
(confsmoe_gate_stats_get TOTAL over the step's M calls) must equal the reference's.
"""
import ctypes
import math
import os
import sys
import time
import unittest

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gate_parity as gp  # noqa: E402  (ctypes layer, error measure, gate constants)

torch.set_default_dtype(torch.float64)

TOL = gp.TOL
rel_err = gp.rel_err
P = gp.P
ST = gp.ST
I64P = gp.I64P
F32, I32, U8 = gp.F32, gp.I32, gp.U8

GATE_CONFIDENCE, GATE_SOFTMAX, GATE_GAUSSIAN, GATE_LAPLACIAN = 0, 1, 2, 3
IMPUTE_TWO_STAGE, IMPUTE_MEAN = 0, 1
GATE_NAMES = {0: "conf", 1: "softmax", 2: "gaussian", 3: "laplacian"}
IMPUTE_NAMES = {0: "two-stage", 1: "mean"}
STATS_TOTAL = 1

# ----------------------------------------------------------------------------- ctypes layer

from confsmoe._lib import ModelParams  # noqa: E402  (the bindings' mirror; gate_parity put them on sys.path)

_MODEL_SIGNATURES = {
    "confsmoe_model_params_init_sized": (None, [ctypes.POINTER(ModelParams), ctypes.c_size_t]),
    "confsmoe_sizeof_model_params": (ctypes.c_size_t, []),
    "confsmoe_model_create": (ST, [P, ctypes.POINTER(ModelParams), ctypes.POINTER(P)]),
    "confsmoe_model_destroy": (None, [P]),
    "confsmoe_model_set_pool": (ST, [P, ctypes.c_int32, P]),
    "confsmoe_model_step": (ST, [P, ctypes.POINTER(P), P, P, P, ctypes.POINTER(ctypes.c_float),
                                 ctypes.POINTER(ctypes.c_float)]),
    "confsmoe_model_predict": (ST, [P, ctypes.POINTER(P), P, P]),
    "confsmoe_model_n_params": (ctypes.c_int32, [P]),
    "confsmoe_model_param_name": (ctypes.c_char_p, [P, ctypes.c_int32]),
    "confsmoe_model_param": (P, [P, ctypes.c_int32]),
    "confsmoe_model_grad": (P, [P, ctypes.c_int32]),
    "confsmoe_model_zero_grad": (None, [P]),
    "confsmoe_model_gate": (P, [P]),
}


def load_lib(path):
    lib = gp.Lib(path)
    missing = []
    for name, (restype, argtypes) in _MODEL_SIGNATURES.items():
        try:
            fn = getattr(lib.dll, name)
        except AttributeError:
            missing.append(name)
            continue
        fn.restype = restype
        fn.argtypes = argtypes
        setattr(lib, name[len("confsmoe_"):], fn)
    if not missing:
        # The header's confsmoe_model_params_init(p) macro: init_sized with this mirror's size.
        lib.model_params_init = lambda p: lib.model_params_init_sized(p, ctypes.sizeof(ModelParams))
    return lib, missing


def tensor_view(lib, t):
    """A numpy float32 view of a library tensor's own memory (through confsmoe_tensor_data)."""
    shape = tuple(lib.tensor_dim(t, a) for a in range(lib.tensor_ndim(t)))
    n = int(np.prod(shape)) if shape else 1
    ptr = lib.tensor_data(t)
    assert ptr, "tensor_data returned NULL"
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(ptr)).reshape(shape)


# ----------------------------------------------------------------------------- configurations

BASE = dict(M=2, F=None, S=1, B=4, d=8, heads=2, E=2, k=1, h=0, C=3, gate=GATE_CONFIDENCE,
            load_loss=gp.LOAD_NONE, llw=0.01, clw=1.0, confidence=gp.CONFIDENCE_TOKEN,
            router_grad=gp.RG_FROZEN, detach=0, imputation=IMPUTE_MEAN, draws=10, pool_rows=1,
            top_t=0, renorm=0, sepv=0, multilabel=0, compat=0, avail="all", seed=1, x_scale=0.7, writeback=0)

WRITEBACK_LN_IMP, WRITEBACK_RESIDUAL = 0, 1


def cfg(**kw):
    """S is one int (every modality, through `tokens`) or a list of S_m (modality_tokens)."""
    c = dict(BASE)
    for key in kw:
        assert key in BASE, key
    c.update(kw)
    if c["F"] is None:
        c["F"] = [3 + (2 * m) % 5 for m in range(c["M"])]
    assert len(c["F"]) == c["M"]
    assert isinstance(c["S"], int) or len(c["S"]) == c["M"]
    return c


def tokens_of(c):
    """S_m of every modality."""
    return [c["S"]] * c["M"] if isinstance(c["S"], int) else list(c["S"])


def cfg_name(c):
    s = "M%d F%s S%s B%d d%d heads%d E%d k%d C%d %s" % (
        c["M"], "/".join(str(f) for f in c["F"]), c["S"] if isinstance(c["S"], int) else
        "(" + ",".join(str(t) for t in c["S"]) + ")", c["B"], c["d"], c["heads"], c["E"], c["k"], c["C"],
        GATE_NAMES[c["gate"]])
    if c["h"]:
        s += " h%d" % c["h"]
    if c["gate"] == GATE_CONFIDENCE:
        if c["confidence"] == gp.CONFIDENCE_EXPERT:
            s += " expert-conf"
        if c["router_grad"] != gp.RG_FROZEN:
            s += " rg=" + gp.RG_NAMES[c["router_grad"]]
        if c["detach"]:
            s += " detach"
    if c["load_loss"] != gp.LOAD_NONE:
        s += " load=%s llw=%g" % (gp.LOAD_NAMES[c["load_loss"]], c["llw"])
    if c["clw"] != 1.0:
        s += " clw=%g" % c["clw"]
    s += " %s avail=%s" % (IMPUTE_NAMES[c["imputation"]], c["avail"] if isinstance(c["avail"], str) else "custom")
    if c["imputation"] == IMPUTE_TWO_STAGE:
        s += " pool=%dx draws=%d" % (c["pool_rows"], c["draws"])
        if c["top_t"]:
            s += " T=%d" % c["top_t"]
        if c["renorm"]:
            s += " renorm"
        if c["sepv"]:
            s += " sepv"
        if c["writeback"] == WRITEBACK_RESIDUAL:
            s += " writeback=residual"
    if c["multilabel"]:
        s += " multilabel"
    if c["compat"]:
        s += " compat"
    return s + " seed=%d" % c["seed"]


def build_configs():
    C = []
    TS = IMPUTE_TWO_STAGE
    # The confidence gate, mean imputation, every availability pattern.
    C.append(cfg(M=2, B=4, d=8, heads=2, E=2, k=1, C=3, avail="all", seed=1))
    C.append(cfg(M=2, B=1, d=8, heads=4, E=2, k=2, C=4, avail="all", seed=2))
    C.append(cfg(M=2, B=1, d=8, heads=2, E=4, k=2, C=3, avail=[[1, 0]], seed=3))
    C.append(cfg(M=2, B=4, d=16, heads=4, E=4, k=2, C=4, avail="some", seed=4))
    C.append(cfg(M=3, B=7, d=16, heads=4, E=4, k=2, C=5, avail="mod_all_missing", seed=5))
    C.append(cfg(M=3, B=7, d=8, heads=2, E=4, k=1, C=3, avail="one_sample", seed=6))
    C.append(cfg(M=3, S=2, B=4, d=8, heads=2, E=2, k=2, C=4, avail="some", h=12, seed=7))
    # The confidence gate's options.
    C.append(cfg(M=2, B=7, d=8, heads=2, E=4, k=2, C=3, avail="some", confidence=gp.CONFIDENCE_EXPERT, seed=8))
    C.append(cfg(M=3, B=4, d=16, heads=2, E=4, k=2, C=5, avail="some", router_grad=gp.RG_SCORE, detach=1,
                 clw=0.5, seed=9))
    C.append(cfg(M=3, B=4, d=8, heads=4, E=2, k=1, C=4, avail="some", multilabel=1, seed=10))
    # Two-stage imputation (single-row or identical-row pools).
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=3, avail="some", imputation=TS, seed=11))
    C.append(cfg(M=3, B=7, d=16, heads=4, E=2, k=2, C=4, avail="one_sample", imputation=TS, pool_rows=3,
                 draws=2, seed=12))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=1, C=5, avail="mod_all_missing", imputation=TS, seed=13))
    C.append(cfg(M=2, B=4, d=8, heads=2, E=2, k=2, C=3, avail="some", imputation=TS, seed=14))
    C.append(cfg(M=3, S=2, B=4, d=16, heads=4, E=4, k=2, C=4, avail="some", imputation=TS, seed=15))
    # Every missing row has L = 4 candidates of which T = 2 are kept, so renormalising matters.
    C.append(cfg(M=3, S=2, B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, top_t=2, renorm=1, sepv=1,
                 avail=[[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], seed=30))
    C.append(cfg(M=6, F=[2, 3, 4, 2, 3, 5], B=4, d=8, heads=2, E=2, k=1, C=3, avail="some", imputation=TS,
                 seed=17))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=4, avail="some", imputation=TS, multilabel=1, seed=18))
    # compat: H = A + A, the gate's dispatch and denominator, the imputer's zero query and double LN.
    # Sample 0 misses modality 0 (its query is computed) but not modalities 1, 2 (zero query: every
    # candidate gets the same weight 1/L, so T = 2 keeps both candidates and there is no exact tie).
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, compat=1, top_t=2,
                 avail=[[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], seed=19))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, compat=1,
                 avail=[[0, 1, 1], [1, 0, 0], [0, 1, 0], [1, 1, 1]], seed=27))
    # Router-softmax baselines.
    C.append(cfg(M=2, B=4, d=8, heads=2, E=2, k=1, C=3, gate=GATE_SOFTMAX, avail="all", seed=20))
    C.append(cfg(M=3, B=7, d=16, heads=4, E=4, k=2, C=5, gate=GATE_SOFTMAX, avail="some", seed=21))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=4, gate=GATE_SOFTMAX, avail="one_sample", imputation=TS,
                 seed=22))
    C.append(cfg(M=3, B=7, d=8, heads=2, E=4, k=2, C=3, gate=GATE_SOFTMAX, avail="some", load_loss=gp.LOAD_CV,
                 llw=0.1, seed=23))
    C.append(cfg(M=2, B=4, d=16, heads=4, E=4, k=2, C=4, gate=GATE_SOFTMAX, avail="mod_all_missing",
                 load_loss=gp.LOAD_ENTROPY, llw=0.1, seed=24))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=3, gate=GATE_GAUSSIAN, avail="some", seed=25))
    C.append(cfg(M=2, B=4, d=16, heads=4, E=2, k=1, C=5, gate=GATE_LAPLACIAN, avail="some", imputation=TS,
                 seed=26))
    # Per-modality S_m: the attention over L = sum S_m, the MoE per modality, the readout means,
    # stage 2 with the candidates of the present m' and T_m = max(1, floor(sum_{m' != m} S_m' / 4)).
    ragged = [1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 1, 0], [1, 1, 1]
    for gate, seed in ((GATE_CONFIDENCE, 40), (GATE_SOFTMAX, 41), (GATE_GAUSSIAN, 42), (GATE_LAPLACIAN, 43)):
        C.append(cfg(M=3, S=[3, 1, 2], B=5, d=8, heads=2, E=4, k=2, C=3, gate=gate, avail=list(ragged),
                     imputation=TS, seed=seed))
        C.append(cfg(M=3, S=[3, 1, 2], B=5, d=8, heads=2, E=4, k=2, C=3, gate=gate, avail=list(ragged), seed=seed))
    # T_m differs per missing modality: S = (9, 2, 3) gives T_0 = 1, T_1 = 3, T_2 = 2.
    C.append(cfg(M=3, S=[9, 2, 3], B=5, d=8, heads=2, E=4, k=2, C=4, avail=list(ragged), imputation=TS,
                 renorm=1, sepv=1, seed=44))
    C.append(cfg(M=2, S=[5, 2], B=4, d=8, heads=2, E=2, k=1, C=3, avail="mod_all_missing", imputation=TS,
                 pool_rows=3, draws=2, multilabel=1, seed=45))
    C.append(cfg(M=3, S=[2, 4, 1], B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, compat=1, top_t=2,
                 avail=[[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], seed=46))
    # The residual write-back: H_m <- LN3(H_m + Ihat), with sequences, M = 2 and 3 (the LN_IMP ones above).
    RES = WRITEBACK_RESIDUAL
    C.append(cfg(M=2, S=3, B=4, d=8, heads=2, E=4, k=2, C=3, avail="some", imputation=TS, writeback=RES, seed=40))
    C.append(cfg(M=3, S=2, B=4, d=16, heads=4, E=4, k=2, C=4, avail="some", imputation=TS, writeback=RES, seed=41))
    C.append(cfg(M=3, S=2, B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, top_t=2, renorm=1, sepv=1,
                 avail=[[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], writeback=RES, seed=42))
    C.append(cfg(M=3, S=2, B=4, d=8, heads=2, E=4, k=2, C=3, gate=GATE_SOFTMAX, avail="one_sample", imputation=TS,
                 writeback=RES, seed=43))
    C.append(cfg(M=3, B=4, d=8, heads=2, E=4, k=2, C=3, imputation=TS, compat=1, top_t=2,
                 avail=[[0, 1, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]], writeback=RES, seed=44))
    # LN_IMP with a longer sequence and M = 2 (T = 1 of 4 candidates).
    C.append(cfg(M=2, S=4, B=4, d=8, heads=2, E=4, k=2, C=3, avail="some", imputation=TS, seed=45))
    # The residual write-back with per-modality S_m.
    C.append(cfg(M=3, S=[3, 1, 2], B=5, d=8, heads=2, E=4, k=2, C=3, avail=[[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 1, 0],
                 [1, 1, 1]], imputation=TS, writeback=RES, seed=47))
    return C


def make_avail(c, rs):
    B, M = c["B"], c["M"]
    a = c["avail"]
    if not isinstance(a, str):
        out = np.array(a, np.uint8)
        assert out.shape == (B, M)
        return out
    out = np.ones((B, M), np.uint8)
    if a == "all":
        pass
    elif a == "mod_all_missing":
        out[:, M - 1] = 0
    elif a == "one_sample":
        out[B // 2, 0] = 0
    elif a == "some":
        # Random holes; every sample keeps at least one modality; some sample is complete.
        for _ in range(100):
            out = (rs.rand(B, M) < 0.6).astype(np.uint8)
            for b in range(B):
                if out[b].sum() == 0:
                    out[b, rs.randint(M)] = 1
            if B > 1:
                out[B - 1] = 1
            if (out == 0).any():
                break
    else:
        raise ValueError(a)
    assert out.sum(1).min() >= 1
    return out


# ----------------------------------------------------------------------------- library side


class LibModel:
    def __init__(self, lib, c):
        self.lib, self.c = lib, c
        p = gp.CtxParams()
        lib.ctx_params_init(ctypes.byref(p))
        p.seed = c["seed"]
        self.ctx = P()
        self.model = P()
        lib.check(lib.ctx_create(ctypes.byref(p), ctypes.byref(self.ctx)), None, "ctx_create")
        mp = ModelParams()
        lib.model_params_init(ctypes.byref(mp))
        self.features = (ctypes.c_int64 * c["M"])(*c["F"])
        mp.n_modalities = c["M"]
        mp.features = self.features
        if isinstance(c["S"], int):
            mp.tokens = c["S"]
        else:  # modality_tokens (tokens is then ignored)
            self.tokens = (ctypes.c_int64 * c["M"])(*c["S"])
            mp.modality_tokens = self.tokens
        mp.d, mp.heads = c["d"], c["heads"]
        mp.n_experts, mp.k, mp.expert_hidden = c["E"], c["k"], c["h"]
        mp.n_classes, mp.multilabel, mp.gate = c["C"], c["multilabel"], c["gate"]
        mp.load_loss, mp.load_loss_weight, mp.conf_loss_weight = c["load_loss"], c["llw"], c["clw"]
        mp.confidence, mp.router_grad, mp.detach_target = c["confidence"], c["router_grad"], c["detach"]
        mp.noisy = 0
        mp.imputation, mp.draws, mp.top_t = c["imputation"], c["draws"], c["top_t"]
        mp.renormalize, mp.separate_value = c["renorm"], c["sepv"]
        mp.dropout = 0.0
        mp.compat = c["compat"]
        mp.writeback = c["writeback"]
        lib.check(lib.model_create(self.ctx, ctypes.byref(mp), ctypes.byref(self.model)), self.ctx, "model_create")

    def params(self):
        return {self.lib.model_param_name(self.model, i).decode(): i for i in range(self.lib.model_n_params(self.model))}

    def close(self):
        if self.model:
            self.lib.model_destroy(self.model)
        self.lib.ctx_destroy(self.ctx)


def expected_shapes(c):
    M, d, E, C, F = c["M"], c["d"], c["E"], c["C"], c["F"]
    h = c["h"] or d
    sh = {}
    for m in range(M):
        sh["enc.%d.w" % m] = (d, F[m])
        sh["enc.%d.b" % m] = (d,)
    sh["pos"] = (sum(tokens_of(c)), d)
    for ln in ("ln1", "ln2", "ln3", "ln_out"):
        sh[ln + ".weight"] = (d,)
        sh[ln + ".bias"] = (d,)
    for p in ("q", "k", "v", "o"):
        sh["attn.%s.w" % p] = (d, d)
        sh["attn.%s.b" % p] = (d,)
    for e in range(E):
        sh["expert.%d.w1" % e] = (h, d)
        sh["expert.%d.b1" % e] = (h,)
        sh["expert.%d.w2" % e] = (d, h)
        sh["expert.%d.b2" % e] = (d,)
    sh["gate.router.w"] = (d, E)
    if c["gate"] == GATE_CONFIDENCE:
        for e in range(E):
            sh["gate.conf.%d.ln.weight" % e] = (d,)
            sh["gate.conf.%d.ln.bias" % e] = (d,)
            sh["gate.conf.%d.w" % e] = (d,)
            sh["gate.conf.%d.b" % e] = (1,)
        sh["gate.target.w"] = (C, d)
        sh["gate.target.b"] = (C,)
    imp = {"imputer.q.w": (d, d), "imputer.q.b": (d,), "imputer.kv.w": (d, d), "imputer.kv.b": (d,)}
    if c["writeback"] == WRITEBACK_LN_IMP:
        imp.update({"imputer.ln.weight": (d,), "imputer.ln.bias": (d,)})
    if c["sepv"]:
        imp.update({"imputer.v.w": (d, d), "imputer.v.b": (d,)})
    sh["readout.w"] = (d, M * d)
    sh["readout.b"] = (d,)
    sh["head.w"] = (C, d)
    sh["head.b"] = (C,)
    # Under IMPUTE_MEAN there is no stage 2: the imputer's parameters may or may not exist.
    optional = imp if c["imputation"] == IMPUTE_MEAN else {}
    if c["imputation"] == IMPUTE_TWO_STAGE:
        sh.update(imp)
    return sh, optional


# ----------------------------------------------------------------------------- reference side (float64)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def linear(x, w, b):
    return x @ w.t() + b


def topk_lower(u, k):
    """Best-first top-k per row of a float64 array, exact ties to the lower index, and the
    smallest relative gap between the k-th kept and the best dropped value."""
    n, E = u.shape
    idx = np.zeros((n, k), np.int64)
    gap = math.inf
    for t in range(n):
        order = sorted(range(E), key=lambda e: (-u[t, e], e))
        idx[t] = order[:k]
        if k < E:
            scale = max(1.0, float(np.max(np.abs(u[t]))))
            gap = min(gap, (u[t, order[k - 1]] - u[t, order[k]]) / scale)
    return idx, gap


def ref_gate(c, Z, P, labels_tok, present_tok):
    """One MoE call of the model's gate over Z [N, d]: y [N, d], slots [N, k, d], the gate's
    loss (clw L_conf + llw L_load), the indices and the top-k gap."""
    N, d = Z.shape
    E, k = c["E"], c["k"]
    conf = c["gate"] == GATE_CONFIDENCE
    router = {GATE_CONFIDENCE: gp.ROUTER_SOFTMAX, GATE_SOFTMAX: gp.ROUTER_SOFTMAX,
              GATE_GAUSSIAN: gp.ROUTER_GAUSSIAN, GATE_LAPLACIAN: gp.ROUTER_LAPLACIAN}[c["gate"]]
    frozen = conf and c["router_grad"] == gp.RG_FROZEN
    wr = P["gate.router.w"]
    u = gp.router_logits(router, Z.detach() if frozen else Z, wr.detach() if frozen else wr)
    idx_np, gap = topk_lower(u.detach().numpy(), k)
    idx = torch.tensor(idx_np)
    g = torch.softmax(u.gather(1, idx), dim=1)

    tt = torch.arange(N)[:, None].expand(N, k)
    jj = torch.arange(k)[None, :].expand(N, k)
    src = ((tt * k + jj) % N) if c["compat"] else tt
    flat_e, flat_src = idx.reshape(-1), src.reshape(-1)
    Yf = torch.zeros(N * k, d)
    for e in range(E):
        pos = torch.nonzero(flat_e == e).reshape(-1)
        if pos.numel() == 0:
            continue
        Yf = Yf.index_copy(0, pos, gp.expert_ffn(Z[flat_src[pos]], P["expert.%d.w1" % e], P["expert.%d.b1" % e],
                                                 P["expert.%d.w2" % e], P["expert.%d.b2" % e]))
    Y = Yf.reshape(N, k, d)

    L_conf = torch.zeros(())
    if conf:
        gamma = torch.stack([P["gate.conf.%d.ln.weight" % e] for e in range(E)])[idx]
        beta = torch.stack([P["gate.conf.%d.ln.bias" % e] for e in range(E)])[idx]
        v = torch.stack([P["gate.conf.%d.w" % e] for e in range(E)])[idx]
        bb = torch.stack([P["gate.conf.%d.b" % e] for e in range(E)]).reshape(E)[idx]
        s_slot = torch.sigmoid((layer_norm(Y, gamma, beta) * v).sum(-1) + bb)  # [N, k]
        if c["confidence"] == gp.CONFIDENCE_EXPERT:
            onehot = torch.nn.functional.one_hot(idx, E).to(Y.dtype)
            ce = (s_slot[..., None] * onehot).sum((0, 1)) / onehot.sum((0, 1)).clamp_min(1.0)
            cw = ce[idx]
        else:
            cw = s_slot
        w = cw * g / g.detach() if c["router_grad"] == gp.RG_SCORE else cw
        tl = Y @ P["gate.target.w"].t() + P["gate.target.b"]  # [N, k, C]
        if not c["multilabel"]:
            lab = torch.tensor(np.asarray(labels_tok, np.int64))
            pt = torch.softmax(tl, -1).gather(-1, lab[:, None, None].expand(N, k, 1))[..., 0]
        else:
            lab = torch.tensor(np.asarray(labels_tok, np.float64))[:, None, :]
            sg = torch.sigmoid(tl)
            pt = (lab * sg + (1 - lab) * (1 - sg)).mean(-1)
        if c["detach"]:
            pt = pt.detach()
        pres = torch.tensor(np.asarray(present_tok, np.float64))[:, None]
        num = (((cw - pt) ** 2) * pres).sum()
        den = float(N * k) if c["compat"] else float(k * int(np.sum(present_tok)))
        L_conf = num / den if den > 0 else num * 0.0
    else:
        w = g
    y = (w[..., None] * Y).sum(1)

    L_load = torch.zeros(())
    if c["load_loss"] != gp.LOAD_NONE:
        gs = torch.zeros(N, E).scatter(1, idx, g)
        if c["load_loss"] == gp.LOAD_CV:
            load = torch.zeros(N, E).scatter(1, idx, 1.0).sum(0)
            L_load = gp.cv2(gs.sum(0)) + gp.cv2(load) if E > 1 else torch.zeros(())
        else:
            pm = gs.mean(0)
            H = -(pm * torch.log(pm.clamp_min(1e-300))).sum()
            L_load = 1.0 / (H + 1e-8)
    loss = c["clw"] * L_conf + c["llw"] * L_load
    return y, Y, loss, idx_np, gap


def ref_model(c, P, xs, avail, labels):
    """Forward of the full model on stage-1-filled inputs xs[m] [B, S_m, F_m] (float64)."""
    M, B, d, heads, k = c["M"], c["B"], c["d"], c["heads"], c["k"]
    Ss = tokens_of(c)
    off = [sum(Ss[:m]) for m in range(M + 1)]
    L = off[M]
    dh = d // heads
    toks = [linear(torch.tensor(xs[m]), P["enc.%d.w" % m], P["enc.%d.b" % m]) for m in range(M)]  # [B, S_m, d]
    X = torch.cat(toks, 1) + P["pos"]  # [B, L, d], l = o_m + s

    Xn = layer_norm(X, P["ln1.weight"], P["ln1.bias"])
    Q = linear(Xn, P["attn.q.w"], P["attn.q.b"]).reshape(B, L, heads, dh).transpose(1, 2)
    K = linear(Xn, P["attn.k.w"], P["attn.k.b"]).reshape(B, L, heads, dh).transpose(1, 2)
    V = linear(Xn, P["attn.v.w"], P["attn.v.b"]).reshape(B, L, heads, dh).transpose(1, 2)
    att = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(dh), -1)  # [B, heads, L, L]
    O = (att @ V).transpose(1, 2).reshape(B, L, d)
    A = linear(O, P["attn.o.w"], P["attn.o.b"])
    H = A + A if c["compat"] else X + A

    Hm_out, Hm_pre, slots, gate_losses, counts, gaps = [], [], [], [], np.zeros(c["E"], np.int64), []
    for m in range(M):
        S = Ss[m]
        # [B S_m, C] or [B S_m]: every token carries its sample's label.
        labels_tok = np.repeat(labels, S, axis=0)
        Hm = H[:, off[m]:off[m + 1], :].reshape(B * S, d)
        Hm_pre.append(Hm.reshape(B, S, d))
        Z = layer_norm(Hm, P["ln2.weight"], P["ln2.bias"])
        present_tok = np.repeat(avail[:, m], S)
        F, Y, gl, idx, gap = ref_gate(c, Z, P, labels_tok, present_tok)
        Hm_out.append(layer_norm(Hm + F, P["ln3.weight"], P["ln3.bias"]).reshape(B, S, d))
        slots.append(Y.reshape(B, S, k, d))
        gate_losses.append(gl)
        counts += np.bincount(idx.reshape(-1), minlength=c["E"])
        gaps.append(gap)

    # Stage 2 for every missing (b, m).
    t_gap = math.inf
    if c["imputation"] == IMPUTE_TWO_STAGE:
        rows = [[Hm_out[m][b] for b in range(B)] for m in range(M)]  # [S_m, d] each
        for m in range(M):
            S = Ss[m]
            # The default T of a missing m counts the tokens of every other modality.
            T = c["top_t"] or max(1, (L - S) // 4)
            zero_query = c["compat"] and avail[0, m] == 1
            for b in range(B):
                if avail[b, m]:
                    continue
                others = [mm for mm in range(M) if mm != m and avail[b, mm]]
                assert others, "test setup: sample %d has no present modality besides %d" % (b, m)
                if zero_query:
                    q = torch.zeros(S, d)
                else:
                    q = linear(slots[m][b].mean(1), P["imputer.q.w"], P["imputer.q.b"])  # [S, d]
                Yc = torch.cat([slots[mm][b] for mm in others], 0)  # [Lc, k, d], t over (m', s)
                kv = linear(Yc, P["imputer.kv.w"], P["imputer.kv.b"])
                val = linear(Yc, P["imputer.v.w"], P["imputer.v.b"]) if c["sepv"] else kv
                a = torch.softmax(torch.einsum("sd,tjd->stj", q, kv) / math.sqrt(d), 1)  # [S, Lc, k]
                Lc = Yc.shape[0]
                Tk = min(T, Lc)
                an = a.detach().numpy()
                keep = np.zeros(an.shape, bool)
                for s in range(S):
                    for j in range(k):
                        col = an[s, :, j]
                        order = sorted(range(Lc), key=lambda t: (-col[t], t))
                        keep[s, order[:Tk], j] = True
                        if Tk < Lc:
                            t_gap = min(t_gap, col[order[Tk - 1]] - col[order[Tk]])
                a = a * torch.tensor(keep, dtype=a.dtype)
                if c["renorm"]:
                    a = a / a.sum(1, keepdim=True)
                Ihat = torch.einsum("stj,tjd->sd", a, val)
                if c["writeback"] == WRITEBACK_RESIDUAL:
                    r = layer_norm(Hm_pre[m][b] + Ihat, P["ln3.weight"], P["ln3.bias"])
                else:
                    r = layer_norm(rows[m][b] + Ihat, P["imputer.ln.weight"], P["imputer.ln.bias"])
                    if c["compat"]:
                        r = layer_norm(r, P["imputer.ln.weight"], P["imputer.ln.bias"])
                rows[m][b] = r
        Hm_out = [torch.stack(rows[m]) for m in range(M)]

    pooled = torch.cat([Hm_out[m].mean(1) for m in range(M)], 1)  # [B, M d]
    r = linear(pooled, P["readout.w"], P["readout.b"])
    logits = linear(layer_norm(r, P["ln_out.weight"], P["ln_out.bias"]), P["head.w"], P["head.b"])
    if c["multilabel"]:
        task = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels, dtype=logits.dtype))
    else:
        task = torch.nn.functional.cross_entropy(logits, torch.tensor(labels, dtype=torch.int64))
    if c["compat"]:
        wm = [1.0 / M] * M
    else:
        tokens = [float(avail[:, m].sum()) * Ss[m] for m in range(M)]  # present tokens of each modality
        wm = [t / sum(tokens) for t in tokens]
    loss = task + sum(w * gl for w, gl in zip(wm, gate_losses))
    return dict(logits=logits, loss=loss, task=task, counts=counts, gap=min(gaps), t_gap=t_gap)


# ----------------------------------------------------------------------------- the test

LIB = None
MISSING = []

# Localisation order for failure reports: from the output back to the input.
_ORDER = ["logits", "predict", "loss", "task_loss", "grad head.", "grad ln_out.", "grad readout.", "grad imputer.",
          "grad ln3.", "grad gate.", "grad expert.", "grad ln2.", "grad attn.o", "grad attn.v", "grad attn.k",
          "grad attn.q", "grad ln1.", "grad pos", "grad enc."]


def _rank(key):
    for i, p in enumerate(_ORDER):
        if key.startswith(p):
            return i
    return len(_ORDER)


def setUpModule():
    global LIB, MISSING
    path = os.environ.get("CONFSMOE_LIBRARY")
    if not path:
        raise RuntimeError("CONFSMOE_LIBRARY is not set: point it at libconfsmoe.so")
    if not os.path.exists(path):
        raise RuntimeError("CONFSMOE_LIBRARY=%s does not exist" % path)
    LIB, MISSING = load_lib(path)


class ModelParity(unittest.TestCase):
    summary = dict(configs=0, tensors=0, worst=0.0, worst_where="", worst_logits=0.0, worst_loss=0.0,
                   worst_grad=0.0, min_gap=math.inf, min_t_gap=math.inf)

    @classmethod
    def tearDownClass(cls):
        s = cls.summary
        print("\n[model_parity] %d configurations compared, %d tensors; worst relative error %.3g (%s); "
              "worst logits %.3g, worst loss %.3g, worst gradient %.3g; smallest top-k gap %.3g, "
              "smallest stage-2 top-T gap %.3g"
              % (s["configs"], s["tensors"], s["worst"], s["worst_where"], s["worst_logits"], s["worst_loss"],
                 s["worst_grad"], s["min_gap"], s["min_t_gap"]), file=sys.stderr)

    def setUp(self):
        if MISSING:
            self.fail("the library lacks the model API: %s" % ", ".join(MISSING))

    def test_00_struct_size(self):
        self.assertEqual(ctypes.sizeof(ModelParams), LIB.sizeof_model_params())

    def run_config(self, c):
        rs = np.random.RandomState(c["seed"] * 7919 + 3)
        M, B, C = c["M"], c["B"], c["C"]
        Ss = tokens_of(c)
        lm = LibModel(LIB, c)
        w = gp.Wrapped(LIB, lm.ctx)
        try:
            names = lm.params()
            want, optional = expected_shapes(c)
            got_shapes = {n: tuple(LIB.tensor_dim(LIB.model_param(lm.model, i), a)
                                   for a in range(LIB.tensor_ndim(LIB.model_param(lm.model, i))))
                          for n, i in names.items()}
            extra = sorted(set(names) - set(want) - set(optional))
            lacking = sorted(set(want) - set(names))
            if extra or lacking:
                raise AssertionError("parameter names: unexpected %s, missing %s" % (extra, lacking))
            for n, shp in got_shapes.items():
                exp = want.get(n, optional.get(n))
                if shp != exp:
                    raise AssertionError("parameter %s has shape %s, expected %s" % (n, shp, exp))
            # Randomise the parameters whose init is constant, in place through the data pointer.
            for n, i in names.items():
                view = tensor_view(LIB, LIB.model_param(lm.model, i))
                if n.endswith("ln.weight") or n.endswith(".weight"):
                    view[...] = (1.0 + 0.3 * rs.randn(*view.shape)).astype(np.float32)
                elif n.endswith(".bias") or n == "pos":
                    view[...] = (0.3 * rs.randn(*view.shape)).astype(np.float32)
                elif n == "gate.router.w" and c["gate"] in (GATE_GAUSSIAN, GATE_LAPLACIAN):
                    view[...] = (view + 0.3 * rs.randn(*view.shape)).astype(np.float32)
            params = {n: LIB.read(LIB.model_param(lm.model, i)) for n, i in names.items()}
            for n in ("pos", "ln1.weight", "ln2.bias"):
                assert np.any(params[n] != (1.0 if n.endswith("weight") else 0.0)), "randomising %s failed" % n

            # Inputs, pools, mask, labels.
            xs = []
            pools = []
            for m in range(M):
                shp = (B, Ss[m], c["F"][m]) if Ss[m] > 1 else (B, c["F"][m])
                xs.append(np.ascontiguousarray((c["x_scale"] * rs.randn(*shp)).astype(np.float32)))
                if c["imputation"] == IMPUTE_MEAN:
                    pool = (c["x_scale"] * rs.randn(5, *shp[1:])).astype(np.float32)
                else:  # rows all identical: the stage-1 draws do not matter
                    row = (c["x_scale"] * rs.randn(*shp[1:])).astype(np.float32)
                    pool = np.ascontiguousarray(np.repeat(row[None], c["pool_rows"], 0))
                pools.append(pool)
            avail = np.ascontiguousarray(make_avail(c, rs))
            if c["multilabel"]:
                labels = np.ascontiguousarray((rs.rand(B, C) < 0.5).astype(np.uint8))
            else:
                labels = rs.randint(0, C, size=B).astype(np.int32)
            for m in range(M):
                LIB.check(LIB.model_set_pool(lm.model, m, w(pools[m], F32)), lm.ctx, "model_set_pool(%d)" % m)

            in_t = (P * M)(*[w(x, F32) for x in xs])
            av_t = w(avail, U8)
            lab_t = w(labels, U8 if c["multilabel"] else I32)
            logits = np.full((B, C), np.nan, np.float32)
            logits2 = np.full((B, C), np.nan, np.float32)
            loss, task = ctypes.c_float(np.nan), ctypes.c_float(np.nan)
            gate = LIB.model_gate(lm.model)
            assert gate, "confsmoe_model_gate returned NULL"
            LIB.model_zero_grad(lm.model)
            LIB.gate_stats_reset(gate)
            LIB.check(LIB.model_step(lm.model, in_t, av_t, lab_t, w(logits, F32), ctypes.byref(loss),
                                     ctypes.byref(task)), lm.ctx, "model_step")
            load = np.zeros(c["E"], np.int64)
            stats = gp.GateStats()
            stats.struct_size = ctypes.sizeof(gp.GateStats)
            LIB.check(LIB.gate_stats_get(gate, STATS_TOTAL, ctypes.byref(stats), load.ctypes.data_as(I64P), None,
                                         c["E"]), lm.ctx, "gate_stats_get")
            grads = {n: LIB.read(LIB.model_grad(lm.model, i)) for n, i in names.items()}
            after = {n: LIB.read(LIB.model_param(lm.model, i)) for n, i in names.items()}
            for n in names:
                assert np.array_equal(after[n], params[n]), "model_step changed parameter %s" % n
            LIB.check(LIB.model_predict(lm.model, in_t, av_t, w(logits2, F32)), lm.ctx, "model_predict")
        finally:
            w.close()
            lm.close()

        # Stage 1 on the host side.
        xf = []
        for m in range(M):
            x = xs[m].astype(np.float64).reshape(B, Ss[m], c["F"][m]).copy()
            pool = pools[m].astype(np.float64).reshape(-1, Ss[m], c["F"][m])
            for b in range(B):
                if not avail[b, m]:
                    x[b] = pool.mean(0) if c["imputation"] == IMPUTE_MEAN else pool[0]
            xf.append(x)

        Pt = {n: torch.tensor(v.astype(np.float64), requires_grad=True) for n, v in params.items()}
        ref = ref_model(c, Pt, xf, avail, labels)
        leaves = list(Pt.values())
        rg = torch.autograd.grad(ref["loss"], leaves, allow_unused=True)
        ref_grads = {n: (torch.zeros_like(l) if g is None else g).numpy() for n, l, g in zip(Pt.keys(), leaves, rg)}

        errs = {}
        ref_logits = ref["logits"].detach().numpy()
        errs["logits"] = rel_err(logits, ref_logits)
        errs["predict logits"] = rel_err(logits2, ref_logits)
        errs["loss"] = rel_err(np.float32(loss.value), ref["loss"].item())
        errs["task_loss"] = rel_err(np.float32(task.value), ref["task"].item())
        # Key biases have an analytically zero gradient: q . b_k is the same for every key of a
        # softmax row (also with top-T truncation). The float64 reference holds rounding noise
        # (~1e-17), the float32 library ~1e-9, so they are measured against the key weight's
        # gradient instead of their own (near-zero) size.
        shift_invariant = {"attn.k.b": "attn.k.w"}
        if c["sepv"]:
            shift_invariant["imputer.kv.b"] = "imputer.kv.w"
        for n in names:
            if n in shift_invariant:
                scale = max(float(np.max(np.abs(ref_grads[shift_invariant[n]]))), 1e-6)
                diff = float(np.max(np.abs(grads[n].astype(np.float64) - ref_grads[n])))
                errs["grad " + n] = diff / scale if np.all(np.isfinite(grads[n])) else math.inf
                errs["ref grad " + n + " (must be 0)"] = float(np.max(np.abs(ref_grads[n]))) / scale
            else:
                errs["grad " + n] = rel_err(grads[n], ref_grads[n])

        s = ModelParity.summary
        s["configs"] += 1
        s["tensors"] += len(errs)
        s["min_gap"] = min(s["min_gap"], ref["gap"])
        s["min_t_gap"] = min(s["min_t_gap"], ref["t_gap"])
        name = cfg_name(c)
        for key, v in errs.items():
            if v > s["worst"]:
                s["worst"], s["worst_where"] = v, "%s in [%s]" % (key, name)
            if key.startswith("grad"):
                s["worst_grad"] = max(s["worst_grad"], v)
            elif "logits" in key:
                s["worst_logits"] = max(s["worst_logits"], v)
            else:
                s["worst_loss"] = max(s["worst_loss"], v)
        bad = {kk: v for kk, v in errs.items() if not v <= TOL}
        notes = []
        if not np.array_equal(load, ref["counts"]) or stats.tokens != B * sum(Ss):
            bad["gate loads"] = math.inf
            notes.append("gate loads over the step: library %s (%d tokens), reference %s (%d tokens)"
                         % (load.tolist(), stats.tokens, ref["counts"].tolist(), B * sum(Ss)))
        if ref["gap"] < 1e-5 or ref["t_gap"] < 1e-6:  # only worth reporting next to a failure
            notes.append("near-tie: top-k gap %.3g, top-T gap %.3g" % (ref["gap"], ref["t_gap"]))
        return name, bad, notes

    def test_10_model_parity(self):
        t0 = time.time()
        failures = []
        for c in build_configs():
            try:
                name, bad, notes = self.run_config(c)
            except AssertionError as exc:
                failures.append("[%s] %s" % (cfg_name(c), exc))
                continue
            if bad:
                items = sorted(bad.items(), key=lambda kv: (_rank(kv[0]), kv[0]))
                failures.append("[%s] %s%s" % (name, ", ".join("%s %.3g" % kv for kv in items),
                                               ("; " + "; ".join(notes)) if notes else ""))
        print("\n[model_parity] parity loop %.1f s" % (time.time() - t0), file=sys.stderr)
        if failures:
            self.fail("%d configuration(s) differ from the reference:\n  %s" % (len(failures), "\n  ".join(failures)))


if __name__ == "__main__":
    if not os.environ.get("CONFSMOE_LIBRARY"):
        sys.exit("model_parity.py: set CONFSMOE_LIBRARY to the path of libconfsmoe.so")
    t0 = time.time()
    prog = unittest.main(exit=False)
    print("[model_parity] runtime %.1f s" % (time.time() - t0), file=sys.stderr)
    sys.exit(0 if prog.result.wasSuccessful() else 1)
