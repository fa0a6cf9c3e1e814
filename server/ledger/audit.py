"""Tamper evidence: the hash-chained audit log, Ed25519-signed chain heads and the head file.

Audit entry ``k`` stores ``sha256(hash_{k-1} ‖ canonical JSON of entry k)``. A chain alone proves
nothing against someone who can write the file: they can rewrite an entry and re-hash everything
after it, or cut off the newest entries. So after every change the server signs the new *head*
(model version, audit sequence number and hash, composed digest, total weight) with its own
Ed25519 key, stores the signature beside the version, and writes the signed head atomically to
``<ledger>.head.json``. Rewriting history then breaks a signature; cutting it off leaves the
database behind the head file; both make ``verify`` fail. What remains (docs/ledger.md): whoever holds the
signing key can re-sign a rewritten history, and replacing the head file and the database by an
older pair (a rollback) needs no key and is only caught against a head kept where the writer
cannot reach: the witness (:mod:`server.ledger.witness`) or an earlier export.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.ledger.records import LedgerError, canonical_json
from server.ledger.storage import FILE_MODE, make_private_dirs
from tangent.protocol import signatures

GENESIS_HASH = "0" * 64
HEAD_FORMAT = "taft-fl ledger head 1"


# ---------------------------------------------------------------------------- hash chain
def entry_hash(prev_hash: str, seq: int, at: str, action: str, site_id: str | None, payload: str) -> str:
    body = canonical_json({"seq": seq, "at": at, "action": action, "site_id": site_id, "payload": payload})
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


def append_entry(db, at: str, action: str, site_id: str | None, payload: dict) -> tuple[int, str]:
    """Append one entry to the ``audit`` table; returns its (seq, hash)."""
    last = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS_HASH)
    body = canonical_json(payload)
    digest = entry_hash(prev, seq, at, action, site_id, body)
    db.execute("INSERT INTO audit(seq, at, action, site_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
               (seq, at, action, site_id, body, prev, digest))
    return seq, digest


def chain_problems(entries: list[dict[str, Any]]) -> list[str]:
    problems, prev = [], GENESIS_HASH
    for i, e in enumerate(entries, start=1):
        if e["seq"] != i:
            problems.append(f"audit: entry {e['seq']} where {i} was expected (entry missing?)")
        if e["prev_hash"] != prev:
            problems.append(f"audit {e['seq']}: prev_hash does not match the previous entry")
        if e["hash"] != entry_hash(e["prev_hash"], e["seq"], e["at"], e["action"], e["site_id"], e["payload"]):
            problems.append(f"audit {e['seq']}: hash does not match its content")
        prev = e["hash"]
    return problems


# ---------------------------------------------------------------------------- keys
def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


# The one fingerprint rule of the project (ledger signing keys, site and operator keys).
fingerprint = signatures.fingerprint


def load_public_key(pem: str | bytes | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or a PEM file; LedgerError when it is not one."""
    try:
        data = Path(pem).read_bytes() if isinstance(pem, Path) else (pem.encode() if isinstance(pem, str) else pem)
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise LedgerError(f"cannot read the public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"the public key is a {type(key).__name__}, not Ed25519")
    return key


def load_signing_key(path: Path, create: bool) -> Ed25519PrivateKey | None:
    """The server's head-signing key from ``path`` (PKCS#8 PEM); created 0600 when absent and
    ``create``; None when absent otherwise, or when this user may not read it (an auditor who
    verifies against the public key)."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except PermissionError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise LedgerError(f"cannot read the ledger signing key {path}: {e}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
        return key
    if not create:
        return None
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    make_private_dirs(path.parent)
    try:
        _write_atomically(path, pem, exclusive=True)
    except FileExistsError:  # another process created it first: use that one
        return load_signing_key(path, create=False)
    return key


# ---------------------------------------------------------------------------- heads
def make_head(version: dict, audit_seq: int, audit_hash: str, at: str, key_fingerprint: str) -> dict[str, Any]:
    return {"format": HEAD_FORMAT, "version": version["version"], "created_at": at,
            "audit_seq": audit_seq, "audit_hash": audit_hash, "composed_sha256": version["composed_sha256"],
            "total_weight": version["total_weight"], "public_key": key_fingerprint}


def sign_head(key: Ed25519PrivateKey, head: dict[str, Any]) -> str:
    return key.sign(canonical_json(head).encode()).hex()


signature_valid = signatures.ed25519_valid


def head_file_path(ledger_path: Path) -> Path:
    return Path(f"{ledger_path}.head.json")


def write_head_file(path: Path, head: dict[str, Any], signature: str) -> None:
    data = json.dumps({"head": head, "signature": signature}, indent=2, sort_keys=True) + "\n"
    _write_atomically(path, data.encode())


def read_head_file(path: Path) -> tuple[dict[str, Any], str] | None:
    """(head, signature) from the head file; None when there is none; LedgerError when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a link planted in its place is refused
        with os.fdopen(fd, "rb") as f:
            document = json.loads(f.read())
        return dict(document["head"]), str(document["signature"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(f"the head file {path} is unreadable: {e}") from None


def _write_atomically(path: Path, data: bytes, exclusive: bool = False) -> None:
    """Write to a 0600 temporary file, fsync, rename over ``path``, fsync the directory: a crash
    leaves either the old or the new file, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails if another process created the key meanwhile
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
