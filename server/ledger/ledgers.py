"""The server's two ledgers as one: the TAFT Δw ledger and, with the exact head on, the statistics ledger.

A site is in both models or in neither: removing a site — ``remove-sites``
in the simulation, a signed withdrawal in a deployment (``server.trust.withdrawal.apply_withdrawal``
accepts a :class:`Ledgers` as its ledger) — subtracts it from both and marks it withdrawn in both,
so neither model can take it back without the operator's audited ``readmit``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.ledger import Ledger

log = logging.getLogger("taft.server")


@dataclass
class Ledgers:
    """``delta``: the TAFT Δw ledger; ``stats``: the exact head's statistics ledger (None when off)."""

    delta: "Ledger"
    stats: "Ledger | None" = None

    @classmethod
    def of(cls, ledger: "Ledger | Ledgers") -> "Ledgers":
        """A :class:`Ledgers` as it is, a lone Δ ledger wrapped (exact head off)."""
        return ledger if isinstance(ledger, Ledgers) else cls(ledger)

    def all(self) -> list["Ledger"]:
        return [led for led in (self.delta, self.stats) if led is not None]

    def remove(self, site_id: str, reason: str = "withdrawn") -> bool:
        """Subtract ``site_id`` from every ledger and mark it withdrawn there (``Ledger.remove``).

        True when any ledger changed; False only when the site was already withdrawn everywhere
        (the withdrawal protocol refuses such a request as "already withdrawn"). Every ledger is
        tried even when one raises — a failure in one must not keep the site in the other — and
        the first error is raised afterwards (a retried removal finishes the job: ``remove`` is
        sticky and returns False where it was done).
        """
        changed, error = False, None
        for ledger in self.all():
            try:
                changed = bool(ledger.remove(site_id, reason=reason)) or changed
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ledger
                log.error("removing site %s from %s failed: %s", site_id, ledger.path, err)
                error = error or err
        if error is not None:
            raise error
        return changed

    def withdrawn_sites(self) -> list[str]:
        """Sites withdrawn in either ledger (neither is sampled)."""
        return sorted({site for ledger in self.all() for site in ledger.withdrawn_sites()})

    def has_active(self, site_id: str) -> bool:
        """Whether either ledger holds an active contribution of ``site_id``."""
        return any(ledger.contributions(site_id=site_id, status="active") for ledger in self.all())
