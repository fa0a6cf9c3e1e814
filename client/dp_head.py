"""A DP site's exact-head release: Gaussian-perturbed statistics beside its DP-TAFT Δw.

The server asks for it with ``dp-head-epsilon`` in the train config (next to ``dp-epsilon``, the
DP-TAFT fit's) and sends the public row transform: ``dp-head-dim`` and ``dp-head-seed`` (the
seeded projection) and the centre as the ArrayRecord ``dp-head-centre`` (tangent/exact_head/dp.py).
The release is a second mechanism on the same data: the site's policy bounds it like any
contribution (``max-epsilon``), its budget is checked for both releases together before any data
is touched, and it is charged under its own entry (``<contribution-id>:head``) before the
statistics are computed and settled once they are out. Its noise is drawn from OS entropy.

The reply carries only the mechanism's output (tangent.exact_head.dp.privatize: noisy Gram, class
sums and counts; ``n`` and ``sums`` are post-processing of them) and the public parameters of the
mechanism, never the site's exact count.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.site import SiteError
from tangent.exact_head import dp

#: the DP head's train-config keys
EPSILON_KEY, DIM_KEY, SEED_KEY, WEIGHTS_KEY, BITS_KEY = (
    "dp-head-epsilon", "dp-head-dim", "dp-head-seed", "dp-head-weights", "dp-head-frac-bits")
REQUEST_KEYS = (EPSILON_KEY, DIM_KEY, SEED_KEY, WEIGHTS_KEY, BITS_KEY)
CENTRE_RECORD = "dp-head-centre"
#: μ² shares of (mean, Gram, class sums, counts): the centre is the server's, so no mean block here
DEFAULT_WEIGHTS = dp.RELEASE_WEIGHTS
DEFAULT_FRAC_BITS = 16


@dataclass(frozen=True)
class HeadRequest:
    epsilon: float
    transform: dp.RowTransform
    weights: tuple
    frac_bits: int


def head_request(content: RecordDict, config: Mapping[str, Any], policy) -> HeadRequest | None:
    """The DP head's request in a DP train message, after the site's policy; None if not asked."""
    epsilon = float(config.get(EPSILON_KEY, 0.0) or 0.0)
    if epsilon == 0.0:
        return None
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise SiteError("bad_request", f"{EPSILON_KEY} must be a positive finite number, got {epsilon}")
    if policy.max_epsilon is not None and epsilon > policy.max_epsilon:
        raise SiteError("epsilon_too_large", f"requested head ε={epsilon:g} exceeds this site's "
                                             f"max-epsilon={policy.max_epsilon:g}")
    try:
        dim, seed = int(config.get(DIM_KEY, 0)), int(config.get(SEED_KEY, 0))
        bits = int(config.get(BITS_KEY, DEFAULT_FRAC_BITS))
        weights = tuple(float(w) for w in str(config[WEIGHTS_KEY]).split(",")) if WEIGHTS_KEY in config \
            else DEFAULT_WEIGHTS
        dp.Allocation.from_weights(epsilon, 0.5, weights)  # validates the shares
        if min(weights[1:]) <= 0:
            raise ValueError(f"the Gram, class sums and counts each need a share > 0, got {weights}")
    except (TypeError, ValueError) as err:
        raise SiteError("bad_request", f"DP head: {err}") from err
    if dim < 0 or not 1 <= bits <= 24:
        raise SiteError("bad_request", f"DP head: {DIM_KEY} must be ≥ 0 and {BITS_KEY} in [1, 24]")
    centre = None
    if CENTRE_RECORD in content.array_records:
        record = content.array_records[CENTRE_RECORD]
        centre = np.asarray(record["centre"].numpy(), np.float64)
        if centre.ndim != 1 or not np.isfinite(centre).all():
            raise SiteError("bad_request", "DP head: the centre must be a finite vector")
    return HeadRequest(epsilon, dp.RowTransform(centre, dim, seed), weights, bits)


def head_statistics(extractor, data, num_classes: int, request: HeadRequest, *, exclude=(), chunk_rows: int = 2048):
    """The exact integer statistics of the site's transformed rows but the local positions
    ``exclude`` (rows it forgets), never sent as they are."""
    from client.stats import keep_positions, site_features

    positions = keep_positions(data.num_examples, exclude)
    labels = np.asarray(data.labels)
    total = None
    for start in range(0, len(positions), chunk_rows):
        chunk = positions[start:start + chunk_rows]
        phi = site_features(extractor, data, chunk)
        if request.transform.centre is not None and request.transform.centre.shape != (phi.shape[1],):
            raise SiteError("bad_request", f"DP head: centre of width {request.transform.centre.shape} "
                                           f"for φ of width {phi.shape[1]}")
        part = dp.exact_release_stats(request.transform.rows(phi), labels[chunk], num_classes, request.frac_bits)
        total = part if total is None else total + part
    return total


def release(extractor, data, num_classes: int, request: HeadRequest, delta: float, budget,
            contribution_id: str, *, exclude=()) -> dict:
    """Charge the site's budget, perturb, and return the reply's ``stats`` and ``stats-meta``.
    ``exclude``: local row positions left out (:func:`forget_release`)."""
    entry = f"{contribution_id}:head"
    if budget is not None:  # charged before the data is read: a crash after leaves it spent
        budget.reserve(entry, request.epsilon, delta, kind="exact-head")
    allocation = dp.Allocation.from_weights(request.epsilon, delta, request.weights)
    exact = head_statistics(extractor, data, num_classes, request, exclude=exclude)
    noisy = dp.privatize(exact, allocation, np.random.default_rng(secrets.randbits(128)))
    del exact
    if budget is not None:
        budget.settle(entry, request.epsilon, delta, kind="exact-head")
    meta = noisy.meta() | {
        "feature-digest": extractor.digest(), "dp": True, "dp-head-epsilon": float(request.epsilon),
        "dp-head-delta": float(delta), "dp-head-noise-variance": float(noisy.dp["noise_variance"]),
        "dp-head-sigma-gram": allocation.block_sigma("gram"), "dp-head-sigma-cross": allocation.block_sigma("cross"),
        "dp-head-sigma-counts": allocation.block_sigma("counts"), "dp-head-mechanism": dp.MECHANISM,
        DIM_KEY: int(request.transform.projection_dim), SEED_KEY: int(request.transform.seed),
        "dp-head-centre-digest": dp.centre_digest(request.transform.centre),
        "contribution-id": entry}
    record = ArrayRecord({name: Array(array) for name, array in noisy.to_arrays().items()}, keep_input=False)
    return {"stats": record, "stats-meta": ConfigRecord(meta)}


def forget_release(extractor, data, num_classes: int, request: HeadRequest, delta: float, budget,
                   exclude) -> tuple[str, dict]:
    """Forget rows at a DP site: a *fresh* release of the remaining rows (new noise, a new
    contribution id), charged to the budget again like any release — the old release stays spent,
    what was published cannot be taken back — and meant to replace the site's release in the
    statistics ledger (server.exact_head.replace_release). A budget that cannot pay refuses before
    any data is read (tangent.training.budget.BudgetExhausted). Returns (contribution id, the
    release's ``stats`` and ``stats-meta``)."""
    if budget is not None:
        budget.check(request.epsilon, delta)
    contribution_id = secrets.token_hex(16)
    return contribution_id, release(extractor, data, num_classes, request, delta, budget, contribution_id,
                                    exclude=exclude)
