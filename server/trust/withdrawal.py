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
import hashlib
import json
import logging
import os
import sqlite3
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from server.trust import safejson
from server.ledger.audit import fingerprint
from tangent.protocol import signed_requests
from tangent.protocol.limits import check_site_id
from tangent.protocol.text import is_printable
# the signing rule and key loading are shared with the site tools (client/forget.py)
from tangent.protocol.signed_requests import load_private_key, load_public_key  # noqa: F401  (re-exported)

log = logging.getLogger("taft.withdrawal")

REQUEST_VERSION = 1
# Domain separation: a withdrawal signature can never be replayed as anything else.
SIGNING_CONTEXT = b"taft-fl/withdrawal/v1\n"
MAX_AGE_S = 15 * 60
MAX_CLOCK_SKEW_S = 60
MAX_REASON = 1000  # characters of a withdrawal reason (it goes into the audit log and every report)
SIGNERS = signed_requests.SIGNERS
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
        return signed_requests.signed_bytes(SIGNING_CONTEXT, asdict(self))

    @property
    def issued_at(self) -> dt.datetime:
        return signed_requests.parse_timestamp(self.timestamp)


# ----------------------------------------------------------------------------- create

_utc_now = signed_requests.utc_now


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
        nonce=nonce or signed_requests.new_nonce(),
        timestamp=signed_requests.timestamp(now),
        reason=reason,
        signer=signer,
    )
    return signed_requests.sign(SIGNING_CONTEXT, asdict(request), private_key)


# ----------------------------------------------------------------------------- registry

REGISTRY_VERSION = 2
#: Domain separation: the operator's registry signature can pass for no request.
REGISTRY_SIGNATURE_CONTEXT = b"taft-fl/site-registry/v1\n"
#: environment variable pinning the operator key that must sign the registry ("SHA256:<hex>")
OPERATOR_FINGERPRINT_ENV = "TAFT_OPERATOR_FINGERPRINT"
MAX_SIGNATURE_BYTES = 64 * 1024


def registry_signature_path(registry_path: str | Path) -> Path:
    """The operator's detached signature of the registry file: ``registry.json.sig``."""
    return Path(f"{registry_path}.sig")


def registry_statement(raw: bytes) -> dict[str, Any]:
    """What the operator signs: the registry file's exact bytes, by digest."""
    return {"kind": "site-registry", "version": REGISTRY_VERSION, "sha256": hashlib.sha256(raw).hexdigest()}


