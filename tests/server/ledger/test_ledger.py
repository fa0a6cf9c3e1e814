"""Ledger: exact, order-independent sums, exact removal, rejection of bad input, tamper evidence."""
from __future__ import annotations

import hashlib
import math
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.ledger import fixedpoint
from server.ledger import (
    MAX_NUM_EXAMPLES, REASONS, SCHEMA_VERSION, Ledger, LedgerCorrupt, LedgerError, RejectedContribution,
)

SHAPES = {"blocks.11.attn.qkv.weight": (6, 2), "blocks.11.attn.qkv.bias": (6,), "head.weight": (3, 2)}
BASE = "base-digest-0"


@contextmanager
def fresh_ledger(**kwargs):
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "ledger.sqlite", **kwargs) as ledger:
        yield ledger


def stored_accumulators(ledger: Ledger) -> dict[str, bytes]:
    """The accumulator bytes exactly as they are in the file, read through a separate connection."""
    with sqlite3.connect(ledger.path) as db:
        rows = dict(db.execute("SELECT name, data FROM accumulators"))
        total = db.execute("SELECT value FROM meta WHERE key = 'total_weight'").fetchone()[0]
    return {**rows, "total_weight": total}


def composed_bytes(ledger: Ledger) -> dict[str, bytes]:
    return {k: v.numpy().tobytes() for k, v in ledger.composed_delta().items()}


def random_delta(rng: np.random.Generator, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy((rng.standard_normal(s) * scale).astype(np.float32)) for k, s in SHAPES.items()}


# Values that stress the grid: exact grid points, half-way ties, sub-grid, the range limits.
_edge = st.sampled_from([0.0, -0.0, 2.0 ** -33, -(2.0 ** -33), 3 * 2.0 ** -33, 2.0 ** -40, 1e-3, -1e-3,
                         0.1, -0.7, 255.99998, -256.0, 256.0])
_value = st.one_of(_edge, st.floats(-256.0, 256.0, allow_nan=False, width=32))


@st.composite
def contribution(draw):
    delta = {k: torch.tensor(draw(st.lists(_value, min_size=math.prod(s), max_size=math.prod(s))),
                             dtype=torch.float32).reshape(s) for k, s in SHAPES.items()}
    n = draw(st.one_of(st.integers(1, 1000), st.just(MAX_NUM_EXAMPLES)))
    return delta, n


def distinct(contribs):
    """Drop repeats of the same Δ (the ledger rightly refuses them as duplicates)."""
    seen, out = set(), []
    for delta, n in contribs:
        key = b"".join(v.numpy().tobytes() for v in delta.values())
        if key not in seen:
            seen.add(key)
            out.append((delta, n))
    return out


contributions = st.lists(contribution(), min_size=1, max_size=5).map(distinct)
FAST = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------------- exactness
@FAST
@given(contributions, st.randoms(use_true_random=False), st.sampled_from(["examples", "uniform"]))
def test_any_arrival_order_gives_identical_bytes(contribs, random, weighting):
    order = list(range(len(contribs)))
    random.shuffle(order)
    with fresh_ledger(weighting=weighting) as a, fresh_ledger(weighting=weighting) as b:
        for i, (delta, n) in enumerate(contribs):
            a.add(f"site-{i}", delta, n)
        for i in order:
            b.add(f"site-{i}", *contribs[i])
        assert stored_accumulators(a) == stored_accumulators(b)
        assert composed_bytes(a) == composed_bytes(b)
        assert a.current_version().composed_sha256 == b.current_version().composed_sha256


@pytest.mark.slow
@FAST
@given(contributions.filter(lambda c: len(c) >= 2), st.data())
def test_add_then_remove_any_subset_equals_never_added(contribs, data):
    removed = data.draw(st.sets(st.integers(0, len(contribs) - 1), max_size=len(contribs) - 1), label="removed")
    add_order = data.draw(st.permutations(range(len(contribs))), label="add order")
    remove_order = data.draw(st.permutations(sorted(removed)), label="remove order")
    with fresh_ledger() as a, fresh_ledger() as b:
        for i in add_order:
            a.add(f"site-{i}", *contribs[i])
        for i in remove_order:
            assert a.remove(f"site-{i}", reason="test")
        for i in range(len(contribs)):
            if i not in removed:
                b.add(f"site-{i}", *contribs[i])
        assert stored_accumulators(a) == stored_accumulators(b)
        assert composed_bytes(a) == composed_bytes(b)
        a.verify()


