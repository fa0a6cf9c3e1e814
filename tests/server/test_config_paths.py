"""Run-config paths are confined to the server's state directory, attacks included."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from server import config as cfg
from tangent.protocol.config import RUN_DEFAULTS


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return cfg.state_dir({"state-dir": str(tmp_path / "state")})


def test_state_dir_is_created_private_and_must_be_absolute(tmp_path):
    state = cfg.state_dir({"state-dir": str(tmp_path / "a" / "state")})
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    with pytest.raises(cfg.PathRefused, match="absolute"):
        cfg.state_dir({"state-dir": "relative/state"})


def test_default_state_dir_is_outside_the_app(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cfg.state_dir({}) == (tmp_path / ".local/state/taft-fl/server").resolve()


def test_relative_paths_resolve_inside_the_state_dir(state):
    assert cfg.ledger_path({}, state) == state / "ledger.sqlite"
    assert cfg.ledger_path({"ledger-path": "runs/l.sqlite"}, state) == state / "runs/l.sqlite"
    assert cfg.site_registry_path({"site-registry": "registry.json"}, state) == state / "registry.json"
    assert cfg.site_registry_path({}, state) is None
    assert cfg.withdrawal_request_path("w/3.json", state) == state / "w/3.json"
    assert cfg.ledger_path({"ledger-path": str(state / "abs.sqlite")}, state) == state / "abs.sqlite"


@pytest.mark.parametrize("value", ["../escape.sqlite", "a/../../escape.sqlite", "/etc/passwd", "/tmp/x.sqlite",
                                   "~/x.sqlite", ".", "", "a\x00b"])
def test_escapes_are_refused(state, value):
    for resolve in (lambda: cfg.ledger_path({"ledger-path": value or "."}, state),
                    lambda: cfg.site_registry_path({"site-registry": value or "."}, state),
                    lambda: cfg.withdrawal_request_path(value, state)):
        with pytest.raises(cfg.PathRefused):
            resolve()


def test_a_symlink_out_of_the_state_dir_is_refused(state, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (state / "out").symlink_to(outside)
    (state / "file.json").symlink_to(outside / "file.json")
    for value in ("out/ledger.sqlite", "file.json"):
        with pytest.raises(cfg.PathRefused, match="outside the server's state directory"):
            cfg.ledger_path({"ledger-path": value}, state)
        with pytest.raises(cfg.PathRefused):
            cfg.report_path({"report-path": value}, state, state / "ledger.sqlite", 1, "train")


def test_a_state_dir_reached_through_a_symlink_still_confines(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    state = cfg.state_dir({"state-dir": str(tmp_path / "link")})
    assert cfg.ledger_path({}, state) == tmp_path / "real" / "ledger.sqlite"
    with pytest.raises(cfg.PathRefused):
        cfg.ledger_path({"ledger-path": str(tmp_path / "x.sqlite")}, state)


def test_report_path_default_and_plain_values(state):
    ledger = cfg.ledger_path({}, state)
    assert cfg.report_path({}, state, ledger, 7, "train") == state / "reports" / "train-7.json"
    assert cfg.report_path({"report-path": "r/train.json"}, state, ledger, 7, "train") == state / "r/train.json"


@pytest.mark.parametrize("name", ["ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm", "ledger.sqlite-journal",
                                  "ledger.sqlite.withdrawals.sqlite", "ledger.sqlite.withdrawals.sqlite-wal",
                                  "ledger.sqlite.signing-key.pem", "ledger.sqlite.head.json",
                                  "ledger.sqlite.anything-added-later"])
def test_report_path_can_never_name_the_ledger_or_its_companions(state, name):
    ledger = cfg.ledger_path({}, state)
    with pytest.raises(cfg.PathRefused, match="a file the server keeps"):
        cfg.report_path({"report-path": name}, state, ledger, 1, "train")
    with pytest.raises(cfg.PathRefused):  # the same file by another spelling
        cfg.report_path({"report-path": f"./sub/../{name}"}, state, ledger, 1, "train")
    with pytest.raises(cfg.PathRefused):
        cfg.report_path({"report-path": str(state / name)}, state, ledger, 1, "train")


def test_report_path_through_a_symlink_to_the_ledger_is_refused(state):
    ledger = cfg.ledger_path({}, state)
    ledger.write_bytes(b"SQLite format 3\x00")
    (state / "report.json").symlink_to(ledger)
    with pytest.raises(cfg.PathRefused):
        cfg.report_path({"report-path": "report.json"}, state, ledger, 1, "train")


def test_report_path_can_not_name_the_registry_or_a_request(state):
    ledger = cfg.ledger_path({}, state)
    registry = state / "registry.json"
    with pytest.raises(cfg.PathRefused):
        cfg.report_path({"report-path": "registry.json"}, state, ledger, 1, "train", protected=(registry,))


def test_federation_mode_and_dp(state):
    assert cfg.federation_mode({}) == "deployment"
    assert cfg.federation_mode({"federation-mode": "simulation"}) == "simulation"
    with pytest.raises(ValueError, match="federation-mode"):
        cfg.federation_mode({"federation-mode": "local"})
    assert cfg.dp_required({"dp": True}) and cfg.dp_required({"dp": "true"})
    assert not cfg.dp_required({}) and not cfg.dp_required({"dp": False})


def test_a_dp_run_asks_for_its_own_batch_size_and_learning_rate():
    """DP-SGD's expected batch and lr are the run's dp-batch-size and dp-lr, sent as the request's
    batch-size and lr; a run without DP keeps batch-size and lr (the defaults differ, so a swap
    either way fails)."""
    assert (RUN_DEFAULTS["dp-batch-size"], RUN_DEFAULTS["dp-lr"]) != (RUN_DEFAULTS["batch-size"], RUN_DEFAULTS["lr"])
    dp = cfg.train_config({"dp": True})
    assert (dp["batch-size"], dp["lr"]) == (RUN_DEFAULTS["dp-batch-size"], RUN_DEFAULTS["dp-lr"])
    own = {"dp-batch-size": 256, "dp-lr": 0.5, "batch-size": 16, "lr": 0.25}
    assert {k: cfg.train_config(own | {"dp": True})[k] for k in ("batch-size", "lr")} == {"batch-size": 256, "lr": 0.5}
    assert {k: cfg.train_config(own)[k] for k in ("batch-size", "lr")} == {"batch-size": 16, "lr": 0.25}
    plain = cfg.train_config({})
    assert (plain["batch-size"], plain["lr"]) == (RUN_DEFAULTS["batch-size"], RUN_DEFAULTS["lr"])


def test_the_serverapp_writes_its_report_also_when_it_refuses_the_run(tmp_path):
    """A refused report path: the run fails, and its report (with the error) lands in the state dir."""
    import json

    from flwr.app import Context, RecordDict

    from server.server_app import main

    state = tmp_path / "state"
    context = Context(run_id=42, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"mode": "train", "state-dir": str(state), "report-path": "ledger.sqlite-wal"})
    with pytest.raises(cfg.PathRefused):
        main(None, context)
    report_file = state / "reports" / "train-42.json"
    report = json.loads(report_file.read_text())
    assert report["error"]["type"] == "PathRefused" and "ledger.sqlite-wal" in report["error"]["message"]
    assert (report_file.stat().st_mode & 0o777) == 0o600
    assert not (state / "ledger.sqlite-wal").exists()


def test_a_deployment_run_without_a_site_registry_is_refused_with_a_report(tmp_path):
    import json

    from flwr.app import Context, RecordDict

    from server.server_app import main

    state = tmp_path / "state"
    context = Context(run_id=5, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"mode": "train", "state-dir": str(state)})
    with pytest.raises(ValueError, match="site-registry"):
        main(None, context)
    report = json.loads((state / "reports" / "train-5.json").read_text())
    assert "site-registry" in report["error"]["message"] and report["mode"] == "train"
    assert os.listdir(state) == ["reports"]  # nothing else was created


def test_an_invalid_mode_is_refused_with_a_report_that_stays_in_the_state_dir(tmp_path):
    import json

    from flwr.app import Context, RecordDict

    from server.server_app import main

    state = tmp_path / "state"
    context = Context(run_id=6, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"mode": "../../../x", "state-dir": str(state)})
    with pytest.raises(ValueError, match="mode"):
        main(None, context)
    report = json.loads((state / "reports" / "refused-6.json").read_text())
    assert report["mode"] == "../../../x" and "mode" in report["error"]["message"]
    assert not list(tmp_path.glob("x-6.json"))


# ----------------------------------------------------------------------------- exact head's ledger path

def _app_config() -> dict:
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]


def test_the_app_config_carries_the_exact_head_keys_of_contract_7a():
    config = _app_config()
    assert {k: config[k] for k in ("exact-head", "feature-pieces", "random-features", "random-seed", "clip-norm",
                                   "frac-bits", "exact-head-ledger-path")} == {
        "exact-head": True, "feature-pieces": "final_cls,final_mean,input_cls,input_mean,input_quad", "random-features": 0,
        "random-seed": 0, "clip-norm": 2.0, "frac-bits": 16, "exact-head-ledger-path": "exact_head.sqlite"}
    spec = cfg.feature_spec(config)
    assert spec.dim() == 3072 and spec.clip_norm == 2.0 and spec.frac_bits == 16 and spec.random_seed == 0
    assert cfg.exact_head_enabled(config)


def test_exact_head_absent_takes_pyproject_default_and_is_off_when_false_or_in_a_dp_run():
    assert cfg.exact_head_enabled({}) == RUN_DEFAULTS["exact-head"]  # pyproject's, not a default of the code's
    assert not cfg.exact_head_enabled({"exact-head": False}) and not cfg.exact_head_enabled({"exact-head": "false"})
    assert cfg.exact_head_enabled({"exact-head": "true"})
    assert not cfg.exact_head_enabled({"exact-head": True, "dp": True})
    assert cfg.exact_head_requested({"exact-head": True, "dp": True})


def test_exact_head_ledger_path_default_and_confinement(state):
    ledger = cfg.ledger_path({}, state)
    assert cfg.exact_head_ledger_path({}, state, ledger) == state / "exact_head.sqlite"
    assert cfg.exact_head_ledger_path({"exact-head-ledger-path": "eh/stats.sqlite"}, state, ledger) == \
        state / "eh/stats.sqlite"
    for value in ("../escape.sqlite", "/tmp/x.sqlite", "~/x.sqlite", "."):
        with pytest.raises(cfg.PathRefused):
            cfg.exact_head_ledger_path({"exact-head-ledger-path": value}, state, ledger)


@pytest.mark.parametrize("name", ["ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-journal",
                                  "ledger.sqlite.withdrawals.sqlite", "ledger.sqlite.head.json",
                                  "ledger.sqlite.signing-key.pem", "ledger.sqlite.stats", "ledger", "./x/../ledger.sqlite"])
def test_the_statistics_ledger_never_shares_a_file_with_the_delta_ledger(state, name):
    ledger = cfg.ledger_path({}, state)
    with pytest.raises(cfg.PathRefused, match="collides with the Δ ledger"):
        cfg.exact_head_ledger_path({"exact-head-ledger-path": name}, state, ledger)


def test_the_statistics_ledger_can_not_reach_the_delta_ledger_through_a_link(state):
    ledger = cfg.ledger_path({}, state)
    ledger.write_bytes(b"SQLite format 3\x00")
    (state / "stats.sqlite").symlink_to(ledger)
    with pytest.raises(cfg.PathRefused):
        cfg.exact_head_ledger_path({"exact-head-ledger-path": "stats.sqlite"}, state, ledger)
    # and the other way round: a Δ ledger path whose companions would be the statistics ledger's
    (state / "sub").mkdir()
    with pytest.raises(cfg.PathRefused):
        cfg.exact_head_ledger_path({"exact-head-ledger-path": "sub/l.sqlite-wal"}, state, state / "sub" / "l.sqlite")


@pytest.mark.parametrize("name", ["exact_head.sqlite", "exact_head.sqlite-wal", "exact_head.sqlite.head.json",
                                  "exact_head.sqlite.signing-key.pem", "exact_head.sqlite.later"])
def test_report_path_can_never_name_the_statistics_ledger_or_its_companions(state, name):
    ledger = cfg.ledger_path({}, state)
    stats = cfg.exact_head_ledger_path({}, state, ledger)
    with pytest.raises(cfg.PathRefused, match="a file the server keeps"):
        cfg.report_path({"report-path": name}, state, ledger, 1, "train", other_ledgers=(stats,))


def test_the_serverapp_refuses_a_report_over_the_statistics_ledger(tmp_path):
    from flwr.app import Context, RecordDict

    from server.server_app import main

    state = tmp_path / "state"
    context = Context(run_id=43, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"mode": "train", "state-dir": str(state), "report-path": "exact_head.sqlite-wal"})
    with pytest.raises(cfg.PathRefused, match="a file the server keeps"):
        main(None, context)
    assert not (state / "exact_head.sqlite-wal").exists()


def test_central_evaluation_is_on_unless_switched_off():
    assert cfg.central_evaluation_enabled({}) and cfg.central_evaluation_enabled({"central-evaluation": "true"})
    assert not cfg.central_evaluation_enabled({"central-evaluation": False})
    assert not cfg.central_evaluation_enabled({"central-evaluation": "false"})
    assert _app_config()["central-evaluation"] is True
