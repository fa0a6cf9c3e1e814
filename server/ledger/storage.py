"""The ledger's SQLite file: schema, connection settings, transactions, permissions, erasure.

One file (plus SQLite's ``-wal`` and ``-shm``), schema version in ``PRAGMA user_version``. Every
change is one ``BEGIN IMMEDIATE … COMMIT``; reads happen inside a ``BEGIN … ROLLBACK`` snapshot, so
several processes (the server and the ``taft-ledger`` CLI) may share one ledger.

Privacy of what is stored: the files are created 0600 and any directory created for them 0700
(independent of the umask: SQLite gives ``-wal``/``-shm`` the main file's mode). Deleted rows are
overwritten (``secure_delete``), and :meth:`Store.erase_wal` checkpoints the write-ahead log into
the main file and truncates it, so bytes deleted by a committed transaction are in no file of the
ledger afterwards (the file system may still hold old blocks; that is below SQLite's reach).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.ledger.accumulators import Accumulators
from server.ledger.records import LedgerError, canonical_json

log = logging.getLogger("taft.ledger")

SCHEMA_VERSION = 2
FILE_MODE = 0o600
DIR_MODE = 0o700
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE sites (
    site_id TEXT PRIMARY KEY,
    first_seen_at TEXT NOT NULL,
    withdrawn INTEGER NOT NULL DEFAULT 0 CHECK (withdrawn IN (0, 1))
);
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
CREATE TABLE signed_heads (
    version INTEGER PRIMARY KEY REFERENCES model_versions(version),
    head TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END;
CREATE TRIGGER model_versions_no_update BEFORE UPDATE ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are append-only'); END;
CREATE TRIGGER model_versions_no_delete BEFORE DELETE ON model_versions
    BEGIN SELECT RAISE(ABORT, 'model versions are append-only'); END;
CREATE TRIGGER signed_heads_no_update BEFORE UPDATE ON signed_heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
CREATE TRIGGER signed_heads_no_delete BEFORE DELETE ON signed_heads
    BEGIN SELECT RAISE(ABORT, 'signed heads are append-only'); END;
"""


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents as 0700 (mkdir's mode is masked by the umask)."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it meanwhile
            continue
        os.chmod(d, DIR_MODE)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is masked by the umask too
    os.close(fd)


def restrict_existing(path: Path) -> None:
    """Tighten the ledger file and SQLite's companions to 0600 where they are ours."""
    for p in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_COMPANIONS)):
        try:
            if p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077:
                os.chmod(p, FILE_MODE)
        except FileNotFoundError:
            continue


def refuse_links(path: Path) -> None:
    """LedgerError when the ledger file or one of SQLite's companions is a symbolic link: a link
    planted in the state directory would move the ledger's bytes out of it."""
    for p in (path, *(Path(f"{path}{suffix}") for suffix in SQLITE_COMPANIONS)):
        if p.is_symlink():
            raise LedgerError(f"{p} is a symbolic link: refused (the ledger's files are never links)")


def connect(path: Path, create: bool) -> sqlite3.Connection:
    refuse_links(path)
    if not create and not path.exists():
        raise LedgerError(f"no ledger at {path}")
    make_private_dirs(path.parent)
    create_private_file(path)
    restrict_existing(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=60.0)
    try:
        db.row_factory = sqlite3.Row
        # Large pages: Δ and accumulator blobs are megabytes; takes effect only for a new file.
        db.execute("PRAGMA page_size = 65536")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
            raise LedgerError(f"{path}: cannot switch to WAL mode")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA secure_delete=ON")  # deleted Δ bytes are overwritten, not just unlinked
        db.execute("PRAGMA cache_size=-8192")  # 8 MiB: the sums are cached as arrays (Store.accumulators);
        # 64 MiB per ledger held ~100 MiB more in the ServerApp for ~0.045 CPU s less per statistics add
    except BaseException:
        db.close()
        raise
    restrict_existing(path)
    return db


class Store:
    """One connection, its transactions, the ``meta`` key-value table and the accumulator rows."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db = db
        self.path = path
        self._lock = threading.RLock()
        self._cache: tuple[int, Accumulators] | None = None  # (data_version, sums) mirroring the file

    def close(self) -> None:
        self.db.close()

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    @contextmanager
    def write(self) -> Iterator[None]:
        """One write transaction; the reserved lock is taken up front so reads inside see the final state."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self._cache = None  # accumulators may have been changed in memory only
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside this block see one consistent state, even while another process writes."""
        with self._lock:
            if self.db.in_transaction:  # nested: the outer block already holds one
                yield
                return
            self.db.execute("BEGIN")
            try:
                yield
            finally:
                self.db.execute("ROLLBACK")

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def is_empty(self) -> bool:
        return not self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]

    def create_schema(self) -> None:
        # executescript() would COMMIT the open transaction: run the statements one by one.
        for statement in SCHEMA.split(";\n"):
            if statement.strip():
                self.db.execute(statement)
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def meta(self) -> dict[str, Any]:
        return {row["key"]: json.loads(row["value"]) for row in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, canonical_json(value)))

    # ------------------------------------------------------------------ accumulators
    def create_accumulators(self, spec: dict[str, list[int]]) -> None:
        zeros = Accumulators.zeros(spec)
        for name, data in zeros.encoded().items():
            self.db.execute("INSERT INTO accumulators VALUES (?,?,?)", (name, canonical_json(spec[name]), data))
        self._cache = None

    def stored_accumulators(self) -> dict[str, tuple[list[int], bytes]]:
        return {r["name"]: (json.loads(r["shape"]), r["data"])
                for r in self.db.execute("SELECT name, shape, data FROM accumulators")}

    def accumulators(self) -> Accumulators:
        """The sums, from memory when no other connection has committed since we last read or
        wrote them (``PRAGMA data_version``); call inside a transaction."""
        data_version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._cache is None or self._cache[0] != data_version:
            rows = [(name, shape, data) for name, (shape, data) in self.stored_accumulators().items()]
            self._cache = (data_version, Accumulators.decode(rows))
        return self._cache[1]

    def store_accumulators(self, acc: Accumulators) -> None:
        """Writes the sums that changed since they were read or last stored (``acc`` is the
        object :meth:`accumulators` returned, whose other sums equal the stored bytes)."""
        rows = {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT name, rowid, length(data) FROM accumulators")}
        for name, data in acc.encoded_views(acc.take_changed()).items():
            rowid, size = rows[name]
            if len(data) == size:  # overwrite in place: no page reallocation for megabytes
                with self.db.blobopen("accumulators", "data", rowid) as blob:
                    blob.write(data)
            else:
                self.db.execute("UPDATE accumulators SET data = ? WHERE rowid = ?", (data, rowid))

    # ------------------------------------------------------------------ erasure
    def erase_wal(self) -> bool:
        """Copy the WAL into the main file and truncate it to zero bytes (call outside a
        transaction). Deleted pages were zeroed by ``secure_delete``, so after this nothing a
        committed deletion removed remains in the ledger's files. Waits (busy timeout) for
        readers of older snapshots; returns False, with a warning, if one still holds it."""
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("%s: the WAL could not be truncated (a reader holds an old snapshot); erased bytes "
                        "stay in %s-wal until the next checkpoint", self.path, self.path)
        return not busy
