#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication, on loopback (operator side).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/superlink.sh [--state DIR] [--port PORT] [--hostname NAME]...
                           [--host ADDR --internal-network]

Creates (once) the CA and the SuperLink certificate in <state>/certs (SANs: localhost,
127.0.0.1 and every --hostname), writes the Flower CLI connection `taft` in
<state>/flwr-home, then replaces itself (exec) with:

  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key
                   --enable-supernode-auth --database <state>/superlink.db
                   --host 127.0.0.1 --port PORT --disable-runtime-dependency-installation

In flwr 1.41 one HTTPS port serves the Fleet API (SuperNodes), the Control API (`flwr run`,
`flwr supernode register`) and the Runtime API, and the open-source Control API authenticates
nobody. So the SuperLink listens on 127.0.0.1 only; sites reach it through the reverse proxy
(`python -m deploy.proxy`), which forwards the Fleet API alone. A non-loopback --host is
refused unless --internal-network says that address is on a network only the operator's
own hosts (e.g. the proxy container) can reach.

Defaults: --state $TAFT_STATE_DIR/server (~/.local/state/taft-fl/server), --port 9092.
The ServerApp inherits TAFT_STATE_DIR. Idempotent: existing certificates, keys and database
are reused. Stop it with `kill $(cat <state>/superlink.pid)`.
USAGE
}

STATE_ROOT=${TAFT_STATE_DIR:-$HOME/.local/state/taft-fl}
STATE=$STATE_ROOT/server HOST=127.0.0.1 PORT=9092 HOSTNAMES=() INTERNAL=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) STATE=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --internal-network) INTERNAL=1; shift ;;
    --port) PORT=$2; shift 2 ;;
    --hostname) HOSTNAMES+=(--hostname "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [[ $INTERNAL != 1 ]]; then
       echo "refused: --host $HOST would expose the unauthenticated Control API; keep 127.0.0.1 and" \
            "start python -m deploy.proxy for the sites (or add --internal-network)" >&2
       exit 2
     fi ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
BIN=$(dirname "$(command -v "$PYTHON")")
export PATH="$BIN:$PATH"                      # flower-superexec must be on PATH
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

umask 077                                     # state, database, logs: the operator's only
mkdir -p "$STATE/logs"
STATE=$(cd "$STATE" && pwd)
export FLWR_HOME=$STATE/flwr-home   # the SuperLink installs app bundles here, not in ~/.flwr
"$PYTHON" -m deploy.pki superlink --out "$STATE/certs" "${HOSTNAMES[@]}"
"$PYTHON" -m deploy.connection --state "$STATE" --address "127.0.0.1:$PORT" >/dev/null
echo $$ > "$STATE/superlink.pid"
exec flower-superlink \
  --ssl-ca-certfile "$STATE/certs/ca.crt" \
  --ssl-certfile "$STATE/certs/superlink.crt" \
  --ssl-keyfile "$STATE/certs/superlink.key" \
  --enable-supernode-auth \
  --database "$STATE/superlink.db" \
  --log-file "$STATE/logs/superlink.log" \
  --host "$HOST" --port "$PORT" \
  --disable-runtime-dependency-installation
