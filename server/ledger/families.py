"""Model families: what one contribution is, how it enters the exact sums, what the composed model is.

The ledger's machinery (transactions, audit chain, signed heads, erasure, verification) is the
same for every family whose aggregate is a sum; only these parts differ:

- ``arrays``: read and type-check an untrusted contribution;
- ``check``: family-specific value checks (range, bounds), returning a norm for the record;
- ``encode`` / ``decode``: the stored bytes of one contribution;
- ``quantize``: the contribution as exact integer limbs for :class:`Accumulators`;
- ``weight``: its weight in the sum;
- ``compose`` / ``digest``: the composed model from the sums, and its digest.

Families:

- ``"delta"`` — a TAFT Δw (float32), the weighted mean ``Σ wᵢΔᵢ / Σ wᵢ`` on the 2^-32 grid of
  :mod:`server.ledger.fixedpoint`;
- ``"stats"`` — exact-head sufficient statistics (:class:`tangent.exact_head.statistics.SufficientStats`,
  int64 arrays ``n, counts, sums, gram, cross``); weight 1, the composed model is the exact int64
  sum of the active sites' statistics. A site's statistics may also come as its quantized rows
  (the row form), formed into the same integers on arrival and stored as the smaller form
  (:mod:`server.ledger.stats_forms`).

Stored bytes are compressed, losslessly (:mod:`server.ledger.blobs`).

A ledger pins its family (and, for ``"stats"``, the model card) in its ``meta`` table when it is
created; a ledger without a ``family`` entry predates families and is ``"delta"``.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from server.ledger import blobs, fixedpoint, stats_forms, validation
from server.ledger.accumulators import Accumulators, ExactIntegers, Quantized, arrays_digest, quantize
from server.ledger.records import LedgerError, RejectedContribution, canonical_json
from tangent.exact_head.statistics import row_norm_bound
from tangent.exact_head.stats_file import safetensors_metadata

FAMILIES = ("delta", "stats")
INT64_MAX = int(np.iinfo(np.int64).max)
STATS_ARRAYS = ("counts", "cross", "gram", "n", "sums")
_LO_BITS = fixedpoint.FRAC_BITS  # the accumulators' limb split: exact sums are hi·2**32 + lo


class DeltaFamily:
    """A TAFT Δw: float32 arrays, weighted mean on the fixed-point grid (today's ledger)."""

    name = "delta"
    model_card = None
    bounded_total = False  # fixedpoint's weight bounds keep every sum in range

    def settings(self) -> dict[str, Any]:
        return {}

    def arrays(self, contribution: Any) -> dict[str, np.ndarray]:
        return validation.arrays(contribution)

    def check(self, arrays: dict[str, np.ndarray], num_examples: int, columns: dict, max_delta_norm) -> float:
        return validation.values(arrays, max_delta_norm)

    def encode(self, arrays: Mapping[str, np.ndarray], site_id: str, site_version: int) -> bytes:
        """Content only: the same Δ sent twice has the same sha256, which the ledger refuses as a
        duplicate. A tensor whose every bit is clear (+0.0 throughout) is named with its shape in
        the header instead of stored: the guard leaves a 60-image site's Δ non-zero only in the
        head, and zlib spent 53 ms on the other 7 MB of zeros of every reply."""
        zero = {name: list(a.shape) for name, a in arrays.items() if not a.view(np.uint32).any()}
        kept = {name: a for name, a in sorted(arrays.items()) if name not in zero}
        metadata = {ZERO_TENSORS_KEY: canonical_json(zero)} if zero else None
        return blobs.pack(safetensors.numpy.save(kept, metadata=metadata))

    def decode(self, blob: bytes, expand: bool = True) -> dict[str, np.ndarray]:
        """The arrays :meth:`encode` was given, bit for bit (zero tensors rebuilt from the header;
        ``expand`` is for the statistics' row form, which a Δ has not)."""
        data = blobs.unpack(blob)
        arrays = safetensors.numpy.load(data)
        zero = safetensors_metadata(data).get(ZERO_TENSORS_KEY)
        if zero is not None:
            arrays |= _zero_tensors(zero, arrays.keys())
        return arrays

    def quantize(self, arrays: Mapping[str, np.ndarray]) -> Quantized:
        return quantize(arrays)

    def weight(self, num_examples: int, weighting: str) -> int:
        return num_examples if weighting == "examples" else 1

    def compose(self, acc: Accumulators, total_weight: int) -> dict[str, np.ndarray]:
        return acc.compose(total_weight)

    def digest(self, composed: Mapping[str, np.ndarray]) -> str:
        return arrays_digest(composed)


#: safetensors metadata of a stored Δ: {name: shape} of its tensors that are all +0.0, left out of its bytes
ZERO_TENSORS_KEY = "zero-tensors"


def _zero_tensors(spec: str, stored: Collection[str]) -> dict[str, np.ndarray]:
    """The zero tensors a stored Δ's header names; ValueError for a header no ledger writes (a
    name also stored, a shape that is not a list of sizes, more entries than a blob may inflate to)."""
    try:
        shapes = json.loads(spec)
    except (ValueError, RecursionError):
        raise ValueError("the zero tensors' header is not JSON") from None
    if not isinstance(shapes, dict) or shapes.keys() & set(stored):
        raise ValueError("the zero tensors' header is not a map of tensors not stored")
    entries = 0
    for shape in shapes.values():
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError("a zero tensor's shape is not a list of sizes")
        entries += math.prod(shape)
    if entries * 4 > blobs.MAX_INFLATED:
        raise ValueError(f"the zero tensors would take more than {blobs.MAX_INFLATED} bytes")
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}


