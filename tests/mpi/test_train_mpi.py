#!/usr/bin/python3
"""confsmoe-train under mpirun on the real data (data/handwritten): the P-rank run gives the
1-rank run's losses, training accuracy, routing and test metrics (same global batch, same
seed), and only rank 0 prints and writes files.

Environment (set by tests/mpi/meson.build):
  CONFSMOE_TRAIN  path of the confsmoe-train executable (built with MPI)
  CONFSMOE_DATA   the data folder of the source tree (data/, holding handwritten/)
  MPIRUN          the mpirun executable
"""
import json
import os
import subprocess
import tempfile
import unittest

TRAIN = os.environ.get("CONFSMOE_TRAIN", "")
DATA = os.environ.get("CONFSMOE_DATA", "")
MPIRUN = os.environ.get("MPIRUN", "mpirun")
LAUNCH = ["--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def train(ranks, args, out_dir):
    """Runs the trainer (ranks 0: without mpirun); returns (stdout, JSON report)."""
    report = os.path.join(out_dir, "report-%d.json" % ranks)
    cmd = [TRAIN] + args + ["--json", report]
    if ranks:
        cmd = [MPIRUN] + LAUNCH + ["-np", str(ranks)] + cmd
    env = dict(os.environ, BLIS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if r.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s\n%s" % (" ".join(cmd), r.returncode, r.stdout, r.stderr))
    with open(report) as f:
        return r.stdout, json.load(f)


class TestDataParallelTrainer(unittest.TestCase):
    def check_same_run(self, args, ranks):
        with tempfile.TemporaryDirectory() as d:
            _, one = train(0, args, d)
            _, mpi_one = train(1, args, d)
            out, many = train(ranks, args, d)
        self.assertEqual(one["ranks"], 1)
        self.assertEqual(many["ranks"], ranks)
        self.assertEqual(len(one["history"]), len(many["history"]))
        self.assertGreaterEqual(len(one["history"]), 3)
        for a, b, c in zip(one["history"], mpi_one["history"], many["history"]):
            # mpirun -np 1 is the plain run, bit for bit.
            self.assertEqual(a["loss"], b["loss"])
            # P ranks: the same global batches and draws; only the order of float sums differs.
            self.assertLess(abs(a["loss"] - c["loss"]), 1e-5 * abs(a["loss"]), (a["epoch"], a["loss"], c["loss"]))
            self.assertLess(abs(a["task_loss"] - c["task_loss"]), 1e-5 * abs(a["task_loss"]))
            self.assertEqual(a["train_accuracy"], c["train_accuracy"])
            self.assertAlmostEqual(a["load_entropy"], c["load_entropy"], places=9)
            self.assertEqual(a["val_accuracy"], c["val_accuracy"])
        self.assertEqual(one["best_epoch"], many["best_epoch"])
        self.assertEqual(one["test"]["accuracy"], many["test"]["accuracy"])
        self.assertAlmostEqual(one["test"]["macro_auroc"], many["test"]["macro_auroc"], places=6)
        self.assertEqual(one["experts"]["slots"], many["experts"]["slots"])
        # Rank 0 alone prints: one header, one line per epoch, one result.
        self.assertEqual(out.count("confsmoe-train: libconfsmoe"), 1)
        self.assertEqual(out.count("test: accuracy"), 1)
        self.assertIn("data parallel: %d MPI ranks" % ranks, out)

    def test_defaults_handwritten_two_ranks(self):
        """The recommended configuration (modality dropout, dropout) on handwritten, r = 0.5."""
        self.check_same_run(["--data", os.path.join(DATA, "handwritten"), "--missing", "0.5", "--epochs", "4"], 2)

    def test_paper_two_stage_handwritten_three_ranks(self):
        """The paper's configuration (two-stage imputation with fresh draws) on handwritten, 3 ranks."""
        self.check_same_run(["--data", os.path.join(DATA, "handwritten"), "--paper", "--missing", "0.3",
                             "--epochs", "3", "--batch", "100"], 3)

    def test_checkpoint_written_once(self):
        with tempfile.TemporaryDirectory() as d:
            ckpt = os.path.join(d, "model.safetensors")
            train(2, ["--data", os.path.join(DATA, "handwritten"), "--epochs", "1", "--checkpoint", ckpt], d)
            self.assertTrue(os.path.exists(ckpt))
            self.assertEqual([f for f in os.listdir(d) if f.endswith(".tmp")], [])


if __name__ == "__main__":
    unittest.main()
