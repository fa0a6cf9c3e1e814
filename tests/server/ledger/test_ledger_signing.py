"""Tamper evidence that cannot be rewritten: signed chain heads, the head file, signed exports.

Each attack edits the ledger's files directly, as someone with write access to them (but not to
the signing key) could. The chain-only ledger (schema 1) accepted the truncation and the
rewrite-and-rehash attacks below; they must fail ``verify`` now.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from server.ledger import Ledger, LedgerCorrupt, LedgerError, export, verify_export
from server.ledger.audit import entry_hash, fingerprint, public_key_pem
from tests.server.ledger.tampering import delta, raw, truncate_last_contribution

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    path = tmp_path / "ledger.sqlite"
    rng = np.random.default_rng(0)
    with Ledger.open(path) as ledger:
        for i in range(3):
            ledger.add(f"site-{i}", delta(rng), 10 * (i + 1), epsilon=1.0 + i)
        ledger.remove("site-1", reason="withdrew consent")
        ledger.add("site-3", delta(rng), 40, epsilon=2.0)
        ledger.verify()
    return path


def rehash_chain(db: sqlite3.Connection) -> None:
    """Recompute every audit hash so that the chain is valid again after an edit."""
    prev = "0" * 64
    for seq, at, action, site_id, payload in db.execute(
            "SELECT seq, at, action, site_id, payload FROM audit ORDER BY seq").fetchall():
        digest = entry_hash(prev, seq, at, action, site_id, payload)
        db.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, digest, seq))
        prev = digest


def verify_problems(path: Path, signing_key: Path | None = None, **verify_kwargs) -> list[str]:
    with Ledger.open(path, create=False, signing_key=signing_key) as ledger:
        with pytest.raises(LedgerCorrupt) as e:
            ledger.verify(**verify_kwargs)
    return e.value.problems


def test_truncating_history_fails_verify(ledger_path):
    truncate_last_contribution(ledger_path)
    problems = verify_problems(ledger_path)
    assert any("history was cut off" in p for p in problems), problems
    # reopening never "repairs" a head file that is ahead of the database
    assert any("history was cut off" in p for p in verify_problems(ledger_path))


def test_rewriting_an_older_entry_and_rehashing_the_chain_fails_verify(ledger_path):
    db = raw(ledger_path)
    changed = db.execute("UPDATE audit SET payload = replace(payload, 'withdrew consent', 'operator decision') "
                         "WHERE action = 'remove'").rowcount
    db.execute("UPDATE contributions SET end_reason = 'operator decision' WHERE end_reason = 'withdrew consent'")
    rehash_chain(db)
    db.close()
    assert changed == 1
    problems = verify_problems(ledger_path)
    assert any("signed head differs" in p and "audit_hash" in p for p in problems), problems
    assert not any("prev_hash" in p or "hash does not match" in p for p in problems)  # the chain itself is valid


def forge(path: Path, key: Ed25519PrivateKey) -> None:
    """Re-sign every head (and the head file) with the attacker's key and record that key."""
    db = raw(path)
    fp = fingerprint(key.public_key())
    old_pem, new_pem = json.loads(db.execute("SELECT value FROM meta WHERE key = 'signing_public_key'").fetchone()[0]), \
        public_key_pem(key.public_key())
    (payload,) = db.execute("SELECT payload FROM audit WHERE action = 'create'").fetchone()
    payload = json.loads(payload)
    assert payload["settings"]["signing_public_key"] == old_pem
    payload["settings"]["signing_public_key"] = new_pem
    db.execute("UPDATE audit SET payload = ? WHERE action = 'create'",
               (json.dumps(payload, sort_keys=True, separators=(",", ":")),))
    rehash_chain(db)
    hashes = dict(db.execute("SELECT seq, hash FROM audit").fetchall())
    for version, head_text in db.execute("SELECT version, head FROM signed_heads").fetchall():
        head = json.loads(head_text)
        head.update(public_key=fp, audit_hash=hashes[head["audit_seq"]])
        text = json.dumps(head, sort_keys=True, separators=(",", ":"))
        db.execute("UPDATE signed_heads SET head = ?, signature = ? WHERE version = ?",
                   (text, key.sign(text.encode()).hex(), version))
    db.execute("UPDATE meta SET value = ? WHERE key = 'signing_public_key'", (json.dumps(new_pem),))
    head_text, signature = db.execute("SELECT head, signature FROM signed_heads ORDER BY version DESC LIMIT 1").fetchone()
    db.close()
    Path(f"{path}.head.json").write_text(json.dumps({"head": json.loads(head_text), "signature": signature}))


