#!/usr/bin/python3
"""Train the full Conf-SMoE model on CUB (image + text) with missing modalities, from Python.

    PYTHONPATH=bindings/python CONFSMOE_LIBRARY=build/lib/libconfsmoe.so.0 \
        /usr/bin/python3 examples/python/train_cub.py [--missing 0.5] [--epochs 25]

(or just /usr/bin/python3 examples/python/train_cub.py after `meson install -C build`).

Data: ../shared/data/cub beside the repository (--data DIR): 600 samples, GoogLeNet image
features (1024) and doc2vec text features (300), 10 classes.

Protocol (docs/TRAIN.md, MODEL.md section 6): a stratified, seeded 80/20 train/test split and a
validation part carved from train (--val, 10%); then, in each split separately, every sample
keeps one modality drawn at random and round(r * count) of the remaining (sample, modality)
cells are dropped (r = --missing; with 2 modalities r = 0.5 leaves 25% of the cells missing).
Features are standardised with the training rows where the modality is present; the stage-1
pools are those rows. The model with the best validation accuracy is kept (its parameters are
copied through the zero-copy views) and evaluated once on test: accuracy, macro-F1 and macro
one-vs-rest AUROC, plus the gate's expert utilisation.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

try:
    import confsmoe
except ImportError:  # running from a source checkout without PYTHONPATH
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bindings" / "python"))
    import confsmoe

DEFAULT_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cub"


def load(data_dir):
    data_dir = Path(data_dir)
    files = ["view0_image_googlenet.csv", "view1_text_doc2vec.csv", "labels.csv"]
    for f in files:
        if not (data_dir / f).exists():
            sys.exit("train_cub: %s not found (set --data)" % (data_dir / f))
    views = [np.loadtxt(data_dir / f, delimiter=",", dtype=np.float64, ndmin=2) for f in files[:2]]
    labels = np.loadtxt(data_dir / files[2], dtype=np.int64).astype(np.int32)
    return views, labels


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


def missing_mask(n, m, rate, rng):
    """Every sample keeps one random modality; round(rate * count) of the other cells are dropped."""
    mask = np.ones((n, m), np.uint8)
    keep = rng.integers(0, m, n)
    cells = np.array([(i, j) for i in range(n) for j in range(m) if j != keep[i]], dtype=np.int64).reshape(-1, 2)
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
    ap.add_argument("--data", default=str(DEFAULT_DATA))
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
    args = ap.parse_args()
    t0 = time.time()

    views, labels = load(args.data)
    n, n_classes, M = len(labels), int(labels.max()) + 1, len(views)
    rng = np.random.default_rng(args.seed)
    everyone = np.arange(n)
    test = stratified_take(everyone, labels, 0.2, rng)
    train = np.setdiff1d(everyone, test)
    val = stratified_take(train, labels, args.val, rng)
    train = np.setdiff1d(train, val)
    mask = np.zeros((n, M), np.uint8)
    for part in (train, val, test):
        mask[part] = missing_mask(len(part), M, args.missing, rng)

    xs = []
    for m, v in enumerate(views):
        rows = train[mask[train, m] == 1]
        mu, sd = v[rows].mean(0), v[rows].std(0)
        sd[sd < 1e-8] = 1.0
        x = ((v - mu) / sd).astype(np.float32)
        x[mask[:, m] == 0] = 0.0  # never read: stage-1 imputation replaces missing rows
        xs.append(x)
    print("CUB: %d samples, %d modalities %s, %d classes; train/val/test %d/%d/%d; missing rate r=%.2f "
          "(%.1f%% of cells missing)" % (n, M, [v.shape[1] for v in views], n_classes, len(train), len(val),
                                         len(test), args.missing, 100 * (1 - mask.mean())))
    print("libconfsmoe %s (%s)" % (confsmoe.__version__, confsmoe.library_path))

    ctx = confsmoe.Context(seed=args.seed)
    model = confsmoe.Model(ctx, [v.shape[1] for v in views], n_classes, d=args.d, heads=4,
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
    if not np.isfinite(acc) or acc <= 1.0 / n_classes:
        sys.exit("train_cub: test accuracy %.3f is not above chance" % acc)


if __name__ == "__main__":
    main()
