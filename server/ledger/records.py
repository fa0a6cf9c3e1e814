"""What the ledger hands out and raises: errors, rejection reasons and the row dataclasses."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from tangent.protocol.signatures import canonical_json  # noqa: F401  (the ledger's one JSON encoding)

# Machine-readable reasons carried by RejectedContribution.reason.
REASONS = frozenset({
    "bad_site_id",            # not a string matching tangent.protocol.limits.SITE_ID_RULE
    "unknown_site",           # not in known_sites
    "site_withdrawn",         # the site was removed and has not been re-admitted (Ledger.readmit)
    "bad_num_examples",       # not an int, <= 0 or > MAX_NUM_EXAMPLES
    "bad_meta",               # ε/δ negative or not finite, metadata not JSON, too large or too deep
    "bad_structure",          # not a non-empty mapping of names to tensors
    "reserved_name",          # a tensor name the storage format reserves (``__metadata__``)
    "wrong_dtype",            # a tensor that is not float32
    "missing_keys",           # fewer tensors than the pinned spec
    "extra_keys",             # more tensors than the pinned spec
    "wrong_shape",            # a tensor whose shape differs from the pinned spec
    "non_finite",             # NaN or ±Inf
    "out_of_range",           # |x| > fixedpoint.MAX_ABS_VALUE
    "norm_too_large",         # global L2 norm above max_delta_norm
    "base_digest_mismatch",   # trained from a different w0
    "duplicate",              # the same Δ bytes were recorded before
    "site_active",            # add() for a site that already has an active contribution
    "not_active",             # replace() for a site without an active contribution
    "total_weight_overflow",  # Σ wᵢ would exceed fixedpoint.MAX_TOTAL_WEIGHT
    "stats_out_of_bounds",    # exact-head statistics beyond what n examples on the grid can reach (stats ledger)
    "stats_inconsistent",     # exact-head statistics whose parts no one data set can have together
    "total_overflow",         # the exact int64 sums of a stats ledger could overflow
})


class LedgerError(Exception):
    """The ledger cannot be opened or used as asked."""


class LedgerCorrupt(LedgerError):
    """:meth:`Ledger.verify` found the file inconsistent; ``problems`` lists what."""

    def __init__(self, problems: list[str]):
        super().__init__("ledger verification failed:\n  " + "\n  ".join(problems))
        self.problems = problems


class RejectedContribution(LedgerError):
    """A contribution was refused; the ledger is unchanged. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Site:
    site_id: str
    first_seen_at: str
    active_contribution_id: int | None
    num_contributions: int
    withdrawn: bool = False


@dataclass(frozen=True)
class Contribution:
    id: int
    site_id: str
    version: int  # this site's submission counter: 1, 2, …
    num_examples: int
    weight: int
    epsilon: float | None
    delta_dp: float | None
    dp_settings: dict | None
    shard_fingerprint: str | None
    base_digest: str | None
    train_config: dict | None
    extra: dict | None
    delta_sha256: str
    delta_norm: float
    status: str
    added_at: str
    added_in_version: int
    ended_at: str | None
    ended_in_version: int | None
    end_reason: str | None


@dataclass(frozen=True)
class ModelVersion:
    version: int
    created_at: str
    event: str  # create / add / remove / replace / retract / withdraw / readmit
    site_id: str | None
    contribution_ids: tuple[int, ...]
    total_weight: int
    composed_sha256: str


@dataclass(frozen=True)
class VerifyReport:
    current_version: int
    active_contributions: int
    audit_entries: int
    total_weight: int
    composed_sha256: str
    accumulator_sha256: str
    head_audit_hash: str          # the audit chain's head, as signed for the current version
    head_signature: str           # hex Ed25519 signature over the head
    public_key_fingerprint: str   # "SHA256:<hex>" of the key the signatures were checked against
    head_file_version: int        # the version the head file names (≤ current_version)
    witness_version: int | None = None  # the newest version the witness holds (None: no witness checked)


CONTRIBUTION_COLUMNS = tuple(Contribution.__dataclass_fields__)
# Contribution fields fixed at insertion; their digest goes into the audit log.
IMMUTABLE_FIELDS = (
    "id", "site_id", "version", "num_examples", "weight", "epsilon", "delta_dp", "dp_settings",
    "shard_fingerprint", "base_digest", "train_config", "extra", "delta_sha256", "delta_norm",
    "added_at", "added_in_version",
)


def row_digest(row) -> str:
    return hashlib.sha256(canonical_json({k: row[k] for k in IMMUTABLE_FIELDS}).encode()).hexdigest()


def contribution_from_row(r: sqlite3.Row) -> Contribution:
    d = {k: r[k] for k in CONTRIBUTION_COLUMNS}
    for key in ("dp_settings", "train_config", "extra"):
        d[key] = None if d[key] is None else json.loads(d[key])
    return Contribution(**d)


def version_from_row(r: sqlite3.Row) -> ModelVersion:
    return ModelVersion(r["version"], r["created_at"], r["event"], r["site_id"],
                        tuple(json.loads(r["contribution_ids"])), r["total_weight"], r["composed_sha256"])
