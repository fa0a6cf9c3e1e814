"""The simulation on a Ray cluster started separately (`ray start --head`), through --ray-address.

The head gets a private temp dir and its own session: it is stopped by its process group and by
the PIDs whose command line names that temp dir — never with `ray stop`, which would stop every
Ray instance on the machine (other users' too).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from simulations.driver.processes import free_port

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.slow


def processes_of(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != os.getpid() and marker in " ".join(proc.info.get("cmdline") or []):
            found.append(proc)
    return found


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
    except ProcessLookupError:
        pass
    try:
        head.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    leftover = processes_of(temp_dir)
    for proc in leftover:
        proc.terminate()
    _, alive = psutil.wait_procs(leftover, timeout=10)
    for proc in alive:
        proc.kill()


def wait_for_head(address: str, head: subprocess.Popen, timeout: float = 120) -> None:
    env = os.environ | {"RAY_ADDRESS": address}
    end = time.time() + timeout
    while time.time() < end:
        assert head.poll() is None, "ray start --head exited"
        probe = subprocess.run([str(RAY), "status", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"no Ray head at {address} after {timeout} s")


def test_simulation_runs_on_a_separately_started_ray_head(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.Popen([str(RAY), "start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp_dir}",
                             "--include-dashboard=false", "--disable-usage-stats", "--block"],
                            stdout=open(tmp_path / "ray-head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_head(address, head)
        runs = tmp_path / "runs"
        cmd = [sys.executable, "-m", "simulations.run", "--num-clients", "3", "--train-subset", "300",
               "--epochs", "1", "--img-size", "28", "--no-cache", "--eval-subset", "200", "--ensemble-subset", "100",
               "--remove", "1", "--runs-dir", str(runs), "--ray-address", address, "--timeout", "600",
               "--run-config", "reinit=false"]
        env = os.environ | {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        summary = json.loads((runs / "latest" / "summary.json").read_text())
        assert summary["ray_address"] == address
        assert summary["recorded_sites"] == 3 and summary["removal_bit_identical"] is True

        # It ran on *that* cluster: the head's session logs hold the ClientApp actors' workers and
        # the simulation's driver jobs; no Ray instance was started inside the run directory.
        logs = Path(temp_dir) / "session_latest" / "logs"
        worker_logs = " ".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())
        assert "ClientAppActor" in worker_logs, sorted(p.name for p in logs.iterdir())[:40]
        drivers = list(logs.glob("python-core-driver-*"))
        assert len(drivers) >= 2, sorted(p.name for p in logs.iterdir())[:40]  # train and unlearn runs
        assert not list((runs / "latest").rglob("session_*"))
        assert head.poll() is None, "the head must outlive the simulation (it is not the driver's)"
    finally:
        stop_head(head, temp_dir)
        left = processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, "Ray processes of the test's head are left"
