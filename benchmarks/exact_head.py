"""Exact head on frozen multi-level features: accuracy / size frontier, exact federation, DP.

All 60k Fashion-MNIST training / 10k test images, from the trunk-token cache (img 56, keyed on the
experiments' spec, reinit=false: the trunk is the pretrained blocks 0..10 for every spec). Stages, each well under
10 minutes on 2 loaded cores, state under ``--work`` (default /tmp/exacthead):

    python -m benchmarks.exact_head pieces      # φ pieces of every image → pieces_{split}.npy
    python -m benchmarks.exact_head frontier    # central statistics per spec, GCV λ vs oracle λ
    python -m benchmarks.exact_head quad        # + the quadrant pieces → quad_{split}.npy, their frontier
    python -m benchmarks.exact_head federated   # 50 IID / Dirichlet 0.1 sites == central, bit for bit
    python -m benchmarks.exact_head dp          # DP exact head in the privacy experiment's setting
    python -m benchmarks.exact_head report      # JSON on stdout + docs/exact_head.md

Run with OMP_NUM_THREADS=1 (shared machine). Every number printed is measured here.

Over 500 lines as one script: its stages share the loaders, the state under ``--work`` and the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from tangent.exact_head import statistics as eh
from tangent.exact_head.feature_spec import DP_FEATURE_SPECS
from tangent.exact_head.features import PIECES, QUAD_PIECES, RANDOM_FEATURE_SCALE as RANDOM_SCALE, FeatureExtractor, FeatureSpec

NUM_CLASSES = 10
BASE = FeatureSpec(pieces=PIECES, random_features=0, clip_norm=2.0, frac_bits=16)  # the four pieces, C = 2, b = 16
RANDOM_KS = (512, 1024, 2048, 3072, 4096)
FRONTIER = ([FeatureSpec(pieces=PIECES[:1]), FeatureSpec(pieces=PIECES[:2]), BASE]
            + [FeatureSpec(random_features=k) for k in RANDOM_KS])
TARGET_ACCURACY, SIZE_LIMIT = 0.885, 128 * 2 ** 20  # the acceptance (MB read as MiB: see docs)
DOC = Path(__file__).resolve().parents[1] / "docs" / "exact_head.md"


def _log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def _spec_name(spec: FeatureSpec) -> str:
    base = "+".join(spec.pieces) if spec.pieces != PIECES else "4 pieces"
    base += f" → {spec.projection} (seeded projection)" if spec.projection else ""
    return f"{base}" + (f" + {spec.random_features} RF" if spec.random_features else "")


# ------------------------------------------------------------------------------ data

def _model_and_extractor(spec: FeatureSpec = BASE):
    from tangent.protocol.spec import ModelSpec, build_model

    # the experiments' spec (reinit=false): the lead's token cache is keyed on its base digest;
    # the trunk (blocks 0..10) is the same for the TAFT default, so either cache would do
    model_spec = ModelSpec(reinit=False)
    model, digest = build_model(model_spec)
    extractor = FeatureExtractor.from_spec(model_spec, spec)
    if not extractor.trunk_matches(model.trunk):
        raise RuntimeError("the TAFT trunk differs from the pretrained one: its token cache does not apply")
    return model_spec, model, digest, extractor


def stage_pieces(work: Path) -> dict:
    """Every piece of every train/test image from the token cache, [N, 4, 384] float32."""
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_fashion_mnist
    from tangent.data.inputs import model_inputs
    from tangent.model.pretrained import cache_dir

    model_spec, model, digest, extractor = _model_and_extractor()
    out = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split)
        rows, from_cache = model_inputs(model, digest, images, np.arange(len(images)), model_spec.img_size,
                                        cache_dir() / "features", data_digest=images_digest(images))
        assert from_cache
        t0 = time.perf_counter()
        pieces = np.empty((len(rows), len(PIECES), extractor.embed_dim), np.float32)
        for start in range(0, len(rows), 500):
            idx = np.arange(start, min(len(rows), start + 500))
            got = extractor.pieces(rows[idx])
            pieces[idx] = torch.stack([got[name] for name in PIECES], dim=1).numpy()
        wall = time.perf_counter() - t0
        np.save(work / f"pieces_{split}.npy", pieces)
        np.save(work / f"labels_{split}.npy", labels)
        out[split] = {"images": len(rows), "wall_s": round(wall, 1),
                      "ms_per_image": round(1000 * wall / len(rows), 3)}
        _log(split, out[split])
    (work / "pieces.json").write_text(json.dumps(out, indent=1))
    return out


def _load(work: Path, split: str):
    return np.load(work / f"pieces_{split}.npy", mmap_mode="r"), np.load(work / f"labels_{split}.npy")


def features(extractor: FeatureExtractor, pieces: np.ndarray, rows=None, quads: np.ndarray | None = None
             ) -> np.ndarray:
    """φ of cached pieces through the extractor's own ``assemble`` (the site's code path).
    ``quads``: the quadrant pieces [N, 8, d] (stage ``quad``), final_quad then input_quad."""
    rows = np.arange(len(pieces)) if rows is None else rows
    out = np.empty((len(rows), extractor.dim), np.float32)
    for start in range(0, len(rows), 4096):
        idx = rows[start:start + 4096]
        chunk = torch.from_numpy(np.ascontiguousarray(pieces[idx]))
        named = {name: chunk[:, i] for i, name in enumerate(PIECES)}
        if quads is not None:
            q = torch.from_numpy(np.ascontiguousarray(quads[idx]))
            named |= {name: q[:, 4 * i:4 * i + 4].flatten(1) for i, name in enumerate(QUAD_PIECES)}
        out[start:start + len(chunk)] = extractor.assemble(named).numpy()
    return out


def _extractor(spec: FeatureSpec) -> FeatureExtractor:
    from tangent.model.pretrained import load_pretrained

    return FeatureExtractor(load_pretrained("vit_small_patch14_dinov2", img_size=56), spec, img_size=56)


# ------------------------------------------------------------------------------ frontier

def _evaluate(stats: eh.SufficientStats, phi_test: np.ndarray, y_test: np.ndarray) -> dict:
    t0 = time.perf_counter()
    spec = eh.spectrum(stats)
    lam, curve = eh.choose_lambda(spec)
    solve_s = time.perf_counter() - t0
    x_test = eh.dequantize(eh.quantize(phi_test, stats.clip_norm, stats.frac_bits), stats.clip_norm,
                           stats.frac_bits)
    accs = {}
    for candidate in curve:  # oracle: the grid's best λ on the test set (for comparison only)
        head = eh.head_from_spectrum(spec, candidate, stats.clip_norm, stats.frac_bits)
        accs[candidate] = float(((x_test @ head.weight + head.bias).argmax(1) == y_test).mean())
    oracle = max(accs, key=lambda k: (accs[k], k))
    return {"lambda_gcv": lam, "lambda_gcv_over_n": lam / stats.n, "accuracy_gcv": accs[lam],
            "lambda_oracle": oracle, "accuracy_oracle": accs[oracle], "solve_s": round(solve_s, 1)}


def _spec_record(spec: FeatureSpec, extractor: FeatureExtractor, stats: eh.SufficientStats) -> dict:
    return {"spec": _spec_name(spec), "p": extractor.dim, "feature_digest": extractor.digest()[:16],
            "bytes_per_site": stats.nbytes, "mib_per_site": round(stats.nbytes / 2 ** 20, 2),
            "gram_entries": eh.triu_size(extractor.dim)}


def stage_frontier(work: Path) -> list:
    """The specs without random features: central statistics from the rows, then the solve."""
    pieces, labels = _load(work, "train")
    pieces_t, labels_t = _load(work, "test")
    results = []
    for spec in FRONTIER:
        if spec.random_features:
            continue  # stage "frontier-rf"
        extractor = _extractor(spec)
        phi, phi_t = features(extractor, pieces), features(extractor, pieces_t)
        t0 = time.perf_counter()
        stats = eh.SufficientStats.from_features(phi, labels, NUM_CLASSES, spec.clip_norm, spec.frac_bits)
        record = _spec_record(spec, extractor, stats) | {"stats_s": round(time.perf_counter() - t0, 1)}
        record |= _evaluate(stats, phi_t, labels_t)
        if spec == BASE:  # what the fixed-point grid costs: the same ridge on float64 φ
            record["accuracy_float64_same_lambda"] = _float_ridge_accuracy(phi, labels, phi_t, labels_t,
                                                                           record["lambda_gcv"])
        _log(record)
        results.append(record)
    (work / "frontier.json").write_text(json.dumps(results, indent=1))
    return results


QUAD_SPECS = (FeatureSpec(pieces=PIECES + ("input_quad",)), FeatureSpec(pieces=PIECES + QUAD_PIECES))


def stage_quad(work: Path) -> list:
    """The quadrant pieces of every image from the token cache (FeatureExtractor.pieces, the
    site's code), then the frontier of the specs that add them (no random features)."""
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_fashion_mnist
    from tangent.data.inputs import model_inputs
    from tangent.model.pretrained import cache_dir

    model_spec, model, digest, extractor = _model_and_extractor(FeatureSpec(pieces=QUAD_PIECES))
    for split in ("train", "test"):
        if (work / f"quad_{split}.npy").exists():
            continue
        images, _ = load_fashion_mnist(split)
        rows, from_cache = model_inputs(model, digest, images, np.arange(len(images)), model_spec.img_size,
                                        cache_dir() / "features", data_digest=images_digest(images))
        assert from_cache
        quads = np.empty((len(rows), 2 * 4, extractor.embed_dim), np.float32)
        t0 = time.perf_counter()
        for start in range(0, len(rows), 500):
            idx = np.arange(start, min(len(rows), start + 500))
            got = extractor.pieces(rows[idx])
            quads[idx] = torch.cat([got[name].reshape(len(idx), 4, -1) for name in QUAD_PIECES], dim=1).numpy()
        _log(split, f"quadrant pieces of {len(rows)} images in {time.perf_counter() - t0:.1f} s")
        np.save(work / f"quad_{split}.npy", quads)
    pieces, labels = _load(work, "train")
    pieces_t, labels_t = _load(work, "test")
    quads, quads_t = np.load(work / "quad_train.npy", mmap_mode="r"), np.load(work / "quad_test.npy")
    results = []
    for spec in QUAD_SPECS:
        extractor = _extractor(spec)
        phi_t = features(extractor, pieces_t, quads=quads_t)
        t0 = time.perf_counter()
        stats = None
        for start in range(0, len(labels), 10_000):  # exact integer sums: chunking changes nothing
            rows = np.arange(start, min(len(labels), start + 10_000))
            part = eh.SufficientStats.from_features(features(extractor, pieces, rows, quads), labels[rows],
                                                    NUM_CLASSES, spec.clip_norm, spec.frac_bits)
            stats = part if stats is None else stats + part
        record = _spec_record(spec, extractor, stats) | {"stats_s": round(time.perf_counter() - t0, 1)}
        record |= _evaluate(stats, phi_t, labels_t)
        _log(record)
        results.append(record)
    (work / "quad.json").write_text(json.dumps(results, indent=1))
    return results


def stage_gram(work: Path) -> dict:
    """The integer Gram matrix of the largest spec (4 pieces + 4,096 random features), once.

    The random features of a smaller k are the first k of the largest (numpy's stream) and no row
    reaches the clip norm (checked), so every smaller spec's integer statistics are the leading
    block of the largest's: one Gram product serves the whole random-feature frontier.
    """
    pieces, labels = _load(work, "train")
    big = FRONTIER[-1]
    extractor = _extractor(big)
    phi = features(extractor, pieces)
    max_norm = float(np.sqrt((phi.astype(np.float64) ** 2).sum(1)).max())
    if max_norm >= big.clip_norm:
        raise RuntimeError(f"a row reaches the clip norm ({max_norm:.3f}): nested statistics do not apply")
    q = eh.quantize(phi, big.clip_norm, big.frac_bits)
    del phi
    t0 = time.perf_counter()
    gram = eh.exact_gram(q, big.frac_bits)
    record = {"p": int(q.shape[1]), "gram_s": round(time.perf_counter() - t0, 1), "max_row_norm": max_norm}
    np.save(work / "gram_big.npy", gram)
    np.save(work / "q_big.npy", q)
    (work / "gram.json").write_text(json.dumps(record))
    _log(record)
    return record


def stage_frontier_rf(work: Path, ks=RANDOM_KS) -> list:
    labels = np.load(work / "labels_train.npy")
    pieces_t, labels_t = _load(work, "test")
    gram_info = json.loads((work / "gram.json").read_text())
    gram = np.load(work / "gram_big.npy", mmap_mode="r")
    q = np.load(work / "q_big.npy", mmap_mode="r")
    phi_t = features(_extractor(FRONTIER[-1]), pieces_t)
    path = work / "frontier_rf.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    done = {row["p"] for row in results}
    for k in ks:
        spec = FeatureSpec(random_features=k)
        p = BASE.dim() + k
        if p in done:
            continue
        sub_q = np.ascontiguousarray(q[:, :p])
        stats = eh.SufficientStats(p, NUM_CLASSES, spec.clip_norm, spec.frac_bits, len(sub_q),
                                   np.bincount(labels, minlength=NUM_CLASSES).astype(np.int64),
                                   sub_q.sum(0, dtype=np.int64), eh.pack_triu(np.asarray(gram[:p, :p])),
                                   eh.exact_cross(sub_q, labels, NUM_CLASSES))
        record = _spec_record(spec, _extractor(spec), stats)
        record["stats_s"] = round(gram_info["gram_s"] * (p / gram_info["p"]) ** 2, 1)  # the leading block's share
        record |= _evaluate(stats, phi_t[:, :p], labels_t)
        _log(record)
        results.append(record)
        path.write_text(json.dumps(results, indent=1))
        del stats, sub_q
    return results


def _float_ridge_accuracy(phi, labels, phi_t, labels_t, lam) -> float:
    """The default solve (centred, not standardized) on float64 φ straight from the rows."""
    x = phi.astype(np.float64)
    y = np.eye(NUM_CLASSES)[labels]
    mu = x.mean(0)
    xc = x - mu
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ (y - y.mean(0)))
    b = y.mean(0) - mu @ w
    return float(((phi_t.astype(np.float64) @ w + b).argmax(1) == labels_t).mean())


