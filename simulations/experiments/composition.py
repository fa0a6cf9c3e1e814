"""Experiment 1 — composition (paper Table 2), plus non-IID shards and an exact ridge head.

For each partition of the training subset (IID into N shards; Dirichlet label skew):
  * TAFT composed: w0 + Σ nᵢΔᵢ / Σ nᵢ over the shards' TAFT-1 models (``tangent.compose``);
  * TAFT ensemble: the example-weighted average of the N shard models' logits (equal to the
    composed model by linearity: the measured logit difference is reported);
  * NLFT soup: the same weighted average of the NLFT-1 shard models' weights (Model Soup);
  * ridge head: ridge regression on the frozen pooled feature φ (+ bias), federated through
    the per-shard sufficient statistics Σ XᵀX, Σ XᵀY (identical to the central solution);
  * exact head (tangent.exact_head.statistics): ridge on the frozen multi-level features of the
    run's default FeatureSpec, λ by GCV on the sums; the shards' integer
    statistics, summed in a random order, are asserted equal to the central ones bit for bit;
  * TAFT + frozen pieces: TAFT-1 whose head also reads the frozen pieces final_mean, input_cls,
    input_mean beside its linearized CLS (TangentTail.read_frozen_rows: still linear in Δ),
    composed like TAFT;
  * hybrid: argmax of TAFT composed logits / κ + the exact head's scores (a late fusion of two
    exactly composable models; both regress onto the one-hot target, TAFT's scaled by κ).
References: TAFT-1, NLFT-1, TAFT + frozen pieces, the ridge and exact heads on all data.
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
           "nlft_soup": "NLFT soup", "ridge": "ridge head (federated)",
           "exact_head": "exact head (federated)", "taft_rich_composed": "TAFT + frozen pieces composed",
           "hybrid": "hybrid (TAFT composed + exact head)"}


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

    # exact head: integer statistics of the default FeatureSpec on the same rows
    espec = C.exact_spec()
    ephi = C.exact_features(ctx, espec, C.exact_pieces(ctx, "train", ctx.x))
    ephit = C.exact_features(ctx, espec, C.exact_pieces(ctx, "test", ctx.xt))
    start = time.perf_counter()
    exact_central = C.exact_stats(ephi, ctx.y, espec)
    central_stats_s = time.perf_counter() - start
    start = time.perf_counter()
    exact_head = C.exact_solve(exact_central)
    solve_s = time.perf_counter() - start
    exact_scores = {"all": exact_head.scores(ephit)}
    exact_acc_central = C.exact_accuracy(exact_head, ephit, ctx.yt)
    checks.update(exact_lambda=exact_head.lam, exact_lambda_over_n=exact_head.lam / exact_central.n,
                  exact_p=exact_central.num_features, exact_bytes_per_site=exact_central.nbytes,
                  exact_central_stats_s=round(central_stats_s, 1), exact_solve_s=round(solve_s, 1),
                  exact_feature_spec=espec.to_config())
    rows.append(_row("all data", "all", None, 1, "exact_head", exact_acc_central, [len(ctx.y)],
                     stats_equal_central=True, exact_lambda=exact_head.lam))
    kappa = ctx.train_config("taft").kappa

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
        # exact head: the shards' integer statistics summed in a random arrival order
        order = np.random.default_rng([s.seed, num, len(rows)]).permutation(len(parts))
        exact_total = None
        for i in order:
            part = np.asarray(parts[i])
            shard = C.exact_stats(ephi[part], ctx.y[torch.as_tensor(part)], espec)
            exact_total = shard if exact_total is None else exact_total + shard
        equal = exact_total == exact_central
        assert equal, f"{name}: summed exact-head statistics differ from the central ones"
        head = C.exact_solve(exact_total)
        exact_acc = C.exact_accuracy(head, ephit, ctx.yt)
        assert exact_acc == exact_acc_central, f"{name}: exact head accuracy differs from central"
        rows.append(_row(name, scheme, alpha, num, "exact_head", exact_acc, sizes,
                         stats_equal_central=bool(equal), exact_lambda=head.lam))
        # hybrid: TAFT composed logits / κ + exact head scores (both compose exactly)
        hybrid = composed_logits.double() / kappa + torch.from_numpy(head.scores(ephit))
        rows.append(_row(name, scheme, alpha, num, "hybrid", C.accuracy(hybrid, ctx.yt), sizes))
        del deltas, composed, ensemble, exact_total, head
    checks["max_rel_logit_diff_ensemble_vs_composed"] = max_logit_diff
    checks["max_rel_diff_ridge_stats_vs_central"] = max_ridge_diff

    # TAFT whose head also reads the frozen pieces (trained per shard here; not stored)
    rich_x, rich_xt = C.rich_inputs(ctx, "train", ctx.x), C.rich_inputs(ctx, "test", ctx.xt)
    for key, parts in parts_of.items():
        scheme, num, alpha = key
        name = label(*key)
        deltas, sizes, _, wall = C.train_shards(ctx, "taft_rich", parts, rich_x, ctx.y,
                                                ctx.train_config("taft_rich"), desc=f"taft+pieces {name}")
        composed = compose(deltas, C.weights_of(sizes))
        rows.append(_row(name, scheme, alpha, num, "taft_rich_composed",
                         C.accuracy(C.logits_of(ctx, "taft_rich", composed, rich_xt), ctx.yt), sizes, wall))
        del deltas, composed

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

    for kind in ("taft", "nlft", "taft_rich"):
        x, xt = (rich_x, rich_xt) if kind == "taft_rich" else (ctx.x, ctx.xt)
        start = time.perf_counter()
        delta, _ = C.train_one(ctx, kind, x, ctx.y, ctx.train_config(kind))
        wall = time.perf_counter() - start
        logits = C.logits_of(ctx, kind, delta, xt)
        rows.append(_row("all data", "all", None, 1, kind, C.accuracy(logits, ctx.yt), [len(ctx.y)], wall))
        if kind == "taft":
            hybrid = logits.double() / kappa + torch.from_numpy(exact_scores["all"])
            rows.append(_row("all data", "all", None, 1, "hybrid", C.accuracy(hybrid, ctx.yt), [len(ctx.y)]))

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

    def cell(n, method):
        return R.acc(by.get((n, method), {}).get("accuracy"))

    for n in names:
        taft, exact = by[(n, "taft_composed")]["accuracy"], by[(n, "exact_head")]["accuracy"]
        r0 = by[(n, "taft_composed")]
        body.append([n, f"{r0['min_shard']}–{r0['max_shard']}", R.acc(taft), cell(n, "taft_ensemble"),
                     cell(n, "nlft_soup"), cell(n, "ridge"), cell(n, "exact_head"),
                     cell(n, "taft_rich_composed"), cell(n, "hybrid"), R.signed(taft - exact)])
    all_taft = by[("all data", "taft")]["accuracy"]
    all_ridge = by[("all data", "ridge")]["accuracy"]
    all_exact = by[("all data", "exact_head")]["accuracy"]
    body.append([f"**all {s['train']} images (one model)**", s["train"], R.acc(all_taft), "—",
                 R.acc(by[("all data", "nlft")]["accuracy"]) + " (NLFT)", R.acc(all_ridge), R.acc(all_exact),
                 cell("all data", "taft_rich"), cell("all data", "hybrid"), R.signed(all_taft - all_exact)])
    iid = [n for n in names if n.startswith("IID")]
    beats = [by[(n, "taft_composed")]["accuracy"] - by[(n, "ridge")]["accuracy"] for n in names]
    stored = sorted({r["partition"] for r in rows if r.get("shards_from_store")})
    store_note = (f" The shard models of {', '.join(stored)} were read from the shard store of an "
                  "earlier run with identical settings (their training time is not in this run)."
                  if stored else "")
    exact_text = _render_exact(names, by, checks, s)
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

{R.table(["partition", "images per shard", "TAFT composed", "TAFT ensemble", "NLFT soup", "ridge head", "exact head", "TAFT + frozen pieces composed", "hybrid", "TAFT − exact head (pts)"], body)}

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
{exact_text}

![composition]({R.rel(out_dir / meta['plot'], results)})
"""
    return text


