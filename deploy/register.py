"""Register a site's SuperNode key with the SuperLink and record it in the site registry.

    python -m deploy.register --site-id 3                      # key from <state>/keys/site-3.key.pub
    python -m deploy.register --site-id 3 --public-key /path/site-3.key.pub
    python -m deploy.register --site-id 3 --unregister         # revoke the key at the SuperLink
    python -m deploy.register --admin --public-key deploy/state/keys/site-admin.key.pub

Registration goes through the Control API: `flwr supernode register <pub> <connection>` with
`FLWR_HOME=<state>/flwr-home` (write the connection first with `python -m deploy.connection`).
With `--enable-supernode-auth` the SuperLink only lets a SuperNode activate when its public key
was registered this way; the key is the OpenSSH ECDSA (NIST curve) public key.

The site registry (`<state>/registry.json`) maps site-id -> public key file (+ node id); the
server uses it to verify signed withdrawal requests. `--admin` records the operator's
withdrawal key only (it is not a SuperNode key). Idempotent: re-registering a known key is a
no-op.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.connection import DEFAULT_NAME, DEFAULT_STATE, flwr_env
from server.withdrawal import load_public_key


def registry_path(state: Path) -> Path:
    return Path(state) / "registry.json"


def key_fingerprint(pub_path: Path) -> str:
    """SHA-256 of the key's DER SubjectPublicKeyInfo (stable across OpenSSH/PEM encodings)."""
    from cryptography.hazmat.primitives import serialization

    der = load_public_key(pub_path).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def read_registry(state: Path) -> dict[str, Any]:
    path = registry_path(state)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("sites", {})
    return data


def write_registry(state: Path, data: dict[str, Any]) -> Path:
    path = registry_path(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def _rel(path: Path, state: Path) -> str:
    path, state = Path(path).resolve(), Path(state).resolve()
    return str(path.relative_to(state)) if path.is_relative_to(state) else str(path)


def _flwr_json(args: list[str], state: Path) -> dict[str, Any]:
    flwr = Path(sys.executable).with_name("flwr")
    proc = subprocess.run([str(flwr), *args, "--format", "json"], env=flwr_env(state),
                          capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}


def register_site(state: Path, site_id: str, public_key: Path, connection: str = DEFAULT_NAME) -> dict[str, Any]:
    """Register `public_key` at the SuperLink (unless already there) and in the registry."""
    fingerprint = key_fingerprint(public_key)
    registry = read_registry(state)
    entry = registry["sites"].get(site_id)
    result = _flwr_json(["supernode", "register", str(public_key), connection], state)
    if result.get("success"):
        node_id = result["node-id"]
    elif "already in use" in str(result.get("error-message", "")):
        # Registered before (by us, or before the registry file was lost): nothing to do at the
        # SuperLink. `flwr supernode list` does not show keys, so an unknown node id stays None.
        node_id = entry.get("node_id") if entry and entry.get("fingerprint") == fingerprint else None
    else:
        raise RuntimeError(f"registering site {site_id} failed: {result.get('error-message', result)}")
    registry["sites"][site_id] = {
        "public_key": _rel(public_key, state),
        "fingerprint": fingerprint,
        "node_id": node_id,
        "registered_at": (entry or {}).get("registered_at") if entry and entry.get("fingerprint") == fingerprint
        else dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_registry(state, registry)
    return registry["sites"][site_id]


def unregister_site(state: Path, site_id: str, connection: str = DEFAULT_NAME) -> None:
    registry = read_registry(state)
    entry = registry["sites"].get(site_id)
    if entry is None:
        raise RuntimeError(f"site {site_id} is not in {registry_path(state)}")
    result = _flwr_json(["supernode", "unregister", str(entry["node_id"]), connection], state)
    if not result.get("success"):
        raise RuntimeError(f"unregistering site {site_id} failed: {result.get('error-message', result)}")
    # Keep the public key: past withdrawal requests of this site stay verifiable.
    entry["unregistered_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    write_registry(state, registry)


def register_admin(state: Path, public_key: Path) -> dict[str, Any]:
    registry = read_registry(state)
    registry["admin"] = {"public_key": _rel(public_key, state), "fingerprint": key_fingerprint(public_key)}
    write_registry(state, registry)
    return registry["admin"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--site-id")
    who.add_argument("--admin", action="store_true", help="record the operator's withdrawal key")
    parser.add_argument("--public-key", type=Path, help="OpenSSH public key (default <state>/keys/site-<id>.key.pub)")
    parser.add_argument("--unregister", action="store_true", help="revoke the site's key at the SuperLink")
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args(argv)

    try:
        if args.admin:
            if not args.public_key:
                parser.error("--admin needs --public-key")
            print(json.dumps(register_admin(args.state, args.public_key), indent=2))
        elif args.unregister:
            unregister_site(args.state, args.site_id, args.connection)
            print(f"site {args.site_id} unregistered")
        else:
            pub = args.public_key or args.state / "keys" / f"site-{args.site_id}.key.pub"
            if not pub.exists():
                parser.error(f"{pub} does not exist: run `python -m deploy.pki site-key --site-id {args.site_id}`")
            entry = register_site(args.state, args.site_id, pub, args.connection)
            print(f"site {args.site_id} registered: node {entry['node_id']}, key {entry['fingerprint']}")
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
