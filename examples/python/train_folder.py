#!/usr/bin/python3
"""Train the full Conf-SMoE model on a dataset folder with missing modalities, from Python.

    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 \
        /usr/bin/python3 examples/python/train_folder.py [--data DIR] [--missing 0.5] [--epochs 25]

(or just /usr/bin/python3 examples/python/train_folder.py after `meson install -C build`).

Data: --data DIR, any folder in the layout of confsmoe-train (docs/TRAIN.md, "The dataset
folder"): labels.csv, view<i>_<name>.csv for i = 0 .. M-1 (a first line "#tokens=S" makes a
sequence view), an optional split*.csv (0 train, 1 test) and avail.csv; empty or all-NaN view
rows are naturally missing modalities. Default: data/handwritten of this repository (UCI
Multiple Features: 2000 samples, 6 views, 10 classes, the fixed 1600/400 split).

Protocol (docs/TRAIN.md, docs/MODEL.md, section 9): the split file's test rows, or without one a
stratified, seeded 80/20 train/test split; a validation part carved from train (--val, 10%);
then, in each split separately, every sample keeps one of its present modalities drawn at
random and round(r * count) of its other present (sample, modality) cells are dropped
(r = --missing; with 2 modalities r = 0.5 leaves 25% of the cells missing). Features are
standardised with the training rows where the modality is present (a NaN cell of a present
row becomes the training mean); the stage-1 pools are those rows. The model with the best
validation accuracy is kept (its parameters are copied through the zero-copy views) and
evaluated once on test: accuracy, macro-F1 and macro one-vs-rest AUROC, plus the gate's
expert utilisation. The numbers differ from confsmoe-train's: the draws are numpy's.
"""
import argparse
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

try:
    import confsmoe
except ImportError:  # running from a source checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))
    import confsmoe

PROG = "train_folder"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "handwritten"
VIEW_NAME = re.compile(r"view(\d+)_.+\.csv$")


def fail(path, line, what):
    sys.exit("%s: %s%s: %s" % (PROG, path, ":%d" % line if line else "", what))


