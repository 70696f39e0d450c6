#!/usr/bin/env bash
# Local development/test services for outbox-relay: PostgreSQL 15 and a
# single-node Apache Kafka 4.x broker (KRaft), run as plain processes on
# loopback under $REPO/.dev/.  No Docker needed.
#
# Usage: scripts/services.sh {up|down|status|pg-restart|kafka-stop|kafka-start}
#
#   up           start both (idempotent; fast when already up), write .dev/env
#   down         stop both (succeeds when already down)
#   status       print the state of each; exit 0 when both are up, 3 otherwise
#   pg-restart   pg_ctl restart -m fast, then wait until ready
#   kafka-stop   stop only the broker (data is kept)
#   kafka-start  start only the broker (data is kept), wait until ready
#
# Environment overrides:
#   OUTBOX_PG_PORT                (55432)  PostgreSQL TCP port on 127.0.0.1
#   OUTBOX_KAFKA_PORT             (19092)  Kafka PLAINTEXT listener
#   OUTBOX_KAFKA_CONTROLLER_PORT  (OUTBOX_KAFKA_PORT + 1) KRaft controller
#   OUTBOX_KAFKA_VERSION          (4.4.0)  org.apache.kafka:kafka_2.13 version
#   OUTBOX_KAFKA_CACHE            (~/.cache/outbox-relay/kafka-<version>) jars
#   OUTBOX_SERVICES_TIMEOUT       (90)     seconds to wait for each service
#
# After `up`, `. .dev/env` exports OUTBOX_DATABASE_URL,
# OUTBOX_TEST_DATABASE_URL, OUTBOX_KAFKA_BOOTSTRAP_SERVERS and friends.
set -euo pipefail

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
REPO="$(cd -- "$SCRIPT_DIR/.." && pwd -P)"
DEV="$REPO/.dev"

TIMEOUT="${OUTBOX_SERVICES_TIMEOUT:-90}"

# --- PostgreSQL -------------------------------------------------------------
PG_PORT="${OUTBOX_PG_PORT:-55432}"
PG_BIN=/usr/lib/postgresql/15/bin
PG_DIR="$DEV/pg"
PG_DATA="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
PG_CONF_NAME=outbox-dev.conf
PG_SUPERUSER=postgres
APP_USER=outbox
APP_PASSWORD=outbox

# --- Kafka ------------------------------------------------------------------
KAFKA_VERSION="${OUTBOX_KAFKA_VERSION:-4.4.0}"
LOG4J_VERSION=2.26.1
KAFKA_PORT="${OUTBOX_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${OUTBOX_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
# A third listener for the fault-injection tests: the broker listens on FAULTS_PORT but
# advertises FAULTS_PROXY_PORT, where a test's TCP proxy forwards to it. Clients bootstrapped
# there keep talking through the proxy (metadata points them back at it).
KAFKA_FAULTS_PORT="${OUTBOX_KAFKA_FAULTS_PORT:-$((KAFKA_PORT + 4))}"
KAFKA_FAULTS_PROXY_PORT="${OUTBOX_KAFKA_FAULTS_PROXY_PORT:-$((KAFKA_PORT + 5))}"
KAFKA_CACHE="${OUTBOX_KAFKA_CACHE:-${HOME:-/root}/.cache/outbox-relay/kafka-$KAFKA_VERSION}"
KAFKA_HOME="$DEV/kafka"
KAFKA_DATA="$KAFKA_HOME/data"
KAFKA_LOGS="$KAFKA_HOME/logs"
KAFKA_PROPS="$KAFKA_HOME/server.properties"
KAFKA_PIDFILE="$KAFKA_HOME/kafka.pid"
KAFKA_OUT="$KAFKA_LOGS/kafka.out"
KAFKA_SERVER_LOG="$KAFKA_LOGS/server.log"

PROG="services.sh"

# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
is_root() { [[ "$(id -u)" -eq 0 ]]; }