@pytest.mark.slow
@FAST
@given(contributions.filter(lambda c: len(c) >= 2))
def test_replace_equals_adding_the_new_contribution_only(contribs):
    *others, (new_delta, new_n) = contribs
    with fresh_ledger() as a, fresh_ledger() as b:
        for i, c in enumerate(others):
            a.add(f"site-{i}", *c)
        a.replace("site-0", new_delta, new_n)
        b.add("site-0", new_delta, new_n)
        for i, c in enumerate(others[1:], start=1):
            b.add(f"site-{i}", *c)
        assert stored_accumulators(a) == stored_accumulators(b)
        assert composed_bytes(a) == composed_bytes(b)


@FAST
@given(contributions)
def test_composed_is_within_the_documented_error_bound(contribs):
    with fresh_ledger() as ledger:
        for i, c in enumerate(contribs):
            ledger.add(f"site-{i}", *c)
        composed = ledger.composed_delta()
    weights = np.array([n for _, n in contribs], dtype=np.float64)
    for name in SHAPES:
        exact = sum(w * d[name].double().numpy() for (d, _), w in zip(contribs, weights)) / weights.sum()
        bound = 2.0 ** -33 + 2.0 ** -24 * np.abs(exact) + 1e-15
        assert composed[name].dtype == torch.float32
        assert np.all(np.abs(composed[name].double().numpy() - exact) <= bound)


def test_accumulators_do_not_overflow_at_the_documented_bounds():
    """Many contributions at the extreme value and weight: the integer sum stays exact."""
    x = np.array([fixedpoint.MAX_ABS_VALUE, -fixedpoint.MAX_ABS_VALUE, 255.99998, -255.99998,
                  3 * 2.0 ** -32, -(2.0 ** -33), -1e-3], dtype=np.float32)
    hi, lo = fixedpoint.zeros(x.size)
    q_hi, q_lo = fixedpoint.quantize(x)
    q = [round(float(v) * 2 ** 32) for v in x]  # Python ints: exact; round() also ties to even
    assert [int(h) * 2 ** 32 + int(l) for h, l in zip(q_hi, q_lo)] == q
    for _ in range(300):  # 300 · 2**24 · q_lo far exceeds 2**63 without the carry
        fixedpoint.accumulate(hi, lo, q_hi, q_lo, fixedpoint.MAX_WEIGHT)
    exact = [300 * fixedpoint.MAX_WEIGHT * v for v in q]
    assert [int(h) * 2 ** 32 + int(l) for h, l in zip(hi, lo)] == exact
    assert (0 <= lo).all() and (lo < 2 ** 32).all()
    for _ in range(300):
        fixedpoint.accumulate(hi, lo, q_hi, q_lo, -fixedpoint.MAX_WEIGHT)
    assert not hi.any() and not lo.any()
    # The documented worst case for hi, |hi| <= MAX_TOTAL_WEIGHT * 2**8 + 1, fits int64.
    assert fixedpoint.MAX_TOTAL_WEIGHT * 2 ** fixedpoint.RANGE_BITS + 1 < 2 ** 63


def test_removal_is_bit_identical_to_never_including_with_realistic_tensors(tmp_path):
    rng = np.random.default_rng(0)
    deltas = [random_delta(rng) for _ in range(4)]
    with Ledger.open(tmp_path / "a.sqlite") as a, Ledger.open(tmp_path / "b.sqlite") as b:
        for i, d in enumerate(deltas):
            a.add(f"site-{i}", d, 100 + i, epsilon=1.0 + i, base_digest=BASE)
        before = composed_bytes(a)
        assert a.remove("site-2", reason="withdrew consent") is True
        for i in (0, 1, 3):
            b.add(f"site-{i}", deltas[i], 100 + i, epsilon=1.0 + i, base_digest=BASE)
        assert composed_bytes(a) == composed_bytes(b) != before
        assert a.current_version().composed_sha256 == b.current_version().composed_sha256
        assert a.max_epsilon() == 4.0
        a.verify()


