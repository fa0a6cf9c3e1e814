"""DP exact head: which statistics and which solver survive per-site Gaussian noise.

Numpy only, on the φ cache (base features z of the default feature spec, ‖z‖ = 1). 50 IID sites;
every site perturbs its own statistics, so the summed noise is √50 times one site's: the sum is
drawn at once with that variance (the same distribution). ``select`` fits on 50 × 1,000 training
rows and scores on the remaining 10,000 training rows (never the test set) to pick the variant
and its hyperparameters; ``final`` fits on 50 × 1,200 (all 60k) and scores the chosen variants on
the 10k test images, several noise draws each.

    OMP_NUM_THREADS=2 python -m benchmarks.dp_head select --out /tmp/dphead
    OMP_NUM_THREADS=2 python -m benchmarks.dp_head final --out /tmp/dphead

Under one site budget (``--head-share S``: ε is the site's total for a contribution, the head's
release takes S of its μ², tangent.exact_head.dp.head_epsilon; DP-TAFT the rest):

    OMP_NUM_THREADS=2 python -m benchmarks.dp_head shared-select --head-share 0.9 --dims 768,1024,1536
    OMP_NUM_THREADS=2 python -m benchmarks.dp_head federated --head-share 0.9 [--solver FILE]

Every release is a Gaussian mechanism of L2 sensitivity 1 per block, so the blocks and the mean
release compose exactly as Gaussian differential privacy: μ² = Σ 1/σ_i² (tangent/exact_head/dp.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tangent.exact_head import dp

NUM_CLASSES = 10
SITES = 50
DELTA = 1e-5
EPSILONS = (1.0, 3.0, 8.0)


def _log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def load_cache():
    """(z_train, y_train, z_test, y_test): the complete φ caches of the default spec's width."""
    from tangent.data.sets import load_fashion_mnist
    from tangent.model.pretrained import cache_dir

    found = {}
    for manifest in sorted((cache_dir() / "features").glob("phi-*/manifest.json")):
        info = json.loads(manifest.read_text())
        found[int(info["shape"][0])] = manifest.parent
    out = []
    for split, n in (("train", 60000), ("test", 10000)):
        z = np.load(found[n] / "base.npy")
        _, labels = load_fashion_mnist(split)
        out += [z, np.asarray(labels, np.int64)]
    return out


def features(z, centre, projection):
    x = z.astype(np.float64) - centre if centre is not None else z.astype(np.float64)
    if projection is not None:
        x = x @ projection
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate(stats_noisy, x_eval, y_eval, lams, taus):
    """accuracy for every (τ, λ) of the spectral solver on (x_eval, y_eval)."""
    spectrum = dp.noisy_spectrum(stats_noisy)
    out = {}
    for tau in taus:
        for lam in lams:
            head = dp.solve_spectrum(spectrum, lam=lam, shrink=tau)
            out[(tau, lam)] = float((dp.predict(head, x_eval) == y_eval).mean())
    return out


def prepare(z, y, z_eval, *, centre_kind, proj_dim, pieces=None, centre_sigma=0.0, rng=None, scale=1.0):
    """Rows x of the fit and evaluation sets for one preprocessing, and their exact statistics.

    ``centre_sigma``: σ of the mean release (one site's); "dp" centres on the noisy federated mean.
    ``scale``: the statistics of ``scale`` × as many rows drawn like these (every row counted
    ``scale`` times): a proxy for the full data set's signal against the same noise."""
    if pieces is not None:
        z, z_eval = z[:, pieces], z_eval[:, pieces]
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        z_eval = z_eval / np.linalg.norm(z_eval, axis=1, keepdims=True)
    if centre_kind == "oracle":
        centre = z.mean(axis=0, dtype=np.float64)
    elif centre_kind == "synthetic":  # tangent/exact_head/public_centre.py's images (a seed, no data)
        centre = synthetic_z().astype(np.float64).mean(axis=0)
        if pieces is not None:
            raise ValueError("the synthetic centre is of the full base vector")
    elif centre_kind == "dp":
        noise = centre_sigma * np.sqrt(2 * SITES)  # (Σz, n) has sensitivity √2
        centre = (scale * z.sum(axis=0, dtype=np.float64) + rng.normal(0, noise, z.shape[1])) / (
            scale * len(z) + rng.normal(0, noise))
    else:
        centre = None
    projection = dp.seeded_projection(z.shape[1], proj_dim) if proj_dim else None
    x, xe = features(z, centre, projection), features(z_eval, centre, projection)
    x32 = x.astype(np.float32)
    onehot = np.eye(NUM_CLASSES)[y]
    exact = dp.Statistics(scale * (x32.T @ x32).astype(np.float64), scale * (x.T @ onehot), scale * onehot.sum(axis=0))
    return exact, xe


