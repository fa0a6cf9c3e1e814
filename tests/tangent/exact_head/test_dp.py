"""The DP exact head's release and solver (tangent/exact_head/dp.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tangent.exact_head import dp
from tangent.exact_head.statistics import SufficientStats, StatsError, analytic_gaussian_sigma, unpack_triu

WEIGHTS = (0.0, 0.8, 0.19, 0.01)


def unit_rows(rng, n, p):
    x = rng.normal(size=(n, p))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_allocation_composes_to_the_target():
    allocation = dp.Allocation.from_weights(3.0, 1e-5, (0.05, 0.8, 0.14, 0.01))
    assert allocation.mu == pytest.approx(1.0 / analytic_gaussian_sigma(3.0, 1e-5), rel=1e-12)
    assert allocation.block_sigma("gram") == pytest.approx(allocation.sigma / math.sqrt(0.8))
    assert dp.Allocation.from_weights(3.0, 1e-5, WEIGHTS).block_sigma("mean") == math.inf
    with pytest.raises(ValueError):
        dp.Allocation.from_weights(3.0, 1e-5, (0.5, 0.5, 0.5, 0.0))


def test_allocation_matches_an_independent_accountant():
    """Opacus' PRV accountant composing the blocks as full-batch Gaussian steps gives back ε."""
    from opacus.accountants import PRVAccountant

    allocation = dp.Allocation.from_weights(1.0, 1e-5, (0.05, 0.8, 0.14, 0.01))
    accountant = PRVAccountant()
    for block in dp.BLOCKS:
        accountant.history.append((allocation.block_sigma(block), 1.0, 1))
    assert accountant.get_epsilon(1e-5) == pytest.approx(1.0, rel=0.02)


def gram_vector(stats: SufficientStats) -> np.ndarray:
    """The released Gram block in real units: diagonal and √2 × the strict upper triangle."""
    g = unpack_triu(stats.gram, stats.num_features, dtype=np.float64) * stats.unit ** 2
    iu = np.triu_indices(stats.num_features, 1)
    return np.concatenate([np.diag(g), math.sqrt(2) * g[iu]])


@pytest.mark.parametrize("frac_bits", [3, 16])
def test_every_block_moves_at_most_its_sensitivity(frac_bits):
    """Adding one worst-case row (a basis vector, where rounding can grow the norm) moves the Gram
    block by ≤ R², the class sums by ≤ R and the counts by 1."""
    rng = np.random.default_rng(0)
    p = 6
    x, labels = unit_rows(rng, 20, p), rng.integers(0, 3, 20)
    base = dp.exact_release_stats(x, labels, 3, frac_bits)
    r = dp.release_bound(p, frac_bits)
    for extra in (np.eye(p)[:1], np.full((1, p), 1 / math.sqrt(p)), unit_rows(rng, 1, p)):
        more = dp.exact_release_stats(np.vstack([x, extra]), np.r_[labels, 2], 3, frac_bits)
        assert np.linalg.norm(gram_vector(more) - gram_vector(base)) <= r * r + 1e-12
        assert np.linalg.norm((more.cross - base.cross) * base.unit) <= r + 1e-12
        assert np.abs(more.counts - base.counts).sum() == 1


def test_release_noise_has_the_allocated_scale():
    rng = np.random.default_rng(1)
    p, b = 8, 10
    allocation = dp.Allocation.from_weights(1.0, 1e-5, WEIGHTS)
    zero = dp.exact_release_stats(np.zeros((0, p)), np.zeros(0, np.int64), 3, b)
    draws = [dp.privatize(zero, allocation, rng) for _ in range(400)]
    r = dp.release_bound(p, b)
    grams = np.stack([unpack_triu(d.gram, p, dtype=np.float64) for d in draws]) * zero.unit ** 2
    iu = np.triu_indices(p, 1)
    sigma_gram = allocation.block_sigma("gram") * r * r
    assert grams[:, iu[0], iu[1]].std() == pytest.approx(sigma_gram / math.sqrt(2), rel=0.05)
    assert grams[:, np.arange(p), np.arange(p)].std() == pytest.approx(sigma_gram, rel=0.1)
    cross = np.stack([d.cross for d in draws]) * zero.unit
    assert cross.std() == pytest.approx(allocation.block_sigma("cross") * r, rel=0.05)
    assert draws[0].dp["noise_variance"] == pytest.approx(sigma_gram ** 2 / 2)


