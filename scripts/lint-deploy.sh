#!/usr/bin/env bash
# Lints the deployment files:
#   1. cfn-lint on deploy/aws/*.yaml (installed with `pip install --quiet cfn-lint` when
#      missing);
#   2. the systemd unit and drop-in embedded in deploy/aws/liftlog.yaml's user data must be
#      byte-identical to deploy/systemd/ (one unit, two places);
#   3. shellcheck on each launch template's user data and on every script in scripts/
#      (installed with apt-get when missing and we are root; skipped if still missing);
#   4. systemd-analyze verify on deploy/systemd/*.service with their drop-ins (if
#      available; any warning fails);
#   5. nginx -t on deploy/nginx/liftlog-cluster.conf rendered as scripts/cluster.sh renders
#      it (if nginx is installed).
# A check whose tool is missing is reported as skipped, never as passed.
#
# Usage: scripts/lint-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0
pass() { printf '[lint-deploy] ok: %s\n' "$*"; }
skip() { printf '[lint-deploy] SKIPPED: %s\n' "$*"; }
fail() {
  printf '[lint-deploy] FAILED: %s\n' "$*" >&2
  failed=1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ------------------------------------------------------------------ cfn-lint ---
if ! command -v cfn-lint >/dev/null 2>&1; then
  echo "[lint-deploy] cfn-lint not found: pip install --quiet cfn-lint"
  if command -v pip >/dev/null 2>&1; then
    pip install --quiet cfn-lint
  elif command -v pip3 >/dev/null 2>&1; then
    pip3 install --quiet cfn-lint
  else
    python3 -m pip install --quiet cfn-lint
  fi
  hash -r
fi
templates=(deploy/aws/*.yaml)
if cfn-lint --version >/dev/null 2>&1; then
  if cfn-lint -- "${templates[@]}"; then
    pass "cfn-lint $(cfn-lint --version 2>&1 | awk '{print $2}') on ${templates[*]}"
  else
    fail "cfn-lint on ${templates[*]}"
  fi
else
  fail "cfn-lint could not be installed"
fi

# ------------------------------------------ user data: embedded unit, shell ---
# Extracts from the template: the unit and drop-in embedded in the bootstrap, and each
# launch template's user data (header with ${...} replaced by dummy values, then the body).
python3 - "$work" <<'PY' || fail "could not read deploy/aws/liftlog.yaml's user data"
import re, sys
import yaml

out = sys.argv[1]

class Loader(yaml.SafeLoader):
    pass

def any_tag(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)

Loader.add_multi_constructor("!", any_tag)
with open("deploy/aws/liftlog.yaml") as f:
    t = yaml.load(f, Loader=Loader)
body = t["Mappings"]["Bootstrap"]["Script"]["Body"]

def embedded(target):
    m = re.search(r"^cat >%s <<'UNIT'\n(.*?)\nUNIT$" % re.escape(target), body, re.S | re.M)
    if not m:
        sys.exit("no heredoc for %s in Mappings.Bootstrap.Script.Body" % target)
    return m.group(1) + "\n"

open(out + "/embedded-unit", "w").write(embedded("/etc/systemd/system/liftlog@.service"))
open(out + "/embedded-dropin", "w").write(embedded("/etc/systemd/system/liftlog@.service.d/cloudwatch-logs.conf"))

for name, res in t["Resources"].items():
    if res.get("Type") != "AWS::EC2::LaunchTemplate":
        continue
    parts = res["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"][1]
    header = parts[0] if isinstance(parts[0], str) else parts[0][0]
    header = re.sub(r"\$\{[^}!]+\}", "x", header)
    open("%s/userdata-%s.sh" % (out, name), "w").write(header + body)
PY
if [[ -f $work/embedded-unit ]]; then
  if diff -u deploy/systemd/liftlog@.service "$work/embedded-unit"; then
    pass "the unit in the template's user data is deploy/systemd/liftlog@.service"
  else
    fail "deploy/aws/liftlog.yaml embeds a different liftlog@.service than deploy/systemd/ (diff above)"
  fi
  if diff -u deploy/systemd/liftlog@.service.d/cloudwatch-logs.conf "$work/embedded-dropin"; then
    pass "the drop-in in the template's user data is deploy/systemd/liftlog@.service.d/cloudwatch-logs.conf"
  else
    fail "deploy/aws/liftlog.yaml embeds a different cloudwatch-logs.conf than deploy/systemd/ (diff above)"
  fi
fi

# The shellcheck tool is one apt package (~10 s) on the Debian machines we run on; install it
# when we can, so that CI checks the scripts rather than reporting the check skipped.
if ! command -v shellcheck >/dev/null 2>&1 && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "[lint-deploy] shellcheck not found: apt-get install -y shellcheck"
  # A fresh machine's package lists may be empty: update once, then try again. A failure
  # leaves the check skipped (reported below), never a failed run.
  if ! apt-get install -y -qq shellcheck >/dev/null 2>&1; then
    if apt-get update -qq >/dev/null 2>&1; then
      apt-get install -y -qq shellcheck >/dev/null 2>&1 || true
    fi
  fi
fi
if command -v shellcheck >/dev/null 2>&1; then
  for f in "$work"/userdata-*.sh scripts/*.sh scripts/lib/*.sh; do
    [[ -f $f ]] || continue
    # -x: follow the scripts' `source` of lib/common.sh (where their log, die, ... are).
    if shellcheck -x -s bash "$f"; then
      pass "shellcheck ${f##*/}"
    else
      fail "shellcheck ${f##*/}"
    fi
  done
else
  skip "shellcheck not installed"
fi

# ------------------------------------------------------------------- systemd ---
if command -v systemd-analyze >/dev/null 2>&1; then
  # verify insists that ExecStart's binary exists: point the units at a stub.
  units="$work/units"
  mkdir -p "$units"
  printf '#!/bin/sh\nexit 0\n' >"$units/liftlog"
  chmod +x "$units/liftlog"
  for f in deploy/systemd/*.service; do
    sed "s|/usr/local/bin/liftlog|$units/liftlog|g" "$f" >"$units/${f##*/}"
  done
  for d in deploy/systemd/*.service.d; do
    [[ -d $d ]] && cp -r "$d" "$units/"
  done
  for f in "$units"/*.service; do
    name=${f##*/}
    # A template unit is verified through one instance of it.
    [[ $name == *@.service ]] && name=${name/@.service/@write.service}
    if out=$(cd "$units" && systemd-analyze verify "./$name" 2>&1) && [[ -z $out ]]; then
      pass "systemd-analyze verify $name"
    else
      printf '%s\n' "$out" >&2
      fail "systemd-analyze verify $name"
    fi
  done
