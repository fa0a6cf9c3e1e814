"""Exact head: integer statistics compose bit for bit; ridge, GCV and DP from the sums only."""
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangent.exact_head import statistics as eh
from tangent.exact_head.statistics import StatsError, SufficientStats

K = 4  # classes in the synthetic tests


def _data(seed, n, p, dtype, scale=1.0):
    rng = np.random.default_rng(seed)
    phi = (rng.normal(size=(n, p)) * scale / math.sqrt(p)).astype(dtype)
    labels = rng.integers(0, K, size=n)
    return phi, labels


def _stats(phi, labels, clip=2.0, bits=16):
    return SufficientStats.from_features(phi, labels, K, clip, bits)


# ------------------------------------------------------------------ exact composition

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(2, 120), p=st.integers(1, 24),
       num_sites=st.integers(1, 9), dtype=st.sampled_from([np.float32, np.float64]),
       scale=st.sampled_from([0.01, 1.0, 5.0]))
def test_any_partition_and_order_sums_to_the_central_statistics_bit_for_bit(seed, n, p, num_sites, dtype, scale):
    phi, labels = _data(seed, n, p, dtype, scale)
    rng = np.random.default_rng(seed + 1)
    site_of = rng.integers(0, num_sites, size=n)  # any partition, sites may be empty
    sites = [_stats(phi[site_of == s], labels[site_of == s]) for s in range(num_sites)]
    central = _stats(phi, labels)
    composed = SufficientStats.total([sites[i] for i in rng.permutation(num_sites)])
    assert composed == central
    for name, array in composed.to_arrays().items():  # bit for bit, array by array
        assert array.tobytes() == central.to_arrays()[name].tobytes(), name

    # removing a site = never having had it
    gone = int(rng.integers(num_sites))
    rest = [i for i in range(num_sites) if i != gone]
    after_removal = central - sites[gone]
    fresh = _stats(phi[site_of != gone], labels[site_of != gone])
    assert after_removal == fresh
    if rest:
        assert after_removal == SufficientStats.total([sites[i] for i in rest])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(3, 80), p=st.integers(1, 16),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_forgetting_samples_by_subtraction_is_bit_identical_to_never_having_them(seed, n, p, dtype):
    phi, labels = _data(seed, n, p, dtype)
    rng = np.random.default_rng(seed)
    forget = rng.random(n) < rng.random()
    site = _stats(phi, labels)
    forgotten = _stats(phi[forget], labels[forget])
    assert site - forgotten == _stats(phi[~forget], labels[~forget])
    # and the other sites' statistics are untouched by it: total − forgotten == total of the rest
    other_phi, other_labels = _data(seed + 7, 11, p, dtype)
    other = _stats(other_phi, other_labels)
    assert (site + other) - forgotten == _stats(phi[~forget], labels[~forget]) + other


def test_the_same_values_in_float32_and_float64_give_the_same_statistics():
    phi, labels = _data(3, 50, 10, np.float32)
    assert _stats(phi, labels) == _stats(phi.astype(np.float64), labels)


def test_gram_is_exact_at_the_grid_bound_where_naive_float64_is_not():
    """|q_i| = 2^b with odd low bits: sums far beyond 2^53 — the chunked product must equal the
    integer product; one float64 product over all rows loses the low bits."""
    bits = 20
    rng = np.random.default_rng(0)
    n, p = 3 * eh.chunk_rows(bits) + 17, 3
    q = (2 ** bits - rng.integers(0, 2 ** 10, size=(n, p)) * 2 - 1).astype(np.int64)
    q[:, 1] *= -1
    exact = q.T @ q  # numpy integer matmul (no BLAS): exact, |entries| < 2^63
    assert np.array_equal(eh.exact_gram(q, bits), exact)
    naive = (q.astype(np.float64).T @ q.astype(np.float64)).astype(np.int64)
    assert not np.array_equal(naive, exact)  # the bound is not vacuous


