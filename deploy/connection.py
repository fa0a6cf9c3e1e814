r"""Point the Flower CLI (`flwr run`, `flwr supernode ...`) at the SuperLink, with TLS.

In flwr 1.41 connections live in the Flower config file `$FLWR_HOME/config.toml`
(default `~/.flwr`), not in pyproject.toml. We keep a deployment-local FLWR_HOME
(`<state>/flwr-home`) so the operator's own `~/.flwr` is never touched. deploy/superlink.sh
writes the connection `taft` to the SuperLink's loopback port itself; by hand:

    python -m deploy.connection --address 127.0.0.1:9092
    export FLWR_HOME=~/.local/state/taft-fl/server/flwr-home
    flwr supernode list taft      # or: flwr run . taft

Only the operator's host can use it: the Control API is not reachable through the proxy.
The state directory (`<state>`, default `$TAFT_STATE_DIR/server`, i.e.
~/.local/state/taft-fl/server) is also where every other deploy tool keeps the operator's files.

Idempotent: rewrites only the `[superlink.<name>]` table and the default.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import tomllib
import tomli_w

DEFAULT_NAME = "taft"


def state_root() -> Path:
    """Where taft-fl keeps durable state on this host: `$TAFT_STATE_DIR`, else
    ~/.local/state/taft-fl. Never inside the repository: `flwr run` ships the app directory to
    every SuperNode, so registry, requests, keys and ledger must not live there."""
    return Path(os.environ.get("TAFT_STATE_DIR") or "~/.local/state/taft-fl").expanduser()


def make_private_dir(path: Path) -> Path:
    """Create `path` and every missing parent 0700 (mkdir(parents=True) would give the parents
    the umask's mode: ~/.local/state/taft-fl/server would end up world-listable)."""
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)  # whatever the umask
    return path


def site_state_dir(site_id: str) -> Path:
    """A site's state (its privacy-budget record) on this host: `<state root>/site-<id>`."""
    return state_root() / f"site-{site_id}"


# The operator's state = the ServerApp's `state-dir`: certs, keys, registry.json, requests/,
# the ledger, flwr-home (connection + installed app bundles), the SuperLink database, logs.
DEFAULT_STATE = state_root() / "server"


def flwr_home(state: Path) -> Path:
    return (Path(state) / "flwr-home").resolve()


def flwr_env(state: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a `flwr` CLI call against this deployment."""
    env = dict(os.environ if base is None else base)
    env["FLWR_HOME"] = str(flwr_home(state))
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    bindir = str(Path(sys.executable).parent)  # flwr, flower-superexec live next to python
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def connection_address(state: Path, name: str = DEFAULT_NAME) -> tuple[str, Path | None] | None:
    """(address, CA file) of `[superlink.<name>]` in `<state>/flwr-home/config.toml`, or None."""
    path = flwr_home(state) / "config.toml"
    try:
        entry = tomllib.loads(path.read_text())["superlink"][name]
    except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
        return None
    ca = entry.get("root-certificates")
    return str(entry["address"]), Path(ca) if ca else None


def wait_for_superlink(state: Path, timeout_s: float = 60.0, name: str = DEFAULT_NAME) -> None:
    """Block until the SuperLink named by the connection accepts TLS (verified against its CA):
    `deploy/superlink.sh &` returns at once, the SuperLink needs a few seconds. TimeoutError
    saying what is missing otherwise."""
    import socket
    import ssl
    import time

    deadline = time.monotonic() + timeout_s
    problem = "no connection written yet (start deploy/superlink.sh)"
    while True:
        found = connection_address(state, name)
        if found is not None:
            address, ca = found
            host, _, port = address.rpartition(":")
            try:
                context = ssl.create_default_context(cafile=str(ca)) if ca else None
                with socket.create_connection((host.strip("[]"), int(port)), timeout=3) as sock:
                    if context is None:
                        return
                    with context.wrap_socket(sock, server_hostname=host.strip("[]")):
                        return
            except (OSError, ValueError) as err:
                problem = f"{address}: {err}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"the SuperLink of connection {name!r} is not reachable after {timeout_s:.0f} s: {problem}")
        time.sleep(0.5)


def write_connection(state: Path, address: str, root_certificates: Path | None,
                     name: str = DEFAULT_NAME, insecure: bool = False) -> Path:
    """Write/update `[superlink.<name>]` in `<state>/flwr-home/config.toml`; make it the default."""
    home = flwr_home(state)
    make_private_dir(home)
    path = home / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())  # must be absolute
    superlink[name] = entry
    superlink["default"] = name
    path.write_text(tomli_w.dumps(config))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.connection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", required=True, help="SuperLink HOST:PORT (its --port)")
    parser.add_argument("--root-certificates", type=Path, help="CA certificate (default <state>/certs/ca.crt)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="connection name (default %(default)s)")
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)
    ca = args.root_certificates or args.state / "certs" / "ca.crt"
    if not ca.exists():
        parser.error(f"{ca} does not exist: run `python -m deploy.pki superlink` first")
    path = write_connection(args.state, args.address, ca, args.name)
    print(f"{path}: [superlink.{args.name}] address={args.address} root-certificates={ca.resolve()}")
    print(f"export FLWR_HOME={path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
