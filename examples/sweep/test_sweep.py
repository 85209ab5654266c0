#!/usr/bin/python3
"""Tests of the sweep's helpers (about 5 s):

    CONFSMOE_TRAIN=build/examples/train/confsmoe-train /usr/bin/python3 examples/sweep/test_sweep.py -v

- the metrics against hand-computed values (docs/TRAIN.md definitions);
- the floor's logistic regression: its gradient against finite differences, and it learns;
- the masks: model flags do not change the trainer's splits and masks, the protocol's drop
  counts hold, and the standardisation makes the present training rows mean 0 / sd 1, on
  data/handwritten (needs the trainer; skipped without it).
"""
import math
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import mvdata  # noqa: E402
import sweep  # noqa: E402

TRAINER = os.environ.get("CONFSMOE_TRAIN", os.path.join(ROOT, "build", "examples", "train", "confsmoe-train"))
HANDWRITTEN = os.path.join(ROOT, "data", "handwritten")


class Metrics(unittest.TestCase):
    def test_accuracy_f1(self):
        pred = np.array([0, 0, 1, 2, 2, 2])
        label = np.array([0, 1, 1, 2, 2, 0])
        self.assertAlmostEqual(mvdata.accuracy(pred, label), 4 / 6)
        # class 0: tp 1 fp 1 fn 1 -> 2/4; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2: tp 2 fp 1 fn 0 -> 4/5
        self.assertAlmostEqual(mvdata.macro_f1(pred, label, 4), (0.5 + 2 / 3 + 0.8) / 3)  # class 3 left out

    def test_auroc_ties(self):
        score = np.array([0.1, 0.4, 0.4, 0.8], np.float32)
        pos = np.array([False, True, False, True])
        # ranks 1, 2.5, 2.5, 4; positives 2.5 + 4 = 6.5; (6.5 - 3) / (2 * 2) = 0.875
        self.assertAlmostEqual(mvdata.auroc(score, pos), 0.875)
        self.assertTrue(math.isnan(mvdata.auroc(score, np.ones(4, bool))))

    def test_load_stats(self):
        s = mvdata.load_stats([74, 49, 66, 50, 66, 43, 67, 65])  # numbers of a confsmoe-train JSON
        self.assertAlmostEqual(s["load_entropy"], 0.992654898, places=8)
        self.assertAlmostEqual(s["load_cv2"], 0.03380952381, places=9)


class Floor(unittest.TestCase):
    def test_gradient_and_learning(self):
        rs = np.random.RandomState(0)
        n, F, C = 300, 5, 3
        centers = 3 * rs.randn(C, F)
        y = rs.randint(0, C, n)
        X = centers[y] + rs.randn(n, F)
        predict = sweep.fit_logreg(X, y, C, 1e-3)
        self.assertGreater(np.mean(predict(X).argmax(1) == y), 0.95)
        # The objective's gradient against central differences.
        captured = {}
        real = sweep.lbfgs

        def spy(fg, x0, **kw):
            captured["fg"] = fg
            return real(fg, x0, max_iter=1)
        sweep.lbfgs = spy
        try:
            sweep.fit_logreg(X, y, C, 0.1)
        finally:
            sweep.lbfgs = real
        fg = captured["fg"]
        w = rs.randn((F + 1) * C) * 0.3
        f, g = fg(w)
        for i in range(0, len(w), 4):
            e = np.zeros_like(w)
            e[i] = 1e-6
            num = (fg(w + e)[0] - fg(w - e)[0]) / 2e-6
            self.assertAlmostEqual(num, g[i], places=5)


@unittest.skipUnless(os.access(TRAINER, os.X_OK), "no trainer at %s (set CONFSMOE_TRAIN)" % TRAINER)
class Masks(unittest.TestCase):
    def dump(self, folder, rate, seed, *flags):
        fd, path = tempfile.mkstemp(suffix=".csv")
        os.close(fd)
        subprocess.run([TRAINER, "--data", folder, "--missing", str(rate), "--seed", str(seed), "--epochs", "0",
                        "--quiet", "--dump-masks", path] + list(flags), check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, BLIS_NUM_THREADS="1"))
        self.addCleanup(os.unlink, path)
        return path

    def test_model_flags_do_not_change_masks(self):
        folder = HANDWRITTEN
        a = self.dump(folder, 0.3, 2, "--paper")
        b = self.dump(folder, 0.3, 2, "--gate", "softmax", "--d", "64", "--imputation", "mean", "--lr", "1e-3")
        with open(a) as fa, open(b) as fb:
            self.assertEqual(fa.read(), fb.read())

    def test_protocol_counts_and_standardisation(self):
        folder = HANDWRITTEN
        for rate in (0.0, 0.1, 0.5):
            split, natural, present = mvdata.load_masks(self.dump(folder, rate, 3))
            M = present.shape[1]
            for s in ("train", "val", "test"):
                rows = split == s
                n = int(rows.sum())
                self.assertTrue(np.all(present[rows].sum(1) >= 1))  # every sample keeps one modality
                dropped = int((natural[rows] & (1 - present[rows])).sum())
                self.assertEqual(dropped, int(math.floor(rate * n * (M - 1) + 0.5)))
        data = mvdata.prepare(folder, self.dump(folder, 0.5, 1))
        tr = data["idx"]["train"]
        for m, z in enumerate(data["views"]):
            rows = tr[data["present"][tr, m] == 1]
            self.assertLess(np.max(np.abs(z[rows].mean(0))), 1e-4)
            self.assertLess(np.max(np.abs(z[rows].std(0) - 1)), 1e-3)
            self.assertEqual(np.abs(z[data["present"][:, m] == 0]).max(), 0.0)


if __name__ == "__main__":
    unittest.main()
