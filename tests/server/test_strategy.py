"""LedgerFedAvg: reply validation and ledger recording, with real Flower messages and a real ledger."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.ledger import Ledger
from server.strategy import LedgerFedAvg, Rejected, parse_train_reply
from tests.server.train_replies import BASE, SHAPES, SPEC, delta, error_reply, instruction, train_reply


pytestmark = pytest.mark.usefixtures("flower_server_identity")


@pytest.fixture
def ledger(tmp_path: Path):
    with Ledger.open(tmp_path / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=100.0,
                     expected_spec=SHAPES) as led:
        yield led


def strategy(ledger) -> LedgerFedAvg:
    return LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)


def test_valid_replies_are_recorded_under_site_ids_and_composed(ledger):
    s = strategy(ledger)
    d1, d2 = delta(1), delta(2)
    arrays, metrics = s.aggregate_train(1, [train_reply(901, "3", d1, 100), train_reply(902, "7", d2, 300)])
    assert sorted(c.site_id for c in ledger.contributions(status="active")) == ["3", "7"]
    assert metrics["recorded"] == 2 and metrics["rejected"] == 0
    expected = {k: (100 * d1[k].astype(np.float64) + 300 * d2[k]) / 400 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k], atol=1e-7)
        assert arrays[k].numpy().tobytes() == ledger.composed_arrays()[k].tobytes()
    summary = s.rounds[1]
    assert summary.recorded == ["3", "7"] and summary.total_examples == 400
    c = ledger.contributions(site_id="3")[0]
    assert c.shard_fingerprint == "fp-3" and c.base_digest == BASE and c.epsilon is None
    assert c.train_config == {"epochs": 1}


def test_rejections_are_counted_with_reasons_and_do_not_cost_other_sites(ledger):
    s = strategy(ledger)
    bad_shape = delta(5, shapes=SHAPES | {"head.weight": (2, 4)})
    nan = delta(6)
    nan["norm.bias"][0] = np.nan
    replies = [
        train_reply(1, "1", delta(1)),
        train_reply(2, "2", delta(2), digest="c" * 64),
        error_reply(3, "3", "budget_exhausted"),
        error_reply(4, "4", "missing_data"),
        Message(Error(code=0, reason="ClientApp crashed"), reply_to=instruction(5)),
        train_reply(6, "6", bad_shape),
        train_reply(7, "7", nan),
        train_reply(8, "8", delta(8, scale=30.0)),  # ‖Δ‖ ≈ 180 > max_delta_norm 100
        train_reply(9, "1", delta(9)),  # second reply for site 1 in this round
        train_reply(10, "10", delta(10), num_examples=0),
        Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=instruction(11)),
    ]
    _, metrics = s.aggregate_train(1, replies)
    summary = s.rounds[1]
    assert summary.recorded == ["1"]
    assert metrics["rejected"] == len(replies) - 1
    assert summary.rejected_by_reason == {
        "base_digest_mismatch": 1, "budget_exhausted": 1, "missing_data": 1, "flower_error": 1,
        "wrong_shape": 1, "non_finite": 1, "norm_too_large": 1, "duplicate_site_in_round": 1,
        "bad_num_examples": 1, "malformed": 1}
    by_reason = {r["reason"]: r for r in summary.rejections}
    assert by_reason["budget_exhausted"]["site_id"] == "3"
    assert by_reason["flower_error"]["node_id"] == 5
    assert [c.site_id for c in ledger.contributions(status="active")] == ["1"]


def test_a_site_contributing_again_replaces_its_contribution(ledger):
    s = strategy(ledger)
    s.aggregate_train(1, [train_reply(1, "a", delta(1)), train_reply(2, "b", delta(2))])
    # next run: node ids are new, the site id is what counts
    arrays, _ = s.aggregate_train(2, [train_reply(77, "a", delta(3))])
    assert s.rounds[2].replaced == ["a"]
    active = {c.site_id: c for c in ledger.contributions(status="active")}
    assert sorted(active) == ["a", "b"] and active["a"].version == 2
    assert [c.status for c in ledger.contributions(site_id="a")] == ["replaced", "active"]
    expected = {k: (delta(3)[k].astype(np.float64) + delta(2)[k]) / 2 for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_allclose(arrays[k].numpy(), expected[k], atol=1e-7)


def test_dp_reply_needs_a_finite_epsilon_and_records_it(ledger):
    s = strategy(ledger)
    s.aggregate_train(1, [train_reply(1, "dp", delta(1), dp=True, epsilon=2.5),
                          train_reply(2, "bad", delta(2), dp=True, epsilon=math.inf)])
    assert s.rounds[1].rejected_by_reason == {"bad_meta": 1}
    c = ledger.contributions(site_id="dp")[0]
    assert c.epsilon == 2.5 and c.delta_dp == 1e-5 and c.dp_settings["dp"] is True


def test_parse_rejects_error_record_with_its_code():
    with pytest.raises(Rejected) as err:
        parse_train_reply(error_reply(1, "9", "base_digest_mismatch"), BASE)
    assert err.value.reason == "base_digest_mismatch" and err.value.site_id == "9"


def test_aggregate_evaluate_weights_by_examples_and_skips_errors(ledger):
    s = strategy(ledger)
    def ev(node, site, n, acc):
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": 1.0,
                                                           "eval-accuracy": acc}),
                                   "meta": ConfigRecord({"site-id": site})}), reply_to=instruction(node))
    metrics = s.aggregate_evaluate(1, [ev(1, "1", 100, 0.9), ev(2, "2", 300, 0.5),
                                       error_reply(3, "3", "no_test_split")])
    assert metrics["eval-accuracy"] == pytest.approx(0.6) and metrics["sites"] == 2
    assert s.rounds[1].evaluate["skipped"][0]["reason"] == "no_test_split"


class _ScriptedGrid:
    """Replies become available in batches, one batch per pull (like sites finishing over time)."""

    def __init__(self, batches):
        self.batches, self.pulls, self.pushed = list(batches), 0, []

    def push_messages(self, messages):
        ids = [f"m{len(self.pushed) + i}" for i, _ in enumerate(messages)]
        self.pushed += ids
        return ids

    def pull_messages(self, ids):
        self.pulls += 1
        return self.batches.pop(0) if self.batches else []

    def get_node_ids(self):
        return [1, 2, 3]


def _reply(ins_id: str) -> Message:
    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_reply_to_message_id"] = ins_id
    return msg


def test_streaming_grid_pushes_eagerly_and_yields_each_reply_as_pulled():
    from server.strategy import StreamingGrid

    grid = _ScriptedGrid([[_reply("m0")], [], [_reply("m2"), _reply("m1")]])
    streaming = StreamingGrid(grid, pull_interval=0.0)
    replies = streaming.send_and_receive([object()] * 3, timeout=30)
    assert grid.pushed == ["m0", "m1", "m2"] and grid.pulls == 0  # pushed before any iteration
    first = next(iter(replies))
    assert first.metadata.reply_to_message_id == "m0" and grid.pulls == 1  # no waiting for the rest
    assert [m.metadata.reply_to_message_id for m in replies] == ["m2", "m1"] and grid.pulls == 3
    assert streaming.get_node_ids() == [1, 2, 3]  # everything else is the wrapped grid's


def test_streaming_grid_stops_at_the_timeout():
    from server.strategy import StreamingGrid

    grid = _ScriptedGrid([[_reply("m0")]])
    replies = list(StreamingGrid(grid, pull_interval=0.01).send_and_receive([object()] * 2, timeout=0.1))
    assert [m.metadata.reply_to_message_id for m in replies] == ["m0"]


class _AnsweringGrid:
    """Every message pushed is answered at the next pull (sites faster than the server); records
    how many were pushed and unanswered at each pull."""

    def __init__(self):
        self.pushed, self.answered, self.in_flight = [], set(), []

    def push_messages(self, messages):
        ids = [f"m{len(self.pushed) + i}" for i, _ in enumerate(messages)]
        self.pushed += ids
        return ids

    def pull_messages(self, ids):
        self.in_flight.append(len(set(self.pushed) - self.answered))
        ready = sorted(set(ids) - self.answered)
        self.answered.update(ready)
        return [_reply(i) for i in ready]


def test_streaming_grid_keeps_at_most_max_in_flight_messages_unanswered():
    """Old code: every message of the round was pushed at once (here 7 unanswered at the first
    pull): replies pile up in the SuperLink, and Flower's simulation engine scans them all."""
    from server.strategy import StreamingGrid

    grid = _AnsweringGrid()
    replies = StreamingGrid(grid, pull_interval=0.0, max_in_flight=2).send_and_receive([object()] * 7, timeout=30)
    assert len(grid.pushed) == 2  # the first window, before any reply is consumed
    got = [m.metadata.reply_to_message_id for m in replies]
    assert sorted(got) == [f"m{i}" for i in range(7)] and len(got) == 7
    assert max(grid.in_flight) == 2

    unbounded = _AnsweringGrid()
    assert len(list(StreamingGrid(unbounded, pull_interval=0.0).send_and_receive([object()] * 7, timeout=30))) == 7
    assert unbounded.in_flight[0] == 7


