#!/usr/bin/python3
"""Tests of confsmoe-train (examples/train): learning on synthetic folders, the JSON report,
error messages and exit statuses, natural missingness, the protocol, checkpoints, and a
smoke run on the real handwritten data.

Environment (set by tests/train/meson.build):
  CONFSMOE_TRAIN  path of the confsmoe-train executable
  CONFSMOE_DATA   the data folder of the source tree (data/, holding handwritten/)
Run one group:  test_trainer.py TestErrors
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import unittest

TRAIN = os.environ.get("CONFSMOE_TRAIN", "")
DATA = os.environ.get("CONFSMOE_DATA", "")

# A small model so that each run takes a second or two.
SMALL = ["--d", "16", "--heads", "2", "--experts", "4", "--k", "2", "--batch", "32", "--lr", "0.003"]


def run(args, timeout=120):
    env = dict(os.environ)
    env.setdefault("BLIS_NUM_THREADS", "1")
    return subprocess.run([TRAIN] + args, capture_output=True, text=True, timeout=timeout, env=env)


def write_rows(path, rows, header=None):
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")


def make_folder(root, n=200, classes=3, widths=(4, 5, 6), seed=0, sep=2.5, tokens=1):
    """A separable synthetic folder: view v of a class-c sample is mu[v][c] + N(0, 1); tokens is
    S for every view or a list of S_m per view."""
    tokens_of = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens] * len(widths)
    rnd = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    labels = [i % classes for i in range(n)]
    rnd.shuffle(labels)
    write_rows(os.path.join(root, "labels.csv"), [[y] for y in labels])
    for v, w in enumerate(widths):
        width = w * tokens_of[v]
        mu = [[rnd.gauss(0, sep) for _ in range(width)] for _ in range(classes)]
        rows = [["%.6g" % (mu[y][j] + rnd.gauss(0, 1)) for j in range(width)] for y in labels]
        write_rows(os.path.join(root, "view%d_syn%d.csv" % (v, w)), rows,
                   header="#tokens=%d" % tokens_of[v] if tokens_of[v] > 1 else None)
    return labels


def read_csv_lines(path):
    with open(path) as f:
        return f.read().split("\n")


def set_line(path, line_no, text):
    lines = read_csv_lines(path)
    lines[line_no - 1] = text
    with open(path, "w") as f:
        f.write("\n".join(lines))


class Base(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if not TRAIN or not os.access(TRAIN, os.X_OK):
            raise RuntimeError("CONFSMOE_TRAIN must name the confsmoe-train executable, got %r" % TRAIN)
        cls.tmp = tempfile.mkdtemp(prefix="confsmoe-train-test-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def folder(self, name, **kw):
        root = os.path.join(self.tmp, name)
        shutil.rmtree(root, ignore_errors=True)
        make_folder(root, **kw)
        return root

    def load_json(self, path):
        with open(path) as f:
            text = f.read()
        self.assertNotIn("NaN", text)
        self.assertNotIn("Infinity", text)
        return json.loads(text)


class TestLearns(Base):
    def test_learns_and_writes_json(self):
        root = os.path.join(self.tmp, "learn")
        labels = make_folder(root)
        out = os.path.join(self.tmp, "learn.json")
        r = run(["--data", root, "--missing", "0.3", "--epochs", "15", "--seed", "3", "--json", out] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "")
        # One progress line per epoch with the promised fields, then the final lines.
        epoch_lines = [l for l in r.stdout.splitlines() if l.startswith("epoch ")]
        self.assertEqual(len(epoch_lines), 15)
        for word in ("loss", "val acc", "val F1", "samples/s", "ETA"):
            self.assertIn(word, epoch_lines[0])
        self.assertIn("test: accuracy", r.stdout)
        self.assertIn("macro-F1", r.stdout)
        self.assertIn("macro-AUROC", r.stdout)
        self.assertIn("max-load fraction", r.stdout)

        j = self.load_json(out)
        for key in ("dataset", "config", "seed", "missing", "n_train", "n_val", "n_test", "test", "best_epoch",
                    "history", "experts", "seconds"):
            self.assertIn(key, j)
        for key in ("gate", "load_loss", "load_weight", "imputation", "experts", "k", "d", "heads", "hidden",
                    "epochs", "batch", "lr", "dropout", "seed", "missing", "val", "threads", "checkpoint",
                    "resume"):
            self.assertIn(key, j["config"])
        self.assertEqual(j["config"]["experts"], 4)
        self.assertEqual(j["seed"], 3)
        self.assertAlmostEqual(j["missing"], 0.3)
        self.assertEqual(j["n_train"] + j["n_val"] + j["n_test"], 200)
        # Stratified 80/20 without a split file: round(0.2 n_c) test samples of each class.
        self.assertEqual(j["n_test"], sum(math.floor(0.2 * labels.count(c) + 0.5) for c in range(3)))
        self.assertGreater(j["n_val"], 0)
        self.assertEqual(len(j["history"]), 15)
        for h in j["history"]:
            for key in ("epoch", "loss", "task_loss", "val_accuracy", "val_macro_f1", "load_entropy", "seconds"):
                self.assertIn(key, h)
        self.assertTrue(1 <= j["best_epoch"] <= 15)
        best = j["history"][j["best_epoch"] - 1]["val_accuracy"]
        self.assertEqual(best, max(h["val_accuracy"] for h in j["history"]))
        t = j["test"]
        # Chance is 1/3: a separable problem must be learned.
        self.assertGreater(t["accuracy"], 0.8, t)
        self.assertGreater(t["macro_f1"], 0.75, t)
        self.assertGreater(t["macro_auroc"], 0.9, t)
        e = j["experts"]
        self.assertEqual(len(e["load"]), 4)
        self.assertAlmostEqual(sum(e["load"]), 1.0, places=6)
        self.assertEqual(sum(e["slots"]), 2 * 3 * j["n_test"])     # k slots per token, M tokens per sample
        self.assertTrue(0.0 <= e["load_entropy"] <= 1.0)
        self.assertGreaterEqual(e["load_cv2"], 0.0)
        self.assertTrue(0.25 <= e["max_load_fraction"] <= 1.0)
        self.assertEqual(len(e["mean_confidence"]), 4)

    def test_same_seed_same_result(self):
        root = self.folder("det")
        outs = []
        for i in range(2):
            out = os.path.join(self.tmp, "det%d.json" % i)
            r = run(["--data", root, "--missing", "0.5", "--epochs", "3", "--seed", "7", "--json", out, "--quiet"]
                    + SMALL)
            self.assertEqual(r.returncode, 0, r.stderr)
            outs.append(self.load_json(out))
        self.assertEqual(outs[0]["test"], outs[1]["test"])
        self.assertEqual([h["loss"] for h in outs[0]["history"]], [h["loss"] for h in outs[1]["history"]])

    def test_gates_and_options(self):
        root = self.folder("gates", n=120)
        for extra in (["--gate", "softmax", "--load-loss", "cv"], ["--gate", "gaussian"],
                      ["--gate=laplacian", "--load-loss=entropy", "--load-weight", "0.1"],
                      ["--imputation", "mean", "--router-grad", "score", "--noisy"]):
            out = os.path.join(self.tmp, "gates.json")
            r = run(["--data", root, "--missing", "0.3", "--epochs", "2", "--json", out, "--quiet"] + SMALL + extra)
            self.assertEqual(r.returncode, 0, "%s: %s" % (extra, r.stderr))
            j = self.load_json(out)
            self.assertEqual(len(j["history"]), 2)
            if "softmax" in extra:
                self.assertEqual(j["config"]["gate"], "softmax")
                self.assertTrue(all(c is None for c in j["experts"]["mean_confidence"]))

    def test_defaults_and_paper(self):
        """No flags: the recommended configuration; --paper: docs/MODEL.md, section 6; the new knobs
        reach the JSON, and pool-mean evaluation gives the same test metrics twice."""
        root = self.folder("defaults", n=120)
        configs = {}
        for name, extra in (("default", []), ("paper", ["--paper"]),
                            ("knobs", ["--paper", "--eval-fill", "pool-mean", "--modality-dropout", "0.3",
                                       "--weight-decay", "1e-4", "--threads", "2"])):
            out = os.path.join(self.tmp, "defaults_%s.json" % name)
            r = run(["--data", root, "--missing", "0.3", "--epochs", "2", "--json", out, "--quiet"] + SMALL + extra)
            self.assertEqual(r.returncode, 0, "%s: %s" % (extra, r.stderr))
            configs[name] = self.load_json(out)["config"]
        d, p, k = configs["default"], configs["paper"], configs["knobs"]
        self.assertEqual((d["imputation"], d["modality_dropout"], d["writeback"]), ("mean", 0.4, "residual"))
        self.assertEqual((p["imputation"], p["modality_dropout"], p["eval_fill"], p["writeback"]),
                         ("two-stage", 0.0, "draws", "ln-imp"))
        # SMALL sets --lr; the defaults table itself shows in --help.
        help_text = run(["--help"]).stdout
        self.assertRegex(help_text, r"--lr LR +Adam learning rate \(default 0\.001\)")
        self.assertRegex(help_text, r"--modality-dropout P .*\(default 0\.4\)")
        self.assertRegex(help_text, r"--writeback W .*\(default residual\)")
        self.assertEqual((k["eval_fill"], k["modality_dropout"], k["weight_decay"], k["threads"]),
                         ("pool-mean", 0.3, 1e-4, 2))
        outs = []
        for i in range(2):
            out = os.path.join(self.tmp, "poolmean%d.json" % i)
            r = run(["--data", root, "--missing", "0.5", "--epochs", "2", "--seed", "4", "--paper", "--eval-fill",
                     "pool-mean", "--json", out, "--quiet"] + SMALL)
            self.assertEqual(r.returncode, 0, r.stderr)
            outs.append(self.load_json(out)["test"])
        self.assertEqual(outs[0], outs[1])

    def test_sequence_views(self):
        root = self.folder("seq", n=120, widths=(3, 2), tokens=4)
        out = os.path.join(self.tmp, "seq.json")
        r = run(["--data", root, "--missing", "0.2", "--epochs", "2", "--json", out, "--quiet"] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        j = self.load_json(out)
        self.assertEqual(j["tokens"], 4)
        self.assertEqual([m["features"] for m in j["modalities"]], [3, 2])
        self.assertEqual(sum(j["experts"]["slots"]), 2 * 2 * 4 * j["n_test"])

    def test_views_of_different_tokens(self):
        root = self.folder("seq-ragged", n=120, widths=(3, 2, 4), tokens=[5, 1, 2])
        out = os.path.join(self.tmp, "seq-ragged.json")
        r = run(["--data", root, "--missing", "0.3", "--epochs", "3", "--json", out] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("(S per view, [S x F]): view0_syn3.csv[5 x 3] view1_syn2.csv[2] view2_syn4.csv[2 x 4]",
                      r.stdout)
        j = self.load_json(out)
        self.assertEqual(j["tokens"], 0)
        self.assertEqual([m["tokens"] for m in j["modalities"]], [5, 1, 2])
        self.assertEqual([m["features"] for m in j["modalities"]], [3, 2, 4])
        # Every token of every modality is routed at test: k slots per token, sum_m S_m tokens.
        self.assertEqual(sum(j["experts"]["slots"]), 2 * 8 * j["n_test"])
        # The classes are separable: far above chance (1/3) after 3 epochs.
        self.assertGreater(j["test"]["accuracy"], 0.6)

    def test_checkpoint_and_resume(self):
        root = self.folder("ckpt", n=120)
        ck = os.path.join(self.tmp, "model.safetensors")
        a, b = os.path.join(self.tmp, "a.json"), os.path.join(self.tmp, "b.json")
        # Without missing modalities inference is deterministic: the resumed best model must
        # give the same test metrics.
        r = run(["--data", root, "--epochs", "4", "--checkpoint", ck, "--json", a, "--quiet"] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(os.path.getsize(ck) > 0)
        r = run(["--data", root, "--epochs", "0", "--resume", ck, "--json", b, "--quiet"] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.load_json(a)["test"], self.load_json(b)["test"])
        self.assertEqual(self.load_json(b)["best_epoch"], 0)
        # Resume and keep training.
        r = run(["--data", root, "--epochs", "1", "--resume", ck, "--quiet"] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        # A checkpoint of another architecture is refused with exit status 2.
        r = run(["--data", root, "--epochs", "0", "--resume", ck, "--quiet"] + SMALL[:-6] + ["--experts", "6"])
        self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
        self.assertIn(ck, r.stderr)

    def test_resume_checkpoint_of_0_2_0(self):
        """A checkpoint written by libconfsmoe 0.2.0 (no per-modality token metadata) still loads:
        its best model gives the test metrics the 0.2.0 trainer printed for it (3 of 9 right,
        macro-F1 0.1667; no missing modality, so inference draws nothing)."""
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "checkpoint-0.2")
        out = os.path.join(self.tmp, "resume-0.2.json")
        r = run(["--data", root, "--epochs", "0", "--d", "8", "--heads", "2", "--experts", "2", "--k", "1",
                 "--batch", "16", "--resume", os.path.join(root, "model-0.2.0.safetensors"), "--json", out, "--quiet"])
        self.assertEqual(r.returncode, 0, r.stderr)
        j = self.load_json(out)
        self.assertEqual(j["best_epoch"], 0)
        self.assertEqual(j["n_test"], 9)
        self.assertAlmostEqual(j["test"]["accuracy"], 3 / 9, places=6)
        self.assertAlmostEqual(j["test"]["macro_f1"], 0.1667, places=4)


class TestErrors(Base):
    def expect_error(self, args, *needles):
        r = run(args)
        self.assertEqual(r.returncode, 2, "args %s: status %d, stderr %r" % (args, r.returncode, r.stderr))
        err = r.stderr
        self.assertTrue(err.endswith("\n"), repr(err))
        self.assertEqual(err.count("\n"), 1, "not one line: %r" % err)
        self.assertTrue(err.startswith("confsmoe-train: "), err)
        for n in needles:
            self.assertIn(n, err)
        return err

    def test_flags(self):
        root = self.folder("flags", n=30)
        self.expect_error(["--data", root, "--bogus"], "unknown flag", "--bogus")
        self.expect_error(["--data", root, "--gate", "sigmoid"], "--gate", "sigmoid", "confidence|softmax")
        self.expect_error(["--data", root, "--missing", "1.5"], "--missing")
        self.expect_error(["--data", root, "--missing", "abc"], "--missing")
        self.expect_error(["--data", root, "--epochs"], "--epochs")
        self.expect_error(["--data", root, "--epochs", "-1"], "--epochs")
        self.expect_error(["--data", root, "--k", "9", "--experts", "4"], "--k")
        self.expect_error(["--data", root, "--d", "30", "--heads", "4"], "--heads")
        self.expect_error(["--missing", "0.5"], "--data")
        self.expect_error(["--data", root, "stray"], "stray")
        self.expect_error(["--data", root, "--json", "/nonexistent-dir/x.json"], "/nonexistent-dir/x.json")
        self.expect_error(["--data", root, "--modality-dropout", "1.5"], "--modality-dropout")
        self.expect_error(["--data", root, "--eval-fill", "sometimes"], "--eval-fill", "draws|pool-mean")
        self.expect_error(["--data", root, "--weight-decay", "-1"], "--weight-decay")

    def test_folders(self):
        self.expect_error(["--data", os.path.join(self.tmp, "does-not-exist")], "does-not-exist")
        root = self.folder("nolabels", n=30)
        os.remove(os.path.join(root, "labels.csv"))
        self.expect_error(["--data", root], "labels.csv")
        root = self.folder("noviews", n=30)
        for v in range(3):
            os.remove(os.path.join(root, "view%d_syn%d.csv" % (v, 4 + v)))
        self.expect_error(["--data", root], "no view files")
        root = self.folder("gap", n=30)
        os.remove(os.path.join(root, "view1_syn5.csv"))
        self.expect_error(["--data", root], "view1", "view2_syn6.csv")

    def test_ragged_row(self):
        root = self.folder("ragged", n=30)
        path = os.path.join(root, "view1_syn5.csv")
        set_line(path, 17, "1,2,3,4")
        self.expect_error(["--data", root], path + ":17:", "4 values, expected 5")

    def test_non_numeric_cell(self):
        root = self.folder("nonnum", n=30)
        path = os.path.join(root, "view0_syn4.csv")
        set_line(path, 5, "1,2,abc,4")
        self.expect_error(["--data", root], path + ":5:", "column 3", "abc")
        set_line(path, 5, "1,2,inf,4")
        self.expect_error(["--data", root], path + ":5:", "column 3")

    def test_bad_labels(self):
        root = self.folder("badlabels", n=30)
        path = os.path.join(root, "labels.csv")
        set_line(path, 9, "1.5")
        self.expect_error(["--data", root], path + ":9:")
        set_line(path, 9, "0,1,0")
        self.expect_error(["--data", root], path + ":9:", "multi-label")
        set_line(path, 9, "x")
        self.expect_error(["--data", root], path + ":9:")

    def test_row_counts_differ(self):
        root = self.folder("rows", n=30)
        path = os.path.join(root, "view2_syn6.csv")
        lines = read_csv_lines(path)
        with open(path, "w") as f:
            f.write("\n".join(lines[:25]) + "\n")
        self.expect_error(["--data", root], path, "25 rows", "labels.csv has 30")
        root = self.folder("rows2", n=30)
        path = os.path.join(root, "view0_syn4.csv")
        with open(path, "a") as f:
            f.write("1,2,3,4\n")
        self.expect_error(["--data", root], path + ":31:")

    def test_tokens_not_dividing_the_row(self):
        root = self.folder("tok", n=30, widths=(4, 4), tokens=[2, 1])
        path = os.path.join(root, "view1_syn4.csv")
        lines = read_csv_lines(path)
        with open(path, "w") as f:
            f.write("\n".join(["#tokens=3"] + lines))
        self.expect_error(["--data", root], path, "not a multiple of #tokens=3")

    def test_bad_split_and_avail(self):
        root = self.folder("badsplit", n=30)
        path = os.path.join(root, "split_x.csv")
        write_rows(path, [[i % 2] for i in range(30)])
        set_line(path, 4, "2")
        self.expect_error(["--data", root], path + ":4:")
        os.remove(path)
        path = os.path.join(root, "avail.csv")
        write_rows(path, [[1, 1, 1] for _ in range(30)])
        set_line(path, 6, "1,1")
        self.expect_error(["--data", root], path + ":6:", "expected 3")


class TestMissing(Base):
    def read_masks(self, path):
        with open(path) as f:
            lines = f.read().strip().split("\n")
        header = lines[0].split(",")
        rows = [dict(zip(header, l.split(","))) for l in lines[1:]]
        return rows

    def test_natural_missingness(self):
        root = self.folder("natural", n=60)
        M = 3
        avail = [[1] * M for _ in range(60)]
        avail[0][1] = 0                 # avail.csv: sample 0 misses view 1
        avail[10] = [0, 0, 0]           # sample 10 has nothing: excluded
        write_rows(os.path.join(root, "avail.csv"), avail)
        set_line(os.path.join(root, "view2_syn6.csv"), 4, "")                      # sample 3: empty row
        set_line(os.path.join(root, "view0_syn4.csv"), 6, "nan,NaN,nan,NAN")       # sample 5: all NaN
        set_line(os.path.join(root, "view0_syn4.csv"), 8, ",,,")                   # sample 7: empty cells
        set_line(os.path.join(root, "view1_syn5.csv"), 9, "1,nan,2,,3")            # sample 8: 2 NaN, present
        dump, out = os.path.join(self.tmp, "masks.csv"), os.path.join(self.tmp, "natural.json")
        r = run(["--data", root, "--missing", "0", "--epochs", "1", "--dump-masks", dump, "--json", out, "--quiet"]
                + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("1 sample(s) have no modality present", r.stderr)
        rows = self.read_masks(dump)
        self.assertEqual(len(rows), 60)
        missing = {(0, 1), (3, 2), (5, 0), (7, 0)}
        for i, row in enumerate(rows):
            if i == 10:
                self.assertEqual(row["split"], "excluded")
                continue
            self.assertIn(row["split"], ("train", "val", "test"))
            for m in range(M):
                want = "0" if (i, m) in missing else "1"
                self.assertEqual(row["natural%d" % m], want, (i, m))
                self.assertEqual(row["present%d" % m], want, (i, m))   # rate 0: present == natural
        j = self.load_json(out)
        self.assertEqual(j["n_excluded"], 1)
        self.assertEqual(j["n_train"] + j["n_val"] + j["n_test"], 59)
        self.assertEqual(j["missing_cells"]["natural"], 4 + 3)
        self.assertEqual(j["missing_cells"]["nan_filled"], 2)
        self.assertEqual(j["missing_cells"]["train"] + j["missing_cells"]["val"] + j["missing_cells"]["test"], 4)

        # With the protocol on top: natural misses stay missing, every sample keeps one modality.
        r = run(["--data", root, "--missing", "0.7", "--epochs", "1", "--dump-masks", dump, "--quiet"] + SMALL)
        self.assertEqual(r.returncode, 0, r.stderr)
        for i, row in enumerate(self.read_masks(dump)):
            if i == 10:
                continue
            present = [int(row["present%d" % m]) for m in range(M)]
            self.assertGreaterEqual(sum(present), 1, i)
            for m in range(M):
                if (i, m) in missing:
                    self.assertEqual(present[m], 0)

    def test_protocol_counts(self):
        root = self.folder("protocol", n=200, widths=(2, 3, 2, 3))
        M = 4
        for rate in (0.0, 0.1, 0.5, 1.0):
            dump, out = os.path.join(self.tmp, "p.csv"), os.path.join(self.tmp, "p.json")
            r = run(["--data", root, "--missing", str(rate), "--epochs", "1", "--dump-masks", dump, "--json", out,
                     "--quiet"] + SMALL)
            self.assertEqual(r.returncode, 0, r.stderr)
            j = self.load_json(out)
            rows = self.read_masks(dump)
            for split, n in (("train", j["n_train"]), ("val", j["n_val"]), ("test", j["n_test"])):
                want = math.floor(rate * n * (M - 1) + 0.5)
                self.assertEqual(j["missing_cells"][split], want, (rate, split))
                got = sum(1 for row in rows if row["split"] == split for m in range(M) if row["present%d" % m] == "0")
                self.assertEqual(got, want)
            self.assertTrue(all(any(row["present%d" % m] == "1" for m in range(M)) for row in rows))


class TestRealData(Base):
    def test_handwritten_smoke(self):
        hw = os.path.join(DATA, "handwritten")
        self.assertTrue(os.path.isfile(os.path.join(hw, "labels.csv")),
                        "the real data folder %s is missing (expected data/handwritten in the source tree)" % hw)
        out = os.path.join(self.tmp, "hw.json")
        r = run(["--data", hw, "--missing", "0.5", "--epochs", "1", "--json", out])
        self.assertEqual(r.returncode, 0, r.stderr)
        j = self.load_json(out)
        self.assertEqual((j["n_train"], j["n_val"], j["n_test"]), (1440, 160, 400))
        self.assertEqual(j["n_modalities"], 6)
        self.assertEqual(j["n_classes"], 10)
        self.assertEqual(j["config"]["d"], 128)       # the paper's configuration by default
        self.assertGreater(j["test"]["accuracy"], 0.3)
        self.assertEqual(len(j["experts"]["load"]), 8)


if __name__ == "__main__":
    unittest.main()
