"""Federation health at a glance (operator side).

    python -m deploy.health [--state DIR] [--ledger FILE] [--json] [--wait SECONDS]

Prints, per site of the registry: its key fingerprint, node id, whether the SuperNode is online
(from `flwr supernode list`), revoked or withdrawn, and its last ledger contribution; then the
ledger's current version. Then what was refused, by site and key fingerprint (never a PEM blob):
- SuperNodes the SuperLink refused at activation (unregistered or revoked keys), read from the
  SuperLink's log `<state>/logs/superlink.log` (deploy/superlink.sh writes it);
- replies the ServerApp rejected (`site_identity_mismatch`, `unknown_site`, `site_withdrawn`,
  `not_private`, ...), from the run reports in `<state>/reports/`, with the sending node mapped
  to the site registered for it;
- withdrawal requests the ServerApp refused.
SuperNodes the SuperLink lists that are not in the registry are shown as "unknown site".
Defaults: --state is the operator state dir, --ledger `<state>/ledger.sqlite`.
Exit status 1 when the SuperLink cannot be reached or a registered, unrevoked site is offline,
so it can serve as a monitoring probe.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from deploy.connection import DEFAULT_NAME, DEFAULT_STATE, flwr_env
from deploy.register import read_registry
from tangent.protocol.text import escape_controls


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


# Flower logs a refused activation as "... public key: b'-----BEGIN PUBLIC KEY-----\\n...'"
_REFUSED_KEY = re.compile(r"public key: (b'-----BEGIN PUBLIC KEY-----[A-Za-z0-9+/=\\n]+-----END PUBLIC KEY-----(?:\\n)?')"
                          r"(?:, exception: ([^\n]*))?")


def pem_fingerprint(pem: bytes) -> str:
    """The registry's fingerprint rule (SHA-256 of the DER SubjectPublicKeyInfo) for a PEM key."""
    from cryptography.hazmat.primitives import serialization

    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def _by_fingerprint(registry: dict[str, Any]) -> dict[str, str]:
    owners = {}
    for site_id, entry in registry["sites"].items():
        for fp in [entry.get("fingerprint"), *entry.get("previous_fingerprints", [])]:
            if fp:
                owners[fp] = f"site {site_id}" + (" (revoked)" if entry.get("revoked") or fp != entry.get("fingerprint") else "")
    return owners


def refused_supernodes(log_path: Path, registry: dict[str, Any]) -> list[dict[str, Any]]:
    """SuperNodes the SuperLink refused, by key fingerprint, from its log."""
    if not log_path.exists():
        return []
    owners = _by_fingerprint(registry)
    counts: Counter = Counter()
    why: dict[str, str] = {}
    for match in _REFUSED_KEY.finditer(log_path.read_text(errors="replace")):
        try:
            fingerprint = pem_fingerprint(ast.literal_eval(match.group(1)))
        except (ValueError, SyntaxError, TypeError):
            continue
        counts[fingerprint] += 1
        why[fingerprint] = (match.group(2) or "refused").strip()
    return [{"fingerprint": fp, "owner": owners.get(fp, "unregistered key"), "attempts": n, "reason": why[fp]}
            for fp, n in counts.most_common()]


def _report_files(state: Path) -> list[Path]:
    return sorted((Path(state) / "reports").glob("*.json"), key=lambda p: p.stat().st_mtime)


def rejected_replies(state: Path, registry: dict[str, Any]) -> list[dict[str, Any]]:
    """Replies the ServerApp rejected, grouped by (site the report names, sending node and the
    site registered for it, reason); `detail` is the ServerApp's explanation (the last one)."""
    by_node = {str(e.get("node_id")): (site_id, e.get("fingerprint")) for site_id, e in registry["sites"].items()}
    counts: Counter = Counter()
    details: dict[tuple, str] = {}
    for path in _report_files(state):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for rnd in report.get("rounds", []) if isinstance(report, dict) else []:
            for r in rnd.get("rejections", []) if isinstance(rnd, dict) else []:
                if not isinstance(r, dict):
                    continue
                node_site, fingerprint = by_node.get(str(r.get("node_id")), (None, None))
                key = (str(r.get("site_id")), str(r.get("node_id")), node_site, fingerprint, str(r.get("reason")))
                counts[key] += 1
                details[key] = str(r.get("detail", ""))[:200]
    return [{"site_id": d, "node_id": n, "registered_site": s, "fingerprint": fp, "reason": reason, "count": c,
             "detail": details[(d, n, s, fp, reason)]}
            for (d, n, s, fp, reason), c in counts.most_common()]


def refused_withdrawals(state: Path) -> list[dict[str, Any]]:
    out = []
    for path in _report_files(state):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for w in report.get("withdrawals", []) if isinstance(report, dict) else []:
            if isinstance(w, dict) and not w.get("accepted"):
                out.append({"report": path.name, "request": str(w.get("request")),
                            "site_id": w.get("site_id"), "detail": str(w.get("detail"))})
    return out


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
                               "end_reason": c.end_reason, "delta_sha256": c.delta_sha256}
        withdrawn = ledger.withdrawn_sites() if hasattr(ledger, "withdrawn_sites") else []
        return {"version": version.version, "event": version.event, "site_id": version.site_id,
                "created_at": version.created_at, "active_sites": sorted(
                    s.site_id for s in ledger.sites() if s.active_contribution_id is not None),
                "withdrawn_sites": sorted(withdrawn), "last_contribution": last}


