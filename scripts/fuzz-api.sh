#!/usr/bin/env bash
# Property-based fuzzing of the HTTP API with schemathesis, against the OpenAPI document the
# server itself serves (GET /openapi.json): every operation, valid and invalid inputs, and
# every response must be documented (status, content type, headers, body schema) and never
# a 5xx.
#
#   scripts/fuzz-api.sh                 CI size: ~300 generated cases per operation and phase
#   scripts/fuzz-api.sh --cases N       N cases per operation (hypothesis max_examples)
#   scripts/fuzz-api.sh --long          several thousand per operation (the long run)
#   scripts/fuzz-api.sh --seed S        repeat a run (the seed is printed at the end)
#   scripts/fuzz-api.sh --release       fuzz target/release/liftlog instead of target/debug
#   scripts/fuzz-api.sh --check-log F   only the server-log check below, on log file F
#
# It builds the binary (a no-op when it is up to date), installs schemathesis (pinned) with
# pip when missing or at another version, starts `liftlog serve` on a free loopback port
# with a fresh data dir and an admin token, runs schemathesis, stops the server with SIGTERM,
# and exits non-zero on any failure: a schemathesis finding; the server dying, or not exiting
# 0 on SIGTERM; or the server's log holding a panic ("panicked at") or an ERROR line. The
# last catches what no response shows, such as a panic or a failure in a background task
# (flusher, actors) while the HTTP answer was fine.
set -euo pipefail
cd "$(dirname "$0")/.."

# check_server_log FILE: prints the lines of a liftlog log that fail the run (panics, with the
# two lines after each, and ERROR events, text or JSON format) and returns 1 if there are any.
check_server_log() {
  local clean panics errors
  # tracing colours its levels when it thinks it may: strip the escapes before matching.
  clean=$(sed 's/\x1b\[[0-9;]*m//g' "$1")
  panics=$(grep -naE -A2 'panicked at' <<<"$clean" || true)
  errors=$(grep -naE '(^|[[:space:]])ERROR([[:space:]]|$)|"level": ?"ERROR"' <<<"$clean" || true)
  if [ -z "$panics" ] && [ -z "$errors" ]; then
    return 0
  fi
  if [ -n "$panics" ]; then
    echo "FAIL: the server panicked (from $1, line numbers first; first 40 lines):" >&2
    head -n 40 <<<"$panics" >&2
  fi
  if [ -n "$errors" ]; then
    echo "FAIL: the server logged $(wc -l <<<"$errors") ERROR line(s) (from $1; first 20):" >&2
    head -n 20 <<<"$errors" >&2
  fi
  return 1
}

SCHEMATHESIS_VERSION=4.32.5
cases=300
seed=""
profile=debug
while [ $# -gt 0 ]; do
  case "$1" in
    --cases) cases="$2"; shift 2 ;;
    --long) cases=3000; shift ;;
    --seed) seed="$2"; shift 2 ;;
    --release) profile=release; shift ;;
    --check-log)
      [ -f "${2:-}" ] || { echo "--check-log needs a log file" >&2; exit 2; }
      if check_server_log "$2"; then echo "== $2: no panic, no ERROR line"; exit 0; fi
      exit 1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

