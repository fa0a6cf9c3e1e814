"""One accountant for a contribution's two releases: DP-SGD and the DP exact head's Gaussian release
(a full-batch Gaussian step, tangent.training.privacy.Companion). The contribution spends the
composition, at most its target and less than the sum of its parts; the budget records one entry
with what each part would cost alone, and refuses a composition it cannot pay before any step."""
import math
import time

import pytest
import torch
from torch.utils.data import DataLoader

from tangent.exact_head import dp
from tangent.exact_head.statistics import analytic_gaussian_sigma
from tangent.training.budget import BudgetExhausted, PrivacyBudget
from tangent.training.privacy import (Companion, PrivacyConfig, calibrated_noise, composed_epsilon,
                                      make_private)
from tangent.training.trainer import ArrayDataset, TrainConfig, fit, trainable_parameters
from tests.helpers import random_tokens, tiny_model

DELTA = 1e-5
#: a site's DP-TAFT schedule of the 50 × 1,200 runs: N_pub 1,024, B 64 → q = 1/16, 10 epochs
RATE, STEPS = 1 / 16, 160


def head(total: float, share: float = 0.9) -> Companion:
    epsilon = dp.head_epsilon(total, DELTA, share)
    return Companion("exact-head", analytic_gaussian_sigma(epsilon, DELTA), epsilon)


def test_the_head_share_is_exact_in_gaussian_dp():
    """μ_head² = share · μ_total², with μ = 1/σ(ε, δ) of the analytic Gaussian mechanism."""
    for total in (1.0, 3.0, 8.0):
        epsilon = dp.head_epsilon(total, DELTA, 0.9)
        assert epsilon < total
        assert analytic_gaussian_sigma(total, DELTA) ** 2 / analytic_gaussian_sigma(epsilon, DELTA) ** 2 == \
            pytest.approx(0.9, rel=1e-9)
        assert dp.gaussian_epsilon(analytic_gaussian_sigma(total, DELTA), DELTA) == pytest.approx(total, rel=1e-9)


# RDP's conversion to (ε, δ) is loose for a Gaussian (ε = 1 alone reads 1.09): at share 0.9 the head alone
# already reads above ε = 1 under RDP, so RDP is checked at a share it can pay
@pytest.mark.parametrize("accountant, share", [("prv", 0.9), ("rdp", 0.5)])
@pytest.mark.parametrize("total", [1.0, 8.0])
def test_dp_sgd_calibrated_beside_the_head_spends_the_target_in_all_and_less_than_the_sum(accountant, share, total):
    companion = head(total, share)
    sigma = calibrated_noise(total, DELTA, RATE, STEPS, accountant, (companion,))
    composed = composed_epsilon(accountant, [(sigma, RATE, STEPS), companion.history], DELTA)
    dp_sgd_alone = composed_epsilon(accountant, [(sigma, RATE, STEPS)], DELTA)
    assert 0.97 * total < composed <= total  # calibrated to the target, not merely below it
    assert composed < dp_sgd_alone + companion.epsilon  # tighter than the budget's old sum
    assert composed > max(dp_sgd_alone, companion.epsilon)
    # alone, DP-SGD at this σ would have a far smaller ε than the total: the head took its share
    assert sigma > calibrated_noise(total, DELTA, RATE, STEPS, accountant)


def test_opacus_accountants_agree_on_the_composition():
    """Cross-check: PRV (privacy-loss distributions) and RDP (Rényi curves; exact α/(2z²) for the
    full-batch step) bound the same history; RDP's conversion to (ε, δ) is looser, never tighter
    by more than PRV's own error (0.01), and the two stay within 15%. Alone, the head's PRV ε is
    its analytic ε within 2%."""
    for total in (1.0, 3.0, 8.0):
        companion = head(total)
        assert composed_epsilon("prv", [companion.history], DELTA) == pytest.approx(companion.epsilon, rel=0.02)
        sigma = calibrated_noise(total, DELTA, RATE, STEPS, "prv", (companion,))
        history = [(sigma, RATE, STEPS), companion.history]
        prv, rdp = composed_epsilon("prv", history, DELTA), composed_epsilon("rdp", history, DELTA)
        assert prv - 0.01 <= rdp <= 1.15 * prv, (total, prv, rdp)


