"""Signed JSON requests a site (or the operator) sends the server: keys, canonical bytes, signatures.

Shared by the site tools (deploy/withdraw.py through server/trust/withdrawal.py, client/forget.py) and
the server's checks (server/trust/withdrawal.py, server/trust/forgetting.py), so there is one signing rule:

    signed bytes = CONTEXT + sorted-key compact ASCII JSON of the payload
    signature    = base64(DER ECDSA over those bytes, SHA-256/384/512 matched to the curve)

with the site's ECDSA key — the same OpenSSH key its SuperNode authenticates with — or the
operator's admin key. Every request kind has its own ``CONTEXT`` (domain separation): a signature
made for one kind verifies as no other kind, whatever the payload says.

No Flower and no server code here (``client/`` may not import ``server/``).
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import secrets
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

SIGNERS = ("site", "admin")

# ----------------------------------------------------------------------------- keys


def header_problem(payload: Mapping[str, Any], *, version: int, strings: Iterable[str],
                   what: str = "request") -> str | None:
    """What is wrong with the fields every signed request shares (its version, its string fields,
    the signer, the site id, the nonce's length), or None. One check for withdrawals and forget
    requests, so that neither accepts a header the other refuses."""
    from tangent.protocol.limits import check_site_id

    if type(payload["version"]) is not int or payload["version"] != version:
        return f"unsupported {what} version {str(payload['version'])[:40]!r}"
    strings = sorted(strings)
    if not all(isinstance(payload[k], str) for k in strings):
        return f"malformed {what}: {', '.join(strings)} must be strings"
    if payload["signer"] not in SIGNERS:
        return f"unknown signer {payload['signer'][:40]!r}"
    try:
        check_site_id(payload["site_id"])
    except ValueError as err:
        return f"malformed {what}: {err}"
    if not 16 <= len(payload["nonce"]) <= 128:
        return "nonce must be 16 to 128 characters"
    return None


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


def hash_for(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    # Match the digest to the curve strength (P-384 -> SHA-384), as SSH does.
    size = key.curve.key_size
    return hashes.SHA256() if size <= 256 else hashes.SHA384() if size <= 384 else hashes.SHA512()


# ----------------------------------------------------------------------------- bytes, signatures


def signed_bytes(context: bytes, payload: Mapping[str, Any]) -> bytes:
    """The canonical bytes a signature covers: the kind's context, then sorted-key compact JSON."""
    body = json.dumps(dict(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return context + body.encode("ascii")


def sign(context: bytes, payload: Mapping[str, Any], private_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The request document ``{"payload": ..., "signature": base64}`` (JSON-serialisable)."""
    signature = private_key.sign(signed_bytes(context, payload), ec.ECDSA(hash_for(private_key)))
    return {"payload": dict(payload), "signature": base64.b64encode(signature).decode("ascii")}


def signature_valid(public_key: ec.EllipticCurvePublicKey, signature: bytes, context: bytes,
                    payload: Mapping[str, Any]) -> bool:
    try:
        public_key.verify(signature, signed_bytes(context, payload), ec.ECDSA(hash_for(public_key)))
    except InvalidSignature:
        return False
    return True


# ----------------------------------------------------------------------------- freshness


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def timestamp(now: dt.datetime | None = None) -> str:
    """ISO 8601 UTC with a ``Z`` suffix, the form every request carries."""
    return (now or utc_now()).astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_timestamp(value: str) -> dt.datetime:
    """ValueError when it is not ISO 8601 with a time zone."""
    ts = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if ts.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return ts


def new_nonce() -> str:
    return secrets.token_hex(16)


# ----------------------------------------------------------------------------- forget-samples

#: Domain separation from the withdrawal context (b"taft-fl/withdrawal/v1\n", server/trust/withdrawal.py).
FORGET_CONTEXT = b"taft-fl/forget-samples/v1\n"
FORGET_KIND = "forget-samples"
FORGET_VERSION = 1
FORGET_FIELDS = frozenset({"version", "kind", "site_id", "nonce", "timestamp", "signer", "forgotten",
                           "stats_sha256", "stats_replaces", "delta_sha256"})


def forget_request(site_id: str, private_key: ec.EllipticCurvePrivateKey, *, forgotten: int, stats_sha256: str,
                   stats_replaces: str, delta_sha256: str | None = None, signer: str = "site",
                   now: dt.datetime | None = None, nonce: str | None = None) -> dict[str, Any]:
    """A signed request to replace ``site_id``'s statistics by those over its remaining samples
    (the format is checked by server/trust/forgetting.py)."""
    if signer not in SIGNERS:
        raise ValueError(f"signer must be one of {SIGNERS}, got {signer!r}")
    payload = {"version": FORGET_VERSION, "kind": FORGET_KIND, "site_id": str(site_id),
               "nonce": nonce or new_nonce(), "timestamp": timestamp(now), "signer": signer,
               "forgotten": int(forgotten), "stats_sha256": stats_sha256, "stats_replaces": stats_replaces,
               "delta_sha256": delta_sha256}
    return sign(FORGET_CONTEXT, payload, private_key)
