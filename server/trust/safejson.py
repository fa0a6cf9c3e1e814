"""JSON from hostile input (a site's reply, a withdrawal file): bounded size and depth, plain values.

``json.loads`` on its own is not enough for input an attacker writes: deep nesting raises
RecursionError (not ValueError), a number of more than 4,300 digits raises ValueError only since
Python 3.11's limit, NaN/Infinity are accepted, and the size is whatever arrived. Everything here
fails with ValueError, so a caller needs one ``except`` to turn bad input into a refusal.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bracket_depth(text: str) -> int:
    """Deepest nesting of ``[`` and ``{`` outside JSON strings (a linear scan: no recursion)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def loads(data: str | bytes, *, max_bytes: int, max_depth: int) -> Any:
    """Parse ``data`` (UTF-8 if bytes); ValueError if too large, too deep or not plain JSON."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    elif isinstance(data, str):
        text = data
        if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            raise ValueError(f"larger than {max_bytes} bytes")
    else:
        raise ValueError(f"expected JSON text, got {type(data).__name__}")
    if bracket_depth(text) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth}")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # not reachable after the depth check; kept so no other type escapes
        raise ValueError("JSON nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, int digit limit, NaN/Infinity
        raise ValueError(str(err)[:200]) from None


def read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file named by hostile input (a FIFO would block the
    run, a device would never end); ValueError saying why not."""
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as err:
        raise ValueError(str(err)) from None
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data
