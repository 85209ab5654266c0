#!/usr/bin/python3
"""Plots of the sweep (examples/sweep/sweep.py), as dependency-free SVG:

  docs/results_accuracy.svg  test accuracy vs missing rate r, one line per gate configuration and
                             the floor (mean +- std over seeds as error bars), one panel per dataset
  docs/results_load.svg      expert load (share of the test routing slots per expert) of the
                             confidence gate and of the softmax gate at r = 0.5 on handwritten,
                             one panel per seed (expert indices are not comparable across seeds)
  with --sequence (presets sequence and collapse, build/sweep-sequence):
  docs/results_sequence_accuracy.svg   the same accuracy plot on avdigits-hard, r = 0 .. 0.7
  docs/results_collapse_E<E>_k<k>.svg  per (E, k): load entropy, CV^2 and max-load share of the
                             training routing per epoch, one line per gate (mean over the seeds)

    examples/sweep/plot.py [--out build/sweep] [--docs docs] [--sequence]

stdlib only (the SVG is written by hand).
"""
import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class Svg:
    def __init__(self, width, height):
        self.w, self.h = width, height
        self.items = ['<rect x="0" y="0" width="%d" height="%d" fill="white"/>' % (width, height)]

    def line(self, x1, y1, x2, y2, color="#000", width=1.0, dash=None):
        self.items.append('<line x1="%.2f" y1="%.2f" x2="%.2f" y2="%.2f" stroke="%s" stroke-width="%.2f"%s/>'
                          % (x1, y1, x2, y2, color, width, ' stroke-dasharray="%s"' % dash if dash else ""))

    def polyline(self, pts, color, width=2.0, dash=None):
        self.items.append('<polyline points="%s" fill="none" stroke="%s" stroke-width="%.2f"%s/>'
                          % (" ".join("%.2f,%.2f" % p for p in pts), color, width,
                             ' stroke-dasharray="%s"' % dash if dash else ""))

    def circle(self, x, y, r, color):
        self.items.append('<circle cx="%.2f" cy="%.2f" r="%.2f" fill="%s"/>' % (x, y, r, color))

    def rect(self, x, y, w, h, fill, stroke="none"):
        self.items.append('<rect x="%.2f" y="%.2f" width="%.2f" height="%.2f" fill="%s" stroke="%s"/>'
                          % (x, y, w, h, fill, stroke))

    def text(self, x, y, s, size=12, anchor="start", weight="normal", color="#000", rotate=None):
        tr = ' transform="rotate(%d %.2f %.2f)"' % (rotate, x, y) if rotate else ""
        self.items.append('<text x="%.2f" y="%.2f" font-size="%d" text-anchor="%s" font-weight="%s" fill="%s" %s%s>'
                          '%s</text>' % (x, y, size, anchor, weight, color, FONT, tr, esc(s)))

    def save(self, path):
        with open(path + ".tmp", "w") as f:
            f.write('<?xml version="1.0" encoding="UTF-8"?>\n')
            f.write('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">\n'
                    % (self.w, self.h, self.w, self.h))
            f.write("\n".join(self.items))
            f.write("\n</svg>\n")
        os.replace(path + ".tmp", path)


def nice_ticks(lo, hi, n=5):
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 2.5, 5, 10):
        if span / (step * m) <= n:
            step *= m
            break
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-9:
        out.append(round(t, 10))
        t += step
    return out


