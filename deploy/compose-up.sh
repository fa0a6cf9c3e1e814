#!/usr/bin/env bash
# One command for the Docker demo: state, certificates, keys, demo data, image, SuperLink + proxy,
# registration, sites. Nothing secret enters the image: everything is mounted at run time.
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: deploy/compose-up.sh [--hostname NAME]... [--max-examples N]

Run from the repository root. Idempotent. State (certificates, keys, registry, ledger, site data)
lives in $TAFT_COMPOSE_STATE (default ~/.local/state/taft-fl/compose), outside the repository
(never in the Docker build context or a Flower app bundle), every directory 0700.
  1. python -m deploy.pki superlink --out <state>/pki --hostname superlink --hostname proxy [--hostname NAME]
  2. python -m deploy.pki site-key --site-id 1|2|3 --out <state>/sites/site-<id>
  3. python -m deploy.make_site_data --out <state>/data      (demo data; SITE<n>_DATA overrides)
  4. <state>/compose.env: TAFT_COMPOSE_STATE, TAFT_UID/TAFT_GID (yours; 10001 when run as root),
     SITE<n>_DATA, TAFT_PUBLIC_PORT
  5. docker compose up -d --build --wait superlink proxy    (the proxy publishes the only port)
  6. operator service (internal network): deploy.connection + deploy.register --site-id 1|2|3
  7. docker compose up -d site-1 site-2 site-3
Then, for every later command:
  docker compose --env-file <state>/compose.env -f deploy/compose.yaml run --rm operator \
      python -m deploy.health --state /server
USAGE
}
HOSTNAMES=(--hostname superlink --hostname proxy)
MAX_EXAMPLES=500
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hostname) HOSTNAMES+=(--hostname "$2"); shift 2 ;;
    --max-examples) MAX_EXAMPLES=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
STATE=$(realpath -m "${TAFT_COMPOSE_STATE:-$HOME/.local/state/taft-fl/compose}")
case "$STATE/" in
  "$ROOT"/*) echo "TAFT_COMPOSE_STATE=$STATE is inside the repository: it would be in the build context" \
                  "and the Flower app directory. Choose a directory outside $ROOT." >&2; exit 2 ;;
esac

umask 077
mkdir -p "$STATE"

# Containers never run as root: as root, use uid 10001 and hand it only what it mounts.
if [[ $(id -u) == 0 ]]; then TAFT_UID=10001 TAFT_GID=10001; else TAFT_UID=$(id -u) TAFT_GID=$(id -g); fi

for d in pki server server/keys proxy operator data sites/site-{1,2,3}/home superlink; do
  install -d -m 0700 "$STATE/$d"
done
"$PYTHON" -m deploy.pki superlink --out "$STATE/pki" "${HOSTNAMES[@]}"
for s in 1 2 3; do
  "$PYTHON" -m deploy.pki site-key --site-id "$s" --out "$STATE/sites/site-$s" >/dev/null
  # the server verifies withdrawals with the PUBLIC key, from its own state dir
  install -m 0600 "$STATE/sites/site-$s/site-$s.key.pub" "$STATE/server/keys/site-$s.key.pub"
done
"$PYTHON" -m deploy.make_site_data --out "$STATE/data" --per-site "$MAX_EXAMPLES"

cat > "$STATE/compose.env" <<ENV
TAFT_COMPOSE_STATE=$STATE
TAFT_UID=$TAFT_UID
TAFT_GID=$TAFT_GID
TAFT_PUBLIC_PORT=${TAFT_PUBLIC_PORT:-9092}
SITE1_DATA=${SITE1_DATA:-$STATE/data/site-1}
SITE2_DATA=${SITE2_DATA:-$STATE/data/site-2}
SITE3_DATA=${SITE3_DATA:-$STATE/data/site-3}
ENV

if [[ $(id -u) == 0 ]]; then  # exactly what the containers mount; the CA key stays root's
  chown -R "$TAFT_UID:$TAFT_GID" "$STATE"/{server,proxy,operator,superlink,data} "$STATE"/sites/site-{1,2,3}
  chown "$TAFT_UID:$TAFT_GID" "$STATE"/pki/{ca.crt,superlink.crt,superlink.key}
fi

COMPOSE=(docker compose --env-file "$STATE/compose.env" -f deploy/compose.yaml)
"${COMPOSE[@]}" up -d --build --wait superlink proxy
"${COMPOSE[@]}" run --rm operator python -m deploy.connection --state /server \
  --address superlink:9092 --root-certificates /certs/ca.crt
for s in 1 2 3; do
  "${COMPOSE[@]}" run --rm operator python -m deploy.register --state /server --site-id "$s" \
    --public-key "/server/keys/site-$s.key.pub" --max-examples "$MAX_EXAMPLES"
done
"${COMPOSE[@]}" up -d site-1 site-2 site-3
echo "up. health: ${COMPOSE[*]} run --rm operator python -m deploy.health --state /server"
