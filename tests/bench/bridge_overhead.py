#!/usr/bin/python3
"""What the PyTorch bridge costs on top of the C gate (docs/PERFORMANCE.md, "The PyTorch bridge").

    bridge_overhead.py [--N 64] [--d 64] [--E 8] [--k 2] [--C 10] [--reps 2000] [--warmup 200]
                       [--json] [--max-overhead-ms X]

Times, on the same C gate (one MoELayer's), with the same input and labels:
- "c_gate": confsmoe_gate_forward (training) + confsmoe_gate_backward + confsmoe_saved_destroy,
  called through ctypes on tensors wrapped once (what a C host pays, plus three foreign calls);
- "moe_layer": MoELayer forward + backward (autograd) of (y, aux_loss) with x.requires_grad;
- "c_gate_then_linear": the C gate call, then a torch.nn.Linear(d, d) forward + backward on x:
  for scale, what any PyTorch layer call costs in the same conditions (caches just used by the
  gate's GEMMs) is this minus "c_gate".
They alternate in blocks of 50 calls, so that a disturbance of the machine hits all; each prints
its median over --reps calls; the overhead is moe_layer - c_gate. --max-overhead-ms makes the
script fail (exit 1) when the overhead is larger (the smoke test passes a loose bound).
Single-threaded (BLIS_NUM_THREADS, torch.set_num_threads(1)) unless the environment says otherwise.
"""
import argparse
import ctypes
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import confsmoe
from confsmoe import _lib
from confsmoe.torch import MoELayer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--E", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--C", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--max-overhead-ms", type=float, default=None)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    torch.manual_seed(0)
    layer = MoELayer(a.d, n_experts=a.E, k=a.k, n_classes=a.C)
    x = torch.randn(a.N, a.d, requires_grad=True)
    labels = torch.randint(0, a.C, (a.N,))
    dy = torch.randn(a.N, a.d)
    one = torch.ones(())

    # The C side: the layer's own gate (same weights, same routing), tensors wrapped once.
    ctx = layer.c_context
    gate = layer.c_gate
    xa = x.detach().numpy()
    la = labels.numpy().astype(np.int32)
    ya = np.empty((a.N, a.d), np.float32)
    ta = np.empty((a.N, a.k), np.int32)
    dya = dy.numpy()
    dxa = np.empty((a.N, a.d), np.float32)
    wrapped = [ctx.wrap(arr) for arr in (xa, la, ya, ta, dya, dxa)]
    xt, lt, yt, tt, dyt, dxt = [w._h for w in wrapped]
    gh = gate._h
    fwd = _lib.api.gate_forward.c_function
    bwd = _lib.api.gate_backward.c_function
    destroy = _lib.api.saved_destroy.c_function
    loss = ctypes.c_float()

    def c_call():
        saved = _lib.SavedHandle()
        if fwd(gh, xt, lt, None, yt, tt, None, ctypes.byref(loss), ctypes.byref(saved)):
            raise RuntimeError(ctx.last_error)
        status = bwd(gh, saved, dyt, None, 1.0, dxt)
        destroy(saved)
        if status:
            raise RuntimeError(ctx.last_error)

    def layer_call():
        y, aux = layer(x, labels=labels)
        torch.autograd.backward([y, aux], [dy, one])

    linear = torch.nn.Linear(a.d, a.d)

    def c_then_linear():
        c_call()
        torch.autograd.backward([linear(x)], [dy])

    def reset():  # what optimizer.zero_grad() does between steps, outside the timing
        layer.zero_grad(set_to_none=True)
        linear.zero_grad(set_to_none=True)
        x.grad = None

    times = {"c_gate": [], "moe_layer": [], "c_gate_then_linear": []}
    calls = {"c_gate": c_call, "moe_layer": layer_call, "c_gate_then_linear": c_then_linear}
    for _ in range(a.warmup):
        for fn in calls.values():
            fn()
            reset()
    block = 50
    done = 0
    while done < a.reps:
        m = min(block, a.reps - done)
        for name, fn in calls.items():
            out = times[name]
            for _ in range(m):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
                reset()
        done += m
    med = {name: float(np.median(v)) * 1e3 for name, v in times.items()}
    overhead = med["moe_layer"] - med["c_gate"]
    linear_ms = med["c_gate_then_linear"] - med["c_gate"]
    rec = dict(what="bridge_overhead", median_s=med["moe_layer"] / 1e3, N=a.N, d=a.d, E=a.E, k=a.k, C=a.C,
               reps=a.reps, c_gate_ms=med["c_gate"], moe_layer_ms=med["moe_layer"], overhead_ms=overhead,
               torch_linear_ms=linear_ms,
               n_parameters=len(list(layer.parameters())), torch=torch.__version__, numpy=np.__version__,
               confsmoe=confsmoe.version_string(), python=platform.python_version(),
               blis_threads=os.environ.get("BLIS_NUM_THREADS"), torch_threads=torch.get_num_threads())
    if a.json:
        print(json.dumps(rec))
    else:
        print("bridge overhead at N=%d d=%d E=%d k=%d C=%d (median of %d calls; torch %s, python %s):"
              % (a.N, a.d, a.E, a.k, a.C, a.reps, torch.__version__, platform.python_version()))
        print("  C gate forward+backward      %.3f ms" % med["c_gate"])
        print("  MoELayer forward+backward    %.3f ms" % med["moe_layer"])
        print("  bridge overhead              %.3f ms" % overhead)
        print("  for scale: nn.Linear(%d, %d) forward+backward after the gate  %.3f ms" % (a.d, a.d, linear_ms))
    if not all(np.isfinite(v) and v > 0 for v in med.values()):
        print("bridge_overhead: implausible timings %s" % med, file=sys.stderr)
        return 1
    if a.max_overhead_ms is not None and overhead > a.max_overhead_ms:
        print("bridge_overhead: %.3f ms is over the bound of %.3f ms" % (overhead, a.max_overhead_ms), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
