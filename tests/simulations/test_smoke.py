"""CI-sized `make simulate`: 3 sites through a real `flwr run` (local simulation federation),
one unlearned, summary.json checked. Small: 600 training images, img-size 28, no token cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_smoke_simulation_train_then_unlearn(tmp_path):
    before = {p.pid for p in psutil.process_iter()}
    cmd = [sys.executable, "-m", "simulations.run", "--num-clients", "3", "--train-subset", "600",
           "--epochs", "3", "--img-size", "28", "--no-cache", "--eval-subset", "500",
           "--ensemble-subset", "300", "--remove", "1", "--fraction-evaluate", "1", "--evaluation", "server",
           "--runs-dir", str(tmp_path),
           "--run-config", "reinit=false", "--timeout", "600"]
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    for key in ("num_clients", "accuracy_composed", "accuracy_ensemble", "max_rel_logit_diff_composed_vs_ensemble",
                "removed_sites", "accuracy_after_removal", "removal_bit_identical", "wall_s", "peak_rss_mib",
                "peak_private_mib", "peak_pss_mib", "run_dir_bytes", "cache_build_s"):
        assert key in summary, key
    assert summary["num_clients"] == 3 and summary["recorded_sites"] == 3 and summary["rejected"] == {}
    # the default data: Fashion-MNIST, 10 classes, the server evaluates on its test split
    assert summary["dataset"] == "fashion-mnist" and summary["test_dataset"] == "fashion-mnist"
    assert summary["num_classes"] == 10 and summary["central_test_images"] == 500
    assert summary["federated_evaluation"]["num-examples"] > 0  # Flower's evaluate round ran on the sites
    assert summary["accuracy_composed"] > 0.2  # chance is 0.1 (img-size 28, 200 images a site: ~0.26)
    assert summary["max_rel_logit_diff_composed_vs_ensemble"] <= 1e-5
    assert len(summary["removed_sites"]) == 1 and summary["removal_bit_identical"] is True
    assert summary["accuracy_after_removal"] is not None
    assert summary["peak_rss_mib"] >= summary["peak_private_mib"] > 0 and summary["run_dir_bytes"] > 0
    assert (tmp_path / "latest" / "accuracy.png").is_file()
    # the exact head: same reply, its own ledger; the keys exist in every run, and once
    # the ServerApp keeps a stats ledger they say the composed statistics are the central ones
    for key in ("accuracy_exact_head", "exact_head_equals_central", "exact_head_removal_bit_identical",
                "exact_head_lambda", "exact_head_bytes_per_site"):
        assert key in summary, key
    if summary["exact_head"] and summary.get("exact_head_note") is None:
        assert summary["exact_head_equals_central"] is True
        assert summary["exact_head_removal_bit_identical"] is True
        assert summary["exact_head_removal_equals_central"] and summary["exact_head_removal_equals_fresh_ledger"]
        assert summary["exact_head_rows"] == 600 and summary["exact_head_sites"] == 3
        assert summary["accuracy_exact_head"] > 0.5  # chance 0.1; ridge on frozen φ of 600 images at img 28
        assert summary["accuracy_exact_head_after_removal"] > 0.5
        assert summary["exact_head_lambda"] > 0 and summary["exact_head_bytes_per_site"] > 0
    # the ServerApp's own lines are in the log once; no line per httpx request of the log uploader
    train_log = (tmp_path / "latest" / "train.log").read_text()
    assert train_log.count("asked 3 sites to train from w0") == 1, train_log[-3000:]
    assert "httpx" not in train_log, train_log[-3000:]
    # everything the driver started (SuperLink, ServerApp/simulation processes, Ray) is gone
    leftover = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                and str(tmp_path) in " ".join(p.info.get("cmdline") or [])]
    assert not leftover, [p.info["cmdline"] for p in leftover]
