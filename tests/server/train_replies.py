"""Train messages and replies as a SuperNode sends them, for the strategy tests: the server's
instruction, a site's non-DP train reply with its Δ, an error reply, and the Δ shapes of a model
spec (for replies the real ServerApp must accept)."""
from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

BASE = "b" * 64
SHAPES = {"blocks.11.attn.qkv.weight": (6, 4), "norm.bias": (4,), "head.weight": (3, 4)}
SPEC = {"backbone": "vit_small_patch14_dinov2", "img-size": 56, "seed": 0, "linearized-blocks": 1,
        "reinit": True, "linearize-cls": False, "num-classes": 3}


def delta(seed: int, scale: float = 0.01, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def instruction(node_id: int) -> Message:
    return Message(RecordDict({"spec": ConfigRecord(SPEC | {"base-digest": BASE})}), dst_node_id=node_id,
                   message_type="train")


def train_reply(node_id: int, site: str, d: dict, num_examples: int = 100, digest: str = BASE,
                dp: bool = False, epsilon: float = math.inf) -> Message:
    content = RecordDict({
        "delta": array_record(d),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.0, "train-accuracy": 0.5,
                                 "epsilon": epsilon, "delta": 1e-5 if dp else 0.0, "wall-s": 1.0}),
        "meta": ConfigRecord({"site-id": site, "shard-fingerprint": f"fp-{site}", "base-digest": digest,
                              "data-digest": "dd", "source": "test", "dp": dp, "dp-epsilon": 8.0,
                              "dp-max-grad-norm": 1.0, "dp-noise-multiplier": 0.0,
                              "train-config": json.dumps({"epochs": 1})})})
    return Message(content, reply_to=instruction(node_id))


def array_record(d: dict) -> ArrayRecord:
    import torch  # as the ClientApp sends it: torch tensors

    return ArrayRecord({k: torch.from_numpy(v) for k, v in d.items()})


def error_reply(node_id: int, site: str, code: str) -> Message:
    record = ConfigRecord({"code": code, "reason": f"{code} at {site}", "site-id": site})
    return Message(RecordDict({"error": record}), reply_to=instruction(node_id))


_SHAPES: dict = {}


def delta_shapes(spec) -> dict:
    """Name -> shape of every Δ tensor of the model ``spec`` describes (built once per spec)."""
    from tangent.protocol.spec import ModelSpec, build_model

    key = ModelSpec.from_config(spec)
    if key not in _SHAPES:
        model, _ = build_model(key)
        _SHAPES[key] = {k: tuple(v.shape) for k, v in model.delta_state_dict().items()}
    return _SHAPES[key]
