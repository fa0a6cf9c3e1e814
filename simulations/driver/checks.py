"""The checks after each run, read from the ledgers outside Flower: the ensemble of the sites' models vs
the composed model, the composed model's accuracy (``--evaluation driver``), the removal vs a fresh
aggregation of the remaining contributions, and the exact head's checks (simulations/exact_head_check.py).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from simulations.driver.data import evaluation_rows
from simulations.driver.processes import in_subprocess


def iter_active(ledger_path: Path, sites: set[str] | None = None):
    """(site id, num_examples, weight, arrays) of every active contribution (of ``sites``, when
    given), one at a time: a check over a thousand sites never holds more than one of them."""
    from server.ledger import Ledger

    with Ledger.open(ledger_path, create=False) as ledger:
        for c in ledger.contributions(status="active"):
            if sites is None or c.site_id in sites:
                yield c.site_id, c.num_examples, c.weight, ledger.contribution_delta(c.id)


def fresh_sums(ledger_path: Path, sites: set[str] | None = None,
               workers: int | None = None) -> tuple[dict, dict, int]:
    """A fresh aggregation of the active contributions (of ``sites``): their exact sums built
    from zero with the ledger's own family (quantize, weigh, add) in memory, one contribution at
    a time — not a second ledger file, which would write every contribution to disk again (7 GB
    at 1,000 sites). Returns (composed arrays, canonical accumulator bytes, total weight).

    ``workers`` processes (default: one per core, at most 4) each sum an interleaved share of
    the contributions; their exact integer sums are then added, so the bytes are those of one
    process adding every contribution in any order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from server.ledger import Ledger, families
    from server.ledger.accumulators import Accumulators

    with Ledger.open(ledger_path, create=False) as ledger:
        meta = ledger.settings()
        chosen = [(c.id, c.weight) for c in ledger.contributions(status="active")
                  if sites is None or c.site_id in sites]
    if not chosen:
        return {}, {}, 0
    workers = max(1, min(workers or min(4, os.cpu_count() or 1), len(chosen)))
    shares = [chosen[i::workers] for i in range(workers)]
    if workers == 1:
        partial = [partial_sums(ledger_path, chosen)]
    else:  # one BLAS thread in each: the workers already fill the cores
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            partial = list(pool.map(partial_sums, [ledger_path] * workers, shares, [1] * workers))
    key_spec = partial[0][0]
    acc = Accumulators.zeros(key_spec)
    for _, encoded, _ in partial:
        acc.add(Accumulators.decode((name, key_spec[name], data) for name, data in encoded.items()).limbs(), 1)
    total = sum(weight for _, _, weight in partial)
    return families.of_meta(meta).compose(acc, total), acc.encoded(), total


#: row-form statistics are summed as one Gram of this many stacked rows (or fewer, at the end)
STACKED_ROWS = 3072


def partial_sums(ledger_path: Path, contributions: list[tuple[int, int]],
                 blas_threads: int | None = None) -> tuple[dict, dict, int]:
    """(shapes, canonical accumulator bytes, total weight) of the given (contribution id, weight)
    pairs (one share of :func:`fresh_sums`); ``blas_threads`` bounds the BLAS threads of the
    row forms' Gram products.

    Statistics stored as rows are stacked, ~:data:`STACKED_ROWS` rows at a time, and the
    statistics of the stack are added once: integer sums, so the same integers as adding each
    site's, without forming and adding a p(p+1)/2 Gram per site (at 1,000 sites of 60 rows, 100 s
    of the check went to that). Every other contribution is added one at a time."""
    from threadpoolctl import threadpool_limits

    from server.ledger import Ledger, families
    from server.ledger.accumulators import Accumulators
    from tangent.exact_head.row_form import is_row_form, stats_of_rows

    acc, total, stack, stacked_rows = None, 0, [], 0

    def add(arrays, weight):
        nonlocal acc
        if acc is None:
            acc = Accumulators.zeros(meta.get("key_spec") or {k: list(a.shape) for k, a in arrays.items()})
        acc.add(family.quantize(arrays), weight)

    def add_stack():
        nonlocal stacked_rows
        card = meta["model_card"]["stats-meta"]
        rows = {name: np.concatenate([arrays[name] for arrays in stack]) for name in ("rows", "labels")}
        add(stats_of_rows(rows, card["num-features"], card["num-classes"], card["clip-norm"],
                          card["frac-bits"]).to_arrays(), 1)
        stack.clear()
        stacked_rows = 0

    with threadpool_limits(blas_threads, user_api="blas"), Ledger.open(ledger_path, create=False) as ledger:
        meta = ledger.settings()
        family = families.of_meta(meta)
        for contribution_id, weight in contributions:
            arrays = ledger.contribution_delta(contribution_id, expand=False)
            if not is_row_form(arrays):
                add(arrays, weight)
            elif weight != 1:  # a stack is added with weight 1: the statistics family weighs every site 1
                raise ValueError(f"contribution {contribution_id}: a row form of weight {weight}, not 1")
            else:
                stack.append(arrays)
                stacked_rows += len(arrays["labels"])
                if stacked_rows >= STACKED_ROWS:
                    add_stack()
            total += weight
        if stack:
            add_stack()
    return acc.shapes(), acc.encoded(), total


