"""Helpers for the exact-head reply tests: real SufficientStats and real Flower train replies carrying
them, passed through Flower's protobuf serialization like a SuperNode's reply."""
from __future__ import annotations

import io
import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.replies import StatsExpectation
from tangent.exact_head.statistics import SufficientStats

BASE = "b" * 64
FEATURE_DIGEST = "f" * 64
P, K, CLIP, BITS = 6, 3, 2.0, 16
EXPECT = StatsExpectation(FEATURE_DIGEST, P, K, CLIP, BITS)
#: a FeatureSpec of dimension P (a seeded projection to P dims), for the statistics ledger's model card
FEATURE_SPEC = {"feature-pieces": "final_cls", "feature-projection": P, "random-features": 0, "random-seed": 0,
                "clip-norm": CLIP, "frac-bits": BITS}
SHAPES = {"a.weight": (2, 3), "b.bias": (4,)}
SPEC = {"backbone": "tiny", "img-size": 28, "seed": 0, "num-classes": K}


def model_card() -> dict:
    """The statistics ledger's model card for the test grid."""
    return {"stats-meta": SufficientStats.zeros(P, K, CLIP, BITS).meta(), "feature-spec": dict(FEATURE_SPEC),
            "model-spec": dict(SPEC), "feature-digest": FEATURE_DIGEST}


def open_stats_ledger(path):
    from server.ledger import Ledger

    return Ledger.open(path, family="stats", model_card=model_card(), expected_base_digest=FEATURE_DIGEST)


def open_linked_pair(directory):
    """A Δ ledger (this module's shapes and base digest, ‖Δ‖ ≤ 100 recorded as its admission
    policy) linked to a statistics ledger, in ``directory``: what a ServerApp's state dir holds."""
    from server.ledger import Ledger
    from server.ledger.ledgers import Ledgers, link

    directory.mkdir(parents=True, exist_ok=True)
    d = Ledger.open(directory / "ledger.sqlite", expected_base_digest=BASE, max_delta_norm=100.0, expected_spec=SHAPES)
    d.set_admission_policy(max_delta_norm=100.0)
    s = open_stats_ledger(directory / "exact_head.sqlite")
    link(d, s)
    return Ledgers(d, s)


def site_stats(seed: int, n: int) -> SufficientStats:
    """Statistics of n random rows φ (‖φ‖ < C) and labels, on the test grid."""
    rng = np.random.default_rng(seed)
    phi = rng.standard_normal((n, P))
    phi *= (0.9 * CLIP) * rng.random((n, 1)) / np.linalg.norm(phi, axis=1, keepdims=True)
    return SufficientStats.from_features(phi, rng.integers(0, K, n), K, CLIP, BITS)


def delta(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def instruction(node_id: int) -> Message:
    return Message(RecordDict({"spec": ConfigRecord(SPEC | {"base-digest": BASE})}), dst_node_id=node_id,
                   message_type="train")


def stats_parts(stats: SufficientStats, digest: str = FEATURE_DIGEST) -> dict:
    """The statistics records of a train reply (``stats``, ``stats-meta``) as editable dicts: name -> (record type, values)."""
    return {"stats": ("array", {k: Array(v) for k, v in stats.to_arrays().items()}),
            "stats-meta": ("config", stats.meta() | {"feature-digest": digest})}


def reply_parts(site: str, d: dict, num_examples: int, *, dp: bool = False, stats: SufficientStats | None = None,
                digest: str = BASE) -> dict:
    if dp:
        metrics = {"num-examples": num_examples, "epsilon": 2.0, "delta": 1e-6}
        meta = {"site-id": site, "base-digest": digest, "contribution-id": "ab" * 16, "dp": True,
                "dp-epsilon": 2.0, "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 1.1,
                "train-config": json.dumps({"epochs": 1, "dp": True})}
    else:
        metrics = {"num-examples": num_examples, "train-loss": 1.0, "train-accuracy": 0.5, "epsilon": math.inf,
                   "delta": 0.0, "wall-s": 1.0}
        meta = {"site-id": site, "base-digest": digest, "shard-fingerprint": f"fp-{site}", "data-digest": "dd",
                "source": "test", "dp": False, "train-config": json.dumps({"epochs": 1})}
    parts = {"delta": ("array", {k: Array(v) for k, v in d.items()}), "metrics": ("metric", metrics),
             "meta": ("config", meta)}
    if stats is not None:
        parts |= stats_parts(stats)
    return parts


def build(parts: dict, node_id: int) -> Message:
    from flwr.common.serde import message_from_proto, message_to_proto

    content = RecordDict()
    for name, (record_type, values) in parts.items():
        record = {"array": ArrayRecord, "metric": MetricRecord, "config": ConfigRecord}[record_type]
        content[name] = record(dict(values)) if values else record()
    return message_from_proto(message_to_proto(Message(content, reply_to=instruction(node_id))))


def train_reply(node_id: int, site: str, d: dict, stats: SufficientStats | None, *, num_examples: int | None = None,
                dp: bool = False) -> Message:
    n = num_examples if num_examples is not None else (stats.n if stats is not None else 100)
    return build(reply_parts(site, d, n, dp=dp, stats=stats), node_id)
