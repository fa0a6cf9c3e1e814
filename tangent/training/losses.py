"""Losses and Δ regularisers for tangent fine-tuning.

The paper trains TAFT with the rescaled square loss (RSL) of Hui & Belkin: with a linear model
it makes the whole objective a convex quadratic in Δ.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Params = Union[Mapping[str, Tensor], Iterable[Tensor]]


def _tensors(params: Params) -> list[Tensor]:
    return list(params.values()) if isinstance(params, Mapping) else list(params)


def rsl_loss(logits: Tensor, labels: Tensor, kappa: float = 15.0, alpha: float = 1.0,
             reduction: str = "mean") -> Tensor:
    """Rescaled square loss: (α·(f_y − κ)² + Σ_{c≠y} f_c²) / C, averaged over the batch."""
    target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    weight = 1.0 + (alpha - 1.0) * target
    per_example = (weight * (logits - kappa * target).pow(2)).mean(-1)
    return _reduce(per_example, reduction)


def mse_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Square loss against the one-hot target, averaged over classes."""
    target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return _reduce((logits - target).pow(2).mean(-1), reduction)


def cross_entropy(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(logits, labels, reduction=reduction)


def _reduce(per_example: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    if reduction == "none":
        return per_example
    raise ValueError(f"unknown reduction {reduction!r}")


def l2_penalty(delta_params: Params) -> Tensor:
    """Σ ‖Δ‖² over all tensors (the proximity term that keeps f_lin near w0)."""
    return sum(p.pow(2).sum() for p in _tensors(delta_params))


@torch.no_grad()
def project_to_ball(params: Params, radius: float) -> float:
    """Scale Δ in place onto the ℓ2 ball of ``radius`` (jointly over all tensors).

    Returns the norm before projection.
    """
    tensors = _tensors(params)
    norm = torch.sqrt(sum(p.double().pow(2).sum() for p in tensors)).item()
    if norm > radius:
        for p in tensors:
            p.mul_(radius / norm)
    return norm


LOSSES = {"rsl": rsl_loss, "ce": cross_entropy, "cross_entropy": cross_entropy, "mse": mse_loss}
