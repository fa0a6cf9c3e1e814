"""Experiment 5 — differential privacy at the simulation's scale: 50 sites × 1,200 images.

The setting of ``python -m simulations.run --dp-epsilon E`` (all 60k training images split IID
over 50 sites, the 10k test images), with each model spending the whole per-site (ε, δ = 1e-5):

  * the DP exact head as a DP run releases it (``privacy.dp_head_accuracies``): federated (one
    release per site, summed), central (one release of all rows: the same noise once), and
    federated with *secure-aggregation noise* — every site adds 1/50 of the variance, so only the
    sum is (ε, δ)-DP: what SecAgg of the releases would buy, measured here because Flower's SecAgg+
    cannot carry the statistics (docs/dp_head.md "Not done");
  * federated DP-TAFT-1 with the DP run's recipe (the run config's ``epochs``, ``dp-batch-size``,
    ``dp-lr``, cross-entropy, clip ``dp-max-grad-norm``), composed weighted by examples; and
    central DP-SGD of TAFT-1 on all the rows with the same recipe.

Removing a site from the federated head's releases is checked bit for bit in every draw.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from simulations.experiments import common as C
from simulations.experiments import privacy as P
from simulations.experiments import report as R

NAME = "dp_scale"
DELTA = 1e-5
SETTINGS = ("federated", "central", "secure-aggregation noise")
LABELS = {("exact_head", "federated"): "DP exact head, federated (one release per site)",
          ("exact_head", "central"): "DP exact head, central (one release of all rows)",
          ("exact_head", "secure-aggregation noise"): "DP exact head, federated, each site 1/N of the noise (SecAgg)",
          ("taft", "federated"): "DP-TAFT-1, federated, composed",
          ("taft", "central"): "DP-TAFT-1, central (DP-SGD on all rows)"}


def site_parts(ctx: C.Context) -> tuple[np.ndarray, list[np.ndarray]]:
    """(the chosen training rows, the sites' positions into them): the first sites × rows of the
    seeded subset rule, split IID (all 60k at the default settings)."""
    from tangent.data.partition import partition_iid

    s = ctx.settings
    chosen = C.subset_indices(ctx.split_size("train"), s.dp_scale_sites * s.dp_scale_rows, s.seed)
    return chosen, partition_iid(len(chosen), s.dp_scale_sites, seed=s.seed)


def taft_recipe(ctx: C.Context):
    """The DP run's TrainConfig (the run config's epochs, DP batch and lr; DP-SGD's cross-entropy)."""
    from tangent.protocol.config import RUN_DEFAULTS

    s = ctx.settings
    return ctx.train_config("taft", epochs=s.dp_scale_epochs or int(RUN_DEFAULTS["epochs"]),
                            batch_size=int(RUN_DEFAULTS["dp-batch-size"]), lr=float(RUN_DEFAULTS["dp-lr"]),
                            loss="ce")


def run(ctx: C.Context, out_root: Path) -> dict:
    from tangent.exact_head.statistics import SufficientStats

    s = ctx.settings
    chosen, parts = site_parts(ctx)
    x, y = ctx.tokens("train", chosen)
    test_index = C.test_indices(ctx.split_size("test"), s.dp_scale_test, s.seed)
    xt, yt = ctx.tokens("test", test_index)
    spec = C.exact_spec()
    start = time.perf_counter()
    phi = C.exact_features(ctx, spec, C.exact_pieces(ctx, "dp-scale-train", x))
    phit = C.exact_features(ctx, spec, C.exact_pieces(ctx, "dp-scale-test", xt))
    labels = y.numpy()
    features_s = time.perf_counter() - start
    rows = []
    start = time.perf_counter()
    exact = SufficientStats.total([C.exact_stats(phi[p], labels[p], spec) for p in parts])
    rows.append(_row("exact_head", "federated", parts, None, [C.exact_accuracy(C.exact_solve(exact), phit, yt)],
                     time.perf_counter() - start, removal_exact=None))
    for epsilon in s.dp_epsilons:
        for setting in SETTINGS:
            start = time.perf_counter()
            where = [np.arange(len(labels))] if setting == "central" else parts
            share = 1.0 / len(parts) if setting == "secure-aggregation noise" else 1.0
            accs, removal = P.dp_head_accuracies(
                ctx, phi, labels, where, phit, yt, epsilon, DELTA, repeats=s.dp_scale_repeats,
                seed=(s.seed, int(round(epsilon * 10)), len(where), int(share < 1)), noise_share=share,
                check_removal=setting == "federated")
            rows.append(_row("exact_head", setting, where, epsilon, accs, time.perf_counter() - start,
                             removal_exact=removal))
    config = taft_recipe(ctx)
    for setting, where in (("federated", parts), ("central", [np.arange(len(labels))])):
        for epsilon in s.dp_epsilons:
            rows.append(_dp_taft_row(ctx, setting, where, x, y, xt, yt, config, epsilon))
    out_dir = Path(out_root) / NAME
    R.write_csv(out_dir / "results.csv", rows)
    plot(rows, out_dir / "dp_scale.png")
    return {"plot": "dp_scale.png",
            "checks": {"sites": len(parts), "rows_per_site": int(len(parts[0])), "test_images": len(yt),
                       "features_s": round(features_s, 1), "dp_head_dim": P.dp_head_transform(ctx).projection_dim,
                       "removal_exact": all(r["removal_exact"] for r in rows if r["removal_exact"] is not None)}}


def _dp_taft_row(ctx: C.Context, setting: str, parts, x, y, xt, yt, config, epsilon: float) -> dict:
    """DP-TAFT-1 trained on each part at (ε, δ) with the DP run's recipe, composed by examples."""
    from tangent import compose
    from tangent.protocol.config import RUN_DEFAULTS
    from tangent.training.privacy import PrivacyConfig

    s = ctx.settings
    sigma = s.dp_sigma or P.noise_multiplier(epsilon, len(parts[0]), config.batch_size, config.epochs,
                                             s.dp_accountant)
    privacy = PrivacyConfig(target_epsilon=epsilon, target_delta=DELTA,
                            max_grad_norm=float(RUN_DEFAULTS["dp-max-grad-norm"]),
                            accountant=s.dp_accountant, noise_multiplier=sigma)
    deltas, sizes, results, wall = C.train_shards(ctx, "taft", parts, x, y, config, privacy=privacy,
                                                  desc=f"DP-TAFT {setting} ε={epsilon:g}")
    composed = deltas[0] if len(deltas) == 1 else compose(deltas, C.weights_of(sizes))
    acc = C.accuracy(C.logits_of(ctx, "taft", composed, xt), yt)
    row = _row("taft", setting, parts, epsilon, [acc], wall, removal_exact=None)
    return row | {"epsilon_spent": max(r.epsilon for r in results), "delta": max(r.delta for r in results),
                  "noise_multiplier": sigma, "batch_size": config.batch_size, "lr": config.lr,
                  "epochs": config.epochs}


def _row(method: str, setting: str, parts, epsilon, accs, wall: float, *, removal_exact) -> dict:
    return {"method": method, "setting": setting, "models": len(parts), "images_per_model": int(len(parts[0])),
            "target_epsilon": epsilon, "epsilon_spent": epsilon, "delta": None if epsilon is None else DELTA,
            "noise_multiplier": None, "batch_size": None, "lr": None, "epochs": None,
            "accuracy": round(float(np.mean(accs)), 6), "accuracy_std": round(float(np.std(accs)), 6),
            "repeats": len(accs), "removal_exact": removal_exact, "wall_s": round(wall, 1)}


def _cell(row) -> str:
    if row is None:
        return "—"
    return P.cell(row) if row["repeats"] > 1 else R.acc(row["accuracy"])


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (method, setting), color in zip(LABELS, ("C3", "C4", "C5", "C0", "C1")):
        sel = [r for r in rows if r["method"] == method and r["setting"] == setting and r["target_epsilon"] is not None]
        if sel:
            ax.errorbar([r["target_epsilon"] for r in sel], [r["accuracy"] for r in sel],
                        yerr=[r["accuracy_std"] for r in sel], marker="o", color=color, capsize=3,
                        label=LABELS[(method, setting)])
    ref = [r for r in rows if r["method"] == "exact_head" and r["target_epsilon"] is None]
    if ref:
        ax.axhline(ref[0]["accuracy"], color="C3", linewidth=0.6, linestyle=":", label="exact head, no DP")
    P.finish_epsilon_plot(fig, ax, rows, path, xlabel="per-site ε (δ = 1e-5)",
                          title="DP at 50 sites × 1,200 (dotted: exact head without DP)")


def render(out_dir: Path, meta: dict, results: Path) -> str:
    rows = R.read_csv(out_dir / "results.csv")
    checks = meta["checks"]
    eps, by = P.by_epsilon(rows)
    body = []
    for (method, setting), label in LABELS.items():
        cells = [_cell(by.get((method, setting, e))) for e in eps]
        body.append([label, *cells])
    nodp = by.get(("exact_head", "federated", None))
    taft = [r for r in rows if r["method"] == "taft"]
    recipe = taft[0] if taft else None
    def diffs(first, second) -> str:
        """'ε = e: ±points' of row ``first`` minus row ``second`` ((method, setting)) at every ε."""
        return ", ".join(f"ε = {e:g}: {R.signed(by[(*first, e)]['accuracy'] - by[(*second, e)]['accuracy'])}"
                         for e in eps if (*first, e) in by and (*second, e) in by)

    head = ("exact_head", "federated")
    gaps, central_gaps = diffs(head, ("taft", "federated")), diffs(head, ("taft", "central"))
    secagg = diffs(("exact_head", "secure-aggregation noise"), head)
    head_wall = sum(r["wall_s"] for r in rows if r["method"] == "exact_head")
    taft_wall = {st: sum(r["wall_s"] for r in taft if r["setting"] == st) for st in ("federated", "central")}
    worst = max((r["epsilon_spent"] / r["target_epsilon"] for r in taft), default=float("nan"))
    recipe_text = (f"{recipe['epochs']} epochs, expected batch {recipe['batch_size']}, lr {recipe['lr']:g}, "
                   f"σ = {recipe['noise_multiplier']:.3g} at ε = {recipe['target_epsilon']:g}") if recipe else "—"
    calibration = ("" if not meta["settings"].get("dp_sigma") else
                   f" **Quick run: DP-TAFT's noise multiplier is fixed at σ = {meta['settings']['dp_sigma']:g}, not calibrated to ε.**")
    return f"""## 5. Differential privacy at 50 sites × 1,200

{R.provenance(meta, out_dir, results)}

Setting: {checks['sites']} IID sites × {checks['rows_per_site']} training images (the setting of
`python -m simulations.run --dp-epsilon E`), scored on {checks['test_images']} test images; each
model spends the whole per-site (ε, δ = 1e-5) (in a DP run the head and DP-TAFT share it: the
head takes 0.9 of the μ², docs/dp_head.md). DP exact head: the DP run's release (φ of the default
feature spec, public synthetic centre, seeded projection to {checks['dp_head_dim']} dimensions, each
model's rows re-centred on their own DP mean), the server's fixed solver constants, mean ± std
over {max((r['repeats'] for r in rows if r['method'] == 'exact_head' and r['target_epsilon']), default=0)} noise draws. DP-TAFT-1: the DP run's recipe ({recipe_text} at a site; Opacus, PRV accountant,
ε spent ≤ {worst:.4f} × the target), federated and central alike, one noise draw.{calibration}

{R.table(["model", *[f"ε = {e:g}" for e in eps]], body)}

- Without DP, the exact head of the same rows: {R.acc(nodp['accuracy']) if nodp else '—'} (the integer
  statistics, λ by GCV).
- DP exact head − DP-TAFT-1, federated (points): {gaps or '—'}. Federated DP exact head − central
  DP-TAFT-1 (points): {central_gaps or '—'}.
- Secure-aggregation noise − per-site noise (points): {secagg or '—'}. That is what distributed noise
  would buy; it needs every site's share to stay secret and gives up what exact removal rests on
  (the server would hold only the sum, never one site's release to subtract).
- Removing a site from the summed releases leaves exactly the sum of the others' releases, in every
  draw: {'yes' if checks['removal_exact'] else '**no**'}.
- Wall time: features {R.seconds(checks['features_s'])}, DP head (every release and solve) {R.seconds(head_wall)},
  DP-TAFT federated {R.seconds(taft_wall['federated'])}, central {R.seconds(taft_wall['central'])}.

![dp_scale]({R.rel(out_dir / meta['plot'], results)})
"""
