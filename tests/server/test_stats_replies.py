"""Exact-head statistics in a train reply: every refusal reason, with real Flower
messages through Flower's serialization, and the valid form decoded bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from server.replies import Rejected, parse_train_reply
from tests.server.exact_head_replies import (BASE, EXPECT, FEATURE_DIGEST, K, P, build, delta, npy, reply_parts,
                                             site_stats, stats_parts)

pytestmark = pytest.mark.usefixtures("flower_server_identity")


def parse(parts: dict, expected=EXPECT, require_dp: bool = False):
    return parse_train_reply(build(parts, 7), BASE, stats=expected, require_dp=require_dp)


def refused(parts: dict, expected=EXPECT) -> Rejected:
    with pytest.raises(Rejected) as err:
        parse(parts, expected)
    return err.value


def test_valid_statistics_are_decoded_bit_for_bit():
    stats = site_stats(1, 40)
    contribution = parse(reply_parts("3", delta(1), 40, stats=stats))
    assert contribution.stats == stats and contribution.stats.dp is None
    assert contribution.feature_digest == FEATURE_DIGEST
    assert contribution.stats_bytes == sum(len(npy(a)) for a in stats.to_arrays().values())
    assert contribution.stats_bytes > stats.nbytes  # the npy headers came too
    assert all(a.dtype == np.int64 for a in contribution.stats.to_arrays().values())
    assert contribution.delta.keys() == delta(1).keys()


def test_exact_head_off_ignores_a_non_dp_sites_statistics():
    contribution = parse(reply_parts("3", delta(1), 40, stats=site_stats(1, 40)), expected=None)
    assert contribution.stats is None and contribution.stats_bytes == 0


def _edit(parts: dict, record: str, **changes) -> dict:
    kind, values = parts[record]
    values = dict(values)
    for key, value in changes.items():
        if value is ...:
            values.pop(key)
        else:
            values[key] = value
    return parts | {record: (kind, values)}


def _array(name: str, value: np.ndarray) -> tuple[str, Array]:
    return name, Array(value)


STATS = site_stats(2, 50)
ARRAYS = STATS.to_arrays()
OTHER_GRID = site_stats(3, 50)


def _cases():
    good = reply_parts("5", delta(5), 50, stats=STATS)
    no_stats = {k: v for k, v in good.items() if k not in ("stats", "stats-meta")}
    truncated = npy(ARRAYS["gram"])[:-8]
    big_endian = npy(ARRAYS["gram"].astype(">i8"))
    float_header = npy(ARRAYS["gram"].astype("<f8"))
    yield "stats_missing", no_stats
    yield "stats_missing", {k: v for k, v in good.items() if k != "stats"}
    yield "stats_meta_missing", {k: v for k, v in good.items() if k != "stats-meta"}
    yield "stats_meta_missing", _edit(good, "stats-meta", **{"feature-digest": ...})
    yield "stats_meta_missing", _edit(good, "stats-meta", **{"frac-bits": ...})
    yield "stats_malformed", no_stats | {"stats": ("config", {"n": 50})}
    yield "stats_malformed", good | {"stats-meta": ("metric", {"num-features": P})}
    yield "stats_bad_meta", _edit(good, "stats-meta", extra="x")
    yield "stats_bad_meta", _edit(good, "stats-meta", **{"num-features": str(P)})
    yield "stats_bad_meta", _edit(good, "stats-meta", **{"num-classes": True})
    yield "stats_bad_meta", _edit(good, "stats-meta", **{"clip-norm": float("nan")})
    yield "stats_bad_meta", _edit(good, "stats-meta", **{"feature-digest": b"f" * 64})
    yield "stats_grid_mismatch", _edit(good, "stats-meta", **{"frac-bits": 12})
    yield "stats_grid_mismatch", _edit(good, "stats-meta", **{"clip-norm": 1.0})
    yield "stats_grid_mismatch", _edit(good, "stats-meta", **{"num-features": P + 1})
    yield "stats_grid_mismatch", _edit(good, "stats-meta", **{"num-classes": K + 1})
    yield "stats_feature_digest_mismatch", _edit(good, "stats-meta", **{"feature-digest": "e" * 64})
    yield "stats_wrong_names", _edit(good, "stats", cross=...)
    yield "stats_wrong_names", _edit(good, "stats", extra=Array(np.zeros(2, np.int64)))
    yield "stats_wrong_names", _edit(good, "stats", cross=..., **{"__metadata__": Array(ARRAYS["cross"])})
    yield "stats_wrong_dtype", _edit(good, "stats", gram=Array(ARRAYS["gram"].astype(np.float64)))
    yield "stats_wrong_dtype", _edit(good, "stats", n=Array(ARRAYS["n"].astype(np.int32)))
    yield "stats_wrong_dtype", _edit(good, "stats", sums=Array(ARRAYS["sums"].astype(np.uint64)))
    yield "stats_wrong_shape", _edit(good, "stats", cross=Array(ARRAYS["cross"].T.copy()))
    yield "stats_wrong_shape", _edit(good, "stats", gram=Array(np.zeros((P, P), np.int64)))
    yield "stats_wrong_shape", _edit(good, "stats", n=Array(np.array([50, 50], np.int64)))
    shape = ARRAYS["gram"].shape
    yield "stats_bad_arrays", _edit(good, "stats", gram=Array("int64", shape, "numpy.ndarray", truncated))
    yield "stats_bad_arrays", _edit(good, "stats", gram=Array("int64", shape, "numpy.ndarray", big_endian))
    yield "stats_bad_arrays", _edit(good, "stats", gram=Array("int64", shape, "numpy.ndarray", float_header))
    yield "stats_bad_arrays", _edit(good, "stats", gram=Array("int64", shape, "pickle", npy(ARRAYS["gram"])))
    yield "stats_n_mismatch", _edit(good, "metrics", **{"num-examples": 49})
    yield "stats_n_mismatch", _edit(good, "stats", n=Array(np.array([51], np.int64)))
    yield "stats_n_mismatch", reply_parts("5", delta(5), 50, stats=site_stats(2, 49))


CASES = list(_cases())


@pytest.mark.parametrize("reason,parts", CASES, ids=[f"{i}-{reason}" for i, (reason, _) in enumerate(CASES)])
def test_each_bad_statistics_record_refuses_the_reply_with_its_reason(reason, parts):
    err = refused(parts)
    assert err.reason == reason, err
    assert err.site_id == "5"


def test_every_refusal_reason_of_the_brief_is_covered():
    assert {reason for reason, _ in CASES} >= {
        "stats_missing", "stats_meta_missing", "stats_bad_meta", "stats_wrong_names", "stats_wrong_dtype",
        "stats_wrong_shape", "stats_bad_arrays", "stats_grid_mismatch", "stats_feature_digest_mismatch",
        "stats_n_mismatch", "stats_malformed"}


@pytest.mark.parametrize("expected", [EXPECT, None], ids=["exact-head-on", "exact-head-off"])
def test_statistics_in_a_dp_reply_are_refused_whatever_the_run(expected):
    """A DP reply promises (ε, δ): exact statistics beside it would release the site's data
    unprotected. The server must not accept (and so not store) them, exact head on or off."""
    err = refused(reply_parts("9", delta(9), 128, dp=True) | stats_parts(STATS), expected)
    assert err.reason == "stats_in_dp_reply" and err.site_id == "9"
    only_meta = reply_parts("9", delta(9), 128, dp=True) | {"stats-meta": ("config", STATS.meta())}
    assert refused(only_meta, expected).reason == "stats_in_dp_reply"


def test_a_dp_reply_without_statistics_is_accepted_with_the_exact_head_on():
    contribution = parse(reply_parts("9", delta(9), 128, dp=True))
    assert contribution.dp and contribution.stats is None


def test_a_bad_delta_is_reported_before_the_statistics():
    """The Δw's reasons stay what they were (round summaries, fuzz statistics) when both are bad."""
    parts = reply_parts("5", delta(5), 50, stats=STATS)
    parts = _edit(parts, "delta", **{"b.bias": Array(np.zeros(4, np.float64))})
    parts = _edit(parts, "stats-meta", **{"frac-bits": 12})
    assert refused(parts).reason == "bad_arrays"
