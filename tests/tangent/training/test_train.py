"""The local trainer on a tiny real TangentViT: it learns, the schedule decays where it should,
projection and L2 do what they say, and runs are reproducible."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from timm.models.vision_transformer import VisionTransformer

from tangent.data.sets import preprocess
from tangent.model.vit import TangentViT
from tangent.training.trainer import TrainConfig, delta_norm, evaluate, fit, predict_logits

IMG = 28


def tiny_model(pool="avg", seed=0):
    """Tiny timm ViT standing in for a pretrained backbone. At timm's init (std 0.02) the
    blocks are nearly linear and pooled tokens carry almost nothing about a digit; larger
    random weights and positional embeddings give features a linear probe can read (~70%)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=IMG, patch_size=7, embed_dim=32, depth=3, num_heads=4,
                            mlp_ratio=2.0, num_classes=0, global_pool=pool)
    with torch.no_grad():
        vit.pos_embed.normal_(0, 1)
        vit.cls_token.normal_(0, 1)
        for p in vit.blocks.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return TangentViT.from_timm(vit, num_classes=10, seed=seed)


def digits(n):
    data = load_digits()
    return (data.images[:n] * (255 / 16)).astype(np.uint8), data.target[:n].astype(np.int64)


@pytest.fixture(scope="module")
def tokens_and_labels():
    images, labels = digits(240)
    with torch.no_grad():
        tokens = tiny_model().trunk(preprocess(images, IMG))
    return tokens, labels


def deltas_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_learns_digits(tokens_and_labels):
    tokens, labels = tokens_and_labels
    model = tiny_model()
    _, acc0 = evaluate(model, tokens, labels, from_cache=True)
    result = fit(model, tokens, labels, TrainConfig(epochs=5, lr=1e-2), from_cache=True, progress=False)
    loss, acc = evaluate(model, tokens, labels, from_cache=True)
    losses = [h["loss"] for h in result.history]  # RSL: ≈κ²/K at the start, decreasing
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.93 * losses[0], losses
    assert acc > 0.35 and acc > acc0 + 0.2, (acc0, acc)  # chance is 0.1
    assert result.num_examples == len(labels) and result.steps == 5 * 8
    assert result.epsilon is None and result.examples_per_s > 0
    assert predict_logits(model, tokens[:5], from_cache=True).shape == (5, 10)


def test_step_decay_at_50_and_83_percent():
    config = TrainConfig(epochs=12, lr=1.0)
    assert [config.lr_at(s, 12) for s in range(12)] == pytest.approx(
        [1.0] * 6 + [0.1] * 4 + [0.01] * 2)
    assert config.lr_at(49, 100) == 1.0 and config.lr_at(50, 100) == pytest.approx(0.1)
    assert config.lr_at(82, 100) == pytest.approx(0.1) and config.lr_at(83, 100) == pytest.approx(0.01)
    # and fit applies it: one step per epoch, so the epoch's lr is the step's lr
    tokens, labels = torch.randn(8, 17, 32), torch.arange(8) % 10
    result = fit(tiny_model(), tokens, labels, TrainConfig(epochs=12, batch_size=8, lr=1e-3),
                 from_cache=True, progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx([1e-3] * 6 + [1e-4] * 4 + [1e-5] * 2)


def test_projection_keeps_delta_in_ball(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    free = tiny_model()  # (guard off: it would replace this one-epoch Δ by the fitted head)
    fit(free, tokens, labels, TrainConfig(epochs=1, lr=1e-2, guard_ridge=0.0), from_cache=True, progress=False)
    radius = 0.25 * delta_norm(free)
    projected = tiny_model()
    fit(projected, tokens, labels, TrainConfig(epochs=1, lr=1e-2, radius=radius), from_cache=True,
        progress=False)
    assert delta_norm(projected) <= radius * (1 + 1e-5)
    assert delta_norm(projected) > 0.5 * radius  # it trained, and was projected back


def test_l2_penalty_changes_and_shrinks_delta(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:64], tokens_and_labels[1][:64]
    plain, penalised = tiny_model(), tiny_model()
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
        model = tiny_model()
        fit(model, tokens, labels, TrainConfig(epochs=1, seed=seed, guard_ridge=0.0), from_cache=True,
            progress=False)  # guard off: the fitted head it may fall back to does not depend on the seed
        runs.append(model.delta_state_dict())
    assert deltas_equal(runs[0], runs[1])
    assert not deltas_equal(runs[0], runs[2])


def test_only_linearized_parameters_change(tokens_and_labels):
    tokens, labels = tokens_and_labels[0][:32], tokens_and_labels[1][:32]
    model = tiny_model()
    trunk_before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    fit(model, tokens, labels, TrainConfig(epochs=1), from_cache=True, progress=False)
    assert all(torch.equal(v, model.trunk.state_dict()[k]) for k, v in trunk_before.items())
    assert delta_norm(model) > 0


def test_rejects_bad_config():
    with pytest.raises(ValueError):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError):
        TrainConfig(radius=0.0)
