"""``taft-ledger``: inspect and maintain the contribution ledger from a shell.

    taft-ledger list                      sites, their active contribution, the model version
    taft-ledger show SITE                 every contribution a site has made
    taft-ledger remove SITE --reason TXT  withdraw a site (exact subtraction, new model version)
    taft-ledger verify                    recompute sums, digests and the audit chain
    taft-ledger export --out DIR          composed Δ as safetensors + manifest.json

The ledger file is ``--ledger PATH``, else ``$TAFT_LEDGER``, else ``runs/ledger.sqlite``.
Exit status: 0 success, 1 verification failed, 2 usage error or no ledger.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import safetensors.numpy

from server.ledger import Contribution, Ledger, LedgerCorrupt, LedgerError, arrays_digest

DEFAULT_LEDGER = "runs/ledger.sqlite"
COMPOSED_FILE = "composed_delta.safetensors"
MANIFEST_FILE = "manifest.json"


def _epsilon_text(epsilon: float | None) -> str:
    return "-" if epsilon is None else f"{epsilon:.3g}"


def _cmd_list(ledger: Ledger, args) -> int:
    current = ledger.current_version()
    active = {c.site_id: c for c in ledger.contributions(status="active")}
    sites = ledger.sites()
    if args.json:
        print(json.dumps({"model_version": current.version, "total_weight": current.total_weight,
                          "sites": [{**asdict(s), "active": asdict(active[s.site_id]) if s.site_id in active else None}
                                    for s in sites]}, indent=2))
        return 0
    print(f"model version {current.version}, {len(active)} active site(s), total weight {current.total_weight}")
    print(f"{'site':<20} {'status':<9} {'ver':>4} {'examples':>9} {'epsilon':>8}  delta sha256")
    for s in sites:
        c = active.get(s.site_id)
        if c is None:
            print(f"{s.site_id:<20} {'inactive':<9} {'-':>4} {'-':>9} {'-':>8}  -")
        else:
            print(f"{s.site_id:<20} {'active':<9} {c.version:>4} {c.num_examples:>9} "
                  f"{_epsilon_text(c.epsilon):>8}  {c.delta_sha256[:16]}")
    return 0


def _cmd_show(ledger: Ledger, args) -> int:
    contributions = ledger.contributions(site_id=args.site)
    if not contributions:
        print(f"no contributions from site {args.site!r}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(c) for c in contributions], indent=2))
        return 0
    for c in contributions:
        _print_contribution(c)
    return 0


def _print_contribution(c: Contribution) -> None:
    print(f"contribution {c.id}: site {c.site_id} version {c.version} [{c.status}]")
    for field in ("num_examples", "weight", "epsilon", "delta_dp", "dp_settings", "shard_fingerprint",
                  "base_digest", "train_config", "extra", "delta_sha256", "delta_norm", "added_at",
                  "added_in_version", "ended_at", "ended_in_version", "end_reason"):
        value = getattr(c, field)
        if value is not None:
            print(f"  {field:<18} {json.dumps(value) if isinstance(value, dict) else value}")


def _cmd_remove(ledger: Ledger, args) -> int:
    if ledger.remove(args.site, reason=args.reason):
        v = ledger.current_version()
        print(f"removed {args.site}: model version {v.version}, composed sha256 {v.composed_sha256}")
    else:
        print(f"{args.site} has no active contribution; nothing to do")
    return 0


def _cmd_verify(ledger: Ledger, args) -> int:
    try:
        report = ledger.verify()
    except LedgerCorrupt as e:
        if args.json:
            print(json.dumps({"ok": False, "problems": e.problems}, indent=2))
        else:
            print("FAILED")
            for problem in e.problems:
                print(f"  {problem}")
        return 1
    if args.json:
        print(json.dumps({"ok": True, **asdict(report)}, indent=2))
    else:
        print(f"OK: model version {report.current_version}, {report.active_contributions} active contribution(s), "
              f"{report.audit_entries} audit entries, composed sha256 {report.composed_sha256}")
    return 0


def export(ledger: Ledger, out: Path) -> dict:
    """Write the composed Δ and its manifest into ``out``; returns the manifest."""
    # One snapshot: the version, the contributions and the tensors must describe the same state.
    with ledger.snapshot():
        version = ledger.current_version()
        active = ledger.contributions(status="active")
        composed = ledger.composed_arrays()
        settings = ledger.settings()
        audit_head = ledger.audit_log()[-1]["hash"]
    max_epsilon = max((math.inf if c.epsilon is None else c.epsilon for c in active), default=None)
    manifest = {
        "model_version": version.version,
        "created_at": version.created_at,
        "composed_sha256": version.composed_sha256,
        "composed_file": COMPOSED_FILE,
        "base_digest": settings.get("base_digest"),
        "weighting": settings["weighting"],
        "total_weight": version.total_weight,
        "frac_bits": settings["frac_bits"],
        "sites": [{"site_id": c.site_id, "contribution_id": c.id, "version": c.version,
                   "num_examples": c.num_examples, "epsilon": c.epsilon, "delta_dp": c.delta_dp,
                   "delta_sha256": c.delta_sha256} for c in active],
        # A site trained without DP makes the composed model non-private: ε is then unbounded.
        "max_epsilon": None if max_epsilon is None or math.isinf(max_epsilon) else max_epsilon,
        "non_private_sites": [c.site_id for c in active if c.epsilon is None],
        "audit_head": audit_head,
    }
    assert arrays_digest(composed) == version.composed_sha256
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(composed, out / COMPOSED_FILE,
                                metadata={"model_version": str(version.version),
                                          "composed_sha256": version.composed_sha256})
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _cmd_export(ledger: Ledger, args) -> int:
    manifest = export(ledger, args.out)
    print(f"exported model version {manifest['model_version']} ({len(manifest['sites'])} site(s)) to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taft-ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, metavar="PATH", default=Path(os.environ.get("TAFT_LEDGER", DEFAULT_LEDGER)),
                        help="ledger file (default: $TAFT_LEDGER or %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="sites and their active contributions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("show", help="every contribution of one site")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("remove", help="withdraw a site's active contribution (idempotent)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_remove)

    p = sub.add_parser("verify", help="recompute accumulators and digests, check the audit chain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("export", help="write the composed Δ (safetensors) and manifest.json")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.set_defaults(run=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Ledger.open(args.ledger, create=False) as ledger:
            return args.run(ledger, args)
    except LedgerError as e:
        print(f"taft-ledger: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
