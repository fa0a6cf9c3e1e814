"""Experiment 4 — differential privacy (paper Table 3).

DP-SGD (Opacus through ``tangent.training.trainer.fit(..., privacy=PrivacyConfig)``: Poisson sampling,
per-sample clipping, Gaussian noise for the whole schedule, PRV accountant, cross-entropy) on
  * TAFT-1 (the tangent model of the last block, final norm and head),
  * NLFT-1 (the same parameters, non-linear: last block, final norm and head),
  * NLFT head only (a linear head on the frozen pooled feature φ),
at several ε, centrally (one model on the whole DP subset) and federated (the subset split IID
over DP clients, each trained privately on its own data, then composed / souped weighted by
examples). Non-DP references (ε = ∞) use each method's usual recipe.

Exact head: the DP head of a DP run (``tangent.exact_head.dp.site_centred_release``): the run's
public transform of the default feature spec's φ (synthetic-image centre, seeded projection to
``dp-head-dim``), each model's rows centred on their own DP mean, Gram, class sums and counts
released once at the whole (ε, δ) (the same δ rule); central = one release of the whole DP
subset, federated = one release per DP client, summed by the server and solved with its fixed
constants. Mean over ``EXACT_REPEATS`` noise draws (std reported). Without DP: the exact integer
statistics, λ by GCV.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from simulations.experiments import common as C
from simulations.experiments import report as R

NAME = "privacy"
KINDS = ("taft", "nlft", "head")
TABLE_KINDS = (*KINDS, "exact_head")
EXACT_REPEATS = 5
NUM_CLASSES = 10


@lru_cache(maxsize=None)
def noise_multiplier(epsilon: float, num: int, batch: int, epochs: int, accountant: str) -> float:
    """σ for (ε, δ = default_delta(n)) over ``epochs`` epochs at sample rate 1/⌈n/batch⌉ — exactly
    what Opacus' make_private_with_epsilon computes for fit's loader (n is public here);
    calibrated once per setting instead of once per client (the PRV search takes seconds)."""
    from opacus.accountants.utils import get_noise_multiplier

    from tangent.training.privacy import default_delta

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=default_delta(num),
                                      sample_rate=1.0 / math.ceil(num / batch), epochs=epochs,
                                      accountant=accountant))


def privacy_config(settings: C.Settings, epsilon: float, num: int, batch: int):
    from tangent.training.privacy import PrivacyConfig

    sigma = settings.dp_sigma or noise_multiplier(epsilon, num, batch, settings.dp_epochs,
                                                  settings.dp_accountant)
    return PrivacyConfig(target_epsilon=epsilon, max_grad_norm=settings.dp_max_grad_norm,
                         accountant=settings.dp_accountant, noise_multiplier=sigma)


def run(ctx: C.Context, out_root: Path) -> dict:
    from tangent import compose
    from tangent.data.partition import partition_iid

    s = ctx.settings
    x, y = ctx.tokens("train", ctx.dp_index)
    phi, phit = ctx.features(x), ctx.cached_features("test", ctx.xt)
    clients = partition_iid(len(y), s.dp_clients, seed=s.seed)
    rows = []
    for kind in KINDS:
        inputs, test_inputs = (phi, phit) if kind == "head" else (x, ctx.xt)
        for epsilon in (None, *s.dp_epsilons):
            for setting in ("central", "federated"):
                parts = [np.arange(len(y))] if setting == "central" else clients
                if epsilon is None:
                    config, privacy = ctx.train_config(kind, epochs=s.dp_epochs), None
                else:
                    batch = s.dp_batch if setting == "central" else s.dp_client_batch
                    config = ctx.train_config(kind, epochs=s.dp_epochs, batch_size=batch, lr=s.dp_lr,
                                              loss="ce")
                    if len({len(p) for p in parts}) != 1:  # σ is calibrated for one client size
                        raise ValueError("DP clients must hold equal shares (IID split)")
                    privacy = privacy_config(s, epsilon, len(parts[0]), batch)
                deltas, sizes, results, wall = C.train_shards(
                    ctx, kind, parts, inputs, y, config, privacy=privacy,
                    desc=f"{kind} {setting} ε={epsilon or '∞'}")
                composed = deltas[0] if len(deltas) == 1 else compose(deltas, C.weights_of(sizes))
                acc = C.accuracy(C.logits_of(ctx, kind, composed, test_inputs), ctx.yt)
                spent = [r.epsilon for r in results if r.epsilon is not None]
                rows.append({"method": kind, "setting": setting, "clients": len(parts),
                             "images_per_model": int(sizes[0]), "target_epsilon": epsilon,
                             "epsilon_spent": max(spent) if spent else None,
                             "delta": max(r.delta for r in results) if spent else None,
                             "noise_multiplier": results[0].noise_multiplier,
                             "batch_size": config.batch_size, "lr": config.lr, "loss": config.loss,
                             "epochs": config.epochs, "accuracy": round(float(acc), 6),
                             "wall_s": round(wall, 1)})
    rows += exact_head_rows(ctx, x, y, clients)
    out_dir = Path(out_root) / NAME
    R.write_csv(out_dir / "results.csv", rows)
    plot(rows, out_dir / "privacy.png")
    return {"plot": "privacy.png", "checks": {"dp_images": len(y)}}


def dp_head_accuracies(ctx: C.Context, phi: np.ndarray, labels: np.ndarray, parts, phi_test: np.ndarray,
                       labels_test, epsilon: float, delta: float, *, repeats: int, seed,
                       noise_share: float = 1.0, check_removal: bool = False) -> tuple[list[float], bool | None]:
    """Test accuracies of the Flower path's DP head, one per noise draw: every part (a site, or
    all rows for the central model) releases its rows through the run's public transform
    (tangent.exact_head.dp.site_centred_release, the whole (ε, δ) to the head); the server sums the
    releases and solves with its fixed constants (dp.solve_release). ``noise_share`` < 1 scales
    every release's σ by √share: N sites each adding 1/N of the variance sum to one release's
    noise — what secure aggregation of the releases would buy (no release alone is then DP).
    ``check_removal``: also whether subtracting one part's release from the sum leaves exactly the
    sum of the others' (every draw; None when not checked)."""
    import dataclasses

    from tangent.exact_head import dp
    from tangent.exact_head.statistics import SufficientStats

    transform = dp_head_transform(ctx)
    rows = [transform.rows(phi[p]) for p in parts]
    allocation = dp.Allocation.from_weights(epsilon, delta, dp.RELEASE_WEIGHTS)
    allocation = dataclasses.replace(allocation, sigma=allocation.sigma * math.sqrt(noise_share))
    accs, removal = [], []
    for rep in range(repeats):
        rng = np.random.default_rng([*seed, rep])
        releases = [dp.site_centred_release(u, labels[p], NUM_CLASSES, C.exact_spec().frac_bits, allocation, rng)
                    for u, p in zip(rows, parts)]
        total = SufficientStats.total(releases)
        if check_removal and len(releases) > 1:
            gone = rep % len(releases)
            removal.append(total - releases[gone] == SufficientStats.total(releases[:gone] + releases[gone + 1:]))
        head = dp.solve_release(total, transform, site_centred=True)
        accs.append(float((head.predict(phi_test) == np.asarray(labels_test)).mean()))
    return accs, (all(removal) if removal else None)


