"""The ledger strategy: FedAvg's sampling and round loop, with aggregation replaced by the ledger.

Each site's reply is validated and recorded in the contribution ledger under the stable site
id it reports (never the Flower node id, which changes every run); a site that contributed
before has its old contribution *replaced*. The global model is ``ledger.composed_delta()``:
for a tangent model the example-weighted average of the Δ's is exactly the ensemble of the
sites' models, and any site can later be removed by subtraction.

Replies are never trusted: a Flower error, a site's error record, a malformed reply, a base
digest other than the server's, a second reply for the same site in one round and everything
the ledger itself refuses (shapes, NaN, norm, duplicates, …) are counted as rejections with a
reason, logged, and reported in the round summary; the other sites' contributions still count.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.ledger import Ledger, RejectedContribution

log = logging.getLogger("taft.server")


class Rejected(Exception):
    """A reply that is not recorded; ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str = "", site_id: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.site_id = reason, detail, site_id


@dataclass
class Contribution:
    """A validated train reply, ready for the ledger."""
    site_id: str
    delta: dict  # name -> float32 numpy array
    num_examples: int
    meta: dict  # keyword arguments of Ledger.add/replace
    metrics: dict


@dataclass
class RoundSummary:
    server_round: int
    sent: int = 0
    recorded: list[str] = field(default_factory=list)  # site ids, in order
    replaced: list[str] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)  # {"site_id", "node_id", "reason", "detail"}
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


def parse_train_reply(msg: Message, expected_base_digest: str) -> Contribution:
    """Validate one train reply; raises :class:`Rejected`. (The ledger checks the tensors.)"""
    if msg.has_error():
        raise Rejected("flower_error", f"code {msg.error.code}: {msg.error.reason}")
    content = msg.content
    if "error" in content.config_records:
        err = content.config_records["error"]
        raise Rejected(str(err.get("code", "client_error")), str(err.get("reason", "")),
                       site_id=err.get("site-id"))
    missing = [k for k, records in (("delta", content.array_records), ("metrics", content.metric_records),
                                    ("meta", content.config_records)) if k not in records]
    if missing:
        raise Rejected("malformed", f"reply lacks {', '.join(missing)}")
    meta, metrics = content.config_records["meta"], content.metric_records["metrics"]
    site = meta.get("site-id")
    if not isinstance(site, str) or not site:
        raise Rejected("bad_site_id", f"meta site-id {site!r} is not a non-empty string")
    digest = meta.get("base-digest")
    if digest != expected_base_digest:
        raise Rejected("base_digest_mismatch", f"{digest} != {expected_base_digest}", site)
    num_examples = metrics.get("num-examples")
    if isinstance(num_examples, float) and num_examples.is_integer():
        num_examples = int(num_examples)
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples < 1:
        raise Rejected("bad_num_examples", f"{num_examples!r}", site)
    dp = bool(meta.get("dp", False))
    epsilon = metrics.get("epsilon")
    if dp and (not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0):
        raise Rejected("bad_meta", f"DP contribution with epsilon {epsilon!r}", site)
    delta = {name: array.numpy() for name, array in content.array_records["delta"].items()}
    ledger_meta: dict[str, Any] = {
        "epsilon": float(epsilon) if dp else None,
        "delta_dp": float(metrics.get("delta", 0.0)) if dp else None,
        "dp_settings": {"dp": dp, "target_epsilon": meta.get("dp-target-epsilon"),
                        "max_grad_norm": meta.get("dp-max-grad-norm"),
                        "noise_multiplier": meta.get("dp-noise-multiplier")},
        "shard_fingerprint": str(meta.get("shard-fingerprint", "")) or None,
        "base_digest": digest,
        "extra": {"data_digest": meta.get("data-digest"), "source": meta.get("source")},
    }
    try:
        import json
        ledger_meta["train_config"] = json.loads(str(meta.get("train-config", "{}")))
    except ValueError as err:
        raise Rejected("bad_meta", f"train-config is not JSON: {err}", site) from None
    return Contribution(site, delta, num_examples, ledger_meta, dict(metrics))


def record(ledger: Ledger, contribution: Contribution) -> tuple[Any, bool]:
    """Add (or replace, for a site that contributed before). Returns (ModelVersion, replaced)."""
    active = ledger.contributions(site_id=contribution.site_id, status="active")
    method = ledger.replace if active else ledger.add
    try:
        version = method(contribution.site_id, contribution.delta, contribution.num_examples,
                         **contribution.meta)
    except RejectedContribution as err:
        raise Rejected(err.reason, err.detail, contribution.site_id) from None
    return version, bool(active)


