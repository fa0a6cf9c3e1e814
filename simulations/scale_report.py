"""Where time and memory go as the number of sites grows: a table and a plot from summary.json files.

    python -m simulations.scale_report runs/A/summary.json runs/B/summary.json ... \\
        [--out docs/scale.png] [--progress driver.log]

Each argument is a ``simulations.run`` summary (``NAME=PATH`` labels it). Prints a Markdown table
(sites, rows per site, wall and its parts, peak private / RSS / PSS memory, the processes that
held the private peak, run directory bytes, accuracies, exactness flags) and writes a plot of
wall time and peak private memory against the number of sites; with ``--progress`` (a driver's
output, its lines "<s> s: <k>/<N> sites in the ledger, private memory <M> MiB") a third panel of
sites recorded and private memory over the train run.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

PROGRESS = re.compile(r"^\s*(\d+) s: (\d+)/(\d+) sites in the ledger, private memory ([\d,]+) MiB")

COLUMNS = (("sites", "num_clients"), ("wall s", "wall_s"), ("cache s", "cache_build_s"),
           ("train run s", "train_run_s"), ("unlearn run s", "unlearn_run_s"),
           ("private MiB", "peak_private_mib"), ("RSS MiB", "peak_rss_mib"), ("PSS MiB", "peak_pss_mib"),
           ("run dir MB", "run_dir_bytes"), ("TAFT composed", "accuracy_composed"),
           ("exact head", "accuracy_exact_head"), ("removal exact", "removal_bit_identical"),
           ("stats == central", "exact_head_equals_central"),
           ("stats removal exact", "exact_head_removal_bit_identical"))


def load(spec: str) -> tuple[str, dict]:
    label, _, path = spec.rpartition("=")
    summary = json.loads(Path(path).read_text())
    return label or f"{summary['num_clients']} sites", summary


def cell(summary: dict, key: str) -> str:
    value = summary.get(key)
    if value is None:
        return "–"
    if key == "run_dir_bytes":
        return f"{value / 1e6:,.0f}"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.4f}" if value < 1 else f"{value:,.0f}"
    return str(value)


def peak_holders(summary: dict, top: int = 3) -> str:
    rows = summary.get("peak_private_by_process_mib") or {}
    parts = sorted(((name, r.get("anon", 0) + r.get("shmem", 0), r.get("n", 1)) for name, r in rows.items()),
                   key=lambda x: -x[1])[:top]
    return ", ".join(f"{name}×{n} {mib:,.0f}" for name, mib, n in parts) or "–"


def table(runs: list[tuple[str, dict]]) -> str:
    head = "| run | " + " | ".join(name for name, _ in COLUMNS) + " | private peak held by (MiB) |"
    rule = "|" + "---|" * (len(COLUMNS) + 2)
    lines = [head, rule]
    for label, s in runs:
        lines.append(f"| {label} | " + " | ".join(cell(s, key) for _, key in COLUMNS) + f" | {peak_holders(s)} |")
    return "\n".join(lines)


def progress(log: Path) -> list[tuple[int, int, int, float]]:
    """(seconds, sites recorded, sites in all, private MiB) of a driver's progress lines (the first
    `flwr run` only: the train run)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if (m := PROGRESS.match(line)) is not None:
            row = (int(m[1]), int(m[2]), int(m[3]), float(m[4].replace(",", "")))
            if out and row[0] < out[-1][0]:
                break  # the unlearn run's lines start again at 30 s
            out.append(row)
    return out


def plot(runs: list[tuple[str, dict]], path: Path, trace: list | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from simulations.experiments.report import save_figure

    fig, axes = plt.subplots(1, 3 if trace else 2, figsize=(15 if trace else 10, 4))
    left, right = axes[0], axes[1]
    if trace:
        ax = axes[2]
        seconds = [t for t, *_ in trace]
        ax.plot(seconds, [mib for *_, mib in trace], color="tab:purple", label="private MiB (tree)")
        ax.set_xlabel(f"seconds into the train run of {trace[0][2]} sites")
        ax.set_ylabel("private MiB")
        ax.axhline(3072, linestyle="--", color="tab:red", label="budget 3,072")
        ax.set_ylim(0, 3500)
        twin = ax.twinx()
        twin.plot(seconds, [k for _, k, _, _ in trace], color="tab:blue", label="sites in the ledger")
        twin.set_ylabel("sites in the ledger")
        ax.legend(loc="lower left", fontsize=7)
        twin.legend(loc="lower right", fontsize=7)
    for label, s in runs:
        x = s["num_clients"]
        train = s.get("train_run_s")
        if train is None:  # stopped during the train run: the rest of its wall is that run
            train = max(0.0, (s.get("wall_s") or 0) - (s.get("cache_build_s") or 0))
        parts = [(s.get("cache_build_s") or 0, "cache"), (train, "train run"),
                 (s.get("unlearn_run_s") or 0, "unlearn run")]
        rest = max(0.0, (s.get("wall_s") or 0) - sum(v for v, _ in parts))
        bottom = 0.0
        for (value, name), color in zip(parts + [(rest, "driver: checks, evaluations, starts")],
                                        ("0.7", "tab:blue", "tab:green", "tab:orange")):
            left.bar(str(x) + "\n" + label, value, bottom=bottom, color=color, label=name if label == runs[0][0] else None)
            bottom += value
        right.bar(str(x) + "\n" + label, s.get("peak_private_mib") or 0, color="tab:purple")
    left.set_ylabel("wall seconds")
    left.axhline(900, linestyle="--", color="tab:red", label="1,000-site target 15 min")
    left.axhline(480, linestyle=":", color="tab:red", label="50-site target 8 min")
    left.legend(fontsize=7)
    right.set_ylabel("peak private MiB (anon + shmem, process tree)")
    right.axhline(3072, linestyle="--", color="tab:red", label="1,000-site budget 3,072")
    right.axhline(2560, linestyle=":", color="tab:red", label="50-site budget 2,560")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", help="summary.json files, optionally LABEL=PATH")
    p.add_argument("--out", type=Path, default=None, help="the plot (PNG); none: no plot")
    p.add_argument("--progress", type=Path, default=None, help="a driver's output with progress lines")
    args = p.parse_args(argv)
    runs = [load(spec) for spec in args.summaries]
    print(table(runs))
    if args.out is not None:
        plot(runs, args.out, progress(args.progress) if args.progress else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