# ------------------------------------------------------------------------------ federated

def stage_federated(work: Path, spec: FeatureSpec, only: str | None = None) -> dict:
    from tangent.data.partition import partition_dirichlet, partition_iid

    pieces, labels = _load(work, "train")
    pieces_t, labels_t = _load(work, "test")
    extractor = _extractor(spec)
    quads = quads_t = None
    if set(spec.pieces) & set(QUAD_PIECES):  # stage "quad" stored them
        quads, quads_t = np.load(work / "quad_train.npy", mmap_mode="r"), np.load(work / "quad_test.npy")
    path = work / ("federated-quad.json" if quads is not None else "federated.json")
    out = json.loads(path.read_text()) if path.is_file() else {}
    if out.get("p") != extractor.dim:
        out = {}
    out |= {"spec": _spec_name(spec), "p": extractor.dim}
    central = None
    if spec == FRONTIER[-1] and (work / "gram_big.npy").is_file():  # stage "gram": the central rows' Gram
        q = np.load(work / "q_big.npy", mmap_mode="r")
        central = eh.SufficientStats(extractor.dim, NUM_CLASSES, spec.clip_norm, spec.frac_bits, len(q),
                                     np.bincount(labels, minlength=NUM_CLASSES).astype(np.int64),
                                     np.asarray(q).sum(0, dtype=np.int64),
                                     eh.pack_triu(np.load(work / "gram_big.npy", mmap_mode="r")),
                                     eh.exact_cross(np.asarray(q), labels, NUM_CLASSES))
        del q
    if central is None:
        t0 = time.perf_counter()
        central = eh.SufficientStats.from_features(features(extractor, pieces, quads=quads), labels, NUM_CLASSES,
                                                   spec.clip_norm, spec.frac_bits)
        out["central_stats_s"] = round(time.perf_counter() - t0, 1)
    partitions = {"iid-50": partition_iid(len(labels), 50, seed=0),
                  "dirichlet-0.1-50": partition_dirichlet(labels, 50, alpha=0.1, seed=0)}
    rng = np.random.default_rng(0)
    for name, parts in partitions.items():
        if only is not None and name != only:
            continue
        t0 = time.perf_counter()
        total, site_times, site_bytes, removed = None, [], [], None
        order = rng.permutation(len(parts))  # arrival order: random
        for i in order:
            s0 = time.perf_counter()
            site = eh.SufficientStats.from_features(features(extractor, pieces, parts[i], quads), labels[parts[i]],
                                                    NUM_CLASSES, spec.clip_norm, spec.frac_bits)
            site_times.append(time.perf_counter() - s0)
            site_bytes.append(site.nbytes)
            if i == order[0]:
                removed = site  # removal check below: the first arrival leaves again
            total = site if total is None else total + site
            del site
        equal = total == central
        bitwise = all(a.tobytes() == b.tobytes() for a, b in zip(total.to_arrays().values(),
                                                                 central.to_arrays().values()))
        removal_ok = None
        if name == "iid-50":  # one full Gram product more: done for one partition
            rest = np.sort(np.concatenate([parts[i] for i in order[1:]]))
            fresh = eh.SufficientStats.from_features(features(extractor, pieces, rest, quads), labels[rest],
                                                     NUM_CLASSES, spec.clip_norm, spec.frac_bits)
            removal_ok = bool((total - removed) == fresh)
            del fresh
        head = eh.solve(total)
        acc = float((head.predict(features(extractor, pieces_t, quads=quads_t)) == labels_t).mean())
        sizes = [len(p) for p in parts]
        out[name] = {"sites": len(parts), "site_sizes_min_max": [min(sizes), max(sizes)],
                     "composed_equals_central_bit_for_bit": bool(equal and bitwise),
                     "removal_of_one_site_equals_fresh_statistics_of_the_rest": removal_ok,
                     "accuracy_gcv": acc, "lambda_gcv": head.lam,
                     "site_stats_s_median": round(float(np.median(site_times)), 2),
                     "bytes_per_site": int(max(site_bytes)), "wall_s": round(time.perf_counter() - t0, 1)}
        _log(name, out[name])
        del total
        path.write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------ DP

