"""The real ClientApp, called with real Flower messages, on the real pretrained ViT-S/14 and a few
hundred real Fashion-MNIST images (deployment-style node config: site-id + data-path)."""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from tangent.training.budget import PrivacyBudget
from tangent.protocol.spec import ModelSpec, build_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_server_identity")]

SPEC = ModelSpec(img_size=56, reinit=False)
TRAIN = {"epochs": 5, "batch-size": 32, "lr": 1e-3, "loss": "rsl", "kappa": 15.0, "rsl-alpha": 1.0,
         "l2": 0.0, "radius": 0.0, "seed": 0, "dp": False, "dp-epsilon": 8.0, "dp-delta": 0.0,
         "dp-max-grad-norm": 1.0}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from tangent.data.sets import load_fashion_mnist

    root = tmp_path_factory.mktemp("site")
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    np.savez(root / "train.npz", images=x[:300], labels=y[:300])
    np.savez(root / "test.npz", images=xt[:200], labels=yt[:200])
    _, digest = build_model(SPEC)
    return {"root": root, "digest": digest,
            "node_config": {"site-id": "site-a", "data-path": str(root / "train.npz"),
                            "test-data-path": str(root / "test.npz"), "cache-dir": str(root / "cache")}}


def call(kind: str, content: RecordDict, node_config: dict) -> RecordDict:
    msg = Message(content, dst_node_id=42, message_type=kind)
    context = Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def spec_record(digest: str) -> ConfigRecord:
    return ConfigRecord(SPEC.to_config() | {"base-digest": digest})


def train(site, node_config=None, digest=None, **config) -> RecordDict:
    return call("train", RecordDict({"spec": spec_record(digest or site["digest"]),
                                     "config": ConfigRecord(TRAIN | config)}),
                node_config or site["node_config"])


def evaluate(site, delta: ArrayRecord) -> dict:
    content = call("evaluate", RecordDict({"spec": spec_record(site["digest"]), "config": ConfigRecord({}),
                                           "delta": delta}), site["node_config"])
    return dict(content["metrics"])


def test_train_reply_carries_delta_metrics_meta_and_beats_the_untrained_head(site):
    reply = train(site)
    assert "error" not in reply.config_records
    delta, metrics, meta = reply["delta"], reply["metrics"], reply["meta"]
    model, _ = build_model(SPEC)
    expected = {k: tuple(v.shape) for k, v in model.delta_state_dict().items()}
    assert {k: tuple(delta[k].shape) for k in delta} == expected  # only the trainable Δ, timm names
    assert "blocks.11.attn.qkv.weight" in delta and "head.weight" in delta
    assert metrics["num-examples"] == 300 and math.isinf(metrics["epsilon"])
    assert meta["site-id"] == "site-a" and meta["base-digest"] == site["digest"]
    assert len(meta["shard-fingerprint"]) == 64 and meta["dp"] is False and meta["from-cache"] is True

    zero = ArrayRecord({k: torch.zeros(s) for k, s in expected.items()})
    untrained, trained = evaluate(site, zero), evaluate(site, delta)
    assert trained["num-examples"] == 200
    assert trained["eval-accuracy"] > untrained["eval-accuracy"] + 0.4, (untrained, trained)
    assert trained["eval-accuracy"] > 0.6


def test_mismatched_base_digest_is_refused_with_an_error_reply(site):
    reply = train(site, digest="0" * 64)
    error = reply["error"]
    assert error["code"] == "base_digest_mismatch" and error["site-id"] == "site-a"
    assert site["digest"] in error["reason"] and "delta" not in reply.array_records


def test_missing_data_path_is_refused_with_an_error_reply(site, tmp_path):
    reply = train(site, node_config={"site-id": "b", "data-path": str(tmp_path / "nope.npz")})
    assert reply["error"]["code"] == "missing_data" and "nope.npz" in reply["error"]["reason"]
    reply = train(site, node_config={"site-id": "b"})
    assert reply["error"]["code"] == "missing_data"


DP_META = {"site-id", "base-digest", "contribution-id", "dp", "dp-epsilon", "dp-max-grad-norm",
           "dp-noise-multiplier", "train-config"}


def test_dp_reply_holds_only_the_mechanism_and_public_values(site, tmp_path):
    state = tmp_path / "state"
    PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "site-a", 6.0)
    node = site["node_config"] | {"epsilon-budget": 6.0, "state-dir": str(state)}
    reply = train(site, node_config=node, dp=True, epochs=1, **{"dp-epsilon": 4.0, "lr": 0.5, "loss": "ce"})
    assert "error" not in reply.config_records, reply["error"]["reason"] if "error" in reply else ""
    metrics, meta = dict(reply["metrics"]), dict(reply["meta"])
    assert set(metrics) == {"num-examples", "epsilon", "delta"} and set(meta) == DP_META
    assert metrics["num-examples"] == 256  # the public bucket of n = 300: no exact count
    assert metrics["delta"] == 1e-5 and 3.0 < metrics["epsilon"] <= 4.0 + 1e-6
    assert meta["dp"] is True and re.fullmatch(r"[0-9a-f]{32}", meta["contribution-id"])
    assert json.loads(meta["train-config"])["seed"] == 0  # the server's request, echoed
    assert "train.npz" not in repr(reply) and str(site["root"]) not in repr(reply)
    # the site's own note maps the random id to its shard; the budget charged what was spent
    note = json.loads((state / "contributions.jsonl").read_text())
    assert note["contribution-id"] == meta["contribution-id"] and note["num-examples"] == 300
    assert len(note["shard-fingerprint"]) == 64
    assert PrivacyBudget(state / PrivacyBudget.FILE_NAME, "site-a").spent[0] == pytest.approx(metrics["epsilon"])
    assert oct(os.stat(state / "contributions.jsonl").st_mode & 0o777) == "0o600"

    # 4 spent of 6: another ε=4 contribution is refused before training; a declared count is
    # what a DP reply reveals and is weighted by
    reply = train(site, node_config=node, dp=True, epochs=1, **{"dp-epsilon": 4.0})
    assert reply["error"]["code"] == "budget_exhausted" and "budget" in reply["error"]["reason"]
    reply = train(site, node_config=node | {"declared-examples": 1000}, dp=True, epochs=1,
                  **{"dp-epsilon": 1.5})
    assert reply["metrics"]["num-examples"] == 1000 and reply["metrics"]["delta"] == 1e-5
    # the non-DP request of a budgeted site is refused; so is training once the record is gone
    assert train(site, node_config=node)["error"]["code"] == "dp_required"
    (state / PrivacyBudget.FILE_NAME).unlink()
    assert train(site, node_config=node, dp=True, epochs=1)["error"]["code"] == "budget_missing"
