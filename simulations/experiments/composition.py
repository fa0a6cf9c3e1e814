"""Experiment 1 — composition (paper Table 2), plus non-IID shards and an exact ridge head.

For each partition of the training subset (IID into N shards; Dirichlet label skew):
  * TAFT composed: w0 + Σ nᵢΔᵢ / Σ nᵢ over the shards' TAFT-1 models (``tangent.compose``);
  * TAFT ensemble: the example-weighted average of the N shard models' logits (equal to the
    composed model by linearity: the measured logit difference is reported);
  * NLFT soup: the same weighted average of the NLFT-1 shard models' weights (Model Soup);
  * ridge head: ridge regression on the frozen pooled feature φ (+ bias), federated through
    the per-shard sufficient statistics Σ XᵀX, Σ XᵀY (identical to the central solution).
References: TAFT-1, NLFT-1 and the ridge head trained on all data of the subset.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from simulations.experiments import common as C
from simulations.experiments import report as R

NAME = "composition"
METHODS = {"taft_composed": "TAFT composed", "taft_ensemble": "TAFT ensemble",
           "nlft_soup": "NLFT soup", "ridge": "ridge head (federated)"}


def partitions(settings: C.Settings):
    out = [("iid", n, None) for n in settings.shards]
    out += [("dirichlet", settings.dirichlet_shards, a) for a in settings.dirichlet_alphas]
    return out


def label(scheme: str, num: int, alpha) -> str:
    return f"IID, N={num}" if scheme == "iid" else f"Dirichlet α={alpha:g}, N={num}"


def run(ctx: C.Context, out_root: Path) -> dict:
    """Marks itself as the shard store's producer while it runs (see common.shard_models)."""
    import os

    marker = Path(out_root) / NAME / C.RUNNING
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    try:
        return _run(ctx, Path(out_root))
    finally:
        marker.unlink(missing_ok=True)


