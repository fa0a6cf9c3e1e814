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
  1. python -m deploy.pki superlink|proxy --out <state>/pki   (SANs superlink | proxy + --hostname)
     python -m deploy.pki operator-key --out <state>/operator-keys
  2. python -m deploy.pki site-key --site-id 1|2|3 --out <state>/keys
  3. python -m deploy.make_site_data --out <state>/demo-data  (SITE<n>_DATA overrides)
  4. <state>/compose.env: TAFT_COMPOSE_STATE, TAFT_UID/TAFT_GID (yours; 10001 when run as root),
     SITE<n>_DATA, TAFT_PUBLIC_PORT
  5. docker compose up -d --build --wait superlink proxy    (the proxy publishes the only port)
  6. operator service (internal network): deploy.connection, deploy.register --admin and
     --site-id 1|2|3 --max-examples N (public keys from <state>/public-keys)
  7. docker compose up -d site-1 site-2 site-3
Then, for every later command:
  docker compose --env-file <state>/compose.env -f deploy/compose.yaml run --rm operator \
      python -m deploy.health --state /server
USAGE
}
HOSTNAMES=(--hostname proxy)
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

for d in pki operator-keys keys public-keys demo-data server superlink proxy proxy/logs operator \
         site-1 site-2 site-3; do
  install -d -m 0700 "$STATE/$d"
done
# TLS: the SuperLink's certificate (internal name "superlink") and the proxy's (what sites dial)
"$PYTHON" -m deploy.pki superlink --out "$STATE/pki" --hostname superlink
"$PYTHON" -m deploy.pki proxy --out "$STATE/pki" "${HOSTNAMES[@]}"
"$PYTHON" -m deploy.pki operator-key --out "$STATE/operator-keys" >/dev/null
install -m 0600 "$STATE/operator-keys/operator.key.pub" "$STATE/public-keys/"
for s in 1 2 3; do
  "$PYTHON" -m deploy.pki site-key --site-id "$s" --out "$STATE/keys" >/dev/null
  install -m 0600 "$STATE/keys/site-$s.key.pub" "$STATE/public-keys/"   # what a site sends
done
"$PYTHON" -m deploy.make_site_data --out "$STATE/demo-data" --per-site "$MAX_EXAMPLES"

cat > "$STATE/compose.env" <<ENV
TAFT_COMPOSE_STATE=$STATE
TAFT_UID=$TAFT_UID
TAFT_GID=$TAFT_GID
TAFT_PUBLIC_PORT=${TAFT_PUBLIC_PORT:-9092}
SITE1_DATA=${SITE1_DATA:-$STATE/demo-data/site-1}
SITE2_DATA=${SITE2_DATA:-$STATE/demo-data/site-2}
SITE3_DATA=${SITE3_DATA:-$STATE/demo-data/site-3}
ENV

if [[ $(id -u) == 0 ]]; then  # exactly what the containers mount; CA and operator keys stay root's
  chown -R "$TAFT_UID:$TAFT_GID" "$STATE"/{server,superlink,proxy,operator,public-keys,demo-data} \
    "$STATE"/site-{1,2,3} "$STATE"/keys/site-{1,2,3}.key
  chown "$TAFT_UID:$TAFT_GID" "$STATE"/pki/{ca.crt,superlink.crt,superlink.key,proxy.crt,proxy.key}
fi

COMPOSE=(docker compose --env-file "$STATE/compose.env" -f deploy/compose.yaml)
"${COMPOSE[@]}" up -d --build --wait superlink proxy
"${COMPOSE[@]}" run --rm operator python -m deploy.connection --state /server \
  --address superlink:9092 --root-certificates /certs/ca.crt
"${COMPOSE[@]}" run --rm operator python -m deploy.register --state /server --admin \
  --public-key /public-keys/operator.key.pub
for s in 1 2 3; do
  "${COMPOSE[@]}" run --rm operator python -m deploy.register --state /server --site-id "$s" \
    --public-key "/public-keys/site-$s.key.pub" --max-examples "$MAX_EXAMPLES"
done
"${COMPOSE[@]}" up -d site-1 site-2 site-3
echo "up. health: ${COMPOSE[*]} run --rm operator python -m deploy.health --state /server"
