"""The one configuration (tangent.protocol.config): pyproject is the only source of defaults, one
boolean rule, unknown keys and bad values refused with the key's name, the docs generated."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from tangent.exact_head.feature_spec import KEYS as FEATURE_KEYS, FeatureSpec
from tangent.protocol import config
from tangent.protocol.config import (NODE_KEYS, RUN_DEFAULTS, RUN_KEYS, TRAIN_KEYS, ConfigError, NodeConfig,
                                     RunConfig, TrainRequest, parse_bool)
from tangent.protocol.spec import KEYS as MODEL_KEYS, ModelSpec

ROOT = Path(__file__).resolve().parents[3]


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_every_pyproject_key_has_a_field_and_every_field_a_pyproject_key():
    table = pyproject_run_config()
    assert set(table) == {key.name for key in RUN_KEYS}
    fields = {f.name for f in RunConfig.__dataclass_fields__.values()}
    assert fields == {key.replace("-", "_") for key in table}


def test_the_defaults_are_pyprojects_values_typed():
    table = pyproject_run_config()
    run = RunConfig()
    for key in RUN_KEYS:
        assert run[key.name] == table[key.name] and type(run[key.name]) is key.kind, key.name


def test_model_and_feature_specs_restate_no_default_of_their_own():
    table = pyproject_run_config()
    # a brought backbone's keys are sent only when set; pyproject leaves them empty
    assert ModelSpec().to_config() == {key: table[key] for key in MODEL_KEYS.values() if table[key] != ""}
    features = FeatureSpec().to_config()
    assert {key: features[key] for key in FEATURE_KEYS.values() if key in table} == \
        {key: table[key] for key in FEATURE_KEYS.values() if key in table}


#: code that reads a run-config key with a literal fallback of its own, e.g. run_config.get("lr", 1e-3)
SOURCES = [p for folder in ("server", "client", "simulations", "deploy") for p in (ROOT / folder).rglob("*.py")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_reads_a_run_config_key_with_a_default_of_its_own(path):
    names = {key.name for key in RUN_KEYS}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) and node.args[0].value in names
                and isinstance(getattr(node.func.value, "id", None), str)
                and "config" in node.func.value.id):
            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.args[0].value!r} with its own default")


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), ("true", True), ("FALSE", False),
                                            (" True ", True)])
def test_one_boolean_rule_accepts(value, expected):
    assert parse_bool("dp", value) is expected


@pytest.mark.parametrize("value", ["yes", "no", "1", "0", "", 1, 0, None, "on"])
def test_one_boolean_rule_refuses_with_the_key_name(value):
    with pytest.raises(ConfigError, match="^dp: ") as refused:
        parse_bool("dp", value)
    assert refused.value.key == "dp"


@pytest.mark.parametrize("key,value", [("dp", "yes"), ("lr", 0), ("lr", "fast"), ("epochs", 2.5), ("epochs", True),
                                       ("loss", "hinge"), ("mode", "../x"), ("federation-mode", "both"),
                                       ("device", "gpu"), ("fraction-train", 1.5), ("dp-delta", 1.0),
                                       ("frac-bits", 25), ("lr", float("nan")), ("num-rounds", 0)])
def test_a_bad_run_config_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as refused:
        RunConfig.parse({key: value})
    assert refused.value.key == key and str(refused.value).startswith(f"{key}: ")


def test_an_unknown_key_is_refused_on_every_object():
    for parse in (RunConfig.parse, TrainRequest.parse, NodeConfig.parse):
        with pytest.raises(ConfigError, match="dp-epsilonn"):
            parse({"dp-epsilonn": 1.0})
    with pytest.raises(ConfigError, match="state-dir"):  # a run-config key is no train-request key
        TrainRequest.parse({"state-dir": "/x"})


def test_the_train_request_keeps_every_name_both_ways():
    run = RunConfig.parse({"dp": True, "dp-epsilon": 3.0, "lr": 0.01})
    record = run.train_request().to_config()
    assert tuple(record) == TRAIN_KEYS and record["dp-epsilon"] == 3.0 and record["lr"] == 0.01
    assert TrainRequest.parse(record) == run.train_request()
    assert TrainRequest.parse(record).dp_request.epsilon == 3.0
    assert TrainRequest.parse(record | {"dp": False}).dp_request is None


def test_node_config_keys_are_optional_and_typed():
    node = NodeConfig.parse({"site-id": "s1", "max-epsilon": 4, "require-dp": "true", "max-delta": ""})
    assert node.site_id == "s1" and node.max_epsilon == 4.0 and node.require_dp is True and node.max_delta is None
    assert node.to_config() == {"site-id": "s1", "max-epsilon": 4.0, "require-dp": True}
    with pytest.raises(ConfigError, match="^declared-examples: "):
        NodeConfig.parse({"declared-examples": 0})
    assert {key.name for key in NODE_KEYS} >= {"site-id", "data-path", "state-dir", "require-dp", "max-epsilon",
                                                "device", "partition-id", "num-partitions"}


def test_docs_configuration_is_the_generated_table():
    assert (ROOT / "docs" / "configuration.md").read_text() == config.markdown()
    for key in (*RUN_KEYS, *NODE_KEYS):
        assert re.search(rf"^\| `{re.escape(key.name)}` \|", config.markdown(), re.MULTILINE), key.name


def test_flowers_own_round_key_in_a_train_request_is_accepted():
    """FedAvg.configure_train adds ``server-round`` to every train config record (flwr 1.41,
    serverapp/strategy/fedavg.py): refusing it as unknown refused every site of every run."""
    request = TrainRequest.parse({"server-round": 3, "epochs": 2})
    assert request.epochs == 2
    with pytest.raises(ConfigError, match="server-rounds"):
        TrainRequest.parse({"server-rounds": 3})