def test_streaming_grid_refuses_a_negative_window():
    from server.strategy import StreamingGrid

    with pytest.raises(ValueError, match="max_in_flight"):
        StreamingGrid(_AnsweringGrid(), max_in_flight=-1)


def test_privacy_totals_count_every_dp_reply_received_recorded_or_refused(ledger):
    """Old code: the server's totals held recorded contributions only, so a DP reply it refused
    (here a second one from the same site in a round, and one with a wrong base digest) was a
    release no total showed."""
    from server.strategy import privacy_received

    s = strategy(ledger)
    s.aggregate_train(1, [train_reply(901, "3", delta(1), dp=True, epsilon=2.0),
                          train_reply(901, "3", delta(2), dp=True, epsilon=1.5),  # duplicate: refused
                          train_reply(902, "7", delta(3), digest="0" * 64, dp=True, epsilon=1.0),  # refused
                          train_reply(903, "9", delta(4)),  # non-DP: unbounded
                          error_reply(904, "5", "budget_exhausted")])  # no update: nothing released
    s.aggregate_train(2, [train_reply(902, "7", delta(5), dp=True, epsilon=0.5)])
    assert s.rounds[1].rejected_by_reason == {"duplicate_site_in_round": 1, "base_digest_mismatch": 1,
                                               "budget_exhausted": 1}
    totals = privacy_received(s.rounds.values())
    assert totals["3"] == {"epsilon": 3.5, "delta": 2e-5, "replies": 2, "non_dp": 0}
    assert totals["7"] == {"epsilon": 1.5, "delta": 2e-5, "replies": 2, "non_dp": 0}
    assert totals["9"] == {"epsilon": 0.0, "delta": 0.0, "replies": 1, "non_dp": 1}
    assert "5" not in totals
    # the ledger's own totals hold what it recorded only
    assert ledger.privacy_totals()["3"]["epsilon"] == 2.0
