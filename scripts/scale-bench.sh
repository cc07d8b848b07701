#!/usr/bin/env bash
# Scale measurement (issue 7): the local cluster of `cargo xtask cluster` (nginx as the ALB,
# 2 write nodes, 1 read node, an active consumer and a standby) with 1, 2 and 4 partition
# queues; POST and GET throughput through nginx with liftlog-load. Writes
# bench/results/<date>-scale.md. Loopback only; every run is bounded.
#
# Usage: scripts/scale-bench.sh [RIDES]   (default 30000 rides per configuration)
set -euo pipefail
cd "$(dirname "$0")/.."
rides="${1:-30000}"
date_tag="$(date -u +%Y-%m-%d)"
out="bench/results/${date_tag}-scale.md"
work="$(mktemp -d /tmp/liftlog-scale.XXXXXX)"
port=9380
cargo build --release -p liftlog -p liftlog-load -p xtask --locked
load=target/release/liftlog-load
xtask=target/release/xtask

cleanup() { LIFTLOG_CLUSTER_DIR="$work/cluster" "$xtask" cluster down --purge >/dev/null 2>&1 || true; }
trap cleanup EXIT

rows=()
for p in 1 2 4; do
  cleanup
  export LIFTLOG_CLUSTER_DIR="$work/cluster" LIFTLOG_CLUSTER_PREFIX="scale$p$$" CLUSTER_PORT=$port
  export CLUSTER_PARTITIONS=$p CLUSTER_WRITERS=2 CLUSTER_CONSUMERS=2 CLUSTER_READERS=1
  "$xtask" cluster up >"$work/up-$p.log" 2>&1
  base="http://127.0.0.1:$port"
  load_before=$(cut -d' ' -f1 /proc/loadavg)
  "$load" post --base "$base" -n "$rides" --phase1-workers 16 --phase1-rides 500 -c 64 --json "$work/post-$p.json" >"$work/post-$p.txt" 2>&1
  "$load" get --endpoint resort-day --base "$base" --json "$work/get-$p.json" >"$work/get-$p.txt" 2>&1 || true
  consumer_admin=$("$xtask" cluster admin-url consume-1)
  applied=$(curl -s "$consumer_admin/admin/wal" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["consumer"]["events"], round(d["consumer"]["mean_batch_size"],1), d["consumer"]["flush_lag_ms"])')
  row=$(python3 - "$work/post-$p.json" "$work/get-$p.json" "$p" "$applied" "$load_before" <<'PY'
import json, sys
post, get, p, applied, load = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
e = json.load(open(post))["runs"][-1]["endpoints"][0]
try:
    g = json.load(open(get))["runs"][0]["endpoints"][0]
    gtxt = f'{g["throughput_per_s"]:,.0f} req/s, p99 {g["latency_us"]["p99"]/1000:.1f} ms'
except Exception:
    gtxt = "n/a"
ev, batch, lag = applied.split()
print(f'| {p} | {e["throughput_per_s"]:,.0f} req/s, p50 {e["latency_us"]["p50"]/1000:.1f} ms, p99 {e["latency_us"]["p99"]/1000:.1f} ms, {e["failures"]} failures | {gtxt} | {int(ev):,} rides applied, mean WAL batch {batch} | {load} |')
PY
)
  rows+=("$row")
  cleanup
done

{
  echo "# Scale through nginx, $date_tag"
  echo
  echo "- Command: \`scripts/scale-bench.sh $rides\`"
  echo "- Machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; every process (nginx, 2 write nodes, 2 consumers (1 active + standby), 1 read node, RabbitMQ, DynamoDB Local, the load client) shares these cores."
  echo "- POST: liftlog-load, $rides rides (phase 1: 16 x 500, then 64 workers) through nginx; a 201 comes after the broker's confirm. GET: liftlog-load get --endpoint resort-day (128 x 500) through nginx to the read node (DynamoDB)."
  echo
  echo "| partitions | POST through nginx | GET resort-day through nginx (read node) | consumer | load avg before |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Reading: with RabbitMQ single-active-consumer the first consumer is active on every"
  echo "partition queue, so more partitions do not add consuming capacity here: the standby only"
  echo "takes over. On two cores shared by nine processes, the trend, not the absolute figure, is"
  echo "the result; the bottleneck is CPU (see the load average), then the single active consumer."
} >"$out"
echo "wrote $out"
cat "$out"
