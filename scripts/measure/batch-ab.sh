#!/usr/bin/env bash
# A/B: POST through RabbitMQ with one ride per message vs batched, same build, same run.
# Usage (from the repo root, RabbitMQ and DynamoDB Local up: cargo xtask services up; after
# cargo build --release -p liftlog): scripts/measure/batch-ab.sh. Loopback only, 4 runs of 10 s.
set -uo pipefail
bin=${LIFTLOG_BIN:-target/release/liftlog}
for rides in 1 256 1 256; do
  d=$(mktemp -d); pre="ab$RANDOM$rides"; wp=18941; cp=18942
  common=(--broker "amqp://guest:guest@127.0.0.1:5672/%2f" --dynamodb-endpoint http://127.0.0.1:8000 --admin-listen main --set "bus.amqp.prefix=$pre" --set "tables.prefix=${pre}_" --set "bus.amqp.batch_max_rides=$rides")
  AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y $bin serve --role consume --listen 127.0.0.1:$cp --data-dir "$d/c" "${common[@]}" >"$d/cout" 2>"$d/cerr" &
  c=$!
  for _ in $(seq 100); do grep -q listening "$d/cout" 2>/dev/null && break; sleep 0.1; done
  AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=y $bin serve --role write --listen 127.0.0.1:$wp --data-dir "$d/w" "${common[@]}" >"$d/wout" 2>"$d/werr" &
  w=$!
  for _ in $(seq 100); do grep -q listening "$d/wout" 2>/dev/null && break; sleep 0.1; done
  wrk -t2 -c128 -d10s --latency -s bench/wrk/api.lua http://127.0.0.1:$wp -- post > "$d/wrk"
  rps=$(grep Requests/sec "$d/wrk" | awk '{print $2}'); p99=$(grep " 99%" "$d/wrk" | awk '{print $2}'); non2xx=$(grep -o "Non-2xx or 3xx responses: [0-9]*" "$d/wrk" || echo "Non-2xx: 0")
  msgs=$(curl -s http://127.0.0.1:$cp/admin/wal | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["source"]["deliveries"], d["consumer"]["events"])')
  echo "batch_max_rides=$rides: $rps POST/s, p99 $p99, $non2xx; consumer deliveries/rides so far: $msgs"
  kill $w $c; wait $w $c 2>/dev/null; rm -rf "$d"
done
