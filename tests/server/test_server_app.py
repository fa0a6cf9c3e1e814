"""The ServerApp's run logic on a real ledger: deployment refuses remove-sites, a failing round still
leaves its rounds in the report. (The full app with the ViT runs in tests/simulations.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from deploy.pki import create_site_key
from server.ledger import Ledger
from server.server_app import REMOVE_SITES_REFUSED, train, unlearn
from server.trust.registry import SiteRegistry, key_fingerprint
from server.trust.withdrawal import create_request, load_private_key, load_public_key


def central(delta, stats=None) -> dict:
    """Stands in for CentralEvaluation (the ViT): the test is about which sites are removed."""
    return {"accuracy": 0.5, "loss": 1.0, "num-examples": 1}


@pytest.fixture
def state(tmp_path):
    state = tmp_path / "state"
    keys = state / "keys"
    sites = {}
    for node, site in enumerate(("1", "2", "3"), start=1):
        _, pub = create_site_key(keys, site)
        sites[site] = {"public_key": f"keys/{pub.name}", "fingerprint": key_fingerprint(load_public_key(pub)),
                       "node_id": node, "max_examples": 100, "registered_at": "2026-11-30T00:00:00Z",
                       "revoked": False}
    _, admin = create_site_key(keys, "admin")
    (state / "registry.json").write_text(json.dumps({"version": 2, "sites": sites, "admin": {
        "public_key": f"keys/{admin.name}", "fingerprint": key_fingerprint(load_public_key(admin))}}))
    rng = np.random.default_rng(0)
    with Ledger.open(state / "ledger.sqlite") as ledger:
        for site in sites:
            ledger.add(site, {"w": rng.standard_normal(4).astype(np.float32)}, 10)
    return state


def test_deployment_refuses_remove_sites_and_obeys_an_operator_signed_request(state):
    registry = SiteRegistry(state / "registry.json")
    admin_request = create_request("3", load_private_key(state / "keys" / "site-admin.key"), "operator decision",
                                   signer="admin")
    (state / "w3.json").write_text(json.dumps(admin_request))
    with Ledger.open(state / "ledger.sqlite") as ledger:
        result = unlearn(ledger, ["1", "2"], central, 9, requests=["w3.json"], registry=registry,
                          ledger_path=state / "ledger.sqlite", state=state, federation="deployment")
        active = sorted(c.site_id for c in ledger.contributions(status="active"))
    assert result["remove_sites_refused"] == {"sites": ["1", "2"], "reason": REMOVE_SITES_REFUSED}
    assert "signer='admin'" in REMOVE_SITES_REFUSED
    assert result["removed_sites"] == ["3"] and active == ["1", "2"]


def test_deployment_with_only_remove_sites_removes_nothing(state):
    with Ledger.open(state / "ledger.sqlite") as ledger:
        before = ledger.current_version().version
        result = unlearn(ledger, ["1"], central, 9, registry=SiteRegistry(state / "registry.json"),
                          ledger_path=state / "ledger.sqlite", state=state, federation="deployment")
        assert ledger.current_version().version == before
    assert result["removed_sites"] == [] and result["remove_sites_refused"]["sites"] == ["1"]


def test_simulation_obeys_remove_sites(state):
    with Ledger.open(state / "ledger.sqlite") as ledger:
        result = unlearn(ledger, ["1", "9", "²"], central, 9, ledger_path=state / "ledger.sqlite", state=state,
                          federation="simulation")
    assert result["removed_sites"] == ["1"] and result["not_found"] == ["9"] and "remove_sites_refused" not in result
    assert len(result["invalid_site_ids"]) == 1 and "not valid" in result["invalid_site_ids"][0]


class UnreachableGrid:
    """A SuperLink that accepts no messages: the round fails after sampling."""

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        raise ConnectionError("SuperLink unreachable")


def test_a_failing_round_keeps_its_summary_in_the_report(state, flower_server_identity):
    from tangent.protocol.spec import ModelSpec

    report: dict = {}
    with Ledger.open(state / "ledger.sqlite") as ledger, pytest.raises(ConnectionError):
        train(UnreachableGrid(), ledger, ModelSpec.from_config({}), "b" * 64, central,
               {"min-nodes": 1, "num-rounds": 2, "round-timeout": 1}, None, report)
    assert [r["server_round"] for r in report["rounds"]] == [1] and report["rounds"][0]["sent"] == 2
    assert report["accuracy"] is None
    json.dumps(report, default=str)


# ----------------------------------------------------------------------------- exact head: both ledgers

@pytest.fixture
def both(state):
    """The state's Δ ledger and a statistics ledger holding the same three sites."""
    from server.ledger.ledgers import Ledgers
    from tests.server.exact_head_replies import FEATURE_DIGEST, open_stats_ledger, site_stats

    with open_stats_ledger(state / "exact_head.sqlite") as stats:
        for site in ("1", "2", "3"):
            stats.add(site, site_stats(int(site), 20).to_arrays(), num_examples=20, base_digest=FEATURE_DIGEST)
    with Ledger.open(state / "ledger.sqlite") as delta, open_stats_ledger(state / "exact_head.sqlite") as stats:
        yield Ledgers(delta, stats)