DP_SPECS = DP_FEATURE_SPECS
DP_EPSILONS = (1.0, 3.0, 8.0)
DP_REPEATS = 5


def stage_dp(work: Path) -> dict:
    """The privacy experiment's setting (docs/results.md §4): the 3,000-image IID training subset,
    10 IID sites, the 5,000-image test subset, δ per site by the project's rule
    (``tangent.training.privacy.default_delta``, the same δ as DP TAFT there); one release per site."""
    from simulations.experiments.common import Settings, subset_indices, test_indices
    from tangent.data.partition import partition_iid
    from tangent.training.privacy import default_delta

    s = Settings()
    pieces, labels = _load(work, "train")
    pieces_t, labels_t = _load(work, "test")
    train = subset_indices(len(labels), s.dp_train, s.seed)
    test = test_indices(len(labels_t), s.test, s.seed)
    sites = partition_iid(len(train), s.dp_clients, seed=s.seed)
    out = {"train_images": len(train), "test_images": len(test), "sites": len(sites), "rows": []}
    for spec in DP_SPECS:
        extractor = _extractor(spec)
        phi, phi_t = features(extractor, pieces, train), features(extractor, pieces_t, test)
        y, y_t = labels[train], labels_t[test]
        site_stats = [eh.SufficientStats.from_features(phi[p], y[p], NUM_CLASSES, spec.clip_norm, spec.frac_bits)
                      for p in sites]
        exact = eh.SufficientStats.total(site_stats)
        row = {"spec": _spec_name(spec), "p": extractor.dim,
               "no_dp": float((eh.solve(exact).predict(phi_t) == y_t).mean())}
        for eps in DP_EPSILONS:
            accs, oracle_accs = [], []
            for rep in range(DP_REPEATS):
                rng = np.random.default_rng([rep, int(eps * 10), extractor.dim])
                noisy = eh.SufficientStats.total(
                    [eh.privatize(st, eps, default_delta(st.n), rng) for st in site_stats])
                spectrum = eh.spectrum(noisy)
                lam, curve = eh.choose_lambda(spectrum)
                x_t = eh.dequantize(eh.quantize(phi_t, spec.clip_norm, spec.frac_bits), spec.clip_norm, spec.frac_bits)

                def acc(l):
                    h = eh.head_from_spectrum(spectrum, l, spec.clip_norm, spec.frac_bits)
                    return float(((x_t @ h.weight + h.bias).argmax(1) == y_t).mean())

                accs.append(acc(lam))
                oracle_accs.append(max(acc(l) for l in list(curve)[::4]))
            row[f"eps_{eps:g}"] = {"mean": float(np.mean(accs)), "std": float(np.std(accs)),
                                   "oracle_lambda_mean": float(np.mean(oracle_accs)),
                                   "delta_per_site": default_delta(site_stats[0].n)}
        _log(row)
        out["rows"].append(row)
    (work / "dp.json").write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------ ablation

