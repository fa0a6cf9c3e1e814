"""The Flower app bundle (FAB) that `flwr run .` builds from the repository root holds code and
config only, and bundles never nest.

Flower 1.41 (flwr/cli/build.py) packs every *.py, *.toml, *.md, *.json, *.yaml file under the app
directory, minus the ROOT .gitignore and a few built-in excludes. The SuperLink's and SuperNode's
SuperExec install each bundle under `$FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>/`
(flwr/cli/install.py). With deploy state (and so FLWR_HOME) inside the repository, every run
shipped the site registry and withdrawal requests, each bundle contained the previously
installed ones, and the third run failed ("exceeds the maximum directory depth of 10").
pyproject's `[tool.flwr.app] fab-include` allow-list fixes both, wherever the state lives.

The fast tests use Flower's own build (`build_fab_from_disk`, what `flwr run` calls) and install
(`install_from_fab`, what the SuperExec calls); the slow one runs ten `flwr run`s on one local
SuperLink with its FLWR_HOME inside the app directory.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.cli.install import install_from_fab

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CODE_PACKAGES = ("tangent", "client", "server")
# Flower's bookkeeping inside every bundle, and the files the allow-list admits besides code.
FAB_MANIFEST = ".info/CONTENT"
CONFIG_FILES = {"pyproject.toml", "README.md"}
# What must never be in a bundle: secrets, registries, requests, ledgers, data, other bundles.
FORBIDDEN_SUFFIXES = (".key", ".pem", ".pub", ".crt", ".sqlite", ".sqlite-wal", ".db", ".npz",
                      ".fab", ".safetensors")
# ("data" is not among them: tangent/data/ is a code package, and a site's data files are caught by
# the suffix rule and by "only .py under a code package")
FORBIDDEN_PARTS = ("state", "runs", "keys", "certs", "requests", "flwr-home", "apps", ".venv",
                   ".cache", "tests")

# Bait planted into a copy of the app: what an operator's or a site's machine may hold under the
# repository (the old default deploy/state, a run directory, a venv, a state dir, a cache).
BAIT = {
    "deploy/state/certs/ca.key": "-----BEGIN PRIVATE KEY-----\nCA\n",
    "deploy/state/certs/superlink.key": "-----BEGIN PRIVATE KEY-----\nSL\n",
    "deploy/state/certs/server.pem": "-----BEGIN PRIVATE KEY-----\nPEM\n",
    "deploy/state/keys/site-1.key": "-----BEGIN OPENSSH PRIVATE KEY-----\n",
    "deploy/state/keys/site-1.key.pub": "ecdsa-sha2-nistp384 AAAA taft-site-1\n",
    "deploy/state/registry.json": json.dumps({"version": 2, "sites": {}}),
    "deploy/state/requests/withdraw-3.json": json.dumps({"payload": {}, "signature": "x"}),
    "deploy/state/flwr-home/config.toml": "[superlink.taft]\naddress = '127.0.0.1:9092'\n",
    "deploy/state/ledger.sqlite": "SQLite format 3\0",
    "deploy/state/ledger.sqlite-wal": "wal",
    "deploy/state/ledger.sqlite.signing-key.pem": "-----BEGIN PRIVATE KEY-----\n",
    "deploy/state/ledger.sqlite.head.json": json.dumps({"head": "00"}),
    "deploy/state/data/site-1/site.npz": "npz",
    "deploy/state/sites/1/privacy-budget.json": json.dumps({"epsilon": 1.0}),
    "runs/20261130/summary.json": json.dumps({"accuracy": 0.8}),
    "runs/20261130/flwr-home/config.toml": "[superlink]\n",
    "state/server/reports/train-1.json": json.dumps({"rounds": []}),
    ".venv/lib/python3.11/site-packages/evil.py": "import os\n",
    ".cache/taft/features/index.json": "{}",
    "tests/deploy/conftest.py": "SECRET = 1\n",
}


def _names(fab: bytes) -> list[str]:
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


def _copy_app(dest: Path) -> Path:
    """The app as a fresh clone has it: pyproject, README and the code packages."""
    dest.mkdir(parents=True)
    for name in CONFIG_FILES:
        shutil.copy2(REPO / name, dest / name)
    for package in CODE_PACKAGES:
        shutil.copytree(REPO / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _plant_bait(app: Path) -> None:
    for rel, text in BAIT.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)


def _assert_code_and_config_only(names: list[str]) -> None:
    assert FAB_MANIFEST in names
    for name in names:
        if name == FAB_MANIFEST or name in CONFIG_FILES:
            continue
        top, *_ = name.split("/")
        assert top in CODE_PACKAGES and name.endswith(".py"), f"not code or config: {name}"
        assert not name.endswith(FORBIDDEN_SUFFIXES), name
        assert not set(name.split("/")[1:-1]) & set(FORBIDDEN_PARTS), name


def test_repository_bundle_holds_code_and_config_only():
    names = _names(build_fab_from_disk(REPO))
    _assert_code_and_config_only(names)
    # what the apps need is there: the components' modules and every code package
    components = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    for ref in components.values():
        module = ref.split(":")[0]
        assert module.replace(".", "/") + ".py" in names, ref
    for package in CODE_PACKAGES:
        assert f"{package}/__init__.py" in names


def test_bundled_code_imports_only_bundled_project_modules():
    """The allow-list must not cut off a module the apps import (e.g. a new package the server
    starts using): every project import inside the bundle resolves inside the bundle."""
    fab = build_fab_from_disk(REPO)
    archive = zipfile.ZipFile(io.BytesIO(fab))
    names = set(archive.namelist())
    project = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    missing = []
    for name in sorted(n for n in names if n.endswith(".py")):
        tree = ast.parse(archive.read(name), filename=name)
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                       else [])
            for module in modules:
                if module.split(".")[0] not in project:
                    continue
                parts = module.split("/")[0].split(".")
                candidates = {"/".join(parts) + ".py", "/".join(parts) + "/__init__.py"}
                if not candidates & names:
                    missing.append(f"{name}: {module}")
    assert not missing, missing


def test_bundle_leaves_out_state_secrets_and_caches(tmp_path):
    app = _copy_app(tmp_path / "taft-fl")
    clean = _names(build_fab_from_disk(app))
    _plant_bait(app)
    baited = _names(build_fab_from_disk(app))
    assert baited == clean, sorted(set(baited) - set(clean))
    _assert_code_and_config_only(baited)


def test_installed_bundles_inside_the_app_never_nest(tmp_path, monkeypatch):
    """FLWR_HOME inside the app directory (the old deploy/state layout): build, install as the
    SuperExec does, build again. Before the allow-list the second bundle held the first and the
    third build failed on Flower's depth limit."""
    app = _copy_app(tmp_path / "taft-fl")
    monkeypatch.setenv("FLWR_HOME", str(app / "deploy" / "state" / "flwr-home"))
    bundles = []
    for _ in range(4):
        bundles.append(build_fab_from_disk(app))  # the old config raised here the third time
        installed = install_from_fab(bundles[-1], skip_prompt=True)
        assert installed.is_relative_to(app)  # really inside the app directory
    assert all(fab == bundles[0] for fab in bundles)  # nothing installed ever got into a bundle
    _assert_code_and_config_only(_names(bundles[0]))


