"""An exactly composable head: ridge regression on frozen features from summed integer statistics.

A site's sufficient statistics over its examples (φ from tangent/exact_head/features.py, y one-hot):

    n = #examples, c = Σ y (class counts), s = Σ φ, G = Σ φφᵀ (upper triangle), B = Σ φ yᵀ.

Everything the head needs — mean, standardization, intercept, ridge solution, the λ rule — is a
function of the *sums* of these over sites, never of one site's data.

Exactness. φ is clipped to ‖φ‖ ≤ C and put on a fixed-point grid: q = round(φ·2^b/C) (round half
to even, in float64), an integer vector with |q_i| ≤ 2^b (|φ_i| ≤ ‖φ‖ ≤ C). The statistics are
kept as integers: s = Σ q, G = Σ q qᵀ, B = Σ q yᵀ (units C·2^-b and C²·2^-2b). Integer addition
is associative and commutative, so the sum over any partition of the examples into sites, in any
order, is the statistics of the union *bit for bit*; removing a site, or forgetting samples,
subtracts the same integers and leaves exactly the statistics of the rest.

Bounds (why int64 never overflows and why the float64 products are exact):
- each product |q_i q_j| ≤ 2^2b, so over n examples |G_ij| ≤ n·2^2b and |s_i|, |B_ic| ≤ n·2^b;
- int64 holds |x| ≤ 2^63 − 1: the statistics of up to n ≤ N_max = ⌊(2^63 − 1) / 2^2b⌋ examples
  (b = 16: N_max = 2^31 − 1) are exact; :meth:`SufficientStats.__add__` checks the actual
  magnitudes before adding (DP noise can exceed the n-bound), so an overflow raises instead of
  wrapping;
- G is computed by float64 BLAS on chunks of m rows: every partial sum in any summation order is
  an integer of magnitude ≤ m·2^2b, and float64 represents all integers up to 2^53 exactly, so with
  m ≤ 2^(53 − 2b) (b = 16: 2^21 rows) the product is the exact integer whatever the BLAS does;
  chunks are then added in int64.

Ridge: with μ = s/n, G_c = G − n μμᵀ, B_c = B − μ cᵀ and (optionally) per-coordinate scale
σ_i = √(G_c,ii/n), the problem is W_s = (G_s + λI)⁻¹ B_s (G_s = G_c/σσᵀ, B_s = B_c/σ), W = W_s/σ
and the intercept b = c/n − μᵀW. Default: no standardization (σ = 1): tangent/exact_head/features.py already
puts every piece on a public common scale, and standardizing did not help on held-out training
images (docs/exact_head.md, ablation). λ is chosen by generalized cross-validation computed from
the sums alone through the eigendecomposition G_s = U D Uᵀ (B̃ = Uᵀ B_s):

    RSS(λ) = tr(Y_cᵀY_c) − Σ_kc B̃_kc² (d_k + 2λ) / (d_k + λ)²,   Y_cᵀY_c = diag(c) − c cᵀ/n,
    df(λ)  = Σ_k d_k / (d_k + λ),     GCV(λ) = n·RSS(λ) / (n − df(λ))².

The RSL target κ·onehot (tangent/training/losses.py, α = 1) only scales B and c by κ: W scales by κ and
the predicted class is unchanged, so it needs no statistics of its own (α ≠ 1 would weight each
output differently per class and need one Gram matrix per class: not done).

DP (sufficient-statistics perturbation): for x = [q·2^-b (‖·‖ ≤ R), 1] (the grid unit, C, is
factored out: R = 1 + √p·2^-(b+1) bounds the rounded row) and y one-hot, the release
(triu(x xᵀ), x yᵀ) — that is (G, s, n, B, c) up to known scales — changes under adding or removing
one example by at most Δ₂ = √(R⁴ + 2R² + 2) in L2: ‖triu(xxᵀ)‖² = (‖x‖⁴ + Σx_i⁴)/2 ≤ R⁴ + R² + 1
(‖x‖² ≤ R² + 1, Σx_i⁴ ≤ R⁴ + 1) and ‖xyᵀ‖² = ‖x‖² ≤ R² + 1; attained by φ = R·e_i (Δ₂ = √5 at R = 1).
Gaussian noise N(0, σ²Δ₂²) is added once to every released entry (G's upper triangle, so its noise
is symmetric once mirrored) and the result rounded back onto the integer grid (post-processing).
σ for a target (ε, δ) comes from the *analytic Gaussian mechanism* (Balle & Wang, ICML 2018,
Theorem 8): the exact privacy profile of one Gaussian release, so ε is tight (tests cross-check it
against Opacus' PRV accountant for one full-batch step). The server projects the noisy G_s onto the
PSD cone (eigenvalues clipped at 0, post-processing) and uses λ > 0, so G_s + λI is positive
definite; λ is GCV on the noisy sums (a floor at the noise's spectral norm was measured and
lowered accuracy at ε = 3 and 8: not used). Summed releases keep their summed noise variance.

Over 500 lines: the statistics, their ridge solution and their DP release share the grid and the bounds
derived above; one module keeps the three on the same derivation.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from typing import Iterable, Optional

import numpy as np
from threadpoolctl import ThreadpoolController

INT64_MAX = np.iinfo(np.int64).max
FLOAT64_EXACT = 2 ** 53  # every integer of magnitude ≤ 2^53 is a float64
MEMORY_CHUNK_ROWS = 4096  # bounds the float64 copy of q (4096 × 5632 × 8 B = 185 MB)
#: rows of G computed per float64 product in :func:`packed_gram` (bounds its temporary to
#: GRAM_BLOCK × p float64)
GRAM_BLOCK = 256
#: below this many rows :func:`packed_gram` runs its products on one BLAS thread: a (256 × n)·(n × p)
#: product with a short inner dimension gains no wall time from a second thread, whose waiting
#: only burns CPU (measured at 60 rows, p = 3,072: 0.153 CPU s with OpenBLAS's two threads, 0.038
#: with one, the same wall time; at 1,200 rows two threads are 1.6× faster)
ONE_THREAD_ROWS = 512


class StatsError(ValueError):
    """Statistics that cannot be combined (other grid, other shape) or would overflow."""


# ------------------------------------------------------------------------------ quantization

def quantize(phi: np.ndarray, clip_norm: float, frac_bits: int) -> np.ndarray:
    """q = round(clip(φ)·2^b / C) as int32 [N, p]; rows with ‖φ‖ > C are scaled onto the sphere.

    float32 and float64 φ are both widened to float64 first (exactly), so the result depends only
    on the values. Non-finite features are refused.
    """
    phi = np.asarray(phi)
    if phi.ndim != 2:
        raise ValueError(f"features must be [N, p], got shape {phi.shape}")
    if not np.issubdtype(phi.dtype, np.floating):
        raise ValueError(f"features must be float32 or float64, got {phi.dtype}")
    x = phi.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    scale = np.where(norms > clip_norm, clip_norm / np.maximum(norms, 1e-300), 1.0)
    x *= (scale * (2.0 ** frac_bits / clip_norm))[:, None]
    # after clipping |x_i| ≤ 2^b up to one rounding of the product: clamp so the bound is exact
    q = np.clip(np.rint(x), -(2 ** frac_bits), 2 ** frac_bits)
    return q.astype(np.int32)


def row_norm_bound(p: int, frac_bits: int) -> int:
    """An integer R ≥ ‖q‖ for every quantized row (tangent.exact_head.statistics.quantize): the clipped
    row has ‖x‖ ≤ 2^b (up to float rounding, far below 1 for b ≤ 24) and rounding moves each of its p
    coordinates by at most 1/2, so ‖q‖ ≤ 2^b + √p/2 < 2^b + ⌈√p/2⌉ + 1; no row has more than
    √p·2^b either (|q_i| ≤ 2^b)."""
    half_sqrt_p = (math.isqrt(p - 1) + 2) // 2  # ≥ ⌈√p/2⌉
    return min(2 ** frac_bits + half_sqrt_p + 1, math.isqrt(p * 4 ** frac_bits) + 1)


def dequantize(q: np.ndarray, clip_norm: float, frac_bits: int) -> np.ndarray:
    return np.asarray(q, dtype=np.float64) * (clip_norm * 2.0 ** -frac_bits)


def max_examples(frac_bits: int) -> int:
    """Largest n whose statistics are guaranteed to fit int64 (|G_ij| ≤ n·2^2b)."""
    return INT64_MAX // (2 ** (2 * frac_bits))


def chunk_rows(frac_bits: int) -> int:
    """Rows per float64 product such that every partial sum is an integer ≤ 2^53 (exact)."""
    return max(1, FLOAT64_EXACT // (2 ** (2 * frac_bits)))


def exact_gram(q: np.ndarray, frac_bits: int) -> np.ndarray:
    """Σ q qᵀ over rows as exact int64 [p, p] (float64 BLAS on exactness-bounded chunks)."""
    q = np.asarray(q)
    n, p = q.shape
    out = np.zeros((p, p), dtype=np.int64)
    step = min(chunk_rows(frac_bits), MEMORY_CHUNK_ROWS)  # any smaller chunk stays exact
    for start in range(0, n, step):
        chunk = q[start:start + step].astype(np.float64)
        out += (chunk.T @ chunk).astype(np.int64)  # integer-valued, exact (see module docstring)
    return out


def exact_cross(q: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Σ q yᵀ for one-hot y as exact int64 [p, k]: per class, a column sum of integer rows."""
    out = np.zeros((q.shape[1], num_classes), dtype=np.int64)
    for c in range(num_classes):
        rows = q[labels == c]
        if len(rows):
            out[:, c] = rows.sum(axis=0, dtype=np.int64)
    return out


