"""What several test modules share: a tiny timm ViT standing in for the pretrained backbone, the
tangent model over it, random inputs, tokens and Δ, and the site registry the withdrawal tests write.

The tiny ViT has the pretrained model's layout at toy size (28-px images, 7-px patches: 16 patches
+ CLS = 17 tokens of width 32, 3 blocks, 4 heads), so every code path runs in milliseconds.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer

from torch.func import functional_call, jvp

from tangent.model.vit import CLS_DELTA_KEY, TangentViT, add_cls_delta_hook

TINY_IMG = 28
TINY_TOKENS, TINY_DIM = 17, 32


def tiny_vit(init_values: float | None = None, pool: str = "token", seed: int = 0, dtype=torch.float64, *,
             spread: bool = False) -> VisionTransformer:
    """The tiny timm ViT, seeded, in eval mode; float64 by default (the exactness checks).
    ``init_values``: LayerScale γ (None: none).
    ``spread``: larger random block weights and positional embeddings. At timm's init (std 0.02)
    the blocks are nearly linear and pooled tokens carry almost nothing about an image; spread
    weights give features a linear probe can read (~70 % on digits)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=TINY_IMG, patch_size=7, embed_dim=TINY_DIM, depth=3, num_heads=4,
                            mlp_ratio=2.0, qkv_bias=True, init_values=init_values, num_classes=0,
                            global_pool=pool)
    if spread:
        with torch.no_grad():
            vit.pos_embed.normal_(0, 1)
            vit.cls_token.normal_(0, 1)
            for p in vit.blocks.parameters():
                if p.ndim == 2:
                    p.normal_(0, 0.3)
    return vit.to(dtype).eval()


def tiny_model(pool: str = "token", seed: int = 0, *, spread: bool = False) -> TangentViT:
    """TAFT-1 over the float32 tiny ViT with 10 classes (CLS pooling: the CLS-only last block)."""
    backbone = tiny_vit(pool=pool, seed=seed, dtype=torch.float32, spread=spread)
    return TangentViT.from_timm(backbone, num_classes=10, seed=seed)


def images(n: int = 3, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    """Preprocessed-looking random images [n, 3, 28, 28]."""
    return torch.randn(n, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def uint8_images(n: int = 40, seed: int = 0) -> np.ndarray:
    """Raw grey images [n, 8, 8] uint8, as a data set holds them (preprocessing resizes them)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def random_tokens(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk tokens [n, 17, 32] and labels [n] in 0..9, as the token cache feeds the last block."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, TINY_TOKENS, TINY_DIM, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def random_delta(model, seed: int = 2, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A seeded random Δ for every trainable tensor of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=gen, dtype=v.dtype)
            for k, v in model.delta_state_dict().items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def registry_entry(pub, node_id=None, max_examples=1000, revoked=False, base=None) -> dict:
    """A version-2 registry entry for the public key file ``pub`` (as deploy.register writes it)."""
    from server.trust.registry import key_fingerprint, load_public_key

    path = f"keys/{pub.name}" if base is None else str(pub)
    return {"public_key": path, "fingerprint": key_fingerprint(load_public_key(pub)), "node_id": node_id,
            "max_examples": max_examples, "registered_at": "2026-11-30T00:00:00Z", "revoked": revoked}


def write_registry(path, sites: dict, admin_pub=None) -> None:
    """The registry file ``path`` with ``sites`` (site id -> entry) and the admin key, if any."""
    from server.trust.registry import key_fingerprint, load_public_key

    document = {"version": 2, "sites": sites}
    if admin_pub is not None:
        document["admin"] = {"public_key": f"keys/{admin_pub.name}",
                             "fingerprint": key_fingerprint(load_public_key(admin_pub))}
    path.write_text(json.dumps(document))


def reference_jvp(model, x, delta):
    """(f(w0), J f(w0)·Δ) of the plain timm model, by torch.func.jvp."""
    base = model.base_model()
    for m in base.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False  # torch.func.jvp has no rule for fused attention on CPU
    params = dict(base.named_parameters())
    names = [k for k in delta if k != CLS_DELTA_KEY]
    cls = delta.get(CLS_DELTA_KEY, torch.zeros(1, 1, base.embed_dim, dtype=x.dtype))

    def f(p, c):
        handle = add_cls_delta_hook(base, model.options["first_block"], c)
        try:
            return functional_call(base, p, (x,))
        finally:
            handle.remove()

    return jvp(f, ({k: params[k] for k in names}, torch.zeros_like(cls)),
               ({k: delta[k] for k in names}, cls))


def assert_tangent_is_the_jvp(model, x: torch.Tensor) -> None:
    """The model with a random Δ against torch.func.jvp of its timm model on ``x``, float64: w0 + Δ
    output and the tangent alone, both to 1e-10, and the Δ moves the output."""
    delta = random_delta(model)
    model.load_delta(delta)
    primal, tangent = reference_jvp(model, x, delta)
    with torch.no_grad():
        out = model(x)
        model.output_mode = "jvp"
        out_jvp = model(x)
    assert rel_err(out, primal + tangent) <= 1e-10
    assert rel_err(out_jvp, tangent) <= 1e-10
    assert rel_err(tangent, primal) > 1e-3  # the Δ actually moves the output
