"""A DP site's exact-head release: Gaussian-perturbed statistics beside its DP-TAFT Δw.

The server asks for it with ``dp-head-share`` in the train config (next to ``dp-epsilon``, the
contribution's total ε) and sends the public row transform: ``dp-head-dim`` and ``dp-head-seed``
(the seeded projection) and the centre as the ArrayRecord ``dp-head-centre``
(tangent/exact_head/dp.py). The release is a second mechanism on the same data, and the site
accounts for both in ONE accountant: the head takes ``share`` of the contribution's μ²
(tangent.exact_head.dp.head_epsilon), it is added to DP-SGD's accountant as a full-batch Gaussian
step (tangent.training.privacy.Companion), and DP-TAFT's σ is calibrated so that the composition
spends at most ``dp-epsilon`` at δ. The contribution's budget entry is that composition (with what
each part would cost alone), charged before any data is read. Its noise is drawn from OS entropy.

The reply carries only the mechanism's output (tangent.exact_head.dp.site_centred_release: noisy
counts and Σ of the publicly transformed rows, then the noisy Gram and class sums of those rows
centred on the site's own noisy mean; ``n`` is post-processing of the counts) and the public
parameters of the mechanism, never the site's exact count.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client.site import SiteError
from tangent.exact_head import dp

#: the DP head's train-config keys
SHARE_KEY, DIM_KEY, SEED_KEY, WEIGHTS_KEY, BITS_KEY = (
    "dp-head-share", "dp-head-dim", "dp-head-seed", "dp-head-weights", "dp-head-frac-bits")
REQUEST_KEYS = (SHARE_KEY, DIM_KEY, SEED_KEY, WEIGHTS_KEY, BITS_KEY)
CENTRE_RECORD = "dp-head-centre"
#: μ² shares of (mean, Gram, class sums, counts)
DEFAULT_WEIGHTS = dp.RELEASE_WEIGHTS
DEFAULT_FRAC_BITS = 16
#: the name of the head's part of a contribution (budget entries, tangent.training.privacy.Companion)
PART = "exact-head"
#: in the site's state-dir: the run's spec and the DP head's request of its last release (client.forget)
REQUEST_FILE = "dp-head-request.json"


@dataclass(frozen=True)
class HeadRequest:
    share: float            # of the contribution's μ² (0 < share < 1)
    transform: dp.RowTransform
    weights: tuple
    frac_bits: int

    def epsilon(self, total_epsilon: float, delta: float) -> float:
        """ε of the release alone in a contribution of (``total_epsilon``, δ)."""
        return dp.head_epsilon(total_epsilon, delta, self.share)

    def companion(self, total_epsilon: float, delta: float):
        """The release as a companion of DP-SGD in the contribution's accountant: its σ is the one
        :func:`release` draws with (sensitivity 1 per unit of μ)."""
        from tangent.training.privacy import Companion

        epsilon = self.epsilon(total_epsilon, delta)
        return Companion(PART, dp.Allocation.from_weights(epsilon, delta, self.weights).sigma, epsilon)


def head_request(content: RecordDict, config: Mapping[str, Any]) -> HeadRequest | None:
    """The DP head's request in a DP train message; None if not asked. (The site's policy bounds
    the contribution's total ε, which the head's share is part of.)"""
    try:
        share = float(config.get(SHARE_KEY, 0.0) or 0.0)
    except (TypeError, ValueError) as err:
        raise SiteError("bad_request", f"{SHARE_KEY} is not a number") from err
    if share == 0.0:
        return None
    if not 0 < share < 1:
        raise SiteError("bad_request", f"{SHARE_KEY} must be in (0, 1), got {share}")
    try:
        dim, seed = int(config.get(DIM_KEY, 0)), int(config.get(SEED_KEY, 0))
        bits = int(config.get(BITS_KEY, DEFAULT_FRAC_BITS))
        weights = tuple(float(w) for w in str(config[WEIGHTS_KEY]).split(",")) if WEIGHTS_KEY in config \
            else DEFAULT_WEIGHTS
        dp.Allocation.from_weights(1.0, 0.5, weights)  # validates the shares
        if min(weights) <= 0:
            raise ValueError(f"the mean, Gram, class sums and counts each need a share > 0, got {weights}")
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
    return HeadRequest(share, dp.RowTransform(centre, dim, seed), weights, bits)


def public_rows(extractor, data, request: HeadRequest, *, exclude=(), chunk_rows: int = 2048):
    """(u, labels): the site's rows through the public transform (k floats a row, kept in memory
    because the release reads them twice) but the local positions ``exclude`` (rows it forgets);
    never sent as they are."""
    from client.stats import keep_positions, site_features

    positions = keep_positions(data.num_examples, exclude)
    parts = []
    for start in range(0, len(positions), chunk_rows):
        chunk = positions[start:start + chunk_rows]
        phi = site_features(extractor, data, chunk)
        if request.transform.centre is not None and request.transform.centre.shape != (phi.shape[1],):
            raise SiteError("bad_request", f"DP head: centre of width {request.transform.centre.shape} "
                                           f"for φ of width {phi.shape[1]}")
        parts.append(request.transform.rows(phi))
    return np.concatenate(parts), np.asarray(data.labels)[positions]


def release(extractor, data, num_classes: int, request: HeadRequest, epsilon: float, delta: float,
            contribution_id: str, *, budget=None, exclude=()) -> dict:
    """Perturb at (``epsilon``, δ) and return the reply's ``stats`` and ``stats-meta``.

    ``budget``: charge the release alone under ``<contribution_id>:head`` before the data is read
    (:func:`forget_release`); None when the release is already charged as a part of the
    contribution's composed entry (a train reply). ``exclude``: local row positions left out."""
    entry = f"{contribution_id}:head"
    if budget is not None:  # charged before the data is read: a crash after leaves it spent
        budget.reserve(entry, epsilon, delta, kind=PART, alone={PART: float(epsilon)})
    allocation = dp.Allocation.from_weights(epsilon, delta, request.weights)
    rows, labels = public_rows(extractor, data, request, exclude=exclude)
    noisy = dp.site_centred_release(rows, labels, num_classes, request.frac_bits, allocation,
                                    np.random.default_rng(secrets.randbits(128)))
    del rows
    if budget is not None:
        budget.settle(entry, epsilon, delta, kind=PART, alone={PART: float(epsilon)})
    meta = dp.declared_meta(noisy, request.transform, entry) | {"feature-digest": extractor.digest()}
    record = ArrayRecord({name: Array(array) for name, array in noisy.to_arrays().items()}, keep_input=False)
    return {"stats": record, "stats-meta": ConfigRecord(meta)}


