#!/usr/bin/python3
"""The floor on a sequence dataset folder: mean imputation + multinomial logistic regression on the
flattened tokens, under the trainer's missing-modality protocol (docs/TRAIN.md, "Splits and the
missing protocol").

    /usr/bin/python3 examples/datasets/floor.py --data build/avdigits \\
        --trainer build/examples/train/confsmoe-train --missing 0 0.3 [--seed 1] [--json floor.json]

Splits and masks are the trainer's, for the same (folder, r, seed): the script asks
`confsmoe-train --dump-masks` for them. The masks depend only on the labels, the split file, the
number of modalities and which rows are naturally missing, not on the feature values or the token
counts, so the trainer is run on a proxy folder with those and one feature per view: hard_grid.py
passes views that exist only in memory. The sweep (examples/sweep/sweep.py) runs the same floor
(sweep.fit_floor) on the masks of its own trainer runs.

Each view's row (S x F values) is one flat vector. Per column: mean and standard deviation over the
training rows in which the modality is present after the protocol (mvdata.standardise); a missing
modality is 0 there, i.e. the training mean of every column (mean imputation). The logistic
regression and its L2 grid are the sweep's (examples/sweep/sweep.py: fit_floor, FLOOR_L2): fitted on
the trainer's training split, the L2 weight selected on its validation split, evaluated once on test.
The reported validation accuracy is that of the selected L2 (the maximum over the grid), so it is
slightly optimistic; it is what dataset choices (avdigits.py --hard) may be made on, never test.
--views fits on a subset of the views (single-modality floors) under the same masks: a sample whose
kept view is missing is then all training means.

stdlib + numpy only (/usr/bin/python3).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "sweep"))
import mvdata  # noqa: E402
from sweep import fit_floor  # noqa: E402  (hard_grid.py calls it as floor.fit_floor)


def dump_masks(trainer, folder, views, r, seed, out_path):
    """The trainer's splits and masks for (folder, r, seed), through a proxy folder (see the docstring)."""
    proxy = tempfile.mkdtemp(prefix="floor-proxy-")
    try:
        for fn in os.listdir(folder):
            if fn == "labels.csv" or fn == "avail.csv" or (fn.startswith("split") and fn.endswith(".csv")):
                shutil.copy(os.path.join(folder, fn), proxy)
        for m, x in enumerate(views):
            absent = np.all(np.isnan(x), 1)
            with open(os.path.join(proxy, "view%d_proxy.csv" % m), "w") as f:
                f.write("".join("\n" if a else "0\n" for a in absent))
        cmd = [trainer, "--data", proxy, "--missing", repr(r), "--seed", str(seed), "--epochs", "0", "--quiet",
               "--d", "8", "--heads", "1", "--dump-masks", out_path]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, BLIS_NUM_THREADS="1"))
        if p.returncode != 0:
            raise RuntimeError("mask dump failed: %s\n%s" % (" ".join(cmd), p.stderr))
    finally:
        shutil.rmtree(proxy)


def trainer_masks(trainer, folder, views, r, seed):
    """(split [N] str, present [N, M]) of the trainer for (folder, r, seed)."""
    with tempfile.TemporaryDirectory() as tmp:
        masks = os.path.join(tmp, "masks.csv")
        dump_masks(trainer, folder, views, r, seed, masks)
        split, _, present = mvdata.load_masks(masks)
    return split, present


def floor(folder, trainer, r, seed, use=None):
    """The floor's result dict for one (r, seed) on the views in `use` (default all): the selected
    L2, its validation accuracy and the test metrics."""
    t0 = time.time()
    views, files, labels, _ = mvdata.load_folder(folder, sequences=True)
    if use is not None and not all(0 <= m < len(files) for m in use):
        raise ValueError("--views %s: %s has views 0..%d" % (" ".join(map(str, use)), folder, len(files) - 1))
    split, present = trainer_masks(trainer, folder, views, r, seed)
    res = fit_floor(views, labels, split, present, use)
    used = [fn for m, fn in enumerate(files) if use is None or m in use]
    return dict(method="mean imputation + multinomial logistic regression on the flattened tokens",
                data=folder, missing=r, seed=seed, views=used, seconds=time.time() - t0, **res)


def main():
    p = argparse.ArgumentParser(description="Mean imputation + logistic regression floor on a (sequence) dataset "
                                            "folder, on the trainer's splits and masks.")
    p.add_argument("--data", required=True, help="dataset folder (docs/TRAIN.md layout; views may differ in S)")
    p.add_argument("--trainer", required=True, help="confsmoe-train executable (for the splits and masks)")
    p.add_argument("--missing", type=float, nargs="+", default=[0.0, 0.3], help="missing rates r (default 0 0.3)")
    p.add_argument("--seed", type=int, nargs="+", default=[1], help="seeds (default 1)")
    p.add_argument("--views", type=int, nargs="+",
                   help="fit on these views only (0-based; e.g. --views 1 for an image-only floor on AV-digits); "
                        "the masks are still those of all views (default: all views)")
    p.add_argument("--json", help="write the results (a list of dicts) here")
    args = p.parse_args()
    results = []
    for r in args.missing:
        for seed in args.seed:
            try:
                res = floor(args.data, args.trainer, r, seed, args.views)
            except ValueError as e:
                print("floor: %s" % e, file=sys.stderr)
                return 2
            results.append(res)
            print("floor r=%g seed %d: test accuracy %.2f%%  macro-F1 %.4f  macro-AUROC %.4f  (l2 %g, val %.2f%%, "
                  "%d features, %.1f s)" % (r, seed, 100 * res["test"]["accuracy"], res["test"]["macro_f1"],
                                            res["test"]["macro_auroc"], res["l2"], 100 * res["val_accuracy"],
                                            res["features"], res["seconds"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
