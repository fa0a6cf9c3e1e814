"""The ledger strategy: FedAvg's sampling and round loop, with aggregation replaced by the ledger.

Each site's reply is validated (server.replies) and recorded in the contribution ledger under its
stable site id (never the Flower node id, which changes every run); a site that contributed
before has its old contribution *replaced*. The global model is ``ledger.composed_delta()``:
for a tangent model the example-weighted average of the Δ's is exactly the ensemble of the
sites' models, and any site can later be removed by subtraction.

In a deployment the site id a reply declares is bound to the SuperNode that sent it through the
site registry (server.trust.identity): impostors, unregistered nodes, revoked keys and example counts
over the registered cap are refused, and withdrawn or revoked sites are not sampled.

With the exact head on, one reply carries both models: the site's Δw and its
sufficient statistics. :func:`record` writes the Δw to the Δ ledger, then the statistics to the
statistics ledger; when the statistics ledger refuses after the Δ ledger accepted (its own
checks: bounds, overflow, a site withdrawn there), the new Δw is retracted again — and the site's
older statistics with it — so that a site is in both models or in neither (a refused reply can
cost the site its earlier contribution, never make the two models disagree). A non-DP site's
reply without statistics cannot happen (refused as ``stats_missing``); a DP reply (which never
carries statistics) retracts the site's older statistics, so that both models hold the site's
current contribution only.

Replies are never trusted and no reply can abort a round: a Flower error, a site's error record,
anything malformed, a base digest other than the server's, a non-DP reply in a DP run, a second
reply for the same site in one round, everything the ledger itself refuses (shapes, NaN, norm,
duplicates, a withdrawn site, …) and any unexpected exception while one reply is handled
(``internal``) are counted as rejections with a reason, logged, and reported in the round
summary; the other sites' contributions still count.
"""
from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.trust.identity import SenderBinding
from server.ledger import Ledger, RejectedContribution
from server.ledger.ledgers import Ledgers
from server.ledger.stats_forms import RowStats
from server.replies import (MAX_DETAIL, Contribution, Rejected, StatsExpectation, parse_evaluate_reply,
                            declared_site, parse_train_reply, released_privacy, shown)

__all__ = ["LedgerFedAvg", "RoundSummary", "Rejected", "Contribution", "parse_train_reply", "record",
           "StreamingGrid", "composed_arrays"]

log = logging.getLogger("taft.server")


@dataclass
class RoundSummary:
    server_round: int
    sent: int = 0
    recorded: list[str] = field(default_factory=list)  # site ids, in order
    replaced: list[str] = field(default_factory=list)
    stats_recorded: list[str] = field(default_factory=list)  # sites whose statistics were recorded too
    stats_bytes: int = 0  # bytes of exact-head statistics received in the recorded replies
    stats_version: int | None = None  # the statistics ledger's version after the round
    # sites taken out of both ledgers because the statistics ledger refused after the Δ ledger accepted
    retracted: list[str] = field(default_factory=list)
    # {"site_id", "node_id", "reason", "detail"} (+ "declared_site_id" when the claim differs)
    rejections: list[dict] = field(default_factory=list)
    not_sampled: list[dict] = field(default_factory=list)  # {"node_id", "site_id", "reason"}
    # per sender (registered site, else "node-<id>"): the privacy loss every update it sent
    # claims, recorded or refused — a refused reply was still released to this server
    privacy_received: dict = field(default_factory=dict)
    model_version: int | None = None
    total_examples: int = 0
    train_metrics: dict = field(default_factory=dict)
    site_metrics: dict = field(default_factory=dict)  # site id -> train metrics
    evaluate: dict = field(default_factory=dict)
    # seconds from sending the train messages until the last reply is in the ledger
    train_round_trip_s: float | None = None
    sent_at: float | None = field(default=None, repr=False)

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejections))

    def as_dict(self) -> dict:
        out = asdict(self) | {"rejected_by_reason": self.rejected_by_reason}
        out.pop("sent_at")
        return out


