#!/usr/bin/env bash
# A local liftlog cluster in the shape of the AWS stack (deploy/aws/liftlog.yaml), with
# nginx standing in for the ALB:
#
#   nginx 127.0.0.1:$CLUSTER_PORT ──POST──▶ write-1, write-2      (least_conn)
#                                 └─GET───▶ read-1, read-2        (least_conn)
#   write-* ──publish──▶ RabbitMQ quorum queues {prefix}.rides.{0..P-1}
#                          └─single-active-consumer─▶ consume-1 (active), consume-2 (hot standby)
#   consume-* ──flush──▶ DynamoDB Local (tables {prefix}_*) ◀──get/query── read-*
#
# Usage: scripts/cluster.sh COMMAND
#   up                 start everything that is not running yet (idempotent): RabbitMQ and
#                      DynamoDB Local via scripts/services.sh, the tables, the nodes (each
#                      waits for /ready), then nginx. Prints the entry point.
#   down [--purge]     stop only what `up` started: nginx, the nodes (SIGTERM: each drains
#                      and flushes), and the services only if `up` had to start them.
#                      --purge also deletes the cluster's queues and its state dir.
#   status             one line per process with its /ready answer; exit 1 if any is down
#   stop NODE [--kill] SIGTERM one node (e.g. write-1) and wait; --kill sends SIGKILL
#   start NODE         start one node again (same port, same data dir), wait for /ready and
#                      for nginx to take it back (its 2 s fail_timeout)
#   restart NODE       stop, then start (a rolling restart is this, node by node)
#   nodes              the node names, one per line (start order)
#   url NODE|nginx     the base URL of a node or of the entry point
#   admin-url NODE     the base URL of a node's /admin/* and /metrics (its own loopback
#                      listener, public port + 50, when the binary has --admin-listen)
#   logs NODE|nginx    the last lines of its log
#
# Environment (read by `up`, remembered in $LIFTLOG_CLUSTER_DIR/cluster.env for the other
# commands, so later commands need only LIFTLOG_CLUSTER_DIR):
#   LIFTLOG_CLUSTER_DIR     state dir: pids, logs, data dirs, nginx files (/tmp/liftlog-cluster)
#   LIFTLOG_CLUSTER_PREFIX  bus.amqp.prefix, and tables.prefix "<prefix>_" (cluster)
#   CLUSTER_PORT            nginx listens on 127.0.0.1:$CLUSTER_PORT (9080)
#   CLUSTER_NODE_PORT       first node port (CLUSTER_PORT+1): write nodes from it, consumers
#                           from +10, read nodes from +20; admin listeners 50 above each
#   CLUSTER_WRITERS, CLUSTER_CONSUMERS, CLUSTER_READERS   node counts (2, 2, 2; at most 9 each)
#   CLUSTER_PARTITIONS      partition queues (4)
#   CLUSTER_FLUSH_MS        flush.interval_ms of the consumers (1000)
#   CLUSTER_ACK_AFTER       consumer.ack_after of the consumers: table (default), wal, or
#                           empty for the binary's default; CLUSTER_PREFETCH their
#                           bus.amqp.prefetch (20000)
#   CLUSTER_NODE_ARGS       extra flags for every node (word-split)
#   CLUSTER_BROKER          amqp://guest:guest@127.0.0.1:5672/%2f
#   CLUSTER_DYNAMODB        http://127.0.0.1:${DYNAMODB_PORT:-8000}
#   CLUSTER_SERVICES        1 = run scripts/services.sh up (default); 0 = the broker and
#                           DynamoDB are someone else's
#   LIFTLOG_BIN             the liftlog binary to run; default target/release/liftlog,
#                           rebuilt with `cargo build --release -p liftlog` when stale
#   CLUSTER_TIMEOUT         seconds to wait for a process to become ready (60)
#   RUST_LOG                node log level (info)
#
# Needs bash, coreutils, util-linux (flock, setsid), curl, and nginx (installed with apt-get
# when missing: root needed then).
set -euo pipefail

