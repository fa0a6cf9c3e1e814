"""Federation health at a glance (operator side).

    python -m deploy.health --state deploy/state --ledger runs/ledger.sqlite [--json]

Prints, per site of the registry: its node id, whether the SuperLink knows the key and
whether the SuperNode is online (from `flwr supernode list`), and the site's last ledger
contribution; then the ledger's current version. SuperNodes the SuperLink lists that are
not in the registry are shown as "unknown site". Exit status 1 when the SuperLink cannot be
reached or a registered site is offline, so it can serve as a monitoring probe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from deploy.connection import DEFAULT_NAME, DEFAULT_STATE, flwr_env
from deploy.register import read_registry


def list_supernodes(state: Path, connection: str = DEFAULT_NAME) -> tuple[list[dict[str, Any]] | None, str]:
    """(nodes, error) from `flwr supernode list --format json`."""
    flwr = Path(sys.executable).with_name("flwr")
    proc = subprocess.run([str(flwr), "supernode", "list", connection, "--format", "json"],
                          env=flwr_env(state), capture_output=True, text=True, timeout=60)
    try:
        result = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        return None, (proc.stdout + proc.stderr).strip()
    if not result.get("success"):
        return None, str(result.get("error-message", result))
    return result.get("nodes", []), ""


def ledger_summary(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    from server.ledger import Ledger

    with Ledger.open(path, create=False) as ledger:
        version = ledger.current_version()
        last: dict[str, Any] = {}
        for c in ledger.contributions():
            last[c.site_id] = {"contribution": c.id, "status": c.status, "added_at": c.added_at,
                               "num_examples": c.num_examples, "ended_at": c.ended_at,
                               "end_reason": c.end_reason}
        return {"version": version.version, "event": version.event, "site_id": version.site_id,
                "created_at": version.created_at, "active_sites": sorted(
                    s.site_id for s in ledger.sites() if s.active_contribution_id is not None),
                "last_contribution": last}


def health(state: Path, ledger: Path | None, connection: str = DEFAULT_NAME) -> dict[str, Any]:
    registry = read_registry(state)
    nodes, error = list_supernodes(state, connection)
    by_id = {str(n["node-id"]): n for n in nodes or []}
    sites = []
    for site_id, entry in sorted(registry["sites"].items()):
        node = by_id.pop(str(entry.get("node_id")), None)
        sites.append({"site_id": site_id, "node_id": entry.get("node_id"),
                      "status": node["status"] if node else ("unknown" if nodes is None else "not at SuperLink"),
                      "online_at": node.get("online-at") if node else None,
                      "unregistered": "unregistered_at" in entry})
    unknown = [{"node_id": n["node-id"], "status": n["status"]} for n in by_id.values()]
    return {"superlink_error": error or None, "sites": sites, "unknown_nodes": unknown,
            "ledger": ledger_summary(ledger) if ledger else None}


def render(report: dict[str, Any]) -> str:
    out = []
    if report["superlink_error"]:
        out.append(f"SuperLink: UNREACHABLE or refused: {report['superlink_error']}")
    else:
        out.append("SuperLink: reachable")
    last = (report["ledger"] or {}).get("last_contribution", {})
    out.append(f"{'site':>6}  {'node id':>20}  {'SuperNode':<16}  last contribution")
    for s in report["sites"]:
        c = last.get(s["site_id"])
        contrib = (f"#{c['contribution']} {c['status']} {c['added_at']} n={c['num_examples']}"
                   + (f" ({c['end_reason']})" if c["end_reason"] else "")) if c else "-"
        status = s["status"] + (" (revoked)" if s["unregistered"] else "")
        out.append(f"{s['site_id']:>6}  {str(s['node_id']):>20}  {status:<16}  {contrib}")
    for n in report["unknown_nodes"]:
        out.append(f"{'?':>6}  {str(n['node_id']):>20}  {n['status']:<16}  unknown site (not in registry)")
    led = report["ledger"]
    if led:
        out.append(f"ledger: version {led['version']} ({led['event']}"
                   + (f" {led['site_id']}" if led["site_id"] else "") + f", {led['created_at']}); "
                   f"active sites: {', '.join(led['active_sites']) or 'none'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    parser.add_argument("--ledger", type=Path, default=Path("runs/ledger.sqlite"))
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = health(args.state, args.ledger, args.connection)
    print(json.dumps(report, indent=2) if args.json else render(report))
    offline = [s for s in report["sites"] if s["status"] != "online" and not s["unregistered"]]
    return 1 if report["superlink_error"] or offline else 0


if __name__ == "__main__":
    sys.exit(main())