def test_quantize_clips_rows_to_the_norm_and_stays_on_the_grid():
    phi = np.array([[3.0, 4.0], [0.3, -0.4], [0.0, 0.0]])
    q = eh.quantize(phi, clip_norm=1.0, frac_bits=8)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q[0], [154, 205])  # (0.6, 0.8)·256, rounded
    np.testing.assert_array_equal(q[1], [77, -102])
    np.testing.assert_array_equal(q[2], [0, 0])
    big = np.full((1, 1), 1e9)
    assert eh.quantize(big, 1.0, 8)[0, 0] == 256  # |q| ≤ 2^b always
    with pytest.raises(ValueError, match="NaN"):
        eh.quantize(np.array([[np.nan]]), 1.0, 8)
    with pytest.raises(ValueError, match=r"\[N, p\]"):
        eh.quantize(np.ones(3), 1.0, 8)


def test_combining_other_grids_or_overflowing_int64_is_refused():
    phi, labels = _data(0, 10, 4, np.float64)
    a = _stats(phi, labels, bits=16)
    with pytest.raises(StatsError, match="different grids"):
        a + _stats(phi, labels, bits=15)
    with pytest.raises(StatsError, match="different grids"):
        a + _stats(phi, labels, clip=1.0)
    huge = _stats(phi, labels)
    huge.gram = huge.gram.copy()
    huge.gram[0] = np.iinfo(np.int64).max - 1
    with pytest.raises(StatsError, match="overflow"):
        huge + a
    with pytest.raises(StatsError, match="more examples"):
        a - (a + a)


def test_arrays_round_trip_and_malformed_arrays_are_refused():
    phi, labels = _data(1, 30, 5, np.float32)
    a = _stats(phi, labels)
    arrays, meta = a.to_arrays(), a.meta()
    assert SufficientStats.from_arrays(arrays, meta) == a
    assert a.nbytes == 8 * (1 + K + 5 + 15 + 5 * K)
    bad = dict(arrays, gram=arrays["gram"][:-1])
    with pytest.raises(StatsError, match="gram"):
        SufficientStats.from_arrays(bad, meta)
    with pytest.raises(StatsError, match="gram"):
        SufficientStats.from_arrays(dict(arrays, gram=arrays["gram"].astype(np.float64)), meta)
    with pytest.raises(StatsError, match="exactly the arrays"):
        SufficientStats.from_arrays(dict(arrays, extra=np.zeros(1, np.int64)), meta)


def test_pack_unpack_triu_round_trip():
    m = np.arange(16).reshape(4, 4)
    m = m + m.T
    packed = eh.pack_triu(m)
    assert packed.shape == (10,)
    np.testing.assert_array_equal(eh.unpack_triu(packed, 4), m)


# ------------------------------------------------------------------ ridge and λ from the sums

def _central_ridge(x, labels, lam):
    """Ridge with intercept on standardized features, fitted directly on the rows (reference)."""
    y = np.eye(K)[labels]
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    yc = y - y.mean(0)
    w_s = np.linalg.solve(z.T @ z + lam * np.eye(x.shape[1]), z.T @ yc)
    w = w_s / sd[:, None]
    return w, y.mean(0) - mu @ w, z, yc


