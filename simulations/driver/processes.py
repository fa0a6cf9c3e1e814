"""The driver's processes: the local SuperLink, each `flwr run`, the process tree they start (sampled for
peak memory, stopped by PID at the end) and the spawned children that keep torch out of the driver.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil

from simulations.driver import REPO


class ProcessWatch:
    """Samples the summed RSS (and PSS) of this process, its descendants and any extra roots
    (the detached SuperLink) every ``interval`` seconds; remembers every process it saw so
    they can all be stopped by PID at the end."""

    def __init__(self, interval: float = 1.0, pss_every: int = 10):
        self.interval = interval
        # PSS walks every mapping of every process (smaps_rollup): ~10 ms a process, 160 ms a
        # sample of a run's tree, which at one sample a second took 11 % of a core from a run
        # on two. Private memory (/proc/PID/status) is read every sample, PSS every
        # ``pss_every``-th and whenever private memory reaches a new peak.
        self.pss_every = pss_every
        self.samples = self.pss_samples = 0
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
        """One sample of the tree, summed: RSS and private memory = RssAnon + RssShmem
        (/proc/PID/status), and PSS (smaps_rollup) where :meth:`_pss_due`. The budget is on private
        memory: RSS also counts file-backed pages (the memory-mapped caches, libraries) that depend
        on the page cache, and PSS splits them among processes. The per-process breakdown is kept
        at the private peak."""
        rss = private = 0.0
        names: dict[str, dict] = {}
        procs = self.tree()
        for proc in procs:
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
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if self._pss_due(private):
            self.peak_pss = max(self.peak_pss, sum(_pss_mib(proc.pid) for proc in procs))
            self.pss_samples += 1
        self.samples += 1
        self.last_private = private
        if private > self.peak_private:
            self.peak_private, self.peak_at = private, names
            self.peak_time = time.perf_counter()
        self.peak_rss = max(self.peak_rss, rss)

    def _pss_due(self, private: float) -> bool:
        return self.samples % self.pss_every == 0 or private > self.peak_private

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
        """SIGTERM every process we started or saw (children first), SIGKILL what is left.
        multiprocessing's resource tracker is left alone: it ignores SIGTERM (a wait of the whole
        timeout) and ends by itself when the driver exits."""
        procs = {p.pid: p for p in self.tree() if p.pid != os.getpid()}
        procs.update({pid: p for pid, p in self.seen.items() if pid not in procs})
        return [p.pid for p in stop_processes([p for p in procs.values() if not _resource_tracker(p)], timeout)]


def stop_processes(procs, timeout: float) -> list[psutil.Process]:
    """SIGTERM the running ones (highest PID, i.e. children, first), wait up to ``timeout`` s for
    them to end, SIGKILL what is left. Returns the processes that were signalled.

    A process that has exited but is not yet reaped by its parent (a zombie: how Flower's
    SuperExec leaves a finished ``flwr-simulation``) counts as ended: it holds no memory and no
    signal reaches it, and waiting on it would always take the whole timeout (measured: 15 + 5 s
    after each `flwr run`)."""
    alive = []
    for proc in sorted(procs, key=lambda p: -p.pid):
        try:
            if proc.is_running() and not _ended(proc):  # is_running also guards against PID reuse
                proc.terminate()
                alive.append(proc)
        except psutil.Error:
            pass
    still = _wait_ended(alive, timeout)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _wait_ended(still, 5.0)
    return alive


def _resource_tracker(proc: psutil.Process) -> bool:
    try:
        return any("multiprocessing.resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return False


def _ended(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process is gone or a zombie; returns those still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    left = list(procs)
    while True:
        _, left = psutil.wait_procs(left, timeout=0.1)  # reaps our own children
        left = [p for p in left if not _ended(p)]
        if not left or time.monotonic() >= deadline:
            return left


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


def _spawned_worker():
    """A pool of one spawned (not forked: no copy of the driver's threads or locks) process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))


@contextmanager
def in_background(fn, *args):
    """``fn(*args)`` in a fresh (spawned) child while the caller goes on; yields its Future. When
    the caller fails the child is not waited for: the driver stops every process it started."""
    pool = _spawned_worker()
    done = False
    try:
        yield pool.submit(fn, *args)
        done = True
    finally:
        pool.shutdown(wait=done, cancel_futures=True)


@contextmanager
def one_child():
    """A spawned child that runs the calls given to it one after another; yields ``run(fn,
    *args)``. The checks of one step share its imports and the model it builds once (torch and
    the backbone: ~6 s a process on this machine); it is stopped on leaving, so nothing of it is
    resident while Flower runs."""
    pool = _spawned_worker()
    try:
        yield lambda fn, *args: pool.submit(fn, *args).result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def in_subprocess(fn, *args):
    """Run ``fn(*args)`` in a fresh (spawned) child: torch and the backbone never stay resident
    in the driver, whose memory counts towards the peak while Flower runs."""
    with one_child() as run:
        return run(fn, *args)