def stats_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over a family tag, then names, shapes and int64 little-endian bytes in name order."""
    h = hashlib.sha256(b"taft-stats-v1\0")
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name], dtype="<i8")
        h.update(canonical_json([name, list(a.shape)]).encode())
        h.update(a.reshape(-1).data)  # the contiguous bytes, without a copy
    return h.hexdigest()


def magnitude(a: np.ndarray) -> int:
    """max |a| as a Python int (np.abs(int64 min) would wrap to a negative number)."""
    if not a.size:
        return 0
    return max(abs(int(a.min())), abs(int(a.max())))


def check_model_card(card: Any) -> dict[str, Any]:
    """The card in its canonical JSON form, or LedgerError naming what is missing."""
    if not isinstance(card, Mapping):
        raise LedgerError("a stats ledger needs a model_card mapping")
    try:
        card = json.loads(canonical_json(card))
    except (TypeError, ValueError) as e:
        raise LedgerError(f"model_card is not JSON: {e}") from None
    meta = card.get("stats-meta")
    if not isinstance(meta, dict) or set(meta) != {"num-features", "num-classes", "clip-norm", "frac-bits"}:
        raise LedgerError("model_card['stats-meta'] must be SufficientStats.meta() "
                          "(num-features, num-classes, clip-norm, frac-bits)")
    p, k, b, c = meta["num-features"], meta["num-classes"], meta["frac-bits"], meta["clip-norm"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (p, k, b)) or p < 1 or k < 2 or not 1 <= b <= 24:
        raise LedgerError(f"model_card['stats-meta'] has impossible sizes: {meta}")
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not (math.isfinite(c) and c > 0):
        raise LedgerError(f"model_card['stats-meta']['clip-norm'] must be > 0, got {c!r}")
    if not isinstance(card.get("feature-digest"), str) or not card["feature-digest"]:
        raise LedgerError("model_card['feature-digest'] must be the FeatureExtractor digest (a string)")
    for key in ("feature-spec", "model-spec"):
        if not isinstance(card.get(key), dict):
            raise LedgerError(f"model_card[{key!r}] must be a mapping")
    return card


class StatsFamily:
    """Exact-head sufficient statistics: int64 arrays, weight 1, exact integer sums.

    Each int64 entry v goes into the two-limb accumulators as ``q_hi = v >> 32``,
    ``q_lo = v & (2**32 − 1)`` with weight ±1, so ``S = hi·2**32 + lo`` is the exact integer sum and
    the canonical form (0 ≤ lo < 2**32) makes equal sums equal bytes. Limb bounds (fixedpoint's
    overflow argument with |q_hi| ≤ 2**31 instead of 2**8): ``|q_lo·w| < 2**32`` and the ledger
    admits a contribution only while Σ over the active ones of max|entry| ≤ 2**63 − 1
    (``total_overflow`` otherwise). Then *every* partial sum — in any order of adds and removals,
    and in verify's rebuild — fits int64, so ``hi = floor(S / 2**32)`` stays within ±2**31,
    the intermediate ``hi + q_hi`` within ±2**32 and ``lo`` within (−2**32, 2**33) before the carry:
    nothing can wrap, and ``(hi << 32) + lo`` is the exact int64 sum.
    """

    name = "stats"
    bounded_total = True

    def __init__(self, model_card: Mapping[str, Any]):
        self.model_card = check_model_card(model_card)
        meta = self.model_card["stats-meta"]
        self.num_features, self.num_classes = meta["num-features"], meta["num-classes"]
        self.frac_bits = meta["frac-bits"]
        p, k = self.num_features, self.num_classes
        self.shapes = {"n": [1], "counts": [k], "sums": [p], "gram": [p * (p + 1) // 2], "cross": [p, k]}

    def settings(self) -> dict[str, Any]:
        """Pinned at creation: the card, the array spec and the feature digest as base digest."""
        return {"model_card": self.model_card, "key_spec": self.shapes,
                "base_digest": self.model_card["feature-digest"], "weighting": "uniform"}

    def arrays(self, contribution: Any) -> dict[str, np.ndarray]:
        if stats_forms.accepts(contribution):  # the row form: expanded here, stored as the smaller form
            return stats_forms.expand(contribution, self.model_card["stats-meta"])
        return validation.arrays(contribution, dtype=np.int64)

    def check(self, arrays: dict[str, np.ndarray], num_examples: int, columns: dict, max_delta_norm) -> float:
        missing, extra = sorted(self.shapes.keys() - arrays.keys()), sorted(arrays.keys() - self.shapes.keys())
        if missing:
            raise RejectedContribution("missing_keys", ", ".join(missing))
        if extra:
            raise RejectedContribution("extra_keys", ", ".join(extra))
        for name, shape in self.shapes.items():
            if list(arrays[name].shape) != shape:
                raise RejectedContribution("wrong_shape", f"{name}: {tuple(arrays[name].shape)}, expected {tuple(shape)}")
        if columns.get("epsilon") is not None:
            pass  # a DP release: its noise may break the exact checks
        elif type(arrays) is stats_forms.RowStats:
            # formed on this server from rows checked on the clip ball (stats_of_rows): every sum
            # of such rows passes _check_exact by construction, so only the count is left to check
            if int(arrays["n"][0]) != num_examples:
                raise RejectedContribution("stats_out_of_bounds", f"n = {int(arrays['n'][0])}, but "
                                                                  f"num_examples = {num_examples}")
        else:  # exact statistics: every impossible value is refused
            self._check_exact(arrays, num_examples)
        squares = 0.0
        for a in arrays.values():
            values = a.astype(np.float64).reshape(-1)
            squares += float(values @ values)
        return math.sqrt(squares)

    def _check_exact(self, a: dict[str, np.ndarray], num_examples: int) -> None:
        """Refuse statistics that no data set of n examples on this grid can have.

        Every row q of an honest site has |q_i| ≤ 2^b and ‖q‖ ≤ R (:func:`row_norm_bound`), its
        label is one class. So, in exact integer arithmetic: the counts are ≥ 0 and sum to n; a
        class with count_c examples has |B_ic| ≤ count_c·2^b (an empty class has B_:c = 0) and
        ‖B_:c‖² ≤ count_c²·R²; |s_i| ≤ n·2^b, |G_ij| ≤ n·2^2b, 0 ≤ G_ii and trace(G) ≤ n·R²;
        Σ_c B_ic = s_i (one-hot labels); and Cauchy–Schwarz ties the sums to the Gram matrix:
        s_i² ≤ n·G_ii, Σ_c ⌊B_ic²/count_c⌋ ≤ G_ii (per class, (Σ_{x∈c} q_i)² ≤ count_c·Σ_{x∈c} q_i²),
        ‖s‖² ≤ n·trace(G) and G_ij² ≤ G_ii·G_jj. The noise of a DP release may break these, so they
        apply only to non-DP contributions. A site can still send *consistent* statistics of data it
        made up or relabelled: no check on the numbers alone refuses those (see the README's
        threat model: the bound on what one site moves, and the quarantine option).
        """
        n = int(a["n"][0])
        b, p = self.frac_bits, self.num_features
        unit, unit2, row2 = 2 ** b, 2 ** (2 * b), row_norm_bound(p, b) ** 2
        counts = [int(c) for c in a["counts"]]

        def refuse(detail: str):
            raise RejectedContribution("stats_out_of_bounds", detail)

        def inconsistent(detail: str):
            raise RejectedContribution("stats_inconsistent", detail)

        if n != num_examples:
            refuse(f"n = {n}, but num_examples = {num_examples}")
        if min(counts) < 0 or sum(counts) != n:
            refuse(f"class counts {counts[:20]} are not non-negative with sum n = {n}")
        for name, bound in (("sums", n * unit), ("gram", n * unit2)):
            if magnitude(a[name]) > bound:
                refuse(f"{name}: |entry| {magnitude(a[name])} > {bound} (n·2^{b if name != 'gram' else 2 * b})")
        for c, count in enumerate(counts):
            if magnitude(a["cross"][:, c]) > count * unit:
                refuse(f"cross of class {c}: |entry| {magnitude(a['cross'][:, c])} > count·2^{b} = {count * unit}")
        diagonal = [int(v) for v in a["gram"][_diagonal_index(p)]]
        if min(diagonal) < 0:
            refuse("a diagonal entry of the Gram matrix is negative")
        trace = sum(diagonal)
        if trace > n * row2:
            refuse(f"trace of the Gram matrix {trace} > n·R² = {n * row2} (every row has ‖q‖ ≤ R)")
        # Σ_c B_ic = Σ_x q_i Σ_c y_c = s_i for one-hot labels; |B| ≤ n·2^b keeps the row sums exact
        if not np.array_equal(a["cross"].sum(axis=1, dtype=np.int64), a["sums"]):
            inconsistent("the rows of cross do not sum to sums (labels are not one-hot)")
        # Python integers from here: squares of entries up to 2^63 are exact
        sums = a["sums"].astype(object)
        cross = a["cross"].astype(object)
        gram_diagonal = np.array(diagonal, dtype=object)
        if (sums * sums > n * gram_diagonal).any():
            inconsistent("s_i² > n·G_ii for some feature i (Cauchy–Schwarz)")
        if sum(int(v) ** 2 for v in a["sums"]) > n * trace:
            inconsistent("‖s‖² > n·trace(G) (Cauchy–Schwarz)")
        within = np.zeros(p, dtype=object)
        for c, count in enumerate(counts):
            if count == 0:
                continue  # B_:c = 0 was checked above
            column = cross[:, c]
            squares = column * column
            if sum(squares) > count * count * row2:
                inconsistent(f"‖B_:{c}‖² > count²·R² for class {c}")
            within += squares // count
        if (within > gram_diagonal).any():
            inconsistent("Σ_c B_ic²/count_c > G_ii for some feature i (Cauchy–Schwarz per class)")
        if not _gram_minors_hold(a["gram"], p):
            inconsistent("G_ij² > G_ii·G_jj for some pair i, j (the Gram matrix is not PSD)")

    def encode(self, arrays: Mapping[str, np.ndarray], site_id: str, site_version: int) -> bytes:
        return stats_forms.encode(arrays, self.model_card["stats-meta"], site_id, site_version)

    def decode(self, blob: bytes, expand: bool = True) -> dict[str, np.ndarray]:
        """The Gram form's arrays; a row form as stored when ``expand`` is False."""
        return stats_forms.decode(blob, self.model_card["stats-meta"], expand)

    def quantize(self, arrays: Mapping[str, np.ndarray]) -> Quantized:
        """The exact integers themselves (no copy for int64 arrays): split into limbs as they are added."""
        return {name: ExactIntegers(np.asarray(a, dtype=np.int64).ravel()) for name, a in arrays.items()}

    def weight(self, num_examples: int, weighting: str) -> int:
        return 1

    def compose(self, acc: Accumulators, total_weight: int) -> dict[str, np.ndarray]:
        return acc.exact_sums(_LO_BITS)

    def digest(self, composed: Mapping[str, np.ndarray]) -> str:
        return stats_digest(composed)

    @staticmethod
    def magnitudes(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
        return {name: magnitude(a) for name, a in arrays.items()}


# relative margin of the float64 test of G_ij² ≤ G_ii·G_jj: far above float64's rounding (2^-52 per
# operation, a few operations), far below anything that moves a ridge solution
MINOR_MARGIN = 1e-9


def _gram_minors_hold(packed: np.ndarray, p: int) -> bool:
    """G_ij² ≤ G_ii·G_jj for every pair (every 2×2 principal minor of a PSD matrix is ≥ 0), tested in
    float64 with a relative margin (never refuses a true Gram matrix), one packed row at a time."""
    diagonal = packed[_diagonal_index(p)].astype(np.float64)
    start = 0
    for i in range(p):
        row = packed[start:start + p - i].astype(np.float64)
        start += p - i
        if (row * row > diagonal[i] * diagonal[i:] * (1 + MINOR_MARGIN)).any():
            return False
    return True


def _diagonal_index(p: int) -> np.ndarray:
    """Positions of G_ii in the packed upper triangle (row i starts at i·p − i(i−1)/2)."""
    i = np.arange(p, dtype=np.int64)
    return i * p - i * (i - 1) // 2


def make(family: str, model_card: Mapping[str, Any] | None):
    if family == "delta":
        if model_card is not None:
            raise LedgerError("a model_card belongs to a stats ledger, not a delta ledger")
        return DeltaFamily()
    if family == "stats":
        return StatsFamily(model_card)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def of_meta(meta: Mapping[str, Any]):
    """The family a ledger's meta table records ("delta" when it records none: older ledgers)."""
    return make(meta.get("family", "delta"), meta.get("model_card"))
