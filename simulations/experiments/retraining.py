"""Experiment 3 — forgetting samples by shard retraining (paper Fig. 1c).

A random x % of the training subset is forgotten. SISA-style: every shard holding a forgotten
sample is retrained from w0 on what it has left, and the new Δs are composed with the untouched
ones (a shard left empty is dropped). Paragon: TAFT-1 retrained from w0 on all remaining data.
Reported: accuracy, wall time of the retraining (shard fits + composition vs. the paragon's
fit) and the speed-up. The shard models before forgetting are experiment 1's (shard store).

Uniform random deletions hit almost every shard once x % of the data is more than a few times
the number of shards: the expected fraction of shards hit is reported next to the measured one.

Exact head: the forgotten samples' integer statistics are computed and subtracted from
the total, and the head solved again (λ by GCV) — no training at all. The result is checked bit
for bit against the statistics of the remaining samples computed from scratch.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from simulations.experiments import common as C
from simulations.experiments import report as R

NAME = "retraining"
EXACT = "exact head (subtract + solve)"


def run(ctx: C.Context, out_root: Path) -> dict:
    from tangent import compose
    from tqdm.auto import tqdm

    s = ctx.settings
    out_root = Path(out_root)
    total = len(ctx.y)
    config = ctx.train_config("taft")
    originals = {num: C.shard_models(ctx, out_root, "taft", num) for num in s.retrain_shards}
    rows = []
    for num, (parts, deltas, sizes, _, loaded) in originals.items():
        acc = C.accuracy(C.logits_of(ctx, "taft", compose(deltas, C.weights_of(sizes)), ctx.xt), ctx.yt)
        rows.append(_row(0.0, 0, f"shards N={num}", num, None, None, None, None, acc, None, None))

    # exact head: the default FeatureSpec's statistics of the whole subset (before forgetting)
    espec = C.exact_spec()
    ephi = C.exact_features(ctx, espec, C.exact_pieces(ctx, "train", ctx.x))
    ephit = C.exact_features(ctx, espec, C.exact_pieces(ctx, "test", ctx.xt))
    exact_total = C.exact_stats(ephi, ctx.y, espec)
    rows.append(_row(0.0, 0, EXACT, None, None, None, None, None,
                     C.exact_accuracy(C.exact_solve(exact_total), ephit, ctx.yt), None, None))
    bit_identical = {}

    perm = np.random.default_rng(s.seed + 4).permutation(total)
    for pct in s.forget_percents:
        m = max(1, int(round(pct / 100 * total)))
        forget = np.sort(perm[:m])  # nested in x: the first m of one seeded permutation
        keep = torch.as_tensor(np.setdiff1d(np.arange(total), forget))
        start = time.perf_counter()
        delta, _ = C.train_one(ctx, "taft", ctx.x[keep], ctx.y[keep], config)
        paragon_s = time.perf_counter() - start
        acc = C.accuracy(C.logits_of(ctx, "taft", delta, ctx.xt), ctx.yt)
        rows.append(_row(pct, m, "paragon (all remaining data)", None, None, None, len(keep),
                         paragon_s, acc, 1.0, 1.0))
        # exact head: subtract the forgotten samples' statistics, solve again
        start = time.perf_counter()
        forgotten_stats = C.exact_stats(ephi[forget], ctx.y[torch.as_tensor(forget)], espec)
        stats_s = time.perf_counter() - start
        remaining = exact_total - forgotten_stats
        subtract_s = time.perf_counter() - start - stats_s
        head = C.exact_solve(remaining)
        exact_s = time.perf_counter() - start
        fresh = C.exact_stats(ephi[keep.numpy()], ctx.y[keep], espec)
        bit_identical[f"{pct:g}"] = bool(remaining == fresh)
        row = _row(pct, m, EXACT, None, None, None, 0, exact_s, C.exact_accuracy(head, ephit, ctx.yt),
                   paragon_s / exact_s, None)
        row.update(forgotten_stats_s=round(stats_s, 2), subtract_s=round(subtract_s, 3),
                   solve_s=round(exact_s - stats_s - subtract_s, 2), bit_identical=bool(remaining == fresh),
                   exact_lambda=head.lam)
        rows.append(row)
        for num, (parts, deltas, sizes, _, _) in originals.items():
            new_deltas, new_sizes, hit, images = [], [], 0, 0
            start = time.perf_counter()
            for i, part in enumerate(tqdm(parts, desc=f"forget {pct:g}% N={num}", disable=not ctx.progress)):
                left = part[~np.isin(part, forget)]
                if len(left) == len(part):  # untouched: keep its Δ as is
                    new_deltas.append(deltas[i])
                    new_sizes.append(sizes[i])
                    continue
                hit += 1
                if len(left) == 0:  # nothing left: the shard leaves the composition
                    continue
                rows_left = torch.as_tensor(left)
                d, _ = C.train_one(ctx, "taft", ctx.x[rows_left], ctx.y[rows_left], config)
                new_deltas.append(d)
                new_sizes.append(len(left))
                images += len(left)
            composed = compose(new_deltas, C.weights_of(new_sizes))
            retrain_s = time.perf_counter() - start
            acc = C.accuracy(C.logits_of(ctx, "taft", composed, ctx.xt), ctx.yt)
            rows.append(_row(pct, m, f"shards N={num}", num, hit,
                             C.expected_hit_fraction(sizes, m, total), images, retrain_s, acc,
                             paragon_s / retrain_s, (total - m) / max(images, 1)))

    out_dir = out_root / NAME
    R.write_csv(out_dir / "results.csv", rows)
    plot(rows, out_dir / "retraining.png")
    return {"plot": "retraining.png",
            "checks": {"shards_from_store": {str(n): bool(v[4]) for n, v in originals.items()},
                       "exact_bit_identical": bit_identical, "exact_p": exact_total.num_features}}


def _row(pct, forgotten, method, shards, hit, expected, images, wall, acc, speedup, work_ratio):
    return {"forget_percent": pct, "forgotten": forgotten, "method": method, "shards": shards,
            "shards_retrained": hit,
            "expected_fraction_hit": None if expected is None else round(expected, 4),
            "images_retrained": images, "wall_s": None if wall is None else round(wall, 2),
            "accuracy": round(float(acc), 6),
            "speedup": None if speedup is None else round(speedup, 3),
            "work_ratio": None if work_ratio is None else round(work_ratio, 3)}


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["forget_percent"] > 0))
    for method in methods:
        sel = [r for r in rows if r["method"] == method and r["forget_percent"] > 0]
        xs = [r["forget_percent"] for r in sel]
        left.plot(xs, [r["accuracy"] for r in sel], marker="o", label=method)
        if not method.startswith("paragon"):
            right.plot(xs, [r["speedup"] for r in sel], marker="o", label=f"{method}: wall time")
            if all(r["work_ratio"] is not None for r in sel):
                right.plot(xs, [r["work_ratio"] for r in sel], marker="x", linestyle=":",
                           label=f"{method}: images trained")
    xs = sorted({r["forget_percent"] for r in rows if r["forget_percent"] > 0})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("% of training samples forgotten")
        ax.legend(fontsize=7)
    right.axhline(1.0, color="k", linewidth=0.8)
    left.set_ylabel("test accuracy")
    right.set_ylabel("speed-up over the paragon")
    left.set_title("Accuracy after forgetting")
    right.set_title("Retraining cost")
    R.save_figure(fig, path)


def render(out_dir: Path, meta: dict, results: Path) -> str:
    rows = R.read_csv(out_dir / "results.csv")
    s = meta["settings"]
    before = {r["shards"]: r["accuracy"] for r in rows if r["forget_percent"] == 0 and r["method"] != EXACT}
    exact_before = next((r["accuracy"] for r in rows if r["forget_percent"] == 0 and r["method"] == EXACT), None)
    body = []
    for r in rows:
        if r["forget_percent"] == 0:
            continue
        hit = ("—" if r["shards"] is None else
               f"{r['shards_retrained']}/{r['shards']} (expected {100 * r['expected_fraction_hit']:.0f} %)")
        exact = r["method"] == EXACT
        if exact:
            hit = "— (bit-identical to fresh: " + str(r["bit_identical"]) + ")"
        body.append([f"{r['forget_percent']:g} % ({r['forgotten']})", r["method"], hit,
                     r["images_retrained"], f"{r['wall_s']:.1f} s" if exact else R.seconds(r["wall_s"]),
                     R.acc(r["accuracy"]),
                     "—" if r["shards"] is None and not exact else f"{r['speedup']:.2f}×",
                     "—" if r["shards"] is None else f"{r['work_ratio']:.2f}×"])
    shard_rows = [r for r in rows if r["forget_percent"] > 0 and r["shards"] is not None]
    best = max(shard_rows, key=lambda r: r["speedup"])
    before_text = ", ".join(f"N={n}: {R.acc(a)}" for n, a in before.items())
    paragon = {r["forget_percent"]: r["accuracy"] for r in rows if r["method"].startswith("paragon")}
    expected = "; ".join(
        f"N={n}: " + ", ".join(f"{r['forget_percent']:g} % → {100 * r['expected_fraction_hit']:.0f} %"
                               for r in shard_rows if r["shards"] == n)
        for n in dict.fromkeys(r["shards"] for r in shard_rows))
    exact_rows = [r for r in rows if r["forget_percent"] > 0 and r["method"] == EXACT]
    exact_text = ""
    if exact_rows:
        exact_text = f"""
