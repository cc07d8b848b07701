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
