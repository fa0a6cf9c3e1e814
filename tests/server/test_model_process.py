"""The ServerApp keeps torch out of its own memory: every torch job runs in a
short-lived child process (server.model_process), whose errors come back as text, never as a hang.

The end-to-end test runs a real ServerApp main (train, then unlearn) in a fresh Python process on
the real pretrained ViT (img 28), the real ledger and real Flower messages, and reads that
process's ``sys.modules`` afterwards. Its stand-in sites (``NumpySitesGrid``, a Flower ``Grid``)
send small numpy Δw of the shapes the server announces; they learn the shapes from a child
process too, so nothing in the tested process imports torch but the code under test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server import model_process
from server.model_process import ModelProcessError

ROOT = Path(__file__).resolve().parents[2]


def test_a_childs_result_comes_back():
    assert model_process.call(divmod, 17, 5, timeout=60) == (3, 2)


def test_a_childs_exception_comes_back_as_its_type_and_text():
    with pytest.raises(ModelProcessError) as caught:
        model_process.call(int, "not a number", timeout=60)
    assert caught.value.error_type == "ValueError"
    assert str(caught.value).startswith("ValueError: invalid literal for int()")
    assert "Traceback" in caught.value.child_traceback


def test_a_child_past_its_timeout_is_killed_not_waited_for():
    started = time.monotonic()
    with pytest.raises(ModelProcessError, match="timeout of 2 s") as caught:
        model_process.call(time.sleep, 120, timeout=2)
    assert caught.value.error_type == "Timeout" and time.monotonic() - started < 30


def test_a_child_that_dies_without_an_answer_is_reported():
    with pytest.raises(ModelProcessError, match="exit code 7") as caught:
        model_process.call(os._exit, 7, timeout=60)
    assert caught.value.error_type == "Died"


# ----------------------------------------------------------------------------- the ServerApp process itself

SCRIPT = r"""
import json, math, sys

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server import model_process, server_app
from tests.server.local_grid import LocalGrid

TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
SITES = (101, 102, 103)
state = sys.argv[1]


class NumpySitesGrid(LocalGrid):
    sites = SITES

    def __init__(self):
        super().__init__()
        self._shapes = None

    def _answer(self, msg):
        spec = dict(msg.content.config_records["spec"].items())
        if self._shapes is None:  # in a child process: this one must not import torch itself
            self._shapes = model_process.call(model_process.describe_model, spec, {}, False,
                                              timeout=300)["delta_shapes"]
        site = str(SITES.index(msg.metadata.dst_node_id))
        rng = np.random.default_rng(int(site))
        delta = {k: Array((1e-3 * rng.standard_normal(s)).astype(np.float32)) for k, s in self._shapes.items()}
        content = RecordDict({
            "delta": ArrayRecord(delta),
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 1.0, "train-accuracy": 0.5,
                                     "epsilon": math.inf, "delta": 0.0, "wall-s": 0.1}),
            "meta": ConfigRecord({"site-id": site, "base-digest": str(spec["base-digest"]), "dp": False,
                                  "train-config": json.dumps({"epochs": 1})})})
        return Message(content, reply_to=msg)


def run(mode, **overrides):
    run_config = {"mode": mode, "img-size": 28, "reinit": False, "num-classes": 10, "seed": 0, "epochs": 1,
                  "min-nodes": 3, "fraction-evaluate": 0.0, "eval-subset": 32, "num-rounds": 1,
                  "round-timeout": 300.0, "exact-head": False, "max-delta-norm": 1000.0, "federation-mode": "simulation",
                  "state-dir": state, "report-path": f"report-{mode}.json", "cache-dir": ""} | overrides
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(NumpySitesGrid(), context)
    with open(f"{state}/report-{mode}.json") as handle:
        return json.load(handle)


train = run("train")
unlearn = run("unlearn", **{"remove-sites": "1"})
print(json.dumps({"torch": "torch" in sys.modules, "timm": "timm" in sys.modules,
                  "train": {"accuracy": train["accuracy"], "central": train["central"],
                            "evaluation": train["central_evaluation"], "recorded": train["rounds"][0]["recorded"]},
                  "unlearn": {"accuracy": unlearn["accuracy"], "removed": unlearn["removed_sites"]}}))
"""


@pytest.mark.slow
def test_the_serverapp_process_never_imports_torch(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the run did everything a run does: recorded the replies, evaluated centrally, removed a site
    assert sorted(result["train"]["recorded"]) == ["0", "1", "2"]
    assert result["train"]["central"]["1"]["num-examples"] == 32, result
    assert 0.0 <= result["train"]["accuracy"] <= 1.0 and result["train"]["evaluation"]["error"] is None
    assert result["unlearn"]["removed"] == ["1"] and result["unlearn"]["accuracy"] is not None
    # ... and neither torch nor timm was ever imported by the ServerApp's own process
    assert result["torch"] is False and result["timm"] is False, result
    # the private copy of the test rows is gone with the run
    assert not list(tmp_path.glob("central-evaluation-*"))
