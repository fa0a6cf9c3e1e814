"""End to end on 127.0.0.1: a SuperLink with TLS + SuperNode auth and three SuperNodes as real
processes, driven only through the deploy/ scripts an operator and the sites would use.

- refusals: an unregistered key, a plain-text (--insecure) SuperNode, a wrong CA;
- a Flower run with a tiny probe app (one round trip to the 3 sites; no ML) — checks the
  deployment path itself and measures its round-trip time;
- the real app: one training run (small img-size/epochs) -> 3 ledger contributions, then an
  unlearning run carrying a signed withdrawal of one site (and a forged one, refused)
  -> 2 contributions whose composed bytes equal those of a fresh
  ledger holding the remaining 2; a badly signed withdrawal leaves the ledger unchanged.
  Skipped until server/server_app.py and client/client_app.py exist.

Every process started here is stopped by PID (with the SuperExec helpers Flower detaches).
"""

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

import numpy as np
import pytest

from deploy.pki import create_ca, create_site_key, create_superlink_cert

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
SITES = ("1", "2", "3")
IMAGES_PER_SITE = 200


# ----------------------------------------------------------------------------- processes

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
        for name in reversed(list(self.procs)):  # SuperNodes before the SuperLink
            self.stop(name)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _tls_ready(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            with ctx.wrap_socket(sock, server_hostname="127.0.0.1"):
                return True
    except OSError:
        return False


def _run(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)


# ----------------------------------------------------------------------------- federation

@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    state, logs = root / "state", root / "logs"
    logs.mkdir()
    procs = Processes(logs)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        # operator: CA + SuperLink certificate; sites: keys (one extra key is never registered)
        create_ca(state / "certs")
        create_superlink_cert(state / "certs", ["superlink.test"])
        for site in (*SITES, "rogue", "admin"):
            create_site_key(state / "keys", site)
        ca = state / "certs" / "ca.crt"

        # The one-time ONNX -> timm conversion (tens of seconds, shared through the TAFT cache dir)
        # is done here, not by four processes at once inside the timed training run.
        from tangent.pretrained import load_pretrained
        load_pretrained(img_size=28)

        # sites: a few hundred real Fashion-MNIST images each
        from tangent.data import load_fashion_mnist

        images, labels = load_fashion_mnist("train")
        for i, site in enumerate(SITES):
            part = slice(i * IMAGES_PER_SITE, (i + 1) * IMAGES_PER_SITE)
            np.savez(root / f"site-{site}.npz", images=images[part], labels=labels[part])

        port = _free_port()
        t0 = time.monotonic()
        procs.start("superlink", ["bash", "deploy/superlink.sh", "--state", str(state), "--port", str(port)], env)
        _wait_for(lambda: _tls_ready(port, ca) or procs.procs["superlink"].poll() is not None, 60, "SuperLink")
        assert procs.procs["superlink"].poll() is None, procs.log("superlink")
        superlink_start_s = time.monotonic() - t0

        for site in SITES:
            out = _run(["-m", "deploy.register", "--site-id", site, "--state", str(state)], env=env)
            assert out.returncode == 0, out.stdout + out.stderr
        assert _run(["-m", "deploy.register", "--admin", "--public-key", str(state / "keys/site-admin.key.pub"),
                     "--state", str(state)], env=env).returncode == 0
        registry = json.loads((state / "registry.json").read_text())
        node_ids = {str(registry["sites"][s]["node_id"]) for s in SITES}

        for i, site in enumerate(SITES):
            procs.start(f"supernode-{site}", [
                PY, "-m", "deploy.supernode", "--site-id", site, "--superlink", f"127.0.0.1:{port}",
                "--root-certificates", str(ca), "--key", str(state / f"keys/site-{site}.key"),
                "--data-path", str(root / f"site-{site}.npz"), "--epsilon-budget", "8",
                "--cache-dir", str(root / f"cache-{site}"), "--runtime-port", str(_free_port()),
                "--flwr-home", str(root / f"flwr-home-{site}")], env)

        from deploy.health import list_supernodes

        def all_online():
            nodes, _ = list_supernodes(state)
            online = {str(n["node-id"]) for n in nodes or [] if n["status"] == "online"}
            return node_ids <= online

        _wait_for(all_online, 120, "3 SuperNodes online", poll=1.0)
        yield {"root": root, "state": state, "port": port, "ca": ca, "procs": procs, "env": env,
               "superlink_start_s": superlink_start_s}
    finally:
        procs.stop_all()


def test_health_reports_three_online_sites(federation):
    out = _run(["-m", "deploy.health", "--state", str(federation["state"]), "--json",
                "--ledger", str(federation["root"] / "no-ledger.sqlite")], env=federation["env"])
    report = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [s["status"] for s in report["sites"]] == ["online"] * 3


def _supernode(federation, name: str, extra: list[str], key: str = "rogue") -> subprocess.CompletedProcess:
    f = federation
    return _run(["-m", "deploy.supernode", "--site-id", name, "--superlink", f"127.0.0.1:{f['port']}",
                 "--root-certificates", str(f["ca"]), "--key", str(f["state"] / f"keys/site-{key}.key"),
                 "--data-path", str(f["root"] / "site-1.npz"), "--runtime-port", str(_free_port()),
                 "--max-wait-time", "10", "--flwr-home", str(f["root"] / f"flwr-home-{name}"), *extra],
                env=f["env"], )


def test_unregistered_key_is_refused(federation):
    out = _supernode(federation, "rogue", [])
    assert out.returncode != 0
    assert "not registered" in out.stderr, out.stdout + out.stderr
    assert "code: 2004" in out.stdout  # Flower's own refusal: activation failed


def test_plaintext_supernode_is_refused(federation):
    out = _supernode(federation, "plain", ["--insecure"], key="1")
    assert out.returncode != 0
    assert "plain-text" in out.stderr, out.stdout + out.stderr


def test_wrong_ca_is_refused_before_starting(federation, tmp_path):
    create_ca(tmp_path / "other")
    f = dict(federation, ca=tmp_path / "other" / "ca.crt")
    out = _supernode(f, "wrongca", [], key="1")
    assert out.returncode == 2
    assert "not signed by the CA" in out.stderr


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

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    want = int(context.run_config["num-sites"])
    while len(list(grid.get_node_ids())) < want:
        time.sleep(0.5)
    t0 = time.monotonic()
    msgs = [Message(RecordDict({"config": ConfigRecord({"round": 1})}), dst_node_id=n, message_type="train")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=300))
    rtt = time.monotonic() - t0
    sites = sorted(str(r.content["meta"]["site-id"]) for r in replies if r.has_content())
    with open(context.run_config["out"], "w") as f:
        json.dump({"sites": sites, "round_trip_s": rtt}, f)
