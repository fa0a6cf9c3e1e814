"""Hostile input at the ledger: whatever a site sends, the answer is a RejectedContribution with
a reason (or an acceptance), never another exception, and a rejection changes no file."""
from __future__ import annotations

import hashlib
import itertools
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.ledger import MAX_META_BYTES, MAX_META_DEPTH, Ledger, RejectedContribution
from tangent.protocol.limits import SITE_ID_PATTERN

SHAPES = {"head.weight": (3, 4), "head.bias": (3,)}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


_calls = itertools.count()


def good_delta(seed: int = 0) -> dict[str, np.ndarray]:
    """A valid Δ never sent before (the ledger refuses repeats as duplicates)."""
    rng = np.random.default_rng([seed, next(_calls)])
    return {k: (rng.standard_normal(s) * 1e-2).astype(np.float32) for k, s in SHAPES.items()}


@pytest.fixture(scope="module")
def ledger():
    with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "l.sqlite") as ledger:
        ledger.add("seed-site", good_delta(), 10)
        yield ledger


def file_digest(ledger: Ledger) -> tuple:
    return tuple(hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
                 for p in (ledger.path, Path(f"{ledger.path}-wal"), ledger.head_path))


def attempt(ledger: Ledger, site_id, delta, num_examples=10, **meta) -> str | None:
    """Add, then undo by removal + re-admission if it was accepted; returns the rejection reason."""
    before = file_digest(ledger)
    try:
        ledger.add(site_id, delta, num_examples, **meta)
    except RejectedContribution as e:
        assert file_digest(ledger) == before, "a rejection changed the ledger's files"
        return e.reason
    ledger.remove(site_id, reason="fuzz cleanup")
    ledger.readmit(site_id, reason="fuzz cleanup")
    return None


_site_ids = st.one_of(st.text(max_size=80), st.from_regex(SITE_ID_PATTERN, fullmatch=True),
                      st.binary(max_size=10), st.integers(), st.none(), st.floats(), st.lists(st.text(), max_size=2))


@pytest.mark.slow
@FUZZ
@given(site_id=_site_ids, seed=st.integers(0, 2 ** 32 - 1))
def test_any_site_id_is_accepted_only_if_it_follows_the_rule(ledger, site_id, seed):
    reason = attempt(ledger, site_id, good_delta(seed))
    valid = isinstance(site_id, str) and SITE_ID_PATTERN.fullmatch(site_id) is not None
    assert reason == (None if valid else "bad_site_id")


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(),
                  st.text(max_size=20), st.binary(max_size=5), st.sets(st.integers(), max_size=2),
                  st.complex_numbers(max_magnitude=1.0))
_json_ish = st.recursive(_leaf, lambda children: st.one_of(
    st.lists(children, max_size=4), st.tuples(children, children),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers(0, 9)), children, max_size=4)), max_leaves=30)