def dp_head_transform(ctx: C.Context):
    """The run's public transform: the synthetic-image centre (tangent.exact_head.public_centre) and
    the run config's seeded projection (``dp-head-dim``, ``dp-head-seed``)."""
    if getattr(ctx, "_dp_head_transform", None) is None:
        from tangent.exact_head import dp
        from tangent.exact_head.public_centre import public_centre
        from tangent.protocol.config import RUN_DEFAULTS

        centre = public_centre(C.exact_extractor(ctx, C.exact_spec()))
        ctx._dp_head_transform = dp.RowTransform(centre, int(RUN_DEFAULTS["dp-head-dim"]),
                                                 int(RUN_DEFAULTS["dp-head-seed"]))
    return ctx._dp_head_transform


def exact_head_rows(ctx: C.Context, x, y, clients) -> list[dict]:
    """The DP exact head at each ε, central and federated (the Flower path's release), and the
    exact head without DP."""
    import time

    from tangent.exact_head.statistics import SufficientStats
    from tangent.training.privacy import default_delta

    s = ctx.settings
    spec = C.exact_spec()
    phi = C.exact_features(ctx, spec, C.exact_pieces(ctx, "dp-train", x))
    phit = C.exact_features(ctx, spec, C.exact_pieces(ctx, "test", ctx.xt))
    labels = y.numpy()
    transform = dp_head_transform(ctx)
    rows = []
    for setting in ("central", "federated"):
        parts = [np.arange(len(y))] if setting == "central" else clients
        for epsilon in (None, *s.dp_epsilons):
            start = time.perf_counter()
            if epsilon is None:
                site_stats = [C.exact_stats(phi[p], labels[p], spec) for p in parts]
                accs, delta = [C.exact_accuracy(C.exact_solve(SufficientStats.total(site_stats)), phit, ctx.yt)], None
            else:
                delta = max(default_delta(len(p)) for p in parts)
                accs, _ = dp_head_accuracies(ctx, phi, labels, parts, phit, ctx.yt, epsilon, delta,
                                          repeats=EXACT_REPEATS, seed=(s.seed, int(round(epsilon * 10)), len(parts)))
            rows.append({"method": "exact_head", "setting": setting, "clients": len(parts),
                         "images_per_model": int(len(parts[0])), "target_epsilon": epsilon,
                         # one Gaussian release whose blocks compose to (ε, δ) exactly
                         "epsilon_spent": epsilon, "delta": delta,
                         "noise_multiplier": None, "batch_size": None, "lr": None,
                         "loss": "ridge (GCV)" if epsilon is None else "ridge (noisy sums)",
                         "epochs": None, "accuracy": round(float(np.mean(accs)), 6),
                         "accuracy_std": round(float(np.std(accs)), 6), "repeats": len(accs),
                         "wall_s": round(time.perf_counter() - start, 1),
                         "feature_dim": spec.dim() if epsilon is None else transform.projection_dim})
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = dict(zip(TABLE_KINDS, ("C0", "C1", "C2", "C3")))
    for kind in TABLE_KINDS:
        for setting, style in (("central", "-"), ("federated", "--")):
            sel = [r for r in rows if r["method"] == kind and r["setting"] == setting
                   and r["target_epsilon"] is not None]
            if not sel:
                continue
            line, = ax.plot([r["target_epsilon"] for r in sel], [r["accuracy"] for r in sel],
                            style, marker="o", color=colors[kind],
                            label=f"{C.KIND_LABELS[kind]}, {setting}")
            ref = [r for r in rows if r["method"] == kind and r["setting"] == setting
                   and r["target_epsilon"] is None]
            if ref and setting == "central":
                ax.axhline(ref[0]["accuracy"], color=colors[kind], linewidth=0.6, linestyle=":")
    finish_epsilon_plot(fig, ax, rows, path, xlabel="ε (δ = min(1e-5, 1/(10 n)) per model)",
                        title="DP fine-tuning (dotted: central, no DP)")