def test_signatures_forged_with_another_key_fail(ledger_path, tmp_path):
    genuine = Ledger.open(ledger_path, create=False)
    genuine_public = genuine.public_key()
    genuine.close()
    forge(ledger_path, Ed25519PrivateKey.generate())
    # the server's own key no longer matches the file: verify says so, and nothing is signed with it
    assert any("not the ledger's signing key" in p for p in verify_problems(ledger_path))
    with Ledger.open(ledger_path, create=False) as ledger, pytest.raises(LedgerError, match="not the key that signed it"):
        ledger.remove("site-0", reason="x")
    # an auditor without the private key, holding the published public key
    problems = verify_problems(ledger_path, signing_key=tmp_path / "absent.pem",
                               public_key=public_key_pem(genuine_public))
    assert any("not the given public key" in p for p in problems), problems
    assert any("head signature does not verify" in p for p in problems), problems
    # without an independent copy of the key, the forgery is self-consistent: why --public-key exists
    with Ledger.open(ledger_path, create=False, signing_key=tmp_path / "absent.pem") as ledger:
        ledger.verify()


def test_deleting_the_head_file_fails_verify_and_is_not_recreated(ledger_path):
    Path(f"{ledger_path}.head.json").unlink()
    assert any("head file" in p and "missing" in p for p in verify_problems(ledger_path))
    assert not Path(f"{ledger_path}.head.json").exists()


def test_a_crash_between_commit_and_head_file_is_repaired_on_open(ledger_path):
    head_file = Path(f"{ledger_path}.head.json")
    before = head_file.read_bytes()
    with Ledger.open(ledger_path) as ledger:
        ledger.add("site-9", delta(np.random.default_rng(9)), 5)
        head_file.write_bytes(before)  # as if killed after the COMMIT, before the head file was written
        report = ledger.verify()  # a lagging head file is not evidence of tampering …
        assert report.head_file_version == report.current_version - 1
    with Ledger.open(ledger_path) as ledger:  # … and the next open brings it up to date
        report = ledger.verify()
        assert report.head_file_version == report.current_version
        assert json.loads(head_file.read_text())["head"]["version"] == report.current_version