def _run(ctx: C.Context, out_root: Path) -> dict:
    from tangent import compose

    s = ctx.settings
    rows, checks = [], {}

    phi = ctx.cached_features("train", ctx.x)
    phit = ctx.cached_features("test", ctx.xt)
    lam, val_scores = C.select_lambda(ctx, phi, ctx.y)
    central = C.ridge_stats(phi, ctx.y)
    checks["ridge_lambda"] = lam
    checks["ridge_val_accuracy"] = {f"{k:g}": v for k, v in val_scores.items()}
    rows.append(_row("all data", "all", None, 1, "ridge",
                     C.ridge_accuracy(C.ridge_solve(central, lam), phit, ctx.yt), [len(ctx.y)]))

    parts_of = {}
    for scheme, num, alpha in partitions(s):
        parts_of[(scheme, num, alpha)] = (C.iid_parts(ctx, num) if scheme == "iid"
                                          else C.dirichlet_parts(ctx, num, alpha))

    # TAFT first (so the IID shard sets are on disk early for the other experiments)
    max_logit_diff, max_ridge_diff = 0.0, 0.0
    for key, parts in parts_of.items():
        scheme, num, alpha = key
        name = label(*key)
        if scheme == "iid":
            _, deltas, sizes, wall, loaded = C.shard_models(ctx, out_root, "taft", num, wait=False)
        else:
            deltas, sizes, _, wall = C.train_shards(ctx, "taft", parts, ctx.x, ctx.y,
                                                    ctx.train_config("taft"), desc=f"taft {name}")
            loaded = False
        composed = compose(deltas, C.weights_of(sizes))
        composed_logits = C.logits_of(ctx, "taft", composed, ctx.xt)
        ensemble = C.ensemble_logits(ctx, "taft", deltas, C.weights_of(sizes), ctx.xt,
                                     desc=f"taft ensemble {name}")
        diff = float((ensemble - composed_logits.double()).abs().max() / ensemble.abs().max())
        max_logit_diff = max(max_logit_diff, diff)
        rows.append(_row(name, scheme, alpha, num, "taft_composed",
                         C.accuracy(composed_logits, ctx.yt), sizes, wall, loaded))
        rows.append(_row(name, scheme, alpha, num, "taft_ensemble", C.accuracy(ensemble, ctx.yt),
                         sizes, wall, loaded, rel_logit_diff_vs_composed=diff))
        # ridge head: per-shard sufficient statistics, summed
        shard_stats = [C.ridge_stats(phi[torch.as_tensor(p)], ctx.y[torch.as_tensor(p)]) for p in parts]
        total = C.sum_stats(shard_stats)
        ridge_diff = total.rel_diff(central)
        max_ridge_diff = max(max_ridge_diff, ridge_diff)
        rows.append(_row(name, scheme, alpha, num, "ridge",
                         C.ridge_accuracy(C.ridge_solve(total, lam), phit, ctx.yt), sizes,
                         stats_rel_diff_vs_central=ridge_diff))
        del deltas, composed, ensemble
    checks["max_rel_logit_diff_ensemble_vs_composed"] = max_logit_diff
    checks["max_rel_diff_ridge_stats_vs_central"] = max_ridge_diff

    # NLFT: the shard set experiment 2 needs first (another lane may be waiting for it)
    for key in sorted(parts_of, key=lambda k: k != ("iid", s.removal_shards, None)):
        parts = parts_of[key]
        scheme, num, alpha = key
        name = label(*key)
        if scheme == "iid":
            _, deltas, sizes, wall, loaded = C.shard_models(
                ctx, out_root, "nlft", num, save=num == s.removal_shards, wait=False)
        else:
            deltas, sizes, _, wall = C.train_shards(ctx, "nlft", parts, ctx.x, ctx.y,
                                                    ctx.train_config("nlft"), desc=f"nlft {name}")
            loaded = False
        soup = compose(deltas, C.weights_of(sizes))
        rows.append(_row(name, scheme, alpha, num, "nlft_soup",
                         C.accuracy(C.logits_of(ctx, "nlft", soup, ctx.xt), ctx.yt), sizes, wall, loaded))
        del deltas, soup

    for kind in ("taft", "nlft"):
        start = time.perf_counter()
        delta, _ = C.train_one(ctx, kind, ctx.x, ctx.y, ctx.train_config(kind))
        wall = time.perf_counter() - start
        rows.append(_row("all data", "all", None, 1, kind,
                         C.accuracy(C.logits_of(ctx, kind, delta, ctx.xt), ctx.yt), [len(ctx.y)], wall))

    out_dir = out_root / NAME
    R.write_csv(out_dir / "results.csv", rows)
    plot(rows, out_dir / "composition.png")
    return {"plot": "composition.png", "checks": checks}


