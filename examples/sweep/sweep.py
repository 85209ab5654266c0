#!/usr/bin/python3
"""Results sweep of issue [D]: runs confsmoe-train over gates x missing rates x datasets x seeds,
runs the mean-imputation + logistic-regression floor on the same splits and masks, aggregates
mean +- std tables and writes them into docs/RESULTS.md between markers.

    examples/sweep/sweep.py                      # the paper table (preset "paper"), resumable
    examples/sweep/sweep.py --preset study       # the validation study of the recommended config
    examples/sweep/sweep.py --preset recommended # the recommended config on every rate
    examples/sweep/sweep.py --quick              # smoke test: 1 seed, r = 0.5, 3 epochs
    examples/sweep/sweep.py --quick --data data --datasets handwritten   # the same on the in-repo data
    examples/sweep/sweep.py --no-run             # only aggregate what is in --out
    examples/sweep/sweep.py --preset sequence    # AV-digits hard (sequence views), r 0..0.7, + floor
    examples/sweep/sweep.py --preset collapse    # expert load over training: gates x E x k, r = 0.3

Sequence data. The presets sequence and collapse run on avdigits-hard (DATA/avdigits-hard, made by
`examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out DATA/avdigits-hard --hard`; when it is
absent and --fsdd holds FSDD, the sweep generates it into OUT/data once, saying so). Their runs go
to build/sweep-sequence; the floor reads each sequence view's row as one flat vector of S x F values.
The presets reference and timing run on it with --datasets avdigits-hard (then also into
build/sweep-sequence, and their tables are those of the sequence preset).

Data: --data DIR holds one folder per dataset (--datasets, default handwritten, cub and
scene15). The default DIR is ../shared/data beside the repository, which is not part of it
(docs/TRAIN.md, "Datasets"); the repository itself has data/handwritten only. A missing
dataset folder stops the sweep before any run, with its path.

Every run's JSON goes to OUT/runs/<config>/<dataset>_r<rate>_s<seed>.json; a run whose JSON exists
is skipped (the sweep is resumable). Runs use BLIS_NUM_THREADS=1 and at most --jobs processes.

The floor. Mean imputation + multinomial logistic regression (L2, L-BFGS, numpy), fitted on the
trainer's training split, its L2 weight selected on the trainer's validation split among
FLOOR_L2, evaluated once on the test split. To be sure it sees the same protocol, it reads the
splits and masks that `confsmoe-train --dump-masks` wrote for the same (dataset, r, seed)
(OUT/masks/...), and the standardisation is the trainer's (mvdata.standardise): a missing cell is
0, the training mean of the present rows, i.e. mean imputation.

stdlib + numpy only (/usr/bin/python3).
"""
import argparse
import concurrent.futures
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import mvdata  # noqa: E402

DATASETS = ["handwritten", "cub", "scene15"]
RATES = [0.0, 0.1, 0.3, 0.5]
SEEDS = [1, 2, 3]
FLOOR_L2 = [1e-4, 1e-3, 1e-2, 1e-1]

# Trainer configurations. Every one starts from --paper (docs/MODEL.md, section 6); the name is the
# folder under OUT/runs and the row label in the tables.
PAPER_CONFIGS = {
    "confidence": ["--paper"],
    "softmax": ["--paper", "--gate", "softmax"],
    "gaussian": ["--paper", "--gate", "gaussian"],
    "laplacian": ["--paper", "--gate", "laplacian"],
    "confidence+mean-imp": ["--paper", "--imputation", "mean"],
}
# The validation study (docs/RESULTS.md, "Towards a better default"): existing trainer options
# only, compared on the validation split at r = 0.3 and 0.5.
STUDY_CONFIGS = {
    "confidence": PAPER_CONFIGS["confidence"],
    "confidence+mean-imp": PAPER_CONFIGS["confidence+mean-imp"],
    "softmax+mean-imp": ["--paper", "--gate", "softmax", "--imputation", "mean"],
    "conf+eval-pool-mean": ["--paper", "--eval-fill", "pool-mean"],
    "conf+eval-pool-mean+lr1e-3": ["--paper", "--eval-fill", "pool-mean", "--lr", "1e-3"],
    "conf+mean+lr1e-3": ["--paper", "--imputation", "mean", "--lr", "1e-3"],
    "conf+mean+lr1e-3+ep60": ["--paper", "--imputation", "mean", "--lr", "1e-3", "--epochs", "60"],
    "conf+mean+lr1e-3+md0.2": ["--paper", "--imputation", "mean", "--lr", "1e-3", "--modality-dropout", "0.2"],
    "conf+mean+lr1e-3+md0.4": ["--paper", "--imputation", "mean", "--lr", "1e-3", "--modality-dropout", "0.4"],
    "conf+pool-mean+lr1e-3+md0.2": ["--paper", "--eval-fill", "pool-mean", "--lr", "1e-3", "--modality-dropout",
                                    "0.2"],
    "conf+pool-mean+lr1e-3+md0.4": ["--paper", "--eval-fill", "pool-mean", "--lr", "1e-3", "--modality-dropout",
                                    "0.4"],
    "conf+mean+lr1e-3+md0.4+wd1e-4": ["--paper", "--imputation", "mean", "--lr", "1e-3", "--modality-dropout", "0.4",
                                      "--weight-decay", "1e-4"],
}
# The PyTorch reference (tests/reference/torch_train.py), paper hyper-parameters, at r = 0.5: its
# flags per configuration; the library side is the same-named configuration of PAPER_CONFIGS.
REFERENCE_CONFIGS = {
    "confidence": [],
    "softmax": ["--gate", "softmax"],
    "confidence+mean-imp": ["--imputation", "mean"],
}
TORCH_TRAIN = os.path.join(ROOT, "tests", "reference", "torch_train.py")
AVDIGITS = os.path.join(ROOT, "examples", "datasets", "avdigits.py")

