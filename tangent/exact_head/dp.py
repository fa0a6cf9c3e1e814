"""The DP exact head: what a site releases under a privacy budget, and how the server solves it.

Measured on the φ cache (benchmarks/dp_head.py, docs/privacy.md): with per-site Gaussian noise the
Gram matrix is where noise hurts (p² entries against p·C for the class sums), so this module
makes every release as cheap as its sensitivity allows and lets the solver know the noise level:

- rows are x = P(z − c)/‖P(z − c)‖: a public centre c, an optional seeded (public) projection P,
  then unit norm, so each block has L2 sensitivity 1 under adding or removing one example;
- the release is three blocks: the Gram Σxxᵀ, the class sums B = Σxyᵀ (y one-hot) and the class
  counts Σy. ``s = Σx`` and ``n`` are *not* released: s = B·1 and n = Σ counts are
  post-processing of the blocks, so they cost nothing;
- the Gram's upper triangle is released with its off-diagonal entries scaled by √2, so the block's
  sensitivity is ‖xxᵀ‖_F = ‖x‖² ≤ 1 exactly; the server's G has off-diagonal noise σ/√2;
- each block b gets its own σ_b; Gaussian mechanisms compose exactly in Gaussian differential
  privacy (μ² = Σ Δ_b²/σ_b², Dong, Roth & Su 2019), and a μ-GDP release is (ε, δ)-DP exactly when
  one Gaussian release of sensitivity 1 and σ = 1/μ is (the analytic Gaussian mechanism, Balle &
  Wang 2018): :class:`Allocation` splits a target (ε, δ) into the blocks' σ_b by weights w_b
  (σ_b = σ/√w_b, Σ w_b = 1).

The solver (:func:`solve_spectrum`) is ridge on the noisy centred Gram with the noise's spectral
edge removed: the noise of the summed Gram is a symmetric Gaussian matrix whose spectrum fills
[−e, e], e = √2·σ_G·√p (semicircle edge); eigenvalues are soft-thresholded by τ·e, and λ = ℓ·e.
τ and ℓ are constants picked once on held-out training rows; at run time the rule reads only the
summed noise variance the releases declare — never a site's data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tangent.exact_head.statistics import (StatsError, SufficientStats, analytic_gaussian_sigma, quantize,
                                           triu_size)

#: the release's blocks, in the order of :class:`Allocation`'s weights
BLOCKS = ("mean", "gram", "cross", "counts")


@dataclass(frozen=True)
class Allocation:
    """σ of every block of a release whose composition is (ε, δ)-DP (each block sensitivity 1)."""

    epsilon: float
    delta: float
    sigma: float            # σ of one sensitivity-1 Gaussian release with this (ε, δ)
    weights: tuple          # share of μ² per block, BLOCKS order (a zero weight: block not released)

    @classmethod
    def from_weights(cls, epsilon: float, delta: float, weights) -> "Allocation":
        weights = tuple(float(w) for w in weights)
        if len(weights) != len(BLOCKS) or min(weights) < 0 or not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
            raise ValueError(f"weights must be {len(BLOCKS)} shares ≥ 0 summing to 1, got {weights}")
        return cls(float(epsilon), float(delta), analytic_gaussian_sigma(epsilon, delta), weights)

    def block_sigma(self, block: str) -> float:
        weight = self.weights[BLOCKS.index(block)]
        return self.sigma / math.sqrt(weight) if weight > 0 else math.inf

    @property
    def sigma_mean(self) -> float:
        return self.block_sigma("mean")

    @property
    def mu(self) -> float:
        """The GDP parameter of all blocks together: √Σ 1/σ_b² = 1/σ."""
        return math.sqrt(sum(1.0 / self.block_sigma(b) ** 2 for b in BLOCKS if self.block_sigma(b) < math.inf))


def seeded_projection(dim: int, out_dim: int, seed: int = 0) -> np.ndarray:
    """A public [dim, out_dim] matrix with orthonormal columns (QR of a seeded Gaussian)."""
    draw = np.random.default_rng([seed, 2]).standard_normal((dim, out_dim))
    q, r = np.linalg.qr(draw)
    return q * np.sign(np.diag(r))  # a unique sign per column: the same matrix on every machine


@dataclass(frozen=True)
class RowTransform:
    """φ → x = P(φ − c)/‖P(φ − c)‖: the DP head's rows, a public function of one example.

    ``centre`` c (the server sends it; public: never one site's data), ``projection_dim`` k and
    ``seed`` (P = :func:`seeded_projection`; 0: no projection). One row's x depends on no other
    row, so adding or removing an example changes each released block by at most its sensitivity.
    """

    centre: Optional[np.ndarray]
    projection_dim: int = 0
    seed: int = 0

    def projection(self, dim: int) -> Optional[np.ndarray]:
        if not self.projection_dim:
            return None
        return _projection(dim, self.projection_dim, self.seed)

    def rows(self, phi: np.ndarray) -> np.ndarray:
        x = np.asarray(phi, np.float64)
        if self.centre is not None:
            x = x - self.centre
        projection = self.projection(x.shape[1])
        if projection is not None:
            x = x @ projection
        return unit_rows(x)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row on the unit sphere (a zero row stays zero): the DP head's rows, at every centring."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


_PROJECTIONS: dict = {}


def _projection(dim: int, out_dim: int, seed: int) -> np.ndarray:
    key = (dim, out_dim, seed)
    if key not in _PROJECTIONS:
        _PROJECTIONS.clear()
        _PROJECTIONS[key] = seeded_projection(dim, out_dim, seed)
    return _PROJECTIONS[key]


@dataclass
class Statistics:
    """Float64 statistics of unit-norm rows: Gram [p, p], class sums [p, C], class counts [C], and
    the variance of the Gram's noise per off-diagonal entry (0: exact)."""

    gram: np.ndarray
    cross: np.ndarray
    counts: np.ndarray
    gram_noise_variance: float = 0.0

    @classmethod
    def of(cls, x: np.ndarray, labels: np.ndarray, num_classes: int) -> "Statistics":
        x = np.asarray(x, np.float64)
        onehot = np.eye(num_classes)[labels]
        return cls(x.T @ x, x.T @ onehot, onehot.sum(axis=0))


def add_noise(stats: Statistics, allocation: Allocation, rng: np.random.Generator, *,
              sites: int = 1) -> Statistics:
    """The sum over ``sites`` independent releases' noise added to ``stats`` (their exact sum)."""
    scale = math.sqrt(sites)
    p = stats.gram.shape[0]
    sg = allocation.block_sigma("gram") * scale
    upper = np.triu(rng.normal(0.0, sg / math.sqrt(2), size=(p, p)), 1)
    noise = upper + upper.T + np.diag(rng.normal(0.0, sg, size=p))
    return Statistics(stats.gram + noise,
                      stats.cross + rng.normal(0.0, allocation.block_sigma("cross") * scale, stats.cross.shape),
                      stats.counts + rng.normal(0.0, allocation.block_sigma("counts") * scale, stats.counts.shape),
                      stats.gram_noise_variance + sg * sg / 2)


@dataclass
class NoisySpectrum:
    eigenvalues: np.ndarray
    basis: np.ndarray
    rotated: np.ndarray     # Uᵀ B_c
    mean: np.ndarray
    class_prior: np.ndarray
    edge: float             # the spectral edge of the summed Gram noise (0: exact)


def noisy_spectrum(stats: Statistics) -> NoisySpectrum:
    """Centre the summed statistics with s = B·1 and n = Σ counts (post-processing) and
    eigendecompose the centred Gram."""
    n = max(float(stats.counts.sum()), 1.0)
    s = stats.cross.sum(axis=1)
    mean = s / n
    gram_c = stats.gram - n * np.outer(mean, mean)
    cross_c = stats.cross - np.outer(mean, stats.counts)
    eigenvalues, basis = np.linalg.eigh((gram_c + gram_c.T) / 2)
    p = len(mean)
    edge = 2.0 * math.sqrt(stats.gram_noise_variance * p)
    return NoisySpectrum(eigenvalues, basis, basis.T @ cross_c, mean, stats.counts / n, edge)


@dataclass
class LinearHead:
    weight: np.ndarray
    bias: np.ndarray


def solve_spectrum(spectrum: NoisySpectrum, *, lam: float, shrink: float = 0.0,
                   lam_floor: Optional[float] = None) -> LinearHead:
    """W = U diag(1/(max(d − τe, 0) + λ)) Uᵀ B_c with λ = ``lam``·e (e: noise edge; absolute λ when e = 0)."""
    edge = spectrum.edge
    lam_abs = lam * edge if edge > 0 else lam
    if lam_floor is not None:
        lam_abs = max(lam_abs, lam_floor)
    d = np.maximum(spectrum.eigenvalues - shrink * edge, 0.0)
    weight = spectrum.basis @ (spectrum.rotated / (d + lam_abs)[:, None])
    bias = spectrum.class_prior - spectrum.mean @ weight
    return LinearHead(weight, bias)


def predict(head: LinearHead, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float64) @ head.weight + head.bias).argmax(axis=1)


