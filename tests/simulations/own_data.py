"""Own-data simulations for tests: learnable pattern images and the real driver run as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from simulations.driver import cli as driver

REPO = Path(__file__).resolve().parents[2]


def pattern_images(num: int, num_classes: int, size: int, seed: int, rgb: bool = False):
    """Class k = a bright horizontal band at a class-specific height, plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % num_classes
    images = rng.integers(0, 60, (num, size, size), dtype=np.uint8)
    band = size // num_classes
    for i, label in enumerate(labels):
        images[i, label * band:(label + 1) * band] += 180
    if rgb:
        images = np.repeat(images[..., None], 3, axis=-1)
    return images, labels


def refused(tmp_path, capsys, *args) -> str:
    runs = tmp_path / "runs"
    code = driver.main(["--num-clients", "3", "--runs-dir", str(runs), "--no-cache", *args])
    assert code == 2
    assert not runs.exists() or not any(runs.iterdir()), "a run directory was created"
    return capsys.readouterr().err


def simulate(tmp_path: Path, *args) -> dict:
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "simulations.run", "--num-clients", "3", "--epochs", "1", "--img-size", "28",
           "--cache-dir", str(tmp_path / "cache"), "--remove", "1", "--fraction-evaluate", "1",
           "--runs-dir", str(runs), "--timeout", "600", "--run-config", "reinit=false", *args]
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((runs / "latest" / "summary.json").read_text())
    summary["_train_report"] = json.loads((runs / "latest" / "train-report.json").read_text())
    return summary
