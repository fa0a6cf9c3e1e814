"""The driver's fresh aggregation, split over worker processes, gives the bytes of one process
adding every remaining contribution, and of the ledger's own sums after removals (real SQLite
ledgers of both families)."""
from __future__ import annotations

import numpy as np
import pytest

from server.ledger import Ledger
from simulations.driver.checks import fresh_sums
from tangent.exact_head.row_form import row_arrays
from tangent.exact_head.statistics import grid_meta, quantize

P, CLASSES, CLIP, BITS = 12, 3, 2.0, 16


def delta_ledger(path, rng):
    with Ledger.open(path) as ledger:
        for site in range(7):
            ledger.add(str(site), {"w": rng.standard_normal((4, 5)).astype(np.float32),
                                   "b": rng.standard_normal(3).astype(np.float32)}, int(rng.integers(1, 50)))
        for site in ("2", "5"):
            ledger.remove(site)
        return ledger.composed_arrays()


def stats_ledger(path, rng):
    card = {"stats-meta": grid_meta(P, CLASSES, CLIP, BITS), "feature-spec": {"test": True},
            "model-spec": {"test": True}, "feature-digest": "test"}
    with Ledger.open(path, family="stats", model_card=card) as ledger:
        for site in range(7):
            n = int(rng.integers(2, 9))
            phi = rng.standard_normal((n, P))
            phi *= 0.9 * CLIP / np.linalg.norm(phi, axis=1, keepdims=True)
            ledger.add(str(site), row_arrays(quantize(phi, CLIP, BITS), rng.integers(0, CLASSES, n), BITS), n,
                       base_digest="test")
        for site in ("0", "6"):
            ledger.remove(site)
        return ledger.composed_arrays()


@pytest.mark.parametrize("build", [delta_ledger, stats_ledger])
def test_shares_in_processes_add_up_to_the_bytes_of_one(tmp_path, build):
    path = tmp_path / "ledger.sqlite"
    composed = build(path, np.random.default_rng(3))
    one = fresh_sums(path, workers=1)
    split = fresh_sums(path, workers=3)
    assert one[1].keys() == split[1].keys() and all(one[1][k] == split[1][k] for k in one[1])
    assert one[2] == split[2]
    for arrays in (one[0], split[0]):
        assert arrays.keys() == composed.keys()
        assert all(arrays[k].tobytes() == composed[k].tobytes() for k in composed)


def test_a_share_that_misses_a_contribution_is_seen(tmp_path):
    path = tmp_path / "ledger.sqlite"
    composed = delta_ledger(path, np.random.default_rng(4))
    with Ledger.open(path, create=False) as ledger:
        sites = {c.site_id for c in ledger.contributions(status="active")}
    fewer, _, _ = fresh_sums(path, sites - {"3"}, workers=2)
    assert any(fewer[k].tobytes() != composed[k].tobytes() for k in composed)
