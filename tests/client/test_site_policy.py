"""The site's privacy policy is enforced at the site (client.policy through client.task.train),
with real Flower records and a real budget record; every refusal here happens before the model
is built or any data is read (the messages carry no spec and the sites no data)."""
from __future__ import annotations

import json
import logging

import pytest
from flwr.app import ConfigRecord, RecordDict

from client import task
from tangent.training.budget import PrivacyBudget

DP = {"dp": True, "dp-epsilon": 1.0, "dp-delta": 0.0, "dp-max-grad-norm": 1.0}


@pytest.fixture
def refusal(caplog):
    """(code, what the site logged): a DP site's reply holds only the code's fixed text
    (client.task.PRIVATE_REFUSALS); the details are for its operator, in its log."""
    def refuse(node_config: dict, **config) -> tuple[str, str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="taft.client"):
            reply = task.train(RecordDict({"config": ConfigRecord(config)}), node_config, {})
        assert "delta" not in reply.array_records
        error = reply["error"]
        return error["code"], caplog.text
    return refuse


@pytest.fixture
def budgeted(tmp_path):
    state = tmp_path / "state"
    PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "s1", 3.0)
    return {"site-id": "s1", "epsilon-budget": 3.0, "state-dir": str(state)}


@pytest.mark.parametrize("node", [{"require-dp": True}, {"require-dp": "true"}, {"epsilon-budget": 3.0}])
def test_non_dp_request_is_refused_by_a_dp_site(node, tmp_path, refusal):
    node = {"site-id": "s1", "state-dir": str(tmp_path)} | node
    code, reason = refusal(node, dp=False)
    assert code == "dp_required" and "dp=false" in reason


def test_a_budget_record_binds_without_epsilon_budget_in_the_node_config(budgeted, refusal):
    node = {"site-id": "s1", "state-dir": budgeted["state-dir"]}
    assert refusal(node, dp=False)[0] == "dp_required"
    PrivacyBudget(budgeted["state-dir"] + "/" + PrivacyBudget.FILE_NAME, "s1").reserve("c0", 3.0, 0.0)
    assert refusal(node, **DP)[0] == "budget_exhausted"


def test_a_site_without_policy_accepts_non_dp_and_gets_to_the_spec_check(refusal):
    code, _ = refusal({"site-id": "s1"}, dp=False)
    assert code == "bad_request"  # past the policy: the message simply has no spec


def test_epsilon_above_max_epsilon_is_refused(refusal):
    code, reason = refusal({"site-id": "s1", "max-epsilon": 2.0}, **DP | {"dp-epsilon": 4.0})
    assert code == "epsilon_too_large" and "max-epsilon=2" in reason
    assert refusal({"site-id": "s1", "max-epsilon": 2.0}, **DP | {"dp-epsilon": 2.0})[0] == "bad_request"


def test_the_server_cannot_raise_delta_above_the_site_ceiling(refusal):
    code, reason = refusal({"site-id": "s1"}, **DP | {"dp-delta": 1e-4})  # default ceiling 1e-5
    assert code == "delta_too_large" and "1e-05" in reason
    code, _ = refusal({"site-id": "s1", "max-delta": 1e-6}, **DP | {"dp-delta": 1e-5})
    assert code == "delta_too_large"
    # a site may allow more itself; a request below its ceiling passes the policy
    assert refusal({"site-id": "s1", "max-delta": 1e-4}, **DP | {"dp-delta": 1e-4})[0] == "bad_request"


def test_over_budget_request_is_refused_before_any_data(budgeted, refusal):
    PrivacyBudget(budgeted["state-dir"] + "/" + PrivacyBudget.FILE_NAME, "s1").reserve("c0", 2.5, 1e-5)
    code, reason = refusal(budgeted, **DP | {"dp-epsilon": 1.0})
    assert code == "budget_exhausted" and "spent ε=2.5 of 3" in reason
    # the node config may lower the budget below the record's, never raise it
    code, _ = refusal(budgeted | {"epsilon-budget": 100.0}, **DP | {"dp-epsilon": 1.0})
    assert code == "budget_exhausted"
    assert refusal(budgeted | {"epsilon-budget": 2.0}, **DP | {"dp-epsilon": 0.1})[0] == "budget_exhausted"


def test_deleted_or_absent_budget_record_refuses(budgeted, tmp_path, refusal):
    assert refusal(budgeted, **DP)[0] == "bad_request"  # record intact: policy passes
    (tmp_path / "state" / PrivacyBudget.FILE_NAME).unlink()
    code, reason = refusal(budgeted, **DP)
    assert code == "budget_missing" and "never read as 'nothing spent'" in reason
    code, reason = refusal({"site-id": "s1", "epsilon-budget": 3.0}, **DP)  # no state-dir
    assert code == "budget_missing" and "state-dir" in reason


@pytest.mark.parametrize("key,value", [("epsilon-budget", -1), ("max-delta", 2.0), ("require-dp", "maybe"),
                                       ("declared-examples", 1.5), ("max-epsilon", "x")])
def test_malformed_policy_is_refused(key, value, refusal):
    code, reason = refusal({"site-id": "s1", key: value}, **DP)
    assert code == "bad_node_config" and key in reason


