#!/usr/bin/env bash
# PostgreSQL for the team set-up: one cluster (Debian's `postgresql` package) on 127.0.0.1
# only, with a database `unlearnflow` owned by a password-authenticated user `unlearnflow`.
# MLflow's tables (infra/mlflow-server.sh postgres) and the request ledger's tables
# (tasks/ledger.py, prefixed unlearnflow_) live in that one database.
#
#   infra/postgres.sh start [--port P] [--data-dir DIR]   # prints the SQLAlchemy URL (stdout)
#   infra/postgres.sh url   [--data-dir DIR]              # the URL of a started cluster
#   infra/postgres.sh status [--data-dir DIR]
#   infra/postgres.sh stop  [--data-dir DIR]              # keeps the data: `start` resumes it
#   infra/postgres.sh destroy [--data-dir DIR]            # stops it and deletes DIR (throw-away)
#
#   URL="$(infra/postgres.sh start --port 5433)"
#   # -> postgresql+psycopg2://unlearnflow:<password>@127.0.0.1:5433/unlearnflow
#
# Settings (environment; options win):
#   PG_PORT       TCP port (default 5433, so a system cluster on 5432 is left alone)
#   PG_DATA_DIR   state dir (default ./postgres-server): data/ (the cluster), run/ (its unix
#                 socket), postgres.log, password, port. Persistent until `destroy`.
#   PG_PASSWORD   the user's password on first start (default: 32 random hex characters,
#                 kept in $PG_DATA_DIR/password, mode 600)
#   PG_OPTIONS    extra server options, e.g. "-c fsync=off" for a throw-away test cluster
#   PG_BIN        directory of initdb/pg_ctl/psql (default: the newest
#                 /usr/lib/postgresql/*/bin, else the directory of `initdb` on PATH)
#   PG_RUN_AS     system user that runs the server when this script runs as root (PostgreSQL
#                 refuses to run as root; default `postgres`, which Debian's package creates)
#
# The server listens on 127.0.0.1 only (listen_addresses, in postgresql.conf and on the
# command line); local superuser access is by peer authentication over the socket in run/,
# TCP clients need the password (scram-sha-256). Before serving other machines read
# infra/README.md ("Team set-up with PostgreSQL").
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }
say() { echo "postgres.sh: $*" >&2; }

cmd="${1:-}"
[ $# -gt 0 ] && shift
PORT="${PG_PORT:-}"
STATE="${PG_DATA_DIR:-$PWD/postgres-server}"
while [ $# -gt 0 ]; do
    case "$1" in
        --port) PORT="${2:?--port needs a value}"; shift 2 ;;
        --port=*) PORT="${1#*=}"; shift ;;
        --data-dir) STATE="${2:?--data-dir needs a value}"; shift 2 ;;
        --data-dir=*) STATE="${1#*=}"; shift ;;
        *) die "unknown argument $1 (usage: $0 start|stop|destroy|url|status [--port P] [--data-dir DIR])" ;;
    esac
done
case "$PORT" in *[!0-9]*) die "--port must be a number, got '$PORT'" ;; esac

DB=unlearnflow
DB_USER=unlearnflow

find_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        [ -x "$PG_BIN/initdb" ] || die "PG_BIN=$PG_BIN has no initdb"
        echo "$PG_BIN"
        return
    fi
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then
        echo "$d"
        return
    fi
    d="$(command -v initdb 2>/dev/null)" || die "no PostgreSQL binaries (initdb): apt-get install postgresql, or set PG_BIN"
    dirname "$(readlink -f "$d")"
}

# Run a PostgreSQL program as the server's user, from a directory that user can read.
if [ "$(id -u)" -eq 0 ]; then
    RUN_AS="${PG_RUN_AS:-postgres}"
    id "$RUN_AS" >/dev/null 2>&1 || die "running as root, and user '$RUN_AS' does not exist (PostgreSQL refuses to run as root): set PG_RUN_AS to an unprivileged user"
    as_pg() { (cd / && runuser -u "$RUN_AS" -- "$@"); }
else
    RUN_AS="$(id -un)"
    as_pg() { (cd / && "$@"); }
fi

DATA="$STATE/data"
RUN="$STATE/run"
LOG="$STATE/postgres.log"

urlencode() {
    local LC_ALL=C s="$1" out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c="${s:i:1}"
        case "$c" in
            [A-Za-z0-9._~-]) out+="$c" ;;
            *) out+="$(printf '%%%02X' "'$c")" ;;
        esac
    done
    printf '%s' "$out"
}

