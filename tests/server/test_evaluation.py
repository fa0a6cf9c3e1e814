"""The ServerApp's central evaluation: built in the background (the sites' training never waits
for it), on the run config's test set, skipped without one — through the real ServerApp main,
the real strategy and ledger, real Flower messages and the real pretrained w0.

The only stand-in is the network: ``SitesGrid`` (a Flower ``Grid``) answers every train message
at once with a real train reply, as three sites would, and notes when each message was pushed.
The evaluation's builds run in child processes (server.model_process): a replaced build is a
module-level function of this file, and it reports through files, not through this process's memory.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

import server.evaluation as evaluation_module
from server import server_app
from tests.server.local_grid import LocalGrid
from tests.server.train_replies import delta_shapes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_server_identity")]  # the pretrained w0
SITES = (101, 102, 103)
BUILD_DELAY_S = 4.0


class SitesGrid(LocalGrid):
    """Three sites that reply to a train message immediately with a small real Δw."""

    sites = SITES

    @staticmethod
    def _answer(msg: Message) -> Message:
        import torch

        spec = msg.content.config_records["spec"]
        site = str(SITES.index(msg.metadata.dst_node_id))
        rng = np.random.default_rng(int(site))
        shapes = delta_shapes(spec)
        delta = {k: torch.from_numpy((1e-3 * rng.standard_normal(s)).astype(np.float32)) for k, s in shapes.items()}
        content = RecordDict({
            "delta": ArrayRecord(delta),
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 1.0, "train-accuracy": 0.5,
                                     "epsilon": math.inf, "delta": 0.0, "wall-s": 0.1, "fit-s": 0.1,
                                     "examples-per-s": 1000.0}),
            "meta": ConfigRecord({"site-id": site, "base-digest": str(spec["base-digest"]),
                                  "shard-fingerprint": f"fp-{site}", "data-digest": "d", "source": "test",
                                  "from-cache": False, "dp": False, "dp-epsilon": 0.0,
                                  "dp-max-grad-norm": 0.0, "dp-noise-multiplier": 0.0,
                                  "train-config": json.dumps({"epochs": 1}), "pid": 1})})
        return Message(content, reply_to=msg)


_REAL_BUILD = evaluation_module.build_inputs


def slow_build_inputs(*args):
    """The real input build, made BUILD_DELAY_S slower; notes when it finished (in the child)."""
    time.sleep(BUILD_DELAY_S)
    out = _REAL_BUILD(*args)
    with open(os.environ["TAFT_TEST_BUILD_LOG"], "a") as log:
        log.write(f"{time.time()}\n")
    return out


@pytest.fixture
def slow_build(monkeypatch, tmp_path_factory):
    """Makes the ServerApp's build :func:`slow_build_inputs`; returns the finish times so far."""
    log = tmp_path_factory.mktemp("builds") / "finished.log"
    monkeypatch.setenv("TAFT_TEST_BUILD_LOG", str(log))
    monkeypatch.setattr(evaluation_module, "build_inputs", slow_build_inputs)
    return lambda: [float(t) for t in log.read_text().split()] if log.exists() else []


def run_main(tmp_path: Path, **overrides) -> tuple[dict, SitesGrid]:
    run_config = {"mode": "train", "img-size": 28, "reinit": False, "num-classes": 10, "seed": 0,
                  "epochs": 1, "min-nodes": 3, "fraction-evaluate": 0.0, "eval-subset": 64,
                  "num-rounds": 1, "round-timeout": 60.0, "exact-head": False, "max-delta-norm": 1000.0, "weighting": "examples",
                  "ledger-path": str(tmp_path / "ledger.sqlite"), "report-path": str(tmp_path / "report.json"),
                  "federation-mode": "simulation", "state-dir": str(tmp_path), "cache-dir": ""} | overrides
    grid = SitesGrid()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(grid, context)
    return json.loads((tmp_path / "report.json").read_text()), grid


def first_train_push(grid: SitesGrid) -> float:
    return min(t for kind, t in grid.pushed if kind == "train")