# Sequence data (issue [K]): AV-digits hard, audio S = 50 x 40 and image S = 16 x 15
# (examples/datasets/avdigits.py --hard), written by the sweep when absent (sequence_folder).
SEQUENCE_DATASET = "avdigits-hard"
SEQUENCE_RATES = [0.0, 0.3, 0.5, 0.7]
# The paper configuration with the other write-back (confsmoe-train --writeback, docs/MODEL.md 5.2).
SEQUENCE_WRITEBACK_CONFIGS = {"confidence+residual": ["--paper", "--writeback", "residual"]}
SEQUENCE_CONFIGS = dict(PAPER_CONFIGS, recommended=[], **SEQUENCE_WRITEBACK_CONFIGS)
# Expert collapse (issue [K] item 4): per-epoch training load of each gate at E x k, r = 0.3, 1 seed.
COLLAPSE_GATES = ["confidence", "softmax", "gaussian", "laplacian"]
COLLAPSE_SHAPES = [(8, 1), (8, 2), (16, 1), (16, 2)]


def collapse_name(gate, experts, k):
    """E 8, k 2 is the paper configuration: the sequence preset's run of that gate (same out folder)."""
    return gate if (experts, k) == (8, 2) else "%s_E%d_k%d" % (gate, experts, k)


COLLAPSE_CONFIGS = {collapse_name(g, e, k): ["--paper", "--gate", g, "--experts", str(e), "--k", str(k)]
                    for e, k in COLLAPSE_SHAPES for g in COLLAPSE_GATES}
# datasets / seeds / out: the preset's defaults where it has them (else DATASETS, SEEDS, build/sweep).
PRESETS = {
    "paper": dict(configs=PAPER_CONFIGS, rates=RATES, floor=True),
    "reference": dict(configs={}, rates=[0.5], floor=False),
    "timing": dict(configs={}, rates=[0.5], floor=False, datasets=["handwritten"]),
    "study": dict(configs=STUDY_CONFIGS, rates=[0.3, 0.5], floor=False),
    # The trainer's defaults (no flags): the configuration the study selected; every rate.
    "recommended": dict(configs={"recommended": []}, rates=RATES, floor=True),
    "sequence": dict(configs=SEQUENCE_CONFIGS, rates=SEQUENCE_RATES, floor=True, datasets=[SEQUENCE_DATASET],
                     out="sweep-sequence"),
    "collapse": dict(configs=COLLAPSE_CONFIGS, rates=[0.3], floor=False, datasets=[SEQUENCE_DATASET], seeds=[1],
                     out="sweep-sequence"),
}

# ----------------------------------------------------------------------------- running


def dataset_folder(args, dataset):
    """DATA/<dataset>, or the folder the sweep generated for it (sequence_folder)."""
    return args.generated.get(dataset, os.path.join(args.data, dataset))


def sequence_folder(args):
    """Makes SEQUENCE_DATASET available: DATA/avdigits-hard when it exists; else, when the FSDD
    recordings are at --fsdd, generated once into OUT/data (saying so); else stops naming the command."""
    folder = os.path.join(args.data, SEQUENCE_DATASET)
    if os.path.isdir(folder):
        return
    made = os.path.join(args.out, "data", SEQUENCE_DATASET)
    if not os.path.isdir(made):
        if not os.path.isdir(os.path.join(args.fsdd, "recordings")):
            sys.exit("sweep.py: no dataset folder %s and no FSDD recordings in %s to make it from; make it with\n"
                     "  /usr/bin/python3 examples/datasets/avdigits.py --fsdd ../shared/data/fsdd --out %s --hard"
                     % (folder, args.fsdd, folder))
        print("sweep: %s is absent; generating it from %s into %s" % (folder, args.fsdd, made), flush=True)
        cmd = [sys.executable, AVDIGITS, "--fsdd", args.fsdd, "--out", made + ".tmp", "--hard"]
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            sys.exit("sweep.py: %s failed:\n%s" % (" ".join(cmd), p.stderr))
        os.replace(made + ".tmp", made)
    args.generated[SEQUENCE_DATASET] = made


def rate_tag(r):
    return "%g" % r


def run_name(dataset, r, seed):
    return "%s_r%s_s%d" % (dataset, rate_tag(r), seed)


def run_cmd(args, flags, dataset, r, seed, json_path):
    cmd = [args.trainer, "--data", dataset_folder(args, dataset), "--missing", rate_tag(r), "--seed",
           str(seed), "--quiet", "--json", json_path] + list(flags)
    if args.quick:
        cmd += ["--epochs", str(args.quick_epochs)]
    return cmd


