"""The server's side of the exact head: φ's extractor and digest, what the train message
announces, what a reply's statistics must match, and the statistics ledger's model card.

The server builds (in a child process: torch never enters the ServerApp, server.model_process) the
same ``tangent.exact_head.features.FeatureExtractor`` the sites build (pretrained
backbone of the model spec + the run config's FeatureSpec) and sends its digest in the train
message's spec: a site whose φ differs refuses (``feature_digest_mismatch``), and a
reply whose statistics name another digest is refused here (server.replies). The statistics
ledger pins the model card when it is created, so statistics of another φ, grid or
model can never be summed with the ones it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from server.replies import StatsExpectation


def describe_features(model_spec_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the ServerApp needs of φ, computed in a child process (server.model_process): the
    FeatureExtractor loads the pretrained backbone and imports torch. Plain values only."""
    from server import config as cfg
    from tangent.exact_head.statistics import SufficientStats
    from tangent.exact_head.features import FeatureExtractor
    from tangent.protocol.spec import ModelSpec

    model_spec = ModelSpec.from_config(dict(model_spec_config))
    feature_spec = cfg.feature_spec(run_config)
    extractor = FeatureExtractor.from_spec(model_spec, feature_spec)
    grid = SufficientStats.zeros(extractor.dim, model_spec.num_classes, feature_spec.clip_norm,
                                 feature_spec.frac_bits).meta()
    return {"feature-spec": feature_spec.to_config(), "feature-digest": extractor.digest(),
            "num-features": int(extractor.dim), "num-classes": int(model_spec.num_classes),
            "clip-norm": float(feature_spec.clip_norm), "frac-bits": int(feature_spec.frac_bits), "stats-meta": grid}


@dataclass
class ExactHead:
    feature_config: dict  # tangent.exact_head.features.FeatureSpec.to_config() (the spec itself imports torch)
    feature_digest: str
    expectation: StatsExpectation
    model_card: dict

    @classmethod
    def from_description(cls, description: Mapping[str, Any], model_spec_config: Mapping[str, Any]) -> "ExactHead":
        """From :func:`describe_features`' answer (run in a child process)."""
        digest = str(description["feature-digest"])
        expectation = StatsExpectation(digest, int(description["num-features"]), int(description["num-classes"]),
                                       float(description["clip-norm"]), int(description["frac-bits"]))
        card = {"stats-meta": dict(description["stats-meta"]), "feature-spec": dict(description["feature-spec"]),
                "model-spec": dict(model_spec_config), "feature-digest": digest}
        return cls(dict(description["feature-spec"]), digest, expectation, card)

    def spec_keys(self) -> dict[str, Any]:
        """What the train message's "spec" ConfigRecord adds: the feature spec and its digest."""
        return {"exact-head": True, **self.feature_config, "feature-digest": self.feature_digest}

    @property
    def bytes_per_site(self) -> int:
        """Bytes of one site's statistics as sent (int64: n, counts, sums, packed gram, cross)."""
        p, k = self.expectation.num_features, self.expectation.num_classes
        return 8 * (1 + k + p + p * (p + 1) // 2 + p * k)

    def report(self) -> dict[str, Any]:
        return {"feature_digest": self.feature_digest, "num_features": self.expectation.num_features,
                "bytes_per_site": self.bytes_per_site, "feature_spec": self.feature_config}