'''

PROBE_CLIENT = '''
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    meta = ConfigRecord({"site-id": str(context.node_config["site-id"]),
                         "data-path": str(context.node_config["data-path"])})
    return Message(RecordDict({"meta": meta}), reply_to=msg)
'''


def test_probe_run_reaches_all_three_sites(federation):
    f = federation
    app = f["root"] / "probe"
    (app / "deployprobe").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "deployprobe" / "__init__.py").write_text("")
    (app / "deployprobe" / "server.py").write_text(textwrap.dedent(PROBE_SERVER))
    (app / "deployprobe" / "client.py").write_text(textwrap.dedent(PROBE_CLIENT))
    out_file = f["root"] / "probe.json"
    env = {**f["env"], "PYTHONPATH": str(app) + os.pathsep + f["env"].get("PYTHONPATH", "")}
    t0 = time.monotonic()
    out = _run(["-m", "deploy.submit", "--app", str(app), "--state", str(f["state"]), "--timeout", "240",
                "--run-config", f"out='{out_file}'"], env=env)
    wall = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out_file.read_text())
    assert result["sites"] == list(SITES)
    print(f"\nprobe: SuperLink up in {f['superlink_start_s']:.1f} s; one round trip to 3 sites "
          f"{result['round_trip_s']:.2f} s inside the ServerApp; submit-to-finished {wall:.1f} s")


# ----------------------------------------------------------------------------- the real app

def _apps_present() -> bool:
    return (REPO / "server" / "server_app.py").exists() and (REPO / "client" / "client_app.py").exists()


@pytest.mark.skipif(not _apps_present(), reason="server/server_app.py and client/client_app.py not there yet")
def test_train_then_signed_withdrawal(federation):

    from server.ledger import Ledger
    from server.withdrawal import create_request, load_private_key

    f = federation
    ledger_path = f["root"] / "ledger.sqlite"
    t0 = time.monotonic()
    out = _run(["-m", "deploy.submit", "--app", str(REPO), "--state", str(f["state"]), "--timeout", "600",
                "--run-config", f"mode='train' ledger-path='{ledger_path}' img-size=28 epochs=1 "
                                f"batch-size=32 eval-subset=500 report-path='{f['root'] / 'train-report.json'}'"],
               env=f["env"], timeout=900)
    train_s = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((f["root"] / "train-report.json").read_text())
    (round_1,) = report["rounds"]
    assert round_1["recorded"] and round_1["train_round_trip_s"] > 0
    print(f"\ntraining round with 3 sites ({IMAGES_PER_SITE} images each, img-size 28, 1 epoch): "
          f"round trip {round_1['train_round_trip_s']:.1f} s (train messages out -> 3 Δw in the ledger); "
          f"{train_s:.1f} s submit-to-finished")

    with Ledger.open(ledger_path, create=False) as ledger:
        active = ledger.contributions(status="active")
        assert sorted(c.site_id for c in active) == list(SITES)
        version_before = ledger.current_version().version

    state = f["state"]
    bad = create_request("2", load_private_key(state / "keys/site-rogue.key"), "forged")
    (f["root"] / "bad.json").write_text(json.dumps(bad))
    out = _run(["-m", "deploy.withdraw", "apply", str(f["root"] / "bad.json"), "--ledger", str(ledger_path),
                "--registry", str(state / "registry.json")], env=f["env"])
    assert out.returncode == 1 and "bad signature" in out.stderr
    with Ledger.open(ledger_path, create=False) as ledger:
        assert ledger.current_version().version == version_before
        assert len(ledger.contributions(status="active")) == 3

    # The unlearning run goes through Flower: the ServerApp verifies both requests, refuses the
    # forged one and subtracts site 2; no site trains.
    good = f["root"] / "withdraw-2.json"
    out = _run(["-m", "deploy.withdraw", "create", "--site-id", "2", "--key", str(state / "keys/site-2.key"),
                "--reason", "e2e withdrawal", "--out", str(good)], env=f["env"])
    assert out.returncode == 0, out.stderr
    report_path = f["root"] / "unlearn-report.json"
    t0 = time.monotonic()
    out = _run(["-m", "deploy.submit", "--app", str(REPO), "--state", str(f["state"]), "--timeout", "600",
                "--run-config", f"mode='unlearn' ledger-path='{ledger_path}' img-size=28 eval-subset=500 "
                                f"withdrawal-requests='{f['root'] / 'bad.json'},{good}' "
                                f"site-registry='{state / 'registry.json'}' report-path='{report_path}'"],
               env=f["env"], timeout=900)
    print(f"unlearning run (2 signed requests, 1 forged): {time.monotonic() - t0:.1f} s submit-to-finished")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(report_path.read_text())
    decisions = {Path(w["request"]).name: w for w in report["withdrawals"]}
    assert not decisions["bad.json"]["accepted"] and "bad signature" in decisions["bad.json"]["detail"]
    assert decisions["withdraw-2.json"]["accepted"]
    assert report["removed_sites"] == ["2"] and report["withdrawals_refused"] == 1
    out = _run(["-m", "deploy.withdraw", "apply", str(good), "--ledger", str(ledger_path),
                "--registry", str(state / "registry.json")], env=f["env"])
    assert out.returncode == 1 and "replayed" in out.stderr

    with Ledger.open(ledger_path, create=False) as ledger:
        ledger.verify()
        remaining = ledger.contributions(status="active")
        assert sorted(c.site_id for c in remaining) == ["1", "3"]
        composed = ledger.composed_arrays()
        # the remaining Δ bytes, exactly as stored
        stored = {c.site_id: ledger.contribution_delta(c.id) for c in remaining}
        examples = {c.site_id: c.num_examples for c in remaining}
        settings = ledger.settings()
    with Ledger.open(f["root"] / "fresh.sqlite", weighting=settings.get("weighting")) as fresh:
        for site in ("1", "3"):
            fresh.add(site, stored[site], examples[site])
        expected = fresh.composed_arrays()
    assert composed.keys() == expected.keys()
    assert all(composed[k].tobytes() == expected[k].tobytes() for k in composed)
