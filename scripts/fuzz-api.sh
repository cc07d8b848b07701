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
#
# It builds the binary if missing, installs schemathesis (pinned) with pip if missing, starts
# `liftlog serve` on a free loopback port with a fresh data dir and an admin token, runs
# schemathesis, stops the server, and exits non-zero on any failure (or if the server died).
set -euo pipefail
cd "$(dirname "$0")/.."

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
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

# --- schemathesis -------------------------------------------------------------------------
# The pinned version from PyPI: into the current Python if pip may install there, else
# (an "externally managed" system Python) into a virtualenv kept in the user's cache.
PYTHON="${PYTHON:-python3}"
has_schemathesis() { "$1" -m schemathesis.cli --version 2>/dev/null | grep -qF "version $SCHEMATHESIS_VERSION"; }
venv="${XDG_CACHE_HOME:-$HOME/.cache}/liftlog/schemathesis-$SCHEMATHESIS_VERSION"
if ! has_schemathesis "$PYTHON"; then
  if has_schemathesis "$venv/bin/python"; then
    PYTHON="$venv/bin/python"
  else
    echo "== installing schemathesis $SCHEMATHESIS_VERSION"
    if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"; then
      echo "   pip could not install into $PYTHON; using a virtualenv in $venv"
      "$PYTHON" -m venv "$venv"
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
      PYTHON="$venv/bin/python"
    fi
  fi
fi

# --- the server ---------------------------------------------------------------------------
bin="${CARGO_TARGET_DIR:-target}/$profile/liftlog"
if [ ! -x "$bin" ]; then
  echo "== building $bin"
  if [ "$profile" = release ]; then cargo build --release --locked --bin liftlog; else cargo build --locked --bin liftlog; fi
fi

work="$(mktemp -d)"
server_pid=""
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
# Warnings and errors only: a 5xx is logged there and shown if the run fails.
# The token goes in the environment, not on the command line (where `ps` shows it).
RUST_LOG="${RUST_LOG:-warn}" LIFTLOG_ADMIN_TOKEN="$token" "$bin" serve --listen 127.0.0.1:0 --data-dir "$work/data" \
  >"$work/stdout" 2>"$work/server.log" &
server_pid=$!
addr=""
for _ in $(seq 1 100); do
  addr="$(sed -n '1s/^liftlog listening on //p' "$work/stdout")"
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "liftlog exited at start:" >&2; cat "$work/server.log" >&2; exit 1; }
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
  --generation-database none
  --suppress-health-check "too_slow,filter_too_much"
  --no-color
)
[ -n "$seed" ] && args+=(--seed "$seed")
status=0
# From the scratch dir: schemathesis keeps a .schemathesis/ cache in its working directory.
(cd "$work" && "$PYTHON" -m schemathesis.cli "${args[@]}") || status=$?

if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "FAIL: liftlog died during the run" >&2
  tail -n 50 "$work/server.log" >&2
  exit 1
fi
if grep -qaE '(ERROR|WARN)' "$work/server.log"; then
  echo "== server warnings/errors during the run (first 20)"
  grep -aE '(ERROR|WARN)' "$work/server.log" | head -n 20
fi
if [ "$status" -ne 0 ]; then
  echo "FAIL: schemathesis found problems (exit $status)" >&2
  exit "$status"
fi
echo "== fuzz-api: no failures"
