#!/usr/bin/env bash
# MLflow tracking server for unlearnflow: a database backend store (run metadata, params,
# metrics, dataset inputs, registered models) and an artifact store that the server proxies
# (`mlflow-artifacts:/`), so clients need only MLFLOW_TRACKING_URI, no storage credentials.
#
#   infra/mlflow-server.sh                       # foreground; Ctrl-C stops it
#   MLFLOW_PORT=5500 infra/mlflow-server.sh &    # then: kill %1
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5500   # what `unlearn run` then logs to
#
#   MLFLOW_AUTH=basic infra/mlflow-server.sh     # with MLflow's basic-auth app (user `admin`,
#                                                # password in $MLFLOW_DATA_DIR/admin_password)
#
#   infra/mlflow-server.sh postgres              # backend store in PostgreSQL (team set-up):
#                                                # starts infra/postgres.sh (PG_PORT, PG_DATA_DIR,
#                                                # default $MLFLOW_DATA_DIR/postgres) first; the
#                                                # request ledger uses the same database:
#                                                # `infra/postgres.sh url --data-dir ...` prints it.
#                                                # Stopping the server leaves PostgreSQL running:
#                                                # `infra/postgres.sh stop --data-dir ...` stops it.
#                                                # Needs the driver: pip install -e ".[team]"
#
# Settings (environment):
#   MLFLOW_HOST                   bind address (default 127.0.0.1: this machine only). Any other
#                                 address is refused unless MLFLOW_AUTH=basic; for a team, keep
#                                 127.0.0.1 behind a TLS reverse proxy (infra/README.md)
#   MLFLOW_AUTH                   `basic`: MLflow's basic-auth app (`--app-name basic-auth`):
#                                 every request needs a user and password (clients set
#                                 MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). Its user
#                                 store is $MLFLOW_DATA_DIR/basic_auth.db, its config
#                                 $MLFLOW_DATA_DIR/basic_auth.ini (written at each start). Needs
#                                 Flask-WTF: pip install -e ".[team]"
#   MLFLOW_AUTH_ADMIN_PASSWORD    the admin user's password on the first start with auth
#                                 (default: a random one, kept in $MLFLOW_DATA_DIR/admin_password,
#                                 mode 600; user `admin`); ignored once the user store exists
#   MLFLOW_AUTH_FUNCTION          how the auth app checks a request's password: `once` (default:
#                                 tasks/mlflow_auth.py, MLflow's own check run once per request
#                                 instead of the three times MLflow's app runs it; nothing is
#                                 kept between requests) or `mlflow` (MLflow's own function,
#                                 which its UI needs to show its change-password dialog and
#                                 log-out link)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do on others' experiments and
#                                 models (default READ; NO_PERMISSIONS, EDIT, MANAGE)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the auth app's CSRF key (default: a random one, kept in
#                                 $MLFLOW_DATA_DIR/flask_secret_key, mode 600)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_DATA_DIR               where the default stores live (default ./mlflow-server)
#   MLFLOW_BACKEND_STORE_URI      SQLAlchemy URL (default sqlite:///$MLFLOW_DATA_DIR/mlflow.db),
#                                 e.g. postgresql+psycopg2://user:pass@db:5432/unlearnflow for a
#                                 PostgreSQL run elsewhere (needs `pip install -e ".[team]"`);
#                                 the `postgres` mode sets it to the local cluster's URL
#   MLFLOW_ARTIFACTS_DESTINATION  artifact store (default $MLFLOW_DATA_DIR/artifacts), e.g.
#                                 s3://bucket/mlflow (needs boto3 and credentials on the server
#                                 only; not run here)
#   MLFLOW_WORKERS                server worker processes (default 2)
#   MLFLOW_ALLOWED_HOSTS          forwarded to --allowed-hosts (Host header allow-list) if set
set -euo pipefail

MODE="${1:-sqlite}"
case "$MODE" in
    sqlite | postgres) ;;
    *) echo "usage: $0 [postgres]   (no argument: the SQLite/MLFLOW_BACKEND_STORE_URI mode)" >&2; exit 2 ;;
esac

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
DATA_DIR="${MLFLOW_DATA_DIR:-$PWD/mlflow-server}"
WORKERS="${MLFLOW_WORKERS:-2}"

AUTH="${MLFLOW_AUTH:-}"
case "$AUTH" in
    "" | basic) ;;
    *) echo "mlflow-server.sh: MLFLOW_AUTH=$AUTH unknown; valid: basic (or unset)" >&2; exit 2 ;;
esac
# the auth settings, checked with the rest before anything is created
PERMISSION="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$PERMISSION" in
    READ | EDIT | MANAGE | NO_PERMISSIONS) ;;
    *) echo "mlflow-server.sh: MLFLOW_AUTH_DEFAULT_PERMISSION=$PERMISSION unknown; valid: READ, EDIT, MANAGE, NO_PERMISSIONS" >&2; exit 2 ;;