# ---------------------------------------------------------------------------------- behaviour
def test_remove_is_idempotent(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("a", random_delta(np.random.default_rng(1)), 5)
        assert ledger.remove("a", reason="x") is True
        versions, audit = len(ledger.versions()), len(ledger.audit_log())
        assert ledger.remove("a", reason="x") is False
        assert (len(ledger.versions()), len(ledger.audit_log())) == (versions, audit)
        (c,) = ledger.contributions(site_id="a")
        assert (c.status, c.end_reason) == ("removed", "x")
        # a site never seen is still withdrawn (audited, model unchanged), once
        assert ledger.remove("never-seen", reason="x") is True
        assert ledger.current_version().event == "withdraw"
        assert ledger.current_version().composed_sha256 == ledger.versions()[-2].composed_sha256
        versions, audit = len(ledger.versions()), len(ledger.audit_log())
        assert ledger.remove("never-seen", reason="x") is False
        assert (len(ledger.versions()), len(ledger.audit_log())) == (versions, audit)
        assert ledger.withdrawn_sites() == ["a", "never-seen"]
        ledger.verify()


def test_second_add_needs_replace_and_replace_needs_an_active_site(tmp_path):
    rng = np.random.default_rng(2)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("a", random_delta(rng), 5)
        with pytest.raises(RejectedContribution) as e:
            ledger.add("a", random_delta(rng), 5)
        assert e.value.reason == "site_active"
        with pytest.raises(RejectedContribution) as e:
            ledger.replace("b", random_delta(rng), 5)
        assert e.value.reason == "not_active"
        v = ledger.replace("a", random_delta(rng), 7)
        assert v.event == "replace" and v.total_weight == 7
        old, new = ledger.contributions(site_id="a")
        assert (old.status, new.status, new.version) == ("replaced", "active", 2)
        ledger.remove("a", reason="gone")
        with pytest.raises(RejectedContribution) as e:  # a withdrawal sticks …
            ledger.add("a", random_delta(rng), 3)
        assert e.value.reason == "site_withdrawn"
        assert ledger.readmit("a", reason="asked to rejoin")  # … until the operator re-admits the site
        ledger.add("a", random_delta(rng), 3)
        assert [c.status for c in ledger.contributions(site_id="a")] == ["replaced", "removed", "active"]
        ledger.verify()


def test_state_survives_reopening_and_settings_are_fixed(tmp_path):
    path = tmp_path / "l.sqlite"
    rng = np.random.default_rng(3)
    with Ledger.open(path, weighting="uniform") as ledger:
        ledger.add("a", random_delta(rng), 5, base_digest=BASE, dp_settings={"noise": 1.1},
                   train_config={"epochs": 2}, shard_fingerprint="fp-a", epsilon=2.5, delta_dp=1e-5)
        composed = composed_bytes(ledger)
    with Ledger.open(path) as ledger:
        assert composed_bytes(ledger) == composed
        (c,) = ledger.contributions()
        assert (c.weight, c.dp_settings, c.train_config, c.epsilon, c.delta_dp) == (1, {"noise": 1.1}, {"epochs": 2}, 2.5, 1e-5)
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert ledger.settings()["key_spec"] == {k: list(s) for k, s in SHAPES.items()}
    with pytest.raises(LedgerError):
        Ledger.open(path, weighting="examples")
    with pytest.raises(LedgerError):
        Ledger.open(path, expected_base_digest="another-base")
    with pytest.raises(LedgerError):
        Ledger.open(tmp_path / "absent.sqlite", create=False)


def test_uniform_weighting_is_a_plain_mean(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite", weighting="uniform") as ledger:
        ledger.add("a", {"w": torch.tensor([1.0, 2.0])}, 10)
        ledger.add("b", {"w": torch.tensor([3.0, 0.0])}, 1000)
        assert ledger.composed_delta()["w"].tolist() == [2.0, 1.0]


def test_max_epsilon_counts_non_private_contributions_as_unbounded(tmp_path):
    rng = np.random.default_rng(4)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        assert ledger.max_epsilon() is None
        ledger.add("a", random_delta(rng), 5, epsilon=3.0)
        ledger.add("b", random_delta(rng), 5, epsilon=8.0)
        assert ledger.max_epsilon() == 8.0
        ledger.add("c", random_delta(rng), 5)
        assert ledger.max_epsilon() == math.inf
        ledger.remove("c", reason="x")
        ledger.remove("b", reason="x")
        assert ledger.max_epsilon() == 3.0


def test_removed_delta_bytes_are_erased_but_the_digest_stays(tmp_path):
    rng = np.random.default_rng(5)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("a", random_delta(rng), 5)
        ledger.remove("a", reason="right to erasure")
        db = sqlite3.connect(ledger.path)
        assert db.execute("SELECT count(*) FROM deltas").fetchone()[0] == 0
        assert len(db.execute("SELECT delta_sha256 FROM contributions").fetchone()[0]) == 64


# ---------------------------------------------------------------------------------- bad input
def _malformations(rng_seed: int):
    """(description, reason, site_id, delta, num_examples, meta) for every kind of bad reply."""
    rng = np.random.default_rng(rng_seed)
    good = random_delta(rng)
    name = list(SHAPES)[rng_seed % len(SHAPES)]

    def edit(**changes):
        d = {k: v.clone() for k, v in good.items()}
        d.update(changes)
        return d

    def poke(value):
        t = good[name].clone()
        t.view(-1)[rng.integers(t.numel())] = value
        return edit(**{name: t})

    wrong_shape = tuple(s + 1 for s in SHAPES[name])
    big = (rng.random() * 1e6 + 257.0) * rng.choice([-1, 1])
    return [
        ("nan", "non_finite", "site-new", poke(float("nan")), 10, {}),
        ("inf", "non_finite", "site-new", poke(float(rng.choice([np.inf, -np.inf]))), 10, {}),
        ("missing key", "missing_keys", "site-new", {k: v for k, v in good.items() if k != name}, 10, {}),
        ("extra key", "extra_keys", "site-new", edit(**{"blocks.0.extra": torch.zeros(3)}), 10, {}),
        ("wrong shape", "wrong_shape", "site-new", edit(**{name: torch.zeros(wrong_shape)}), 10, {}),
        ("transposed", "wrong_shape", "site-new", edit(**{"head.weight": good["head.weight"].T.contiguous()}), 10, {}),
        ("float64", "wrong_dtype", "site-new", edit(**{name: good[name].double()}), 10, {}),
        ("bfloat16", "wrong_dtype", "site-new", edit(**{name: good[name].bfloat16()}), 10, {}),
        ("float16 numpy", "wrong_dtype", "site-new", edit(**{name: good[name].numpy().astype(np.float16)}), 10, {}),
        ("int tensor", "wrong_dtype", "site-new", edit(**{name: good[name].int()}), 10, {}),
        ("list", "bad_structure", "site-new", edit(**{name: good[name].tolist()}), 10, {}),
        ("empty", "bad_structure", "site-new", {}, 10, {}),
        ("not a mapping", "bad_structure", "site-new", [good[name]], 10, {}),
        ("norm", "norm_too_large", "site-new", {k: torch.full_like(v, 10.0 + rng.random()) for k, v in good.items()}, 10, {}),
        ("range", "out_of_range", "site-new", poke(big), 10, {}),
        ("zero examples", "bad_num_examples", "site-new", good, 0, {}),
        ("negative examples", "bad_num_examples", "site-new", good, -int(rng.integers(1, 1000)), {}),
        ("absurd examples", "bad_num_examples", "site-new", good, MAX_NUM_EXAMPLES + 1 + int(rng.integers(1000)), {}),
        ("float examples", "bad_num_examples", "site-new", good, 12.5, {}),
        ("bool examples", "bad_num_examples", "site-new", good, True, {}),
        ("other base", "base_digest_mismatch", "site-new", good, 10, {"base_digest": "another-base"}),
        ("no base", "base_digest_mismatch", "site-new", good, 10, {"base_digest": None}),
        ("unknown site", "unknown_site", "intruder", good, 10, {}),
        ("empty site", "bad_site_id", "", good, 10, {}),
        ("non-ASCII digit site", "bad_site_id", "\u0663", good, 10, {}),
        ("site id with a slash", "bad_site_id", "../site-a", good, 10, {}),
        ("int site id", "bad_site_id", 3, good, 10, {}),
        ("overlong site id", "bad_site_id", "s" * 65, good, 10, {}),
        ("negative epsilon", "bad_meta", "site-new", good, 10, {"epsilon": -1.0}),
        ("nan epsilon", "bad_meta", "site-new", good, 10, {"epsilon": float("nan")}),
        ("nested bomb", "bad_meta", "site-new", good, 10, {"extra": _nested(9)}),
        ("huge metadata", "bad_meta", "site-new", good, 10, {"train_config": {"x": "a" * 70_000}}),
        ("huge int", "bad_meta", "site-new", good, 10, {"train_config": {"seed": 10 ** 5000}}),
        ("inf in metadata", "bad_meta", "site-new", good, 10, {"dp_settings": {"sigma": float("inf")}}),
        ("reserved name", "reserved_name", "site-new", edit(**{"__metadata__": torch.zeros(1)}), 10, {}),
        ("active site", "site_active", "site-a", good, 10, {}),
        ("withdrawn site", "site_withdrawn", "site-c", good, 10, {}),
    ]


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


@pytest.fixture
def populated(tmp_path):
    """A ledger holding two active contributions and one removed one, with a strict policy."""
    rng = np.random.default_rng(100)
    deltas = {s: random_delta(rng) for s in ("site-a", "site-b", "site-c")}
    known = {"site-a", "site-b", "site-c", "site-new"}
    with Ledger.open(tmp_path / "l.sqlite", max_delta_norm=5.0, known_sites=known, expected_base_digest=BASE) as ledger:
        for site, d in deltas.items():
            ledger.add(site, d, 50, base_digest=BASE, epsilon=1.0)
        ledger.remove("site-c", reason="withdrawn")
        yield ledger, deltas


def file_state(ledger: Ledger) -> tuple:
    """Everything the ledger file says: raw bytes of the database and its WAL, and a logical dump."""
    raw = tuple(hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
                for p in (ledger.path, Path(f"{ledger.path}-wal"), ledger.head_path))
    with sqlite3.connect(ledger.path) as db:
        dump = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
    return raw, dump


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 32 - 1), pick=st.integers(0, 10 ** 6))
def test_fuzz_malformed_replies_are_rejected_and_change_nothing(populated, seed, pick):
    ledger, _ = populated
    cases = _malformations(seed)
    what, reason, site, delta, n, meta = cases[pick % len(cases)]
    meta = {"base_digest": BASE, **meta}
    before = file_state(ledger)
    with pytest.raises(RejectedContribution) as e:
        ledger.add(site, delta, n, **meta)
    assert e.value.reason == reason, what
    if reason != "site_active":  # the same checks guard the swap of an active site's contribution
        with pytest.raises(RejectedContribution) as e:
            ledger.replace("site-a" if site == "site-new" else site, delta, n, **meta)
        assert e.value.reason == reason, what
    assert file_state(ledger) == before


