"""``taft-ledger``: inspect and maintain the contribution ledger from a shell.

    taft-ledger list                      sites, their active contribution, withdrawn state, ε totals
    taft-ledger show SITE                 every contribution a site has made, its privacy total
    taft-ledger remove SITE --reason TXT  withdraw a site (exact subtraction; it stays withdrawn)
    taft-ledger readmit SITE --reason TXT let a withdrawn site contribute again (audited)
    taft-ledger retract SITE --reason TXT subtract a site's contribution without withdrawing it
    taft-ledger verify [--public-key PEM] [--export DIR]
                                          recompute sums and digests, check the chain, the signed
                                          heads (against PEM when given) and that an earlier
                                          export's signed head is still in the ledger
    taft-ledger export --out DIR [--model-spec JSON]
                                          delta ledger: composed Δ as safetensors; stats ledger:
                                          the exact head (weight, bias; λ by GCV); + manifest.json
                                          (signed head, signed export statement); writes the
                                          ledger's public key beside it (<ledger>.public-key.pem)
    taft-ledger verify-export DIR --public-key PEM
                                          check an export against the server's public key (that file)
    taft-ledger forget REQUEST.json --stats FILE [--delta FILE] --registry R [--stats-ledger PATH]
                                          apply a site's signed forget-samples request to the Δ
                                          ledger and the exact head's stats ledger

Every subcommand works on both ledger families ("delta": TAFT Δw, "stats": exact-head statistics).
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

from server.ledger import Contribution, Ledger, LedgerCorrupt, LedgerError
from server.ledger.export import MANIFEST_FILE, export, verify_export

DEFAULT_LEDGER = "runs/ledger.sqlite"


def _epsilon_text(epsilon: float | None) -> str:
    return "-" if epsilon is None else ("inf" if math.isinf(epsilon) else f"{epsilon:.3g}")


def _json_privacy(totals: dict) -> dict:
    """ε = inf is not JSON: written as null (``non_dp`` says why)."""
    return {site: {**t, "epsilon": None if math.isinf(t["epsilon"]) else t["epsilon"]} for site, t in totals.items()}


def _cmd_list(ledger: Ledger, args) -> int:
    with ledger.snapshot():
        current = ledger.current_version()
        active = {c.site_id: c for c in ledger.contributions(status="active")}
        sites = ledger.sites()
        privacy = ledger.privacy_totals()
    if args.json:
        print(json.dumps({"family": ledger.family, "model_version": current.version, "total_weight": current.total_weight,
                          "withdrawn_sites": [s.site_id for s in sites if s.withdrawn],
                          "privacy": _json_privacy(privacy),
                          "sites": [{**asdict(s), "active": asdict(active[s.site_id]) if s.site_id in active else None}
                                    for s in sites]}, indent=2))
        return 0
    print(f"{ledger.family} ledger, model version {current.version}, {len(active)} active site(s), "
          f"total weight {current.total_weight}")
    print(f"{'site':<20} {'status':<9} {'ver':>4} {'examples':>9} {'epsilon':>8} {'Σ epsilon':>9}  delta sha256")
    for s in sites:
        c = active.get(s.site_id)
        total = _epsilon_text(privacy[s.site_id]["epsilon"]) if s.site_id in privacy else "-"
        status = "withdrawn" if s.withdrawn else ("active" if c else "inactive")
        if c is None:
            print(f"{s.site_id:<20} {status:<9} {'-':>4} {'-':>9} {'-':>8} {total:>9}  -")
        else:
            print(f"{s.site_id:<20} {status:<9} {c.version:>4} {c.num_examples:>9} "
                  f"{_epsilon_text(c.epsilon):>8} {total:>9}  {c.delta_sha256[:16]}")
    return 0


def _cmd_show(ledger: Ledger, args) -> int:
    with ledger.snapshot():
        contributions = ledger.contributions(site_id=args.site)
        withdrawn = args.site in ledger.withdrawn_sites()
        privacy = ledger.privacy_totals().get(args.site)
    if not contributions and not withdrawn:
        print(f"no contributions from site {args.site!r}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"site_id": args.site, "withdrawn": withdrawn,
                          "privacy": _json_privacy({args.site: privacy})[args.site] if privacy else None,
                          "contributions": [asdict(c) for c in contributions]}, indent=2))
        return 0
    print(f"site {args.site}: {'WITHDRAWN (readmit to accept contributions again)' if withdrawn else 'admitted'}")
    if privacy:
        print(f"  privacy total over {privacy['contributions']} contribution(s): ε = "
              f"{_epsilon_text(privacy['epsilon'])}, δ = {privacy['delta']:.3g}"
              + (f" ({privacy['non_dp']} without DP)" if privacy["non_dp"] else ""))
    for c in contributions:
        _print_contribution(c, ledger.family)
    return 0


def _print_contribution(c: Contribution, family: str) -> None:
    print(f"contribution {c.id}: site {c.site_id} version {c.version} [{c.status}]")
    for field in ("num_examples", "weight", "epsilon", "delta_dp", "dp_settings", "shard_fingerprint",
                  "base_digest", "train_config", "extra", "delta_sha256", "delta_norm", "added_at",
                  "added_in_version", "ended_at", "ended_in_version", "end_reason"):
        value = getattr(c, field)
        if value is not None:
            print(f"  {_label(field, family):<18} {json.dumps(value) if isinstance(value, dict) else value}")


def _label(field: str, family: str) -> str:
    """In a statistics ledger the ``base_digest`` column holds the feature digest: say so."""
    return "feature_digest" if field == "base_digest" and family == "stats" else field


def _cmd_remove(ledger: Ledger, args) -> int:
    if not ledger.remove(args.site, reason=args.reason):
        print(f"{args.site} is already withdrawn; nothing to do")
        return 0
    v = ledger.current_version()
    if v.event == "remove":
        print(f"removed {args.site}: model version {v.version}, composed sha256 {v.composed_sha256}; "
              f"the site stays withdrawn until readmitted")
    else:
        print(f"{args.site} had no active contribution; it is now withdrawn (model version {v.version})")
    return 0


def _cmd_readmit(ledger: Ledger, args) -> int:
    if ledger.readmit(args.site, reason=args.reason):
        print(f"readmitted {args.site}: model version {ledger.current_version().version} (model unchanged)")
    else:
        print(f"{args.site} is not withdrawn; nothing to do")
    return 0


def _cmd_retract(ledger: Ledger, args) -> int:
    if ledger.retract(args.site, reason=args.reason):
        v = ledger.current_version()
        print(f"retracted {args.site}'s contribution: model version {v.version}, composed sha256 "
              f"{v.composed_sha256}; the site is not withdrawn")
    else:
        print(f"{args.site} has no active contribution; nothing to do")
    return 0


def _cmd_verify(ledger: Ledger, args) -> int:
    try:
        report = ledger.verify(public_key=args.public_key)
        problems = [] if args.export is None else _export_in_ledger(ledger, args.export)
        if problems:
            raise LedgerCorrupt(problems)
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
        return 0
    print(f"OK: model version {report.current_version}, {report.active_contributions} active contribution(s), "
          f"{report.audit_entries} audit entries, composed sha256 {report.composed_sha256}")
    print(f"head: audit hash {report.head_audit_hash}")
    print(f"      signature {report.head_signature}")
    print(f"      signed by {report.public_key_fingerprint}"
          + (" (the given public key)" if args.public_key else " (the ledger's own key: pass --public-key to check "
                                                               "against a copy you trust)"))
    if report.head_file_version != report.current_version:
        print(f"note: the head file names version {report.head_file_version} (a write or crash in between; "
              f"the next open brings it up to date)")
    return 0


def _export_in_ledger(ledger: Ledger, directory: Path) -> list[str]:
    """An export's signed head must still be in the ledger: a rolled-back ledger lacks it."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        head, signature = manifest["signed_head"]["head"], manifest["signed_head"]["signature"]
        version = int(head["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"cannot read the export's signed head in {directory}: {type(e).__name__}: {e}"]
    try:
        held = ledger.signed_head(version)
    except KeyError:
        return [f"the export's version {head['version']} is not in the ledger: rolled back?"]
    if held != (head, signature):
        return [f"the export's signed head for version {head['version']} differs from the ledger's"]
    return []


def _model_spec(text: str | None) -> dict | None:
    """``--model-spec``: JSON text or a JSON file (a ModelSpec config, e.g. {"img-size": 56})."""
    if text is None:
        return None
    path = Path(text)
    try:
        value = json.loads(path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model-spec must be a JSON object or a JSON file: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--model-spec must be a JSON object")
    return value


def _cmd_export(ledger: Ledger, args) -> int:
    spec = _model_spec(args.model_spec)
    if spec is not None and ledger.family == "stats":
        raise ValueError("a stats ledger's model spec is in its model card; --model-spec is for delta ledgers")
    manifest = export(ledger, args.out, model_spec=spec)
    what = (f"exact head (p = {manifest['num_features']}, k = {manifest['num_classes']}, n = {manifest['n']}, "
            f"λ = {manifest['lambda']:.4g})" if manifest["family"] == "stats" else "composed Δ")
    print(f"exported model version {manifest['model_version']} ({len(manifest['sites'])} site(s)), {what}, to "
          f"{args.out}; signed by {manifest['public_key_fingerprint']}")
    key_file = _write_public_key(ledger.path, manifest["public_key"])
    print(f"the ledger's public key is {key_file}: hand it to the export's users through a channel they trust; "
          f"they check the export with `taft-ledger verify-export {args.out} --public-key {key_file.name}`")
    return 0


def _write_public_key(ledger_path: Path, pem: str) -> Path:
    """``<ledger>.public-key.pem``: the key verify-export needs, written beside the ledger (a
    companion file, so no report can overwrite it); an existing different one is an error."""
    path = ledger_path.with_name(ledger_path.name + ".public-key.pem")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or path.read_text() != pem:
            raise ValueError(f"{path} exists and is not this ledger's public key: refused")
        return path
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(pem)
    os.replace(temporary, path)
    return path


def _cmd_verify_export(args) -> int:
    try:
        head = verify_export(args.directory, args.public_key)
    except LedgerCorrupt as e:
        print("FAILED")
        for problem in e.problems:
            print(f"  {problem}")
        return 1
    print(f"OK: model version {head['version']}, composed sha256 {head['composed_sha256']}, "
          f"signed by {head['public_key']}")
    return 0


def _add_forget_command(sub) -> None:
    """``taft-ledger forget``: sample-level forgetting (server/trust/forgetting.py; deploy/README.md)."""
    p = sub.add_parser("forget", help="apply a site's signed forget-samples request to both ledgers",
                       description="Verify a signed forget-samples request (python -m client.forget writes it) and, "
                                   "only if every check passes, replace the site's statistics in the stats ledger "
                                   "and retract its TAFT Δw from --ledger (or replace it with the retrained --delta "
                                   "the request signs). Exit 0: applied; 1: refused (both ledgers unchanged; the "
                                   "reason is printed and kept in <ledger>.withdrawals.sqlite).")
    p.add_argument("request", type=Path, metavar="REQUEST.json")
    p.add_argument("--stats", type=Path, required=True, metavar="FILE", help="the replacement statistics file")
    p.add_argument("--delta", type=Path, default=None, metavar="FILE", help="the retrained Δw the request signs")
    p.add_argument("--registry", type=Path, required=True, metavar="R", help="the site registry (deploy.register)")
    p.add_argument("--stats-ledger", type=Path, default=None, metavar="PATH",
                   help="the exact head's stats ledger (default: exact_head.sqlite beside --ledger)")
    p.add_argument("--max-age-s", type=float, default=None, help="request validity (default: 15 minutes)")
    p.set_defaults(run=None, run_without_ledger=_cmd_forget)


def _cmd_forget(args) -> int:
    from server.trust.forgetting import MAX_AGE_S, ForgetRefused, apply_forget_file
    from server.ledger.ledgers import Ledgers

    stats_path = args.stats_ledger or args.ledger.with_name("exact_head.sqlite")
    with Ledger.open(args.ledger, create=False, signing_key=args.signing_key) as delta, \
            Ledger.open(stats_path, create=False, family="stats") as stats:
        try:
            request = apply_forget_file(args.request, args.stats, args.delta, Ledgers(delta, stats),
                                        args.ledger, args.registry, max_age_s=args.max_age_s or MAX_AGE_S)
        except ForgetRefused as err:
            print(f"REFUSED: {err}", file=sys.stderr)
            return 1
        print(f"site {request.site_id} forgot {request.forgotten} sample(s): stats ledger {stats_path} "
              f"version {stats.current_version().version}, Δ ledger version {delta.current_version().version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taft-ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, metavar="PATH", default=Path(os.environ.get("TAFT_LEDGER", DEFAULT_LEDGER)),
                        help="ledger file (default: $TAFT_LEDGER or %(default)s)")
    parser.add_argument("--signing-key", type=Path, metavar="PEM", default=None,
                        help="the ledger's Ed25519 signing key (default: <ledger>.signing-key.pem)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="sites, their active contributions, withdrawn state and ε totals")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("show", help="every contribution of one site and its privacy total")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_show)

    p = sub.add_parser("remove", help="withdraw a site: subtract its contribution, refuse it until readmitted")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_remove)

    p = sub.add_parser("readmit", help="let a withdrawn site contribute again (audited)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_readmit)

    p = sub.add_parser("retract", help="subtract a site's active contribution without withdrawing the site (audited)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_retract)

    p = sub.add_parser("verify", help="recompute accumulators and digests, check the audit chain and signatures")
    p.add_argument("--public-key", type=Path, metavar="PEM", default=None,
                   help="check the signatures against this public key (a copy you trust)")
    p.add_argument("--export", type=Path, metavar="DIR", default=None,
                   help="also check that this earlier export's signed head is still in the ledger")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("export", help="write the model (composed Δ or exact head) and manifest.json with the signed head")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--model-spec", metavar="JSON", default=None,
                   help="delta ledger: the ModelSpec config (JSON text or file) w0 is rebuilt from, for taft-predict")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("verify-export", help="check an export's signed head and composed file (no ledger needed)")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--public-key", type=Path, metavar="PEM", required=True, help="the server's public key")
    p.set_defaults(run=None, run_without_ledger=_cmd_verify_export)

    _add_forget_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.run is None:
            return args.run_without_ledger(args)
        with Ledger.open(args.ledger, create=False, signing_key=args.signing_key) as ledger:
            return args.run(ledger, args)
    except (LedgerError, ValueError) as e:
        print(f"taft-ledger: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
