"""Fast lint of the deployment files (Docker is not runnable in CI): compose structure, scripts."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_compose_has_superlink_and_three_isolated_sites():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"superlink", "site-1", "site-2", "site-3"} <= set(services)  # + proxy, operator (test_containers)
    assert "--enable-supernode-auth" in services["superlink"]["command"]
    assert "--ssl-certfile" in services["superlink"]["command"]
    for n in "123":
        site = services[f"site-{n}"]
        mounts = " ".join(site["volumes"])
        assert f"site-{n}.key" in mounts and "ca.crt" in mounts
        assert all(f"site-{m}" not in mounts for m in "123" if m != n)  # own key, own data
        assert "--root-certificates" in site["command"] and "--insecure" not in site["command"]


@pytest.mark.parametrize("script", ["superlink.sh", "compose-up.sh"])
def test_bash_scripts_parse_and_have_help(script):
    subprocess.run(["bash", "-n", str(DEPLOY / script)], check=True)
    out = subprocess.run(["bash", str(DEPLOY / script), "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout


@pytest.mark.parametrize("module", ["pki", "connection", "register", "supernode", "submit", "health", "proxy",
                                    "withdraw", "make_site_data"])
def test_python_tools_have_help(module):
    out = subprocess.run([sys.executable, "-m", f"deploy.{module}", "--help"], capture_output=True,
                         text=True, cwd=DEPLOY.parent)
    assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_superlink_refuses_to_listen_beyond_loopback(host, tmp_path):
    """Its one port serves the unauthenticated Control API: sites get the proxy instead."""
    out = subprocess.run(["bash", str(DEPLOY / "superlink.sh"), "--state", str(tmp_path / "s"), "--host", host],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "deploy.proxy" in out.stderr
    assert not (tmp_path / "s").exists()
