"""Time ledger add and remove of one ViT-S TAFT-1-sized Δ against ledgers of several sizes.

    python -m benchmarks.ledger [--sizes 10 50] [--repeats 5] [--dir DIR]

Prints one JSON line: per ledger size the median seconds of ``add`` and of ``remove`` (each a
full durable transaction: validation, quantization, accumulator update, version, audit, signed
head, fsync, the head file; ``remove`` also checkpoints and truncates the WAL so that the removed
bytes leave every file).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from server.ledger import Ledger

EMBED_DIM, MLP_DIM, NUM_CLASSES = 384, 1536, 10


def taft1_shapes(d: int = EMBED_DIM, mlp: int = MLP_DIM, num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Trainable Δ of a ViT-S/14 with its last block linearized (timm parameter names)."""
    b = "blocks.11."
    return {
        b + "norm1.weight": (d,), b + "norm1.bias": (d,),
        b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
        b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
        b + "ls1.gamma": (d,),
        b + "norm2.weight": (d,), b + "norm2.bias": (d,),
        b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,),
        b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,),
        b + "ls2.gamma": (d,),
        "norm.weight": (d,), "norm.bias": (d,),
        "head.weight": (num_classes, d), "head.bias": (num_classes,),
    }


def random_delta(shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 1e-3) for name, shape in shapes.items()}


def bench_size(directory: Path, num_held: int, repeats: int, rng: np.random.Generator) -> dict:
    shapes = taft1_shapes()
    ledger = Ledger.open(directory / f"ledger-{num_held}.sqlite")
    try:
        for i in range(num_held):
            ledger.add(f"site-{i:03d}", random_delta(shapes, rng), int(rng.integers(100, 10_000)))
        add_s, remove_s = [], []
        for r in range(repeats):
            delta = random_delta(shapes, rng)
            site = f"bench-{r}"  # a removed site stays withdrawn: a new id per repeat
            t = time.perf_counter()
            ledger.add(site, delta, 1234)
            add_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ledger.remove(site, reason="benchmark")
            remove_s.append(time.perf_counter() - t)
        return {"held": num_held, "add_median_s": round(statistics.median(add_s), 4),
                "remove_median_s": round(statistics.median(remove_s), 4)}
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="contributions already held")
    parser.add_argument("--repeats", type=int, default=5, help="timed add+remove pairs per size")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the ledger files (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    params = sum(int(np.prod(s)) for s in taft1_shapes().values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [bench_size(Path(tmp), n, args.repeats, rng) for n in args.sizes]
    print(json.dumps({"benchmark": "ledger", "params": params, "tensors": len(taft1_shapes()),
                      "repeats": args.repeats, "machine": platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
