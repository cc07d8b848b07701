#!/usr/bin/env bash
# Per-thread CPU of a liftlog node under wrk POST load: which thread is the limit?
# Usage (from the repo root, after cargo build --release -p liftlog): scripts/measure/thread-cpu.sh
set -euo pipefail
bin=${LIFTLOG_BIN:-target/release/liftlog}
d=$(mktemp -d); port=18931
$bin serve --listen 127.0.0.1:$port --admin-listen main --data-dir "$d/data" >"$d/out" 2>"$d/err" &
pid=$!; trap 'kill $pid 2>/dev/null; rm -rf "$d"' EXIT
for _ in $(seq 50); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
# CPU ticks (utime + stime) per thread name, summed over threads of the same name.
snap() {
  local t n fields
  for t in "/proc/$pid/task"/*; do
    n=$(cat "$t/comm")
    read -r -a fields <<<"$(cut -d' ' -f14,15 "$t/stat")"
    echo "$n $((fields[0] + fields[1]))"
  done | awk '{a[$1]+=$2} END {for (k in a) print k, a[k]}' | sort
}
wrk -t2 -c64 -d3s -s bench/wrk/api.lua http://127.0.0.1:$port -- post >/dev/null
snap > "$d/before"
wrk -t2 -c64 -d10s --latency -s bench/wrk/api.lua http://127.0.0.1:$port -- post > "$d/wrk"
snap > "$d/after"
grep -E "Requests/sec|99%" "$d/wrk"
echo "thread  cpu-seconds-in-10s"
join "$d/before" "$d/after" | awk '{printf "%-28s %.2f\n", $1, ($3-$2)/100}' | sort -k2 -nr
