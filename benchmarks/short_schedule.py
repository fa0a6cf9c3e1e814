"""The short-schedule guard as a measurement: no composed TAFT-1 model of a short or small-site
recipe falls below the composed w0 head fitted on the same data, and without the guard one does.

    python -m benchmarks.short_schedule [--sites 3] [--test 1000]

Real Fashion-MNIST images from the trunk-token cache (built on first use), the embedded recipe
(pyproject's batch size, lr, loss and κ, TrainConfig's defaults for the rest), ``--sites`` IID
sites per config, composed accuracy on ``--test`` seeded test images (helpers in
:mod:`simulations.short_schedule`, whose ``python -m`` sweeps more recipes). Prints one JSON line
per config and a summary; exit status 1 when a check fails. About 8.5 minutes on two loaded CPU
cores (it used to be a test). The guard's logic is tested on a tiny model in
tests/tangent/training/test_train.py.
"""
from __future__ import annotations

import argparse
import json
import time
import tomllib
from dataclasses import replace
from pathlib import Path

#: (local epochs, examples per site): 4 to 470 Adam steps, 100 to 5,000 examples
CONFIGS = [(1, 100), (10, 100), (1, 800), (4, 400), (1, 5000)]
#: the guard may land exactly on the fitted head: allow its float32 rounding (1 of 1,000 images)
TOLERANCE = 1e-3


def embedded_recipe():
    """TrainConfig with pyproject's batch size, lr, loss and κ; the model spec of the run config."""
    from tangent.protocol.spec import ModelSpec
    from tangent.training.trainer import TrainConfig

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    defaults = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    config = TrainConfig(batch_size=int(defaults["batch-size"]), lr=float(defaults["lr"]),
                         loss=str(defaults["loss"]), kappa=float(defaults["kappa"]), seed=0)
    return ModelSpec.from_config(defaults), config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.short_schedule", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--test", type=int, default=1000, help="seeded test images")
    args = p.parse_args(argv)

    from simulations.short_schedule import composed_fitted_heads, composed_taft, iid_shards, load_cached

    spec, base = embedded_recipe()
    model, train, train_labels, test_tokens, test_labels = load_cached(spec, args.test)
    started, rows = time.perf_counter(), []
    for epochs, per_site in CONFIGS:
        shards = iid_shards(len(train_labels), args.sites, per_site, seed=epochs)
        config = replace(base, epochs=epochs)
        taft = composed_taft(model, train, train_labels, shards, test_tokens, test_labels, config)["accuracy"]
        head = composed_fitted_heads(model, train, train_labels, shards, test_tokens, test_labels, config)
        rows.append({"epochs": epochs, "per_site": per_site, "composed_taft": taft, "composed_fitted_heads": head})
        print(json.dumps(rows[-1]), flush=True)
    # without the guard the same recipe diverges (what the guard exists for)
    shards = iid_shards(len(train_labels), args.sites, 800, seed=1)
    unguarded = composed_taft(model, train, train_labels, shards, test_tokens, test_labels,
                              replace(base, epochs=1, guard_ridge=0.0))["accuracy"]
    worse = [r for r in rows if r["composed_taft"] < r["composed_fitted_heads"] - TOLERANCE]
    fitted_1x800 = rows[CONFIGS.index((1, 800))]["composed_fitted_heads"]
    summary = {"sites": args.sites, "test": args.test, "worse_than_fitted_heads": worse,
               "unguarded_1x800": unguarded, "unguarded_diverges": unguarded < fitted_1x800 - 0.2,
               "wall_s": round(time.perf_counter() - started, 1)}
    print(json.dumps(summary), flush=True)
    return 0 if not worse and summary["unguarded_diverges"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
