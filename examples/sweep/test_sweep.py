#!/usr/bin/python3
"""Tests of the sweep's helpers (about 5 s):

    CONFSMOE_TRAIN=build/examples/train/confsmoe-train /usr/bin/python3 examples/sweep/test_sweep.py -v

- the metrics against hand-computed values (docs/TRAIN.md definitions);
- the floor's logistic regression: its gradient against finite differences, and it learns;
- the masks: model flags do not change the trainer's splits and masks, the protocol's drop
  counts hold, and the standardisation makes the present training rows mean 0 / sd 1, on
  data/handwritten (needs the trainer; skipped without it).
"""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import mvdata  # noqa: E402
import plot  # noqa: E402
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


def write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


class Sequence(unittest.TestCase):
    """Sequence views on a hand-written folder: audio S = 2 x F = 3, image S = 3 x F = 1.
    Value of sample i, token t, feature f in the audio view: 100 i + 10 t + f."""
    N = 8

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sweep-seq-")
        self.addCleanup(shutil.rmtree, self.dir)
        audio = ["%d,%d,%d,%d,%d,%d" % tuple(100 * i + 10 * t + f for t in range(2) for f in range(3))
                 for i in range(self.N)]
        image = ["%d,%d,%d" % (i, -i, 2 * i) if i != 3 else "" for i in range(self.N)]  # sample 3: no image
        write_file(os.path.join(self.dir, "view0_audio.csv"), "#tokens=2\n" + "\n".join(audio) + "\n")
        write_file(os.path.join(self.dir, "view1_image.csv"), "#tokens=3\n" + "\n".join(image) + "\n")
        write_file(os.path.join(self.dir, "labels.csv"), "".join("%d\n" % (i % 2) for i in range(self.N)))

    def test_shapes_tokens_and_token_major_order(self):
        views, files, labels, tokens = mvdata.load_folder(self.dir, sequences=True)
        self.assertEqual(files, ["view0_audio.csv", "view1_image.csv"])
        self.assertEqual(tokens, [2, 3])
        self.assertEqual([v.shape for v in views], [(self.N, 6), (self.N, 3)])
        audio = views[0].reshape(self.N, 2, 3)  # token-major: [sample, token, feature]
        self.assertEqual(audio[5, 1, 2], 512.0)
        self.assertEqual(audio[2, 0, 1], 201.0)
        self.assertEqual(views[1][6].tolist(), [6.0, -6.0, 12.0])
        self.assertTrue(np.all(np.isnan(views[1][3])))  # the empty row: naturally missing
        self.assertEqual(labels.tolist(), [i % 2 for i in range(self.N)])

    def test_vector_readers_refuse_sequences(self):
        with self.assertRaisesRegex(ValueError, "view0_audio.csv: sequence view \\(#tokens=2\\)"):
            mvdata.load_folder(self.dir)

    def test_width_must_be_whole_tokens(self):
        write_file(os.path.join(self.dir, "view1_image.csv"), "#tokens=3\n1,2,3,4\n")
        with self.assertRaisesRegex(ValueError, "rows of 4 values are not #tokens=3 tokens"):
            mvdata.read_view(os.path.join(self.dir, "view1_image.csv"))

    def test_floor_on_flattened_tokens(self):
        # Masks by hand: samples 0-3 train, 4-5 val, 6-7 test; sample 1 loses its audio.
        masks = os.path.join(self.dir, "masks.csv")
        rows = ["sample,split,natural0,natural1,present0,present1"]
        for i in range(self.N):
            split = "train" if i < 4 else "val" if i < 6 else "test"
            rows.append("%d,%s,1,%d,%d,%d" % (i, split, i != 3, i != 1, i != 3))
        write_file(masks, "\n".join(rows) + "\n")
        res = sweep.run_floor(self.dir, masks)
        self.assertEqual(res["tokens"], [2, 3])
        self.assertEqual(res["features"], 9)
        self.assertEqual((res["n_train"], res["n_val"], res["n_test"]), (4, 2, 2))
        # Mean imputation per (token, feature) column: audio of the present train rows 0, 2, 3,
        # column (token 1, feature 2) has mean 10 + 2 + 100 * 5/3; sample 1 (missing) gets 0 after it.
        split, _, present = mvdata.load_masks(masks)
        views, _, _, _ = mvdata.load_folder(self.dir, sequences=True)
        z = mvdata.standardise(views, present, np.arange(4))
        col = np.array([12.0, 212.0, 312.0])
        self.assertAlmostEqual(float(z[0][6, 5]), (612.0 - col.mean()) / col.std(), places=4)
        self.assertEqual(float(np.abs(z[0][1]).max()), 0.0)

    def test_standardise_pools_a_feature_over_tokens(self):
        # The trainer's (and the PyTorch reference's) standardisation: audio feature 2 over the
        # 2 tokens of the present train rows 0, 2, 3 is {2, 12, 202, 212, 302, 312}.
        present = np.ones((self.N, 2), np.uint8)
        present[1, 0] = 0
        views, _, _, tokens = mvdata.load_folder(self.dir, sequences=True)
        z = mvdata.standardise(views, present, np.arange(4), tokens)
        vals = np.array([2.0, 12.0, 202.0, 212.0, 302.0, 312.0])
        self.assertAlmostEqual(float(z[0][6, 5]), (612.0 - vals.mean()) / vals.std(), places=4)
        self.assertAlmostEqual(float(z[0][6, 2]), (602.0 - vals.mean()) / vals.std(), places=4)
        # The image (S = 3, F = 1): one feature over every pixel of the train rows 0, 1, 2.
        pix = np.array([0.0, 0.0, 0.0, 1.0, -1.0, 2.0, 2.0, -2.0, 4.0])
        self.assertAlmostEqual(float(z[1][5, 1]), (-5.0 - pix.mean()) / pix.std(), places=4)
        self.assertEqual(float(np.abs(z[0][1]).max()), 0.0)


