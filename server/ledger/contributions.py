"""The contribution ledger: one SQLite file holding every site's Δw and the exact global sum.

The global model is ``w0 + Σ wᵢΔᵢ / Σ wᵢ`` (``wᵢ`` = num_examples, or 1 under uniform
weighting). Because the tangent model is linear in Δ, a site can be removed later by
subtraction. The ledger makes that removal *exact*: every Δ is put on a fixed-point grid and the
sums are kept as integers (:mod:`server.ledger.accumulators`), so adding and removing in any
order leaves bit-identical accumulators, and the composed Δ is a deterministic function of them.

Tables (:mod:`server.ledger.storage`): ``meta`` (weighting, grid, pinned tensor spec and base
digest, total weight, the signing public key); ``sites`` (first seen, withdrawn); ``contributions``
(metadata, sha256 of the Δ, status ``active``/``removed``/``replaced``; at most one active per
site); ``deltas`` (the Δ bytes of *active* contributions only: erased on removal or replacement);
``accumulators``; ``model_versions`` (one per change); ``audit`` (hash chain) and ``signed_heads``
(:mod:`server.ledger.audit`).

Every change is one transaction that validates, writes the contribution, the accumulators, the
new version, its audit entry and its signed head together; a rejected contribution rolls back and
leaves the file untouched. After the commit the signed head goes to ``<ledger>.head.json`` and,
when bytes were erased, the WAL is checkpointed and truncated.

A withdrawal is sticky: :meth:`Ledger.remove` marks the site withdrawn, and its later
contributions are refused (``site_withdrawn``) until :meth:`Ledger.readmit`.
:meth:`Ledger.retract` subtracts a contribution without withdrawing the site.

Families (:mod:`server.ledger.families`): the same file layout holds either TAFT Δw (``"delta"``,
the above) or exact-head sufficient statistics (``"stats"``: int64 arrays, weight 1, the composed
model is their exact sum); the family and, for statistics, the model card are pinned at creation.

Over 500 lines: the ``Ledger`` transactions share one validation and locking path; storage, audit,
accumulators, verification and export are their own modules.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.ledger import fixedpoint
from server.ledger import audit, families, validation, witness as witnesses
from server.ledger.accumulators import Accumulators, Quantized
from server.ledger.records import (
    CONTRIBUTION_COLUMNS, Contribution, LedgerError, ModelVersion, RejectedContribution, Site, VerifyReport,
    canonical_json, contribution_from_row, row_digest, version_from_row,
)
from server.ledger.storage import SCHEMA_VERSION, SQLITE_COMPANIONS, Store, connect
from server.ledger.verification import verify_ledger
from tangent.protocol.text import escape_controls, is_printable
from tangent.protocol.limits import check_site_id

WEIGHTINGS = ("examples", "uniform")
log = logging.getLogger("taft.ledger")

_COLUMNS_SQL = ", ".join(CONTRIBUTION_COLUMNS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def signing_key_path(ledger_path: Path) -> Path:
    return Path(f"{ledger_path}.signing-key.pem")


def ledger_file_paths(ledger_path: str | Path) -> list[Path]:
    """Every file a ledger at ``ledger_path`` may consist of (existing or not): the database,
    SQLite's companions, the head file and the default signing key. Nothing else may write there."""
    path = Path(ledger_path)
    return [path, *(Path(f"{path}{suffix}") for suffix in SQLITE_COMPANIONS), audit.head_file_path(path),
            signing_key_path(path)]


@dataclass
class _Prepared:
    """A validated contribution, ready to be written (its stored bytes are made in the write)."""
    arrays: dict[str, np.ndarray]
    norm: float
    num_examples: int
    meta: dict
    quantized: Quantized


