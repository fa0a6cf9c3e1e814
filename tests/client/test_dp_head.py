"""A DP site's exact-head release through the real ClientApp (real Flower messages, the real
pretrained ViT-S/14 at img 28, 70 real Fashion-MNIST images): the reply carries the mechanism's
output only, the budget is charged once for the composition of both releases, and a budget that
cannot pay refuses."""
from __future__ import annotations


import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.exact_head.statistics import SufficientStats
from tangent.protocol.spec import ModelSpec, build_model
from tangent.training.budget import PrivacyBudget

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_server_identity")]

SPEC = ModelSpec(img_size=28, reinit=False)
FEATURES = FeatureSpec(pieces=("final_cls", "input_mean"), clip_norm=2.0, frac_bits=14)
TRAIN = {"epochs": 1, "batch-size": 32, "lr": 0.5, "loss": "ce", "kappa": 15.0, "rsl-alpha": 1.0,
         "l2": 0.0, "radius": 0.0, "seed": 0, "dp": True, "dp-epsilon": 4.0, "dp-delta": 0.0,
         "dp-max-grad-norm": 1.0, "dp-head-share": 0.9, "dp-head-dim": 16, "dp-head-seed": 1}
N = 70


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tangent.data.sets import load_fashion_mnist

    root = tmp_path_factory.mktemp("site")
    x, y = load_fashion_mnist("train")
    np.savez(root / "train.npz", images=x[:N], labels=y[:N])
    _, digest = build_model(SPEC)
    extractor = FeatureExtractor.from_spec(SPEC, FEATURES)
    return {"root": root, "digest": digest, "feature_digest": extractor.digest(),
            "node_config": {"site-id": "site-a", "data-path": str(root / "train.npz"),
                            "cache-dir": str(root / "cache")}}


def train(site, node_config, centre=None, exact_head=True, **config) -> RecordDict:
    return train_message(site, node_config, centre, exact_head, **config).content


def train_message(site, node_config, centre=None, exact_head=True, **config) -> Message:
    spec = SPEC.to_config() | {"base-digest": site["digest"], "exact-head": exact_head} | FEATURES.to_config()
    spec["feature-digest"] = site["feature_digest"]
    records = {"spec": ConfigRecord(spec), "config": ConfigRecord(TRAIN | config)}
    if centre is not None:
        records["dp-head-centre"] = ArrayRecord({"centre": Array(centre)})
    msg = Message(RecordDict(records), dst_node_id=42, message_type="train")
    context = Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply


