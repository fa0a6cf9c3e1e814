"""Withdrawn data is gone from disk, and the ledger's files are private.

After a removal (or a replacement) none of the old Δ's bytes — neither its float32 bytes as
received nor its fixed-point integers nor its stored (compressed) bytes — occur in any file of
the ledger: the main database, the
write-ahead log, the shared-memory index, the head file. The ledger that only deleted the row
(schema 1) left them in the WAL.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from server.ledger import fixedpoint
from server.ledger import Ledger, ledger_file_paths

SHAPES = {"blocks.11.mlp.fc1.weight": (384, 192), "head.weight": (10, 192), "head.bias": (10,)}
CHUNK = 32  # bytes: 8 float32 values; random normals never repeat by chance in 32 bytes


def delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


def fingerprints(d: dict[str, np.ndarray]) -> list[bytes]:
    """Byte strings that only this Δ contains: chunks of its float32 bytes and of its quantized
    int64 values (what a leaked quantization buffer would hold)."""
    found = []
    for a in d.values():
        raw = a.astype("<f4").tobytes()
        q = np.rint(a.astype(np.float64) * 2.0 ** fixedpoint.FRAC_BITS).astype("<i8").tobytes()
        for data in (raw, q):
            step = max(CHUNK, len(data) // 64)
            found += [data[i:i + CHUNK] for i in range(0, len(data) - CHUNK + 1, step)]
    return found


def stored_chunks(path: Path, site: str) -> list[bytes]:
    """Chunks of the bytes the ledger stores for ``site``'s active contribution (compressed:
    server/ledger/blobs.py, so the raw float32 bytes never reach the file)."""
    import sqlite3

    with sqlite3.connect(path) as db:
        (blob,) = db.execute("SELECT safetensors FROM deltas JOIN contributions ON id = contribution_id "
                             "WHERE site_id = ? AND status = 'active'", (site,)).fetchone()
    # past the prefix and the compressed safetensors header, which zlib codes alike for every Δ
    blob = bytes(blob)[len(blob) // 8:]
    return [blob[i:i + CHUNK] for i in range(0, len(blob) - CHUNK + 1, max(CHUNK, len(blob) // 64))]


def ledger_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name) and p.is_file())


def occurrences(path: Path, needles: list[bytes]) -> dict[str, int]:
    hits = {}
    for f in ledger_files(path):
        content = f.read_bytes()
        n = sum(needle in content for needle in needles)
        if n:
            hits[f.name] = n
    return hits


@pytest.mark.slow
def test_a_removed_sites_bytes_are_in_no_file_of_the_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    rng = np.random.default_rng(0)
    deltas = {f"site-{i}": delta(rng) for i in range(3)}
    with Ledger.open(path) as ledger:
        for site, d in deltas.items():
            ledger.add(site, d, 100)
        probes = {site: fingerprints(d) + stored_chunks(path, site) for site, d in deltas.items()}
        assert occurrences(path, probes["site-1"]), "the probe finds a stored Δ"
        assert ledger.remove("site-1", reason="right to erasure")
        assert occurrences(path, probes["site-1"]) == {}
        assert occurrences(path, probes["site-0"])  # the others are still there
        assert [f.name for f in ledger_files(path) if f.name.endswith("-wal")] == ["ledger.sqlite-wal"]
        assert Path(f"{path}-wal").stat().st_size == 0
        ledger.verify()


def test_a_replaced_contributions_bytes_are_in_no_file_of_the_ledger(tmp_path):
    path = tmp_path / "ledger.sqlite"
    rng = np.random.default_rng(1)
    old, new, other = delta(rng), delta(rng), delta(rng)
    with Ledger.open(path) as ledger:
        ledger.add("site-a", old, 10)
        ledger.add("site-b", other, 10)
        old_probe = fingerprints(old) + stored_chunks(path, "site-a")
        assert occurrences(path, old_probe)
        ledger.replace("site-a", new, 12)
        assert occurrences(path, old_probe) == {}
        assert occurrences(path, fingerprints(new) + stored_chunks(path, "site-a"))
        ledger.verify()


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_files_are_0600_and_created_directories_0700_under_any_umask(tmp_path, umask):
    path = tmp_path / "state" / "server" / "ledger.sqlite"
    previous = os.umask(umask)
    try:
        with Ledger.open(path) as ledger:
            ledger.add("site-a", delta(np.random.default_rng(2)), 10)
            ledger.remove("site-a", reason="x")
            ledger.add("site-b", delta(np.random.default_rng(3)), 10)  # the WAL is in use
            files = ledger_files(path)
            assert {f.name for f in files} >= {"ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm",
                                               "ledger.sqlite.head.json", "ledger.sqlite.signing-key.pem"}
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            assert set(files) <= set(ledger_file_paths(path))  # what a report path must never name
    finally:
        os.umask(previous)
    for d in (tmp_path / "state", tmp_path / "state" / "server"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_an_existing_world_readable_ledger_is_tightened_on_open(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger.open(path).close()
    os.chmod(path, 0o644)
    with Ledger.open(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
