"""Fuzz: whatever a curious server sends a DP site, a refusal shows only a fixed text.

Hundreds of hostile train and evaluate messages (real Flower records; malformed or extreme DP
settings, DP head requests, centres, specs, train settings) go through the site's real handlers
(client.task.train/evaluate) on budgeted DP sites whose data are missing or broken, so every
message ends in a refusal. Each refusal must be exactly ``{code, reason, site-id}`` with
(code, reason) one of :data:`client.task.PRIVATE_REFUSALS`'s pairs or :data:`client.task.PRIVATE_FAILURE`:
nothing in it may depend on what the site holds (a path, a label, a count, a traceback)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from client import task
from client.task import PRIVATE_FAILURE, PRIVATE_REFUSALS
from tangent.protocol.spec import ModelSpec, build_model
from tangent.training.budget import PrivacyBudget

CASES = 200
SPEC = ModelSpec(img_size=28, reinit=False, num_classes=9)
#: a DP request the sites accept, which one mutation at a time makes hostile
DP_TRAIN = {"dp": True, "dp-epsilon": 1.0, "dp-delta": 0.0, "dp-max-grad-norm": 1.0, "epochs": 1,
            "batch-size": 16, "lr": 0.5, "loss": "ce", "seed": 0}
FIXED = {*PRIVATE_REFUSALS.items(), PRIVATE_FAILURE}
#: values a server may put under a train-config key, hostile ones first
VALUES = {
    "dp": [True, True, True, False, "yes", "maybe", 1, 0, ""],
    "dp-epsilon": [1.0, 0.5, 0.0, -1.0, math.nan, math.inf, 1e9, "x"],
    "dp-delta": [0.0, 1e-9, 0.5, 1.0, -1.0, math.nan, "x"],
    "dp-max-grad-norm": [1.0, 0.0, -1.0, math.inf, "x"],
    "dp-head-share": [0.0, 0.5, 0.9, -2.0, math.nan, 1.0, 1e9, "x"],
    "dp-head-weights": ["0,0.6,0.39,0.01", "1,0,0,0", "a,b", "0,0.5,0.5", "-1,1,1,0", ""],
    "dp-head-dim": [0, 8, -1, 10 ** 12, "x"],
    "dp-head-seed": [0, -5, "x"],
    "dp-head-frac-bits": [16, 0, 25, 99, "x"],
    "epochs": [1, 0, -1, 10 ** 9, "x"],
    "batch-size": [16, 0, -1, 10 ** 12, "x"],
    "lr": [0.1, math.nan, -1.0, "x"],
    "loss": ["ce", "x", ""],
    "seed": [0, -1, "x"],
}


pytestmark = pytest.mark.slow  # the real ViT-S/14 is built once (the spec check)


@pytest.fixture
def sites(tmp_path):
    """Budgeted DP sites (the deploy scripts' record): data missing, broken, or a directory."""
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    (tmp_path / "a-directory").mkdir()
    nodes = []
    for i, data in enumerate(("missing.npz", "broken.npz", "a-directory")):
        state = tmp_path / f"state-{i}"
        PrivacyBudget.create(state / PrivacyBudget.FILE_NAME, "s1", 50.0)
        nodes.append({"site-id": "s1", "data-path": str(tmp_path / data), "state-dir": str(state),
                      "epsilon-budget": 50.0, "declared-examples": 64, "max-epsilon": 10.0})
        nodes.append(nodes[-1] | {"require-dp": True})
    return nodes


def hostile_message(rng: np.random.Generator, digest: str) -> RecordDict:
    if rng.random() < 0.5:  # anything at all
        config = {key: values[int(rng.integers(len(values)))] for key, values in VALUES.items()
                  if rng.random() < 0.6}
    else:  # an acceptable DP request with one or two settings changed, and the real spec
        config = dict(DP_TRAIN)
        for key in rng.choice(sorted(VALUES), int(rng.integers(0, 3)), replace=False):
            config[str(key)] = VALUES[key][int(rng.integers(len(VALUES[key])))]
    content = RecordDict({"config": ConfigRecord(config)})
    how = int(rng.integers(6))
    if how == 0:  # the real spec, with the right digest (the data are then read: they fail) or not
        right = rng.random() < 0.5
        content["spec"] = ConfigRecord(SPEC.to_config() | {"base-digest": digest if right else "0" * 64})
    elif how == 1:  # a spec that cannot be built
        content["spec"] = ConfigRecord({"backbone": "nope", "img-size": "x", "base-digest": "0" * 64})
    elif how == 2:  # a spec naming nothing but a digest
        content["spec"] = ConfigRecord({"base-digest": "0" * 64, "num-classes": int(rng.integers(-1, 12))})
    elif how == 3:  # a DP head centre: NaN, 2-D, huge
        centre = rng.choice(np.array([np.full(4, np.nan), np.zeros((2, 3)), np.full(384, 1e300)], dtype=object))
        content["dp-head-centre"] = ArrayRecord({"centre": Array(np.asarray(centre, np.float64))})
    elif how == 4:
        content["delta"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    return content


def single_mutations() -> list[RecordDict]:
    """The accepted DP request with one setting changed, for every value in VALUES: each refusal
    path the policy has (dp_required, epsilon_too_large, delta_too_large, bad_request) is met at
    least once, whatever the random messages below happen to draw."""
    return [RecordDict({"config": ConfigRecord(DP_TRAIN | {key: value})})
            for key, values in VALUES.items() for value in values]


def test_every_refusal_of_a_dp_site_is_a_fixed_text(sites):
    rng = np.random.default_rng(20261206)
    _, digest = build_model(SPEC)
    codes = Counter()
    messages = [(task.train, message) for message in single_mutations()]
    messages += [(task.evaluate if rng.random() < 0.2 else task.train, hostile_message(rng, digest))
                 for _ in range(CASES)]
    for case, (handler, message) in enumerate(messages):
        node = sites[case % len(sites)]
        reply = handler(message, node, {})
        assert set(reply.keys()) == {"error"}, (case, sorted(reply.keys()))
        error = dict(reply["error"])
        assert set(error) == {"code", "reason", "site-id"} and error["site-id"] == "s1", error
        assert (error["code"], error["reason"]) in FIXED, (case, error)
        codes[error["code"]] += 1
    print(f"\n{len(messages)} hostile messages to DP sites: {dict(sorted(codes.items()))}")
    assert len(codes) >= 6 and {PRIVATE_FAILURE[0], "base_digest_mismatch"} <= set(codes), codes
