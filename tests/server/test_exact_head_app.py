"""The ServerApp with the exact head on, end to end in one process: the real pretrained ViT (img 28),
the real FeatureExtractor on both sides, real Flower messages, both real ledgers.

``StatsSitesGrid`` (a Flower ``Grid``) is the only stand-in, for the network: three sites that
answer each train message as the real ClientApp does — they build φ from the spec the message
carries, refuse a feature digest other than their own, and send a small Δw plus the exact integer
statistics of φ over their 100 Fashion-MNIST training images.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from server import server_app
from tests.server.local_grid import LocalGrid

pytestmark = [pytest.mark.usefixtures("flower_server_identity"), pytest.mark.slow]
SITES = (101, 102, 103)
PER_SITE = 100
RUN_CONFIG = {"img-size": 28, "reinit": False, "num-classes": 10, "seed": 0, "epochs": 1, "min-nodes": 3,
              "fraction-evaluate": 0.0, "eval-subset": 200, "num-rounds": 1, "round-timeout": 60.0,
              "max-delta-norm": 1000.0, "weighting": "examples", "federation-mode": "simulation", "cache-dir": "",
              "exact-head": True, "feature-pieces": "final_cls,input_mean", "random-features": 64, "random-seed": 3,
              "clip-norm": 2.0, "frac-bits": 16}


class StatsSitesGrid(LocalGrid):
    sites = SITES

    def __init__(self):
        super().__init__()
        self.site_stats: dict[str, object] = {}
        self.specs: list[dict] = []
        self._extractor = None

    def extractor(self, spec):
        from tangent.exact_head.features import FeatureExtractor, FeatureSpec
        from tangent.protocol.spec import ModelSpec

        if self._extractor is None:
            self._extractor = FeatureExtractor.from_spec(ModelSpec.from_config(spec), FeatureSpec.from_config(spec))
        return self._extractor

    def _answer(self, msg: Message) -> Message:
        import torch

        from tangent.data.sets import load_dataset, preprocess
        from tangent.exact_head.statistics import SufficientStats
        from tests.server.train_replies import delta_shapes

        spec = dict(msg.content.config_records["spec"].items())
        self.specs.append(spec)
        site = str(SITES.index(msg.metadata.dst_node_id))
        extractor = self.extractor(spec)
        if spec["feature-digest"] != extractor.digest():  # the site's own check
            content = RecordDict({"error": ConfigRecord({"code": "feature_digest_mismatch", "site-id": site})})
            return Message(content, reply_to=msg)
        images, labels = load_dataset("fashion-mnist", "train")
        rows = np.arange(int(site) * PER_SITE, (int(site) + 1) * PER_SITE)
        phi = extractor.compute(preprocess(images[rows], int(spec["img-size"])), tokens=False)
        stats = SufficientStats.from_features(phi, labels[rows], int(spec["num-classes"]), float(spec["clip-norm"]),
                                              int(spec["frac-bits"]))
        self.site_stats[site] = stats
        rng = np.random.default_rng(int(site))
        delta = {k: torch.from_numpy((1e-3 * rng.standard_normal(s)).astype(np.float32))
                 for k, s in delta_shapes(spec).items()}
        content = RecordDict({
            "delta": ArrayRecord(delta),
            "metrics": MetricRecord({"num-examples": PER_SITE, "train-loss": 1.0, "train-accuracy": 0.5,
                                     "epsilon": math.inf, "delta": 0.0, "wall-s": 0.1}),
            "meta": ConfigRecord({"site-id": site, "base-digest": str(spec["base-digest"]), "dp": False,
                                  "train-config": json.dumps({"epochs": 1})}),
            "stats": ArrayRecord({k: Array(v) for k, v in stats.to_arrays().items()}),
            "stats-meta": ConfigRecord(stats.meta() | {"feature-digest": extractor.digest()})})
        return Message(content, reply_to=msg)


def run_main(state: Path, grid, **overrides) -> dict:
    run_config = RUN_CONFIG | {"state-dir": str(state), "report-path": "report.json"} | overrides
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(grid, context)
    return json.loads((state / "report.json").read_text())


def test_one_round_both_models_and_removal_through_the_serverapp(tmp_path):
    from tangent.exact_head.statistics import SufficientStats, solve

    grid = StatsSitesGrid()
    report = run_main(tmp_path, grid, mode="train")
    spec = grid.specs[0]
    assert spec["exact-head"] is True and spec["feature-digest"] == report["exact_head"]["feature_digest"]
    assert spec["random-features"] == 64 and spec["feature-pieces"] == "final_cls,input_mean"
    p = 2 * 384 + 64
    assert report["exact_head"]["num_features"] == p
    rounds = report["rounds"][0]
    assert sorted(rounds["recorded"]) == sorted(rounds["stats_recorded"]) == ["0", "1", "2"] and rounds["rejections"] == []
    assert rounds["stats_bytes"] > 3 * 8 * p * (p + 1) // 2
    assert report["exact_head_ledger"]["active_sites"] == ["0", "1", "2"]

    total = SufficientStats.total(grid.site_stats[s] for s in ("0", "1", "2"))
    central = solve(total)  # the model fitted on the union of the three sites' data
    assert report["exact_head_lambda"] == central.lam  # λ is a function of the exact sums only
    # 300 training images, 200 test images, 10 classes: far above chance (0.1)
    assert report["accuracy_exact_head"] > 0.5, report["central"]
    assert report["central"]["1"]["exact_head_examples"] == 3 * PER_SITE
    assert report["accuracy"] is not None  # the TAFT model is evaluated beside it

    removal = run_main(tmp_path, None, mode="unlearn", **{"remove-sites": "1"})
    assert removal["removed_sites"] == ["1"]
    assert removal["ledger"]["active_sites"] == removal["exact_head_ledger"]["active_sites"] == ["0", "2"]
    rest = solve(grid.site_stats["0"] + grid.site_stats["2"])
    assert removal["exact_head_lambda"] == rest.lam and removal["accuracy_exact_head"] > 0.4

    # the operator's tools find the statistics ledger from the Δ ledger alone (the ServerApp linked it)
    # and open it under the run's admission policy
    from server import cli
    from server.ledger.ledgers import open_pair

    delta_path = Path(report["ledger_path"])
    with open_pair(delta_path) as ledgers:
        assert ledgers.stats.path.resolve() == Path(report["exact_head"]["ledger_path"]).resolve()
        assert ledgers.delta.max_delta_norm == ledgers.delta.admission_policy()["max_delta_norm"]
    assert cli.main(["--ledger", str(delta_path), "remove", "0", "--reason", "consent withdrawn"]) == 0
    with open_pair(delta_path) as ledgers:
        assert [c.site_id for c in ledgers.delta.contributions(status="active")] == ["2"]
        assert [c.site_id for c in ledgers.stats.contributions(status="active")] == ["2"]


def test_phi_of_the_test_rows_is_the_same_from_the_cached_tokens_and_from_the_images():
    """The evaluation computes φ from the model's trunk tokens when that trunk is φ's (one
    linearized block), else from the images; both give the same features."""
    from server.evaluation import build_inputs, evaluation_features
    from tangent.exact_head.features import FeatureExtractor, FeatureSpec
    from tangent.protocol.spec import ModelSpec, build_model

    spec = ModelSpec.from_config(RUN_CONFIG)
    model, digest = build_model(spec, cached=False)
    extractor = FeatureExtractor.from_spec(spec, FeatureSpec.from_config(RUN_CONFIG))
    assert extractor.trunk_matches(model.trunk)
    deeper, _ = build_model(ModelSpec.from_config(RUN_CONFIG | {"linearized-blocks": 2}), cached=False)
    assert not extractor.trunk_matches(deeper.trunk)  # its trunk stops a block earlier: φ from images
    config = {"eval-subset": 48, "seed": 0}
    inputs, labels, from_cache = build_inputs(model, digest, 28, config, "fashion-mnist")
    assert from_cache and len(labels) == 48
    from_tokens, source = evaluation_features(extractor, inputs, True, 28, config, "fashion-mnist")
    assert source == "tokens"
    from_images, source = evaluation_features(extractor, None, False, 28, config, "fashion-mnist")
    assert source == "images"
    assert from_tokens.shape == from_images.shape == (48, extractor.dim)
    np.testing.assert_allclose(from_tokens, from_images, rtol=0, atol=1e-5)


def test_the_evaluation_reads_phi_from_the_phi_cache_of_the_test_set(tmp_path):
    """With a φ cache of the test set in cache-dir (tangent/exact_head/phi_cache.py, the sites' side of issue
    15), the evaluation reads φ from it instead of recomputing it; the values are φ's."""
    pytest.importorskip("tangent.exact_head.phi_cache")
    import torch

    from server.evaluation import evaluation_features, evaluation_indices
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_dataset, load_fashion_mnist, preprocess
    from tangent.exact_head.features import FeatureExtractor, FeatureSpec
    from tangent.exact_head.phi_cache import PhiCache
    from tangent.protocol.spec import ModelSpec

    x, y = load_fashion_mnist("test")
    np.savez(tmp_path / "test.npz", images=x[:60], labels=y[:60])
    images, _ = load_dataset(str(tmp_path / "test.npz"), "test")
    spec = ModelSpec.from_config(RUN_CONFIG)
    extractor = FeatureExtractor.from_spec(spec, FeatureSpec.from_config(RUN_CONFIG))
    with torch.no_grad():
        tokens = extractor.trunk(preprocess(images, 28)).numpy()
    PhiCache.build_or_open(extractor, tokens, cache_dir=tmp_path / "cache", data_digest=images_digest(images),
                           progress=False)
    config = {"cache-dir": str(tmp_path / "cache"), "eval-subset": 40, "seed": 0}
    indices = evaluation_indices(60, config)
    phi, source = evaluation_features(extractor, tokens[indices], True, 28, config, str(tmp_path / "test.npz"))
    assert source == "phi-cache" and phi.shape == (40, extractor.dim)
    np.testing.assert_allclose(phi, extractor.compute(tokens[indices]), rtol=0, atol=1e-6)
    _, source = evaluation_features(extractor, tokens[indices], True, 28, {"eval-subset": 40, "seed": 0},
                                    str(tmp_path / "test.npz"))
    assert source == "tokens"  # no cache-dir: computed
