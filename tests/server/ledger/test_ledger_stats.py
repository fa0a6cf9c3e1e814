"""The "stats" ledger family: exact-head sufficient statistics, summed exactly in int64.

Real SQLite files, real Ed25519 keys, tiny feature dimension. The claims: any order of adds,
replacements, removals and retractions leaves the accumulators, the composed sums and the composed
digest bit-identical to a fresh ledger that only ever saw the remaining sites, and those sums are
the central statistics of the union of their examples; hostile statistics are refused with their
reason and change nothing; verify catches tampering; removal erases the stored bytes.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.ledger import Ledger, LedgerCorrupt, LedgerError, RejectedContribution
from tangent.exact_head.statistics import SufficientStats

P, K, CLIP, BITS = 5, 3, 2.0, 16
DIGEST = "feature-digest-for-tests"
SITES = ("site-a", "site-b", "site-c", "site-d")


def card(**changes) -> dict:
    c = {"stats-meta": SufficientStats.zeros(P, K, CLIP, BITS).meta(),
         "feature-spec": {"feature-pieces": "final_cls", "random-features": 0, "clip-norm": CLIP, "frac-bits": BITS},
         "model-spec": {"model": "tiny-for-tests"}, "feature-digest": DIGEST}
    c.update(changes)
    return c


def samples(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, P)) * 0.7, rng.integers(0, K, n)


def stats_of(phi: np.ndarray, labels: np.ndarray) -> SufficientStats:
    return SufficientStats.from_features(phi, labels, K, CLIP, BITS)


def site_stats(seed: int, n: int = 7) -> SufficientStats:
    return stats_of(*samples(seed, n))


def open_stats(path: Path, **kwargs) -> Ledger:
    return Ledger.open(path, family="stats", model_card=card(), **kwargs)


def add(ledger: Ledger, site: str, stats: SufficientStats, replace: bool = False, **meta):
    fn = ledger.replace if replace else ledger.add
    return fn(site, stats.to_arrays(), num_examples=stats.n, base_digest=DIGEST, **meta)


def accumulator_bytes(ledger: Ledger) -> dict[str, bytes]:
    with ledger.snapshot():
        return {r[0]: bytes(r[1]) for r in ledger._db.execute("SELECT name, data FROM accumulators")}


def state(ledger: Ledger) -> tuple:
    return (accumulator_bytes(ledger), {k: v.tobytes() for k, v in ledger.composed_arrays().items()},
            ledger.current_version().composed_sha256, ledger.settings()["total_weight"])


# ---------------------------------------------------------------------------------- exactness

OPS = st.lists(st.tuples(st.sampled_from(["add", "replace", "remove", "retract", "readmit"]),
                         st.sampled_from(SITES), st.integers(0, 2**16)), min_size=1, max_size=14)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_equals_a_fresh_ledger_of_the_remaining_sites(tmp_path_factory, ops):
    directory = tmp_path_factory.mktemp("stats")
    active: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    withdrawn: set[str] = set()
    with open_stats(directory / "ledger.sqlite") as ledger:
        for op, site, seed in ops:
            data = samples(seed, 3 + seed % 5)
            if op in ("add", "replace"):
                ok = (site not in withdrawn) and ((site in active) == (op == "replace"))
                if ok:
                    add(ledger, site, stats_of(*data), replace=op == "replace")
                    active[site] = data
                else:
                    with pytest.raises(RejectedContribution):
                        add(ledger, site, stats_of(*data), replace=op == "replace")
            elif op == "remove":
                assert ledger.remove(site, "test") == (site in active or site not in withdrawn)
                active.pop(site, None)
                withdrawn.add(site)
            elif op == "retract":
                assert ledger.retract(site, "test") == (site in active)
                active.pop(site, None)
            else:
                assert ledger.readmit(site, "test") == (site in withdrawn)
                withdrawn.discard(site)
        ledger.verify()
        got = state(ledger)
        composed = ledger.composed_stats()
    with open_stats(directory / "fresh.sqlite") as fresh:
        for site in sorted(active):
            add(fresh, site, stats_of(*active[site]))
        assert state(fresh) == got
    if not active:
        assert composed is None
        return
    assert composed == SufficientStats.total(stats_of(*d) for d in active.values())
    union = stats_of(np.concatenate([active[s][0] for s in active]), np.concatenate([active[s][1] for s in active]))
    assert composed == union


def test_composed_arrays_are_the_exact_int64_sums(tmp_path):
    a, b = site_stats(1), site_stats(2)
    with open_stats(tmp_path / "l.sqlite") as ledger:
        assert ledger.family == "stats" and ledger.model_card == card()
        assert ledger.composed_stats() is None
        add(ledger, "site-a", a)
        add(ledger, "site-b", b)
        composed = ledger.composed_arrays()
        assert all(v.dtype == np.int64 for v in composed.values())
        for name, value in (a + b).to_arrays().items():
            np.testing.assert_array_equal(composed[name], value)
        assert ledger.settings()["total_weight"] == 2  # weight 1 per site, whatever n


def test_negative_and_large_entries_round_trip_through_the_limbs(tmp_path):
    """Entries spanning both limbs and both signs (DP-released statistics may be negative)."""
    rng = np.random.default_rng(3)
    s = site_stats(4)
    big = SufficientStats(P, K, CLIP, BITS, s.n, s.counts, rng.integers(-2**40, 2**40, P),
                          rng.integers(-2**61, 2**61, P * (P + 1) // 2), rng.integers(-2**50, 2**50, (P, K)))
    with open_stats(tmp_path / "l.sqlite") as ledger:
        add(ledger, "site-a", big, epsilon=1.0, delta_dp=1e-6)
        add(ledger, "site-b", s)
        assert ledger.composed_stats() == big + s
        ledger.remove("site-a", "test")
        assert ledger.composed_stats() == s
        ledger.verify()


# ---------------------------------------------------------------------------------- retract

def test_retract_subtracts_without_withdrawing_and_is_audited(tmp_path):
    a = site_stats(5)
    with open_stats(tmp_path / "l.sqlite") as ledger:
        add(ledger, "site-a", a)
        add(ledger, "site-b", site_stats(6))
        assert ledger.retract("site-a", "samples forgotten") is True
        assert ledger.retract("site-a", "again") is False
        assert ledger.withdrawn_sites() == []
        assert ledger.current_version().event == "retract"
        assert ledger.audit_log()[-1]["action"] == "retract"
        assert ledger.composed_stats() == site_stats(6)
        add(ledger, "site-a", a)  # the same statistics again: not a duplicate, the site may re-add
        assert ledger.composed_stats() == a + site_stats(6)
        ledger.verify()
        with pytest.raises(ValueError):
            ledger.retract("site-a", "")


def test_retract_works_for_the_delta_family(tmp_path):
    d = {"w": np.full((3,), 0.25, np.float32)}
    with Ledger.open(tmp_path / "d.sqlite", family="delta") as ledger:
        ledger.add("site-a", d, 4)
        assert ledger.retract("site-a", "Δw cannot be recomputed") is True
        assert ledger.withdrawn_sites() == [] and ledger.contributions(status="active") == []
        assert ledger.family == "delta" and ledger.model_card is None
        ledger.verify()


# ---------------------------------------------------------------------------------- hostile input

def _hostile():
    s = site_stats(9)
    good = s.to_arrays()

    def edit(**changes):
        return {**good, **changes}

    gram_neg_diag = good["gram"].copy()
    gram_neg_diag[0] = -1
    cross_not_summing = good["cross"].copy()
    cross_not_summing[0, 0] += 1
    yield "float arrays", "wrong_dtype", {k: v.astype(np.float32) for k, v in good.items()}, s.n, {}
    yield "int32 counts", "wrong_dtype", edit(counts=good["counts"].astype(np.int32)), s.n, {}
    yield "missing gram", "missing_keys", {k: v for k, v in good.items() if k != "gram"}, s.n, {}
    yield "extra array", "extra_keys", edit(extra=np.zeros(2, np.int64)), s.n, {}
    yield "wrong shape", "wrong_shape", edit(sums=np.zeros(P + 1, np.int64)), s.n, {}
    yield "n mismatch", "stats_out_of_bounds", good, s.n + 1, {}
    yield "counts not summing", "stats_out_of_bounds", edit(counts=good["counts"] + 1), s.n, {}
    yield "negative count", "stats_out_of_bounds", edit(counts=np.array([s.n + 1, -1, 0], np.int64)), s.n, {}
    yield "sums beyond n·2^b", "stats_out_of_bounds", edit(sums=good["sums"] + s.n * 2**BITS + 1,
                                                          cross=good["cross"]), s.n, {}
    yield "gram beyond n·2^2b", "stats_out_of_bounds", edit(gram=good["gram"] + s.n * 4**BITS + 1), s.n, {}
    yield "negative Gram diagonal", "stats_out_of_bounds", edit(gram=gram_neg_diag), s.n, {}
    yield "labels not one-hot", "stats_inconsistent", edit(cross=cross_not_summing), s.n, {}
    yield "int64 min entry (DP)", "total_overflow", edit(gram=np.full_like(good["gram"], np.iinfo(np.int64).min)), s.n, {"epsilon": 1.0}
    yield "wrong feature digest", "base_digest_mismatch", good, s.n, {"base_digest": "other"}
    yield "not a mapping", "bad_structure", [1, 2], s.n, {}


@pytest.mark.parametrize("what, reason, arrays, n, meta", list(_hostile()), ids=[h[0] for h in _hostile()])
def test_hostile_statistics_are_refused_and_change_nothing(tmp_path, what, reason, arrays, n, meta):
    with open_stats(tmp_path / "l.sqlite") as ledger:
        add(ledger, "site-a", site_stats(1))
        before = (state(ledger), len(ledger.versions()), len(ledger.audit_log()))
        with pytest.raises(RejectedContribution) as e:
            ledger.add("site-b", arrays, num_examples=n, **{"base_digest": DIGEST, **meta})
        assert e.value.reason == reason, (what, e.value)
        assert (state(ledger), len(ledger.versions()), len(ledger.audit_log())) == before
        ledger.verify()


def test_sums_that_could_overflow_int64_are_refused_and_removal_never_overflows(tmp_path):
    """DP statistics are not bounded by n; the ledger admits them only while Σ max|entry| fits int64,
    so that removing any of them, in any order, leaves sums that still fit."""
    s = site_stats(2)
    half = 2**62
    big = lambda sign: SufficientStats(P, K, CLIP, BITS, s.n, s.counts, s.sums,  # noqa: E731
                                       np.full(P * (P + 1) // 2, sign * half, np.int64), s.cross)
    with open_stats(tmp_path / "l.sqlite") as ledger:
        add(ledger, "site-a", big(+1), epsilon=1.0)
        # a second +2^62 would make the sum 2^63: refused
        with pytest.raises(RejectedContribution) as e:
            add(ledger, "site-b", big(+1), epsilon=1.0)
        assert e.value.reason == "total_overflow"
        add(ledger, "site-b", SufficientStats(P, K, CLIP, BITS, s.n, s.counts, s.sums,
                                              np.full(P * (P + 1) // 2, -(half - 1), np.int64), s.cross), epsilon=1.0)
        # −2^62: Σ max|entry| would pass 2^63 − 1. The rule is conservative (it ignores signs) and
        # in exchange guarantees that every subset of the active sites sums within int64
        with pytest.raises(RejectedContribution) as e:
            add(ledger, "site-c", big(-1), epsilon=1.0)
        assert e.value.reason == "total_overflow"
        ledger.remove("site-a", "test")
        np.testing.assert_array_equal(ledger.composed_arrays()["gram"], -(half - 1))
        ledger.verify()


def test_opening_with_the_other_family_or_another_card_is_refused(tmp_path):
    stats_path, delta_path = tmp_path / "s.sqlite", tmp_path / "d.sqlite"
    open_stats(stats_path).close()
    Ledger.open(delta_path).close()
    with pytest.raises(LedgerError, match="'stats' ledger, not 'delta'"):
        Ledger.open(stats_path, family="delta")
    with pytest.raises(LedgerError, match="'delta' ledger, not 'stats'"):
        Ledger.open(delta_path, family="stats", model_card=card())
    with pytest.raises(LedgerError, match="another model card"):
        Ledger.open(stats_path, family="stats", model_card=card(**{"feature-digest": "other"}))
    other_meta = {**card()["stats-meta"], "num-features": P + 1}
    with pytest.raises(LedgerError, match="stats-meta"):
        Ledger.open(stats_path, model_card=card(**{"stats-meta": other_meta}))
    with pytest.raises(LedgerError, match="model_card"):
        Ledger.open(tmp_path / "new.sqlite", family="stats")
    with Ledger.open(stats_path) as ledger:  # family=None: whatever the file holds
        assert ledger.family == "stats"
        ledger.verify()
    with Ledger.open(delta_path) as ledger:
        assert ledger.family == "delta"
        with pytest.raises(RejectedContribution) as e:  # statistics sent to the Δ ledger
            ledger.add("site-a", site_stats(1).to_arrays(), 7)
        assert e.value.reason == "wrong_dtype"
        ledger.verify()


def test_a_ledger_without_family_meta_is_a_delta_ledger(tmp_path):
    """Ledgers written before families existed have no ``family`` entry and keep working."""
    path = tmp_path / "old.sqlite"
    with Ledger.open(path) as ledger:
        ledger.add("site-a", {"w": np.ones(3, np.float32)}, 2)
    db = sqlite3.connect(path)
    db.execute("DELETE FROM meta WHERE key = 'family'")
    db.commit()
    db.close()
    with Ledger.open(path, family="delta") as ledger:
        assert ledger.family == "delta"
        ledger.add("site-b", {"w": np.zeros(3, np.float32)}, 2)
        # the create entry's settings name family "delta": verify reports the edited meta table
        with pytest.raises(LedgerCorrupt, match="family"):
            ledger.verify()


# ---------------------------------------------------------------------------------- tampering, erasure

def _tamper(path: Path, sql: str, *args) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def test_verify_detects_a_tampered_stats_accumulator(tmp_path):
    path = tmp_path / "l.sqlite"
    with open_stats(path) as ledger:
        add(ledger, "site-a", site_stats(1))
        data = accumulator_bytes(ledger)["gram"]
    forged = bytearray(data)
    forged[-1] ^= 1
    _tamper(path, "UPDATE accumulators SET data = ? WHERE name = 'gram'", bytes(forged))
    with open_stats(path) as ledger, pytest.raises(LedgerCorrupt, match="accumulator 'gram'"):
        ledger.verify()


def test_verify_detects_a_tampered_stats_blob(tmp_path):
    path = tmp_path / "l.sqlite"
    with open_stats(path) as ledger:
        add(ledger, "site-a", site_stats(1))
        cid = ledger.contributions()[0].id
    forged = site_stats(2)
    import safetensors.numpy
    _tamper(path, "UPDATE deltas SET safetensors = ? WHERE contribution_id = ?",
            safetensors.numpy.save(forged.to_arrays()), cid)
    with open_stats(path) as ledger, pytest.raises(LedgerCorrupt, match="sha256"):
        ledger.verify()


def test_removed_statistics_are_in_no_file_of_the_ledger(tmp_path):
    path = tmp_path / "l.sqlite"
    rng = np.random.default_rng(11)
    # a distinctive site: its gram entries are large random integers, no other site has them
    s = site_stats(3)
    secret = SufficientStats(P, K, CLIP, BITS, s.n, s.counts, s.sums,
                             rng.integers(2**40, 2**41, P * (P + 1) // 2), s.cross)
    needle = secret.gram.astype("<i8").tobytes()
    chunks = [needle[i:i + 24] for i in range(0, len(needle) - 24, 8)]

    def hits() -> int:
        return sum(chunk in f.read_bytes() for f in tmp_path.iterdir() if f.is_file() for chunk in chunks)

    with open_stats(path) as ledger:
        add(ledger, "site-b", site_stats(4))
        add(ledger, "site-a", secret, epsilon=2.0)
        with sqlite3.connect(path) as db:  # the stored bytes are compressed (server/ledger/blobs.py)
            stored = dict(db.execute("SELECT site_id, safetensors FROM deltas JOIN contributions ON id = contribution_id"))
        # chunks of site-a's stored bytes that site-b's do not share (zlib codes the common
        # safetensors header alike)
        blob = bytes(stored["site-a"])
        chunks += [c for c in (blob[i:i + 24] for i in range(0, len(blob) - 24, 8)) if c not in bytes(stored["site-b"])]
        assert hits() > 0  # the stored blob holds it (the check can fail)
        ledger.remove("site-a", "withdrawn")
        assert hits() == 0
        ledger.verify()


# ---------------------------------------------------------------------------------- export, CLI

def _cli(*args: str):
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_every_taft_ledger_subcommand_works_on_a_stats_ledger(tmp_path):
    import json

    import safetensors.numpy

    from tangent.exact_head.statistics import solve

    path = tmp_path / "l.sqlite"
    with open_stats(path) as ledger:
        for i, site in enumerate(SITES[:3]):
            add(ledger, site, site_stats(20 + i, n=30))
        pem = tmp_path / "server.pub.pem"
        from server.ledger import audit
        pem.write_text(audit.public_key_pem(ledger.public_key()))
    L = ("--ledger", str(path))
    r = _cli(*L, "list")
    assert r.returncode == 0 and "stats ledger" in r.stdout and "site-a" in r.stdout, r.stderr
    assert _cli(*L, "show", "site-b").returncode == 0
    # changes go through the state's Δ ledger, which names its statistics ledger: the statistics
    # ledger alone is refused (a removal there would leave the site in the other family)
    r = _cli(*L, "remove", "site-b", "--reason", "withdrawn")
    assert r.returncode == 2 and "give the Δ ledger" in r.stderr, r.stdout + r.stderr
    from server.ledger.ledgers import link
    delta_path = tmp_path / "ledger.sqlite"
    with Ledger.open(delta_path) as delta, Ledger.open(path) as stats:
        link(delta, stats)
    D = ("--ledger", str(delta_path))
    r = _cli(*D, "retract", "site-c", "--reason", "forgotten samples")
    assert r.returncode == 0 and "retracted" in r.stdout, r.stderr
    assert _cli(*D, "remove", "site-b", "--reason", "withdrawn").returncode == 0
    assert _cli(*D, "readmit", "site-b", "--reason", "back").returncode == 0
    r = _cli(*L, "verify", "--public-key", str(pem))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    out = tmp_path / "export"
    r = _cli(*L, "export", "--out", str(out))
    assert r.returncode == 0 and "exact head" in r.stdout, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    head = safetensors.numpy.load_file(out / "exact_head.safetensors")
    expected = solve(site_stats(20, n=30))  # only site-a is still active
    np.testing.assert_array_equal(head["weight"], expected.weight.astype(np.float32))
    np.testing.assert_array_equal(head["bias"], expected.bias.astype(np.float32))
    assert head["weight"].shape == (P, K) and head["bias"].shape == (K,)
    assert manifest["lambda"] == expected.lam and manifest["n"] == 30 and manifest["model_card"] == card()
    assert manifest["privacy"]["site-c"]["contributions"] == 1 and manifest["model_version"] == 6
    r = _cli("verify-export", str(out), "--public-key", str(pem))
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
    assert _cli(*L, "verify", "--export", str(out)).returncode == 0

    # a swapped head (weights of another λ) and an edited λ are both caught
    forged = {"weight": head["weight"] * 2, "bias": head["bias"]}
    safetensors.numpy.save_file(forged, out / "exact_head.safetensors")
    r = _cli("verify-export", str(out), "--public-key", str(pem))
    assert r.returncode == 1 and "sha256 is not the signed one" in r.stdout
    safetensors.numpy.save_file(head, out / "exact_head.safetensors")
    (out / "manifest.json").write_text(json.dumps({**manifest, "lambda": 1.0}))
    r = _cli("verify-export", str(out), "--public-key", str(pem))
    assert r.returncode == 1 and "manifest differs" in r.stdout


def test_exporting_a_stats_ledger_without_active_sites_is_a_clear_error(tmp_path):
    path = tmp_path / "l.sqlite"
    open_stats(path).close()
    r = _cli("--ledger", str(path), "export", "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "no site is active" in r.stderr