def _is_clean_json(value, depth: int = 1) -> bool:
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return abs(value) <= 2 ** 63 - 1
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return depth <= MAX_META_DEPTH and all(_is_clean_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth <= MAX_META_DEPTH and all(isinstance(k, str) and _is_clean_json(v, depth + 1)
                                              for k, v in value.items())
    return False


@pytest.mark.slow
@FUZZ
@given(train_config=_json_ish, extra=_json_ish, seed=st.integers(0, 2 ** 32 - 1))
def test_any_metadata_is_stored_only_when_it_is_small_clean_json(ledger, train_config, extra, seed):
    meta = {"train_config": {"c": train_config}, "extra": {"e": extra}}
    reason = attempt(ledger, "meta-site", good_delta(seed), **meta)
    clean = _is_clean_json(meta["train_config"]) and _is_clean_json(meta["extra"])
    assert reason == (None if clean else "bad_meta")


_numbers = st.one_of(st.none(), st.floats(), st.integers(-(2 ** 2000), 2 ** 2000), st.booleans(), st.text(max_size=3),
                     st.just(np.float64(0.5)), st.just(np.int64(-1)), st.just(np.float32("nan")))


@FUZZ
@given(epsilon=_numbers, delta_dp=_numbers)
def test_any_epsilon_and_delta_are_stored_only_when_finite_and_non_negative(ledger, epsilon, delta_dp):
    def ok(x):
        if x is None:
            return True
        if isinstance(x, (bool, str)):
            return False
        try:
            return math.isfinite(float(x)) and float(x) >= 0
        except OverflowError:
            return False
    reason = attempt(ledger, "eps-site", good_delta(), epsilon=epsilon, delta_dp=delta_dp)
    assert reason == (None if ok(epsilon) and ok(delta_dp) else "bad_meta")


@pytest.mark.slow
@settings(FUZZ, max_examples=60)
@given(name=st.one_of(st.text(max_size=40), st.just("__metadata__"), st.integers(), st.none()),
       seed=st.integers(0, 2 ** 32 - 1))
def test_any_tensor_name_is_accepted_or_rejected_with_a_reason(tmp_path, name, seed):
    with Ledger.open(tmp_path / f"names-{next(_calls)}.sqlite") as fresh:  # a fresh spec each time
        delta = {**good_delta(seed), name: np.zeros(2, np.float32)}
        reason = attempt(fresh, "names-site", delta)
    if name == "__metadata__":
        assert reason == "reserved_name"
    elif not isinstance(name, str) or not name:
        assert reason == "bad_structure"
    elif name in SHAPES:
        assert reason is None  # the same name twice in a dict is one entry
    else:
        assert reason in (None, "bad_structure")  # bad_structure: lone surrogates, not UTF-8


@FUZZ
@given(value=st.one_of(st.text(max_size=5), st.none(), st.integers(), st.lists(st.floats(), max_size=3),
                       st.just(np.array(["a"], dtype=object)), st.just(np.zeros(3, np.float64)),
                       st.just(torch.zeros(3).to_sparse()), st.just(torch.zeros(3, device="meta"))),
       num_examples=st.one_of(st.integers(-5, 2 ** 40), st.floats(), st.text(max_size=3), st.none()))
def test_any_tensor_value_or_example_count_is_rejected_with_a_reason(ledger, value, num_examples):
    delta = {**good_delta(), "head.bias": value}
    reason = attempt(ledger, "value-site", delta, num_examples)
    assert reason in ("bad_structure", "wrong_dtype", "bad_num_examples", "wrong_shape")


def test_bombs_are_refused_without_recursion_errors(ledger):
    deep: dict = {}
    node = deep
    for _ in range(100_000):
        node["x"] = {}
        node = node["x"]
    cyclic: dict = {}
    cyclic["self"] = cyclic
    wide = {"x": list(range(MAX_META_BYTES + 1))}
    for bomb in (deep, cyclic, wide, {"s": "é" * (MAX_META_BYTES // 2 + 1)}, {"n": 10 ** 5000}):
        assert attempt(ledger, "bomb-site", good_delta(), extra=bomb) == "bad_meta"
    assert attempt(ledger, "bomb-site", good_delta(), shard_fingerprint="x" * (MAX_META_BYTES + 1)) == "bad_meta"
    assert attempt(ledger, "bomb-site", good_delta(), base_digest=b"bytes") == "bad_meta"


def test_metadata_at_the_limits_is_accepted(ledger):
    nested: dict = {"leaf": 1}
    for _ in range(MAX_META_DEPTH - 1):
        nested = {"x": nested}
    assert attempt(ledger, "limit-site", good_delta(1), extra=nested) is None
    assert attempt(ledger, "limit-site", good_delta(2), extra={"x": nested}) == "bad_meta"
    assert attempt(ledger, "limit-site", good_delta(3), train_config={"s": "a" * (MAX_META_BYTES - 100)}) is None
    ledger.verify()


def _swap_stored_blob(path: Path, site_id: str, blob: bytes) -> None:
    """A state-directory writer replaces a site's stored Δ bytes (plain SQLite, no key needed)."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("UPDATE deltas SET safetensors = ? WHERE contribution_id = "
                   "(SELECT id FROM contributions WHERE site_id = ? AND status = 'active')", (blob, site_id))
    finally:
        db.close()


@pytest.mark.parametrize("replacement", ["zeros", "bomb"])
def test_a_stored_delta_that_is_not_the_recorded_one_is_never_decoded_or_subtracted(tmp_path, replacement):
    """Swapped for zeros, the removal would subtract nothing and erase the evidence, leaving the site
    in the model; swapped for a zlib bomb, reading it would inflate it. Both are refused by digest,
    before decoding."""
    import safetensors.numpy

    from server.ledger import LedgerError, blobs

    path = tmp_path / "l.sqlite"
    with Ledger.open(path) as ledger:
        ledger.add("a", good_delta(1), 10)
        ledger.add("b", good_delta(2), 10)
        before = {k: v.clone() for k, v in ledger.composed_delta().items()}
    zeros = {k: np.zeros_like(v) for k, v in good_delta(1).items()}
    blob = blobs.pack(safetensors.numpy.save(zeros)) if replacement == "zeros" else \
        blobs.PREFIX + zlib_bomb()
    _swap_stored_blob(path, "a", blob)
    with Ledger.open(path, create=False) as ledger:
        (c,) = ledger.contributions(site_id="a", status="active")
        with pytest.raises(LedgerError, match="digest"):
            ledger.contribution_delta(c.id)
        with pytest.raises(LedgerError, match="digest"):
            ledger.remove("a", reason="consent withdrawn")
        assert [s.site_id for s in ledger.contributions(status="active")] == ["a", "b"]
        assert all(torch.equal(before[k], v) for k, v in ledger.composed_delta().items())


def zlib_bomb() -> bytes:
    """Compressed bytes that inflate to 64 MiB of zeros (a real bomb would be GiBs: same shape)."""
    import zlib

    inflater = zlib.compressobj(9)
    chunk = bytes(1 << 20)
    return b"".join(inflater.compress(chunk) for _ in range(64)) + inflater.flush()
