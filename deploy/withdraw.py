"""Signed withdrawal requests (see server/withdrawal.py for the format and the checks).

At a site (with the same key its SuperNode authenticates with):

    python -m deploy.withdraw create --site-id 3 --key deploy/keys/site-3.key \
        --reason "consent withdrawn" --out withdraw-3.json

At the server (the operator), verify and subtract the site from the ledger:

    python -m deploy.withdraw apply withdraw-3.json --ledger runs/ledger.sqlite \
        --registry deploy/state/registry.json

`apply` exits 0 when the site was removed and 1 (printing why) when the request was refused;
the ledger is untouched in that case. `verify` only checks (no nonce consumed, no ledger).
The operator can sign for any site with `--signer admin --key deploy/keys/site-admin.key`
(register the admin key with `python -m deploy.register admin ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from server.withdrawal import (
    MAX_AGE_S,
    SiteRegistry,
    WithdrawalRefused,
    apply_withdrawal_file,
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
    p.add_argument("--key", required=True, type=Path, help="site (or admin) ECDSA private key")
    p.add_argument("--reason", required=True)
    p.add_argument("--signer", choices=("site", "admin"), default="site")
    p.add_argument("--out", type=Path, help="output file (default: stdout)")
    for name, helptext in (("apply", "verify a request and remove the site from the ledger"),
                           ("verify", "verify a request only (no nonce consumed, ledger untouched)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("request", type=Path)
        p.add_argument("--registry", type=Path, default=Path("deploy/state/registry.json"))
        p.add_argument("--max-age-s", type=float, default=MAX_AGE_S)
        if name == "apply":
            p.add_argument("--ledger", type=Path, default=Path("runs/ledger.sqlite"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "create":
        document = create_request(args.site_id, load_private_key(args.key), args.reason, signer=args.signer)
        text = json.dumps(document, indent=2) + "\n"
        if args.out:
            args.out.write_text(text)
            print(f"wrote {args.out} (site {args.site_id}, nonce {document['payload']['nonce']})")
        else:
            sys.stdout.write(text)
        return 0

    try:
        if args.command == "verify":
            request = verify_request(read_request(args.request), SiteRegistry(args.registry),
                                     max_age_s=args.max_age_s)
            print(f"valid: site {request.site_id}, signer {request.signer}, nonce {request.nonce}")
        else:
            request = apply_withdrawal_file(args.request, args.ledger, args.registry, max_age_s=args.max_age_s)
            print(f"removed site {request.site_id} from {args.ledger}")
    except WithdrawalRefused as err:
        print(f"REFUSED: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