def read_lines(path):
    """The lines of a text file, without the final newline's empty line."""
    with open(path) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_view(path):
    """A view file as float64 [N, S, F] (NaN for empty or 'nan' cells; an empty line is a row of NaN)."""
    lines = read_lines(path)
    tokens, first = 1, 1
    if lines and lines[0].startswith("#tokens="):
        try:
            tokens = int(lines[0][len("#tokens="):])
        except ValueError:
            tokens = 0
        if tokens < 1:
            fail(path, 1, "'%s' is not #tokens=S with an integer S >= 1" % lines[0])
        first = 2
    width, rows = None, []
    for no, line in enumerate(lines[first - 1:], first):
        if not line.strip():
            rows.append(None)
            continue
        cells = line.split(",")
        if width is None:
            width = len(cells)
            if width % tokens:
                fail(path, no, "%d values, not a multiple of #tokens=%d" % (width, tokens))
        elif len(cells) != width:
            fail(path, no, "%d values, expected %d" % (len(cells), width))
        try:
            rows.append([float(c) if c.strip() else math.nan for c in cells])
        except ValueError as e:
            fail(path, no, str(e))
    if width is None:
        fail(path, 0, "no values")
    x = np.array([r if r is not None else [math.nan] * width for r in rows], np.float64)
    if not np.isfinite(x[~np.isnan(x)]).all():
        fail(path, 0, "infinite values")
    return x.reshape(len(rows), tokens, width // tokens)


def read_ints(path, cols, allowed, rows=None):
    """An integer CSV: [rows, cols] (rows = the file's lines when None), values in `allowed`."""
    lines = read_lines(path)
    if rows is not None and len(lines) != rows:
        fail(path, 0, "%d lines, expected %d" % (len(lines), rows))
    out = np.empty((len(lines), cols), np.int64)
    for no, line in enumerate(lines, 1):
        cells = line.split(",")
        if len(cells) != cols:
            fail(path, no, "%d values, expected %d" % (len(cells), cols))
        try:
            out[no - 1] = [int(c) for c in cells]
        except ValueError:
            fail(path, no, "'%s' is not %d integer(s)" % (line, cols))
        if not all(allowed(v) for v in out[no - 1]):
            fail(path, no, "'%s': value out of range" % line)
    return out


def load(data_dir):
    """Views [N, S, F_m] (NaN where missing), labels [N], the split (0 train / 1 test, or None)
    and the natural availability [N, M]: avail.csv AND a view row that is not empty or all NaN."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        fail(data_dir, 0, "no such data folder (set --data DIR)")
    view_paths, split_paths = {}, []
    for p in sorted(data_dir.iterdir()):
        match = VIEW_NAME.match(p.name)
        if match:
            i = int(match.group(1))
            if i in view_paths:
                fail(p, 0, "a second view%d file (besides %s)" % (i, view_paths[i].name))
            view_paths[i] = p
        elif p.name.startswith("split") and p.name.endswith(".csv"):
            split_paths.append(p)
    labels_path = data_dir / "labels.csv"
    if not labels_path.exists():
        fail(labels_path, 0, "missing (a data folder needs labels.csv, one class per line)")
    if not view_paths:
        fail(data_dir, 0, "no view files (view0_<name>.csv, view1_<name>.csv, ...)")
    if sorted(view_paths) != list(range(len(view_paths))):
        fail(data_dir, 0, "views must be numbered 0..M-1 without gaps, got %s" % sorted(view_paths))
    if len(split_paths) > 1:
        fail(data_dir, 0, "several split files %s: keep one" % [p.name for p in split_paths])
    labels = read_ints(labels_path, 1, lambda v: v >= 0)[:, 0].astype(np.int32)
    n = len(labels)
    views = [read_view(view_paths[m]) for m in range(len(view_paths))]
    for m, x in enumerate(views):
        if len(x) != n:
            fail(view_paths[m], 0, "%d rows, labels.csv has %d" % (len(x), n))
        if x.shape[1] != views[0].shape[1]:
            fail(view_paths[m], 0, "%d tokens, %s has %d: every view needs the same #tokens"
                 % (x.shape[1], view_paths[0].name, views[0].shape[1]))
    natural = np.array([~np.isnan(x).all(axis=(1, 2)) for x in views], np.uint8).T
    if (data_dir / "avail.csv").exists():
        natural &= read_ints(data_dir / "avail.csv", len(views), lambda v: v in (0, 1), n).astype(np.uint8)
    split = read_ints(split_paths[0], 1, lambda v: v in (0, 1), n)[:, 0] if split_paths else None
    return views, labels, split, natural


def stratified_take(idx, labels, fraction, rng):
    """Per class: round(fraction * n_c) samples (at least 1, at most n_c - 1 when n_c >= 2)."""
    taken = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        if len(members) < 2 or fraction <= 0:
            continue
        take = min(max(int(np.floor(fraction * len(members) + 0.5)), 1), len(members) - 1)
        taken.extend(rng.permutation(members)[:take])
    return np.sort(np.array(taken, dtype=np.int64))


def missing_mask(natural, rate, rng):
    """Every sample keeps one of its present modalities, drawn at random; round(rate * count) of
    its other present cells are dropped, chosen at random over the whole part."""
    mask = natural.copy()
    cells = []
    for i, row in enumerate(natural):
        present = np.flatnonzero(row)
        keep = present[rng.integers(0, len(present))]
        cells.extend((i, j) for j in present if j != keep)
    cells = np.array(cells, dtype=np.int64).reshape(-1, 2)
    drop = int(np.floor(rate * len(cells) + 0.5))
    if drop:
        chosen = cells[rng.permutation(len(cells))[:drop]]
        mask[chosen[:, 0], chosen[:, 1]] = 0
    return mask


def macro_f1(y, pred, n_classes):
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1))


def macro_auroc(y, scores, n_classes):
    """Mean over classes of the one-vs-rest AUROC (Mann-Whitney, ties averaged)."""
    aucs = []
    for c in range(n_classes):
        pos = y == c
        if pos.all() or not pos.any():
            continue
        s = scores[:, c]
        order = np.argsort(s, kind="mergesort")
        ranks = np.empty(len(s))
        sorted_s = s[order]
        i = 0
        while i < len(s):  # average ranks over ties
            j = i
            while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
                j += 1
            ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
            i = j + 1
        n_pos, n_neg = pos.sum(), (~pos).sum()
        aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs))


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder (default %s)" % DEFAULT_DATA)
    ap.add_argument("--missing", type=float, default=0.5, help="missing rate r (default 0.5)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--gate", default="confidence", choices=["confidence", "softmax", "gaussian", "laplacian"])
    ap.add_argument("--imputation", default="two_stage", choices=["two_stage", "mean"])
    ap.add_argument("--val", type=float, default=0.1, help="validation fraction of train")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--checkpoint", help="save the selected model (and Adam state) here")
    ap.add_argument("--min-accuracy", type=float, default=None,
                    help="exit with status 1 unless the test accuracy is above this (default: chance, 1/C)")
    args = ap.parse_args()
    t0 = time.time()

    views, labels, split, natural = load(args.data)
    n, n_classes, M, S = len(labels), int(labels.max()) + 1, len(views), views[0].shape[1]
    rng = np.random.default_rng(args.seed)
    usable = np.flatnonzero(natural.any(1))  # a sample without any present modality is left out
    if split is not None:
        test = usable[split[usable] == 1]
        train = usable[split[usable] == 0]
    else:
        test = stratified_take(usable, labels, 0.2, rng)
        train = np.setdiff1d(usable, test)
    val = stratified_take(train, labels, args.val, rng)
    train = np.setdiff1d(train, val)
    if not len(train) or not len(test):
        fail(args.data, 0, "%d training and %d test samples: both must be non-empty" % (len(train), len(test)))
    mask = np.zeros((n, M), np.uint8)
    for part in (train, val, test):
        mask[part] = missing_mask(natural[part], args.missing, rng)

    xs = []
    for m, v in enumerate(views):
        rows = train[mask[train, m] == 1]
        pooled = v[rows].reshape(-1, v.shape[2])  # per feature, over the S tokens
        mu, sd = np.nanmean(pooled, 0), np.nanstd(pooled, 0)
        mu[np.isnan(mu)], sd[~(sd >= 1e-8)] = 0.0, 1.0
        x = np.nan_to_num((v - mu) / sd).astype(np.float32)  # NaN cells of present rows: the train mean
        x[mask[:, m] == 0] = 0.0  # never read: stage-1 imputation replaces missing rows
        xs.append(x)
    print("%s: %d samples (%d left out: no modality present), %d modalities %s, %d token(s), %d classes; "
          "train/val/test %d/%d/%d%s; missing rate r=%.2f (%.1f%% of cells missing)"
          % (args.data, n, n - len(usable), M, [v.shape[2] for v in views], S, n_classes, len(train), len(val),
             len(test), " (test: the split file)" if split is not None else "", args.missing,
             100 * (1 - mask[usable].mean())))
    print("libconfsmoe %s (%s)" % (confsmoe.__version__, confsmoe.library_path))

    ctx = confsmoe.Context(seed=args.seed)
    model = confsmoe.Model(ctx, [v.shape[2] for v in views], n_classes, tokens=S, d=args.d, heads=4,
                           n_experts=args.experts, k=args.k, gate=args.gate, imputation=args.imputation)
    for m in range(M):
        model.set_pool(m, np.ascontiguousarray(xs[m][train[mask[train, m] == 1]]))
    optim = confsmoe.Optimizer(ctx, model, kind="adam", lr=args.lr)
    params = model.parameters()  # zero-copy views: used to snapshot the best model
    print("model: d=%d, %d experts, k=%d, %s gate, %d parameter tensors (%d values)" % (
        args.d, args.experts, args.k, args.gate, len(params), sum(p.value.size for p in params)))

    def batch(idx):
        return [np.ascontiguousarray(x[idx]) for x in xs], np.ascontiguousarray(mask[idx]), labels[idx]

    def predict(idx):
        inputs, avail, _ = batch(idx)
        return model.predict(inputs, avail)

    best = (-1.0, 0, None)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(train)
        model.gate.reset_stats()
        total, count = 0.0, 0
        for b in range(0, len(order), args.batch):
            inputs, avail, y = batch(order[b:b + args.batch])
            model.zero_grad()
            r = model.step(inputs, avail, y, logits=False)
            optim.step()
            total += r.loss * len(y)
            count += len(y)
        util = model.gate.stats("total")
        val_acc = float((predict(val).argmax(1) == labels[val]).mean())
        if val_acc > best[0]:
            best = (val_acc, epoch, [p.value.copy() for p in params])
        print("epoch %3d  loss %.4f  val acc %.4f  load entropy %.3f  max load %.3f" % (
            epoch, total / count, val_acc, util["load_entropy"], util["max_load_fraction"]))

    for p, saved in zip(params, best[2]):
        p.value[...] = saved  # restore the selected parameters through the views
    if args.checkpoint:
        model.save(args.checkpoint, optim)
        print("saved %s" % args.checkpoint)
    model.gate.reset_stats()
    logits = predict(test)
    util = model.gate.stats("total")
    pred = logits.argmax(1)
    acc = float((pred == labels[test]).mean())
    f1 = macro_f1(labels[test], pred, n_classes)
    auc = macro_auroc(labels[test], softmax(logits.astype(np.float64)), n_classes)
    print("selected epoch %d (val acc %.4f)" % (best[1], best[0]))
    print("test: accuracy %.4f  macro-F1 %.4f  macro AUROC %.4f  (%d samples)" % (acc, f1, auc, len(test)))
    print("test routing: load %s  load entropy %.3f  mean confidence %s" % (
        util["load"].tolist(), util["load_entropy"],
        np.array2string(util["mean_confidence"], precision=3)))
    print("time %.1f s" % (time.time() - t0))
    floor = 1.0 / n_classes if args.min_accuracy is None else args.min_accuracy
    if not np.isfinite(acc) or acc <= floor:
        sys.exit("%s: test accuracy %.4f is not above %.4f" % (PROG, acc, floor))


if __name__ == "__main__":
    main()
