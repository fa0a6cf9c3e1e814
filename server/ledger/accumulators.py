"""Exact integer sums of named float32 arrays (any model family whose aggregate is a weighted sum).

``Accumulators`` holds, per tensor name, ``S = Σ wᵢ·qᵢ`` on the fixed-point grid of
:mod:`server.ledger.fixedpoint` as two int64 limbs. Adding and subtracting are exact integer operations,
so the bytes (:meth:`Accumulators.encoded`) depend only on *which* contributions are in, never on
the order, and subtracting one leaves exactly the bytes of never having added it. A TAFT Δw is one
such mapping; additive sufficient statistics (n, Σφ, Σφφᵀ, …) are another.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from server.ledger import fixedpoint
from server.ledger.records import canonical_json


@dataclass(frozen=True)
class ExactIntegers:
    """A tensor of exact int64 values on the grid, added as it is: its limbs are split chunk by chunk
    while it is accumulated (fixedpoint.accumulate_integers), so a statistics add never holds a
    second copy of a 4.7 M-entry Gram as limbs (75 MB)."""
    values: np.ndarray  # flat int64


#: per tensor name its limbs ``(q_hi, q_lo)`` or its exact integers, or None for a tensor that is all
#: zero (it adds nothing)
Quantized = dict[str, tuple[np.ndarray, np.ndarray] | ExactIntegers | None]


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 little-endian bytes, in name order.

    Independent of any file format, so digests of composed Δs stay comparable across library
    versions.
    """
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<f4")
        h.update(canonical_json([name, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def quantize(arrays: Mapping[str, np.ndarray]) -> Quantized:
    """Each array on the fixed-point grid, as limbs (None where it is all zero: a 60-image site's
    Δ is non-zero only in the head, 3,850 of 1,779,082 entries); values must be finite and in range."""
    return {name: fixedpoint.quantize(a) if a.any() else None for name, a in arrays.items()}


class Accumulators:
    """Per tensor name: its shape and the exact sum as (hi, lo) int64 limbs."""

    def __init__(self, tensors: dict[str, tuple[list[int], np.ndarray, np.ndarray]]):
        self._tensors = tensors
        #: the names whose sums changed since the last :meth:`take_changed` (the stored bytes of
        #: the others are still right: the ledger rewrites only these)
        self._changed: set[str] = set()

    @classmethod
    def zeros(cls, spec: Mapping[str, Iterable[int]]) -> "Accumulators":
        return cls({name: (list(shape), *fixedpoint.zeros(math.prod(shape))) for name, shape in spec.items()})

    @classmethod
    def decode(cls, rows: Iterable[tuple[str, list[int], bytes]]) -> "Accumulators":
        """From ``(name, shape, encoded bytes)`` rows as :meth:`encoded` wrote them."""
        return cls({name: (list(shape), *fixedpoint.decode(data, math.prod(shape))) for name, shape, data in rows})

    def add(self, quantized: Quantized, weight: int) -> None:
        """In place ``S += weight · q`` for every tensor; a negative weight subtracts. An all-zero
        tensor (None) leaves its sum as it is, bit for bit what adding zeros would leave."""
        for name, (_, hi, lo) in self._tensors.items():
            q = quantized[name]
            if q is None:
                continue
            if isinstance(q, ExactIntegers):
                fixedpoint.accumulate_integers(hi, lo, q.values, weight)
            else:
                fixedpoint.accumulate(hi, lo, *q, weight)
            self._changed.add(name)

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(shape) for name, (shape, _, _) in self._tensors.items()}

    def take_changed(self) -> set[str]:
        """The names changed since the last call (all of them after :meth:`add_arrays`)."""
        changed, self._changed = self._changed, set()
        return changed

    def limbs(self) -> Quantized:
        """The sums as ``(hi, lo)`` limbs, views: ``other.add(self.limbs(), 1)`` adds these sums to
        ``other`` exactly (``lo`` is canonical, so the carry is that of any quantized array)."""
        return {name: (hi, lo) for name, (_, hi, lo) in self._tensors.items()}

    def add_arrays(self, arrays: Mapping[str, np.ndarray], weight: int) -> None:
        for name, (_, hi, lo) in self._tensors.items():
            fixedpoint.accumulate(hi, lo, *fixedpoint.quantize(arrays[name]), weight)
            self._changed.add(name)

    def compose(self, total_weight: int) -> dict[str, np.ndarray]:
        """The float32 weighted mean ``S / W`` per tensor (zeros while ``W`` is 0)."""
        return {name: fixedpoint.compose(hi, lo, total_weight).reshape(shape)
                for name, (shape, hi, lo) in self._tensors.items()}

    def exact_sums(self, lo_bits: int) -> dict[str, np.ndarray]:
        """The exact integer sums ``hi·2**lo_bits + lo`` as int64 arrays; the caller guarantees
        they fit (the stats family bounds them, see server.ledger.families.StatsFamily)."""
        sums = {}
        for name, (shape, hi, lo) in self._tensors.items():
            total = hi << lo_bits
            total += lo  # in place: one 38 MB temporary fewer for a 3,072-feature Gram
            sums[name] = total.reshape(shape)
        return sums

    def encoded(self) -> dict[str, bytes]:
        """The canonical bytes of each sum: equal sums give equal bytes."""
        return {name: bytes(fixedpoint.encode(hi, lo)) for name, (_, hi, lo) in self._tensors.items()}

    def encoded_views(self, names: Iterable[str] | None = None) -> dict[str, memoryview]:
        """:meth:`encoded` without the copy, of ``names`` (default: all)."""
        names = self._tensors.keys() if names is None else names
        return {name: fixedpoint.encode(*self._tensors[name][1:]) for name in names}

    def digest(self) -> str:
        """sha256 over the canonical bytes in name order."""
        h = hashlib.sha256()
        encoded = self.encoded_views()
        for name in sorted(encoded):
            h.update(encoded[name])
        return h.hexdigest()
