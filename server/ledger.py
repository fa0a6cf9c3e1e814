"""The contribution ledger: one SQLite file holding every site's Δw and the exact global sum.

The global model is ``w0 + Σ wᵢΔᵢ / Σ wᵢ`` (``wᵢ`` = num_examples, or 1 under uniform
weighting). Because the tangent model is linear in Δ, a site can be removed later by
subtraction. The ledger makes that removal *exact*: every Δ is put on a fixed-point grid and the
sums are kept as integers (see :mod:`server.fixedpoint` for the grid, range and error bound), so
adding and removing in any order leaves bit-identical accumulators, and the composed Δ is a
deterministic function of them.

The file holds (schema version in ``PRAGMA user_version``):

- ``meta``: weighting, grid, the pinned tensor spec (names → shapes) and base digest, the exact
  total weight ``Σ wᵢ``.
- ``sites`` and ``contributions``: per contribution its metadata (ε, δ, DP settings, shard
  fingerprint, base digest, training config), the sha256 of its Δ, and its status (``active`` /
  ``removed`` / ``replaced``). At most one active contribution per site.
- ``deltas``: the Δ of each *active* contribution as safetensors bytes (a table of its own so
  that queries over contributions never read megabyte blobs). The bytes of a removed or replaced
  contribution are erased (``secure_delete``); its digest and metadata stay for the record.
- ``accumulators``: per tensor the exact integer ``Σ wᵢ·qᵢ``.
- ``model_versions``: one row per change: which contributions, the digest of the composed Δ.
- ``audit``: append-only, hash-chained log; entry ``k`` stores
  ``sha256(hash_{k-1} ‖ canonical JSON of entry k)``. It records every contribution's immutable
  fields (as a digest) and every version, so :meth:`Ledger.verify` can replay it against the
  tables.

Every change is one ``BEGIN IMMEDIATE … COMMIT`` transaction that validates, writes the
contribution, the accumulators, the new version and the audit entry together; a rejected
contribution rolls back and leaves the file untouched. Every operation reads the state from the
file inside its transaction, so several processes (the server and the ``taft-ledger`` CLI) may
use one ledger at once; the only thing kept in memory is a copy of the accumulators, used only
while ``PRAGMA data_version`` shows that no other connection has committed since, and dropped
whenever a transaction fails.
"""
from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import sys
import threading
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from server import fixedpoint

SCHEMA_VERSION = 1
GENESIS_HASH = "0" * 64
WEIGHTINGS = ("examples", "uniform")
MAX_NUM_EXAMPLES = fixedpoint.MAX_WEIGHT
# Keyword metadata accepted by add() and replace().
CONTRIBUTION_META = frozenset({"epsilon", "delta_dp", "dp_settings", "shard_fingerprint", "base_digest",
                               "train_config", "extra"})