class Ledger:
    """Open with :meth:`Ledger.open`. See the module docstring for the file layout."""

    def __init__(self, store: Store, *, max_delta_norm, expected_base_digest, known_sites, expected_spec,
                 signing_key: Ed25519PrivateKey | None, witness: Path | None = None):
        self._store = store
        self._db = store.db
        self._signer = signing_key
        self._refuse_writes: str | None = None if signing_key is not None else (
            f"{store.path} was opened without its signing key ({signing_key_path(store.path)}); "
            f"it can be read and verified, not changed")
        self.path = store.path
        self.head_path = audit.head_file_path(store.path)
        self.witness = witness
        self.max_delta_norm = max_delta_norm
        self.expected_base_digest = expected_base_digest
        self.known_sites = None if known_sites is None else frozenset(known_sites)
        self.expected_spec = None if expected_spec is None else {
            k: [int(d) for d in v] for k, v in expected_spec.items()}
        self._family: Any = families.DeltaFamily()  # set from the file by _init_or_check

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, max_delta_norm: float | None = None,
             expected_base_digest: str | None = None, known_sites: Collection[str] | None = None,
             weighting: str | None = None, expected_spec: Mapping[str, tuple[int, ...]] | None = None,
             create: bool = True, signing_key: str | Path | Ed25519PrivateKey | None = None,
             family: str | None = None, model_card: Mapping[str, Any] | None = None,
             witness: str | Path | None = None, model_spec: Mapping[str, Any] | None = None) -> "Ledger":
        """Open (or create) the ledger at ``path``.

        ``max_delta_norm``, ``known_sites`` and ``expected_spec`` (tensor name → shape) are this
        server's admission policy and are not stored. ``expected_base_digest`` must agree with the
        digest pinned in the file, if any. ``weighting`` is fixed when the file is created
        (default ``"examples"``); opening with a different one is an error. ``signing_key``: the
        Ed25519 key that signs every new head (a key or a PEM file; default
        ``<path>.signing-key.pem``, created 0600 with a new ledger). A ledger opened without its
        key can be read and verified but not changed.

        ``family`` (:mod:`server.ledger.families`): ``"delta"`` (TAFT Δw) or ``"stats"`` (exact-head
        sufficient statistics, which needs ``model_card``), pinned with the card when the file is
        created (default for a new file: ``"delta"``). Opening a ledger with another family or
        card than the pinned ones is a LedgerError; ``None`` accepts whatever the file holds.

        ``witness`` (:mod:`server.ledger.witness`; default ``$TAFT_WITNESS``, none when unset): an
        append-only file outside the state directory that receives every head this ledger
        publishes. A ledger behind its witness (rolled back) or contradicting it (forked) opens
        read-only: it can be verified, which names the problem, but never changed.

        ``model_spec`` (a Δ ledger: the run's ModelSpec config, from which w0 is rebuilt) is
        recorded with the ledger, in its signed creation record when the file is new, so that every
        tool (export, taft-predict) reads the run's spec instead of defaults of its own; opening
        with another spec is a LedgerError. ``None`` accepts whatever the file holds.
        """
        if family is not None and family not in families.FAMILIES:
            raise ValueError(f"family must be one of {families.FAMILIES}, got {family!r}")
        path = Path(path)
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        store = Store(connect(path, create), path)
        try:
            if isinstance(signing_key, Ed25519PrivateKey):
                key = signing_key
            else:
                # A key is made only for a ledger not yet created (also one whose creation a crash
                # cut short): a missing key for an existing ledger must not be silently replaced.
                uninitialised = store.schema_version() == 0 and store.is_empty()
                key_path = signing_key_path(path) if signing_key is None else Path(signing_key)
                key = audit.load_signing_key(key_path, create=create and uninitialised)
            ledger = cls(store, max_delta_norm=max_delta_norm, expected_base_digest=expected_base_digest,
                         known_sites=known_sites, expected_spec=expected_spec, signing_key=key,
                         witness=witnesses.configured(witness))
            ledger._init_or_check(weighting, create, family, model_card, model_spec)
            ledger._check_witness()
            if max_delta_norm is None:  # the policy the server recorded applies to every later path in
                ledger.max_delta_norm = ledger.admission_policy().get("max_delta_norm")
            ledger._publish_head(recover=True)
        except BaseException:
            store.close()
            raise
        return ledger

    def _init_or_check(self, weighting: str | None, create: bool, family: str | None,
                       model_card: Mapping[str, Any] | None, model_spec: Mapping[str, Any] | None = None) -> None:
        with self._store.write():
            version = self._store.schema_version()
            if version == 0:
                if not create or not self._store.is_empty():
                    raise LedgerError(f"{self.path} is an SQLite file but not a ledger")
                self._family = families.make(family or "delta", model_card)
                if self._family.name == "stats" and weighting not in (None, "uniform"):
                    raise LedgerError("a stats ledger weighs every site 1 (weighting 'uniform')")
                self._create(weighting or "examples", model_spec)
                return
            if version != SCHEMA_VERSION:
                raise LedgerError(
                    f"{self.path}: ledger schema version {version}; this code reads version {SCHEMA_VERSION} "
                    f"(signed heads, sticky withdrawal). Export the model with the taft-fl release that wrote it "
                    f"and start a new ledger; old ledgers are not converted, because their history was never signed")
        meta = self._store.meta()
        pinned_family = meta.get("family", "delta")  # ledgers from before families hold Δw
        if family is not None and family != pinned_family:
            raise LedgerError(f"{self.path} is a {pinned_family!r} ledger, not {family!r}")
        if model_card is not None:
            given = families.check_model_card(model_card)
            if canonical_json(given) != canonical_json(meta.get("model_card")):
                raise LedgerError(f"{self.path} was created for another model card "
                                  f"({_card_difference(meta.get('model_card'), given)})")
        self._family = families.of_meta(meta)
        if weighting is not None and weighting != meta["weighting"]:
            raise LedgerError(f"{self.path} uses weighting {meta['weighting']!r}, not {weighting!r}")
        pinned = meta.get("base_digest")
        if self.expected_base_digest is not None and pinned is not None and pinned != self.expected_base_digest:
            raise LedgerError(f"{self.path} holds contributions for base {pinned}, not {self.expected_base_digest}")
        if model_spec is not None:
            self._check_model_spec(meta, model_spec)
        if self._signer is not None and audit.public_key_pem(self._signer.public_key()) != meta["signing_public_key"]:
            # Readable and verifiable (verify names the mismatch), but never signed with this key.
            self._refuse_writes = f"the signing key given for {self.path} is not the key that signed it"

    def _check_model_spec(self, meta: Mapping[str, Any], model_spec: Mapping[str, Any]) -> None:
        """The run's model spec against the recorded one; a ledger from before specs were
        recorded takes this run's."""
        if self._family.name != "delta":
            raise LedgerError(f"{self.path}: a model spec is recorded with a Δ ledger (a stats ledger's is in its card)")
        pinned = meta.get("model_spec")
        if pinned is None:
            with self._store.write():
                self._store.set_meta("model_spec", dict(model_spec))
        elif canonical_json(pinned) != canonical_json(dict(model_spec)):
            raise LedgerError(f"{self.path} was created for another model spec ({_card_difference(pinned, model_spec)})")

    def _create(self, weighting: str, model_spec: Mapping[str, Any] | None = None) -> None:
        if self._signer is None:
            raise LedgerError(f"no signing key for the new ledger {self.path}")
        if model_spec is not None and self._family.name != "delta":
            raise LedgerError(f"{self.path}: a model spec is recorded with a Δ ledger (a stats ledger's is in its card)")
        self._store.create_schema()
        settings = {"schema_version": SCHEMA_VERSION, "weighting": weighting,
                    "frac_bits": fixedpoint.FRAC_BITS, "max_abs_value": fixedpoint.MAX_ABS_VALUE,
                    "signing_public_key": audit.public_key_pem(self._signer.public_key()),
                    "family": self._family.name, **self._family.settings(),
                    **({} if model_spec is None else {"model_spec": dict(model_spec)})}
        for key, value in settings.items():
            self._store.set_meta(key, value)
        self._store.set_meta("total_weight", 0)
        composed_sha = self._family.digest({})
        if "key_spec" in settings:  # stats: the arrays are known from the card, the sums start at 0
            self._store.create_accumulators(settings["key_spec"])
            self._store.set_meta("abs_bound", {name: 0 for name in settings["key_spec"]})
            composed_sha = self._family.digest(self._family.compose(self._store.accumulators(), 0))
        self._record(_now(), "create", None, 0, composed_sha, {"settings": settings})

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def snapshot(self):
        """Reads inside this block (any of the reading methods) see one consistent state, even
        while another process writes."""
        return self._store.snapshot()

    def _record(self, at: str, event: str, site_id: str | None, total_weight: int, composed_sha256: str,
                payload: dict) -> dict:
        """Append the new model version, its audit entry and its signed head (inside the write)."""
        if self._refuse_writes:
            raise LedgerError(self._refuse_writes)
        ids = [r[0] for r in self._db.execute("SELECT id FROM contributions WHERE status = 'active' ORDER BY id")]
        last = self._db.execute("SELECT max(version) FROM model_versions").fetchone()[0]
        version = {"version": 0 if last is None else last + 1, "event": event, "site_id": site_id,
                   "contribution_ids": ids, "total_weight": total_weight, "composed_sha256": composed_sha256}
        self._db.execute("INSERT INTO model_versions VALUES (?,?,?,?,?,?,?)",
                         (version["version"], at, event, site_id, canonical_json(ids), total_weight, composed_sha256))
        seq, digest = audit.append_entry(self._db, at, event, site_id, {**payload, "model_version": version})
        head = audit.make_head(version, seq, digest, at, audit.fingerprint(self._signer.public_key()))
        self._db.execute("INSERT INTO signed_heads VALUES (?,?,?)",
                         (version["version"], canonical_json(head), audit.sign_head(self._signer, head)))
        return version

    def signed_head(self, version: int | None = None) -> tuple[dict[str, Any], str]:
        """(head, hex signature) of a model version (default: the current one)."""
        with self.snapshot():
            if version is None:
                version = self._db.execute("SELECT max(version) FROM signed_heads").fetchone()[0]
            row = self._db.execute("SELECT head, signature FROM signed_heads WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise KeyError(f"no signed head for version {version}")
        return json.loads(row["head"]), row["signature"]

    def sign_statement(self, statement: Mapping[str, Any]) -> str:
        """Sign ``statement`` (canonical JSON) with the ledger's key: what an export adds to the
        signed head (the head file it derived, the model spec). Its ``format`` must name it, and
        may not be a head's, so a statement can never pass for a head or the other way round."""
        if self._refuse_writes:
            raise LedgerError(self._refuse_writes)
        if not isinstance(statement.get("format"), str) or statement["format"] == audit.HEAD_FORMAT:
            raise ValueError("a signed statement needs its own 'format' (not the head format)")
        return audit.sign_head(self._signer, dict(statement))

    def public_key(self) -> Ed25519PublicKey:
        """The key this ledger's heads are signed with, as recorded in the file."""
        return audit.load_public_key(self.settings()["signing_public_key"])

    def _held_heads(self) -> dict[int, tuple[dict[str, Any], str]]:
        with self.snapshot():
            rows = self._db.execute("SELECT version, head, signature FROM signed_heads").fetchall()
        return {r["version"]: (json.loads(r["head"]), r["signature"]) for r in rows}

    def _check_witness(self) -> None:
        """Writing on top of a rolled-back or forked history would bury the evidence: refuse."""
        if self.witness is None:
            return
        witnesses.read(self.witness, audit.fingerprint(self.public_key()))  # unusable: LedgerError
        held = self._held_heads()
        found, _ = witnesses.problems(self.witness, held, self.public_key(), newest_held=max(held, default=-1),
                                      ledger_path=self.path)
        if found:
            log.error("%s: %s", self.path, "; ".join(found))
            self._refuse_writes = f"{self.path} contradicts its witness ({'; '.join(found)}); it is read-only"

    def _witness_head(self, head: dict[str, Any], signature: str) -> None:
        """Append ``head`` to the witness unless the witness already holds that version or a newer one."""
        if self.witness is None or self._refuse_writes:
            return
        if witnesses.newest_version(self.witness, head["public_key"]) < head["version"]:
            witnesses.append(self.witness, head, signature, self.path)

    def _publish_head(self, recover: bool = False) -> None:
        """Bring ``<ledger>.head.json`` up to the database's newest signed head.

        After a commit the file lags by one change until this runs; a crash in between leaves it
        lagging, so opening (``recover``) repairs it — but only forward, from a head the database
        holds and that extends the one in the file. A file that is missing (beyond version 0),
        ahead of the database or contradicting it is left as it is: ``verify`` reports it.
        """
        head, signature = self.signed_head()
        if not recover:
            try:
                audit.write_head_file(self.head_path, head, signature)
            except OSError as e:  # the change is committed; the next open catches the file up
                log.warning("%s: could not write the head file (%s); it lags until the next open", self.path, e)
            # A witness that cannot be written is an error the operator must see: the change is
            # committed, and the next open appends the head it missed.
            self._witness_head(head, signature)
            return
        if self._signer is not None:
            self._witness_head(head, signature)
        try:
            on_file = audit.read_head_file(self.head_path)
        except LedgerError:  # unreadable: verify reports it; never overwrite the evidence
            return
        if on_file is None and head["version"] != 0:
            return
        if on_file is not None:
            file_head, file_signature = on_file
            if not isinstance(file_head.get("version"), int) or file_head["version"] >= head["version"]:
                return
            try:
                stored = self.signed_head(file_head["version"])
            except KeyError:
                return
            if stored != (file_head, file_signature):
                return
        if not audit.signature_valid(self.public_key(), head, signature):
            return
        try:
            audit.write_head_file(self.head_path, head, signature)
        except OSError:  # a reader without write access: verify reports the lag
            pass

    # ------------------------------------------------------------------ validation
    def _prepare(self, site_id: Any, delta: Any, num_examples: Any, **meta: Any) -> _Prepared:
        """Checks that need no database state (cheap ones first)."""
        unknown = meta.keys() - set(validation.CONTRIBUTION_META)
        if unknown:
            raise TypeError(f"unknown contribution metadata {sorted(unknown)}; put free-form data in extra={{...}}")
        site_id = validation.site_id(site_id)
        if self.known_sites is not None and site_id not in self.known_sites:
            raise RejectedContribution("unknown_site", site_id)
        num_examples = validation.num_examples(num_examples)
        columns = validation.metadata(meta)
        arrays = self._family.arrays(delta)
        norm = self._family.check(arrays, num_examples, columns, self.max_delta_norm)
        return _Prepared(arrays, norm, num_examples, columns, self._family.quantize(arrays))

    def _admit(self, site_id: str, p: _Prepared, meta: dict) -> dict[str, Any]:
        """Checks against the file's state, inside the write transaction. Returns what to pin."""
        if self._is_withdrawn(site_id):
            raise RejectedContribution("site_withdrawn", f"{site_id} was withdrawn; the operator must re-admit it")
        pins = {}
        spec = meta.get("key_spec")
        if spec is None:
            spec = self.expected_spec or {k: list(a.shape) for k, a in p.arrays.items()}
            pins["key_spec"] = spec
        missing, extra = sorted(spec.keys() - p.arrays.keys()), sorted(p.arrays.keys() - spec.keys())
        if missing:
            raise RejectedContribution("missing_keys", ", ".join(missing))
        if extra:
            raise RejectedContribution("extra_keys", ", ".join(extra))
        for name, shape in spec.items():
            if list(p.arrays[name].shape) != list(shape):
                raise RejectedContribution("wrong_shape", f"{name}: {tuple(p.arrays[name].shape)}, expected {tuple(shape)}")
        pinned = meta.get("base_digest") or self.expected_base_digest
        given = p.meta["base_digest"]
        if pinned is not None and given != pinned:
            raise RejectedContribution("base_digest_mismatch", f"{given} != {pinned}")
        if pinned is None and given is not None:
            pins["base_digest"] = given
        elif meta.get("base_digest") is None and pinned is not None:
            pins["base_digest"] = pinned
        return pins

    def _is_withdrawn(self, site_id: str) -> bool:
        row = self._db.execute("SELECT withdrawn FROM sites WHERE site_id = ?", (site_id,)).fetchone()
        return bool(row and row[0])

    # ------------------------------------------------------------------ changes
    def add(self, site_id: str, delta: Mapping[str, Any], num_examples: int, **meta: Any) -> ModelVersion:
        """Record a site's contribution and fold it into the sums; returns the new model version.

        ``meta``: ``epsilon``, ``delta_dp``, ``dp_settings`` (dict), ``shard_fingerprint``,
        ``base_digest``, ``train_config`` (dict), ``extra`` (dict). Raises
        :class:`RejectedContribution` (ledger unchanged) for bad input, a withdrawn site, or a
        site that already has an active contribution (use :meth:`replace`).
        """
        p = self._prepare(site_id, delta, num_examples, **meta)
        with self._store.write():
            version = self._apply(p, site_id, replacing=False)
        self._publish_head()
        return version

    def replace(self, site_id: str, delta: Mapping[str, Any], num_examples: int, **meta: Any) -> ModelVersion:
        """Atomically swap a site's active contribution for a new one (one transaction, one version).
        The old Δ bytes are erased from every file of the ledger."""
        p = self._prepare(site_id, delta, num_examples, **meta)
        with self._store.write():
            version = self._apply(p, site_id, replacing=True)
        self._publish_head()
        self._store.erase_wal()
        return version

    def _apply(self, p: _Prepared, site_id: str, *, replacing: bool) -> ModelVersion:
        meta = self._store.meta()
        pins = self._admit(site_id, p, meta)
        old = self._active(site_id)
        if replacing and old is None:
            raise RejectedContribution("not_active", f"{site_id} has no active contribution to replace")
        if not replacing and old is not None:
            raise RejectedContribution("site_active", f"{site_id} already has active contribution {old['id']}; use replace")
        weight = self._family.weight(p.num_examples, meta["weighting"])
        total_weight = meta["total_weight"] + weight - (old["weight"] if old else 0)
        if total_weight > fixedpoint.MAX_TOTAL_WEIGHT:
            raise RejectedContribution("total_weight_overflow", f"Σw would be {total_weight}")
        site_version = self._db.execute("SELECT coalesce(max(version), 0) + 1 FROM contributions WHERE site_id = ?",
                                        (site_id,)).fetchone()[0]
        blob = self._family.encode(p.arrays, site_id, site_version)
        sha256 = hashlib.sha256(blob).hexdigest()
        if self._db.execute("SELECT 1 FROM contributions WHERE delta_sha256 = ?", (sha256,)).fetchone():
            raise RejectedContribution("duplicate", f"Δ {sha256} was recorded before")
        old_arrays = None if old is None else self._stored_arrays(old["id"])
        if self._family.bounded_total:
            pins_bound = self._bounded_total(meta, p.arrays, old_arrays)

        now = _now()
        for key, value in pins.items():
            self._store.set_meta(key, value)
        if "key_spec" in pins:
            self._store.create_accumulators(pins["key_spec"])
        acc = self._store.accumulators()
        if old is not None:
            acc.add(self._family.quantize(old_arrays), -old["weight"])
        acc.add(p.quantized, weight)
        self._store.store_accumulators(acc)
        self._store.set_meta("total_weight", total_weight)
        if self._family.bounded_total:
            self._store.set_meta("abs_bound", pins_bound)

        self._db.execute("INSERT OR IGNORE INTO sites(site_id, first_seen_at) VALUES (?, ?)", (site_id, now))
        model_version = self._db.execute("SELECT max(version) + 1 FROM model_versions").fetchone()[0]
        if old is not None:
            self._end(old["id"], "replaced", now, model_version, "replaced")
        row = {"site_id": site_id, "version": site_version, "num_examples": p.num_examples, "weight": weight,
               **p.meta, "delta_sha256": sha256, "delta_norm": p.norm, "added_at": now,
               "added_in_version": model_version}
        cur = self._db.execute(
            f"INSERT INTO contributions({', '.join(row)}, status) VALUES ({', '.join('?' * (len(row) + 1))})",
            (*row.values(), "active"))
        row["id"] = cur.lastrowid
        self._db.execute("INSERT INTO deltas VALUES (?, ?)", (row["id"], blob))
        event = "replace" if replacing else "add"
        payload = {"contribution_id": row["id"], "row_digest": row_digest(row)}
        if old is not None:
            payload["replaced_contribution_id"] = old["id"]
        if pins:
            payload["pins"] = pins
        version = self._record(now, event, site_id, total_weight, self._composed_digest(acc, total_weight), payload)
        return _version_from(version, now)

    def _composed_digest(self, acc: Accumulators, total_weight: int) -> str:
        return self._family.digest(self._family.compose(acc, total_weight))

    def _bounded_total(self, meta: dict, new: Mapping[str, np.ndarray] | None,
                       old: Mapping[str, np.ndarray] | None) -> dict[str, int]:
        """Σ over the active contributions of max|entry|, per array, after swapping ``old`` for
        ``new``. Admitting only while it fits int64 keeps every partial sum in range, whatever
        is removed later and in whatever order (see families.StatsFamily)."""
        bound = dict(meta["abs_bound"])
        for arrays, sign in ((old, -1), (new, +1)):
            if arrays is not None:
                for name, m in families.StatsFamily.magnitudes(arrays).items():
                    bound[name] += sign * m
        over = sorted(name for name, b in bound.items() if b > families.INT64_MAX)
        if over:
            raise RejectedContribution("total_overflow", f"the sums of {', '.join(over)} could exceed int64")
        return bound

    def _active(self, site_id: str):
        return self._db.execute("SELECT id, weight FROM contributions WHERE site_id = ? AND status = 'active'",
                                (site_id,)).fetchone()

    def _stored_arrays(self, contribution_id: int, expand: bool = True) -> dict[str, np.ndarray]:
        """The stored arrays of a contribution, decoded only when their bytes have the sha256 recorded
        when it was added: bytes swapped in the file would otherwise be what a removal subtracts (a
        removal that leaves the site in the model and erases the evidence) or a zlib bomb inflated
        before anything noticed. ``expand``: see :meth:`contribution_delta`."""
        row = self._db.execute("SELECT d.safetensors, c.delta_sha256 FROM deltas d JOIN contributions c "
                               "ON c.id = d.contribution_id WHERE d.contribution_id = ?", (contribution_id,)).fetchone()
        if row is None:
            raise KeyError(f"no stored Δ for contribution {contribution_id} (not active?)")
        blob, recorded = row
        if hashlib.sha256(blob).hexdigest() != recorded:
            raise LedgerError(f"the stored bytes of contribution {contribution_id} do not have its recorded digest "
                              f"{recorded}: the ledger file was altered (run verify); nothing decoded")
        return self._family.decode(blob, expand)

    def _end(self, contribution_id: int, status: str, at: str, model_version: int, reason: str) -> None:
        # The Δ bytes go (secure_delete overwrites them); digest and metadata stay for the record.
        self._db.execute("UPDATE contributions SET status = ?, ended_at = ?, ended_in_version = ?, end_reason = ? "
                         "WHERE id = ?", (status, at, model_version, reason, contribution_id))
        self._db.execute("DELETE FROM deltas WHERE contribution_id = ?", (contribution_id,))

    def remove(self, site_id: str, reason: str = "withdrawn") -> bool:
        """Withdraw a site: subtract its active contribution exactly and mark it withdrawn, so that
        its later contributions are refused until :meth:`readmit`. A site with nothing active
        (or never seen) is still marked withdrawn: one audited ``withdraw`` version, model
        unchanged. Returns False, changing nothing, when the site is already withdrawn."""
        site_id = _check_site_and_reason(site_id, reason)
        with self._store.write():
            old = self._active(site_id)
            if old is None and self._is_withdrawn(site_id):
                return False
            now = _now()
            self._db.execute("INSERT OR IGNORE INTO sites(site_id, first_seen_at) VALUES (?, ?)", (site_id, now))
            self._db.execute("UPDATE sites SET withdrawn = 1 WHERE site_id = ?", (site_id,))
            if old is None:
                last = self._db.execute("SELECT total_weight, composed_sha256 FROM model_versions "
                                        "ORDER BY version DESC LIMIT 1").fetchone()
                self._record(now, "withdraw", site_id, last[0], last[1], {"reason": reason})
            else:
                self._subtract_active(old, now, "remove", site_id, reason)
        self._publish_head()
        if old is not None:
            self._store.erase_wal()
        return True

    def retract(self, site_id: str, reason: str) -> bool:
        """Subtract a site's active contribution exactly *without* withdrawing the site (audited
        ``retract``; the site may add again at once). Used when a contribution can no longer
        stand — e.g. sample forgetting when a TAFT Δw cannot be recomputed. Its stored bytes are
        erased like a removal's. Returns False, changing nothing, when nothing is active."""
        site_id = _check_site_and_reason(site_id, reason)
        with self._store.write():
            old = self._active(site_id)
            if old is None:
                return False
            self._subtract_active(old, _now(), "retract", site_id, reason)
        self._publish_head()
        self._store.erase_wal()
        return True

    def _subtract_active(self, old, now: str, event: str, site_id: str, reason: str) -> None:
        """Inside a write: take ``old`` out of the sums, end it as removed, record ``event``."""
        meta = self._store.meta()
        old_arrays = self._stored_arrays(old["id"])
        acc = self._store.accumulators()
        acc.add(self._family.quantize(old_arrays), -old["weight"])
        self._store.store_accumulators(acc)
        total_weight = meta["total_weight"] - old["weight"]
        self._store.set_meta("total_weight", total_weight)
        if self._family.bounded_total:
            self._store.set_meta("abs_bound", self._bounded_total(meta, None, old_arrays))
        model_version = self._db.execute("SELECT max(version) + 1 FROM model_versions").fetchone()[0]
        self._end(old["id"], "removed", now, model_version, reason)
        self._record(now, event, site_id, total_weight, self._composed_digest(acc, total_weight),
                     {"contribution_id": old["id"], "reason": reason})

    def readmit(self, site_id: str, reason: str) -> bool:
        """Let a withdrawn site contribute again (audited; the model is unchanged). Returns False,
        changing nothing, when the site is not withdrawn."""
        site_id = _check_site_and_reason(site_id, reason)
        with self._store.write():
            if not self._is_withdrawn(site_id):
                return False
            self._db.execute("UPDATE sites SET withdrawn = 0 WHERE site_id = ?", (site_id,))
            last = self._db.execute("SELECT total_weight, composed_sha256 FROM model_versions "
                                    "ORDER BY version DESC LIMIT 1").fetchone()
            self._record(_now(), "readmit", site_id, last[0], last[1], {"reason": reason})
        self._publish_head()
        return True

    def set_admission_policy(self, *, max_delta_norm: float | None) -> None:
        """Apply this server's admission policy and record it in ``meta``: every later path into the
        ledger — ``taft-ledger forget``, a tool or a run that gives none — opens with the same one
        (:meth:`open` reads it when its caller gives no ``max_delta_norm``), so no path admits what
        a reply would be refused for. (The tensor spec and the base digest are pinned by the ledger
        itself at its first contribution.)"""
        if max_delta_norm is not None and not (isinstance(max_delta_norm, (int, float)) and max_delta_norm > 0
                                               and math.isfinite(max_delta_norm)):
            raise ValueError(f"max_delta_norm must be a finite number > 0 or None, got {max_delta_norm!r}")
        self.max_delta_norm = None if max_delta_norm is None else float(max_delta_norm)
        with self._store.write():
            self._store.set_meta("admission_policy", {"max_delta_norm": self.max_delta_norm})

    def admission_policy(self) -> dict[str, Any]:
        """The policy :meth:`set_admission_policy` recorded (``{}`` when none was)."""
        with self._store.snapshot():
            policy = self._store.meta().get("admission_policy")
        if not isinstance(policy, dict):
            return {}
        norm = policy.get("max_delta_norm")
        if norm is not None and not (isinstance(norm, (int, float)) and not isinstance(norm, bool)
                                     and math.isfinite(norm) and norm > 0):
            raise LedgerError(f"{self.path}: the recorded admission policy is unusable ({policy!r})")
        return {"max_delta_norm": None if norm is None else float(norm)}

    def link_ledger(self, key: str, relative_path: str) -> None:
        """Record in ``meta`` where a companion ledger of this state lives (``key`` → a path relative
        to this file's folder): the operator's tools find every model family from the Δ ledger
        instead of guessing. A different existing link is a LedgerError (one companion per family)."""
        with self._store.write():
            links = dict(self._store.meta().get("linked_ledgers") or {})
            if links.get(key, relative_path) != relative_path:
                raise LedgerError(f"{self.path} is linked to the {key} ledger {links[key]!r}, not {relative_path!r}: "
                                  f"one state directory holds one ledger per model family")
            if links.get(key) != relative_path:
                self._store.set_meta("linked_ledgers", {**links, key: relative_path})

    def linked_ledgers(self) -> dict[str, str]:
        """The companion ledgers :meth:`link_ledger` recorded (key → path relative to this folder)."""
        with self._store.snapshot():
            return dict(self._store.meta().get("linked_ledgers") or {})

    # ------------------------------------------------------------------ reading
    @property
    def family(self) -> str:
        """``"delta"`` or ``"stats"`` (:mod:`server.ledger.families`), pinned in the file."""
        return self._family.name

    @property
    def model_card(self) -> dict[str, Any] | None:
        """The stats ledger's pinned model card (``None`` for a delta ledger)."""
        return self._family.model_card

    def composed_arrays(self) -> dict[str, np.ndarray]:
        """The composed model: for a delta ledger the composed Δ as float32 numpy arrays (``{}``
        before the first contribution); for a stats ledger the exact int64 sums of the active
        sites' statistics (zeros when none is active)."""
        with self.snapshot():
            return self._family.compose(self._store.accumulators(), self._store.meta()["total_weight"])

    def composed_stats(self) -> "SufficientStats | None":  # noqa: F821
        """A stats ledger's composed statistics (``None`` while no site is active)."""
        if self._family.name != "stats":
            raise LedgerError(f"{self.path} is a {self._family.name!r} ledger; it holds no statistics")
        from tangent.exact_head.statistics import SufficientStats  # numpy only; imported where it is needed
        with self.snapshot():
            if not self._store.meta()["total_weight"]:
                return None
            arrays = self.composed_arrays()
        return SufficientStats.from_arrays(arrays, self._family.model_card["stats-meta"])

    def composed_delta(self) -> dict[str, "torch.Tensor"]:  # noqa: F821
        """The composed Δ ``Σ wᵢΔᵢ / Σ wᵢ`` as float32 torch tensors, keyed like the contributions."""
        import torch  # the ledger itself runs on numpy; only this view needs torch
        return {name: torch.from_numpy(a) for name, a in self.composed_arrays().items()}

    def contribution_delta(self, contribution_id: int, expand: bool = True) -> dict[str, np.ndarray]:
        """The stored Δ of an *active* contribution, exactly as received (float32 numpy arrays);
        statistics in their Gram form or, with ``expand`` False, as stored (a row form's ``rows``
        and ``labels``: whoever sums many of them can form one Gram of all their rows).

        Removed or replaced contributions have their Δ bytes erased: ``KeyError`` for those."""
        with self.snapshot():
            return self._stored_arrays(contribution_id, expand)

    def settings(self) -> dict[str, Any]:
        """Weighting, grid, pinned spec and base digest, total weight, signing public key."""
        with self.snapshot():
            return self._store.meta()

    def sites(self) -> list[Site]:
        with self.snapshot():
            rows = self._db.execute(
                "SELECT s.site_id, s.first_seen_at, s.withdrawn, "
                "(SELECT id FROM contributions c WHERE c.site_id = s.site_id AND status = 'active') AS active, "
                "(SELECT count(*) FROM contributions c WHERE c.site_id = s.site_id) AS n "
                "FROM sites s ORDER BY s.site_id").fetchall()
        return [Site(r["site_id"], r["first_seen_at"], r["active"], r["n"], bool(r["withdrawn"])) for r in rows]

    def withdrawn_sites(self) -> list[str]:
        with self.snapshot():
            return [r[0] for r in self._db.execute("SELECT site_id FROM sites WHERE withdrawn = 1 ORDER BY site_id")]

    def contributions(self, site_id: str | None = None, status: str | None = None) -> list[Contribution]:
        where, args = [], []
        if site_id is not None:
            where.append("site_id = ?"), args.append(site_id)
        if status is not None:
            where.append("status = ?"), args.append(status)
        sql = f"SELECT {_COLUMNS_SQL} FROM contributions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.snapshot():
            return [contribution_from_row(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def versions(self) -> list[ModelVersion]:
        with self.snapshot():
            return [version_from_row(r) for r in self._db.execute("SELECT * FROM model_versions ORDER BY version")]

    def current_version(self) -> ModelVersion:
        with self.snapshot():
            return version_from_row(self._db.execute("SELECT * FROM model_versions ORDER BY version DESC LIMIT 1").fetchone())

    def max_epsilon(self) -> float | None:
        """Largest ε among active contributions: ``inf`` if one of them was trained without DP,
        ``None`` when there are none."""
        with self.snapshot():
            rows = self._db.execute("SELECT epsilon FROM contributions WHERE status = 'active'").fetchall()
        if not rows:
            return None
        return max(math.inf if r[0] is None else r[0] for r in rows)

    def privacy_totals(self) -> dict[str, dict[str, float | int]]:
        """Per site, the privacy loss of everything it ever released into a model of this ledger:
        sequential composition (Σε, Σδ) over *every* contribution recorded — active, replaced and
        removed alike, since the models built from them were published. ε is ``inf`` once any of
        them was trained without DP (``non_dp`` counts those)."""
        with self.snapshot():
            rows = self._db.execute("SELECT site_id, epsilon, delta_dp FROM contributions ORDER BY id").fetchall()
        totals: dict[str, dict[str, float | int]] = {}
        for site_id, epsilon, delta_dp in rows:
            t = totals.setdefault(site_id, {"epsilon": 0.0, "delta": 0.0, "contributions": 0, "non_dp": 0})
            t["contributions"] += 1
            if epsilon is None:
                t["non_dp"] += 1
                t["epsilon"] = math.inf
            else:
                t["epsilon"] += epsilon
                t["delta"] += delta_dp or 0.0
        return totals

    def audit_log(self) -> list[dict[str, Any]]:
        with self.snapshot():
            return [dict(r) for r in self._db.execute("SELECT * FROM audit ORDER BY seq")]

    # ------------------------------------------------------------------ verification
    def verify(self, public_key: Ed25519PublicKey | str | Path | None = None,
               witness: str | Path | None = None) -> VerifyReport:
        """Recompute everything the file claims and compare; raise :class:`LedgerCorrupt` on any
        mismatch. ``public_key`` (a key, PEM text or a PEM file) is the trust anchor for the
        signatures; by default the signing key's own public key, else the one the file records.
        ``witness`` (default: the ledger's own, see :meth:`open`) must not hold a newer or a
        different head than the ledger: without one, a rollback of the database and its head file
        together passes."""
        if public_key is not None and not isinstance(public_key, Ed25519PublicKey):
            public_key = audit.load_public_key(public_key)
        signer = None if self._signer is None else self._signer.public_key()
        return verify_ledger(self._store, self.head_path, trusted_key=public_key, signer_key=signer,
                             witness=Path(witness) if witness is not None else self.witness)


def _check_site_and_reason(site_id: Any, reason: Any) -> str:
    if not isinstance(reason, str) or not reason:
        raise ValueError("reason must be a non-empty string")
    if not is_printable(reason):  # shown by taft-ledger show and in exports: no escape sequences
        raise ValueError(f"reason {escape_controls(reason[:80])!r} holds control characters")
    return check_site_id(site_id)


def _card_difference(pinned: Any, given: Mapping[str, Any]) -> str:
    pinned = pinned if isinstance(pinned, Mapping) else {}
    keys = sorted(k for k in pinned.keys() | given.keys() if canonical_json(pinned.get(k)) != canonical_json(given.get(k)))
    return f"differs in {keys}" if keys else "no card pinned"


def _version_from(v: dict, at: str) -> ModelVersion:
    return ModelVersion(v["version"], at, v["event"], v["site_id"], tuple(v["contribution_ids"]),
                        v["total_weight"], v["composed_sha256"])
