#!/usr/bin/python3
"""An independent PyTorch implementation of docs/MODEL.md, section 6 (one Transformer-MoE layer with the
confidence-guided gate and two-stage imputation) and of confsmoe-train's training protocol, to
check that libconfsmoe's training results agree with a second implementation (docs/RESULTS.md).

    /usr/bin/python3 tests/reference/torch_train.py --data data/handwritten --missing 0.5 \
        --seed 1 --masks MASKS.csv --json out.json

Written from docs/MODEL.md and docs/TRAIN.md only (not from lib/ or examples/train/); the model
follows tests/parity/model_parity.py (which checks the library's forward and gradients against a
float64 torch model at one step), here in float32, vectorised, and trained.

Same as confsmoe-train: the splits and the masks (read from the file `confsmoe-train
--dump-masks` writes for the same dataset, rate and seed, or produced by calling --trainer), the
standardisation, the hyper-parameters (d 128, 4 heads, E 8, k 2, hidden = d, dropout 0.1 on the
attention weights and on the attention output, Adam lr 3e-4 betas 0.9/0.999 eps 1e-8, batch 256,
30 epochs, K = 10 stage-1 draws), the model selection (best validation accuracy after each epoch,
the earliest on ties, the test split evaluated once with the selected parameters), the metrics and
the expert-utilisation numbers (slots of the test evaluation, every modality token counted).
Different: the random streams (torch's: initialisation, dropout, stage-1 draws, batch order), so
runs of the same seed are not the same numbers, only the same distribution.

The model (B samples, M modalities of S_m tokens each, L = sum_m S_m; vector views are S_m = 1):
    x_m missing -> mean of K distinct pool rows (two-stage) or the pool mean (mean), train and eval
    X = [enc_m(x_m)]_m + pos (modality m's tokens follow those of m' < m);  H = X + Dropout(MHA(LN1(X)))  (dropout also on
        attention weights)
    Z = LN2(H); top-k of the router logits u(Z) (frozen router for the confidence gate)
    y_j = E_{I_j}(Z)  (2-layer GELU FFN);  c_j = sigmoid(v_i . LN_i(y_j) + beta_i)
    F = sum_j c_j y_j   (baselines: sum_j softmax(u_topk)_j y_j);   H' = LN3(H + F)
    stage 2 for each token l of a missing (b, m): q = W_q mean_j y_{b,l,j} + b_q,
        kv_{l',j} = W_kv y_{b,l',j} + b_kv over the tokens l' of present m' != m;
        a = softmax_{l'}(q . kv / sqrt(d)) per slot j; keep the top
        T_m = max(1, floor(sum_{m' != m} S_m' / 4));
        Ihat = sum_j sum_{kept l'} a kv;  then (writeback) ln-imp: H'_l <- LN_imp(H'_l + Ihat),
        residual: H'_l <- LN3(H_l + Ihat) (the imputation in place of F; no LN_imp)
    logits = head(LN_out(readout(concat_m mean over m's S_m tokens of H')))
    loss = CE + L_conf,  L_conf = sum over the slots of present tokens (c_j - softmax(P y_j)[label])^2
                                  / (k * present tokens)   (target not detached)
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as Fn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "examples", "sweep"))
import mvdata  # noqa: E402


def uniform_(t, bound):
    with torch.no_grad():
        t.uniform_(-bound, bound)
    return t


class Linear(torch.nn.Module):
    """y = x W^T + b, W and b ~ U(+-1/sqrt(fan_in)) (docs/MODEL.md, section 6)."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        b = 1.0 / math.sqrt(fan_in)
        self.w = torch.nn.Parameter(uniform_(torch.empty(fan_out, fan_in), b))
        self.b = torch.nn.Parameter(uniform_(torch.empty(fan_out), b))

    def forward(self, x):
        return Fn.linear(x, self.w, self.b)


class LayerNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.bias = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        return Fn.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)


