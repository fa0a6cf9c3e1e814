"""Checking an export (``taft-ledger export``) before anything relies on it; no server code.

An export directory holds ``manifest.json``, the model file and ``public-key.pem``. The manifest
carries the ledger's signed head for the exported version and a *signed export statement*:

    {"format": "taft-fl export statement 2", "model_version": …, "composed_sha256": …,
     "manifest_sha256": sha256(canonical JSON of the manifest without "statement"),
     "files": {"<model file>": sha256 of its bytes}}

so every field a consumer reads (privacy claims, site list, model spec, base digest, feature
spec, λ, …) and every byte of the model file is covered by one signature; the head ties the
statement to the ledger's history. :func:`verify_export` checks both signatures, that the head
and the statement name the same version, the manifest's digest and each file's digest, and
returns the verified manifest and the verified file bytes (what is served is what was checked).

Which key? ``public_key`` (a PEM file obtained from the operator) or ``fingerprint`` (the
``SHA256:…`` the operator publishes; the key itself is then taken from the export and must have
that fingerprint). Either *pins* the signer: that is authenticity. With neither, the key the
export carries is used: that proves only integrity (someone who rewrites the export can sign it
with their own key and put that key in).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tangent.protocol import signatures

MANIFEST_FILE = "manifest.json"
PUBLIC_KEY_FILE = "public-key.pem"
HEAD_FORMAT = "taft-fl ledger head 1"
STATEMENT_FORMAT = "taft-fl export statement 2"
#: manifest fields that name a file of the export
FILE_FIELDS = ("composed_file", "head_file")


class ExportError(ValueError):
    """The export cannot be read (missing or malformed files)."""


class ExportRefused(ValueError):
    """The export fails verification; ``problems`` lists every failed check."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class VerifiedExport:
    manifest: dict[str, Any]
    head: dict[str, Any]
    files: dict[str, bytes]     # file name -> the bytes whose digest was checked
    fingerprint: str            # the key that signed it
    pinned: bool                # whether the key was pinned by the caller (authenticity), or embedded (integrity)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, without its ``statement``."""
    body = {k: v for k, v in manifest.items() if k != "statement"}
    return hashlib.sha256(signatures.canonical_json(body).encode()).hexdigest()


def model_files(manifest: dict[str, Any]) -> list[str]:
    """The file names the manifest points at; ExportError when one is not a plain name."""
    names = []
    for field in FILE_FIELDS:
        name = manifest.get(field)
        if name is None:
            continue
        if not isinstance(name, str) or not name or Path(name).name != name or name in (MANIFEST_FILE, "..", "."):
            raise ExportError(f"the manifest's {field} {name!r} is not a file name in the export")
        names.append(name)
    return names


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise ExportError(f"{directory} has no {MANIFEST_FILE}: not a `taft-ledger export` output") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{directory / MANIFEST_FILE} is unreadable: {err}") from None
    if not isinstance(manifest, dict):
        raise ExportError(f"{directory / MANIFEST_FILE} is not a JSON object")
    return manifest


def _signer(directory: Path, manifest: dict, public_key: Path | Ed25519PublicKey | None,
            fingerprint: str | None) -> tuple[Any, bool]:
    """(the key to check with, whether it is pinned). A key file inside the export (its own
    public-key.pem) is the key the export carries: whoever rewrote the export rewrote it too, so it
    pins nothing unless a fingerprint is pinned as well."""
    if public_key is not None:
        try:
            key = public_key if isinstance(public_key, Ed25519PublicKey) else \
                signatures.load_ed25519_public_key(Path(public_key).read_bytes())
        except (OSError, ValueError) as err:
            raise ExportError(f"cannot read the public key {public_key}: {err}") from None
        if fingerprint is not None and signatures.fingerprint(key) != signatures.normalise_fingerprint(fingerprint):
            raise ExportRefused([f"the public key {public_key} has fingerprint {signatures.fingerprint(key)}, "
                                 f"not the pinned {signatures.normalise_fingerprint(fingerprint)}"])
        carried = not isinstance(public_key, Ed25519PublicKey) and \
            Path(public_key).resolve().is_relative_to(directory.resolve())
        return key, fingerprint is not None or not carried
    try:
        key = signatures.load_ed25519_public_key(manifest["public_key"])
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"the export carries no usable public key: {err}") from None
    if fingerprint is None:
        return key, False
    pinned = signatures.normalise_fingerprint(fingerprint)
    if signatures.fingerprint(key) != pinned:
        raise ExportRefused([f"the export is signed by {signatures.fingerprint(key)}, not the pinned {pinned}"])
    return key, True


def verify_export(directory: str | Path, *, public_key: str | Path | Ed25519PublicKey | None = None,
                  fingerprint: str | None = None) -> VerifiedExport:
    """Check the export in ``directory`` (module docstring). ExportRefused lists every failed
    check; ExportError when it cannot be read at all."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    key, pinned = _signer(directory, manifest, public_key, fingerprint)
    fp = signatures.fingerprint(key)
    problems: list[str] = []

    signed_head = manifest.get("signed_head")
    head = signed_head.get("head") if isinstance(signed_head, dict) else None
    if not isinstance(head, dict) or not signatures.ed25519_valid(key, head, signed_head.get("signature")):
        problems.append(f"the manifest's head is not signed by {fp}")
        head = head if isinstance(head, dict) else {}
    if head.get("format") != HEAD_FORMAT or head.get("public_key") != fp:
        problems.append(f"the head is not a ledger head signed by {fp}")

    entry = manifest.get("statement")
    statement = entry.get("statement") if isinstance(entry, dict) else None
    if not isinstance(statement, dict) or statement.get("format") != STATEMENT_FORMAT:
        problems.append(f"the export carries no signed statement ({STATEMENT_FORMAT!r}); it was made by an older "
                        f"release or the statement was removed: export it again")
        raise ExportRefused(problems)
    if not signatures.ed25519_valid(key, statement, entry.get("signature")):
        problems.append(f"the export statement is not signed by {fp}")
    for field, head_field in (("model_version", "version"), ("composed_sha256", "composed_sha256")):
        if statement.get(field) != head.get(head_field):
            problems.append(f"the statement's {field} {statement.get(field)!r} is not the signed head's "
                            f"{head.get(head_field)!r}")
    if statement.get("manifest_sha256") != manifest_digest(manifest):
        problems.append("the manifest differs from the one the statement signs (a field was edited, added or removed)")

    files: dict[str, bytes] = {}
    signed_files = statement.get("files") if isinstance(statement.get("files"), dict) else {}
    names = model_files(manifest)
    if sorted(signed_files) != sorted(names):
        problems.append(f"the statement signs the files {sorted(signed_files)}, the manifest names {names}")
    for name in names:
        try:
            data = (directory / name).read_bytes()
        except OSError as err:
            problems.append(f"the export lacks {name}: {err}")
            continue
        if hashlib.sha256(data).hexdigest() != signed_files.get(name):
            problems.append(f"{name}: its sha256 is not the signed one (the model was changed)")
            continue
        files[name] = data
    if problems:
        raise ExportRefused(problems)
    return VerifiedExport(manifest=manifest, head=head, files=files, fingerprint=fp, pinned=pinned)