# ------------------------------------------------------------------------------ the site's release

#: μ² shares of (mean, Gram, class sums, counts) of a site's release in the Flower path
#: (:func:`site_centred_release`): 5% for the site's own mean, a third of the rest for the class
#: sums (docs/dp_head.md)
RELEASE_WEIGHTS = (0.05, 0.575, 0.365, 0.01)
#: the name a Flower-path release declares for its mechanism (:func:`site_centred_release`)
MECHANISM = "gaussian-blocks-site-centre"
#: :func:`privatize`'s mechanism: the rows' centre is public only (benchmarks, no mean block)
PUBLIC_CENTRE_MECHANISM = "gaussian-blocks"


def centre_digest(centre: Optional[np.ndarray]) -> str:
    """sha256 of the centre as float64 little-endian bytes ("none" without a centre): the site
    declares which centre its rows were built with, the server checks it is the one it sent."""
    if centre is None:
        return "none"
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(centre, dtype="<f8").tobytes()).hexdigest()


def release_noise(epsilon: float, delta: float, weights, num_features: int, frac_bits: int) -> dict:
    """The noise a release at (ε, δ) with ``weights`` carries, in the statistics' real units: the
    blocks' σ (sensitivity 1) and the off-diagonal Gram variance the solver reads. A site declares
    these; the server recomputes them from the declared (ε, δ) and refuses a mismatch."""
    allocation = Allocation.from_weights(epsilon, delta, weights)
    r = release_bound(num_features, frac_bits)
    return {"sigma-mean": allocation.block_sigma("mean"), "sigma-gram": allocation.block_sigma("gram"),
            "sigma-cross": allocation.block_sigma("cross"), "sigma-counts": allocation.block_sigma("counts"),
            "noise-variance": (allocation.block_sigma("gram") * r * r) ** 2 / 2}


