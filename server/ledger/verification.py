"""``Ledger.verify``: recompute everything the file claims and list every mismatch.

Checks, in order: SQLite's own page check; the audit hash chain; that versions are contiguous
(0…N, one audit entry and one signed head each) and that every head is signed by the trusted key
and names its version's audit entry, composed digest and total weight; that the head file is a
validly signed head the database holds (it may lag by the changes whose file write a crash cut
off, never lead); with a witness (:mod:`server.ledger.witness`), that the ledger holds every
witnessed head unchanged and none is newer than the ledger (a rollback passes every other check);
that replaying the audit log gives exactly the stored versions, contribution
rows (immutable fields), statuses and withdrawn flags; each active Δ's sha256; and accumulators
rebuilt from the active Δ bytes, compared byte for byte with the stored ones, together with the
total weight and the current composed digest.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from server.ledger import audit, families, witness as witnesses
from server.ledger.accumulators import Accumulators
from server.ledger.records import LedgerCorrupt, LedgerError, VerifyReport, row_digest, version_from_row
from server.ledger.storage import Store


def verify_ledger(store: Store, head_path: Path, *, trusted_key: Ed25519PublicKey | None,
                  signer_key: Ed25519PublicKey | None, witness: Path | None = None) -> VerifyReport:
    with store.snapshot():
        problems: list[str] = []
        check = [r[0] for r in store.execute("PRAGMA quick_check").fetchall()]
        if check != ["ok"]:
            problems.append(f"sqlite quick_check: {check}")
        meta = store.meta()
        try:
            family = families.of_meta(meta)
        except (LedgerError, ValueError) as e:
            raise LedgerCorrupt([f"meta: the ledger's family or model card is unusable ({e})"]) from None
        entries = [dict(r) for r in store.execute("SELECT * FROM audit ORDER BY seq")]
        problems += audit.chain_problems(entries)
        key = _trusted_key(meta, trusted_key, signer_key, problems)
        head, signature = _check_heads(store, entries, key, problems)
        head_file_version = _check_head_file(store, head_path, head, key, problems)
        witness_version = None
        if witness is not None:
            held = {r["version"]: (json.loads(r["head"]), r["signature"])
                    for r in store.execute("SELECT version, head, signature FROM signed_heads")}
            found, witness_version = witnesses.problems(witness, held, key, newest_held=head["version"],
                                                        ledger_path=store.path)
            problems += found
        versions = _replay(store, meta, family, entries, problems)
        rebuilt, total_weight, active = _rebuild(store, meta, family, problems)
        current = versions[-1] if versions else None
        if current is None or current["contribution_ids"] != active:
            problems.append("the current model version does not list exactly the active contributions")
        composed_sha = family.digest(family.compose(rebuilt, total_weight))
        if current is not None and current["composed_sha256"] != composed_sha:
            problems.append("the current version's composed digest does not match the recomputed composed Δ")
    if problems:
        raise LedgerCorrupt(problems)
    return VerifyReport(
        current_version=current["version"], active_contributions=len(active), audit_entries=len(entries),
        total_weight=total_weight, composed_sha256=composed_sha, accumulator_sha256=rebuilt.digest(),
        head_audit_hash=head["audit_hash"], head_signature=signature,
        public_key_fingerprint=audit.fingerprint(key), head_file_version=head_file_version,
        witness_version=witness_version)


def _trusted_key(meta: dict, trusted: Ed25519PublicKey | None, signer: Ed25519PublicKey | None,
                 problems: list[str]) -> Ed25519PublicKey:
    try:
        recorded = audit.load_public_key(meta.get("signing_public_key", ""))
    except LedgerError as e:
        problems.append(f"meta: the recorded signing public key is unusable ({e})")
        recorded = None
    for label, key in (("the given public key", trusted), ("the ledger's signing key", signer)):
        if key is not None and recorded is not None and audit.fingerprint(key) != audit.fingerprint(recorded):
            problems.append(f"the file records signing key {audit.fingerprint(recorded)}, not {label} "
                            f"{audit.fingerprint(key)}")
    key = trusted or signer or recorded
    if key is None:
        raise LedgerCorrupt(problems)
    return key


def _check_heads(store: Store, entries: list[dict], key: Ed25519PublicKey, problems: list[str]) -> tuple[dict, str]:
    """Contiguity and signatures; returns the newest (head, signature)."""
    versions = [version_from_row(r) for r in store.execute("SELECT * FROM model_versions ORDER BY version")]
    numbers = [v.version for v in versions]
    if numbers != list(range(len(numbers))):
        problems.append(f"model versions are not contiguous from 0: {_gaps(numbers)}")
    if len(entries) != len(versions):
        problems.append(f"{len(entries)} audit entries for {len(versions)} model versions")
    signed = {r["version"]: (r["head"], r["signature"]) for r in store.execute("SELECT * FROM signed_heads")}
    if signed.keys() != set(numbers):
        problems.append(f"signed heads exist for versions {sorted(signed.keys() ^ set(numbers))} without a "
                        f"model version, or the other way round")
    by_version = {}
    for e in entries:
        try:
            by_version[json.loads(e["payload"])["model_version"]["version"]] = e
        except (ValueError, KeyError, TypeError):
            problems.append(f"audit {e['seq']}: payload names no model version")
    newest: tuple[dict, str] = ({"audit_hash": "", "version": -1}, "")
    fp = audit.fingerprint(key)
    for v in versions:
        if v.version not in signed:
            continue
        head_text, signature = signed[v.version]
        head = json.loads(head_text)
        if not audit.signature_valid(key, head, signature):
            problems.append(f"version {v.version}: the head signature does not verify with key {fp}")
        entry = by_version.get(v.version)
        expected = {"format": audit.HEAD_FORMAT, "version": v.version, "created_at": v.created_at,
                    "audit_seq": entry and entry["seq"], "audit_hash": entry and entry["hash"],
                    "composed_sha256": v.composed_sha256, "total_weight": v.total_weight, "public_key": fp}
        if head != expected:
            differing = sorted(k for k in expected.keys() | head.keys() if head.get(k) != expected.get(k))
            problems.append(f"version {v.version}: the signed head differs from the stored version in {differing}")
        newest = (head, signature)
    return newest


def _gaps(numbers: list[int]) -> str:
    missing = sorted(set(range(max(numbers, default=-1) + 1)) - set(numbers))
    return f"missing {missing[:10]}" if missing else f"{numbers[:10]}…"


def _check_head_file(store: Store, head_path: Path, newest: dict, key: Ed25519PublicKey,
                     problems: list[str]) -> int:
    try:
        on_file = audit.read_head_file(head_path)
    except LedgerError as e:
        problems.append(str(e))
        return -1
    if on_file is None:
        problems.append(f"the signed head file {head_path} is missing")
        return -1
    head, signature = on_file
    version = head.get("version")
    if not audit.signature_valid(key, head, signature):
        problems.append(f"the head file {head_path} is not signed by {audit.fingerprint(key)}")
    if not isinstance(version, int) or version > newest["version"]:
        problems.append(f"the head file signs version {version}, but the database ends at version "
                        f"{newest['version']}: history was cut off")
        return version if isinstance(version, int) else -1
    row = store.execute("SELECT head, signature FROM signed_heads WHERE version = ?", (version,)).fetchone()
    if row is None or (json.loads(row["head"]), row["signature"]) != (head, signature):
        problems.append(f"the head file's version {version} differs from the database's signed head for it")
    return version


def _replay(store: Store, meta: dict, family, entries: list[dict], problems: list[str]) -> list[dict]:
    """Replays the audit log against the tables; returns the versions it records."""
    settings, pins, row_digests, status, withdrawn, versions = {}, {}, {}, {}, {}, []
    for e in entries:
        try:
            payload = json.loads(e["payload"])
            versions.append(payload["model_version"])
            action = e["action"]
            if action == "create":
                settings = payload["settings"]
            elif action in ("add", "replace"):
                pins.update(payload.get("pins", {}))
                row_digests[payload["contribution_id"]] = payload["row_digest"]
                status[payload["contribution_id"]] = "active"
                if "replaced_contribution_id" in payload:
                    status[payload["replaced_contribution_id"]] = "replaced"
            elif action == "remove":
                status[payload["contribution_id"]] = "removed"
                withdrawn[e["site_id"]] = True
            elif action == "retract":  # removed from the sums, the site not withdrawn
                status[payload["contribution_id"]] = "removed"
            elif action == "withdraw":
                withdrawn[e["site_id"]] = True
            elif action == "readmit":
                withdrawn[e["site_id"]] = False
            else:
                problems.append(f"audit {e['seq']}: unknown action {action!r}")
        except (ValueError, KeyError, TypeError) as err:
            problems.append(f"audit {e['seq']}: unreadable payload ({type(err).__name__}: {err})")
    for key, value in {**settings, **pins}.items():
        if meta.get(key) != value:
            problems.append(f"meta {key!r} = {meta.get(key)!r}, the audit log says {value!r}")
    stored_versions = [{"version": v.version, "event": v.event, "site_id": v.site_id,
                        "contribution_ids": list(v.contribution_ids), "total_weight": v.total_weight,
                        "composed_sha256": v.composed_sha256}
                       for v in (version_from_row(r) for r in store.execute("SELECT * FROM model_versions ORDER BY version"))]
    if stored_versions != versions:
        problems.append("model_versions differ from the versions recorded in the audit log")
    stored_withdrawn = {r[0]: bool(r[1]) for r in store.execute("SELECT site_id, withdrawn FROM sites")}
    for site in stored_withdrawn.keys() | withdrawn.keys():
        if stored_withdrawn.get(site, False) != withdrawn.get(site, False):
            problems.append(f"site {site}: withdrawn = {stored_withdrawn.get(site)}, the audit log says "
                            f"{withdrawn.get(site, False)}")
    rows = {r["id"]: dict(r) for r in store.execute("SELECT * FROM contributions")}
    stored_ids = {r[0] for r in store.execute("SELECT contribution_id FROM deltas")}
    if stored_ids != {cid for cid, row in rows.items() if row["status"] == "active"}:
        problems.append("Δ bytes are stored for other than exactly the active contributions")
    if rows.keys() != row_digests.keys():
        problems.append(f"contributions {sorted(rows.keys() ^ row_digests.keys())} are not in both the table and the audit log")
    for cid, row in rows.items():
        if cid in row_digests and row_digest(row) != row_digests[cid]:
            problems.append(f"contribution {cid} ({row['site_id']}): fields differ from the audit log")
        if status.get(cid) != row["status"]:
            problems.append(f"contribution {cid} ({row['site_id']}): status {row['status']!r}, audit log says {status.get(cid)!r}")
        expected_weight = family.weight(row["num_examples"], meta.get("weighting"))
        if row["weight"] != expected_weight:
            problems.append(f"contribution {cid}: weight {row['weight']} does not follow the weighting")
    return versions


def _rebuild(store: Store, meta: dict, family, problems: list[str]) -> tuple[Accumulators, int, list[int]]:
    """Accumulators rebuilt from the active Δ bytes, compared with the stored ones."""
    spec = meta.get("key_spec") or {}
    rebuilt = Accumulators.zeros(spec)
    total_weight = 0
    abs_bound = {name: 0 for name in spec}
    rows = {r["id"]: dict(r) for r in store.execute("SELECT id, site_id, weight, delta_sha256 FROM contributions "
                                                    "WHERE status = 'active'")}
    active = sorted(rows)
    for cid in active:
        row = rows[cid]
        blob = store.execute("SELECT safetensors FROM deltas WHERE contribution_id = ?", (cid,)).fetchone()
        blob = None if blob is None else blob[0]
        if blob is None or hashlib.sha256(blob).hexdigest() != row["delta_sha256"]:
            problems.append(f"contribution {cid} ({row['site_id']}): Δ bytes do not match their sha256")
            continue
        try:
            arrays = family.decode(blob)
        except Exception as e:  # safetensors raises its own error types on bad bytes
            problems.append(f"contribution {cid}: stored bytes unreadable ({type(e).__name__})")
            continue
        if {k: list(a.shape) for k, a in arrays.items()} != spec:
            problems.append(f"contribution {cid}: tensors do not match the pinned spec")
            continue
        if family.bounded_total:
            for name, m in families.StatsFamily.magnitudes(arrays).items():
                abs_bound[name] += m
            if any(b > families.INT64_MAX for b in abs_bound.values()):
                problems.append(f"contribution {cid}: the active statistics could overflow int64")
                continue
        rebuilt.add(family.quantize(arrays), row["weight"])
        total_weight += row["weight"]
    stored = store.stored_accumulators()
    if stored.keys() != set(spec):
        problems.append("accumulator tensors differ from the pinned spec")
    for name, data in rebuilt.encoded().items():
        if name in stored and (stored[name][0] != spec[name] or stored[name][1] != data):
            problems.append(f"accumulator {name!r} differs from the sum of the active contributions")
    if family.bounded_total and meta.get("abs_bound") != abs_bound:
        problems.append(f"meta abs_bound {meta.get('abs_bound')} != Σ max|entry| of the active contributions {abs_bound}")
    if meta.get("total_weight") != total_weight:
        problems.append(f"total weight {meta.get('total_weight')} != Σ active weights {total_weight}")
    return rebuilt, total_weight, active