def sign_registry(registry_path: str | Path, private_key: ec.EllipticCurvePrivateKey) -> Path:
    """Write ``registry.json.sig``: the operator key's signature over the registry's bytes."""
    path = registry_signature_path(registry_path)
    document = signed_requests.sign(REGISTRY_SIGNATURE_CONTEXT, registry_statement(Path(registry_path).read_bytes()),
                                    private_key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The registry's fingerprint of a site or operator key (server.ledger.audit's one rule)."""
    return fingerprint(key)


class SiteRegistry:
    """The site registry `deploy.register` writes: site id <-> public key <-> SuperLink node id.

    {"version": 2,
     "sites": {"3": {"public_key": "keys/site-3.key.pub", "fingerprint": "SHA256:<hex>",
                     "node_id": 1234567, "max_examples": 1200, "registered_at": "<iso>",
                     "revoked": false}},
     "admin": {"public_key": "keys/operator.key.pub", "fingerprint": "SHA256:<hex>"}}

    Relative key paths are resolved against the registry file's directory. Entries are never
    deleted: ``revoked: true`` means that key can neither contribute nor sign withdrawals. The
    whole file is checked when it is read (ValueError saying what is wrong), so a later lookup
    never meets a malformed entry; a key file whose fingerprint is not the registered one is
    refused when it is loaded.

    ``signed=True`` (the ServerApp in a deployment): the file must carry the operator's signature
    (``registry.json.sig``, written by ``deploy.register`` with the operator key) over its exact
    bytes, made by the registered admin key — and, when ``operator_fingerprint`` or
    ``$TAFT_OPERATOR_FINGERPRINT`` pins one, by that key. Unsigned or edited (a node id swapped,
    a cap raised, a key replaced): ValueError. Without a pin, someone who replaces the admin key
    in the file and re-signs with their own passes: the pin is what makes the signature the
    operator's. ``signed=None`` (the default: the operator's tools, ``deploy.withdraw``,
    ``taft-ledger forget``) checks whenever a pin is set, so an operator who pins the key has
    every tool refuse an edited registry.
    """

    def __init__(self, path: str | Path, *, signed: bool | None = None, operator_fingerprint: str | None = None):
        self.path = Path(path)
        try:
            raw = _read_no_follow(self.path, MAX_REGISTRY_BYTES + 1)
        except FileNotFoundError:
            raise ValueError(f"site registry {self.path} does not exist (written by deploy.register)") from None
        except OSError as err:
            raise ValueError(f"site registry {self.path} cannot be read (a symbolic link is refused): {err}") from None
        if len(raw) > MAX_REGISTRY_BYTES:
            raise ValueError(f"site registry {self.path} is larger than {MAX_REGISTRY_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ValueError(f"site registry {self.path} is not UTF-8 JSON: {err}") from None
        self.data = _checked_registry(data, self.path)
        self._by_node = {entry["node_id"]: site for site, entry in self.data["sites"].items()
                         if entry.get("node_id") is not None}
        self.signed_by: str | None = None
        pinned = operator_fingerprint or os.environ.get(OPERATOR_FINGERPRINT_ENV) or None
        if signed or (signed is None and pinned):
            self.signed_by = self._check_signature(raw, pinned)

    def _check_signature(self, raw: bytes, pinned: str | None) -> str:
        """The fingerprint of the operator key that signed exactly ``raw``; ValueError otherwise."""
        sig_path = registry_signature_path(self.path)
        try:
            document = safejson.loads(_read_no_follow(sig_path, MAX_SIGNATURE_BYTES + 1),
                                      max_bytes=MAX_SIGNATURE_BYTES, max_depth=4)
        except FileNotFoundError:
            raise ValueError(f"site registry {self.path} is not signed ({sig_path} is missing): sign it with "
                             f"python -m deploy.register --sign") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"the registry signature {sig_path} is unreadable: {err}") from None
        try:
            payload, signature = split_document(document)
        except WithdrawalRefused as err:
            raise ValueError(f"the registry signature {sig_path} is malformed: {err}") from None
        if payload != registry_statement(raw):
            raise ValueError(f"site registry {self.path} differs from the file the operator signed (edited?)")
        admin = self.admin_public_key()
        if admin is None:
            raise ValueError(f"site registry {self.path} names no operator (admin) key to check its signature")
        signer = key_fingerprint(admin)
        if pinned is not None and signer != pinned.strip():
            raise ValueError(f"site registry {self.path}: its admin key is {signer}, not the pinned operator key "
                             f"{pinned.strip()}")
        if not signed_requests.signature_valid(admin, signature, REGISTRY_SIGNATURE_CONTEXT, payload):
            raise ValueError(f"site registry {self.path}: the signature is not the registered operator key's")
        return signer

    def sites(self) -> list[str]:
        return sorted(self.data["sites"])

    def entry(self, site_id: str) -> dict[str, Any] | None:
        """The site's registry entry (a copy), None when the site is not registered."""
        entry = self.data["sites"].get(site_id) if isinstance(site_id, str) else None
        return dict(entry) if entry is not None else None

    def site_for_node(self, node_id: int) -> str | None:
        """The site registered for this SuperLink node id (revoked ones included), else None."""
        return self._by_node.get(node_id) if isinstance(node_id, int) and not isinstance(node_id, bool) else None

    def is_revoked(self, site_id: str) -> bool:
        entry = self.entry(site_id)
        return bool(entry and entry.get("revoked", False))

    def max_examples(self, site_id: str) -> int | None:
        entry = self.entry(site_id)
        return entry["max_examples"] if entry else None

    def _key_path(self, entry: dict[str, Any]) -> Path:
        path = Path(entry["public_key"])
        return path if path.is_absolute() else self.path.parent / path

    def _load_key(self, entry: dict[str, Any], who: str) -> ec.EllipticCurvePublicKey:
        key = load_public_key(self._key_path(entry))
        if entry.get("fingerprint") and key_fingerprint(key) != entry["fingerprint"]:
            raise ValueError(f"{who}: key file {entry['public_key']} has fingerprint {key_fingerprint(key)}, "
                             f"the registry says {entry['fingerprint']}")
        return key

    def public_key(self, site_id: str) -> ec.EllipticCurvePublicKey | None:
        entry = self.entry(site_id)
        return self._load_key(entry, f"site {site_id}") if entry else None

    def admin_public_key(self) -> ec.EllipticCurvePublicKey | None:
        entry = self.data.get(ADMIN)
        return self._load_key(entry, ADMIN) if entry else None


MAX_REGISTRY_BYTES = 16 * 1024 * 1024