export PATH="${PATH:-/usr/bin:/bin}:/usr/local/sbin:/usr/sbin:/sbin"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
readonly DIR="${LIFTLOG_CLUSTER_DIR:-/tmp/liftlog-cluster}"
readonly ENV_FILE="$DIR/cluster.env"
readonly SERVICES_MARK="$DIR/services.started-by-cluster"
readonly NGINX_DIR="$DIR/nginx"
readonly TEMPLATE="$ROOT/deploy/nginx/liftlog-cluster.conf"

# The helpers shared with services.sh: log/warn/die/show_tail (tagged [cluster]), pid_alive,
# wait_until (polling every 0.2 s), not, close_extra_fds.
readonly LOG_TAG="cluster"
readonly WAIT_UNTIL_INTERVAL=0.2
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# ------------------------------------------------------------------ settings ---

# Settings come from cluster.env once `up` wrote it; the environment fills in before that.
load_settings() {
  if [[ -f $ENV_FILE ]]; then
    # shellcheck disable=SC1090
    source "$ENV_FILE"
  else
    PREFIX="${LIFTLOG_CLUSTER_PREFIX:-cluster}"
    PORT="${CLUSTER_PORT:-9080}"
    NODE_PORT="${CLUSTER_NODE_PORT:-$((PORT + 1))}"
    WRITERS="${CLUSTER_WRITERS:-2}"
    CONSUMERS="${CLUSTER_CONSUMERS:-2}"
    READERS="${CLUSTER_READERS:-2}"
    PARTITIONS="${CLUSTER_PARTITIONS:-4}"
    FLUSH_MS="${CLUSTER_FLUSH_MS:-1000}"
    ACK_AFTER="${CLUSTER_ACK_AFTER:-table}"
    PREFETCH="${CLUSTER_PREFETCH:-20000}"
    NODE_ARGS="${CLUSTER_NODE_ARGS:-}"
    BROKER="${CLUSTER_BROKER:-amqp://guest:guest@127.0.0.1:5672/%2f}"
    DYNAMODB="${CLUSTER_DYNAMODB:-http://127.0.0.1:${DYNAMODB_PORT:-8000}}"
    SERVICES="${CLUSTER_SERVICES:-1}"
    BIN="${LIFTLOG_BIN:-}"
    NODE_LOG="${RUST_LOG:-info}"
  fi
  TIMEOUT="${CLUSTER_TIMEOUT:-60}"
  [[ $PREFIX =~ ^[A-Za-z0-9_.-]+$ ]] || die "LIFTLOG_CLUSTER_PREFIX must be letters, digits, '_', '.', '-': got '$PREFIX'"
  local n
  [[ $ACK_AFTER =~ ^(table|wal|)$ ]] || die "CLUSTER_ACK_AFTER must be table, wal or empty: got '$ACK_AFTER'"
  for n in PORT NODE_PORT WRITERS CONSUMERS READERS PARTITIONS FLUSH_MS PREFETCH TIMEOUT; do
    [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a number, got '${!n}'"
  done
  ((WRITERS >= 1 && WRITERS <= 9 && CONSUMERS >= 1 && CONSUMERS <= 9 && READERS >= 1 && READERS <= 9)) ||
    die "node counts must be 1..9 per role"
}

save_settings() {
  local tmp="$ENV_FILE.tmp"
  {
    printf '# written by scripts/cluster.sh up; read by the other commands\n'
    local n
    for n in PREFIX PORT NODE_PORT WRITERS CONSUMERS READERS PARTITIONS FLUSH_MS ACK_AFTER PREFETCH NODE_ARGS BROKER DYNAMODB SERVICES BIN NODE_LOG; do
      printf '%s=%q\n' "$n" "${!n}"
    done
  } >"$tmp"
  mv "$tmp" "$ENV_FILE"
}

# Node names in start order: consumers first (the first one to attach is the active
# consumer of every partition), then writers, then readers.
node_names() {
  local i
  for ((i = 1; i <= CONSUMERS; i++)); do echo "consume-$i"; done
  for ((i = 1; i <= WRITERS; i++)); do echo "write-$i"; done
  for ((i = 1; i <= READERS; i++)); do echo "read-$i"; done
}

node_role() { printf '%s' "${1%-*}"; }

node_port() {
  local role=${1%-*} i=${1##*-}
  [[ $i =~ ^[1-9]$ ]] || die "no such node: $1"
  case $role in
    write) ((i <= WRITERS)) || die "no such node: $1"; echo $((NODE_PORT + i - 1)) ;;
    consume) ((i <= CONSUMERS)) || die "no such node: $1"; echo $((NODE_PORT + 10 + i - 1)) ;;
    read) ((i <= READERS)) || die "no such node: $1"; echo $((NODE_PORT + 20 + i - 1)) ;;
    *) die "no such node: $1 (try: $(node_names | tr '\n' ' '))" ;;
  esac
}