class Axes:
    """A panel: data ranges mapped to a pixel box, with ticks, grid and labels."""

    def __init__(self, svg, x, y, w, h, xlim, ylim):
        self.svg, self.x, self.y, self.w, self.h, self.xlim, self.ylim = svg, x, y, w, h, xlim, ylim

    def px(self, v):
        return self.x + (v - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * self.w

    def py(self, v):
        return self.y + self.h - (v - self.ylim[0]) / (self.ylim[1] - self.ylim[0]) * self.h

    def frame(self, title, xlabel, ylabel, xticks, yticks, xfmt="%g", yfmt="%g"):
        s = self.svg
        for t in yticks:
            s.line(self.x, self.py(t), self.x + self.w, self.py(t), "#e0e0e0")
            s.text(self.x - 6, self.py(t) + 4, yfmt % t, 11, "end")
        for t in xticks:
            s.line(self.px(t), self.y + self.h, self.px(t), self.y + self.h + 4, "#000")
            s.text(self.px(t), self.y + self.h + 17, xfmt % t, 11, "middle")
        s.line(self.x, self.y + self.h, self.x + self.w, self.y + self.h, "#000")
        s.line(self.x, self.y, self.x, self.y + self.h, "#000")
        s.text(self.x + self.w / 2, self.y - 8, title, 14, "middle", "bold")
        s.text(self.x + self.w / 2, self.y + self.h + 34, xlabel, 12, "middle")
        if ylabel:
            s.text(self.x - 40, self.y + self.h / 2, ylabel, 12, "middle", rotate=-90)


def plot_accuracy(rec, configs, datasets, rates, seeds, path, stats):
    pw = 250 if len(datasets) > 1 else 880  # panel width; one dataset gets the whole width
    rows = (len(configs) + 3) // 4
    W, H = max((pw + 80) * len(datasets) + 60, 1040), 440 + 22 * rows
    svg = Svg(W, H)
    note = "gates with the paper's hyper-parameters" + (", and the recommended defaults" if "recommended" in configs
                                                         else "")
    svg.text(W / 2, 22, "Test accuracy vs missing rate r (mean ± std over seeds %s; %s)"
             % (",".join(str(s) for s in seeds), note), 15 if len(datasets) > 1 else 13, "middle", "bold")
    for di, d in enumerate(datasets):
        series = []
        lo, hi = 100.0, 0.0
        for ci, cfg in enumerate(configs):
            pts = []
            for r in rates:
                v = [rec[(cfg, d, r, s)]["accuracy"] for s in seeds if (cfg, d, r, s) in rec]
                st = stats(v)
                if st:
                    m, sd = 100 * st[0], 0.0 if math.isnan(st[1]) else 100 * st[1]
                    pts.append((r, m, sd))
                    lo, hi = min(lo, m - sd), max(hi, m + sd)
            if pts:
                series.append((ci, cfg, pts))
        if not series:
            continue
        lo, hi = math.floor(lo / 5) * 5, min(100, math.ceil(hi / 5) * 5)
        if hi - lo < 10:
            lo = hi - 10
        ax = Axes(svg, 75 + di * (pw + 80), 60, pw, 300, (-0.03, max(rates) + 0.03), (lo, hi))
        ax.frame(d, "missing rate r", "test accuracy %" if di == 0 else "", rates, nice_ticks(lo, hi, 6),
                 "%g", "%g")
        for ci, cfg, pts in series:
            color = "#000" if cfg == "floor" else PALETTE[ci % len(PALETTE)]
            dash = "6,4" if cfg == "floor" else None
            off = (ci - len(configs) / 2) * 0.004  # small x offsets so that error bars do not overlap
            xy = [(ax.px(r + off), ax.py(m)) for r, m, _ in pts]
            svg.polyline(xy, color, 2.0, dash)
            for (r, m, sd), (x, y) in zip(pts, xy):
                if sd > 0:
                    svg.line(x, ax.py(m - sd), x, ax.py(m + sd), color, 1.2)
                    svg.line(x - 3, ax.py(m - sd), x + 3, ax.py(m - sd), color, 1.2)
                    svg.line(x - 3, ax.py(m + sd), x + 3, ax.py(m + sd), color, 1.2)
                svg.circle(x, y, 3, color)
    # Legend under the panels.
    lx, ly = 75, 425
    for ci, cfg in enumerate(configs):
        color = "#000" if cfg == "floor" else PALETTE[ci % len(PALETTE)]
        x = lx + (ci % 4) * 240
        y = ly + (ci // 4) * 22
        svg.line(x, y - 4, x + 26, y - 4, color, 2.5, "6,4" if cfg == "floor" else None)
        label = {"floor": "floor: mean imputation + logistic regression",
                 "pytorch:confidence": "PyTorch reference (confidence)"}.get(cfg, cfg)
        svg.text(x + 32, y, label, 12)
    svg.save(path)


def plot_load(rec, dataset, r, seeds, cfgs, path):
    panels = [s for s in seeds if all((c, dataset, r, s) in rec and rec[(c, dataset, r, s)]["load"] for c in cfgs)]
    if not panels:
        return False
    E = len(rec[(cfgs[0], dataset, r, panels[0])]["load"])
    W, H = max(760, 300 * len(panels) + 80), 420
    svg = Svg(W, H)
    svg.text(W / 2, 22, "Expert load on %s, r = %g: share of the test routing slots per expert" % (dataset, r), 15,
             "middle", "bold")
    top = max(max(rec[(c, dataset, r, s)]["load"]) for c in cfgs for s in panels)
    hi = min(1.0, math.ceil(top * 20 + 0.5) / 20)
    for pi, s in enumerate(panels):
        ax = Axes(svg, 70 + pi * 300, 60, 240, 260, (0, E), (0, hi))
        ax.frame("seed %d" % s, "expert", "share of slots" if pi == 0 else "", [], nice_ticks(0, hi, 5), "%g",
                 "%.2f")
        bw = 0.8 / len(cfgs)
        for e in range(E):
            svg.text(ax.px(e + 0.5), ax.y + ax.h + 17, str(e), 11, "middle")
            for ci, c in enumerate(cfgs):
                v = rec[(c, dataset, r, s)]["load"][e]
                x0 = ax.px(e + 0.1 + ci * bw)
                svg.rect(x0, ax.py(v), ax.px(e + 0.1 + (ci + 1) * bw) - x0 - 1, ax.py(0) - ax.py(v), PALETTE[ci])
        svg.line(ax.x, ax.py(1.0 / E), ax.x + ax.w, ax.py(1.0 / E), "#555", 1.2, "5,4")
        for ci, c in enumerate(cfgs):
            H_ = rec[(c, dataset, r, s)]["load_entropy"]
            svg.text(ax.x + ax.w - 4, ax.y + 14 + 15 * ci, "H(load)/log E = %.3f" % H_, 11, "end", color=PALETTE[ci])
    lx, ly = 70, 385
    for ci, c in enumerate(cfgs):
        svg.rect(lx + ci * 200, ly - 11, 14, 12, PALETTE[ci])
        svg.text(lx + ci * 200 + 20, ly, c + " gate", 12)
    svg.line(lx + len(cfgs) * 200, ly - 5, lx + len(cfgs) * 200 + 26, ly - 5, "#555", 1.2, "5,4")
    svg.text(lx + len(cfgs) * 200 + 32, ly, "uniform load 1/E", 12)
    svg.save(path)
    return True


COLLAPSE_METRICS = [("load_entropy", "load entropy H(load)/log E", (0.0, 1.0)),
                    ("load_cv2", "CV² of the expert slots", None),
                    ("max_load_fraction", "max-load share", (0.0, 1.0))]


def plot_collapse(rec, dataset, r, seeds, gates, name, path, title):
    """Training load per epoch (the trainer's JSON history) of each gate, one panel per metric;
    `name(gate)` is the configuration of that gate; the mean over the seeds that ran."""
    series = []
    for gi, gate in enumerate(gates):
        hists = [rec[(name(gate), dataset, r, s)]["history"] for s in seeds if (name(gate), dataset, r, s) in rec]
        hists = [h for h in hists if h]
        if hists:
            n = min(len(h) for h in hists)
            series.append((gi, gate, [[sum(h[e][key] for h in hists) / len(hists) for e in range(n)]
                                      for key, _, _ in COLLAPSE_METRICS]))
    if not series:
        return False
    W, H = 3 * 330 + 60, 440
    svg = Svg(W, H)
    svg.text(W / 2, 22, title, 15, "middle", "bold")
    epochs = max(len(v[0]) for _, _, v in series)
    xticks = nice_ticks(1, max(epochs, 2), 6)
    for mi, (key, label, ylim) in enumerate(COLLAPSE_METRICS):
        if ylim is None:
            ylim = (0.0, max(1e-3, 1.05 * max(max(v[mi]) for _, _, v in series)))
        ax = Axes(svg, 75 + mi * 330, 60, 250, 280, (1, max(epochs, 2)), ylim)
        ax.frame(label, "epoch", "training routing" if mi == 0 else "", xticks, nice_ticks(ylim[0], ylim[1], 5),
                 "%g", "%.2f")
        for gi, gate, values in series:
            svg.polyline([(ax.px(e + 1), ax.py(v)) for e, v in enumerate(values[mi])], PALETTE[gi % len(PALETTE)])
    lx, ly = 75, 405
    for gi, gate, _ in series:
        svg.line(lx + gi * 200, ly - 4, lx + gi * 200 + 26, ly - 4, PALETTE[gi % len(PALETTE)], 2.5)
        svg.text(lx + gi * 200 + 32, ly, gate + " gate", 12)
    svg.save(path)
    return True


def main_sequence(args, sweep):
    """docs/results_sequence_accuracy.svg and docs/results_collapse_E<E>_k<k>.svg (presets sequence, collapse)."""
    rec = sweep.collect(args.out)
    d = sweep.SEQUENCE_DATASET
    path = os.path.join(args.docs, "results_sequence_accuracy.svg")
    plot_accuracy(rec, list(sweep.SEQUENCE_CONFIGS) + ["pytorch:confidence", "floor"], [d], sweep.SEQUENCE_RATES,
                  args.seeds, path, sweep.stats)
    print("wrote", path)
    seeds = sweep.PRESETS["collapse"]["seeds"]  # every shape has these (E 8, k 2 has the sequence preset's too)
    for experts, k in sweep.COLLAPSE_SHAPES:
        path = os.path.join(args.docs, "results_collapse_E%d_k%d.svg" % (experts, k))
        title = "Expert load over training on %s, r = 0.3, E = %d, k = %d (seeds %s)" % (
            d, experts, k, ",".join(map(str, seeds)))
        if plot_collapse(rec, d, 0.3, seeds, sweep.COLLAPSE_GATES,
                         lambda g: sweep.collapse_name(g, experts, k), path, title):
            print("wrote", path)
        else:
            print("no collapse runs at E = %d, k = %d: %s not written" % (experts, k, path))


def main():
    import sweep

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequence", action="store_true", help="the plots of the presets sequence and collapse")
    ap.add_argument("--out", default=None, help="the sweep's results folder (default build/sweep; with "
                    "--sequence build/sweep-sequence)")
    ap.add_argument("--docs", default=os.path.join(ROOT, "docs"), help="where the SVG files go")
    ap.add_argument("--seeds", nargs="+", type=int, default=sweep.SEEDS)
    ap.add_argument("--datasets", nargs="+", default=sweep.DATASETS)
    ap.add_argument("--extra", nargs="*", default=[], help="more configurations to draw (e.g. recommended)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "build", "sweep-sequence" if args.sequence else "sweep")
    if args.sequence:
        main_sequence(args, sweep)
        return
    rec = sweep.collect(args.out)
    configs = list(sweep.PAPER_CONFIGS) + list(args.extra) + ["floor"]
    p1 = os.path.join(args.docs, "results_accuracy.svg")
    plot_accuracy(rec, configs, args.datasets, sweep.RATES, args.seeds, p1, sweep.stats)
    print("wrote", p1)
    p2 = os.path.join(args.docs, "results_load.svg")
    if plot_load(rec, "handwritten", 0.5, args.seeds, ["confidence", "softmax"], p2):
        print("wrote", p2)
    else:
        print("no handwritten r=0.5 runs of both gates: %s not written" % p2)


if __name__ == "__main__":
    main()