# --- schemathesis -------------------------------------------------------------------------
# Exactly the pinned version: the current Python's if it has that one, else a virtualenv kept
# in the user's cache, (re)installed from PyPI when missing or at another version. Never
# installed into the machine's own Python, whose packages are other people's business.
PYTHON="${PYTHON:-python3}"
has_schemathesis() {
  [[ $("$1" -m schemathesis.cli --version 2>/dev/null) =~ version\ ${SCHEMATHESIS_VERSION//./\\.}$ ]]
}
venv="${XDG_CACHE_HOME:-$HOME/.cache}/liftlog/schemathesis-$SCHEMATHESIS_VERSION"
if ! has_schemathesis "$PYTHON"; then
  if ! has_schemathesis "$venv/bin/python"; then
    echo "== installing schemathesis $SCHEMATHESIS_VERSION with pip into $venv"
    rm -rf "$venv"
    if ! { "$PYTHON" -m venv "$venv" &&
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"; } ||
      ! has_schemathesis "$venv/bin/python"; then
      echo "FAIL: schemathesis $SCHEMATHESIS_VERSION could not be installed: API not fuzzed" >&2
      exit 1
    fi
  fi
  PYTHON="$venv/bin/python"
fi
echo "== schemathesis $SCHEMATHESIS_VERSION ($PYTHON)"

# --- the server ---------------------------------------------------------------------------
# Always through cargo: a binary left from older sources must not be what gets fuzzed.
bin="${CARGO_TARGET_DIR:-target}/$profile/liftlog"
echo "== building $bin"
# BUILD_FEATURES: the test command's features, so its build is reused, not redone.
build_features=()
if [ -n "${BUILD_FEATURES:-}" ]; then build_features=(--features "$BUILD_FEATURES"); fi
if [ "$profile" = release ]; then
  cargo build --release --locked --bin liftlog "${build_features[@]}"
elif [ -n "${BUILD_FEATURES:-}" ]; then
  # The test command's own build line: `--bin liftlog` alone resolves the dependencies'
  # features without the other members' and dev-dependencies' and rebuilt about fifty
  # crates (hyper, actix-web, reqwest...) in CI; the same line as test.sh is a no-op there.
  cargo build --workspace --all-targets --locked "${build_features[@]}"
else
  cargo build --locked --bin liftlog "${build_features[@]}"
fi

work="$(mktemp -d)"
server_pid=""
# alive PID: the process exists and is not a zombie. (`kill -0` succeeds on our own dead child
# until it is waited for, so it cannot tell that the server died.)
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

token="fuzz-$RANDOM$RANDOM"
: >"$work/stdout"
# Warnings and errors only, with the same silencing of actix's per-request dispatcher errors
# as the server's own default filter (src/bin/liftlog.rs): a malformed request is the
# client's fault and is answered 4xx, not an ERROR of ours. Any other ERROR fails the run
# (so a RUST_LOG of your own should keep actix_http::h1::dispatcher=off).
# The token goes in the environment, not on the command line (where `ps` shows it); the
# admin routes are on the public (loopback) listener so that the document's every route is fuzzed.
RUST_LOG="${RUST_LOG:-warn,actix_http::h1::dispatcher=off}" NO_COLOR=1 LIFTLOG_ADMIN__TOKEN="$token" "$bin" serve --listen 127.0.0.1:0 --admin-listen main --data-dir "$work/data" \
  >"$work/stdout" 2>"$work/server.log" &
server_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr="$(sed -n '1s/^liftlog listening on //p' "$work/stdout")"
  [ -n "$addr" ] && break
  alive "$server_pid" || { echo "liftlog exited at start:" >&2; cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "liftlog did not report its address" >&2; exit 1; }
echo "== fuzzing $addr with $cases cases per operation"

# --- the run ------------------------------------------------------------------------------
# Checks: no 5xx; status codes, content types, documented headers and bodies match the
# document; invalid input (per the document) is rejected; other methods get 405 + Allow.
# (The token is sent so the admin endpoints answer 200; tests/api.rs checks their 401s:
# schemathesis' ignored_auth cannot, as the document rightly says auth is optional.)
# Stateless phases plus the stateful phase that
# follows the document's links (POST a ride, then read it back).
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance
checks=$checks,response_schema_conformance,negative_data_rejection,unsupported_method,allow_header_conformance
args=(
  run "$addr/openapi.json"
  --url "$addr"
  --checks "$checks"
  --max-examples "$cases"
  --header "Authorization: Bearer $token"
  --workers 2
  --request-timeout 10
  # The live stream answers 200 with an endless body, which a fuzzer can only time out on;
  # tests/api.rs covers its answers (the stream, its 400/404/503s, Last-Event-ID).
  --exclude-operation-id resortDayStream
  --generation-database none
  --suppress-health-check "too_slow,filter_too_much"
  --no-color
)
[ -n "$seed" ] && args+=(--seed "$seed")
status=0
# From the scratch dir: schemathesis keeps a .schemathesis/ cache in its working directory.
(cd "$work" && "$PYTHON" -m schemathesis.cli "${args[@]}") || status=$?

failed=0
if ! alive "$server_pid"; then
  server_status=0
  wait "$server_pid" || server_status=$?
  echo "FAIL: liftlog died during the run (exit status $server_status)" >&2
  tail -n 50 "$work/server.log" >&2
  failed=1
else
  # A graceful stop, so that what shutdown logs (the last flush) is checked too.
  kill -TERM "$server_pid"
  for _ in $(seq 1 300); do
    alive "$server_pid" || break
    sleep 0.1
  done
  if alive "$server_pid"; then
    echo "FAIL: liftlog did not exit within 30 s of SIGTERM (killed)" >&2
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    failed=1
  else
    server_status=0
    wait "$server_pid" || server_status=$?
    if [ "$server_status" -ne 0 ]; then
      echo "FAIL: liftlog exited $server_status on SIGTERM" >&2
      failed=1
    fi
  fi
  server_pid=""
fi
if grep -qaE '(^|[[:space:]])WARN([[:space:]]|$)' "$work/server.log"; then
  echo "== server warnings during the run (first 20; they do not fail the run)"
  grep -aE '(^|[[:space:]])WARN([[:space:]]|$)' "$work/server.log" | head -n 20
fi
check_server_log "$work/server.log" || failed=1
if [ "$status" -ne 0 ]; then
  echo "FAIL: schemathesis found problems (exit $status)" >&2
  failed=1
fi
if [ "$failed" -ne 0 ]; then
  exit 1
fi
echo "== fuzz-api: no failures (schemathesis, server exit, server log)"