def test_a_dp_reply_carries_the_heads_release_and_one_composed_charge(site, tmp_path):
    from tangent.exact_head import dp

    # exactly the contribution's ε: the old sum of both charges (4 + 3.8) would not fit
    PrivacyBudget.create(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a", 4.0)
    node = site["node_config"] | {"state-dir": str(tmp_path / "state")}
    centre = np.full(FEATURES.dim(), 0.01)
    message = train_message(site, node, centre=centre)
    reply = message.content
    assert "error" not in reply, reply["error"]["reason"] if "error" in reply else ""
    assert set(reply.keys()) == {"delta", "metrics", "meta", "stats", "stats-meta"}
    meta = dict(reply["stats-meta"])
    head_epsilon = dp.head_epsilon(4.0, meta["dp-head-delta"], 0.9)
    assert meta["dp"] is True and meta["dp-head-epsilon"] == head_epsilon and meta["num-features"] == 16
    stats = SufficientStats.from_arrays({k: reply["stats"][k].numpy() for k in reply["stats"]},
                                        {k: meta[k] for k in ("num-features", "num-classes", "clip-norm", "frac-bits")})
    # n is the noisy counts' post-processing and s the noisy Σ of the public rows, not the site's exact values
    from client import dp_head
    from client.forget import site_data
    from tangent.exact_head.statistics import quantize

    request = dp_head.HeadRequest(0.9, dp.RowTransform(centre, 16, 1), dp_head.DEFAULT_WEIGHTS, 16)
    rows, _ = dp_head.public_rows(FeatureExtractor.from_spec(SPEC, FEATURES),
                                  site_data(site["root"] / "train.npz", SPEC.img_size), request)
    assert stats.n == stats.counts.sum() and stats.sums.shape == (16,)
    assert not np.array_equal(stats.sums, quantize(rows, 1.0, 16).sum(axis=0))
    (charge,) = PrivacyBudget(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a").charges().values()
    assert charge["id"] == reply["meta"]["contribution-id"] and meta["contribution-id"] == f"{charge['id']}:head"
    assert charge["state"] == "settled" and charge["epsilon"] == reply["metrics"]["epsilon"] <= 4.0
    assert charge["alone"] == {"dp-sgd": reply["meta"]["dp-taft-epsilon"], "exact-head": head_epsilon}
    assert max(charge["alone"].values()) < charge["epsilon"] < sum(charge["alone"].values())
    # the server accepts the real reply with the run's request (ε = 4 in all, share 0.9) and counts
    # what it released as the composition
    from server.replies import DPHeadExpectation, Rejected, StatsExpectation, parse_train_reply, released_privacy

    expectation = StatsExpectation(site["feature_digest"], 16, 10, 1.0, 16, DPHeadExpectation(
        4.0, 0.9, 16, 1, dp.centre_digest(centre), dp.RELEASE_WEIGHTS))
    contribution = parse_train_reply(message, site["digest"], require_dp=True, stats=expectation)
    assert contribution.stats.dp["epsilon"] == head_epsilon and contribution.meta["epsilon"] == charge["epsilon"]
    assert released_privacy(message) == (charge["epsilon"], charge["delta"])
    with pytest.raises(Rejected, match="stats_dp_epsilon"):  # a run that asked for a smaller share
        parse_train_reply(message, site["digest"], require_dp=True, stats=StatsExpectation(
            site["feature_digest"], 16, 10, 1.0, 16, DPHeadExpectation(4.0, 0.5, 16, 1, dp.centre_digest(centre),
                                                                        dp.RELEASE_WEIGHTS)))


def test_a_budget_that_cannot_pay_the_composition_refuses_before_any_charge(site, tmp_path):
    PrivacyBudget.create(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a", 3.9)
    # no data at all: the refusal must come before any data is read
    node = site["node_config"] | {"state-dir": str(tmp_path / "state"), "data-path": str(tmp_path / "absent.npz")}
    reply = train(site, node)  # the contribution's ε = 4 > 3.9
    assert reply["error"]["code"] == "budget_exhausted"
    assert PrivacyBudget(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a").spent == (0.0, 0.0)


def test_a_head_request_without_the_exact_head_is_refused_before_any_charge(site, tmp_path):
    PrivacyBudget.create(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a", 7.0)
    node = site["node_config"] | {"state-dir": str(tmp_path / "state")}
    reply = train(site, node, exact_head=False)
    assert reply["error"]["code"] == "bad_request"
    assert PrivacyBudget(tmp_path / "state" / PrivacyBudget.FILE_NAME, "site-a").spent == (0.0, 0.0)


def test_forgetting_at_a_dp_site_is_a_fresh_release_charged_again_and_refused_when_exhausted(site, tmp_path):
    from client import dp_head
    from client.forget import site_data
    from tangent.exact_head import dp
    from tangent.training.budget import BudgetExhausted

    path = tmp_path / "state" / PrivacyBudget.FILE_NAME
    PrivacyBudget.create(path, "site-a", 3.0)
    budget = PrivacyBudget(path, "site-a")
    data = site_data(site["root"] / "train.npz", SPEC.img_size)
    extractor = FeatureExtractor.from_spec(SPEC, FEATURES)
    request = dp_head.HeadRequest(0.9, dp.RowTransform(None, 16, 1), dp_head.DEFAULT_WEIGHTS, 14)
    forget = [0, 5, 9]
    rows, labels = dp_head.public_rows(extractor, data, request, exclude=forget)
    assert rows.shape == (N - len(forget), 16) and np.array_equal(labels, np.delete(data.labels, forget))

    contribution, reply = dp_head.forget_release(extractor, data, 10, request, 2.0, 1e-5, budget, forget)
    meta = dict(reply["stats-meta"])
    assert meta["contribution-id"] == f"{contribution}:head" and meta["dp-head-epsilon"] == 2.0
    assert budget.spent[0] == pytest.approx(2.0)
    assert [c["state"] for c in budget.charges().values()] == ["settled"]
    with pytest.raises(BudgetExhausted):  # 2 + 2 > 3: refused, nothing more charged
        dp_head.forget_release(extractor, data, 10, request, 2.0, 1e-5, budget, forget)
    assert budget.spent[0] == pytest.approx(2.0) and len(budget.charges()) == 1
