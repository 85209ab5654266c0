"""Shared helpers of the sweep (examples/sweep/sweep.py) and of the PyTorch reference trainer
(tests/reference/torch_train.py): reading a dataset folder, reading the splits and masks that
`confsmoe-train --dump-masks` wrote, standardising exactly as the trainer does (docs/TRAIN.md,
"Standardisation"), and the trainer's metrics (docs/TRAIN.md, "Metrics").

numpy only. The data layout is docs/TRAIN.md's: labels.csv, view<i>_<name>.csv, optional
split*.csv / avail.csv (the masks file already carries both). A view is a vector view (S = 1) or a
sequence view (first line `#tokens=S`, each row S x F values, token-major: token 0's F features,
then token 1's, ...); S may differ per view. The sweep's floor reads sequence views as flat rows
of S x F columns (load_folder(..., sequences=True)); the PyTorch reference reads them as S tokens
of F features (prepare(..., sequences=True)). By default a sequence view is refused.
"""
import math
import os
import re

import numpy as np

VIEW_RE = re.compile(r"^view(\d+)_(.+)\.csv$")


def read_view(path):
    """(x float32 [N, S*F] with NaN for empty cells and empty rows, S) of a view file; a row of a
    sequence view keeps its token-major order (columns t*F .. t*F + F-1 are token t)."""
    rows, tokens = [], 1
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if line_no == 1 and line.startswith("#tokens="):
                tokens = int(line[len("#tokens="):])
                if tokens < 1:
                    raise ValueError("%s: #tokens=%d, must be >= 1" % (path, tokens))
                continue
            if not line:
                rows.append(None)  # an empty row: the modality is naturally missing
                continue
            rows.append([float(v) if v.strip() else math.nan for v in line.split(",")])
    width = max(len(r) for r in rows if r is not None)
    if width % tokens:
        raise ValueError("%s: rows of %d values are not #tokens=%d tokens of equal width" % (path, width, tokens))
    x = np.full((len(rows), width), np.nan, np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            x[i, :len(r)] = r
    return x, tokens


def view_files(folder):
    """The view file names view0_*.csv .. view<M-1>_*.csv of a dataset folder, in order."""
    names = sorted((int(m.group(1)), fn) for fn in os.listdir(folder) for m in [VIEW_RE.match(fn)] if m)
    if not names or [i for i, _ in names] != list(range(len(names))):
        raise ValueError("%s: view files must be view0_*.csv .. view<M-1>_*.csv" % folder)
    return [fn for _, fn in names]


def load_folder(folder, sequences=False):
    """(views [M] float32 [N, S_m*F_m] with NaN, view file names, labels int64 [N], tokens [M] = S_m).
    Without `sequences`, a view with S > 1 is refused (callers that need one token per view)."""
    files = view_files(folder)
    read = [read_view(os.path.join(folder, fn)) for fn in files]
    views, tokens = [x for x, _ in read], [s for _, s in read]
    for fn, s in zip(files, tokens):
        if s != 1 and not sequences:
            raise ValueError("%s: sequence view (#tokens=%d); this reader takes vector views only"
                             % (os.path.join(folder, fn), s))
    with open(os.path.join(folder, "labels.csv")) as f:
        labels = np.array([int(line.strip()) for line in f if line.strip()], np.int64)
    for v, fn in zip(views, files):
        if v.shape[0] != labels.shape[0]:
            raise ValueError("%s: %d rows, labels.csv has %d" % (fn, v.shape[0], labels.shape[0]))
    return views, files, labels, tokens


def load_masks(path):
    """The CSV of `confsmoe-train --dump-masks`: (split [N] str, natural u8 [N, M], present u8 [N, M])."""
    with open(path) as f:
        header = f.readline().strip().split(",")
        M = sum(1 for h in header if h.startswith("present"))
        split, natural, present = [], [], []
        for i, line in enumerate(f):
            cells = line.strip().split(",")
            if int(cells[0]) != i:
                raise ValueError("%s: row %d has sample index %s" % (path, i + 2, cells[0]))
            split.append(cells[1])
            natural.append([int(c) for c in cells[2:2 + M]])
            present.append([int(c) for c in cells[2 + M:2 + 2 * M]])
    return np.array(split), np.array(natural, np.uint8), np.array(present, np.uint8)


def standardise(views, present, train_idx, tokens=None):
    """The trainer's standardisation: per feature, mean and population standard deviation
    over the training rows in which the modality is present after the protocol (NaN cells
    left out; sd < 1e-8 counts as 1); missing rows become 0, NaN cells in present rows 0.
    With `tokens` (S_m per view) a feature is pooled over the S_m tokens of a row, as the
    trainer does; without, each (token, feature) column of a flat sequence row is one feature
    (the floor's choice)."""
    out = []
    for m, x in enumerate(views):
        rows = train_idx[present[train_idx, m] == 1]
        S = tokens[m] if tokens else 1
        xt = x[rows].astype(np.float64).reshape(len(rows) * S, -1)
        cnt = np.sum(~np.isnan(xt), 0)
        mean = np.where(cnt > 0, np.nansum(xt, 0) / np.maximum(cnt, 1), 0.0)
        sq = np.nansum((xt - mean) ** 2, 0)
        sd = np.where(cnt > 0, np.sqrt(sq / np.maximum(cnt, 1)), 1.0)
        sd = np.where(sd < 1e-8, 1.0, sd)
        mean, sd = np.tile(mean, S), np.tile(sd, S)
        z = ((x.astype(np.float64) - mean) / sd).astype(np.float32)
        z[np.isnan(z)] = 0.0
        z[present[:, m] == 0] = 0.0
        out.append(z)
    return out


def prepare(folder, masks_path, sequences=False):
    """Everything a trainer needs: standardised views (flat rows of S_m x F_m), labels, masks,
    split index lists, tokens (S_m per view). Sequence views only with `sequences`."""
    views, files, labels, tokens = load_folder(folder, sequences)
    split, natural, present = load_masks(masks_path)
    if split.shape[0] != labels.shape[0] or present.shape[1] != len(views):
        raise ValueError("%s does not match %s" % (masks_path, folder))
    idx = {s: np.nonzero(split == s)[0] for s in ("train", "val", "test")}
    z = standardise(views, present, idx["train"], tokens)
    return dict(views=z, files=files, labels=labels, present=present, natural=natural, idx=idx, tokens=tokens,
                n_classes=int(labels.max()) + 1)


# ----------------------------------------------------------------------------- metrics


def softmax(logits):
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def accuracy(pred, label):
    return float(np.mean(pred == label)) if len(label) else math.nan


def macro_f1(pred, label, n_classes):
    """Mean over classes of 2TP / (2TP + FP + FN); classes with no true and no predicted sample left out."""
    s, used = 0.0, 0
    for c in range(n_classes):
        tp = np.sum((pred == c) & (label == c))
        fp = np.sum((pred == c) & (label != c))
        fn = np.sum((pred != c) & (label == c))
        den = 2 * tp + fp + fn
        if den:
            s += 2.0 * tp / den
            used += 1
    return s / used if used else math.nan


def auroc(score, positive):
    """Rank-sum AUROC with average ranks for ties (NaN without positives or negatives)."""
    n = len(score)
    n_pos = int(np.sum(positive))
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(n, np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and s[j] == s[i]:
            j += 1
        ranks[order[i:j]] = 0.5 * ((i + 1) + j)
        i = j
    return (ranks[positive].sum() - 0.5 * n_pos * (n_pos + 1)) / (n_pos * n_neg)


def macro_auroc(prob, label, n_classes):
    vals = [auroc(prob[:, c], label == c) for c in range(n_classes)]
    vals = [v for v in vals if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def metrics(logits, label, n_classes):
    """accuracy, macro-F1, macro one-vs-rest AUROC of the softmax probabilities (fractions)."""
    prob = softmax(np.asarray(logits, np.float64)).astype(np.float32)
    pred = np.argmax(prob, 1)
    return dict(accuracy=accuracy(pred, label), macro_f1=macro_f1(pred, label, n_classes),
                macro_auroc=macro_auroc(prob, label, n_classes))


def load_stats(slots):
    """Utilisation numbers of the trainer from slot counts per expert: load shares, H(load)/log E,
    CV^2 of the slots (unbiased variance, as the library), max-load fraction."""
    slots = np.asarray(slots, np.float64)
    E = len(slots)
    total = slots.sum()
    load = slots / total if total > 0 else np.zeros(E)
    nz = load[load > 0]
    H = float(-(nz * np.log(nz)).sum() / math.log(E)) if E > 1 else 1.0
    mean = slots.mean()
    cv2 = float(slots.var(ddof=1) / (mean * mean)) if mean > 0 and E > 1 else math.nan
    return dict(load=load.tolist(), slots=[int(s) for s in slots], load_entropy=H, load_cv2=cv2,
                max_load_fraction=float(load.max()) if total > 0 else math.nan)
