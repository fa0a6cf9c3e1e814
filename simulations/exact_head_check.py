"""The simulation driver's checks of the exact head (docs/exact_head.md).

After the train run the stats ledger (``<state-dir>/exact_head.sqlite``, written by the ServerApp)
must hold, summed, exactly the statistics of every trained row computed centrally in one pass over
the φ cache (``exact_head_equals_central``); after the unlearn run, exactly the central statistics
of the remaining sites' rows, and the same sums as a fresh stats ledger fed only the remaining
contributions, summed afresh one at a time (``exact_head_removal_bit_identical``). The ridge head solved from the ledger's sums
(λ by GCV on the sums) is scored on the test set before and after removal.

The central statistics are streamed: φ of a chunk of rows at a time (from the φ cache, or from the
images through the trunk without a token cache), split into the rows of sites that stay and of
sites that will be removed, and summed in int64. Every function here runs in a child process of
the driver (simulations.driver.processes.in_subprocess): torch and the p×p products never live in the driver.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

CHUNK_ROWS = 2048


def feature_config(config: dict) -> dict | None:
    """The run config's feature spec keys when the exact head is on (not in DP runs: sites send
    no statistics there), else None."""
    from tangent.exact_head.feature_spec import KEYS
    from tangent.protocol.config import as_run_config

    run = as_run_config(config)
    if not run.exact_head or run.dp:
        return None
    return {key: run[key] for key in KEYS.values() if key in run.KEYS}


def stats_ledger_path(config: dict, state_dir: Path) -> Path:
    from tangent.protocol.config import as_run_config

    path = Path(as_run_config(config).exact_head_ledger_path).expanduser()
    return path if path.is_absolute() else state_dir / path


def extractor_for(spec, features: dict):
    from tangent.exact_head.features import FeatureExtractor, FeatureSpec

    return FeatureExtractor.from_spec(spec, FeatureSpec.from_config(features))


def build_phi_caches(extractor, token_caches: dict, cache_dir: Path) -> dict:
    """The φ cache next to each split's token cache (progress bar); {split: PhiCache}."""
    from tangent.exact_head.phi_cache import PhiCache

    out = {}
    for split, cache in token_caches.items():
        out[split] = PhiCache.build_or_open(extractor, cache.dataset(), cache_dir=cache_dir,
                                            data_digest=cache.manifest["data_digest"], progress=True)
        print(f"  {split} φ: {out[split]}")
    return out


class PhiRows:
    """φ of rows of one split of a data set source: from its φ cache when the driver has a token
    cache, else from the images through the pretrained trunk (both by FeatureExtractor.compute's
    rule, as the sites compute them)."""

    def __init__(self, extractor, source: str, split: str, cache_dir: Path | None):
        from tangent.data.token_cache import images_digest
        from tangent.data.sets import load_dataset
        from tangent.exact_head.phi_cache import PhiCache

        self.extractor = extractor
        images, self.labels = load_dataset(source, split)
        self.cache = None
        if cache_dir is not None:
            self.cache = PhiCache.open(cache_dir, extractor.digest(), images_digest(images))
            if self.cache is None:
                raise FileNotFoundError(f"no φ cache of {source}/{split} in {cache_dir}: the driver builds it "
                                        "in step 1 (build_caches)")
        self.images = None if self.cache is not None else images

    def chunks(self, rows: np.ndarray, chunk_rows: int = CHUNK_ROWS):
        """(rows of the chunk, φ float32) over ``rows`` (sorted data-set indices)."""
        from tangent.data.sets import preprocess

        for start in range(0, len(rows), chunk_rows):
            chunk = rows[start:start + chunk_rows]
            if self.cache is not None:
                yield chunk, self.cache.features(self.extractor, chunk)
            else:
                images = preprocess(np.ascontiguousarray(self.images[chunk]), self.extractor.img_size)
                yield chunk, self.extractor.compute(images, tokens=False, ids=chunk)


def site_rows(active_sites: list[str], labels: np.ndarray, num_sites: int, config: dict) -> dict[str, np.ndarray]:
    """The training rows each simulated site held (client.site's partition rule)."""
    from client.site import simulated_indices

    return {site: simulated_indices("train", labels, int(site), num_sites, config) for site in active_sites}


def open_stats_ledger(path: Path):
    from server.ledger import Ledger

    return Ledger.open(path, create=False, family="stats")


def test_accuracy(extractor, stats, source: str, config: dict, cache_dir: Path | None) -> tuple[float, float, int]:
    """(accuracy, λ, test images) of the ridge head of ``stats`` (λ by GCV) on the test set (the
    server's ``eval-subset`` rule: a seeded subset, else all of it)."""
    from server.evaluation import evaluation_indices
    from tangent.exact_head.statistics import solve

    head = solve(stats)
    test = PhiRows(extractor, source, "test", cache_dir)
    rows = evaluation_indices(len(test.labels), config)
    correct = 0
    for chunk, phi in test.chunks(rows):
        correct += int((head.predict(phi) == test.labels[chunk]).sum())
    return correct / len(rows), float(head.lam), len(rows)


