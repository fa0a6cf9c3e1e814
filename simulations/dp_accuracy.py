"""DP TAFT-1 accuracy at several ε on a Fashion-MNIST subset (issue: DP learns at ε=8).

    python -m simulations.dp_accuracy [--train 5000 --epsilons 1 3 8 --epochs 10 --repeats 3]

Central DP-SGD (Opacus, Poisson sampling and noise from OS entropy, per-sample clipping, PRV
accountant, cross-entropy, δ = min(1e-5, 1/(10 n))) on the cached trunk tokens of the pretrained
ViT-S/14; evaluation on the whole test split. The noise is secret, so DP accuracies vary from run
to run: ``--repeats`` trains each ε several times and reports mean and spread.
Prints one JSON line per setting and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=5000, help="training images (IID subset)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="DP trainings per ε (fresh noise each)")
    parser.add_argument("--reinit", choices=["true", "false"], default="false")
    parser.add_argument("--cache-dir", default=None, help="trunk-token cache (default: ~/.cache/taft/features)")
    args = parser.parse_args(argv)

    from tangent.protocol.spec import ModelSpec, fresh_model
    from tangent.data.token_cache import FeatureCache
    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_fashion_mnist
    from tangent.data.partition import partition_iid
    from tangent.model.pretrained import cache_dir
    from tangent.training.privacy import PrivacyConfig
    from tangent.training.trainer import TrainConfig, evaluate, fit

    spec = ModelSpec(reinit=args.reinit == "true")
    directory = args.cache_dir or str(cache_dir() / "features")
    model, digest = fresh_model(spec)
    splits = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split)
        cache = FeatureCache.build_or_open(model, images, img_size=spec.img_size, cache_dir=directory,
                                           data_digest=images_digest(images))  # the driver's key
        splits[split] = (cache.tokens, labels)
    train_tokens, train_labels = splits["train"]
    subset = partition_iid(len(train_labels), len(train_labels) // args.train, seed=0)[0][:args.train]
    inputs = torch.from_numpy(np.ascontiguousarray(train_tokens[subset]))
    labels = torch.from_numpy(train_labels[subset])
    test_inputs = torch.from_numpy(np.ascontiguousarray(splits["test"][0]))
    test_labels = torch.from_numpy(splits["test"][1])

    rows = []
    for epsilon in [None, *args.epsilons]:
        runs = []
        for _ in range(args.repeats if epsilon else 1):  # no DP: deterministic under the seed
            model, _ = fresh_model(spec)
            config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size if epsilon else 32,
                                 lr=args.lr, loss="ce" if epsilon else "rsl", seed=0)
            privacy = PrivacyConfig(target_epsilon=epsilon, max_grad_norm=args.max_grad_norm) if epsilon else None
            start = time.perf_counter()
            result = fit(model, inputs, labels, config, privacy=privacy, from_cache=True, progress=False)
            _, accuracy = evaluate(model, test_inputs, test_labels, from_cache=True)
            runs.append((result, float(accuracy), time.perf_counter() - start))
        accuracies = [acc for _, acc, _ in runs]
        result = runs[0][0]
        row = {"target_epsilon": epsilon, "epsilon_spent": result.epsilon, "delta": result.delta,
               "noise_multiplier": result.noise_multiplier,
               "test_accuracy": round(float(np.mean(accuracies)), 4),
               "test_accuracy_runs": [round(a, 4) for a in accuracies], "train": len(subset),
               "epochs": args.epochs, "batch_size": config.batch_size, "lr": args.lr,
               "max_grad_norm": args.max_grad_norm if epsilon else None,
               "wall_s": round(float(np.mean([w for _, _, w in runs])), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| ε target | ε spent | δ | test acc. (mean) | runs |\n|---|---|---|---|---|")
    for row in rows:
        eps = "∞ (no DP, RSL)" if row["target_epsilon"] is None else f"{row['target_epsilon']:g}"
        spent = "—" if row["epsilon_spent"] is None else f"{row['epsilon_spent']:.3f}"
        delta = "—" if row["delta"] is None else f"{row['delta']:.0e}"
        runs = ", ".join(f"{a:.4f}" for a in row["test_accuracy_runs"])
        print(f"| {eps} | {spent} | {delta} | {row['test_accuracy']:.4f} | {runs} |")

if __name__ == "__main__":
    main()
