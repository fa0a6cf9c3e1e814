"""The nonce store of withdrawal requests: used nonces and every decision, in one SQLite file next to the
ledger (``<ledger>.withdrawals.sqlite``).

One transaction per decision, so a nonce is consumed before the ledger is touched and a replay is
refused even after a crash.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tangent.protocol import signed_requests

if TYPE_CHECKING:
    from server.trust.withdrawal import WithdrawalRequest

_utc_now = signed_requests.utc_now


def nonce_store_path(ledger_path: str | Path) -> Path:
    """Where the nonces and decisions of a ledger's withdrawals live."""
    ledger_path = Path(ledger_path)
    return ledger_path.with_name(ledger_path.name + ".withdrawals.sqlite")


class NonceStore:
    """Used nonces and every decision, in one SQLite file (schema version in the file)."""

    SCHEMA_VERSION = 1

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A link planted in the state directory must not move the nonces (and the replay
        # protection with them) elsewhere: the file and SQLite's companions are never links.
        for file in (self.path, *(Path(f"{self.path}{suffix}") for suffix in ("-wal", "-shm", "-journal"))):
            if file.is_symlink():
                raise ValueError(f"the nonce store {file} is a symbolic link: refused")
        # created private before SQLite opens it (its -wal/-shm files copy these permissions)
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        with self._tx():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(self.SCHEMA_VERSION),)
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, site_id TEXT NOT NULL,"
                " timestamp TEXT NOT NULL, consumed_at TEXT NOT NULL)"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS decisions (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                " at TEXT NOT NULL, site_id TEXT, nonce TEXT, signer TEXT, accepted INTEGER NOT NULL,"
                " detail TEXT NOT NULL)"
            )

    def _tx(self):
        db = self.db

        class _Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, *_):
                db.execute("COMMIT" if exc_type is None else "ROLLBACK")

        return _Tx()

    def consume(self, request: WithdrawalRequest) -> bool:
        """Mark the nonce used; False when it already was (a replay)."""
        with self._tx():
            cur = self.db.execute(
                "INSERT OR IGNORE INTO nonces VALUES (?, ?, ?, ?)",
                (request.nonce, request.site_id, request.timestamp, _utc_now().isoformat()),
            )
            return cur.rowcount == 1

    def record(self, payload: dict[str, Any] | None, accepted: bool, detail: str) -> None:
        payload = payload or {}
        with self._tx():
            self.db.execute(
                "INSERT INTO decisions (at, site_id, nonce, signer, accepted, detail)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (_utc_now().isoformat(), _s(payload.get("site_id")), _s(payload.get("nonce")),
                 _s(payload.get("signer")), int(accepted), detail),
            )

    def decisions(self) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT at, site_id, nonce, signer, accepted, detail FROM decisions ORDER BY id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "NonceStore":
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _s(value: Any) -> str | None:
    return None if value is None else str(value)
