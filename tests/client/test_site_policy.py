"""The site's privacy policy is enforced at the site (client.policy through client.task.train),
with real Flower records and a real budget record; every refusal here happens before the model
is built or any data is read (the messages carry no spec and the sites no data)."""
from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, RecordDict

from client import task
from tangent.training.budget import PrivacyBudget

DP = {"dp": True, "dp-epsilon": 1.0, "dp-delta": 0.0, "dp-max-grad-norm": 1.0}


def refusal(node_config: dict, **config) -> tuple[str, str]:
    reply = task.train(RecordDict({"config": ConfigRecord(config)}), node_config, {})
    assert "delta" not in reply.array_records
    error = reply["error"]
    return error["code"], error["reason"]


@pytest.fixture
def budgeted(tmp_path):
    state = tmp_path / "state"
    PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "s1", 3.0)
    return {"site-id": "s1", "epsilon-budget": 3.0, "state-dir": str(state)}


@pytest.mark.parametrize("node", [{"require-dp": True}, {"require-dp": "true"}, {"epsilon-budget": 3.0}])
def test_non_dp_request_is_refused_by_a_dp_site(node, tmp_path):
    node = {"site-id": "s1", "state-dir": str(tmp_path)} | node
    code, reason = refusal(node, dp=False)
    assert code == "dp_required" and "dp=false" in reason


def test_a_budget_record_binds_without_epsilon_budget_in_the_node_config(budgeted):
    node = {"site-id": "s1", "state-dir": budgeted["state-dir"]}
    assert refusal(node, dp=False)[0] == "dp_required"
    PrivacyBudget(budgeted["state-dir"] + "/" + PrivacyBudget.FILE_NAME, "s1").reserve("c0", 3.0, 0.0)
    assert refusal(node, **DP)[0] == "budget_exhausted"


def test_a_site_without_policy_accepts_non_dp_and_gets_to_the_spec_check():
    code, _ = refusal({"site-id": "s1"}, dp=False)
    assert code == "bad_request"  # past the policy: the message simply has no spec


def test_epsilon_above_max_epsilon_is_refused():
    code, reason = refusal({"site-id": "s1", "max-epsilon": 2.0}, **DP | {"dp-epsilon": 4.0})
    assert code == "epsilon_too_large" and "max-epsilon=2" in reason
    assert refusal({"site-id": "s1", "max-epsilon": 2.0}, **DP | {"dp-epsilon": 2.0})[0] == "bad_request"


def test_the_server_cannot_raise_delta_above_the_site_ceiling():
    code, reason = refusal({"site-id": "s1"}, **DP | {"dp-delta": 1e-4})  # default ceiling 1e-5
    assert code == "delta_too_large" and "1e-05" in reason
    code, _ = refusal({"site-id": "s1", "max-delta": 1e-6}, **DP | {"dp-delta": 1e-5})
    assert code == "delta_too_large"
    # a site may allow more itself; a request below its ceiling passes the policy
    assert refusal({"site-id": "s1", "max-delta": 1e-4}, **DP | {"dp-delta": 1e-4})[0] == "bad_request"


def test_over_budget_request_is_refused_before_any_data(budgeted):
    PrivacyBudget(budgeted["state-dir"] + "/" + PrivacyBudget.FILE_NAME, "s1").reserve("c0", 2.5, 1e-5)
    code, reason = refusal(budgeted, **DP | {"dp-epsilon": 1.0})
    assert code == "budget_exhausted" and "spent ε=2.5 of 3" in reason
    # the node config may lower the budget below the record's, never raise it
    code, _ = refusal(budgeted | {"epsilon-budget": 100.0}, **DP | {"dp-epsilon": 1.0})
    assert code == "budget_exhausted"
    assert refusal(budgeted | {"epsilon-budget": 2.0}, **DP | {"dp-epsilon": 0.1})[0] == "budget_exhausted"


def test_deleted_or_absent_budget_record_refuses(budgeted, tmp_path):
    assert refusal(budgeted, **DP)[0] == "bad_request"  # record intact: policy passes
    (tmp_path / "state" / PrivacyBudget.FILE_NAME).unlink()
    code, reason = refusal(budgeted, **DP)
    assert code == "budget_missing" and "never read as 'nothing spent'" in reason
    code, reason = refusal({"site-id": "s1", "epsilon-budget": 3.0}, **DP)  # no state-dir
    assert code == "budget_missing" and "state-dir" in reason


@pytest.mark.parametrize("key,value", [("epsilon-budget", -1), ("max-delta", 2.0), ("require-dp", "maybe"),
                                       ("declared-examples", 1.5), ("max-epsilon", "x")])
def test_malformed_policy_is_refused(key, value):
    code, reason = refusal({"site-id": "s1", key: value}, **DP)
    assert code == "bad_node_config" and key in reason


# ----------------------------------------------------------------------------- one parser on both sides

@pytest.mark.parametrize("value", ["yes", "1", 1, "on"])
def test_a_dp_value_the_server_refuses_is_refused_by_the_site_too(value):
    """dp='yes' once made the sites train with DP while the server did not require it: now the
    site refuses it (bad_request, naming dp), as the server's run-config parser does."""
    from tangent.protocol.config import ConfigError, RunConfig

    code, reason = refusal({"site-id": "s1"}, **DP | {"dp": value})
    assert code == "bad_request" and "dp: " in reason
    with pytest.raises(ConfigError, match="^dp: "):
        RunConfig.parse({"dp": value})
    # in the run config the site receives, the same value is refused the same way
    reply = task.train(RecordDict({"config": ConfigRecord(DP)}), {"site-id": "s1"}, {"dp": value})
    assert reply["error"]["code"] == "bad_run_config" and "dp: " in reply["error"]["reason"]


def test_an_unknown_key_in_the_train_request_or_node_config_is_refused_naming_it():
    code, reason = refusal({"site-id": "s1"}, **DP | {"dp-target-epsilon": 1.0})
    assert code == "bad_request" and "dp-target-epsilon" in reason
    code, reason = refusal({"site-id": "s1", "max-epsilonn": 1.0}, **DP)
    assert code == "bad_node_config" and "max-epsilonn" in reason