def forget_release(extractor, data, num_classes: int, request: HeadRequest, epsilon: float, delta: float,
                   budget, exclude) -> tuple[str, dict]:
    """Forget rows at a DP site: a *fresh* release of the remaining rows at (``epsilon``, δ) (new
    noise, a new contribution id), charged to the budget alone — the old release stays spent, what
    was published cannot be taken back — and meant to replace the site's release in the statistics
    ledger (server.exact_head.replace_release). A budget that cannot pay refuses before any data is
    read (tangent.training.budget.BudgetExhausted). Returns (contribution id, the release's
    ``stats`` and ``stats-meta``)."""
    if budget is not None:
        budget.check(epsilon, delta)
    contribution_id = secrets.token_hex(16)
    return contribution_id, release(extractor, data, num_classes, request, epsilon, delta, contribution_id,
                                    budget=budget, exclude=exclude)


def remember_request(state_dir, spec_record, request: HeadRequest, epsilon: float, delta: float) -> None:
    """Save what a forget release needs to be checked like this one (client.forget): the run's spec
    (model and feature settings, feature digest), the transform (centre included), the weights and
    the grid, and the release's own (ε, δ) — public values only, never the data. ``<state-dir>/``
    :data:`REQUEST_FILE`, 0600; nothing without a state-dir."""
    import json
    import os

    if state_dir is None:
        return
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    transform = request.transform
    document = {"spec": dict(spec_record), "epsilon": float(epsilon), "delta": float(delta),
                "share": request.share, "weights": list(request.weights), "frac-bits": request.frac_bits,
                "dim": transform.projection_dim, "seed": transform.seed,
                "centre": None if transform.centre is None else [float(v) for v in transform.centre]}
    path = state_dir / REQUEST_FILE
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(document, handle, sort_keys=True)
    os.replace(temporary, path)


def remembered_request(path) -> tuple[dict, HeadRequest, float, float]:
    """(the run's spec record, the head request, ε, δ) saved by :func:`remember_request`;
    ValueError when the file is missing or incomplete."""
    import json

    try:
        document = json.loads(path.read_text())
        centre = document["centre"]
        request = HeadRequest(float(document["share"]),
                              dp.RowTransform(None if centre is None else np.asarray(centre, np.float64),
                                              int(document["dim"]), int(document["seed"])),
                              tuple(float(w) for w in document["weights"]), int(document["frac-bits"]))
        return dict(document["spec"]), request, float(document["epsilon"]), float(document["delta"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"DP head request {path}: {err}") from None
