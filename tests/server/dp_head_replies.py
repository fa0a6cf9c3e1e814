"""Helpers for the DP head's server tests: real DP releases (tangent.exact_head.dp.site_centred_release) of
random rows, in real Flower train replies as client/dp_head.py writes them, and the server's
expectation of a DP run (server.exact_head.ExactHead with a DPHeadRequest), and a DP run's two
ledgers and strategy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from server.exact_head import DPHeadRequest, ExactHead
from server.ledger import Ledger
from server.ledger.ledgers import Ledgers
from server.strategy import LedgerFedAvg
from tangent.exact_head import dp
from tests.server.exact_head_replies import (BASE, FEATURE_DIGEST, FEATURE_SPEC, K, P, SHAPES, SPEC, build, delta,
                                             reply_parts)

#: the DP head's rows: φ of P dims, centred, projected to DIM dims, unit norm, on a 2^-BITS grid
DIM, SEED, BITS = 4, 3, 16
CENTRE = np.linspace(-0.2, 0.3, P)
#: the run's dp-epsilon (a contribution's total: reply_parts' DP reply claims exactly this) and the head's share
REQUEST_EPSILON, SHARE = 2.0, 0.9
#: the δ and contribution id of reply_parts' DP reply
DELTA = 1e-6
CONTRIBUTION = "ab" * 16
#: the head's release alone: its share of the request at DELTA
HEAD_EPSILON = dp.head_epsilon(REQUEST_EPSILON, DELTA, SHARE)


def dp_request(epsilon: float = REQUEST_EPSILON, dim: int = DIM, seed: int = SEED, share: float = SHARE) -> DPHeadRequest:
    return DPHeadRequest(epsilon, share, dim, seed, BITS, CENTRE)


def description() -> dict:
    """server.exact_head.describe_features' answer for the test φ (P dims)."""
    return {"feature-spec": dict(FEATURE_SPEC), "feature-digest": FEATURE_DIGEST, "num-features": P,
            "num-classes": K, "clip-norm": 2.0, "frac-bits": BITS,
            "stats-meta": {"num-features": P, "num-classes": K, "clip-norm": 2.0, "frac-bits": BITS},
            "dp-head-centre": CENTRE}


def exact_head(request: DPHeadRequest | None = None) -> ExactHead:
    return ExactHead.from_description(description(), SPEC, request or dp_request())


def release(seed: int, n: int, epsilon: float = HEAD_EPSILON, *, transform: dp.RowTransform | None = None,
            contribution: str = CONTRIBUTION):
    """A site's DP release of n random rows and its stats-meta, exactly as client/dp_head.release writes it."""
    rng = np.random.default_rng(seed)
    transform = transform or dp.RowTransform(CENTRE, DIM, SEED)
    phi = rng.standard_normal((n, P))
    allocation = dp.Allocation.from_weights(epsilon, DELTA, dp.RELEASE_WEIGHTS)
    noisy = dp.site_centred_release(transform.rows(phi), rng.integers(0, K, n), K, BITS, allocation, rng)
    meta = dp.declared_meta(noisy, transform, f"{contribution}:head") | {"feature-digest": FEATURE_DIGEST}
    return noisy, meta


def dp_reply_parts(site: str, seed: int, n: int, epsilon: float = HEAD_EPSILON, **kwargs) -> dict:
    """A DP site's whole reply (Δw, metrics, meta, stats, stats-meta) as editable parts."""
    from flwr.app import Array

    noisy, meta = release(seed, n, epsilon, **kwargs)
    return reply_parts(site, delta(seed), n, dp=True) | {
        "stats": ("array", {k: Array(v) for k, v in noisy.to_arrays().items()}), "stats-meta": ("config", meta)}


# ----------------------------------------------------------------------------- a DP run's ledgers and strategy

HEAD = exact_head()

SIZES = {"1": 90, "2": 120, "3": 70}


def open_ledgers(directory: Path, head=HEAD) -> Ledgers:
    directory.mkdir(parents=True, exist_ok=True)
    return Ledgers(Ledger.open(directory / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=100.0,
                               expected_spec=SHAPES),
                   Ledger.open(directory / "exact_head.sqlite", family="stats", model_card=head.model_card,
                               expected_base_digest=FEATURE_DIGEST))


def strategy(ledgers: Ledgers) -> LedgerFedAvg:
    return LedgerFedAvg(ledgers.delta, SPEC, BASE, stats_ledger=ledgers.stats, exact_head=HEAD.expectation,
                        require_dp=True, train_records=HEAD.train_records(),
                        min_available_nodes=1, min_train_nodes=1, min_evaluate_nodes=1)


def replies(sites) -> list:
    return [build(dp_reply_parts(site, int(site), SIZES[site]), 900 + int(site)) for site in sites]
