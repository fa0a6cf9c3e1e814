"""Tangent (linearized) vision transformers with TAFT — pure PyTorch, no Flower.

Names are imported lazily so that ``import tangent`` stays cheap (Ray workers, CLI tools).
"""
from importlib import import_module

_EXPORTS = {
    "load_pretrained": "tangent.model.pretrained",
    "load_fashion_mnist": "tangent.data.sets",
    "load_site_data": "tangent.data.sets",
    "preprocess": "tangent.data.sets",
    "dataset_digest": "tangent.data.sets",
    "DEFAULT_IMG_SIZE": "tangent.data.sets",
    "partition": "tangent.data.partition",
    "partition_fingerprint": "tangent.data.partition",
    "TangentViT": "tangent.model.vit",
    "NLFTViT": "tangent.model.nlft",
    "compose": "tangent.model.composition",
    "FeatureCache": "tangent.data.token_cache",
    "TrainConfig": "tangent.training.trainer",
    "fit": "tangent.training.trainer",
    "evaluate": "tangent.training.trainer",
    "predict_logits": "tangent.training.trainer",
    "TrainResult": "tangent.training.trainer",
    "PrivacyConfig": "tangent.training.privacy",
    "PrivacyBudget": "tangent.training.budget",
    "BudgetExhausted": "tangent.training.budget",
    "BudgetMissing": "tangent.training.budget",
    "rsl_loss": "tangent.training.losses",
    "cross_entropy": "tangent.training.losses",
    "mse_loss": "tangent.training.losses",
    "l2_penalty": "tangent.training.losses",
    "project_to_ball": "tangent.training.losses",
    "CLS_DELTA_KEY": "tangent.model.vit",
    "FeatureSpec": "tangent.exact_head.features",
    "FeatureExtractor": "tangent.exact_head.features",
    "SufficientStats": "tangent.exact_head.statistics",
    "RidgeHead": "tangent.exact_head.statistics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tangent' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
