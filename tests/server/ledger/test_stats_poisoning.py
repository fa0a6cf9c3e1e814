"""Poisoned exact-head statistics: what the statistics ledger refuses, and what it cannot.

A small real federation (four honest sites, tiny class-clustered features on the test grid, the real
SQLite statistics ledger and the real ridge solve). One extra site, within the same example count,
sends statistics that pass every entry bound but that no data set can have: all n examples in
class 0 and large cross sums for the two empty classes. Composed with the honest sites, the head's
accuracy on honest test data collapses; the ledger refuses the reply (``stats_inconsistent`` or
``stats_out_of_bounds``) and the composed head keeps its accuracy.
"""
from __future__ import annotations

import numpy as np
import pytest

from server.ledger import Ledger, RejectedContribution
from server.ledger.families import row_norm_bound
from tangent.exact_head.statistics import SufficientStats, pack_triu, quantize, solve, unpack_triu
from tests.server.exact_head_replies import FEATURE_DIGEST, model_card

from tests.server.exact_head_replies import BITS, CLIP, K, P

UNIT = 2 ** BITS
CENTERS = np.random.default_rng(0).standard_normal((K, P))
CENTERS *= 0.8 / np.linalg.norm(CENTERS, axis=1, keepdims=True)


def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    return CENTERS[labels] + 0.25 * rng.standard_normal((n, P)), labels


def stats(phi: np.ndarray, labels: np.ndarray) -> SufficientStats:
    return SufficientStats.from_features(phi, labels, K, CLIP, BITS)


HONEST = [stats(*data(seed, 100)) for seed in range(4)]
TEST = data(99, 600)


def accuracy(total: SufficientStats) -> float:
    return float((solve(total).predict(TEST[0]) == TEST[1]).mean())


