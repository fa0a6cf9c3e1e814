"""Experiment 2 — removal of shards (paper Fig. 1a/1b).

From the N IID shard models of experiment 1 (read from the shard store when their settings
match, else trained here), remove k shards (several random removal orders, nested in k) and
measure the accuracy of:
  * TAFT by subtraction: w0 + (Σ_all nᵢΔᵢ − Σ_removed nᵢΔᵢ) / Σ_remaining nᵢ — checked against a
    fresh ``tangent.compose`` of the remaining Δs;
  * SISA: the example-weighted average of the softmax probabilities of the remaining NLFT-1
    shard models (one forward per remaining model);
  * ridge head: solved from the remaining shards' sufficient statistics (total − removed);
  * exact head (default FeatureSpec): the removed shards' integer statistics subtracted
    from the total, solved again (λ by GCV); checked bit for bit against the remaining shards'
    statistics computed from scratch.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from simulations.experiments import common as C
from simulations.experiments import report as R

NAME = "removal"
METHODS = {"taft_subtraction": "TAFT by subtraction", "sisa": "SISA (NLFT-1 softmax ensemble)",
           "ridge": "ridge head (exact)", "exact_head": "exact head (subtract)"}


def run(ctx: C.Context, out_root: Path) -> dict:
    from tangent import compose
    from tqdm.auto import tqdm

    s = ctx.settings
    out_root = Path(out_root)
    num = s.removal_shards
    parts, taft, sizes, _, taft_loaded = C.shard_models(ctx, out_root, "taft", num)
    _, nlft, nlft_sizes, _, nlft_loaded = C.shard_models(ctx, out_root, "nlft", num)
    assert sizes == nlft_sizes
    n = np.asarray(sizes, dtype=np.float64)

    # per-shard quantities every removal reuses
    nlft_probs = torch.stack([C.logits_of(ctx, "nlft", d, ctx.xt).double().softmax(-1)
                              for d in tqdm(nlft, desc="nlft shard predictions", disable=not ctx.progress)])
    phi, phit = ctx.cached_features("train", ctx.x), ctx.cached_features("test", ctx.xt)
    lam, _ = C.select_lambda(ctx, phi, ctx.y)
    stats = [C.ridge_stats(phi[torch.as_tensor(p)], ctx.y[torch.as_tensor(p)]) for p in parts]
    total_stats = C.sum_stats(stats)
    keys = list(taft[0])
    weighted_sum = {k: sum(float(w) * d[k].double() for w, d in zip(n, taft)) for k in keys}

    # exact head: integer statistics per shard are recomputed when needed (50 × 49 MiB would
    # not fit beside the other lane); the total is the sum of the shards' in shard order
    espec = C.exact_spec()
    ephi = C.exact_features(ctx, espec, C.exact_pieces(ctx, "train", ctx.x))
    ephit = C.exact_features(ctx, espec, C.exact_pieces(ctx, "test", ctx.xt))

    def shard_stats(i):
        return C.exact_stats(ephi[parts[i]], ctx.y[torch.as_tensor(parts[i])], espec)

    exact_total = None
    for i in range(num):
        exact_total = shard_stats(i) if exact_total is None else exact_total + shard_stats(i)
    exact_acc, exact_identical, exact_times = {}, [], []

    rows, max_sub_diff, max_ridge_diff = [], 0.0, 0.0
    rng = np.random.default_rng(s.seed + 3)
    orders = [rng.permutation(num) for _ in range(s.removal_orders)]
    for order_id, order in enumerate(orders):
        for k in tqdm(s.removal_ks, desc=f"removal order {order_id}", disable=not ctx.progress):
            removed, kept = order[:k], np.sort(order[k:])
            remaining = float(n[kept].sum())
            # TAFT: subtract the removed shards' weighted Δ from the running sum
            sub = {key: weighted_sum[key] - sum(float(n[i]) * taft[i][key].double() for i in removed)
                   for key in keys}
            subtracted = {key: (v / remaining).float() for key, v in sub.items()}
            fresh = compose([taft[i] for i in kept], n[kept].tolist())
            max_sub_diff = max(max_sub_diff, C.max_abs_diff(subtracted, fresh))
            taft_acc = C.accuracy(C.logits_of(ctx, "taft", subtracted, ctx.xt), ctx.yt)
            # SISA: weighted softmax average of the remaining NLFT shard models
            w = torch.as_tensor(n[kept] / remaining)
            sisa_acc = C.accuracy((nlft_probs[kept] * w[:, None, None]).sum(0), ctx.yt)
            # ridge: total statistics minus the removed shards'
            ridge = total_stats - C.sum_stats([stats[i] for i in removed]) if k else total_stats
            fresh_stats = C.sum_stats([stats[i] for i in kept])
            max_ridge_diff = max(max_ridge_diff, ridge.rel_diff(fresh_stats))
            ridge_acc = C.ridge_accuracy(C.ridge_solve(ridge, lam), phit, ctx.yt)
            # exact head: subtract the removed shards' statistics, solve; compare with fresh
            start = time.perf_counter()
            subtracted_stats = exact_total
            for i in removed:
                subtracted_stats = subtracted_stats - shard_stats(i)
            key_removed = frozenset(int(i) for i in removed)
            if key_removed not in exact_acc:
                exact_acc[key_removed] = C.exact_accuracy(C.exact_solve(subtracted_stats), ephit, ctx.yt)
                exact_times.append(time.perf_counter() - start)
            kept_rows = np.concatenate([parts[i] for i in kept])
            exact_identical.append(bool(subtracted_stats == C.exact_stats(
                ephi[kept_rows], ctx.y[torch.as_tensor(kept_rows)], espec)))
            for method, value in (("taft_subtraction", taft_acc), ("sisa", sisa_acc), ("ridge", ridge_acc),
                                  ("exact_head", exact_acc[key_removed])):
                rows.append({"order": order_id, "removed_shards": k, "remaining_shards": num - k,
                             "remaining_images": int(remaining), "method": method,
                             "accuracy": round(float(value), 6)})

    out_dir = out_root / NAME
    R.write_csv(out_dir / "results.csv", rows)
    plot(rows, out_dir / "removal.png", num)
    return {"plot": "removal.png", "checks": {
        "max_abs_diff_subtraction_vs_fresh_compose": max_sub_diff,
        "max_rel_diff_ridge_subtraction_vs_fresh_stats": max_ridge_diff,
        "ridge_lambda": lam, "shards": num,
        "shards_from_store": bool(taft_loaded and nlft_loaded),
        "exact_bit_identical": all(exact_identical), "exact_removals_checked": len(exact_identical),
        "exact_p": exact_total.num_features,
        "exact_subtract_solve_s_median": round(float(np.median(exact_times)), 1)}}


def summary(rows):
    """{method: {k: (mean, std, count)}} over removal orders."""
    out = {}
    for method in METHODS:
        out[method] = {}
        for k in sorted({r["removed_shards"] for r in rows}):
            values = [r["accuracy"] for r in rows if r["method"] == method and r["removed_shards"] == k]
            out[method][k] = (float(np.mean(values)), float(np.std(values)), len(values))
    return out


def plot(rows, path: Path, num: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summary(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, text in METHODS.items():
        ks = sorted(stats[method])
        mean = np.array([stats[method][k][0] for k in ks])
        std = np.array([stats[method][k][1] for k in ks])
        ax.plot(ks, mean, marker="o", label=text)
        ax.fill_between(ks, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel(f"shards removed (of {num})")
    ax.set_ylabel("test accuracy (mean ± std over removal orders)")
    ax.set_title("Removing shards")
    ax.legend(fontsize=8)
    R.save_figure(fig, path)


def replot(out_dir: Path, meta: dict) -> None:
    """Redraw the plot from the CSV (``--report-only``)."""
    plot(R.read_csv(out_dir / "results.csv"), out_dir / meta["plot"], meta["checks"]["shards"])


def render(out_dir: Path, meta: dict, results: Path) -> str:
    rows = R.read_csv(out_dir / "results.csv")
    s, checks = meta["settings"], meta["checks"]
    stats = summary(rows)
    ks = sorted(stats["taft_subtraction"])
    body = []
    for k in ks:
        images = next(r["remaining_images"] for r in rows if r["removed_shards"] == k)
        body.append([k, images] + [f"{R.acc(stats[m][k][0])} ± {R.acc(stats[m][k][1])}" for m in METHODS])
    averages = {m: float(np.mean([stats[m][k][0] for k in ks])) for m in METHODS}
    body.append(["**average over k**", ""] + [f"**{R.acc(averages[m])}**" for m in METHODS])
    orders = stats["taft_subtraction"][ks[0]][2]
    return f"""## 2. Removal (paper Fig. 1a/1b)

