"""Composition of tangent models.

f_lin is linear in Δ, so the model with Δ = Σ wᵢΔᵢ / Σ wᵢ outputs exactly the weighted average
of the models' outputs (in ``"linear"`` and ``"jvp"`` modes alike).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor


def compose(deltas: Sequence[Mapping[str, Tensor]], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Σ wᵢΔᵢ / Σ wᵢ (uniform weights when ``weights`` is None), accumulated in float64."""
    if not deltas:
        raise ValueError("nothing to compose")
    weights = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(weights) != len(deltas):
        raise ValueError(f"{len(deltas)} deltas but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    keys = set(deltas[0])
    for d in deltas[1:]:
        if set(d) != keys:
            raise KeyError(f"delta keys differ: {sorted(keys ^ set(d))}")
    total = sum(weights)
    out = {}
    for k in deltas[0]:
        acc = sum(w * d[k].to(torch.float64) for w, d in zip(weights, deltas))
        out[k] = (acc / total).to(deltas[0][k].dtype)
    return out