def _read_no_follow(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, refusing a symbolic link as the last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read(limit)


def _checked_registry(data: Any, path: Path) -> dict[str, Any]:
    """The registry document if it follows the version-2 format; ValueError naming the problem."""
    def bad(what: str) -> ValueError:
        return ValueError(f"site registry {path} is malformed: {what}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("version") != REGISTRY_VERSION or isinstance(data.get("version"), bool):
        raise bad(f"version {data.get('version')!r}, expected {REGISTRY_VERSION} (re-register with deploy.register)")
    sites = data.get("sites", {})
    if not isinstance(sites, dict):
        raise bad("'sites' must be an object of site id -> entry")
    seen_nodes: dict[int, str] = {}
    seen_fingerprints: dict[str, str] = {}
    for site, entry in sites.items():
        try:
            check_site_id(site)
        except ValueError as err:
            raise bad(str(err)) from None
        if not isinstance(entry, dict):
            raise bad(f"site {site}: entry must be an object")
        if not isinstance(entry.get("public_key"), str) or not entry["public_key"]:
            raise bad(f"site {site}: 'public_key' must be a path")
        fingerprint = entry.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint.startswith("SHA256:"):
            raise bad(f"site {site}: 'fingerprint' must be 'SHA256:<hex>'")
        if fingerprint in seen_fingerprints:
            raise bad(f"sites {seen_fingerprints[fingerprint]} and {site} share key {fingerprint}")
        seen_fingerprints[fingerprint] = site
        node_id = entry.get("node_id")
        if node_id is not None:
            if not isinstance(node_id, int) or isinstance(node_id, bool):
                raise bad(f"site {site}: 'node_id' must be an integer")
            if node_id in seen_nodes:
                raise bad(f"sites {seen_nodes[node_id]} and {site} share node id {node_id}")
            seen_nodes[node_id] = site
        cap = entry.get("max_examples")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise bad(f"site {site}: 'max_examples' must be a positive integer (deploy.register --max-examples)")
        if not isinstance(entry.get("revoked", False), bool):
            raise bad(f"site {site}: 'revoked' must be true or false")
    admin = data.get(ADMIN)
    if admin is not None and (not isinstance(admin, dict) or not isinstance(admin.get("public_key"), str)
                              or not admin["public_key"]):
        raise bad("'admin' must be an object with a 'public_key' path")
    return data | {"sites": sites}


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
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A link planted in the state directory must not move the nonces (and the replay
        # protection with them) elsewhere: the file and SQLite's companions are never links.
        for file in (self.path, *(Path(f"{self.path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
            if file.is_symlink():
                raise ValueError(f"the nonce store {file} is a symbolic link: refused")
        # created private before SQLite opens it (its -wal/-shm files copy these permissions)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
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

def split_document(document: Any) -> tuple[dict[str, Any], bytes]:
    """``(payload, raw signature)`` of any signed request document; WithdrawalRefused when malformed."""
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        raise WithdrawalRefused("malformed request: expected {'payload': {...}, 'signature': ...}")
    signature = document.get("signature")
    if not signature or not isinstance(signature, str):
        raise WithdrawalRefused("unsigned request")
    try:
        return document["payload"], base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError) as err:
        raise WithdrawalRefused("malformed signature (not base64)") from err


def parse_request(document: Any) -> tuple[WithdrawalRequest, bytes]:
    """The request and its raw signature; WithdrawalRefused when malformed or unsigned."""
    payload, raw_signature = split_document(document)
    fields = {"site_id", "nonce", "timestamp", "reason", "signer", "version"}
    if set(payload) != fields:
        raise WithdrawalRefused(f"malformed request: payload fields must be {sorted(fields)}")
    if type(payload["version"]) is not int or payload["version"] != REQUEST_VERSION:
        raise WithdrawalRefused(f"unsupported request version {str(payload['version'])[:40]!r}")
    if not all(isinstance(payload[k], str) for k in fields - {"version"}):
        raise WithdrawalRefused("malformed request: site_id, nonce, timestamp, reason, signer must be strings")
    if payload["signer"] not in SIGNERS:
        raise WithdrawalRefused(f"unknown signer {payload['signer'][:40]!r}")
    try:
        check_site_id(payload["site_id"])
    except ValueError as err:
        raise WithdrawalRefused(f"malformed request: {err}") from None
    if not 16 <= len(payload["nonce"]) <= 128:
        raise WithdrawalRefused("nonce must be 16 to 128 characters")
    if not (payload["reason"] and len(payload["reason"]) <= MAX_REASON and is_printable(payload["reason"])
            and is_printable(payload["nonce"]) and is_printable(payload["timestamp"])):
        # every field is printed for the operator and kept in the audit log: no escape sequences in
        raise WithdrawalRefused(f"reason, nonce and timestamp must be printable text (reason: 1 to {MAX_REASON} "
                                f"characters)")
    return WithdrawalRequest(**payload), raw_signature


def _signer_key(request: Any, registry: SiteRegistry) -> ec.EllipticCurvePublicKey:
    """The registered key that must have signed ``request``; WithdrawalRefused when there is none."""
    if request.signer == ADMIN:
        key = registry.admin_public_key()
        if key is None:
            raise WithdrawalRefused("admin-signed request but no admin key is registered")
    else:
        key = registry.public_key(request.site_id)
        if key is None:
            raise WithdrawalRefused(f"unknown site {request.site_id!r}: no public key registered")
        if registry.is_revoked(request.site_id):
            # checked before the signature: a revoked key signs nothing, valid or not
            raise WithdrawalRefused(f"site {request.site_id!r}: its key was revoked (deploy.register --unregister); "
                                    "an operator-signed request (signer='admin') can still withdraw it")
    return key


def verify_request(
    document: Any,
    registry: SiteRegistry,
    max_age_s: float = MAX_AGE_S,
    now: dt.datetime | None = None,
) -> WithdrawalRequest:
    """Check format, signer key and freshness (not the nonce). Raises WithdrawalRefused."""
    request, signature = parse_request(document)
    verify_signed(request, SIGNING_CONTEXT, asdict(request), signature, registry, max_age_s=max_age_s, now=now)
    return request


def verify_signed(request: Any, context: bytes, payload: dict[str, Any], signature: bytes, registry: SiteRegistry,
                  max_age_s: float = MAX_AGE_S, now: dt.datetime | None = None) -> None:
    """Signer key (registered, not revoked), signature under ``context`` and freshness of any parsed
    request with ``site_id``, ``signer`` and ``timestamp`` (withdrawal, forget-samples: one rule).
    Raises WithdrawalRefused."""
    try:
        key = _signer_key(request, registry)
    except (OSError, ValueError) as err:  # a missing or swapped key file refuses, never crashes the run
        raise WithdrawalRefused(f"cannot load the registered {request.signer} key: {err}") from None
    if not signed_requests.signature_valid(key, signature, context, payload):
        raise WithdrawalRefused(
            f"bad signature: not signed by the registered {request.signer} key"
            + ("" if request.signer == ADMIN else f" of site {request.site_id!r}")
        )
    try:
        age = ((now or _utc_now()) - signed_requests.parse_timestamp(request.timestamp)).total_seconds()
    except (ValueError, OverflowError) as err:
        raise WithdrawalRefused(f"malformed timestamp {request.timestamp[:40]!r}") from err
    if age > max_age_s:
        raise WithdrawalRefused(f"stale request: signed {age:.0f} s ago (limit {max_age_s:.0f} s)")
    if age < -MAX_CLOCK_SKEW_S:
        raise WithdrawalRefused(f"request dated {-age:.0f} s in the future (clock skew?)")


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
        # The ledger subtracts the site's contribution, if any, and marks it withdrawn (sticky);
        # False: it was withdrawn already.
        if ledger.remove(request.site_id, reason=_ledger_reason(request)) is False:
            raise WithdrawalRefused(f"site {request.site_id!r} is already withdrawn: nothing to remove")
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


MAX_REQUEST_BYTES = 64 * 1024
MAX_REQUEST_DEPTH = 4  # {"payload": {...}} is depth 2; anything deeper is not a request


def read_request(request_path: str | Path) -> Any:
    """The JSON document of a request file; WithdrawalRefused when it cannot be read.

    The file is hostile input: only a regular file is opened (a FIFO would block the run), at most
    ``MAX_REQUEST_BYTES`` are read, it must be UTF-8, and JSON nesting, NaN/Infinity and numbers
    Python refuses to parse (over 4,300 digits) are refusals, never exceptions of another kind.
    """
    path = Path(request_path)
    try:
        if not path.is_file():
            raise WithdrawalRefused(f"cannot read request {path}: not a regular file")
        with path.open("rb") as handle:
            raw = handle.read(MAX_REQUEST_BYTES + 1)
    except OSError as err:
        raise WithdrawalRefused(f"cannot read request {path}: {err}") from None
    try:
        return safejson.loads(raw, max_bytes=MAX_REQUEST_BYTES, max_depth=MAX_REQUEST_DEPTH)
    except ValueError as err:
        raise WithdrawalRefused(f"cannot read request {path}: {err}") from None


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