- Exact head (default FeatureSpec, p = {meta['checks'].get('exact_p', '—')}): forgetting = computing the
  forgotten samples' integer statistics, subtracting them, and solving again (λ by GCV): wall time
  {', '.join(f"{r['forget_percent']:g} % → {r['wall_s']:.1f} s (stats {r['forgotten_stats_s']:.2f} s, subtract {r['subtract_s']:.3f} s, solve {r['solve_s']:.1f} s)" for r in exact_rows)}.
  The remaining statistics equal those computed from scratch on the remaining samples bit for bit:
  {all(r['bit_identical'] for r in exact_rows)} (every x). Accuracy before forgetting {R.acc(exact_before)}, after:
  {', '.join(f"{r['forget_percent']:g} % → {R.acc(r['accuracy'])}" for r in exact_rows)}; minus the TAFT paragon:
  {', '.join(f"{r['forget_percent']:g} % → {R.signed(r['accuracy'] - paragon[r['forget_percent']])}" for r in exact_rows)} points."""
    gaps = "; ".join(
        f"N={n}: {R.signed(np.mean([r['accuracy'] - paragon[r['forget_percent']] for r in shard_rows if r['shards'] == n]))}"
        for n in dict.fromkeys(r["shards"] for r in shard_rows))
    return f"""## 3. Forgetting samples by shard retraining (paper Fig. 1c)