def score(exact, xe, ye, allocation, rng, lams, taus, seeds=1):
    results = []
    for _ in range(seeds):
        noisy = dp.add_noise(exact, allocation, rng, sites=SITES) if allocation else exact
        results.append(evaluate(noisy, xe, ye, lams, taus))
    return {k: float(np.mean([r[k] for r in results])) for k in results[0]}


WEIGHTS = (0.05, 0.8, 0.14, 0.01)  # mean, gram, cross, counts
#: z of public_centre.synthetic_images() (512 images, seed 0), computed once (synthetic_z)
SYNTHETIC_Z = Path("/tmp/dphead/z_synthetic.npy")


def synthetic_z() -> np.ndarray:
    """z of the public synthetic images (tangent/exact_head/public_centre.py), cached in SYNTHETIC_Z."""
    if not SYNTHETIC_Z.is_file():
        from tangent.exact_head.feature_spec import FeatureSpec
        from tangent.exact_head.features import FeatureExtractor
        from tangent.exact_head.public_centre import synthetic_images
        from tangent.data.sets import preprocess
        from tangent.protocol.spec import ModelSpec

        spec = FeatureSpec(pieces=("final_cls", "final_mean", "input_cls", "input_mean", "input_quad"))
        extractor = FeatureExtractor.from_spec(ModelSpec(reinit=False), spec)
        SYNTHETIC_Z.parent.mkdir(parents=True, exist_ok=True)
        np.save(SYNTHETIC_Z, extractor.compute(preprocess(synthetic_images(), extractor.img_size), tokens=False))
    return np.load(SYNTHETIC_Z)


def load_proxy(out: Path):
    """z of the first training rows (computed from a partly written token cache): fit rows, then
    held-out rows; the statistics are scaled to the full fit set's size."""
    z, y = np.load(out / "z_proxy.npy"), np.load(out / "y_proxy.npy")
    cut = int(len(z) * 0.76)
    return z[:cut], y[:cut], z[cut:], y[cut:]


