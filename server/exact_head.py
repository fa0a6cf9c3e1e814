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

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from server.replies import DPHeadExpectation, StatsExpectation

#: the train message's ArrayRecord holding the DP head's public centre (client/dp_head.py)
CENTRE_RECORD = "dp-head-centre"


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
    described = {"feature-spec": feature_spec.to_config(), "feature-digest": extractor.digest(),
                 "num-features": int(extractor.dim), "num-classes": int(model_spec.num_classes),
                 "clip-norm": float(feature_spec.clip_norm), "frac-bits": int(feature_spec.frac_bits),
                 "stats-meta": grid}
    if cfg.dp_head_enabled(run_config):  # the DP head's public centre: φ of seeded synthetic images
        from tangent.exact_head.public_centre import public_centre

        described["dp-head-centre"] = np.asarray(public_centre(extractor), np.float64)
    return described


def dp_head_request(run_config, description: Mapping[str, Any]) -> DPHeadRequest | None:
    """The run's DP head (server.config.dp_head_enabled), its centre from :func:`describe_features`."""
    from server import config as cfg
    from tangent.protocol.config import as_run_config

    if not cfg.dp_head_enabled(run_config):
        return None
    run = as_run_config(run_config)
    return DPHeadRequest(float(run.dp_epsilon), float(run.dp_head_share), int(run.dp_head_dim), int(run.dp_head_seed),
                         int(run.frac_bits), np.asarray(description["dp-head-centre"], np.float64))


@dataclass(frozen=True)
class DPHeadRequest:
    """The DP head of a DP run (server.config.dp_head_enabled): the sites release noisy statistics
    of the rows u = P(φ − c)/‖P(φ − c)‖ (tangent.exact_head.dp.RowTransform), each site centring
    them again on its own noisy mean (tangent.exact_head.dp.site_centred_release), with ``share``
    of the μ² of a contribution of ε ≤ ``epsilon`` (the run's dp-epsilon: DP-TAFT and the head
    composed). ``centre`` c is public (tangent.exact_head.public_centre: seeded synthetic images,
    computed by server.model_process) and a site's own centre depends on its rows only, so
    removing a site removes every trace of it."""

    epsilon: float
    share: float
    dim: int  # k (0: no projection, the rows keep φ's p dimensions)
    seed: int
    frac_bits: int
    centre: np.ndarray = field(repr=False)

    @property
    def centre_digest(self) -> str:
        from tangent.exact_head.dp import centre_digest

        return centre_digest(self.centre)

    def num_features(self, phi_dim: int) -> int:
        return self.dim or phi_dim

    def expectation(self) -> DPHeadExpectation:
        from tangent.exact_head.dp import RELEASE_WEIGHTS

        return DPHeadExpectation(self.epsilon, self.share, self.dim, self.seed, self.centre_digest, RELEASE_WEIGHTS)

    def card(self) -> dict[str, Any]:
        """The statistics ledger's card entry: releases of other rows (k, seed, centre) or exact
        statistics can never be summed with these."""
        from tangent.exact_head.dp import MECHANISM

        return {"dp": True, "mechanism": MECHANISM, "dim": self.dim, "seed": self.seed,
                "centre-digest": self.centre_digest}

    def transform(self):
        from tangent.exact_head.dp import RowTransform

        return RowTransform(np.asarray(self.centre, np.float64), self.dim, self.seed)

    def train_records(self) -> dict[str, Any]:
        """What the train message carries beside "spec" and "config": the centre."""
        from flwr.app import Array, ArrayRecord

        return {CENTRE_RECORD: ArrayRecord({"centre": Array(np.asarray(self.centre, np.float64))})}


