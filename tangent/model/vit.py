"""Tangent (linearized) ViT for TAFT-k.

f_lin(x; w0 + Δ) = f(x; w0) + J_w f(x; w0)·Δ, where only the weights of the last k blocks, the
final norm (and fc_norm) and the head carry a Δ. Earlier blocks form a frozen ``trunk`` that is
run once without a tangent stream; ``linearized`` maps the trunk's tokens to the logits and holds
every trainable Δ (so Opacus wraps it and the feature cache feeds it).

Opacus layout: a Δ is always the weight of a standard ``nn.Linear`` / ``nn.LayerNorm`` applied to
a *primal* activation (the JVP is linear in Δ with primal coefficients), zero-initialised, so the
stock grad samplers and ghost clipping apply. Frozen w0 weights are buffers. LayerScale γ is kept
frozen (the tangent still flows through γ): its Δ would be an elementwise product that Opacus has
no grad sampler for, and it adds d parameters to a block of 12·d².

CLS-only path: when the model pools the CLS token, the last linearized block needs keys and
values of all tokens but everything else only on the CLS row; :class:`TangentClsAttention` also
folds Wk, Wv and their Δ onto the CLS query by associativity, so that no O(N·d²) product is left
(measured cost: docs/benchmarks.md, "Speed").

Over 500 lines: the tangent block, its CLS-only path and the model wrapping them are one model; the
layers' JVPs are in :mod:`tangent.model.layers`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tangent.model import layers

OUTPUT_MODES = ("linear", "jvp")
POOLS = ("token", "avg")
#: the tail's pooling for a distilled (DeiT) backbone: timm averages the class-token and the
#: distillation-token logits; with one shared head that is the head of the two tokens' mean
DISTILLED_POOL = "token+dist"
CLS_DELTA_KEY = "cls_token.delta"


class UnsupportedBackbone(NotImplementedError):
    """A backbone whose tangent the closed form does not cover, refused by name with the reason."""


def _unsupported_part(vit: nn.Module) -> Optional[str]:
    """Why the closed-form tangent does not cover ``vit`` (None when it does): a timm
    VisionTransformer of pre-norm blocks (LayerNorm → attention → LayerScale/none → residual,
    LayerNorm → exact-GELU MLP → LayerScale/none → residual), token or average pooling."""
    for name in ("blocks", "norm", "fc_norm", "head", "patch_embed", "_pos_embed"):
        if not hasattr(vit, name):
            return f"not a timm VisionTransformer (it has no {name!r})"
    if getattr(vit, "attn_pool", None) is not None:
        return f"attention pooling (global_pool {vit.global_pool!r}) has no closed-form tangent here"
    if vit.global_pool not in POOLS:
        return f"global_pool {vit.global_pool!r}: only {' / '.join(POOLS)} pooling is linearized"
    if getattr(vit, "pool_include_prefix", False):
        return "average pooling over the prefix tokens too (pool_include_prefix)"
    for name in ("norm", "fc_norm"):
        reason = _norm_problem(getattr(vit, name))
        if reason:
            return f"final {name}: {reason}"
    for i, block in enumerate(vit.blocks):
        reason = _block_problem(block)
        if reason:
            return f"block {i}: {reason}"
    return None


def _norm_problem(norm: nn.Module) -> Optional[str]:
    if isinstance(norm, nn.Identity):
        return None
    if not isinstance(norm, nn.LayerNorm) or type(norm).__name__ != "LayerNorm":
        return f"{type(norm).__name__} is not a LayerNorm (RMSNorm and others have no rule here)"
    if not (norm.elementwise_affine and norm.bias is not None):
        return "LayerNorm without affine weight and bias"
    return None


def _block_problem(block: nn.Module) -> Optional[str]:
    kind = type(block).__name__
    if kind != "Block" or not all(hasattr(block, n) for n in ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")):
        return (f"{kind} is not timm's pre-norm Block (post-norm, parallel and other block layouts "
                "have no closed-form tangent here)")
    for name in ("norm1", "norm2"):
        reason = _norm_problem(getattr(block, name))
        if reason:
            return f"{name}: {reason}"
    attn = block.attn
    if type(attn).__name__ != "Attention" or not hasattr(attn, "qkv"):
        return f"{type(attn).__name__} is not timm's plain Attention (fused qkv; RoPE, diff-attention... are not covered)"
    for name, what in (("q_norm", "qk-norm"), ("k_norm", "qk-norm"), ("norm", "attention output norm")):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            return f"{what} in the attention"
    if getattr(attn, "gate", None) is not None:
        return "gated attention"
    mlp = block.mlp
    if type(mlp).__name__ != "Mlp" or not hasattr(mlp, "fc1"):
        return f"MLP {type(mlp).__name__} (SwiGLU/GLU MLPs are not covered; timm's Mlp is)"
    act = mlp.act
    if not (type(act) is nn.GELU and act.approximate == "none"):
        return f"MLP activation {type(act).__name__}{'(tanh)' if isinstance(act, nn.GELU) else ''}: only exact (erf) GELU"
    if not isinstance(mlp.norm, nn.Identity):
        return "a norm inside the MLP"
    for name in ("ls1", "ls2"):
        ls = getattr(block, name)
        if not (isinstance(ls, nn.Identity) or (type(ls).__name__ == "LayerScale" and hasattr(ls, "gamma"))):
            return f"{name} is {type(ls).__name__}, not LayerScale or none"
    return None


def check_linearizable_backbone(vit: nn.Module, name: str = "") -> None:
    """Refuse, by name and with the reason, a backbone the closed-form tangent does not cover."""
    reason = _unsupported_part(vit)
    if reason:
        label = name or getattr(vit, "default_cfg", {}).get("architecture") or type(vit).__name__
        raise UnsupportedBackbone(f"backbone {label!r} cannot be linearized: {reason}")


def _zero_(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def _factory(t: Tensor) -> dict:
    return {"dtype": t.dtype, "device": t.device}


class DeltaModule(nn.Module):
    """A tangent module whose Δ can be read and written under timm's parameter names."""

    def delta_tensors(self) -> dict[str, Tensor]:
        out = {}
        for name, child in self.named_children():
            if isinstance(child, DeltaModule):
                out.update({f"{name}.{k}": v for k, v in child.delta_tensors().items()})
        return out

    def load_delta_tensors(self, delta: dict[str, Tensor]) -> None:
        for name, child in self.named_children():
            if isinstance(child, DeltaModule):
                prefix = name + "."
                child.load_delta_tensors({k[len(prefix):]: v for k, v in delta.items()
                                          if k.startswith(prefix)})