esac
case "${MLFLOW_AUTH_FUNCTION:-once}" in
    once) AUTH_FUNCTION=tasks.mlflow_auth:authenticate_once ;;
    mlflow) AUTH_FUNCTION=mlflow.server.auth:authenticate_request_basic_auth ;;
    *) echo "mlflow-server.sh: MLFLOW_AUTH_FUNCTION=$MLFLOW_AUTH_FUNCTION unknown; valid: once, mlflow" >&2; exit 2 ;;
esac
case "$HOST" in
    127.0.0.1 | localhost | ::1) ;;
    *) [ "$AUTH" = basic ] || { echo "mlflow-server.sh: MLFLOW_HOST=$HOST serves other machines: set MLFLOW_AUTH=basic (and put TLS in front, infra/README.md), or keep 127.0.0.1" >&2; exit 2; } ;;
esac

command -v mlflow >/dev/null || { echo "mlflow-server.sh: mlflow not on PATH (activate the virtual environment)" >&2; exit 1; }

mkdir -p "$DATA_DIR"
DATA_DIR="$(cd "$DATA_DIR" && pwd)"
if [ "$MODE" = postgres ]; then
    [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ] || { echo "mlflow-server.sh: postgres mode sets the backend store itself; unset MLFLOW_BACKEND_STORE_URI" >&2; exit 2; }
    PY="$(dirname "$(command -v mlflow)")/python"
    [ -x "$PY" ] || PY=python3
    "$PY" -c "import psycopg2" 2>/dev/null \
        || { echo "mlflow-server.sh: no PostgreSQL driver next to mlflow: pip install -e \".[team]\"" >&2; exit 1; }
    export PG_DATA_DIR="${PG_DATA_DIR:-$DATA_DIR/postgres}"
    BACKEND="$("$(dirname "$0")/postgres.sh" start)"
    echo "mlflow-server.sh: backend store (and request ledger) in PostgreSQL: \`infra/postgres.sh url --data-dir $PG_DATA_DIR\` prints its URL; \`infra/postgres.sh stop --data-dir $PG_DATA_DIR\` stops it" >&2
else
    BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$DATA_DIR/mlflow.db}"
fi
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$DATA_DIR/artifacts}"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac

extra=()
[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ] && extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
if [ "$AUTH" = basic ]; then
    PY="$(dirname "$(command -v mlflow)")/python"
    [ -x "$PY" ] || PY=python3
    "$PY" -c "import flask_wtf" 2>/dev/null \
        || { echo "mlflow-server.sh: MLflow's basic-auth app needs Flask-WTF next to mlflow: pip install -e \".[team]\"" >&2; exit 1; }
    # the server imports tasks.mlflow_auth from this checkout (also when the package is not installed)
    if [ "$AUTH_FUNCTION" = tasks.mlflow_auth:authenticate_once ]; then
        export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
    fi
    umask 077  # the auth config, the password file and the user store: this user only
    if [ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
        [ -s "$DATA_DIR/admin_password" ] \
            || "$PY" -c 'import secrets; print(secrets.token_urlsafe(24), end="")' >"$DATA_DIR/admin_password"
        MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$DATA_DIR/admin_password")"
        echo "mlflow-server.sh: basic auth on; user admin, password in $DATA_DIR/admin_password" >&2
    fi
    cat >"$DATA_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = $PERMISSION
database_uri = sqlite:///$DATA_DIR/basic_auth.db
admin_username = admin
authorization_function = $AUTH_FUNCTION
EOF
    # the CSRF key of the app's forms: random, kept so restarts and workers share it
    [ -s "$DATA_DIR/flask_secret_key" ] \
        || "$PY" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$DATA_DIR/flask_secret_key"
    MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(cat "$DATA_DIR/flask_secret_key")}"
    # the password and key go through the environment, not a config file or the command line
    export MLFLOW_AUTH_CONFIG_PATH="$DATA_DIR/basic_auth.ini" MLFLOW_AUTH_ADMIN_PASSWORD \
        MLFLOW_FLASK_SERVER_SECRET_KEY
    extra+=(--app-name basic-auth)
fi

echo "mlflow server on http://$HOST:$PORT${AUTH:+ (auth: $AUTH)} (backend ${BACKEND%%://*}://..., artifacts $ARTIFACTS)" >&2
# exec: the server replaces this shell, so the PID of `infra/mlflow-server.sh &` is the
# server's, and one `kill` stops it (uvicorn takes its worker processes with it).
# The backend URL goes through the environment (`mlflow server` reads
# MLFLOW_BACKEND_STORE_URI for --backend-store-uri), not the command line, so a database
# password in it is not shown by `ps` to other users of the machine.
export MLFLOW_BACKEND_STORE_URI="$BACKEND"
exec mlflow server \
    --host "$HOST" --port "$PORT" --workers "$WORKERS" \
    --serve-artifacts --artifacts-destination "$ARTIFACTS" \
    "${extra[@]}"