class Collapse(unittest.TestCase):
    """The collapse table and plot read the last epoch of each run's JSON history."""

    def test_table_and_plot_from_history(self):
        out = tempfile.mkdtemp(prefix="sweep-collapse-")
        self.addCleanup(shutil.rmtree, out)
        docs = os.path.join(out, "docs")
        os.makedirs(docs)
        for gi, gate in enumerate(sweep.COLLAPSE_GATES):
            d = os.path.join(out, "runs", sweep.collapse_name(gate, 8, 2))
            os.makedirs(d)
            hist = [dict(epoch=e, train_accuracy=0.5, val_accuracy=0.5, load_entropy=0.9 - 0.1 * e - 0.01 * gi,
                         load_cv2=0.2 * e, max_load_fraction=0.2 + 0.1 * e) for e in (1, 2, 3)]
            j = dict(dataset="x/avdigits-hard", missing=0.3, seed=1, test=dict(accuracy=0.25 * gi, macro_f1=0,
                     macro_auroc=0.5), experts=dict(load_entropy=0.8, load=[0.5, 0.5], load_cv2=0.1,
                     max_load_fraction=0.5), seconds=1, best_epoch=3, history=hist, n_train=1, n_val=1, n_test=1)
            with open(os.path.join(d, "avdigits-hard_r0.3_s1.json"), "w") as f:
                json.dump(j, f)
        rec = sweep.collect(out)
        table = sweep.table_collapse(rec, "avdigits-hard", 0.3, [1])
        self.assertIn("| 8 | 2 | softmax | 0.590 | 0.600 | 0.500 | 0.800 | 0.500 | 25.0 |", table)
        self.assertNotIn("| 16 |", table)  # no runs at E = 16: no rows
        path = os.path.join(docs, "c.svg")
        self.assertTrue(plot.plot_collapse(rec, "avdigits-hard", 0.3, [1], sweep.COLLAPSE_GATES,
                                           lambda g: sweep.collapse_name(g, 8, 2), path, "t"))
        with open(path) as f:
            self.assertEqual(f.read().count("<polyline"), 3 * len(sweep.COLLAPSE_GATES))
        self.assertFalse(plot.plot_collapse(rec, "avdigits-hard", 0.3, [1], sweep.COLLAPSE_GATES,
                                            lambda g: sweep.collapse_name(g, 16, 1), path, "t"))


class TrainSpeed(unittest.TestCase):
    def test_epoch_seconds_of_both_implementations(self):
        hist = lambda secs: [dict(seconds=x) for x in secs]  # noqa: E731
        rec = {("confidence", "av", 0.5, 1): dict(history=hist([10, 20])),
               ("pytorch:confidence", "av", 0.5, 1): dict(history=hist([40, 50])),
               ("confidence", "av", 0.5, 2): dict(history=hist([10, 10])),
               ("pytorch:confidence", "av", 0.5, 2): dict(history=hist([30, 30])),
               ("confidence", "av", 0.3, 1): dict(history=hist([10]))}  # no reference run: no row
        table = sweep.table_train_speed(rec, ["av"], [0.3, 0.5], [1, 2])
        self.assertIn("| av | 0.5 | 1, 2 | 30 / 20 | 90 / 60 | **3.00x** |", table)  # medians 75 / 25
        self.assertNotIn("| 0.3 |", table)


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