@dataclass
class ExactHead:
    feature_config: dict  # tangent.exact_head.features.FeatureSpec.to_config() (the spec itself imports torch)
    feature_digest: str
    expectation: StatsExpectation
    model_card: dict
    dp_head: DPHeadRequest | None = None

    @classmethod
    def from_description(cls, description: Mapping[str, Any], model_spec_config: Mapping[str, Any],
                         dp_head: DPHeadRequest | None = None) -> "ExactHead":
        """From :func:`describe_features`' answer (run in a child process). With ``dp_head`` the
        statistics are the DP head's releases: grid (k, classes, clip 1, frac-bits) and the card
        pins the transform, so they never share a ledger with exact statistics."""
        digest = str(description["feature-digest"])
        num_classes = int(description["num-classes"])
        if dp_head is None:
            expectation = StatsExpectation(digest, int(description["num-features"]), num_classes,
                                           float(description["clip-norm"]), int(description["frac-bits"]))
            meta = dict(description["stats-meta"])
        else:
            expectation = StatsExpectation(digest, dp_head.num_features(int(description["num-features"])),
                                           num_classes, 1.0, dp_head.frac_bits, dp_head.expectation())
            meta = {key: expectation.grid[key] for key in ("num-features", "num-classes", "clip-norm", "frac-bits")}
        card = {"stats-meta": meta, "feature-spec": dict(description["feature-spec"]),
                "model-spec": dict(model_spec_config), "feature-digest": digest}
        if dp_head is not None:
            card["dp-head"] = dp_head.card()
        return cls(dict(description["feature-spec"]), digest, expectation, card, dp_head)

    def spec_keys(self) -> dict[str, Any]:
        """What the train message's "spec" ConfigRecord adds: the feature spec and its digest."""
        return {"exact-head": True, **self.feature_config, "feature-digest": self.feature_digest}

    def train_records(self) -> dict[str, Any]:
        """Records the train message carries beside "spec" and "config" (the DP head's centre)."""
        return {} if self.dp_head is None else self.dp_head.train_records()

    def composed(self, stats_ledger):
        """The statistics ledger's composed statistics, ready for the solver (None: nothing active).
        DP releases: ``dp`` holds Σ of the active releases' declared noise variances (math.fsum:
        exactly rounded, whatever the order) and the transform the solver rebuilds their rows with."""
        total = stats_ledger.composed_stats()
        if total is None or self.dp_head is None:
            return total
        return with_release_noise(total, stats_ledger, self.dp_head)

    @property
    def bytes_per_site(self) -> int:
        """Bytes of one site's statistics as sent (int64: n, counts, sums, packed gram, cross)."""
        p, k = self.expectation.num_features, self.expectation.num_classes
        return 8 * (1 + k + p + p * (p + 1) // 2 + p * k)

    def report(self) -> dict[str, Any]:
        return {"feature_digest": self.feature_digest, "num_features": self.expectation.num_features,
                "bytes_per_site": self.bytes_per_site, "feature_spec": self.feature_config}


def with_release_noise(total, stats_ledger, dp_head: DPHeadRequest):
    """``total`` (the ledger's composed DP releases) with their summed declared noise and the
    transform: what tangent.exact_head.dp.solve_release reads."""
    active = stats_ledger.contributions(status="active")
    variances = [float((c.dp_settings or {}).get("noise_variance", math.nan)) for c in active]
    if not variances or not all(math.isfinite(v) and v >= 0 for v in variances):
        raise ValueError("the statistics ledger holds a contribution without a declared DP noise variance")
    total.dp = {"releases": len(variances), "noise_variance": math.fsum(variances),
                "transform": {"centre": np.asarray(dp_head.centre, np.float64), "dim": dp_head.dim,
                              "seed": dp_head.seed}}
    return total


def solve_dp_head(total):
    """The DP head of composed releases (``total.dp`` from :func:`with_release_noise`): the solver
    of tangent.exact_head.dp on the noisy sums and their summed declared noise only."""
    from tangent.exact_head import dp

    transform = total.dp["transform"]
    return dp.solve_release(total, dp.RowTransform(np.asarray(transform["centre"], np.float64),
                                                   int(transform["dim"]), int(transform["seed"])),
                            site_centred=True)  # the card pins the mechanism: every release is site-centred


def replace_release(stats_ledger, site: str, record, meta: Mapping[str, Any], expectation: StatsExpectation, *,
                    delta: float, contribution_id: str, extra: Mapping[str, Any] | None = None):
    """A DP site forgets rows: its fresh release of the remaining rows (client.dp_head.forget_release:
    ``record`` its ``stats`` ArrayRecord, ``meta`` its ``stats-meta``) replaces its active release in
    the statistics ledger — the old release, its noise included, is subtracted exactly. Checked like
    a reply's release (server.replies.parse_dp_release: transform, ε ≤ the request, δ, declared
    noise, post-processed n; :class:`server.replies.Rejected` otherwise). The site's DP-TAFT Δw is
    not touched: it was trained on the forgotten rows under its own (ε, δ) bound, and leaves only
    with a retrained Δw or the site's removal (a signed forget request retracts it:
    server/trust/forgetting.py). ``extra``: what the ledger records beside the contribution id.
    Returns the statistics ledger's new version."""
    from server.ledger import RejectedContribution
    from server.replies import Rejected, parse_dp_release

    if expectation.dp_head is None:
        raise ValueError("this run's statistics are not the DP head's releases")
    active = stats_ledger.contributions(site_id=site, status="active")
    if not active:
        raise Rejected("not_active", "the site has no active release to replace", site)
    stats, _, _ = parse_dp_release(record, dict(meta), expectation,
                                   {"delta_dp": delta, "extra": {"contribution_id": contribution_id}}, site)
    try:
        return stats_ledger.replace(
            site, stats.to_arrays(), num_examples=active[0].num_examples, base_digest=expectation.feature_digest,
            epsilon=stats.dp["epsilon"], delta_dp=stats.dp["delta"],
            dp_settings={"dp": True, "mechanism": stats.dp["mechanism"], "noise_variance": stats.dp["noise_variance"]},
            extra={**(extra or {}), "contribution_id": contribution_id, "forget": True})
    except RejectedContribution as err:
        raise Rejected(err.reason, err.detail, site) from None
