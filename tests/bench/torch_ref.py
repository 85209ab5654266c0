#!/usr/bin/python3
"""The PyTorch side of the libconfsmoe benchmark: the same math in eager mode, float32.

An independent implementation written from docs/MODEL.md (sections 1-6) with plain torch
ops and autograd; it shares no code or parameters with the library (the benchmark compares
speed, tests/parity/ compares values). It is written the way a PyTorch user would write it:
one batched call per expert over its tokens (argsort by expert, split), a ConfNet per
expert on that expert's rows, index_add for the combination, nn.Linear / nn.LayerNorm.

    torch_ref.py gate  --N n --d d --h h --E e --k k --C c [--reps r] [--warmup w] [--threads t] [--compile]
    torch_ref.py model --B b --S s --F f1,f2,.. --d d --h h --E e --k k --C c --missing r ...

Each prints one JSON object on stdout, with the same fields as tests/bench/bench.c:
median_s over --reps timed runs after --warmup untimed ones, base_rss_mb (after set-up) and
peak_rss_mb (VmHWM at the end; it includes the interpreter and libtorch, see base_rss_mb).

--compile (PyTorch 2.x only) times torch.compile of the same module (default backend), wrapped
once before the warm-up; compilation happens in the warm-up calls (at least 2), whose first
call's time is compile_s. graphs_compiled_in_timed_runs counts the graphs Dynamo compiled during
the timed runs (0 when the warm-up absorbed all compilation). The optimizer step stays eager.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0
    return -1.0


# ----------------------------------------------------------------------------- layers


class Expert(nn.Module):
    """E_i(z) = W2 GELU(W1 z + b1) + b2, exact erf GELU (docs/MODEL.md, section 2)."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, z):
        return self.fc2(F.gelu(self.fc1(z)))


class ConfNet(nn.Module):
    """c = sigmoid(v . LN(y) + beta), LN with affine (docs/MODEL.md, section 4)."""

    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=1e-5)
        self.fc = nn.Linear(d, 1)

    def forward(self, y):
        return torch.sigmoid(self.fc(self.ln(y))).squeeze(-1)


class ConfGate(nn.Module):
    """Router softmax top-k (frozen router), experts, token-level confidence, L_conf."""

    def __init__(self, d, h, E, k, C):
        super().__init__()
        self.E, self.k, self.d = E, k, d
        bound = 1.0 / math.sqrt(E)
        # The confidence gate's router gets no gradient (docs/MODEL.md, section 4): a buffer.
        self.register_buffer("router_w", torch.empty(d, E).uniform_(-bound, bound))
        self.experts = nn.ModuleList([Expert(d, h) for _ in range(E)])
        self.conf = nn.ModuleList([ConfNet(d) for _ in range(E)])
        self.target = nn.Linear(d, C)

    def forward(self, z, labels, present=None):
        """z [N, d], labels [N] int64, present [N] float or None.
        Returns y [N, d], L_conf, slots [N, k, d] (the expert outputs, unweighted)."""
        N, k = z.shape[0], self.k
        with torch.no_grad():
            idx = (z @ self.router_w).topk(k, dim=1).indices  # [N, k]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)           # slots grouped by expert
            counts = torch.bincount(flat, minlength=self.E).tolist()
            tok = order // k                                   # the token of each sorted slot
        xs = z.index_select(0, tok)
        ys, cs = [], []
        for e, chunk in enumerate(xs.split(counts)):
            if chunk.shape[0] == 0:
                continue
            y = self.experts[e](chunk)
            ys.append(y)
            cs.append(self.conf[e](y))
        Y = torch.cat(ys)                                      # [N k, d] in expert order
        c = torch.cat(cs)                                      # [N k]
        # Target p = softmax(P y)[label], not detached.
        p = torch.softmax(self.target(Y), -1).gather(1, labels.index_select(0, tok)[:, None])[:, 0]
        if present is None:
            L_conf = ((c - p) ** 2).mean()
        else:
            pres = present.index_select(0, tok)
            den = pres.sum()
            L_conf = (((c - p) ** 2) * pres).sum() / den.clamp_min(1.0)
        out = torch.zeros(N, self.d, dtype=z.dtype).index_add(0, tok, c[:, None] * Y)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        slots = Y.index_select(0, inverse).view(N, k, self.d)
        return out, L_conf, slots