def _claimed_site(msg: Message) -> str | None:
    """The site id a reply claims, where no registry binds senders (simulation); None if unreadable."""
    try:
        return declared_site(msg.content.config_records["meta"])
    except Exception:  # noqa: BLE001 - counted under the node id instead
        return None


def privacy_received(rounds: Iterable[RoundSummary]) -> dict[str, dict]:
    """Per sender, the ``privacy_received`` of every round added up (sequential composition)."""
    totals: dict[str, dict] = {}
    for summary in rounds:
        for sender, counts in summary.privacy_received.items():
            total = totals.setdefault(sender, {"epsilon": 0.0, "delta": 0.0, "replies": 0, "non_dp": 0})
            for key, value in counts.items():
                total[key] += value
    return totals


def record(ledgers: Ledger | Ledgers, contribution: Contribution) -> tuple[Any, bool]:
    """Add (or replace, for a site that contributed before) the Δw, then the statistics (module
    docstring). Returns (the Δ ledger's ModelVersion, replaced)."""
    ledgers = Ledgers.of(ledgers)
    ledger, site = ledgers.delta, contribution.site_id
    active = ledger.contributions(site_id=site, status="active")
    method = ledger.replace if active else ledger.add
    try:
        version = method(site, contribution.delta, contribution.num_examples, **contribution.meta)
    except RejectedContribution as err:
        raise Rejected(err.reason, err.detail, site) from None
    if ledgers.stats is not None:
        _record_stats(ledgers, contribution, version)
    return version, bool(active)


def _record_stats(ledgers: Ledgers, contribution: Contribution, delta_version) -> None:
    stats_ledger, site = ledgers.stats, contribution.site_id
    active = stats_ledger.contributions(site_id=site, status="active")
    if contribution.stats is None:  # a DP reply: the site's older (non-DP) statistics go too
        if active:
            stats_ledger.retract(site, reason=f"replaced by Δ ledger version {delta_version.version}, "
                                              "a contribution without statistics")
        return
    if active and _same_arrays(stats_ledger.contribution_delta(active[0].id), contribution.stats.to_arrays()):
        return  # the same data gives the same integers: the site's statistics stand unchanged
    arrays = contribution.stats.to_arrays()
    if contribution.stats_rows is not None:  # the site sent rows: the ledger stores the smaller form
        arrays = RowStats(arrays, contribution.stats_rows)
    method = stats_ledger.replace if active else stats_ledger.add
    try:
        method(site, arrays, base_digest=contribution.feature_digest,
               extra={"delta_model_version": delta_version.version,
                      **{k: v for k, v in (contribution.meta.get("extra") or {}).items() if v is not None}},
               **_stats_privacy(contribution))
    except Exception as err:
        _take_back(ledgers, site, err)
        if isinstance(err, RejectedContribution):
            reason = err.reason if err.reason.startswith("stats_") else f"stats_{err.reason}"
            refusal = Rejected(reason, err.detail, site)
        else:
            log.exception("site %s: the statistics ledger failed", site)
            refusal = Rejected("internal", f"statistics ledger: {type(err).__name__}: {str(err)[:MAX_DETAIL]}", site)
        refusal.retracted = True
        raise refusal from None


def _stats_privacy(contribution: Contribution) -> dict[str, Any]:
    """The statistics ledger's record of what the statistics cost: exact statistics weigh n and
    spend ε = ∞; a DP head's release (its n is noisy) weighs the reply's declared count and records
    its (ε, δ) and declared noise variance (the solver sums the active ones')."""
    stats = contribution.stats
    if stats.dp is None:
        return {"num_examples": stats.n}
    return {"num_examples": contribution.num_examples, "epsilon": stats.dp["epsilon"], "delta_dp": stats.dp["delta"],
            "dp_settings": {"dp": True, "mechanism": stats.dp["mechanism"],
                            "noise_variance": stats.dp["noise_variance"]}}