node_dir() { printf '%s/nodes/%s' "$DIR" "$1"; }

# True if `liftlog serve` has FLAG (the script runs binaries older than some flags).
has_flag() {
  if [[ -z ${SERVE_HELP:-} ]]; then
    SERVE_HELP=$("$BIN" serve --help 2>/dev/null) || SERVE_HELP=none
  fi
  [[ $SERVE_HELP == *"$1"* ]]
}

# True if the binary has an admin listener of its own (--admin-listen): each node then gets
# one on loopback, 50 ports above its public port.
has_admin_listener() { has_flag --admin-listen; }

# The base URL of a node's /admin/* and /metrics (its public URL without an admin listener).
admin_url() {
  local port
  port=$(node_port "$1")
  if has_admin_listener; then
    port=$((port + 50))
  fi
  printf 'http://127.0.0.1:%s' "$port"
}

# The flags of a node: the same for every process of the cluster but role, port, data dir.
node_args() {
  local name=$1
  NODE_ARGV=(serve --role "$(node_role "$name")" --listen "127.0.0.1:$(node_port "$name")"
    --data-dir "$(node_dir "$name")/data" --broker "$BROKER" --dynamodb-endpoint "$DYNAMODB"
    --set "bus.amqp.prefix=$PREFIX" --set "tables.prefix=${PREFIX}_" --set "bus.amqp.partitions=$PARTITIONS"
    --set "flush.interval_ms=$FLUSH_MS")
  if has_admin_listener; then
    NODE_ARGV+=(--admin-listen "127.0.0.1:$(($(node_port "$name") + 50))")
  fi
  # Consumers ack after the tables hold a batch (ack_after = table): the standby on the
  # same queues takes over exactly without the active one's WAL, as on separate machines.
  # Acks then wait up to a flush interval, so the prefetch is raised to keep rides flowing.
  if [[ $(node_role "$name") == consume && -n $ACK_AFTER ]]; then
    NODE_ARGV+=(--set "consumer.ack_after=$ACK_AFTER" --set "bus.amqp.prefetch=$PREFETCH")
  fi
  local -a extra=()
  read -r -a extra <<<"$NODE_ARGS"
  NODE_ARGV+=("${extra[@]}")
}

# ------------------------------------------------------------------- helpers ---

# cmdline_has PID TEXT: the process's command line contains TEXT (guards against pid reuse).
cmdline_has() {
  tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$2"
}

# http_code URL: prints the HTTP status, 000 if no answer. Not in lib/common.sh: services.sh's
# takes HOST PORT, waits 3 s and works without curl.
http_code() {
  curl -s -o /dev/null -m 2 -w '%{http_code}' "$1" 2>/dev/null || true
}

# ------------------------------------------------------------------- binary ---