def _copy_into(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))


class TangentLinear(DeltaModule):
    """Linear at w0; Δ = zero-initialised ``nn.Linear`` on the primal input (dW·x + db)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.delta = _zero_(nn.Linear(linear.in_features, linear.out_features,
                                      bias=linear.bias is not None, **_factory(linear.weight)))

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        return layers.linear_jvp(x, dx, self.weight, self.bias, self.delta)

    def delta_tensors(self):
        out = {"weight": self.delta.weight}
        if self.delta.bias is not None:
            out["bias"] = self.delta.bias
        return out

    def load_delta_tensors(self, delta):
        _copy_into(self.delta.weight, delta["weight"])
        if self.delta.bias is not None:
            _copy_into(self.delta.bias, delta["bias"])


class TangentLayerNorm(DeltaModule):
    """LayerNorm at w0; Δ = zero-initialised ``nn.LayerNorm`` on the primal input (dγ⊙x̂ + dβ)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        if not (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None):
            raise NotImplementedError(f"unsupported norm layer {type(norm).__name__}")
        self.eps = norm.eps
        self.register_buffer("weight", norm.weight.detach().clone())
        self.register_buffer("bias", norm.bias.detach().clone())
        self.delta = _zero_(nn.LayerNorm(norm.normalized_shape, eps=norm.eps, **_factory(norm.weight)))

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        return layers.layer_norm_jvp(x, dx, self.weight, self.bias, self.eps, self.delta)

    def delta_tensors(self):
        return {"weight": self.delta.weight, "bias": self.delta.bias}

    def load_delta_tensors(self, delta):
        _copy_into(self.delta.weight, delta["weight"])
        _copy_into(self.delta.bias, delta["bias"])


class TangentIdentity(DeltaModule):
    def forward(self, x: Tensor, dx: Optional[Tensor]):
        return x, dx


