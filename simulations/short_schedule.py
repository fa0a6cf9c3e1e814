"""Short local schedules: does a composed TAFT-1 model ever fall below the w0 probe?

    python -m simulations.short_schedule --configs 1x800 10x1200 --shards 5 --schedule step warmup

For each ``EPOCHSxEXAMPLES`` config: ``--shards`` IID sites of EXAMPLES Fashion-MNIST training
images each train TAFT-1 from w0 (the embedded recipe: Adam, batch 32, RSL, lr 3e-3) from the
trunk-token cache; their Δ are composed (example-weighted mean = the ensemble) and evaluated on
``--test`` seeded test images. The baseline, "the w0 head fitted on the same data"
(:func:`composed_fitted_heads`): per site w0 with only its head's Δ fitted by ridge regression
(λ = ``RIDGE_LAMBDA`` × n × mean feature variance) of the loss target minus f(x; w0) on w0's
head features (the final-norm CLS token), composed the same way. ``--set guard_ridge=0`` turns
the trainer's guard off (the behaviour before it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

RIDGE_LAMBDA = 1.0


def composed_fitted_heads(model, train, train_labels, shards, test_tokens, test_labels, config,
                          ridge: float = RIDGE_LAMBDA) -> float:
    """Accuracy of the composed "w0 head fitted on the same data": per site, w0 with only its
    head's Δ fitted in closed form (ridge regression of the loss target minus f(x; w0) on w0's
    head features, :func:`tangent.training.trainer.ridge_head`), composed by the example-weighted mean."""
    from tangent.training.trainer import ArrayDataset, head_pass, ridge_head, square_loss_target

    total = sum(len(s) for s in shards)
    model.load_delta({k: torch.zeros_like(v) for k, v in model.delta_state_dict().items()})
    weight = bias = 0
    for shard in shards:
        data = ArrayDataset(train.subset(shard), train_labels[shard])
        features, f0, _ = head_pass(model, data, from_cache=True)
        w, b = ridge_head(features, square_loss_target(data.labels, f0.shape[-1], config) - f0, ridge)
        weight, bias = weight + (len(shard) / total) * w, bias + (len(shard) / total) * b
    features, f0, _ = head_pass(model, ArrayDataset(test_tokens, test_labels), from_cache=True)
    return float(((f0 + features @ weight + bias).argmax(-1).numpy() == np.asarray(test_labels)).mean())


def composed_taft(model, train_tokens, train_labels, shards, test_tokens, test_labels, config) -> dict:
    """Train one Δ per shard from w0, compose (weighted mean), evaluate; plus per-site figures."""
    from tangent.training.trainer import evaluate, fit

    zero = {k: torch.zeros_like(v) for k, v in model.delta_state_dict().items()}
    total = sum(len(s) for s in shards)
    composed = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in zero.items()}
    sites = []
    for shard in shards:
        model.load_delta(zero)
        model.train()
        result = fit(model, train_tokens.subset(shard) if hasattr(train_tokens, "subset") else train_tokens[shard],
                     train_labels[shard], config, from_cache=True, progress=False)
        for k, v in model.delta_state_dict().items():
            composed[k] += (len(shard) / total) * v.double()
        sites.append({"n": len(shard), "steps": result.steps, "final_loss": result.loss,
                      "fit_s": round(result.wall_s, 2),
                      "guard_alpha": None if result.guard is None else round(result.guard["alpha"], 4)})
    model.load_delta({k: v.float() for k, v in composed.items()})
    loss, accuracy = evaluate(model, test_tokens, test_labels, from_cache=True)
    model.load_delta(zero)
    return {"accuracy": accuracy, "test_loss": loss, "sites": sites}


def load_cached(spec, test_size: int, seed: int = 0):
    """(model at w0, train FeatureCache, train labels, test tokens [test_size], test labels)."""
    from tangent.data.token_cache import FeatureCache
    from tangent.data.sets import load_fashion_mnist
    from tangent.model.pretrained import cache_dir
    from tangent.protocol.spec import fresh_model

    model, _ = fresh_model(spec)
    caches = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split)
        caches[split] = (FeatureCache.build_or_open(model, images, img_size=spec.img_size,
                                                    cache_dir=cache_dir() / "features", progress=True), labels)
    test_cache, test_labels = caches["test"]
    rows = np.sort(np.random.default_rng(seed).choice(len(test_labels), test_size, replace=False))
    test_tokens = torch.from_numpy(np.asarray(test_cache.tokens[rows], dtype=np.float32))
    return model, caches["train"][0], caches["train"][1], test_tokens, test_labels[rows]


def iid_shards(num_labels: int, shards: int, per_shard: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_labels)[:shards * per_shard]
    return [np.sort(chunk) for chunk in np.split(order, shards)]


def main(argv=None) -> int:
    from tangent.protocol.spec import ModelSpec
    from tangent.training.trainer import TrainConfig
    from simulations.driver.config import pyproject_config

    p = argparse.ArgumentParser(prog="python -m simulations.short_schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["1x800", "10x1200"], help="EPOCHSxEXAMPLES per site")
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--test", type=int, default=2000, help="seeded test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="TrainConfig overrides (e.g. warmup=0.1); repeat --set groups with ';'")
    p.add_argument("--out", default="", help="append JSON lines here")
    args = p.parse_args(argv)

    defaults = pyproject_config()
    spec = ModelSpec.from_config(defaults)
    torch.set_num_threads(1)
    model, train_tokens, train_labels, test_tokens, test_labels = load_cached(spec, args.test, args.seed)
    base = {"epochs": int(defaults["epochs"]), "batch_size": int(defaults["batch-size"]), "lr": float(defaults["lr"]),
            "loss": str(defaults["loss"]), "kappa": float(defaults["kappa"]), "seed": args.seed}
    groups = " ".join(args.set).split(";") if args.set else [""]
    for group in groups:
        overrides = {}
        for item in group.split():
            key, value = item.split("=", 1)
            overrides[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
        for cfg in args.configs:
            epochs, per_shard = (int(v) for v in cfg.split("x"))
            shards = iid_shards(len(train_labels), args.shards, per_shard, args.seed)
            config = TrainConfig(**(base | {"epochs": epochs} | overrides))
            started = time.perf_counter()
            taft = composed_taft(model, train_tokens, train_labels, shards, test_tokens, test_labels, config)
            probe = composed_fitted_heads(model, train_tokens, train_labels, shards, test_tokens, test_labels, config)
            row = {"config": cfg, "shards": args.shards, "overrides": overrides, "composed": taft["accuracy"],
                   "fitted_w0_head": probe, "test_loss": taft["test_loss"], "steps": taft["sites"][0]["steps"],
                   "final_train_loss": [round(s["final_loss"], 3) for s in taft["sites"]],
                   "guard_alpha": [s["guard_alpha"] for s in taft["sites"]],
                   "wall_s": round(time.perf_counter() - started, 1),
                   "train_config": {k: v for k, v in dataclasses.asdict(config).items()}}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