def _take_back(ledgers: Ledgers, site: str, err: Exception) -> None:
    """The statistics were refused after the Δw was recorded: the site leaves both models (its
    new Δw and any older statistics), so the two ledgers agree. (Restoring the replaced Δw is not
    possible: the Δ ledger erased its bytes and refuses a Δ it has seen before.)"""
    why = f"statistics refused ({type(err).__name__}: {str(err)[:200]}): the reply is refused as a whole"
    for ledger in ledgers.all():
        try:
            if ledger.contributions(site_id=site, status="active"):
                ledger.retract(site, reason=why)
        except Exception:  # noqa: BLE001 - try the other ledger; the refusal is raised by the caller
            log.exception("site %s: could not retract it from %s: the ledgers may DISAGREE about it", site,
                          ledger.path)
    log.warning("site %s: %s; retracted from both ledgers", site, why)


def _same_arrays(old: dict, new: dict) -> bool:
    return old.keys() == new.keys() and all(np.array_equal(old[k], new[k]) for k in new)


def _sender(msg: Message) -> int | None:
    try:
        return msg.metadata.src_node_id
    except Exception:  # noqa: BLE001 - a reply without metadata is still only one reply
        return None


class LedgerFedAvg(FedAvg):
    """FedAvg's node sampling and round loop; aggregation is the ledger.

    Train messages carry ``{"spec", "config"}`` (no weights: every site rebuilds w0 and proves
    it by the digest); evaluate messages add the composed Δ as ``"delta"``. ``binding`` (the
    deployment's site registry) ties each reply to its sender node; None in the simulation.
    ``require_dp`` (a ``dp=true`` run) refuses non-DP replies as ``not_private``.
    ``stats_ledger`` + ``exact_head`` (the grid and feature digest the spec announces): the exact
    head is on, every non-DP reply must carry its statistics and both are recorded.
    ``quarantine``: the held pair of ledgers (server.quarantine); replies are recorded there and enter
    the composed models only when the operator admits them. ``train_records``: records every train
    message carries beside "spec" and "config" (the DP head's public centre).
    """

    def __init__(self, ledger: Ledger, spec: dict, base_digest: str, *, binding: SenderBinding | None = None,
                 require_dp: bool = False, stats_ledger: Ledger | None = None,
                 exact_head: StatsExpectation | None = None, quarantine: Ledgers | None = None,
                 train_records: dict[str, Any] | None = None, **fedavg_kwargs):
        super().__init__(weighted_by_key="num-examples", arrayrecord_key="delta", **fedavg_kwargs)
        if (stats_ledger is None) != (exact_head is None):
            raise ValueError("the exact head needs both its statistics ledger and its StatsExpectation")
        self.ledger = ledger
        self.ledgers = Ledgers(ledger, stats_ledger, quarantine)
        self.exact_head = exact_head
        self.spec = ConfigRecord(dict(spec) | {"base-digest": base_digest})
        self.base_digest = base_digest
        self.binding = binding
        self.require_dp = require_dp
        self.train_records = dict(train_records or {})
        self.rounds: dict[int, RoundSummary] = {}

    def summary(self) -> None:
        super().summary()
        log.info("\t└──> ledger %s (base digest %s…), %s, %s", self.ledger.path, self.base_digest[:12],
                 "replies bound to registered nodes" if self.binding else "simulation: partition ids",
                 "DP replies only" if self.require_dp else "DP optional")
        if self.exact_head is not None:
            log.info("\t└──> exact head: statistics ledger %s (feature digest %s…, p = %d)", self.ledgers.stats.path,
                     self.exact_head.feature_digest[:12], self.exact_head.num_features)

    # ------------------------------------------------------------------ sampling
    def _messages(self, record: RecordDict, fraction: float, min_nodes: int, grid: Grid,
                  message_type: str, summary: RoundSummary | None = None) -> list[Message]:
        if fraction == 0.0:
            return []
        if self.binding is None:
            num_nodes = int(len(list(grid.get_node_ids())) * fraction)
            node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, min_nodes))
        else:
            node_ids = self._sample_eligible(grid, fraction, min_nodes, summary)
        return [Message(content=record, message_type=message_type, dst_node_id=node) for node in node_ids]

    def _sample_eligible(self, grid: Grid, fraction: float, min_nodes: int,
                         summary: RoundSummary | None) -> list[int]:
        """FedAvg's sampling over the nodes whose site is neither withdrawn nor revoked."""
        _, connected = sample_nodes(grid, self.min_available_nodes, 0)  # waits for enough nodes
        withdrawn = set(self.ledgers.withdrawn_sites())
        eligible, excluded = [], []
        for node in connected:
            why = self.binding.not_eligible(node, withdrawn)
            if why is None:
                eligible.append(node)
            else:
                excluded.append({"node_id": node, "site_id": self.binding.site_of(node), "reason": why})
        if excluded:
            log.info("not sampled: %s", ", ".join(f"site {e['site_id']} ({e['reason']})" for e in excluded))
            if summary is not None:
                summary.not_sampled = excluded
        size = min(len(eligible), max(int(len(eligible) * fraction), min_nodes))
        return random.sample(eligible, size)

    # ------------------------------------------------------------------ train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        summary = RoundSummary(server_round)
        messages = self._messages(RecordDict({"spec": self.spec, "config": config, **self.train_records}),
                                  self.fraction_train, self.min_train_nodes, grid, MessageType.TRAIN, summary)
        summary.sent, summary.sent_at = len(messages), time.monotonic()
        self.rounds[server_round] = summary
        log.info("round %d: asked %d sites to train from w0", server_round, len(messages))
        return messages

    def _bind(self, node_id: int | None) -> Callable[[str], str] | None:
        if self.binding is None:
            return None
        return lambda declared: self.binding.check(node_id, declared)

    def _train_reply(self, msg: Message, node_id: int | None, seen: set[str]) -> tuple[Contribution, Any, bool]:
        contribution = parse_train_reply(msg, self.base_digest, require_dp=self.require_dp,
                                         bind=self._bind(node_id), stats=self.exact_head,
                                         check_count=None if self.binding is None else self.binding.check_cap)
        if contribution.site_id in seen:
            raise Rejected("duplicate_site_in_round", "a second reply for this site", contribution.site_id)
        seen.add(contribution.site_id)
        if self.ledgers.held is not None and contribution.site_id in self.ledgers.withdrawn_sites():
            # the held pair may be younger than a withdrawal the composed models keep: ask every ledger
            raise Rejected("site_withdrawn", "this site withdrew; it is readmitted only by the operator",
                           contribution.site_id)
        # quarantine (server.quarantine): the same checks, into the held pair; composed only once admitted
        version, replaced = record(self.ledgers.held or self.ledgers, contribution)
        return contribution, version, replaced

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        summary = self.rounds.setdefault(server_round, RoundSummary(server_round))
        seen: set[str] = set()
        for msg in replies:
            node_id = _sender(msg)
            self._count_release(summary, msg, node_id)
            try:
                contribution, version, replaced = self._train_reply(msg, node_id, seen)
            except Exception as err:  # noqa: BLE001 - one reply never aborts the round (see module doc)
                summary.rejections.append(self._rejection(server_round, "train", node_id, err))
                if getattr(err, "retracted", False):
                    summary.retracted.append(err.site_id)
                continue
            summary.recorded.append(contribution.site_id)
            if replaced:
                summary.replaced.append(contribution.site_id)
            summary.model_version = version.version
            summary.total_examples += contribution.num_examples
            summary.site_metrics[contribution.site_id] = contribution.metrics
            if contribution.stats is not None and self.ledgers.stats is not None:
                summary.stats_recorded.append(contribution.site_id)
                summary.stats_bytes += contribution.stats_bytes
        if summary.sent_at is not None:
            summary.train_round_trip_s = time.monotonic() - summary.sent_at
        if self.ledgers.stats is not None:
            summary.stats_version = self.ledgers.stats.current_version().version
        summary.train_metrics = _weighted_means(summary.site_metrics.values(),
                                                ("train-loss", "train-accuracy", "wall-s"))
        log.info("round %d: recorded %d (%d replaced), rejected %d %s; ledger version %s; round trip %.1f s",
                 server_round, len(summary.recorded), len(summary.replaced), len(summary.rejections),
                 summary.rejected_by_reason or "", summary.model_version, summary.train_round_trip_s or 0.0)
        if self.ledgers.stats is not None:
            log.info("round %d: exact-head statistics of %d sites recorded (%.1f MiB received); statistics "
                     "ledger version %s", server_round, len(summary.stats_recorded), summary.stats_bytes / 2 ** 20,
                     summary.stats_version)
        metrics = MetricRecord(summary.train_metrics | {"recorded": len(summary.recorded),
                                                        "rejected": len(summary.rejections)})
        if not summary.recorded and summary.model_version is None:
            return None, metrics
        return composed_arrays(self.ledger), metrics

    def _count_release(self, summary: RoundSummary, msg: Message, node_id: int | None) -> None:
        """Add what a train reply released to the round's ``privacy_received``: ``epsilon`` and
        ``delta`` sum its DP replies, ``non_dp`` counts the updates without a readable DP claim
        (their loss is unbounded: the sender's ε is then ∞)."""
        released = released_privacy(msg)
        if released is None:
            return
        sender = self.binding.site_of(node_id) if self.binding is not None else _claimed_site(msg)
        totals = summary.privacy_received.setdefault(sender or f"node-{node_id}",
                                                     {"epsilon": 0.0, "delta": 0.0, "replies": 0, "non_dp": 0})
        totals["replies"] += 1
        if math.isinf(released[0]):
            totals["non_dp"] += 1
        else:
            totals["epsilon"] += released[0]
            totals["delta"] += released[1]

    def _rejection(self, server_round: int, phase: str, node_id: int | None, err: Exception) -> dict:
        """The report row for a refused reply; the site is the registered one where there is one."""
        if not isinstance(err, Rejected):
            log.exception("round %d: unexpected error on a %s reply of node %s", server_round, phase, node_id)
            err = Rejected("internal", f"{type(err).__name__}: {str(err)[:MAX_DETAIL]}")
        registered = self.binding.site_of(node_id) if self.binding is not None else None
        site = registered or err.site_id
        row = {"site_id": site, "node_id": node_id, "reason": err.reason, "detail": err.detail[:MAX_DETAIL]}
        if err.site_id is not None and err.site_id != site:  # a valid id (checked before it is kept)
            row["declared_site_id"] = err.site_id
        log.warning("round %d: %s reply REJECTED, site %s (node %s): %s", server_round, phase, site, node_id,
                    shown(str(err), 300))
        return row

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._messages(RecordDict({"delta": arrays, "spec": self.spec, "config": config}),
                              self.fraction_evaluate, self.min_evaluate_nodes, grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_site, skipped = {}, []
        for msg in replies:
            node_id = _sender(msg)
            try:
                site, metrics = parse_evaluate_reply(msg, bind=self._bind(node_id))
                if self.binding is not None:  # one site weighs at most its registered cap, as in training
                    self.binding.check_cap(site, metrics["num-examples"])
                if site in per_site:
                    raise Rejected("duplicate_site_in_round", "a second evaluate reply for this site", site)
            except Exception as err:  # noqa: BLE001 - one reply never aborts the round
                skipped.append(self._rejection(server_round, "evaluate", node_id, err))
                continue
            per_site[site] = metrics
        metrics = _weighted_means(per_site.values(), ("eval-loss", "eval-accuracy"))
        summary = self.rounds.setdefault(server_round, RoundSummary(server_round))
        summary.evaluate = {"sites": per_site, "skipped": skipped,
                            "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)), **metrics}
        if skipped:
            log.warning("round %d: %d evaluate replies skipped: %s", server_round, len(skipped),
                        summary.evaluate["skipped_by_reason"])
        return MetricRecord(metrics | {"sites": len(per_site)}) if per_site else None


def composed_arrays(ledger: Ledger) -> ArrayRecord:
    # numpy, not ledger.composed_delta() (torch tensors): the ServerApp process never imports torch
    return ArrayRecord({name: Array(value) for name, value in ledger.composed_arrays().items()})


def _weighted_means(rows: Iterable[dict], keys: tuple[str, ...]) -> dict[str, float]:
    rows = [r for r in rows if r.get("num-examples", 0) > 0]
    total = sum(r["num-examples"] for r in rows)
    out: dict[str, float] = {"num-examples": total}
    for key in keys:
        values = [(r[key], r["num-examples"]) for r in rows if key in r and math.isfinite(r[key])]
        if values:
            out[key] = sum(v * n for v, n in values) / sum(n for _, n in values)
    return out


class StreamingGrid:
    """A Grid whose ``send_and_receive`` yields each reply as soon as it is pulled, with at most
    ``max_in_flight`` messages pushed and not yet answered (0: all at once, as Flower does).

    Flower's grids collect every reply of a round in a list before the strategy sees any; with
    50 sites that is 50 Δw (~7 MB each) held at once in the ServerApp. :class:`LedgerFedAvg`
    records each reply in the ledger and drops it, so a generator keeps one at a time.

    The window bounds what waits in the SuperLink: replies that arrive faster than the ledger
    records them are held there until pulled, and Flower 1.41's simulation engine looks for work
    by scanning every stored message once per site every 0.1 s — O(sites²) CPU while a thousand
    instructions wait, which a window of a few messages makes O(sites). The first window is
    pushed when the method is called; one more message each time a reply is pulled. Pulling
    stops at the timeout (messages never pushed by then are not sent). Everything else is
    delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, pull_interval: float = 0.5, max_in_flight: int = 0):
        if max_in_flight < 0:
            raise ValueError(f"max_in_flight must be >= 0, got {max_in_flight}")
        self._grid = grid
        self._pull_interval = pull_interval
        self._max_in_flight = max_in_flight

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        waiting = deque(messages)
        pending = set(self._grid.push_messages(self._next(waiting, self._max_in_flight or len(waiting))))
        return self._replies(pending, waiting, timeout)

    @staticmethod
    def _next(waiting: deque, count: int) -> list[Message]:
        return [waiting.popleft() for _ in range(min(count, len(waiting)))]

    def _replies(self, pending: set, waiting: deque, timeout: float | None):
        end = None if timeout is None else time.time() + timeout
        while (pending or waiting) and (end is None or time.time() < end):
            replies = list(self._grid.pull_messages(pending)) if pending else []
            pending.difference_update(msg.metadata.reply_to_message_id for msg in replies)
            # refill the window before the replies are recorded: the sites work meanwhile
            room = len(waiting) if not self._max_in_flight else self._max_in_flight - len(pending)
            if batch := self._next(waiting, room):
                pending.update(self._grid.push_messages(batch))
            while replies:
                yield replies.pop(0)  # popped: the list does not keep a consumed reply alive
            if pending:
                time.sleep(self._pull_interval)
        if pending or waiting:
            log.warning("%d replies did not arrive within the %.0f s timeout (%d of them never sent)",
                        len(pending) + len(waiting), timeout, len(waiting))