def _tangent_norm(norm: nn.Module) -> DeltaModule:
    return TangentIdentity() if isinstance(norm, nn.Identity) else TangentLayerNorm(norm)


class TangentLayerScale(DeltaModule):
    """LayerScale with frozen γ (or identity when the block has none)."""

    def __init__(self, ls: nn.Module):
        super().__init__()
        gamma = None if isinstance(ls, nn.Identity) else ls.gamma.detach().clone()
        self.register_buffer("gamma", gamma)

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        return layers.layer_scale_jvp(x, dx, self.gamma)


class TangentMlp(DeltaModule):
    """fc1 → exact GELU → fc2 (timm ``Mlp``)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        act = mlp.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none") or not isinstance(mlp.norm, nn.Identity):
            raise NotImplementedError("TangentMlp supports timm Mlp with exact GELU and no hidden norm")
        self.fc1 = TangentLinear(mlp.fc1)
        self.fc2 = TangentLinear(mlp.fc2)

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        h, dh = self.fc1(x, dx)
        h, dh = layers.gelu_jvp(h, dh)
        return self.fc2(h, dh)


def _check_attention(attn: nn.Module) -> None:
    plain = all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
    if not plain or getattr(attn, "gate", None) is not None:
        raise NotImplementedError("TangentAttention supports timm Attention without qk/scale norm or gate")


class TangentAttention(DeltaModule):
    """Multi-head self-attention on all tokens (timm ``Attention``), softmax JVP in O(N²) per head."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        _check_attention(attn)
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv = TangentLinear(attn.qkv)
        self.proj = TangentLinear(attn.proj)

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        B, N, _ = x.shape
        qkv, dqkv = self.qkv(x, dx)

        def split(t):
            return t.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        q, k, v = split(qkv)
        dq, dk, dv = split(dqkv) if dqkv is not None else (None, None, None)
        o, do = layers.attention_jvp(q, k, v, dq, dk, dv, self.scale)

        def merge(t):
            return None if t is None else t.transpose(1, 2).reshape(B, N, -1)

        return self.proj(merge(o), merge(do))


def _expand_block_diagonal(t: Tensor) -> Tensor:
    """[B, H, e] -> [B, H, H·e] with head h's vector in block h of row h, zeros elsewhere."""
    H = t.shape[1]
    eye = torch.eye(H, dtype=t.dtype, device=t.device)
    return (eye[None, :, :, None] * t[:, :, None, :]).flatten(2)


