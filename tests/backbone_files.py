"""Small timm ViT checkpoints with random weights, written to disk in the layouts a user brings
(timm's config.json directory, a bare .safetensors file, a torch state dict)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMG_SIZE = 32
SMALL = {"embed_dim": 32, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0}
#: variant -> (timm architecture, constructor arguments on top of SMALL)
VARIANTS = {
    "avg-pool": ("vit_small_patch16_224", {"global_pool": "avg", "patch_size": 16}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"patch_size": 8}),  # 4 register tokens, LayerScale
    "no-layerscale-no-qkv-bias": ("vit_small_patch16_224", {"qkv_bias": False, "patch_size": 8}),
    "distilled": ("deit_tiny_distilled_patch16_224", {"patch_size": 8}),  # class + distillation token
    "dinov2-patch8": ("vit_small_patch14_dinov2", {"patch_size": 8}),
}


def build(variant: str, seed: int = 0, *, untrained: bool = False):
    """The variant as timm builds it, with seeded random weights (no pretrained init is at zero);
    ``untrained``: exactly timm's initialisation."""
    import timm

    arch, args = VARIANTS[variant]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=IMG_SIZE, num_classes=0, **(SMALL | args))
    if untrained:
        return model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # LayerScale, biases and norms away from their init
        # weights of unit gain and LayerScale near 0.5, as in a trained ViT: at timm's init (std
        # 0.02, LayerScale 1e-5) every block barely moves the residual stream, all images get
        # nearly the same features, and the short-schedule guard's ridge head leaves the ledger's
        # fixed-point range (docs/backbones.md, "Checkpoints with untrained weights")
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.copy_(torch.randn_like(module.weight) / module.weight[0].numel() ** 0.5)
            elif hasattr(module, "gamma"):
                module.gamma.add_(0.5)
    return model.eval()


def model_args(variant: str) -> dict:
    return SMALL | VARIANTS[variant][1]


def save(directory: Path, variant: str, *, seed: int = 0, layout: str = "timm",
         mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), untrained: bool = False) -> Path:
    """Write the variant's weights; returns what ``backbone-weights`` names.

    ``timm``: a directory with config.json (architecture, model_args, pretrained_cfg) and
    model.safetensors. ``safetensors``/``state-dict``: a bare file with a sidecar config.json of
    the same name (model_args are needed to build a small model; a full-size timm model has none).
    """
    from safetensors.torch import save_file

    arch = VARIANTS[variant][0]
    state = {k: v.contiguous() for k, v in build(variant, seed, untrained=untrained).state_dict().items()}
    config = {"architecture": arch, "model_args": model_args(variant),
              "pretrained_cfg": {"input_size": [3, IMG_SIZE, IMG_SIZE], "mean": list(mean), "std": list(std)}}
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "timm":
        save_file(state, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(config))
        return directory
    if layout == "safetensors":
        path = directory / f"{variant}-{seed}.safetensors"
        save_file(state, str(path))
    elif layout == "state-dict":
        path = directory / f"{variant}-{seed}.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    else:
        raise ValueError(layout)
    path.with_suffix(".json").write_text(json.dumps(config))
    return path
