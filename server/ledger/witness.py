"""An append-only witness of signed heads, kept where the state directory's writer cannot reach.

A signed head proves that the server's key signed a version; it cannot prove that nothing newer
was signed. Someone who can write the state directory (no key needed) can therefore put back an
older copy of the database and its head file — a rollback — and every signature still verifies.
Only a record of the heads outside their reach exposes that. The witness is such a record: a file
the operator places outside the state directory (another disk, a mount only the server may append
to, a log shipped off the host), one JSON line per signed head:

    {"format": "taft-fl witness 1"}                                    (first line, written by init)
    {"ledger": "SHA256:<key fingerprint>", "path": "<the ledger file>", "head": {...}, "signature": "<hex>"}

Both ledgers (Δ and statistics) may share one witness: lines are told apart by the fingerprint of
the key that signed them. The path says which ledger file the heads came from: the state
directory's writer cannot sign with the ledger's key but can replace it (a shorter history under
a key of their own), and a witness that looked heads up by key alone would see nothing of that;
heads of one path under another key are reported as a re-keyed ledger. (A ledger started afresh
at the same path is one too: start a new witness with it.) The server appends every head it publishes; ``verify`` and opening the
ledger compare the ledger with the newest witnessed head for its key: a ledger behind it was rolled
back, a ledger whose head for a witnessed version differs was forked. A witness can only catch
what it saw: heads written while no witness was configured are not in it.

The witness is opened without following symlinks and appended to only when its first line is the
witness header, so a misconfigured path can never append to a key, a ledger or a request file.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from server.ledger import audit
from server.ledger.records import LedgerError, canonical_json
from server.ledger.storage import FILE_MODE, make_private_dirs

WITNESS_FORMAT = "taft-fl witness 1"
HEADER = (canonical_json({"format": WITNESS_FORMAT}) + "\n").encode()
#: environment variable naming the witness file (the operator's setting, not the run config's)
WITNESS_ENV = "TAFT_WITNESS"


def configured(explicit: str | Path | None = None) -> Path | None:
    """The witness to use: ``explicit`` if given, else ``$TAFT_WITNESS``, else None."""
    value = explicit if explicit is not None else os.environ.get(WITNESS_ENV)
    return Path(value).expanduser() if value else None


def init(path: Path) -> None:
    """Create an empty witness (exclusive: an existing file, or a link, is never reused); missing
    parent directories are created 0700."""
    make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        raise LedgerError(f"{path} exists; a witness is created once and only appended to") from None
    except OSError as e:
        raise LedgerError(f"cannot create the witness {path}: {e}") from None
    try:
        os.write(fd, HEADER)
        os.fsync(fd)
    finally:
        os.close(fd)


def _open(path: Path, flags: int) -> int:
    """A file descriptor on the witness; LedgerError unless it is a regular file (not a link)
    starting with the witness header."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO planted there never blocks
    except FileNotFoundError:
        raise LedgerError(f"the witness {path} does not exist (create it once with `taft-ledger witness-init`)") from None
    except OSError as e:  # ELOOP: the last component is a symbolic link
        raise LedgerError(f"cannot open the witness {path} (a symbolic link is refused): {e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LedgerError(f"the witness {path} is not a regular file")
        if os.pread(fd, len(HEADER), 0) != HEADER:
            raise LedgerError(f"{path} is not a witness (its first line is not {HEADER.decode().strip()})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read(path: Path, key_fingerprint: str) -> list[tuple[dict[str, Any], str]]:
    """Every (head, signature) the witness holds for the ledger signed by ``key_fingerprint``, in
    the order they were appended. LedgerError when the file is not a readable witness."""
    fd = _open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    heads = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            entry = json.loads(line)
            if entry["ledger"] != key_fingerprint:
                continue
            heads.append((dict(entry["head"]), str(entry["signature"])))
        except (ValueError, KeyError, TypeError):
            raise LedgerError(f"the witness {path} has an unreadable line {number}") from None
    return heads


def ledger_name(ledger_path: Path) -> str:
    """How the witness names a ledger file: its absolute path, symlinks resolved."""
    return str(Path(ledger_path).resolve())


def keys_of(path: Path, ledger_path: Path) -> set[str]:
    """The key fingerprints the witness holds heads of ``ledger_path`` for (lines without a path,
    from before paths were written, name none)."""
    fd = _open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        lines = f.read().split(b"\n")[1:]
    name, keys = ledger_name(ledger_path), set()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # read() reports unreadable lines
        if isinstance(entry, dict) and entry.get("path") == name and isinstance(entry.get("ledger"), str):
            keys.add(entry["ledger"])
    return keys


def append(path: Path, head: dict[str, Any], signature: str, ledger_path: Path) -> None:
    """Append one signed head of the ledger file ``ledger_path`` (one ``write`` on an O_APPEND
    descriptor, then fsync)."""
    line = canonical_json({"ledger": head["public_key"], "path": ledger_name(ledger_path), "head": head,
                           "signature": signature}) + "\n"
    fd = _open(path, os.O_RDWR | os.O_APPEND)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def newest_version(path: Path, key_fingerprint: str) -> int:
    """The highest version the witness holds for this key, -1 when none."""
    return max((h.get("version", -1) for h, _ in read(path, key_fingerprint)), default=-1)


def problems(path: Path, held: dict[int, tuple[dict, str]], key, *, newest_held: int,
             ledger_path: Path) -> tuple[list[str], int]:
    """Compare the signed heads of the ledger file ``ledger_path`` (``held``: version -> (head,
    signature)) with the witness.

    Returns (problems, newest witnessed version). A witnessed head must be validly signed by
    ``key`` and held, identical, by the ledger; a witnessed version beyond ``newest_held`` means
    the ledger was rolled back; heads of this file under another key mean it was re-keyed."""
    fp = audit.fingerprint(key)
    try:
        witnessed = read(path, fp)
        other_keys = sorted(keys_of(path, ledger_path) - {fp})
    except LedgerError as e:
        return [str(e)], -1
    found, newest = [], -1
    if other_keys:
        found.append(f"the witness {path} holds heads of {ledger_name(ledger_path)} signed by another key "
                     f"({', '.join(other_keys)}), not by {fp}: the ledger was replaced under a new key")
    for head, signature in witnessed:
        version = head.get("version")
        if not isinstance(version, int) or not audit.signature_valid(key, head, signature):
            found.append(f"the witness holds a head for {fp} that this key did not sign (version {version!r})")
            continue
        newest = max(newest, version)
        if version > newest_held:
            continue  # reported once below
        if held.get(version) != (head, signature):
            found.append(f"version {version}: the ledger's signed head differs from the witnessed one (forked history)")
    if newest > newest_held:
        found.insert(0, f"the witness {path} holds version {newest}, but the ledger ends at version {newest_held}: "
                        f"history was rolled back or cut off")
    return found, newest