def _diagonal_blocks(t: Tensor, H: int) -> Tensor:
    """[B, H, H·e] -> [B, H, e]: block h of row h."""
    B = t.shape[0]
    return t.view(B, H, H, -1).diagonal(dim1=1, dim2=2).transpose(1, 2)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class TangentClsAttention(DeltaModule):
    """Attention output of the CLS query only, with Wk, Wv and their Δ folded by associativity.

    Input: LN-1 output of all tokens xl [B, N, d] and its tangent dxl. Per head h, with q the
    CLS query, r_h = Wk_hᵀ q_h and u_h = dWk_hᵀ q_h:
      s_hj  = r_h·xl_j · scale                         (q_h·bk_h is constant in j: softmax drops it)
      ds_hj = ((Wk_hᵀ dq_h + u_h)·xl_j + r_h·dxl_j) · scale    (dbk drops out for the same reason)
      o_h   = Wv_h (Σ_j a_hj xl_j) + bv_h
      do_h  = Wv_h (Σ_j da_hj xl_j + Σ_j a_hj dxl_j) + dWv_h (Σ_j a_hj xl_j) + dbv_h
    O(N·d + d²) per head and example instead of O(N·d²).

    Opacus layout of the qkv Δ: ``q_delta`` (dWq, dbq) on the CLS row; ``k_delta_t`` holds dWkᵀ
    and is applied to the block-diagonal expansion of q (row h = q_h in block h), giving
    row h = dWk_hᵀ q_h; ``v_delta`` (dWv, dbv) is applied to the H attention-weighted means and
    only its diagonal blocks are read. The key-bias Δ is kept as an inert buffer (its gradient is
    identically zero) so that qkv.bias round-trips.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        _check_attention(attn)
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        e = attn.num_heads * attn.head_dim
        w = attn.qkv.weight.detach().clone()
        b = attn.qkv.bias.detach().clone() if attn.qkv.bias is not None else None
        d = w.shape[1]
        fac = _factory(w)
        for i, name in enumerate("qkv"):
            self.register_buffer(f"w{name}", w[i * e:(i + 1) * e])
            self.register_buffer(f"b{name}", None if b is None else b[i * e:(i + 1) * e])
        has_bias = b is not None
        self.q_delta = _zero_(nn.Linear(d, e, bias=has_bias, **fac))
        self.k_delta_t = _zero_(nn.Linear(e, d, bias=False, **fac))
        self.register_buffer("k_bias_delta", torch.zeros(e, **fac) if has_bias else None)
        self.v_delta = _zero_(nn.Linear(d, e, bias=has_bias, **fac))
        self.proj = TangentLinear(attn.proj)

    def forward(self, xl: Tensor, dxl: Tensor):
        B, N, d = xl.shape
        H, e = self.num_heads, self.head_dim
        x0, dx0 = xl[:, 0], dxl[:, 0]
        q = F.linear(x0, self.wq, self.bq).view(B, H, e)
        dq = (F.linear(dx0, self.wq) + self.q_delta(x0)).view(B, H, e)
        wk = self.wk.view(H, e, d)
        r = torch.einsum("bhe,hed->bhd", q, wk)
        w = torch.einsum("bhe,hed->bhd", dq, wk) + self._k_delta_rows(q)
        s = torch.einsum("bhd,bnd->bhn", r, xl) * self.scale
        ds = (torch.einsum("bhd,bnd->bhn", w, xl) + torch.einsum("bhd,bnd->bhn", r, dxl)) * self.scale
        a, da = layers.softmax_jvp(s, ds)
        mean_x = torch.einsum("bhn,bnd->bhd", a, xl)
        mean_dx = torch.einsum("bhn,bnd->bhd", da, xl) + torch.einsum("bhn,bnd->bhd", a, dxl)
        wv = self.wv.view(H, e, d)
        o = torch.einsum("bhd,hed->bhe", mean_x, wv)
        if self.bv is not None:
            o = o + self.bv.view(H, e)
        do = torch.einsum("bhd,hed->bhe", mean_dx, wv) + self._v_delta_rows(mean_x)
        return self.proj(o.reshape(B, H * e), do.reshape(B, H * e))

    # The two Δ below are applied through their nn.Linear, on all H×H head pairs, only while
    # hooks watch it (Opacus's per-sample gradients); otherwise one einsum per head pair that
    # is used, H× fewer flops.

    def _k_delta_rows(self, q: Tensor) -> Tensor:
        """Row h = dWk_hᵀ q_h, from q [B, H, e]."""
        linear = self.k_delta_t
        if _hooked(linear):
            return linear(_expand_block_diagonal(q))
        return torch.einsum("bhe,dhe->bhd", q, linear.weight.view(-1, *q.shape[1:]))

    def _v_delta_rows(self, mean_x: Tensor) -> Tensor:
        """Row h = dWv_h mean_x_h + dbv_h, from mean_x [B, H, d]."""
        linear, H = self.v_delta, mean_x.shape[1]
        if _hooked(linear):
            return _diagonal_blocks(linear(mean_x), H)
        out = torch.einsum("bhd,hed->bhe", mean_x, linear.weight.view(H, -1, mean_x.shape[2]))
        return out if linear.bias is None else out + linear.bias.view(H, -1)

    def delta_tensors(self):
        out = {"qkv.weight": torch.cat([self.q_delta.weight, self.k_delta_t.weight.t(), self.v_delta.weight])}
        if self.q_delta.bias is not None:
            out["qkv.bias"] = torch.cat([self.q_delta.bias, self.k_bias_delta, self.v_delta.bias])
        out.update({f"proj.{k}": v for k, v in self.proj.delta_tensors().items()})
        return out

    def load_delta_tensors(self, delta):
        dq, dk, dv = delta["qkv.weight"].chunk(3)
        _copy_into(self.q_delta.weight, dq)
        _copy_into(self.k_delta_t.weight, dk.t())
        _copy_into(self.v_delta.weight, dv)
        if self.q_delta.bias is not None:
            dq, dk, dv = delta["qkv.bias"].chunk(3)
            _copy_into(self.q_delta.bias, dq)
            _copy_into(self.k_bias_delta, dk)
            _copy_into(self.v_delta.bias, dv)
        self.proj.load_delta_tensors({k[5:]: v for k, v in delta.items() if k.startswith("proj.")})


class TangentBlock(DeltaModule):
    """Pre-norm transformer block (timm ``Block``). With ``cls_only`` it returns the CLS row only."""

    def __init__(self, block: nn.Module, cls_only: bool = False):
        super().__init__()
        for name in ("drop_path1", "drop_path2"):
            if not isinstance(getattr(block, name), nn.Identity):
                raise NotImplementedError("drop path in a linearized block")
        self.cls_only = cls_only
        self.norm1 = TangentLayerNorm(block.norm1)
        self.attn = TangentClsAttention(block.attn) if cls_only else TangentAttention(block.attn)
        self.ls1 = TangentLayerScale(block.ls1)
        self.norm2 = TangentLayerNorm(block.norm2)
        self.mlp = TangentMlp(block.mlp)
        self.ls2 = TangentLayerScale(block.ls2)

    def forward(self, x: Tensor, dx: Optional[Tensor]):
        h, dh = self.norm1(x, dx)
        h, dh = self.attn(h, dh)
        h, dh = self.ls1(h, dh)
        if self.cls_only:
            x, dx = x[:, 0], None if dx is None else dx[:, 0]
        x, dx = layers.residual_jvp(x, dx, h, dh)
        h, dh = self.norm2(x, dx)
        h, dh = self.mlp(h, dh)
        h, dh = self.ls2(h, dh)
        return layers.residual_jvp(x, dx, h, dh)


class TangentClsToken(DeltaModule):
    """Own Δ of the CLS token entering the first linearized block (``cls_token.delta``).

    Kept as the weight [d, 1] of an ``nn.Linear(1, d)`` applied to a constant 1 so that Opacus
    sees a standard layer.
    """

    def __init__(self, dim: int, like: Tensor):
        super().__init__()
        self.delta = _zero_(nn.Linear(1, dim, bias=False, **_factory(like)))

    def forward(self, tokens: Tensor) -> Tensor:
        """The tangent of all tokens: Δ on row 0, zero elsewhere."""
        B, N, d = tokens.shape
        cls = self.delta(tokens.new_ones(B, 1))
        return torch.cat([cls[:, None], tokens.new_zeros(B, N - 1, d)], dim=1)

    def delta_tensors(self):
        return {"": self.delta.weight.t().reshape(1, 1, -1)}

    def load_delta_tensors(self, delta):
        _copy_into(self.delta.weight, delta[""].reshape(-1, 1))


class TangentTail(DeltaModule):
    """``tokens -> logits`` of f_lin: the linearized blocks, final norm, pooling, fc_norm, head."""

    def __init__(self, vit: nn.Module, linearized_blocks: int, pool: str, linearize_cls: bool,
                 cls_only: bool, output_mode: str = "linear"):
        super().__init__()
        depth = len(vit.blocks)
        self.first_block = depth - linearized_blocks
        self.pool, self.num_prefix_tokens = pool, vit.num_prefix_tokens
        self.cls_only = cls_only
        self.output_mode = output_mode
        self.cls_token = TangentClsToken(vit.embed_dim, vit.head.weight) if linearize_cls else None
        self.blocks = nn.ModuleList(
            TangentBlock(vit.blocks[i], cls_only=cls_only and i == depth - 1)
            for i in range(self.first_block, depth))
        self.norm = _tangent_norm(vit.norm)
        self.fc_norm = _tangent_norm(vit.fc_norm)
        self.head = TangentLinear(vit.head)
        self.frozen_rows = 0  # see read_frozen_rows (off by default)

    def read_frozen_rows(self, rows: int) -> None:
        """Let the head also read ``rows`` frozen feature vectors [B, rows, d] that the caller
        appends after the token rows (e.g. pooled pieces of the pretrained backbone).

        They skip the blocks and norms and are concatenated to the head's input with a zero
        tangent; the head is widened by zero columns at w0, so f(x; w0) is unchanged and the
        model stays linear in Δ (the new columns' Δ multiplies a primal input that does not
        depend on Δ): composition by averaging Δ is still exact. Experiments only (the
        issue-15 question whether TAFT gains from a richer head); off by default.
        """
        if self.frozen_rows:
            raise RuntimeError("the head already reads frozen rows")
        if not (isinstance(rows, int) and rows > 0):
            raise ValueError(f"rows must be an int > 0, got {rows!r}")
        old = self.head
        wide = nn.Linear(old.weight.shape[1] * (1 + rows), old.weight.shape[0], bias=old.bias is not None,
                         **_factory(old.weight))
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, :old.weight.shape[1]] = old.weight
            if old.bias is not None:
                wide.bias.copy_(old.bias)
        self.head = TangentLinear(wide)
        self.frozen_rows = rows

    @property
    def output_mode(self) -> str:
        return self._output_mode

    @output_mode.setter
    def output_mode(self, mode: str) -> None:
        if mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {mode!r}")
        self._output_mode = mode

    def forward(self, tokens: Tensor) -> Tensor:
        frozen = None
        if self.frozen_rows:
            tokens, frozen = tokens[:, :-self.frozen_rows], tokens[:, -self.frozen_rows:].flatten(1)
        x, dx = tokens, None
        if self.cls_token is not None:
            dx = self.cls_token(tokens)
        for block in self.blocks:
            x, dx = block(x, dx)
        x, dx = self.norm(x, dx)
        if not self.cls_only:  # the CLS-only block already returned the pooled row
            x, dx = self._pool(x), self._pool(dx)
        x, dx = self.fc_norm(x, dx)
        if frozen is not None:
            frozen = frozen.to(x)
            x = torch.cat([x, frozen], dim=1)
            dx = None if dx is None else torch.cat([dx, torch.zeros_like(frozen)], dim=1)
        y, dy = self.head(x, dx)
        return dy if self.output_mode == "jvp" else y + dy

    def _pool(self, x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else pool_tokens(x, self.pool, self.num_prefix_tokens)

    def delta_tensors(self):
        out = {}
        for name, child in self.named_children():
            if name == "blocks":
                for j, block in enumerate(child):
                    out.update({f"blocks.{self.first_block + j}.{k}": v
                                for k, v in block.delta_tensors().items()})
            elif name == "cls_token":
                out[CLS_DELTA_KEY] = child.delta_tensors()[""]
            elif isinstance(child, DeltaModule):
                out.update({f"{name}.{k}": v for k, v in child.delta_tensors().items()})
        return out

    def load_delta_tensors(self, delta):
        for j, block in enumerate(self.blocks):
            prefix = f"blocks.{self.first_block + j}."
            block.load_delta_tensors({k[len(prefix):]: v for k, v in delta.items() if k.startswith(prefix)})
        if self.cls_token is not None:
            self.cls_token.load_delta_tensors({"": delta[CLS_DELTA_KEY]})
        for name in ("norm", "fc_norm", "head"):
            getattr(self, name).load_delta_tensors(
                {k[len(name) + 1:]: v for k, v in delta.items() if k.startswith(name + ".")})


class Trunk(nn.Module):
    """Frozen ``images -> tokens`` entering the first linearized block (incl. prefix tokens).

    It shares its tensors with ``vit`` (w0, frozen too) instead of copying them: one copy of the
    backbone per process, not two (every Ray worker and the ServerApp hold one).
    """

    def __init__(self, vit: nn.Module, num_blocks: int):
        super().__init__()
        vit = _shallow_copy(vit)
        vit.blocks = vit.blocks[:num_blocks]
        vit.norm = vit.fc_norm = vit.head = nn.Identity()
        vit.requires_grad_(False)
        self.vit = vit
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # always deterministic

    def forward(self, images: Tensor) -> Tensor:
        v = self.vit
        x = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))
        return v.blocks(x)


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object over the same children and tensors: replacing a child of the copy
    leaves ``module`` untouched."""
    new = copy.copy(module)
    for name in ("_modules", "_parameters", "_buffers"):
        setattr(new, name, type(getattr(module, name))(getattr(module, name)))
    return new


