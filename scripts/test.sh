#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs and starts what the production-mode
# tests need (RabbitMQ, DynamoDB Local) when missing, runs every test of the workspace
# including the ones that talk to those services, and stops only what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

started_services=0
cleanup() {
  if [ "$started_services" = 1 ]; then
    cargo xtask services down || true
  fi
}
trap cleanup EXIT

echo "== services"
cargo xtask services up
started_services=1
export LIFTLOG_TEST_AMQP="${LIFTLOG_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export LIFTLOG_TEST_DYNAMODB="${LIFTLOG_TEST_DYNAMODB:-http://127.0.0.1:${DYNAMODB_PORT:-8000}}"

# One feature set for every cargo step, so nothing is built twice: the crash tests' fault
# points (LIFTLOG_FAULT_*) exist only in this build, and the OTLP exporter is built and tested
# here. fuzz-api.sh builds with it too. (Not a
# LIFTLOG_* name: the node refuses unknown LIFTLOG_* variables as misspelt config keys.)
export BUILD_FEATURES="liftlog/fault-injection,liftlog/otlp"
features=(--features "$BUILD_FEATURES")

echo "== format"
if ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add rustfmt || true
fi
cargo fmt --all --check

echo "== build"
cargo build --workspace --all-targets --locked "${features[@]}"

echo "== lint"
# clippy is a rustup component: add it when missing; a lint that cannot run fails the run.
if ! cargo clippy --version >/dev/null 2>&1; then
  echo "clippy not found: rustup component add clippy"
  rustup component add clippy || true
fi
if ! cargo clippy --version >/dev/null 2>&1; then
  echo "FAIL: clippy is not installed and could not be installed (rustup component add clippy)" >&2
  exit 1
fi
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings

echo "== browser (the dashboard test drives headless Chromium through chromedriver)"
LOG_TAG="test"
# shellcheck source=scripts/lib/common.sh
. scripts/lib/common.sh
mkdir -p target/test-logs
need_tools target/test-logs chromium chromedriver=chromium-driver

echo "== tests (embedded and production back ends)"
# --include-ignored: the tests that need RabbitMQ/DynamoDB are #[ignore] so that a plain
# `cargo test` without the services reports them as ignored, never as passed.
cargo test --workspace --locked "${features[@]}" -- --include-ignored

echo "== deployment lint (cfn-lint on deploy/aws, systemd units, nginx config)"
scripts/lint-deploy.sh

echo "== API fuzzing (schemathesis against /openapi.json)"
scripts/fuzz-api.sh

echo "== dependency audit (cargo audit; accepted advisories in .cargo/audit.toml)"
scripts/audit.sh