class Gate(torch.nn.Module):
    """Router + E experts + (confidence gate) per-expert ConfNets and the target classifier P."""

    def __init__(self, kind, d, E, k, h, C):
        super().__init__()
        self.kind, self.d, self.E, self.k = kind, d, E, k
        self.router = torch.nn.Parameter(uniform_(torch.empty(d, E), 1.0 / math.sqrt(E)))
        bd, bh = 1.0 / math.sqrt(d), 1.0 / math.sqrt(h)
        self.w1 = torch.nn.Parameter(uniform_(torch.empty(E, h, d), bd))
        self.b1 = torch.nn.Parameter(uniform_(torch.empty(E, h), bd))
        self.w2 = torch.nn.Parameter(uniform_(torch.empty(E, d, h), bh))
        self.b2 = torch.nn.Parameter(uniform_(torch.empty(E, d), bh))
        if kind == "confidence":
            self.conf_g = torch.nn.Parameter(torch.ones(E, d))
            self.conf_b = torch.nn.Parameter(torch.zeros(E, d))
            self.conf_v = torch.nn.Parameter(uniform_(torch.empty(E, d), bd))
            self.conf_beta = torch.nn.Parameter(uniform_(torch.empty(E), bd))
            self.target = Linear(d, C)

    def logits(self, z, w):
        if self.kind in ("confidence", "softmax"):
            return z @ w
        sq = (z * z).sum(1, keepdim=True) - 2.0 * (z @ w) + (w * w).sum(0)[None, :]
        sq = sq.clamp_min(0.0)
        return -sq if self.kind == "gaussian" else -torch.sqrt(sq + 1e-12)

    def forward(self, z, labels, present):
        """z [N, d]; labels [N]; present [N] bool. Returns F [N, d], slots Y [N, k, d], L_conf,
        the expert index of each slot [N, k]."""
        N, d, k = z.shape[0], self.d, self.k
        if self.kind == "confidence":  # frozen router (the reference): no gradient to z or W_r
            with torch.no_grad():
                u = self.logits(z, self.router)
        else:
            u = self.logits(z, self.router)
        top_u, idx = torch.topk(u, k, dim=1)
        flat = idx.reshape(-1)
        src = torch.arange(N, device=z.device).repeat_interleave(k)
        Yf = z.new_zeros(N * k, d)
        for e in range(self.E):  # sparse dispatch: each expert on its own slots
            pos = torch.nonzero(flat == e).squeeze(1)
            if pos.numel() == 0:
                continue
            ze = z.index_select(0, src.index_select(0, pos))
            he = Fn.gelu(Fn.linear(ze, self.w1[e], self.b1[e]))
            Yf = Yf.index_copy(0, pos, Fn.linear(he, self.w2[e], self.b2[e]))
        Y = Yf.view(N, k, d)
        l_conf = z.new_zeros(())
        if self.kind == "confidence":
            ln = Fn.layer_norm(Y, (d,), None, None, 1e-5) * self.conf_g[idx] + self.conf_b[idx]
            c = torch.sigmoid((ln * self.conf_v[idx]).sum(-1) + self.conf_beta[idx])  # [N, k]
            p = torch.softmax(self.target(Y), -1).gather(2, labels.view(N, 1, 1).expand(N, k, 1)).squeeze(2)
            pres = present.to(Y.dtype).unsqueeze(1)
            n_pres = float(present.sum())
            if n_pres > 0:
                l_conf = (((c - p) ** 2) * pres).sum() / (k * n_pres)
            w = c
        else:
            w = torch.softmax(top_u, 1)
        return (w.unsqueeze(2) * Y).sum(1), Y, l_conf, idx