def stage_ablation(work: Path) -> list:
    """Design choices on a split of the *training* set only (30k fit, 10k held out; the test set is
    not touched): standardizing by the summed statistics or not, and the random features' input —
    the public per-example normalization (what FeatureExtractor does) vs a two-pass
    standardization by the fit rows' mean and variance, with bandwidth γ and with/without bias.
    k = 2,048; the random map is FeatureExtractor's (numpy stream of seed 0)."""
    pieces, labels = _load(work, "train")
    order = np.random.default_rng(0).permutation(len(labels))
    fit, held = np.sort(order[:30000]), np.sort(order[50000:])
    base = _extractor(BASE)
    zf, zh = (features(base, pieces, rows).astype(np.float64) for rows in (fit, held))
    k = 2048
    rf_ext = _extractor(FeatureSpec(random_features=k))
    omega, beta = rf_ext.omega.double().numpy(), rf_ext.beta.double().numpy()
    mu, sd = zf.mean(0), zf.std(0)

    def rf(z, gamma, bias, standardized):
        z = (z - mu) / sd / np.sqrt(z.shape[1]) if standardized else z
        return np.maximum(gamma * z @ omega.T + bias * beta, 0) * RANDOM_SCALE

    variants = [("4 pieces, standardized solve", zf, zh, True),
                ("4 pieces", zf, zh, False)]
    for name, gamma, bias, standardized in (("public normalization (default)", 1, 1, False),
                                            ("public normalization, γ = 2", 2, 1, False),
                                            ("two-pass standardized input", 1, 1, True),
                                            ("two-pass standardized, no bias", 1, 0, True),
                                            ("two-pass standardized, γ = 2", 2, 1, True)):
        variants.append((f"+ {k} RF, {name}", np.hstack([zf, rf(zf, gamma, bias, standardized)]),
                         np.hstack([zh, rf(zh, gamma, bias, standardized)]), False))
    variants.insert(3, (f"+ {k} RF, public normalization, standardized solve",
                        np.hstack([zf, rf(zf, 1, 1, False)]), np.hstack([zh, rf(zh, 1, 1, False)]), True))
    results = []
    for name, xf, xh, standardize in variants:
        clip = float(np.sqrt((xf ** 2).sum(1)).max()) * 1.01
        stats = eh.SufficientStats.from_features(xf, labels[fit], NUM_CLASSES, clip, 16)
        spec = eh.spectrum(stats, standardize=standardize)
        lam, curve = eh.choose_lambda(spec)
        x_held = eh.dequantize(eh.quantize(xh, clip, 16), clip, 16)

        def acc(candidate):
            head = eh.head_from_spectrum(spec, candidate, clip, 16)
            return float(((x_held @ head.weight + head.bias).argmax(1) == labels[held]).mean())

        best = max(list(curve)[::3], key=acc)
        row = {"variant": name, "p": xf.shape[1], "accuracy_gcv": acc(lam), "accuracy_best_lambda": acc(best)}
        _log(row)
        results.append(row)
    (work / "ablation.json").write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------ report

