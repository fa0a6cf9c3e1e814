"""Checks on a contribution that need no database state. Every failure is a RejectedContribution.

Replies come from sites the server does not control, so nothing here may raise anything else:
a hostile site id, a nested-JSON bomb, a cyclic mapping, a 5,000-digit integer or a tensor type
numpy cannot read must end as a counted rejection, never as an exception that aborts a round.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from server.ledger import fixedpoint
from server.ledger.records import RejectedContribution, canonical_json
from tangent.protocol.limits import check_site_id
from tangent.protocol.text import is_printable

MAX_NUM_EXAMPLES = fixedpoint.MAX_WEIGHT
MAX_META_BYTES = 64 * 1024   # canonical JSON of all metadata of one contribution
MAX_META_DEPTH = 8           # container levels in one field: {"a": [1]} is depth 2
MAX_META_INT = 2 ** 63 - 1   # what SQLite and every JSON reader here hold exactly
MAX_TENSOR_NAME = 512
# safetensors keeps its header metadata under this key: a tensor of that name would either be
# refused by the writer or, in other readers, be mistaken for the header.
RESERVED_TENSOR_NAMES = frozenset({"__metadata__"})
# Keyword metadata accepted by add() and replace().
CONTRIBUTION_META = ("epsilon", "delta_dp", "dp_settings", "shard_fingerprint", "base_digest",
                     "train_config", "extra")


def site_id(value: Any) -> str:
    try:
        return check_site_id(value)
    except ValueError as e:
        raise RejectedContribution("bad_site_id", str(e)) from None


def num_examples(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RejectedContribution("bad_num_examples", f"{_short(value)} is not an integer")
    if not 1 <= int(value) <= MAX_NUM_EXAMPLES:
        raise RejectedContribution("bad_num_examples", f"{_short(value)} outside [1, {MAX_NUM_EXAMPLES}]")
    return int(value)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__, or an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:80] + "…"


def _json_tree(label: str, value: Any) -> None:
    """Walks ``value`` without recursion: only JSON types, str keys, finite floats, bounded ints,
    depth ≤ MAX_META_DEPTH and few enough nodes that the JSON can stay under MAX_META_BYTES."""
    stack, nodes = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_META_BYTES:  # every node takes at least one byte of JSON
            raise RejectedContribution("bad_meta", f"{label} is larger than {MAX_META_BYTES} bytes")
        if node is None or isinstance(node, (bool, str)):
            continue
        if isinstance(node, int):
            if not -MAX_META_INT <= node <= MAX_META_INT:
                raise RejectedContribution("bad_meta", f"{label} holds an integer beyond ±2**63")
            continue
        if isinstance(node, float):
            if not math.isfinite(node):
                raise RejectedContribution("bad_meta", f"{label} holds a non-finite number")
            continue
        if isinstance(node, (Mapping, list, tuple)):
            if depth > MAX_META_DEPTH:
                raise RejectedContribution("bad_meta", f"{label} is nested deeper than {MAX_META_DEPTH}")
            if isinstance(node, Mapping):
                try:
                    items = list(node.items())
                except Exception:
                    raise RejectedContribution("bad_meta", f"{label} holds an unreadable mapping") from None
                for key, child in items:
                    if not isinstance(key, str):
                        raise RejectedContribution("bad_meta", f"{label} has a non-string key {_short(key)}")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in node)
            continue
        raise RejectedContribution("bad_meta", f"{label} holds a {type(node).__name__}, not JSON")


def metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata columns of a contribution, validated and JSON-encoded where they are objects."""
    epsilon, delta_dp, dp_settings, shard_fingerprint, base_digest, train_config, extra = (
        meta.get(key) for key in CONTRIBUTION_META)
    numbers = {}
    for label, value in (("epsilon", epsilon), ("delta_dp", delta_dp)):
        if value is None:
            numbers[label] = None
            continue
        try:  # float() of a 5,000-digit int raises OverflowError
            number = float(value) if not isinstance(value, (bool, np.bool_)) and isinstance(
                value, (int, float, np.floating, np.integer)) else math.nan
        except OverflowError:
            number = math.nan
        if not math.isfinite(number) or number < 0:
            raise RejectedContribution("bad_meta", f"{label} = {_short(value)} is not a finite number >= 0")
        numbers[label] = number
    for label, value in (("dp_settings", dp_settings), ("train_config", train_config), ("extra", extra)):
        if value is not None and not isinstance(value, Mapping):
            raise RejectedContribution("bad_meta", f"{label} must be a mapping")
    for label, value in (("shard_fingerprint", shard_fingerprint), ("base_digest", base_digest)):
        if value is not None and not isinstance(value, str):
            raise RejectedContribution("bad_meta", f"{label} must be a string")
    for label, value in (("dp_settings", dp_settings), ("train_config", train_config), ("extra", extra)):
        _json_tree(label, value)
    try:
        encoded = {label: None if value is None else canonical_json(value)
                   for label, value in (("dp_settings", dp_settings), ("train_config", train_config),
                                        ("extra", extra))}
    except (TypeError, ValueError, RecursionError) as e:
        raise RejectedContribution("bad_meta", f"not JSON: {e}") from None
    size = sum(len(v.encode()) for v in encoded.values() if v is not None) + sum(
        len(v.encode("utf-8", "surrogatepass")) for v in (shard_fingerprint, base_digest) if v is not None)
    if size > MAX_META_BYTES:
        raise RejectedContribution("bad_meta", f"metadata is {size} bytes of JSON, more than {MAX_META_BYTES}")
    for label, value in (("shard_fingerprint", shard_fingerprint), ("base_digest", base_digest)):
        if value is not None and not _encodable(value):
            raise RejectedContribution("bad_meta", f"{label} is not valid UTF-8 text")
        if value is not None and not is_printable(value):  # printed by taft-ledger show
            raise RejectedContribution("bad_meta", f"{label} holds control characters")
    return {"epsilon": numbers["epsilon"], "delta_dp": numbers["delta_dp"],
            "dp_settings": encoded["dp_settings"], "shard_fingerprint": shard_fingerprint,
            "base_digest": base_digest, "train_config": encoded["train_config"], "extra": encoded["extra"]}


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # lone surrogates: SQLite would store mojibake
        return False
    return True