def test_every_malformation_kind_is_rejected_with_its_reason(populated):
    """The deterministic sweep behind the fuzz test: each kind once, the file never changes."""
    ledger, _ = populated
    before = file_state(ledger)
    seen = set()
    for what, reason, site, delta, n, meta in _malformations(7):
        with pytest.raises(RejectedContribution) as e:
            ledger.add(site, delta, n, **{"base_digest": BASE, **meta})
        assert e.value.reason == reason, what
        seen.add(reason)
    assert file_state(ledger) == before
    # the stats family's own reasons are swept in tests/server/ledger/test_ledger_stats.py
    assert seen == REASONS - {"duplicate", "not_active", "total_weight_overflow", "stats_out_of_bounds", "stats_inconsistent",
                              "total_overflow"}


def test_duplicates_are_rejected_even_after_removal(populated):
    ledger, deltas = populated
    before = file_state(ledger)
    for sent in ("site-a", "site-c"):  # an active contribution, and a removed one replayed
        for method, site in ((ledger.add, "site-new"), (ledger.replace, "site-b")):
            with pytest.raises(RejectedContribution) as e:
                method(site, deltas[sent], 50, base_digest=BASE)
            assert e.value.reason == "duplicate"
    assert file_state(ledger) == before
    ledger.verify()


