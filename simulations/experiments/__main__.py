"""python -m simulations.experiments — the TAFT paper's experiments in miniature.

Writes, per experiment, ``results.csv``, a plot and ``meta.json`` under ``<out>/<name>/`` and
regenerates that experiment's section of the results file (``docs/results.md``) from them.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from simulations.experiments.suite import NAMES


def _epilog() -> str:
    from simulations.experiments.common import FULL as F
    from simulations.experiments.common import QUICK as Q

    return f"""experiments (default settings; --quick in brackets):
  composition  paper Table 2. Training subset of {F.train} [{Q.train}] IID Fashion-MNIST images,
               split into N = {', '.join(map(str, F.shards))} [{', '.join(map(str, Q.shards))}] IID shards and
               N = {F.dirichlet_shards} [{Q.dirichlet_shards}] Dirichlet shards (alpha = {', '.join(f'{a:g}' for a in F.dirichlet_alphas)});
               per shard TAFT-1 and NLFT-1 from w0. Compares TAFT composed (tangent.compose),
               the TAFT ensemble (weighted logit average), the NLFT Model Soup, the
               federated ridge head (sufficient statistics), the exact head (integer
               statistics of the default FeatureSpec, asserted == central bit for bit), TAFT whose
               head also reads the frozen pieces, the hybrid (TAFT logits / kappa + exact head) and
               TAFT / NLFT / ridge / exact head on all data.
  removal      paper Fig. 1a/1b. From the N = {F.removal_shards} [{Q.removal_shards}] IID shards of composition
               (shard store, retrained only if missing or trained with other settings) remove
               k = {', '.join(map(str, F.removal_ks))} [{', '.join(map(str, Q.removal_ks))}] shards in {F.removal_orders} [{Q.removal_orders}] random orders: TAFT by
               subtraction vs. SISA (softmax average of the remaining NLFT shard models) vs.
               the exact ridge head and the exact head on the remaining statistics.
  retraining   paper Fig. 1c. Forget x = {', '.join(f'{x:g}' for x in F.forget_percents)} % [{', '.join(f'{x:g}' for x in Q.forget_percents)}] of the training subset by
               retraining only the affected shards (N = {', '.join(map(str, F.retrain_shards))} [{', '.join(map(str, Q.retrain_shards))}]) from w0 vs. the
               paragon (TAFT on all remaining data) vs. the exact head's forgetting (subtract
               the forgotten samples' statistics, solve): accuracy and wall-time speed-up.
  privacy      paper Table 3. DP-SGD (Opacus) TAFT-1 vs. NLFT-1 vs. NLFT head only at
               eps = {', '.join(f'{e:g}' for e in F.dp_epsilons)} [{', '.join(f'{e:g}' for e in Q.dp_epsilons)}] on {F.dp_train} [{Q.dp_train}] images, {F.dp_epochs} [{Q.dp_epochs}] epochs: central,
               and federated over {F.dp_clients} [{Q.dp_clients}] DP clients composed / souped; plus no DP;
               and the DP exact head as a DP run releases it (central and federated).
  dp_scale     DP at the simulation's scale: {F.dp_scale_sites} [{Q.dp_scale_sites}] IID sites x {F.dp_scale_rows} [{Q.dp_scale_rows}] images, {F.dp_scale_test} [{Q.dp_scale_test}]
               test images, eps as above, per-site delta 1e-5: the DP exact head federated,
               central and with secure-aggregation noise ({F.dp_scale_repeats} [{Q.dp_scale_repeats}] noise draws; removal
               checked bit for bit) vs. federated DP-TAFT-1 with the DP run's recipe.

shared settings: pretrained DINOv2 ViT-S/14, reinit=false, img {F.img_size}, cached trunk tokens,
test on a fixed {F.test} [{Q.test}]-image subset of the 10k test split, {F.epochs} [{Q.epochs}] epochs,
batch {F.batch_size}, Adam (x0.1 at 50 % / 83 %), TAFT lr {F.taft_lr:g} + RSL loss, NLFT lr {F.nlft_lr:g} +
cross-entropy, seed {F.seed}. Measured wall time of the default suite: docs/results.md.

examples:
  python -m simulations.experiments                       # everything -> docs/results.md
  python -m simulations.experiments --only removal        # one section (reuses the shards)
  python -m simulations.experiments --quick --out /tmp/x  # CI-sized, writes /tmp/x/results.md
  python -m simulations.experiments --report-only         # sections from the existing CSVs
"""


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m simulations.experiments", description=__doc__,
                                     epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=None, metavar="NAME[,NAME]",
                        help=f"run only these experiments ({'|'.join(NAMES)}); repeatable or comma-separated")
    parser.add_argument("--quick", action="store_true",
                        help="tiny CI-sized settings (a minute); results go to <out>/results.md by default")
    parser.add_argument("--out", default=None,
                        help="output directory (default runs/experiments, or runs/experiments-quick with --quick)")
    parser.add_argument("--results", default=None,
                        help="Markdown file whose sections are regenerated (default docs/results.md, "
                             "or <out>/results.md with --quick)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="parallel lanes (processes): [composition, retraining] and [dp_scale, privacy, removal] (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per lane (default 1)")
    parser.add_argument("--cache-dir", default=None,
                        help="trunk-token cache (default ~/.cache/taft/features, as the driver)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate the sections from the CSVs under --out")
    args = parser.parse_args(argv)
    names = NAMES if not args.only else [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {list(NAMES)}")
    args.names = [n for n in NAMES if n in names]
    args.out = Path(args.out or ("runs/experiments-quick" if args.quick else "runs/experiments"))
    args.results = Path(args.results or (args.out / "results.md" if args.quick else "docs/results.md"))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    from simulations.experiments import suite

    if args.report_only:
        done = suite.regenerate(args.names, args.out, args.results)
        print(f"regenerated {done} in {args.results}")
        return 0 if done else 1
    command = " ".join(["python -m simulations.experiments", *map(shlex.quote, argv)]).strip()
    options = suite.Options(quick=args.quick, out=str(args.out), results=str(args.results),
                            threads=args.threads, cache_dir=args.cache_dir,
                            progress=not args.no_progress, command=command)
    record = suite.run(args.names, args.jobs, options)
    print(f"suite: {record['wall_s']:.0f} s, lanes {record['lanes']}, failed {record['failed_lanes']}; "
          f"results in {args.results}", flush=True)
    return 1 if record["failed_lanes"] else 0


if __name__ == "__main__":
    sys.exit(main())
