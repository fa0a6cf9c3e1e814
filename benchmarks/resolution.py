"""Choose the default input resolution: linear-probe accuracy on frozen DINOv2 ViT-S/14 features
vs. time per image on this machine.

    python -m benchmarks.resolution [--train 3000 --test 2000 --sizes 28 42 56 84 112]

Prints a Markdown table (the one in docs/benchmarks.md) and one JSON line per size.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def features(model, images, img_size, batch_size=128):
    from tangent.data.sets import preprocess
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunks.append(model(preprocess(images[start:start + batch_size], img_size)))
    return torch.cat(chunks).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=3000, help="training images for the probe")
    parser.add_argument("--test", type=int, default=2000, help="test images for the probe")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 42, 56, 84, 112])
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from tangent.data.sets import load_fashion_mnist
    from tangent.data.partition import partition_iid
    from tangent.model.pretrained import load_pretrained

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_idx = partition_iid(len(train_y), len(train_y) // args.train, seed=0)[0][:args.train]
    test_idx = partition_iid(len(test_y), len(test_y) // args.test, seed=0)[0][:args.test]
    rows = []
    for size in args.sizes:
        model = load_pretrained(img_size=size)
        start = time.perf_counter()
        f_train = features(model, train_x[train_idx], size)
        ms_per_image = 1e3 * (time.perf_counter() - start) / len(train_idx)
        f_test = features(model, test_x[test_idx], size)
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(f_train, train_y[train_idx])
        accuracy = float(probe.score(f_test, test_y[test_idx]))
        row = {"img_size": size, "tokens": (size // 14) ** 2 + 1, "probe_accuracy": round(accuracy, 4),
               "ms_per_image": round(ms_per_image, 2), "threads": torch.get_num_threads(),
               "train": len(train_idx), "test": len(test_idx)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| img size | tokens | linear-probe acc. | ms / image (forward) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['img_size']} | {row['tokens']} | {row['probe_accuracy']:.4f} | {row['ms_per_image']:.2f} |")


if __name__ == "__main__":
    main()