print_url() {
    [ -f "$STATE/password" ] && [ -f "$STATE/port" ] || die "no cluster started in $STATE (run: $0 start)"
    printf 'postgresql+psycopg2://%s:%s@127.0.0.1:%s/%s\n' \
        "$DB_USER" "$(urlencode "$(cat "$STATE/password")")" "$(cat "$STATE/port")" "$DB"
}

running() { [ -f "$DATA/PG_VERSION" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

psql_admin() {
    # Superuser, over this cluster's own unix socket (peer authentication), script on stdin.
    as_pg "$BIN/psql" -X -q -h "$RUN" -p "$(cat "$STATE/port")" -U "$RUN_AS" -d postgres \
        -v ON_ERROR_STOP=1 "$@"
}

init_cluster() {
    local parent
    parent="$(dirname "$STATE")"
    mkdir -p "$parent"
    if [ ! -d "$STATE" ]; then
        mkdir -m 700 "$STATE"
        if [ "$(id -u)" -eq 0 ]; then chown "$RUN_AS:" "$STATE"; fi
    fi
    as_pg test -w "$STATE" \
        || die "$RUN_AS cannot write $STATE (a parent directory may not be searchable by $RUN_AS): choose another --data-dir, e.g. under /var/tmp or /srv"
    if [ ! -f "$STATE/password" ]; then
        local pw="${PG_PASSWORD:-}"
        [ -n "$pw" ] || pw="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
        (umask 077 && printf '%s' "$pw" >"$STATE/password")
    fi
    say "initdb $DATA ($("$BIN/postgres" --version), as $RUN_AS)"
    as_pg "$BIN/initdb" -D "$DATA" -U "$RUN_AS" -E UTF8 --locale=C.UTF-8 \
        --auth-local=peer --auth-host=scram-sha-256 >"$STATE/initdb.log" 2>&1 \
        || { cat "$STATE/initdb.log" >&2; die "initdb failed"; }
    # Loopback only, and the socket in the state dir (Debian's /var/run/postgresql may be absent).
    as_pg tee -a "$DATA/postgresql.conf" >/dev/null <<EOF

# infra/postgres.sh: loopback only; socket inside the state dir
listen_addresses = '127.0.0.1'
unix_socket_directories = '$RUN'
EOF
}

start() {
    BIN="$(find_bin)"
    [ -f "$DATA/PG_VERSION" ] || init_cluster
    as_pg mkdir -p "$RUN"
    if running; then
        say "already running (port $(cat "$STATE/port"))"
        print_url
        return
    fi
    PORT="${PORT:-$(cat "$STATE/port" 2>/dev/null || echo 5433)}"
    printf '%s\n' "$PORT" >"$STATE/port"
    say "starting on 127.0.0.1:$PORT (log $LOG)"
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o \
        "-p $PORT -c listen_addresses=127.0.0.1 ${PG_OPTIONS:-}" \
        start >/dev/null || { tail -n 20 "$LOG" >&2 2>/dev/null; die "the server did not start"; }
    # The user (with the stored password) and its database; idempotent on every start. The
    # password goes in on stdin (a psql variable, quoted for psql), not on a command line.
    local pw
    pw="$(sed -e 's/\\/\\\\/g' -e "s/'/''/g" "$STATE/password")"
    { printf "\\set pw '%s'\n" "$pw"; cat; } <<'SQL' | psql_admin -v user="$DB_USER" -v db="$DB"
SELECT format('CREATE ROLE %I LOGIN', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'user') \gexec
ALTER ROLE :"user" WITH LOGIN PASSWORD :'pw';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'user')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'db') \gexec
SQL
    print_url
}

stop() {
    BIN="$(find_bin)"
    if running; then
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null
        say "stopped ($STATE kept; \`$0 start\` resumes it)"
    else
        say "not running ($STATE)"
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    destroy)
        [ -d "$STATE" ] || { say "nothing at $STATE"; exit 0; }
        # Only ever delete a directory this script made.
        [ -f "$DATA/PG_VERSION" ] || [ -f "$STATE/password" ] || die "$STATE does not look like a postgres.sh state dir; not deleting it"
        stop
        rm -rf "$STATE"
        say "deleted $STATE"
        ;;
    url) print_url ;;
    status)
        BIN="$(find_bin)"
        if running; then echo "running on 127.0.0.1:$(cat "$STATE/port") ($STATE)"; else echo "stopped ($STATE)"; exit 3; fi
        ;;
    *) die "usage: $0 start|stop|destroy|url|status [--port P] [--data-dir DIR]" ;;
esac
