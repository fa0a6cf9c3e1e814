"""``taft-ledger``: inspect and maintain the contribution ledger from a shell.

    taft-ledger list                      sites, their active contribution, withdrawn state, ε totals
    taft-ledger show SITE                 every contribution a site has made, its privacy total
    taft-ledger remove SITE --reason TXT  withdraw a site (exact subtraction; it stays withdrawn)
    taft-ledger readmit SITE --reason TXT let a withdrawn site contribute again (audited)
    taft-ledger retract SITE --reason TXT subtract a site's contribution without withdrawing it
                                          (remove, readmit, retract: --ledger is the state's Δ ledger;
                                          they act on it, the statistics ledger and the quarantine it names)
    taft-ledger held                      sites whose contribution waits in quarantine
    taft-ledger admit SITE --reason TXT   move a site's held contribution into the composed models
    taft-ledger verify [--public-key PEM] [--export DIR]
                                          recompute sums and digests, check the chain, the signed
                                          heads (against PEM when given), the witness (--witness)
                                          and that an earlier export's signed head is still in the ledger
    taft-ledger witness-init PATH         create an empty witness file (outside the state directory)
    taft-ledger export --out DIR [--model-spec JSON]
                                          delta ledger: composed Δ as safetensors; stats ledger:
                                          the exact head (weight, bias; λ by GCV); + manifest.json
                                          (signed head, signed export statement); writes the
                                          ledger's public key beside it (<ledger>.public-key.pem)
    taft-ledger verify-export DIR [--public-key PEM | --fingerprint SHA256:HEX]
                                          check an export's signed head, its signed statement
                                          (the whole manifest and every file's sha256); pinning
                                          the key gives authenticity, the embedded key integrity
    taft-ledger forget REQUEST.json --stats FILE [--delta FILE] --registry R [--stats-ledger PATH]
                                          apply a site's signed forget-samples request to the Δ
                                          ledger and the exact head's stats ledger

Every subcommand works on both ledger families ("delta": TAFT Δw, "stats": exact-head statistics).
The ledger file is ``--ledger PATH``, else ``$TAFT_LEDGER``, else ``runs/ledger.sqlite``. The
witness is ``--witness PATH``, else ``$TAFT_WITNESS``: every head a command signs is appended to
it, and ``verify`` fails when the ledger is behind it (rolled back) or contradicts it. Without a
witness, a rollback of the database together with its head file passes ``verify``.
Exit status: 0 success, 1 verification failed, 2 usage error or no ledger.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from server.ledger import Contribution, Ledger, LedgerCorrupt, LedgerError, witness
from server.ledger.export import MANIFEST_FILE, export
from server.ledger.ledgers import Ledgers, open_pair
from tangent.protocol.text import escape_controls
from tangent.serving import export_check

DEFAULT_LEDGER = "runs/ledger.sqlite"


def _say(text: str = "", file=None) -> None:
    """Print one line for the operator: every string in it may come from a site (fingerprints, reasons,
    metadata), so control characters are shown escaped, never sent to the terminal. (``--json``
    output needs nothing: json.dumps escapes them.)"""
    print(escape_controls(text), file=file)


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
    _say(f"{ledger.family} ledger, model version {current.version}, {len(active)} active site(s), "
          f"total weight {current.total_weight}")
    _say(f"{'site':<20} {'status':<9} {'ver':>4} {'examples':>9} {'epsilon':>8} {'Σ epsilon':>9}  delta sha256")
    for s in sites:
        c = active.get(s.site_id)
        total = _epsilon_text(privacy[s.site_id]["epsilon"]) if s.site_id in privacy else "-"
        status = "withdrawn" if s.withdrawn else ("active" if c else "inactive")
        if c is None:
            _say(f"{s.site_id:<20} {status:<9} {'-':>4} {'-':>9} {'-':>8} {total:>9}  -")
        else:
            _say(f"{s.site_id:<20} {status:<9} {c.version:>4} {c.num_examples:>9} "
                  f"{_epsilon_text(c.epsilon):>8} {total:>9}  {c.delta_sha256[:16]}")
    return 0


def _cmd_show(ledger: Ledger, args) -> int:
    with ledger.snapshot():
        contributions = ledger.contributions(site_id=args.site)
        withdrawn = args.site in ledger.withdrawn_sites()
        privacy = ledger.privacy_totals().get(args.site)
    if not contributions and not withdrawn:
        _say(f"no contributions from site {args.site!r}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"site_id": args.site, "withdrawn": withdrawn,
                          "privacy": _json_privacy({args.site: privacy})[args.site] if privacy else None,
                          "contributions": [{_label(field, ledger.family): value for field, value in asdict(c).items()}
                                            for c in contributions]}, indent=2))
        return 0
    _say(f"site {args.site}: {'WITHDRAWN (readmit to accept contributions again)' if withdrawn else 'admitted'}")
    if privacy:
        _say(f"  privacy total over {privacy['contributions']} contribution(s): ε = "
              f"{_epsilon_text(privacy['epsilon'])}, δ = {privacy['delta']:.3g}"
              + (f" ({privacy['non_dp']} without DP)" if privacy["non_dp"] else ""))
    for c in contributions:
        _print_contribution(c, ledger.family)
    return 0


def _print_contribution(c: Contribution, family: str) -> None:
    _say(f"contribution {c.id}: site {c.site_id} version {c.version} [{c.status}]")
    for field in ("num_examples", "weight", "epsilon", "delta_dp", "dp_settings", "shard_fingerprint",
                  "base_digest", "train_config", "extra", "delta_sha256", "delta_norm", "added_at",
                  "added_in_version", "ended_at", "ended_in_version", "end_reason"):
        value = getattr(c, field)
        if value is not None:
            _say(f"  {_label(field, family):<18} {json.dumps(value) if isinstance(value, dict) else value}")


def _label(field: str, family: str) -> str:
    """In a statistics ledger the ``base_digest`` column holds the feature digest: say so (in the
    text and in ``--json``, so that what client.forget's ``--feature-digest`` takes has one name)."""
    return "feature_digest" if field == "base_digest" and family == "stats" else field


def _versions(ledgers: Ledgers) -> str:
    return "; ".join(f"{led.family} ledger version {led.current_version().version}, composed sha256 "
                     f"{led.current_version().composed_sha256}" for led in ledgers.all())


def _cmd_remove(ledgers: Ledgers, args) -> int:
    if not ledgers.remove(args.site, reason=args.reason):
        _say(f"{args.site} is already withdrawn; nothing to do")
        return 0
    for led in ledgers.all():
        v = led.current_version()
        if v.event == "remove":
            _say(f"removed {args.site} from the {led.family} ledger {led.path}: model version {v.version}, composed sha256 "
                  f"{v.composed_sha256}")
        else:
            _say(f"{args.site} had no active contribution in the {led.family} ledger {led.path}; it is now withdrawn there "
                  f"(model version {v.version})")
    _say(f"{args.site} stays withdrawn from every model family until readmitted")
    return 0


def _cmd_readmit(ledgers: Ledgers, args) -> int:
    if ledgers.readmit(args.site, reason=args.reason):
        _say(f"readmitted {args.site} in {len(ledgers.all())} ledger(s): {_versions(ledgers)} (models unchanged)")
    else:
        _say(f"{args.site} is not withdrawn; nothing to do")
    return 0


def _cmd_retract(ledgers: Ledgers, args) -> int:
    if ledgers.retract(args.site, reason=args.reason):
        _say(f"retracted {args.site}'s contribution from {len(ledgers.all())} ledger(s): {_versions(ledgers)}; "
              f"the site is not withdrawn")
    else:
        _say(f"{args.site} has no active contribution; nothing to do")
    return 0


def _cmd_held(ledgers: Ledgers, args) -> int:
    from server.quarantine import held_sites

    if ledgers.held is None:
        _say("no quarantine: the runs of this state admit every accepted reply (run config quarantine = false)")
        return 0
    for site in held_sites(ledgers):
        c = ledgers.held.delta.contributions(site_id=site, status="active")[0]
        _say(f"{site:<20} held since {c.added_at}: {c.num_examples} examples, ‖Δ‖ = {c.delta_norm:.4g}, "
             f"ε = {_epsilon_text(c.epsilon)}")
    return 0


def _cmd_admit(ledgers: Ledgers, args) -> int:
    from server.quarantine import admit
    from server.replies import Rejected

    try:
        version = admit(ledgers, args.site, args.reason)
    except Rejected as refusal:  # the checks of a reply refuse it (e.g. the same Δ as the active one)
        changed = ("its statistics were refused after its Δw was recorded, so the site's contribution was "
                   "retracted from both ledgers" if refusal.retracted else "the composed models are unchanged")
        _say(f"taft-ledger: site {args.site}'s held contribution is refused: {refusal}; {changed}. It stays "
             "held until the site's next held contribution replaces it (or `remove` withdraws the site)",
             file=sys.stderr)
        return 1
    _say(f"admitted {args.site}'s held contribution: Δ ledger version {version.version}"
         + (f", statistics ledger version {ledgers.stats.current_version().version}" if ledgers.stats else ""))
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
            _say("FAILED")
            for problem in e.problems:
                _say(f"  {problem}")
        return 1
    if args.json:
        print(json.dumps({"ok": True, **asdict(report)}, indent=2))
        return 0
    _say(f"OK: model version {report.current_version}, {report.active_contributions} active contribution(s), "
          f"{report.audit_entries} audit entries, composed sha256 {report.composed_sha256}")
    _say(f"head: audit hash {report.head_audit_hash}")
    _say(f"      signature {report.head_signature}")
    _say(f"      signed by {report.public_key_fingerprint}"
          + (" (the given public key)" if args.public_key else " (the ledger's own key: pass --public-key to check "
                                                               "against a copy you trust)"))
    if report.witness_version is None:
        print("note: no witness checked (--witness or $TAFT_WITNESS): a rollback of the ledger and its head "
              "file together would pass")
    elif report.witness_version < report.current_version:
        print(f"note: the witness holds versions up to {report.witness_version}; versions "
              f"{report.witness_version + 1}..{report.current_version} were written without it")
    else:
        print(f"witness: holds version {report.witness_version}, as the ledger does")
    if report.head_file_version != report.current_version:
        _say(f"note: the head file names version {report.head_file_version} (a write or crash in between; "
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
    _say(f"exported model version {manifest['model_version']} ({len(manifest['sites'])} site(s)), {what}, to "
          f"{args.out}; signed by {manifest['public_key_fingerprint']}")
    key_file = _write_public_key(ledger.path, manifest["public_key"])
    _say(f"the ledger's public key is {key_file}: hand it to the export's users through a channel they trust; "
          f"they check the export with `taft-ledger verify-export {shlex.quote(str(args.out))} "
          f"--public-key {shlex.quote(str(key_file))}`")
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
        verified = export_check.verify_export(args.directory, public_key=args.public_key, fingerprint=args.fingerprint)
    except export_check.ExportRefused as e:
        _say("FAILED")
        for problem in e.problems:
            _say(f"  {problem}")
        return 1
    except export_check.ExportError as e:
        raise LedgerError(str(e)) from None
    head = verified.head
    _say(f"OK: model version {head['version']}, composed sha256 {head['composed_sha256']}, "
         f"signed by {verified.fingerprint}")
    if not verified.pinned:
        print("note: checked against the key the export carries: this shows the export is intact, not who "
              "signed it. Pin the server's key with --fingerprint or --public-key for that.")
    return 0


def _cmd_witness_init(args) -> int:
    witness.init(args.path)
    _say(f"created the witness {args.path}; set TAFT_WITNESS={args.path} for the server and the tools")
    return 0


def _add_forget_command(sub) -> None:
    """``taft-ledger forget``: sample-level forgetting (server/trust/forgetting.py; docs/deployment.md)."""
    p = sub.add_parser("forget", help="apply a site's signed forget-samples request to both ledgers",
                       description="Verify a signed forget-samples request (python -m client.forget writes it) and, "
                                   "only if every check passes, replace the site's statistics in the stats ledger "
                                   "and retract its TAFT Δw from --ledger (or replace it with the retrained --delta "
                                   "the request signs). A DP head's stats ledger takes a DP site's fresh release "
                                   "instead, checked like a reply's release, and retracts its Δw. Exit 0: applied; "
                                   "1: refused (both ledgers unchanged; the reason is printed and kept in "
                                   "<ledger>.withdrawals.sqlite).")
    p.add_argument("request", type=Path, metavar="REQUEST.json")
    p.add_argument("--stats", type=Path, required=True, metavar="FILE",
                   help="the replacement statistics file (a DP site's: its release-<site>.safetensors)")
    p.add_argument("--delta", type=Path, default=None, metavar="FILE", help="the retrained Δw the request signs")
    p.add_argument("--registry", type=Path, required=True, metavar="R", help="the site registry (deploy.register)")
    p.add_argument("--stats-ledger", type=Path, default=None, metavar="PATH",
                   help="the exact head's stats ledger (default: the one --ledger names)")
    p.add_argument("--max-age-s", type=float, default=None, help="request validity (default: 15 minutes)")
    p.set_defaults(run=None, run_without_ledger=_cmd_forget)


def _cmd_forget(args) -> int:
    from server.trust.forgetting import MAX_AGE_S, ForgetRefused, apply_forget_file

    with open_pair(args.ledger, signing_key=args.signing_key, stats_path=args.stats_ledger,
                   witness=args.witness) as ledgers:
        if ledgers.stats is None:
            raise LedgerError(f"{args.ledger} has no statistics ledger: nothing to forget from")
        try:
            request = apply_forget_file(args.request, args.stats, args.delta, ledgers,
                                        args.ledger, args.registry, max_age_s=args.max_age_s or MAX_AGE_S)
        except ForgetRefused as err:
            _say(f"REFUSED: {err}", file=sys.stderr)
            return 1
        _say(f"site {request.site_id} forgot {request.forgotten} sample(s): stats ledger {ledgers.stats.path} "
              f"version {ledgers.stats.current_version().version}, Δ ledger version "
              f"{ledgers.delta.current_version().version}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taft-ledger", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", type=Path, metavar="PATH", default=Path(os.environ.get("TAFT_LEDGER", DEFAULT_LEDGER)),
                        help="ledger file (default: $TAFT_LEDGER or %(default)s)")
    parser.add_argument("--witness", type=Path, metavar="PATH", default=None,
                        help="append-only witness of signed heads (default: $TAFT_WITNESS; none when unset)")
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
    p.set_defaults(run=_cmd_remove, both_families=True)

    p = sub.add_parser("readmit", help="let a withdrawn site contribute again (audited)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_readmit, both_families=True)

    p = sub.add_parser("retract", help="subtract a site's active contribution without withdrawing the site (audited)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why, recorded in the audit log")
    p.set_defaults(run=_cmd_retract, both_families=True)

    p = sub.add_parser("held", help="sites whose contribution waits in quarantine (run config quarantine = true)")
    p.set_defaults(run=_cmd_held, both_families=True)

    p = sub.add_parser("admit", help="move a site's held contribution into the composed models (audited)")
    p.add_argument("site", metavar="SITE")
    p.add_argument("--reason", required=True, help="why (your review), recorded in the audit log")
    p.set_defaults(run=_cmd_admit, both_families=True)

    p = sub.add_parser("verify", help="recompute accumulators and digests, check the audit chain and signatures")
    p.add_argument("--public-key", type=Path, metavar="PEM", default=None,
                   help="check the signatures against this public key (a copy you trust)")
    p.add_argument("--export", type=Path, metavar="DIR", default=None,
                   help="also check that this earlier export's signed head is still in the ledger")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_verify)

    p = sub.add_parser("witness-init", help="create an empty witness file for signed heads")
    p.add_argument("path", type=Path, metavar="PATH", help="a new file, outside the server's state directory")
    p.set_defaults(run=None, run_without_ledger=_cmd_witness_init)

    p = sub.add_parser("export", help="write the model (composed Δ or exact head) and manifest.json with the signed head")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument("--model-spec", metavar="JSON", default=None,
                   help="delta ledger: the ModelSpec config (JSON text or file) w0 is rebuilt from, for taft-predict")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("verify-export", help="check an export's signatures, manifest and files (no ledger needed)")
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--public-key", type=Path, metavar="PEM", default=None,
                   help="the server's public key, obtained from the operator (pins the signer)")
    p.add_argument("--fingerprint", metavar="SHA256:HEX", default=None,
                   help="the server's key fingerprint, as the operator publishes it (pins the signer)")
    p.set_defaults(run=None, run_without_ledger=_cmd_verify_export)

    _add_forget_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.run is None:
            return args.run_without_ledger(args)
        if getattr(args, "both_families", False):  # a site leaves (or rejoins) every model family at once
            with open_pair(args.ledger, signing_key=args.signing_key, witness=args.witness) as ledgers:
                return args.run(ledgers, args)
        with Ledger.open(args.ledger, create=False, signing_key=args.signing_key, witness=args.witness) as ledger:
            return args.run(ledger, args)
    except (LedgerError, ValueError) as e:
        _say(f"taft-ledger: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
