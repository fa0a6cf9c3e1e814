"""Direct edits of a ledger's SQLite file, as someone who can write it (not the signing key) makes them."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from server.ledger import fixedpoint

SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}


def delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


def raw(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    for table in ("audit", "model_versions", "signed_heads"):
        for op in ("update", "delete"):
            db.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op}")
    return db


def truncate_last_contribution(path: Path) -> None:
    """The truncation attack: drop the newest contribution with its audit entry and version row and
    subtract it from the accumulators, so that every remaining table is self-consistent."""
    db = raw(path)
    db.execute("BEGIN")
    cid, weight = db.execute("SELECT id, weight FROM contributions ORDER BY id DESC LIMIT 1").fetchone()
    blob = db.execute("SELECT safetensors FROM deltas WHERE contribution_id = ?", (cid,)).fetchone()[0]
    from server.ledger.families import DeltaFamily
    arrays = DeltaFamily().decode(blob)
    for name, shape, data in db.execute("SELECT name, shape, data FROM accumulators").fetchall():
        hi, lo = fixedpoint.decode(data, int(np.prod(json.loads(shape))))
        fixedpoint.accumulate(hi, lo, *fixedpoint.quantize(arrays[name]), -weight)
        db.execute("UPDATE accumulators SET data = ? WHERE name = ?", (bytes(fixedpoint.encode(hi, lo)), name))
    total = json.loads(db.execute("SELECT value FROM meta WHERE key = 'total_weight'").fetchone()[0])
    db.execute("UPDATE meta SET value = ? WHERE key = 'total_weight'", (json.dumps(total - weight),))
    last = db.execute("SELECT max(version) FROM model_versions").fetchone()[0]
    db.execute("DELETE FROM deltas WHERE contribution_id = ?", (cid,))
    db.execute("DELETE FROM contributions WHERE id = ?", (cid,))
    db.execute("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    db.execute("DELETE FROM model_versions WHERE version = ?", (last,))
    db.execute("DELETE FROM signed_heads WHERE version = ?", (last,))
    db.execute("COMMIT")
    db.close()
