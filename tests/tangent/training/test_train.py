"""The local trainer on a tiny real TangentViT: it learns, the schedule decays where it should,
projection and L2 do what they say, runs are reproducible, and the short-schedule guard pulls a
diverged Δ back to the fitted w0 head and leaves a good one alone."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tangent.data.sets import preprocess
from tangent.training.trainer import (ArrayDataset, TrainConfig, delta_norm, evaluate, fit, guard, head_pass,
                                      predict_logits, ridge_head, square_loss_target)
from tests.helpers import tiny_model

IMG = 28


def digits(n):
    data = load_digits()
    return (data.images[:n] * (255 / 16)).astype(np.uint8), data.target[:n].astype(np.int64)


@pytest.fixture(scope="module")
def tokens_and_labels():
    images, labels = digits(240)
    with torch.no_grad():
        tokens = tiny_model("avg", spread=True).trunk(preprocess(images, IMG))
    return tokens, labels


def deltas_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_learns_digits(tokens_and_labels):
    tokens, labels = tokens_and_labels
    model = tiny_model("avg", spread=True)
    _, acc0 = evaluate(model, tokens, labels, from_cache=True)
    result = fit(model, tokens, labels, TrainConfig(epochs=5, lr=1e-2), from_cache=True, progress=False)
    loss, acc = evaluate(model, tokens, labels, from_cache=True)
    losses = [h["loss"] for h in result.history]  # RSL: ≈κ²/K at the start, decreasing
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.93 * losses[0], losses
    assert acc > 0.35 and acc > acc0 + 0.2, (acc0, acc)  # chance is 0.1
    assert result.num_examples == len(labels) and result.steps == 5 * 8
    assert result.epsilon is None and result.examples_per_s > 0
    assert predict_logits(model, tokens[:5], from_cache=True).shape == (5, 10)


@pytest.mark.slow
def test_step_decay_at_50_and_83_percent():
    config = TrainConfig(epochs=12, lr=1.0)
    assert [config.lr_at(s, 12) for s in range(12)] == pytest.approx(
        [1.0] * 6 + [0.1] * 4 + [0.01] * 2)
    assert config.lr_at(49, 100) == 1.0 and config.lr_at(50, 100) == pytest.approx(0.1)
    assert config.lr_at(82, 100) == pytest.approx(0.1) and config.lr_at(83, 100) == pytest.approx(0.01)
    # and fit applies it: one step per epoch, so the epoch's lr is the step's lr
    tokens, labels = torch.randn(8, 17, 32), torch.arange(8) % 10
    result = fit(tiny_model("avg", spread=True), tokens, labels, TrainConfig(epochs=12, batch_size=8, lr=1e-3),
                 from_cache=True, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3] * 6 + [1e-4] * 4 + [1e-5] * 2)


def test_projection_keeps_delta_in_ball(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    free = tiny_model("avg", spread=True)  # (guard off: it would replace this one-epoch Δ by the fitted head)
    fit(free, tokens, labels, TrainConfig(epochs=1, lr=1e-2, guard_ridge=0.0), from_cache=True, progress=False)
    radius = 0.25 * delta_norm(free)
    projected = tiny_model("avg", spread=True)
    fit(projected, tokens, labels, TrainConfig(epochs=1, lr=1e-2, radius=radius), from_cache=True,
        progress=False)
    assert delta_norm(projected) <= radius * (1 + 1e-5)
    assert delta_norm(projected) > 0.5 * radius  # it trained, and was projected back


def test_l2_penalty_changes_and_shrinks_delta(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    plain, penalised = tiny_model("avg", spread=True), tiny_model("avg", spread=True)
    # guard off: it would replace both two-epoch Δ by the same fitted head
    fit(plain, tokens, labels, TrainConfig(epochs=2, lr=1e-2, guard_ridge=0.0), from_cache=True, progress=False)
    fit(penalised, tokens, labels, TrainConfig(epochs=2, lr=1e-2, l2=1.0, guard_ridge=0.0), from_cache=True,
        progress=False)
    assert not deltas_equal(plain.delta_state_dict(), penalised.delta_state_dict())
    assert delta_norm(penalised) < 0.9 * delta_norm(plain)


def test_deterministic_under_seed(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("avg", spread=True)
        fit(model, tokens, labels, TrainConfig(epochs=1, seed=seed, guard_ridge=0.0), from_cache=True,
            progress=False)  # guard off: the fitted head it may fall back to does not depend on the seed
        runs.append(model.delta_state_dict())
    assert deltas_equal(runs[0], runs[1])
    assert not deltas_equal(runs[0], runs[2])


def test_only_linearized_parameters_change(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:32], tokens_and_labels[1][:32]
    model = tiny_model("avg", spread=True)
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    fit(model, tokens, labels, TrainConfig(epochs=1), from_cache=True, progress=False)
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk_before.items())
    assert delta_norm(model) > 0


def test_rejects_bad_config():
    with pytest.raises(ValueError):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError):
        TrainConfig(radius=0.0)


# ---------------------------------------------------------------- the schedule; the short-schedule guard
# (measured on real images by `python -m benchmarks.short_schedule`)
def test_schedule_warmup_and_cosine():
    step = TrainConfig(lr=1.0, milestones=(0.5, 0.83), decay=0.1)
    assert [step.lr_at(s, 100) for s in (0, 49, 50, 82, 83, 99)] == [1.0, 1.0, 0.1, 0.1, 0.1 ** 2, 0.1 ** 2]
    warm = TrainConfig(lr=1.0, warmup=4)
    assert [warm.lr_at(s, 100) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    # capped at half the schedule; the decay milestones stay where they are (step 2 of 4)
    assert [warm.lr_at(s, 4) for s in range(4)] == [1 / 3, 2 / 3, 0.1, 0.1]
    cosine = TrainConfig(lr=1.0, warmup=2, schedule="cosine")
    rates = [cosine.lr_at(s, 12) for s in range(12)]
    assert rates[:3] == [1 / 3, 2 / 3, 1.0] and all(a > b for a, b in zip(rates[2:], rates[3:])) and rates[-1] > 0


@pytest.mark.slow
def test_a_diverged_delta_is_pulled_back_and_a_good_one_is_left_alone(tokens_and_labels):
    tokens, labels = tokens_and_labels
    dataset = ArrayDataset(tokens, labels)
    config = TrainConfig(guard_ridge=1.0)
    model = tiny_model("avg", spread=True)
    features, f0, _ = head_pass(model, dataset, from_cache=True)  # start from the fitted head ...
    weight, bias = ridge_head(features, square_loss_target(dataset.labels, 10, config) - f0, 1.0)
    with torch.no_grad():
        model.linearized.head.delta.weight.copy_(weight.T)
        model.linearized.head.delta.bias.copy_(bias)
    # ... where small Adam steps on every Δ improve on it
    fit(model, tokens, labels, TrainConfig(epochs=6, lr=1e-3, guard_ridge=0.0), from_cache=True, progress=False)
    trained = model.delta_state_dict()
    report = guard(model, dataset, config, from_cache=True)
    assert report["trained_loss"] < report["fitted_head_loss"] and report["alpha"] == 1.0
    assert all(torch.equal(trained[k], v) for k, v in model.delta_state_dict().items())  # untouched

    generator = torch.Generator().manual_seed(0)  # a Δ blown up the way 25 Adam steps blow it up
    model.load_delta({k: 3.0 * torch.randn(v.shape, generator=generator) for k, v in trained.items()})
    report = guard(model, dataset, config, from_cache=True)
    assert report["trained_loss"] > 5 * report["fitted_head_loss"] and 0.0 <= report["alpha"] < 1.0
    assert report["loss"] <= report["fitted_head_loss"] + 1e-9
    _, _, now = head_pass(model, dataset, from_cache=True)  # what the model says now
    target = square_loss_target(dataset.labels, now.shape[-1], config)
    assert abs(float((now - target).pow(2).mean()) - report["loss"]) < 1e-3 * report["loss"]


def test_the_guard_stays_within_the_ledgers_range_on_features_that_barely_vary(tokens_and_labels):
    """On a backbone whose features barely vary (a checkpoint near its random initialisation) the
    fitted head is huge; the guard once sent it as it was and the ledger refused every site
    (``out_of_range``). Now it stops where the head Δ is still within the range."""
    from tangent.protocol.limits import MAX_DELTA_VALUE

    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    generator = torch.Generator().manual_seed(1)
    flat = tokens[:1].expand_as(tokens) + 1e-5 * torch.randn(tokens.shape, generator=generator, dtype=tokens.dtype)
    dataset = ArrayDataset(flat, labels)
    config = TrainConfig(guard_ridge=1.0)
    model = tiny_model("avg", spread=True)
    features, f0, _ = head_pass(model, dataset, from_cache=True)
    weight, _ = ridge_head(features, square_loss_target(dataset.labels, 10, config) - f0, 1.0)
    assert weight.abs().max() > MAX_DELTA_VALUE  # the unbounded fallback would leave the range
    trained = {k: 3.0 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
               for k, v in model.delta_state_dict().items()}  # a diverged Δ, itself within range
    model.load_delta(trained)
    report = guard(model, dataset, config, from_cache=True)
    assert 0.0 < report["alpha"] < 1.0 and report["loss"] < report["trained_loss"]
    assert max(float(v.abs().max()) for v in model.delta_state_dict().values()) <= MAX_DELTA_VALUE


def test_a_delta_pulled_back_to_the_fitted_head_has_no_negative_zeros(tokens_and_labels):
    """a = 0 scales every trained entry by zero: -x · 0 is -0.0, equal to 0 but with the sign bit
    set in its bytes, which made a 60-image site's stored Δ 877 KB instead of 46 KB."""
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    dataset = ArrayDataset(tokens, labels)
    model = tiny_model("avg", spread=True)
    config = TrainConfig(guard_ridge=1.0)
    features, f0, _ = head_pass(model, dataset, from_cache=True)
    weight, bias = ridge_head(features, square_loss_target(dataset.labels, 10, config) - f0, 1.0)
    generator = torch.Generator().manual_seed(2)
    trained = {k: -1e-6 * torch.rand(v.shape, generator=generator, dtype=v.dtype)
               for k, v in model.delta_state_dict().items()}  # every entry negative ...
    trained["head.weight"], trained["head.bias"] = -weight.T.to(f0.dtype), -bias.to(f0.dtype)
    model.load_delta(trained)  # ... and a head that undoes the fitted one: the best a is 0
    report = guard(model, dataset, config, from_cache=True)
    assert report["alpha"] == 0.0
    zeros = [v[v == 0] for v in model.delta_state_dict().values()]
    assert sum(z.numel() for z in zeros) > 0
    assert not any(torch.signbit(z).any() for z in zeros)
