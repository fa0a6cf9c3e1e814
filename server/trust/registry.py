"""The site registry: site id <-> public key <-> SuperLink node id, and the operator's signature over it.

Written by ``deploy.register``; read by the ServerApp (which node is which site, its example cap,
whether it is revoked) and by every check of a signed request (server/trust/withdrawal.py,
server/trust/forgetting.py), which verify against the keys registered here.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from server.trust import safejson
from server.ledger.audit import fingerprint
from tangent.protocol import signed_requests
from tangent.protocol.limits import check_site_id
from tangent.protocol.signed_requests import load_public_key

#: the registry's entry for the operator's key, and the signer name of a request it signs
ADMIN = "admin"
REGISTRY_VERSION = 2
#: Domain separation: the operator's registry signature can pass for no request.
REGISTRY_SIGNATURE_CONTEXT = b"taft-fl/site-registry/v1\n"
#: environment variable pinning the operator key that must sign the registry ("SHA256:<hex>")
OPERATOR_FINGERPRINT_ENV = "TAFT_OPERATOR_FINGERPRINT"
MAX_SIGNATURE_BYTES = 64 * 1024


def registry_signature_path(registry_path: str | Path) -> Path:
    """The operator's detached signature of the registry file: ``registry.json.sig``."""
    return Path(f"{registry_path}.sig")


def registry_statement(raw: bytes) -> dict[str, Any]:
    """What the operator signs: the registry file's exact bytes, by digest."""
    return {"kind": "site-registry", "version": REGISTRY_VERSION, "sha256": hashlib.sha256(raw).hexdigest()}


def sign_registry(registry_path: str | Path, private_key: ec.EllipticCurvePrivateKey) -> Path:
    """Write ``registry.json.sig``: the operator key's signature over the registry's bytes."""
    path = registry_signature_path(registry_path)
    document = signed_requests.sign(REGISTRY_SIGNATURE_CONTEXT, registry_statement(Path(registry_path).read_bytes()),
                                    private_key)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The registry's fingerprint of a site or operator key (server.ledger.audit's one rule)."""
    return fingerprint(key)


class SiteRegistry:
    """The site registry `deploy.register` writes: site id <-> public key <-> SuperLink node id.

    {"version": 2,
     "sites": {"3": {"public_key": "keys/site-3.key.pub", "fingerprint": "SHA256:<hex>",
                     "node_id": 1234567, "max_examples": 1200, "registered_at": "<iso>",
                     "revoked": false}},
     "admin": {"public_key": "keys/operator.key.pub", "fingerprint": "SHA256:<hex>"}}

    Relative key paths are resolved against the registry file's directory. Entries are never
    deleted: ``revoked: true`` means that key can neither contribute nor sign withdrawals. The
    whole file is checked when it is read (ValueError saying what is wrong), so a later lookup
    never meets a malformed entry; a key file whose fingerprint is not the registered one is
    refused when it is loaded.

    ``signed=True`` (the ServerApp in a deployment): the file must carry the operator's signature
    (``registry.json.sig``, written by ``deploy.register`` with the operator key) over its exact
    bytes, made by the registered admin key — and, when ``operator_fingerprint`` or
    ``$TAFT_OPERATOR_FINGERPRINT`` pins one, by that key. Unsigned or edited (a node id swapped,
    a cap raised, a key replaced): ValueError. Without a pin, someone who replaces the admin key
    in the file and re-signs with their own passes: the pin is what makes the signature the
    operator's. ``signed=None`` (the default: the operator's tools, ``deploy.withdraw``,
    ``taft-ledger forget``) checks whenever a pin is set, so an operator who pins the key has
    every tool refuse an edited registry.
    """

    def __init__(self, path: str | Path, *, signed: bool | None = None, operator_fingerprint: str | None = None):
        self.path = Path(path)
        try:
            raw = _read_no_follow(self.path, MAX_REGISTRY_BYTES + 1)
        except FileNotFoundError:
            raise ValueError(f"site registry {self.path} does not exist (written by deploy.register)") from None
        except OSError as err:
            raise ValueError(f"site registry {self.path} cannot be read (a symbolic link is refused): {err}") from None
        if len(raw) > MAX_REGISTRY_BYTES:
            raise ValueError(f"site registry {self.path} is larger than {MAX_REGISTRY_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ValueError(f"site registry {self.path} is not UTF-8 JSON: {err}") from None
        self.data = _checked_registry(data, self.path)
        self._by_node = {entry["node_id"]: site for site, entry in self.data["sites"].items()
                         if entry.get("node_id") is not None}
        self.signed_by: str | None = None
        pinned = operator_fingerprint or os.environ.get(OPERATOR_FINGERPRINT_ENV) or None
        if signed or (signed is None and pinned):
            self.signed_by = self._check_signature(raw, pinned)

    def _check_signature(self, raw: bytes, pinned: str | None) -> str:
        """The fingerprint of the operator key that signed exactly ``raw``; ValueError otherwise."""
        # the request module's one rule for a signed document (imported here: that module builds on this one)
        from server.trust.withdrawal import WithdrawalRefused, split_document

        sig_path = registry_signature_path(self.path)
        try:
            document = safejson.loads(_read_no_follow(sig_path, MAX_SIGNATURE_BYTES + 1),
                                      max_bytes=MAX_SIGNATURE_BYTES, max_depth=4)
        except FileNotFoundError:
            raise ValueError(f"site registry {self.path} is not signed ({sig_path} is missing): sign it with "
                             f"python -m deploy.register --sign") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"the registry signature {sig_path} is unreadable: {err}") from None
        try:
            payload, signature = split_document(document)
        except WithdrawalRefused as err:
            raise ValueError(f"the registry signature {sig_path} is malformed: {err}") from None
        if payload != registry_statement(raw):
            raise ValueError(f"site registry {self.path} differs from the file the operator signed (edited?)")
        admin = self.admin_public_key()
        if admin is None:
            raise ValueError(f"site registry {self.path} names no operator (admin) key to check its signature")
        signer = key_fingerprint(admin)
        if pinned is not None and signer != pinned.strip():
            raise ValueError(f"site registry {self.path}: its admin key is {signer}, not the pinned operator key "
                             f"{pinned.strip()}")
        if not signed_requests.signature_valid(admin, signature, REGISTRY_SIGNATURE_CONTEXT, payload):
            raise ValueError(f"site registry {self.path}: the signature is not the registered operator key's")
        return signer

    def sites(self) -> list[str]:
        return sorted(self.data["sites"])

    def entry(self, site_id: str) -> dict[str, Any] | None:
        """The site's registry entry (a copy), None when the site is not registered."""
        entry = self.data["sites"].get(site_id) if isinstance(site_id, str) else None
        return dict(entry) if entry is not None else None

    def site_for_node(self, node_id: int) -> str | None:
        """The site registered for this SuperLink node id (revoked ones included), else None."""
        return self._by_node.get(node_id) if isinstance(node_id, int) and not isinstance(node_id, bool) else None

    def is_revoked(self, site_id: str) -> bool:
        entry = self.entry(site_id)
        return bool(entry and entry.get("revoked", False))

    def max_examples(self, site_id: str) -> int | None:
        entry = self.entry(site_id)
        return entry["max_examples"] if entry else None

    def _key_path(self, entry: dict[str, Any]) -> Path:
        path = Path(entry["public_key"])
        return path if path.is_absolute() else self.path.parent / path

    def _load_key(self, entry: dict[str, Any], who: str) -> ec.EllipticCurvePublicKey:
        key = load_public_key(self._key_path(entry))
        if entry.get("fingerprint") and key_fingerprint(key) != entry["fingerprint"]:
            raise ValueError(f"{who}: key file {entry['public_key']} has fingerprint {key_fingerprint(key)}, "
                             f"the registry says {entry['fingerprint']}")
        return key

    def public_key(self, site_id: str) -> ec.EllipticCurvePublicKey | None:
        entry = self.entry(site_id)
        return self._load_key(entry, f"site {site_id}") if entry else None

    def admin_public_key(self) -> ec.EllipticCurvePublicKey | None:
        entry = self.data.get(ADMIN)
        return self._load_key(entry, ADMIN) if entry else None


