"""Site identity bound to the authenticated node, sampling, sticky withdrawal and DP-only runs.

Everything goes through the real LedgerFedAvg with real Flower Messages (a reply's sender is the
``src_node_id`` Flower stamps from the instruction it answers), a real ledger and a real site
registry with real keys.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from deploy.pki import create_site_key
from server.trust.identity import SenderBinding
from server.ledger import Ledger
from server.strategy import LedgerFedAvg
from server.trust.registry import SiteRegistry, key_fingerprint, load_public_key
from tests.server.train_replies import BASE, SHAPES, SPEC, array_record, delta, error_reply, instruction, train_reply

pytestmark = pytest.mark.usefixtures("flower_server_identity")

NODES = {"1": 111, "2": 222, "3": 333, "gone": 444}  # site -> the node id it was registered under
CAP = 500

needs_sticky_ledger = pytest.mark.skipif(not hasattr(Ledger, "withdrawn_sites"),
                                         reason="needs the ledger's sticky withdrawal")


@pytest.fixture
def registry(tmp_path) -> SiteRegistry:
    sites = {}
    for site, node in NODES.items():
        _, pub = create_site_key(tmp_path / "keys", site)
        sites[site] = {"public_key": f"keys/{pub.name}", "fingerprint": key_fingerprint(load_public_key(pub)),
                       "node_id": node, "max_examples": CAP, "registered_at": "2026-11-30T00:00:00Z",
                       "revoked": site == "gone"}
    (tmp_path / "registry.json").write_text(json.dumps({"version": 2, "sites": sites}))
    return SiteRegistry(tmp_path / "registry.json")


@pytest.fixture
def ledger(tmp_path):
    with Ledger.open(tmp_path / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=100.0,
                     expected_spec=SHAPES) as led:
        yield led


def deployed(ledger, registry, **kwargs) -> LedgerFedAvg:
    return LedgerFedAvg(ledger, SPEC, BASE, binding=SenderBinding(registry), min_available_nodes=1,
                        min_train_nodes=1, min_evaluate_nodes=1, **kwargs)


def reasons(strategy, server_round=1) -> dict:
    return strategy.rounds[server_round].rejected_by_reason


def test_a_registered_node_posing_as_another_site_is_refused_and_the_victim_is_untouched(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [train_reply(NODES["2"], "2", delta(2))])
    victim = ledger.contributions(site_id="2")[0]
    victim_bytes = ledger.contribution_delta(victim.id)

    # node 111 (site 1) replies as site 2 with 10x the examples: replace the victim, outweigh everyone
    s.aggregate_train(2, [train_reply(NODES["1"], "2", delta(9), num_examples=CAP)])
    assert reasons(s, 2) == {"site_identity_mismatch": 1}
    row = s.rounds[2].rejections[0]
    assert row["site_id"] == "1" and row["declared_site_id"] == "2" and row["node_id"] == NODES["1"]
    after = ledger.contributions(site_id="2")
    assert [c.status for c in after] == ["active"] and after[0].id == victim.id
    assert all(np.array_equal(ledger.contribution_delta(victim.id)[k], victim_bytes[k]) for k in SHAPES)
    assert ledger.contributions(site_id="1") == []


def test_unknown_nodes_invented_sites_revoked_keys_and_inflated_counts_are_refused(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [
        train_reply(999, "1", delta(1)),                        # a node no site was registered under
        train_reply(NODES["3"], "brand-new", delta(2)),         # invents a site id
        train_reply(NODES["gone"], "gone", delta(3)),           # its key was revoked
        train_reply(NODES["2"], "2", delta(4), num_examples=CAP + 1),  # above the registered cap
        train_reply(NODES["3"], "3", delta(5), num_examples=CAP),      # exactly the cap: fine
    ])
    assert reasons(s) == {"unknown_site": 2, "site_revoked": 1, "num_examples_over_cap": 1}
    invented = next(r for r in s.rounds[1].rejections if r.get("declared_site_id") == "brand-new")
    assert invented["site_id"] == "3" and invented["reason"] == "unknown_site"
    assert s.rounds[1].recorded == ["3"]
    assert [c.site_id for c in ledger.contributions()] == ["3"]


def test_an_error_reply_is_attributed_to_the_registered_site(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [error_reply(NODES["1"], "3", "budget_exhausted")])
    row = s.rounds[1].rejections[0]
    assert row["reason"] == "budget_exhausted" and row["site_id"] == "1" and row["declared_site_id"] == "3"


def test_evaluate_replies_are_bound_too(ledger, registry):
    s = deployed(ledger, registry)

    def ev(node, site):
        metrics = MetricRecord({"num-examples": 10, "eval-loss": 1.0, "eval-accuracy": 0.5})
        return Message(RecordDict({"metrics": metrics, "meta": ConfigRecord({"site-id": site})}),
                       reply_to=instruction(node))
    s.aggregate_evaluate(1, [ev(NODES["1"], "1"), ev(NODES["2"], "1"), ev(7, "3")])
    assert list(s.rounds[1].evaluate["sites"]) == ["1"]
    assert s.rounds[1].evaluate["skipped_by_reason"] == {"site_identity_mismatch": 1, "unknown_site": 1}


def _evaluate(node: int, site: str, **metrics) -> Message:
    values = {"num-examples": 10, "eval-loss": 1.0, "eval-accuracy": 0.6} | metrics
    return Message(RecordDict({"metrics": MetricRecord(values), "meta": ConfigRecord({"site-id": site})}),
                   reply_to=instruction(node))


@pytest.mark.parametrize("lie, reason", [
    ({"eval-accuracy": 17.07}, "bad_metrics"), ({"eval-accuracy": -0.1}, "bad_metrics"),
    ({"eval-loss": 1e6}, "bad_metrics"), ({"eval-loss": -1.0}, "bad_metrics"),
    ({"eval-accuracy": 1.0, "num-examples": CAP + 1}, "num_examples_over_cap"),
])
def test_an_evaluate_reply_cannot_move_the_federated_metrics_beyond_its_registered_weight(ledger, registry, lie,
                                                                                           reason):
    """Two honest sites at accuracy 0.6; a third site lies. Before: the federated accuracy went to
    17.07 or (one site with a huge count at 1.0) to ≈ 1.0. Now the lie is refused with a reason and
    the federated metrics are the honest ones."""
    s = deployed(ledger, registry)
    metrics = s.aggregate_evaluate(1, [_evaluate(NODES["1"], "1"), _evaluate(NODES["2"], "2"),
                                       _evaluate(NODES["3"], "3", **lie)])
    assert s.rounds[1].evaluate["skipped_by_reason"] == {reason: 1}
    assert metrics["eval-accuracy"] == pytest.approx(0.6) and metrics["eval-loss"] == pytest.approx(1.0)
    assert list(s.rounds[1].evaluate["sites"]) == ["1", "2"]


def test_evaluate_ranges_hold_in_the_simulation_too(ledger):
    s = LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    metrics = s.aggregate_evaluate(1, [_evaluate(1, "0"), _evaluate(2, "1", **{"eval-accuracy": 17.07})])
    assert s.rounds[1].evaluate["skipped_by_reason"] == {"bad_metrics": 1}
    assert metrics["eval-accuracy"] == pytest.approx(0.6)


def test_simulation_keeps_partition_ids(ledger):
    s = LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    s.aggregate_train(1, [train_reply(5, "0", delta(1)), train_reply(6, "1", delta(2), num_examples=10_000)])
    assert s.rounds[1].recorded == ["0", "1"]


def test_odd_site_ids_are_refused_and_the_report_survives_them(ledger, registry):
    s = LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    odd = ["²", "٣", "1\n", "a/b", "x" * 65, "\ud800", ""]
    s.aggregate_train(1, [train_reply(i, site, delta(i)) for i, site in enumerate(odd)])
    assert reasons(s) == {"bad_site_id": len(odd)} and ledger.contributions() == []
    json.dumps(s.rounds[1].as_dict())  # no default=str needed: every field is plain


# ----------------------------------------------------------------------------- DP runs

def dp_reply(node_id: int, site: str, d: dict, contribution_id: str = "ab" * 16) -> Message:
    """The DP reply form (server/replies.py): nothing beyond these fields."""
    content = RecordDict({
        "delta": array_record(d),
        "metrics": MetricRecord({"num-examples": 256, "epsilon": 1.5, "delta": 1e-6}),
        "meta": ConfigRecord({"site-id": site, "base-digest": BASE, "contribution-id": contribution_id, "dp": True,
                              "dp-epsilon": 1.5, "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 1.2,
                              "train-config": json.dumps({"dp": True, "epochs": 1})})})
    return Message(content, reply_to=instruction(node_id))


def test_a_dp_run_refuses_non_dp_replies_and_keeps_the_contribution_id(ledger, registry):
    s = deployed(ledger, registry, require_dp=True)
    s.aggregate_train(1, [train_reply(NODES["1"], "1", delta(1)),  # dp=False
                          dp_reply(NODES["2"], "2", delta(2)),
                          dp_reply(NODES["3"], "3", delta(3), contribution_id="not-hex")])
    assert reasons(s) == {"not_private": 1, "bad_meta": 1} and s.rounds[1].recorded == ["2"]
    c = ledger.contributions(site_id="2")[0]
    assert c.extra["contribution_id"] == "ab" * 16 and c.epsilon == 1.5 and c.delta_dp == 1e-6
    assert c.shard_fingerprint is None and c.dp_settings["noise_multiplier"] == 1.2
    assert s.rounds[1].site_metrics["2"] == {"num-examples": 256, "epsilon": 1.5, "delta": 1e-6}


def test_a_run_without_dp_accepts_both_forms(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [train_reply(NODES["1"], "1", delta(1)), dp_reply(NODES["2"], "2", delta(2))])
    assert s.rounds[1].recorded == ["1", "2"]
    assert ledger.contributions(site_id="1")[0].epsilon is None
    assert math.isfinite(ledger.contributions(site_id="2")[0].epsilon)


def test_dp_flag_must_be_a_boolean(ledger):
    s = LedgerFedAvg(ledger, SPEC, BASE, require_dp=True, min_available_nodes=1, min_train_nodes=1,
                     min_evaluate_nodes=1)
    reply = dp_reply(1, "1", delta(1))
    reply.content.config_records["meta"]["dp"] = "true"  # truthy, but not the protocol's boolean
    s.aggregate_train(1, [reply])
    assert reasons(s) == {"bad_meta": 1}


# ----------------------------------------------------------------------------- sampling, sticky withdrawal

class NodesGrid:
    """The part of a Grid that sampling reads: the connected node ids."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def sampled(strategy, grid, server_round=1) -> set[int]:
    messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord({}), grid)
    return {m.metadata.dst_node_id for m in messages}


