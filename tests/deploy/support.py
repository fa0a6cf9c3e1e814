"""Helpers for the loopback deployment tests: real processes stopped by PID, free ports, a tiny
probe Flower app (one round trip, no ML), and the operator/site steps through the deploy/ scripts."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable


def _children(pid: int) -> list[int]:
    """Descendants of `pid`, including the SuperExec processes Flower starts detached
    (they are re-parented but carry `--parent-pid <pid>`)."""
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            child = int(entry.name)
            detached = b"--parent-pid" in cmd and cmd[cmd.index(b"--parent-pid") + 1:][:1] == [str(parent).encode()]
            if (ppid == parent or detached) and child not in found:
                found.append(child)
                frontier.append(child)
    return found


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Processes:
    """Started processes, stopped by PID (tree included) in `stop_all`."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        tree = [proc.pid, *_children(proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pid in tree:
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and not _zombie(pid):
                time.sleep(0.1)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):  # SuperNodes before the proxy and the SuperLink
            self.stop(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def tls_ready(port: int, ca: Path) -> bool:
    try:
        ctx = ssl.create_default_context(cafile=str(ca))  # the CA appears once the script made it
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                return True
    except OSError:
        return False


def run(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


def start_superlink_and_proxy(procs: Processes, state: Path, env: dict[str, str]) -> dict[str, int]:
    """deploy/superlink.sh on 127.0.0.1 + deploy.proxy in front of it; both accepting TLS."""
    superlink_port, proxy_port = free_port(), free_port()
    env = {**env, "PYTHON": PY}  # superlink.sh: this interpreter, not a guess
    procs.start("superlink", ["bash", "deploy/superlink.sh", "--state", str(state), "--port", str(superlink_port)], env)
    ca = state / "certs" / "ca.crt"
    wait_for(lambda: tls_ready(superlink_port, ca) or procs.procs["superlink"].poll() is not None, 90, "SuperLink")
    assert procs.procs["superlink"].poll() is None, procs.log("superlink")
    procs.start("proxy", [PY, "-m", "deploy.proxy", "--state", str(state), "--listen", f"127.0.0.1:{proxy_port}",
                          "--upstream", f"127.0.0.1:{superlink_port}", "--hostname", "fl.test"], env)
    wait_for(lambda: tls_ready(proxy_port, ca) or procs.procs["proxy"].poll() is not None, 30, "proxy")
    assert procs.procs["proxy"].poll() is None, procs.log("proxy")
    return {"superlink": superlink_port, "proxy": proxy_port}


def start_supernode(procs: Processes, root: Path, state: Path, site: str, address: str, data: Path,
                    env: dict[str, str], key: str | None = None, extra: list[str] = (),
                    name: str | None = None) -> None:
    """A SuperNode through deploy.supernode declaring `site`, signing with `key` (default: the
    site's own), with its own state, cache and FLWR_HOME (named `name`, default the site)."""
    name = name or site
    procs.start(f"supernode-{name}", [
        PY, "-m", "deploy.supernode", "--site-id", site, "--superlink", address,
        "--root-certificates", str(state / "certs" / "ca.crt"),
        "--key", str(state / "keys" / f"site-{key or site}.key"), "--data-path", str(data),
        "--cache-dir", str(root / f"cache-{name}"), "--state-dir", str(root / f"site-state-{name}"),
        "--runtime-port", str(free_port()), "--flwr-home", str(root / f"flwr-home-{name}"), *extra], env)


def online_node_ids(state: Path) -> set[str]:
    from deploy.health import list_supernodes

    nodes, _ = list_supernodes(state)
    return {str(n["node-id"]) for n in nodes or [] if n["status"] == "online"}


# ----------------------------------------------------------------------------- probe app

PROBE_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "deployprobe"
version = "0.1.0"
dependencies = []

[tool.setuptools.packages.find]
include = ["deployprobe*"]

[tool.flwr.app]
publisher = "taft-fl"

[tool.flwr.app.components]
serverapp = "deployprobe.server:app"
clientapp = "deployprobe.client:app"

[tool.flwr.app.config]
out = ""
num-sites = 3
"""

PROBE_SERVER = '''
import json
import time

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
import numpy as np
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    want = int(context.run_config["num-sites"])
    while len(list(grid.get_node_ids())) < want:
        time.sleep(0.5)
    t0 = time.monotonic()
    # ~1 MB each way, so the object push/pull routes carry real payloads (as a Δw would)
    payload = ArrayRecord([np.arange(250_000, dtype=np.float32)])
    msgs = [Message(RecordDict({"config": ConfigRecord({"round": 1}), "payload": payload}),
                    dst_node_id=n, message_type="train") for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=300))
    rtt = time.monotonic() - t0
    sites = sorted(str(r.content["meta"]["site-id"]) for r in replies if r.has_content())
    echoed = [float(r.content["payload"].to_numpy_ndarrays()[0].astype("float64").sum())
              for r in replies if r.has_content()]
    with open(context.run_config["out"], "w") as f:
        json.dump({"sites": sites, "round_trip_s": rtt, "echoed": echoed}, f)
'''

PROBE_CLIENT = '''
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    meta = ConfigRecord({"site-id": str(context.node_config["site-id"])})
    return Message(RecordDict({"meta": meta, "payload": msg.content["payload"]}), reply_to=msg)
'''


def write_probe_app(app: Path) -> Path:
    (app / "deployprobe").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "deployprobe" / "__init__.py").write_text("")
    (app / "deployprobe" / "server.py").write_text(textwrap.dedent(PROBE_SERVER))
    (app / "deployprobe" / "client.py").write_text(textwrap.dedent(PROBE_CLIENT))
    return app


def run_probe(app: Path, state: Path, out_file: Path, env: dict[str, str], num_sites: int) -> dict:
    env = {**env, "PYTHONPATH": str(app) + os.pathsep + env.get("PYTHONPATH", "")}
    out = run(["-m", "deploy.submit", "--app", str(app), "--state", str(state), "--timeout", "240",
               "--run-config", f"out='{out_file}' num-sites={num_sites}"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return {"result": json.loads(out_file.read_text()), "stdout": out.stdout, "stderr": out.stderr}
