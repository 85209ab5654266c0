#!/usr/bin/python3
"""Parity test: libconfsmoe's MoE gate against an independent PyTorch float64 model.

Run:
    CONFSMOE_LIBRARY=/path/to/libconfsmoe.so BLIS_NUM_THREADS=1 /usr/bin/python3 tests/parity/gate_parity.py -v

The PyTorch side is written from docs/MODEL.md (sections 1-4) and the comments of
include/confsmoe.h only, never from lib/gate.c, lib/router.c, lib/confnet.c or
lib/load_loss.c. It uses plain torch ops and autograd in float64, starting from the
library's own float32 parameters (read through confsmoe_*_param).

Error measure. Every tensor T is compared as
    rel(T) = max|T_lib - T_ref| / max(max|T_ref|, 1e-6)
i.e. the worst absolute difference scaled by the tensor's own magnitude. A per-element
relative error would blow up on entries that are tiny only because of cancellation
(a float32 library cannot resolve them), while this measure still catches any wrong
formula, which moves the tensor by a fraction of its size. A tensor that is exactly zero
in the reference (a frozen router, an expert with no tokens) must be <= 1e-10 in the
library. The bound is 1e-4 (TOL) for every tensor.

Top-k. The library selects in float32 and the reference computes logits in float64, so
two logits within rounding of each other could be ordered differently. The test checks
that the library's indices are a valid best-first top-k of the reference logits (exact
ties to the lower index; otherwise allowing only a near-tie of 1e-5 relative), then runs
the reference with the library's indices (top-k indices are constants in backward).

Noise. The gate's eps ~ N(0, 1) is replayed from a Python port of lib/rng.c (splitmix64
counter stream, Box-Muller cosine branch, two u64 per normal): confsmoe_ctx_set_seed(s)
right before the training forward, then normals 0 .. N*E-1 row-major [N, E]. The port is
first validated against the expert initialisation, which draws from the same stream.
"""
import ctypes
import math
import os
import sys
import time
import unittest

import numpy as np
import torch

torch.set_default_dtype(torch.float64)

TOL = 1e-4
ZERO_ABS = 1e-10

# ----------------------------------------------------------------------------- constants

ROUTER_SOFTMAX, ROUTER_GAUSSIAN, ROUTER_LAPLACIAN = 0, 1, 2
COMBINE_ROUTER_SOFTMAX, COMBINE_CONFIDENCE = 0, 1
CONFIDENCE_TOKEN, CONFIDENCE_EXPERT = 0, 1
TARGET_SINGLE, TARGET_MULTI = 0, 1
RG_FROZEN, RG_TRAINABLE, RG_SCORE = 0, 1, 2
LOAD_NONE, LOAD_CV, LOAD_ENTROPY = 0, 1, 2
F32, I32, U8 = 0, 1, 2
STATS_LAST_CALL = 0

ROUTER_NAMES = {0: "softmax", 1: "gaussian", 2: "laplacian"}
COMBINE_NAMES = {0: "rsoftmax", 1: "conf"}
RG_NAMES = {0: "frozen", 1: "trainable", 2: "score"}
LOAD_NAMES = {0: "none", 1: "cv", 2: "entropy"}

# ----------------------------------------------------------------------------- ctypes layer


# The option structs come from the Python bindings' mirrors (checked there against
# confsmoe_sizeof_*() at import, and here again below); the functions keep their own table.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bindings", "python"))
from confsmoe._lib import CtxParams, GateParams, GateStats  # noqa: E402


P = ctypes.c_void_p
ST = ctypes.c_int32
I64P = ctypes.POINTER(ctypes.c_int64)

_SIGNATURES = {
    "confsmoe_status_string": (ctypes.c_char_p, [ST]),
    "confsmoe_ctx_params_init_sized": (None, [ctypes.POINTER(CtxParams), ctypes.c_size_t]),
    "confsmoe_sizeof_ctx_params": (ctypes.c_size_t, []),
    "confsmoe_ctx_create": (ST, [ctypes.POINTER(CtxParams), ctypes.POINTER(P)]),
    "confsmoe_ctx_destroy": (None, [P]),
    "confsmoe_ctx_last_error": (ctypes.c_char_p, [P]),
    "confsmoe_ctx_set_seed": (ST, [P, ctypes.c_uint64]),
    "confsmoe_tensor_wrap": (ST, [P, ctypes.c_int32, ctypes.c_int32, I64P, P, ctypes.POINTER(P)]),
    "confsmoe_tensor_destroy": (None, [P]),
    "confsmoe_tensor_ndim": (ctypes.c_int32, [P]),
    "confsmoe_tensor_dim": (ctypes.c_int64, [P, ctypes.c_int32]),
    "confsmoe_tensor_nbytes": (ctypes.c_size_t, [P]),
    "confsmoe_tensor_data": (P, [P]),
    "confsmoe_tensor_copy_in": (ST, [P, P, ctypes.c_size_t]),
    "confsmoe_tensor_copy_out": (ST, [P, P, ctypes.c_size_t]),
    "confsmoe_saved_destroy": (None, [P]),
    "confsmoe_expert_create": (ST, [P, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(P)]),
    "confsmoe_expert_destroy": (None, [P]),
    "confsmoe_expert_n_params": (ctypes.c_int32, [P]),
    "confsmoe_expert_param_name": (ctypes.c_char_p, [P, ctypes.c_int32]),
    "confsmoe_expert_param": (P, [P, ctypes.c_int32]),
    "confsmoe_expert_grad": (P, [P, ctypes.c_int32]),
    "confsmoe_expert_zero_grad": (None, [P]),
    "confsmoe_gate_params_init_sized": (None, [ctypes.POINTER(GateParams), ctypes.c_size_t]),
    "confsmoe_sizeof_gate_params": (ctypes.c_size_t, []),
    "confsmoe_gate_create": (ST, [P, ctypes.POINTER(GateParams), ctypes.POINTER(P), ctypes.c_int32,
                                  ctypes.POINTER(P)]),
    "confsmoe_gate_destroy": (None, [P]),
    "confsmoe_gate_n_experts": (ctypes.c_int32, [P]),
    "confsmoe_gate_k": (ctypes.c_int32, [P]),
    "confsmoe_gate_forward": (ST, [P, P, P, P, P, P, P, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(P)]),
    "confsmoe_gate_backward": (ST, [P, P, P, P, ctypes.c_float, P]),
    "confsmoe_gate_n_params": (ctypes.c_int32, [P]),
    "confsmoe_gate_param_name": (ctypes.c_char_p, [P, ctypes.c_int32]),
    "confsmoe_gate_param": (P, [P, ctypes.c_int32]),
    "confsmoe_gate_grad": (P, [P, ctypes.c_int32]),
    "confsmoe_gate_zero_grad": (None, [P]),
    "confsmoe_sizeof_gate_stats": (ctypes.c_size_t, []),
    "confsmoe_gate_stats_get": (ST, [P, ctypes.c_int32, ctypes.POINTER(GateStats), I64P,
                                     ctypes.POINTER(ctypes.c_double), ctypes.c_int32]),
    "confsmoe_gate_stats_reset": (None, [P]),
}


