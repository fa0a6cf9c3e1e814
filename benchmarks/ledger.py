"""Time ledger add and remove of one ViT-S TAFT-1-sized Δ against ledgers of several sizes, and of
one site's exact-head statistics by its number of rows.

    python -m benchmarks.ledger [--sizes 10 50] [--repeats 5] [--rows 60 1200 20000] [--dir DIR]

Prints one JSON line: per ledger size the median seconds of ``add`` and of ``remove`` (each a
full durable transaction: validation, quantization, accumulator update, version, audit, signed
head, fsync, the head file; ``remove`` also checkpoints and truncates the WAL so that the removed
bytes leave every file); per number of rows n of a site (p = 3,072 features, k = 10 classes, the
exact head of make simulate) the bytes it sends in each form, the form it sends by default (the
smaller, tangent/exact_head/row_form.py), the bytes the statistics ledger stores for it, and the
median seconds of ``add`` and ``remove`` into a ledger holding ``--stats-held`` other sites.
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


STATS_FEATURES, STATS_BITS, STATS_CLIP = 3072, 16, 1.0


def site_rows(n: int, rng: np.random.Generator, distinct: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Quantized rows (‖φ‖ ≤ C) and labels of a site with ``n`` rows: ``distinct`` random rows
    repeated (their Gram is formed in seconds even at n = 20,000; the sums are as large)."""
    from tangent.exact_head.statistics import quantize

    base = rng.standard_normal((min(n, distinct), STATS_FEATURES))
    base *= (0.95 * STATS_CLIP) * rng.random((len(base), 1)) / np.linalg.norm(base, axis=1, keepdims=True)
    index = np.arange(n) % len(base)
    return quantize(base, STATS_CLIP, STATS_BITS)[index], rng.integers(0, NUM_CLASSES, len(base))[index]


def stats_card() -> dict:
    from tangent.exact_head.statistics import grid_meta

    return {"stats-meta": grid_meta(STATS_FEATURES, NUM_CLASSES, STATS_CLIP, STATS_BITS),
            "feature-spec": {"benchmark": True}, "model-spec": {"benchmark": True}, "feature-digest": "benchmark"}


def bench_stats(directory: Path, n: int, held: int, repeats: int, rng: np.random.Generator) -> dict:
    from tangent.exact_head.row_form import gram_form_bytes, row_arrays, row_form_bytes, smaller_form
    from tangent.exact_head.statistics import SufficientStats

    form = smaller_form(n, STATS_FEATURES, NUM_CLASSES)

    def contribution(seed_rows):
        q, labels = seed_rows
        if form == "rows":
            return row_arrays(q, labels, STATS_BITS)
        return SufficientStats.from_rows(q, labels, NUM_CLASSES, STATS_CLIP, STATS_BITS).to_arrays()

    ledger = Ledger.open(directory / f"stats-{n}.sqlite", family="stats", model_card=stats_card())
    try:
        for i in range(held):
            ledger.add(f"site-{i:03d}", contribution(site_rows(n, rng)), n, base_digest="benchmark")
        add_s, remove_s, stored = [], [], []
        for r in range(repeats):
            arrays = contribution(site_rows(n, rng))
            site = f"bench-{r}"
            t = time.perf_counter()
            ledger.add(site, arrays, n, base_digest="benchmark")
            add_s.append(time.perf_counter() - t)
            with ledger.snapshot():
                stored.append(ledger._db.execute(  # noqa: SLF001 - the stored bytes of this contribution
                    "SELECT length(safetensors) FROM deltas ORDER BY contribution_id DESC LIMIT 1").fetchone()[0])
            t = time.perf_counter()
            ledger.remove(site, reason="benchmark")
            remove_s.append(time.perf_counter() - t)
        return {"rows": n, "form": form, "row_form_bytes": row_form_bytes(n, STATS_FEATURES),
                "gram_form_bytes": gram_form_bytes(STATS_FEATURES, NUM_CLASSES), "stored_bytes": max(stored),
                "held": held, "add_median_s": round(statistics.median(add_s), 4),
                "remove_median_s": round(statistics.median(remove_s), 4)}
    finally:
        ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50], help="contributions already held")
    parser.add_argument("--repeats", type=int, default=5, help="timed add+remove pairs per size")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the ledger files (default: a temp dir)")
    parser.add_argument("--rows", type=int, nargs="*", default=[60, 1200, 20_000],
                        help="rows of one site, for the statistics ledger (none: skip it)")
    parser.add_argument("--stats-held", type=int, default=3, help="other sites in the statistics ledger")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    params = sum(int(np.prod(s)) for s in taft1_shapes().values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [bench_size(Path(tmp), n, args.repeats, rng) for n in args.sizes]
        stats = [bench_stats(Path(tmp), n, args.stats_held, args.repeats, rng) for n in args.rows]
    print(json.dumps({"benchmark": "ledger", "params": params, "tensors": len(taft1_shapes()),
                      "repeats": args.repeats, "machine": platform.machine(), "results": results,
                      "stats_features": STATS_FEATURES, "stats": stats}))


if __name__ == "__main__":
    main()