# Print the last lines of a log to stderr (after the one-line error cause).
tail_log() {
  local f="$1"
  if [[ -f "$f" ]]; then
    printf -- '--- last 20 lines of %s ---\n' "$f" >&2
    tail -n 20 -- "$f" >&2 || true
  fi
}

# die with the cause on the first line, then the log tail.
die_with_log() {
  local msg="$1" log="$2"
  printf '%s: error: %s\n' "$PROG" "$msg" >&2
  tail_log "$log"
  exit 1
}

# Is something listening on 127.0.0.1/0.0.0.0/[::] TCP port $1?
port_listening() {
  local port="$1"
  if command -v ss >/dev/null 2>&1; then
    ss -Hltn "sport = :$port" 2>/dev/null | grep -q .
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
  fi
}

# Describe who listens on port $1 (for error messages).
port_owner() {
  local port="$1" out=""
  if command -v ss >/dev/null 2>&1; then
    # users:(("python3",pid=123,fd=3)) -> python3 (pid 123)
    out="$(ss -Hltnp "sport = :$port" 2>/dev/null |
      sed -n 's/.*users:(("\([^"]*\)",pid=\([0-9]*\).*/\1 (pid \2)/p' | head -n 1)"
  fi
  printf '%s' "${out:-unknown process}"
}