class Lib:
    """The handful of libconfsmoe entry points the test needs (private to this test)."""

    def __init__(self, path):
        self.dll = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name[len("confsmoe_"):], fn)

    # The header's confsmoe_X_params_init(p) macros: init_sized with this mirror's size.
    def ctx_params_init(self, p):
        self.ctx_params_init_sized(p, ctypes.sizeof(CtxParams))

    def gate_params_init(self, p):
        self.gate_params_init_sized(p, ctypes.sizeof(GateParams))

    def check(self, status, ctx, what):
        if status != 0:
            msg = self.ctx_last_error(ctx) if ctx else b""
            raise AssertionError("%s failed: %s (%s)" % (what, self.status_string(status).decode(),
                                                         (msg or b"").decode()))

    def read(self, t):
        """Copy a library f32 tensor out into a new numpy array."""
        shape = tuple(self.tensor_dim(t, a) for a in range(self.tensor_ndim(t)))
        out = np.empty(shape, np.float32)
        self.check(self.tensor_copy_out(t, out.ctypes.data, out.nbytes), None, "tensor_copy_out")
        return out

    def write(self, t, arr):
        arr = np.ascontiguousarray(arr, np.float32)
        assert arr.nbytes == self.tensor_nbytes(t)
        self.check(self.tensor_copy_in(t, arr.ctypes.data, arr.nbytes), None, "tensor_copy_in")


class Wrapped:
    """numpy arrays wrapped as library tensors (no copy); destroyed on close."""

    def __init__(self, lib, ctx):
        self.lib, self.ctx, self.handles, self.arrays = lib, ctx, [], []

    def __call__(self, arr, dtype):
        assert arr.flags["C_CONTIGUOUS"]
        dims = (ctypes.c_int64 * arr.ndim)(*arr.shape)
        t = P()
        self.lib.check(self.lib.tensor_wrap(self.ctx, dtype, arr.ndim, dims,
                                            arr.ctypes.data if arr.size else None, ctypes.byref(t)),
                       self.ctx, "tensor_wrap")
        self.handles.append(t)
        self.arrays.append(arr)
        return t

    def close(self):
        for t in self.handles:
            self.lib.tensor_destroy(t)
        self.handles, self.arrays = [], []


# ----------------------------------------------------------------------------- the RNG of lib/rng.c

M64 = (1 << 64) - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class CsmRng:
    def __init__(self, seed):
        self.key = _mix64((seed ^ 0x6A09E667F3BCC909) & M64)
        self.counter = 0

    def u64(self):
        i = self.counter
        self.counter += 1
        return _mix64((self.key + i * 0x9E3779B97F4A7C15) & M64)

    def uniform(self, lo, hi):
        lo, hi = np.float32(lo), np.float32(hi)
        u = np.float32(self.u64() >> 40) * np.float32(2.0 ** -24)
        return np.float32(lo + np.float32(hi - lo) * u)

    def normal(self):
        u1 = (float(self.u64() >> 11) + 1.0) * 2.0 ** -53
        u2 = float(self.u64() >> 11) * 2.0 ** -53
        return np.float32(math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2))

    def normals(self, shape):
        n = int(np.prod(shape))
        return np.array([self.normal() for _ in range(n)], np.float32).reshape(shape)


# ----------------------------------------------------------------------------- configurations

BASE = dict(N=6, d=5, h=7, E=4, k=2, router=ROUTER_SOFTMAX, combine=COMBINE_CONFIDENCE,
            confidence=CONFIDENCE_TOKEN, target=TARGET_SINGLE, C=3, detach=0, router_grad=RG_FROZEN,
            load_loss=LOAD_NONE, llw=0.01, clw=1.0, compat=0, noisy=0, present="all", dslots=True,
            dloss=1.0, seed=1, perturb=True, x_scale=0.7, zero_rows=(), pass_labels=True,
            expect_empty_expert=False)


def cfg(**kw):
    c = dict(BASE)
    for key in kw:
        assert key in BASE, key
    c.update(kw)
    return c


