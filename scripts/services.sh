#!/usr/bin/env bash
# Start (or reuse) a project-local PostgreSQL and Redis, and write their URLs into .env.
#
#   scripts/services.sh start   # idempotent; prints the URLs
#   scripts/services.sh stop    # stops what `start` started
#   REPLICA=1 scripts/services.sh start   # also a streaming replica (hot standby) of PostgreSQL
#   PGBOUNCER=1 scripts/services.sh start # also a PgBouncer in transaction pooling mode
#   REDIS_CLUSTER=1 scripts/services.sh start  # also a Redis Cluster: 3 masters, 3 replicas
#
# Both servers listen on 127.0.0.1 only, on ports that do not collide with a system
# instance (PG_PORT, default 55432; REDIS_PORT, default 56379), with their data under
# .local/ (git-ignored). With REPLICA=1 a physical streaming replica of that cluster runs on
# REPLICA_PORT (default PG_PORT + 1): `pg_basebackup` through its own replication slot and role,
# read-only (hot standby); its URL goes into .env as REPLICA_DATABASE_URL (tests use it; the
# service reads replicas only through REPORTS_READ_DATABASE_URL). With PGBOUNCER=1 a PgBouncer
# (installed when missing) pools connections to that cluster in transaction mode on
# PGBOUNCER_PORT (default PG_PORT + 2), URL in .env as PGBOUNCER_DATABASE_URL. With
# REDIS_CLUSTER=1 a Redis Cluster of 3 masters and 3 replicas runs on 6 ports from
# REDIS_CLUSTER_PORT (default REDIS_PORT + 100), URL of its first node in .env as
# REDIS_CLUSTER_URL (the service uses it with REPORTS_REDIS_CLUSTER=true). PostgreSQL refuses to run as root, so as root the cluster is
# run as the unprivileged `postgres` user; a normal user runs it as themselves.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
PG_PORT="${PG_PORT:-55432}"
REDIS_PORT="${REDIS_PORT:-56379}"
REPLICA_PORT="${REPLICA_PORT:-$((PG_PORT + 1))}"
REPLICA="${REPLICA:-0}"
REPLICATION_USER="${REPLICATION_USER:-salon_replication}"
PGBOUNCER="${PGBOUNCER:-0}"
REDIS_CLUSTER="${REDIS_CLUSTER:-0}"
REDIS_CLUSTER_PORT="${REDIS_CLUSTER_PORT:-$((REDIS_PORT + 100))}"
PGBOUNCER_PORT="${PGBOUNCER_PORT:-$((PG_PORT + 2))}"
PG_DB="${PG_DB:-salon_reports}"
PG_USER="${PG_USER:-salon}"
ENV_FILE="$ROOT/.env"

say() { printf '[services] %s\n' "$*"; }
die() { printf '[services] error: %s\n' "$*" >&2; exit 1; }

pg_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$dir/initdb" ]] && { echo "$dir"; return 0; }
    done
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
    return 1
}

# The change stream (logical decoding) needs the wal2json output plugin of the server's version.
wal2json_missing() {
    local bindir
    bindir="$(pg_bindir)" || return 1
    [[ ! -f "$("$bindir/pg_config" --pkglibdir 2>/dev/null || echo "$bindir/../lib")/wal2json.so" ]]
}

pg_major() { basename "$(dirname "$(pg_bindir)")"; }

