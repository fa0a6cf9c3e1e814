"""Running experiments in lanes (one process each) and writing their sections."""
from __future__ import annotations

import importlib
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from simulations.experiments import report as R

NAMES = ("composition", "removal", "retraining", "privacy", "dp_scale")
#: two lanes of similar cost. Removal and retraining reuse composition's shard store: retraining
#: follows it in its lane; removal runs late in the other lane and waits for the shard sets while
#: composition is still running (composition stores the sets they need first)
LANES = (("composition", "retraining"), ("dp_scale", "privacy", "removal"))


@dataclass
class Options:
    quick: bool
    out: str
    results: str
    threads: int
    cache_dir: str | None
    progress: bool
    command: str
    parallel: bool = False


def module(name: str):
    return importlib.import_module(f"simulations.experiments.{name}")


def settings_for(quick: bool):
    from simulations.experiments.common import FULL, QUICK

    return QUICK if quick else FULL


def plan(names, jobs: int) -> list[tuple[str, ...]]:
    """Split the selected experiments over at most ``jobs`` lanes (order kept within a lane)."""
    names = [n for n in NAMES if n in names]
    if jobs <= 1 or len(names) <= 1:
        return [tuple(names)] if names else []
    lanes = [tuple(n for n in lane if n in names) for lane in LANES]
    return [lane for lane in lanes if lane]


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def run_lane(names, options: Options) -> None:
    """Run ``names`` one after the other in this process; each writes CSV, plot, meta, section."""
    import torch

    from simulations.experiments.common import Context

    torch.set_num_threads(options.threads)
    settings = settings_for(options.quick)
    out = Path(options.out)
    ctx = Context(settings, cache_dir=options.cache_dir, build_cache=not options.quick,
                  progress=options.progress)
    for name in names:
        started, load_before = now(), os.getloadavg()[0]
        start = time.perf_counter()
        extra = module(name).run(ctx, out)
        meta = {"name": name, "command": options.command, "settings": settings.to_dict(),
                "quick": options.quick, "started": started, "finished": now(),
                "wall_s": round(time.perf_counter() - start, 1), "threads": options.threads,
                "parallel": options.parallel, "load_before": load_before,
                "load_after": os.getloadavg()[0], "tokens": ctx.token_source,
                "python": platform.python_version(), "torch": torch.__version__, **extra}
        R.write_json(out / name / "meta.json", meta)
        R.update_results(Path(options.results), {name: module(name).render(out / name, meta, options.results)})
        print(f"[{name}] done in {meta['wall_s']:.0f} s -> {out / name}", flush=True)


def _lane_entry(names, options: Options) -> None:
    try:
        run_lane(names, options)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def run(names, jobs: int, options: Options) -> dict:
    """Run the experiments (lanes in parallel processes when ``jobs`` > 1); returns the suite
    record (also written to ``<out>/suite.json`` and the suite section)."""
    import multiprocessing

    lanes = plan(names, jobs)
    started, start = now(), time.perf_counter()
    failed = []
    if len(lanes) == 1:
        run_lane(lanes[0], options)
    elif lanes:
        options.parallel = True
        context = multiprocessing.get_context("spawn")
        procs = [context.Process(target=_lane_entry, args=(lane, options), name="+".join(lane))
                 for lane in lanes]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
            if p.exitcode != 0:
                failed.append(p.name)
    record = {"command": options.command, "started": started, "finished": now(),
              "wall_s": round(time.perf_counter() - start, 1), "lanes": [list(lane) for lane in lanes],
              "threads_per_lane": options.threads, "failed_lanes": failed, "quick": options.quick,
              "cpus": os.cpu_count()}
    if set(names) == set(NAMES):  # the suite section describes a whole-suite run only
        R.write_json(Path(options.out) / "suite.json", record)
        R.update_results(Path(options.results), {"suite": render_suite(Path(options.out), options.results)})
    return record


def render_suite(out: Path, results) -> str:
    record = R.read_json(out / "suite.json")
    rows = []
    for name in NAMES:
        path = out / name / "meta.json"
        if path.is_file():
            meta = R.read_json(path)
            rows.append([name, meta["started"], R.seconds(meta["wall_s"])])
    lanes = " and ".join("[" + " → ".join(lane) + "]" for lane in record["lanes"])
    status = "all lanes finished" if not record["failed_lanes"] else f"FAILED lanes: {record['failed_lanes']}"
    return f"""## Whole suite

`{record['command']}`: **{record['wall_s'] / 60:.1f} min** wall time ({record['wall_s']:.0f} s, started
{record['started']}; {status}), on {record['cpus']} cores shared with other jobs, lanes {lanes} run as
parallel processes with {record['threads_per_lane']} torch thread(s) each.

{R.table(["experiment", "started", "wall time"], rows)}
"""


def replot(experiment, out_dir: Path, meta: dict) -> None:
    """Redraw an experiment's plot from its CSV: its own ``replot`` where the plot needs more
    than the rows, else ``plot(rows, path)``."""
    if hasattr(experiment, "replot"):
        experiment.replot(out_dir, meta)
    else:
        experiment.plot(R.read_csv(out_dir / "results.csv"), out_dir / meta["plot"])


def regenerate(names, out: Path, results: Path) -> list[str]:
    """Redraw the plots and rewrite the sections of ``results`` from the CSVs and meta files
    under ``out``."""
    done, sections = [], {}
    for name in NAMES:
        meta_path = out / name / "meta.json"
        if name in names and meta_path.is_file() and (out / name / "results.csv").is_file():
            meta = R.read_json(meta_path)
            replot(module(name), out / name, meta)
            sections[name] = module(name).render(out / name, meta, results)
            done.append(name)
    if (out / "suite.json").is_file():
        sections["suite"] = render_suite(out, results)
        done.append("suite")
    if sections:
        R.update_results(results, sections)
    return done
