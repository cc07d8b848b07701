# shellcheck shell=bash
# Sourced by the benchmark scripts in scripts/: their command-line flags, their log lines and
# their list of failed steps, written once. Set LOG_TAG (bench, scale) before sourcing.
#
# parse_flags HELP_LINES --flag=VAR... -- "$@"
#   Sets VAR=1 for every --flag given (set VAR=0 before the call). -h/--help prints the
#   lines HELP_LINES (a sed range such as 2,9) of the calling script's header comment and
#   exits 0; anything else is an unknown argument, exit 2: a benchmark must not run with a
#   misspelt option silently ignored.
parse_flags() {
  local help=$1 a
  shift
  local -A var=()
  while (($#)) && [[ $1 != -- ]]; do
    var[${1%%=*}]=${1#*=}
    shift
  done
  shift
  for a in "$@"; do
    if [[ -n ${var[$a]:-} ]]; then
      printf -v "${var[$a]}" 1
    elif [[ $a == -h || $a == --help ]]; then
      sed -n "${help}p" "$0" | sed 's/^# \{0,1\}//'
      exit 0
    else
      echo "unknown argument: $a (try --help)" >&2
      exit 2
    fi
  done
}

log() { printf '[%s %s] %s\n' "$LOG_TAG" "$(date +%T)" "$*" >&2; }
warn() { printf '[%s %s] WARNING: %s\n' "$LOG_TAG" "$(date +%T)" "$*" >&2; }
# fail WHAT: a step that did not do its job; the run goes on, and the script ends with exit 1
# after listing FAILURES in its results file.
FAILURES=()
fail() {
  printf '[%s %s] FAILED: %s\n' "$LOG_TAG" "$(date +%T)" "$*" >&2
  FAILURES+=("$*")
}
now_ms() { date +%s%3N; }

# need_tools LOG_DIR TOOL[=PACKAGE]...: every TOOL on PATH; a missing one is installed from
# Debian's package PACKAGE (default: the tool's name; as root, with apt-get; log in
# LOG_DIR/apt-TOOL.log), else the script exits 1: nothing runs, nor is reported, with a tool
# missing. nginx's package starts the system nginx; that one is stopped again (the scripts
# run their own).
need_tools() {
  local logs=$1 tool package had_nginx
  shift
  for tool in "$@"; do
    package=${tool#*=}
    tool=${tool%%=*}
    command -v "$tool" >/dev/null && continue
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      log "installing $tool with apt-get"
      had_nginx=0
      [[ -s /run/nginx.pid ]] && had_nginx=1
      # A fresh image may have no package lists yet: then update them once and try again.
      DEBIAN_FRONTEND=noninteractive apt-get install -y "$package" >"$logs/apt-$tool.log" 2>&1 ||
        { apt-get update >>"$logs/apt-$tool.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$package" >>"$logs/apt-$tool.log" 2>&1; } ||
        { echo "apt-get install $package failed (see $logs/apt-$tool.log)" >&2; exit 1; }
      if [[ $tool == nginx ]] && ((!had_nginx)) && [[ -s /run/nginx.pid ]]; then nginx -s quit 2>/dev/null || true; fi
    fi
    command -v "$tool" >/dev/null || { echo "$tool is missing and could not be installed: apt-get install $package" >&2; exit 1; }
  done
}
