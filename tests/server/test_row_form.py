"""The row form of a site's statistics (tangent/exact_head/row_form.py), end to end on the server:
a real Flower reply carrying int32 rows + labels is parsed into the very statistics the Gram form
carries, the statistics ledger sums it bit for bit like the Gram form, stores the smaller form,
removes it exactly, verifies, and refuses rows that are off the grid or mislabelled."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from server.ledger import RejectedContribution, blobs
from server.replies import Rejected, parse_train_reply
from tangent.exact_head.row_form import gram_form_bytes, row_arrays, row_form_bytes, smaller_form
from tangent.exact_head.statistics import SufficientStats, quantize
from tangent.exact_head.stats_file import safetensors_metadata
from tests.server.exact_head_replies import (BASE, BITS, CLIP, EXPECT, FEATURE_DIGEST, K, P, build, delta, npy,
                                             open_stats_ledger, reply_parts)

pytestmark = pytest.mark.usefixtures("flower_server_identity")


def site_rows(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((n, P))
    phi *= (0.9 * CLIP) * rng.random((n, 1)) / np.linalg.norm(phi, axis=1, keepdims=True)
    return quantize(phi, CLIP, BITS), rng.integers(0, K, n)


def rows_reply(site: str, q: np.ndarray, labels: np.ndarray, overrides: dict | None = None):
    parts = reply_parts(site, delta(int(site)), len(labels))
    arrays = row_arrays(q, labels, BITS) | (overrides or {})
    parts |= {"stats": ("array", {k: Array(v) for k, v in arrays.items()}),
              "stats-meta": ("config", SufficientStats.zeros(P, K, CLIP, BITS).meta() | {"feature-digest": FEATURE_DIGEST})}
    return build(parts, 7)


def test_the_smaller_form_is_rows_below_about_p_rows():
    p, k = 3072, 10
    assert gram_form_bytes(p, k) == 38_031_448  # what every site sent before, whatever its n
    assert row_form_bytes(60, p) == 737_760 and smaller_form(60, p, k) == "rows"
    assert smaller_form(1200, p, k) == "rows" and smaller_form(20_000, p, k) == "gram"


def test_a_row_form_reply_gives_the_gram_forms_statistics_bit_for_bit():
    q, labels = site_rows(1, 9)
    contribution = parse_train_reply(rows_reply("3", q, labels), BASE, stats=EXPECT)
    assert contribution.stats == SufficientStats.from_quantized(q, labels, K, CLIP, BITS)
    assert np.array_equal(contribution.stats_rows["rows"], q)
    assert contribution.stats_bytes == sum(len(npy(a)) for a in row_arrays(q, labels, BITS).values())


@pytest.mark.parametrize("overrides, reason", [
    ({"rows": np.full((9, P), 2 ** BITS + 1, np.int32)}, "stats_bad_arrays"),   # off the grid
    ({"labels": np.full(9, K, np.int64)}, "stats_bad_arrays"),                   # no such class
    ({"rows": np.zeros((9, P), np.int64)}, "stats_wrong_dtype"),
    ({"rows": np.zeros((9, P + 1), np.int32)}, "stats_wrong_shape"),
    ({"labels": np.zeros(8, np.int64), "rows": np.zeros((8, P), np.int32)}, "stats_n_mismatch"),
])
def test_hostile_rows_are_refused(overrides, reason):
    q, labels = site_rows(2, 9)
    with pytest.raises(Rejected) as err:
        parse_train_reply(rows_reply("3", q, labels, overrides), BASE, stats=EXPECT)
    assert err.value.reason == reason


def test_ledger_sums_rows_like_sums_stores_the_smaller_form_and_removes_exactly(tmp_path):
    sites = {str(i): site_rows(10 + i, n) for i, n in enumerate((3, 4, 40))}  # 40 rows > p = 6: Gram stored
    with open_stats_ledger(tmp_path / "rows.sqlite") as by_rows, open_stats_ledger(tmp_path / "sums.sqlite") as by_sums:
        for site, (q, labels) in sites.items():
            stats = SufficientStats.from_quantized(q, labels, K, CLIP, BITS)
            by_rows.add(site, row_arrays(q, labels, BITS), num_examples=stats.n, base_digest=FEATURE_DIGEST)
            by_sums.add(site, stats.to_arrays(), num_examples=stats.n, base_digest=FEATURE_DIGEST)
        assert by_rows.composed_stats() == by_sums.composed_stats()
        assert by_rows.current_version().composed_sha256 == by_sums.current_version().composed_sha256
        with by_rows.snapshot():
            stored = {r[0]: bytes(r[1]) for r in by_rows._store.db.execute(
                "SELECT c.site_id, d.safetensors FROM deltas d JOIN contributions c ON c.id = d.contribution_id")}
        forms = {site: safetensors_metadata(blobs.unpack(blob)).get("form", "gram") for site, blob in stored.items()}
        assert forms == {"0": "rows", "1": "rows", "2": "gram"}
        assert len(stored["0"]) < row_form_bytes(3, P) + 200  # the rows and a header, not the sums
        for site in sites:
            ours, theirs = (led.contribution_delta(led.contributions(site_id=site)[0].id) for led in (by_rows, by_sums))
            assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)
        by_rows.remove("0")
        by_sums.remove("0")
        assert by_rows.composed_stats() == by_sums.composed_stats()
        q1, l1 = sites["1"]
        q2, l2 = sites["2"]
        assert by_rows.composed_stats() == SufficientStats.from_quantized(np.vstack([q1, q2]), np.concatenate([l1, l2]),
                                                                          K, CLIP, BITS)
        by_rows.verify()


def test_ledger_refuses_a_row_form_off_the_grid(tmp_path):
    q, labels = site_rows(3, 5)
    q[0, 0] = 2 ** BITS + 1
    with open_stats_ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(RejectedContribution) as err:
            ledger.add("1", row_arrays(q, labels, BITS), num_examples=5, base_digest=FEATURE_DIGEST)
        assert err.value.reason == "stats_out_of_bounds"
        assert ledger.composed_stats() is None


def test_stored_contributions_are_compressed_losslessly_and_old_plain_blobs_still_read(tmp_path):
    """A mostly-zero Δ (as TAFT-1's is: the frozen parts get no update) is stored in a fraction of
    its bytes, read back bit for bit, and a plain safetensors blob (older ledgers) still decodes."""
    import safetensors.numpy

    from server.ledger import Ledger

    rng = np.random.default_rng(4)
    d = {"w": np.zeros((300, 200), np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    d["w"][0] = rng.standard_normal(200)
    with Ledger.open(tmp_path / "d.sqlite") as ledger:
        ledger.add("a", d, 5)
        (c,) = ledger.contributions(status="active")
        back = ledger.contribution_delta(c.id)
        assert all(back[k].tobytes() == d[k].tobytes() for k in d)
        with ledger.snapshot():
            (size,) = ledger._store.db.execute("SELECT length(safetensors) FROM deltas").fetchone()
        assert size < 0.1 * sum(a.nbytes for a in d.values())
        ledger.verify()
    plain = safetensors.numpy.save(d)
    assert blobs.unpack(plain) == plain and blobs.unpack(blobs.pack(plain)) == plain
    with pytest.raises(ValueError):
        blobs.unpack(blobs.pack(plain)[:-5])  # truncated


def rows_off_the_ball(n: int) -> tuple[np.ndarray, np.ndarray]:
    """One row with every coordinate at 2^b (‖q‖ = √p·2^b, far off the clip ball ‖q‖ ≤ R), the
    others zero: every entry bound holds and trace(G) = p·4^b ≤ n·R², so only a per-row check sees it."""
    q = np.zeros((n, P), np.int32)
    q[0] = 2 ** BITS
    return q, np.zeros(n, np.int64)


def test_a_row_off_the_clip_ball_is_refused_in_a_reply_and_by_the_ledger(tmp_path):
    q, labels = rows_off_the_ball(9)
    with pytest.raises(Rejected) as err:
        parse_train_reply(rows_reply("3", q, labels), BASE, stats=EXPECT)
    assert err.value.reason == "stats_bad_arrays"
    with open_stats_ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(RejectedContribution) as refused:
            ledger.add("1", row_arrays(q, labels, BITS), num_examples=9, base_digest=FEATURE_DIGEST)
        assert refused.value.reason == "stats_out_of_bounds"
        assert ledger.composed_stats() is None


def test_the_registered_cap_is_checked_before_any_row_is_read(tmp_path):
    """A registered site (cap 10) sends 5,000 rows: the server must refuse the count before it forms
    a Gram matrix from them (O(n·p²): at p = 3,072, minutes of the ServerApp's time per reply).
    The rows are also off the grid, so the reason shows which check came first."""
    import json

    from server.strategy import LedgerFedAvg
    from server.trust.identity import SenderBinding
    from server.trust.registry import SiteRegistry
    from tests.server.exact_head_replies import SHAPES, SPEC

    (tmp_path / "registry.json").write_text(json.dumps({"version": 2, "sites": {"3": {
        "public_key": "keys/3.pub", "fingerprint": "SHA256:" + "0" * 64, "node_id": 7, "max_examples": 10,
        "registered_at": "2026-01-01T00:00:00Z", "revoked": False}}}))
    q, labels = site_rows(5, 5000)
    q[0, 0] = 2 ** BITS + 1
    with open_stats_ledger(tmp_path / "s.sqlite") as stats_ledger, \
            __import__("server.ledger", fromlist=["Ledger"]).Ledger.open(
                tmp_path / "d.sqlite", expected_base_digest=BASE, expected_spec=SHAPES) as ledger:
        strategy = LedgerFedAvg(ledger, SPEC, BASE, stats_ledger=stats_ledger, exact_head=EXPECT,
                                binding=SenderBinding(SiteRegistry(tmp_path / "registry.json")),
                                min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)
        strategy.aggregate_train(1, [rows_reply("3", q, labels)])
        assert strategy.rounds[1].rejected_by_reason == {"num_examples_over_cap": 1}


def test_a_row_form_whose_row_count_is_not_the_claimed_number_of_examples_is_refused(tmp_path):
    """Statistics formed from checked rows skip the Gram form's consistency checks: the count
    they claim must still be the number of rows, or the ledger would weigh what it was not sent."""
    q, labels = site_rows(3, 5)
    with open_stats_ledger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(RejectedContribution) as err:
            ledger.add("1", row_arrays(q, labels, BITS), num_examples=6, base_digest=FEATURE_DIGEST)
        assert err.value.reason == "stats_out_of_bounds" and "num_examples = 6" in err.value.detail
        assert ledger.composed_stats() is None
        ledger.add("1", row_arrays(q, labels, BITS), num_examples=5, base_digest=FEATURE_DIGEST)
        assert int(ledger.composed_stats().n) == 5
