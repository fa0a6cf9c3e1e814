"""Composition: the composed Δ's logits are the weighted average of the models' logits."""

import pytest
import torch

from tangent.model.composition import compose
from tangent.training.losses import cross_entropy, l2_penalty, mse_loss, project_to_ball, rsl_loss
from tangent.model.vit import TangentViT
from tests.helpers import images, random_delta, rel_err, tiny_vit


def test_compose_is_normalised_weighted_sum():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([1.5])}
    out = compose([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, -1.0])) and torch.allclose(out["b"], torch.tensor([1.25]))
    assert torch.allclose(compose([a, b])["w"], torch.tensor([2.0, 0.0]))
    assert out["w"].dtype == torch.float32
    with pytest.raises(KeyError):
        compose([a, {"w": b["w"]}], [1, 1])
    with pytest.raises(ValueError):
        compose([a, b], [0, 0])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pool,k,linearize_cls", [("token", 2, True), ("avg", 1, False)])
def test_composed_logits_are_weighted_average(dtype, tol, pool, k, linearize_cls):
    model = TangentViT.from_timm(tiny_vit(0.1, pool, dtype=dtype), 5, linearized_blocks=k,
                                 linearize_cls=linearize_cls, seed=4)
    deltas = [random_delta(model, seed=s) for s in (10, 11, 12)]
    weights = [3.0, 1.0, 6.0]
    x = images(dtype=dtype)
    for mode in ("linear", "jvp"):
        model.output_mode = mode
        logits = []
        with torch.no_grad():
            for d in deltas:
                model.load_delta(d)
                logits.append(model(x).double())
            model.load_delta(compose(deltas, weights))
            composed = model(x).double()
        want = sum(w * l for w, l in zip(weights, logits)) / sum(weights)
        assert rel_err(composed, want) <= tol
        assert rel_err(logits[0], want) > 1e-2  # the models do differ


def test_losses():
    logits = torch.tensor([[15.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2])
    per = rsl_loss(logits, labels, kappa=15.0, alpha=2.0, reduction="none")
    assert torch.allclose(per, torch.tensor([0.0, (1 + 4 + 2 * 144) / 3]))
    assert torch.allclose(rsl_loss(logits, labels, alpha=2.0), per.mean())
    assert torch.allclose(mse_loss(logits, labels, reduction="sum"),
                          torch.tensor((14 ** 2) / 3 + (1 + 4 + 4) / 3))
    assert torch.allclose(cross_entropy(logits, labels), torch.nn.functional.cross_entropy(logits, labels))
    params = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    assert l2_penalty(params).item() == 25.0
    assert project_to_ball(params, 1.0) == pytest.approx(5.0)
    assert torch.allclose(params["a"], torch.tensor([0.6])) and torch.allclose(params["b"], torch.tensor([0.8]))
    assert project_to_ball(list(params.values()), 2.0) == pytest.approx(1.0)
    assert torch.allclose(params["a"], torch.tensor([0.6]))


def test_package_level_compose_is_the_function():
    import tangent
    import tangent.model.composition  # noqa: F401  importing the module must not shadow the function
    a = {"w": torch.ones(2)}
    b = {"w": torch.zeros(2)}
    assert torch.equal(tangent.compose([a, b], [1.0, 3.0])["w"].float(), torch.full((2,), 0.25))
