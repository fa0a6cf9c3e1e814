"""Tangent (linearized) vision transformers with TAFT — pure PyTorch, no Flower.

Names are imported lazily so that ``import tangent`` stays cheap (Ray workers, CLI tools).
"""
from importlib import import_module

_EXPORTS = {
    "load_pretrained": "tangent.pretrained",
    "load_fashion_mnist": "tangent.data",
    "load_site_data": "tangent.data",
    "preprocess": "tangent.data",
    "dataset_digest": "tangent.data",
    "DEFAULT_IMG_SIZE": "tangent.data",
    "partition": "tangent.partition",
    "partition_fingerprint": "tangent.partition",
    "TangentViT": "tangent.model",
    "NLFTViT": "tangent.nlft",
    "compose": "tangent.compose",
    "FeatureCache": "tangent.cache",
    "TrainConfig": "tangent.train",
    "fit": "tangent.train",
    "PrivacyConfig": "tangent.privacy",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tangent' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
