r"""Signed withdrawal requests (see server/trust/withdrawal.py for the format and the checks).

At a site (with the same key its SuperNode authenticates with):

    python -m deploy.withdraw create --site-id 3 --key keys/site-3.key \
        --reason "consent withdrawn" --out withdraw-3.json

The site sends the file to the operator, who puts it in the server's state directory, under
`<state>/requests/` (default state: ~/.local/state/taft-fl/server), and submits an unlearning
run naming it relative to the state dir (the ServerApp refuses paths outside it):

    cp withdraw-3.json ~/.local/state/taft-fl/server/requests/
    python -m deploy.submit --run-config "mode='unlearn' withdrawal-requests='requests/withdraw-3.json'"

Without Flower (e.g. while no run can be submitted), verify and subtract directly:

    python -m deploy.withdraw apply ~/.local/state/taft-fl/server/requests/withdraw-3.json

`apply` exits 0 when the site was removed and 1 (printing why) when the request was refused;
the ledgers are untouched in that case. The site leaves the exact head's statistics ledger too: the
one `--ledger` names (the ServerApp records it there), or `--exact-head-ledger` when the Δ ledger
names none; a statistics ledger beside `--ledger` that nothing names is a refusal, never skipped.
`verify` only checks (no nonce consumed, no ledger).
A request is valid for 15 minutes and once. The operator's own decision to remove a site is a
request signed with the operator key (`python -m deploy.pki operator-key`, recorded with
`python -m deploy.register --admin`):

    python -m deploy.withdraw create --signer admin --key <state>/keys/operator.key --site-id 3 \
        --reason "court order" --out <state>/requests/remove-3.json

Keys of sites that were revoked (`deploy.register --unregister`) or never registered are refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deploy.connection import DEFAULT_STATE, make_private_dir
from server.ledger import LedgerError
from tangent.protocol.text import escape_controls
from server.trust.registry import SiteRegistry
from server.trust.withdrawal import (
    MAX_AGE_S,
    WithdrawalRefused,
    WithdrawalRequest,
    apply_withdrawal,
    create_request,
    load_private_key,
    read_request,
    verify_request,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.withdraw", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", help="sign a withdrawal request")
    p.add_argument("--site-id", required=True)
    p.add_argument("--key", required=True, type=Path, help="the site's SuperNode key (or the operator key)")
    p.add_argument("--reason", required=True)
    p.add_argument("--signer", choices=("site", "admin"), default="site")
    p.add_argument("--out", type=Path, help="output file (default: stdout)")
    for name, helptext in (("apply", "verify a request and remove the site from the ledger"),
                           ("verify", "verify a request only (no nonce consumed, ledger untouched)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("request", type=Path)
        p.add_argument("--registry", type=Path, default=DEFAULT_STATE / "registry.json",
                       help="site registry (default %(default)s)")
        p.add_argument("--max-age-s", type=float, default=MAX_AGE_S)
        if name == "apply":
            p.add_argument("--ledger", type=Path, default=DEFAULT_STATE / "ledger.sqlite",
                           help="the ledger (default %(default)s)")
            p.add_argument("--exact-head-ledger", type=Path, default=None,
                           help="the exact head's statistics ledger: the site leaves it too (default: the one "
                                "--ledger names; must agree with it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "create":
        document = create_request(args.site_id, load_private_key(args.key), args.reason, signer=args.signer)
        text = json.dumps(document, indent=2) + "\n"
        if args.out:
            make_private_dir(args.out.parent)
            args.out.write_text(text)
            print(f"wrote {args.out} (site {args.site_id}, nonce {document['payload']['nonce']})")
        else:
            sys.stdout.write(text)
        return 0

    try:
        if args.command == "verify":
            request = verify_request(read_request(args.request), SiteRegistry(args.registry),
                                     max_age_s=args.max_age_s)
            print(escape_controls(f"valid: site {request.site_id}, signer {request.signer}, nonce {request.nonce}"))
        else:
            request, paths = _apply(args)
            print(f"removed site {request.site_id} from {' and '.join(map(str, paths))}")
    except WithdrawalRefused as err:
        print(f"REFUSED: {escape_controls(str(err))}", file=sys.stderr)
        return 1
    except LedgerError as err:
        print(f"REFUSED: {escape_controls(str(err))}", file=sys.stderr)
        return 1
    return 0


def _apply(args) -> tuple[WithdrawalRequest, list[Path]]:
    """One request, one nonce, both ledgers (server.ledger.ledgers.open_pair): a withdrawn site leaves the
    TAFT Δ ledger and the statistics ledger that belongs with it, or nothing changes."""
    from server.ledger.ledgers import open_pair
    from server.trust.nonces import NonceStore, nonce_store_path

    document = read_request(args.request)
    registry = SiteRegistry(args.registry)
    with open_pair(args.ledger, stats_path=args.exact_head_ledger) as ledgers, \
            NonceStore(nonce_store_path(args.ledger)) as nonces:
        request = apply_withdrawal(document, ledgers, registry, nonces, max_age_s=args.max_age_s)
        return request, [led.path for led in ledgers.all()]


if __name__ == "__main__":
    sys.exit(main())
