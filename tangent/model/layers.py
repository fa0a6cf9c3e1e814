"""Closed-form JVP rules of the ViT building blocks.

Every rule is a pure function ``(primal, tangent, frozen weights, delta) -> (primal, tangent)``
that returns the output of the layer at w0 together with its directional derivative along
(tangent of the input, Δ of the weights). ``tangent=None`` stands for an exactly zero tangent
and lets a rule skip the matching products (the tangent entering the first linearized block is
zero unless the CLS token is linearized).

Weight deltas enter as a callable ``delta`` applied to the *primal* input: for a Linear that is
``x -> dW·x + db`` (an ``nn.Linear`` holding dW, db), for a LayerNorm ``x -> dγ⊙x̂ + dβ`` (an
``nn.LayerNorm`` holding dγ, dβ). Keeping the Δ inside standard modules applied to primal
activations is what lets Opacus compute per-sample gradients of a tangent model unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

Delta = Optional[Callable[[Tensor], Tensor]]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def add_tangents(*tangents: Optional[Tensor]) -> Optional[Tensor]:
    """Sum of tangents where ``None`` is an exact zero (``None`` if all are)."""
    total = None
    for t in tangents:
        if t is not None:
            total = t if total is None else total + t
    return total


def linear_jvp(x: Tensor, dx: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
               delta: Delta = None) -> tuple[Tensor, Optional[Tensor]]:
    """y = W x + b;  dy = W dx + (dW x + db)."""
    y = F.linear(x, weight, bias)
    dy = add_tangents(None if dx is None else F.linear(dx, weight),
                      None if delta is None else delta(x))
    return y, dy


def layer_norm_jvp(x: Tensor, dx: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float,
                   delta: Delta = None) -> tuple[Tensor, Optional[Tensor]]:
    """y = γ⊙x̂ + β with x̂ = (x − μ)/σ;  dy = γ⊙dx̂ + (dγ⊙x̂ + dβ).

    dx̂ = (dx − mean(dx) − x̂·mean(x̂⊙dx)) / σ, the closed-form JVP of the normalisation.
    """
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    x_hat = xc * rstd
    y = x_hat * weight + bias
    dy = None
    if dx is not None:
        dxc = dx - dx.mean(-1, keepdim=True)
        dx_hat = (dxc - x_hat * (x_hat * dxc).mean(-1, keepdim=True)) * rstd
        dy = dx_hat * weight
    if delta is not None:
        dy = add_tangents(dy, delta(x))
    return y, dy


def gelu_jvp(x: Tensor, dx: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Exact (erf) GELU; derivative Φ(x) + x·φ(x)."""
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    y = x * cdf
    if dx is None:
        return y, None
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return y, dx * (cdf + x * pdf)


def softmax_jvp(s: Tensor, ds: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """a = softmax(s) on the last axis;  da = a⊙(ds − Σ a⊙ds): O(N) per row, no N×N Jacobian."""
    a = s.softmax(-1)
    if ds is None:
        return a, None
    return a, a * (ds - (a * ds).sum(-1, keepdim=True))


def attention_jvp(q: Tensor, k: Tensor, v: Tensor, dq: Optional[Tensor], dk: Optional[Tensor],
                  dv: Optional[Tensor], scale: float) -> tuple[Tensor, Optional[Tensor]]:
    """Scaled dot-product attention ``softmax(q kᵀ·scale) v`` over [..., N, head_dim] and its JVP.

    dS = (dq kᵀ + q dkᵀ)·scale; dA by :func:`softmax_jvp`; dO = dA v + A dv.
    """
    s = (q @ k.transpose(-2, -1)) * scale
    ds = add_tangents(None if dq is None else dq @ k.transpose(-2, -1),
                      None if dk is None else q @ dk.transpose(-2, -1))
    a, da = softmax_jvp(s, None if ds is None else ds * scale)
    o = a @ v
    do = add_tangents(None if da is None else da @ v, None if dv is None else a @ dv)
    return o, do


def layer_scale_jvp(x: Tensor, dx: Optional[Tensor], gamma: Optional[Tensor]
                    ) -> tuple[Tensor, Optional[Tensor]]:
    """LayerScale with a frozen γ (``None`` = identity): the tangent flows through γ."""
    if gamma is None:
        return x, dx
    return x * gamma, None if dx is None else dx * gamma


def residual_jvp(x: Tensor, dx: Optional[Tensor], y: Tensor, dy: Optional[Tensor]
                 ) -> tuple[Tensor, Optional[Tensor]]:
    """x + y, dx + dy."""
    return x + y, add_tangents(dx, dy)