def _active(ledger) -> list[str]:
    return sorted(c.site_id for c in ledger.contributions(status="active"))


def test_a_signed_withdrawal_removes_the_site_from_both_ledgers(state, both):
    registry = SiteRegistry(state / "registry.json")
    request = create_request("2", load_private_key(state / "keys" / "site-2.key"), "leaving")
    (state / "w2.json").write_text(json.dumps(request))
    result = unlearn(both, [], central, 9, requests=["w2.json"], registry=registry,
                      ledger_path=state / "ledger.sqlite", state=state, federation="deployment")
    assert result["removed_sites"] == ["2"]
    assert _active(both.delta) == _active(both.stats) == ["1", "3"]
    assert both.delta.withdrawn_sites() == both.stats.withdrawn_sites() == ["2"]
    # the same request again is a replay; a fresh one for a site withdrawn in both is refused
    again = create_request("2", load_private_key(state / "keys" / "site-2.key"), "again")
    (state / "w2b.json").write_text(json.dumps(again))
    result = unlearn(both, [], central, 9, requests=["w2.json", "w2b.json"], registry=registry,
                      ledger_path=state / "ledger.sqlite", state=state, federation="deployment")
    assert result["removed_sites"] == [] and result["withdrawals_refused"] == 2
    assert "already withdrawn" in result["withdrawals"][1]["detail"]


def test_simulation_remove_sites_removes_from_both_ledgers(state, both):
    from tangent.exact_head.statistics import SufficientStats
    from tests.server.exact_head_replies import site_stats

    seen = []

    def evaluation(delta, stats=None):
        seen.append(stats)
        return central(delta)

    result = unlearn(both, ["3"], evaluation, 9, ledger_path=state / "ledger.sqlite", state=state,
                      federation="simulation")
    assert result["removed_sites"] == ["3"]
    assert _active(both.delta) == _active(both.stats) == ["1", "2"]
    # the evaluation after removal got the composed statistics of the rest, exactly
    assert seen == [SufficientStats.total([site_stats(1, 20), site_stats(2, 20)])]


def test_a_site_only_in_the_statistics_ledger_is_still_removed(state, both):
    both.delta.remove("1", reason="test: gone from the Δ ledger earlier")
    result = unlearn(both, ["1"], central, 9, ledger_path=state / "ledger.sqlite", state=state,
                      federation="simulation")
    assert result["removed_sites"] == ["1"] and _active(both.stats) == ["2", "3"]


def test_a_dp_run_without_the_dp_head_turns_the_exact_head_off_and_says_so(tmp_path):
    from server.server_app import run_exact_head
    from tangent.protocol.spec import ModelSpec

    report: dict = {}
    assert run_exact_head(ModelSpec.from_config({}), {"exact-head": True, "dp": True}, "train",
                       tmp_path / "exact_head.sqlite", report) is None
    assert report["exact_head"] == {"enabled": False,
                                    "reason": "dp run without dp-head-share: no statistics are sent"}
    report = {}
    assert run_exact_head(ModelSpec.from_config({}), {"exact-head": False}, "unlearn", tmp_path / "exact_head.sqlite",
                       report) is None  # no statistics ledger there: nothing to remove from
    assert report["exact_head"] == {"enabled": False}


