"""Paths a run submitter or a state-directory writer controls: a report never overwrites a key, a
certificate, a request or the registry's signature; links planted in the state directory do not
carry the default report, the nonce store, the ledger's companions or the head file elsewhere.
Each case passed before (the report went where it was sent; the links were followed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from server import config as cfg
from server.ledger import Ledger, LedgerError
from server.trust.nonces import NonceStore, nonce_store_path


@pytest.fixture
def state(tmp_path: Path) -> Path:
    state = cfg.state_dir({"state-dir": str(tmp_path / "state")})
    for name, text in (("keys/operator.key", "PRIVATE"), ("certs/ca.key", "CA PRIVATE"),
                       ("requests/w3.json", '{"payload": {}, "signature": "x"}'), ("w7.json", '{"payload": {}}'),
                       ("registry.json.sig", "{}")):
        (state / name).parent.mkdir(parents=True, exist_ok=True)
        (state / name).write_text(text)
    return state


@pytest.mark.parametrize("value", ["keys/operator.key", "certs/ca.key", "requests/w3.json", "w7.json",
                                   "registry.json.sig", "keys/new.json", "notes.txt"])
def test_a_report_never_overwrites_a_key_certificate_request_or_other_file(state, value):
    ledger = cfg.ledger_path({}, state)
    with pytest.raises(cfg.PathRefused):
        cfg.report_path({"report-path": value}, state, ledger, 1, "train", protected=(state / "registry.json",))


def test_a_report_may_replace_an_earlier_report(state):
    ledger = cfg.ledger_path({}, state)
    (state / "runs").mkdir()
    (state / "runs" / "train.json").write_text(json.dumps({"mode": "train", "run_id": 1}))
    assert cfg.report_path({"report-path": "runs/train.json"}, state, ledger, 2, "train") == state / "runs/train.json"


def test_a_reports_link_out_of_the_state_dir_is_refused_for_the_default_report(state, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (state / "reports").symlink_to(outside)
    with pytest.raises(cfg.PathRefused, match="outside the server's state directory"):
        cfg.report_path({}, state, cfg.ledger_path({}, state), 1, "train")


def test_a_nonce_store_link_is_refused(state, tmp_path):
    ledger = cfg.ledger_path({}, state)
    outside = tmp_path / "nonces.sqlite"
    nonce_store_path(ledger).symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        NonceStore(nonce_store_path(ledger))
    assert not outside.exists()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_ledger_files_that_are_links_are_refused(state, tmp_path, suffix):
    ledger = cfg.ledger_path({}, state)
    Ledger.open(ledger).close()
    target = tmp_path / f"outside{suffix}"
    victim = Path(f"{ledger}{suffix}")
    victim.unlink(missing_ok=True)
    victim.symlink_to(target)
    with pytest.raises(LedgerError, match="symbolic link"):
        Ledger.open(ledger)
    assert not target.exists()


def test_a_head_file_link_is_not_followed(state, tmp_path):
    ledger = cfg.ledger_path({}, state)
    with Ledger.open(ledger) as opened:
        opened.add("s", {"w": np.ones(2, np.float32)}, 1)
    head = Path(f"{ledger}.head.json")
    real = tmp_path / "head-elsewhere.json"
    real.write_bytes(head.read_bytes())
    head.unlink()
    head.symlink_to(real)
    with Ledger.open(ledger, create=False) as opened:
        with pytest.raises(Exception, match="head file"):
            opened.verify()


def test_a_witness_inside_the_state_dir_is_refused(state, tmp_path, monkeypatch):
    from server.ledger import witness

    monkeypatch.setenv(witness.WITNESS_ENV, str(state / "heads.witness"))
    with pytest.raises(cfg.PathRefused, match="inside the state directory"):
        cfg.witness_path(state)
    monkeypatch.setenv(witness.WITNESS_ENV, str(tmp_path / "heads.witness"))
    assert cfg.witness_path(state) == tmp_path / "heads.witness"
    monkeypatch.delenv(witness.WITNESS_ENV)
    assert cfg.witness_path(state) is None
