# shellcheck shell=bash
# Shell helpers shared by scripts/services.sh and scripts/cluster.sh: one copy, so that a
# fix reaches both. This file is sourced, not run; the caller sets `set -euo pipefail`
# itself, and before sourcing it sets:
#   LOG_TAG              the tag of every message of log/warn/die/show_tail: "[$LOG_TAG] ..."
#   WAIT_UNTIL_INTERVAL  seconds between two polls of wait_until (services.sh 0.5, cluster.sh 0.2)

: "${LOG_TAG:?set LOG_TAG before sourcing scripts/lib/common.sh}"
: "${WAIT_UNTIL_INTERVAL:?set WAIT_UNTIL_INTERVAL before sourcing scripts/lib/common.sh}"

log() { printf '[%s] %s\n' "$LOG_TAG" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$LOG_TAG" "$*" >&2; }
die() {
  printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2
  exit 1
}

# Shows the last lines of a log file on stderr (used before dying).
show_tail() {
  if [[ -s $1 ]]; then
    printf '[%s] --- last lines of %s ---\n' "$LOG_TAG" "$1" >&2
    tail -n 25 "$1" >&2 || true
  fi
}

# pid_alive PID: true if the process exists and is not a zombie.
pid_alive() {
  local stat
  [[ ${1:-} =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# wait_until SECONDS CMD...: polls CMD every $WAIT_UNTIL_INTERVAL s; false on timeout.
wait_until() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep "$WAIT_UNTIL_INTERVAL"
  done
}

# not CMD...: true if CMD fails (for wait_until, e.g. `wait_until 10 not pid_alive "$pid"`).
not() { ! "$@"; }

# Closes every fd above 2 (call in a subshell right before exec'ing a daemon): a daemon must
# not hold our lock (fd 9) nor any pipe a caller waits on (or reads to its end).
close_extra_fds() {
  local f fd
  for f in /proc/self/fd/*; do
    fd=${f##*/}
    if [[ $fd =~ ^[0-9]+$ ]] && ((fd > 2)); then
      { exec {fd}>&-; } 2>/dev/null || true
    fi
  done
}