def test_release_holds_no_exact_count_or_sum():
    rng = np.random.default_rng(2)
    x, labels = unit_rows(rng, 300, 5), rng.integers(0, 4, 300)
    exact = dp.exact_release_stats(x, labels, 4, 16)
    noisy = dp.privatize(exact, dp.Allocation.from_weights(8.0, 1e-5, WEIGHTS), rng)
    # s and n are post-processing of the noisy blocks, not the site's own values
    assert np.array_equal(noisy.sums, noisy.cross.sum(axis=1)) and noisy.n == noisy.counts.sum()
    for name in ("counts", "sums", "gram", "cross"):
        assert not np.array_equal(getattr(noisy, name), getattr(exact, name)), name
    with pytest.raises(StatsError):
        dp.privatize(noisy, dp.Allocation.from_weights(8.0, 1e-5, WEIGHTS), rng)


def test_noisy_releases_compose_and_remove_exactly():
    """The ledger's integer sums: any order gives the same bits; removing a site leaves exactly
    the sum of the others, its noise included."""
    rng = np.random.default_rng(3)
    allocation = dp.Allocation.from_weights(1.0, 1e-5, WEIGHTS)
    releases = []
    for _ in range(4):
        x, labels = unit_rows(rng, 50, 7), rng.integers(0, 3, 50)
        releases.append(dp.privatize(dp.exact_release_stats(x, labels, 3, 16), allocation, rng))
    total = SufficientStats.total(releases)
    assert total == SufficientStats.total(releases[::-1])
    without = total - releases[1]
    assert without == SufficientStats.total([releases[0], releases[2], releases[3]])
    assert without.dp["noise_variance"] == pytest.approx(3 * releases[0].dp["noise_variance"])


def test_solver_without_noise_is_ridge_with_an_intercept():
    rng = np.random.default_rng(4)
    x, labels = unit_rows(rng, 400, 6), rng.integers(0, 3, 400)
    stats = dp.Statistics.of(x, labels, 3)
    head = dp.solve_spectrum(dp.noisy_spectrum(stats), lam=0.5)
    xc = x - x.mean(axis=0)
    y = np.eye(3)[labels]
    weight = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(6), xc.T @ (y - y.mean(axis=0)))
    np.testing.assert_allclose(head.weight, weight, atol=1e-10)
    np.testing.assert_allclose(head.bias, y.mean(axis=0) - x.mean(axis=0) @ weight, atol=1e-10)


def test_noisy_head_learns_from_integer_releases():
    """50 sites' DP releases of a separable task, summed as the ledger sums them: the head solved
    from the noisy sums alone classifies held-out rows far above chance."""
    rng = np.random.default_rng(5)
    p, classes = 16, 4
    centres = unit_rows(rng, classes, p) * 2

    def draw(n):
        labels = rng.integers(0, classes, n)
        x = centres[labels] + rng.normal(size=(n, p))
        return x / np.linalg.norm(x, axis=1, keepdims=True), labels

    allocation = dp.Allocation.from_weights(3.0, 1e-5, WEIGHTS)
    total = SufficientStats.total([dp.privatize(dp.exact_release_stats(*draw(200), classes, 16), allocation, rng)
                                   for _ in range(50)])
    x_test, y_test = draw(2000)
    head = dp.solve_spectrum(dp.noisy_spectrum(dp.statistics_view(total)), lam=0.3, shrink=1.0)
    assert (dp.predict(head, x_test) == y_test).mean() > 0.6  # chance: 0.25


def test_the_servers_head_predicts_through_the_transform_and_grid():
    """solve_release on summed integer releases; DPHead.predict maps raw φ through the same
    centre, projection, unit norm and grid the sites used."""
    rng = np.random.default_rng(6)
    p, classes = 24, 3
    centres = rng.normal(size=(classes, p)) + 3.0  # a large common offset: what the centre removes
    transform = dp.RowTransform(np.full(p, 3.0), projection_dim=12, seed=1)

    def draw(n):
        labels = rng.integers(0, classes, n)
        return centres[labels] + 0.5 * rng.normal(size=(n, p)), labels

    allocation = dp.Allocation.from_weights(8.0, 1e-5, WEIGHTS)
    releases = []
    for _ in range(20):
        phi, labels = draw(300)
        releases.append(dp.privatize(dp.exact_release_stats(transform.rows(phi), labels, classes, 16),
                                     allocation, rng))
    head = dp.solve_release(SufficientStats.total(releases), transform)
    phi_test, y_test = draw(1000)
    assert (head.predict(phi_test) == y_test).mean() > 0.9
    assert np.allclose(np.linalg.norm(transform.rows(phi_test), axis=1), 1.0)


