"""Crash safety: a writer killed with SIGKILL at random points never leaves a half-applied change,
and a kill between the database commit and the signed head file never makes verify fail for good."""
from __future__ import annotations

import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.ledger import Ledger

ROOT = Path(__file__).resolve().parents[3]
KILLS = 20

# The writer: adds, replaces and removes contributions of six sites for ever, printing the model
# version after each committed change. ~300 k parameters, so a change takes long enough
# (tens of ms) for kills to land inside transactions and commits, not only between them.
WRITER = r"""
import sys
import numpy as np
from server.ledger import Ledger, RejectedContribution

path, seed = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(seed)
shapes = {"blocks.11.attn.qkv.weight": (576, 192), "blocks.11.attn.proj.weight": (192, 192),
          "blocks.11.mlp.fc1.weight": (384, 192), "norm.weight": (192,), "head.weight": (10, 192)}
ledger = Ledger.open(path)
print("ready", flush=True)
sites = [f"site-{i}" for i in range(6)]
while True:
    site = sites[rng.integers(len(sites))]
    delta = {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in shapes.items()}
    n = int(rng.integers(1, 5000))
    if site in ledger.withdrawn_sites():  # a removal sticks until the site is re-admitted
        ledger.readmit(site, reason="crash test")
        version = ledger.current_version()
    elif ledger.contributions(site_id=site, status="active"):
        if rng.random() < 0.5:
            ledger.remove(site, reason="crash test")
            version = ledger.current_version()
        else:
            version = ledger.replace(site, delta, n, epsilon=float(rng.random() * 8))
    else:
        version = ledger.add(site, delta, n, epsilon=float(rng.random() * 8))
    print("committed", version.version, flush=True)
"""


def _wait_for_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "writer did not start"
    return proc.stdout.readline()


@pytest.mark.slow
def test_sigkill_at_random_points_never_half_applies_a_change(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "ledger.sqlite"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rng = random.Random(20240611)
    acknowledged_total, deadline = 0, time.monotonic() + 300
    for kill in range(KILLS):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(kill)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        acknowledged = []
        if kill % 5 == 4:  # sometimes while the writer is still opening the ledger
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            assert _wait_for_line(proc, 60) == "ready\n", proc.stderr.read() if proc.poll() is not None else ""
            # the writer commits one to three changes first, however loaded the machine is (a
            # fixed sleep let it commit almost nothing at load 20), then dies at a random point
            for _ in range(rng.randint(1, 3)):
                line = _wait_for_line(proc, 60)
                assert line.startswith("committed"), line + (proc.stderr.read() if proc.poll() is not None else "")
                acknowledged.append(int(line.split()[1]))
            time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        acknowledged += [int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")]
        acknowledged_total += len(acknowledged)

        with Ledger.open(path) as ledger:
            report = ledger.verify()  # sums == Σ active Δ bytes, statuses/versions == audit replay, signatures
            current = ledger.current_version()
            assert report.head_file_version == current.version  # opening caught the head file up
            # every change the writer saw committed is in the file
            assert current.version >= max(acknowledged, default=0)
            assert report.current_version == current.version
            active = ledger.contributions(status="active")
            assert sorted(c.id for c in active) == list(current.contribution_ids)
            assert len({c.site_id for c in active}) == len(active)
        with sqlite3.connect(path) as db:  # Δ bytes exist exactly for the active contributions
            rows = db.execute("SELECT status, id IN (SELECT contribution_id FROM deltas) FROM contributions").fetchall()
            assert all((status == "active") == has_bytes for status, has_bytes in rows)
        assert time.monotonic() < deadline, "crash test is taking too long"
    assert acknowledged_total >= KILLS, "the writer hardly committed anything; the test proves nothing"


# The writer again, killing itself at the worst moment for the head file: right after the database
# COMMIT of its k-th change, before the signed head reaches <ledger>.head.json (or half-way
# through writing it: the temporary file is written, the rename has not happened).
SELF_KILLER = r"""
import os, signal, sys
import numpy as np
from server.ledger import Ledger, audit

path, k, half_way = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
write_head_file, replace, calls = audit.write_head_file, os.replace, [0]

def dying_write(*args):
    calls[0] += 1
    if calls[0] == k:
        if half_way:
            os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return write_head_file(*args)

audit.write_head_file = dying_write
rng = np.random.default_rng(k)
ledger = Ledger.open(path)
for i in range(10):
    ledger.add(f"site-{k}-{i}", {"w": rng.standard_normal(5).astype(np.float32)}, 10)
    print("committed", ledger.current_version().version, flush=True)
"""


def test_a_kill_between_commit_and_head_file_is_recovered_on_open(tmp_path):
    script = tmp_path / "self_killer.py"
    script.write_text(SELF_KILLER)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k, half_way in ((1, False), (3, False), (4, True)):  # k = 1: during the creation of the ledger
        path = tmp_path / f"ledger-{k}.sqlite"
        if k > 1:
            Ledger.open(path).close()  # the head file exists: the kill leaves it one version behind
        proc = subprocess.run([sys.executable, str(script), str(path), str(k), "1" if half_way else "0"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        with sqlite3.connect(path) as db:
            db_version = db.execute("SELECT max(version) FROM model_versions").fetchone()[0]
        on_file = Path(f"{path}.head.json")
        file_version = json.loads(on_file.read_text())["head"]["version"] if on_file.exists() else None
        assert file_version != db_version, "the kill did not land between the commit and the head file"
        with Ledger.open(path) as ledger:
            report = ledger.verify()
            assert report.current_version == db_version == report.head_file_version
