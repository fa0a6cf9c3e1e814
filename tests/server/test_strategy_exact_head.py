"""One reply, both models: LedgerFedAvg records each site's Δw and its exact-head
statistics in two real ledgers, keeps them consistent when the statistics ledger refuses, and
:class:`server.ledger.ledgers.Ledgers` removes a site from both — bit-identical to ledgers that never had it."""
from __future__ import annotations

from pathlib import Path

import pytest

from server.ledger import Ledger
from server.ledger.ledgers import Ledgers
from server.strategy import LedgerFedAvg
from tangent.exact_head.statistics import SufficientStats
from tests.server.exact_head_replies import (BASE, EXPECT, SHAPES, SPEC, build, delta, npy, open_stats_ledger,
                                             reply_parts, site_stats, train_reply)

pytestmark = pytest.mark.usefixtures("flower_server_identity")
SIZES = {"1": 40, "2": 70, "3": 25}


def open_ledgers(directory: Path) -> Ledgers:
    directory.mkdir(parents=True, exist_ok=True)
    delta_ledger = Ledger.open(directory / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=100.0,
                               expected_spec=SHAPES)
    return Ledgers(delta_ledger, open_stats_ledger(directory / "exact_head.sqlite"))


@pytest.fixture
def ledgers(tmp_path):
    both = open_ledgers(tmp_path / "run")
    yield both
    for ledger in both.all():
        ledger.close()


def strategy(ledgers: Ledgers) -> LedgerFedAvg:
    return LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats, exact_head=EXPECT,
                        min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)


def replies(sites) -> list:
    return [train_reply(900 + int(site), site, delta(int(site)), site_stats(int(site), SIZES[site])) for site in sites]


def active(ledger: Ledger) -> list[str]:
    return sorted(c.site_id for c in ledger.contributions(status="active"))


def same_models(a: Ledgers, b: Ledgers) -> bool:
    """Both models bit for bit: the composed Δ's bytes and the composed statistics' int64 sums."""
    da, db = a.delta.composed_arrays(), b.delta.composed_arrays()
    sa, sb = a.stats.composed_arrays(), b.stats.composed_arrays()
    return (da.keys() == db.keys() and all(da[k].tobytes() == db[k].tobytes() for k in da)
            and sa.keys() == sb.keys() and all(sa[k].tobytes() == sb[k].tobytes() for k in sa))


def test_one_reply_records_both_models_and_removal_leaves_ledgers_that_never_had_the_site(ledgers, tmp_path):
    s = strategy(ledgers)
    _, metrics = s.aggregate_train(1, replies(["1", "2", "3"]))
    summary = s.rounds[1]
    assert metrics["recorded"] == 3 and summary.stats_recorded == ["1", "2", "3"] and summary.retracted == []
    assert active(ledgers.delta) == active(ledgers.stats) == ["1", "2", "3"]
    expected = SufficientStats.total(site_stats(int(site), n) for site, n in SIZES.items())
    assert ledgers.stats.composed_stats() == expected  # the exact sum of the three sites' statistics
    received = sum(len(npy(a)) for site, n in SIZES.items() for a in site_stats(int(site), n).to_arrays().values())
    assert summary.stats_bytes == received and summary.stats_version == ledgers.stats.current_version().version

    assert ledgers.remove("2", reason="test: withdrawal") is True
    assert active(ledgers.delta) == active(ledgers.stats) == ["1", "3"]
    assert ledgers.delta.withdrawn_sites() == ledgers.stats.withdrawn_sites() == ["2"]
    assert ledgers.remove("2", reason="again") is False  # withdrawn everywhere already

    fresh = open_ledgers(tmp_path / "fresh")
    try:
        strategy(fresh).aggregate_train(1, replies(["1", "3"]))
        assert same_models(ledgers, fresh)
        assert ledgers.stats.composed_stats() == fresh.stats.composed_stats()
    finally:
        for ledger in fresh.all():
            ledger.close()
    for ledger in ledgers.all():
        ledger.verify()

    # a withdrawn site's SuperNode keeps replying: neither model takes it back
    s.aggregate_train(2, [train_reply(902, "2", delta(22), site_stats(22, 30))])
    assert s.rounds[2].rejected_by_reason == {"site_withdrawn": 1}
    assert active(ledgers.delta) == active(ledgers.stats) == ["1", "3"]


def test_a_bad_statistics_record_refuses_the_whole_reply(ledgers):
    s = strategy(ledgers)
    bad = reply_parts("4", delta(4), 30, stats=site_stats(4, 30))
    bad["stats-meta"] = ("config", dict(bad["stats-meta"][1]) | {"frac-bits": 12})
    s.aggregate_train(1, replies(["1"]) + [build(bad, 904)])
    assert s.rounds[1].rejected_by_reason == {"stats_grid_mismatch": 1}
    assert active(ledgers.delta) == active(ledgers.stats) == ["1"]  # the Δw of site 4 was not recorded either
    assert ledgers.delta.contributions(site_id="4") == []