def env1():
    env = dict(os.environ)
    env["BLIS_NUM_THREADS"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def execute(cmd, final_path, log_path):
    """Runs cmd (which writes final_path + '.tmp'), renames on success. Returns (ok, seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env1())
    dt = time.time() - t0
    if p.returncode == 0 and os.path.exists(final_path + ".tmp"):
        os.replace(final_path + ".tmp", final_path)
        return True, dt
    return False, dt


def masks_path(args, dataset, r, seed):
    return os.path.join(args.out, "masks", run_name(dataset, r, seed) + ".csv")


def dump_masks(args, dataset, r, seed):
    """The trainer's splits and masks of (dataset, r, seed); model flags do not change them."""
    path = masks_path(args, dataset, r, seed)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = [args.trainer, "--data", dataset_folder(args, dataset), "--missing", rate_tag(r), "--seed", str(seed),
           "--paper", "--epochs", "0", "--quiet", "--dump-masks", path + ".tmp"]
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env1(), text=True)
    if p.returncode != 0:
        raise RuntimeError("mask dump failed: %s\n%s" % (" ".join(cmd), p.stderr))
    os.replace(path + ".tmp", path)
    return path


def run_all(args, configs, rates):
    todo = []
    for name, flags in configs.items():
        d = os.path.join(args.out, "runs", name)
        os.makedirs(d, exist_ok=True)
        for dataset in args.datasets:
            for r in rates:
                for seed in args.seeds:
                    path = os.path.join(d, run_name(dataset, r, seed) + ".json")
                    if os.path.exists(path):
                        continue
                    cmd = run_cmd(args, flags, dataset, r, seed, path + ".tmp")
                    todo.append((name, dataset, r, seed, cmd, path, path[:-5] + ".log"))
    # Longest first (scene15, handwritten), so that the two workers finish together; seed by seed,
    # so that an interrupted sweep leaves whole tables of its first seeds.
    weight = {"scene15": 3, "handwritten": 2, "cub": 1}
    todo.sort(key=lambda t: (t[3], -weight.get(t[1], 0)))
    print("sweep: %d run(s) to do, %d job(s)" % (len(todo), args.jobs), flush=True)
    failed = 0
    t_start = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = {ex.submit(execute, t[4], t[5], t[6]): t for t in todo}
        for i, fut in enumerate(concurrent.futures.as_completed(futs), 1):
            name, dataset, r, seed, cmd, path, log = futs[fut]
            ok, dt = fut.result()
            failed += not ok
            print("[%d/%d] %-24s %-12s r=%-4s seed %d  %6.1f s  %s  (elapsed %.0f s)"
                  % (i, len(todo), name, dataset, rate_tag(r), seed, dt, "ok" if ok else "FAILED, see " + log,
                     time.time() - t_start), flush=True)
    return failed


def run_reference(args, rates):
    """PyTorch runs on the trainer's masks; the library runs of the same configurations too."""
    ref_cfgs = {k: v for k, v in REFERENCE_CONFIGS.items() if not args.configs or k in args.configs}
    failed = run_all(args, {k: PAPER_CONFIGS[k] for k in ref_cfgs}, rates)
    todo = []
    os.makedirs(os.path.join(args.out, "torch"), exist_ok=True)
    for name, flags in ref_cfgs.items():
        for dataset in args.datasets:
            for r in rates:
                for seed in args.seeds:
                    path = os.path.join(args.out, "torch", "%s_%s.json" % (name, run_name(dataset, r, seed)))
                    if os.path.exists(path):
                        continue
                    masks = dump_masks(args, dataset, r, seed)
                    cmd = [sys.executable, TORCH_TRAIN, "--data", dataset_folder(args, dataset), "--missing",
                           rate_tag(r), "--seed", str(seed), "--masks", masks, "--threads", "1", "--quiet",
                           "--config-name", name, "--json", path + ".tmp"] + flags
                    if args.quick:
                        cmd += ["--epochs", str(args.quick_epochs)]
                    todo.append((name, dataset, r, seed, cmd, path, path[:-5] + ".log"))
    print("reference: %d PyTorch run(s) to do, %d job(s)" % (len(todo), args.jobs), flush=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as ex:
        futs = {ex.submit(execute, t[4], t[5], t[6]): t for t in todo}
        for i, fut in enumerate(concurrent.futures.as_completed(futs), 1):
            name, dataset, r, seed, cmd, path, log = futs[fut]
            ok, dt = fut.result()
            failed += not ok
            print("[%d/%d] pytorch %-20s %-12s r=%-4s seed %d  %6.1f s  %s" % (
                i, len(todo), name, dataset, rate_tag(r), seed, dt, "ok" if ok else "FAILED, see " + log), flush=True)
    return failed


def run_timing(args, threads=(1, 2)):
    """Wall time of the paper configuration (30 epochs, E 8, k 2, d 128, batch 256) on the first of
    --datasets (default handwritten), r = 0.5, seed 1, on 1 and on 2 threads, one process at a time:
    confsmoe-train (`--threads T`: the library's own threads, BLIS on one) and the PyTorch reference
    (torch.set_num_threads(T), without its diagnostics), --repeats times each, alternating. Run it on
    an otherwise idle machine."""
    dataset = args.datasets[0]
    d = os.path.join(args.out, "timing")
    os.makedirs(d, exist_ok=True)
    masks = dump_masks(args, dataset, 0.5, 1)
    for t in threads:
        for i in range(args.repeats):
            for impl in ("library", "pytorch"):
                path = os.path.join(d, "%s_t%d_%d.json" % (impl, t, i))
                if os.path.exists(path):
                    continue
                if impl == "library":
                    cmd = run_cmd(args, ["--paper", "--threads", str(t)], dataset, 0.5, 1, path + ".tmp")
                else:
                    cmd = [sys.executable, TORCH_TRAIN, "--data", dataset_folder(args, dataset),
                           "--missing", "0.5", "--seed", "1", "--masks", masks, "--threads", str(t), "--quiet",
                           "--no-diagnostics", "--json", path + ".tmp"]
                env = env1()
                env["OMP_NUM_THREADS"] = str(t)
                t0 = time.time()
                with open(path[:-5] + ".log", "w") as log:
                    p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                ok = p.returncode == 0 and os.path.exists(path + ".tmp")
                if ok:
                    os.replace(path + ".tmp", path)
                print("timing %-8s %d thread(s) #%d  %.1f s  %s  (load %.2f)" % (
                    impl, t, i, time.time() - t0, "ok" if ok else "FAILED", os.getloadavg()[0]), flush=True)


def table_timing(out):
    d = os.path.join(out, "timing")
    if not os.path.isdir(d):
        return "(not measured yet)"
    runs = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".json"):
            impl, t, _ = fn[:-5].split("_")
            j = load_json(os.path.join(d, fn))
            runs.setdefault((int(t[1:]), impl), []).append((j["seconds"], j["test"]["accuracy"]))
    lines = ["| threads | implementation | runs | time per training run, s (median, min..max) | test accuracy % |"
             " speed-up |", "|---|---|---|---|---|---|"]
    label = {"library": "libconfsmoe (confsmoe-train --paper)",
             "pytorch": "PyTorch %s eager (tests/reference/torch_train.py)" % torch_version()}
    for t in sorted({k[0] for k in runs}):
        med = {}
        for impl in ("library", "pytorch"):
            v = runs.get((t, impl))
            if v:
                med[impl] = statistics.median(x[0] for x in v)
        for impl in ("library", "pytorch"):
            v = runs.get((t, impl))
            if not v:
                continue
            w = [x[0] for x in v]
            speed = "**%.2fx**" % (med["pytorch"] / med["library"]) if impl == "library" and len(med) == 2 else ""
            lines.append("| %d | %s | %d | %.1f (%.1f..%.1f) | %s | %s |" % (
                t, label[impl], len(v), med[impl], min(w), max(w), " / ".join("%.1f" % (100 * x[1]) for x in v),
                speed))
    return "\n".join(lines)


