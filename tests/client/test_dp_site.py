"""What a curious server can learn from a DP site, tried through the real ClientApp (real Flower
messages, the real pretrained ViT-S/14 at img 28, a few dozen images, a real budget record):
every reply a DP site sends, refusals included, is the mechanism's output, public, or a fixed
text that depends on nothing the site holds."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from tangent.training.budget import PrivacyBudget
from tangent.protocol.spec import ModelSpec, build_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_server_identity")]

SPEC = ModelSpec(img_size=28, reinit=False, num_classes=9)
DP_TRAIN = {"epochs": 1, "batch-size": 16, "lr": 0.5, "loss": "ce", "seed": 0, "dp": True,
            "dp-epsilon": 2.0, "dp-delta": 0.0, "dp-max-grad-norm": 1.0}
N = 40


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-site")
    labels = np.arange(N) % 9
    np.savez(root / "without.npz", images=images(N, 0), labels=labels)
    # the same data set plus one record whose label the server's num-classes=9 has no class for
    np.savez(root / "with.npz", images=images(N + 1, 0), labels=np.append(labels, 9))
    _, digest = build_model(SPEC)
    return {"root": root, "digest": digest}


def dp_node(site, tmp_path, data: str = "without.npz", **extra) -> dict:
    """A budgeted DP site (its record created as the deploy scripts do) that declares 64 examples."""
    state = tmp_path / "state"
    if not (state / PrivacyBudget.FILE_NAME).exists():
        PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "s1", 100.0)
    return {"site-id": "s1", "data-path": str(site["root"] / data), "state-dir": str(tmp_path / "state"),
            "epsilon-budget": 100.0, "declared-examples": 64} | extra


def call(kind: str, content: RecordDict, node_config: dict) -> RecordDict:
    msg = Message(content, dst_node_id=42, message_type=kind)
    context = Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(msg, context)
    assert not reply.has_error(), reply.error
    return reply.content


def train(site, node_config: dict, **config) -> RecordDict:
    spec = ConfigRecord(SPEC.to_config() | {"base-digest": site["digest"]})
    return call("train", RecordDict({"spec": spec, "config": ConfigRecord(DP_TRAIN | config)}), node_config)


def shape(reply: RecordDict) -> dict:
    """What a reply shows beyond the noise: its records, its metrics, the meta's keys."""
    assert "error" not in reply.config_records, dict(reply["error"])
    return {"records": sorted(reply.keys()), "metrics": dict(reply["metrics"]),
            "meta": sorted(reply["meta"].keys()), "delta": sorted(reply["delta"].keys())}


def test_a_record_with_a_label_the_spec_lacks_changes_nothing_but_the_noise(site, tmp_path):
    # old code: with the label-9 record, a free `bad_data` refusal naming the path and the label
    without = shape(train(site, dp_node(site, tmp_path / "a")))
    with_record = shape(train(site, dp_node(site, tmp_path / "b", "with.npz")))
    assert with_record == without
    assert without["metrics"]["num-examples"] == 64  # the declared count, not n


def test_a_dp_sites_refusals_name_no_path_label_or_count(site, tmp_path):
    from client.task import PRIVATE_FAILURE, PRIVATE_REFUSALS

    (site["root"] / "broken.npz").write_bytes(b"not an npz")
    for data in ("missing.npz", "broken.npz"):
        error = train(site, dp_node(site, tmp_path, data))["error"]
        assert (error["code"], error["reason"]) == PRIVATE_FAILURE, dict(error)
    # before any data: the code stays, the text is the code's fixed one
    error = train(site, dp_node(site, tmp_path), **{"dp-epsilon": 1000.0})["error"]
    assert (error["code"], error["reason"]) == ("budget_exhausted", PRIVATE_REFUSALS["budget_exhausted"])
    for text in [*PRIVATE_REFUSALS.values(), PRIVATE_FAILURE[1]]:
        assert str(site["root"]) not in text and not any(ch.isdigit() for ch in text)


@pytest.mark.parametrize("batch", [1, 10_000])
def test_a_server_chosen_batch_size_never_buys_more_than_epsilon(site, tmp_path, batch):
    """The train request's batch size is the server's to choose (a DP run sends dp-batch-size); a
    curious server asking for one example a step, or for far more than the site holds, still gets a
    reply that spent at most the ε asked for, and that is what the site's record is charged."""
    node = dp_node(site, tmp_path)
    reply = train(site, node, **{"batch-size": batch})
    assert "error" not in reply.config_records, dict(reply["error"])
    epsilon = float(reply["metrics"]["epsilon"])
    assert 0 < epsilon <= DP_TRAIN["dp-epsilon"]
    spent, _ = PrivacyBudget(tmp_path / "state" / PrivacyBudget.FILE_NAME, "s1").spent
    assert spent == pytest.approx(epsilon) and spent <= DP_TRAIN["dp-epsilon"]
