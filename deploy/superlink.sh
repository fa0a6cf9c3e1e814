#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (operator side).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: deploy/superlink.sh [--state DIR] [--host ADDR] [--port PORT] [--hostname NAME]...

Creates (once) the CA and the SuperLink certificate in <state>/certs (SANs: localhost,
127.0.0.1 and every --hostname), writes the Flower CLI connection `taft` in
<state>/flwr-home, then replaces itself (exec) with:

  flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key
                   --enable-supernode-auth --database <state>/superlink.db
                   --host ADDR --port PORT --disable-runtime-dependency-installation

In flwr 1.41 one HTTPS port serves the Fleet API (SuperNodes), the Control API (`flwr run`,
`flwr supernode register`) and the Runtime API. Defaults: --state deploy/state,
--host 127.0.0.1 (use 0.0.0.0 to accept remote sites), --port 9092.
Idempotent: existing certificates, keys and database are reused. Stop it with
`kill $(cat <state>/superlink.pid)`.
USAGE
}

STATE=deploy/state HOST=127.0.0.1 PORT=9092 HOSTNAMES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --state) STATE=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --hostname) HOSTNAMES+=(--hostname "$2"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
BIN=$(dirname "$(command -v "$PYTHON")")
export PATH="$BIN:$PATH"                      # flower-superexec must be on PATH
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

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
  --host "$HOST" --port "$PORT" \
  --disable-runtime-dependency-installation
