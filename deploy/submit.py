"""Submit a run to the deployment's SuperLink and wait for it (operator side).

    python -m deploy.submit --run-config "mode='train' epochs=5"                 # training round(s)
    python -m deploy.submit --run-config "mode='unlearn' remove-sites='3'"       # unlearning run

This is `flwr run <app> taft --run-config ... --format json` with the deployment-local
FLWR_HOME (see deploy.connection), followed by polling `flwr ls --run-id` until the run
finishes; it prints the run's status and timings, and the run's logs when it failed.
Exit 0 only for `finished:completed`. `--no-wait` returns after submission.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.connection import DEFAULT_NAME, DEFAULT_STATE, flwr_env

FLWR = str(Path(sys.executable).with_name("flwr"))


def _json(out: str) -> dict[str, Any]:
    return json.loads(out[out.index("{"):])


def submit(state: Path, app: Path, run_config: list[str], connection: str = DEFAULT_NAME) -> int:
    cmd = [FLWR, "run", str(app), connection, "--format", "json"]
    for rc in run_config:
        cmd += ["--run-config", rc]
    proc = subprocess.run(cmd, env=flwr_env(state), capture_output=True, text=True, timeout=300)
    try:
        result = _json(proc.stdout)
    except ValueError:
        raise RuntimeError(f"flwr run failed: {proc.stdout}{proc.stderr}") from None
    if not result.get("success"):
        raise RuntimeError(f"flwr run refused: {result}")
    return int(result["run-id"])


def run_status(state: Path, run_id: int, connection: str = DEFAULT_NAME) -> dict[str, Any]:
    proc = subprocess.run([FLWR, "ls", connection, "--run-id", str(run_id), "--format", "json"],
                          env=flwr_env(state), capture_output=True, text=True, timeout=120)
    runs = _json(proc.stdout).get("runs", [])
    return runs[0] if runs else {}


def run_logs(state: Path, run_id: int, connection: str = DEFAULT_NAME) -> str:
    proc = subprocess.run([FLWR, "log", str(run_id), connection, "--show"], env=flwr_env(state),
                          capture_output=True, text=True, timeout=120)
    return proc.stdout + proc.stderr


def wait(state: Path, run_id: int, timeout_s: float, connection: str = DEFAULT_NAME,
         poll_s: float = 1.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = run_status(state, run_id, connection)
        if str(status.get("status", "")).startswith("finished"):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f} s: {status}")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=Path("."), help="Flower app directory (default: .)")
    parser.add_argument("--run-config", action="append", default=[], help="as for `flwr run`; repeatable")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    parser.add_argument("--no-wait", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        run_id = submit(args.state, args.app, args.run_config, args.connection)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"run {run_id} submitted", flush=True)
    if args.no_wait:
        return 0
    status = wait(args.state, run_id, args.timeout, args.connection)
    print(json.dumps({"run-id": run_id, "status": status.get("status"), "elapsed": status.get("elapsed"),
                      "running-at": status.get("running-at"), "finished-at": status.get("finished-at"),
                      "wall-s": round(time.monotonic() - t0, 2)}, indent=2))
    if status.get("status") != "finished:completed":
        print(run_logs(args.state, run_id, args.connection), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