{R.provenance(meta, out_dir, results)}

Same training subset ({s['train']} images), TAFT-1 recipe as experiment 1 ({s['epochs']} epochs, lr
{s['taft_lr']:g}, batch {s['batch_size']}); the shard models before forgetting are experiment 1's
IID shards (composed accuracy before forgetting: {before_text}). The forgotten samples are the first
x % of one seeded permutation of the subset (nested in x). Wall time = the affected shards' fits +
composition, against the paragon's single fit on all remaining data, run one after the other in
the same process; other jobs on the machine change its load between fits, so the ratio of images
trained is the load-independent measure of the speed-up.

{R.table(["forgotten", "method", "shards retrained", "images retrained", "wall time", "accuracy", "speed-up (wall)", "speed-up (images)"], body)}

- Uniform random deletions spread over the shards: with m of the S images forgotten, a shard of n
  images is untouched with probability C(S−n, m)/C(S, m) ≈ (1 − n/S)^m. Expected fraction of
  shards to retrain — {expected}. Once it nears 100 %, shard retraining is retraining everything
  (N small models instead of one large: no gain). Largest measured wall-time speed-up:
  {best['speedup']:.2f}× (x = {best['forget_percent']:g} %, N = {best['shards']}).
- Accuracy of shard retraining minus the paragon's, mean over x (points): {gaps}.{exact_text}

![retraining]({R.rel(out_dir / meta['plot'], results)})
"""
