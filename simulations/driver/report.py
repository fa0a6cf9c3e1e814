"""What a run leaves for people: the accuracy plot and the table printed at the end (summary.json itself
is written by the driver's main, also when a step fails).
"""
from __future__ import annotations

from pathlib import Path

from simulations.driver.checks import site_order


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
            ("exact head: λ (GCV)" if not s.get("dp") else "DP head: λ (ℓ · noise edge)", s.get("exact_head_lambda")),
            ("stored bytes per site: Δ / statistics", f"{s.get('delta_stored_bytes_per_site') or 0:,.0f} / "
                                                       f"{s.get('exact_head_stored_bytes_per_site') or 0:,.0f}"),
            ("rejected", s.get("rejected")),
            *([("DP: ε requested a contribution / head's μ² share", f"{s.get('dp_epsilon_requested')} / "
                                                                    f"{s.get('dp_head_share_requested')}"),
               ("DP: ε spent max (composed) / δ", f"{s.get('dp_epsilon_spent_max')} / {s.get('dp_delta')}"),
               ("DP head: ledger sum == releases / removal exact",
                f"{s.get('dp_head_sum_equals_releases')} / {s.get('dp_head_removal_bit_identical')}")]
              if s.get("dp") else []),
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