def torch_version():
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, timeout=60).stdout.strip()
        return out or "?"
    except Exception:  # noqa: BLE001
        return "?"


# ----------------------------------------------------------------------------- the floor


def lbfgs(fg, x0, max_iter=1000, history=10, gtol=1e-6):
    """Minimises f with gradient fg(x) -> (f, g): L-BFGS with Armijo backtracking."""
    x = x0.copy()
    f, g = fg(x)
    S, Y = [], []
    for _ in range(max_iter):
        if np.max(np.abs(g)) < gtol:
            break
        q = g.copy()
        coef = []
        for s, y in zip(reversed(S), reversed(Y)):
            rho = 1.0 / y.dot(s)
            a = rho * s.dot(q)
            q -= a * y
            coef.append((rho, a))
        if S:
            q *= S[-1].dot(Y[-1]) / Y[-1].dot(Y[-1])
        else:
            q /= max(1.0, np.linalg.norm(g))
        for (s, y), (rho, a) in zip(zip(S, Y), reversed(coef)):
            q += s * (a - rho * y.dot(q))
        d = -q
        gd = g.dot(d)
        if gd >= 0:  # not a descent direction: restart from the gradient
            S, Y = [], []
            d = -g / max(1.0, np.linalg.norm(g))
            gd = g.dot(d)
        t = 1.0
        while True:
            xn = x + t * d
            fn, gn = fg(xn)
            if fn <= f + 1e-4 * t * gd or t < 1e-12:
                break
            t *= 0.5
        s, y = xn - x, gn - g
        if s.dot(y) > 1e-12:
            S.append(s)
            Y.append(y)
            if len(S) > history:
                S.pop(0)
                Y.pop(0)
        converged = abs(f - fn) <= 1e-10 * max(1.0, abs(f))
        x, f, g = xn, fn, gn
        if converged:
            break
    return x


def fit_logreg(X, y, C, l2):
    """Multinomial logistic regression: mean cross-entropy + l2/2 ||W||^2 (bias not penalised)."""
    n, F = X.shape
    Xb = np.hstack([X, np.ones((n, 1))]).astype(np.float64)
    Yh = np.zeros((n, C))
    Yh[np.arange(n), y] = 1.0
    pen = np.ones((F + 1, C))
    pen[F] = 0.0

    def fg(w):
        W = w.reshape(F + 1, C)
        Z = Xb @ W
        Z -= Z.max(1, keepdims=True)
        lse = np.log(np.exp(Z).sum(1, keepdims=True))
        P = np.exp(Z - lse)
        f = -np.sum(Yh * (Z - lse)) / n + 0.5 * l2 * np.sum(pen * W * W)
        G = Xb.T @ (P - Yh) / n + l2 * pen * W
        return f, G.reshape(-1)

    w = lbfgs(fg, np.zeros((F + 1) * C))
    W = w.reshape(F + 1, C)
    return lambda Xe: np.hstack([Xe, np.ones((Xe.shape[0], 1))]) @ W


