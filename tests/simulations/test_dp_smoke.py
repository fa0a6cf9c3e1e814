"""A private federation end to end: `simulations.run --dp-epsilon 8` with 3 sites through a real
`flwr run` — every site trains DP-TAFT and releases the DP exact head's noisy statistics, the
ServerApp records both, one site is unlearned, and summary.json carries the DP keys: accuracies,
what each site spent (DP-TAFT and the head composed), and the exactness flags that apply to noisy statistics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
EPSILON = 8.0


def test_dp_simulation_with_the_dp_head(tmp_path):
    cmd = [sys.executable, "-m", "simulations.run", "--num-clients", "3", "--train-subset", "600", "--epochs", "1",
           "--dp-epsilon", str(EPSILON), "--eval-subset", "2000", "--ensemble-subset", "300", "--remove", "1",
           "--runs-dir", str(tmp_path), "--timeout", "1500"]
    env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    summary = json.loads((tmp_path / "latest" / "summary.json").read_text())
    assert summary["dp"] is True and summary["recorded_sites"] == 3 and summary["rejected"] == {}
    assert summary["dp_epsilon_requested"] == EPSILON and summary["dp_head_share_requested"] == 0.9
    # each site's contribution spent the composition of DP-TAFT and the head: at most ε (the ServerApp's count agrees)
    assert 0.95 * EPSILON < summary["dp_epsilon_spent_max"] <= EPSILON
    assert summary["dp_epsilon_received_max"] == pytest.approx(summary["dp_epsilon_spent_max"])
    assert 0 < summary["dp_delta"] < 1e-3 and summary["dp_sites_charged"] == 3
    # noisy statistics: the sum of the releases as stored, and removal takes a site's noise with it
    assert summary["dp_head_sum_equals_releases"] is True
    assert summary["dp_head_removal_bit_identical"] is True and summary["removal_bit_identical"] is True
    assert summary["dp_head_releases"] == 3 and summary["dp_head_noise_variance"] > 0
    # k = 768: a release is five int64 arrays (the packed Gram's 295,296 entries the most), compressed
    assert 100_000 < summary["exact_head_stored_bytes_per_site"] < 8 * 400_000
    # 600 images at ε = 8: far above chance (0.1) for the head; DP-TAFT at one epoch barely moves w0
    assert summary["accuracy_exact_head"] > 0.3 and summary["accuracy_exact_head_after_removal"] > 0.3
    assert summary["accuracy_composed"] is not None and summary["exact_head_test_images"] == 2000