def declared_meta(release: SufficientStats, transform: RowTransform, contribution: str) -> dict:
    """What a site's release declares beside its grid (``stats-meta``): the mechanism and its public
    parameters — (ε, δ), every block's σ and the Gram's noise variance (:func:`release_noise`), the
    transform (k, seed, centre digest) — and the contribution it belongs to. No value of the data."""
    settings = release.dp
    noise = release_noise(settings["epsilon"], settings["delta"], settings["weights"], release.num_features,
                          release.frac_bits)
    return release.meta() | {f"dp-head-{name}": float(value) for name, value in noise.items()} | {
        "dp": True, "dp-head-epsilon": float(settings["epsilon"]), "dp-head-delta": float(settings["delta"]),
        "dp-head-mechanism": settings["mechanism"], "dp-head-dim": int(transform.projection_dim),
        "dp-head-seed": int(transform.seed), "dp-head-centre-digest": centre_digest(transform.centre),
        "contribution-id": contribution}


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The ε at which one sensitivity-1 Gaussian release with noise σ is (ε, δ)-DP exactly (the
    inverse of the analytic Gaussian mechanism's σ(ε, δ), to 1e-12 relative)."""
    from tangent.exact_head.statistics import gaussian_delta, smallest_meeting

    if not (sigma > 0 and math.isfinite(sigma)) or not 0 < delta < 1:
        raise ValueError(f"need σ > 0 and δ in (0, 1), got σ = {sigma}, δ = {delta}")
    return smallest_meeting(lambda epsilon: gaussian_delta(epsilon, sigma), delta, 0.0, 1.0)


def head_epsilon(total_epsilon: float, delta: float, share: float) -> float:
    """ε of the head's release alone when it takes ``share`` of a site's μ² for one contribution of
    (``total_epsilon``, δ): μ_total = 1/σ(total ε, δ) (the analytic Gaussian mechanism), the head is
    √share·μ_total-GDP, i.e. one Gaussian release with σ = σ(total ε, δ)/√share. The site's
    accountant composes it with DP-TAFT's DP-SGD (tangent.training.privacy.Companion); the server
    recomputes it from the (ε, δ, share) of the request to bound what a release may declare."""
    if not 0 < share < 1:
        raise ValueError(f"the head's share of μ² must be in (0, 1), got {share}")
    return gaussian_epsilon(analytic_gaussian_sigma(total_epsilon, delta) / math.sqrt(share), delta)


def release_bound(num_features: int, frac_bits: int) -> float:
    """R ≥ ‖q·2^-b‖ for a unit row quantized on the grid (each coordinate rounds by ≤ 2^-(b+1))."""
    return 1.0 + math.sqrt(num_features) * 2.0 ** -(frac_bits + 1)


def exact_release_stats(x: np.ndarray, labels: np.ndarray, num_classes: int, frac_bits: int) -> SufficientStats:
    """The exact integer statistics of unit-norm rows ``x`` (clip norm 1, grid 2^-b): what a site
    perturbs. Integer sums: sites add and subtract bit for bit (tangent/exact_head/statistics.py)."""
    return SufficientStats.from_features(np.asarray(x, np.float64), labels, num_classes, 1.0, frac_bits)


def privatize(stats: SufficientStats, allocation: Allocation, rng: np.random.Generator) -> SufficientStats:
    """The site's DP release of ``stats`` (unit rows, clip norm 1): Gram, class sums and class
    counts, each with its own Gaussian noise (``allocation``), rounded onto the integer grid.

    Nothing else leaves the site: ``sums`` is replaced by the noisy class sums' row sums and ``n``
    by the noisy counts' sum (post-processing), so the release holds no exact count and no
    un-noised statistic. Sensitivities (add/remove one example, ‖x‖ ≤ R): Gram (diagonal, √2 ×
    off-diagonal) ‖xxᵀ‖_F ≤ R², class sums ‖xyᵀ‖ ≤ R, counts 1.
    """
    gram, cross, noise_variance = _noisy_gram_cross(stats, allocation, rng)
    counts = stats.counts + _rounded(rng, allocation.block_sigma("counts"), stats.counts.shape)
    return SufficientStats(
        stats.num_features, stats.num_classes, stats.clip_norm, stats.frac_bits, int(counts.sum()), counts=counts,
        sums=cross.sum(axis=1), gram=gram, cross=cross,
        dp=_settings(allocation, noise_variance, PUBLIC_CENTRE_MECHANISM))


def site_centred_release(u: np.ndarray, labels: np.ndarray, num_classes: int, frac_bits: int,
                         allocation: Allocation, rng: np.random.Generator) -> SufficientStats:
    """A site's DP release in the Flower path: its rows centred on its *own* DP mean.

    ``u``: the site's rows through the public transform (:meth:`RowTransform.rows`, unit norm).
    Two Gaussian steps, composed in one μ² (``allocation``: mean, Gram, class sums, counts):

    1. the class counts (sensitivity 1) and Σu (sensitivity R, the grid's bound), noised;
    2. every row re-centred on the site's noisy mean m = Σu~/n~ (n~ = Σ of the noisy counts) and put
       back on the unit sphere, x = (u − m)/‖u − m‖; the Gram and class sums of x, noised as in
       :func:`privatize`.

    Step 2 reads the data and step 1's *output* only, never the exact Σu or n: for any fixed m each
    row x is one unit vector, so its blocks keep sensitivity 1 (R), and adaptive composition of
    Gaussian mechanisms adds their μ² (Dong, Roth & Su 2019). Centring matters under noise: it takes
    the large common direction out of every row before the unit norm, so the noise budget goes to
    what separates the classes (docs/dp_head.md: 4–5 points). A site's centre depends on its own
    rows only, so removing a site still removes every trace of it, bit for bit — a centre pooled
    over the sites would leave the removed site's mark in every other site's rows.

    The release: counts and ``sums`` (= Σu~, the rows *before* the site's centring: the server's
    prediction centre is Σ sums / Σ n, :func:`solve_release`) from step 1, Gram and class sums of x
    from step 2, n = Σ counts (post-processing). A site whose noisy count is below 1 centres with
    n~ = 1: a poor centre for itself, and nothing else.
    """
    u = np.asarray(u, np.float64)
    labels = np.asarray(labels)
    if u.ndim != 2 or labels.shape != (len(u),):
        raise ValueError(f"need rows [n, k] and n labels, got {u.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes})")
    if any(not math.isfinite(allocation.block_sigma(block)) for block in BLOCKS):
        raise ValueError(f"every block ({', '.join(BLOCKS)}) needs a share of the budget, got {allocation.weights}")
    b = frac_bits
    r = release_bound(u.shape[1], b)
    counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
    counts = counts + _rounded(rng, allocation.block_sigma("counts"), counts.shape)
    sums = quantize(u, 1.0, b).sum(axis=0, dtype=np.int64)
    sums = sums + _rounded(rng, allocation.block_sigma("mean") * r * 2.0 ** b, sums.shape)
    centre = sums * 2.0 ** -b / max(float(counts.sum()), 1.0)
    exact = exact_release_stats(unit_rows(u - centre), labels, num_classes, b)
    gram, cross, noise_variance = _noisy_gram_cross(exact, allocation, rng)
    return SufficientStats(exact.num_features, num_classes, 1.0, b, int(counts.sum()), counts=counts, sums=sums,
                           gram=gram, cross=cross, dp=_settings(allocation, noise_variance, MECHANISM))


def _check_exact_unit_rows(stats: SufficientStats) -> None:
    if stats.dp is not None:
        raise StatsError("these statistics are already a DP release")
    if stats.clip_norm != 1.0:
        raise StatsError(f"the DP head's rows have norm ≤ 1 (clip norm 1), not {stats.clip_norm}")


def _rounded(rng: np.random.Generator, sd, shape) -> np.ndarray:
    """Gaussian noise of standard deviation ``sd`` (in grid units), rounded onto the integer grid."""
    return np.rint(rng.normal(0.0, 1.0, size=shape) * sd).astype(np.int64)


def _noisy_gram_cross(stats: SufficientStats, allocation: Allocation,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """The Gram (packed upper triangle: diagonal N(0, σ²), off-diagonal N(0, σ²/2), the √2 scaling)
    and class sums of ``stats`` with their noise, and the Gram's off-diagonal noise variance."""
    _check_exact_unit_rows(stats)
    p, b = stats.num_features, stats.frac_bits
    r = release_bound(p, b)
    sigma_gram = allocation.block_sigma("gram") * r * r
    sigma_cross = allocation.block_sigma("cross") * r
    if not all(math.isfinite(s) for s in (sigma_gram, sigma_cross, allocation.block_sigma("counts"))):
        raise ValueError("the Gram, class sums and counts all need a share of the budget")
    diagonal = np.zeros(triu_size(p), dtype=bool)
    diagonal[np.cumsum(np.r_[0, np.arange(p, 1, -1)])] = True
    gram_sd = np.where(diagonal, sigma_gram, sigma_gram / math.sqrt(2)) * 4.0 ** b
    gram = stats.gram + _rounded(rng, gram_sd, stats.gram.shape)
    cross = stats.cross + _rounded(rng, sigma_cross * 2.0 ** b, stats.cross.shape)
    return gram, cross, sigma_gram ** 2 / 2


def _settings(allocation: Allocation, noise_variance: float, mechanism: str) -> dict:
    return {"releases": 1, "noise_variance": noise_variance, "epsilon": allocation.epsilon,
            "delta": allocation.delta, "mechanism": mechanism, "weights": list(allocation.weights)}


def statistics_view(stats: SufficientStats) -> Statistics:
    """The float64 statistics the solver reads from (summed) integer releases; the Gram's noise
    variance is the releases' summed off-diagonal variance (0 for exact statistics)."""
    _, counts, _, gram, cross = stats.real()
    variance = float(stats.dp["noise_variance"]) if stats.dp else 0.0
    return Statistics(gram, cross, counts, variance)


# ------------------------------------------------------------------------------ the server's head

#: the solver's constants (soft threshold τ and λ, both in units of the noise edge), picked on
#: held-out *training* rows (benchmarks/dp_head.py; docs/privacy.md): the same at every ε
SHRINK, LAMBDA = 0.5, 0.18


@dataclass
class DPHead:
    """scores = x W + b for the DP head's rows x of φ (transform, then the release's grid)."""

    transform: RowTransform
    linear: LinearHead
    frac_bits: int
    lam: float = 0.0  # the absolute ridge λ the solver used (ℓ · the noise edge)
    #: site-centred releases (:func:`site_centred_release`): the rows' second centre, Σ sums / Σ n
    recentre: Optional[np.ndarray] = None

    def rows(self, phi: np.ndarray) -> np.ndarray:
        from tangent.exact_head.statistics import dequantize

        x = self.transform.rows(phi)
        if self.recentre is not None:
            x = unit_rows(x - self.recentre)
        return dequantize(quantize(x, 1.0, self.frac_bits), 1.0, self.frac_bits)

    def predict(self, phi: np.ndarray) -> np.ndarray:
        return predict(self.linear, self.rows(phi))


def solve_release(total: SufficientStats, transform: RowTransform, *, shrink: float = SHRINK,
                  lam: float = LAMBDA, site_centred: bool = False) -> DPHead:
    """The head of the summed (noisy) releases: reads only the sums and their declared noise.

    ``site_centred``: the releases are :func:`site_centred_release`'s, whose ``sums`` are the sites'
    noisy Σu: a new row is centred on their pooled mean Σ sums / Σ n — every site centred on an
    estimate of the same mean — before the head reads it."""
    spectrum = noisy_spectrum(statistics_view(total))
    recentre = None
    if site_centred:
        recentre = total.sums * total.unit / max(float(total.n), 1.0)
    return DPHead(transform, solve_spectrum(spectrum, lam=lam, shrink=shrink), total.frac_bits,
                  lam * spectrum.edge if spectrum.edge > 0 else lam, recentre)