def test_train_messages_go_out_before_the_evaluation_is_built(tmp_path, slow_build):
    for run in (1, 2):  # a fresh ledger, then one that already holds a composed model
        report, grid = run_main(tmp_path)
        finished = slow_build()
        assert len(finished) == run, "the build ran once per run"
        assert first_train_push(grid) < finished[-1] - BUILD_DELAY_S / 2, (grid.pushed, finished)
        # ... and the evaluation still happened once the inputs were there
        assert report["central"]["1"]["num-examples"] == 64
        assert 0.0 <= report["accuracy"] <= 1.0
        assert report["central_evaluation"]["test_dataset"] == "fashion-mnist"
        assert report["central_evaluation"]["build_s"] >= BUILD_DELAY_S


def test_own_test_set_and_no_test_set(tmp_path):
    rng = np.random.default_rng(0)
    test = tmp_path / "test.npz"
    np.savez(test, images=rng.integers(0, 256, (30, 20, 20, 3), dtype=np.uint8), labels=np.arange(30) % 4)
    (tmp_path / "own").mkdir()
    report, _ = run_main(tmp_path / "own", **{"num-classes": 4, "test-dataset": str(test)})
    assert report["central"]["1"]["num-examples"] == 30 and report["accuracy"] is not None
    assert report["central_evaluation"]["test_dataset"] == str(test)

    (tmp_path / "none").mkdir()
    report, _ = run_main(tmp_path / "none", dataset=str(test))  # own training data, no test set
    assert report["central"] == {} and report["accuracy"] is None
    assert report["central_evaluation"]["test_dataset"] is None
    assert len(report["rounds"][0]["recorded"]) == 3  # training went on as usual


def test_a_broken_test_set_is_reported_not_fatal(tmp_path):
    broken = tmp_path / "broken.npz"
    np.savez(broken, images=np.zeros((4, 8, 8), np.float32), labels=np.arange(4))  # not uint8
    report, _ = run_main(tmp_path, **{"test-dataset": str(broken)})
    assert "uint8" in report["central_evaluation"]["error"] and str(broken) in report["central_evaluation"]["error"]
    assert report["accuracy"] is None and len(report["rounds"][0]["recorded"]) == 3


def gated_build_inputs(*args):
    """The real input build, once the file TAFT_TEST_RELEASE exists (at most 60 s from now)."""
    release, deadline = Path(os.environ["TAFT_TEST_RELEASE"]), time.time() + 60
    while not release.exists() and time.time() < deadline:
        time.sleep(0.05)
    return _REAL_BUILD(*args)


SPEC = {"img-size": 28, "reinit": False, "num-classes": 10}


def test_start_returns_at_once_and_the_first_call_waits(tmp_path, monkeypatch):
    """The class on its own: nothing of Flower involved."""
    from server import config as cfg
    from server.model_process import call, describe_model

    spec = cfg.model_spec(SPEC).to_config()
    described = call(describe_model, spec, {}, False, timeout=300)
    release = tmp_path / "release"
    monkeypatch.setenv("TAFT_TEST_RELEASE", str(release))
    started = time.perf_counter()
    evaluation = evaluation_module.CentralEvaluation.start(spec, described["base_digest"], SPEC | {"eval-subset": 8},
                                                           build=gated_build_inputs, workdir=tmp_path / "state")
    assert time.perf_counter() - started < 0.5 and not evaluation.wait(timeout=0.5)
    threading.Timer(0.3, release.touch).start()
    result = evaluation({k: np.zeros(s, np.float32) for k, s in described["delta_shapes"].items()})
    assert result["num-examples"] == 8 and evaluation.error is None
    workdir = evaluation.workdir
    assert workdir.parent == tmp_path / "state" and (workdir.stat().st_mode & 0o777) == 0o700
    evaluation.close()
    assert not workdir.exists()


def test_a_failing_evaluation_is_reported_not_raised(tmp_path):
    """Δ arrays of the wrong shapes: the child's error comes back as text, the run goes on."""
    from server import config as cfg

    spec = cfg.model_spec(SPEC).to_config()
    evaluation = evaluation_module.CentralEvaluation.start(spec, "digest", SPEC | {"eval-subset": 8},
                                                           workdir=tmp_path)
    assert evaluation({"no-such-tensor": np.zeros(3, np.float32)}) is None
    assert evaluation.error is None and len(evaluation.errors) == 1
    assert evaluation.errors[0].split(":")[0] in ("KeyError", "ValueError", "RuntimeError"), evaluation.errors
    assert evaluation.summary()["evaluation_errors"] == evaluation.errors
    evaluation.close()
