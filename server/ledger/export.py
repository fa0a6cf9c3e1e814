"""The exported model + a manifest a third party can check.

A delta ledger exports the composed Δ (``composed_delta.safetensors``); a stats ledger exports the
exact head solved from its composed statistics (``exact_head.safetensors``: ``weight`` [p, k],
``bias`` [k], float32; λ by GCV, tangent.exact_head.statistics.solve). The statistics themselves stay in the
ledger.

The manifest carries the ledger's signed head for the exported version and the server's public
key, and a *signed export statement* (same key, its own format string) binding what the head
does not cover: the head file's digest and λ (stats), the base digest and model spec (both), so
that ``taft-predict`` rebuilds exactly the model that was signed. :func:`verify_export` checks,
with a public key obtained *independently* of the export (the operator publishes it), that the
head and the statement are signed by that key and that the files are the ones they name. A kept
export is also the external copy that exposes a later rollback of the ledger: its signed version
must still be in the ledger, with the same head.
"""
from __future__ import annotations

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

COMPOSED_FILE = "composed_delta.safetensors"
HEAD_FILE = "exact_head.safetensors"
MANIFEST_FILE = "manifest.json"
STATEMENT_FORMAT = "taft-fl export statement 1"


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
    statement = {"format": STATEMENT_FORMAT, "family": ledger.family, "model_version": version.version,
                 "composed_sha256": version.composed_sha256, "base_digest": settings.get("base_digest")}
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
        statement.update({"head_sha256": head_sha, "lambda": ridge.lam, "n": stats.n, "model_card": card})
        files = {HEAD_FILE: arrays}
    else:
        assert arrays_digest(composed) == version.composed_sha256 == head["composed_sha256"]
        recorded = settings.get("model_spec")  # the run's, recorded by the ServerApp
        if model_spec is not None and recorded is not None and dict(model_spec) != recorded:
            raise LedgerError(f"{ledger.path}: the given model spec {dict(model_spec)} is not the run's {recorded}")
        spec = recorded if model_spec is None else dict(model_spec)
        manifest.update({"model": "taft-delta", "composed_file": COMPOSED_FILE, "model_spec": spec})
        statement["model_spec"] = manifest["model_spec"]
        files = {COMPOSED_FILE: composed}
    manifest["statement"] = {"statement": statement, "signature": ledger.sign_statement(statement)}
    out.mkdir(parents=True, exist_ok=True)
    for name, arrays in files.items():
        safetensors.numpy.save_file(arrays, out / name, metadata={"model_version": str(version.version),
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
        family = manifest.get("family", "delta")  # exports from before families hold a Δ
        model_file = manifest["head_file"] if family == "stats" else manifest["composed_file"]
        if Path(model_file).name != model_file:
            raise ValueError(f"the model file {model_file!r} is not a plain name in the export")
        model = safetensors.numpy.load_file(directory / model_file)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LedgerError(f"cannot read the export in {directory}: {type(e).__name__}: {e}") from None
    problems = []
    fp = audit.fingerprint(public_key)
    if not isinstance(head, dict) or not audit.signature_valid(public_key, head, signature):
        problems.append(f"the manifest's head is not signed by {fp}")
        head = head if isinstance(head, dict) else {}
    if head.get("public_key") != fp:
        problems.append(f"the head names signing key {head.get('public_key')}, not {fp}")
    for key, head_key in (("model_version", "version"), ("composed_sha256", "composed_sha256"),
                          ("total_weight", "total_weight"), ("audit_head", "audit_hash")):
        if manifest.get(key) != head.get(head_key):
            problems.append(f"manifest {key} = {manifest.get(key)!r}, the signed head says {head.get(head_key)!r}")
    statement = _statement(manifest, public_key, fp, required=family == "stats", problems=problems)
    digest = arrays_digest(model)
    if family == "stats":
        if digest != statement.get("head_sha256"):
            problems.append(f"the head file's digest {digest} is not the signed {statement.get('head_sha256')}")
    elif digest != head.get("composed_sha256"):
        problems.append(f"the composed file's digest {digest} is not the signed {head.get('composed_sha256')}")
    if statement:
        if statement.get("composed_sha256") != head.get("composed_sha256") or statement.get("model_version") != head.get("version"):
            problems.append("the signed export statement names another model version than the signed head")
        bound = ("family", "base_digest") + (("head_sha256", "lambda", "n", "model_card") if family == "stats"
                                             else ("model_spec",))
        for key in bound:
            if manifest.get(key) != statement.get(key):
                problems.append(f"manifest {key} = {manifest.get(key)!r:.80}, the signed statement says "
                                f"{statement.get(key)!r:.80}")
        if family == "stats" and manifest.get("model_spec") != (statement.get("model_card") or {}).get("model-spec"):
            problems.append("manifest model_spec differs from the signed model card's")
    if problems:
        raise LedgerCorrupt(problems)
    return head


def _statement(manifest: dict, key: Ed25519PublicKey, fp: str, *, required: bool, problems: list[str]) -> dict:
    """The signed export statement, checked; ``{}`` when absent (delta exports before statements)."""
    entry = manifest.get("statement")
    if entry is None:
        if required:
            problems.append("the export carries no signed statement")
        return {}
    try:
        statement, signature = entry["statement"], entry["signature"]
    except (KeyError, TypeError):
        problems.append("the export statement is malformed")
        return {}
    if not isinstance(statement, dict) or statement.get("format") != STATEMENT_FORMAT:
        problems.append("the export statement has no valid format")
        return {}
    if not audit.signature_valid(key, statement, signature):
        problems.append(f"the export statement is not signed by {fp}")
        return {}
    return statement
