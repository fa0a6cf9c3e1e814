r"""Point the Flower CLI (`flwr run`, `flwr supernode ...`) at a remote SuperLink with TLS.

In flwr 1.41 connections live in the Flower config file `$FLWR_HOME/config.toml`
(default `~/.flwr`), not in pyproject.toml. We keep a deployment-local FLWR_HOME
(`<state>/flwr-home`) so the operator's own `~/.flwr` is never touched:

    python -m deploy.connection --address superlink.example.org:9093 \
        --root-certificates deploy/state/certs/ca.crt
    export FLWR_HOME=$PWD/deploy/state/flwr-home
    flwr supernode list taft      # or: flwr run . taft

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


def write_connection(state: Path, address: str, root_certificates: Path | None,
                     name: str = DEFAULT_NAME, insecure: bool = False) -> Path:
    """Write/update `[superlink.<name>]` in `<state>/flwr-home/config.toml`; make it the default."""
    home = flwr_home(state)
    home.mkdir(parents=True, exist_ok=True)
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