def cfg_name(c):
    s = "N%d d%d h%d E%d k%d %s/%s" % (c["N"], c["d"], c["h"], c["E"], c["k"], ROUTER_NAMES[c["router"]],
                                         COMBINE_NAMES[c["combine"]])
    if c["combine"] == COMBINE_CONFIDENCE:
        s += " %s %s C%d%s rg=%s" % ("tok" if c["confidence"] == CONFIDENCE_TOKEN else "exp",
                                     "single" if c["target"] == TARGET_SINGLE else "multi", c["C"],
                                     " detach" if c["detach"] else "", RG_NAMES[c["router_grad"]])
    s += " load=%s" % LOAD_NAMES[c["load_loss"]]
    for flag in ("compat", "noisy"):
        if c[flag]:
            s += " " + flag
    if c["present"] != "all":
        s += " present=" + c["present"]
    if not c["dslots"]:
        s += " dslots=NULL"
    if c["dloss"] != 1.0:
        s += " dloss=%g" % c["dloss"]
    if c["zero_rows"]:
        s += " zero_rows=%s" % (list(c["zero_rows"]),)
    if c["clw"] != 1.0 or c["llw"] != 0.01:
        s += " clw=%g llw=%g" % (c["clw"], c["llw"])
    if not c["perturb"]:
        s += " init-params"
    return s + " seed=%d" % c["seed"]


def build_configs():
    C = []
    # Shapes and edge cases.
    C.append(cfg(N=1, d=3, E=4, k=2, seed=11))
    C.append(cfg(N=1, d=3, E=4, k=2, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_CV, seed=12))
    C.append(cfg(N=5, d=3, E=2, k=1, seed=13))
    C.append(cfg(N=5, d=3, E=2, k=1, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_ENTROPY, seed=14))
    C.append(cfg(N=7, d=4, E=4, k=4, seed=15))
    C.append(cfg(N=7, d=4, E=4, k=4, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_CV, noisy=1, seed=16))
    C.append(cfg(N=7, d=4, E=4, k=4, router_grad=RG_SCORE, load_loss=LOAD_CV, noisy=1, seed=17))
    C.append(cfg(N=6, d=1, h=3, E=4, k=2, seed=18))
    C.append(cfg(N=6, d=1, h=3, E=4, k=2, combine=COMBINE_ROUTER_SOFTMAX, router=ROUTER_GAUSSIAN, seed=19))
    C.append(cfg(N=6, d=1, h=3, E=2, k=1, router=ROUTER_LAPLACIAN, router_grad=RG_SCORE, seed=20))
    C.append(cfg(N=9, d=130, h=16, E=8, k=2, x_scale=0.3, seed=21))
    C.append(cfg(N=9, d=130, h=16, E=8, k=2, x_scale=0.3, router=ROUTER_GAUSSIAN,
                 combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_CV, noisy=1, seed=22))
    C.append(cfg(N=9, d=130, h=16, E=8, k=3, x_scale=0.3, router=ROUTER_LAPLACIAN,
                 confidence=CONFIDENCE_EXPERT, target=TARGET_MULTI, C=4, router_grad=RG_SCORE,
                 load_loss=LOAD_ENTROPY, seed=23))
    C.append(cfg(N=3, d=4, E=8, k=1, expect_empty_expert=True, seed=24))
    C.append(cfg(N=2, d=4, E=8, k=2, confidence=CONFIDENCE_EXPERT, router_grad=RG_TRAINABLE, load_loss=LOAD_CV,
                 expect_empty_expert=True, seed=25))
    C.append(cfg(N=3, d=4, E=8, k=1, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_ENTROPY,
                 expect_empty_expert=True, seed=26))
    C.append(cfg(N=4, d=3, E=1, k=1, seed=27))
    C.append(cfg(N=4, d=3, E=1, k=1, combine=COMBINE_ROUTER_SOFTMAX, seed=28))
    C.append(cfg(N=4, d=3, E=1, k=1, confidence=CONFIDENCE_EXPERT, router_grad=RG_SCORE, target=TARGET_MULTI,
                 noisy=1, seed=29))
    # Library init parameters untouched (LayerNorm gamma = 1, beta = 0, ...).
    C.append(cfg(N=8, d=6, E=4, k=2, perturb=False, seed=30))
    C.append(cfg(N=8, d=6, E=4, k=2, perturb=False, noisy=1, combine=COMBINE_ROUTER_SOFTMAX,
                 load_loss=LOAD_CV, seed=31))
    # Top-k ties: an all-zero token under the dot-product router has u = 0 for every expert.
    C.append(cfg(N=5, d=4, E=4, k=2, zero_rows=(1, 3), seed=32))
    C.append(cfg(N=5, d=4, E=8, k=3, zero_rows=(0,), combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_CV, seed=33))
    # dloss = 0.5 and dslots NULL.
    C.append(cfg(N=8, d=5, E=4, k=2, dloss=0.5, load_loss=LOAD_CV, router_grad=RG_TRAINABLE, noisy=1, seed=34))
    C.append(cfg(N=8, d=5, E=4, k=2, dslots=False, confidence=CONFIDENCE_EXPERT, seed=35))
    C.append(cfg(N=8, d=5, E=4, k=2, dslots=False, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_ENTROPY,
                 seed=36))
    # Present masks and the compat denominator.
    C.append(cfg(N=8, d=5, E=4, k=2, present="mixed", seed=37))
    C.append(cfg(N=8, d=5, E=4, k=2, present="mixed", compat=1, seed=38))
    C.append(cfg(N=8, d=5, E=4, k=2, present="mixed", compat=1, target=TARGET_MULTI,
                 confidence=CONFIDENCE_EXPERT, seed=39))
    C.append(cfg(N=7, d=5, E=4, k=3, compat=1, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_CV, seed=40))
    C.append(cfg(N=7, d=5, E=4, k=2, present="mixed", detach=1, clw=0.7, llw=0.3, load_loss=LOAD_CV,
                 router_grad=RG_TRAINABLE, seed=41))
    # Full grid: router x combine x (confidence, target, detach, router_grad, load, compat, noisy, present).
    C.append(cfg(N=6, d=5, E=4, k=2, present="none", compat=1, seed=42))
    C.append(cfg(N=6, d=5, E=4, k=2, present="none", compat=1, confidence=CONFIDENCE_EXPERT, router_grad=RG_SCORE,
                 load_loss=LOAD_CV, noisy=1, seed=43))
    for grid_seed, seed in ((1234, 100), (4321, 300)):
        C.extend(grid(grid_seed, seed))
    return C


