"""A site's exact-head statistics through the real ClientApp (real Flower messages, the real
pretrained ViT-S/14 at img 28, 70 real Fashion-MNIST images, a token cache): the reply carries
`stats` + `stats-meta` equal to the statistics of the site's rows; forgetting rows leaves the
statistics of the rest; a feature-digest mismatch and DP runs send no statistics."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from client.site import load_split
from client.stats import site_statistics
from tangent.training.budget import PrivacyBudget
from tangent.data.token_cache import FeatureCache
from tangent.exact_head.row_form import stats_of_rows
from tangent.exact_head.statistics import SufficientStats
from tangent.exact_head.features import FeatureExtractor, FeatureSpec
from tangent.exact_head.phi_cache import PhiCache
from tangent.protocol.spec import ModelSpec, build_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_server_identity")]

SPEC = ModelSpec(img_size=28, reinit=False)
FEATURES = FeatureSpec(pieces=("final_cls", "input_mean"), random_features=24, random_seed=3,
                       clip_norm=2.0, frac_bits=14)
TRAIN = {"epochs": 1, "batch-size": 32, "lr": 1e-3, "loss": "rsl", "kappa": 15.0, "rsl-alpha": 1.0,
         "l2": 0.0, "radius": 0.0, "seed": 0, "dp": False, "dp-epsilon": 8.0, "dp-delta": 0.0,
         "dp-max-grad-norm": 1.0}
N = 70


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tangent.data.sets import load_fashion_mnist

    root = tmp_path_factory.mktemp("site")
    x, y = load_fashion_mnist("train")
    np.savez(root / "train.npz", images=x[:N], labels=y[:N])
    _, digest = build_model(SPEC)
    extractor = FeatureExtractor.from_spec(SPEC, FEATURES)  # the server's, built independently
    return {"root": root, "digest": digest, "labels": y[:N], "extractor": extractor,
            "feature_digest": extractor.digest(),
            "node_config": {"site-id": "site-a", "data-path": str(root / "train.npz"),
                            "cache-dir": str(root / "cache")}}


def train(site, node_config=None, feature_digest=None, exact_head=True, **config) -> RecordDict:
    spec = SPEC.to_config() | {"base-digest": site["digest"], "exact-head": exact_head} | FEATURES.to_config()
    spec["feature-digest"] = feature_digest or site["feature_digest"]
    msg = Message(RecordDict({"spec": ConfigRecord(spec), "config": ConfigRecord(TRAIN | config)}),
                  dst_node_id=42, message_type="train")
    context = Context(run_id=1, node_id=42, node_config=node_config or site["node_config"],
                      state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def reply_stats(reply) -> SufficientStats:
    arrays = {name: reply["stats"][name].numpy() for name in reply["stats"]}
    return SufficientStats.from_arrays(arrays, dict(reply["stats-meta"]))


def central_stats(site, rows) -> SufficientStats:
    """φ of the cached token rows of the whole data set, computed in one pass, then the rows'."""
    cache_dir = site["root"] / "cache"
    (directory,) = [d for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith("phi-")]
    phi = site["extractor"].compute(np.asarray(FeatureCache(directory).tokens))
    return SufficientStats.from_features(phi[rows], site["labels"][rows], 10, FEATURES.clip_norm,
                                         FEATURES.frac_bits)


def test_train_reply_adds_the_sites_statistics_and_is_otherwise_unchanged(site):
    reply = train(site, site["node_config"] | {"stats-form": "gram"})
    assert "error" not in reply.config_records, reply["error"]["reason"] if "error" in reply else ""
    plain = train(site, exact_head=False)
    assert set(reply.keys()) == set(plain.keys()) | {"stats", "stats-meta"}
    assert set(reply["metrics"].keys()) == set(plain["metrics"].keys())
    assert set(reply["meta"].keys()) == set(plain["meta"].keys())
    assert {k: reply["delta"][k].shape for k in reply["delta"]} == {k: plain["delta"][k].shape for k in plain["delta"]}

    meta = dict(reply["stats-meta"])
    assert meta == {"num-features": 2 * 384 + 24, "num-classes": 10, "clip-norm": 2.0, "frac-bits": 14,
                    "feature-digest": site["feature_digest"]}
    assert all(reply["stats"][k].dtype == "int64" for k in reply["stats"])
    stats = reply_stats(reply)
    assert stats.n == reply["metrics"]["num-examples"] == N
    assert stats == central_stats(site, np.arange(N))
    # by default a site this small sends its quantized rows instead (int32), the same integers
    rows = train(site)
    assert {k: str(rows["stats"][k].dtype) for k in rows["stats"]} == {"rows": "int32", "labels": "int64"}
    assert stats_of_rows({k: rows["stats"][k].numpy() for k in rows["stats"]}, meta["num-features"], 10,
                         meta["clip-norm"], meta["frac-bits"]) == stats


def test_excluded_rows_leave_exactly_the_statistics_of_the_rest(site):
    from tangent.protocol.spec import fresh_model

    model, digest = fresh_model(SPEC)
    data = load_split("train", model, digest, SPEC.img_size, site["node_config"], {})
    extractor = site["extractor"]
    full = site_statistics(extractor, data, 10)
    rng = np.random.default_rng(0)
    for forget in ([0], [N - 1], rng.choice(N, 17, replace=False), np.arange(N)):
        rest = np.setdiff1d(np.arange(N), forget)
        kept = site_statistics(extractor, data, 10, exclude=forget)
        assert kept == central_stats(site, rest)
        if len(rest):
            assert full - site_statistics(extractor, data, 10, exclude=rest) == kept
    assert site_statistics(extractor, data, 10, chunk_rows=16) == full  # chunking changes nothing
    for bad in ([N], [-1], [3, 3]):
        with pytest.raises(ValueError, match="exclude"):
            site_statistics(extractor, data, 10, exclude=bad)

    # with a φ cache of the data set next to the token cache, the site reads it: same integers
    (directory,) = [d for d in (site["root"] / "cache").iterdir() if d.is_dir() and not d.name.startswith("phi-")]
    phi = PhiCache.build_or_open(extractor, FeatureCache(directory).dataset(), cache_dir=site["root"] / "cache",
                                 data_digest=data.images_digest, progress=False)
    assert PhiCache.open(data.cache_dir, extractor.digest(), data.images_digest).directory == phi.directory
    assert site_statistics(extractor, data, 10) == full
    assert site_statistics(extractor, data, 10, exclude=[5, 6]) == central_stats(site, np.setdiff1d(np.arange(N), [5, 6]))


def test_a_feature_digest_mismatch_is_refused_before_training(site):
    reply = train(site, feature_digest="0" * 64)
    error = reply["error"]
    assert error["code"] == "feature_digest_mismatch" and site["feature_digest"] in error["reason"]
    assert "stats" not in reply.array_records and "delta" not in reply.array_records


def test_a_dp_run_sends_no_statistics(site, tmp_path):
    state = tmp_path / "state"
    PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "site-a", 6.0)
    node = site["node_config"] | {"epsilon-budget": 6.0, "state-dir": str(state)}
    reply = train(site, node_config=node, dp=True, **{"dp-epsilon": 4.0, "lr": 0.5, "loss": "ce"})
    assert "error" not in reply.config_records, reply["error"]["reason"] if "error" in reply else ""
    assert set(reply.keys()) == {"delta", "metrics", "meta"} and reply["meta"]["dp"] is True