class LedgerFedAvg(FedAvg):
    """FedAvg's node sampling and round loop; aggregation is the ledger.

    Train messages carry ``{"spec", "config"}`` (no weights: every site rebuilds w0 and proves
    it by the digest); evaluate messages add the composed Δ as ``"delta"``.
    """

    def __init__(self, ledger: Ledger, spec: dict, base_digest: str, **fedavg_kwargs):
        super().__init__(weighted_by_key="num-examples", arrayrecord_key="delta", **fedavg_kwargs)
        self.ledger = ledger
        self.spec = ConfigRecord(dict(spec) | {"base-digest": base_digest})
        self.base_digest = base_digest
        self.rounds: dict[int, RoundSummary] = {}

    def summary(self) -> None:
        super().summary()
        log.info("\t└──> ledger %s (base digest %s…)", self.ledger.path, self.base_digest[:12])

    def _messages(self, record: RecordDict, fraction: float, min_nodes: int, grid: Grid,
                  message_type: str) -> list[Message]:
        if fraction == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, min_nodes))
        return [Message(content=record, message_type=message_type, dst_node_id=node) for node in node_ids]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        messages = self._messages(RecordDict({"spec": self.spec, "config": config}),
                                  self.fraction_train, self.min_train_nodes, grid, MessageType.TRAIN)
        self.rounds[server_round] = RoundSummary(server_round, sent=len(messages), sent_at=time.monotonic())
        log.info("round %d: asked %d sites to train from w0", server_round, len(messages))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        summary = self.rounds.setdefault(server_round, RoundSummary(server_round))
        seen: set[str] = set()
        for msg in replies:
            try:
                contribution = parse_train_reply(msg, self.base_digest)
                if contribution.site_id in seen:
                    raise Rejected("duplicate_site_in_round", "a second reply for this site", contribution.site_id)
                seen.add(contribution.site_id)
                version, replaced = record(self.ledger, contribution)
            except Rejected as err:
                summary.rejections.append({"site_id": err.site_id, "node_id": msg.metadata.src_node_id,
                                           "reason": err.reason, "detail": err.detail[:2000]})
                log.warning("round %d: REJECTED site %s (node %d): %s", server_round, err.site_id,
                            msg.metadata.src_node_id, err)
                continue
            summary.recorded.append(contribution.site_id)
            if replaced:
                summary.replaced.append(contribution.site_id)
            summary.model_version = version.version
            summary.total_examples += contribution.num_examples
            summary.site_metrics[contribution.site_id] = contribution.metrics
        if summary.sent_at is not None:
            summary.train_round_trip_s = time.monotonic() - summary.sent_at
        summary.train_metrics = _weighted_means(summary.site_metrics.values(),
                                                ("train-loss", "train-accuracy", "wall-s"))
        log.info("round %d: recorded %d (%d replaced), rejected %d %s; ledger version %s; round trip %.1f s",
                 server_round, len(summary.recorded), len(summary.replaced), len(summary.rejections),
                 summary.rejected_by_reason or "", summary.model_version, summary.train_round_trip_s or 0.0)
        metrics = MetricRecord(summary.train_metrics | {"recorded": len(summary.recorded),
                                                        "rejected": len(summary.rejections)})
        if not summary.recorded and summary.model_version is None:
            return None, metrics
        return composed_arrays(self.ledger), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        return self._messages(RecordDict({"delta": arrays, "spec": self.spec, "config": config}),
                              self.fraction_evaluate, self.min_evaluate_nodes, grid, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        per_site, skipped = {}, []
        for msg in replies:
            if msg.has_error():
                skipped.append({"node_id": msg.metadata.src_node_id, "reason": "flower_error",
                                "detail": str(msg.error.reason)[:500]})
                continue
            content = msg.content
            if "error" in content.config_records:
                err = content.config_records["error"]
                skipped.append({"site_id": err.get("site-id"), "reason": err.get("code"),
                                "detail": str(err.get("reason"))[:500]})
                continue
            if "metrics" not in content.metric_records or "meta" not in content.config_records:
                skipped.append({"node_id": msg.metadata.src_node_id, "reason": "malformed"})
                continue
            per_site[str(content.config_records["meta"].get("site-id"))] = dict(content.metric_records["metrics"])
        metrics = _weighted_means(per_site.values(), ("eval-loss", "eval-accuracy"))
        summary = self.rounds.setdefault(server_round, RoundSummary(server_round))
        summary.evaluate = {"sites": per_site, "skipped": skipped, **metrics}
        if skipped:
            log.warning("round %d: %d evaluate replies skipped: %s", server_round, len(skipped),
                        dict(Counter(s["reason"] for s in skipped)))
        return MetricRecord(metrics | {"sites": len(per_site)}) if per_site else None


def composed_arrays(ledger: Ledger) -> ArrayRecord:
    return ArrayRecord(ledger.composed_delta())


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
    """A Grid whose ``send_and_receive`` yields each reply as soon as it is pulled.

    Flower's grids collect every reply of a round in a list before the strategy sees any; with
    50 sites that is 50 Δw (~7 MB each) held at once in the ServerApp. :class:`LedgerFedAvg`
    records each reply in the ledger and drops it, so a generator keeps one at a time. Messages
    are pushed eagerly (when the method is called), like the wrapped grid; pulling stops at the
    timeout, like it. Everything else is delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, pull_interval: float = 0.5):
        self._grid = grid
        self._pull_interval = pull_interval

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        pending = set(self._grid.push_messages(messages))
        return self._replies(pending, timeout)

    def _replies(self, pending: set, timeout: float | None):
        end = None if timeout is None else time.time() + timeout
        while pending and (end is None or time.time() < end):
            replies = list(self._grid.pull_messages(pending))
            pending.difference_update(msg.metadata.reply_to_message_id for msg in replies)
            while replies:
                yield replies.pop(0)  # popped: the list does not keep a consumed reply alive
            if pending:
                time.sleep(self._pull_interval)
        if pending:
            log.warning("%d replies did not arrive within the %.0f s timeout", len(pending), timeout)