def _out_of_bounds(site: str, seed: int, n: int):
    """A reply whose statistics pass every reply check but not the statistics ledger's bounds
    (class counts that do not sum to n: ``stats_out_of_bounds``)."""
    stats = site_stats(seed, n)
    parts = reply_parts(site, delta(seed), n, stats=stats)
    counts = stats.counts.copy()
    counts[0] += 1
    arrays = dict(parts["stats"][1])
    from flwr.app import Array
    arrays["counts"] = Array(counts)
    parts["stats"] = ("array", arrays)
    return build(parts, 900 + int(site))


def test_statistics_refused_by_their_ledger_take_the_new_delta_back_out(ledgers):
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "2"]))
    before = {k: v.tobytes() for k, v in ledgers.delta.composed_arrays().items()}
    s.aggregate_train(2, [_out_of_bounds("5", 5, 30)])  # a new site
    assert s.rounds[2].rejected_by_reason == {"stats_out_of_bounds": 1} and s.rounds[2].retracted == ["5"]
    assert active(ledgers.delta) == active(ledgers.stats) == ["1", "2"]
    assert {k: v.tobytes() for k, v in ledgers.delta.composed_arrays().items()} == before
    assert [c.status for c in ledgers.delta.contributions(site_id="5")] != ["active"]
    assert "5" not in ledgers.delta.withdrawn_sites()  # retracted, not withdrawn: it may send a good reply

    # a site that contributed before: its new Δw and its old statistics both leave (the old Δw's
    # bytes were erased by the replace): both models hold the same sites, never one without the other
    s.aggregate_train(3, [_out_of_bounds("2", 12, 50)])
    assert s.rounds[3].rejected_by_reason == {"stats_out_of_bounds": 1} and s.rounds[3].retracted == ["2"]
    assert active(ledgers.delta) == active(ledgers.stats) == ["1"]
    assert ledgers.stats.composed_stats() == site_stats(1, SIZES["1"])
    for ledger in ledgers.all():
        ledger.verify()
    # both come back with good replies (site 2 with the very statistics that were retracted)
    s.aggregate_train(4, [train_reply(902, "2", delta(222), site_stats(2, SIZES["2"])),
                          train_reply(905, "5", delta(55), site_stats(55, 30))])
    assert s.rounds[4].rejections == []
    assert active(ledgers.delta) == active(ledgers.stats) == ["1", "2", "5"]


def test_a_site_withdrawn_in_the_statistics_ledger_only_is_refused_in_both(ledgers):
    ledgers.stats.remove("3", reason="test: withdrawn in the statistics ledger only")
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "3"]))
    assert s.rounds[1].rejected_by_reason == {"stats_site_withdrawn": 1}
    assert active(ledgers.delta) == active(ledgers.stats) == ["1"]


def test_the_same_statistics_with_a_new_delta_keep_the_statistics_version(ledgers):
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "2"]))
    stats_version = ledgers.stats.current_version().version
    s.aggregate_train(2, [train_reply(901, "1", delta(101), site_stats(1, SIZES["1"]))])  # same data, new Δw
    assert s.rounds[2].replaced == ["1"] and s.rounds[2].stats_recorded == ["1"]
    assert ledgers.stats.current_version().version == stats_version
    s.aggregate_train(3, [train_reply(901, "1", delta(102), site_stats(7, SIZES["1"]))])  # new data
    assert ledgers.stats.current_version().version == stats_version + 1
    assert ledgers.stats.composed_stats() == site_stats(7, SIZES["1"]) + site_stats(2, SIZES["2"])


def test_a_dp_reply_takes_the_sites_older_statistics_out(ledgers):
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "2"]))
    s.aggregate_train(2, [train_reply(901, "1", delta(31), None, num_examples=128, dp=True)])
    assert s.rounds[2].recorded == ["1"] and s.rounds[2].stats_recorded == []
    assert active(ledgers.delta) == ["1", "2"] and active(ledgers.stats) == ["2"]
    assert ledgers.stats.composed_stats() == site_stats(2, SIZES["2"])
    assert "1" not in ledgers.stats.withdrawn_sites()


def test_the_strategy_needs_both_the_statistics_ledger_and_the_expectation(ledgers):
    with pytest.raises(ValueError, match="both"):
        LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats)
    with pytest.raises(ValueError, match="both"):
        LedgerFedAvg(ledgers.delta, SPEC, BASE, exact_head=EXPECT)


def test_removal_reaches_the_other_ledger_when_one_fails(ledgers, tmp_path):
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "2"]))
    # the Δ ledger opened without its signing key can be read, not changed: its remove raises
    read_only = Ledger.open(ledgers.delta.path, signing_key=tmp_path / "no-such-key.pem")
    try:
        with pytest.raises(Exception, match="signing key"):
            Ledgers(read_only, ledgers.stats).remove("1", reason="test")
    finally:
        read_only.close()
    assert active(ledgers.stats) == ["2"]  # the statistics are gone although the other ledger failed
    assert active(ledgers.delta) == ["1", "2"]
    assert ledgers.remove("1", reason="retried") is True  # the retry finishes the job
    assert active(ledgers.delta) == active(ledgers.stats) == ["2"]
