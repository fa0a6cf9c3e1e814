#!/usr/bin/env bash
# One command for the Docker demo: certificates, keys, demo data, image, SuperLink, registration, sites.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  cat <<'USAGE'
Usage: deploy/compose-up.sh [--hostname NAME]...

Run from the repository root. Idempotent. Steps:
  1. python -m deploy.pki superlink --hostname superlink [--hostname NAME]  (CA + TLS cert)
  2. python -m deploy.pki site-key --site-id 1|2|3                          (SuperNode keys)
  3. python -m deploy.make_site_data                                        (demo data per site)
  4. docker compose -f deploy/compose.yaml up -d --build superlink           (waits until healthy)
  5. python -m deploy.connection --address 127.0.0.1:9092 + deploy.register --site-id 1|2|3
  6. docker compose -f deploy/compose.yaml up -d site-1 site-2 site-3
Then: python -m deploy.health --state deploy/state --ledger deploy/state/runs/ledger.sqlite
USAGE
  exit 0
fi
HOSTNAMES=(--hostname superlink)
while [[ $# -gt 0 ]]; do
  case "$1" in --hostname) HOSTNAMES+=(--hostname "$2"); shift 2 ;; *) echo "unknown: $1" >&2; exit 2 ;; esac
done
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
STATE=deploy/state
export TAFT_UID=$(id -u) TAFT_GID=$(id -g)
mkdir -p "$STATE/runs"
"$PYTHON" -m deploy.pki superlink --out "$STATE/certs" "${HOSTNAMES[@]}"
for s in 1 2 3; do "$PYTHON" -m deploy.pki site-key --site-id "$s" --out "$STATE/keys" >/dev/null; done
"$PYTHON" -m deploy.make_site_data --out "$STATE/data"
docker compose -f deploy/compose.yaml up -d --build --wait superlink
"$PYTHON" -m deploy.connection --state "$STATE" --address 127.0.0.1:9092
for s in 1 2 3; do "$PYTHON" -m deploy.register --state "$STATE" --site-id "$s"; done
docker compose -f deploy/compose.yaml up -d site-1 site-2 site-3
echo "up. health: $PYTHON -m deploy.health --state $STATE --ledger $STATE/runs/ledger.sqlite"
