"""Authenticated withdrawal requests: a site asks the server to subtract its contribution.

A request is a small JSON document

    {"payload": {"version": 1, "site_id": "3", "nonce": "…", "timestamp": "2026-…Z",
                 "reason": "…", "signer": "site"},
     "signature": "<base64 DER ECDSA-SHA384>"}

signed with the site's ECDSA private key — the same OpenSSH key its SuperNode authenticates
with — or, with `signer = "admin"`, with the operator's admin key. The server verifies it
against the public key registered for that site in the site registry (written by
`deploy.register`), refuses unsigned, wrongly signed, stale, future-dated and replayed
requests, logs every decision, and only then calls `Ledger.remove(site_id, reason=...)`.

Nonces and decisions are kept in a small SQLite file next to the ledger
(`<ledger>.withdrawals.sqlite`): one transaction per decision, so a nonce is consumed
before the ledger is touched and a replay is refused even after a crash.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("taft.withdrawal")

REQUEST_VERSION = 1
# Domain separation: a withdrawal signature can never be replayed as anything else.
SIGNING_CONTEXT = b"taft-fl/withdrawal/v1\n"
MAX_AGE_S = 15 * 60
MAX_CLOCK_SKEW_S = 60
SIGNERS = ("site", "admin")
ADMIN = "admin"


class WithdrawalRefused(Exception):
    """A request was refused; `str(err)` says why in plain words."""


@dataclass(frozen=True)
class WithdrawalRequest:
    site_id: str
    nonce: str
    timestamp: str
    reason: str
    signer: str = "site"
    version: int = REQUEST_VERSION

    def signed_bytes(self) -> bytes:
        """Canonical bytes covered by the signature (sorted-key compact JSON)."""
        body = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return SIGNING_CONTEXT + body.encode("ascii")

    @property
    def issued_at(self) -> dt.datetime:
        ts = dt.datetime.fromisoformat(self.timestamp.replace("Z", "+00:00"))
        if ts.tzinfo is None:
            raise ValueError("timestamp has no time zone")
        return ts


# ----------------------------------------------------------------------------- keys

def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key in OpenSSH (SuperNode auth key) or PEM format."""
    data = Path(path).read_bytes()
    if b"OPENSSH PRIVATE KEY" in data:
        key = serialization.load_ssh_private_key(data, None)
    else:
        key = serialization.load_pem_private_key(data, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    """An EC public key in OpenSSH (`ecdsa-sha2-nistp384 …`) or PEM format."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"ecdsa-"):
        key = serialization.load_ssh_public_key(data)
    else:
        key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: not an EC public key")
    return key


def _hash_for(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    # Match the digest to the curve strength (P-384 -> SHA-384), as SSH does.
    size = key.curve.key_size
    return hashes.SHA256() if size <= 256 else hashes.SHA384() if size <= 384 else hashes.SHA512()


# ----------------------------------------------------------------------------- create

def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_request(
    site_id: str,
    private_key: ec.EllipticCurvePrivateKey,
    reason: str,
    signer: str = "site",
    now: dt.datetime | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """A signed withdrawal request document (JSON-serialisable)."""
    if signer not in SIGNERS:
        raise ValueError(f"signer must be one of {SIGNERS}, got {signer!r}")
    request = WithdrawalRequest(
        site_id=str(site_id),
        nonce=nonce or secrets.token_hex(16),
        timestamp=(now or _utc_now()).astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        reason=reason,
        signer=signer,
    )
    signature = private_key.sign(request.signed_bytes(), ec.ECDSA(_hash_for(private_key)))
    return {"payload": asdict(request), "signature": base64.b64encode(signature).decode("ascii")}


# ----------------------------------------------------------------------------- registry

class SiteRegistry:
    """site-id -> public key, from the JSON file `deploy.register` writes.

    {"sites": {"3": {"public_key": "keys/site-3.key.pub", "node_id": 123, ...}},
     "admin": {"public_key": "keys/admin.key.pub"}}
    Relative key paths are resolved against the registry file's directory.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.data = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.data = {}
        self.data.setdefault("sites", {})

    def sites(self) -> list[str]:
        return sorted(self.data["sites"])

    def _key_path(self, entry: dict[str, Any]) -> Path:
        path = Path(entry["public_key"])
        return path if path.is_absolute() else self.path.parent / path

    def public_key(self, site_id: str) -> ec.EllipticCurvePublicKey | None:
        entry = self.data["sites"].get(str(site_id))
        return load_public_key(self._key_path(entry)) if entry else None

    def admin_public_key(self) -> ec.EllipticCurvePublicKey | None:
        entry = self.data.get(ADMIN)
        return load_public_key(self._key_path(entry)) if entry else None


# ----------------------------------------------------------------------------- nonce store

def nonce_store_path(ledger_path: str | Path) -> Path:
    """Where the nonces and decisions of a ledger's withdrawals live."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".withdrawals.sqlite")


class NonceStore:
    """Used nonces and every decision, in one SQLite file (schema version in the file)."""

    SCHEMA_VERSION = 1

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(self.SCHEMA_VERSION),)
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, site_id TEXT NOT NULL,"
                " timestamp TEXT NOT NULL, consumed_at TEXT NOT NULL)"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS decisions (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " at TEXT NOT NULL, site_id TEXT, nonce TEXT, signer TEXT, accepted INTEGER NOT NULL,"
                " detail TEXT NOT NULL)"
            )

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return _Tx()

    def consume(self, request: WithdrawalRequest) -> bool:
        """Mark the nonce used; False when it already was (a replay)."""
        with self._tx():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO nonces VALUES (?, ?, ?, ?)",
                (request.nonce, request.site_id, request.timestamp, _utc_now().isoformat()),
            )
            return cur.rowcount == 1

    def record(self, payload: dict[str, Any] | None, accepted: bool, detail: str) -> None:
        payload = payload or {}
        with self._tx():
            self.db.execute(
                "INSERT INTO decisions (at, site_id, nonce, signer, accepted, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (_utc_now().isoformat(), _s(payload.get("site_id")), _s(payload.get("nonce")),
                 _s(payload.get("signer")), int(accepted), detail),
            )

    def decisions(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT at, site_id, nonce, signer, accepted, detail FROM decisions ORDER BY id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "NonceStore":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


# ----------------------------------------------------------------------------- verify / apply

def parse_request(document: Any) -> tuple[WithdrawalRequest, bytes]:
    """The request and its raw signature; WithdrawalRefused when malformed or unsigned."""
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        raise WithdrawalRefused("malformed request: expected {'payload': {...}, 'signature': ...}")
    signature = document.get("signature")
    if not signature or not isinstance(signature, str):
        raise WithdrawalRefused("unsigned request")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as err:
        raise WithdrawalRefused("malformed signature (not base64)") from err
    payload = document["payload"]
    fields = {"site_id", "nonce", "timestamp", "reason", "signer", "version"}
    if set(payload) != fields:
        raise WithdrawalRefused(f"malformed request: payload fields must be {sorted(fields)}")
    if payload["version"] != REQUEST_VERSION:
        raise WithdrawalRefused(f"unsupported request version {payload['version']!r}")
    if not all(isinstance(payload[k], str) for k in fields - {"version"}):
        raise WithdrawalRefused("malformed request: site_id, nonce, timestamp, reason, signer must be strings")
    if payload["signer"] not in SIGNERS:
        raise WithdrawalRefused(f"unknown signer {payload['signer']!r}")
    if len(payload["nonce"]) < 16:
        raise WithdrawalRefused("nonce too short (at least 16 characters)")
    return WithdrawalRequest(**payload), raw_signature


def verify_request(
    document: Any,
    registry: SiteRegistry,
    max_age_s: float = MAX_AGE_S,
    now: dt.datetime | None = None,
) -> WithdrawalRequest:
    """Check format, signer key and freshness (not the nonce). Raises WithdrawalRefused."""
    request, signature = parse_request(document)
    if request.signer == ADMIN:
        key = registry.admin_public_key()
        if key is None:
            raise WithdrawalRefused("admin-signed request but no admin key is registered")
    else:
        key = registry.public_key(request.site_id)
        if key is None:
            raise WithdrawalRefused(f"unknown site {request.site_id!r}: no public key registered")
    try:
        key.verify(signature, request.signed_bytes(), ec.ECDSA(_hash_for(key)))
    except InvalidSignature as err:
        raise WithdrawalRefused(
            f"bad signature: not signed by the registered {request.signer} key"
            + ("" if request.signer == ADMIN else f" of site {request.site_id!r}")
        ) from err
    try:
        issued_at = request.issued_at
    except ValueError as err:
        raise WithdrawalRefused(f"malformed timestamp {request.timestamp!r}") from err
    age = ((now or _utc_now()) - issued_at).total_seconds()
    if age > max_age_s:
        raise WithdrawalRefused(f"stale request: signed {age:.0f} s ago (limit {max_age_s:.0f} s)")
    if age < -MAX_CLOCK_SKEW_S:
        raise WithdrawalRefused(f"request dated {-age:.0f} s in the future (clock skew?)")
    return request


class _Ledger(Protocol):
    def remove(self, site_id: str, reason: str = ...) -> bool: ...


def apply_withdrawal(
    document: Any,
    ledger: _Ledger,
    registry: SiteRegistry,
    nonces: NonceStore,
    max_age_s: float = MAX_AGE_S,
    now: dt.datetime | None = None,
) -> WithdrawalRequest:
    """Verify a request and, only if it passes, remove the site from the ledger.

    Every decision is logged and recorded in `nonces`. Raises WithdrawalRefused.
    """
    payload = document.get("payload") if isinstance(document, dict) else None
    payload = payload if isinstance(payload, dict) else None
    try:
        request = verify_request(document, registry, max_age_s=max_age_s, now=now)
        if not nonces.consume(request):
            raise WithdrawalRefused(f"replayed request: nonce {request.nonce} was already used")
        # The nonce is consumed first: whatever happens next, this request is spent.
        if ledger.remove(request.site_id, reason=_ledger_reason(request)) is False:
            raise WithdrawalRefused(f"site {request.site_id!r} has no active contribution in the ledger")
    except WithdrawalRefused as err:
        nonces.record(payload, accepted=False, detail=str(err))
        log.warning("withdrawal REFUSED (site=%s): %s", (payload or {}).get("site_id"), err)
        raise
    detail = f"removed site {request.site_id} (signer={request.signer}, reason={request.reason!r})"
    nonces.record(payload, accepted=True, detail=detail)
    log.info("withdrawal ACCEPTED: %s", detail)
    return request


def _ledger_reason(request: WithdrawalRequest) -> str:
    return (f"withdrawal request {request.nonce} signed by {request.signer} at "
            f"{request.timestamp}: {request.reason}")


def read_request(request_path: str | Path) -> Any:
    """The JSON document of a request file; WithdrawalRefused when it cannot be read."""
    try:
        return json.loads(Path(request_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WithdrawalRefused(f"cannot read request {request_path}: {err}") from err


def apply_withdrawal_file(
    request_path: str | Path,
    ledger_path: str | Path,
    registry_path: str | Path,
    max_age_s: float = MAX_AGE_S,
) -> WithdrawalRequest:
    """Convenience for the CLI and the ServerApp: read, verify, remove (ledger opened here)."""
    from server.ledger import Ledger  # imported late: verification needs no ledger

    document = read_request(request_path)
    registry = SiteRegistry(registry_path)
    ledger = Ledger.open(ledger_path)
    try:
        with NonceStore(nonce_store_path(ledger_path)) as nonces:
            return apply_withdrawal(document, ledger, registry, nonces, max_age_s=max_age_s)
    finally:
        close = getattr(ledger, "close", None)
        if close:
            close()
