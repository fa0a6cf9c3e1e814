"""Submit a run to the deployment's SuperLink and wait for it (operator side).

    python -m deploy.submit --run-config "mode='train' epochs=5"                 # training round(s)
    python -m deploy.submit --run-config "mode='unlearn' remove-sites='3'"       # unlearning run

This is `flwr run <app> taft --run-config ... --format json` with the deployment-local
FLWR_HOME (see deploy.connection), followed by polling `flwr ls --run-id` until the run
finishes. While it waits it prints a line whenever the run's status changes and otherwise
every `--progress-every` seconds (status, elapsed time, the last line the ServerApp logged);
at the end the run's status and timings, and the run's logs when it failed.
Exit 0 only for `finished:completed`. `--no-wait` returns after submission.

Unless the run config sets them, `state-dir` is set to `--state` (the operator's state dir) and
`site-registry` to its `registry.json`, so the ServerApp resolves `ledger-path`, `site-registry`, `withdrawal-requests` and `report-path`
there: put withdrawal requests in `<state>/requests/` and name them relative to the state dir,
e.g. `withdrawal-requests='requests/withdraw-3.json'`.
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


def app_config_keys(app: Path) -> set[str]:
    """The keys of the app's [tool.flwr.app.config] (only those may be overridden)."""
    import tomllib

    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.exists():
        return set()
    return set(tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
               .get("config", {}))


def with_state_dir(run_config: list[str], state: Path, app: Path) -> list[str]:
    """Add `state-dir='<state>'` and, when `<state>/registry.json` exists,
    `site-registry='registry.json'` - each unless given or the app has no such key."""
    keys, given = app_config_keys(app), " ".join(run_config)
    added = []
    if "state-dir" in keys and "state-dir" not in given:
        added.append(f"state-dir='{Path(state).resolve()}'")
    if "site-registry" in keys and "site-registry" not in given and (Path(state) / "registry.json").exists():
        added.append("site-registry='registry.json'")
    return [*run_config, *added]


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


def last_log_line(state: Path, run_id: int, connection: str = DEFAULT_NAME) -> str:
    """The last non-empty line of the run's log so far ('' when there is none yet)."""
    try:
        proc = subprocess.run([FLWR, "log", str(run_id), connection, "--show"], env=flwr_env(state),
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ""
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[-1][:160] if lines else ""


def wait(state: Path, run_id: int, timeout_s: float, connection: str = DEFAULT_NAME,
         poll_s: float = 1.0, progress_every_s: float = 15.0, out=sys.stdout) -> dict[str, Any]:
    """Poll until the run finishes; a progress line on every status change and every
    `progress_every_s` seconds (0: on status changes only)."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    shown_status, shown_at = None, t0
    while True:
        status = run_status(state, run_id, connection)
        current = str(status.get("status", "")) or "unknown"
        if current.startswith("finished"):
            return status
        now = time.monotonic()
        if current != shown_status or (progress_every_s and now - shown_at >= progress_every_s):
            last = last_log_line(state, run_id, connection) if current.startswith("running") else ""
            print(f"[{now - t0:6.0f} s] run {run_id}: {current}" + (f" | {last}" if last else ""),
                  file=out, flush=True)
            shown_status, shown_at = current, now
        if now > deadline:
            raise TimeoutError(f"run {run_id} not finished after {timeout_s:.0f} s: {status}")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app", type=Path, default=Path("."), help="Flower app directory (default: .)")
    parser.add_argument("--run-config", action="append", default=[], help="as for `flwr run`; repeatable")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="operator state dir (default %(default)s)")
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the run")
    parser.add_argument("--no-wait", action="store_true")
    parser.add_argument("--progress-every", type=float, default=15.0,
                        help="seconds between progress lines while waiting (0: only status changes)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        run_id = submit(args.state, args.app, with_state_dir(args.run_config, args.state, args.app),
                        args.connection)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"run {run_id} submitted", flush=True)
    if args.no_wait:
        return 0
    try:
        status = wait(args.state, run_id, args.timeout, args.connection, progress_every_s=args.progress_every)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"run-id": run_id, "status": status.get("status"), "elapsed": status.get("elapsed"),
                      "running-at": status.get("running-at"), "finished-at": status.get("finished-at"),
                      "wall-s": round(time.monotonic() - t0, 2)}, indent=2))
    if status.get("status") != "finished:completed":
        print(run_logs(args.state, run_id, args.connection), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