# Machine-readable reasons carried by RejectedContribution.reason.
REASONS = frozenset({
    "bad_site_id",            # empty or not a string
    "unknown_site",           # not in known_sites
    "bad_num_examples",       # not an int, <= 0 or > MAX_NUM_EXAMPLES
    "bad_meta",               # ε/δ negative or not finite, settings not JSON objects
    "bad_structure",          # not a non-empty mapping of names to tensors
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
    event: str  # create / add / remove / replace
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


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE sites (site_id TEXT PRIMARY KEY, first_seen_at TEXT NOT NULL);
CREATE TABLE contributions (
    id INTEGER PRIMARY KEY,
    site_id TEXT NOT NULL REFERENCES sites(site_id),
    version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    weight INTEGER NOT NULL,
    epsilon REAL,
    delta_dp REAL,
    dp_settings TEXT,
    shard_fingerprint TEXT,
    base_digest TEXT,
    train_config TEXT,
    extra TEXT,
    delta_sha256 TEXT NOT NULL UNIQUE,
    delta_norm REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'removed', 'replaced')),
    added_at TEXT NOT NULL,
    added_in_version INTEGER NOT NULL,
    ended_at TEXT,
    ended_in_version INTEGER,
    end_reason TEXT,
    UNIQUE (site_id, version)
);
CREATE UNIQUE INDEX one_active_contribution_per_site ON contributions(site_id) WHERE status = 'active';
CREATE TABLE deltas (
    contribution_id INTEGER PRIMARY KEY REFERENCES contributions(id),
    safetensors BLOB NOT NULL
);
CREATE TABLE accumulators (name TEXT PRIMARY KEY, shape TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE model_versions (
    version INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    event TEXT NOT NULL,
    site_id TEXT,
    contribution_ids TEXT NOT NULL,
    total_weight INTEGER NOT NULL,
    composed_sha256 TEXT NOT NULL
);
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY,
    at TEXT NOT NULL,
    action TEXT NOT NULL,
    site_id TEXT,
    payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER model_versions_no_update BEFORE UPDATE ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are append-only'); END;
CREATE TRIGGER model_versions_no_delete BEFORE DELETE ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are append-only'); END;
"""

# Contribution fields fixed at insertion; their digest goes into the audit log.
_IMMUTABLE_FIELDS = (
    "id", "site_id", "version", "num_examples", "weight", "epsilon", "delta_dp", "dp_settings",
    "shard_fingerprint", "base_digest", "train_config", "extra", "delta_sha256", "delta_norm",
    "added_at", "added_in_version",
)
_CONTRIBUTION_COLUMNS = ", ".join(f.name for f in Contribution.__dataclass_fields__.values())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_or_none(value: Any) -> str | None:
    return None if value is None else _canonical(value)


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 little-endian bytes, in name order.

    Independent of any file format, so digests of composed Δs stay comparable across library
    versions.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        h.update(_canonical([name, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _audit_hash(prev_hash: str, seq: int, at: str, action: str, site_id: str | None, payload: str) -> str:
    body = _canonical({"seq": seq, "at": at, "action": action, "site_id": site_id, "payload": payload})
    return hashlib.sha256((prev_hash + "\n" + body).encode()).hexdigest()


def _row_digest(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: row[k] for k in _IMMUTABLE_FIELDS}).encode()).hexdigest()


def _as_arrays(delta: Any) -> dict[str, np.ndarray]:
    """Float32 numpy views of a ``{name: tensor}`` mapping (torch tensors or numpy arrays)."""
    if not isinstance(delta, Mapping) or not delta:
        raise RejectedContribution("bad_structure", "delta must be a non-empty mapping of name -> tensor")
    torch = sys.modules.get("torch")  # a caller holding torch tensors has imported torch already
    arrays = {}
    for name, value in delta.items():
        if not isinstance(name, str) or not name:
            raise RejectedContribution("bad_structure", f"tensor name {name!r} is not a non-empty string")
        if torch is not None and isinstance(value, torch.Tensor):
            if value.dtype != torch.float32:
                raise RejectedContribution("wrong_dtype", f"{name}: {value.dtype}, expected torch.float32")
            value = value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            if value.dtype != np.float32:
                raise RejectedContribution("wrong_dtype", f"{name}: {value.dtype}, expected float32")
        else:
            raise RejectedContribution("bad_structure", f"{name}: {type(value).__name__} is not a tensor")
        arrays[name] = np.ascontiguousarray(value, dtype="<f4")
    return arrays


def _check_values(arrays: Mapping[str, np.ndarray], max_delta_norm: float | None) -> float:
    """Rejects NaN/Inf, out-of-range values and a too large norm; returns the global L2 norm."""
    largest = {name: float(np.max(np.abs(a), initial=0.0)) for name, a in arrays.items()}  # NaN propagates
    for name, m in largest.items():
        if not math.isfinite(m):
            raise RejectedContribution("non_finite", f"{name} holds NaN or Inf")
    for name, m in largest.items():
        if m > fixedpoint.MAX_ABS_VALUE:
            raise RejectedContribution("out_of_range", f"{name} has |x| = {m:.6g} > {fixedpoint.MAX_ABS_VALUE:g}")
    squares = 0.0
    for a in arrays.values():
        a64 = a.astype(np.float64)
        a64 *= a64
        squares += float(a64.sum())  # pairwise summation, no BLAS threads
    norm = math.sqrt(squares)
    if max_delta_norm is not None and norm > max_delta_norm:
        raise RejectedContribution("norm_too_large", f"‖Δ‖₂ = {norm:.6g} > {max_delta_norm:g}")
    return norm


def _check_num_examples(num_examples: Any) -> int:
    if isinstance(num_examples, (bool, np.bool_)) or not isinstance(num_examples, (int, np.integer)):
        raise RejectedContribution("bad_num_examples", f"{num_examples!r} is not an integer")
    if not 1 <= int(num_examples) <= MAX_NUM_EXAMPLES:
        raise RejectedContribution("bad_num_examples", f"{num_examples} outside [1, {MAX_NUM_EXAMPLES}]")
    return int(num_examples)


def _check_meta(epsilon, delta_dp, dp_settings, shard_fingerprint, base_digest, train_config, extra) -> None:
    for label, value in (("epsilon", epsilon), ("delta_dp", delta_dp)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                or not math.isfinite(value) or value < 0:
            raise RejectedContribution("bad_meta", f"{label} = {value!r} is not a finite number >= 0")
    for label, value in (("dp_settings", dp_settings), ("train_config", train_config), ("extra", extra)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise RejectedContribution("bad_meta", f"{label} must be a mapping")
        try:
            _canonical(value)
        except (TypeError, ValueError) as e:
            raise RejectedContribution("bad_meta", f"{label} is not JSON: {e}") from None
    for label, value in (("shard_fingerprint", shard_fingerprint), ("base_digest", base_digest)):
        if value is not None and not isinstance(value, str):
            raise RejectedContribution("bad_meta", f"{label} must be a string")


@dataclass
class _Prepared:
    """A validated contribution, ready to be written."""
    arrays: dict[str, np.ndarray]
    blob: bytes
    sha256: str
    norm: float
    num_examples: int
    meta: dict
    quantized: dict[str, tuple[np.ndarray, np.ndarray]]


class Ledger:
    """Open with :meth:`Ledger.open`. See the module docstring for the file layout."""

    def __init__(self, db: sqlite3.Connection, path: Path, *, max_delta_norm, expected_base_digest,
                 known_sites, expected_spec):
        self._db = db
        self._lock = threading.RLock()
        self._cache: tuple[int, dict] | None = None  # (data_version, accumulators) mirroring the file
        self.path = path
        self.max_delta_norm = max_delta_norm
        self.expected_base_digest = expected_base_digest
        self.known_sites = None if known_sites is None else frozenset(known_sites)
        self.expected_spec = None if expected_spec is None else {
            k: [int(d) for d in v] for k, v in expected_spec.items()}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, path: str | Path, *, max_delta_norm: float | None = None,
             expected_base_digest: str | None = None, known_sites: Collection[str] | None = None,
             weighting: str | None = None, expected_spec: Mapping[str, tuple[int, ...]] | None = None,
             create: bool = True) -> "Ledger":
        """Open (or create) the ledger at ``path``.

        ``max_delta_norm``, ``known_sites`` and ``expected_spec`` (tensor name → shape) are this
        server's admission policy and are not stored. ``expected_base_digest`` must agree with the
        digest pinned in the file, if any. ``weighting`` is fixed when the file is created
        (default ``"examples"``); opening with a different one is an error.
        """
        path = Path(path)
        if weighting is not None and weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if not create and not path.exists():
            raise LedgerError(f"no ledger at {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60.0)
        try:
            db.row_factory = sqlite3.Row
            # Large pages: Δ and accumulator blobs are megabytes; takes effect only for a new file.
            db.execute("PRAGMA page_size = 65536")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise LedgerError(f"{path}: cannot switch to WAL mode")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # erased Δ bytes are overwritten, not just unlinked
            db.execute("PRAGMA cache_size=-65536")  # 64 MiB: the accumulators of a ViT-S Δ fit
            ledger = cls(db, path, max_delta_norm=max_delta_norm, expected_base_digest=expected_base_digest,
                         known_sites=known_sites, expected_spec=expected_spec)
            ledger._init_or_check(weighting, create)
        except BaseException:
            db.close()
            raise
        return ledger

    def _init_or_check(self, weighting: str | None, create: bool) -> None:
        with self._write():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if not create or self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise LedgerError(f"{self.path} is an SQLite file but not a ledger")
                self._create(weighting or "examples")
                return
            if version != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: schema version {version}, this code reads {SCHEMA_VERSION}")
        meta = self._meta()
        if weighting is not None and weighting != meta["weighting"]:
            raise LedgerError(f"{self.path} uses weighting {meta['weighting']!r}, not {weighting!r}")
        pinned = meta.get("base_digest")
        if self.expected_base_digest is not None and pinned is not None and pinned != self.expected_base_digest:
            raise LedgerError(f"{self.path} holds contributions for base {pinned}, not {self.expected_base_digest}")

    def _create(self, weighting: str) -> None:
        # executescript() would COMMIT the open transaction: run the statements one by one.
        for statement in _SCHEMA.split(";\n"):
            if statement.strip():
                self._db.execute(statement)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        settings = {"schema_version": SCHEMA_VERSION, "weighting": weighting,
                    "frac_bits": fixedpoint.FRAC_BITS, "max_abs_value": fixedpoint.MAX_ABS_VALUE}
        for key, value in settings.items():
            self._set_meta(key, value)
        self._set_meta("total_weight", 0)
        now = _now()
        version = self._append_version(now, "create", None, 0, arrays_digest({}))
        self._append_audit(now, "create", None, {"settings": settings, "model_version": version})

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction; the reserved lock is taken up front so reads inside see the final state."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                self._cache = None  # accumulators may have been changed in memory only
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def snapshot(self) -> Iterator["Ledger"]:
        """Reads inside this block (any of the reading methods) see one consistent state, even
        while another process writes."""
        with self._lock:
            if self._db.in_transaction:  # nested: the outer snapshot already holds one
                yield self
                return
            self._db.execute("BEGIN")
            try:
                yield self
            finally:
                self._db.execute("ROLLBACK")

    def _meta(self) -> dict[str, Any]:
        return {row["key"]: json.loads(row["value"]) for row in self._db.execute("SELECT key, value FROM meta")}

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                         (key, _canonical(value)))

    def _append_audit(self, at: str, action: str, site_id: str | None, payload: dict) -> None:
        last = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (last["seq"] + 1, last["hash"]) if last else (1, GENESIS_HASH)
        body = _canonical(payload)
        self._db.execute("INSERT INTO audit(seq, at, action, site_id, payload, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                         (seq, at, action, site_id, body, prev, _audit_hash(prev, seq, at, action, site_id, body)))

    def _append_version(self, at: str, event: str, site_id: str | None, total_weight: int, composed_sha256: str) -> dict:
        ids = [r[0] for r in self._db.execute("SELECT id FROM contributions WHERE status = 'active' ORDER BY id")]
        last = self._db.execute("SELECT max(version) FROM model_versions").fetchone()[0]
        version = 0 if last is None else last + 1
        self._db.execute("INSERT INTO model_versions VALUES (?,?,?,?,?,?,?)",
                         (version, at, event, site_id, _canonical(ids), total_weight, composed_sha256))
        return {"version": version, "event": event, "site_id": site_id, "contribution_ids": ids,
                "total_weight": total_weight, "composed_sha256": composed_sha256}

    def _load_accumulators(self) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
        acc = {}
        for row in self._db.execute("SELECT name, shape, data FROM accumulators ORDER BY name"):
            shape = json.loads(row["shape"])
            hi, lo = fixedpoint.decode(row["data"], math.prod(shape))
            acc[row["name"]] = (shape, hi, lo)
        return acc

    def _accumulators(self) -> dict[str, tuple[list[int], np.ndarray, np.ndarray]]:
        """The accumulators, from memory when no other connection has committed since we last
        read or wrote them (``PRAGMA data_version``); call inside a transaction."""
        data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._cache is None or self._cache[0] != data_version:
            self._cache = (data_version, self._load_accumulators())
        return self._cache[1]

    def _store_accumulators(self, acc) -> None:
        rows = {r[0]: (r[1], r[2]) for r in self._db.execute("SELECT name, rowid, length(data) FROM accumulators")}
        for name, (_, hi, lo) in acc.items():
            data = fixedpoint.encode(hi, lo)
            rowid, size = rows[name]
            if len(data) == size:  # overwrite in place: no page reallocation for megabytes
                with self._db.blobopen("accumulators", "data", rowid) as blob:
                    blob.write(data)
            else:
                self._db.execute("UPDATE accumulators SET data = ? WHERE rowid = ?", (data, rowid))

    def _compose(self, acc, total_weight: int) -> dict[str, np.ndarray]:
        return {name: fixedpoint.compose(hi, lo, total_weight).reshape(shape) for name, (shape, hi, lo) in acc.items()}

    # ------------------------------------------------------------------ validation
    def _prepare(self, site_id: Any, delta: Any, num_examples: Any, **meta: Any) -> _Prepared:
        """Checks that need no database state (cheap ones first)."""
        unknown = meta.keys() - CONTRIBUTION_META
        if unknown:
            raise TypeError(f"unknown contribution metadata {sorted(unknown)}; put free-form data in extra={{...}}")
        epsilon, delta_dp, dp_settings, shard_fingerprint, base_digest, train_config, extra = (
            meta.get(key) for key in ("epsilon", "delta_dp", "dp_settings", "shard_fingerprint", "base_digest",
                                      "train_config", "extra"))
        if not isinstance(site_id, str) or not site_id:
            raise RejectedContribution("bad_site_id", f"{site_id!r} is not a non-empty string")
        if self.known_sites is not None and site_id not in self.known_sites:
            raise RejectedContribution("unknown_site", site_id)
        num_examples = _check_num_examples(num_examples)
        _check_meta(epsilon, delta_dp, dp_settings, shard_fingerprint, base_digest, train_config, extra)
        arrays = _as_arrays(delta)
        norm = _check_values(arrays, self.max_delta_norm)
        blob = safetensors.numpy.save(dict(sorted(arrays.items())))
        meta = {"epsilon": None if epsilon is None else float(epsilon),
                "delta_dp": None if delta_dp is None else float(delta_dp),
                "dp_settings": _json_or_none(dp_settings), "shard_fingerprint": shard_fingerprint,
                "base_digest": base_digest, "train_config": _json_or_none(train_config),
                "extra": _json_or_none(extra)}
        quantized = {name: fixedpoint.quantize(a) for name, a in arrays.items()}
        return _Prepared(arrays, blob, hashlib.sha256(blob).hexdigest(), norm, num_examples, meta, quantized)

    def _admit(self, p: _Prepared, meta: dict) -> dict[str, Any]:
        """Checks against the file's state, inside the write transaction. Returns what to pin."""
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
        if self._db.execute("SELECT 1 FROM contributions WHERE delta_sha256 = ?", (p.sha256,)).fetchone():
            raise RejectedContribution("duplicate", f"Δ {p.sha256} was recorded before")
        return pins

    def _weight(self, meta: dict, num_examples: int) -> int:
        return num_examples if meta["weighting"] == "examples" else 1

    # ------------------------------------------------------------------ changes
    def add(self, site_id: str, delta: Mapping[str, Any], num_examples: int, **meta: Any) -> ModelVersion:
        """Record a site's contribution and fold it into the sums; returns the new model version.

        ``meta``: ``epsilon``, ``delta_dp``, ``dp_settings`` (dict), ``shard_fingerprint``,
        ``base_digest``, ``train_config`` (dict), ``extra`` (dict). Raises
        :class:`RejectedContribution` (ledger unchanged) for bad input or a site that already has
        an active contribution (use :meth:`replace`).
        """
        p = self._prepare(site_id, delta, num_examples, **meta)
        with self._write():
            return self._apply(site_id, p, replacing=False)

    def replace(self, site_id: str, delta: Mapping[str, Any], num_examples: int, **meta: Any) -> ModelVersion:
        """Atomically swap a site's active contribution for a new one (one transaction, one version)."""
        p = self._prepare(site_id, delta, num_examples, **meta)
        with self._write():
            return self._apply(site_id, p, replacing=True)

    def _apply(self, site_id: str, p: _Prepared, *, replacing: bool) -> ModelVersion:
        meta = self._meta()
        pins = self._admit(p, meta)
        old = self._active(site_id)
        if replacing and old is None:
            raise RejectedContribution("not_active", f"{site_id} has no active contribution to replace")
        if not replacing and old is not None:
            raise RejectedContribution("site_active", f"{site_id} already has active contribution {old['id']}; use replace")
        weight = self._weight(meta, p.num_examples)
        total_weight = meta["total_weight"] + weight - (old["weight"] if old else 0)
        if total_weight > fixedpoint.MAX_TOTAL_WEIGHT:
            raise RejectedContribution("total_weight_overflow", f"Σw would be {total_weight}")

        now = _now()
        for key, value in pins.items():
            self._set_meta(key, value)
        spec = pins.get("key_spec") or meta["key_spec"]
        if "key_spec" in pins:
            for name, shape in spec.items():
                hi, lo = fixedpoint.zeros(math.prod(shape))
                self._db.execute("INSERT INTO accumulators VALUES (?,?,?)",
                                 (name, _canonical(shape), fixedpoint.encode(hi, lo)))
        if "key_spec" in pins:
            self._cache = None
        acc = self._accumulators()
        if old is not None:
            self._subtract(acc, old)
        for name, (_, hi, lo) in acc.items():
            fixedpoint.accumulate(hi, lo, *p.quantized[name], weight)
        self._store_accumulators(acc)
        self._set_meta("total_weight", total_weight)

        self._db.execute("INSERT OR IGNORE INTO sites VALUES (?, ?)", (site_id, now))
        site_version = self._db.execute("SELECT coalesce(max(version), 0) + 1 FROM contributions WHERE site_id = ?",
                                        (site_id,)).fetchone()[0]
        model_version = self._db.execute("SELECT max(version) + 1 FROM model_versions").fetchone()[0]
        if old is not None:
            self._end(old["id"], "replaced", now, model_version, "replaced")
        row = {"site_id": site_id, "version": site_version, "num_examples": p.num_examples, "weight": weight,
               **p.meta, "delta_sha256": p.sha256, "delta_norm": p.norm, "added_at": now,
               "added_in_version": model_version}
        cur = self._db.execute(
            f"INSERT INTO contributions({', '.join(row)}, status) VALUES ({', '.join('?' * (len(row) + 1))})",
            (*row.values(), "active"))
        row["id"] = cur.lastrowid
        self._db.execute("INSERT INTO deltas VALUES (?, ?)", (row["id"], p.blob))
        composed_sha = arrays_digest(self._compose(acc, total_weight))
        event = "replace" if replacing else "add"
        version = self._append_version(now, event, site_id, total_weight, composed_sha)
        payload = {"contribution_id": row["id"], "row_digest": _row_digest(row), "model_version": version}
        if old is not None:
            payload["replaced_contribution_id"] = old["id"]
        if pins:
            payload["pins"] = pins
        self._append_audit(now, event, site_id, payload)
        return _version_from(version, now)

    def _active(self, site_id: str) -> sqlite3.Row | None:
        return self._db.execute("SELECT id, weight FROM contributions WHERE site_id = ? AND status = 'active'",
                                (site_id,)).fetchone()

    def _subtract(self, acc, old: sqlite3.Row) -> None:
        blob = self._db.execute("SELECT safetensors FROM deltas WHERE contribution_id = ?", (old["id"],)).fetchone()[0]
        arrays = safetensors.numpy.load(blob)
        for name, (_, hi, lo) in acc.items():
            fixedpoint.accumulate(hi, lo, *fixedpoint.quantize(arrays[name]), -old["weight"])

    def _end(self, contribution_id: int, status: str, at: str, model_version: int, reason: str) -> None:
        # The Δ bytes go (secure_delete overwrites them); digest and metadata stay for the record.
        self._db.execute("UPDATE contributions SET status = ?, ended_at = ?, ended_in_version = ?, end_reason = ? "
                         "WHERE id = ?", (status, at, model_version, reason, contribution_id))
        self._db.execute("DELETE FROM deltas WHERE contribution_id = ?", (contribution_id,))

    def remove(self, site_id: str, reason: str = "withdrawn") -> bool:
        """Subtract a site's active contribution exactly. Returns False (and changes nothing)
        when the site has no active contribution."""
        if not isinstance(reason, str) or not reason:
            raise ValueError("reason must be a non-empty string")
        with self._write():
            old = self._active(site_id)
            if old is None:
                return False
            meta = self._meta()
            acc = self._accumulators()
            self._subtract(acc, old)
            self._store_accumulators(acc)
            total_weight = meta["total_weight"] - old["weight"]
            self._set_meta("total_weight", total_weight)
            now = _now()
            model_version = self._db.execute("SELECT max(version) + 1 FROM model_versions").fetchone()[0]
            self._end(old["id"], "removed", now, model_version, reason)
            version = self._append_version(now, "remove", site_id, total_weight,
                                           arrays_digest(self._compose(acc, total_weight)))
            self._append_audit(now, "remove", site_id,
                               {"contribution_id": old["id"], "reason": reason, "model_version": version})
            return True

    # ------------------------------------------------------------------ reading
    def composed_arrays(self) -> dict[str, np.ndarray]:
        """The composed Δ as float32 numpy arrays (``{}`` before the first contribution)."""
        with self.snapshot():
            return self._compose(self._accumulators(), self._meta()["total_weight"])

    def composed_delta(self) -> dict[str, "torch.Tensor"]:  # noqa: F821
        """The composed Δ ``Σ wᵢΔᵢ / Σ wᵢ`` as float32 torch tensors, keyed like the contributions."""
        import torch  # the ledger itself runs on numpy; only this view needs torch
        return {name: torch.from_numpy(a) for name, a in self.composed_arrays().items()}

    def contribution_delta(self, contribution_id: int) -> dict[str, np.ndarray]:
        """The stored Δ of an *active* contribution, exactly as received (float32 numpy arrays).

        Removed or replaced contributions have their Δ bytes erased: ``KeyError`` for those."""
        with self.snapshot():
            row = self._db.execute("SELECT safetensors FROM deltas WHERE contribution_id = ?",
                                   (contribution_id,)).fetchone()
        if row is None:
            raise KeyError(f"no stored Δ for contribution {contribution_id} (not active?)")
        return safetensors.numpy.load(row[0])

    def settings(self) -> dict[str, Any]:
        """Weighting, grid, pinned spec and base digest, total weight."""
        with self.snapshot():
            return self._meta()

    def sites(self) -> list[Site]:
        with self.snapshot():
            rows = self._db.execute(
                "SELECT s.site_id, s.first_seen_at, "
                "(SELECT id FROM contributions c WHERE c.site_id = s.site_id AND status = 'active') AS active, "
                "(SELECT count(*) FROM contributions c WHERE c.site_id = s.site_id) AS n "
                "FROM sites s ORDER BY s.site_id").fetchall()
        return [Site(r["site_id"], r["first_seen_at"], r["active"], r["n"]) for r in rows]

    def contributions(self, site_id: str | None = None, status: str | None = None) -> list[Contribution]:
        where, args = [], []
        if site_id is not None:
            where.append("site_id = ?"), args.append(site_id)
        if status is not None:
            where.append("status = ?"), args.append(status)
        sql = f"SELECT {_CONTRIBUTION_COLUMNS} FROM contributions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self.snapshot():
            return [_contribution_from(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    def versions(self) -> list[ModelVersion]:
        with self.snapshot():
            return [_version_row(r) for r in self._db.execute("SELECT * FROM model_versions ORDER BY version")]

    def current_version(self) -> ModelVersion:
        with self.snapshot():
            return _version_row(self._db.execute("SELECT * FROM model_versions ORDER BY version DESC LIMIT 1").fetchone())

    def max_epsilon(self) -> float | None:
        """Largest ε among active contributions: ``inf`` if one of them was trained without DP,
        ``None`` when there are none."""
        with self.snapshot():
            rows = self._db.execute("SELECT epsilon FROM contributions WHERE status = 'active'").fetchall()
        if not rows:
            return None
        return max(math.inf if r[0] is None else r[0] for r in rows)

    def audit_log(self) -> list[dict[str, Any]]:
        with self.snapshot():
            return [dict(r) for r in self._db.execute("SELECT * FROM audit ORDER BY seq")]

    # ------------------------------------------------------------------ verification
    def verify(self) -> VerifyReport:
        """Recompute everything the file claims and compare; raise :class:`LedgerCorrupt` on any mismatch.

        Checks: SQLite's own page check; the audit hash chain; that replaying the audit log gives
        exactly the stored versions, contribution rows (immutable fields) and statuses; each
        active Δ's sha256; and accumulators rebuilt from the active Δ bytes, compared byte for
        byte with the stored ones, together with the total weight and the current composed digest.
        """
        with self.snapshot():
            problems: list[str] = []
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if [r[0] for r in check] != ["ok"]:
                problems.append(f"sqlite quick_check: {[r[0] for r in check]}")
            report = self._verify(problems)
        if problems:
            raise LedgerCorrupt(problems)
        return report

    def _verify(self, problems: list[str]) -> VerifyReport:
        meta = self._meta()
        # 1. the audit chain
        entries = self.audit_log()
        prev = GENESIS_HASH
        for i, e in enumerate(entries, start=1):
            if e["seq"] != i:
                problems.append(f"audit: entry {e['seq']} where {i} was expected (entry missing?)")
            if e["prev_hash"] != prev:
                problems.append(f"audit {e['seq']}: prev_hash does not match the previous entry")
            if e["hash"] != _audit_hash(e["prev_hash"], e["seq"], e["at"], e["action"], e["site_id"], e["payload"]):
                problems.append(f"audit {e['seq']}: hash does not match its content")
            prev = e["hash"]

        # 2. replay the log against the tables
        settings, pins, row_digests, status, versions = {}, {}, {}, {}, []
        for e in entries:
            payload = json.loads(e["payload"])
            versions.append(payload["model_version"])
            if e["action"] == "create":
                settings = payload["settings"]
            elif e["action"] in ("add", "replace"):
                pins.update(payload.get("pins", {}))
                row_digests[payload["contribution_id"]] = payload["row_digest"]
                status[payload["contribution_id"]] = "active"
                if "replaced_contribution_id" in payload:
                    status[payload["replaced_contribution_id"]] = "replaced"
            elif e["action"] == "remove":
                status[payload["contribution_id"]] = "removed"
        for key, value in {**settings, **pins}.items():
            if meta.get(key) != value:
                problems.append(f"meta {key!r} = {meta.get(key)!r}, the audit log says {value!r}")
        stored_versions = [{"version": v.version, "event": v.event, "site_id": v.site_id,
                            "contribution_ids": list(v.contribution_ids), "total_weight": v.total_weight,
                            "composed_sha256": v.composed_sha256} for v in self.versions()]
        if stored_versions != versions:
            problems.append("model_versions differ from the versions recorded in the audit log")
        rows = {r["id"]: dict(r) for r in self._db.execute("SELECT * FROM contributions")}
        stored_ids = {r[0] for r in self._db.execute("SELECT contribution_id FROM deltas")}
        if stored_ids != {cid for cid, row in rows.items() if row["status"] == "active"}:
            problems.append("Δ bytes are stored for other than exactly the active contributions")
        if rows.keys() != row_digests.keys():
            problems.append(f"contributions {sorted(rows.keys() ^ row_digests.keys())} are not in both the table and the audit log")
        for cid, row in rows.items():
            if cid in row_digests and _row_digest(row) != row_digests[cid]:
                problems.append(f"contribution {cid} ({row['site_id']}): fields differ from the audit log")
            if status.get(cid) != row["status"]:
                problems.append(f"contribution {cid} ({row['site_id']}): status {row['status']!r}, audit log says {status.get(cid)!r}")
            expected_weight = row["num_examples"] if meta.get("weighting") == "examples" else 1
            if row["weight"] != expected_weight:
                problems.append(f"contribution {cid}: weight {row['weight']} does not follow the weighting")
        active = sorted(cid for cid, row in rows.items() if row["status"] == "active")
        current = versions[-1] if versions else None
        if current is None or current["contribution_ids"] != active:
            problems.append("the current model version does not list exactly the active contributions")

        # 3. rebuild the accumulators from the stored Δ bytes
        spec = meta.get("key_spec") or {}
        rebuilt = {name: (shape, *fixedpoint.zeros(math.prod(shape))) for name, shape in spec.items()}
        total_weight = 0
        for cid in active:
            row = rows[cid]
            blob = self._db.execute("SELECT safetensors FROM deltas WHERE contribution_id = ?", (cid,)).fetchone()
            blob = None if blob is None else blob[0]
            if blob is None or hashlib.sha256(blob).hexdigest() != row["delta_sha256"]:
                problems.append(f"contribution {cid} ({row['site_id']}): Δ bytes do not match their sha256")
                continue
            arrays = safetensors.numpy.load(blob)
            if {k: list(a.shape) for k, a in arrays.items()} != spec:
                problems.append(f"contribution {cid}: tensors do not match the pinned spec")
                continue
            for name, (_, hi, lo) in rebuilt.items():
                fixedpoint.accumulate(hi, lo, *fixedpoint.quantize(arrays[name]), row["weight"])
            total_weight += row["weight"]
        stored = {r["name"]: (json.loads(r["shape"]), r["data"]) for r in
                  self._db.execute("SELECT name, shape, data FROM accumulators")}
        if stored.keys() != rebuilt.keys():
            problems.append("accumulator tensors differ from the pinned spec")
        acc_hash = hashlib.sha256()
        for name in sorted(rebuilt):
            shape, hi, lo = rebuilt[name]
            data = bytes(fixedpoint.encode(hi, lo))
            acc_hash.update(data)
            if name in stored and (stored[name][0] != shape or stored[name][1] != data):
                problems.append(f"accumulator {name!r} differs from the sum of the active contributions")
        if meta.get("total_weight") != total_weight:
            problems.append(f"total weight {meta.get('total_weight')} != Σ active weights {total_weight}")
        composed_sha = arrays_digest(self._compose(rebuilt, total_weight))
        if current is not None and current["composed_sha256"] != composed_sha:
            problems.append("the current version's composed digest does not match the recomputed composed Δ")
        return VerifyReport(current_version=current["version"] if current else -1, active_contributions=len(active),
                            audit_entries=len(entries), total_weight=total_weight, composed_sha256=composed_sha,
                            accumulator_sha256=acc_hash.hexdigest())


def _contribution_from(r: sqlite3.Row) -> Contribution:
    d = dict(r)
    for key in ("dp_settings", "train_config", "extra"):
        d[key] = None if d[key] is None else json.loads(d[key])
    return Contribution(**d)


def _version_row(r: sqlite3.Row) -> ModelVersion:
    return ModelVersion(r["version"], r["created_at"], r["event"], r["site_id"],
                        tuple(json.loads(r["contribution_ids"])), r["total_weight"], r["composed_sha256"])


def _version_from(v: dict, at: str) -> ModelVersion:
    return ModelVersion(v["version"], at, v["event"], v["site_id"], tuple(v["contribution_ids"]),
                        v["total_weight"], v["composed_sha256"])