def health(state: Path, ledger: Path | None, connection: str = DEFAULT_NAME) -> dict[str, Any]:
    registry = read_registry(state)
    nodes, error = list_supernodes(state, connection)
    by_id = {str(n["node-id"]): n for n in nodes or []}
    sites = []
    for site_id, entry in sorted(registry["sites"].items()):
        node = by_id.pop(str(entry.get("node_id")), None)
        sites.append({"site_id": site_id, "node_id": entry.get("node_id"), "fingerprint": entry.get("fingerprint"),
                      "max_examples": entry.get("max_examples"),
                      "status": node["status"] if node else ("unknown" if nodes is None else "not at SuperLink"),
                      "online_at": node.get("online-at") if node else None,
                      "revoked": bool(entry.get("revoked"))})
    unknown = [{"node_id": n["node-id"], "status": n["status"]} for n in by_id.values()]
    return {"superlink_error": error or None, "sites": sites, "unknown_nodes": unknown,
            "refused_supernodes": refused_supernodes(Path(state) / "logs" / "superlink.log", registry),
            "rejected_replies": rejected_replies(state, registry),
            "refused_withdrawals": refused_withdrawals(state),
            "ledger": ledger_summary(ledger) if ledger else None}


def render(report: dict[str, Any]) -> str:
    out = []
    if report["superlink_error"]:
        out.append(f"SuperLink: UNREACHABLE or refused: {report['superlink_error']}")
    else:
        out.append("SuperLink: reachable")
    last = (report["ledger"] or {}).get("last_contribution", {})
    withdrawn = set((report["ledger"] or {}).get("withdrawn_sites", []))
    out.append(f"{'site':>6}  {'key':<23}  {'node id':>20}  {'SuperNode':<20}  last contribution")
    for s in report["sites"]:
        c = last.get(s["site_id"])
        contrib = (f"#{c['contribution']} {c['status']} {c['added_at']} n={c['num_examples']}"
                   + (f" ({c['end_reason']})" if c["end_reason"] else "")) if c else "-"
        status = s["status"] + (" (revoked)" if s["revoked"] else "") + (" (withdrawn)" if s["site_id"] in withdrawn else "")
        out.append(f"{s['site_id']:>6}  {_short(s['fingerprint']):<23}  {str(s['node_id']):>20}  {status:<20}  {contrib}")
    for n in report["unknown_nodes"]:
        out.append(f"{'?':>6}  {'?':<23}  {str(n['node_id']):>20}  {n['status']:<20}  unknown site (not in registry)")
    for r in report["refused_supernodes"]:
        out.append(f"REFUSED SuperNode: key {r['fingerprint']} ({r['owner']}), {r['attempts']} attempt(s): {r['reason']}")
    active = {site: c.get("delta_sha256") for site, c in last.items() if c["status"] == "active"}
    for r in report["rejected_replies"]:
        sender = (f"node {r['node_id']} = site {r['registered_site']} (key {_short(r['fingerprint'])})"
                  if r["registered_site"] else f"node {r['node_id']} (not in the registry)")
        if _unchanged(r, active):
            # a re-run whose site sent the very Δ it already has recorded: nothing to do, not a fault
            out.append(f"UNCHANGED reply from {sender}: the same Δ as its active contribution, x{r['count']} (no-op)")
            continue
        out.append(f"REJECTED reply from {sender}: {r['reason']} x{r['count']} ({r['detail']})")
    for w in report["refused_withdrawals"]:
        out.append(f"REFUSED withdrawal {w['request']} ({w['report']}): {w['detail']}")
    led = report["ledger"]
    if led:
        out.append(f"ledger: version {led['version']} ({led['event']}"
                   + (f" {led['site_id']}" if led["site_id"] else "") + f", {led['created_at']}); "
                   f"active sites: {', '.join(led['active_sites']) or 'none'}")
    # names, reasons and details come from sites, request files and SuperNode logs: shown, never obeyed
    return "\n".join(escape_controls(line) for line in out)


def _unchanged(rejection: dict[str, Any], active: dict[str, str | None]) -> bool:
    """A ``duplicate`` rejection whose Δ is the sending site's active contribution."""
    if rejection["reason"] != "duplicate" or rejection["registered_site"] != rejection["site_id"]:
        return False
    sha = re.search(r"\b[0-9a-f]{64}\b", rejection["detail"])
    return sha is not None and active.get(rejection["site_id"]) == sha.group(0)


def _short(fingerprint: str | None) -> str:
    return (fingerprint[:23] if fingerprint else "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="operator state dir (default %(default)s)")
    parser.add_argument("--ledger", type=Path, help="the ledger (default <state>/ledger.sqlite)")
    parser.add_argument("--connection", default=DEFAULT_NAME)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="poll until every registered, unrevoked site is online (at most SECONDS)")
    args = parser.parse_args(argv)
    ledger = args.ledger or args.state / "ledger.sqlite"
    deadline = time.monotonic() + args.wait
    while True:
        report = health(args.state, ledger, args.connection)
        if not _offline(report) or time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 1 if _offline(report) else 0


def _offline(report: dict[str, Any]) -> bool:
    """The SuperLink is unreachable or a registered, unrevoked site is not online."""
    return bool(report["superlink_error"]) or any(
        s["status"] != "online" and not s["revoked"] for s in report["sites"])


if __name__ == "__main__":
    sys.exit(main())
