#!/usr/bin/env bash
# Where an embedded node's CPU goes under one wrk load: the profile behind issue 15's
# changes (the allocator, the router's regex engine, sled's small reads on the HTTP worker).
# Commands, not pictures: run it on the commit you want to explain.
#
# Usage: scripts/profile.sh [ENDPOINT] [SECONDS]
#   ENDPOINT  post (default) | skier-day | resort-day | vertical: bench/wrk/api.lua's routes,
#             wrk 2 threads, 128 connections, as in scripts/bench.sh. GETs read what a
#             10 s POST run wrote first.
#   SECONDS   how long perf samples (default 8)
# Writes target/profile/ENDPOINT.data (perf record with DWARF call graphs, so it needs the
# release profile's debug info, which Cargo.toml keeps) and prints the top of two reports:
# by thread and by function including callees. Open the rest with
#   perf report -i target/profile/ENDPOINT.data --children
# Needs perf (Debian's linux-perf), wrk and jq, installed with apt-get when missing (as root).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_TAG=profile
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh

ENDPOINT=${1:-post} SAMPLE_S=${2:-8}
case $ENDPOINT in post | skier-day | resort-day | vertical) ;; *) echo "unknown endpoint: $ENDPOINT" >&2; exit 2 ;; esac
OUT=target/profile
mkdir -p "$OUT"
need_tools "$OUT" perf=linux-perf wrk jq

cargo build --release -p liftlog --bin liftlog >"$OUT/build.log" 2>&1 || { tail -n 20 "$OUT/build.log" >&2; exit 1; }
DATA=$(mktemp -d)
PORT=${PROFILE_PORT:-18190}
target/release/liftlog serve --listen "127.0.0.1:$PORT" --data-dir "$DATA" >"$OUT/node.log" 2>&1 &
NODE=$!
trap 'kill "$NODE" 2>/dev/null || true; wait "$NODE" 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$PORT/resorts" && break
  kill -0 "$NODE" || { cat "$OUT/node.log" >&2; exit 1; }
  sleep 0.1
done

wrk_for() { wrk -t2 -c128 -d"$1s" -s bench/wrk/api.lua "http://127.0.0.1:$PORT" -- "$2" 2025 | sed -n 's/^WRKJSON //p'; }
if [[ $ENDPOINT != post ]]; then
  log "10 s of wrk POST first, for the GETs to find"
  wrk_for 10 post >/dev/null
fi
log "perf record for ${SAMPLE_S} s under wrk $ENDPOINT"
perf record -F 499 --call-graph dwarf,16384 -p "$NODE" -o "$OUT/$ENDPOINT.data" -- sleep "$SAMPLE_S" >"$OUT/perf.log" 2>&1 &
PERF=$!
wrk_for $((SAMPLE_S + 1)) "$ENDPOINT" >"$OUT/$ENDPOINT-wrk.json"
wait "$PERF"
log "wrk: $(jq -r '"\(.rps|floor) req/s, p99 \(.latency_ms.p99) ms, non-2xx \(.errors.status)"' "$OUT/$ENDPOINT-wrk.json")"

echo "== by thread"
perf report -i "$OUT/$ENDPOINT.data" --no-children --sort comm -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
echo "== by function, including callees (liftlog, sled, the allocator, the router, tracing)"
perf report -i "$OUT/$ENDPOINT.data" --children --sort sym -g none --percent-limit 1 2>/dev/null |
  grep -v '^#' | grep -v '(inlined)' | grep -E 'liftlog|sled::tree|malloc|mi_|regex|tracing::span|spawn_blocking' | head -30