def _row(partition, scheme, alpha, shards, method, accuracy, sizes, train_s=None, loaded=False, **extra):
    return {"partition": partition, "scheme": scheme, "alpha": alpha, "shards": shards,
            "method": method, "accuracy": round(float(accuracy), 6),
            "min_shard": int(min(sizes)), "max_shard": int(max(sizes)),
            "train_s": None if train_s is None else round(float(train_s), 1),
            "shards_from_store": bool(loaded), **extra}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["partition"] for r in rows if r["scheme"] != "all"))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(METHODS)
    for j, (method, text) in enumerate(METHODS.items()):
        values = [next((r["accuracy"] for r in rows if r["partition"] == n and r["method"] == method), np.nan)
                  for n in names]
        ax.bar(np.arange(len(names)) + (j - (len(METHODS) - 1) / 2) * width, values, width, label=text)
    for kind, style in (("taft", "-"), ("nlft", "--")):
        ref = next((r["accuracy"] for r in rows if r["scheme"] == "all" and r["method"] == kind), None)
        if ref is not None:
            ax.axhline(ref, color="k", linestyle=style, linewidth=1,
                       label=f"{'TAFT' if kind == 'taft' else 'NLFT'} on all data")
    ax.set_xticks(np.arange(len(names)), names, fontsize=8)
    ax.set_ylabel("test accuracy")
    low = min(r["accuracy"] for r in rows)
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_title("Composition of shard models (Fashion-MNIST, ViT-S/14)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    R.save_figure(fig, path)


def render(out_dir: Path, meta: dict, results: Path) -> str:
    rows = R.read_csv(out_dir / "results.csv")
    s = meta["settings"]
    checks = meta["checks"]
    by = {(r["partition"], r["method"]): r for r in rows}
    names = list(dict.fromkeys(r["partition"] for r in rows if r["scheme"] != "all"))
    body = []
    for n in names:
        taft, ridge = by[(n, "taft_composed")]["accuracy"], by[(n, "ridge")]["accuracy"]
        r0 = by[(n, "taft_composed")]
        body.append([n, f"{r0['min_shard']}–{r0['max_shard']}", R.acc(taft),
                     R.acc(by[(n, "taft_ensemble")]["accuracy"]),
                     R.acc(by.get((n, "nlft_soup"), {}).get("accuracy")), R.acc(ridge),
                     R.signed(taft - ridge)])
    all_taft = by[("all data", "taft")]["accuracy"]
    all_ridge = by[("all data", "ridge")]["accuracy"]
    body.append([f"**all {s['train']} images (one model)**", s["train"], R.acc(all_taft), "—",
                 R.acc(by[("all data", "nlft")]["accuracy"]) + " (NLFT)", R.acc(all_ridge),
                 R.signed(all_taft - all_ridge)])
    iid = [n for n in names if n.startswith("IID")]
    beats = [by[(n, "taft_composed")]["accuracy"] - by[(n, "ridge")]["accuracy"] for n in names]
    stored = sorted({r["partition"] for r in rows if r.get("shards_from_store")})
    store_note = (f" The shard models of {', '.join(stored)} were read from the shard store of an "
                  "earlier run with identical settings (their training time is not in this run)."
                  if stored else "")
    lam_scores = ", ".join(f"{k}: {v:.3f}" for k, v in checks["ridge_val_accuracy"].items())
    text = f"""## 1. Composition (paper Table 2)

{R.provenance(meta, out_dir, results)}

Settings (reduced): training subset {s['train']} IID images of the 60k (seed {s['seed']}), test on a
fixed {s['test']}-image subset of the 10k test split; TAFT-1 and NLFT-1 (last block, final norm and
head) from the same w0 (`reinit=false`), {s['epochs']} epochs, batch {s['batch_size']}, Adam with
×0.1 steps at 50 % / 83 %; TAFT lr {s['taft_lr']:g} with RSL (κ = 15), NLFT lr {s['nlft_lr']:g} with
cross-entropy. Every shard model is trained from w0 on its shard only; compositions are weighted by
examples. Non-IID: `partition_dirichlet` on the same subset, N = {s['dirichlet_shards']}.{store_note}
{C.TUNING}

{R.table(["partition", "images per shard", "TAFT composed", "TAFT ensemble", "NLFT soup", "ridge head", "TAFT − ridge (pts)"], body)}

- TAFT composed vs. TAFT ensemble (weighted logit average of the N models): max relative logit
  difference {checks['max_rel_logit_diff_ensemble_vs_composed']:.1e} — the composed model *is* the
  ensemble, at the cost of one model.
- Ridge head: φ = the pretrained backbone's pooled, final-normed CLS feature (384-d) plus a bias,
  one-hot targets, λ = {checks['ridge_lambda']:g} picked on a {100 * s['ridge_val_fraction']:.0f} %
  validation split of the training subset (validation accuracy per λ: {lam_scores}) and used
  for every partition. Summing the shards' Σ XᵀX, Σ XᵀY reproduces the central statistics to a
  relative {checks['max_rel_diff_ridge_stats_vs_central']:.1e} (float64 rounding), so the federated
  ridge head equals the central one for every partition, IID or not.
- TAFT composed minus the ridge head: {R.signed(min(beats))} to {R.signed(max(beats))} points over
  these partitions (IID: {', '.join(R.signed(by[(n, 'taft_composed')]['accuracy'] - by[(n, 'ridge')]['accuracy']) for n in iid)});
  TAFT trained on all data minus the ridge head: {R.signed(all_taft - all_ridge)} points.

![composition]({R.rel(out_dir / meta['plot'], results)})
"""
    return text
