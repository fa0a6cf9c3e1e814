"""Text from a hostile origin on an operator's terminal: control characters shown, never obeyed.

A site's reply (its fingerprints, error reasons), a withdrawal request's reason or a file name in
the state directory can hold escape sequences: printed raw, ``ESC[2J`` clears the operator's
screen, ``ESC]52;…`` writes to the clipboard, a bidi override (U+202E) reverses what follows.
:func:`escape_controls` is the one place that makes such text printable; :func:`is_printable`
is the check used to refuse it where it enters (reply metadata, withdrawal and ledger reasons).
"""
from __future__ import annotations

import unicodedata

__all__ = ["escape_controls", "is_printable"]


def _unsafe(char: str) -> bool:
    # Cc (C0/C1 controls, DEL), Cf (bidi overrides, zero-width joiners), Cs (lone surrogates),
    # Co/Cn (private use, unassigned), Zl/Zp (line and paragraph separators)
    return unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def is_printable(text: str) -> bool:
    """True when ``text`` holds no character :func:`escape_controls` would escape."""
    return not any(_unsafe(char) for char in text)


def escape_controls(text: object) -> str:
    """``str(text)`` with every control, format or unassigned character written as its Python escape
    (``\\x1b``, ``\\u202e``); everything else as it is. Safe to print on any terminal."""
    text = text if isinstance(text, str) else str(text)
    if is_printable(text):
        return text
    return "".join(char.encode("unicode_escape").decode("ascii") if _unsafe(char) else char for char in text)
