#!/usr/bin/env bash
# MLflow tracking server for unlearnflow: a database backend store (run metadata, params,
# metrics, dataset inputs, registered models) and an artifact store that the server proxies
# (`mlflow-artifacts:/`), so clients need only MLFLOW_TRACKING_URI, no storage credentials.
#
#   infra/mlflow-server.sh                       # foreground; Ctrl-C stops it
#   MLFLOW_PORT=5500 infra/mlflow-server.sh &    # then: kill %1
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5500   # what `unlearn run` then logs to
#
# Settings (environment):
#   MLFLOW_HOST                   bind address (default 127.0.0.1: this machine only; 0.0.0.0
#                                 to serve a team, together with MLFLOW_ALLOWED_HOSTS)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_DATA_DIR               where the default stores live (default ./mlflow-server)
#   MLFLOW_BACKEND_STORE_URI      SQLAlchemy URL (default sqlite:///$MLFLOW_DATA_DIR/mlflow.db),
#                                 e.g. postgresql://user:pass@db:5432/mlflow (needs a driver,
#                                 `pip install psycopg2-binary`; not installed or run here)
#   MLFLOW_ARTIFACTS_DESTINATION  artifact store (default $MLFLOW_DATA_DIR/artifacts), e.g.
#                                 s3://bucket/mlflow (needs boto3 and credentials on the server
#                                 only; not run here)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_ALLOWED_HOSTS          forwarded to --allowed-hosts (Host header allow-list) if set
set -euo pipefail

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
DATA_DIR="${MLFLOW_DATA_DIR:-$PWD/mlflow-server}"
WORKERS="${MLFLOW_WORKERS:-2}"

command -v mlflow >/dev/null || { echo "mlflow-server.sh: mlflow not on PATH (activate the virtual environment)" >&2; exit 1; }

mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DATA_DIR/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$DATA_DIR/artifacts}"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac

extra=()
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")

echo "mlflow server on http://$HOST:$PORT (backend ${BACKEND%%://*}://..., artifacts $ARTIFACTS)" >&2
# exec: the server replaces this shell, so the PID of `infra/mlflow-server.sh &` is the
# server's, and one `kill` stops it (uvicorn takes its worker processes with it).
exec mlflow server \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    --backend-store-uri "$BACKEND" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS" \
    "${extra[@]}"
