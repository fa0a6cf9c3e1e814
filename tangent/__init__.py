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
    "compose": "tangent.composition",
    "FeatureCache": "tangent.cache",
    "TrainConfig": "tangent.train",
    "fit": "tangent.train",
    "evaluate": "tangent.train",
    "predict_logits": "tangent.train",
    "TrainResult": "tangent.train",
    "PrivacyConfig": "tangent.privacy",
    "PrivacyBudget": "tangent.budget",
    "BudgetExhausted": "tangent.budget",
    "BudgetMissing": "tangent.budget",
    "rsl_loss": "tangent.losses",
    "cross_entropy": "tangent.losses",
    "mse_loss": "tangent.losses",
    "l2_penalty": "tangent.losses",
    "project_to_ball": "tangent.losses",
    "CLS_DELTA_KEY": "tangent.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tangent' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