def by_epsilon(rows) -> tuple[list, dict]:
    """(the ε values of the rows, sorted; {(method, setting, ε or None): row})."""
    eps = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    return eps, {(r["method"], r["setting"], r["target_epsilon"]): r for r in rows}


def finish_epsilon_plot(fig, ax, rows, path: Path, *, xlabel: str, title: str) -> None:
    """Accuracy against ε on a log axis ticked at the rows' ε values; labels, legend, saved."""
    ax.set_xscale("log")
    eps = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    R.save_figure(fig, path)


def render(out_dir: Path, meta: dict, results: Path) -> str:
    rows = R.read_csv(out_dir / "results.csv")
    s = meta["settings"]
    eps, by = by_epsilon(rows)
    body = []
    for kind in TABLE_KINDS:
        for setting in ("central", "federated"):
            if (kind, setting, None) not in by:
                continue
            cells = [cell(by.get((kind, setting, e))) for e in eps]
            body.append([C.KIND_LABELS[kind], setting, *cells, R.acc(by[(kind, setting, None)]["accuracy"])])
    spent = [r for r in rows if r["epsilon_spent"] is not None and r["method"] in KINDS]
    worst = max(r["epsilon_spent"] / r["target_epsilon"] for r in spent) if spent else float("nan")
    central = next((r for r in spent if r["setting"] == "central"), None)
    client = next((r for r in spent if r["setting"] == "federated"), None)
    gaps = []
    for e in eps:
        for setting in ("central", "federated"):
            t, n = by.get(("taft", setting, e)), by.get(("nlft", setting, e))
            h = by.get(("head", setting, e))
            if t and n and h:
                gaps.append((e, setting, t["accuracy"] - max(n["accuracy"], h["accuracy"])))
    gap_text = ", ".join(f"ε={e:g} {st}: {R.signed(g)}" for e, st, g in gaps)
    exact_gaps = [(e, st, by[("exact_head", st, e)]["accuracy"] - by[("taft", st, e)]["accuracy"])
                  for e in eps for st in ("central", "federated")
                  if ("exact_head", st, e) in by and ("taft", st, e) in by]
    exact_text = ""
    if exact_gaps:
        ex = next(r for r in rows if r["method"] == "exact_head" and r["target_epsilon"] is not None)
        exact_text = (f"\n- DP exact head (the DP run's release: φ of the default feature spec centred on the "
                      f"public synthetic centre, projected to {ex['feature_dim']} dimensions, each model's rows "
                      f"re-centred on their own DP mean; one Gaussian release per model at the same (ε, δ), "
                      f"the server's fixed solver constants), mean ± std over "
                      f"{next(r['repeats'] for r in rows if r['method'] == 'exact_head' and r['target_epsilon'])} noise draws) "
                      f"minus DP TAFT-1 (points): " + ", ".join(f"ε={e:g} {st}: {R.signed(g)}" for e, st, g in exact_gaps)
                      + ". Federated, the exact head is "
                      + ("ahead of or level with DP TAFT at every ε" if all(g >= 0 for e, st, g in exact_gaps if st == "federated")
                         else "behind DP TAFT at ε = " + ", ".join(f"{e:g}" for e, st, g in exact_gaps if st == "federated" and g < 0))
                      + ".")
    calibration = ("The noise multiplier is calibrated once per (ε, n, batch, epochs) with Opacus' "
                   "`get_noise_multiplier` (what `make_private_with_epsilon` does)." if not s.get("dp_sigma") else
                   f"**Quick run: the noise multiplier is fixed at σ = {s['dp_sigma']:g}, not calibrated to ε.**")
    wall = {k: sum(r["wall_s"] for r in rows if r["method"] == k) for k in KINDS}
    return f"""## 4. Differential privacy (paper Table 3)

{R.provenance(meta, out_dir, results)}

Settings (reduced): {meta['checks']['dp_images']} training images (the IID subset rule of
`simulations/dp_accuracy.py`), test on the same {s['test']} images as above, {s['dp_epochs']} epochs.
DP-SGD through `tangent.training.trainer.fit(..., privacy=PrivacyConfig(...))` (Opacus: Poisson sampling,
per-sample clipping to {s['dp_max_grad_norm']:g}, {s['dp_accountant'].upper()} accountant, cross-entropy, Adam): central
expected batch {s['dp_batch']}; federated = {s['dp_clients']} IID DP clients of
{client['images_per_model'] if client else '—'} images each, expected batch {s['dp_client_batch']}, each
spending ε on its own data (disjoint data: the composed / souped model is (ε, δ)-DP for every
example), composed (TAFT) or souped (NLFT) weighted by examples. DP lr {s['dp_lr']:g} for all three; δ = min(1e-5, 1/(10 n)) per model ({f"{central['delta']:.1e}" if central else '—'}
central, {f"{client['delta']:.1e}" if client else '—'} per client). {calibration} The ε actually spent is at most {worst:.3f} × the target. ε = ∞: each method's non-DP recipe (batch {s['batch_size']}; TAFT RSL lr
{s['taft_lr']:g}, NLFT-1 CE lr {s['nlft_lr']:g}, head CE lr {s['head_lr']:g}), same epochs.

{C.TUNING}

{R.table(["method", "setting", *[f"ε = {e:g}" for e in eps], "ε = ∞ (no DP)"], body)}

- TAFT − best NLFT variant (points): {gap_text}.{exact_text}
- Training wall time of the whole table: TAFT {R.seconds(wall['taft'])}, NLFT-1 {R.seconds(wall['nlft'])},
  head {R.seconds(wall['head'])}.

![privacy]({R.rel(out_dir / meta['plot'], results)})
"""


def cell(row) -> str:
    if row is None:
        return "—"
    if row.get("accuracy_std") is not None and row.get("target_epsilon") is not None:
        return f"{R.acc(row['accuracy'])} ± {R.acc(row['accuracy_std'])}"
    return R.acc(row["accuracy"])