else
  skip "systemd-analyze not available"
fi

# --------------------------------------------------------------------- nginx ---
if command -v nginx >/dev/null 2>&1; then
  ng="$work/nginx"
  mkdir -p "$ng"/tmp/{client_body,proxy,fastcgi,uwsgi,scgi}
  user_directive=""
  [[ $(id -u) -eq 0 ]] && user_directive="user $(id -un) $(id -gn);"
  sed -e "s|@USER_DIRECTIVE@|$user_directive|" -e "s|@NGINX_DIR@|$ng|g" -e "s|@LISTEN@|127.0.0.1:9080|" \
    -e "s|^@WRITE_SERVERS@$|        server 127.0.0.1:9081 max_fails=1 fail_timeout=2s;\n        server 127.0.0.1:9082 max_fails=1 fail_timeout=2s;|" \
    -e "s|^@READ_SERVERS@$|        server 127.0.0.1:9101 max_fails=1 fail_timeout=2s;|" \
    deploy/nginx/liftlog-cluster.conf >"$ng/nginx.conf"
  if grep -n '@[A-Z_]*@' "$ng/nginx.conf" >&2; then
    fail "deploy/nginx/liftlog-cluster.conf has placeholders the renderer does not know (above)"
  elif nginx -t -q -p "$ng" -c "$ng/nginx.conf" -e "$ng/error.log"; then
    pass "nginx -t on deploy/nginx/liftlog-cluster.conf (rendered)"
  else
    fail "nginx -t on deploy/nginx/liftlog-cluster.conf (rendered)"
  fi
else
  skip "nginx not installed"
fi

if ((failed)); then
  echo "[lint-deploy] FAILED" >&2
  exit 1
fi
echo "[lint-deploy] all checks passed"