def packed_gram(q: np.ndarray, frac_bits: int) -> np.ndarray:
    """Σ q qᵀ straight into its packed upper triangle (int64 [p(p+1)/2]), GRAM_BLOCK rows of G
    at a time: the same integers as ``pack_triu(exact_gram(q))`` without the three p×p arrays
    that path holds (≈ 300 MiB at p = 3,584). Every float64 product is of at most 2^(53−2b) rows
    of integers |q| ≤ 2^b, so each entry is an exact integer (module docstring)."""
    q = np.asarray(q)
    n, p = q.shape
    gram = np.zeros(triu_size(p), dtype=np.int64)
    step = min(chunk_rows(frac_bits), MEMORY_CHUNK_ROWS)  # any smaller chunk stays exact
    with _blas_controller().limit(limits=1, user_api="blas") if n < ONE_THREAD_ROWS else nullcontext():
        _add_packed_blocks(gram, q, step)
    return gram


@cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()  # inspects the loaded BLAS libraries once


def _add_packed_blocks(gram: np.ndarray, q: np.ndarray, step: int) -> None:
    n, p = q.shape
    for start in range(0, n, step):
        rows = q[start:start + step].astype(np.float64)
        offset = 0
        for i0 in range(0, p, GRAM_BLOCK):
            i1 = min(p, i0 + GRAM_BLOCK)
            block = rows[:, i0:i1].T @ rows[:, i0:]  # G[i0:i1, i0:], integer-valued
            # rows i0..i1 of the packed triangle are contiguous, and a boolean mask reads the
            # block row by row: one copy instead of a Python loop over its rows
            upper = block[np.arange(p - i0)[None, :] >= np.arange(i1 - i0)[:, None]]
            gram[offset:offset + upper.size] += upper.astype(np.int64)
            offset += upper.size