@needs_sticky_ledger
def test_withdrawn_and_revoked_sites_are_not_sampled(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [train_reply(NODES[x], x, delta(i)) for i, x in enumerate(("1", "2", "3"))])
    ledger.remove("2", reason="withdrawal request")
    grid = NodesGrid([*NODES.values(), 999])
    assert sampled(s, grid, 2) == {NODES["1"], NODES["3"]}
    assert {(r["site_id"], r["reason"]) for r in s.rounds[2].not_sampled} == {("2", "site_withdrawn"),
                                                                              ("gone", "site_revoked"),
                                                                              (None, "unknown_node")}
    # node 999 is authenticated by the SuperLink but unknown to the registry: it is sent neither
    # the spec nor the composed model
    evaluators = s.configure_evaluate(2, ArrayRecord(), ConfigRecord({}), grid)
    assert {m.metadata.dst_node_id for m in evaluators} == {NODES["1"], NODES["3"]}
    assert all(m.metadata.dst_node_id != 999 for m in evaluators)


@needs_sticky_ledger
def test_a_withdrawn_site_that_keeps_replying_is_not_re_added(ledger, registry):
    s = deployed(ledger, registry)
    s.aggregate_train(1, [train_reply(NODES["1"], "1", delta(1)), train_reply(NODES["2"], "2", delta(2))])
    assert ledger.remove("2", reason="withdrawal request")
    composed = ledger.composed_arrays()
    for server_round in (2, 3):  # its SuperNode is still running and still answers
        s.aggregate_train(server_round, [train_reply(NODES["2"], "2", delta(10 + server_round))])
        assert reasons(s, server_round) == {"site_withdrawn": 1}
    assert [c.status for c in ledger.contributions(site_id="2")] == ["removed"]
    assert all(np.array_equal(ledger.composed_arrays()[k], composed[k]) for k in SHAPES)
    ledger.verify()


def test_sampling_in_simulation_is_fedavgs(ledger):
    s = LedgerFedAvg(ledger, SPEC, BASE, min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
    assert sampled(s, NodesGrid([1, 2, 3])) == {1, 2, 3}
