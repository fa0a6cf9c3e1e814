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

from tangent.exact_head.statistics import FLOAT64_EXACT, SufficientStats, exact_cross, quantize, triu_size
from tangent.exact_head.phi_cache import BATCH_SIZE, CHUNK_ROWS, PhiCache

#: rows of G computed per float64 product (bounds the temporary to GRAM_BLOCK × p float64)
GRAM_BLOCK = 256


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


def features_statistics(phi: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float,
                        frac_bits: int) -> SufficientStats:
    """SufficientStats.from_features(...) — the same integers — with the Gram matrix computed
    straight into its packed upper triangle, GRAM_BLOCK rows at a time.

    from_features builds the full p×p matrix as float64, then int64, then packs it: three p×p
    arrays (≈ 300 MiB at p = 3,584) on top of a Ray worker's training peak (measured: +309 MiB
    peak RSS per site). Here the only large array is the packed int64 result (p(p+1)/2), and only
    the upper triangle is multiplied. Every float64 product is of at most 2^(53−2b) rows of
    integers |q| ≤ 2^b, so each entry is an exact integer (tangent/exact_head/statistics.py's bound)."""
    q = quantize(phi, clip_norm, frac_bits)
    labels = np.asarray(labels)
    n, p = q.shape
    if labels.shape != (n,) or (n and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f"need {n} labels in [0, {num_classes})")
    exact_rows = max(1, FLOAT64_EXACT // 2 ** (2 * frac_bits))
    gram = np.zeros(triu_size(p), dtype=np.int64)
    for start in range(0, n, exact_rows):
        rows = q[start:start + exact_rows].astype(np.float64)
        offset = 0
        for i0 in range(0, p, GRAM_BLOCK):
            i1 = min(p, i0 + GRAM_BLOCK)
            block = rows[:, i0:i1].T @ rows[:, i0:]  # G[i0:i1, i0:], integer-valued
            for r in range(i1 - i0):
                width = p - i0 - r
                gram[offset:offset + width] += block[r, r:].astype(np.int64)
                offset += width
    return SufficientStats(p, num_classes, float(clip_norm), int(frac_bits), int(n),
                           np.bincount(labels, minlength=num_classes).astype(np.int64),
                           q.sum(axis=0, dtype=np.int64), gram, exact_cross(q, labels, num_classes))


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