def fit_floor(views, labels, split, present, use=None):
    """The floor on the views in `use` (indices; default all) under the masks: mean imputation
    (mvdata.standardise), a sequence view's row taken as one flat vector of its S x F values;
    a fit per L2 of FLOOR_L2 on train, the best on validation, evaluated once on test."""
    use = list(range(len(views))) if use is None else list(use)
    idx = {s: np.nonzero(split == s)[0] for s in ("train", "val", "test")}
    X = np.hstack([z for m, z in enumerate(mvdata.standardise(views, present, idx["train"])) if m in use])
    X = X.astype(np.float64)
    C = int(labels.max()) + 1
    best = None
    val_scores = {}
    for l2 in FLOOR_L2:
        predict = fit_logreg(X[idx["train"]], labels[idx["train"]], C, l2)
        val = mvdata.metrics(predict(X[idx["val"]]), labels[idx["val"]], C)["accuracy"]
        val_scores["%g" % l2] = val
        if best is None or val > best[0]:  # ties: the smaller l2 (first)
            best = (val, l2, predict)
    test = mvdata.metrics(best[2](X[idx["test"]]), labels[idx["test"]], C)
    return dict(features=int(X.shape[1]), l2=best[1], val_accuracy=best[0], val_accuracy_per_l2=val_scores,
                test=test, n_train=len(idx["train"]), n_val=len(idx["val"]), n_test=len(idx["test"]))


def run_floor(folder, masks):
    """The floor on a dataset folder (vector or sequence views) under the trainer's masks file."""
    t0 = time.time()
    views, _, labels, tokens = mvdata.load_folder(folder, sequences=True)
    split, _, present = mvdata.load_masks(masks)
    if split.shape[0] != labels.shape[0] or present.shape[1] != len(views):
        raise ValueError("%s does not match %s" % (masks, folder))
    res = fit_floor(views, labels, split, present)
    return dict(method="mean imputation + multinomial logistic regression (L2, L-BFGS) on the flattened tokens",
                masks=masks, tokens=tokens, seconds=time.time() - t0, **res)


def floor_all(args, rates):
    todo = []
    for dataset in args.datasets:
        for r in rates:
            for seed in args.seeds:
                path = os.path.join(args.out, "floor", run_name(dataset, r, seed) + ".json")
                if not os.path.exists(path):
                    todo.append((dataset, r, seed, path))
    if not todo:
        return
    print("floor: %d fit(s)" % len(todo), flush=True)
    os.makedirs(os.path.join(args.out, "floor"), exist_ok=True)
    for dataset, r, seed in [(t[0], t[1], t[2]) for t in todo]:
        dump_masks(args, dataset, r, seed)

    def one(t):
        dataset, r, seed, path = t
        res = run_floor(dataset_folder(args, dataset), masks_path(args, dataset, r, seed))
        res.update(dataset=dataset, missing=r, seed=seed)
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)
        return t, res

    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as ex:  # numpy threads itself
        for t, res in ex.map(one, todo):
            print("floor %-12s r=%-4s seed %d  acc %.2f%%  (l2 %g, val %.2f%%, %.1f s)"
                  % (t[0], rate_tag(t[1]), t[2], 100 * res["test"]["accuracy"], res["l2"],
                     100 * res["val_accuracy"], res["seconds"]), flush=True)


# ----------------------------------------------------------------------------- aggregation


def load_json(path):
    with open(path) as f:
        return json.load(f)


def collect(out):
    """{(config, dataset, rate, seed): record} with test metrics, best validation accuracy, load
    entropy (test routing), epochs' wall time; the floor as config "floor"."""
    rec = {}
    runs = os.path.join(out, "runs")
    if os.path.isdir(runs):
        for name in sorted(os.listdir(runs)):
            for fn in sorted(os.listdir(os.path.join(runs, name))):
                if not fn.endswith(".json"):
                    continue
                j = load_json(os.path.join(runs, name, fn))
                hist = j.get("history") or []
                val = max([h["val_accuracy"] for h in hist if h.get("val_accuracy") is not None] or [math.nan])
                rec[(name, os.path.basename(j["dataset"].rstrip("/")), float(j["missing"]), int(j["seed"]))] = dict(
                    accuracy=j["test"]["accuracy"], macro_f1=j["test"]["macro_f1"],
                    macro_auroc=j["test"]["macro_auroc"], load_entropy=j["experts"]["load_entropy"],
                    load=j["experts"]["load"], val_accuracy=val, seconds=j["seconds"], best_epoch=j["best_epoch"],
                    epochs=len(hist), train_accuracy=hist[-1]["train_accuracy"] if hist else math.nan,
                    history=hist, load_cv2=j["experts"]["load_cv2"],
                    max_load_fraction=j["experts"]["max_load_fraction"], n=(j["n_train"], j["n_val"], j["n_test"]))
    for sub, name in (("floor", "floor"), ("torch", "pytorch")):
        d = os.path.join(out, sub)
        if not os.path.isdir(d):
            continue
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".json"):
                continue
            j = load_json(os.path.join(d, fn))
            cfg = name if sub == "floor" else "pytorch:" + j.get("config_name", "confidence")
            rec[(cfg, j["dataset"], float(j["missing"]), int(j["seed"]))] = dict(
                accuracy=j["test"]["accuracy"], macro_f1=j["test"]["macro_f1"], macro_auroc=j["test"]["macro_auroc"],
                load_entropy=(j.get("experts") or {}).get("load_entropy", math.nan),
                load=(j.get("experts") or {}).get("load"), val_accuracy=j.get("val_accuracy", math.nan),
                seconds=j.get("seconds", math.nan), best_epoch=j.get("best_epoch"), history=j.get("history") or [],
                n=(j.get("n_train"), j.get("n_val"), j.get("n_test")))
    return rec


def stats(values):
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return mean, sd, len(v)


def fmt(values, scale=1.0, digits=1, show_n=False, want_n=None):
    s = stats(values)
    if s is None:
        return "-"
    mean, sd, n = s
    txt = ("%.*f" % (digits, mean * scale)) if math.isnan(sd) else ("%.*f ± %.*f" % (digits, mean * scale, digits,
                                                                                        sd * scale))
    if show_n or (want_n is not None and n != want_n):
        txt += " (n=%d)" % n
    return txt