def grid(grid_seed, seed):
    C = []
    rs = np.random.RandomState(grid_seed)
    for router in (ROUTER_SOFTMAX, ROUTER_GAUSSIAN, ROUTER_LAPLACIAN):
        for combine in (COMBINE_ROUTER_SOFTMAX, COMBINE_CONFIDENCE):
            for load in (LOAD_NONE, LOAD_CV, LOAD_ENTROPY):
                for noisy in (0, 1):
                    rgs = (RG_FROZEN, RG_TRAINABLE, RG_SCORE) if combine == COMBINE_CONFIDENCE else (RG_FROZEN,)
                    for rg in rgs:
                        seed += 1
                        E = int(rs.choice([2, 4, 8]))
                        k = int(rs.randint(1, E + 1)) if rs.rand() < 0.3 else min(2, E)
                        d = int(rs.choice([1, 3, 8, 17]))
                        N = int(rs.choice([1, 4, 9, 16]))
                        C.append(cfg(N=N, d=d, h=int(rs.choice([4, 9])), E=E, k=k, router=router, combine=combine,
                                     confidence=int(rs.randint(2)), target=int(rs.randint(2)),
                                     C=int(rs.choice([1, 2, 5])), detach=int(rs.randint(2)), router_grad=rg,
                                     load_loss=load, noisy=noisy, compat=int(rs.rand() < 0.3),
                                     present="mixed" if rs.rand() < 0.4 else "all",
                                     dslots=bool(rs.rand() < 0.8), dloss=1.0 if rs.rand() < 0.85 else 0.5,
                                     llw=float(rs.choice([0.01, 0.5])), clw=float(rs.choice([1.0, 0.3])),
                                     pass_labels=bool(rs.rand() < 0.5), seed=seed))
    return C


# ----------------------------------------------------------------------------- library side


class LibGate:
    """One ctx, E experts and a gate built from a configuration."""

    def __init__(self, lib, c):
        self.lib, self.c = lib, c
        p = CtxParams()
        lib.ctx_params_init(ctypes.byref(p))
        p.seed = c["seed"]
        self.ctx = P()
        lib.check(lib.ctx_create(ctypes.byref(p), ctypes.byref(self.ctx)), None, "ctx_create")
        self.experts = []
        for _ in range(c["E"]):
            e = P()
            lib.check(lib.expert_create(self.ctx, c["d"], c["h"], ctypes.byref(e)), self.ctx, "expert_create")
            self.experts.append(e)
        gp = GateParams()
        lib.gate_params_init(ctypes.byref(gp))
        gp.d, gp.k, gp.router, gp.noisy = c["d"], c["k"], c["router"], c["noisy"]
        gp.combine, gp.confidence, gp.n_classes, gp.target = c["combine"], c["confidence"], c["C"], c["target"]
        gp.detach_target, gp.router_grad, gp.load_loss = c["detach"], c["router_grad"], c["load_loss"]
        gp.load_loss_weight, gp.conf_loss_weight, gp.compat = c["llw"], c["clw"], c["compat"]
        arr = (P * c["E"])(*self.experts)
        self.gate = P()
        lib.check(lib.gate_create(self.ctx, ctypes.byref(gp), arr, c["E"], ctypes.byref(self.gate)), self.ctx,
                  "gate_create")

    def gate_params(self):
        out = {}
        for i in range(self.lib.gate_n_params(self.gate)):
            out[self.lib.gate_param_name(self.gate, i).decode()] = i
        return out

    def expert_params(self, e):
        return {self.lib.expert_param_name(self.experts[e], i).decode(): i
                for i in range(self.lib.expert_n_params(self.experts[e]))}

    def close(self):
        self.lib.gate_destroy(self.gate)
        for e in self.experts:
            self.lib.expert_destroy(e)
        self.lib.ctx_destroy(self.ctx)


# ----------------------------------------------------------------------------- reference side (float64)


def expert_ffn(z, w1, b1, w2, b2):
    return torch.nn.functional.gelu(z @ w1.t() + b1) @ w2.t() + b2  # exact erf GELU


def router_logits(kind, z, w):
    if kind == ROUTER_SOFTMAX:
        return z @ w
    sq = ((z[:, None, :] - w.t()[None, :, :]) ** 2).sum(-1)
    if kind == ROUTER_GAUSSIAN:
        return -sq
    return -torch.sqrt(sq)


def cv2(v):
    return v.var(unbiased=True) / (v.mean() ** 2 + 1e-10)