def _reset_linear_(linear: nn.Linear, gen: torch.Generator, std: float) -> None:
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std, generator=gen)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _reinit_(module: nn.Module, gen: torch.Generator) -> None:
    """timm-style init (trunc-normal 0.02, zero bias, unit norms, LayerScale at its init value),
    drawn from ``gen`` in module order so every client builds the same w0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _reset_linear_(m, gen, 0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif hasattr(m, "gamma") and hasattr(m, "init_values"):
            nn.init.constant_(m.gamma, m.init_values)


def prepare_base(backbone: nn.Module, num_classes: int, linearized_blocks: int, reinit: bool,
                 seed: int, pool: Optional[str]) -> nn.Module:
    """w0 as a timm model: a copy of ``backbone`` with the TAFT re-initialisation and head.

    The head is drawn from the seed (normal, std 1/√d, zero bias) whenever the backbone has
    no head of the right size or ``reinit`` is set: a zero head would zero the JVP w.r.t.
    the blocks, and a 1/√d scale keeps that JVP at the scale of the logits.
    """
    check_linearizable_backbone(backbone)
    depth = len(backbone.blocks)
    if not 1 <= linearized_blocks <= depth:
        raise ValueError(f"linearized_blocks must be in [1, {depth}], got {linearized_blocks}")
    base = copy.deepcopy(backbone).eval()
    distilled = getattr(base, "dist_token", None) is not None
    pool = base.global_pool if pool is None else pool
    if pool not in POOLS:
        raise NotImplementedError(f"pooling must be one of {POOLS}, got {pool!r}")
    if pool == "token" and not getattr(base, "has_class_token", True):
        raise ValueError("token pooling needs the class token")
    if distilled and pool != "token":
        raise UnsupportedBackbone("a distilled backbone pools its class and distillation tokens: "
                                  f"pool {pool!r} is not what timm computes for it")
    base.global_pool = pool
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if reinit:
            for block in base.blocks[depth - linearized_blocks:]:
                _reinit_(block, gen)
            _reinit_(base.norm, gen)
            _reinit_(base.fc_norm, gen)
        head = base.head
        if reinit or not (isinstance(head, nn.Linear) and head.out_features == num_classes):
            ref = base.cls_token if base.cls_token is not None else base.pos_embed
            head = nn.Linear(base.embed_dim, num_classes, **_factory(ref))
            nn.init.normal_(head.weight, std=base.embed_dim ** -0.5, generator=gen)
            nn.init.zeros_(head.bias)
    if distilled:
        base.head_dist = head  # one head for both tokens: Δ has one set of head weights
    base.head = head
    base.num_classes = num_classes
    base.requires_grad_(False)
    return base


def pool_tokens(x: Tensor, pool: str, num_prefix_tokens: int) -> Tensor:
    """[B, N, d] -> [B, d] as timm pools (linear in x: the tangent pools the same way)."""
    if pool == "token":
        return x[:, 0]
    if pool == DISTILLED_POOL:
        return (x[:, 0] + x[:, 1]) / 2
    return x[:, num_prefix_tokens:].mean(dim=1)


def tail_pool(base: nn.Module) -> str:
    """The pooling the tail computes for a base from :func:`prepare_base`."""
    return DISTILLED_POOL if getattr(base, "dist_token", None) is not None else base.global_pool


def state_digest(state: dict[str, Tensor], options: dict) -> str:
    """sha256 over named tensors (sorted, with dtype and shape) and the options as JSON."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def add_cls_delta_hook(vit: nn.Module, first_block: int, cls_delta: Tensor):
    """Add ``cls_delta`` to the CLS token entering ``vit.blocks[first_block]`` (w0+Δ as timm)."""
    def hook(_module, args):
        x = args[0]
        return (torch.cat([x[:, :1] + cls_delta.reshape(1, 1, -1), x[:, 1:]], dim=1),) + args[1:]
    return vit.blocks[first_block].register_forward_pre_hook(hook)


