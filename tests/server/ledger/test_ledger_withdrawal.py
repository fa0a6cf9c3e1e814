"""A withdrawal sticks until the operator re-admits the site; privacy totals never forget."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.ledger import Ledger, LedgerCorrupt, RejectedContribution, export

ROOT = Path(__file__).resolve().parents[3]
SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}


def delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


def test_a_removed_site_is_refused_until_readmitted(tmp_path):
    rng = np.random.default_rng(0)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("3", delta(rng), 10)
        ledger.add("4", delta(rng), 10)
        assert ledger.remove("3", reason="signed withdrawal")
        assert ledger.withdrawn_sites() == ["3"]
        assert [(s.site_id, s.withdrawn, s.active_contribution_id) for s in ledger.sites()] == \
               [("3", True, None), ("4", False, 2)]
        for method in (ledger.add, ledger.replace):  # the next round's reply, in either form
            with pytest.raises(RejectedContribution) as e:
                method("3", delta(rng), 10)
            assert e.value.reason == "site_withdrawn"
        before = ledger.current_version()
        assert ledger.readmit("3", reason="operator: consent renewed")
        after = ledger.current_version()
        assert (after.event, after.site_id, after.composed_sha256, after.version) == \
               ("readmit", "3", before.composed_sha256, before.version + 1)
        entry = ledger.audit_log()[-1]
        assert (entry["action"], json.loads(entry["payload"])["reason"]) == ("readmit", "operator: consent renewed")
        assert ledger.readmit("3", reason="again") is False  # not withdrawn: nothing changes
        assert ledger.current_version() == after
        ledger.add("3", delta(rng), 10)
        assert ledger.withdrawn_sites() == []
        ledger.verify()


def test_a_site_withdrawn_before_it_contributed_is_refused_too(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        assert ledger.remove("7", reason="operator") is True  # nothing to subtract …
        with pytest.raises(RejectedContribution) as e:  # … but the site is out
            ledger.add("7", delta(np.random.default_rng(1)), 10)
        assert e.value.reason == "site_withdrawn"
        assert [v.event for v in ledger.versions()] == ["create", "withdraw"]
        assert ledger.remove("7", reason="again") is False  # already withdrawn: nothing changes
        assert len(ledger.versions()) == 2
        ledger.verify()


def test_withdrawal_survives_reopening(tmp_path):
    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger:
        ledger.add("a", delta(np.random.default_rng(2)), 10)
        ledger.remove("a", reason="x")
    with Ledger.open(path) as ledger:
        assert ledger.withdrawn_sites() == ["a"]
        with pytest.raises(RejectedContribution, match="site_withdrawn"):
            ledger.add("a", delta(np.random.default_rng(3)), 10)


@pytest.mark.parametrize("sql", ["UPDATE sites SET withdrawn = 0 WHERE site_id = 'a'",
                                 "UPDATE sites SET withdrawn = 1 WHERE site_id = 'b'"])
def test_flipping_the_withdrawn_flag_by_sql_fails_verify(tmp_path, sql):
    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger:
        ledger.add("a", delta(np.random.default_rng(4)), 10)
        ledger.add("b", delta(np.random.default_rng(5)), 10)
        ledger.remove("a", reason="x")
    with sqlite3.connect(path) as db:
        assert db.execute(sql).rowcount == 1
    with Ledger.open(path) as ledger, pytest.raises(LedgerCorrupt, match="withdrawn"):
        ledger.verify()


def test_remove_and_readmit_check_their_arguments(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        for bad in ("", "a/b", "٣", 3, None):
            with pytest.raises(ValueError):
                ledger.remove(bad, reason="x")
            with pytest.raises(ValueError):
                ledger.readmit(bad, reason="x")
        with pytest.raises(ValueError):
            ledger.readmit("a", reason="")
        assert len(ledger.versions()) == 1


# ---------------------------------------------------------------------------------- privacy totals
def test_privacy_totals_compose_over_every_contribution_ever_recorded(tmp_path):
    rng = np.random.default_rng(6)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        assert ledger.privacy_totals() == {}
        ledger.add("a", delta(rng), 10, epsilon=1.5, delta_dp=1e-6)
        ledger.replace("a", delta(rng), 10, epsilon=2.0, delta_dp=2e-6)  # the replaced ε still counts
        ledger.add("b", delta(rng), 10, epsilon=3.0, delta_dp=1e-5)
        ledger.remove("b", reason="x")  # so does a removed one: its models were published
        ledger.add("c", delta(rng), 10, epsilon=1.0, delta_dp=1e-6)
        ledger.replace("c", delta(rng), 10)  # one non-DP contribution makes ε unbounded
        totals = ledger.privacy_totals()
        assert totals["a"] == {"epsilon": 3.5, "delta": pytest.approx(3e-6, rel=1e-12), "contributions": 2, "non_dp": 0}
        assert totals["b"] == {"epsilon": 3.0, "delta": 1e-5, "contributions": 1, "non_dp": 0}
        assert math.isinf(totals["c"]["epsilon"]) and (totals["c"]["contributions"], totals["c"]["non_dp"]) == (2, 1)
        assert ledger.max_epsilon() == math.inf  # the active model holds c's non-DP contribution

        manifest = export(ledger, tmp_path / "export")
    privacy = json.loads((tmp_path / "export" / "manifest.json").read_text())["privacy"]
    assert privacy == manifest["privacy"]
    assert privacy["a"]["epsilon"] == 3.5 and privacy["b"]["epsilon"] == 3.0
    assert privacy["c"] == {"epsilon": None, "delta": 1e-6, "contributions": 2, "non_dp": 1}


# ---------------------------------------------------------------------------------- CLI
def taft_ledger(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_cli_readmit_and_the_withdrawn_state_in_list_and_show(tmp_path):
    path = tmp_path / "l.sqlite"
    rng = np.random.default_rng(7)
    with Ledger.open(path) as ledger:
        ledger.add("site-1", delta(rng), 10, epsilon=2.0, delta_dp=1e-6)
        ledger.add("site-2", delta(rng), 10)
    L = ("--ledger", str(path))
    assert taft_ledger(*L, "remove", "site-1", "--reason", "withdrew").returncode == 0
    listed = taft_ledger(*L, "list")
    (line,) = [x for x in listed.stdout.splitlines() if x.startswith("site-1")]
    assert "withdrawn" in line and "2" in line
    (line,) = [x for x in listed.stdout.splitlines() if x.startswith("site-2")]
    assert "active" in line and "inf" in line
    as_json = json.loads(taft_ledger(*L, "list", "--json").stdout)
    assert as_json["withdrawn_sites"] == ["site-1"]
    assert as_json["privacy"]["site-2"] == {"epsilon": None, "delta": 0.0, "contributions": 1, "non_dp": 1}
    shown = taft_ledger(*L, "show", "site-1")
    assert "WITHDRAWN" in shown.stdout and "ε = 2" in shown.stdout
    assert json.loads(taft_ledger(*L, "show", "site-1", "--json").stdout)["withdrawn"] is True

    assert taft_ledger(*L, "readmit", "site-1").returncode == 2  # --reason is required
    result = taft_ledger(*L, "readmit", "site-1", "--reason", "consent renewed")
    assert result.returncode == 0 and "readmitted site-1" in result.stdout, result.stdout + result.stderr
    assert "not withdrawn" in taft_ledger(*L, "readmit", "site-1", "--reason", "again").stdout
    assert "WITHDRAWN" not in taft_ledger(*L, "show", "site-1").stdout
    bad = taft_ledger(*L, "remove", "../etc", "--reason", "x")
    assert bad.returncode == 2 and "not valid" in bad.stderr
    with Ledger.open(path) as ledger:
        assert [v.event for v in ledger.versions()] == ["create", "add", "add", "remove", "readmit"]
        ledger.verify()


def test_cli_remove_of_a_site_without_a_contribution_withdraws_it(tmp_path):
    path = tmp_path / "l.sqlite"
    Ledger.open(path).close()
    result = taft_ledger("--ledger", str(path), "remove", "site-9", "--reason", "operator")
    assert result.returncode == 0 and "now withdrawn" in result.stdout, result.stdout + result.stderr
    again = taft_ledger("--ledger", str(path), "remove", "site-9", "--reason", "operator")
    assert "already withdrawn" in again.stdout