def _read(work: Path, name: str):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None


def stage_report(work: Path) -> dict:
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), torch threads "
                         f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
              "pieces": _read(work, "pieces.json"),
              "frontier": (_read(work, "frontier.json") or []) + (_read(work, "frontier_rf.json") or []),
              "federated": _read(work, "federated.json"), "dp": _read(work, "dp.json"),
              "ablation": _read(work, "ablation.json")}
    print(json.dumps(report, indent=1))
    _write_section(DOC, render(report))
    return report


BEGIN, END = "<!-- exact-head:benchmark -->", "<!-- /exact-head:benchmark -->"


def _write_section(path: Path, body: str) -> None:
    """Replace the generated section of ``path`` (between the markers), keeping everything else."""
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    path.write_text(text)


def render(r: dict) -> str:
    lines = ["## Measured (generated)", "",
             "Generated by `python -m benchmarks.exact_head report` from the stages' JSON (see the module",
             "docstring of `benchmarks/exact_head.py`). Model and contracts: `tangent/exact_head/features.py`,",
             "`tangent/exact_head/statistics.py`, docs/design.md. Machine: " + r["machine"] + ".", ""]
    if r["pieces"]:
        p = r["pieces"]
        lines += ["### φ from the token cache", "",
                  f"Last pretrained block + final norm on the cached block-11 input tokens: train "
                  f"{p['train']['images']} images in {p['train']['wall_s']} s ({p['train']['ms_per_image']} ms/image), "
                  f"test {p['test']['images']} in {p['test']['wall_s']} s.", ""]
    if r["frontier"]:
        lines += ["### Accuracy / size frontier (all 60k train, 10k test, central statistics)", "",
                  "λ_GCV: generalized cross-validation from the summed statistics only (the rule the "
                  "server uses); λ_oracle: the same grid's best λ *on the test set*, for comparison only. "
                  "Bytes per site: the statistics as sent (int64: n, class counts, Σφ, upper triangle of "
                  "Σφφᵀ, Σφyᵀ); independent of the site's size. Central stats (s): the integer statistics of all "
                  "60k rows; for the random-feature rows the leading block's share (∝ p²) of the one Gram "
                  "product of the largest spec, whose statistics contain every smaller one's exactly "
                  "(`stage_gram`). Solve: eigendecomposition + the GCV curve.", "",
                  "| φ | p | bytes per site (MiB) | accuracy (λ_GCV) | λ_GCV / n | accuracy (λ_oracle) | central stats (s) | solve (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["frontier"]:
            lines.append(f"| {row['spec']} | {row['p']:,} | {row['mib_per_site']:.1f} | {row['accuracy_gcv']:.4f} | "
                         f"{row['lambda_gcv_over_n']:.1e} | {row['accuracy_oracle']:.4f} | {row['stats_s']} | {row['solve_s']} |")
        base = [row for row in r["frontier"] if "accuracy_float64_same_lambda" in row]
        if base:
            lines += ["", f"Fixed-point grid cost (4 pieces, b = 16): accuracy {base[0]['accuracy_gcv']:.4f} on the "
                      f"grid vs {base[0]['accuracy_float64_same_lambda']:.4f} with float64 φ at the same λ."]
        lines.append("")
    if r.get("ablation"):
        lines += ["### Design ablation (training set only: 30k fit, 10k held-out training images)", "",
                  "| variant | p | held-out accuracy (λ_GCV) | held-out accuracy (best λ) |", "|---|---|---|---|"]
        lines += [f"| {a['variant']} | {a['p']:,} | {a['accuracy_gcv']:.4f} | {a['accuracy_best_lambda']:.4f} |"
                  for a in r["ablation"]]
        lines += ["", "10k held-out images: one standard error ≈ 0.3 points.", ""]
    if r["federated"]:
        f = r["federated"]
        lines += [f"### Federation is the central model, bit for bit ({f['spec']}, p = {f['p']:,})", "",
                  "| partition | sites (sizes) | composed == central (bit for bit) | remove one site == fresh stats of the rest | accuracy (λ_GCV) | site stats (median s) | bytes per site |",
                  "|---|---|---|---|---|---|---|"]
        for name in ("iid-50", "dirichlet-0.1-50"):
            if name in f:
                x = f[name]
                lines.append(f"| {name} | {x['sites']} ({x['site_sizes_min_max'][0]}–{x['site_sizes_min_max'][1]}) | "
                             f"{x['composed_equals_central_bit_for_bit']} | "
                             f"{_or_not_run(x['removal_of_one_site_equals_fresh_statistics_of_the_rest'])} | "
                             f"{x['accuracy_gcv']:.4f} | {x['site_stats_s_median']} | {x['bytes_per_site']:,} |")
        lines.append("")
    if r["dp"]:
        d = r["dp"]
        lines += ["### DP exact head (sufficient-statistics perturbation) in the privacy experiment's setting", "",
                  f"{d['train_images']} training images over {d['sites']} IID sites, {d['test_images']} test images "
                  "(docs/results.md §4); each site releases its statistics once with the analytic Gaussian "
                  f"mechanism at (ε, δ = {d['rows'][0]['eps_1']['delta_per_site']:.1e}, the DP TAFT rule), clip ‖φ‖ ≤ 1; the server sums the noisy releases, projects "
                  f"onto the PSD cone and picks λ by GCV on the noisy sums. Mean ± std over {DP_REPEATS} noise draws. "
                  "DP TAFT-1 federated (docs/results.md, same δ): 0.3146 / 0.5294 / 0.5976 at ε = 1 / 3 / 8.", "",
                  "| φ | p | ε = 1 | ε = 3 | ε = 8 | no DP | ε=1/3/8, oracle λ |", "|---|---|---|---|---|---|---|"]
        for row in d["rows"]:
            cells = [f"{row[f'eps_{e:g}']['mean']:.4f} ± {row[f'eps_{e:g}']['std']:.4f}" for e in DP_EPSILONS]
            oracle = " / ".join(f"{row[f'eps_{e:g}']['oracle_lambda_mean']:.3f}" for e in DP_EPSILONS)
            lines.append(f"| {row['spec']} | {row['p']:,} | " + " | ".join(cells)
                         + f" | {row['no_dp']:.4f} | {oracle} |")
        lines.append("")
    return "\n".join(lines)


def _or_not_run(value) -> str:
    return "not run (one more Gram product)" if value is None else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("pieces", "frontier", "quad", "gram", "frontier-rf", "federated", "dp",
                                          "ablation", "report"))
    parser.add_argument("--ks", type=str, default=",".join(map(str, RANDOM_KS)),
                        help="frontier-rf: numbers of random features to evaluate (comma-separated)")
    parser.add_argument("--partition", choices=("iid-50", "dirichlet-0.1-50"), default=None,
                        help="federated: one partition only (default: both)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/exacthead"))
    parser.add_argument("--random-features", type=int, default=4096,
                        help="federated stage: the spec (--pieces + this many random features)")
    parser.add_argument("--pieces", type=str, default=",".join(PIECES),
                        help="federated stage: the spec's pieces (comma-separated; quadrant pieces need "
                             "stage 'quad' first)")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.stage == "pieces":
        stage_pieces(args.work)
    elif args.stage == "frontier":
        stage_frontier(args.work)
    elif args.stage == "quad":
        stage_quad(args.work)
    elif args.stage == "gram":
        stage_gram(args.work)
    elif args.stage == "frontier-rf":
        stage_frontier_rf(args.work, tuple(int(k) for k in args.ks.split(",")))
    elif args.stage == "federated":
        stage_federated(args.work, FeatureSpec(pieces=tuple(args.pieces.split(",")),
                                               random_features=args.random_features), args.partition)
    elif args.stage == "dp":
        stage_dp(args.work)
    elif args.stage == "ablation":
        stage_ablation(args.work)
    else:
        stage_report(args.work)


if __name__ == "__main__":
    main()
