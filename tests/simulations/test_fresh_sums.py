"""The driver's fresh aggregation, split over worker processes, gives the bytes of one process
adding every remaining contribution, and of the ledger's own sums after removals (real SQLite
ledgers of both families)."""
from __future__ import annotations

import numpy as np
import pytest

from server.ledger import Ledger
from simulations.driver.checks import fresh_sums, remaining_sums, removal_check
from simulations.driver.processes import in_background
from tangent.exact_head.row_form import row_arrays
from tangent.exact_head.statistics import grid_meta, quantize

P, CLASSES, CLIP, BITS = 12, 3, 2.0, 16


def delta_ledger(path, rng, removed=("2", "5")):
    with Ledger.open(path) as ledger:
        for site in range(7):
            ledger.add(str(site), {"w": rng.standard_normal((4, 5)).astype(np.float32),
                                   "b": rng.standard_normal(3).astype(np.float32)}, int(rng.integers(1, 50)))
        for site in removed:
            ledger.remove(site)
        return ledger.composed_arrays()


def stats_ledger(path, rng, removed=("0", "6")):
    card = {"stats-meta": grid_meta(P, CLASSES, CLIP, BITS), "feature-spec": {"test": True},
            "model-spec": {"test": True}, "feature-digest": "test"}
    with Ledger.open(path, family="stats", model_card=card) as ledger:
        for site in range(7):
            n = int(rng.integers(2, 9))
            phi = rng.standard_normal((n, P))
            phi *= 0.9 * CLIP / np.linalg.norm(phi, axis=1, keepdims=True)
            ledger.add(str(site), row_arrays(quantize(phi, CLIP, BITS), rng.integers(0, CLASSES, n), BITS), n,
                       base_digest="test")
        for site in removed:
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


@pytest.mark.parametrize("build", [delta_ledger, stats_ledger])
def test_the_staying_sites_summed_while_others_are_removed(tmp_path, build):
    """The driver sums the staying sites in a child process while the unlearn run removes the
    others from the same SQLite file: the sums equal the ledger's after the removals, and a
    removal that was not done is seen."""
    path = tmp_path / "ledger.sqlite"
    build(path, np.random.default_rng(5), removed=())
    removed = {"1", "4"}
    with in_background(remaining_sums, [path], removed) as pending:
        with Ledger.open(path, create=False) as ledger:  # concurrently with the child's reads
            ledger.remove("1")
        (expected, seconds), = pending.result()
    assert seconds > 0
    assert removal_check(path, expected)["removal_bit_identical"] is False  # site 4 is still in
    with Ledger.open(path, create=False) as ledger:
        ledger.remove("4")
    assert removal_check(path, expected)["removal_bit_identical"] is True
    assert removal_check(path)["removal_bit_identical"] is True
