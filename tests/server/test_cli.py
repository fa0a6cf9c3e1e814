"""taft-ledger, run as a real process (``python -m server.cli``) against a real ledger file."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from server.ledger import Ledger
from server.ledger.families import DeltaFamily

ROOT = Path(__file__).resolve().parents[2]
BASE = "base-digest-cli"


def taft_ledger(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    rng = np.random.default_rng(0)
    with Ledger.open(path) as ledger:
        for i, (n, eps) in enumerate([(100, 2.0), (300, 6.5), (50, None)]):
            delta = {"head.weight": (rng.standard_normal((3, 4)) * 0.01).astype(np.float32),
                     "head.bias": (rng.standard_normal(3) * 0.01).astype(np.float32)}
            ledger.add(f"site-{i}", delta, n, epsilon=eps, base_digest=BASE, shard_fingerprint=f"fp-{i}",
                       train_config={"epochs": 3})
    return path


def test_help_lists_the_subcommands():
    result = taft_ledger("--help")
    assert result.returncode == 0
    for command in ("list", "show", "remove", "verify", "export", "--ledger", "TAFT_LEDGER"):
        assert command in result.stdout


def test_list_and_show(ledger_path):
    result = taft_ledger("--ledger", str(ledger_path), "list")
    assert result.returncode == 0, result.stderr
    assert "model version 3" in result.stdout and all(f"site-{i}" in result.stdout for i in range(3))

    listed = json.loads(taft_ledger("--ledger", str(ledger_path), "list", "--json").stdout)
    assert listed["model_version"] == 3 and listed["total_weight"] == 450
    assert [s["site_id"] for s in listed["sites"]] == ["site-0", "site-1", "site-2"]

    result = taft_ledger("--ledger", str(ledger_path), "show", "site-1")
    assert result.returncode == 0 and "fp-1" in result.stdout and "6.5" in result.stdout
    shown = json.loads(taft_ledger("--ledger", str(ledger_path), "show", "site-1", "--json").stdout)
    (c,) = shown["contributions"]
    assert (c["num_examples"], c["status"], c["train_config"]) == (300, "active", {"epochs": 3})
    assert (shown["withdrawn"], shown["privacy"]) == (False, {"epsilon": 6.5, "delta": 0.0, "contributions": 1,
                                                              "non_dp": 0})
    assert taft_ledger("--ledger", str(ledger_path), "show", "nobody").returncode == 2


def test_ledger_path_comes_from_the_environment(ledger_path):
    result = taft_ledger("list", env={"TAFT_LEDGER": str(ledger_path)})
    assert result.returncode == 0 and "site-0" in result.stdout


def test_remove_is_exact_and_idempotent(ledger_path, tmp_path):
    result = taft_ledger("--ledger", str(ledger_path), "remove", "site-1", "--reason", "withdrew consent")
    assert result.returncode == 0, result.stderr
    assert "removed site-1" in result.stdout
    again = taft_ledger("--ledger", str(ledger_path), "remove", "site-1", "--reason", "again")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert taft_ledger("--ledger", str(ledger_path), "remove", "site-1").returncode == 2  # --reason is required

    with Ledger.open(ledger_path) as ledger:
        assert [v.event for v in ledger.versions()] == ["create", "add", "add", "add", "remove"]
        (c,) = ledger.contributions(site_id="site-1")
        assert (c.status, c.end_reason) == ("removed", "withdrew consent")
        kept = {c.site_id: c for c in ledger.contributions(status="active")}
        composed = ledger.composed_arrays()
        with sqlite3.connect(ledger_path) as db:
            blobs = dict(db.execute("SELECT site_id, safetensors FROM contributions JOIN deltas ON id = contribution_id"))
    # the same as a ledger that never saw site-1
    with Ledger.open(tmp_path / "fresh.sqlite") as fresh:
        for site, c in kept.items():
            fresh.add(site, DeltaFamily().decode(blobs[site]), c.num_examples)
        assert {k: v.tobytes() for k, v in fresh.composed_arrays().items()} == \
               {k: v.tobytes() for k, v in composed.items()}


def test_verify_passes_then_fails_after_tampering(ledger_path):
    result = taft_ledger("--ledger", str(ledger_path), "verify")
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stdout + result.stderr
    assert json.loads(taft_ledger("--ledger", str(ledger_path), "verify", "--json").stdout)["ok"] is True
    with sqlite3.connect(ledger_path) as db:
        db.execute("UPDATE contributions SET num_examples = 1000 WHERE site_id = 'site-0'")
    result = taft_ledger("--ledger", str(ledger_path), "verify")
    assert result.returncode == 1 and "FAILED" in result.stdout
    assert json.loads(taft_ledger("--ledger", str(ledger_path), "verify", "--json").stdout)["ok"] is False


def test_export_writes_composed_delta_and_manifest(ledger_path, tmp_path):
    out = tmp_path / "export"
    assert taft_ledger("--ledger", str(ledger_path), "remove", "site-2", "--reason", "x").returncode == 0
    result = taft_ledger("--ledger", str(ledger_path), "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    composed = safetensors.numpy.load_file(out / manifest["composed_file"])
    with Ledger.open(ledger_path) as ledger:
        expected = ledger.composed_arrays()
        version = ledger.current_version()
        active = ledger.contributions(status="active")
    assert {k: v.tobytes() for k, v in composed.items()} == {k: v.tobytes() for k, v in expected.items()}
    assert manifest["model_version"] == version.version == 4
    assert manifest["composed_sha256"] == version.composed_sha256
    assert manifest["base_digest"] == BASE
    assert [s["site_id"] for s in manifest["sites"]] == ["site-0", "site-1"]
    assert [s["delta_sha256"] for s in manifest["sites"]] == [c.delta_sha256 for c in active]
    assert manifest["max_epsilon"] == 6.5 and manifest["non_private_sites"] == []


def test_missing_ledger_is_an_error_not_a_new_file(tmp_path):
    path = tmp_path / "absent.sqlite"
    result = taft_ledger("--ledger", str(path), "list")
    assert result.returncode == 2 and "no ledger" in result.stderr
    assert not path.exists()


def test_show_labels_a_statistics_ledgers_digest_as_the_feature_digest(tmp_path):
    from tests.server.exact_head_replies import FEATURE_DIGEST, open_stats_ledger, site_stats

    path = tmp_path / "exact_head.sqlite"
    with open_stats_ledger(path) as stats:
        stats.add("1", site_stats(1, 20).to_arrays(), num_examples=20, base_digest=FEATURE_DIGEST)
    shown = taft_ledger("--ledger", str(path), "show", "1")
    assert shown.returncode == 0, shown.stderr
    assert f"feature_digest     {FEATURE_DIGEST}" in shown.stdout and "base_digest" not in shown.stdout
    as_json = taft_ledger("--ledger", str(path), "show", "1", "--json")
    [contribution] = json.loads(as_json.stdout)["contributions"]
    assert contribution["feature_digest"] == FEATURE_DIGEST and "base_digest" not in contribution


def test_export_writes_the_public_key_that_verify_export_needs(ledger_path, tmp_path):
    out = tmp_path / "export"
    result = taft_ledger("--ledger", str(ledger_path), "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    key = ledger_path.with_name(ledger_path.name + ".public-key.pem")
    assert key.name in result.stdout and oct(key.stat().st_mode & 0o777) == "0o644"
    verified = taft_ledger("verify-export", str(out), "--public-key", str(key))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
    # a second export keeps the key file; a different key there is refused, not overwritten
    assert taft_ledger("--ledger", str(ledger_path), "export", "--out", str(tmp_path / "again")).returncode == 0
    key.write_text("-----BEGIN PUBLIC KEY-----\nforged\n-----END PUBLIC KEY-----\n")
    refused = taft_ledger("--ledger", str(ledger_path), "export", "--out", str(tmp_path / "third"))
    assert refused.returncode != 0 and "public key" in refused.stderr and "forged" in key.read_text()


def test_the_verify_export_command_export_prints_works_as_printed(ledger_path, tmp_path):
    """The printed command runs from the operator's shell (here the repository root, not the ledger's
    directory): it names the public key by a path that resolves there."""
    import re
    import shlex

    out = tmp_path / "export"
    result = taft_ledger("--ledger", str(ledger_path), "export", "--out", str(out))
    assert result.returncode == 0, result.stderr
    printed = re.search(r"`taft-ledger (verify-export [^`]+)`", result.stdout)
    assert printed, result.stdout
    verified = taft_ledger(*shlex.split(printed.group(1)))
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stdout + verified.stderr