def pick(rec, cfg, dataset, r, key, seeds):
    return [rec[(cfg, dataset, r, s)][key] for s in seeds if (cfg, dataset, r, s) in rec]


def check_same_splits(rec):
    """Every record of a (dataset, r, seed) must have the same split sizes."""
    seen = {}
    bad = []
    for (cfg, dataset, r, seed), v in rec.items():
        if None in v["n"]:
            continue
        key = (dataset, r, seed)
        if key in seen and seen[key][1] != v["n"]:
            bad.append("%s %s r=%g seed %d: %s has %s, %s has %s" % (cfg, dataset, r, seed, cfg, v["n"], seen[key][0],
                                                                    seen[key][1]))
        seen.setdefault(key, (cfg, v["n"]))
    return bad


def table_summary(rec, configs, datasets, rates, seeds, key="accuracy", scale=100.0, digits=1):
    """One row per configuration, one column per (dataset, rate)."""
    lines = []
    head = "| configuration | " + " | ".join("%s r=%g" % (d, r) for d in datasets for r in rates) + " |"
    lines.append(head)
    lines.append("|---|" + "---|" * (len(datasets) * len(rates)))
    for cfg in configs:
        cells = [fmt(pick(rec, cfg, d, r, key, seeds), scale, digits, want_n=len(seeds)) for d in datasets
                 for r in rates]
        if all(c == "-" for c in cells):
            continue
        lines.append("| %s | %s |" % (cfg, " | ".join(cells)))
    return "\n".join(lines)


def table_by_dataset(rec, configs, dataset, rates, seeds):
    lines = ["| configuration | r | accuracy % | macro-F1 | macro-AUROC | load entropy |", "|---|---|---|---|---|---|"]
    for r in rates:
        for cfg in configs:
            acc = pick(rec, cfg, dataset, r, "accuracy", seeds)
            if not acc:
                continue
            lines.append("| %s | %g | %s | %s | %s | %s |" % (
                cfg, r, fmt(acc, 100, 1, want_n=len(seeds)),
                fmt(pick(rec, cfg, dataset, r, "macro_f1", seeds), 1, 3),
                fmt(pick(rec, cfg, dataset, r, "macro_auroc", seeds), 1, 3),
                fmt(pick(rec, cfg, dataset, r, "load_entropy", seeds), 1, 3)))
    return "\n".join(lines)


def table_validation(rec, configs, datasets, rates, seeds):
    """Mean validation accuracy (the selected epoch's) per (dataset, rate), and the mean over all."""
    lines = ["| configuration | " + " | ".join("%s r=%g" % (d, r) for d in datasets for r in rates)
             + " | mean of the cells |", "|---|" + "---|" * (len(datasets) * len(rates) + 1)]
    for cfg in configs:
        cells, means = [], []
        for d in datasets:
            for r in rates:
                v = pick(rec, cfg, d, r, "val_accuracy", seeds)
                cells.append(fmt(v, 100, 1, want_n=len(seeds)))
                s = stats(v)
                means.append(s[0] if s and s[2] == len(seeds) else math.nan)
        if all(c == "-" for c in cells):
            continue
        overall = "%.2f" % (100 * sum(means) / len(means)) if not any(math.isnan(m) for m in means) else "-"
        lines.append("| %s | %s | %s |" % (cfg, " | ".join(cells), overall))
    return "\n".join(lines)


def table_reference(rec, datasets, seeds, r=0.5, lib_cfg="confidence", torch_cfg="pytorch:confidence"):
    lines = ["| dataset | implementation | accuracy % | macro-F1 | macro-AUROC | load entropy | per-seed accuracy % |",
             "|---|---|---|---|---|---|---|"]
    for d in datasets:
        for cfg, label in ((lib_cfg, "libconfsmoe (confsmoe-train --paper)"), (torch_cfg, "PyTorch reference")):
            acc = pick(rec, cfg, d, r, "accuracy", seeds)
            if not acc:
                continue
            per = " / ".join("%.1f" % (100 * a) for a in acc)
            lines.append("| %s | %s | %s | %s | %s | %s | %s |" % (
                d, label, fmt(acc, 100, 1, want_n=len(seeds)), fmt(pick(rec, cfg, d, r, "macro_f1", seeds), 1, 3),
                fmt(pick(rec, cfg, d, r, "macro_auroc", seeds), 1, 3),
                fmt(pick(rec, cfg, d, r, "load_entropy", seeds), 1, 3), per))
    return "\n".join(lines)