def pack_triu(matrix: np.ndarray) -> np.ndarray:
    """Upper triangle, row by row: [G_00 … G_0,p-1, G_11 …] (p(p+1)/2 entries)."""
    p = matrix.shape[0]
    return np.concatenate([matrix[i, i:] for i in range(p)])


def unpack_triu(packed: np.ndarray, p: int, dtype=None) -> np.ndarray:
    """The symmetric [p, p] matrix of a packed upper triangle."""
    if packed.shape != (p * (p + 1) // 2,):
        raise StatsError(f"packed triangle of length {packed.shape} does not fit p = {p}")
    out = np.empty((p, p), dtype=dtype or packed.dtype)
    offset = 0
    for i in range(p):
        row = packed[offset:offset + p - i]
        out[i, i:] = row
        out[i:, i] = row
        offset += p - i
    return out


def triu_size(p: int) -> int:
    return p * (p + 1) // 2


# ------------------------------------------------------------------------------ statistics

@dataclass
class SufficientStats:
    """Integer sufficient statistics on one fixed-point grid (see the module docstring).

    ``gram`` is the packed upper triangle of Σ q qᵀ. ``dp`` records the (ε, δ, σ) of a DP release
    (None: exact, non-private).
    """

    num_features: int
    num_classes: int
    clip_norm: float
    frac_bits: int
    n: int
    counts: np.ndarray       # int64 [k]
    sums: np.ndarray         # int64 [p]
    gram: np.ndarray         # int64 [p(p+1)/2]
    cross: np.ndarray        # int64 [p, k]
    dp: Optional[dict] = field(default=None)

    # ---- construction
    @classmethod
    def zeros(cls, num_features: int, num_classes: int, clip_norm: float, frac_bits: int):
        return cls(num_features, num_classes, float(clip_norm), int(frac_bits), 0,
                   np.zeros(num_classes, np.int64), np.zeros(num_features, np.int64),
                   np.zeros(triu_size(num_features), np.int64),
                   np.zeros((num_features, num_classes), np.int64))

    @classmethod
    def from_quantized(cls, q: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float,
                       frac_bits: int) -> "SufficientStats":
        q = np.asarray(q)
        labels = np.asarray(labels)
        if q.ndim != 2 or labels.shape != (len(q),):
            raise ValueError(f"need q [N, p] and labels [N], got {q.shape} and {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, {num_classes})")
        if q.size and np.abs(q).max() > 2 ** frac_bits:
            raise StatsError(f"|q| exceeds 2^{frac_bits}: not on this grid")
        if len(q) > max_examples(frac_bits):
            raise StatsError(f"{len(q)} examples exceed the int64 bound {max_examples(frac_bits)}")
        return cls(q.shape[1], num_classes, float(clip_norm), int(frac_bits), int(len(q)),
                   np.bincount(labels, minlength=num_classes).astype(np.int64),
                   q.sum(axis=0, dtype=np.int64),
                   pack_triu(exact_gram(q, frac_bits)),
                   exact_cross(q, labels, num_classes))

    @classmethod
    def from_rows(cls, q: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float,
                  frac_bits: int) -> "SufficientStats":
        """:meth:`from_quantized`'s integers with the Gram matrix formed packed (:func:`packed_gram`):
        what a site computes, and what a server forms from a site's rows (row form)."""
        q, labels = np.asarray(q), np.asarray(labels)
        if q.ndim != 2 or labels.shape != (len(q),):
            raise StatsError(f"need q [N, p] and labels [N], got {q.shape} and {labels.shape}")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise StatsError(f"labels must be in [0, {num_classes})")
        if q.size and max(abs(int(q.min())), abs(int(q.max()))) > 2 ** frac_bits:
            raise StatsError(f"|q| exceeds 2^{frac_bits}: not on this grid")
        if len(q) > max_examples(frac_bits):
            raise StatsError(f"{len(q)} examples exceed the int64 bound {max_examples(frac_bits)}")
        return cls(q.shape[1], num_classes, float(clip_norm), int(frac_bits), int(len(q)),
                   np.bincount(labels, minlength=num_classes).astype(np.int64),
                   q.sum(axis=0, dtype=np.int64), packed_gram(q, frac_bits),
                   exact_cross(q, labels, num_classes))

    @classmethod
    def from_features(cls, phi: np.ndarray, labels: np.ndarray, num_classes: int, clip_norm: float,
                      frac_bits: int) -> "SufficientStats":
        return cls.from_quantized(quantize(phi, clip_norm, frac_bits), labels, num_classes,
                                  clip_norm, frac_bits)

    # ---- exact algebra
    def _check_compatible(self, other: "SufficientStats") -> None:
        mine = (self.num_features, self.num_classes, self.clip_norm, self.frac_bits)
        theirs = (other.num_features, other.num_classes, other.clip_norm, other.frac_bits)
        if mine != theirs:
            raise StatsError(f"statistics on different grids/shapes: {mine} vs {theirs}")

    def _combine(self, other: "SufficientStats", sign: int) -> "SufficientStats":
        self._check_compatible(other)
        arrays = {}
        for name in ("counts", "sums", "gram", "cross"):
            a, b = getattr(self, name), getattr(other, name)
            # |a ± b| ≤ max|a| + max|b|: refuse before int64 could wrap (python ints: no overflow)
            if a.size and int(np.abs(a).max()) + int(np.abs(b).max()) > INT64_MAX:
                raise StatsError(f"{name}: the sum could overflow int64")
            arrays[name] = a + b if sign > 0 else a - b
        dp = _merge_dp(self.dp, other.dp, sign)
        return SufficientStats(self.num_features, self.num_classes, self.clip_norm, self.frac_bits,
                               self.n + sign * other.n, dp=dp, **arrays)

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        return self._combine(other, +1)

    def __sub__(self, other: "SufficientStats") -> "SufficientStats":
        """Removal of a site or of forgotten samples' statistics."""
        out = self._combine(other, -1)
        if out.n < 0 and self.dp is None and other.dp is None:
            raise StatsError("removing more examples than the statistics hold")
        return out

    def __eq__(self, other) -> bool:
        if not isinstance(other, SufficientStats):
            return NotImplemented
        return (self.num_features == other.num_features and self.num_classes == other.num_classes
                and self.clip_norm == other.clip_norm and self.frac_bits == other.frac_bits
                and self.n == other.n
                and all(np.array_equal(getattr(self, k), getattr(other, k))
                        for k in ("counts", "sums", "gram", "cross")))

    @staticmethod
    def total(stats: Iterable["SufficientStats"]) -> "SufficientStats":
        stats = list(stats)
        if not stats:
            raise ValueError("no statistics to sum")
        out = stats[0]
        for s in stats[1:]:
            out = out + s
        return out

    # ---- transport
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named int64 arrays (for a Flower ArrayRecord / safetensors); the grid is in ``meta()``."""
        return {"n": np.array([self.n], np.int64), "counts": self.counts, "sums": self.sums,
                "gram": self.gram, "cross": self.cross}

    def meta(self) -> dict:
        return grid_meta(self.num_features, self.num_classes, self.clip_norm, self.frac_bits)

    @classmethod
    def from_arrays(cls, arrays: dict, meta: dict, dp: Optional[dict] = None) -> "SufficientStats":
        p, k = int(meta["num-features"]), int(meta["num-classes"])
        shapes = {"n": (1,), "counts": (k,), "sums": (p,), "gram": (triu_size(p),), "cross": (p, k)}
        got = {name: np.asarray(arrays[name]) for name in shapes if name in arrays}
        if set(got) != set(shapes) or set(arrays) != set(shapes):
            raise StatsError(f"statistics need exactly the arrays {sorted(shapes)}, got {sorted(arrays)}")
        for name, shape in shapes.items():
            if got[name].shape != shape or got[name].dtype != np.int64:
                raise StatsError(f"{name}: expected int64 {shape}, got {got[name].dtype} {got[name].shape}")
        return cls(p, k, float(meta["clip-norm"]), int(meta["frac-bits"]), int(got["n"][0]),
                   got["counts"], got["sums"], got["gram"], got["cross"], dp=dp)

    @property
    def nbytes(self) -> int:
        """Bytes as sent: every array is int64."""
        return sum(a.nbytes for a in self.to_arrays().values())

    # ---- real-valued views
    @property
    def unit(self) -> float:
        return self.clip_norm * 2.0 ** -self.frac_bits

    def real(self):
        """(n, counts, s, G, B) in feature units, float64 (G full symmetric)."""
        u = self.unit
        gram = unpack_triu(self.gram, self.num_features, dtype=np.float64) * (u * u)
        return (float(self.n), self.counts.astype(np.float64), self.sums * u, gram, self.cross * u)


def grid_meta(num_features: int, num_classes: int, clip_norm: float, frac_bits: int) -> dict:
    """The grid and shape keys that travel with statistics (``stats-meta``) and pin a stats ledger."""
    return {"num-features": int(num_features), "num-classes": int(num_classes),
            "clip-norm": float(clip_norm), "frac-bits": int(frac_bits)}


def _merge_dp(a: Optional[dict], b: Optional[dict], sign: int) -> Optional[dict]:
    """Releases and their noise variances add (and subtract exactly when a release is removed)."""
    if a is None and b is None:
        return None
    a, b = a or {}, b or {}
    return {"releases": a.get("releases", 0) + sign * b.get("releases", 0),
            "noise_variance": a.get("noise_variance", 0.0) + sign * b.get("noise_variance", 0.0)}


# ------------------------------------------------------------------------------ ridge head

DEFAULT_LAMBDA_GRID = tuple(float(x) for x in np.logspace(-9, 1, 61))  # × n


@dataclass
class RidgeHead:
    """scores = φ W + b, for φ on the statistics' grid (``predict`` clips and quantizes φ)."""

    weight: np.ndarray     # float64 [p, k]
    bias: np.ndarray       # float64 [k]
    lam: float
    clip_norm: float
    frac_bits: int
    gcv: dict = field(default_factory=dict)  # λ -> GCV score (the rule's curve)

    def scores(self, phi: np.ndarray) -> np.ndarray:
        x = dequantize(quantize(phi, self.clip_norm, self.frac_bits), self.clip_norm, self.frac_bits)
        return x @ self.weight + self.bias

    def predict(self, phi: np.ndarray) -> np.ndarray:
        return self.scores(phi).argmax(axis=1)


@dataclass
class Spectrum:
    """Eigendecomposition of the standardized centred Gram matrix, and what the solve reuses."""

    eigenvalues: np.ndarray  # d_k ≥ 0 (negative ones of a noisy G clipped: PSD projection)
    rotated: np.ndarray      # B̃ = Uᵀ B_s
    basis: np.ndarray        # U
    mean: np.ndarray         # μ
    scale: np.ndarray        # σ
    class_mean: np.ndarray   # c / n
    n: float
    yty: float               # tr(Y_cᵀ Y_c)


def spectrum(stats: SufficientStats, *, standardize: bool = False) -> Spectrum:
    """The O(p³) part of the solve, done once for every λ."""
    n, counts, s, gram, cross = stats.real()
    if n <= 1:
        raise StatsError(f"need at least 2 examples, have n = {n}")
    mean = s / n
    gram_c = gram - n * np.outer(mean, mean)
    cross_c = cross - np.outer(mean, counts)
    if standardize:
        var = np.diag(gram_c) / n
        # constant (or, after DP noise, non-positive) coordinates: keep unit scale
        scale = np.where(var > 1e-12, np.sqrt(np.maximum(var, 1e-12)), 1.0)
    else:
        scale = np.ones_like(mean)
    gram_s = gram_c / np.outer(scale, scale)
    cross_s = cross_c / scale[:, None]
    eigenvalues, basis = np.linalg.eigh(gram_s)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    yty = float(counts.sum() - counts @ counts / n)
    return Spectrum(eigenvalues, basis.T @ cross_s, basis, mean, scale, counts / n, n, yty)


def gcv_score(spec: Spectrum, lam: float) -> float:
    d = spec.eigenvalues
    shrink = (d + 2 * lam) / (d + lam) ** 2
    rss = spec.yty - float((spec.rotated ** 2 * shrink[:, None]).sum())
    df = float((d / (d + lam)).sum())
    return spec.n * max(rss, 0.0) / max(spec.n - df, 1e-12) ** 2


def head_from_spectrum(spec: Spectrum, lam: float, clip_norm: float, frac_bits: int,
                       gcv: Optional[dict] = None) -> RidgeHead:
    if not lam > 0:
        raise ValueError(f"λ must be > 0 (keeps G_s + λI positive definite), got {lam}")
    weight_s = spec.basis @ (spec.rotated / (spec.eigenvalues + lam)[:, None])
    weight = weight_s / spec.scale[:, None]
    bias = spec.class_mean - spec.mean @ weight
    return RidgeHead(weight, bias, float(lam), clip_norm, frac_bits, dict(gcv or {}))


def choose_lambda(spec: Spectrum, grid: Iterable[float] = DEFAULT_LAMBDA_GRID) -> tuple[float, dict]:
    """λ minimising GCV over ``grid`` (relative to n); ties → the larger λ. Uses the sums only."""
    curve = {float(r) * spec.n: gcv_score(spec, float(r) * spec.n) for r in grid}
    best = min(curve, key=lambda lam: (curve[lam], -lam))
    return best, curve


def solve(stats: SufficientStats, lam: Optional[float] = None, *, standardize: bool = False,
          grid: Iterable[float] = DEFAULT_LAMBDA_GRID) -> RidgeHead:
    """The ridge head of the summed statistics; λ by GCV when not given."""
    spec = spectrum(stats, standardize=standardize)
    curve = {}
    if lam is None:
        lam, curve = choose_lambda(spec, grid)
    return head_from_spectrum(spec, lam, stats.clip_norm, stats.frac_bits, curve)


# ------------------------------------------------------------------------------ DP

def gaussian_delta(epsilon: float, sigma: float, sensitivity: float = 1.0) -> float:
    """δ(ε) of the Gaussian mechanism N(0, σ²) with L2 sensitivity Δ (Balle & Wang 2018, Thm 8)."""
    a = sensitivity / (2 * sigma)
    b = epsilon * sigma / sensitivity
    # Φ(a − b) − e^ε Φ(−a − b), with Φ(x) = erfc(−x/√2)/2; the second term via logs (no overflow)
    first = 0.5 * math.erfc(-(a - b) / math.sqrt(2))
    tail = 0.5 * math.erfc((a + b) / math.sqrt(2))
    second = math.exp(epsilon + math.log(tail)) if tail > 0 else 0.0
    return first - second


def analytic_gaussian_sigma(epsilon: float, delta: float, sensitivity: float = 1.0) -> float:
    """Smallest σ (to 1e-12 relative) with δ(ε) ≤ ``delta`` for one Gaussian release."""
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be finite and > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return smallest_meeting(lambda sigma: gaussian_delta(epsilon, sigma, sensitivity), delta,
                            1e-6 * sensitivity, sensitivity)


def smallest_meeting(delta_of, delta: float, lo: float, hi: float) -> float:
    """The smallest x (to 1e-12 relative) with ``delta_of(x) ≤ delta``, for ``delta_of``
    decreasing in x (δ of a Gaussian release in σ, or in ε): ``hi`` doubled until it meets
    ``delta``, then bisection."""
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if delta_of(mid) > delta:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


def dp_sensitivity(num_features: int, frac_bits: int) -> float:
    """L2 sensitivity Δ₂ of (triu(x xᵀ), x yᵀ) for one example, x = [q·2^-b, 1] (module docstring)."""
    r2 = (1.0 + math.sqrt(num_features) * 2.0 ** -(frac_bits + 1)) ** 2  # R²: rounding included
    return math.sqrt(r2 * r2 + 2.0 * r2 + 2.0)


def privatize(stats: SufficientStats, epsilon: float, delta: float,
              rng: np.random.Generator) -> SufficientStats:
    """One (ε, δ)-DP Gaussian release of ``stats`` (add/remove-one-example adjacency).

    The noise is drawn in units where ‖φ‖ ≤ 1 (the clip norm factored out) and rounded onto the
    statistics' integer grid: G's upper triangle in units 2^-2b, s and B in 2^-b, n and c in 1.
    """
    if stats.dp is not None:
        raise StatsError("these statistics are already a DP release")
    p, b = stats.num_features, stats.frac_bits
    sens = dp_sensitivity(p, b)
    sigma = analytic_gaussian_sigma(epsilon, delta) * sens

    def noisy(values: np.ndarray, grid: float) -> np.ndarray:
        noise = rng.normal(0.0, sigma * grid, size=values.shape)
        return values + np.rint(noise).astype(np.int64)

    n = stats.n + int(np.rint(rng.normal(0.0, sigma)))
    return SufficientStats(
        p, stats.num_classes, stats.clip_norm, b, n,
        counts=noisy(stats.counts, 1.0), sums=noisy(stats.sums, 2.0 ** b),
        gram=noisy(stats.gram, 4.0 ** b), cross=noisy(stats.cross, 2.0 ** b),
        dp={"releases": 1, "noise_variance": sigma ** 2, "epsilon": float(epsilon), "delta": float(delta),
            "sigma": sigma, "sensitivity": sens, "mechanism": "analytic-gaussian"})