# --------------------------------------------------------------------- ten runs, one SuperLink

PROBE_SERVER = '''
"""Probe ServerApp for tests/deploy/test_bundle.py: one message to every SuperNode."""
import time

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    deadline = time.monotonic() + 60
    while not list(grid.get_node_ids()):
        if time.monotonic() > deadline:
            raise RuntimeError("no SuperNode connected")
        time.sleep(0.2)
    msgs = [Message(RecordDict({"config": ConfigRecord({"probe": 1})}), dst_node_id=n, message_type="train")
            for n in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    if not replies or not all(r.has_content() for r in replies):
        raise RuntimeError(f"probe round trip failed: {[r.error for r in replies if r.has_error()]}")
'''

PROBE_CLIENT = '''
"""Probe ClientApp for tests/deploy/test_bundle.py."""
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    return Message(RecordDict({"meta": ConfigRecord({"ok": True})}), reply_to=msg)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process and the SuperExec helpers it detached (they carry --parent-pid)."""
    pids = [proc.pid]
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in cmd and cmd[cmd.index(b"--parent-pid") + 1:][:1] == [str(proc.pid).encode()]:
            pids.append(int(entry.name))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _flwr_json(args: list[str], env: dict[str, str], timeout: float = 180) -> dict:
    """The first JSON object `flwr <args> --format json` prints (logs may follow with --stream)."""
    out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], env=env, capture_output=True,
                         text=True, timeout=timeout)
    try:
        return json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{"):])[0]
    except ValueError:
        raise AssertionError(f"flwr {' '.join(args)}: {out.stdout}{out.stderr}") from None


@pytest.mark.slow
def test_ten_consecutive_runs_on_one_superlink(tmp_path):
    """The real app's bundle rules with a probe ServerApp/ClientApp; the SuperLink's and the
    SuperNode's FLWR_HOME (where they install every bundle) inside the app directory."""
    app = _copy_app(tmp_path / "taft-fl")
    (app / "server" / "bundle_probe.py").write_text(textwrap.dedent(PROBE_SERVER))
    (app / "client" / "bundle_probe.py").write_text(textwrap.dedent(PROBE_CLIENT))
    pyproject = (app / "pyproject.toml").read_text()
    for component, module in (("serverapp", "server"), ("clientapp", "client")):
        pyproject = pyproject.replace(
            f'{component} = "{module}.{module}_app:app"', f'{component} = "{module}.bundle_probe:app"')
    assert "bundle_probe" in pyproject
    (app / "pyproject.toml").write_text(pyproject)

    port, node_port = _free_port(), _free_port()
    base = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            # the probe modules must come from the installed bundle, not from the repository
            "PYTHONPATH": ""}
    cli_home = tmp_path / "cli-home"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "probe"\n\n[superlink.probe]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], flwr_home: Path) -> None:
        with open(logs / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                          env={**base, "FLWR_HOME": str(flwr_home)}))

    try:
        start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                            str(port), "--database", str(tmp_path / "superlink.db"),
                            "--disable-runtime-dependency-installation"],
              app / "deploy" / "state" / "flwr-home")
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert procs[0].poll() is None and time.monotonic() < deadline, (logs / "superlink.log").read_text()
            time.sleep(0.3)
        start("supernode", [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                            "--port", str(node_port), "--node-config", "site-id='1'"],
              app / "deploy" / "state" / "site-flwr-home")

        cli_env = {**base, "FLWR_HOME": str(cli_home)}
        timings, run_ids = [], []
        for i in range(10):
            t0 = time.monotonic()
            # --stream returns when the run has ended (one CLI process instead of polling `flwr ls`)
            submitted = _flwr_json(["run", str(app), "probe", "--stream"], cli_env)
            assert submitted.get("success"), f"run {i + 1} refused: {submitted}"
            run_ids.append(str(submitted["run-id"]))
            timings.append(time.monotonic() - t0)
        runs = {str(r["run-id"]): r["status"] for r in _flwr_json(["ls", "probe"], cli_env)["runs"]}
        assert [runs.get(r) for r in run_ids] == ["finished:completed"] * 10, runs

        installed = sorted((app / "deploy" / "state" / "flwr-home" / "apps").iterdir())
        assert len(installed) == 1  # ten runs, one identical bundle
        assert not list(installed[0].rglob("apps"))  # no bundle inside a bundle
        print(f"\n10 runs on one SuperLink: {sum(timings):.1f} s, "
              f"median {sorted(timings)[5]:.1f} s submit-to-finished")
    finally:
        for proc in reversed(procs):
            _stop(proc)