def check_topk(u, lib_idx, k):
    """The library's indices must be a valid best-first top-k of the float64 logits u."""
    N, E = u.shape
    un = u.detach().numpy()
    near_ties = 0
    for t in range(N):
        row = un[t]
        order = sorted(range(E), key=lambda e: (-row[e], e))  # ties to the lower index
        want = order[:k]
        got = [int(i) for i in lib_idx[t]]
        if got == want:
            continue
        near_ties += 1
        scale = max(1e-5 * max(1.0, float(np.max(np.abs(row)))), 0.0)
        assert len(set(got)) == k and all(0 <= g < E for g in got), "topk row %d invalid: %s" % (t, got)
        for j in range(k):
            # rank j of the library must hold a logit equal (within rounding) to the j-th best.
            if abs(row[got[j]] - row[want[j]]) > scale:
                raise AssertionError("topk row %d: library %s, reference %s (logits %s)" % (t, got, want, row))
    return near_ties


def torch_reference(c, x_np, labels_np, present_np, gparams, eparams, lib_topk, eps_np, r1_np, r2_np):
    N, d, E, k = c["N"], c["d"], c["E"], c["k"]
    conf = c["combine"] == COMBINE_CONFIDENCE
    T = lambda a: torch.tensor(np.asarray(a, np.float64))
    x = T(x_np).requires_grad_(True)
    gp = {n: T(v).requires_grad_(True) for n, v in gparams.items()}
    ep = [{n: T(v).requires_grad_(True) for n, v in e.items()} for e in eparams]

    # Router. Under the confidence gate with a frozen router nothing reaches the router (the
    # routing is a constant of the call), so it runs on detached copies.
    frozen = conf and c["router_grad"] == RG_FROZEN
    det = (lambda t: t.detach()) if frozen else (lambda t: t)
    xr, wr = det(x), det(gp["router.w"])
    u_clean = router_logits(c["router"], xr, wr)
    noisy_train = bool(c["noisy"])
    if noisy_train:
        sigma = torch.nn.functional.softplus(xr @ det(gp["noise.w"])) + 0.01
        u = u_clean + T(eps_np) * sigma
    else:
        u = u_clean
    near_ties = check_topk(u, lib_topk, k)
    idx = torch.tensor(np.asarray(lib_topk, np.int64))
    g = torch.softmax(u.gather(1, idx), dim=1)  # [N, k], softmax over the kept logits

    # Dispatch: slot j of token t runs on token t (compat: (t k + j) mod N), one batch per expert.
    tt = torch.arange(N)[:, None].expand(N, k)
    jj = torch.arange(k)[None, :].expand(N, k)
    src = ((tt * k + jj) % N) if c["compat"] else tt
    flat_e, flat_src = idx.reshape(-1), src.reshape(-1)
    Yf = torch.zeros(N * k, d)
    for e in range(E):
        pos = torch.nonzero(flat_e == e).reshape(-1)
        if pos.numel() == 0:
            continue
        p = ep[e]
        Yf = Yf.index_copy(0, pos, expert_ffn(x[flat_src[pos]], p["w1"], p["b1"], p["w2"], p["b2"]))
    Y = Yf.reshape(N, k, d)

    out = dict(slots=Y, near_ties=near_ties)
    L_conf = torch.zeros(())
    s_slot = None
    if conf:
        gamma = torch.stack([gp["conf.%d.ln.weight" % e] for e in range(E)])[idx]
        beta = torch.stack([gp["conf.%d.ln.bias" % e] for e in range(E)])[idx]
        v = torch.stack([gp["conf.%d.w" % e] for e in range(E)])[idx]
        bb = torch.stack([gp["conf.%d.b" % e] for e in range(E)]).reshape(E)[idx]
        mu = Y.mean(-1, keepdim=True)
        var = ((Y - mu) ** 2).mean(-1, keepdim=True)
        ln = (Y - mu) / torch.sqrt(var + 1e-5) * gamma + beta
        s_slot = torch.sigmoid((ln * v).sum(-1) + bb)  # [N, k]
        if c["confidence"] == CONFIDENCE_EXPERT:
            onehot = torch.nn.functional.one_hot(idx, E).to(Y.dtype)  # [N, k, E]
            sums = (s_slot[..., None] * onehot).sum((0, 1))
            cnt = onehot.sum((0, 1))
            ce = sums / cnt.clamp_min(1.0)
            cw = ce[idx]
        else:
            cw = s_slot
        if c["router_grad"] == RG_SCORE:
            w = cw * g / g.detach()
        else:
            w = cw
        # Target p from the classifier P applied to the slot's output.
        logits = Y @ gp["target.w"].t() + gp["target.b"]  # [N, k, C]
        if c["target"] == TARGET_SINGLE:
            lab = torch.tensor(np.asarray(labels_np, np.int64))
            pt = torch.softmax(logits, -1).gather(-1, lab[:, None, None].expand(N, k, 1))[..., 0]
        else:
            lab = torch.tensor(np.asarray(labels_np, np.float64))[:, None, :]
            sg = torch.sigmoid(logits)
            pt = (lab * sg + (1 - lab) * (1 - sg)).mean(-1)
        if c["detach"]:
            pt = pt.detach()
        pres = torch.tensor(np.asarray(present_np, np.float64))[:, None]
        num = (((cw - pt) ** 2) * pres).sum()
        den = float(N * k) if c["compat"] else float(k * present_np.sum())
        L_conf = num / den if den > 0 else num * 0.0
        out["c"] = cw
    else:
        w = g
    yout = (w[..., None] * Y).sum(1)
    out["y"] = yout

    # Load-balancing loss on the kept-softmax weights scattered to E.
    L_load = torch.zeros(())
    if c["load_loss"] != LOAD_NONE:
        gs = torch.zeros(N, E).scatter(1, idx, g)
        if c["load_loss"] == LOAD_CV:
            importance = gs.sum(0)
            if noisy_train and k < E:
                kth = u.gather(1, idx[:, k - 1:k])  # k-th largest noisy logit
                sel = torch.zeros(N, E, dtype=torch.bool).scatter(1, idx, True)
                kp1 = u.masked_fill(sel, -math.inf).max(1, keepdim=True).values  # (k+1)-th largest
                thr = torch.where(sel, kp1, kth)
                z = (u_clean - thr) / sigma
                load = (0.5 * (1 + torch.erf(z / math.sqrt(2.0)))).sum(0)
            else:
                load = torch.zeros(N, E).scatter(1, idx, 1.0).sum(0)
            L_load = cv2(importance) + cv2(load)
        else:
            pm = gs.mean(0)
            H = -(pm * torch.log(pm.clamp_min(1e-300))).sum()
            L_load = 1.0 / (H + 1e-8)
    loss = c["clw"] * L_conf + c["llw"] * L_load
    out["loss"], out["L_conf"] = loss, L_conf

    # Backward with the same upstream gradients as the library.
    total = (yout * T(r1_np)).sum() + c["dloss"] * loss
    if r2_np is not None:
        total = total + (Y * T(r2_np)).sum()
    leaves = [x] + list(gp.values()) + [t for e in ep for t in e.values()]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)]
    out["dx"] = grads[0]
    out["gate_grads"] = dict(zip(gp.keys(), grads[1:1 + len(gp)]))
    rest = grads[1 + len(gp):]
    out["expert_grads"] = []
    for e in ep:
        out["expert_grads"].append(dict(zip(e.keys(), rest[:len(e)])))
        rest = rest[len(e):]
    return out


