"""The encoding and key rules every signature of the project uses (no Flower, no server code).

- :func:`canonical_json`: the bytes a ledger hashes and signs (sorted keys, no spaces, no NaN);
- :func:`fingerprint`: ``"SHA256:" + sha256(DER SubjectPublicKeyInfo)`` of any public key;
- :func:`ed25519_valid`: an Ed25519 signature (hex) over a document's canonical JSON.

The server (server/ledger) signs with these rules; a consumer of an export (taft-predict) checks
with them, without importing the server.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def canonical_json(obj: Any) -> str:
    """The one JSON encoding the ledger hashes, stores and signs: sorted keys, no spaces, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def fingerprint(key) -> str:
    """SHA-256 of a public key's DER SubjectPublicKeyInfo (stable across OpenSSH/PEM encodings)."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """``SHA256:<hex>`` from a fingerprint given with or without the prefix, in any case."""
    text = text.strip()
    body = text[len("SHA256:"):] if text.upper().startswith("SHA256:") else text
    body = body.lower()
    if len(body) != 64 or any(c not in "0123456789abcdef" for c in body):
        raise ValueError(f"{text!r} is not a SHA256 key fingerprint (64 hex digits)")
    return "SHA256:" + body


def load_ed25519_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """ValueError when ``pem`` is not an Ed25519 public key in PEM."""
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"the public key is a {type(key).__name__}, not Ed25519")
    return key


def ed25519_valid(key: Ed25519PublicKey, document: Any, signature_hex: Any) -> bool:
    try:
        key.verify(bytes.fromhex(signature_hex), canonical_json(document).encode())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
