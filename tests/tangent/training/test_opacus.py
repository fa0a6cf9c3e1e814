"""Opacus per-sample gradients of ``model.linearized`` (hooks mode and ghost clipping) against a
brute-force per-example loop. Opacus records nothing in eval() mode, so the wrapped module is put
in train mode (the tail has no dropout: outputs are identical)."""

import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

from tangent.training.losses import rsl_loss
from tangent.model.vit import TangentViT
from tests.helpers import images, random_delta, tiny_vit

B = 5


class RSL:
    """rsl_loss with the ``reduction`` attribute Opacus' loss wrapper switches."""

    def __init__(self, reduction):
        self.reduction = reduction

    def __call__(self, logits, labels):
        return rsl_loss(logits, labels, kappa=15.0, reduction=self.reduction)


def setup(pool, k, linearize_cls, mode="linear"):
    model = TangentViT.from_timm(tiny_vit(0.1, pool), 4, linearized_blocks=k,
                                 linearize_cls=linearize_cls, seed=5, output_mode=mode)
    model.load_delta(random_delta(model, scale=0.05))
    x = images(B)
    with torch.no_grad():
        tokens = model.trunk(x)
    labels = torch.arange(B) % 4
    tail = model.linearized.train()
    params = [p for p in tail.parameters() if p.requires_grad]
    brute = []
    for i in range(B):
        loss = rsl_loss(tail(tokens[i:i + 1]), labels[i:i + 1], reduction="sum")
        brute.append(torch.autograd.grad(loss, params))
    brute = [torch.stack(g) for g in zip(*brute)]  # per parameter: [B, ...]
    return tail, tokens, labels, params, brute


CASES = [("token", 1, True, "linear"), ("token", 2, False, "jvp"), ("avg", 1, True, "linear")]


@pytest.mark.parametrize("pool,k,linearize_cls,mode", CASES)
def test_hooks_per_sample_gradients(pool, k, linearize_cls, mode):
    tail, tokens, labels, params, brute = setup(pool, k, linearize_cls, mode)
    gsm = GradSampleModule(tail, batch_first=True, loss_reduction="sum")
    rsl_loss(gsm(tokens), labels, reduction="sum").backward()
    scale = torch.sqrt(sum(g.pow(2).sum() for g in brute))
    for p, want in zip(params, brute):
        assert p.grad_sample.shape == want.shape
        assert (p.grad_sample - want).norm() <= 1e-10 * scale, p.shape
    assert sum(g.abs().max() > 1e-8 * scale for g in brute) >= len(brute) - 1  # only dbk may be ~0
    gsm._close()


@pytest.mark.parametrize("pool,k,linearize_cls,mode", CASES[:2])
def test_ghost_clipping(pool, k, linearize_cls, mode):
    tail, tokens, labels, params, brute = setup(pool, k, linearize_cls, mode)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in brute))
    max_norm = norms.median().item()  # clips about half of the examples
    gsm = GradSampleModuleFastGradientClipping(tail, batch_first=True, max_grad_norm=max_norm,
                                               use_ghost_clipping=True, loss_reduction="sum")
    optimizer = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0,
                                                max_grad_norm=max_norm, expected_batch_size=B,
                                                loss_reduction="sum")
    criterion = DPLossFastGradientClipping(gsm, optimizer, RSL("sum"), loss_reduction="sum")
    optimizer.zero_grad()
    criterion(gsm(tokens), labels).backward()
    assert torch.allclose(gsm.per_sample_gradient_norms, norms, rtol=1e-9, atol=0)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    assert (coef < 1).any() and (coef == 1).any()
    for p, g in zip(params, brute):
        want = torch.einsum("b,b...->...", coef, g)
        assert torch.allclose(p.grad, want, rtol=1e-8, atol=1e-12), p.shape