# ----------------------------------------------------------------------------- the test


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    if not np.all(np.isfinite(a)):
        return math.inf
    diff = float(np.max(np.abs(a - b)))
    ref = float(np.max(np.abs(b)))
    if ref == 0.0:
        return 0.0 if diff <= ZERO_ABS else math.inf
    return diff / max(ref, 1e-6)


LIB = None


def setUpModule():
    global LIB
    path = os.environ.get("CONFSMOE_LIBRARY")
    if not path:
        raise RuntimeError("CONFSMOE_LIBRARY is not set: point it at libconfsmoe.so, e.g. "
                           "CONFSMOE_LIBRARY=/tmp/bg4/lib/libconfsmoe.so")
    if not os.path.exists(path):
        raise RuntimeError("CONFSMOE_LIBRARY=%s does not exist" % path)
    LIB = Lib(path)


class GateParity(unittest.TestCase):
    summary = dict(near_ties=0, configs=0, tensors=0, worst=0.0, worst_where="", worst_stats=0.0, noise_configs=0)

    @classmethod
    def tearDownClass(cls):
        s = cls.summary
        print("\n[gate_parity] %d configurations compared (%d noisy), %d tensors; worst relative error %.3g "
              "(%s); worst stats error %.3g; %d top-k rows accepted as float32 near-ties"
              % (s["configs"], s["noise_configs"], s["tensors"], s["worst"], s["worst_where"], s["worst_stats"],
                 s["near_ties"]), file=sys.stderr)

    def test_00_struct_sizes(self):
        self.assertEqual(ctypes.sizeof(CtxParams), LIB.sizeof_ctx_params())
        self.assertEqual(ctypes.sizeof(GateParams), LIB.sizeof_gate_params())
        self.assertEqual(ctypes.sizeof(GateStats), LIB.sizeof_gate_stats())

    def test_01_rng_port_matches_expert_init(self):
        """The Python port of lib/rng.c reproduces the stream (checked on the expert init)."""
        for seed, d, h in ((0, 3, 5), (7, 4, 2), (2 ** 63 + 12345, 2, 3)):
            p = CtxParams()
            LIB.ctx_params_init(ctypes.byref(p))
            ctx = P()
            LIB.check(LIB.ctx_create(ctypes.byref(p), ctypes.byref(ctx)), None, "ctx_create")
            LIB.check(LIB.ctx_set_seed(ctx, seed), ctx, "ctx_set_seed")
            e = P()
            LIB.check(LIB.expert_create(ctx, d, h, ctypes.byref(e)), ctx, "expert_create")
            rng = CsmRng(seed)
            bin_, bh = np.float32(1.0) / np.sqrt(np.float32(d)), np.float32(1.0) / np.sqrt(np.float32(h))
            names = [LIB.expert_param_name(e, i).decode() for i in range(LIB.expert_n_params(e))]
            self.assertEqual(names, ["w1", "b1", "w2", "b2"])
            for i, (n, bound) in enumerate(((h * d, bin_), (h, bin_), (d * h, bh), (d, bh))):
                want = np.array([rng.uniform(-bound, bound) for _ in range(n)], np.float32)
                got = LIB.read(LIB.expert_param(e, i)).reshape(-1)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            LIB.expert_destroy(e)
            LIB.ctx_destroy(ctx)

    def run_config(self, c):
        rs = np.random.RandomState(c["seed"] * 7919 + 17)
        N, d, E, k, C = c["N"], c["d"], c["E"], c["k"], c["C"]
        conf = c["combine"] == COMBINE_CONFIDENCE
        lg = LibGate(LIB, c)
        w = Wrapped(LIB, lg.ctx)
        try:
            self.assertEqual(LIB.gate_n_experts(lg.gate), E)
            self.assertEqual(LIB.gate_k(lg.gate), k)
            names = lg.gate_params()
            want_names = ["router.w"] + (["noise.w"] if c["noisy"] else [])
            if conf:
                for e in range(E):
                    want_names += ["conf.%d.ln.weight" % e, "conf.%d.ln.bias" % e, "conf.%d.w" % e, "conf.%d.b" % e]
                want_names += ["target.w", "target.b"]
            self.assertEqual(sorted(names), sorted(want_names))
            # Parameters: perturb the ones whose init is degenerate (LN affine, noise.w, biases),
            # then read everything back.
            if c["perturb"]:
                for n, i in names.items():
                    t = LIB.gate_param(lg.gate, i)
                    cur = LIB.read(t)
                    if n.endswith("ln.weight"):
                        LIB.write(t, 1.0 + 0.3 * rs.randn(*cur.shape))
                    elif n.endswith("ln.bias") or n == "noise.w" or n.endswith(".b"):
                        LIB.write(t, 0.3 * rs.randn(*cur.shape))
                    elif n == "router.w" and c["router"] != ROUTER_SOFTMAX:
                        LIB.write(t, cur + 0.3 * rs.randn(*cur.shape))
            gparams = {n: LIB.read(LIB.gate_param(lg.gate, i)) for n, i in names.items()}
            shapes = {"router.w": (d, E), "noise.w": (d, E), "target.w": (C, d), "target.b": (C,)}
            for n, v in gparams.items():
                if n in shapes:
                    self.assertEqual(v.shape, shapes[n], n)
                elif n.startswith("conf."):
                    self.assertEqual(v.shape, (1,) if n.endswith(".b") else (d,), n)
            eparams = []
            for e in range(E):
                en = lg.expert_params(e)
                eparams.append({n: LIB.read(LIB.expert_param(lg.experts[e], i)) for n, i in en.items()})

            # Inputs.
            x = np.ascontiguousarray((c["x_scale"] * rs.randn(N, d)).astype(np.float32))
            for r in c["zero_rows"]:
                x[r] = 0.0
            if c["target"] == TARGET_SINGLE:
                labels = rs.randint(0, C, size=N).astype(np.int32)
            else:
                labels = (rs.rand(N, C) < 0.5).astype(np.uint8)
            if c["present"] == "all":
                present = np.ones(N, np.uint8)
            elif c["present"] == "none":
                present = np.zeros(N, np.uint8)
            else:
                present = (rs.rand(N) < 0.6).astype(np.uint8)
                if N > 1:
                    present[0], present[-1] = 0, 1
            r1 = rs.randn(N, d).astype(np.float32)
            r2 = rs.randn(N, k, d).astype(np.float32) if c["dslots"] else None

            y = np.zeros((N, d), np.float32)
            topk = np.full((N, k), -1, np.int32)
            slots = np.zeros((N, k, d), np.float32)
            dx = np.full((N, d), np.nan, np.float32)
            loss = ctypes.c_float(np.nan)
            saved = P()
            lab_t = w(labels, I32 if c["target"] == TARGET_SINGLE else U8) if (conf or c["pass_labels"]) else None
            pres_t = w(present, U8) if c["present"] != "all" else None
            LIB.gate_zero_grad(lg.gate)
            for e in lg.experts:
                LIB.expert_zero_grad(e)
            seed_noise = c["seed"] + 1000
            LIB.check(LIB.ctx_set_seed(lg.ctx, seed_noise), lg.ctx, "ctx_set_seed")
            LIB.check(LIB.gate_forward(lg.gate, w(x, F32), lab_t, pres_t, w(y, F32), w(topk, I32), w(slots, F32),
                                       ctypes.byref(loss), ctypes.byref(saved)), lg.ctx, "gate_forward")
            LIB.check(LIB.gate_backward(lg.gate, saved, w(r1, F32), w(r2, F32) if r2 is not None else None,
                                        c["dloss"], w(dx, F32)), lg.ctx, "gate_backward")
            LIB.saved_destroy(saved)
            stats = GateStats()
            stats.struct_size = ctypes.sizeof(GateStats)
            load = np.zeros(E, np.int64)
            meanc = np.zeros(E, np.float64)
            LIB.check(LIB.gate_stats_get(lg.gate, STATS_LAST_CALL, ctypes.byref(stats),
                                         load.ctypes.data_as(I64P),
                                         meanc.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), E),
                      lg.ctx, "gate_stats_get")
            lib_ggrads = {n: LIB.read(LIB.gate_grad(lg.gate, i)) for n, i in names.items()}
            lib_egrads = []
            for e in range(E):
                en = lg.expert_params(e)
                lib_egrads.append({n: LIB.read(LIB.expert_grad(lg.experts[e], i)) for n, i in en.items()})
        finally:
            w.close()
            lg.close()

        eps = CsmRng(seed_noise).normals((N, E)) if c["noisy"] else None
        ref = torch_reference(c, x, labels, present, gparams, eparams, topk, eps, r1, r2)
        name = cfg_name(c)

        for r in c["zero_rows"]:  # exact ties (u = 0 for every expert) go to the lower index
            self.assertEqual([int(i) for i in topk[r]], list(range(k)), name)
        if c["expect_empty_expert"]:
            self.assertTrue(np.any(np.bincount(topk.reshape(-1), minlength=E) == 0), name)
        errs = {}
        errs["y"] = rel_err(y, ref["y"].detach().numpy())
        errs["slots"] = rel_err(slots, ref["slots"].detach().numpy())
        errs["loss"] = rel_err(np.float32(loss.value), ref["loss"].item())
        errs["dx"] = rel_err(dx, ref["dx"].numpy())
        for n, gr in ref["gate_grads"].items():
            errs["grad " + n] = rel_err(lib_ggrads[n], gr.numpy())
        for e in range(E):
            for n, gr in ref["expert_grads"][e].items():
                errs["grad expert%d.%s" % (e, n)] = rel_err(lib_egrads[e][n], gr.numpy())

        # Stats of the last call, from the indices and the reference confidences.
        cnt = np.bincount(topk.reshape(-1), minlength=E).astype(np.float64)
        frac = cnt / cnt.sum()
        if E == 1:
            ent = 1.0
        else:
            nz = frac[frac > 0]
            ent = float(-(nz * np.log(nz)).sum() / math.log(E))
        serr = {}
        serr["tokens"] = 0.0 if stats.tokens == N else math.inf
        serr["load"] = 0.0 if np.array_equal(load, cnt.astype(np.int64)) else math.inf
        serr["load_entropy"] = abs(stats.load_entropy - ent)
        if E > 1:
            serr["load_cv2"] = rel_err(stats.load_cv2, cnt.var(ddof=1) / (cnt.mean() ** 2 + 1e-10))
        else:
            serr["load_cv2"] = 0.0 if math.isfinite(stats.load_cv2) else math.inf
        serr["max_load_fraction"] = abs(stats.max_load_fraction - frac.max())
        serr["conf_loss"] = rel_err(stats.conf_loss, ref["L_conf"].item())
        if conf:
            cw = ref["c"].detach().numpy()
            want = np.full(E, np.nan)
            for e in range(E):
                m = topk == e
                if m.any():
                    want[e] = cw[m].mean()
            same_nan = np.array_equal(np.isnan(meanc), np.isnan(want))
            fin = ~np.isnan(want)
            serr["mean_confidence"] = rel_err(meanc[fin], want[fin]) if same_nan else math.inf
        else:
            serr["mean_confidence"] = 0.0 if np.all(np.isnan(meanc)) else math.inf

        s = GateParity.summary
        s["configs"] += 1
        s["noise_configs"] += int(bool(c["noisy"]))
        s["near_ties"] += ref["near_ties"]
        s["tensors"] += len(errs)
        for key, v in errs.items():
            if v > s["worst"]:
                s["worst"], s["worst_where"] = v, "%s in [%s]" % (key, name)
        s["worst_stats"] = max(s["worst_stats"], max(serr.values()))
        bad = {kk: v for kk, v in errs.items() if not v <= TOL}
        badstats = {kk: v for kk, v in serr.items() if not v <= TOL}
        return name, bad, badstats

    def test_10_gate_parity(self):
        failures = []
        for c in build_configs():
            try:
                name, bad, badstats = self.run_config(c)
            except AssertionError as exc:
                failures.append("[%s] %s" % (cfg_name(c), exc))
                continue
            if bad or badstats:
                failures.append("[%s] tensors %s stats %s" % (
                    name, {kk: "%.3g" % v for kk, v in bad.items()}, {kk: "%.3g" % v for kk, v in badstats.items()}))
        if failures:
            self.fail("%d configuration(s) differ from the reference:\n  %s" % (len(failures), "\n  ".join(failures)))

    def test_20_inference(self):
        """saved == NULL: no noise, loss 0, the same y as the clean training forward."""
        for c in (cfg(N=6, d=4, E=4, k=2, noisy=1, load_loss=LOAD_CV, seed=501),
                  cfg(N=6, d=4, E=4, k=2, noisy=1, combine=COMBINE_ROUTER_SOFTMAX, load_loss=LOAD_ENTROPY,
                      router=ROUTER_GAUSSIAN, seed=502)):
            rs = np.random.RandomState(c["seed"])
            lg = LibGate(LIB, c)
            w = Wrapped(LIB, lg.ctx)
            try:
                names = lg.gate_params()
                gparams = {n: LIB.read(LIB.gate_param(lg.gate, i)) for n, i in names.items()}
                eparams = [{n: LIB.read(LIB.expert_param(lg.experts[e], i)) for n, i in lg.expert_params(e).items()}
                           for e in range(c["E"])]
                x = (0.7 * rs.randn(c["N"], c["d"])).astype(np.float32)
                y = np.zeros_like(x)
                topk = np.zeros((c["N"], c["k"]), np.int32)
                slots = np.zeros((c["N"], c["k"], c["d"]), np.float32)
                loss = ctypes.c_float(np.nan)
                LIB.check(LIB.gate_forward(lg.gate, w(x, F32), None, None, w(y, F32), w(topk, I32), w(slots, F32),
                                           ctypes.byref(loss), None), lg.ctx, "gate_forward (inference)")
            finally:
                w.close()
                lg.close()
            c2 = dict(c, noisy=0, clw=0.0, llw=0.0)  # clean logits, no loss
            labels = np.zeros(c["N"], np.int32)
            ref = torch_reference(c2, x, labels, np.ones(c["N"], np.uint8), gparams, eparams, topk, None,
                                  np.zeros_like(x), None)
            self.assertEqual(loss.value, 0.0)
            self.assertLessEqual(rel_err(y, ref["y"].detach().numpy()), TOL)
            self.assertLessEqual(rel_err(slots, ref["slots"].detach().numpy()), TOL)


if __name__ == "__main__":
    if not os.environ.get("CONFSMOE_LIBRARY"):
        sys.exit("gate_parity.py: set CONFSMOE_LIBRARY to the path of libconfsmoe.so")
    t0 = time.time()
    prog = unittest.main(exit=False)
    print("[gate_parity] runtime %.1f s" % (time.time() - t0), file=sys.stderr)
    sys.exit(0 if prog.result.wasSuccessful() else 1)
