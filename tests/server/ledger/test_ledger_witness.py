"""Rollback: cut the newest contribution and put the previous signed head back (no key needed).

Without a witness this passes ``verify`` (the residual risk the README states); with the
witness the operator keeps outside the state directory, ``verify`` fails, the CLI says so, and
the server refuses to write on top of the rolled-back history.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from server import cli
from server.ledger import Ledger, LedgerCorrupt, LedgerError, witness
from server.ledger.audit import write_head_file
from tests.server.ledger.tampering import delta, truncate_last_contribution


@pytest.fixture
def witness_file(tmp_path) -> Path:
    path = tmp_path / "elsewhere" / "heads.witness"
    path.parent.mkdir()
    witness.init(path)
    return path


@pytest.fixture
def witnessed_ledger(tmp_path, witness_file) -> Path:
    path = tmp_path / "state" / "ledger.sqlite"
    rng = np.random.default_rng(0)
    with Ledger.open(path, witness=witness_file) as ledger:
        for i in range(3):
            ledger.add(f"site-{i}", delta(rng), 10 * (i + 1))
        assert ledger.verify().witness_version == ledger.current_version().version == 3
    return path


def cut_newest_and_restore_previous_head(path: Path) -> None:
    """The attack: drop the newest contribution consistently, then copy the previous signed head
    (which the database still holds) into the head file."""
    truncate_last_contribution(path)
    with Ledger.open(path, create=False, witness=None) as ledger:
        head, signature = ledger.signed_head()
    write_head_file(Path(f"{path}.head.json"), head, signature)


def test_rollback_passes_verify_without_a_witness(witnessed_ledger, monkeypatch):
    monkeypatch.delenv(witness.WITNESS_ENV, raising=False)
    cut_newest_and_restore_previous_head(witnessed_ledger)
    with Ledger.open(witnessed_ledger, create=False) as ledger:
        assert ledger.verify().current_version == 2  # the residual risk: nothing in the state dir tells


def test_rollback_fails_verify_against_the_witness(witnessed_ledger, witness_file):
    cut_newest_and_restore_previous_head(witnessed_ledger)
    with Ledger.open(witnessed_ledger, create=False) as ledger:
        with pytest.raises(LedgerCorrupt) as caught:
            ledger.verify(witness=witness_file)
    assert any("holds version 3, but the ledger ends at version 2" in p for p in caught.value.problems), \
        caught.value.problems


def test_a_rolled_back_ledger_is_read_only_when_opened_with_its_witness(witnessed_ledger, witness_file):
    cut_newest_and_restore_previous_head(witnessed_ledger)
    with Ledger.open(witnessed_ledger, witness=witness_file) as ledger:
        with pytest.raises(LedgerError, match="contradicts its witness"):
            ledger.add("site-9", delta(np.random.default_rng(9)), 5)  # would reuse version 3: a fork
        assert ledger.current_version().version == 2


def test_the_cli_reads_the_witness_from_the_environment(witnessed_ledger, witness_file, monkeypatch, capsys):
    monkeypatch.setenv(witness.WITNESS_ENV, str(witness_file))
    assert cli.main(["--ledger", str(witnessed_ledger), "verify"]) == 0
    assert "witness: holds version 3" in capsys.readouterr().out
    cut_newest_and_restore_previous_head(witnessed_ledger)
    assert cli.main(["--ledger", str(witnessed_ledger), "verify"]) == 1
    assert "rolled back" in capsys.readouterr().out
    monkeypatch.delenv(witness.WITNESS_ENV)
    assert cli.main(["--ledger", str(witnessed_ledger), "verify"]) == 0
    assert "no witness checked" in capsys.readouterr().out
    assert cli.main(["--ledger", str(witnessed_ledger), "--witness", str(witness_file), "verify"]) == 1


def test_a_whole_file_rollback_fails_against_the_witness(witnessed_ledger, witness_file, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    files = [witnessed_ledger, Path(f"{witnessed_ledger}.head.json")]
    for f in files:
        shutil.copy2(f, saved / f.name)
    with Ledger.open(witnessed_ledger, witness=witness_file) as ledger:
        ledger.remove("site-0", reason="asked")
    for f in files:
        shutil.copy2(saved / f.name, f)
    for suffix in ("-wal", "-shm"):
        Path(f"{witnessed_ledger}{suffix}").unlink(missing_ok=True)
    with Ledger.open(witnessed_ledger, create=False, witness=witness_file) as ledger:
        with pytest.raises(LedgerCorrupt, match="rolled back"):
            ledger.verify()


def test_a_forged_or_forked_witness_entry_is_reported(witnessed_ledger, witness_file):
    lines = witness_file.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["head"]["composed_sha256"] = "0" * 64  # not what the key signed
    with witness_file.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    with Ledger.open(witnessed_ledger, create=False) as ledger:
        with pytest.raises(LedgerCorrupt, match="did not sign"):
            ledger.verify(witness=witness_file)


def test_a_lagging_witness_is_not_an_error(witnessed_ledger, witness_file, monkeypatch):
    monkeypatch.delenv(witness.WITNESS_ENV, raising=False)
    with Ledger.open(witnessed_ledger) as ledger:  # a change made without the witness
        ledger.retract("site-1", reason="re-run")
    with Ledger.open(witnessed_ledger, create=False) as ledger:
        assert ledger.verify(witness=witness_file).witness_version == 3
    with Ledger.open(witnessed_ledger, witness=witness_file) as ledger:  # the next open catches up
        assert ledger.verify().witness_version == 4


def test_both_ledgers_share_one_witness(tmp_path, witness_file):
    rng = np.random.default_rng(1)
    with Ledger.open(tmp_path / "a.sqlite", witness=witness_file) as a, \
            Ledger.open(tmp_path / "b.sqlite", witness=witness_file) as b:
        a.add("s", delta(rng), 1)
        assert a.verify().witness_version == 1 and b.verify().witness_version == 0


def test_the_witness_is_never_a_link_or_another_file(tmp_path, witnessed_ledger):
    key = Path(f"{witnessed_ledger}.signing-key.pem")
    before = key.read_bytes()
    with pytest.raises(LedgerError, match="is not a witness"):
        Ledger.open(witnessed_ledger, witness=key)  # a misconfigured path: nothing appended to the key
    assert key.read_bytes() == before
    real = tmp_path / "real.witness"
    witness.init(real)
    link = tmp_path / "link.witness"
    link.symlink_to(real)
    with pytest.raises(LedgerError, match="symbolic link"):
        Ledger.open(witnessed_ledger, witness=link)
    with pytest.raises(LedgerError, match="exists"):
        witness.init(real)
    assert os.stat(real).st_mode & 0o077 == 0


def test_a_rollback_behind_a_new_key_fails_against_the_witness(witnessed_ledger, witness_file):
    """The state-directory writer cannot sign with the ledger's key, but can replace it: delete the
    ledger, its head and its key, and write a shorter history under a key of their own (without the
    witness, which they cannot reach). The witness holds nothing for the new key — looked up by key
    alone, it saw nothing wrong; it knows which ledger its heads came from, and says so."""
    rng = np.random.default_rng(0)
    for f in (witnessed_ledger, Path(f"{witnessed_ledger}.head.json"), Path(f"{witnessed_ledger}.signing-key.pem"),
              Path(f"{witnessed_ledger}-wal"), Path(f"{witnessed_ledger}-shm")):
        f.unlink(missing_ok=True)
    with Ledger.open(witnessed_ledger, witness=None) as forged:
        forged.add("site-1", delta(rng), 20)
    with Ledger.open(witnessed_ledger, create=False, witness=None) as ledger:
        with pytest.raises(LedgerCorrupt, match="another key"):
            ledger.verify(witness=witness_file)
    with Ledger.open(witnessed_ledger, create=False, witness=witness_file) as ledger:
        with pytest.raises(LedgerError):
            ledger.add("site-9", delta(rng), 1)  # read-only: writing on would bury the evidence