def empty_class_attack(n: int = 100) -> SufficientStats:
    """Real features, all labelled class 0; the empty classes get cross sums pointing away from their
    class centres, class 0 what keeps every row of cross summing to s. Every entry is within the
    old bound n·2^b."""
    phi, _ = data(7, n)
    honest_looking = stats(phi, np.zeros(n, np.int64))
    cross = honest_looking.cross.copy()
    for c in (1, 2):
        cross[:, c] = -np.sign(CENTERS[c]).astype(np.int64) * (n * UNIT // 3)
    cross[:, 0] = honest_looking.sums - cross[:, 1] - cross[:, 2]
    assert np.abs(cross).max() <= n * UNIT and honest_looking.counts.tolist() == [n, 0, 0]
    return SufficientStats(P, K, CLIP, BITS, n, honest_looking.counts, honest_looking.sums,
                           honest_looking.gram, cross)


def label_flip(n: int = 100) -> SufficientStats:
    """A consistent poisoner: real features with every label moved to the next class."""
    phi, labels = data(7, n)
    return stats(phi, (labels + 1) % K)


def ledger_of(path, sites) -> Ledger:
    ledger = Ledger.open(path, family="stats", model_card=model_card(), expected_base_digest=FEATURE_DIGEST)
    for i, site in enumerate(sites):
        ledger.add(f"site-{i}", site.to_arrays(), num_examples=site.n, base_digest=FEATURE_DIGEST)
    return ledger


def composed(ledger: Ledger) -> SufficientStats:
    return SufficientStats.from_arrays(ledger.composed_arrays(), model_card()["stats-meta"])


def test_the_empty_class_attack_collapses_the_head_when_summed():
    """The attack is real: summed with the honest sites, the head on honest data falls apart."""
    honest = SufficientStats.total(HONEST)
    assert accuracy(honest) > 0.9
    assert accuracy(honest + empty_class_attack()) < 0.4


def test_the_ledger_refuses_the_empty_class_attack_and_the_head_holds(tmp_path):
    with ledger_of(tmp_path / "stats.sqlite", HONEST) as ledger:
        before = accuracy(composed(ledger))
        attack = empty_class_attack()
        with pytest.raises(RejectedContribution) as err:
            ledger.add("attacker", attack.to_arrays(), num_examples=attack.n, base_digest=FEATURE_DIGEST)
        assert err.value.reason in ("stats_out_of_bounds", "stats_inconsistent")
        assert accuracy(composed(ledger)) == before > 0.9
        ledger.verify()


def _edited(base: SufficientStats, **arrays) -> dict[str, np.ndarray]:
    return base.to_arrays() | arrays


def _impossible():
    """Each statistic breaks exactly one relation that every real data set satisfies."""
    phi, labels = data(3, 40)
    base = stats(phi, labels)
    n, counts = base.n, base.counts
    gram = unpack_triu(base.gram, P)
    empty = counts.copy()
    empty[0] += empty[2]
    empty[2] = 0
    cross_empty = base.cross.copy()
    cross_empty[:, 0] += cross_empty[:, 2]
    cross_empty[:, 2] = 0
    moved = cross_empty.copy()  # an empty class with one nonzero cross entry, rows still summing to s
    moved[0, 2] += 1
    moved[0, 0] -= 1
    yield "cross of an empty class", "stats_out_of_bounds", _edited(base, counts=empty, cross=moved)
    # class 1 gets a cross entry above count_1·2^b (< n·2^b), class 0 takes the difference
    big = base.cross.copy()
    shift = int(counts[1]) * UNIT + 1 - int(big[0, 1])
    big[0, 1] += shift
    big[0, 0] -= shift
    yield "cross beyond count·2^b", "stats_out_of_bounds", _edited(base, cross=big)
    # every row at the grid's largest norm cannot exceed trace n·R²: inflate one diagonal entry
    r2 = row_norm_bound(P, BITS) ** 2
    inflated = gram.copy()
    inflated[0, 0] += n * r2 - int(np.trace(gram)) + 1
    if inflated[0, 0] <= n * UNIT ** 2:  # stays within the entry bound, breaks only the trace
        yield "trace beyond n·R²", "stats_out_of_bounds", _edited(base, gram=pack_triu(inflated))
    # sums consistent with cross but too large for the Gram diagonal: s_0² > n·G_00
    shrunk = gram.copy()
    shrunk[0, :] = 0
    shrunk[:, 0] = 0
    shrunk[0, 0] = int(base.sums[0]) ** 2 // n - 1
    yield "s_i² > n·G_ii", "stats_inconsistent", _edited(base, gram=pack_triu(shrunk))
    # per class: the sums are split so Σ_c B_0c²/count_c exceeds G_00 while s_0² ≤ n·G_00 holds
    split = base.cross.copy()
    pair = int(counts[1]) * UNIT // 2
    split[0, 1] += pair
    split[0, 2] -= pair
    yield "Σ_c B_ic²/count_c > G_ii", "stats_inconsistent", _edited(base, cross=split)
    # an off-diagonal entry beyond √(G_ii·G_jj) (not PSD)
    off = gram.copy()
    off[0, 1] = off[1, 0] = int(np.sqrt(float(gram[0, 0]) * float(gram[1, 1]))) + 10
    yield "G_ij² > G_ii·G_jj", "stats_inconsistent", _edited(base, gram=pack_triu(off))


@pytest.mark.parametrize("what, reason, arrays", list(_impossible()), ids=[c[0] for c in _impossible()])
def test_impossible_statistics_are_refused(tmp_path, what, reason, arrays):
    with ledger_of(tmp_path / "stats.sqlite", HONEST[:1]) as ledger:
        with pytest.raises(RejectedContribution) as err:
            ledger.add("attacker", arrays, num_examples=int(arrays["n"][0]), base_digest=FEATURE_DIGEST)
        assert err.value.reason == reason, (what, err.value)
        assert [c.site_id for c in ledger.contributions(status="active")] == ["site-0"]


@pytest.mark.parametrize("n", [1, 2, 57])
def test_real_statistics_pass_at_the_edges_of_the_grid(tmp_path, n):
    """Every row on the clip sphere (the trace bound's worst case), one example, one class only,
    and rows that are copies (every Cauchy–Schwarz inequality with equality) are all accepted."""
    rng = np.random.default_rng(n)
    phi = rng.standard_normal((n, P))
    phi *= CLIP / np.linalg.norm(phi, axis=1, keepdims=True)
    cases = [stats(phi, rng.integers(0, K, n)), stats(phi, np.zeros(n, np.int64)),
             stats(np.repeat(phi[:1], n, axis=0), np.full(n, 2))]
    assert all(np.abs(quantize(phi, CLIP, BITS)).max() <= UNIT for _ in cases)
    with Ledger.open(tmp_path / "s.sqlite", family="stats", model_card=model_card(),
                     expected_base_digest=FEATURE_DIGEST) as ledger:
        for i, case in enumerate(cases):
            ledger.add(f"site-{i}", case.to_arrays(), num_examples=case.n, base_digest=FEATURE_DIGEST)
        ledger.verify()


def test_a_consistent_label_flipper_is_accepted_and_its_pull_is_bounded_by_its_share():
    """No check on the numbers refuses relabelled data: what one site can do is bounded by its share
    of the examples. Measured here, with four honest sites of 100: the flipper's effect grows with n."""
    honest = SufficientStats.total(HONEST)
    clean = accuracy(honest)
    small, large = accuracy(honest + label_flip(40)), accuracy(honest + label_flip(400))
    assert clean > 0.9 and small >= large and large < clean


def test_the_server_held_validation_check_holds_back_a_large_label_flipper():
    from server.quarantine import validation_admits

    honest = SufficientStats.total(HONEST)
    validation = data(555, 200)
    admitted, without, with_flipper = validation_admits(honest, label_flip(400), *validation)
    assert not admitted and with_flipper < without - 0.01
    assert validation_admits(SufficientStats.total(HONEST[:3]), HONEST[3], *validation)[0]
