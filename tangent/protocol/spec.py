"""The base-model spec the server sends, and w0 built from it (once per process).

No weights travel: every client rebuilds w0 from the spec and proves it by the base digest
(docs/design.md, "Flower protocol"). The same dataclass reads the run config (server, driver)
and the ``spec`` ConfigRecord (client), so both ends agree on the keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from tangent.protocol.config import RUN_DEFAULTS, RUN_KEY

#: spec field -> kebab-case key in the run config and in the ``spec`` ConfigRecord
KEYS = {"backbone": "backbone", "img_size": "img-size", "seed": "seed",
        "linearized_blocks": "linearized-blocks", "reinit": "reinit",
        "linearize_cls": "linearize-cls", "num_classes": "num-classes"}


@dataclass(frozen=True)
class ModelSpec:
    """The base model; its defaults are the run config's (pyproject.toml)."""

    backbone: str = RUN_DEFAULTS["backbone"]
    img_size: int = RUN_DEFAULTS["img-size"]
    seed: int = RUN_DEFAULTS["seed"]
    linearized_blocks: int = RUN_DEFAULTS["linearized-blocks"]
    reinit: bool = RUN_DEFAULTS["reinit"]
    linearize_cls: bool = RUN_DEFAULTS["linearize-cls"]
    num_classes: int = RUN_DEFAULTS["num-classes"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelSpec":
        """From a run config or a ``spec`` ConfigRecord (missing keys take the defaults); each
        value parsed by its key's rule (tangent.protocol.config: ConfigError names a bad one)."""
        return cls(**{field: RUN_KEY[key].parse(config[key]) for field, key in KEYS.items() if key in config})

    def to_config(self) -> dict[str, Any]:
        """kebab-case keys, for a ConfigRecord (add ``base-digest`` to send it)."""
        return {KEYS[field]: value for field, value in asdict(self).items()}


_MODELS: dict[ModelSpec, tuple[Any, str]] = {}


def build_model(spec: ModelSpec, *, cached: bool = True):
    """(TangentViT at w0 with Δ = 0, its base digest), built once per process and spec.

    Ray workers run many virtual clients one after the other: the backbone is loaded and the
    digest hashed once per worker. Callers must not keep Δ between uses: see :func:`fresh_model`.
    ``cached=False`` builds a private model that the caller may change (the ServerApp frees its
    frozen part).
    """
    if not cached:
        model = _build(spec)
        return model, model.base_digest()
    if spec not in _MODELS:
        _MODELS.clear()  # one spec per run: do not hold two backbones in one worker
        model = _build(spec)
        _MODELS[spec] = (model, model.base_digest())
    return _MODELS[spec]


def _build(spec: ModelSpec):
    from tangent.model.vit import TangentViT
    from tangent.model.pretrained import load_pretrained

    backbone = load_pretrained(spec.backbone, img_size=spec.img_size)
    return TangentViT.from_timm(backbone, spec.num_classes, linearized_blocks=spec.linearized_blocks,
                                reinit=spec.reinit, linearize_cls=spec.linearize_cls, seed=spec.seed)


def fresh_model(spec: ModelSpec):
    """The cached model with Δ reset to zero (w0), and its base digest."""
    import torch

    model, digest = build_model(spec)
    model.load_delta({k: torch.zeros_like(v) for k, v in model.delta_state_dict().items()})
    # Opacus only wraps a module in training mode (the trunk stays frozen and in eval mode in
    # fit; ViT-S/14 has no dropout, so the mode changes nothing else).
    model.train()
    return model, digest