install_missing() {
    local packages=()
    pg_bindir >/dev/null || packages+=(postgresql)
    command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
    [[ ${#packages[@]} -eq 0 ]] && return 0
    install_packages "${packages[@]}"
}

install_packages() {
    local packages=("$@")
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
    else
        die "missing ${packages[*]}; install them with: sudo apt-get install -y ${packages[*]}"
    fi
}

# As root the cluster belongs to `postgres`, which must be able to reach its data directory.
# A checkout under a private home directory is not reachable, so the data then lives in a
# per-checkout folder under /tmp instead.
pg_run_as() {
    if [[ "$(id -u)" -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_datadir() {
    if [[ "$(id -u)" -ne 0 ]]; then echo "$LOCAL/pg"; return; fi
    mkdir -p "$LOCAL"
    if runuser -u postgres -- test -x "$LOCAL" 2>/dev/null; then
        echo "$LOCAL/pg"
    else
        local key
        key="$(printf '%s' "$ROOT" | sha1sum | cut -c1-12)"
        echo "/tmp/salon-reports-$key/pg"
    fi
}

pg_start() {
    local bindir datadir logfile
    bindir="$(pg_bindir)"
    datadir="$(pg_datadir)"
    logfile="$(dirname "$datadir")/postgresql.log"
    mkdir -p "$(dirname "$datadir")"
    if [[ "$(id -u)" -eq 0 ]]; then chown postgres "$(dirname "$datadir")"; fi
    if [[ ! -s "$datadir/PG_VERSION" ]]; then
        say "initialising PostgreSQL cluster in $datadir"
        pg_run_as "$bindir/initdb" -D "$datadir" -U postgres --auth=trust -E UTF8 \
            --locale=C.UTF-8 >/dev/null
        cat >>"$datadir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$(dirname "$datadir")'
max_connections = 300
shared_buffers = 256MB
work_mem = 16MB
maintenance_work_mem = 256MB
fsync = off
synchronous_commit = off
full_page_writes = off
log_min_messages = warning
CONF
    fi
    # Rewritten at every start, so a cluster made by an older version of this script gets it too.
    # The change stream: logical decoding through a replication slot (see docs/design.md, "Write
    # path"). pg_stat_statements: the top statements of /performance/stats (docs/operations.md).
    cat >"$datadir/conf.d-salon-reports.conf" <<CONF
wal_level = logical
max_replication_slots = 64
max_wal_senders = 16
max_slot_wal_keep_size = 4GB
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = top
CONF
    grep -q "conf.d-salon-reports.conf" "$datadir/postgresql.conf" \
        || echo "include_if_exists = 'conf.d-salon-reports.conf'" >>"$datadir/postgresql.conf"
    if [[ "$(id -u)" -eq 0 ]]; then chown postgres "$datadir/conf.d-salon-reports.conf"; fi
    if pg_run_as "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        say "PostgreSQL already running on 127.0.0.1:$PG_PORT"
    else
        say "starting PostgreSQL on 127.0.0.1:$PG_PORT"
        pg_run_as "$bindir/pg_ctl" -D "$datadir" -l "$logfile" -w -t 60 start >/dev/null \
            || { tail -20 "$logfile" >&2; die "PostgreSQL did not start"; }
    fi
    local psql=("$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
    # Both settings take a restart: a cluster started before the change stream existed runs
    # with wal_level = replica, one started before pg_stat_statements without the library.
    if [[ "$("${psql[@]}" -d postgres -c "SHOW wal_level")" != logical ]] \
        || ! "${psql[@]}" -d postgres -c "SHOW shared_preload_libraries" | grep -qw pg_stat_statements; then
        say "restarting PostgreSQL (wal_level = logical, shared_preload_libraries = pg_stat_statements)"
        pg_run_as "$bindir/pg_ctl" -D "$datadir" -l "$logfile" -w -t 60 restart >/dev/null \
            || { tail -20 "$logfile" >&2; die "PostgreSQL did not restart"; }
    fi
    if [[ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]]; then
        "${psql[@]}" -d postgres -c "CREATE ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_USER'"
    fi
    if [[ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" != 1 ]]; then
        "${psql[@]}" -d postgres -c "CREATE DATABASE $PG_DB OWNER $PG_USER"
    fi
}

pg_stop() {
    local bindir datadir
    bindir="$(pg_bindir)" || return 0
    datadir="$(pg_datadir)"
    [[ -s "$datadir/PG_VERSION" ]] || return 0
    if pg_run_as "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1; then
        say "stopping PostgreSQL"
        pg_run_as "$bindir/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null
    fi
}

# The streaming replica: its own data directory next to the primary's, fed through a physical
# replication slot (the primary keeps the WAL it has not received, up to
# max_slot_wal_keep_size) by a role that may only replicate.
replica_datadir() { echo "$(dirname "$(pg_datadir)")/pg-replica"; }
replica_slot() { echo "salon_reports_replica_$REPLICA_PORT"; }

replica_start() {
    local bindir datadir logfile slot
    bindir="$(pg_bindir)"
    datadir="$(replica_datadir)"
    logfile="$(dirname "$datadir")/postgresql-replica.log"
    slot="$(replica_slot)"
    local psql=("$bindir/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA)
    if [[ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$REPLICATION_USER'")" != 1 ]]; then
        "${psql[@]}" -c "CREATE ROLE $REPLICATION_USER LOGIN REPLICATION"
    fi
    # initdb's pg_hba.conf lets loopback replication connections in; a cluster set up
    # otherwise gets the line here.
    local hba
    hba="$("${psql[@]}" -c "SHOW hba_file")"
    if ! pg_run_as grep -qE "^host[[:space:]]+replication[[:space:]]+(all|$REPLICATION_USER)[[:space:]]+127\.0\.0\.1/32" "$hba"; then
        echo "host replication $REPLICATION_USER 127.0.0.1/32 trust" | pg_run_as tee -a "$hba" >/dev/null
        "${psql[@]}" -c "SELECT pg_reload_conf()" >/dev/null
    fi
    local slot_exists
    slot_exists="$("${psql[@]}" -c "SELECT 1 FROM pg_replication_slots WHERE slot_name = '$slot'")"
    if pg_run_as "$bindir/pg_ctl" -D "$datadir" status >/dev/null 2>&1 && [[ "$slot_exists" == 1 ]]; then
        say "PostgreSQL replica already running on 127.0.0.1:$REPLICA_PORT"
        return
    fi
    pg_run_as "$bindir/pg_ctl" -D "$datadir" -m fast -w stop >/dev/null 2>&1 || true
    if [[ "$slot_exists" != 1 || ! -s "$datadir/PG_VERSION" ]]; then
        # No slot means the WAL since the last base backup may be gone: take a new one.
        rm -rf "$datadir"
        if [[ "$slot_exists" == 1 ]]; then
            "${psql[@]}" -c "SELECT pg_drop_replication_slot('$slot')" >/dev/null
        fi
        say "taking a base backup for the replica (slot $slot)"
        pg_run_as "$bindir/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" -U "$REPLICATION_USER" \
            -D "$datadir" -X stream -R -C -S "$slot" --checkpoint=fast \
            || die "pg_basebackup failed"
        cat >"$datadir/conf.d-replica.conf" <<CONF
port = $REPLICA_PORT
hot_standby = on
# A report query that holds back the replay of a conflicting change is cancelled after this
# long (the service then asks the primary); the replica's lag stays bounded by it.
max_standby_streaming_delay = 5s
hot_standby_feedback = off
CONF
        echo "include_if_exists = 'conf.d-replica.conf'" >>"$datadir/postgresql.conf"
        if [[ "$(id -u)" -eq 0 ]]; then chown postgres "$datadir/conf.d-replica.conf" "$datadir/postgresql.conf"; fi
    fi
    say "starting the PostgreSQL replica on 127.0.0.1:$REPLICA_PORT"
    pg_run_as "$bindir/pg_ctl" -D "$datadir" -l "$logfile" -w -t 60 start >/dev/null \
        || { tail -20 "$logfile" >&2; die "the PostgreSQL replica did not start"; }
}

replica_running() {
    local bindir
    bindir="$(pg_bindir)" || return 1
    [[ -s "$(replica_datadir)/PG_VERSION" ]] \
        && pg_run_as "$bindir/pg_ctl" -D "$(replica_datadir)" status >/dev/null 2>&1
}

replica_stop() {
    local bindir
    bindir="$(pg_bindir)" || return 0
    if replica_running; then
        say "stopping the PostgreSQL replica"
        pg_run_as "$bindir/pg_ctl" -D "$(replica_datadir)" -m fast -w stop >/dev/null
    fi
}

# PgBouncer in transaction pooling mode in front of the primary: every database of the cluster,
# few server connections per database and user (so client transactions really share them).
pgbouncer_dir() { echo "$(dirname "$(pg_datadir)")/pgbouncer"; }

pgbouncer_running() {
    local pidfile
    pidfile="$(pgbouncer_dir)/pgbouncer.pid"
    [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

pgbouncer_start() {
    command -v pgbouncer >/dev/null 2>&1 || install_packages pgbouncer
    local dir
    dir="$(pgbouncer_dir)"
    if pgbouncer_running; then
        say "PgBouncer already running on 127.0.0.1:$PGBOUNCER_PORT"
        return
    fi
    mkdir -p "$dir"
    cat >"$dir/pgbouncer.ini" <<CONF
[databases]
* = host=127.0.0.1 port=$PG_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 8
max_client_conn = 1000
server_reset_query =
ignore_startup_parameters = extra_float_digits
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
admin_users = postgres
CONF
    printf '"%s" ""\n"postgres" ""\n' "$PG_USER" >"$dir/userlist.txt"
    say "starting PgBouncer (transaction pooling) on 127.0.0.1:$PGBOUNCER_PORT"
    if [[ "$(id -u)" -eq 0 ]]; then
        chown -R postgres "$dir"
        runuser -u postgres -- pgbouncer -d "$dir/pgbouncer.ini" \
            || die "PgBouncer did not start (see $dir/pgbouncer.log)"
    else
        pgbouncer -d "$dir/pgbouncer.ini" || die "PgBouncer did not start (see $dir/pgbouncer.log)"
    fi
    local _
    for _ in $(seq 50); do
        pgbouncer_running && return
        sleep 0.1
    done
    die "PgBouncer did not start (see $dir/pgbouncer.log)"
}

pgbouncer_stop() {
    if pgbouncer_running; then
        say "stopping PgBouncer"
        kill "$(cat "$(pgbouncer_dir)/pgbouncer.pid")"
    fi
}

redis_start() {
    mkdir -p "$LOCAL/redis"
    if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
        say "Redis already running on 127.0.0.1:$REDIS_PORT"
        return
    fi
    say "starting Redis on 127.0.0.1:$REDIS_PORT"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --daemonize yes \
        --dir "$LOCAL/redis" --pidfile "$LOCAL/redis/redis.pid" \
        --logfile "$LOCAL/redis/redis.log" --save '' --appendonly no \
        --maxmemory 512mb --maxmemory-policy allkeys-lru
    local _
    for _ in $(seq 50); do
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "Redis did not start (see $LOCAL/redis/redis.log)"
}

redis_stop() {
    if redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping >/dev/null 2>&1; then
        say "stopping Redis"
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    fi
}

# Redis Cluster: six nodes on loopback, then `redis-cli --cluster create` with one replica per
# master. A short node timeout, so a killed master's replica takes over within seconds. The
# cluster bus listens 30000 below each node's port, under the ephemeral range (the default, 10000
# above, would not fit).
cluster_ports() { seq "$REDIS_CLUSTER_PORT" $((REDIS_CLUSTER_PORT + 5)); }

cluster_ok() {
    redis-cli -h 127.0.0.1 -p "$REDIS_CLUSTER_PORT" cluster info 2>/dev/null | grep -q 'cluster_state:ok'
}

redis_cluster_start() {
    local port dir
    for port in $(cluster_ports); do
        redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && continue
        dir="$LOCAL/redis-cluster/$port"
        mkdir -p "$dir"
        redis-server --bind 127.0.0.1 --port "$port" --daemonize yes --dir "$dir" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
            --cluster-port $((port - 30000)) \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save '' --appendonly no \
            --maxmemory 128mb --maxmemory-policy allkeys-lru
    done
    local _
    for port in $(cluster_ports); do
        for _ in $(seq 50); do
            redis-cli -h 127.0.0.1 -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    if cluster_ok; then
        say "Redis Cluster already running on 127.0.0.1:$REDIS_CLUSTER_PORT-$((REDIS_CLUSTER_PORT + 5))"
        return
    fi
    say "creating a Redis Cluster on 127.0.0.1:$REDIS_CLUSTER_PORT-$((REDIS_CLUSTER_PORT + 5))"
    # shellcheck disable=SC2046
    redis-cli --cluster create $(for port in $(cluster_ports); do echo "127.0.0.1:$port"; done) \
        --cluster-replicas 1 --cluster-yes >/dev/null || die "redis-cli --cluster create failed"
    for _ in $(seq 100); do
        cluster_ok && return
        sleep 0.1
    done
    die "the Redis Cluster did not become ready"
}

redis_cluster_running() {
    redis-cli -h 127.0.0.1 -p "$REDIS_CLUSTER_PORT" ping >/dev/null 2>&1
}

redis_cluster_stop() {
    local port
    for port in $(cluster_ports); do
        redis-cli -h 127.0.0.1 -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    # A node's cluster state lives in nodes.conf: start afresh next time.
    rm -rf "$LOCAL/redis-cluster"
}

# Keep lines the user added to .env; replace only the ones this script owns.
write_env() {
    local secret=""
    if [[ -f "$ENV_FILE" ]]; then
        secret="$(sed -n 's/^REPORTS_JWT_SECRET=//p' "$ENV_FILE" | tail -1)"
        grep -vE '^(DATABASE_URL|REDIS_URL|REPORTS_JWT_SECRET|REPLICA_DATABASE_URL|PGBOUNCER_DATABASE_URL|REDIS_CLUSTER_URL)=' "$ENV_FILE" >"$ENV_FILE.tmp" || true
    else
        : >"$ENV_FILE.tmp"
    fi
    [[ -n "$secret" ]] || secret="$(head -c 48 /dev/urandom | base64 | tr -d '\n/+=')"
    {
        cat "$ENV_FILE.tmp"
        echo "DATABASE_URL=postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
        echo "REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
        echo "REPORTS_JWT_SECRET=$secret"
        if replica_running; then
            echo "REPLICA_DATABASE_URL=postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$REPLICA_PORT/$PG_DB"
        fi
        if redis_cluster_running; then
            echo "REDIS_CLUSTER_URL=redis://127.0.0.1:$REDIS_CLUSTER_PORT/0"
        fi
        if pgbouncer_running; then
            echo "PGBOUNCER_DATABASE_URL=postgresql+psycopg://$PG_USER:$PG_USER@127.0.0.1:$PGBOUNCER_PORT/$PG_DB"
        fi
    } >"$ENV_FILE"
    rm -f "$ENV_FILE.tmp"
    chmod 600 "$ENV_FILE"
    say "wrote DATABASE_URL, REDIS_URL, REPORTS_JWT_SECRET (and the replica's, PgBouncer's, the Redis Cluster's URLs) to .env"
}

case "${1:-start}" in
    start)
        install_missing
        if wal2json_missing; then install_packages "postgresql-$(pg_major)-wal2json"; fi
        pg_start
        if [[ "$REPLICA" == 1 ]]; then replica_start; fi
        if [[ "$PGBOUNCER" == 1 ]]; then pgbouncer_start; fi
        redis_start
        if [[ "$REDIS_CLUSTER" == 1 ]]; then redis_cluster_start; fi
        write_env
        ;;
    stop)
        redis_cluster_stop
        redis_stop
        pgbouncer_stop
        replica_stop
        pg_stop
        ;;
    *)
        die "usage: $0 start|stop"
        ;;
esac