class ConfSMoE(torch.nn.Module):
    def __init__(self, features, C, gate="confidence", imputation="two-stage", d=128, heads=4, E=8, k=2,
                 hidden=0, dropout=0.1, draws=10, tokens=1, writeback="ln-imp"):
        super().__init__()
        self.M, self.d, self.heads, self.k, self.p = len(features), d, heads, k, dropout
        self.S = [tokens] * self.M if isinstance(tokens, int) else list(tokens)
        self.writeback = writeback
        self.imputation, self.draws = imputation, draws
        self.enc = torch.nn.ModuleList([Linear(f, d) for f in features])
        self.pos = torch.nn.Parameter(torch.zeros(sum(self.S), d))
        self.ln1, self.ln2, self.ln3, self.ln_out = LayerNorm(d), LayerNorm(d), LayerNorm(d), LayerNorm(d)
        self.q, self.kk, self.v, self.o = Linear(d, d), Linear(d, d), Linear(d, d), Linear(d, d)
        self.gate = Gate(gate, d, E, k, hidden or d, C)
        if imputation == "two-stage":
            self.imp_q, self.imp_kv = Linear(d, d), Linear(d, d)
            if writeback == "ln-imp":
                self.imp_ln = LayerNorm(d)
        self.readout = Linear(self.M * d, d)
        self.head = Linear(d, C)
        self.pools = [None] * self.M
        self.fill_mean = False  # diagnostics: stage 1 fills with the pool mean even under two-stage

    def set_pools(self, pools):
        self.pools = [torch.as_tensor(p).reshape(p.shape[0], -1) for p in pools]  # flat rows, as xs
        self.pool_means = [p.mean(0) for p in self.pools]

    def stage1(self, xs, avail):
        out = []
        for m, x in enumerate(xs):
            miss = torch.nonzero(~avail[:, m]).squeeze(1)
            if miss.numel() == 0:
                out.append(x)
                continue
            x = x.clone()
            if self.imputation == "mean" or self.fill_mean:
                x[miss] = self.pool_means[m]
            else:
                P = self.pools[m].shape[0]
                kk = min(self.draws, P)
                rows = torch.multinomial(torch.ones(miss.numel(), P), kk, replacement=False)
                x[miss] = self.pools[m][rows].mean(1)
            out.append(x)
        return out

    def forward(self, xs, avail, labels):
        """xs [M] of [B, S_m * F_m] (or [B, S_m, F_m]) float32; avail [B, M] bool; labels [B]
        int64 (the confidence target; unused at inference). Returns logits, L_conf, expert index
        per slot [B*L, k]."""
        B, M, S, d, H = xs[0].shape[0], self.M, self.S, self.d, self.heads
        L = sum(S)
        xs = self.stage1([x.reshape(B, -1) for x in xs], avail)
        X = torch.cat([self.enc[m](xs[m].reshape(B, S[m], -1)) for m in range(M)], 1) + self.pos  # [B, L, d]
        Xn = self.ln1(X)
        dh = d // H
        Q = self.q(Xn).view(B, L, H, dh).transpose(1, 2)
        K = self.kk(Xn).view(B, L, H, dh).transpose(1, 2)
        V = self.v(Xn).view(B, L, H, dh).transpose(1, 2)
        att = torch.softmax(Q @ K.transpose(-1, -2) / math.sqrt(dh), -1)
        att = Fn.dropout(att, self.p, self.training)
        A = self.o((att @ V).transpose(1, 2).reshape(B, L, d))
        Hpre = X + Fn.dropout(A, self.p, self.training)

        mod = torch.repeat_interleave(torch.arange(M), torch.tensor(S))  # token l's modality
        present_tok = avail[:, mod]  # [B, L]: token l's modality present
        Z = self.ln2(Hpre).reshape(B * L, d)
        lab_tok = labels.repeat_interleave(L)
        F, Y, l_conf, idx = self.gate(Z, lab_tok, present_tok.reshape(-1))
        Hs = self.ln3(Hpre + F.view(B, L, d))

        if self.imputation == "two-stage" and not bool(avail.all()):
            k = self.k
            Ym = Y.view(B, L, k, d)
            q = self.imp_q(Ym.mean(2))  # [B, L, d]
            kv = self.imp_kv(Ym)  # [B, L', k, d]
            s = torch.einsum("bld,bnjd->blnj", q, kv) / math.sqrt(d)  # [B, L, L', k]
            other = mod[:, None] != mod[None, :]
            valid = present_tok[:, None, :] & other[None]  # key l' of a present modality other than l's
            # -1e9, not -inf: rows without any key (present m, unused below) stay finite.
            s = s.masked_fill(~valid.unsqueeze(3), -1e9)
            a = torch.softmax(s, 2)
            T = [max(1, (sum(S) - S[m]) // 4) for m in range(M)]
            if any(T[m] < sum(S) - S[m] for m in range(M)):
                # Query l keeps its T_m largest weights (topk sorts them); masked keys weigh 0, so a
                # kept one among them (fewer than T_m valid) adds nothing.
                top = torch.topk(a.detach(), max(T), dim=2).indices  # [B, L, max T, k]
                rank_kept = torch.arange(max(T))[None, :] < torch.tensor(T)[mod][:, None]  # [L, max T]
                keep = torch.zeros_like(a).scatter_(2, top, rank_kept[None, :, :, None].expand_as(top).to(a.dtype))
                a = a * keep
            ihat = torch.einsum("blnj,bnjd->bld", a, kv)
            miss = (~present_tok).unsqueeze(2)
            if self.writeback == "residual":
                Hs = torch.where(miss, self.ln3(Hpre + ihat), Hs)
            else:
                Hs = torch.where(miss, self.imp_ln(Hs + ihat), Hs)

        r = self.readout(torch.cat([h.mean(1) for h in Hs.split(S, 1)], 1))
        return self.head(self.ln_out(r)), l_conf, idx


def evaluate(model, xs, avail, labels, idx_rows, C, batch, E):
    model.eval()
    logits, slots = [], np.zeros(E, np.int64)
    with torch.no_grad():
        for at in range(0, len(idx_rows), batch):
            rows = torch.as_tensor(idx_rows[at:at + batch])
            out, _, eidx = model([x[rows] for x in xs], avail[rows], labels[rows])
            logits.append(out.numpy())
            slots += np.bincount(eidx.reshape(-1).numpy(), minlength=E)
    lg = np.concatenate(logits) if logits else np.zeros((0, C), np.float32)
    return mvdata.metrics(lg, labels[torch.as_tensor(idx_rows)].numpy(), C), slots


def dump_masks_with(trainer, folder, rate, seed):
    fd, path = tempfile.mkstemp(suffix=".csv")
    os.close(fd)
    subprocess.run([trainer, "--data", folder, "--missing", "%g" % rate, "--seed", str(seed), "--paper", "--epochs",
                    "0", "--quiet", "--dump-masks", path], check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, BLIS_NUM_THREADS="1"))
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--missing", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--masks", help="the --dump-masks CSV of confsmoe-train for the same data, rate and seed")
    ap.add_argument("--trainer", default=os.path.join(ROOT, "build", "examples", "train", "confsmoe-train"),
                    help="used to dump the masks when --masks is not given")
    ap.add_argument("--gate", choices=["confidence", "softmax", "gaussian", "laplacian"], default="confidence")
    ap.add_argument("--imputation", choices=["two-stage", "mean"], default="two-stage")
    ap.add_argument("--writeback", choices=["ln-imp", "residual"], default="ln-imp",
                    help="two-stage: LN_imp(LN3(H + F) + Ihat), or LN3(H + Ihat)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--json")
    ap.add_argument("--no-diagnostics", dest="diagnostics", action="store_false",
                    help="skip the evaluation-draw diagnostics (and their time)")
    ap.add_argument("--config-name", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    masks = args.masks or dump_masks_with(args.trainer, args.data, args.missing, args.seed)
    data = mvdata.prepare(args.data, masks, sequences=True)
    if not args.masks:
        os.unlink(masks)
    C, M, E = data["n_classes"], len(data["views"]), args.experts
    xs = [torch.from_numpy(v) for v in data["views"]]
    avail = torch.from_numpy(data["present"].astype(bool))
    labels = torch.from_numpy(data["labels"])
    tr, va, te = data["idx"]["train"], data["idx"]["val"], data["idx"]["test"]

    tokens = data["tokens"]
    model = ConfSMoE([v.shape[1] // s for v, s in zip(data["views"], tokens)], C, args.gate, args.imputation, args.d,
                     args.heads, E, args.k, 0, args.dropout, args.draws, tokens, args.writeback)
    model.set_pools([data["views"][m][tr[data["present"][tr, m] == 1]] for m in range(M)])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)

    best_acc, best_epoch, best_state = -1.0, -1, None
    history = []
    train_seconds = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.time()
        model.train()
        order = torch.as_tensor(tr)[torch.randperm(len(tr), generator=gen)]
        loss_sum, conf_sum, correct = 0.0, 0.0, 0
        for at in range(0, len(order), args.batch):
            rows = order[at:at + args.batch]
            y = labels[rows]
            logits, l_conf, _ = model([x[rows] for x in xs], avail[rows], y)
            task = Fn.cross_entropy(logits, y)
            loss = task + l_conf
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(rows)
            conf_sum += float(l_conf) * len(rows)
            correct += int((logits.argmax(1) == y).sum())
        t_train = time.time() - t0
        train_seconds += t_train
        v, _ = evaluate(model, xs, avail, labels, va, C, 256, E)
        if v["accuracy"] > best_acc:
            best_acc, best_epoch = v["accuracy"], epoch
            best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
        rec = dict(epoch=epoch, loss=loss_sum / len(tr), conf_loss=conf_sum / len(tr), train_accuracy=correct / len(tr),
                   val_accuracy=v["accuracy"], val_macro_f1=v["macro_f1"], seconds=time.time() - t0,
                   train_seconds=t_train)
        history.append(rec)
        if not args.quiet:
            print("epoch %2d/%d  loss %.4f (conf %.4f)  train acc %5.1f%%  val acc %5.1f%%  %.1fs"
                  % (epoch, args.epochs, rec["loss"], rec["conf_loss"], 100 * rec["train_accuracy"],
                     100 * v["accuracy"], rec["seconds"]), flush=True)
    model.load_state_dict(best_state)
    test, slots = evaluate(model, xs, avail, labels, te, C, 256, E)
    experts = mvdata.load_stats(slots)
    # Diagnostics of the stage-1 draws at evaluation time (analysis only, after the one reported
    # test evaluation; nothing is selected on them): the accuracy over 10 more evaluations with
    # fresh draws, and with the pool mean in place of the draws (stage 2 unchanged).
    diag = None
    if args.imputation == "two-stage" and not bool(avail.all()) and args.diagnostics:
        diag = {}
        for name, rows in (("val", va), ("test", te)):
            redraw = [evaluate(model, xs, avail, labels, rows, C, 256, E)[0]["accuracy"] for _ in range(10)]
            model.fill_mean = True
            mean_fill = evaluate(model, xs, avail, labels, rows, C, 256, E)[0]
            model.fill_mean = False
            diag[name] = dict(redraw_accuracy=redraw, redraw_mean=float(np.mean(redraw)),
                              redraw_std=float(np.std(redraw, ddof=1)), pool_mean_fill=mean_fill)
        print("stage-1 draws at evaluation: test accuracy over 10 redraws %.2f +- %.2f%%, with the pool mean %.2f%%; "
              "val %.2f +- %.2f%% / %.2f%%" % (100 * diag["test"]["redraw_mean"], 100 * diag["test"]["redraw_std"],
                                               100 * diag["test"]["pool_mean_fill"]["accuracy"],
                                               100 * diag["val"]["redraw_mean"], 100 * diag["val"]["redraw_std"],
                                               100 * diag["val"]["pool_mean_fill"]["accuracy"]), flush=True)
    seconds = time.time() - t_start
    print("test: accuracy %.2f%%  macro-F1 %.4f  macro-AUROC %.4f  (%d samples, best epoch %d)  load entropy %.4f  "
          "%.1f s" % (100 * test["accuracy"], test["macro_f1"], test["macro_auroc"], len(te), best_epoch,
                      experts["load_entropy"], seconds), flush=True)
    if args.json:
        out = dict(implementation="pytorch %s (tests/reference/torch_train.py)" % torch.__version__,
                   dataset=os.path.basename(os.path.normpath(args.data)), missing=args.missing, seed=args.seed,
                   config_name=args.config_name or args.gate + ("" if args.imputation == "two-stage" else "+mean-imp"),
                   config=dict(gate=args.gate, imputation=args.imputation, writeback=args.writeback,
                               epochs=args.epochs, batch=args.batch,
                               lr=args.lr, d=args.d, heads=args.heads, experts=E, k=args.k, dropout=args.dropout,
                               draws=args.draws, threads=args.threads),
                   masks=os.path.abspath(masks) if args.masks else None, n_params=n_params,
                   n_train=len(tr), n_val=len(va), n_test=len(te), test=test, best_epoch=best_epoch,
                   val_accuracy=best_acc, experts=experts, draws_diagnostics=diag, history=history,
                   train_seconds=train_seconds,
                   seconds=seconds)
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