@pytest.mark.parametrize("node", [{"require-dp": True}, {"epsilon-budget": 3.0}])
def test_a_dp_site_refuses_to_evaluate_before_anything_else(node, tmp_path):
    # old code: the site evaluated any model the server sent, exactly, on its test labels
    node = {"site-id": "s1", "state-dir": str(tmp_path)} | node
    reply = task.evaluate(RecordDict({"config": ConfigRecord({})}), node, {})
    assert reply["error"]["code"] == "evaluate_refused" and "metrics" not in reply.metric_records
    # a site without a DP policy gets past it (to the spec check: this message has none)
    assert task.evaluate(RecordDict({}), {"site-id": "s1"}, {})["error"]["code"] == "bad_request"


def test_deleting_or_editing_the_budget_record_does_not_undo_the_policy(budgeted, tmp_path, refusal):
    """With only state-dir in the node config: old code trained non-DP once the record was
    deleted, and trained again once its spending was erased."""
    node = {"site-id": "s1", "state-dir": budgeted["state-dir"]}
    record = tmp_path / "state" / PrivacyBudget.FILE_NAME
    PrivacyBudget(record, "s1").reserve("c0", 2.5, 1e-5)
    spent = record.read_bytes()
    assert refusal(node, **DP)[0] == "budget_exhausted"
    # erase the spending, keep the file valid
    document = json.loads(spent)
    for key in ("contributions", "entries"):
        if key in document:
            document[key] = []
    record.write_text(json.dumps(document))
    assert refusal(node, **DP)[0] == "budget_missing"
    assert refusal(node, dp=False)[0] == "dp_required"
    record.unlink()
    assert refusal(node, dp=False)[0] == "dp_required"  # old code: accepted, trained without DP
    assert refusal(node, **DP | {"dp-epsilon": 5.0})[0] == "budget_missing"  # old: ε=5, no budget
    # the record put back as it was binds again: nothing was reset
    record.write_bytes(spent)
    assert refusal(node, **DP)[0] == "budget_exhausted"


def test_a_record_rolled_back_to_an_older_copy_refuses(budgeted, tmp_path, refusal):
    record = tmp_path / "state" / PrivacyBudget.FILE_NAME
    before = record.read_bytes()
    PrivacyBudget(record, "s1").reserve("c0", 2.5, 1e-5)
    record.write_bytes(before)  # the copy from before the contribution
    assert refusal(budgeted, **DP)[0] == "budget_missing"


def test_require_dp_without_a_total_gets_the_default_budget_and_needs_state_dir(tmp_path, refusal):
    from tangent.training.budget import DEFAULT_EPSILON_BUDGET

    node = {"site-id": "s1", "require-dp": True, "state-dir": str(tmp_path / "state")}
    over = DEFAULT_EPSILON_BUDGET * 1.01
    assert refusal(node, **DP | {"dp-epsilon": over})[0] == "budget_exhausted"  # old: accepted
    assert refusal(node, **DP)[0] == "bad_request"  # within it: past the policy (no spec here)
    record = PrivacyBudget(tmp_path / "state" / PrivacyBudget.FILE_NAME, "s1")
    assert record.epsilon_budget == DEFAULT_EPSILON_BUDGET and record.spent == (0.0, 0.0)
    code, log = refusal({"site-id": "s1", "require-dp": True}, **DP)
    assert code == "budget_missing" and "state-dir" in log


def test_delta_stays_below_one_over_the_true_n():
    """Old code checked δ against N_pub only: a site declaring 100 examples while holding 200,000
    (or whose bucket 65,536 hides n = 120,000) trained at δ = 1e-5 ≥ 1/n."""
    from client.site import SiteError
    from client.policy import SitePolicy

    request = SitePolicy().check_request(DP | {"dp-delta": 1e-5})
    with pytest.raises(SiteError) as err:
        task.privacy_setup(request, SitePolicy(declared_examples=100), 200_000)
    assert err.value.code == "declared_too_small"
    with pytest.raises(SiteError) as err:
        task.privacy_setup(request, SitePolicy(), 120_000)
    assert err.value.code == "delta_too_large"
    for n, declared in [(120_000, None), (50_000, None), (300, 1000), (1000, 1000), (5, None)]:
        config = task.privacy_setup(SitePolicy().check_request(DP), SitePolicy(declared_examples=declared), n)
        assert config.target_delta < 1 / n
    assert task.privacy_setup(request, SitePolicy(), 50_000).target_delta == 1e-5  # 1/(2·32768) > 1e-5


# ----------------------------------------------------------------------------- one parser on both sides

@pytest.mark.parametrize("value", ["yes", "1", 1, "on"])
def test_a_dp_value_the_server_refuses_is_refused_by_the_site_too(value, refusal):
    """dp='yes' once made the sites train with DP while the server did not require it: now the
    site refuses it (bad_request, naming dp), as the server's run-config parser does."""
    from tangent.protocol.config import ConfigError, RunConfig

    code, log = refusal({"site-id": "s1"}, **DP | {"dp": value})
    assert code == "bad_request" and "dp: " in log
    with pytest.raises(ConfigError, match="^dp: "):
        RunConfig.parse({"dp": value})
    # in the run config the site receives, the same value is refused the same way
    reply = task.train(RecordDict({"config": ConfigRecord(DP)}), {"site-id": "s1"}, {"dp": value})
    assert reply["error"]["code"] == "bad_run_config"


def test_an_unknown_key_in_the_train_request_or_node_config_is_refused_naming_it(refusal):
    code, log = refusal({"site-id": "s1"}, **DP | {"dp-target-epsilon": 1.0})
    assert code == "bad_request" and "dp-target-epsilon" in log
    code, log = refusal({"site-id": "s1", "max-epsilonn": 1.0}, **DP)
    assert code == "bad_node_config" and "max-epsilonn" in log