def table_training(rec, configs, datasets, r, seeds):
    """Under-training check: the selected (best validation) epoch and the last epoch's training accuracy."""
    lines = ["| configuration | " + " | ".join("%s: best epoch / epochs, last train acc %%" % d for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for cfg in configs:
        cells = []
        for d in datasets:
            be = pick(rec, cfg, d, r, "best_epoch", seeds)
            ep = pick(rec, cfg, d, r, "epochs", seeds)
            ta = pick(rec, cfg, d, r, "train_accuracy", seeds)
            cells.append("-" if not be else "%s / %d, %.1f" % (",".join(str(b) for b in be), max(ep),
                                                               100 * sum(ta) / len(ta)))
        if any(c != "-" for c in cells):
            lines.append("| %s | %s |" % (cfg, " | ".join(cells)))
    return "\n".join(lines)


def replace_block(text, name, body):
    begin, end = "<!-- sweep:%s:begin -->" % name, "<!-- sweep:%s:end -->" % name
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < 0:
        return text, False
    return text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:], True


def write_results(path, blocks):
    with open(path) as f:
        text = f.read()
    done = []
    for name, body in blocks.items():
        text, ok = replace_block(text, name, body)
        if ok:
            done.append(name)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return done


def aggregate(args, rec):
    seeds = args.seeds
    rates = RATES if not args.quick else [0.5]
    main_cfgs = list(PAPER_CONFIGS) + ["floor"]
    blocks = {}
    blocks["main"] = table_summary(rec, main_cfgs, args.datasets, rates, seeds)
    blocks["detail"] = "\n\n".join("**%s**\n\n%s" % (d, table_by_dataset(rec, main_cfgs, d, rates, seeds))
                                   for d in args.datasets)
    blocks["reference"] = "\n\n".join(
        "**%s**\n\n%s" % (cfg, table_reference(rec, args.datasets, seeds, 0.5, cfg, "pytorch:" + cfg))
        for cfg in REFERENCE_CONFIGS)
    blocks["timing"] = table_timing(args.out)
    blocks["training"] = "\n\n".join("r = %g:\n\n%s" % (r, table_training(rec, list(PAPER_CONFIGS), args.datasets, r,
                                                                            seeds)) for r in (0.0, 0.5))
    study = [c for c in STUDY_CONFIGS]
    blocks["validation"] = table_validation(rec, study, args.datasets, [0.3, 0.5], seeds)
    if any(key[0] == "recommended" for key in rec):
        rc = ["recommended", "confidence", "floor"]
        blocks["recommended"] = table_summary(rec, rc, args.datasets, rates, seeds) + "\n\n" + "\n\n".join(
            "**%s**\n\n%s" % (d, table_by_dataset(rec, rc, d, rates, seeds)) for d in args.datasets)
    return blocks


def last_epoch(rec, cfg, dataset, r, key, seeds):
    """`key` of the last epoch's history entry (training routing) of each seed's run."""
    return [rec[(cfg, dataset, r, s)]["history"][-1][key] for s in seeds
            if (cfg, dataset, r, s) in rec and rec[(cfg, dataset, r, s)].get("history")]


def table_collapse(rec, dataset, r, seeds):
    """Final-epoch training load per (E, k, gate), the test routing's load and accuracy beside it."""
    lines = ["| E | k | gate | load entropy, last epoch | CV², last epoch | max-load share, last epoch "
             "| test load entropy | test max-load share | test accuracy % |", "|---|---|---|---|---|---|---|---|---|"]
    for experts, k in COLLAPSE_SHAPES:
        for gate in COLLAPSE_GATES:
            cfg = collapse_name(gate, experts, k)
            acc = pick(rec, cfg, dataset, r, "accuracy", seeds)
            if not acc:
                continue
            lines.append("| %d | %d | %s | %s | %s | %s | %s | %s | %s |" % (
                experts, k, gate, fmt(last_epoch(rec, cfg, dataset, r, "load_entropy", seeds), 1, 3),
                fmt(last_epoch(rec, cfg, dataset, r, "load_cv2", seeds), 1, 3),
                fmt(last_epoch(rec, cfg, dataset, r, "max_load_fraction", seeds), 1, 3),
                fmt(pick(rec, cfg, dataset, r, "load_entropy", seeds), 1, 3),
                fmt(pick(rec, cfg, dataset, r, "max_load_fraction", seeds), 1, 3), fmt(acc, 100, 1, want_n=len(seeds))))
    return "\n".join(lines)


def table_train_speed(rec, datasets, rates, seeds, lib_cfg="confidence", torch_cfg="pytorch:confidence"):
    """Wall time of the training of the library and of the PyTorch reference (the epochs' training
    and validation passes; not the final test evaluation, nor the reference's diagnostics), same
    configuration, data, masks and seed, from the sweep's own runs (1 thread each)."""
    lines = ["| dataset | r | seeds | libconfsmoe, s per training | PyTorch reference, s per training | speed-up |",
             "|---|---|---|---|---|---|"]
    for d in datasets:
        for r in rates:
            both = [s for s in seeds if (lib_cfg, d, r, s) in rec and (torch_cfg, d, r, s) in rec]
            if not both:
                continue
            lib = [sum(h["seconds"] for h in rec[(lib_cfg, d, r, s)]["history"]) for s in both]
            ref = [sum(h["seconds"] for h in rec[(torch_cfg, d, r, s)]["history"]) for s in both]
            lines.append("| %s | %g | %s | %s | %s | **%.2fx** |" % (
                d, r, ", ".join(map(str, both)), " / ".join("%.0f" % x for x in lib), " / ".join("%.0f" % x for x in ref),
                statistics.median(ref) / statistics.median(lib)))
    return "\n".join(lines)


def aggregate_sequence(args, rec, rates):
    """The blocks of the sequence preset: test accuracy per (configuration, r) with the floor and the
    PyTorch reference, the other metrics per rate, the validation accuracy at r = 0.3 and 0.5 (where
    choices are made), the training time of the library against the reference."""
    cfgs = list(SEQUENCE_CONFIGS) + ["pytorch:confidence", "floor"]
    choose = [r for r in rates if r in (0.3, 0.5)] or rates
    return {"sequence": table_summary(rec, cfgs, args.datasets, rates, args.seeds),
            "sequence-detail": "\n\n".join("**%s**\n\n%s" % (d, table_by_dataset(rec, cfgs, d, rates, args.seeds))
                                            for d in args.datasets),
            "sequence-validation": table_validation(rec, cfgs, args.datasets, choose, args.seeds),
            "sequence-speed": table_train_speed(rec, args.datasets, rates, args.seeds),
            "sequence-timing": table_timing(args.out)}


def aggregate_collapse(args, rec, rates):
    return {"collapse": "\n\n".join("**%s, r = %g**\n\n%s" % (d, r, table_collapse(rec, d, r, args.seeds))
                                     for d in args.datasets for r in rates)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trainer", default=os.path.join(ROOT, "build", "examples", "train", "confsmoe-train"))
    ap.add_argument("--data", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "data")),
                    help="folder of the dataset folders (default ../shared/data beside the repository; "
                    "the repository's own: data, with --datasets handwritten)")
    ap.add_argument("--out", default=None, help="results folder (default build/sweep, or the preset's: "
                    "build/sweep-sequence for sequence and collapse, and for --datasets avdigits-hard; with --quick "
                    "the same + '-quick')")
    ap.add_argument("--fsdd", default=os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "fsdd")),
                    help="FSDD, to generate %s into OUT/data when DATA has no such folder (default "
                    "../shared/data/fsdd beside the repository)" % SEQUENCE_DATASET)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--datasets", nargs="+", default=None, help="default: the preset's, else %s" % " ".join(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None,
                    help="default: the preset's, else %s (1 with --quick)" % " ".join(map(str, SEEDS)))
    ap.add_argument("--rates", nargs="+", type=float, default=None, help="default: the preset's")
    ap.add_argument("--configs", nargs="+", default=None, help="only these configurations of the preset")
    ap.add_argument("--recommended", default=None,
                    help="flags of the recommended configuration (one string), run as config 'recommended'")
    ap.add_argument("--quick", action="store_true", help="1 seed, r = 0.5 (collapse: 0.3), 3 epochs, nothing "
                    "written to RESULTS.md")
    ap.add_argument("--quick-epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timing: runs per implementation and thread count")
    ap.add_argument("--no-run", action="store_true", help="only aggregate")
    ap.add_argument("--fresh", action="store_true", help="empty OUT first, so that every run runs again")
    ap.add_argument("--no-floor", action="store_true")
    ap.add_argument("--results", default=None, help="the markdown file to update (default docs/RESULTS.md; "
                    "with --quick none)")
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    args.datasets = args.datasets or preset.get("datasets", DATASETS)
    args.seeds = args.seeds or ([1] if args.quick else preset.get("seeds", SEEDS))
    args.generated = {}
    if args.out is None:
        default_out = "sweep-sequence" if args.datasets == [SEQUENCE_DATASET] else "sweep"
        args.out = os.path.join(ROOT, "build", preset.get("out", default_out) + ("-quick" if args.quick else ""))
    if args.results is None and not args.quick:
        args.results = os.path.join(ROOT, "docs", "RESULTS.md")
    configs = dict(preset["configs"])
    if args.recommended:
        configs = {"recommended": args.recommended.split()} if args.preset == "recommended" else dict(
            configs, recommended=args.recommended.split())
    if args.configs:
        configs = {k: v for k, v in configs.items() if k in args.configs}
    quick_rates = [0.5] if 0.5 in preset["rates"] else preset["rates"][:1]
    rates = args.rates or (quick_rates if args.quick else preset["rates"])
    if args.fresh:
        shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    if SEQUENCE_DATASET in args.datasets and not args.no_run:
        sequence_folder(args)

    failed = 0
    if not args.no_run:
        if not os.access(args.trainer, os.X_OK):
            sys.exit("sweep.py: no trainer at %s (build it, or pass --trainer)" % args.trainer)
        absent = [dataset_folder(args, d) for d in args.datasets if not os.path.isdir(dataset_folder(args, d))]
        if absent:
            sys.exit("sweep.py: missing dataset folder(s) %s. The repository holds data/handwritten only; cub and "
                     "scene15 are optional, in ../shared/data beside it (docs/TRAIN.md, \"Datasets\"): pass "
                     "--data DIR, or --datasets with the ones you have" % ", ".join(absent))
        if args.preset == "reference":
            failed = run_reference(args, rates)
        elif args.preset == "timing":
            run_timing(args)
        else:
            failed = run_all(args, configs, rates)
        if preset["floor"] and not args.no_floor:
            floor_all(args, rates)

    rec = collect(args.out)
    bad = check_same_splits(rec)
    if bad:
        sys.exit("sweep.py: split sizes differ between runs:\n  " + "\n  ".join(bad))
    if args.preset == "sequence":
        blocks = aggregate_sequence(args, rec, rates)
    elif SEQUENCE_DATASET in args.datasets and args.preset != "collapse":
        # The reference or timing runs on sequence data: section 6's blocks, not section 1's.
        blocks = aggregate_sequence(args, rec, SEQUENCE_RATES)
    elif args.preset == "collapse":
        blocks = aggregate_collapse(args, rec, rates)
    else:
        blocks = aggregate(args, rec)
    for name, body in blocks.items():
        print("\n## %s\n\n%s" % (name, body))
    if args.results:
        done = write_results(args.results, blocks)
        print("\nsweep: updated block(s) %s of %s" % (", ".join(done) or "(none)", args.results))
    if failed:
        sys.exit("sweep.py: %d run(s) failed (see the .log files); rerun to retry" % failed)


if __name__ == "__main__":
    main()