tcp_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Run a command as the OS user that owns the PostgreSQL cluster.  fd 9 (the
# services.sh lock) is closed so the postmaster does not inherit it.
as_pg() {
  if is_root; then
    (cd "$PG_DIR" && runuser -u postgres -- "$@" 9>&-)
  else
    (cd "$PG_DIR" && "$@" 9>&-)
  fi
}

# ----------------------------------------------------------------------------
# PostgreSQL
# ----------------------------------------------------------------------------

# Unix socket directory: inside .dev/pg unless the socket path would exceed
# the ~107-byte sun_path limit (deep CI checkouts), then a per-repo dir in /tmp.
pg_socket_dir() {
  local d="$PG_DIR/run"
  if (( ${#d} + 20 > 100 )); then
    d="/tmp/outbox-pg-$(printf '%s' "$REPO" | cksum | cut -d' ' -f1)"
  fi
  printf '%s' "$d"
}
PG_SOCKET_DIR="$(pg_socket_dir)"

pg_install() {
  [[ -x "$PG_BIN/postgres" ]] && return 0
  is_root || die "PostgreSQL 15 is not installed ($PG_BIN/postgres missing) and not root: run 'apt-get install -y postgresql-15 postgresql-contrib'"
  say "installing PostgreSQL 15 from Debian packages (apt-get)..."
  local aptlog
  aptlog="$(mktemp)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
           postgresql-15 postgresql-contrib; } >"$aptlog" 2>&1; then
    die_with_log "apt-get install postgresql-15 failed (log: $aptlog)" "$aptlog"
  fi
  rm -f -- "$aptlog"
  # Debian's package creates and starts a default cluster on 5432; we do not
  # use it, and leave it alone.
  [[ -x "$PG_BIN/postgres" ]] || die "apt-get succeeded but $PG_BIN/postgres is still missing"
}

pg_prepare_dirs() {
  mkdir -p -- "$DEV" "$PG_DIR" "$PG_DIR/run"
  chmod 755 -- "$DEV"
  if is_root; then
    id postgres >/dev/null 2>&1 || die "OS user 'postgres' does not exist (is postgresql-15 installed correctly?)"
    if [[ "$(stat -c %U -- "$PG_DIR")" != postgres ]]; then
      chown -R postgres:postgres -- "$PG_DIR"
    fi
    # Every ancestor of .dev/pg must be searchable by the postgres user.
    if ! runuser -u postgres -- test -w "$PG_DIR"; then
      local d="$PG_DIR"
      while [[ "$d" != / ]]; do
        d="$(dirname -- "$d")"
        runuser -u postgres -- test -x "$d" || chmod o+x -- "$d"
      done
      runuser -u postgres -- test -w "$PG_DIR" ||
        die "the postgres OS user cannot write $PG_DIR"
    fi
  fi
  if [[ "$PG_SOCKET_DIR" != "$PG_DIR/run" ]]; then
    mkdir -p -- "$PG_SOCKET_DIR"
    if is_root; then chown postgres:postgres -- "$PG_SOCKET_DIR"; fi
    chmod 755 -- "$PG_SOCKET_DIR"
  fi
}

pg_initdb() {
  [[ -f "$PG_DATA/PG_VERSION" ]] && return 0
  say "initdb: creating cluster in $PG_DATA"
  local initlog="$PG_DIR/initdb.log"
  rm -rf -- "$PG_DATA"
  if ! as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$initlog" 2>&1; then
    die_with_log "initdb failed (log: $initlog)" "$initlog"
  fi
  printf "\n# outbox-relay dev settings (scripts/services.sh)\ninclude_if_exists = '%s'\n" \
    "$PG_CONF_NAME" | as_pg tee -a "$PG_DATA/postgresql.conf" >/dev/null
}

# Write our settings + pg_hba.  Returns 0 if they changed.
pg_write_conf() {
  local conf tmp changed=1
  conf="$(cat <<EOF
# Generated by scripts/services.sh -- edits are overwritten.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 300
shared_buffers = 256MB
max_prepared_transactions = 20
fsync = on
password_encryption = scram-sha-256
log_line_prefix = '%m [%p] %q%u@%d '
EOF
)"
  tmp="$PG_DATA/$PG_CONF_NAME"
  if [[ ! -f "$tmp" ]] || [[ "$(cat -- "$tmp")" != "$conf" ]]; then
    printf '%s\n' "$conf" | as_pg tee "$tmp" >/dev/null
    changed=0
  fi
  local hba
  hba="$(cat <<'EOF'
# Generated by scripts/services.sh -- edits are overwritten.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  trust
host    all       all   127.0.0.1/32   scram-sha-256
EOF
)"
  if [[ "$(cat -- "$PG_DATA/pg_hba.conf")" != "$hba" ]]; then
    printf '%s\n' "$hba" | as_pg tee "$PG_DATA/pg_hba.conf" >/dev/null
    changed=0
  fi
  return "$changed"
}

pg_running() {
  [[ -f "$PG_DATA/PG_VERSION" ]] || return 1
  as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

pg_psql_admin() {
  "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$PG_PORT" \
    -U "$PG_SUPERUSER" -d postgres
}

pg_wait_ready() {
  say "waiting for PostgreSQL on 127.0.0.1:$PG_PORT (up to ${TIMEOUT}s)..."
  local deadline=$((SECONDS + TIMEOUT))
  until "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; do
    if ! pg_running; then
      die_with_log "PostgreSQL exited during startup (log: $PG_LOG)" "$PG_LOG"
    fi
    if (( SECONDS >= deadline )); then
      die_with_log "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT within ${TIMEOUT}s (log: $PG_LOG)" "$PG_LOG"
    fi
    sleep 0.5
  done
}

pg_bootstrap_roles() {
  if ! pg_psql_admin >/dev/null <<EOF
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$APP_USER') THEN
    CREATE ROLE $APP_USER LOGIN SUPERUSER PASSWORD '$APP_PASSWORD';
  ELSE
    ALTER ROLE $APP_USER LOGIN SUPERUSER PASSWORD '$APP_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE outbox OWNER $APP_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'outbox') \gexec
SELECT 'CREATE DATABASE outbox_test OWNER $APP_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'outbox_test') \gexec
EOF
  then
    die_with_log "could not create role/databases '$APP_USER' in PostgreSQL (log: $PG_LOG)" "$PG_LOG"
  fi
}

# A real query over TCP with password auth, as the application user.
pg_check_app_login() {
  local out
  if ! out="$(PGPASSWORD="$APP_PASSWORD" "$PG_BIN/psql" -X -qAt -h 127.0.0.1 -p "$PG_PORT" \
        -U "$APP_USER" -d outbox -c 'SELECT 1' 2>&1)" || [[ "$out" != 1 ]]; then
    printf '%s: error: PostgreSQL query as %s@127.0.0.1:%s/outbox failed: %s\n' \
      "$PROG" "$APP_USER" "$PG_PORT" "$(printf '%s' "$out" | head -n 1)" >&2
    exit 1
  fi
}

pg_up() {
  pg_install
  pg_prepare_dirs
  pg_initdb
  local conf_changed=1
  if pg_write_conf; then conf_changed=0; fi
  if pg_running; then
    if (( conf_changed == 0 )); then
      say "PostgreSQL settings changed: restarting"
      if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t "$TIMEOUT" restart >/dev/null 2>&1; then
        die_with_log "PostgreSQL failed to restart within ${TIMEOUT}s (log: $PG_LOG)" "$PG_LOG"
      fi
    fi
  else
    if port_listening "$PG_PORT"; then
      die "port 127.0.0.1:$PG_PORT is already taken by $(port_owner "$PG_PORT"), not our PostgreSQL (set OUTBOX_PG_PORT to use another port)"
    fi
    say "starting PostgreSQL 15 on 127.0.0.1:$PG_PORT (data: $PG_DATA)"
    if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$TIMEOUT" start >/dev/null 2>&1; then
      die_with_log "PostgreSQL failed to start within ${TIMEOUT}s (log: $PG_LOG)" "$PG_LOG"
    fi
  fi
  pg_wait_ready
  pg_bootstrap_roles
  pg_check_app_login
  say "PostgreSQL is up on 127.0.0.1:$PG_PORT"
}

pg_down() {
  if pg_running; then
    say "stopping PostgreSQL"
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null ||
      die_with_log "pg_ctl stop failed (log: $PG_LOG)" "$PG_LOG"
  else
    say "PostgreSQL is not running"
  fi
}

pg_restart() {
  pg_running || die "PostgreSQL is not running (use 'up')"
  say "restarting PostgreSQL (-m fast)"
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -m fast -w -t "$TIMEOUT" restart >/dev/null 2>&1; then
    die_with_log "PostgreSQL failed to restart within ${TIMEOUT}s (log: $PG_LOG)" "$PG_LOG"
  fi
  pg_wait_ready
  pg_check_app_login
  say "PostgreSQL is up on 127.0.0.1:$PG_PORT"
}

pg_status() {
  if pg_running && "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; then
    say "postgres: up (pid $(head -n 1 "$PG_DATA/postmaster.pid"), 127.0.0.1:$PG_PORT, data $PG_DATA)"
    return 0
  fi
  if pg_running; then
    say "postgres: starting or unhealthy (process running, not accepting connections on 127.0.0.1:$PG_PORT)"
  else
    say "postgres: down"
  fi
  return 1
}

# ----------------------------------------------------------------------------
# Kafka
# ----------------------------------------------------------------------------

require_java() {
  command -v java >/dev/null 2>&1 || die "Java is missing: Kafka $KAFKA_VERSION needs a Java 17+ runtime on PATH (apt-get install openjdk-17-jre-headless)"
  local v
  v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
  if [[ -z "$v" || "$v" -lt 17 ]]; then
    die "Java ${v:-?} found, but Kafka $KAFKA_VERSION needs Java 17+"
  fi
}

kafka_cache_ok() {
  [[ -f "$KAFKA_CACHE/.complete" ]] &&
    compgen -G "$KAFKA_CACHE/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null
}

# Resolve kafka_2.13 + tools + a log4j2 binding from Maven Central into the
# jar cache.  Skipped when the cache is complete.
kafka_fetch() {
  kafka_cache_ok && return 0
  command -v mvn >/dev/null 2>&1 || die "mvn (Maven) is missing: needed once to fetch Kafka $KAFKA_VERSION jars (apt-get install maven)"
  say "resolving Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_CACHE ..."
  local work
  work="$(mktemp -d)"
  cat >"$work/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.outbox-relay</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <!-- Kafka 4 logs through slf4j 1.7 -> log4j2 -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-api</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  mkdir -p -- "$(dirname -- "$KAFKA_CACHE")"
  local staging="$KAFKA_CACHE.tmp.$$"
  rm -rf -- "$staging"
  if ! (cd "$work" && mvn -B -q -Dstyle.color=never dependency:copy-dependencies \
          -DincludeScope=runtime -DoutputDirectory="$staging") >"$work/mvn.log" 2>&1; then
    rm -rf -- "$staging"
    die_with_log "mvn could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $work/mvn.log)" "$work/mvn.log"
  fi
  [[ -f "$staging/kafka_2.13-$KAFKA_VERSION.jar" ]] ||
    die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is not in $staging"
  printf '%s\n' "$KAFKA_VERSION" >"$staging/.complete"
  rm -rf -- "$KAFKA_CACHE"
  mv -- "$staging" "$KAFKA_CACHE"
  rm -rf -- "$work"
  say "cached $(find "$KAFKA_CACHE" -name '*.jar' | wc -l) jars in $KAFKA_CACHE"
}

kafka_write_config() {
  mkdir -p -- "$KAFKA_HOME" "$KAFKA_DATA" "$KAFKA_LOGS"
  cat >"$KAFKA_PROPS.tmp" <<EOF
# Generated by scripts/services.sh -- edits are overwritten.
# Single node, combined broker+controller, KRaft.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,FAULTS://127.0.0.1:$KAFKA_FAULTS_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,FAULTS://127.0.0.1:$KAFKA_FAULTS_PROXY_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,FAULTS:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=4
default.replication.factor=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.recovery.threads.per.data.dir=1
EOF
  mv -- "$KAFKA_PROPS.tmp" "$KAFKA_PROPS"

  cat >"$KAFKA_HOME/log4j2.properties" <<'EOF'
# Generated by scripts/services.sh: broker logs INFO to logs/server.log
status = warn
name = outbox-kafka
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF

  cat >"$KAFKA_HOME/log4j2-tools.properties" <<'EOF'
# Generated by scripts/services.sh: command-line tools log WARN to stderr
status = warn
name = outbox-kafka-tools
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = err
EOF
}

kafka_tool() {
  java -Xmx256m -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2-tools.properties" \
    -cp "$KAFKA_CACHE/*" "$@"
}

kafka_format() {
  if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
    local formatted_port
    formatted_port="$(cat -- "$KAFKA_HOME/formatted-controller-port" 2>/dev/null || true)"
    if [[ -n "$formatted_port" && "$formatted_port" != "$KAFKA_CONTROLLER_PORT" ]]; then
      die "Kafka storage in $KAFKA_DATA was formatted for controller port $formatted_port, not $KAFKA_CONTROLLER_PORT: run '$0 down && rm -rf $KAFKA_HOME' to start afresh"
    fi
    return 0
  fi
  local cid
  if [[ -s "$KAFKA_HOME/cluster.id" ]]; then
    cid="$(cat -- "$KAFKA_HOME/cluster.id")"
  else
    cid="$(kafka_tool kafka.tools.StorageTool random-uuid 2>"$KAFKA_LOGS/format.log")" ||
      die_with_log "kafka StorageTool random-uuid failed" "$KAFKA_LOGS/format.log"
    printf '%s\n' "$cid" >"$KAFKA_HOME/cluster.id"
  fi
  say "formatting Kafka storage (cluster id $cid)"
  if ! kafka_tool kafka.tools.StorageTool format --standalone -t "$cid" -c "$KAFKA_PROPS" \
        >>"$KAFKA_LOGS/format.log" 2>&1; then
    die_with_log "kafka StorageTool format failed (log: $KAFKA_LOGS/format.log)" "$KAFKA_LOGS/format.log"
  fi
  printf '%s\n' "$KAFKA_CONTROLLER_PORT" >"$KAFKA_HOME/formatted-controller-port"
}

# Prints the pid of our broker if it is running.
kafka_pid() {
  local pid
  [[ -f "$KAFKA_PIDFILE" ]] || return 1
  pid="$(cat -- "$KAFKA_PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Make sure the pid was not recycled by something else.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$KAFKA_PROPS" || return 1
  printf '%s' "$pid"
}

kafka_running() { kafka_pid >/dev/null; }

# While the broker starts: is the process we launched still there? It is a shell for a moment
# and then, by exec, setsid, nohup and java: its command line names the broker's config only
# from the exec on, so kafka_pid's check of it would take a slow start for an exit.
kafka_launched_alive() {
  local pid
  pid="$(cat -- "$KAFKA_PIDFILE" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

python_bin() {
  if [[ -x "$REPO/.venv/bin/python" ]]; then
    printf '%s' "$REPO/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then
    command -v python3
  else
    return 1
  fi
}

# Ready = a Metadata request on the PLAINTEXT listener lists >= 1 broker.
kafka_ready() {
  tcp_open "$KAFKA_PORT" || return 1
  local py
  if py="$(python_bin)"; then
    "$py" - "$KAFKA_PORT" <<'PY' 2>/dev/null
import socket, struct, sys
port = int(sys.argv[1])
s = socket.create_connection(("127.0.0.1", port), timeout=3)
s.settimeout(3)
client = b"outbox-services-sh"
# Metadata v4 request: header v1 (api_key=3, version=4, correlation, client id),
# body: topics = null (all), allow_auto_topic_creation = false.
body = struct.pack(">hhih", 3, 4, 42, len(client)) + client + struct.pack(">ib", -1, 0)
s.sendall(struct.pack(">i", len(body)) + body)
def recv(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
size = struct.unpack(">i", recv(4))[0]
data = recv(size)
corr, _throttle, nbrokers = struct.unpack(">iii", data[:12])
sys.exit(0 if corr == 42 and nbrokers > 0 else 1)
PY
  else
    kafka_tool org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list >/dev/null 2>&1
  fi
}

kafka_wait_ready() {
  say "waiting for Kafka on 127.0.0.1:$KAFKA_PORT (metadata request, up to ${TIMEOUT}s)..."
  local deadline=$((SECONDS + TIMEOUT))
  until kafka_ready; do
    if ! kafka_launched_alive; then
      printf '%s: error: Kafka broker exited during startup (logs: %s)\n' "$PROG" "$KAFKA_LOGS" >&2
      tail_log "$KAFKA_OUT"
      tail_log "$KAFKA_SERVER_LOG"
      exit 1
    fi
    if (( SECONDS >= deadline )); then
      printf '%s: error: Kafka did not answer a metadata request on 127.0.0.1:%s within %ss (logs: %s)\n' \
        "$PROG" "$KAFKA_PORT" "$TIMEOUT" "$KAFKA_LOGS" >&2
      tail_log "$KAFKA_SERVER_LOG"
      exit 1
    fi
    sleep 0.5
  done
}

kafka_start() {
  if kafka_running; then
    kafka_wait_ready
    say "Kafka is up on 127.0.0.1:$KAFKA_PORT (pid $(kafka_pid))"
    return 0
  fi
  rm -f -- "$KAFKA_PIDFILE"
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$KAFKA_FAULTS_PORT"; do
    if port_listening "$p"; then
      die "port 127.0.0.1:$p is already taken by $(port_owner "$p"), not our Kafka broker (set OUTBOX_KAFKA_PORT to use other ports)"
    fi
  done
  require_java
  kafka_fetch
  kafka_write_config
  kafka_format
  say "starting Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$KAFKA_PORT"
  : >"$KAFKA_OUT"
  (
    cd "$KAFKA_HOME"
    exec setsid nohup java -Xms256m -Xmx512m \
      -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError \
      -Djava.awt.headless=true \
      -Dkafka.logs.dir="$KAFKA_LOGS" \
      -Dlog4j2.configurationFile="$KAFKA_HOME/log4j2.properties" \
      -cp "$KAFKA_CACHE/*" kafka.Kafka "$KAFKA_PROPS" \
      >>"$KAFKA_OUT" 2>&1 </dev/null 9>&-
  ) &
  printf '%s\n' "$!" >"$KAFKA_PIDFILE"
  kafka_wait_ready
  say "Kafka is up on 127.0.0.1:$KAFKA_PORT (pid $(kafka_pid))"
}

kafka_stop() {
  local pid
  if ! pid="$(kafka_pid)"; then
    rm -f -- "$KAFKA_PIDFILE"
    say "Kafka is not running"
    return 0
  fi
  say "stopping Kafka (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 20))
  while kill -0 "$pid" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
      say "Kafka did not stop within 20s: sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f -- "$KAFKA_PIDFILE"
}

kafka_status() {
  local pid
  if pid="$(kafka_pid)"; then
    if kafka_ready; then
      say "kafka: up (pid $pid, 127.0.0.1:$KAFKA_PORT, version $KAFKA_VERSION)"
      return 0
    fi
    say "kafka: starting or unhealthy (pid $pid, no metadata answer on 127.0.0.1:$KAFKA_PORT)"
    return 1
  fi
  say "kafka: down"
  return 1
}

# ----------------------------------------------------------------------------
# env file
# ----------------------------------------------------------------------------
write_env() {
  local tmp="$DEV/env.tmp.$$"
  cat >"$tmp" <<EOF
# Generated by scripts/services.sh -- source it: . .dev/env
export OUTBOX_DATABASE_URL=postgresql+psycopg://$APP_USER:$APP_PASSWORD@127.0.0.1:$PG_PORT/outbox
export OUTBOX_TEST_DATABASE_URL=postgresql+psycopg://$APP_USER:$APP_PASSWORD@127.0.0.1:$PG_PORT/outbox_test
export OUTBOX_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT
export OUTBOX_KAFKA_FAULTS_PORT=$KAFKA_FAULTS_PORT
export OUTBOX_KAFKA_FAULTS_PROXY_PORT=$KAFKA_FAULTS_PROXY_PORT
export OUTBOX_PG_DATA=$PG_DATA
export OUTBOX_PG_BIN=$PG_BIN
export OUTBOX_PG_PORT=$PG_PORT
export OUTBOX_PG_SOCKET_DIR=$PG_SOCKET_DIR
export OUTBOX_KAFKA_HOME=$KAFKA_HOME
export OUTBOX_KAFKA_CLASSPATH='$KAFKA_CACHE/*'
EOF
  mv -- "$tmp" "$DEV/env"
}

# ----------------------------------------------------------------------------
usage() {
  printf 'usage: %s {up|down|status|pg-restart|kafka-stop|kafka-start}\n' "$0" >&2
  exit 2
}

# Serialise concurrent invocations (e.g. parallel test workers calling `up`).
take_lock() {
  mkdir -p -- "$DEV"
  command -v flock >/dev/null 2>&1 || return 0
  exec 9>"$DEV/.services.lock"
  flock -w "$((TIMEOUT * 2 + 30))" 9 || die "another services.sh is still running (lock $DEV/.services.lock)"
}

main() {
  [[ $# -eq 1 ]] || usage
  case "$1" in
    up|down|pg-restart|kafka-stop|kafka-start) take_lock ;;
    *) ;;
  esac
  case "$1" in
    up)
      mkdir -p -- "$DEV"
      pg_up
      kafka_start
      write_env
      say "services up; environment in $DEV/env"
      ;;
    down)
      kafka_stop
      pg_down
      ;;
    status)
      local rc=0
      pg_status || rc=3
      kafka_status || rc=3
      exit "$rc"
      ;;
    pg-restart)
      pg_restart
      ;;
    kafka-stop)
      kafka_stop
      ;;
    kafka-start)
      mkdir -p -- "$DEV"
      kafka_start
      ;;
    -h|--help|help)
      sed -n '2,25p' "$0"
      ;;
    *)
      usage
      ;;
  esac
}

main "$@"
