"""The DP exact head's checks around the unlearn run of a DP simulation (``--dp-epsilon``), each in a
child process (simulations.driver.processes.in_subprocess).

The exact head's central check (the ledger's sums == the statistics of every trained row computed
centrally) cannot apply to noisy statistics: the noise was drawn at the sites and never left them.
What can be checked, and is, bit for bit:

- ``dp_head_sum_equals_releases``: the statistics ledger's composed sums == a fresh sum, from zero,
  of every active site's release as the ledger stored it (the bytes the site sent, whose sha256 the
  ledger's signed audit chain records);
- ``dp_head_removal_bit_identical``: after the unlearn run, the composed sums == the fresh sum of
  the releases of the sites that stay, taken before the removal (so the removed sites' noise left
  with them), and == a fresh sum of what the ledger then holds.

The head is solved from the composed noisy sums and the summed noise variances the releases
declared (server.exact_head.solve_dp_head) and scored on the test set's φ; the public centre is
recomputed here from its seed (tangent.exact_head.public_centre) and must have the digest the
ledger's model card pins. ``dp_epsilon_spent_max`` / ``dp_delta``: per site, Σ of (ε, δ) over every
contribution of the Δ ledger — each the composition of DP-TAFT and the head's release, which the
statistics ledger records alone (a part of the contribution's ε, not an extra charge) — the
largest over the sites.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from simulations.driver.processes import in_subprocess


def composed_equals_fresh(stats_path: Path, kept: list[str], kept_path: Path) -> dict:
    """The ledger's composed sums vs a fresh sum of every active release; the fresh sum of the
    releases of ``kept`` is saved for the check after removal."""
    from server.ledger import Ledger
    from simulations.driver.checks import fresh_sums, stored_bytes_per_site

    start = time.perf_counter()
    with Ledger.open(stats_path, create=False, family="stats") as ledger:
        composed = ledger.composed_arrays()
    fresh, _, _ = fresh_sums(stats_path)
    kept_sums, _, _ = fresh_sums(stats_path, set(kept))
    np.savez(kept_path, **kept_sums)
    return {"dp_head_sum_equals_releases": _same(composed, fresh), "dp_head_check_s": time.perf_counter() - start,
            "exact_head_stored_bytes_per_site": stored_bytes_per_site(stats_path)}


def removal_equals_kept(stats_path: Path, kept_path: Path) -> dict:
    from server.ledger import Ledger
    from simulations.driver.checks import fresh_sums

    with Ledger.open(stats_path, create=False, family="stats") as ledger:
        composed = ledger.composed_arrays()
    with np.load(kept_path) as saved:
        kept = {k: saved[k] for k in saved.files}
    fresh, _, _ = fresh_sums(stats_path)
    return {"dp_head_removal_bit_identical": _same(composed, kept) and _same(composed, fresh)}


def _same(a: dict, b: dict) -> bool:
    """Non-empty and byte-identical (simulations.driver.checks.same_arrays)."""
    from simulations.driver.checks import same_arrays

    return bool(a) and same_arrays(a, b)


def head_accuracy(spec, features: dict, stats_path: Path, cache_dir: Path | None, source: str, config: dict) -> dict:
    """The DP head solved from the ledger's noisy sums and declared noise, on the test set's φ."""
    from server.evaluation import evaluation_indices
    from server.exact_head import dp_head_request, solve_dp_head, with_release_noise
    from server.ledger import Ledger
    from simulations.exact_head_check import PhiRows, extractor_for
    from tangent.exact_head.public_centre import public_centre

    start = time.perf_counter()
    extractor = extractor_for(spec, features)
    request = dp_head_request(config, {"dp-head-centre": public_centre(extractor)})
    with Ledger.open(stats_path, create=False, family="stats") as ledger:
        pinned = ledger.model_card["dp-head"]
        if pinned["centre-digest"] != request.centre_digest or (pinned["dim"], pinned["seed"]) != (request.dim,
                                                                                                    request.seed):
            raise ValueError(f"the statistics ledger pins the DP head {pinned}, this run's is "
                             f"{request.card()}: not the same rows")
        total = ledger.composed_stats()
        if total is None:
            return {"accuracy_exact_head": None, "exact_head_note": "no active release"}
        total = with_release_noise(total, ledger, request)
    head = solve_dp_head(total)
    test = PhiRows(extractor, source, "test", cache_dir)
    rows = evaluation_indices(len(test.labels), config)
    correct = sum(int((head.predict(phi) == test.labels[chunk]).sum()) for chunk, phi in test.chunks(rows))
    return {"accuracy_exact_head": correct / len(rows), "exact_head_lambda": float(head.lam),
            "exact_head_test_images": len(rows), "dp_head_releases": int(total.dp["releases"]),
            "dp_head_noise_variance": float(total.dp["noise_variance"]), "dp_head_solve_s": time.perf_counter() - start}


def privacy_spent(ledger_path: Path) -> dict:
    """Per site Σ (ε, δ) over the Δ ledger's contributions (each the composition of DP-TAFT and
    the head's release; every contribution ever recorded), the largest."""
    from server.ledger import Ledger

    per_site: dict[str, list[float]] = {}
    with Ledger.open(ledger_path, create=False, family="delta") as ledger:
        for site, total in ledger.privacy_totals().items():
            per_site[site] = [total["epsilon"], total["delta"]]
    if not per_site:
        return {"dp_epsilon_spent_max": None, "dp_delta": None}
    return {"dp_epsilon_spent_max": max(e for e, _ in per_site.values()),
            "dp_delta": max(d for _, d in per_site.values()), "dp_sites_charged": len(per_site)}


class DPHeadStep:
    """The DP head's checks and accuracy before and after the unlearn run (module docstring)."""

    def __init__(self, spec, features: dict, ledger_path: Path, stats_path: Path, cache_dir, sources: dict,
                 config: dict, removed: list[str], run_dir: Path):
        self.spec, self.features, self.ledger_path, self.stats_path = spec, features, ledger_path, stats_path
        self.cache_dir, self.test_source, self.config = cache_dir, sources["test"], config
        self.removed = removed
        self.kept_path = run_dir / "dp-head-kept-sums.npz"

    def _accuracy(self, run) -> dict:
        if self.test_source is None:
            return {"accuracy_exact_head": None}
        return run(head_accuracy, self.spec, self.features, self.stats_path, self.cache_dir,
                             self.test_source, self.config)

    def before(self, active: list[str], run=in_subprocess) -> dict:
        """``run(fn, *args)``: where the checks run (simulations.driver.processes.one_child)."""
        if not self.stats_path.is_file():
            return {"accuracy_exact_head": None, "exact_head_note": f"no statistics ledger at {self.stats_path}"}
        print("      DP head: ledger sums vs a fresh sum of the releases as stored; the head from the noisy sums")
        kept = [site for site in active if site not in set(self.removed)]
        return (run(composed_equals_fresh, self.stats_path, kept, self.kept_path) | self._accuracy(run)
                | run(privacy_spent, self.ledger_path))

    def after(self, run=in_subprocess) -> dict:
        if not self.kept_path.is_file():
            return {"dp_head_removal_bit_identical": None, "accuracy_exact_head_after_removal": None}
        out = run(removal_equals_kept, self.stats_path, self.kept_path)
        after = self._accuracy(run)
        return out | {"accuracy_exact_head_after_removal": after.get("accuracy_exact_head")}