def test_every_site_of_one_size_asks_the_accountant_once():
    """Calibration and ε are pure functions of the history: a second site of the same schedule
    gets the same σ from the worker's cache, without a new accountant evaluation."""
    from tangent.training.privacy import accountant_evaluations

    companion = head(3.0)
    first = calibrated_noise(3.0, DELTA, RATE, STEPS, "prv", (companion,))
    evaluations = accountant_evaluations()
    start = time.perf_counter()
    again = calibrated_noise(3.0, DELTA, RATE, STEPS, "prv", (head(3.0),))
    assert again == first and accountant_evaluations() == evaluations
    assert time.perf_counter() - start < 0.5  # Opacus' own search is not run again either (seconds)
    composed_epsilon("prv", [(first, RATE, STEPS), companion.history], DELTA)
    assert accountant_evaluations() == evaluations  # asked during the calibration
    assert calibrated_noise(3.0, DELTA, RATE, STEPS + 1, "prv", (companion,)) != first  # another schedule
    assert accountant_evaluations() > evaluations


def test_a_companion_that_takes_the_whole_budget_leaves_dp_sgd_nothing():
    greedy = Companion("exact-head", analytic_gaussian_sigma(1.0, DELTA) * 0.99, 1.01)
    with pytest.raises(ValueError, match="no budget left"):
        calibrated_noise(1.0, DELTA, RATE, STEPS, "rdp", (greedy,))


def _fit(budget, contribution_id="c" * 32, total=2.0):
    tokens, labels = random_tokens(32)
    model = tiny_model()
    before = [p.detach().clone() for p in trainable_parameters(model)]
    config = PrivacyConfig(target_epsilon=total, target_delta=DELTA, accountant="prv", public_examples=32,
                           companions=(head(total),))
    try:
        result = fit(model, tokens, labels, TrainConfig(epochs=1, batch_size=8), privacy=config,
                     from_cache=True, progress=False, budget=budget, contribution_id=contribution_id)
    finally:
        unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, trainable_parameters(model)))
    return result, unchanged


def test_one_budget_entry_per_contribution_with_the_composition_and_each_part_alone(tmp_path):
    path = tmp_path / PrivacyBudget.FILE_NAME
    PrivacyBudget.create(path, "site", 2.0)  # the old sum (DP-TAFT 2 + head) would not fit
    budget = PrivacyBudget(path, "site")
    result, _ = _fit(budget)
    assert result.epsilon <= 2.0 and budget.spent[0] == pytest.approx(result.epsilon)
    (entry,) = budget.charges().values()
    assert entry["state"] == "settled" and entry["epsilon"] == result.epsilon and entry["delta"] == DELTA
    assert entry["alone"] == result.epsilon_parts
    assert entry["alone"]["exact-head"] == head(2.0).epsilon
    assert max(entry["alone"].values()) < result.epsilon < math.fsum(entry["alone"].values())
    states = [e["state"] for e in budget.state()["entries"]]
    assert states == ["reserved", "settled"]


def test_a_budget_that_cannot_pay_the_composition_refuses_before_any_step(tmp_path):
    path = tmp_path / PrivacyBudget.FILE_NAME
    PrivacyBudget.create(path, "site", 1.9)
    budget = PrivacyBudget(path, "site")
    with pytest.raises(BudgetExhausted):
        _fit(budget)
    assert budget.spent == (0.0, 0.0) and budget.state()["entries"] == []


def test_the_planned_composition_is_what_is_spent():
    tokens, labels = random_tokens(16)
    model = tiny_model()
    loader = DataLoader(ArrayDataset(tokens, labels), batch_size=4)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    config = PrivacyConfig(target_epsilon=3.0, target_delta=DELTA, accountant="prv", public_examples=16,
                           companions=(head(3.0),))
    private = make_private(model.linearized, optimizer, loader, config, epochs=2)
    try:
        steps = 2 * len(private.data_loader)
        assert 2.9 < private.planned_epsilon(steps) <= 3.0
        assert private.parts(steps)["exact-head"] == head(3.0).epsilon
    finally:
        private.close()
