"""The exported model: the composed Δ (safetensors) + a manifest a third party can check.

The manifest carries the ledger's signed head for the exported version and the server's public
key. :func:`verify_export` checks, with a public key obtained *independently* of the export (the
operator publishes it), that the head is signed by that key and that the composed file is the
one the head names. A kept export is also the external copy that exposes a later rollback of the
ledger: its signed version must still be in the ledger, with the same head.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger import audit
from server.ledger.accumulators import arrays_digest
from server.ledger.contributions import Ledger
from server.ledger.records import LedgerCorrupt, LedgerError

COMPOSED_FILE = "composed_delta.safetensors"
MANIFEST_FILE = "manifest.json"


def _finite_or_none(x: float) -> float | None:
    return None if math.isinf(x) else x


def export(ledger: Ledger, out: Path) -> dict[str, Any]:
    """Write the composed Δ and its manifest into ``out``; returns the manifest."""
    # One snapshot: the version, the contributions, the tensors and the head describe one state.
    with ledger.snapshot():
        version = ledger.current_version()
        active = ledger.contributions(status="active")
        composed = ledger.composed_arrays()
        settings = ledger.settings()
        head, signature = ledger.signed_head(version.version)
        privacy = ledger.privacy_totals()
    public_key = audit.load_public_key(settings["signing_public_key"])
    max_epsilon = max((math.inf if c.epsilon is None else c.epsilon for c in active), default=None)
    manifest = {
        "model_version": version.version,
        "created_at": version.created_at,
        "composed_sha256": version.composed_sha256,
        "composed_file": COMPOSED_FILE,
        "base_digest": settings.get("base_digest"),
        "weighting": settings["weighting"],
        "total_weight": version.total_weight,
        "frac_bits": settings["frac_bits"],
        "sites": [{"site_id": c.site_id, "contribution_id": c.id, "version": c.version,
                   "num_examples": c.num_examples, "epsilon": c.epsilon, "delta_dp": c.delta_dp,
                   "delta_sha256": c.delta_sha256} for c in active],
        # A site trained without DP makes the composed model non-private: ε is then unbounded.
        "max_epsilon": None if max_epsilon is None or math.isinf(max_epsilon) else max_epsilon,
        "non_private_sites": [c.site_id for c in active if c.epsilon is None],
        # Per site, (ε, δ) summed over everything it ever released (replaced and removed
        # contributions too); ε null = unbounded (some contribution had no DP, see non_dp).
        "privacy": {site: {**t, "epsilon": _finite_or_none(t["epsilon"])} for site, t in privacy.items()},
        "audit_head": head["audit_hash"],
        "signed_head": {"head": head, "signature": signature},
        "public_key": audit.public_key_pem(public_key),
        "public_key_fingerprint": audit.fingerprint(public_key),
    }
    assert arrays_digest(composed) == version.composed_sha256 == head["composed_sha256"]
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(composed, out / COMPOSED_FILE,
                                metadata={"model_version": str(version.version),
                                          "composed_sha256": version.composed_sha256})
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def verify_export(directory: Path, public_key: Ed25519PublicKey | str | Path) -> dict[str, Any]:
    """Check an export against the server's public key; returns the signed head. Raises
    :class:`LedgerCorrupt` listing every problem, LedgerError when the export cannot be read."""
    if not isinstance(public_key, Ed25519PublicKey):
        public_key = audit.load_public_key(public_key)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        head, signature = manifest["signed_head"]["head"], manifest["signed_head"]["signature"]
        composed = safetensors.numpy.load_file(directory / manifest["composed_file"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(f"cannot read the export in {directory}: {type(e).__name__}: {e}") from None
    problems = []
    fp = audit.fingerprint(public_key)
    if not isinstance(head, dict) or not audit.signature_valid(public_key, head, signature):
        problems.append(f"the manifest's head is not signed by {fp}")
        head = head if isinstance(head, dict) else {}
    if head.get("public_key") != fp:
        problems.append(f"the head names signing key {head.get('public_key')}, not {fp}")
    digest = arrays_digest(composed)
    if digest != head.get("composed_sha256"):
        problems.append(f"the composed file's digest {digest} is not the signed {head.get('composed_sha256')}")
    for key, head_key in (("model_version", "version"), ("composed_sha256", "composed_sha256"),
                          ("total_weight", "total_weight"), ("audit_head", "audit_hash")):
        if manifest.get(key) != head.get(head_key):
            problems.append(f"manifest {key} = {manifest.get(key)!r}, the signed head says {head.get(head_key)!r}")
    if problems:
        raise LedgerCorrupt(problems)
    return head
