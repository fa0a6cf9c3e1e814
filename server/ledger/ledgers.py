"""The server's two ledgers as one: the TAFT Δw ledger and, with the exact head on, the statistics ledger.

A site is in both models or in neither: removing a site — ``remove-sites`` in the simulation, a
signed withdrawal in a deployment (``server.trust.withdrawal.apply_withdrawal`` accepts a
:class:`Ledgers` as its ledger), ``taft-ledger remove``, ``deploy.withdraw apply`` — subtracts it from
both and marks it withdrawn in both, so neither model can take it back without the operator's audited
``readmit`` (which, too, acts on both).

Finding the statistics ledger. The ServerApp records the statistics ledger's path (relative to the
Δ ledger's folder) in the Δ ledger's ``meta`` the first time it opens both (:func:`link`). Every tool
opens the pair with :func:`open_pair` from the Δ ledger alone: the linked file, or — for state written
before links existed — ``exact_head.sqlite`` beside the Δ ledger. A statistics ledger in that folder
that is neither is a refusal, never skipped: a removal that reached one family only would leave the
site's data in the other. The quarantine's pair (server.quarantine), when the Δ ledger names one, is
opened the same way and is part of :meth:`Ledgers.all`: a removal reaches held contributions too.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.ledger import Ledger

log = logging.getLogger("taft.server")

#: the key of the statistics ledger in the Δ ledger's links (Ledger.link_ledger)
STATS_LINK = "stats"
#: the key of the quarantine's Δ ledger (which links its own statistics ledger)
HELD_LINK = "quarantine"
#: the statistics ledger's file name when the run config names none (server.config)
DEFAULT_STATS_NAME = "exact_head.sqlite"


def link(delta: "Ledger", other: "Ledger", key: str = STATS_LINK) -> None:
    """Record ``other``'s path in ``delta`` (relative to ``delta``'s folder) under ``key``
    (STATS_LINK, HELD_LINK); a different recorded link is a LedgerError: one state directory holds
    one ledger of each kind."""
    relative = os.path.relpath(Path(other.path).resolve(), Path(delta.path).resolve().parent)
    delta.link_ledger(key, relative)


def stats_path_of(delta: "Ledger", given: Path | None = None) -> Path | None:
    """The statistics ledger that belongs with ``delta``, or None when the state has none.

    ``given`` (an operator's explicit path) must agree with the recorded link when there is one.
    Refuses (LedgerError) a linked file that is missing, and a statistics ledger in the Δ ledger's
    folder that nothing names."""
    from server.ledger import LedgerError

    folder = Path(delta.path).resolve().parent
    path = linked_path(delta, STATS_LINK)
    if path is not None:
        if given is not None and Path(given).resolve() != path:
            raise LedgerError(f"{delta.path} names its statistics ledger {path}, not {given}")
        if not path.is_file():
            raise LedgerError(f"the statistics ledger {path} that {delta.path} names is missing: refusing to act "
                              f"on one model family only")
        unnamed = [p for p in stats_ledgers_in(folder) if p != path]
        if unnamed:  # a link redirected to a decoy would leave the site's statistics in the real one
            raise LedgerError(f"{delta.path} names its statistics ledger {path}, but {', '.join(map(str, unnamed))} "
                              f"{'is one too' if len(unnamed) == 1 else 'are too'}: refusing to act on one of them only")
        return path
    if given is not None:
        if not Path(given).is_file():
            raise LedgerError(f"no statistics ledger at {given}")
        return Path(given).resolve()
    default = folder / DEFAULT_STATS_NAME
    candidates = [p for p in stats_ledgers_in(folder) if p != default]
    if candidates:
        raise LedgerError(f"{delta.path} names no statistics ledger, but {', '.join(map(str, candidates))} "
                          f"{'is one' if len(candidates) == 1 else 'are'}: name it explicitly")
    return default if default.is_file() else None


def linked_path(delta: "Ledger", key: str) -> Path | None:
    """The companion ledger ``delta``'s meta names under ``key``, or None; LedgerError when the link
    leads out of ``delta``'s folder or through a symbolic link. The link is in the Δ ledger's file,
    which whoever can write the state directory can edit: it is a path to check like any other."""
    from server.ledger import LedgerError

    linked = delta.linked_ledgers().get(key)
    if linked is None:
        return None
    folder = Path(delta.path).resolve().parent
    named = Path(os.path.normpath(folder / linked)) if isinstance(linked, str) and linked else folder
    if named == folder or not named.is_relative_to(folder):
        raise LedgerError(f"{delta.path} links its {key} ledger to {linked!r}, outside its folder {folder}: refused")
    if named.resolve() != named:
        raise LedgerError(f"{delta.path} links its {key} ledger to {named}, which leads through a symbolic link "
                          f"to {named.resolve()}: refused (the ledger's files are never links)")
    return named


def stats_ledgers_in(folder: Path) -> list[Path]:
    """The statistics ledgers among ``folder``'s SQLite files (read-only, nothing created). A
    symbolic link named like a ledger is listed as it is, never followed (a ledger's files are never
    links: the callers refuse it); other files that are not regular (a planted FIFO would block the
    open) are not ledgers."""
    found = []
    for path in sorted(folder.glob("*.sqlite")):
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            found.append(path)
            continue
        if not stat.S_ISREG(mode):
            continue
        try:
            db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                row = db.execute("SELECT value FROM meta WHERE key = 'family'").fetchone()
            finally:
                db.close()
        except sqlite3.Error:  # not a ledger (the withdrawal registry, the nonce store, …)
            continue
        if row is not None and row[0] == '"stats"':
            found.append(path.resolve())
    return found


@contextmanager
def open_pair(delta_path: Path, *, signing_key: Path | None = None, stats_path: Path | None = None,
              stats_signing_key: Path | None = None, witness: Path | None = None) -> Iterator["Ledgers"]:
    """Both ledgers of a state directory, opened (never created) from the Δ ledger's path; see the
    module docstring for how the statistics ledger is found. A statistics ledger given as the Δ
    ledger is refused: the tools act on the state as a whole, from its Δ ledger."""
    from server.ledger import Ledger, LedgerError

    with ExitStack() as opened:
        delta = opened.enter_context(Ledger.open(delta_path, create=False, signing_key=signing_key,
                                                     witness=witness))
        if delta.family != "delta":
            raise LedgerError(f"{delta_path} is a {delta.family!r} ledger: give the Δ ledger of the state "
                              f"(it names its statistics ledger), so a change reaches every model family")
        path = stats_path_of(delta, stats_path)
        stats = None if path is None else opened.enter_context(
            Ledger.open(path, create=False, family="stats", signing_key=stats_signing_key, witness=witness))
        held_path = held_path_of(delta)
        held = None if held_path is None else opened.enter_context(open_pair(held_path, witness=witness))
        yield Ledgers(delta, stats, held)


def held_path_of(delta: "Ledger") -> Path | None:
    """The quarantine's Δ ledger that ``delta`` names (server.quarantine), or None; a named one that is
    missing is a LedgerError (its contributions would escape a removal)."""
    from server.ledger import LedgerError

    path = linked_path(delta, HELD_LINK)
    if path is None:
        return None
    if not path.is_file():
        raise LedgerError(f"the quarantine ledger {path} that {delta.path} names is missing: refusing to act on "
                          f"part of the state only")
    return path


@dataclass
class Ledgers:
    """``delta``: the TAFT Δw ledger; ``stats``: the exact head's statistics ledger (None when off)."""

    delta: "Ledger"
    stats: "Ledger | None" = None
    #: the quarantine's pair (contributions recorded but not composed until admitted), when the state has one
    held: "Ledgers | None" = None

    @classmethod
    def of(cls, ledger: "Ledger | Ledgers") -> "Ledgers":
        """A :class:`Ledgers` as it is, a lone Δ ledger wrapped (exact head off)."""
        return ledger if isinstance(ledger, Ledgers) else cls(ledger)

    def all(self) -> list["Ledger"]:
        """Every ledger of the state, the quarantine's included: a removal reaches them all."""
        return [led for led in (self.delta, self.stats) if led is not None] + (self.held.all() if self.held else [])

    def remove(self, site_id: str, reason: str = "withdrawn") -> bool:
        """Subtract ``site_id`` from every ledger and mark it withdrawn there (``Ledger.remove``).

        True when any ledger changed; False only when the site was already withdrawn everywhere
        (the withdrawal protocol refuses such a request as "already withdrawn"). Every ledger is
        tried even when one raises — a failure in one must not keep the site in the other — and
        the first error is raised afterwards (a retried removal finishes the job: ``remove`` is
        sticky and returns False where it was done).
        """
        return self._each("remove", site_id, reason)

    def readmit(self, site_id: str, reason: str) -> bool:
        """Let a withdrawn site contribute again to every ledger (audited in each); True when any changed."""
        return self._each("readmit", site_id, reason)

    def retract(self, site_id: str, reason: str) -> bool:
        """Subtract the site's active contribution from every ledger, without withdrawing it."""
        return self._each("retract", site_id, reason)

    def _each(self, action: str, site_id: str, reason: str) -> bool:
        changed, error = False, None
        for ledger in self.all():
            try:
                changed = bool(getattr(ledger, action)(site_id, reason=reason)) or changed
            except Exception as err:  # noqa: BLE001 - re-raised below, after the other ledger
                log.error("%s of site %s in %s failed: %s", action, site_id, ledger.path, err)
                error = error or err
        if error is not None:
            raise error
        return changed

    def withdrawn_sites(self) -> list[str]:
        """Sites withdrawn in any ledger (none of them is sampled)."""
        return sorted({site for ledger in self.all() for site in ledger.withdrawn_sites()})

    def has_active(self, site_id: str) -> bool:
        """Whether either ledger holds an active contribution of ``site_id``."""
        return any(ledger.contributions(site_id=site_id, status="active") for ledger in self.all())
