#!/usr/bin/python3
"""A libconfsmoe confidence-gated MoE layer inside an ordinary PyTorch model.

    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 \
        /usr/bin/python3 examples/python/torch_layer.py [--steps 300]

Model: Linear encoder -> confsmoe.torch.MoELayer (E experts, top-k, confidence gate) -> ReLU ->
Linear head, trained with torch.optim.Adam on a synthetic task whose classes live in different
regions of the input space (so that experts can specialise). The MoE layer's weights are torch
Parameters sharing memory with the C library: Adam updates them in place, and the gate's
auxiliary confidence loss is added to the cross-entropy. Prints the loss falling, the test
accuracy, and how the gate spreads the tokens over the experts.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

try:
    import confsmoe
except ImportError:  # running from a source checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))
    import confsmoe
from confsmoe.torch import MoELayer


def make_data(n, centers, n_classes, g):
    """Gaussian clusters around ``centers`` (two per class), with a class-specific nonlinear twist."""
    n_features = centers.shape[1]
    cluster = torch.randint(0, 2 * n_classes, (n,), generator=g)
    x = centers[cluster] + 1.5 * torch.randn(n, n_features, generator=g)
    y = cluster % n_classes
    x[:, 0] = x[:, 0] + torch.sin(x[:, 1] * (1 + y.float()))
    return x, y


class Net(torch.nn.Module):
    def __init__(self, n_features, d, n_classes, n_experts, k, seed):
        super().__init__()
        self.enc = torch.nn.Linear(n_features, d)
        self.moe = MoELayer(d, n_experts=n_experts, k=k, n_classes=n_classes, seed=seed)
        self.head = torch.nn.Linear(d, n_classes)

    def forward(self, x, labels=None):
        h, aux = self.moe(self.enc(x), labels=labels)
        return self.head(torch.relu(h)), aux


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    n_features, n_classes = 10, 4
    centers = torch.randn(2 * n_classes, n_features, generator=g) * 1.5
    x_train, y_train = make_data(2000, centers, n_classes, g)
    x_test, y_test = make_data(500, centers, n_classes, g)

    net = Net(n_features, args.d, n_classes, args.experts, args.k, args.seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    print("libconfsmoe %s; MoELayer(%s)" % (confsmoe.__version__, net.moe.extra_repr()))
    print("torch parameters: %d tensors, of which %d live in libconfsmoe" % (
        len(list(net.parameters())), len(list(net.moe.parameters()))))

    first = None
    for step in range(1, args.steps + 1):
        net.train()
        idx = torch.randint(0, len(x_train), (args.batch,), generator=g)
        logits, aux = net(x_train[idx], labels=y_train[idx])
        task = torch.nn.functional.cross_entropy(logits, y_train[idx])
        loss = task + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print("step %4d  loss %.4f  (cross-entropy %.4f, confidence loss %.4f)" % (
                step, loss.item(), task.item(), aux.item()))

    net.eval()
    with torch.no_grad():
        net.moe.c_gate.reset_stats()
        logits, _ = net(x_test)
    acc = (logits.argmax(1) == y_test).float().mean().item()
    st = net.moe.stats("total")
    print("test accuracy %.4f  (%d samples, chance %.2f)" % (acc, len(y_test), 1.0 / n_classes))
    print("expert load %s  load entropy %.3f" % (st["load"].tolist(), st["load_entropy"]))
    print("loss %.4f -> %.4f in %d steps, %.1f s" % (first, loss.item(), args.steps, time.time() - t0))
    if not loss.item() < first:
        sys.exit("torch_layer: the loss did not fall")


if __name__ == "__main__":
    main()
