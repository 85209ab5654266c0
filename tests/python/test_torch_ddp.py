#!/usr/bin/python3
"""DistributedDataParallel with a MoELayer inside: 2 processes (gloo, localhost) on the two halves
of a batch give the gradients of one process on the whole batch.

Run (any PyTorch with torch.distributed and gloo; Debian's 1.13 included):
    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 BLIS_NUM_THREADS=1 \
        /usr/bin/python3 tests/python/test_torch_ddp.py -v

Why they must agree: labels are one class per token (x [B, S, F], labels [B, S]); the task
loss is the mean cross-entropy over a process's tokens and the aux loss the mean confidence loss
over its slots, so with equal halves the mean of the two processes' losses is the loss of the
whole batch, and DDP's averaged gradient is its gradient. The gate has no noise and no load
loss (both are per call by design). Tolerance: float32 gradients summed in another order
(|g| <= 0.2 here) differ by ~1e-8 (measured: at most 7e-9); rtol 1e-4 / atol 1e-6 is far below
the difference between the gradient of one half and that of the whole batch (> 1e-3, checked).
"""
import os
import socket
import tempfile
import unittest

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError:  # pragma: no cover
    torch = None

import confsmoe  # noqa: F401  (fails early, with the loader's message, if the library is missing)

B, S, F, D, C = 8, 6, 5, 8, 3
WORLD = 2


def _model():
    from confsmoe.torch import MoELayer
    torch.manual_seed(0)
    return Net(MoELayer(D, n_experts=4, k=2, n_classes=C))


class Net(torch.nn.Module if torch is not None else object):
    def __init__(self, moe):
        super().__init__()
        self.enc = torch.nn.Linear(F, D)
        self.moe = moe
        self.head = torch.nn.Linear(D, C)

    def forward(self, x, labels):
        h, aux = self.moe(torch.tanh(self.enc(x)), labels=labels)
        return self.head(h), aux


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, S, F, generator=g), torch.randint(0, C, (B, S), generator=g)


def _loss(model, x, labels):
    out, aux = model(x, labels)
    return torch.nn.functional.cross_entropy(out.reshape(-1, C), labels.reshape(-1)) + aux


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # Bind gloo to the loopback device rather than to what the host name resolves to (which a
    # machine without an /etc/hosts entry for it cannot resolve).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, labels = _batch()
        half = B // WORLD
        rows = slice(rank * half, (rank + 1) * half)
        _loss(ddp, x[rows], labels[rows]).backward()
        torch.save(_grads(model), os.path.join(out_dir, "grads%d.pt" % rank))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@unittest.skipIf(torch is None, "PyTorch is not importable")
class TestDDP(unittest.TestCase):
    def test_two_processes_give_the_gradient_of_the_whole_batch(self):
        self.assertTrue(dist.is_available() and dist.is_gloo_available(), "torch.distributed with gloo")
        x, labels = _batch()
        whole = _model()
        _loss(whole, x, labels).backward()
        want = _grads(whole)
        one_half = _model()
        _loss(one_half, x[:B // WORLD], labels[:B // WORLD]).backward()
        half = _grads(one_half)
        self.assertEqual(sorted(want), ["enc.bias", "enc.weight", "head.bias", "head.weight", "moe.flat"])
        # the control: one half alone is far from the whole batch
        self.assertGreater(float((half["moe.flat"] - want["moe.flat"]).abs().max()), 1e-3)
        with tempfile.TemporaryDirectory() as out_dir:
            mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
            got = [torch.load(os.path.join(out_dir, "grads%d.pt" % r)) for r in range(WORLD)]
        for rank in range(WORLD):
            for name in want:
                torch.testing.assert_close(got[rank][name], want[name], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: "rank %d, %s: %s" % (rank, name, m))


if __name__ == "__main__":
    unittest.main()