class Model(nn.Module):
    """docs/MODEL.md, section 6: encoders, MHA, per-modality Conf-MoE, two-stage imputation, readout."""

    def __init__(self, feats, S, d, h, E, k, C, heads=4, dropout=0.1, draws=10):
        super().__init__()
        self.M, self.S, self.d, self.k, self.heads, self.p, self.draws = len(feats), S, d, k, heads, dropout, draws
        self.enc = nn.ModuleList([nn.Linear(f, d) for f in feats])
        self.pos = nn.Parameter(torch.zeros(self.M * S, d))
        self.ln1 = nn.LayerNorm(d)
        self.q, self.kk, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.gate = ConfGate(d, h, E, k, C)
        self.imp_q, self.imp_kv, self.imp_ln = nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)
        self.readout = nn.Linear(self.M * d, d)
        self.ln_out = nn.LayerNorm(d)
        self.head = nn.Linear(d, C)

    def stage_one(self, xs, avail, pools):
        out = []
        for m, x in enumerate(xs):
            miss = torch.nonzero(avail[:, m] == 0).reshape(-1)
            if miss.numel():
                pool = pools[m]
                K = min(self.draws, pool.shape[0])
                pick = torch.rand(miss.numel(), pool.shape[0]).topk(K, dim=1).indices  # K distinct rows
                x = x.clone()
                x[miss] = pool[pick].mean(1)
            out.append(x)
        return out

    def stage_two(self, Hm, slots, avail):
        """For every missing (b, m): top-T sparse cross-attention over the slots of the
        present modalities of b (docs/MODEL.md, section 5), then LayerNorm."""
        M, S, d = self.M, self.S, self.d
        T = max(1, ((M - 1) * S) // 4)
        out = list(Hm)
        for m in range(M):
            miss = torch.nonzero(avail[:, m] == 0).reshape(-1)
            if miss.numel() == 0 or M == 1:
                continue
            others = [mm for mm in range(M) if mm != m]
            q = self.imp_q(slots[m].index_select(0, miss).mean(2))                 # [n, S, d]
            Yc = torch.cat([slots[mm].index_select(0, miss) for mm in others], 1)  # [n, Lc, k, d]
            valid = torch.cat([avail[miss, mm:mm + 1].expand(-1, S) for mm in others], 1).bool()  # [n, Lc]
            kv = self.imp_kv(Yc)
            scores = torch.einsum("nsd,ntjd->nsjt", q, kv) / math.sqrt(d)           # [n, S, k, Lc]
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
            a = torch.softmax(scores, -1)
            keep = torch.zeros_like(a).scatter(-1, a.topk(min(T, a.shape[-1]), -1).indices, 1.0)
            ihat = torch.einsum("nsjt,ntjd->nsd", a * keep, kv)
            rows = self.imp_ln(out[m].index_select(0, miss) + ihat)
            out[m] = out[m].index_copy(0, miss, rows)
        return out

    def forward(self, xs, avail, labels, pools):
        B, M, S, d, H = avail.shape[0], self.M, self.S, self.d, self.heads
        L, dh = M * S, d // H
        xs = self.stage_one(xs, avail, pools)
        X = torch.cat([self.enc[m](x) for m, x in enumerate(xs)], 1) + self.pos  # [B, L, d]
        Xn = self.ln1(X)
        Q = self.q(Xn).view(B, L, H, dh).transpose(1, 2)
        K = self.kk(Xn).view(B, L, H, dh).transpose(1, 2)
        V = self.v(Xn).view(B, L, H, dh).transpose(1, 2)
        att = F.dropout(torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(dh), -1), self.p, self.training)
        A = self.o((att @ V).transpose(1, 2).reshape(B, L, d))
        Hh = X + F.dropout(A, self.p, self.training)
        labels_tok = labels.repeat_interleave(S)
        total_present = avail.sum()
        aux, Hm_out, slots = 0.0, [], []
        for m in range(M):
            Hm = Hh[:, m * S:(m + 1) * S].reshape(B * S, d)
            present = avail[:, m].repeat_interleave(S).to(Hm.dtype)
            Fm, lc, Y = self.gate(self.ln2(Hm), labels_tok, present)
            Hm_out.append(self.ln3(Hm + Fm).view(B, S, d))
            slots.append(Y.view(B, S, self.k, d))
            aux = aux + avail[:, m].sum() / total_present * lc
        Hm_out = self.stage_two(Hm_out, slots, avail)
        pooled = torch.cat([h.mean(1) for h in Hm_out], 1)
        logits = self.head(self.ln_out(self.readout(pooled)))
        return F.cross_entropy(logits, labels) + aux


# ----------------------------------------------------------------------------- benchmarks


def gate_flops(N, d, h, E, k, C):
    nk = N * k
    return 12.0 * nk * d * h + 2.0 * N * d * E + 6.0 * nk * d * C + 6.0 * nk * d


def model_flops(a):
    B, S, d, M, C = a.B, a.S, a.d, len(a.F), a.C
    L = M * S
    f = sum(4.0 * B * S * fm * d for fm in a.F)
    f += 3.0 * 4.0 * 2.0 * B * L * d * d + 3.0 * 2.0 * 2.0 * B * L * L * d
    f += M * gate_flops(B * S, d, a.h, a.E, a.k, C)
    f += 6.0 * B * M * d * d + 6.0 * B * d * C
    return f


