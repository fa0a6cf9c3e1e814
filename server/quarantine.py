"""Quarantine: a site's contributions are recorded, but enter the composed models only when admitted.

No check on the numbers can refuse a *consistent* poisoner — a site that relabels its own data, or
sends the statistics of data it made up, sends arrays no different in kind from an honest site's.
What one site can move is bounded by its share (deploy/README.md, threat model), and with the run
config ``quarantine = true`` the operator can also hold every contribution back until it is reviewed:

- the strategy records each reply, with exactly the checks of a normal run (the same
  :func:`server.strategy.record`, the same ledger families and admission policy), into the
  quarantine's own pair of ledgers (``<state>/quarantine/ledger.sqlite`` and, with the exact head,
  ``<state>/quarantine/exact_head.sqlite``), linked from the state's Δ ledger;
- ``taft-ledger admit SITE --reason TXT`` (:func:`admit`) moves the site's held contribution into the
  composed models — through :func:`server.strategy.record` again — and retracts it from the quarantine;
- a removal, withdrawal or forgetting reaches the quarantine too (:class:`server.ledger.ledgers.Ledgers`
  includes it), so a held contribution never outlives its site's consent.

Off by default: ``make simulate`` is unchanged.
"""
from __future__ import annotations

from server.ledger import LedgerError
from server.ledger.ledgers import Ledgers
from server.replies import Contribution
from server.strategy import record

#: the quarantine's folder in the state directory, and its ledgers' names there
FOLDER = "quarantine"


def held_contribution(held: Ledgers, site_id: str) -> Contribution:
    """The site's held contribution, rebuilt as the reply the strategy parsed (Δw, metadata, statistics)."""
    from tangent.exact_head.statistics import SufficientStats

    active = held.delta.contributions(site_id=site_id, status="active")
    if not active:
        raise LedgerError(f"site {site_id} has no contribution in quarantine")
    row = active[0]
    meta = {"epsilon": row.epsilon, "delta_dp": row.delta_dp, "dp_settings": row.dp_settings,
            "shard_fingerprint": row.shard_fingerprint, "base_digest": row.base_digest,
            "train_config": row.train_config, "extra": row.extra}
    stats, digest = None, None
    held_stats = [] if held.stats is None else held.stats.contributions(site_id=site_id, status="active")
    if held_stats:
        arrays = held.stats.contribution_delta(held_stats[0].id)
        stats = SufficientStats.from_arrays(arrays, held.stats.model_card["stats-meta"])
        digest = held_stats[0].base_digest
    return Contribution(site_id, held.delta.contribution_delta(row.id), row.num_examples, meta, {},
                        dp=row.epsilon is not None, stats=stats, feature_digest=digest)


def admit(ledgers: Ledgers, site_id: str, reason: str):
    """Move ``site_id``'s held contribution into the composed models (the checks of a reply apply
    again), then retract it from the quarantine. Returns the Δ ledger's new ModelVersion."""
    if ledgers.held is None:
        raise LedgerError(f"{ledgers.delta.path} has no quarantine")
    contribution = held_contribution(ledgers.held, site_id)
    main = Ledgers(ledgers.delta, ledgers.stats)
    if contribution.stats is not None and main.stats is None:
        raise LedgerError("the held contribution carries statistics but the state has no statistics ledger")
    version, _ = record(main, contribution)
    ledgers.held.retract(site_id, reason=f"admitted by the operator: {reason}")
    return version


def validation_admits(current, candidate, features, labels, tolerance: float = 0.01) -> tuple[bool, float, float]:
    """A server-held validation check for the exact head: (admit?, accuracy without, accuracy with).

    ``current``: the composed statistics (SufficientStats, or None when nothing is composed yet);
    ``candidate``: the held statistics; ``features``/``labels``: a validation split the *server* holds
    (φ rows, never a site's). Admit when the head solved with the candidate loses at most ``tolerance``
    of validation accuracy. A rule for the operator's review, not a proof: a poisoner that costs less
    than ``tolerance`` passes (benchmarks/poisoning.py measures it)."""
    import numpy as np

    from tangent.exact_head.statistics import solve

    def accuracy(stats) -> float:
        return float((solve(stats).predict(features) == np.asarray(labels)).mean())

    without = accuracy(current) if current is not None and current.n > 1 else 0.0
    with_candidate = accuracy(candidate if current is None else current + candidate)
    return with_candidate >= without - tolerance, without, with_candidate


def held_sites(ledgers: Ledgers) -> list[str]:
    """Sites with a contribution waiting in quarantine."""
    if ledgers.held is None:
        return []
    return sorted({c.site_id for c in ledgers.held.delta.contributions(status="active")})
