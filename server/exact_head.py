"""The server's side of the exact head (issue 15): φ's extractor and digest, what the train message
announces, what a reply's statistics must match, and the statistics ledger's model card.

The server builds the same ``tangent.features.FeatureExtractor`` the sites build (pretrained
backbone of the model spec + the run config's FeatureSpec) and sends its digest in the train
message's spec (contract 7b): a site whose φ differs refuses (``feature_digest_mismatch``), and a
reply whose statistics name another digest is refused here (server.replies). The statistics
ledger pins the model card (contract 7d) when it is created, so statistics of another φ, grid or
model can never be summed with the ones it holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from server import config as cfg
from server.replies import StatsExpectation


@dataclass
class ExactHead:
    extractor: Any  # tangent.features.FeatureExtractor (freed by the evaluation once φ exists)
    feature_spec: Any  # tangent.features.FeatureSpec
    feature_digest: str
    expectation: StatsExpectation
    model_card: dict

    @classmethod
    def build(cls, model_spec, run_config: Mapping[str, Any]) -> "ExactHead":
        from tangent.exact_head import SufficientStats
        from tangent.features import FeatureExtractor

        feature_spec = cfg.feature_spec(run_config)
        extractor = FeatureExtractor.from_spec(model_spec, feature_spec)
        digest = extractor.digest()
        grid = SufficientStats.zeros(extractor.dim, model_spec.num_classes, feature_spec.clip_norm,
                                     feature_spec.frac_bits).meta()
        expectation = StatsExpectation(digest, extractor.dim, model_spec.num_classes, feature_spec.clip_norm,
                                       feature_spec.frac_bits)
        card = {"stats-meta": grid, "feature-spec": feature_spec.to_config(), "model-spec": model_spec.to_config(),
                "feature-digest": digest}
        return cls(extractor, feature_spec, digest, expectation, card)

    def spec_keys(self) -> dict[str, Any]:
        """What the train message's "spec" ConfigRecord adds (contract 7b)."""
        return {"exact-head": True, **self.feature_spec.to_config(), "feature-digest": self.feature_digest}

    @property
    def bytes_per_site(self) -> int:
        """Bytes of one site's statistics as sent (int64: n, counts, sums, packed gram, cross)."""
        p, k = self.expectation.num_features, self.expectation.num_classes
        return 8 * (1 + k + p + p * (p + 1) // 2 + p * k)

    def report(self) -> dict[str, Any]:
        return {"feature_digest": self.feature_digest, "num_features": self.expectation.num_features,
                "bytes_per_site": self.bytes_per_site, "feature_spec": self.feature_spec.to_config()}
