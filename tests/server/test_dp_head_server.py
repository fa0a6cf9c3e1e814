"""The server's side of the DP exact head: a DP run asks for the release (train config + centre
record), accepts a DP reply's statistics only as that release (every refusal with real Flower
messages through Flower's serialization), records them in a statistics ledger whose card pins
the transform (real SQLite), composes them bit for bit, removes a site's release exactly (its
noise with it) and solves from the noisy sums and their declared noise only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array

from server import config as cfg
from server.exact_head import CENTRE_RECORD, solve_dp_head
from server.ledger import Ledger, LedgerError
from server.replies import Rejected, parse_train_reply, released_privacy
from tangent.exact_head import dp
from tangent.exact_head.statistics import SufficientStats
from tests.server.dp_head_replies import (BITS, CENTRE, DIM, HEAD, HEAD_EPSILON, REQUEST_EPSILON, SEED, SIZES, dp_reply_parts,
                                          dp_request, exact_head, open_ledgers, release, replies, strategy)
from tests.server.exact_head_replies import (BASE, EXPECT, FEATURE_DIGEST, K, P, build, delta, model_card, reply_parts,
                                             site_stats, stats_parts)

pytestmark = pytest.mark.usefixtures("flower_server_identity")
DP_EXPECT = HEAD.expectation


def parse(parts: dict, expected=DP_EXPECT):
    return parse_train_reply(build(parts, 7), BASE, stats=expected, require_dp=True)


def refused(parts: dict, expected=DP_EXPECT) -> Rejected:
    with pytest.raises(Rejected) as err:
        parse(parts, expected)
    return err.value


def edit_meta(parts: dict, **changes) -> dict:
    meta = dict(parts["stats-meta"][1])
    for key, value in changes.items():
        if value is ...:
            meta.pop(key)
        else:
            meta[key] = value
    return parts | {"stats-meta": ("config", meta)}


def edit_arrays(parts: dict, **arrays) -> dict:
    return parts | {"stats": ("array", dict(parts["stats"][1]) | {k: Array(v) for k, v in arrays.items()})}


# ----------------------------------------------------------------------------- the request

def test_a_dp_run_asks_for_the_release_and_a_run_without_it_does_not():
    dp_run = {"dp": True, "exact-head": True, "dp-head-share": 0.5, "dp-head-dim": 32, "dp-head-seed": 5,
              "frac-bits": 14}
    assert cfg.dp_head_enabled(dp_run) and cfg.exact_head_enabled(dp_run)
    assert {k: v for k, v in cfg.train_config(dp_run).items() if k.startswith("dp-head")} == {
        "dp-head-share": 0.5, "dp-head-dim": 32, "dp-head-seed": 5, "dp-head-frac-bits": 14}
    for run in (dp_run | {"dp-head-share": 0.0}, dp_run | {"exact-head": False}, dp_run | {"dp": False}):
        assert not cfg.dp_head_enabled(run)
        assert not any(k.startswith("dp-head") for k in cfg.train_config(run))
    assert not cfg.exact_head_enabled(dp_run | {"dp-head-share": 0.0})  # DP without the head: no statistics


def test_the_expectation_and_the_card_pin_the_transform():
    assert DP_EXPECT.grid == {"num-features": DIM, "num-classes": K, "clip-norm": 1.0, "frac-bits": BITS}
    assert DP_EXPECT.dp_head.centre_digest == dp.centre_digest(CENTRE)
    card = HEAD.model_card
    assert card["stats-meta"] == DP_EXPECT.grid and card["dp-head"]["dim"] == DIM and card["dp-head"]["seed"] == SEED
    record = HEAD.train_records()[CENTRE_RECORD]
    assert np.array_equal(record["centre"].numpy(), CENTRE)
    assert exact_head(dp_request(dim=0)).expectation.num_features == P  # no projection: φ's width


# ----------------------------------------------------------------------------- the reply

def test_a_dp_release_is_accepted_bit_for_bit_with_its_declared_noise():
    noisy, meta = release(1, 80)
    contribution = parse(dp_reply_parts("3", 1, 80))
    stats = contribution.stats
    assert all(np.array_equal(a, b) for a, b in zip(stats.to_arrays().values(), noisy.to_arrays().values()))
    assert stats.dp["noise_variance"] == meta["dp-head-noise-variance"] and stats.dp["epsilon"] == HEAD_EPSILON
    assert contribution.dp and contribution.feature_digest == FEATURE_DIGEST
    # a smaller ε than the request is the site's choice (more noise, declared)
    assert parse(dp_reply_parts("3", 1, 80, epsilon=0.5)).stats.dp["epsilon"] == 0.5


def test_what_a_dp_reply_released_is_its_composed_epsilon_never_less_than_its_head():
    # the reply's ε (2.0) is the composition of DP-TAFT and the head (HEAD_EPSILON < 2.0 alone): not their sum
    assert released_privacy(build(dp_reply_parts("3", 1, 80), 7)) == pytest.approx((REQUEST_EPSILON, 1e-6))
    understated = dp_reply_parts("3", 1, 80) | {"metrics": ("metric", {"num-examples": 80, "epsilon": 0.1,
                                                                       "delta": 1e-6})}
    assert released_privacy(build(understated, 7)) == pytest.approx((HEAD_EPSILON, 1e-6))
    assert released_privacy(build(reply_parts("3", delta(1), 80, dp=True), 7)) == pytest.approx((2.0, 1e-6))
    # exact statistics beside a DP Δw: the server saw an unbounded release, refused or not
    exact = reply_parts("3", delta(1), 80, dp=True) | stats_parts(site_stats(1, 80))
    assert released_privacy(build(exact, 7))[0] == float("inf")


GOOD = dp_reply_parts("5", 5, 60)


def _refusals():
    exact = site_stats(5, 60)
    # above the head's share of the request, though below the reply's composed ε
    yield "epsilon_above_share", "stats_dp_epsilon", dp_reply_parts("5", 5, 60, epsilon=HEAD_EPSILON * 1.01)
    # a composed ε below its own head's: a composition spends at least each of its parts
    yield "composed_below_head", "stats_dp_epsilon", dp_reply_parts("5", 5, 60) | {
        "metrics": ("metric", {"num-examples": 60, "epsilon": HEAD_EPSILON / 2, "delta": 1e-6})}
    yield "gram_form_exact_stats", "stats_meta_missing", reply_parts("5", delta(5), 60, dp=True) | stats_parts(exact)
    yield "exact_n", "stats_dp_not_post_processing", edit_arrays(GOOD, n=np.array([60], np.int64))
    yield "sigma_mean_declared_low", "stats_dp_noise_mismatch", edit_meta(GOOD, **{"dp-head-sigma-mean": 0.01})
    yield "public_centre_mechanism", "stats_not_dp", edit_meta(
        GOOD, **{"dp-head-mechanism": dp.PUBLIC_CENTRE_MECHANISM})
    yield "wrong_k", "stats_dp_transform_mismatch", edit_meta(GOOD, **{"dp-head-dim": DIM + 1})
    yield "wrong_grid", "stats_grid_mismatch", edit_meta(GOOD, **{"num-features": DIM + 1})
    yield "wrong_seed", "stats_dp_transform_mismatch", edit_meta(GOOD, **{"dp-head-seed": SEED + 1})
    yield "wrong_centre", "stats_dp_transform_mismatch", edit_meta(GOOD, **{"dp-head-centre-digest": "0" * 64})
    yield "another_transform", "stats_dp_transform_mismatch", dp_reply_parts(
        "5", 5, 60, transform=dp.RowTransform(None, DIM, SEED))
    yield "less_noise_declared", "stats_dp_noise_mismatch", edit_meta(
        GOOD, **{"dp-head-noise-variance": GOOD["stats-meta"][1]["dp-head-noise-variance"] / 4})
    yield "sigma_declared_low", "stats_dp_noise_mismatch", edit_meta(GOOD, **{"dp-head-sigma-cross": 0.01})
    yield "another_delta", "stats_dp_delta", edit_meta(GOOD, **{"dp-head-delta": 1e-3})
    yield "not_dp", "stats_not_dp", edit_meta(GOOD, dp=False)
    yield "another_mechanism", "stats_not_dp", edit_meta(GOOD, **{"dp-head-mechanism": "laplace"})
    yield "unknown_meta_key", "stats_bad_meta", edit_meta(GOOD, **{"num-examples": 60})
    yield "foreign_contribution", "stats_bad_meta", edit_meta(GOOD, **{"contribution-id": "cd" * 16 + ":head"})
    yield "epsilon_not_a_number", "stats_bad_meta", edit_meta(GOOD, **{"dp-head-epsilon": "2"})
    yield "feature_digest", "stats_feature_digest_mismatch", edit_meta(GOOD, **{"feature-digest": "e" * 64})
    yield "row_form", "stats_wrong_names", GOOD | {"stats": ("array", {
        "rows": Array(np.zeros((60, DIM), np.int32)), "labels": Array(np.zeros(60, np.int64))})}
    yield "extra_record", "dp_extra_records", GOOD | {"exact-stats": stats_parts(exact)["stats"]}
    yield "no_release", "stats_missing", reply_parts("5", delta(5), 60, dp=True)


@pytest.mark.parametrize("name, reason, parts", list(_refusals()), ids=[c[0] for c in _refusals()])
def test_every_bad_dp_release_is_refused(name, reason, parts):
    err = refused(parts)
    assert err.reason == reason and err.site_id == "5"


def test_a_non_dp_reply_is_refused_when_the_run_asked_for_the_dp_head():
    parts = reply_parts("5", delta(5), 60, stats=site_stats(5, 60))
    with pytest.raises(Rejected) as err:
        parse_train_reply(build(parts, 7), BASE, stats=DP_EXPECT)  # even without require_dp
    assert err.value.reason == "not_private"


@pytest.mark.parametrize("expected", [EXPECT, None], ids=["exact-head-on", "exact-head-off"])
def test_a_release_is_refused_when_the_run_did_not_ask_for_the_dp_head(expected):
    """The run asked for exact statistics (or none) and a DP site sends a release anyway: refused."""
    assert refused(GOOD, expected).reason == "stats_in_dp_reply"


# ----------------------------------------------------------------------------- ledger, removal, solve

@pytest.fixture
def ledgers(tmp_path):
    both = open_ledgers(tmp_path / "run")
    yield both
    for ledger in both.all():
        ledger.close()


def sums(ledger: Ledger) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in ledger.composed_arrays().items()}


def test_releases_compose_bit_for_bit_and_removal_subtracts_exactly_what_was_sent(ledgers, tmp_path):
    s = strategy(ledgers)
    s.aggregate_train(1, replies(["1", "3"]))
    before = sums(ledgers.stats)
    s.aggregate_train(2, replies(["2"]))
    summary = s.rounds[2]
    assert summary.rejections == [] and summary.stats_recorded == ["2"]
    sent = {site: release(int(site), n)[0] for site, n in SIZES.items()}
    assert ledgers.stats.composed_stats() == SufficientStats.total(sent.values())  # the sum of the releases as sent
    total = HEAD.composed(ledgers.stats)
    assert total.dp["noise_variance"] == sum(r.dp["noise_variance"] for r in sent.values())
    assert total.dp["releases"] == 3
    recorded = {c.site_id: c for c in ledgers.stats.contributions(status="active")}
    assert recorded["2"].epsilon == HEAD_EPSILON and recorded["2"].num_examples == SIZES["2"]

    assert ledgers.remove("2", reason="test: withdrawal") is True  # its noise leaves with it
    assert sums(ledgers.stats) == before
    assert HEAD.composed(ledgers.stats).dp["noise_variance"] == sum(sent[s].dp["noise_variance"] for s in ("1", "3"))
    fresh = open_ledgers(tmp_path / "fresh")
    try:
        strategy(fresh).aggregate_train(1, replies(["3", "1"]))
        assert sums(fresh.stats) == sums(ledgers.stats)
    finally:
        for ledger in fresh.all():
            ledger.close()
    for ledger in ledgers.all():
        ledger.verify()


def test_every_train_message_carries_the_centre_and_the_request(ledgers):
    from flwr.app import ConfigRecord, RecordDict

    from tests.server.local_grid import LocalGrid

    class TwoSites(LocalGrid):
        sites = (11, 12)

    s = strategy(ledgers)
    config = ConfigRecord(cfg.train_config({"dp": True, "exact-head": True, "dp-head-share": 0.9}))
    messages = list(s.configure_train(1, None, config, TwoSites()))
    assert len(messages) == 2
    for msg in messages:
        content: RecordDict = msg.content
        assert np.array_equal(content.array_records[CENTRE_RECORD]["centre"].numpy(), CENTRE)
        assert content.config_records["config"]["dp-head-share"] == 0.9


def test_dp_and_exact_statistics_never_share_a_ledger(tmp_path):
    with Ledger.open(tmp_path / "dp.sqlite", family="stats", model_card=HEAD.model_card):
        pass
    with pytest.raises(LedgerError, match="another model card"):
        Ledger.open(tmp_path / "dp.sqlite", family="stats", model_card=model_card())
    other = exact_head(dp_request(seed=SEED + 1)).model_card
    with pytest.raises(LedgerError, match="another model card"):
        Ledger.open(tmp_path / "dp.sqlite", family="stats", model_card=other)
    with Ledger.open(tmp_path / "exact.sqlite", family="stats", model_card=model_card()):
        pass
    with pytest.raises(LedgerError, match="another model card"):
        Ledger.open(tmp_path / "exact.sqlite", family="stats", model_card=HEAD.model_card)


def test_the_head_is_solved_from_the_noisy_sums_and_declared_noise_only(ledgers):
    strategy(ledgers).aggregate_train(1, replies(["1", "2", "3"]))
    total = HEAD.composed(ledgers.stats)
    head = solve_dp_head(total)
    expected = dp.solve_release(SufficientStats.total(release(int(s), n)[0] for s, n in SIZES.items()),
                                dp.RowTransform(CENTRE, DIM, SEED))
    assert np.array_equal(head.linear.weight, expected.linear.weight) and head.lam == expected.lam > 0
    phi = np.random.default_rng(0).standard_normal((20, P))
    assert head.predict(phi).shape == (20,)


def test_the_servers_central_evaluation_solves_releases_as_the_dp_head(ledgers):
    """server.evaluation dispatches on the composed statistics: DP releases are never solved as
    exact statistics (GCV on noisy sums), and the head is the one of the noisy sums."""
    from server.evaluation import exact_head_accuracy

    strategy(ledgers).aggregate_train(1, replies(["1", "2", "3"]))
    total = HEAD.composed(ledgers.stats)
    rng = np.random.default_rng(1)
    phi, labels = rng.standard_normal((50, P)), rng.integers(0, K, 50)
    result = exact_head_accuracy(total, phi, labels)
    head = solve_dp_head(total)
    assert result["accuracy_exact_head"] == float((head.predict(phi) == labels).mean())
    assert result["exact_head_lambda"] == head.lam


def test_a_dp_site_forgets_rows_with_a_fresh_release_that_replaces_its_old_one(ledgers, tmp_path):
    """Forgetting at a DP site: the fresh release of the remaining rows replaces the old release,
    whose noise leaves with it: the sums are those of a ledger that only ever had the new one."""
    from flwr.app import ArrayRecord

    from server.exact_head import replace_release

    strategy(ledgers).aggregate_train(1, replies(["1", "2", "3"]))
    fresh_id = "cd" * 16
    remaining, meta = release(22, SIZES["2"] - 5, contribution=fresh_id)  # rows 5 fewer, new noise
    record = ArrayRecord({k: Array(v) for k, v in remaining.to_arrays().items()})
    replace_release(ledgers.stats, "2", record, meta, DP_EXPECT, delta=1e-6, contribution_id=fresh_id)
    expected = SufficientStats.total([release(1, SIZES["1"])[0], remaining, release(3, SIZES["3"])[0]])
    assert ledgers.stats.composed_stats() == expected
    assert HEAD.composed(ledgers.stats).dp["noise_variance"] == sum(
        r.dp["noise_variance"] for r in (release(1, SIZES["1"])[0], remaining, release(3, SIZES["3"])[0]))
    history = ledgers.stats.contributions(site_id="2")
    assert [c.status for c in history].count("active") == 1 and len(history) == 2
    assert ledgers.stats.privacy_totals()["2"]["epsilon"] == 2 * HEAD_EPSILON  # the old release stays spent
    ledgers.stats.verify()

    too_much, meta = release(23, 50, epsilon=HEAD_EPSILON * 1.01, contribution=fresh_id)
    with pytest.raises(Rejected) as err:
        replace_release(ledgers.stats, "2", ArrayRecord({k: Array(v) for k, v in too_much.to_arrays().items()}),
                        meta, DP_EXPECT, delta=1e-6, contribution_id=fresh_id)
    assert err.value.reason == "stats_dp_epsilon"
    with pytest.raises(Rejected) as err:
        replace_release(ledgers.stats, "7", record, meta, DP_EXPECT, delta=1e-6, contribution_id=fresh_id)
    assert err.value.reason == "not_active"
    assert ledgers.stats.composed_stats() == expected  # refusals change nothing


TORCH_FREE = """
import json, sys, tempfile
from pathlib import Path
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
import server.server_app  # the ServerApp module and everything it imports
from server.exact_head import solve_dp_head
from tests.server import test_dp_head_server as t
with tempfile.TemporaryDirectory() as tmp:
    both = t.open_ledgers(Path(tmp))
    t.strategy(both).aggregate_train(1, t.replies(["1", "2"]))
    head = solve_dp_head(t.HEAD.composed(both.stats))
    both.remove("1")
print(json.dumps({"torch": "torch" in sys.modules, "timm": "timm" in sys.modules, "lam": head.lam}))
"""


def test_the_dp_heads_server_path_never_imports_torch():
    """Parsing, recording, composing, removing and solving DP releases run in the ServerApp's own
    process (the solve also in its numpy child): none of it may import torch."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", TORCH_FREE], cwd=root, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["lam"] > 0 and result["torch"] is False and result["timm"] is False, result