def stage_select(out: Path, proxy: bool = False):
    if proxy:
        z, y, ze, ye = load_proxy(out)
        scale = 50000 / len(z)
    else:
        zt, yt, _, _ = load_cache()
        fit, hold = np.arange(50000), np.arange(50000, 60000)
        z, y, ze, ye = zt[fit], yt[fit], zt[hold], yt[hold]
        scale = 1.0
    _log("loaded", z.shape, ze.shape, "scale", scale)
    rng = np.random.default_rng(1)
    lams = [float(v) for v in np.logspace(-2, 1, 13)]  # × the noise edge
    taus = [0.0, 0.5, 1.0, 1.5]
    centre_sigma = dp.Allocation.from_weights(1.0, DELTA, WEIGHTS).sigma_mean  # ε = 1's: conservative
    rows = []
    if proxy:
        preps = [dict(centre_kind="dp", proj_dim=512), dict(centre_kind="dp", proj_dim=256),
                 dict(centre_kind="none", proj_dim=512), dict(centre_kind="oracle", proj_dim=512),
                 dict(centre_kind="dp", proj_dim=1024), dict(centre_kind="dp", proj_dim=128),
                 dict(centre_kind="dp", proj_dim=0, pieces=np.arange(768)),
                 dict(centre_kind="dp", proj_dim=256, pieces=np.arange(768)),
                 dict(centre_kind="dp", proj_dim=0)]
    else:  # the proxy's findings, on all 50k fit rows: the projection size and the centre
        preps = [dict(centre_kind="synthetic", proj_dim=768), dict(centre_kind="dp", proj_dim=768),
                 dict(centre_kind="synthetic", proj_dim=512), dict(centre_kind="synthetic", proj_dim=1024),
                 dict(centre_kind="none", proj_dim=768)]
        lams = [float(v) for v in np.logspace(-1.5, 0.5, 9)]
        taus = [0.25, 0.5, 1.0]
    for prep in preps:
        t0 = time.perf_counter()
        exact, xe = prepare(z, y, ze, centre_sigma=centre_sigma, rng=rng, scale=scale, **prep)
        name = {k: (f"{len(v)} of z" if k == "pieces" else v) for k, v in prep.items()}
        _log("prepared", name, round(time.perf_counter() - t0, 1), "s")
        weight_sets = [WEIGHTS] if proxy else [(0.05, 0.6, 0.34, 0.01) if prep["centre_kind"] == "dp"
                                                else (0.0, 0.6, 0.39, 0.01)]
        if proxy and prep == dict(centre_kind="dp", proj_dim=512):
            weight_sets += [(0.05, 0.6, 0.34, 0.01), (0.05, 0.9, 0.04, 0.01)]
        for eps in EPSILONS:
            for weights in weight_sets:
                t0 = time.perf_counter()
                acc = score(exact, xe, ye, dp.Allocation.from_weights(eps, DELTA, weights), rng, lams, taus)
                best = max(acc, key=acc.get)
                row = {**name, "epsilon": eps, "weights": weights, "best_tau": best[0], "best_lambda": best[1],
                       "accuracy": acc[best],
                       "by_tau": {str(t): max(a for (tt, _), a in acc.items() if tt == t) for t in taus},
                       "curve": {f"{t}/{l:.3g}": a for (t, l), a in acc.items()},
                       "wall_s": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                _log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
                (out / ("select-proxy.json" if proxy else "select.json")).write_text(json.dumps(rows, indent=1))
        acc = score(exact, xe, ye, None, rng, [1e-3 * scale * len(z), 1e-2 * scale * len(z)], [0.0])
        _log("non-private", name, acc)


def stage_final(out: Path, seeds: int = 3, proxy: bool = False):
    """The held-out winner at each ε (its preprocessing, weights, τ and λ) on 50 × 1,200 rows and
    the 10k test images; ``seeds`` noise draws each. ``proxy``: the proxy's rows scaled to 60k,
    scored on its held-out rows (the ones it was selected on: optimistic)."""
    if proxy:
        zt, yt, ztest, ytest = load_proxy(out)
        scale = 60000 / len(zt)
    else:
        zt, yt, ztest, ytest = load_cache()
        scale = 1.0
    rows = json.loads((out / ("select-proxy.json" if proxy else "select.json")).read_text())
    rng = np.random.default_rng(2)
    results = []
    for eps in EPSILONS:
        best = max((r for r in rows if r["epsilon"] == eps), key=lambda r: r["accuracy"])
        prep = {"centre_kind": best["centre_kind"], "proj_dim": best["proj_dim"]}
        if "pieces" in best:
            prep["pieces"] = np.arange(int(best["pieces"].split()[0]))
        weights = tuple(best["weights"])
        centre_sigma = dp.Allocation.from_weights(eps, DELTA, weights).sigma_mean
        exact, xe = prepare(zt, yt, ztest, centre_sigma=centre_sigma, rng=rng, scale=scale, **prep)
        allocation = dp.Allocation.from_weights(eps, DELTA, weights)
        accs = [score(exact, xe, ytest, allocation, rng, [best["best_lambda"]], [best["best_tau"]])[
            (best["best_tau"], best["best_lambda"])] for _ in range(seeds)]
        row = {k: best[k] for k in ("centre_kind", "proj_dim", "weights", "best_tau", "best_lambda")}
        row |= {"epsilon": eps, "delta": DELTA, "sites": SITES, "rows_per_site": len(zt) // SITES,
                "test_accuracy_mean": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
                "test_accuracies": accs, "holdout_accuracy": best["accuracy"]}
        results.append(row)
        _log(json.dumps(row))
        (out / ("final-proxy.json" if proxy else "final.json")).write_text(json.dumps(results, indent=1))


def head_epsilon(epsilon: float, head_share: float | None) -> float:
    """The head release's own ε: ``epsilon`` itself (the whole budget) or its share of a site's total."""
    return epsilon if head_share is None else dp.head_epsilon(epsilon, DELTA, head_share)


def stage_shared_select(out: Path, head_share: float, dims, epsilons=EPSILONS, seeds: int = 2,
                        sites: int = SITES):
    """Solver constants (τ, ℓ) and k per site ε under the shared budget, chosen on TRAINING rows
    only: the seeded permutation of the 60k training rows, its first 50,000 fit (statistics ×1.2:
    the signal of 50 × 1,200 rows against the same per-site noise), its last 10,000 scored. The
    noise is the summed noise of ``sites`` releases at the head's ε (dp.add_noise). The same
    synthetic centre and transform as the Flower path; exact removal is untouched (the choice is
    the server's solver and the public k)."""
    zt, yt, _, _ = load_cache()
    order = np.random.default_rng(0).permutation(len(zt))
    fit, hold = order[:50000], order[50000:]
    centre = synthetic_z().astype(np.float64).mean(axis=0)
    lams = [float(v) for v in np.logspace(-1.5, 0.5, 9)]
    taus = [0.25, 0.5, 0.75, 1.0, 1.5]
    rng = np.random.default_rng(5)
    rows = []
    for dim in dims:
        t0 = time.perf_counter()
        transform = dp.RowTransform(centre, dim, 0)
        x, xe = transform.rows(zt[fit]), transform.rows(zt[hold])
        onehot = np.eye(NUM_CLASSES)[yt[fit]]
        exact = dp.Statistics(1.2 * (x.T @ x), 1.2 * (x.T @ onehot), 1.2 * onehot.sum(axis=0))
        del x
        _log("k", dim, "prepared", round(time.perf_counter() - t0, 1), "s")
        for eps in epsilons:
            t0 = time.perf_counter()
            allocation = dp.Allocation.from_weights(head_epsilon(eps, head_share), DELTA, dp.RELEASE_WEIGHTS)
            acc = score(exact, xe, yt[hold], allocation, rng, lams + [dp.LAMBDA], taus, seeds=seeds)
            best = max(acc, key=acc.get)
            row = {"epsilon": eps, "head_share": head_share, "head_epsilon": allocation.epsilon, "proj_dim": dim,
                   "best_tau": best[0], "best_lambda": best[1], "holdout_accuracy": acc[best],
                   "holdout_accuracy_default": acc[(dp.SHRINK, dp.LAMBDA)],
                   "curve": {f"{t}/{l:.3g}": a for (t, l), a in acc.items()},
                   "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            _log(json.dumps({k: v for k, v in row.items() if k != "curve"}))
            (out / f"shared-select-{head_share}.json").write_text(json.dumps(rows, indent=1))


def stage_federated(out: Path, proj_dim: int, epsilons=EPSILONS, seeds: int = 3, sites: int = SITES,
                    rows_per_site: int = 1200, test_rows: int = 10000, centre: str = "synthetic",
                    head_share: float | None = None, solver: dict | None = None):
    """The integer path end to end on all 60k / 10k: 50 sites × 1,200 rows, each site's rows
    through the public RowTransform (synthetic centre, seeded projection), exact integer statistics,
    its own Gaussian release (tangent.exact_head.dp.privatize); the server sums the integer
    releases and solves with the fixed constants (dp.SHRINK, dp.LAMBDA), or per ε with ``solver``
    ({ε: (τ, ℓ)}, chosen by :func:`stage_shared_select` on training rows). ``head_share``: ε is the
    site's total and the release takes this share of its μ². Also checks that removing a site
    leaves exactly the sum of the others."""
    from tangent.exact_head.statistics import SufficientStats

    zt, yt, ztest, ytest = load_cache()
    chosen = np.random.default_rng(0).permutation(len(zt))[:sites * rows_per_site]
    site_rows = np.array_split(chosen, sites)
    weights = (0.0, 0.6, 0.39, 0.01)
    if centre in ("synthetic", "site"):
        centre_vector = synthetic_z().astype(np.float64).mean(axis=0)
        if centre == "site":  # then every site centres its rows on its own DP mean (the Flower path)
            weights = dp.RELEASE_WEIGHTS
    else:  # "dp": every site releases Σz and its count first (5% of μ² at the largest ε asked for)
        if len(epsilons) != 1:
            raise ValueError("the DP-mean centre is released at one ε: pass one")
        weights = (0.05, 0.6, 0.34, 0.01)
        # (Σz, n) of one site has L2 sensitivity √2 (‖z‖ = 1, one count)
        sigma = dp.Allocation.from_weights(epsilons[0], DELTA, weights).sigma_mean * np.sqrt(2)
        mean_rng = np.random.default_rng(4)
        sums = sum(zt[rows].sum(axis=0, dtype=np.float64) + mean_rng.normal(0, sigma, zt.shape[1]) for rows in site_rows)
        count = sum(len(rows) + mean_rng.normal(0, sigma) for rows in site_rows)
        centre_vector = sums / count
    transform = dp.RowTransform(centre_vector, proj_dim, 0)
    ztest, ytest = ztest[:test_rows], ytest[:test_rows]
    t0 = time.perf_counter()
    if centre == "site":  # a site's rows depend on its noisy mean: its statistics are drawn with the release
        exact = None
        public_rows = [transform.rows(zt[rows]) for rows in site_rows]
    else:
        exact = [dp.exact_release_stats(transform.rows(zt[rows]), yt[rows], NUM_CLASSES, 16) for rows in site_rows]
    _log("exact site statistics", round(time.perf_counter() - t0, 1), "s")
    rng = np.random.default_rng(3)
    results = []
    for eps in epsilons:
        allocation = dp.Allocation.from_weights(head_epsilon(eps, head_share), DELTA, weights)
        shrink, lam = (solver or {}).get(eps, (dp.SHRINK, dp.LAMBDA))
        accs, removal_exact = [], []
        for _ in range(seeds):
            if exact is None:
                releases = [dp.site_centred_release(u, yt[rows], NUM_CLASSES, 16, allocation, rng)
                            for u, rows in zip(public_rows, site_rows)]
            else:
                releases = [dp.privatize(st, allocation, rng) for st in exact]
            total = SufficientStats.total(releases)
            head = dp.solve_release(total, transform, shrink=shrink, lam=lam, site_centred=exact is None)
            accs.append(float((head.predict(ztest) == ytest).mean()))
            removal_exact.append(total - releases[7] == SufficientStats.total(releases[:7] + releases[8:]))
        row = {"epsilon": eps, "delta": DELTA, "sites": sites, "rows_per_site": rows_per_site, "proj_dim": proj_dim,
               "test_rows": len(ytest),
               "head_share": head_share, "head_epsilon": allocation.epsilon,
               "centre": centre, "weights": allocation.weights, "shrink": shrink, "lambda": lam,
               "test_accuracy_mean": float(np.mean(accs)), "test_accuracy_std": float(np.std(accs)),
               "test_accuracies": accs, "removal_exact": all(removal_exact),
               "bytes_per_site": int(releases[0].nbytes)}
        results.append(row)
        _log(json.dumps(row))
        share = "" if head_share is None else f"-share{head_share}"
        tuned = "" if solver is None else "-tuned"
        (out / f"federated-{sites}x{rows_per_site}-{proj_dim}-{centre}{share}{tuned}.json").write_text(
            json.dumps(results, indent=1))
    if exact is not None:
        nonprivate = dp.solve_release(SufficientStats.total(exact), transform, lam=1.0, shrink=0.0)
        _log("non-private (λ = 1):", float((nonprivate.predict(ztest) == ytest).mean()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("select", "final", "federated", "shared-select"))
    parser.add_argument("--dim", type=int, default=768, help="federated: the projection size")
    parser.add_argument("--epsilons", default="1,3,8", help="federated: comma-separated ε")
    parser.add_argument("--sites", type=int, default=SITES)
    parser.add_argument("--rows-per-site", type=int, default=1200)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--centre", choices=("synthetic", "dp", "site"), default="synthetic",
                        help="federated: the rows' centre: public (synthetic images), a pooled DP mean, "
                             "or each site's own DP mean (the Flower path)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dphead"))
    parser.add_argument("--proxy", action="store_true", help="select on the partial z of load_proxy")
    parser.add_argument("--head-share", type=float, default=None,
                        help="ε is a site's total; the head's release takes this share of its μ²")
    parser.add_argument("--dims", default="768", help="shared-select: comma-separated k")
    parser.add_argument("--solver", type=Path, default=None,
                        help="federated: (τ, ℓ) per ε from a shared-select JSON (its rows of --dim)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    epsilons = tuple(float(e) for e in args.epsilons.split(","))
    if args.stage == "federated":
        solver = None
        if args.solver is not None:
            solver = {r["epsilon"]: (r["best_tau"], r["best_lambda"])
                      for r in json.loads(args.solver.read_text()) if r["proj_dim"] == args.dim}
        stage_federated(args.out, args.dim, epsilons, sites=args.sites, rows_per_site=args.rows_per_site,
                        test_rows=args.test_rows, centre=args.centre, head_share=args.head_share, solver=solver)
    elif args.stage == "shared-select":
        stage_shared_select(args.out, args.head_share, [int(d) for d in args.dims.split(",")], epsilons)
    elif args.stage == "select":
        stage_select(args.out, proxy=args.proxy)
    else:
        stage_final(args.out, proxy=args.proxy)


if __name__ == "__main__":
    main()