def test_ridge_from_summed_site_statistics_equals_the_ridge_fitted_on_all_rows():
    phi, labels = _data(5, 400, 12, np.float32)
    sites = [_stats(phi[i::3], labels[i::3]) for i in range(3)]
    head = eh.solve(SufficientStats.total(sites), lam=7.0, standardize=True)
    x = eh.dequantize(eh.quantize(phi, 2.0, 16), 2.0, 16)
    w, b, _, _ = _central_ridge(x, labels, 7.0)
    np.testing.assert_allclose(head.weight, w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(head.bias, b, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(head.scores(phi), x @ w + b, rtol=1e-8, atol=1e-9)


def test_gcv_from_the_spectrum_equals_gcv_from_the_hat_matrix():
    phi, labels = _data(6, 150, 8, np.float64)
    stats = _stats(phi, labels)
    spec = eh.spectrum(stats, standardize=True)
    x = eh.dequantize(eh.quantize(phi, 2.0, 16), 2.0, 16)
    for lam in (0.1, 3.0, 100.0):
        _, _, z, yc = _central_ridge(x, labels, lam)
        hat = z @ np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T)
        rss = float(((yc - hat @ yc) ** 2).sum())
        expected = len(x) * rss / (len(x) - np.trace(hat)) ** 2
        assert eh.gcv_score(spec, lam) == pytest.approx(expected, rel=1e-9)


def test_unstandardized_ridge_from_the_sums_equals_the_ridge_on_centred_rows():
    phi, labels = _data(8, 300, 10, np.float64)
    head = eh.solve(_stats(phi[:100], labels[:100]) + _stats(phi[100:], labels[100:]), lam=0.5)
    x = eh.dequantize(eh.quantize(phi, 2.0, 16), 2.0, 16)
    y = np.eye(K)[labels]
    xc = x - x.mean(0)
    w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(10), xc.T @ (y - y.mean(0)))
    np.testing.assert_allclose(head.weight, w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(head.bias, y.mean(0) - x.mean(0) @ w, rtol=1e-8, atol=1e-10)


def test_gcv_picks_a_small_lambda_for_clean_signal_and_a_large_one_for_noise():
    rng = np.random.default_rng(2)
    n, p = 600, 20
    x = rng.normal(size=(n, p)) / math.sqrt(p)
    clean = (x @ rng.normal(size=(p, K))).argmax(1)
    noise = rng.integers(0, K, size=n)
    lam_clean = eh.solve(_stats(x, clean)).lam
    lam_noise = eh.solve(_stats(x, noise)).lam
    assert lam_clean < lam_noise


def test_lambda_must_be_positive():
    phi, labels = _data(0, 20, 3, np.float64)
    with pytest.raises(ValueError, match="λ"):
        eh.solve(_stats(phi, labels), lam=0.0)


# ------------------------------------------------------------------ DP

@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_analytic_gaussian_sigma_is_tight_against_opacus_prv_accountant(epsilon):
    from opacus.accountants import PRVAccountant, RDPAccountant

    delta = 1e-5
    sigma = eh.analytic_gaussian_sigma(epsilon, delta)
    assert eh.gaussian_delta(epsilon, sigma) <= delta
    assert eh.gaussian_delta(epsilon, sigma * (1 - 1e-6)) > delta  # the smallest such σ
    prv = PRVAccountant()
    prv.history = [(sigma, 1.0, 1)]  # one full-batch Gaussian release
    assert prv.get_epsilon(delta) == pytest.approx(epsilon, rel=0.02)
    rdp = RDPAccountant()
    rdp.history = [(sigma, 1.0, 1)]
    assert rdp.get_epsilon(delta) >= epsilon  # RDP is an upper bound: looser, never tighter


def test_classic_bound_is_looser_than_the_analytic_sigma():
    eps, delta = 1.0, 1e-5
    classic = math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert eh.analytic_gaussian_sigma(eps, delta) < classic
    assert eh.analytic_gaussian_sigma(eps, delta) == pytest.approx(3.7306, abs=1e-3)


def test_sensitivity_bounds_the_change_from_one_example():
    """Adversarial: the worst single example (on the clip sphere, all mass on few coordinates)
    must not move the release by more than the Δ₂ the noise is calibrated to."""
    p, bits = 6, 16
    rng = np.random.default_rng(0)
    base_phi, base_labels = _data(0, 40, p, np.float64)
    worst = 0.0
    candidates = [np.eye(p)[0] * 5, np.ones(p) * 9, rng.normal(size=p) * 100]
    for extra in candidates:
        phi = np.vstack([base_phi, extra[None]])
        labels = np.append(base_labels, 1)
        a, b = _stats(base_phi, base_labels, 1.0, bits), _stats(phi, labels, 1.0, bits)
        diff = [(b.gram - a.gram) / 4.0 ** bits, (b.sums - a.sums) / 2.0 ** bits,
                np.array([b.n - a.n], float), (b.cross - a.cross) / 2.0 ** bits, (b.counts - a.counts)]
        worst = max(worst, math.sqrt(sum(float((d ** 2).sum()) for d in diff)))
    assert worst <= eh.dp_sensitivity(p, bits)
    assert worst > 0.999 * math.sqrt(5)  # and the bound is attained (φ = e_i): tight, not padded


def test_privatize_adds_symmetric_noise_of_the_calibrated_scale_once():
    phi, labels = _data(9, 200, 30, np.float64)
    exact = _stats(phi, labels, 1.0, 12)
    noisy = eh.privatize(exact, 3.0, 1e-5, np.random.default_rng(0))
    sigma = noisy.dp["sigma"]
    assert sigma == pytest.approx(eh.analytic_gaussian_sigma(3.0, 1e-5) * eh.dp_sensitivity(30, 12))
    noise_g = (noisy.gram - exact.gram) / 4.0 ** 12
    assert np.std(noise_g) == pytest.approx(sigma, rel=0.1)
    g = eh.unpack_triu(noisy.gram, 30)
    assert np.array_equal(g, g.T)
    with pytest.raises(StatsError, match="already"):
        eh.privatize(noisy, 3.0, 1e-5, np.random.default_rng(1))


def test_the_server_keeps_the_noisy_system_positive_definite():
    phi, labels = _data(4, 30, 40, np.float64)  # n < p and heavy noise: G_c far from PSD
    noisy = eh.privatize(_stats(phi, labels, 1.0, 16), 1.0, 1e-5, np.random.default_rng(3))
    spec = eh.spectrum(noisy)
    assert spec.eigenvalues.min() >= 0
    head = eh.solve(noisy)
    assert head.lam > 0 and np.isfinite(head.weight).all() and np.isfinite(head.bias).all()


def test_dp_releases_sum_their_noise_and_removing_one_removes_it_exactly():
    a_phi, a_labels = _data(11, 60, 8, np.float64)
    b_phi, b_labels = _data(12, 70, 8, np.float64)
    rng = np.random.default_rng(0)
    a = eh.privatize(_stats(a_phi, a_labels, 1.0), 3.0, 1e-5, rng)
    b = eh.privatize(_stats(b_phi, b_labels, 1.0), 3.0, 1e-5, rng)
    total = a + b
    assert total.dp["releases"] == 2
    assert total.dp["noise_variance"] == pytest.approx(a.dp["sigma"] ** 2 + b.dp["sigma"] ** 2)
    rest = total - b
    assert rest == a and rest.dp["releases"] == 1


@pytest.mark.parametrize("n, p, frac_bits", [(1, 1, 16), (7, 300, 16), (60, 517, 16), (40, 260, 24)])
def test_packed_gram_is_the_packed_exact_gram_across_block_edges(n, p, frac_bits):
    """The packed Gram (blocks of GRAM_BLOCK rows, float64 products) equals the upper triangle of
    the Gram formed in Python integers, at the grid's extreme values and across block edges."""
    from tangent.exact_head.statistics import GRAM_BLOCK, pack_triu, packed_gram

    rng = np.random.default_rng(n * p)
    unit = 2 ** frac_bits
    q = rng.integers(-unit, unit + 1, (n, p), dtype=np.int64)
    q[0, : min(p, 3)] = unit  # the largest magnitude the grid allows
    exact = q.astype(object).T @ q.astype(object)
    assert p < GRAM_BLOCK or p % GRAM_BLOCK  # the last block is a partial one
    assert np.array_equal(packed_gram(q, frac_bits), pack_triu(exact).astype(np.int64))