class _FineTunedViT(nn.Module):
    """What TAFT and NLFT share: trunk + trainable tail, Δ under timm names, w0 and its digest."""

    def __init__(self, base: nn.Module, trunk: Trunk, linearized: DeltaModule, options: dict):
        super().__init__()
        self.trunk = trunk
        self.linearized = linearized
        self.options = options
        self._base = base  # w0, not a submodule: kept out of state_dict() and parameters()

    def __setattr__(self, name, value):
        if name == "_base":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._base is not None:
            self._base._apply(fn)
        return self

    @property
    def w0_module(self) -> Optional[nn.Module]:
        """w0 as the timm model it was built from (None after :meth:`drop_frozen`)."""
        return self._base

    def drop_frozen(self) -> None:
        """Free w0's frozen weights (trunk and base), keeping the trainable tail: for a process
        that only ever runs cached trunk tokens through ``linearized`` (the ServerApp). The
        trunk, base_digest() and the base models are gone afterwards."""
        del self.trunk
        self._base = None

    def forward(self, images: Tensor) -> Tensor:
        if getattr(self.linearized, "frozen_rows", 0):
            raise RuntimeError("this tail reads frozen rows appended to the tokens: call "
                               "model.linearized on tokens with those rows")
        return self.linearized(self.trunk(images))

    def delta_state_dict(self) -> dict[str, Tensor]:
        """A CPU copy of Δ, wherever the model runs (what is sent, stored and composed)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.linearized.delta_tensors().items()}

    def load_delta(self, delta: dict[str, Tensor]) -> None:
        expected = self.linearized.delta_tensors()
        missing, unexpected = set(expected) - set(delta), set(delta) - set(expected)
        if missing or unexpected:
            raise KeyError(f"delta keys mismatch: missing={sorted(missing)} unexpected={sorted(unexpected)}")
        for k, v in delta.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{k}: shape {tuple(v.shape)} != {tuple(expected[k].shape)}")
        self.linearized.load_delta_tensors({k: v.to(expected[k]) for k, v in delta.items()})

    def base_digest(self) -> str:
        return state_digest(self._w0().state_dict(), self.options)

    def base_model(self) -> nn.Module:
        return copy.deepcopy(self._w0())

    def _w0(self) -> nn.Module:
        if self._base is None:
            raise RuntimeError("drop_frozen() freed w0's frozen weights: rebuild the model")
        return self._base

    def base_model_with_delta(self, delta: dict[str, Tensor]) -> nn.Module:
        """The non-linear timm model at w0 + Δ (the CLS Δ enters through a forward pre-hook)."""
        model = self.base_model()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in delta.items():
                if k != CLS_DELTA_KEY:
                    params[k].add_(v.to(params[k]))
        if CLS_DELTA_KEY in delta:
            add_cls_delta_hook(model, self.options["first_block"], delta[CLS_DELTA_KEY].to(params["pos_embed"]))
        return model


class TangentViT(_FineTunedViT):
    """TAFT-k: f(x; w0) + J f(x; w0)·Δ over the last k blocks, final norm(s) and head."""

    @classmethod
    def from_timm(cls, backbone: nn.Module, num_classes: int, linearized_blocks: int = 1,
                  reinit: bool = True, linearize_cls: bool = False, seed: int = 0,
                  pool: Optional[str] = None, *, output_mode: str = "linear",
                  cls_only: Optional[bool] = None, identity: Optional[dict] = None) -> "TangentViT":
        """``cls_only=None`` takes the CLS-only last block whenever the model pools the CLS token;
        ``False`` forces the full path (for checking). ``identity``: more options that name w0
        (backbone, weights digest), hashed into the base digest."""
        base = prepare_base(backbone, num_classes, linearized_blocks, reinit, seed, pool)
        first = len(base.blocks) - linearized_blocks
        pool = tail_pool(base)
        cls_only = pool == "token" if cls_only is None else cls_only
        if cls_only and pool != "token":
            raise ValueError("the CLS-only path needs token pooling")
        tail = TangentTail(base, linearized_blocks, pool, linearize_cls, cls_only, output_mode)
        options = {"method": "taft", "num_classes": num_classes, "linearized_blocks": linearized_blocks,
                   "reinit": reinit, "linearize_cls": linearize_cls, "seed": seed,
                   "pool": pool, "first_block": first} | dict(identity or {})
        return cls(base, Trunk(base, first), tail, options)

    def read_frozen_rows(self, rows: int) -> "TangentViT":
        """TangentTail.read_frozen_rows, recorded in the options (and so in the base digest)."""
        self.linearized.read_frozen_rows(rows)
        self.options["frozen_rows"] = rows
        return self

    @property
    def output_mode(self) -> str:
        return self.linearized.output_mode

    @output_mode.setter
    def output_mode(self, mode: str) -> None:
        self.linearized.output_mode = mode