resolve_binary() {
  if [[ -n $BIN ]]; then
    [[ -x $BIN ]] || die "LIFTLOG_BIN=$BIN is not an executable"
    return 0
  fi
  local target="${CARGO_TARGET_DIR:-$ROOT/target}"
  [[ $target == /* ]] || target="$ROOT/$target"
  local bin="$target/release/liftlog"
  if [[ -x $bin ]] && [[ -z $(find "$ROOT/src" "$ROOT/wal/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" "$ROOT/wal/Cargo.toml" -newer "$bin" -print -quit 2>/dev/null) ]]; then
    log "binary: $bin (up to date)"
  else
    command -v cargo >/dev/null 2>&1 || die "cargo not found and $bin is missing or stale"
    log "binary: cargo build --release -p liftlog"
    (cd "$ROOT" && cargo build --release -p liftlog --locked) || die "cargo build failed"
  fi
  BIN=$bin
}

# ------------------------------------------------------------------ services ---

services_up() {
  if [[ $SERVICES != 1 ]]; then
    log "services: CLUSTER_SERVICES=$SERVICES, using $BROKER and $DYNAMODB as they are"
    return 0
  fi
  if [[ -f $SERVICES_MARK ]]; then
    log "services: started by an earlier 'up' of this cluster"
    "$ROOT/scripts/services.sh" up
  elif "$ROOT/scripts/services.sh" status >/dev/null 2>&1; then
    log "services: RabbitMQ and DynamoDB Local already running (down leaves them)"
  else
    "$ROOT/scripts/services.sh" up
    touch "$SERVICES_MARK"
  fi
}

services_down() {
  if [[ -f $SERVICES_MARK ]]; then
    log "services: this cluster started them; scripts/services.sh down"
    "$ROOT/scripts/services.sh" down || warn "scripts/services.sh down failed"
    rm -f "$SERVICES_MARK"
  else
    log "services: not started by this cluster; left running"
  fi
}

# --------------------------------------------------------------------- nodes ---

# Prints the pid of a node this cluster started, if it is alive.
node_pid() {
  local pid dir
  dir=$(node_dir "$1")
  pid=$(cat "$dir/pid" 2>/dev/null) || return 1
  pid_alive "$pid" || return 1
  cmdline_has "$pid" "$dir/data" || return 1
  printf '%s' "$pid"
}

node_ready() { [[ $(http_code "http://127.0.0.1:$(node_port "$1")/ready") == 200 ]]; }

start_node() {
  local name=$1 dir port pid
  dir=$(node_dir "$name")
  port=$(node_port "$name")
  if pid=$(node_pid "$name"); then
    log "$name: already running (pid $pid, :$port)"
    return 0
  fi
  local url
  for url in "http://127.0.0.1:$port" "$(admin_url "$name")"; do
    if [[ $(http_code "$url/health") != 000 ]]; then
      die "$name: ${url##*:} is taken by a process this cluster did not start"
    fi
  done
  mkdir -p "$dir/data"
  rm -f "$dir/pid"
  node_args "$name"
  printf '\n=== %s: %s %s\n' "$(date '+%F %T')" "$BIN" "${NODE_ARGV[*]}" >>"$dir/node.log"
  (
    close_extra_fds
    export RUST_LOG="$NODE_LOG"
    # sh writes its own pid, then execs the node: the pid file holds the node's pid
    # whether or not setsid forks.
    # shellcheck disable=SC2016 # $$/$0/$@ expand in the inner sh
    exec setsid sh -c 'echo "$$" >"$0"; exec "$@"' "$dir/pid" "$BIN" "${NODE_ARGV[@]}"
  ) </dev/null >>"$dir/node.log" 2>&1 &
  wait_until 10 test -s "$dir/pid" || { show_tail "$dir/node.log"; die "$name: did not start"; }
  pid=$(cat "$dir/pid")
  local deadline=$((SECONDS + TIMEOUT))
  until node_ready "$name"; do
    if ! pid_alive "$pid"; then
      show_tail "$dir/node.log"
      die "$name: exited during start-up (log: $dir/node.log)"
    fi
    if ((SECONDS >= deadline)); then
      show_tail "$dir/node.log"
      die "$name: not ready on :$port after ${TIMEOUT}s (pid $pid left running; log: $dir/node.log)"
    fi
    sleep 0.2
  done
  log "$name: ready on http://127.0.0.1:$port (pid $pid, $(node_role "$name"))"
}

# stop_node NAME [kill]: SIGTERM (ordered shutdown: drain, fsync, final flush) or SIGKILL.
stop_node() {
  local name=$1 how=${2:-term} pid
  if ! pid=$(node_pid "$name"); then
    rm -f "$(node_dir "$name")/pid"
    log "$name: not running"
    return 0
  fi
  if [[ $how == kill ]]; then
    log "$name: kill -9 $pid"
    kill -KILL "$pid" 2>/dev/null || true
  else
    log "$name: SIGTERM $pid"
    kill -TERM "$pid" 2>/dev/null || true
  fi
  # The node's own shutdown waits up to 30 s for in-flight requests, then flushes.
  if ! wait_until 90 not pid_alive "$pid"; then
    warn "$name: pid $pid still alive 90 s after SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 10 not pid_alive "$pid" || die "$name: pid $pid does not die"
  fi
  rm -f "$(node_dir "$name")/pid"
  log "$name: stopped"
}

# --------------------------------------------------------------------- nginx ---

# nginx takes a node that failed back only after fail_timeout (2 s, see upstream_lines): a
# rolling restart that moved on earlier could find every node of a pool marked down (502).
# This is the local twin of waiting for the ALB's healthy threshold.
back_in_pool() {
  if nginx_pid >/dev/null; then
    sleep 2.2
  fi
}

nginx_install() {
  command -v nginx >/dev/null 2>&1 && return 0
  [[ $(id -u) -eq 0 ]] || die "nginx is not installed and this is not root: apt-get install nginx"
  command -v apt-get >/dev/null 2>&1 || die "nginx is not installed and there is no apt-get"
  mkdir -p "$DIR"
  local before=0
  [[ -s /run/nginx.pid ]] && before=1
  log "nginx: installing with apt-get (log: $DIR/apt-install.log)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -o Dpkg::Options::=--force-confdef \
      -o Dpkg::Options::=--force-confold nginx; } >"$DIR/apt-install.log" 2>&1 </dev/null; then
    show_tail "$DIR/apt-install.log"
    die "nginx: apt-get install nginx failed"
  fi
  command -v nginx >/dev/null 2>&1 || die "nginx: still not found after apt-get install"
  # Without a policy-rc.d that forbids it, the package starts the system nginx on :80. We
  # caused that, so we undo it: the cluster runs its own nginx with its own config.
  if ((before == 0)) && [[ -s /run/nginx.pid ]]; then
    log "nginx: the package started the system nginx; stopping it (nginx -s quit)"
    nginx -s quit 2>/dev/null || true
  fi
}

nginx_pid() {
  local pid
  pid=$(cat "$NGINX_DIR/nginx.pid" 2>/dev/null) || return 1
  pid_alive "$pid" || return 1
  cmdline_has "$pid" "nginx" || return 1
  printf '%s' "$pid"
}

# Prints "        server 127.0.0.1:PORT ...;" for each node of a role.
upstream_lines() {
  local role=$1 name
  while read -r name; do
    [[ $(node_role "$name") == "$role" ]] || continue
    # One failure takes a node out for 2 s; then nginx tries it again.
    printf '        server 127.0.0.1:%s max_fails=1 fail_timeout=2s;\n' "$(node_port "$name")"
  done < <(node_names)
}

render_nginx() {
  local user_directive=""
  if [[ $(id -u) -eq 0 ]]; then
    user_directive="user $(id -un) $(id -gn);"
  fi
  mkdir -p "$NGINX_DIR"/tmp/{client_body,proxy,fastcgi,uwsgi,scgi}
  local text line
  text=$(<"$TEMPLATE")
  text=${text//@USER_DIRECTIVE@/$user_directive}
  text=${text//@NGINX_DIR@/$NGINX_DIR}
  text=${text//@LISTEN@/127.0.0.1:$PORT}
  line=$(upstream_lines write)
  text=${text//@WRITE_SERVERS@/$line}
  line=$(upstream_lines read)
  text=${text//@READ_SERVERS@/$line}
  if grep -q '@[A-Z_]*@' <<<"$text"; then
    die "nginx: unrendered placeholder in $TEMPLATE"
  fi
  printf '%s\n' "$text" >"$NGINX_DIR/nginx.conf"
}

start_nginx() {
  local pid
  render_nginx
  if pid=$(nginx_pid); then
    log "nginx: already running (pid $pid); reloading the rendered config"
    nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" -s reload
    return 0
  fi
  if [[ $(http_code "http://127.0.0.1:$PORT/nginx-health") != 000 ]]; then
    die "nginx: port $PORT is taken by a process this cluster did not start"
  fi
  nginx -t -q -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log" ||
    die "nginx: the rendered config $NGINX_DIR/nginx.conf does not pass nginx -t"
  rm -f "$NGINX_DIR/nginx.pid"
  (close_extra_fds && exec nginx -p "$NGINX_DIR" -c "$NGINX_DIR/nginx.conf" -e "$NGINX_DIR/error.log") \
    </dev/null >>"$NGINX_DIR/nginx.out" 2>&1 || { show_tail "$NGINX_DIR/nginx.out"; show_tail "$NGINX_DIR/error.log"; die "nginx: failed to start"; }
  wait_until "$TIMEOUT" test "$(http_code "http://127.0.0.1:$PORT/nginx-health")" = 200 ||
    { show_tail "$NGINX_DIR/error.log"; die "nginx: no answer on 127.0.0.1:$PORT"; }
  log "nginx: ready on http://127.0.0.1:$PORT (pid $(nginx_pid || echo '?'))"
}

stop_nginx() {
  local pid
  if ! pid=$(nginx_pid); then
    log "nginx: not running"
    return 0
  fi
  log "nginx: quit (pid $pid)"
  kill -QUIT "$pid" 2>/dev/null || true
  if ! wait_until 20 not pid_alive "$pid"; then
    warn "nginx: pid $pid still alive; SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    wait_until 10 not pid_alive "$pid" || warn "nginx: pid $pid does not die"
  fi
  rm -f "$NGINX_DIR/nginx.pid"
}

# ------------------------------------------------------------------ commands ---

cmd_up() {
  nginx_install
  services_up
  resolve_binary
  save_settings
  log "tables: $BIN tables create (prefix ${PREFIX}_)"
  RUST_LOG=warn "$BIN" tables create --dynamodb-endpoint "$DYNAMODB" --set "tables.prefix=${PREFIX}_" \
    --data-dir "$DIR/tables-create" >>"$DIR/tables-create.log" 2>&1 ||
    { show_tail "$DIR/tables-create.log"; die "tables create failed"; }
  local name
  while read -r name; do
    start_node "$name"
  done < <(node_names)
  start_nginx
  log "up: http://127.0.0.1:$PORT (state: $DIR, prefix: $PREFIX)"
}

cmd_down() {
  local purge=${1:-}
  if [[ ! -f $ENV_FILE ]]; then
    log "nothing was started in $DIR"
    [[ $purge == --purge ]] && rm -rf "$DIR"
    return 0
  fi
  stop_nginx
  # Writers and readers first (no new rides), then the consumers, standbys before the
  # active one, each with its final flush.
  local name
  while read -r name; do
    [[ $(node_role "$name") == consume ]] || stop_node "$name"
  done < <(node_names)
  while read -r name; do
    [[ $(node_role "$name") == consume ]] && stop_node "$name"
  done < <(node_names | tac)
  if [[ $purge == --purge ]]; then
    purge_queues
  fi
  services_down
  rm -f "$ENV_FILE"
  if [[ $purge == --purge ]]; then
    rm -rf "$DIR"
    log "down: stopped and purged $DIR"
  else
    log "down: stopped (data dirs and logs kept in $DIR)"
  fi
}

# Deletes the cluster's quorum queues on a local broker (they outlive the nodes).
purge_queues() {
  command -v rabbitmqctl >/dev/null 2>&1 || { warn "rabbitmqctl not found: queues ${PREFIX}.rides.* left on the broker"; return 0; }
  local p q
  for ((p = 0; p < PARTITIONS; p++)); do
    q="${PREFIX}.rides.$p"
    rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 </dev/null || true
  done
  rabbitmqctl -q delete_queue "${PREFIX}.rides.dead" >/dev/null 2>&1 </dev/null || true
  log "purge: deleted queues ${PREFIX}.rides.{0..$((PARTITIONS - 1))} and ${PREFIX}.rides.dead"
}

cmd_status() {
  if [[ ! -f $ENV_FILE ]]; then
    echo "cluster: not up ($DIR)"
    return 1
  fi
  local rc=0 name pid port code
  printf '%-10s %-8s %-6s %-8s %s\n' NODE ROLE PORT PID READY
  while read -r name; do
    port=$(node_port "$name")
    if pid=$(node_pid "$name"); then
      code=$(http_code "http://127.0.0.1:$port/ready")
      [[ $code == 200 ]] || rc=1
    else
      pid=-
      code=down
      rc=1
    fi
    printf '%-10s %-8s %-6s %-8s %s\n' "$name" "$(node_role "$name")" "$port" "$pid" "$code"
  done < <(node_names)
  if pid=$(nginx_pid); then
    # /ready through nginx reaches a read node: the whole GET path answers.
    code=$(http_code "http://127.0.0.1:$PORT/ready")
    [[ $code == 200 ]] || rc=1
    printf '%-10s %-8s %-6s %-8s %s\n' nginx lb "$PORT" "$pid" "$code"
  else
    printf '%-10s %-8s %-6s %-8s %s\n' nginx lb "$PORT" - down
    rc=1
  fi
  if [[ $SERVICES == 1 ]]; then
    "$ROOT/scripts/services.sh" status || rc=1
  fi
  return "$rc"
}

usage() {
  sed -n '11,27p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
  local cmd=${1:-}
  case $cmd in
    up | down | status | stop | start | restart | nodes | url | admin-url | logs) ;;
    -h | --help | help)
      usage
      return 0
      ;;
    *)
      usage >&2
      return 2
      ;;
  esac
  shift
  mkdir -p "$DIR"
  load_settings
  case $cmd in
    nodes)
      node_names
      return 0
      ;;
    url)
      [[ ${1:-} == nginx ]] && { echo "http://127.0.0.1:$PORT"; return 0; }
      echo "http://127.0.0.1:$(node_port "${1:?url NODE|nginx}")"
      return 0
      ;;
    admin-url)
      [[ -n $BIN ]] || die "the cluster is not up"
      admin_url "${1:?admin-url NODE}"
      echo
      return 0
      ;;
    logs)
      if [[ ${1:-} == nginx ]]; then tail -n 40 "$NGINX_DIR/error.log"; else tail -n 40 "$(node_dir "${1:?logs NODE|nginx}")/node.log"; fi
      return 0
      ;;
    status)
      cmd_status
      return
      ;;
  esac
  # One mutating command at a time per state dir.
  exec 9>"$DIR/lock"
  flock -w 300 9 || die "another cluster.sh holds $DIR/lock"
  case $cmd in
    up) cmd_up ;;
    down) cmd_down "${1:-}" ;;
    stop | start | restart)
      local name=${1:?"$cmd NODE"}
      node_port "$name" >/dev/null
      [[ -f $ENV_FILE ]] || die "the cluster is not up"
      [[ -n $BIN ]] || resolve_binary
      case $cmd in
        stop) if [[ ${2:-} == --kill ]]; then stop_node "$name" kill; else stop_node "$name"; fi ;;
        start)
          start_node "$name"
          back_in_pool
          ;;
        restart)
          stop_node "$name"
          start_node "$name"
          back_in_pool
          ;;
      esac
      ;;
  esac
}

main "$@"
