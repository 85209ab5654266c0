#!/usr/bin/python3
"""Ownership scenarios run under valgrind by test_valgrind.py (no unittest: a plain script).

Every parent is deleted or closed before its children, which are then used; closes happen in
many orders; views outlive their layers. Any invalid read/write/free in libconfsmoe would be a
use-after-free that the ownership rules of the bindings failed to prevent.

With --uaf it instead commits a deliberate use-after-free through the raw ctypes API (the
negative control showing that the harness detects one).
"""
import gc
import itertools
import sys

import numpy as np

import confsmoe
from confsmoe._lib import api


def deliberate_uaf():
    ctx = confsmoe.Context()
    t = confsmoe.Tensor(ctx, (16,))
    h = t._h
    api.tensor_destroy(h)        # behind the bindings' back
    api.tensor_nbytes(h)         # reads freed memory
    t._node.handle = None        # keep the finaliser from freeing it twice
    print("uaf done")


def build():
    ctx = confsmoe.Context(seed=1)
    experts = [confsmoe.Expert(ctx, 8, 6) for _ in range(3)]
    gate = confsmoe.Gate(ctx, experts, n_classes=2, k=2)
    x = confsmoe.Tensor.from_numpy(ctx, np.linspace(-1, 1, 40, dtype=np.float32).reshape(5, 8))
    out = gate.forward(x, labels=np.array([0, 1, 0, 1, 1], np.int32), train=True)
    opt = confsmoe.Optimizer(ctx, [gate] + experts, lr=1e-2)
    view = experts[1].parameters()[2].value
    return dict(ctx=ctx, experts=experts, gate=gate, x=x, saved=out.saved, opt=opt, view=view, y=out.y)


def scenarios():
    # 1. the ctx and the experts are deleted first; the gate, saved handle and optimizer still work
    o = build()
    gate, saved, opt, x, view, y = o["gate"], o["saved"], o["opt"], o["x"], o["view"], o["y"]
    del o
    gc.collect()
    gate.backward(saved, y)
    opt.step()
    gate.forward(x)
    view += 1.0
    del gate, saved, opt, x
    gc.collect()
    assert float(view.sum()) != 0.0  # the view still pins its expert (and the ctx)
    del view
    gc.collect()

    # 2. explicit close of every parent first
    o = build()
    o["ctx"].close()
    for e in o["experts"]:
        e.close()
    o["gate"].backward(o["saved"], o["y"])
    o["gate"].close()
    o["opt"].step()
    o["opt"].close()
    o["saved"].close()
    o["x"].close()
    del o
    gc.collect()

    # 3. many close orders
    keys = ["ctx", "gate", "saved", "x", "opt", "e0", "view"]
    for order in itertools.islice(itertools.permutations(keys), 0, 5040, 211):
        o = build()
        o["e0"] = o["experts"][0]
        del o["experts"]
        for k in order:
            obj = o.pop(k)
            if k != "view":
                obj.close()
            del obj
            gc.collect()
        del o

    # 4. a reference cycle through everything
    o = build()
    o["self"] = o
    o["gate"].cycle = o
    del o
    gc.collect()

    # 5. a model: its gate outlives it, the optimizer pins its parameters
    ctx = confsmoe.Context(seed=2)
    m = confsmoe.Model(ctx, [3, 2], 2, d=8, heads=2, n_experts=2, k=1)
    xs = [np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)]
    avail = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], np.uint8)
    m.set_pool(0, xs[0])
    m.set_pool(1, xs[1])
    opt = confsmoe.Optimizer(ctx, m)
    g = m.gate
    m.step(xs, avail, np.array([0, 1, 0, 1], np.int32))
    del m, ctx
    gc.collect()
    opt.step()
    g.stats("total")
    del opt, g
    gc.collect()
    print("ownership scenarios: ok")


if __name__ == "__main__":
    if "--uaf" in sys.argv:
        deliberate_uaf()
    else:
        scenarios()