def site_order(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


def stored_bytes_per_site(ledger_path: Path) -> float | None:
    """Mean bytes a ledger stores for one active contribution (as written: compressed, in the
    form the site sent; server/ledger/blobs.py, server/ledger/stats_forms.py)."""
    import sqlite3

    with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True) as db:
        return db.execute("SELECT avg(length(safetensors)) FROM deltas").fetchone()[0]


def ensemble_sample(active: list[str], size: int, seed: int) -> list[str]:
    """The sites of the ensemble check: all when ``size`` is 0 or covers them, else ``size`` of
    them drawn by ``seed``."""
    if not 0 < size < len(active):
        return sorted(active, key=site_order)
    return sorted(np.random.default_rng(seed).choice(active, size, replace=False).tolist(), key=site_order)


def ensemble_check(spec, ledger_path: Path, cache_dir: Path | None, subset: int, seed: int,
                   test_source: str = "fashion-mnist", sites: list[str] | None = None) -> dict:
    """Each sampled site's model on the same test images; their weighted logit average (the
    ensemble) vs the model composed from the same sites' Δ (a fresh exact aggregation of them:
    the ledger's composed model when the sample is every active site). The tangent model is
    linear in Δ, so the two agree up to float rounding. Sites are streamed: one Δ at a time."""
    import torch

    from server.ledger import Ledger
    from tangent.training.trainer import predict_logits

    def pick(num_rows: int) -> np.ndarray:
        if 0 < subset < num_rows:
            return np.sort(np.random.default_rng(seed).choice(num_rows, subset, replace=False))
        return np.arange(num_rows)

    model, _, inputs, labels, from_cache = evaluation_rows(spec, cache_dir, test_source, pick, read=True)
    indices = np.arange(len(labels))
    sample = None if sites is None else set(sites)

    def logits_of(delta) -> "torch.Tensor":
        model.load_delta({k: torch.as_tensor(v) for k, v in delta.items()})
        return predict_logits(model, inputs, from_cache=from_cache, batch_size=500).double()

    ensemble = torch.zeros(len(indices), spec.num_classes, dtype=torch.float64)
    per_site, total = {}, 0
    start = time.perf_counter()
    for site, n, _, delta in iter_active(ledger_path, sample):
        logits = logits_of(delta)
        per_site[site] = {"num_examples": n, "accuracy": float((logits.argmax(-1) == labels).float().mean())}
        ensemble += n * logits  # weighted by examples, as the ledger weighs them
        total += n
    ensemble /= total
    composed_sample, _, _ = fresh_sums(ledger_path, sample)
    sample_logits = logits_of(composed_sample)
    with Ledger.open(ledger_path, create=False) as ledger:
        composed_logits = logits_of(ledger.composed_arrays())
    scale = ensemble.abs().amax(dim=1).clamp_min(1e-12)
    rel = ((sample_logits - ensemble).abs().amax(dim=1) / scale).max().item()
    return {"accuracy_ensemble": float((ensemble.argmax(-1) == labels).float().mean()),
            "accuracy_composed_on_subset": float((composed_logits.argmax(-1) == labels).float().mean()),
            "max_rel_logit_diff_composed_vs_ensemble": rel, "ensemble_test_images": len(indices),
            "ensemble_sites": len(per_site), "per_site": per_site, "ensemble_s": time.perf_counter() - start,
            "delta_stored_bytes_per_site": stored_bytes_per_site(ledger_path)}


def composed_accuracy(spec, ledger_path: Path, cache_dir: Path | None, test_source: str,
                      run_config: dict) -> dict:
    """Accuracy of w0 + the ledger's composed Δ on the server's test rows (the ServerApp's
    central evaluation, run by the driver: ``--evaluation driver``)."""
    from server.evaluation import evaluation_indices
    from server.ledger import Ledger
    from tangent.training.trainer import predict_logits

    model, _, inputs, labels, from_cache = evaluation_rows(spec, cache_dir, test_source,
                                                      lambda n: evaluation_indices(n, run_config))
    start = time.perf_counter()
    with Ledger.open(ledger_path, create=False) as ledger:
        model.load_delta(ledger.composed_delta())
    logits = predict_logits(model, inputs, from_cache=from_cache, batch_size=500)
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "test_images": len(labels),
            "evaluate_s": time.perf_counter() - start}


