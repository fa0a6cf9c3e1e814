"""Protocol limits that the sites, the server and the ledger all enforce (no Flower here).

A site id is the ledger's key, a file-name component of exports and a word in every report, so
it is restricted to a small safe alphabet: ASCII letters and digits, then also ``.``, ``_`` and
``-``, at most 64 characters. ``str.isdigit`` and ``\\w`` accept non-ASCII digits and letters,
which once broke every later report; the pattern below is ASCII-only on purpose.
"""
from __future__ import annotations

import re

#: the largest |value| of a Δw entry the ledger records (its fixed-point range,
#: server.ledger.fixedpoint.MAX_ABS_VALUE); a larger one is refused, never clipped
MAX_DELTA_VALUE = 2.0 ** 8

SITE_ID_MAX_LEN = 64
SITE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
SITE_ID_RULE = ("1-64 ASCII characters: letters, digits, '.', '_' and '-', starting with a letter "
                "or digit")


def check_site_id(value: object) -> str:
    """``value`` if it is a valid site id; raises ValueError saying why not."""
    if not isinstance(value, str):
        raise ValueError(f"site id {value!r} is not a string ({SITE_ID_RULE})")
    if not SITE_ID_PATTERN.fullmatch(value):
        shown = value if len(value) <= 80 else value[:80] + "…"
        raise ValueError(f"site id {shown!r} is not valid: {SITE_ID_RULE}")
    return value


def site_order(site_id: str) -> tuple:
    """Sort key: numeric ids in numeric order, then the rest alphabetically."""
    return (0, int(site_id), "") if site_id.isascii() and site_id.isdigit() else (1, 0, site_id)