def test_the_withdrawal_cli_removes_the_site_from_both_ledgers(state, both, capsys):
    """`python -m deploy.withdraw apply` (no Flower) reaches the statistics ledger beside the ledger too."""
    from deploy.withdraw import main as withdraw

    for ledger in both.all():
        ledger.close()
    request = create_request("1", load_private_key(state / "keys" / "site-1.key"), "leaving")
    (state / "w1.json").write_text(json.dumps(request))
    assert withdraw(["apply", str(state / "w1.json"), "--ledger", str(state / "ledger.sqlite"),
                     "--registry", str(state / "registry.json")]) == 0
    from tests.server.exact_head_replies import open_stats_ledger

    with Ledger.open(state / "ledger.sqlite") as delta, open_stats_ledger(state / "exact_head.sqlite") as stats:
        assert _active(delta) == _active(stats) == ["2", "3"]
        assert delta.withdrawn_sites() == stats.withdrawn_sites() == ["1"]
    assert "exact_head.sqlite" in capsys.readouterr().out


# ----------------------------------------------------------------------------- federation mode pinned

def _submit(state, **run_config) -> dict:
    """The ServerApp's main on a run config as Flower hands it over; its report."""
    from flwr.app import Context, RecordDict

    from server.server_app import main

    context = Context(run_id=41, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"state-dir": str(state)} | run_config)
    with pytest.raises(Exception):
        main(UnreachableGrid(), context)
    return json.loads(next((state / "reports").glob("*-41.json")).read_text())


def _ledger_state(path) -> tuple:
    with Ledger.open(path) as ledger:
        return ledger.current_version().version, _active(ledger), sorted(ledger.withdrawn_sites())


@pytest.mark.parametrize("pinned_by", ["record", "registry"])
def test_a_deployment_state_dir_refuses_a_simulation_run_with_unsigned_remove_sites(state, pinned_by):
    from server import config as cfg

    if pinned_by == "record":  # a deployment's first run recorded its mode
        cfg.pin_federation_mode(state, "deployment", state / "registry.json")
    before = _ledger_state(state / "ledger.sqlite")
    report = _submit(state, **{"federation-mode": "simulation", "mode": "unlearn", "remove-sites": "1"})
    assert report["error"]["type"] == "FederationModeRefused" and "deployment" in report["error"]["message"]
    assert _ledger_state(state / "ledger.sqlite") == before == (before[0], ["1", "2", "3"], [])
    assert json.loads((state / cfg.FEDERATION_RECORD).read_text()) == {"federation-mode": "deployment"}
    # training in simulation mode (no identity binding) is refused the same way, before any round
    report = _submit(state, **{"federation-mode": "simulation", "mode": "train"})
    assert report["error"]["type"] == "FederationModeRefused" and "rounds" not in report


def test_the_first_run_records_the_mode_and_later_runs_must_match(tmp_path):
    from server import config as cfg

    state = tmp_path / "state"
    state.mkdir()
    assert cfg.pin_federation_mode(state, "simulation") == "simulation"
    assert cfg.pin_federation_mode(state, "simulation") == "simulation"
    with pytest.raises(cfg.FederationModeRefused, match="'simulation' run"):
        cfg.pin_federation_mode(state, "deployment")
    (state / cfg.FEDERATION_RECORD).write_text("{")  # a damaged record refuses every run
    for mode in ("simulation", "deployment"):
        with pytest.raises(cfg.FederationModeRefused, match="cannot be read"):
            cfg.pin_federation_mode(state, mode)


def test_the_dp_yes_run_config_is_refused_by_the_server_naming_the_key(state):
    before = _ledger_state(state / "ledger.sqlite")
    report = _submit(state, **{"dp": "yes"})
    assert report["error"]["type"] == "ConfigError" and report["error"]["message"].startswith("dp: ")
    assert _ledger_state(state / "ledger.sqlite") == before
