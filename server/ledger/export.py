"""The exported model + a manifest a third party can check.

A delta ledger exports the composed Δ (``composed_delta.safetensors``); a stats ledger exports the
exact head solved from its composed statistics (``exact_head.safetensors``: ``weight`` [p, k],
``bias`` [k], float32; λ by GCV, tangent.exact_head.statistics.solve). The statistics themselves stay in the
ledger.

The manifest carries the ledger's signed head for the exported version, the server's public key
and a *signed export statement* (same key, its own format string) covering the whole manifest
(its canonical JSON: privacy claims, site list, model spec, base digest, model card, λ …) and
the sha256 of every file (tangent/serving/export_check.py has the format and the check, so that
``taft-predict`` needs no server code). ``public-key.pem`` is written beside the manifest. A
consumer pins the signer with that key obtained from the operator, or with its fingerprint;
the embedded key alone proves integrity, not who signed. A kept export is also an external copy
that exposes a later rollback of the ledger: its signed version must still be in the ledger.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.numpy
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger import audit
from server.ledger.accumulators import arrays_digest
from server.ledger.contributions import Ledger
from server.ledger.families import stats_digest
from server.ledger.records import LedgerCorrupt, LedgerError
from tangent.serving import export_check

COMPOSED_FILE = "composed_delta.safetensors"
HEAD_FILE = "exact_head.safetensors"
MANIFEST_FILE = export_check.MANIFEST_FILE


def _finite_or_none(x: float) -> float | None:
    return None if math.isinf(x) else x


def export(ledger: Ledger, out: Path, *, model_spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the exported model and its manifest into ``out``; returns the manifest.

    The model spec (delta ledgers: the ModelSpec config w0 is rebuilt from, recorded in the ledger
    by the run; a stats ledger has it in its model card) goes into the manifest and the signed
    statement, for ``taft-predict``. ``model_spec``: only for a ledger that recorded none; one that
    differs from the recorded spec is refused."""
    # One snapshot: the version, the contributions, the sums and the head describe one state.
    with ledger.snapshot():
        version = ledger.current_version()
        active = ledger.contributions(status="active")
        settings = ledger.settings()
        head, signature = ledger.signed_head(version.version)
        privacy = ledger.privacy_totals()
        if ledger.family == "stats":
            stats = ledger.composed_stats()
            composed = None
        else:
            composed = ledger.composed_arrays()
    public_key = audit.load_public_key(settings["signing_public_key"])
    max_epsilon = max((math.inf if c.epsilon is None else c.epsilon for c in active), default=None)
    manifest = {
        "family": ledger.family,
        "model_version": version.version,
        "created_at": version.created_at,
        "composed_sha256": version.composed_sha256,
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
    if ledger.family == "stats":
        if stats is None:
            raise LedgerError(f"{ledger.path}: no site is active; there is no exact head to export")
        from tangent.exact_head.statistics import solve  # numpy only

        assert stats_digest(stats.to_arrays()) == version.composed_sha256 == head["composed_sha256"]
        ridge = solve(stats)
        arrays = {"weight": ridge.weight.astype(np.float32), "bias": ridge.bias.astype(np.float32)}
        head_sha = arrays_digest(arrays)
        card = ledger.model_card
        manifest.update({"model": "exact-head", "head_file": HEAD_FILE, "head_sha256": head_sha,
                         "model_card": card, "model_spec": card["model-spec"], "lambda": ridge.lam,
                         "n": stats.n, "num_features": stats.num_features, "num_classes": stats.num_classes})
        files = {HEAD_FILE: arrays}
    else:
        assert arrays_digest(composed) == version.composed_sha256 == head["composed_sha256"]
        recorded = settings.get("model_spec")  # the run's, recorded by the ServerApp
        if model_spec is not None and recorded is not None and dict(model_spec) != recorded:
            raise LedgerError(f"{ledger.path}: the given model spec {dict(model_spec)} is not the run's {recorded}")
        spec = recorded if model_spec is None else dict(model_spec)
        manifest.update({"model": "taft-delta", "composed_file": COMPOSED_FILE, "model_spec": spec})
        files = {COMPOSED_FILE: composed}
    out.mkdir(parents=True, exist_ok=True)
    file_digests = {}
    for name, arrays in files.items():
        data = safetensors.numpy.save(arrays, metadata={"model_version": str(version.version),
                                                        "composed_sha256": version.composed_sha256})
        (out / name).write_bytes(data)
        file_digests[name] = hashlib.sha256(data).hexdigest()
    statement = {"format": export_check.STATEMENT_FORMAT, "model_version": version.version,
                 "composed_sha256": version.composed_sha256,
                 "manifest_sha256": export_check.manifest_digest(manifest), "files": file_digests}
    manifest["statement"] = {"statement": statement, "signature": ledger.sign_statement(statement)}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    (out / export_check.PUBLIC_KEY_FILE).write_text(manifest["public_key"])
    return manifest


def verify_export(directory: Path, public_key: Ed25519PublicKey | str | Path | None = None, *,
                  fingerprint: str | None = None) -> dict[str, Any]:
    """Check an export (tangent.serving.export_check.verify_export); returns the signed head.
    Raises :class:`LedgerCorrupt` listing every problem, LedgerError when it cannot be read."""
    try:
        return export_check.verify_export(directory, public_key=public_key, fingerprint=fingerprint).head
    except export_check.ExportRefused as e:
        raise LedgerCorrupt(e.problems) from None
    except (export_check.ExportError, ValueError) as e:
        raise LedgerError(str(e)) from None
