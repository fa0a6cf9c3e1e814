"""Demo site data: a disjoint slice of Fashion-MNIST per site, as `<out>/site-<id>/site.npz`.

    python -m deploy.make_site_data --sites 1 2 3 --per-site 500 [--test-images 200]

`--test-images N` also writes `<out>/test.npz`: the first N images of Fashion-MNIST's test split
(no site holds them), for trying an exported model with `taft-predict`.

Default --out: `$TAFT_STATE_DIR/demo-data` (~/.local/state/taft-fl/demo-data), outside the
repository, so `flwr run` never ships it.

A real site points `--data-path` at its own `.npz` (arrays `images` uint8 [N,H,W(,3)] and
`labels` int64) or ImageFolder directory instead. Idempotent (existing files are kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deploy.connection import state_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.make_site_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--per-site", type=int, default=500)
    parser.add_argument("--out", type=Path, default=state_root() / "demo-data",
                        help="output directory (default %(default)s)")
    parser.add_argument("--test-images", type=int, default=0, metavar="N",
                        help="also write <out>/test.npz with N images of the test split (default: none)")
    args = parser.parse_args(argv)
    from tangent.data.sets import load_fashion_mnist

    if args.test_images < 0:
        parser.error("--test-images must be >= 0")

    images, labels = load_fashion_mnist("train")
    for i, site in enumerate(args.sites):
        path = args.out / f"site-{site}" / "site.npz"
        if path.exists():
            print(f"{path} (kept)")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        part = slice(i * args.per_site, (i + 1) * args.per_site)
        np.savez(path, images=images[part], labels=labels[part])
        print(f"{path}: {len(labels[part])} images")
    if args.test_images:
        _write_test_set(args.out / "test.npz", args.test_images, load_fashion_mnist)
    return 0


def _write_test_set(path: Path, count: int, load_fashion_mnist) -> None:
    if path.exists():
        print(f"{path} (kept)")
        return
    images, labels = load_fashion_mnist("test")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images[:count], labels=labels[:count])
    print(f"{path}: {len(labels[:count])} test images")


if __name__ == "__main__":
    sys.exit(main())
