"""A site's exact-head statistics as one safetensors file (the file a forget request names).

Tensors: ``SufficientStats.to_arrays()`` (int64 n [1], counts [k], sums [p], gram [p(p+1)/2],
cross [p, k]). Metadata (safetensors' string map): ``format``, the grid (``stats.meta()``:
num-features, num-classes, clip-norm, frac-bits, as text), ``feature-digest`` (the
FeatureExtractor the site used), and ``dp`` (JSON) only for a DP release.

:func:`load_stats` reads hostile bytes: the header is bounded and parsed as plain JSON before
safetensors sees the file, and every shape and dtype is checked by ``SufficientStats.from_arrays``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tangent.exact_head.statistics import StatsError, SufficientStats

FORMAT = "taft-fl/exact-head-stats/v1"
#: a DP head's release (client/dp_head.py): its five int64 arrays and its stats-meta (the mechanism's
#: public parameters, JSON) — what a DP site's forget request names
RELEASE_FORMAT = "taft-fl/dp-head-release/v1"
RELEASE_ARRAYS = ("n", "counts", "sums", "gram", "cross")
META_KEYS = ("num-features", "num-classes", "clip-norm", "frac-bits")
MAX_HEADER_BYTES = 64 * 1024


def stats_bytes(stats: SufficientStats, feature_digest: str) -> bytes:
    """The file's bytes (deterministic: equal statistics give equal bytes)."""
    from safetensors.numpy import save

    metadata = {"format": FORMAT, "feature-digest": str(feature_digest),
                **{key: str(value) for key, value in stats.meta().items()}}
    if stats.dp is not None:
        metadata["dp"] = json.dumps(stats.dp, sort_keys=True)
    return save({name: np.ascontiguousarray(a, dtype=np.int64) for name, a in stats.to_arrays().items()},
                metadata=metadata)


def save_stats(path: str | Path, stats: SufficientStats, feature_digest: str) -> bytes:
    data = stats_bytes(stats, feature_digest)
    Path(path).write_bytes(data)
    return data


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors file's bytes ({} when it has none); StatsError
    when the header is not bounded plain JSON."""
    if len(data) < 8:
        raise StatsError("not a safetensors file (shorter than its header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise StatsError(f"safetensors header of {length} bytes (limit {MAX_HEADER_BYTES}, file {len(data)})")
    try:
        header = json.loads(data[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StatsError(f"unreadable safetensors header: {str(err)[:100]}") from None
    if not isinstance(header, dict):
        raise StatsError("safetensors header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise StatsError("safetensors metadata must map strings to strings")
    return meta


def load_stats(data: bytes) -> tuple[SufficientStats, str]:
    """``(statistics, feature digest)`` of a file's bytes; StatsError (a ValueError) when it is not
    one. ``stats.dp`` is set for a DP release."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = safetensors_metadata(data)
    if meta.get("format") != FORMAT:
        raise StatsError(f"format {meta.get('format', '')[:60]!r}, expected {FORMAT!r}")
    missing = [key for key in (*META_KEYS, "feature-digest") if key not in meta]
    if missing:
        raise StatsError(f"the statistics file's metadata lacks {missing}")
    try:
        grid = {"num-features": int(meta["num-features"]), "num-classes": int(meta["num-classes"]),
                "clip-norm": float(meta["clip-norm"]), "frac-bits": int(meta["frac-bits"])}
        dp = json.loads(meta["dp"]) if "dp" in meta else None
        arrays = load(data)
    except (ValueError, SafetensorError) as err:
        raise StatsError(f"unreadable statistics file: {str(err)[:200]}") from None
    return SufficientStats.from_arrays(arrays, grid, dp=dp), meta["feature-digest"]


def release_bytes(arrays: dict[str, np.ndarray], stats_meta: dict) -> bytes:
    """A DP head's release as a file: its arrays and its ``stats-meta`` (as the reply carries them)."""
    from safetensors.numpy import save

    if sorted(arrays) != sorted(RELEASE_ARRAYS):
        raise StatsError(f"a release holds {list(RELEASE_ARRAYS)}, not {sorted(arrays)}")
    return save({name: np.ascontiguousarray(a, dtype=np.int64) for name, a in arrays.items()},
                metadata={"format": RELEASE_FORMAT, "stats-meta": json.dumps(dict(stats_meta), sort_keys=True)})


def load_release(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, stats-meta)`` of a release file's bytes; StatsError when it is not one. Nothing is
    checked beyond the format: the server checks the release as it checks a reply's
    (server.replies.parse_dp_release)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    meta = safetensors_metadata(data)
    if meta.get("format") != RELEASE_FORMAT:
        raise StatsError(f"format {meta.get('format', '')[:60]!r}, expected {RELEASE_FORMAT!r}")
    try:
        stats_meta = json.loads(meta.get("stats-meta", ""))
        arrays = load(data)
    except (ValueError, SafetensorError, RecursionError) as err:
        raise StatsError(f"unreadable release file: {str(err)[:200]}") from None
    if not isinstance(stats_meta, dict):
        raise StatsError("the release's stats-meta is not a JSON object")
    return arrays, stats_meta
