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


@pytest.mark.parametrize("stacked_rows", [1, 5, 10_000])
def test_row_forms_summed_as_stacks_give_the_ledgers_integers_beside_gram_forms(tmp_path, monkeypatch, stacked_rows):
    """Rows are stacked and their statistics added once a stack is full; sites stored in the Gram
    form (more rows than the row form is worth) are added as they are. Any stack size gives the
    bytes of the ledger's own sums."""
    from simulations.driver import checks
    from tangent.exact_head.row_form import smaller_form

    monkeypatch.setattr(checks, "STACKED_ROWS", stacked_rows)
    rng = np.random.default_rng(6)
    card = {"stats-meta": grid_meta(P, CLASSES, CLIP, BITS), "feature-spec": {"test": True},
            "model-spec": {"test": True}, "feature-digest": "test"}
    sizes = [3, 40, 2, 7, 60, 1, 5]
    assert {smaller_form(n, P, CLASSES) for n in sizes} == {"rows", "gram"}
    with Ledger.open(tmp_path / "ledger.sqlite", family="stats", model_card=card) as ledger:
        for site, n in enumerate(sizes):
            phi = rng.standard_normal((n, P))
            phi *= 0.9 * CLIP / np.linalg.norm(phi, axis=1, keepdims=True)
            ledger.add(str(site), row_arrays(quantize(phi, CLIP, BITS), rng.integers(0, CLASSES, n), BITS), n,
                       base_digest="test")
        ledger.remove("3")
        composed = ledger.composed_arrays()
    arrays, _, total = fresh_sums(tmp_path / "ledger.sqlite", workers=1)
    assert total == len(sizes) - 1
    assert arrays.keys() == composed.keys() and all(arrays[k].tobytes() == composed[k].tobytes() for k in composed)
