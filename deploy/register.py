"""Register a site's SuperNode key with the SuperLink and record it in the site registry.

    python -m deploy.register --site-id 3 --max-examples 1200 --public-key /path/site-3.key.pub
    python -m deploy.register --site-id 3 --unregister        # revoke: SuperLink + registry
    python -m deploy.register --admin                         # the operator key (deploy.pki operator-key)

Registration goes through the SuperLink's Control API (`flwr supernode register <pub> taft`
with `FLWR_HOME=<state>/flwr-home`, written by deploy/superlink.sh); with
`--enable-supernode-auth` only a registered key's SuperNode can activate. The node id the
SuperLink assigns is what the ServerApp later sees as `msg.metadata.src_node_id`, so the
registry binds site id <-> key <-> node id, and the ServerApp refuses a reply whose declared
site id is not the one registered for its sending node.

The registry, `<state>/registry.json` (version 2, read by server.trust.registry.SiteRegistry):

    {"version": 2,
     "sites": {"3": {"public_key": "keys/site-3.key.pub", "fingerprint": "SHA256:<hex>",
                     "node_id": 1234567, "max_examples": 1200, "registered_at": "<iso>",
                     "revoked": false}},
     "admin": {"public_key": "keys/operator.key.pub", "fingerprint": "SHA256:<hex>"}}

Rules: `--max-examples` (the most examples a reply of this site may claim) is required for a
site. One key, one site, ever: a key whose fingerprint is recorded for another site (revoked
included) or as the operator key is refused. `--unregister` sets `revoked: true` (entries are
never deleted, so past signatures stay checkable and the key cannot come back under another id);
a revoked site can be registered again only with a new key. The public key is copied into
`<state>/keys/`. Re-registering the same key for the same site is a no-op (it may update
`--max-examples`).

Every write is signed with the operator key (`--operator-key`, default `<state>/keys/operator.key`,
made by `deploy.pki operator-key` and recorded with `--admin`): `registry.json.sig` holds its
signature over the registry's exact bytes, and the ServerApp of a deployment refuses a registry
that is unsigned or differs from what was signed (a swapped node id, a raised cap, a replaced key).
Until the operator key is registered the registry stays unsigned (a note says so); `--sign`
signs the current file (e.g. with a key kept offline). Set `TAFT_OPERATOR_FINGERPRINT` in the
ServerApp's environment to pin the operator key: without the pin, someone who can write the state
directory could replace the admin key in the file and sign with their own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.connection import DEFAULT_NAME, DEFAULT_STATE, flwr_env, make_private_dir, wait_for_superlink
from server.trust.registry import key_fingerprint as server_key_fingerprint, registry_signature_path, sign_registry
from tangent.protocol.signed_requests import load_private_key, load_public_key
from tangent.protocol.limits import check_site_id

REGISTRY_VERSION = 2
MAX_EXAMPLES_LIMIT = 2**24  # the ledger's per-contribution ceiling on num_examples


class RegistryError(Exception):
    """A registration the rules refuse; `str(err)` says why."""


def registry_path(state: Path) -> Path:
    return Path(state) / "registry.json"


def key_fingerprint(pub_path: Path) -> str:
    """The registry's fingerprint of the key in ``pub_path`` (SHA-256 of its DER
    SubjectPublicKeyInfo; the server checks it with the same function)."""
    return server_key_fingerprint(load_public_key(pub_path))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_registry(state: Path) -> dict[str, Any]:
    """The registry (an empty version-2 one when absent). A version-1 file is upgraded in memory:
    its `unregistered_at` entries become `revoked: true`."""
    path = registry_path(state)
    if not path.exists():
        return {"version": REGISTRY_VERSION, "sites": {}}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sites", {}), dict):
        raise RegistryError(f"{path}: expected {{'version': 2, 'sites': {{...}}}}")
    data.setdefault("sites", {})
    if data.get("version", 1) == 1:
        for entry in data["sites"].values():
            entry.setdefault("revoked", "unregistered_at" in entry)
        data["version"] = REGISTRY_VERSION
    if data["version"] != REGISTRY_VERSION:
        raise RegistryError(f"{path}: registry version {data['version']!r}, this tool writes {REGISTRY_VERSION}")
    return data


def operator_key_path(state: Path) -> Path:
    return Path(state) / "keys" / "operator.key"


def write_registry(state: Path, data: dict[str, Any], operator_key: Path | None = None) -> Path:
    """Atomic replace, 0600 (the registry decides who may contribute and withdraw), then signed
    with the operator key (:func:`sign`)."""
    path = registry_path(state)
    make_private_dir(path.parent)
    tmp = path.with_suffix(".json.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    sign(state, operator_key)
    return path


def sign(state: Path, operator_key: Path | None = None) -> Path | None:
    """Sign the registry with the operator key when that key is the registered admin key; else
    drop a stale signature (it would not match anyway) and say why. Returns the signature file."""
    path, key_path = registry_path(state), operator_key or operator_key_path(state)
    data = read_registry(state)
    admin = (data.get("admin") or {}).get("fingerprint")
    signature = registry_signature_path(path)
    if admin is None or not key_path.exists():
        signature.unlink(missing_ok=True)
        print(f"note: {path} is unsigned (no operator key registered, or {key_path} absent); a deployment's "
              f"ServerApp refuses it until `python -m deploy.register --admin` or `--sign`", file=sys.stderr)
        return None
    key = load_private_key(key_path)
    if server_key_fingerprint(key.public_key()) != admin:
        raise RegistryError(f"{key_path} is not the registered operator key {admin}; the registry is left unsigned")
    return sign_registry(path, key)


def _owner_of(registry: dict[str, Any], fingerprint: str) -> str | None:
    """Who a fingerprint belongs to: 'site <id>' (current or a previous key), 'the operator', None."""
    for site_id, entry in registry["sites"].items():
        if entry.get("fingerprint") == fingerprint or fingerprint in entry.get("previous_fingerprints", []):
            return f"site {site_id}" + (" (revoked)" if entry.get("revoked") else "")
    if (registry.get("admin") or {}).get("fingerprint") == fingerprint:
        return "the operator (admin key)"
    return None


def check_max_examples(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EXAMPLES_LIMIT:
        raise RegistryError(f"max examples must be an integer in [1, {MAX_EXAMPLES_LIMIT}], got {value!r}")
    return value


def plan_site(registry: dict[str, Any], site_id: str, fingerprint: str,
              max_examples: int) -> dict[str, Any] | None:
    """Check the rules before anything is registered anywhere. Returns the existing entry when
    this is a re-registration of the same key for the same site, else None (a new binding)."""
    check_site_id(site_id)
    check_max_examples(max_examples)
    entry = registry["sites"].get(site_id)
    if entry and entry.get("fingerprint") == fingerprint:
        if entry.get("revoked"):
            raise RegistryError(f"site {site_id}'s key {fingerprint} was revoked; register a new key")
        return entry
    owner = _owner_of(registry, fingerprint)
    if owner is not None:
        raise RegistryError(f"key {fingerprint} is already registered for {owner}: one key, one site")
    if entry and not entry.get("revoked"):
        raise RegistryError(f"site {site_id} is registered with another key ({entry.get('fingerprint')}); "
                            f"revoke it first: python -m deploy.register --site-id {site_id} --unregister")
    return None


def record_site(registry: dict[str, Any], site_id: str, public_key: str, fingerprint: str,
                node_id: int | None, max_examples: int, existing: dict[str, Any] | None) -> dict[str, Any]:
    """The registry entry after `plan_site` passed and the SuperLink accepted the key."""
    previous = registry["sites"].get(site_id)
    entry = {
        "public_key": public_key,
        "fingerprint": fingerprint,
        "node_id": node_id if node_id is not None else (existing or {}).get("node_id"),
        "max_examples": max_examples,
        "registered_at": (existing or {}).get("registered_at") or _now(),
        "revoked": False,
    }
    if previous and previous.get("fingerprint") != fingerprint:  # a revoked site gets a new key
        entry["previous_fingerprints"] = [*previous.get("previous_fingerprints", []), previous["fingerprint"]]
    elif previous and previous.get("previous_fingerprints"):
        entry["previous_fingerprints"] = previous["previous_fingerprints"]
    registry["sites"][site_id] = entry
    return entry


def _flwr_json(args: list[str], state: Path, wait_s: float = 60.0) -> dict[str, Any]:
    try:
        wait_for_superlink(state, wait_s, args[-1])
    except TimeoutError as err:
        return {"success": False, "error-message": str(err)}
    flwr = Path(sys.executable).with_name("flwr")
    proc = subprocess.run([str(flwr), *args, "--format", "json"], env=flwr_env(state),
                          capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}


def _keep_copy(state: Path, public_key: Path, name: str) -> str:
    """Copy the received public key into <state>/keys (the file the operator got may not stay
    where it is); the registry stores the path relative to the state directory."""
    keys = make_private_dir(Path(state) / "keys")
    target = keys / name
    if Path(public_key).resolve() != target.resolve():
        shutil.copyfile(public_key, target)
    return str(target.relative_to(state))


def register_site(state: Path, site_id: str, public_key: Path, max_examples: int,
                  connection: str = DEFAULT_NAME, operator_key: Path | None = None) -> dict[str, Any]:
    """Check the rules, register `public_key` at the SuperLink, then record it in the registry."""
    fingerprint = key_fingerprint(public_key)
    registry = read_registry(state)
    existing = plan_site(registry, site_id, fingerprint, max_examples)
    result = _flwr_json(["supernode", "register", str(public_key), connection], state)
    if result.get("success"):
        node_id = int(result["node-id"])
    elif "already in use" in str(result.get("error-message", "")) and existing is not None:
        node_id = None  # registered before, by us: the registry already has its node id
    else:
        raise RegistryError(f"the SuperLink refused site {site_id}'s key: {result.get('error-message', result)}")
    entry = record_site(registry, site_id, _keep_copy(state, public_key, f"site-{site_id}.key.pub"),
                        fingerprint, node_id, max_examples, existing)
    write_registry(state, registry, operator_key)
    return entry


def unregister_site(state: Path, site_id: str, connection: str = DEFAULT_NAME,
                    operator_key: Path | None = None) -> dict[str, Any]:
    """Mark the site revoked in the registry first (what the ServerApp enforces), then remove its
    key at the SuperLink. The entry stays: its key can never be registered again."""
    registry = read_registry(state)
    entry = registry["sites"].get(site_id)
    if entry is None:
        raise RegistryError(f"site {site_id} is not in {registry_path(state)}")
    if not entry.get("revoked"):
        entry["revoked"] = True
        entry["revoked_at"] = _now()
        write_registry(state, registry, operator_key)
    if entry.get("node_id") is not None:
        result = _flwr_json(["supernode", "unregister", str(entry["node_id"]), connection], state)
        if not result.get("success") and "not found" not in str(result.get("error-message", "")).lower():
            raise RegistryError(f"site {site_id} is revoked in the registry, but the SuperLink did not "
                                f"unregister node {entry['node_id']}: {result.get('error-message', result)}")
    return entry


def register_admin(state: Path, public_key: Path, operator_key: Path | None = None) -> dict[str, Any]:
    """Record the operator's signing key (signer "admin"); it may not be any site's key."""
    fingerprint = key_fingerprint(public_key)
    registry = read_registry(state)
    owner = _owner_of(registry, fingerprint)
    if owner is not None and not owner.startswith("the operator"):
        raise RegistryError(f"key {fingerprint} is already registered for {owner}: one key, one role")
    registry["admin"] = {"public_key": _keep_copy(state, public_key, "operator.key.pub"),
                         "fingerprint": fingerprint}
    write_registry(state, registry, operator_key)
    return registry["admin"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.register", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--site-id")
    who.add_argument("--admin", action="store_true", help="record the operator's signing key")
    who.add_argument("--sign", action="store_true", help="sign the current registry with the operator key")
    parser.add_argument("--public-key", type=Path,
                        help="OpenSSH public key (default <state>/keys/site-<id>.key.pub, "
                             "or <state>/keys/operator.key.pub with --admin)")
    parser.add_argument("--max-examples", type=int,
                        help="most examples one reply of this site may claim (required to register)")
    parser.add_argument("--unregister", action="store_true",
                        help="revoke the site: registry `revoked: true` + unregister at the SuperLink")
    parser.add_argument("--operator-key", type=Path, default=None,
                        help="the operator's private key that signs the registry (default <state>/keys/operator.key)")
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="operator state dir (default %(default)s)")
    args = parser.parse_args(argv)

    try:
        if args.sign:
            signature = sign(args.state, args.operator_key)
            if signature is None:
                return 1
            print(f"signed {registry_path(args.state)}: {signature}")
        elif args.admin:
            pub = args.public_key or args.state / "keys" / "operator.key.pub"
            if not pub.exists():
                parser.error(f"{pub} does not exist: run `python -m deploy.pki operator-key --out {args.state / 'keys'}`")
            print(json.dumps(register_admin(args.state, pub, args.operator_key), indent=2))
        elif args.unregister:
            entry = unregister_site(args.state, args.site_id, args.connection, args.operator_key)
            print(f"site {args.site_id} revoked (key {entry['fingerprint']}, node {entry.get('node_id')})")
        else:
            if args.max_examples is None:
                parser.error("--max-examples N is required to register a site (the most examples "
                             "one of its replies may claim)")
            pub = args.public_key or args.state / "keys" / f"site-{args.site_id}.key.pub"
            if not pub.exists():
                parser.error(f"{pub} does not exist: the site creates it with "
                             f"`python -m deploy.pki site-key --site-id {args.site_id}` and sends the .pub")
            entry = register_site(args.state, args.site_id, pub, args.max_examples, args.connection,
                                  args.operator_key)
            print(f"site {args.site_id} registered: node {entry['node_id']}, key {entry['fingerprint']}, "
                  f"max examples {entry['max_examples']}")
    except (RegistryError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
