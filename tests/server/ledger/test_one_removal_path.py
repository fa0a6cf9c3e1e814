"""One removal path for every model family: the operator's tools act on the Δ ledger and the statistics
ledger it names, or refuse. Real ledgers, real keys, the real CLI entry points (in process)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deploy import withdraw
from deploy.pki import create_site_key
from server import cli
from server.ledger import Ledger, LedgerError
from server.ledger.ledgers import link, open_pair
from server.trust.registry import key_fingerprint
from server.trust.withdrawal import create_request, load_private_key, load_public_key
from tests.server.exact_head_replies import FEATURE_DIGEST, model_card, site_stats

SITES = ("1", "2")


def delta(seed: int) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal(4).astype(np.float32)}


def state(tmp_path: Path, stats_name: str, *, linked: bool = True) -> tuple[Path, Path]:
    """A state directory as a run leaves it: both sites in the Δ ledger and in the statistics ledger
    ``stats_name`` (relative to the state), linked from the Δ ledger as the ServerApp does."""
    delta_path, stats_path = tmp_path / "ledger.sqlite", tmp_path / stats_name
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger.open(delta_path) as d, Ledger.open(stats_path, family="stats", model_card=model_card()) as s:
        for i, site in enumerate(SITES):
            d.add(site, delta(i), 10)
            stats = site_stats(i, 10)
            s.add(site, stats.to_arrays(), num_examples=stats.n, base_digest=FEATURE_DIGEST)
        if linked:
            link(d, s)
    return delta_path, stats_path


def active(path: Path) -> list[str]:
    with Ledger.open(path, create=False) as ledger:
        return sorted(c.site_id for c in ledger.contributions(status="active"))


def withdrawn(path: Path) -> list[str]:
    with Ledger.open(path, create=False) as ledger:
        return ledger.withdrawn_sites()


@pytest.mark.parametrize("stats_name", ["exact_head.sqlite", "models/head-stats.sqlite", "other.sqlite"])
def test_cli_remove_takes_the_site_out_of_both_ledgers(tmp_path, capsys, stats_name):
    delta_path, stats_path = state(tmp_path, stats_name)
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "consent withdrawn"]) == 0
    assert active(delta_path) == active(stats_path) == ["2"]
    assert withdrawn(delta_path) == withdrawn(stats_path) == ["1"]
    assert cli.main(["--ledger", str(delta_path), "readmit", "1", "--reason", "consent given again"]) == 0
    assert withdrawn(delta_path) == withdrawn(stats_path) == []
    assert cli.main(["--ledger", str(delta_path), "retract", "2", "--reason", "data corrected"]) == 0
    assert active(delta_path) == active(stats_path) == []


def test_cli_refuses_the_statistics_ledger_alone_and_an_unnamed_one(tmp_path, capsys):
    delta_path, stats_path = state(tmp_path, "head.sqlite", linked=False)
    # the statistics ledger given as --ledger: refused, nothing changes
    assert cli.main(["--ledger", str(stats_path), "remove", "1", "--reason", "x"]) == 2
    # the Δ ledger names no statistics ledger, but one sits beside it: refused, not skipped
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert "head.sqlite" in capsys.readouterr().err
    assert active(delta_path) == active(stats_path) == ["1", "2"]


def test_a_linked_statistics_ledger_that_is_missing_is_a_refusal(tmp_path):
    delta_path, stats_path = state(tmp_path, "head.sqlite")
    stats_path.rename(tmp_path / "elsewhere.bin")
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert active(delta_path) == ["1", "2"]


def test_a_state_keeps_one_statistics_ledger(tmp_path):
    delta_path, _ = state(tmp_path, "head.sqlite")
    with Ledger.open(delta_path) as d, Ledger.open(tmp_path / "second.sqlite", family="stats",
                                                     model_card=model_card()) as second:
        with pytest.raises(LedgerError, match="one ledger per model family"):
            link(d, second)
    with pytest.raises(LedgerError, match="names its statistics ledger"):
        with open_pair(delta_path, stats_path=tmp_path / "second.sqlite"):
            pass


def _registry(tmp_path: Path) -> Path:
    keys, sites = tmp_path / "keys", {}
    for node, site in enumerate(SITES, start=101):
        _, pub = create_site_key(keys, site)
        sites[site] = {"public_key": f"keys/{pub.name}", "fingerprint": key_fingerprint(load_public_key(pub)),
                       "node_id": node, "max_examples": 1000, "registered_at": "2026-11-30T00:00:00Z",
                       "revoked": False}
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"version": 2, "sites": sites}))
    return path


def _request(tmp_path: Path, site: str) -> Path:
    document = create_request(site, load_private_key(tmp_path / "keys" / f"site-{site}.key"), "consent withdrawn")
    path = tmp_path / f"withdraw-{site}.json"
    path.write_text(json.dumps(document))
    return path


def test_withdraw_apply_with_a_non_default_statistics_ledger_reaches_both(tmp_path, capsys):
    delta_path, stats_path = state(tmp_path, "runs/exact-head-v2.sqlite")
    registry = _registry(tmp_path)
    assert withdraw.main(["apply", str(_request(tmp_path, "1")), "--registry", str(registry),
                          "--ledger", str(delta_path)]) == 0
    assert active(delta_path) == active(stats_path) == ["2"]
    assert withdrawn(delta_path) == withdrawn(stats_path) == ["1"]


def test_withdraw_apply_refuses_when_the_statistics_ledger_cannot_be_found(tmp_path, capsys):
    delta_path, stats_path = state(tmp_path, "exact-head-v2.sqlite", linked=False)
    registry = _registry(tmp_path)
    request = _request(tmp_path, "1")
    assert withdraw.main(["apply", str(request), "--registry", str(registry), "--ledger", str(delta_path)]) == 1
    assert "REFUSED" in capsys.readouterr().err
    assert active(delta_path) == active(stats_path) == ["1", "2"]
    # named explicitly, the same request (its nonce was not consumed) reaches both
    assert withdraw.main(["apply", str(request), "--registry", str(registry), "--ledger", str(delta_path),
                          "--exact-head-ledger", str(stats_path)]) == 0
    assert active(delta_path) == active(stats_path) == ["2"]


def _relink(delta_path: Path, relative: str) -> None:
    """A state-directory writer's edit of the Δ ledger's link (plain SQLite, no key needed)."""
    import sqlite3

    db = sqlite3.connect(delta_path, isolation_level=None)
    try:
        db.execute("UPDATE meta SET value = ? WHERE key = 'linked_ledgers'", (json.dumps({"stats": relative}),))
    finally:
        db.close()


def test_a_statistics_ledger_moved_outside_through_a_planted_symlink_is_refused(tmp_path, capsys):
    """The state-directory writer moves the statistics ledger out and leaves a symlink in its place:
    the tools must not follow it (the ledger's own files are never links)."""
    state_dir = tmp_path / "state"
    delta_path, stats_path = state(state_dir, "exact_head.sqlite")
    outside = tmp_path / "outside.sqlite"
    stats_path.rename(outside)
    stats_path.symlink_to(outside)
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert active(delta_path) == active(outside) == ["1", "2"]


@pytest.mark.parametrize("where", ["outside", "absolute"])
def test_a_link_leading_out_of_the_state_directory_is_refused(tmp_path, capsys, where):
    state_dir = tmp_path / "state"
    delta_path, stats_path = state(state_dir, "exact_head.sqlite")
    decoy = tmp_path / "decoy.sqlite"
    with Ledger.open(decoy, family="stats", model_card=model_card()):
        pass
    _relink(delta_path, "../decoy.sqlite" if where == "outside" else str(decoy))
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert active(delta_path) == active(stats_path) == ["1", "2"]


def test_a_link_redirected_to_a_decoy_beside_the_real_statistics_ledger_is_refused(tmp_path, capsys):
    """Relinked to an empty statistics ledger in the same folder, a removal would leave the site's
    statistics in the real one, which nothing names any more: refused, as an unnamed one is."""
    delta_path, stats_path = state(tmp_path, "exact_head.sqlite")
    with Ledger.open(tmp_path / "decoy.sqlite", family="stats", model_card=model_card()):
        pass
    _relink(delta_path, "decoy.sqlite")
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert "exact_head.sqlite" in capsys.readouterr().err
    assert active(delta_path) == active(stats_path) == ["1", "2"]


def test_a_fifo_planted_beside_the_ledgers_does_not_hang_the_tools(tmp_path):
    """A FIFO named like a ledger in the state directory: looking for statistics ledgers there must
    not open it (a read-only open of a FIFO blocks until someone writes; no signal interrupts it,
    hence a child process with a timeout)."""
    import os
    import subprocess
    import sys

    delta_path, stats_path = state(tmp_path, "exact_head.sqlite")
    os.mkfifo(tmp_path / "planted.sqlite")
    code = f"import sys; from server import cli; sys.exit(cli.main(['--ledger', {str(delta_path)!r}, 'remove', '1', " \
           f"'--reason', 'x']))"
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, timeout=120, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert active(delta_path) == active(stats_path) == ["2"]


def test_a_symlink_named_like_a_ledger_beside_the_ledgers_is_a_refusal(tmp_path, capsys):
    """The real statistics ledger moved out and reachable only through a link with another name,
    the Δ ledger relinked to a decoy: the link is neither followed nor skipped, it is refused."""
    state_dir = tmp_path / "state"
    delta_path, stats_path = state(state_dir, "exact_head.sqlite")
    outside = tmp_path / "outside.sqlite"
    stats_path.rename(outside)
    (state_dir / "kept.sqlite").symlink_to(outside)
    with Ledger.open(state_dir / "decoy.sqlite", family="stats", model_card=model_card()):
        pass
    _relink(delta_path, "decoy.sqlite")
    assert cli.main(["--ledger", str(delta_path), "remove", "1", "--reason", "x"]) == 2
    assert "kept.sqlite" in capsys.readouterr().err
    assert active(delta_path) == active(outside) == ["1", "2"]