{R.provenance(meta, out_dir, results)}

The N = {checks['shards']} IID shard models of experiment 1 (same settings: {s['train']} training
images, {s['epochs']} epochs; {'read from the shard store' if checks['shards_from_store'] else 'trained in this run'}).
k shards are removed in {orders} random orders (nested in k); accuracy on the same {s['test']} test
images (mean ± std over the orders).

{R.table(["removed k", "remaining images", *METHODS.values()], body)}

- TAFT by subtraction: (Σ_all nᵢΔᵢ − Σ_removed nᵢΔᵢ) / Σ_remaining nᵢ, in float64; it equals a fresh
  `tangent.compose` of the remaining Δs to max |Δ difference| =
  {checks['max_abs_diff_subtraction_vs_fresh_compose']:.1e} (the server's ledger makes this
  bit-exact with integer accumulators). One model is evaluated after a removal.
- SISA: example-weighted average of the **softmax probabilities** of the remaining NLFT-1 shard
  models — it has to run all {checks['shards']} − k models at inference.
- Ridge head (λ = {checks['ridge_lambda']:g}): total statistics minus the removed shards' equal the
  remaining shards' statistics to a relative {checks['max_rel_diff_ridge_subtraction_vs_fresh_stats']:.1e}.
{_exact_text(checks)}
- Average over k: TAFT {R.acc(averages['taft_subtraction'])}, SISA {R.acc(averages['sisa'])}, ridge
  {R.acc(averages['ridge'])} (TAFT − SISA {R.signed(averages['taft_subtraction'] - averages['sisa'])} pts,
  TAFT − ridge {R.signed(averages['taft_subtraction'] - averages['ridge'])} pts{_exact_average(averages)}).

![removal]({R.rel(out_dir / meta['plot'], results)})
"""


def _exact_text(checks) -> str:
    if "exact_bit_identical" not in checks:
        return ""
    return (f"- Exact head (default FeatureSpec, p = {checks['exact_p']:,}, λ by GCV): the total integer\n"
            f"  statistics minus the removed shards' equal the remaining shards' statistics computed from\n"
            f"  scratch **bit for bit: {checks['exact_bit_identical']}** ({checks['exact_removals_checked']} removals\n"
            f"  checked); subtract + solve takes {checks['exact_subtract_solve_s_median']:.0f} s (median; the solve dominates).")


def _exact_average(averages) -> str:
    if "exact_head" not in averages or averages["exact_head"] != averages["exact_head"]:
        return ""
    return (f"; exact head {R.acc(averages['exact_head'])}, exact head − TAFT "
            f"{R.signed(averages['exact_head'] - averages['taft_subtraction'])} pts")