def timed(fn, reps, warmup):
    times = []
    for r in range(-warmup, reps):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if r >= 0:
            times.append(t1 - t0)
    s = sorted(times)
    n = len(s)
    med = s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
    return med, times


def compiled_graphs():
    """Graphs Dynamo has compiled in this process so far (0 without torch.compile)."""
    try:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])
    except (ImportError, KeyError, AttributeError):
        return 0


def timed_compiled(fn, a):
    """timed(), with the warm-up's first call reported as compile_s and the graphs compiled
    during the timed runs counted (docstring, --compile)."""
    warmup = max(a.warmup, 2) if a.compile else a.warmup
    if warmup == 0:
        med, times = timed(fn, a.reps, 0)
        return med, times, dict(warmup=0, compiled=False)
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    graphs = compiled_graphs()
    med, times = timed(fn, a.reps, warmup - 1)
    extra = dict(warmup=warmup, first_call_s=first, compiled=a.compile)
    if a.compile:
        extra.update(compile_s=first, graphs_compiled=graphs,
                     graphs_compiled_in_timed_runs=compiled_graphs() - graphs)
    return med, times, extra


def run_gate(a):
    torch.manual_seed(a.seed)
    gate = ConfGate(a.d, a.h, a.E, a.k, a.C)
    call = torch.compile(gate) if a.compile else gate
    x = (torch.rand(a.N, a.d) * 2 - 1).requires_grad_(True)
    dy = (torch.rand(a.N, a.d) * 2 - 1) / a.N
    labels = torch.randint(0, a.C, (a.N,))
    params = list(gate.parameters())
    fwd = []

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        t0 = time.perf_counter()
        y, L_conf, _ = call(x, labels)
        fwd.append(time.perf_counter() - t0)
        ((y * dy).sum() + L_conf).backward()

    base = status_mb("VmRSS")
    med, times, extra = timed_compiled(step, a)
    flops = gate_flops(a.N, a.d, a.h, a.E, a.k, a.C)
    timed_fwd = fwd[len(fwd) - a.reps:]
    return dict(what="gate", N=a.N, d=a.d, h=a.h, E=a.E, k=a.k, C=a.C, median_s=med,
                fwd_mean_s=sum(timed_fwd) / len(timed_fwd), flops=flops, gflops=flops / med * 1e-9,
                base_rss_mb=base, peak_rss_mb=status_mb("VmHWM"), times_s=times, **extra)


def run_model(a):
    torch.manual_seed(a.seed)
    M, B, S = len(a.F), a.B, a.S
    model = Model(a.F, S, a.d, a.h, a.E, a.k, a.C)
    model.train()
    call = torch.compile(model) if a.compile else model
    xs = [torch.rand(B, S, f) * 2 - 1 for f in a.F]
    pools = [torch.rand(512, S, f) * 2 - 1 for f in a.F]
    # Every sample keeps one random modality; the other cells drop with p = missing.
    keep = torch.randint(0, M, (B,))
    avail = (torch.rand(B, M) >= a.missing).to(torch.uint8)
    avail[torch.arange(B), keep] = 1
    labels = torch.randint(0, a.C, (B,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = call(xs, avail, labels, pools)
        loss.backward()
        opt.step()
        losses.append(float(loss))

    base = status_mb("VmRSS")
    med, times, extra = timed_compiled(step, a)
    flops = model_flops(a)
    return dict(what="model", B=B, S=S, M=M, d=a.d, h=a.h, E=a.E, k=a.k, C=a.C,
                missing_cells=int((avail == 0).sum()), median_s=med, flops=flops, gflops=flops / med * 1e-9,
                first_loss=losses[0], last_loss=losses[-1], base_rss_mb=base, peak_rss_mb=status_mb("VmHWM"),
                times_s=times, **extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["gate", "model"])
    ap.add_argument("--N", type=int, default=256)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--h", type=int, default=128)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--S", type=int, default=50)
    ap.add_argument("--F", type=lambda s: [int(v) for v in s.split(",")], default=[300, 74, 35])
    ap.add_argument("--missing", type=float, default=0.3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--compile", action="store_true", help="time torch.compile of the module (PyTorch 2.x)")
    a = ap.parse_args()
    if a.compile and (not hasattr(torch, "compile") or int(torch.__version__.split(".")[0]) < 2):
        print("torch_ref.py: --compile needs PyTorch 2.x (torch.compile); this is torch %s (%s)"
              % (torch.__version__, sys.executable), file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    out = run_gate(a) if a.what == "gate" else run_model(a)
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
