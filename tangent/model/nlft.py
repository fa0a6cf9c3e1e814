"""Non-linear fine-tuning (NLFT-k) baseline with the same surface as :class:`TangentViT`.

The same blocks, final norm(s) and head are trained directly (w = w0 + Δ); the trunk, the
w0 re-initialisation and the head draw are shared with TAFT, so both start from the same w0.
LayerScale γ stays frozen as in TAFT, so both train the same parameter set.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from tangent.model.vit import (CLS_DELTA_KEY, DeltaModule, Trunk, _FineTunedViT, _zero_,
                               pool_tokens, prepare_base, tail_pool)


class NLFTTail(DeltaModule):
    """``tokens -> logits`` through trainable copies of the last k blocks, norm(s) and head."""

    def __init__(self, vit: nn.Module, linearized_blocks: int, linearize_cls: bool):
        super().__init__()
        depth = len(vit.blocks)
        self.first_block = depth - linearized_blocks
        self.pool, self.num_prefix_tokens = tail_pool(vit), vit.num_prefix_tokens
        self.blocks = copy.deepcopy(vit.blocks[self.first_block:])
        self.norm, self.fc_norm, self.head = (copy.deepcopy(m) for m in (vit.norm, vit.fc_norm, vit.head))
        self.cls_token = (_zero_(nn.Linear(1, vit.embed_dim, bias=False, dtype=vit.head.weight.dtype,
                                           device=vit.head.weight.device)) if linearize_cls else None)
        self.requires_grad_(True)
        for name, p in self.named_parameters():
            if name.endswith(".gamma"):  # LayerScale: frozen, as in TAFT
                p.requires_grad_(False)
        self._w0 = {k: v.detach().clone() for k, v in self._timm_params().items()}

    def __setattr__(self, name, value):
        if name == "_w0":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._w0 = {k: fn(v) for k, v in self._w0.items()}
        return self

    def _timm_params(self) -> dict[str, Tensor]:
        out = {}
        for name, p in self.named_parameters():
            if not p.requires_grad or name.startswith("cls_token"):
                continue
            out[name] = p  # slicing a Sequential keeps timm's block indices
        return out

    def forward(self, tokens: Tensor) -> Tensor:
        x = tokens
        if self.cls_token is not None:
            cls = self.cls_token(tokens.new_ones(tokens.shape[0], 1))
            x = torch.cat([x[:, :1] + cls[:, None], x[:, 1:]], dim=1)
        x = self.norm(self.blocks(x))
        x = pool_tokens(x, self.pool, self.num_prefix_tokens)
        return self.head(self.fc_norm(x))

    def delta_tensors(self) -> dict[str, Tensor]:
        out = {k: p - self._w0[k] for k, p in self._timm_params().items()}
        if self.cls_token is not None:
            out[CLS_DELTA_KEY] = self.cls_token.weight.t().reshape(1, 1, -1)
        return out

    @torch.no_grad()
    def load_delta_tensors(self, delta: dict[str, Tensor]) -> None:
        for k, p in self._timm_params().items():
            p.copy_(self._w0[k] + delta[k])
        if self.cls_token is not None:
            self.cls_token.weight.copy_(delta[CLS_DELTA_KEY].reshape(-1, 1))


class NLFTViT(_FineTunedViT):
    """NLFT-k: ``trunk`` (frozen) + ``linearized`` (the non-linear trainable tail)."""

    output_mode = "linear"

    @classmethod
    def from_timm(cls, backbone: nn.Module, num_classes: int, linearized_blocks: int = 1,
                  reinit: bool = True, linearize_cls: bool = False, seed: int = 0,
                  pool: Optional[str] = None, identity: Optional[dict] = None) -> "NLFTViT":
        base = prepare_base(backbone, num_classes, linearized_blocks, reinit, seed, pool)
        first = len(base.blocks) - linearized_blocks
        options = {"method": "nlft", "num_classes": num_classes, "linearized_blocks": linearized_blocks,
                   "reinit": reinit, "linearize_cls": linearize_cls, "seed": seed,
                   "pool": tail_pool(base), "first_block": first} | dict(identity or {})
        return cls(base, Trunk(base, first), NLFTTail(base, linearized_blocks, linearize_cls), options)
