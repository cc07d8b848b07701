#!/usr/bin/env bash
# Lints the deployment files:
#   1. cfn-lint $CFN_LINT_VERSION (pinned below) on deploy/aws/*.yaml, from a virtualenv kept
#      in ~/.cache/liftlog (installed with pip when missing or at another version);
#   2. the systemd unit and drop-in embedded in deploy/aws/liftlog.yaml's user data must be
#      byte-identical to deploy/systemd/ (one unit, two places);
#   3. shellcheck on each launch template's user data, on every script in scripts/ and on
#      .ci/run;
#   4. systemd-analyze verify on deploy/systemd/*.service with their drop-ins (any warning
#      fails);
#   5. nginx -t on deploy/nginx/liftlog-cluster.conf rendered as the testkit renders
#      it;
#   6. the Grafana dashboard (deploy/grafana/*.json) parses as JSON with panels and queries,
#      and the Prometheus rules (deploy/prometheus/*.yaml) parse and each rule has an alert,
#      an expr and a for (the cfn-lint virtualenv's python, which has PyYAML; promtool is
#      not used: Debian ships it only inside the 96 MB prometheus server package). That
#      every liftlog_* series they name is one liftlog exports is a Rust test run by the test
#      command (`cargo test --lib deploy_files_name_only_exported_metrics`).
# A tool that is missing is installed (shellcheck, systemd-analyze and nginx with apt-get, as
# root: Debian packages shellcheck, systemd and nginx); if it cannot be, its check FAILS.
# No check is ever skipped.
#
# Usage: scripts/lint-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CFN_LINT_VERSION=1.58.0

failed=0
pass() { printf '[lint-deploy] ok: %s\n' "$*"; }
fail() {
  printf '[lint-deploy] FAILED: %s\n' "$*" >&2
  failed=1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# apt_install PKG...: installs Debian packages (root only). A fresh machine's package lists
# may be empty or old: on a first failure, update them once and try again. Waits for the
# dpkg lock rather than failing while another install holds it.
apt_updated=0
apt_install() {
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[lint-deploy] cannot install $* (not root, or no apt-get)" >&2
    return 1
  fi
  echo "[lint-deploy] installing $* with apt-get (log: $work/apt.log)"
  local opts=(-y -qq -o DPkg::Lock::Timeout=300
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  if DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >>"$work/apt.log" 2>&1 </dev/null; then
    return 0
  fi
  if ((apt_updated == 0)); then
    apt_updated=1
    DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=300 >>"$work/apt.log" 2>&1 </dev/null || true
    if DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >>"$work/apt.log" 2>&1 </dev/null; then
      return 0
    fi
  fi
  tail -n 20 "$work/apt.log" >&2
  return 1
}

# need CMD PKG: true if CMD is there, installing Debian package PKG first when it is not.
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "[lint-deploy] $1 not found"
  apt_install "$2" || true
  hash -r
  command -v "$1" >/dev/null 2>&1
}

# ------------------------------------------------------------------ cfn-lint ---
# The pinned version in its own virtualenv, whatever cfn-lint is (or is not) on PATH: a
# newer cfn-lint brings new rules, and the result must not depend on the machine.
cfn_venv="${XDG_CACHE_HOME:-$HOME/.cache}/liftlog/cfn-lint-$CFN_LINT_VERSION"
cfn_lint="$cfn_venv/bin/cfn-lint"
cfn_pinned() { [[ $("$cfn_lint" --version 2>/dev/null) == "cfn-lint $CFN_LINT_VERSION" ]]; }
if ! cfn_pinned; then
  echo "[lint-deploy] installing cfn-lint $CFN_LINT_VERSION with pip into $cfn_venv"
  rm -rf "$cfn_venv"
  { python3 -m venv "$cfn_venv" &&
    "$cfn_venv/bin/python" -m pip install --quiet --disable-pip-version-check "cfn-lint==$CFN_LINT_VERSION"; } ||
    true
fi
templates=(deploy/aws/*.yaml)
if cfn_pinned; then
  if "$cfn_lint" -- "${templates[@]}"; then
    pass "cfn-lint $CFN_LINT_VERSION on ${templates[*]}"
  else
    fail "cfn-lint $CFN_LINT_VERSION on ${templates[*]}"
  fi
else
  fail "cfn-lint $CFN_LINT_VERSION could not be installed"
fi
# PyYAML (for reading the template below) comes with cfn-lint.
py=python3
[[ -x $cfn_venv/bin/python ]] && py="$cfn_venv/bin/python"

# ------------------------------------------ user data: embedded unit, shell ---
# Extracts from the template: the unit and drop-in embedded in the bootstrap, and each
# launch template's user data (header with ${...} replaced by dummy values, then the body).
"$py" - "$work" <<'PY' || fail "could not read deploy/aws/liftlog.yaml's user data"
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

# ---------------------------------------------------------------- shellcheck ---
if need shellcheck shellcheck; then
  for f in "$work"/userdata-*.sh scripts/*.sh scripts/lib/*.sh .ci/run; do
    [[ -f $f ]] || continue
    # -x: follow the scripts' `source` of lib/common.sh (their flags, log and fail).
    if shellcheck -x -s bash "$f"; then
      pass "shellcheck ${f#"$work"/}"
    else
      fail "shellcheck ${f#"$work"/}"
    fi
  done
else
  fail "shellcheck is not installed and could not be installed (apt-get install shellcheck)"
fi

# ------------------------------------------------------------------- systemd ---
# systemd-analyze verify works without systemd running as PID 1 (as in a container).
if need systemd-analyze systemd; then
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
  fail "systemd-analyze is not installed and could not be installed (apt-get install systemd)"
fi

# --------------------------------------------------------------------- nginx ---
nginx_started_before=0
[[ -s /run/nginx.pid ]] && nginx_started_before=1
if need nginx nginx; then
  # Without a policy-rc.d that forbids it, installing the package starts the system nginx on
  # :80. If we caused that, undo it: only `nginx -t` is wanted here.
  if ((nginx_started_before == 0)) && [[ -s /run/nginx.pid ]]; then
    echo "[lint-deploy] the nginx package started the system nginx; stopping it (nginx -s quit)"
    nginx -s quit 2>/dev/null || true
  fi
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
  fail "nginx is not installed and could not be installed (apt-get install nginx)"
fi

if "$py" - deploy/grafana/*.json deploy/prometheus/*.yaml <<'PY'
import json, sys, yaml
for path in sys.argv[1:]:
    with open(path) as f:
        if path.endswith(".json"):
            d = json.load(f)
            exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
            assert exprs and all("liftlog_" in e for e in exprs), f"{path}: a panel without a liftlog query"
        else:
            rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
            assert rules and all({"alert", "expr", "for"} <= r.keys() for r in rules), f"{path}: a rule without alert/expr/for"
PY
then
  pass "Grafana dashboard and Prometheus rules parse (deploy/grafana, deploy/prometheus)"
else
  fail "Grafana dashboard or Prometheus rules (deploy/grafana, deploy/prometheus)"
fi

if ((failed)); then
  echo "[lint-deploy] FAILED" >&2
  exit 1
fi
echo "[lint-deploy] all checks passed"