def test_keys_follow_an_expected_spec_when_given(tmp_path):
    spec = {k: s for k, s in SHAPES.items()}
    with Ledger.open(tmp_path / "l.sqlite", expected_spec=spec) as ledger:
        d = random_delta(np.random.default_rng(6))
        with pytest.raises(RejectedContribution) as e:
            ledger.add("a", {k: v for k, v in d.items() if k != "head.weight"}, 5)
        assert e.value.reason == "missing_keys"
        assert len(ledger.versions()) == 1
        ledger.add("a", d, 5)


# ---------------------------------------------------------------------------------- tampering
TAMPERS = {
    "audit payload": ["DROP TRIGGER audit_no_update",
                      "UPDATE audit SET payload = replace(payload, '\"reason\":\"x\"', '\"reason\":\"y\"') WHERE action = 'remove'"],
    "audit entry deleted": ["DROP TRIGGER audit_no_delete", "DELETE FROM audit WHERE seq = 2"],
    "audit timestamp": ["DROP TRIGGER audit_no_update", "UPDATE audit SET at = '2000-01-01' WHERE seq = 3"],
    "num_examples": ["UPDATE contributions SET num_examples = num_examples + 1 WHERE site_id = 'b'"],
    "num_examples and weight": ["UPDATE contributions SET num_examples = 7, weight = 7 WHERE site_id = 'b'"],
    "epsilon": ["UPDATE contributions SET epsilon = 0.1 WHERE site_id = 'b'"],
    "status": ["UPDATE contributions SET status = 'removed' WHERE site_id = 'c'"],
    "delta bytes": ["UPDATE deltas SET safetensors = zeroblob(length(safetensors)) WHERE contribution_id = 2"],
    "delta bytes deleted": ["DELETE FROM deltas WHERE contribution_id = 2"],
    "removed delta kept": ["INSERT INTO deltas SELECT 4, safetensors FROM deltas WHERE contribution_id = 1"],
    "delta bytes and sha": ["UPDATE contributions SET delta_sha256 = 'x' || substr(delta_sha256, 2) WHERE site_id = 'b'"],
    "accumulator": ["UPDATE accumulators SET data = ? WHERE name = 'head.weight'"],
    "total weight": ["UPDATE meta SET value = '1' WHERE key = 'total_weight'"],
    "version digest": ["DROP TRIGGER model_versions_no_update",
                       "UPDATE model_versions SET composed_sha256 = 'f' || substr(composed_sha256, 2) WHERE version = 2"],
    "signature swapped": ["DROP TRIGGER signed_heads_no_update",
                          "UPDATE signed_heads SET signature = (SELECT signature FROM signed_heads WHERE version = 1) "
                          "WHERE version = 2"],
    "signed head deleted": ["DROP TRIGGER signed_heads_no_delete", "DELETE FROM signed_heads WHERE version = 2"],
    "signing key replaced": ["UPDATE meta SET value = '\"x\"' WHERE key = 'signing_public_key'"],
    "withdrawn flag": ["UPDATE sites SET withdrawn = 0 WHERE site_id = 'd'"],
    "contribution deleted": ["UPDATE contributions SET status = 'removed' WHERE site_id = 'a'",
                             "DELETE FROM contributions WHERE site_id = 'a'"],
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_raw_sqlite_edits_make_verify_fail(tmp_path, tamper):
    rng = np.random.default_rng(8)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        for site in "abcd":
            ledger.add(site, random_delta(rng), 10)
        ledger.remove("d", reason="x")
        ledger.verify()
        with sqlite3.connect(ledger.path) as db:
            for sql in TAMPERS[tamper]:
                args = ()
                if "?" in sql:  # flip one bit of the stored accumulator
                    data = bytearray(db.execute("SELECT data FROM accumulators WHERE name = 'head.weight'").fetchone()[0])
                    data[11] ^= 1
                    args = (bytes(data),)
                assert db.execute(sql, args).rowcount != 0 or sql.startswith("DROP"), sql
        with pytest.raises(LedgerCorrupt) as e:
            ledger.verify()
        assert e.value.problems


def test_audit_log_is_append_only_for_ordinary_sql(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("a", random_delta(np.random.default_rng(9)), 10)
    with sqlite3.connect(tmp_path / "l.sqlite") as db:
        for sql in ("UPDATE audit SET action = 'x'", "DELETE FROM audit", "DELETE FROM model_versions"):
            with pytest.raises(sqlite3.IntegrityError):
                db.execute(sql)


def test_unknown_metadata_is_a_programming_error(tmp_path):
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(TypeError, match="unknown contribution metadata"):
            ledger.add("a", random_delta(np.random.default_rng(10)), 5, epsilon_typo=1.0)
        assert len(ledger.versions()) == 1


def test_contribution_delta_reads_back_exactly_and_only_active(tmp_path):
    import numpy as np
    from server.ledger import Ledger
    rng = np.random.default_rng(5)
    delta = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        ledger.add("a", delta, 7)
        (contribution,) = ledger.contributions(status="active")
        stored = ledger.contribution_delta(contribution.id)
        assert all(stored[k].tobytes() == delta[k].tobytes() for k in delta)
        ledger.remove("a", reason="test")
        with pytest.raises(KeyError):
            ledger.contribution_delta(contribution.id)


def test_a_ledger_of_the_previous_schema_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # what schema 1 left: tables, user_version 1, no signed heads
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
        db.execute("PRAGMA user_version = 1")
    with pytest.raises(LedgerError, match="schema version 1; this code reads version 2"):
        Ledger.open(path)
    assert not Path(f"{path}.signing-key.pem").exists()  # no key is made up for an existing file


def test_the_sites_know_the_ledgers_range():
    """The guard at a site keeps its Δ inside tangent.protocol.limits.MAX_DELTA_VALUE: it must be
    the range the ledger refuses beyond."""
    from tangent.protocol.limits import MAX_DELTA_VALUE

    assert fixedpoint.MAX_ABS_VALUE == MAX_DELTA_VALUE


def test_a_delta_zero_outside_its_head_is_stored_small_read_back_exactly_and_summed_as_dense(tmp_path):
    """A 60-image site's Δ is non-zero only in the head: its all-zero tensors are named in the
    stored header instead of stored, and skipped by the sums. What is read back is every tensor bit
    for bit (a -0.0 tensor is kept as it is), and the sums, in memory and in the file, are those of
    dense adds, also after a removal."""
    import safetensors.numpy

    from server.ledger import Accumulators, blobs
    from server.ledger.families import DeltaFamily

    shapes = {"blocks.11.mlp.fc1.weight": (1536, 384), "head.weight": (10, 384), "norm.bias": (384,)}
    rng = np.random.default_rng(0)
    deltas = [{"blocks.11.mlp.fc1.weight": np.zeros(shapes["blocks.11.mlp.fc1.weight"], np.float32),
               "head.weight": (rng.standard_normal(shapes["head.weight"]) * 1e-2).astype(np.float32),
               "norm.bias": np.full(shapes["norm.bias"], -0.0 if i == 0 else 0.5 * i, np.float32)}
              for i in range(3)]
    dense = Accumulators.zeros(shapes)
    with Ledger.open(tmp_path / "l.sqlite") as ledger:
        for i, delta in enumerate(deltas):
            ledger.add(f"site-{i}", delta, 60)
            dense.add_arrays(delta, 60)
        with sqlite3.connect(ledger.path) as db:
            stored = [safetensors.numpy.load(blobs.unpack(b)) for (b,) in db.execute("SELECT safetensors FROM deltas")]
        assert all("blocks.11.mlp.fc1.weight" not in arrays for arrays in stored)
        assert ["norm.bias" in arrays for arrays in stored] == [True] * 3  # -0.0 is stored as it is
        for c, delta in zip(ledger.contributions(status="active"), deltas):
            back = ledger.contribution_delta(c.id)
            assert {k: v.tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in delta.items()}
        assert {k: v for k, v in stored_accumulators(ledger).items() if k != "total_weight"} == dense.encoded()
        ledger.remove("site-1", reason="test")
        dense.add_arrays(deltas[1], -60)
        assert {k: v for k, v in stored_accumulators(ledger).items() if k != "total_weight"} == dense.encoded()
        ledger.verify()
    ones = {"w": np.ones(3, np.float32)}
    assert DeltaFamily().decode(DeltaFamily().encode(ones, "s", 1))["w"].tobytes() == ones["w"].tobytes()


def test_a_stored_delta_whose_header_names_a_huge_zero_tensor_is_refused_before_any_allocation():
    """The header is read back from the file: a zero tensor of 2^40 entries must not be allocated."""
    import json

    import safetensors.numpy

    from server.ledger import blobs
    from server.ledger.families import ZERO_TENSORS_KEY, DeltaFamily

    head = {"head.weight": np.ones((2, 2), np.float32)}
    for header in ({"blocks.0.w": [2 ** 20, 2 ** 20]}, {"head.weight": [2, 2]}, {"w": [-1]}, {"w": "3"}, [1]):
        blob = blobs.pack(safetensors.numpy.save(head, metadata={ZERO_TENSORS_KEY: json.dumps(header)}))
        with pytest.raises(ValueError):
            DeltaFamily().decode(blob)