def test_a_crash_right_after_creation_is_repaired_on_open(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.open(path).close()
    Path(f"{path}.head.json").unlink()  # killed between the creating COMMIT and the head file
    with Ledger.open(path) as ledger:
        assert ledger.verify().head_file_version == 0


def test_the_head_file_contradicting_the_database_fails(ledger_path):
    head_file = Path(f"{ledger_path}.head.json")
    document = json.loads(head_file.read_text())
    document["head"]["composed_sha256"] = "0" * 64
    head_file.write_text(json.dumps(document))
    problems = verify_problems(ledger_path)
    assert any("not signed by" in p for p in problems), problems


def test_a_garbled_head_file_fails_verify_and_is_kept(ledger_path):
    head_file = Path(f"{ledger_path}.head.json")
    head_file.write_text("{not json")
    assert any("unreadable" in p for p in verify_problems(ledger_path))
    assert head_file.read_text() == "{not json"


def test_a_ledger_without_its_signing_key_can_be_read_not_changed(ledger_path, tmp_path):
    with Ledger.open(ledger_path, create=False, signing_key=tmp_path / "absent.pem") as ledger:
        ledger.verify()
        with pytest.raises(LedgerError, match="without its signing key"):
            ledger.remove("site-0", reason="x")
        assert ledger.current_version().event == "add"


def test_every_version_is_signed_and_contiguous(ledger_path):
    with Ledger.open(ledger_path) as ledger:
        versions = ledger.versions()
        assert [v.version for v in versions] == list(range(len(versions)))
        key = ledger.public_key()
        for v in versions:
            head, signature = ledger.signed_head(v.version)
            key.verify(bytes.fromhex(signature), json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
            assert (head["version"], head["composed_sha256"]) == (v.version, v.composed_sha256)
    db = raw(ledger_path)
    db.execute("DELETE FROM model_versions WHERE version = 2")
    db.close()
    assert any("not contiguous" in p for p in verify_problems(ledger_path))


# ---------------------------------------------------------------------------------- exports
def taft_ledger(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def public_key_file(ledger_path, tmp_path) -> Path:
    with Ledger.open(ledger_path) as ledger:
        pem = public_key_pem(ledger.public_key())
    path = tmp_path / "server.pub.pem"
    path.write_text(pem)
    return path


def test_an_export_is_checkable_by_a_third_party(ledger_path, public_key_file, tmp_path):
    out = tmp_path / "export"
    with Ledger.open(ledger_path) as ledger:
        manifest = export(ledger, out)
        version = ledger.current_version()
    assert manifest["signed_head"]["head"]["version"] == version.version
    assert manifest["public_key"] == public_key_file.read_text()
    head = verify_export(out, public_key_file)
    assert head["composed_sha256"] == version.composed_sha256
    result = taft_ledger("verify-export", str(out), "--public-key", str(public_key_file))
    assert result.returncode == 0 and result.stdout.startswith("OK"), result.stdout + result.stderr

    other = tmp_path / "other.pub.pem"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    with pytest.raises(LedgerCorrupt):
        verify_export(out, other)
    assert taft_ledger("verify-export", str(out), "--public-key", str(other)).returncode == 1

    # a composed file swapped for another model no longer matches the signed head
    import safetensors.numpy
    composed = safetensors.numpy.load_file(out / manifest["composed_file"])
    composed["head.bias"] = composed["head.bias"] + np.float32(1e-3)
    safetensors.numpy.save_file(composed, out / manifest["composed_file"])
    with pytest.raises(LedgerCorrupt, match="is not the signed"):
        verify_export(out, public_key_file)


def test_verify_with_a_public_key_and_an_export_catches_a_rollback(ledger_path, public_key_file, tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    files = [ledger_path, Path(f"{ledger_path}.head.json")]
    for f in files:
        shutil.copy2(f, saved / f.name)
    with Ledger.open(ledger_path) as ledger:
        ledger.add("site-7", delta(np.random.default_rng(7)), 70)
        export(ledger, tmp_path / "export")
    ok = taft_ledger("--ledger", str(ledger_path), "verify", "--public-key", str(public_key_file),
                     "--export", str(tmp_path / "export"))
    assert ok.returncode == 0 and "signed by SHA256:" in ok.stdout, ok.stdout + ok.stderr
    for f in files:  # roll back the database and its head file together to the saved pair
        shutil.copy2(saved / f.name, f)
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger_path}{suffix}").unlink(missing_ok=True)
    alone = taft_ledger("--ledger", str(ledger_path), "verify", "--public-key", str(public_key_file))
    assert alone.returncode == 0, alone.stdout  # the documented residual risk: a consistent older pair
    caught = taft_ledger("--ledger", str(ledger_path), "verify", "--export", str(tmp_path / "export"))
    assert caught.returncode == 1 and "rolled back" in caught.stdout, caught.stdout
    other = tmp_path / "other.pub.pem"
    other.write_text(public_key_pem(Ed25519PrivateKey.generate().public_key()))
    wrong = taft_ledger("--ledger", str(ledger_path), "verify", "--public-key", str(other))
    assert wrong.returncode == 1 and "not the given public key" in wrong.stdout


def test_signing_key_file_is_private_and_loadable(ledger_path):
    key_file = Path(f"{ledger_path}.signing-key.pem")
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    with Ledger.open(ledger_path) as ledger:
        assert fingerprint(key.public_key()) == fingerprint(ledger.public_key())