def _render_exact(names, by, checks, s) -> str:
    """The exact head, TAFT + frozen pieces and hybrid bullets, from the rows."""
    exact = by[("all data", "exact_head")]["accuracy"]
    equal = all(by[(n, "exact_head")]["stats_equal_central"] for n in names)
    same = all(by[(n, "exact_head")]["accuracy"] == exact for n in names)
    rich_gain = {n: by[(n, "taft_rich_composed")]["accuracy"] - by[(n, "taft_composed")]["accuracy"]
                 for n in names if (n, "taft_rich_composed") in by}
    rich_all = (by[("all data", "taft_rich")]["accuracy"] - by[("all data", "taft")]["accuracy"]
                if ("all data", "taft_rich") in by else None)
    hybrid_vs_exact = {n: by[(n, "hybrid")]["accuracy"] - by[(n, "exact_head")]["accuracy"]
                       for n in names if (n, "hybrid") in by}
    hybrid_vs_taft = {n: by[(n, "hybrid")]["accuracy"] - by[(n, "taft_composed")]["accuracy"]
                      for n in names if (n, "hybrid") in by}
    spec = checks["exact_feature_spec"]

    def span(values):
        return f"{R.signed(min(values.values()))} to {R.signed(max(values.values()))}"

    randoms = f" + {spec['random-features']} seeded random features" if spec['random-features'] else ""
    return f"""- Exact head (`tangent.exact_head.statistics`, the run's default feature spec): φ = the frozen
  pieces {spec['feature-pieces'].replace(',', ', ')}{randoms}, p = {checks['exact_p']:,}
  ({checks['exact_bytes_per_site'] / 2 ** 20:.1f} MiB of int64 statistics per shard), clip
  {spec['clip-norm']:g}, {spec['frac-bits']} fraction bits; λ = {checks['exact_lambda']:.3g}
  ({checks['exact_lambda_over_n']:.1e}·n) by GCV on the summed statistics (central statistics
  {checks['exact_central_stats_s']:.0f} s, solve {checks['exact_solve_s']:.0f} s). Per partition the shards'
  integer statistics, summed in a random arrival order, **equal the central statistics bit for
  bit: {equal}** (asserted in the run), so the accuracy is the central one at every N, IID or not
  ({'identical everywhere' if same else 'NOT identical'}: {R.acc(exact)}).
- Does TAFT gain from a richer head? TAFT-1 whose head also reads the frozen pieces final_mean,
  input_cls and input_mean beside its linearized CLS (zero head columns at w0, so still linear in
  Δ and composed by averaging): composed minus plain TAFT composed {span(rich_gain) if rich_gain else '—'} points over the
  partitions; trained on all data {R.signed(rich_all)} points.
- Hybrid (argmax of TAFT composed logits / κ + exact-head scores): minus the exact head alone
  {span(hybrid_vs_exact) if hybrid_vs_exact else '—'} points; minus TAFT composed {span(hybrid_vs_taft) if hybrid_vs_taft else '—'} points."""
