#!/usr/bin/env bash
# Kept only for tests/amqp_bus.rs until it calls testkit::services directly; everything
# else runs `cargo xtask services COMMAND` (see `cargo xtask help`). Runs the built
# xtask binary: a nested `cargo run` inside `cargo test` could wait on cargo's build lock.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
xtask="$root/target/debug/xtask"
[[ -x $xtask ]] || cargo build --quiet --locked --manifest-path "$root/Cargo.toml" -p xtask
exec "$xtask" services "$@"