def remaining_sums(ledger_paths: list[Path], removed: set[str]) -> list[tuple[dict, float]]:
    """(composed arrays, seconds) of a fresh aggregation of the active contributions of every
    site but ``removed`` in each ledger (:func:`fresh_sums`). The driver runs it while the
    unlearn run removes those sites: a removal does not touch the staying contributions (the
    ledger reads them only under their recorded sha256), so their sums are the same before and
    after it. At 50 sites the summing fills the core the unlearn run leaves idle; at 1,000 its
    100 removals keep the ServerApp busy and the two compete (docs/scale.md)."""
    from server.ledger import Ledger

    out = []
    for path in ledger_paths:
        start = time.perf_counter()
        with Ledger.open(path, create=False) as ledger:
            staying = {c.site_id for c in ledger.contributions(status="active")} - set(removed)
        out.append((fresh_sums(path, staying)[0], time.perf_counter() - start))
    return out


def same_arrays(a: dict, b: dict) -> bool:
    """The same names with byte-identical arrays (shape and dtype included)."""
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                         and a[k].tobytes() == b[k].tobytes() for k in a)


def removal_check(ledger_path: Path, expected: dict | None = None) -> dict:
    """The ledger after removal vs a fresh aggregation of the remaining contributions (streamed:
    one contribution in memory at a time): equal accumulator bytes and equal composed bytes.
    ``expected``: that fresh aggregation when it was already made (:func:`remaining_sums`)."""
    from server.ledger import Ledger

    from server.ledger import families

    with Ledger.open(ledger_path, create=False) as ledger:
        after = ledger.composed_arrays()
        digest = ledger.current_version().composed_sha256
        family = families.of_meta(ledger.settings())
    start = time.perf_counter()
    if expected is None:
        expected, _, _ = fresh_sums(ledger_path)
    identical = same_arrays(after, expected) and family.digest(expected) == digest
    return {"removal_bit_identical": bool(identical), "removal_check_s": time.perf_counter() - start}


class ExactHeadStep:
    """The exact head's checks around the unlearn run (simulations.exact_head_check), each in a
    child process; every summary key is None when the run has no exact head or no stats ledger."""

    KEYS_BEFORE = ("accuracy_exact_head", "exact_head_equals_central", "exact_head_lambda",
                   "exact_head_bytes_per_site")
    KEYS_AFTER = ("accuracy_exact_head_after_removal", "exact_head_removal_bit_identical")

    def __init__(self, features, ledger_path: Path, spec, cache_dir, sources, config, num_sites, removed,
                 run_dir):
        self.args = (spec, features, ledger_path, cache_dir, sources, config)
        self.num_sites, self.removed = num_sites, removed
        self.kept_path = run_dir / "exact-head-kept-stats.npz"
        self.skip = ("exact-head is off in this run (or DP)" if features is None else
                     None if ledger_path.is_file() else f"the ServerApp wrote no stats ledger ({ledger_path})")

    def before(self, report: dict, run=in_subprocess) -> dict:
        """``report``: the train run's; its exact-head accuracy (the ServerApp solved the same
        sums on the same test rows) is taken rather than solved a second time here. ``run(fn,
        *args)``: where the check runs (simulations.driver.processes.one_child)."""
        from simulations.exact_head_check import central_check

        if self.skip:
            print(f"      exact head: not checked ({self.skip})")
            return dict.fromkeys(self.KEYS_BEFORE) | {"exact_head_note": self.skip}
        print("      exact head: the stats ledger's sums vs the central statistics of every trained row")
        server = _server_exact_head(report)
        out = run(central_check, *self.args, self.num_sites, self.removed, self.kept_path, server is None)
        if "exact_head_note" in out:
            self.skip = out["exact_head_note"]
        return out | (server or {})

    def after(self, report: dict, fresh: dict | None = None, run=in_subprocess) -> dict:
        """``fresh``: the fresh aggregation of the staying sites' statistics, when already made."""
        from simulations.exact_head_check import removal_check as stats_removal_check

        if self.skip:
            return dict.fromkeys(self.KEYS_AFTER)
        server = _server_exact_head(report)
        out = run(stats_removal_check, *self.args, self.kept_path, server is None, fresh)
        if server is not None:
            out |= {"accuracy_exact_head_after_removal": server["accuracy_exact_head"],
                    "exact_head_lambda_after_removal": server["exact_head_lambda"]}
        return out


def _server_exact_head(report: dict) -> dict | None:
    """The exact head's accuracy and λ from a ServerApp report, if it evaluated it."""
    if report.get("accuracy_exact_head") is None:
        return None
    return {"accuracy_exact_head": report["accuracy_exact_head"], "exact_head_lambda": report.get("exact_head_lambda"),
            "exact_head_test_images": (report.get("central_evaluation") or {}).get("num_examples")}