def central_check(spec, features: dict, ledger_path: Path, cache_dir: Path | None, sources: dict,
                  config: dict, num_sites: int, removed: list[str], kept_path: Path, evaluate: bool = True) -> dict:
    """After the train run: the stats ledger's sums == the central statistics of every trained
    row; the head's accuracy (unless ``evaluate`` is False: the ServerApp's report has it); the
    statistics of the rows that stay are saved for after removal."""
    from client.stats import features_statistics
    from simulations.driver.checks import stored_bytes_per_site
    from tangent.exact_head.statistics import SufficientStats

    start = time.perf_counter()
    extractor = extractor_for(spec, features)
    fspec = extractor.spec
    with open_stats_ledger(ledger_path) as ledger:
        composed = ledger.composed_stats()
        active = sorted({c.site_id for c in ledger.contributions(status="active")}, key=_site_key)
    if composed is None:
        return {"exact_head_equals_central": False, "exact_head_note": "the stats ledger holds no statistics"}
    train = PhiRows(extractor, sources["train"], "train", cache_dir)
    rows_of = site_rows(active, train.labels, num_sites, config)
    removed_rows = np.concatenate([rows_of[s] for s in removed if s in rows_of] or [np.empty(0, np.int64)])
    all_rows = np.sort(np.concatenate(list(rows_of.values())))
    gone = np.isin(all_rows, removed_rows)
    zero = SufficientStats.zeros(extractor.dim, spec.num_classes, fspec.clip_norm, fspec.frac_bits)
    kept, dropped = zero, zero
    offset = 0
    for chunk, phi in train.chunks(all_rows):
        mask = gone[offset:offset + len(chunk)]
        offset += len(chunk)
        for rows_mask, name in ((~mask, "kept"), (mask, "dropped")):
            if rows_mask.any():
                part = features_statistics(phi[rows_mask], train.labels[chunk[rows_mask]],
                                           spec.num_classes, fspec.clip_norm, fspec.frac_bits)
                if name == "kept":
                    kept = kept + part
                else:
                    dropped = dropped + part
    central = kept + dropped
    np.savez(kept_path, **kept.to_arrays())
    central_s = time.perf_counter() - start
    accuracy, lam, test_images = test_accuracy(extractor, composed, sources["test"], config, cache_dir) \
        if evaluate and sources.get("test") else (None, None, None)
    return {"exact_head_equals_central": bool(composed == central),
            "exact_head_rows": int(central.n), "exact_head_sites": len(active),
            "accuracy_exact_head": accuracy, "exact_head_lambda": lam, "exact_head_test_images": test_images,
            "exact_head_bytes_per_site": int(composed.nbytes), "exact_head_num_features": int(extractor.dim),
            "exact_head_stored_bytes_per_site": stored_bytes_per_site(ledger_path),
            "exact_head_central_s": central_s, "exact_head_check_s": time.perf_counter() - start}


def removal_check(spec, features: dict, ledger_path: Path, cache_dir: Path | None, sources: dict,
                  config: dict, kept_path: Path, evaluate: bool = True, fresh: dict | None = None) -> dict:
    """After the unlearn run: the stats ledger's sums == the central statistics of the remaining
    sites' rows (saved by :func:`central_check`) and == a fresh aggregation of the remaining
    contributions (``fresh`` when the driver already made it, simulations.driver.checks.remaining_sums);
    the head's accuracy after removal."""
    from simulations.driver.checks import fresh_sums, same_arrays
    from tangent.exact_head.statistics import SufficientStats

    start = time.perf_counter()
    with open_stats_ledger(ledger_path) as ledger:
        after = ledger.composed_stats()
        after_arrays = ledger.composed_arrays()
        card = ledger.model_card
    kept_arrays = dict(np.load(kept_path))
    kept = SufficientStats.from_arrays(kept_arrays, card["stats-meta"])
    # a fresh aggregation of the remaining contributions, one at a time (simulations.driver.checks.fresh_sums)
    expected = fresh if fresh is not None else fresh_sums(ledger_path)[0]
    fresh_identical = same_arrays(after_arrays, expected)
    central_identical = after is not None and after == kept
    out = {"exact_head_removal_equals_central": bool(central_identical),
           "exact_head_removal_equals_fresh_ledger": bool(fresh_identical),
           "exact_head_removal_bit_identical": bool(central_identical and fresh_identical)}
    if evaluate and after is not None and sources.get("test"):
        extractor = extractor_for(spec, features)
        accuracy, lam, _ = test_accuracy(extractor, after, sources["test"], config, cache_dir)
        out |= {"accuracy_exact_head_after_removal": accuracy, "exact_head_lambda_after_removal": lam}
    kept_path.unlink(missing_ok=True)
    return out | {"exact_head_removal_check_s": time.perf_counter() - start}


def _site_key(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)
