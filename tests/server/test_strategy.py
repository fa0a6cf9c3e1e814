"""LedgerFedAvg: reply validation and ledger recording, with real Flower messages and a real ledger."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from server.ledger import Ledger
from server.strategy import LedgerFedAvg, Rejected, parse_train_reply

BASE = "b" * 64
SHAPES = {"blocks.11.attn.qkv.weight": (6, 4), "norm.bias": (4,), "head.weight": (3, 4)}
SPEC = {"backbone": "vit_small_patch14_dinov2", "img-size": 56, "seed": 0, "linearized-blocks": 1,
        "reinit": True, "linearize-cls": False, "num-classes": 3}


def delta(seed: int, scale: float = 0.01, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def instruction(node_id: int) -> Message:
    return Message(RecordDict({"spec": ConfigRecord(SPEC | {"base-digest": BASE})}), dst_node_id=node_id,
                   message_type="train")


def train_reply(node_id: int, site: str, d: dict, num_examples: int = 100, digest: str = BASE,
                dp: bool = False, epsilon: float = math.inf) -> Message:
    content = RecordDict({
        "delta": _arrays(d),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "train-accuracy": 0.5,
                                 "epsilon": epsilon, "delta": 1e-5 if dp else 0.0, "wall-s": 1.0}),
        "meta": ConfigRecord({"site-id": site, "shard-fingerprint": f"fp-{site}", "base-digest": digest,
                              "data-digest": "dd", "source": "test", "dp": dp, "dp-epsilon": 8.0,
                              "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 0.0,
                              "train-config": json.dumps({"epochs": 1})})})
    return Message(content, reply_to=instruction(node_id))


def _arrays(d: dict) -> ArrayRecord:
    import torch
    return ArrayRecord({k: torch.from_numpy(v) for k, v in d.items()})


def error_reply(node_id: int, site: str, code: str) -> Message:
    record = ConfigRecord({"code": code, "reason": f"{code} at {site}", "site-id": site})
    return Message(RecordDict({"error": record}), reply_to=instruction(node_id))


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
        self.pushed = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

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
