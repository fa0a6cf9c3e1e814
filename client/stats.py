"""A site's exact-head statistics (docs/exact_head.md): integer sums over its φ rows.

φ comes from the φ cache (tangent/exact_head/phi_cache.py) when one exists for this data set and feature
spec, else from the site's own token rows (or images) through FeatureExtractor.compute. Both
follow compute's batching rule keyed on the rows' data-set indices, so they give the same float32
φ and the same integers: the statistics of a site equal the central statistics of its rows, bit
for bit, and forgetting rows leaves the others' φ unchanged. φ is computed on the CPU whatever
device the site trains on (a GPU's φ differs in the last bits: tangent/exact_head/features.py).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
from torch import Tensor

from tangent.exact_head.statistics import GRAM_BLOCK, SufficientStats, quantize  # noqa: F401 (GRAM_BLOCK: tests)
from tangent.exact_head.phi_cache import BATCH_SIZE, CHUNK_ROWS, PhiCache


def keep_positions(num_rows: int, exclude: Iterable[int] = ()) -> np.ndarray:
    """Local row positions 0..num_rows-1 without ``exclude`` (distinct ints in range, else ValueError)."""
    exclude = np.asarray(list(exclude), dtype=np.int64) if not isinstance(exclude, np.ndarray) else exclude
    if exclude.size:
        if not np.issubdtype(exclude.dtype, np.integer):
            raise ValueError(f"exclude must hold integer row positions, got {exclude.dtype}")
        if exclude.min() < 0 or exclude.max() >= num_rows:
            raise ValueError(f"exclude holds positions outside 0..{num_rows - 1}")
        if len(np.unique(exclude)) != len(exclude):
            raise ValueError("exclude names a row more than once")
    keep = np.ones(num_rows, dtype=bool)
    keep[exclude.astype(np.int64)] = False
    return np.flatnonzero(keep)


def site_features(extractor, data, positions: np.ndarray) -> np.ndarray:
    """φ [len(positions), p] float32 of the site's rows at local ``positions``."""
    cache = _phi_cache(extractor, data)
    if cache is not None:
        return cache.features(extractor, data.indices[positions])
    ids = np.asarray(data.indices)[positions]  # data-set rows: their batch positions (compute's rule)
    if isinstance(data.inputs, Tensor):  # preprocessed images: no token cache at this site
        return extractor.compute(data.inputs[positions], batch_size=BATCH_SIZE, tokens=False, ids=ids)
    return extractor.compute(_Rows(data.inputs, positions), batch_size=BATCH_SIZE, ids=ids)


def site_statistics(extractor, data, num_classes: int, exclude: Iterable[int] = (), *,
                    chunk_rows: int = CHUNK_ROWS) -> SufficientStats:
    """The SufficientStats of a site's rows (a client.site.SiteData) minus the local row
    positions ``exclude`` (samples the site forgets), on the extractor's fixed-point grid.

    Computed in chunks of ``chunk_rows`` rows and summed (integer sums: the same bits as one pass),
    which bounds the float32 φ and float64 products held at once.
    """
    spec = extractor.spec
    positions = keep_positions(data.num_examples, exclude)
    total = SufficientStats.zeros(extractor.dim, num_classes, spec.clip_norm, spec.frac_bits)
    for start in range(0, len(positions), chunk_rows):
        chunk = positions[start:start + chunk_rows]
        phi = site_features(extractor, data, chunk)
        total = total + features_statistics(phi, np.asarray(data.labels)[chunk], num_classes,
                                            spec.clip_norm, spec.frac_bits)
    return total


def site_quantized_rows(extractor, data, exclude: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(q int32 [n, p], labels [n]) of a site's rows minus ``exclude``: the integers its statistics
    are sums of (the row form, tangent/exact_head/row_form.py)."""
    spec = extractor.spec
    positions = keep_positions(data.num_examples, exclude)
    q = np.empty((len(positions), extractor.dim), dtype=np.int32)
    for start in range(0, len(positions), CHUNK_ROWS):
        chunk = positions[start:start + CHUNK_ROWS]
        q[start:start + len(chunk)] = quantize(site_features(extractor, data, chunk), spec.clip_norm, spec.frac_bits)
    return q, np.asarray(data.labels)[positions]


def stats_form(node_config, num_rows: int, num_features: int, num_classes: int) -> str:
    """The form this site sends its statistics in: node config ``stats-form`` = ``"auto"``
    (default: the smaller one, tangent.exact_head.row_form.smaller_form) or ``"gram"`` (the site
    insists: the server never sees single rows) or ``"rows"``. Anything else: SiteError."""
    from client.site import SiteError
    from tangent.exact_head.row_form import FORMS, smaller_form

    wanted = str(node_config.get("stats-form", "auto") or "auto").strip().lower()
    if wanted == "auto":
        return smaller_form(num_rows, num_features, num_classes)
    if wanted not in FORMS:
        raise SiteError("bad_node_config", f"stats-form must be auto, rows or gram, got {wanted[:40]!r}")
    return wanted


def features_statistics(phi: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float,
                        frac_bits: int) -> SufficientStats:
    """SufficientStats.from_features(...) — the same integers — with the Gram matrix computed
    straight into its packed upper triangle (SufficientStats.from_rows): from_features' three p×p
    arrays (≈ 300 MiB at p = 3,584) would sit on top of a Ray worker's training peak (measured:
    +309 MiB peak RSS per site)."""
    labels = np.asarray(labels)
    if labels.shape != (len(phi),) or (len(labels) and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"need {len(phi)} labels in [0, {num_classes})")
    return SufficientStats.from_rows(quantize(phi, clip_norm, frac_bits), labels, num_classes, clip_norm, frac_bits)


def _phi_cache(extractor, data) -> PhiCache | None:
    """The φ cache of the site's data set, if the driver (or the site) built one."""
    directory, images_digest = getattr(data, "cache_dir", None), getattr(data, "images_digest", None)
    if directory is None or images_digest is None:
        return None
    return PhiCache.open(directory, extractor.digest(), images_digest)


class _Rows:
    """Some rows of a TokenDataset, indexable by position arrays (FeatureExtractor.compute reads
    them batch by batch, so the site's tokens are never all in memory)."""

    def __init__(self, rows, positions: np.ndarray):
        self.rows, self.positions = rows, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index):
        return self.rows[self.positions[index]]
