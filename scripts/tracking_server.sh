#!/usr/bin/env bash
# The lab tracking server of docker/compose.yaml, started natively: PostgreSQL plus `mlflow server` with the
# compose file's flags, both on 127.0.0.1. CI uses it where Docker cannot run (see .ci/run).
#
#   scripts/tracking_server.sh start [DIR]   # prints the tracking URI, e.g. http://127.0.0.1:5000
#   scripts/tracking_server.sh stop [DIR]
#   scripts/tracking_server.sh study-storage [DIR]  # prints the SQLAlchemy URL of the Optuna studies' database
#
# DIR (default .cache/tracking-server) holds postgres/ (the database cluster), artifacts/ (what the server
# stores for runs), the logs and the pid file. Environment, the names docker/.env.example uses:
#   POSTGRES_USER (mlflow), POSTGRES_PASSWORD (generated on first start and kept in DIR/credentials if unset),
#   POSTGRES_DB (mlflow), MLFLOW_PORT (5000), MLFLOW_WORKERS (2), MLFLOW_ALLOWED_HOSTS (localhost:*,127.0.0.1:*),
#   and POSTGRES_PORT (55432; compose does not publish the database, so this one is native only).
# Beside MLflow's database, `start` creates OPTUNA_DB (optuna) for Optuna studies that several workers share
# (`hydra.sweeper.storage=$(scripts/tracking_server.sh study-storage DIR)`): its own database, as Optuna and
# MLflow both keep an `alembic_version` table.
# PostgreSQL is installed from Debian's packages if missing (as root); it refuses to run as root, so as root
# its commands run as the `postgres` user.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
COMMAND="${1:-}"
DIR="${2:-$ROOT/.cache/tracking-server}"
POSTGRES_USER="${POSTGRES_USER:-mlflow}"
POSTGRES_DB="${POSTGRES_DB:-mlflow}"
OPTUNA_DB="${OPTUNA_DB:-optuna}"
POSTGRES_PORT="${POSTGRES_PORT:-55432}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"
MLFLOW_ALLOWED_HOSTS="${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*}"
PYTHON="$ROOT/.venv/bin/python"

die() { echo "tracking_server: $*" >&2; exit 1; }

pg_bindir() {
  # Debian keeps the server binaries off PATH, one folder per major version: take the newest.
  find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n 1
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

install_postgres() {
  [ -n "$(pg_bindir)" ] && return
  [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed: run \`apt-get install postgresql\` as root"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
}

password() {
  # An explicit POSTGRES_PASSWORD wins; else the one generated for this DIR (hex: safe inside the URI).
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    printf '%s' "$POSTGRES_PASSWORD"
  else
    [ -s "$DIR/credentials" ] || (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(24))' \
      > "$DIR/credentials")
    tr -d '\n' < "$DIR/credentials"
  fi
}

urlquote() {
  "$PYTHON" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.stdin.read().rstrip("\n"), safe=""), end="")' <<<"$1"
}

wait_for_health() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import sys, time, urllib.request
url, pid = sys.argv[1] + "/health", int(sys.argv[2])
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        import os; os.kill(pid, 0)
    except OSError:
        sys.exit(f"tracking_server: mlflow server exited before {url} answered")
    time.sleep(1)
sys.exit(f"tracking_server: {url} did not answer within 180 s")
EOF
}

start() {
  [ -x "$PYTHON" ] || die "$PYTHON not found: run \`make setup\` first"
  install_postgres
  local bin pass data="$DIR/postgres" uri pid
  bin="$(pg_bindir)"
  if [ -s "$DIR/mlflow.pid" ] && kill -0 "$(cat "$DIR/mlflow.pid")" 2>/dev/null; then
    die "a server from $DIR is already running: \`$0 stop $DIR\` first"
  fi
  mkdir -p "$DIR/artifacts"
  pass="$(password)"
  if [ ! -s "$data/PG_VERSION" ]; then
    install -d -m 700 "$data"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$data"; fi
    as_pg test -w "$data" || die "the postgres user cannot write $data: choose a DIR outside private folders"
    # initdb reads the superuser's password from a file only it can read; scram, as the official image.
    (umask 077 && printf '%s\n' "$pass" > "$data.pw")
    if [ "$(id -u)" = 0 ]; then chown postgres: "$data.pw"; fi
    as_pg "$bin/initdb" -D "$data" -U "$POSTGRES_USER" --pwfile="$data.pw" --auth=scram-sha-256 \
      --encoding=UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" || { rm -f "$data.pw"; die "initdb failed: $DIR/initdb.log"; }
    rm -f "$data.pw"
  fi
  # TCP on loopback only, no Unix socket (its default folder may not exist outside a systemd boot).
  if ! as_pg "$bin/pg_ctl" -D "$data" status >/dev/null; then
    as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 -o \
      "-c listen_addresses=127.0.0.1 -p $POSTGRES_PORT -c unix_socket_directories=''" start >/dev/null \
      || die "PostgreSQL did not start: $data/server.log"
  fi
  local db
  for db in "$POSTGRES_DB" "$OPTUNA_DB"; do
    if ! PGPASSWORD="$pass" "$bin/psql" -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
      PGPASSWORD="$pass" "$bin/createdb" -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" "$db"
    fi
  done
  # The same options as the mlflow service in docker/compose.yaml (tests/test_docker.py compares them). The
  # backend URI holds the password, so it goes in the environment (MLflow's variable for --backend-store-uri),
  # not on the command line every local user can read with `ps`.
  uri="http://127.0.0.1:$MLFLOW_PORT"
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$POSTGRES_USER:$(urlquote "$pass")@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DB" \
  setsid "$ROOT/.venv/bin/mlflow" server \
    --artifacts-destination "$DIR/artifacts" \
    --serve-artifacts \
    --host 127.0.0.1 \
    --port "$MLFLOW_PORT" \
    --workers "$MLFLOW_WORKERS" \
    --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" \
    >"$DIR/mlflow.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" > "$DIR/mlflow.pid"
  wait_for_health "$uri" "$pid" || { tail -n 20 "$DIR/mlflow.log" >&2; stop; exit 1; }
  echo "$uri"
}

stop() {
  local pid bin
  if [ -s "$DIR/mlflow.pid" ]; then
    pid="$(cat "$DIR/mlflow.pid")"
    # setsid made the server its own process group: TERM reaches its workers too.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/mlflow.pid"
  fi
  bin="$(pg_bindir)"
  if [ -n "$bin" ] && [ -s "$DIR/postgres/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$DIR/postgres" -m fast -w stop >/dev/null || true
  fi
}

study_storage() {
  [ -s "$DIR/postgres/PG_VERSION" ] || die "no database in $DIR: \`$0 start $DIR\` first"
  echo "postgresql+psycopg2://$POSTGRES_USER:$(urlquote "$(password)")@127.0.0.1:$POSTGRES_PORT/$OPTUNA_DB"
}

case "$COMMAND" in
  start) mkdir -p "$DIR"; DIR="$(cd "$DIR" && pwd)"; start ;;
  stop) if [ -d "$DIR" ]; then DIR="$(cd "$DIR" && pwd)"; stop; fi ;;
  study-storage) DIR="$(cd "$DIR" && pwd)"; study_storage ;;
  *) die "usage: $0 start|stop|study-storage [DIR]" ;;
esac
