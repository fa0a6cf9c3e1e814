"""Demo site data: a disjoint slice of Fashion-MNIST per site, as `<out>/site-<id>/site.npz`.

    python -m deploy.make_site_data --sites 1 2 3 --per-site 500

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
    args = parser.parse_args(argv)
    from tangent.data.sets import load_fashion_mnist

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
