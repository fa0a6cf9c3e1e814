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
(`<ledger>.withdrawals.sqlite`, server/trust/nonces.py): one transaction per decision, so a nonce is
consumed before the ledger is touched and a replay is refused even after a crash. The registry and its
operator signature are server/trust/registry.py.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from server.trust import safejson
from server.trust.nonces import NonceStore, nonce_store_path
from server.trust.registry import ADMIN, SiteRegistry
from tangent.protocol import signed_requests
from tangent.protocol.text import is_printable
# the signing rule and key loading are shared with the site tools (client/forget.py)
from tangent.protocol.signed_requests import header_problem, load_private_key, load_public_key  # noqa: F401  (re-exported)

log = logging.getLogger("taft.withdrawal")

REQUEST_VERSION = 1
# Domain separation: a withdrawal signature can never be replayed as anything else.
SIGNING_CONTEXT = b"taft-fl/withdrawal/v1\n"
MAX_AGE_S = 15 * 60
MAX_CLOCK_SKEW_S = 60
MAX_REASON = 1000  # characters of a withdrawal reason (it goes into the audit log and every report)
SIGNERS = signed_requests.SIGNERS


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
    problem = header_problem(payload, version=REQUEST_VERSION, strings=fields - {"version"})
    if problem:
        raise WithdrawalRefused(problem)
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
        raw = safejson.read_regular_file(path, MAX_REQUEST_BYTES)
    except ValueError as err:
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