def arrays(delta: Any, dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Little-endian numpy copies of a ``{name: tensor}`` mapping (torch or numpy) whose tensors
    all have ``dtype`` (float32 for a Δw, int64 for exact-head statistics)."""
    dtype = np.dtype(dtype)
    if not isinstance(delta, Mapping):
        raise RejectedContribution("bad_structure", "delta must be a non-empty mapping of name -> tensor")
    try:
        items = list(delta.items())
    except Exception:
        raise RejectedContribution("bad_structure", "delta cannot be read as a mapping") from None
    if not items:
        raise RejectedContribution("bad_structure", "delta must be a non-empty mapping of name -> tensor")
    torch = sys.modules.get("torch")  # a caller holding torch tensors has imported torch already
    out = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise RejectedContribution("bad_structure", f"tensor name {_short(name)} is not a non-empty string")
        if name in RESERVED_TENSOR_NAMES:
            raise RejectedContribution("reserved_name", f"tensor name {name!r} is reserved by safetensors")
        if len(name) > MAX_TENSOR_NAME or not _encodable(name):
            raise RejectedContribution("bad_structure", f"tensor name {_short(name)} is too long or not UTF-8")
        if torch is not None and isinstance(value, torch.Tensor):
            expected = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}[dtype]
            if value.dtype != expected:
                raise RejectedContribution("wrong_dtype", f"{name}: {value.dtype}, expected {expected}")
            try:
                value = value.detach().cpu().numpy()
            except Exception as e:  # sparse, meta or otherwise exotic tensors
                raise RejectedContribution("bad_structure", f"{name}: {type(e).__name__} reading the tensor") from None
        elif isinstance(value, np.ndarray):
            if value.dtype != dtype:
                raise RejectedContribution("wrong_dtype", f"{name}: {value.dtype}, expected {dtype}")
        else:
            raise RejectedContribution("bad_structure", f"{name}: {type(value).__name__} is not a tensor")
        out[name] = np.ascontiguousarray(value, dtype=dtype.newbyteorder("<"))
    return out


def values(arrays_: Mapping[str, np.ndarray], max_delta_norm: float | None) -> float:
    """Rejects NaN/Inf, out-of-range values and a too large norm; returns the global L2 norm."""
    largest = {name: float(np.max(np.abs(a), initial=0.0)) for name, a in arrays_.items()}  # NaN propagates
    for name, m in largest.items():
        if not math.isfinite(m):
            raise RejectedContribution("non_finite", f"{name} holds NaN or Inf")
    for name, m in largest.items():
        if m > fixedpoint.MAX_ABS_VALUE:
            raise RejectedContribution("out_of_range", f"{name} has |x| = {m:.6g} > {fixedpoint.MAX_ABS_VALUE:g}")
    squares = 0.0
    for a in arrays_.values():
        a64 = a.astype(np.float64)
        a64 *= a64
        squares += float(a64.sum())  # pairwise summation, no BLAS threads
    norm = math.sqrt(squares)
    if max_delta_norm is not None and norm > max_delta_norm:
        raise RejectedContribution("norm_too_large", f"‖Δ‖₂ = {norm:.6g} > {max_delta_norm:g}")
    return norm