MAX_REGISTRY_BYTES = 16 * 1024 * 1024


def _read_no_follow(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, refusing a symbolic link as the last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read(limit)


def _checked_registry(data: Any, path: Path) -> dict[str, Any]:
    """The registry document if it follows the version-2 format; ValueError naming the problem."""
    def bad(what: str) -> ValueError:
        return ValueError(f"site registry {path} is malformed: {what}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("version") != REGISTRY_VERSION or isinstance(data.get("version"), bool):
        raise bad(f"version {data.get('version')!r}, expected {REGISTRY_VERSION} (re-register with deploy.register)")
    sites = data.get("sites", {})
    if not isinstance(sites, dict):
        raise bad("'sites' must be an object of site id -> entry")
    seen_nodes: dict[int, str] = {}
    seen_fingerprints: dict[str, str] = {}
    for site, entry in sites.items():
        try:
            check_site_id(site)
        except ValueError as err:
            raise bad(str(err)) from None
        if not isinstance(entry, dict):
            raise bad(f"site {site}: entry must be an object")
        if not isinstance(entry.get("public_key"), str) or not entry["public_key"]:
            raise bad(f"site {site}: 'public_key' must be a path")
        fingerprint = entry.get("fingerprint")
        if not isinstance(fingerprint, str) or not fingerprint.startswith("SHA256:"):
            raise bad(f"site {site}: 'fingerprint' must be 'SHA256:<hex>'")
        if fingerprint in seen_fingerprints:
            raise bad(f"sites {seen_fingerprints[fingerprint]} and {site} share key {fingerprint}")
        seen_fingerprints[fingerprint] = site
        node_id = entry.get("node_id")
        if node_id is not None:
            if not isinstance(node_id, int) or isinstance(node_id, bool):
                raise bad(f"site {site}: 'node_id' must be an integer")
            if node_id in seen_nodes:
                raise bad(f"sites {seen_nodes[node_id]} and {site} share node id {node_id}")
            seen_nodes[node_id] = site
        cap = entry.get("max_examples")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
            raise bad(f"site {site}: 'max_examples' must be a positive integer (deploy.register --max-examples)")
        if not isinstance(entry.get("revoked", False), bool):
            raise bad(f"site {site}: 'revoked' must be true or false")
    admin = data.get(ADMIN)
    if admin is not None and (not isinstance(admin, dict) or not isinstance(admin.get("public_key"), str)
                              or not admin["public_key"]):
        raise bad("'admin' must be an object with a 'public_key' path")
    return data | {"sites": sites}

