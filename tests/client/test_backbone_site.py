"""A deployment-style site with its own copy of the run's backbone weights trains; a site given
other weights (or none) is refused before it trains, with both files named. The real ClientApp,
real Flower messages, a small timm ViT saved to disk."""
from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app
from tangent.protocol.spec import ModelSpec, build_model
from tests.backbone_files import IMG_SIZE, VARIANTS, save

pytestmark = pytest.mark.usefixtures("flower_server_identity")
VARIANT = "registers"
TRAIN = {"epochs": 1, "batch-size": 16, "lr": 1e-3, "loss": "rsl", "kappa": 15.0, "rsl-alpha": 1.0,
         "l2": 0.0, "radius": 0.0, "seed": 0, "dp": False, "dp-epsilon": 8.0, "dp-delta": 0.0,
         "dp-max-grad-norm": 1.0}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbone-site")
    server_file = save(root / "server", VARIANT, layout="safetensors")
    spec = ModelSpec(backbone=VARIANTS[VARIANT][0], backbone_weights=str(server_file), img_size=0,
                     num_classes=3, reinit=False).resolved()
    _, digest = build_model(spec)
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 3, 40))
    return {"root": root, "spec": spec, "digest": digest}


def train(run, weights) -> RecordDict:
    node_config = {"site-id": "site-b", "data-path": str(run["root"] / "train.npz")}
    if weights is not None:
        node_config["backbone-weights"] = str(weights)
    content = RecordDict({"spec": ConfigRecord(run["spec"].to_config() | {"base-digest": run["digest"]}),
                          "config": ConfigRecord(TRAIN)})
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    reply = app(Message(content, dst_node_id=7, message_type="train"), context)
    assert not reply.has_error(), reply.error
    return reply.content


def test_site_with_its_own_copy_of_the_weights_trains(run):
    # timm's directory layout, with the same bytes in model.safetensors as the server's file
    reply = train(run, save(run["root"] / "site-copy", VARIANT, layout="timm"))
    assert "error" not in reply.config_records, reply.config_records.get("error")
    assert reply["meta"]["base-digest"] == run["digest"]


def test_site_with_other_weights_is_refused_naming_both(run):
    other = save(run["root"] / "site-other", VARIANT, layout="safetensors", seed=1)
    reply = train(run, other)
    error = reply["error"]
    assert error["code"] == "base_digest_mismatch" and "delta" not in reply.array_records
    assert str(other) in error["reason"] and run["spec"].backbone_sha256 in error["reason"]
    assert VARIANTS[VARIANT][0] in error["reason"]


def test_site_without_the_file_is_refused(run):
    reply = train(run, run["root"] / "nowhere.safetensors")
    assert reply["error"]["code"] == "missing_backbone" and "nowhere.safetensors" in reply["error"]["reason"]


def test_site_whose_config_builds_another_model_is_refused(run):
    """The run's very file, but without its config.json: timm builds the full-size architecture,
    which the tensors do not fit."""
    import shutil

    bare = run["root"] / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    shutil.copy(run["spec"].backbone_weights, bare)
    reply = train(run, bare)
    assert reply["error"]["code"] == "bad_backbone" and str(bare) in reply["error"]["reason"]