def offset_task(rng, p=12, classes=3, offset=6.0, spread=0.4):
    """Classes that differ little against a large direction every row shares: what a centre removes."""
    centres = offset * unit_rows(rng, 1, p) + spread * rng.normal(size=(classes, p))

    def draw(n):
        labels = rng.integers(0, classes, n)
        return centres[labels] + 0.5 * rng.normal(size=(n, p)), labels

    return draw


def test_a_site_centred_release_is_built_on_its_own_released_mean():
    """With negligible noise, the Gram and class sums are those of the site's rows centred on
    sums/n of its release (not on the public centre alone), and sums is Σ of the public rows."""
    from tangent.exact_head.statistics import quantize

    rng = np.random.default_rng(7)
    u, labels = unit_rows(rng, 300, 5) + 0.8, rng.integers(0, 3, 300)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    allocation = dp.Allocation.from_weights(1e5, 1e-5, dp.RELEASE_WEIGHTS)
    release = dp.site_centred_release(u, labels, 3, 16, allocation, rng)
    assert release.dp["mechanism"] == dp.MECHANISM and release.n == release.counts.sum() == 300
    unit = release.unit  # the noise at this ε is ~0.01 in real units, against sums of ~100
    assert np.abs(release.sums - quantize(u, 1.0, 16).sum(axis=0)).max() * unit < 0.1
    centre = release.sums * unit / release.n
    x = (u - centre) / np.linalg.norm(u - centre, axis=1, keepdims=True)
    rebuilt = dp.exact_release_stats(x, labels, 3, 16)
    assert np.abs(release.cross - rebuilt.cross).max() * unit < 0.1
    assert np.abs(release.gram - rebuilt.gram).max() * unit ** 2 < 0.1
    uncentred = dp.exact_release_stats(u, labels, 3, 16)
    assert np.abs(release.cross - uncentred.cross).max() * unit > 10


def test_site_centred_releases_compose_remove_exactly_and_beat_the_public_centre():
    """Each site centres on its own noisy mean, so the sums stay exact integers (removing a site
    leaves exactly the others), and the server's head — new rows centred on Σ sums / Σ n — beats
    the same budget spent without the site's centre when a large common direction dominates."""
    rng = np.random.default_rng(8)
    draw = offset_task(rng)
    transform = dp.RowTransform(None, 0, 0)
    epsilon, classes = 3.0, 3
    site_centred = dp.Allocation.from_weights(epsilon, 1e-5, dp.RELEASE_WEIGHTS)
    public_only = dp.Allocation.from_weights(epsilon, 1e-5, (0.0, 0.6, 0.39, 0.01))
    centred, plain = [], []
    for _ in range(10):
        phi, labels = draw(400)
        centred.append(dp.site_centred_release(transform.rows(phi), labels, classes, 16, site_centred, rng))
        plain.append(dp.privatize(dp.exact_release_stats(transform.rows(phi), labels, classes, 16), public_only, rng))
    total = SufficientStats.total(centred)
    assert total == SufficientStats.total(centred[::-1])
    assert total - centred[4] == SufficientStats.total(centred[:4] + centred[5:])
    head = dp.solve_release(total, transform, site_centred=True)
    np.testing.assert_array_equal(head.recentre, total.sums * total.unit / total.n)
    phi_test, y_test = draw(2000)
    accuracy = (head.predict(phi_test) == y_test).mean()
    public_accuracy = (dp.solve_release(SufficientStats.total(plain), transform).predict(phi_test) == y_test).mean()
    assert accuracy > public_accuracy + 0.05, (accuracy, public_accuracy)


def test_a_site_centred_release_needs_every_block_paid():
    rng = np.random.default_rng(9)
    u, labels = unit_rows(rng, 10, 4), rng.integers(0, 2, 10)
    with pytest.raises(ValueError, match="share"):
        dp.site_centred_release(u, labels, 2, 16, dp.Allocation.from_weights(3.0, 1e-5, WEIGHTS), rng)


def test_synthetic_centre_images_are_a_function_of_the_seed():
    from tangent.exact_head.public_centre import synthetic_images

    a, b = synthetic_images(8, seed=0), synthetic_images(8, seed=0)
    assert a.dtype == np.uint8 and a.shape == (8, 28, 28) and np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_images(8, seed=1))
