"""What one consistent poisoner moves, and what the quarantine costs (small synthetic federation).

    PYTHONPATH=. python -m benchmarks.poisoning

Ten honest sites (100 rows each, p = 32 features around 5 class centres, the test grid of the exact
head: clip 2.0, 16 fractional bits) and one label-flipping site whose n sweeps 50…1,000 (its share of
the examples 5 %…50 %). Its statistics are consistent (real rows, every label moved to the next
class): the statistics ledger accepts them. Reported: the exact head's accuracy on 2,000 honest test
rows without the flipper, with it (no defence), with the quarantine and the server-held validation
check of server.quarantine.validation_admits (200 server rows, tolerance 0.01), how many of the ten
honest sites that check would hold back (each against the other nine), and the time of a
direct record vs a held record + admit through the real ledgers (SQLite, signed heads).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from server.ledger import Ledger
from server.ledger.ledgers import Ledgers
from server.quarantine import validation_admits
from tangent.exact_head.statistics import SufficientStats, solve

P, K, CLIP, BITS = 32, 5, 2.0, 16
rng = np.random.default_rng(0)
CENTRES = rng.standard_normal((K, P))
CENTRES *= 0.6 / np.linalg.norm(CENTRES, axis=1, keepdims=True)


def rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(seed)
    labels = r.integers(0, K, n)
    return CENTRES[labels] + 0.3 * r.standard_normal((n, P)), labels


def stats(phi, labels) -> SufficientStats:
    return SufficientStats.from_features(phi, labels, K, CLIP, BITS)


def accuracy(total: SufficientStats, test) -> float:
    return float((solve(total).predict(test[0]) == test[1]).mean())


def card() -> dict:
    return {"stats-meta": SufficientStats.zeros(P, K, CLIP, BITS).meta(), "feature-spec": {}, "model-spec": {},
            "feature-digest": "bench"}


def record_times(honest: list[SufficientStats], flipper: SufficientStats) -> dict:
    """ms per contribution: straight into the statistics ledger vs into a held ledger and then admitted."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Ledger.open(tmp / "direct.sqlite", family="stats", model_card=card()) as direct:
            t = time.perf_counter()
            for i, s in enumerate(honest + [flipper]):
                direct.add(f"s{i}", s.to_arrays(), num_examples=s.n, base_digest="bench")
            direct_ms = (time.perf_counter() - t) * 1000 / (len(honest) + 1)
        with Ledger.open(tmp / "main.sqlite", family="stats", model_card=card()) as main, \
                Ledger.open(tmp / "held.sqlite", family="stats", model_card=card()) as held:
            t = time.perf_counter()
            for i, s in enumerate(honest + [flipper]):
                held.add(f"s{i}", s.to_arrays(), num_examples=s.n, base_digest="bench")
                arrays = held.contribution_delta(held.contributions(site_id=f"s{i}", status="active")[0].id)
                main.add(f"s{i}", arrays, num_examples=s.n, base_digest="bench")
                Ledgers(held).retract(f"s{i}", reason="admitted")
            held_ms = (time.perf_counter() - t) * 1000 / (len(honest) + 1)
    return {"direct_ms": round(direct_ms, 1), "held_and_admitted_ms": round(held_ms, 1)}


def main() -> None:
    honest = [stats(*rows(seed, 100)) for seed in range(10)]
    test, validation = rows(1000, 2000), rows(2000, 200)
    clean = SufficientStats.total(honest)
    out = {"clean": accuracy(clean, test), "sweep": []}
    for n in (50, 100, 250, 500, 1000):
        phi, labels = rows(77, n)
        flipper = stats(phi, (labels + 1) % K)
        t = time.perf_counter()
        admitted, _, _ = validation_admits(clean, flipper, *validation)
        check_ms = (time.perf_counter() - t) * 1000
        poisoned = accuracy(clean + flipper, test)
        out["sweep"].append({"flipper_n": n, "share": round(n / (n + clean.n), 3), "no_defence": poisoned,
                             "validation_check_admits": admitted,
                             "with_validation_check": poisoned if admitted else out["clean"],
                             "quarantine_not_admitted": out["clean"], "check_ms": round(check_ms, 1)})
    # the check's other cost: honest sites it would hold back (each checked against the other nine)
    out["honest_refused_by_check"] = sum(
        not validation_admits(SufficientStats.total(honest[:i] + honest[i + 1:]), site, *validation)[0]
        for i, site in enumerate(honest))
    out["record_cost"] = record_times(honest, stats(*rows(77, 500)))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
